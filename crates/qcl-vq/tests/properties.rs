//! Property tests of the quantizer's invariants (items 5–7 of docs/methods/aqm.md § Invariants
//! and the qcl-vq issue).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use qcl_nn::ParamStore;
use qcl_tensor::{squared_distance, Seed};
use qcl_vq::{CodebookUpdate, PackedIndices, ResidualVq, VectorQuantizer, VectorQuantizerConfig};

use common::flat_f32;

const DEV: Device = Device::Cpu;

/// `default` cases, or `PROPTEST_CASES` when set (for longer hunts for rare failures).
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

/// A small random problem: configuration, input `(B, C, H, W)` or `(B, T, C)`.
#[derive(Debug, Clone)]
struct Problem {
    config: VectorQuantizerConfig,
    /// Input shape.
    shape: Vec<usize>,
    /// Draw inputs (and codebooks) from a coarse grid, so that ties happen.
    grid: bool,
    seed: u64,
}

fn update_strategy() -> impl Strategy<Value = CodebookUpdate> {
    prop_oneof![
        (0.0f64..=1.0, 1e-5f64..0.1).prop_map(|(decay, eps)| CodebookUpdate::Ema { decay, eps }),
        Just(CodebookUpdate::Gradient),
        Just(CodebookUpdate::Frozen),
    ]
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        1usize..=3,
        // Small D takes the kernel's direct path, D > 32 its GEMM screening.
        prop_oneof![3 => 1usize..=5, 1 => 30usize..=40],
        1usize..=12,
        update_strategy(),
        proptest::option::of(0.01f64..3.0),
        (1usize..=3, 1usize..=4, 1usize..=4, any::<bool>()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(codebooks, d, codes, update, threshold, (b, h, w, sequence), grid, seed)| {
                let dim = codebooks * d;
                let config = VectorQuantizerConfig {
                    codebooks,
                    update,
                    dead_code_threshold: threshold,
                    seed: Seed::new(seed),
                    ..VectorQuantizerConfig::new(dim, codes)
                };
                let shape = if sequence {
                    vec![b, h * w, dim]
                } else {
                    vec![b, dim, h, w]
                };
                Problem {
                    config,
                    shape,
                    grid,
                    seed,
                }
            },
        )
}

fn values(seed: Seed, len: usize, grid: bool) -> Vec<f32> {
    let mut rng = seed.rng();
    (0..len)
        .map(|_| {
            let u = rng.uniform() * 2.0 - 1.0;
            if grid {
                (u * 2.0).round() / 2.0
            } else {
                u
            }
        })
        .collect()
}

impl Problem {
    fn input(&self, salt: u64) -> Tensor {
        let len = self.shape.iter().product();
        let v = values(Seed::new(self.seed).child(salt), len, self.grid);
        Tensor::from_vec(v, self.shape.as_slice(), &DEV).unwrap()
    }

    /// A quantizer; on a grid problem its codebook is drawn from the grid too.
    fn quantizer(&self, store: &ParamStore) -> VectorQuantizer {
        let mut vq =
            VectorQuantizer::from_param_path(&store.root(&DEV).pp("vq"), self.config.clone())
                .unwrap();
        if self.grid {
            let c = &self.config;
            let shape = (c.codebooks, c.codes, c.code_dim());
            let book = values(
                Seed::new(self.seed).child_named("book"),
                c.codebooks * c.codes * c.code_dim(),
                true,
            );
            vq.set_codebook(&Tensor::from_vec(book, shape, &DEV).unwrap())
                .unwrap();
        }
        vq
    }

    fn sequence(&self) -> bool {
        self.shape.len() == 3
    }
}

fn flat_u32(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The vector of codebook `n` at position (b, p) of the input, and where its index sits.
fn vectors(problem: &Problem, x: &[f32]) -> Vec<(usize, Vec<f32>, usize)> {
    let c = &problem.config;
    let (nb, d) = (c.codebooks, c.code_dim());
    let mut out = Vec::new();
    if problem.sequence() {
        let (b, t, ch) = (problem.shape[0], problem.shape[1], problem.shape[2]);
        for r in 0..b * t {
            for n in 0..nb {
                let v = x[r * ch + n * d..r * ch + (n + 1) * d].to_vec();
                out.push((n, v, r * nb + n));
            }
        }
    } else {
        let (b, ch, s) = (
            problem.shape[0],
            problem.shape[1],
            problem.shape[2] * problem.shape[3],
        );
        for bi in 0..b {
            for n in 0..nb {
                for p in 0..s {
                    let v = (0..d).map(|i| x[(bi * ch + n * d + i) * s + p]).collect();
                    out.push((n, v, (bi * nb + n) * s + p));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(cases(64))]

    /// Shapes, indices in range, and every chosen code is the nearest row of its codebook
    /// (brute force), ties to the lowest index; the quantised value is that row.
    #[test]
    fn indices_are_the_nearest_codes(problem in problem()) {
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        let x = problem.input(0);
        let book = flat_f32(&vq.codebook().unwrap());
        let out = vq.quantize(&x, true).unwrap();
        let c = &problem.config;
        let (k, d) = (c.codes, c.code_dim());
        let expected_shape = if problem.sequence() {
            vec![problem.shape[0], problem.shape[1], c.codebooks]
        } else {
            vec![problem.shape[0], c.codebooks, problem.shape[2], problem.shape[3]]
        };
        prop_assert_eq!(out.indices.dims(), expected_shape.as_slice());
        prop_assert_eq!(out.quantized.dims(), x.dims());
        let idx = flat_u32(&out.indices);
        let q = flat_f32(&out.quantized);
        let xs = flat_f32(&x);
        let qs = vectors(&problem, &q);
        for ((n, v, at), (_, qv, _)) in vectors(&problem, &xs).into_iter().zip(qs) {
            let chosen = idx[at] as usize;
            prop_assert!(chosen < k);
            let row = |j: usize| &book[(n * k + j) * d..(n * k + j + 1) * d];
            let best = squared_distance(&v, row(chosen));
            for j in 0..k {
                let dist = squared_distance(&v, row(j));
                prop_assert!(best <= dist, "code {} at {} beats the chosen {} at {}", j, dist, chosen, best);
                if j < chosen {
                    prop_assert!(best < dist, "tie with lower code {} not taken", j);
                }
            }
            prop_assert_eq!(qv.as_slice(), row(chosen));
        }
        prop_assert_eq!(out.stats.batch.total() as usize, idx.len() / c.codebooks);
    }

    /// `decode(indices)` with the pre-update codebook is the forward value, bit for bit, in
    /// every mode; `encode` agrees with an evaluation forward, and packed indices round-trip.
    #[test]
    fn decode_of_encode_is_the_forward_value(problem in problem()) {
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        for step in 0..3 {
            let x = problem.input(step);
            let before = vq.codebook().unwrap();
            let out = vq.quantize(&x, true).unwrap();
            // A frozen copy of the pre-update codebook decodes the indices.
            let probe_store = ParamStore::new(0);
            let mut probe = VectorQuantizer::from_param_path(
                &probe_store.root(&DEV),
                VectorQuantizerConfig { update: CodebookUpdate::Frozen, ..problem.config.clone() },
            ).unwrap();
            probe.set_codebook(&before).unwrap();
            prop_assert_eq!(flat_f32(&probe.decode(&out.indices).unwrap()), flat_f32(&out.quantized));

            let eval = vq.quantize(&x, false).unwrap();
            let encoded = vq.encode(&x).unwrap();
            prop_assert_eq!(flat_u32(&encoded), flat_u32(&eval.indices));
            prop_assert_eq!(flat_f32(&vq.decode(&encoded).unwrap()), flat_f32(&eval.quantized));
            let packed = vq.encode_packed(&x).unwrap();
            prop_assert_eq!(packed.bits(), problem.config.index_bits());
            prop_assert_eq!(flat_f32(&vq.decode_packed(&packed).unwrap()), flat_f32(&eval.quantized));
        }
    }

    /// The gradient of `z_q` with respect to `z_e` is the identity.
    #[test]
    fn straight_through_gradient_is_identity(problem in problem(), train in any::<bool>()) {
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        let x = Var::from_tensor(&problem.input(0)).unwrap();
        let weights = problem.input(1);
        let out = vq.quantize(x.as_tensor(), train).unwrap();
        let grads = (out.quantized * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("a gradient reaches the input");
        prop_assert_eq!(flat_f32(g), flat_f32(&weights));
    }

    /// EMA step: the smoothing keeps `Σ_k c[n,k]`, so the total becomes exactly
    /// `γ·Σ c_old + (1−γ)·M`; and `E = w / c` row-wise, bit for bit (also after revival).
    #[test]
    fn ema_keeps_the_count_total_and_codebook_is_sums_over_counts(
        problem in problem(),
        decay in 0.0f64..1.0,
        eps in 1e-5f64..0.1,
    ) {
        let config = VectorQuantizerConfig {
            update: CodebookUpdate::Ema { decay, eps },
            ..problem.config.clone()
        };
        let problem = Problem { config, ..problem };
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        let (nb, k, d) = (problem.config.codebooks, problem.config.codes, problem.config.code_dim());
        let vectors_per_codebook = problem.shape.iter().product::<usize>() / problem.config.dim;
        for step in 0..3 {
            let before = flat_f32(&vq.counts().unwrap());
            vq.quantize(&problem.input(step), true).unwrap();
            let after = flat_f32(&vq.counts().unwrap());
            let sums = flat_f32(&vq.sums().unwrap().unwrap());
            let book = flat_f32(&vq.codebook().unwrap());
            for n in 0..nb {
                let total = |c: &[f32]| c[n * k..(n + 1) * k].iter().map(|&v| f64::from(v)).sum::<f64>();
                let expected = decay * total(&before) + (1.0 - decay) * vectors_per_codebook as f64;
                if problem.config.dead_code_threshold.is_none() {
                    prop_assert!(
                        (total(&after) - expected).abs() <= 1e-5 * expected,
                        "Σc = {} after the step, expected {}", total(&after), expected
                    );
                }
            }
            for (i, &e) in book.iter().enumerate() {
                prop_assert_eq!(e, sums[i] / after[i / d], "E ≠ w / c at flat {}", i);
            }
        }
    }

    /// Frozen, or EMA with decay 1, leaves codebook, counts, sums and step counter
    /// bit-identical across training steps (even with k-means init and revival configured).
    #[test]
    fn frozen_state_is_bit_identical(problem in problem(), ema in any::<bool>()) {
        let update = if ema {
            CodebookUpdate::Ema { decay: 1.0, eps: 1e-5 }
        } else {
            CodebookUpdate::Frozen
        };
        let config = VectorQuantizerConfig {
            update,
            kmeans_init: true,
            dead_code_threshold: Some(1.0),
            ..problem.config.clone()
        };
        let problem = Problem { config, ..problem };
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        let snapshot = store.tensors().unwrap();
        for step in 0..3 {
            vq.quantize(&problem.input(step), true).unwrap();
        }
        for ((name, a), (_, b)) in snapshot.iter().zip(store.tensors().unwrap()) {
            let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
            let (a, b): (Vec<f64>, Vec<f64>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            prop_assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{} changed", name
            );
        }
    }

    /// Gradient mode: the codebook loss' gradient is the closed form
    /// `∂L/∂E[n,k] = 2/(B·C·S) · Σ_{v→k} (E[n,k] − v)`.
    #[test]
    fn gradient_mode_codebook_gradient_is_the_closed_form(problem in problem()) {
        let config = VectorQuantizerConfig {
            update: CodebookUpdate::Gradient,
            dead_code_threshold: None,
            ..problem.config.clone()
        };
        let problem = Problem { config, ..problem };
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        let x = problem.input(0);
        let out = vq.quantize(&x, false).unwrap();
        let trainable = store.trainable();
        prop_assert_eq!(trainable.len(), 1);
        let (name, var) = &trainable[0];
        prop_assert_eq!(name.as_str(), "vq.codebook");
        let grads = out.codebook_loss.expect("gradient mode has a codebook loss").backward().unwrap();
        let g = flat_f32(grads.get(var.as_tensor()).unwrap());

        let (k, d) = (problem.config.codes, problem.config.code_dim());
        let book = flat_f32(&vq.codebook().unwrap());
        let idx = flat_u32(&out.indices);
        let elements = x.elem_count() as f64;
        let mut expected = vec![0f64; book.len()];
        for (n, v, at) in vectors(&problem, &flat_f32(&x)) {
            let row = n * k + idx[at] as usize;
            for i in 0..d {
                expected[row * d + i] += 2.0 * f64::from(book[row * d + i] - v[i]) / elements;
            }
        }
        for (i, (&got, &want)) in g.iter().zip(&expected).enumerate() {
            prop_assert!((f64::from(got) - want).abs() <= 1e-6 + 1e-4 * want.abs(), "flat {}: {} vs {}", i, got, want);
        }
    }

    /// Same seeds ⇒ identical state and outputs after training with k-means init and revival.
    #[test]
    fn same_seed_gives_identical_results(problem in problem(), kmeans in any::<bool>()) {
        let config = VectorQuantizerConfig { kmeans_init: kmeans, ..problem.config.clone() };
        let problem = Problem { config, ..problem };
        let run = || {
            let store = ParamStore::new(problem.seed);
            let vq = problem.quantizer(&store);
            let mut outputs = Vec::new();
            for step in 0..3 {
                let out = vq.quantize(&problem.input(step), true).unwrap();
                outputs.push((flat_f32(&out.quantized), flat_u32(&out.indices), out.stats));
            }
            let state: Vec<Vec<f64>> = store
                .tensors()
                .unwrap()
                .into_iter()
                .map(|(_, t)| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (outputs, state)
        };
        let (a, b) = (run(), run());
        prop_assert_eq!(a.0, b.0);
        let bits = |s: &Vec<Vec<f64>>| s.iter().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&a.1), bits(&b.1));
    }

    /// A `(B, T, C)` sequence is quantised exactly like the `(B, C, T, 1)` feature map with
    /// the same vectors.
    #[test]
    fn sequences_match_feature_maps(problem in problem()) {
        let c = &problem.config;
        let b = problem.shape[0];
        let t = if problem.sequence() { problem.shape[1] } else { problem.shape[2] * problem.shape[3] };
        let seq_problem = Problem { shape: vec![b, t, c.dim], ..problem.clone() };
        let x_seq = seq_problem.input(0);
        let x_maps = x_seq.transpose(1, 2).unwrap().unsqueeze(3).unwrap().contiguous().unwrap();
        let store = ParamStore::new(problem.seed);
        let vq = problem.quantizer(&store);
        let i_seq = vq.encode(&x_seq).unwrap();
        let i_maps = vq.encode(&x_maps).unwrap();
        let i_maps_as_seq = i_maps.squeeze(3).unwrap().transpose(1, 2).unwrap();
        prop_assert_eq!(flat_u32(&i_seq), flat_u32(&i_maps_as_seq));
        let q_seq = vq.decode(&i_seq).unwrap();
        let q_maps = vq.decode(&i_maps).unwrap().squeeze(3).unwrap().transpose(1, 2).unwrap();
        prop_assert_eq!(flat_f32(&q_seq), flat_f32(&q_maps));
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Bit packing round-trips any K in 1..=65536 and any index stream, through bytes too.
    #[test]
    fn packing_round_trips(
        k in 1usize..=65536,
        shape in proptest::collection::vec(0usize..6, 1..=4),
        seed in any::<u64>(),
    ) {
        let len: usize = shape.iter().product();
        let mut rng = Seed::new(seed).rng();
        let values: Vec<u32> = (0..len).map(|_| rng.below(k).unwrap() as u32).collect();
        let packed = PackedIndices::pack(&values, &shape, k).unwrap();
        prop_assert_eq!(packed.unpack(), values.clone());
        let bits = if k == 1 { 0 } else { usize::BITS - (k - 1).leading_zeros() };
        prop_assert_eq!(packed.bits(), bits);
        let (rows, per_row) = if shape.len() == 1 { (1, shape[0]) } else { (shape[0], shape[1..].iter().product()) };
        let expected_bytes = if len == 0 { 0 } else { rows * (per_row * bits as usize).div_ceil(8) };
        prop_assert_eq!(packed.bytes().len(), expected_bytes);
        let back = PackedIndices::from_bytes(packed.bytes().to_vec(), &shape, k).unwrap();
        prop_assert_eq!(&back, &packed);
        let t = packed.to_tensor(&DEV).unwrap();
        prop_assert_eq!(t.dims(), shape.as_slice());
        prop_assert_eq!(PackedIndices::from_tensor(&t, k).unwrap(), packed.clone());
        if rows > 0 && per_row > 0 {
            let r = rng.below(rows).unwrap();
            prop_assert_eq!(packed.sample(r).unwrap(), values[r * per_row..(r + 1) * per_row].to_vec());
        }
        // A truncated or overlong stream is refused.
        let bytes = packed.bytes().to_vec();
        if !bytes.is_empty() {
            prop_assert!(PackedIndices::from_bytes(bytes[..bytes.len() - 1].to_vec(), &shape, k).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(PackedIndices::from_bytes(longer, &shape, k).is_err());
    }

    /// A stream whose index is ≥ K (possible when K is not a power of two) is refused.
    #[test]
    fn corrupted_streams_are_refused(
        k in 2usize..=65536,
        len in 1usize..40,
        at in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        prop_assume!(!k.is_power_of_two());
        let mut rng = Seed::new(seed).rng();
        let mut values: Vec<u32> = (0..len).map(|_| rng.below(k).unwrap() as u32).collect();
        let bits = usize::BITS - (k - 1).leading_zeros();
        // Pack with a wider K to smuggle in the all-ones code 2^bits − 1 ≥ K.
        values[at.index(len)] = (1u32 << bits) - 1;
        let forged = PackedIndices::pack(&values, &[len], 1 << bits).unwrap();
        prop_assert!(PackedIndices::from_bytes(forged.bytes().to_vec(), &[len], k).is_err());
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Residual VQ on fixed codebooks that contain the zero vector: the reconstruction error
    /// of the first L stages does not grow with L.
    #[test]
    fn residual_error_does_not_grow_with_depth(
        problem in problem(),
        depth in 1usize..=5,
        zero_at in any::<prop::sample::Index>(),
    ) {
        let config = VectorQuantizerConfig {
            update: CodebookUpdate::Frozen,
            ..problem.config.clone()
        };
        let (nb, k, d) = (config.codebooks, config.codes, config.code_dim());
        let store = ParamStore::new(problem.seed);
        let mut rvq = ResidualVq::uniform_from_param_path(&store.root(&DEV).pp("rvq"), &config, depth).unwrap();
        for (i, stage) in rvq.stages_mut().iter_mut().enumerate() {
            // Codes shrinking with depth, as residuals do, and one zero row per codebook.
            let scale = 0.5f32.powi(i as i32);
            let mut book: Vec<f32> = values(Seed::new(problem.seed).child(100 + i as u64), nb * k * d, false)
                .into_iter()
                .map(|v| v * scale)
                .collect();
            let zero = zero_at.index(k);
            for n in 0..nb {
                book[(n * k + zero) * d..(n * k + zero + 1) * d].fill(0.0);
            }
            stage.set_codebook(&Tensor::from_vec(book, (nb, k, d), &DEV).unwrap()).unwrap();
        }
        let x = problem.input(0);
        let xs = flat_f32(&x);
        let indices = rvq.encode(&x).unwrap();
        let mut previous = xs.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        for depth in 1..=indices.len() {
            let rec = flat_f32(&rvq.decode(&indices[..depth]).unwrap());
            let err: f64 = xs.iter().zip(&rec).map(|(&a, &b)| f64::from(a - b).powi(2)).sum();
            prop_assert!(err <= previous * (1.0 + 1e-5) + 1e-9, "depth {}: {} after {}", depth, err, previous);
            previous = err;
        }
        // The forward value is the full-depth decode.
        let out = rvq.quantize(&x, false).unwrap();
        prop_assert_eq!(flat_f32(&out.quantized), flat_f32(&rvq.decode(&indices).unwrap()));
    }
}
