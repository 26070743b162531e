//! Property tests of the invariants numbered in docs/methods/vecvq.md § What the tests check,
//! and of the issue.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use qcl_ecvq::entropy::{decode, encode, FrequencyTable, RansStream};
use qcl_ecvq::{
    encoder_score, entropy_of_counts, vecvq_loss, ClgConfig, ClgEcvq, ClgInit, Distortion, Ecvq,
    Source, Vecvq, VecvqConfig,
};
use qcl_tensor::{Error, Seed};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        ..ProptestConfig::default()
    }
}

/// A random quantizer: `k` codes in `[-3, 3]^dim`, lengths from random logits.
fn quantizer(dim: usize, k: usize, lambda: f64, seed: u64) -> Ecvq {
    let mut rng = Seed::new(seed).rng();
    let codebook = rng.uniform_vec(k * dim, -3.0, 3.0);
    let logits: Vec<f64> = rng
        .normal_vec(k, 0.0, 2.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    let rates = logits
        .iter()
        .map(|l| (lse - l) / std::f64::consts::LN_2)
        .collect();
    Ecvq::new(dim, codebook, rates, lambda, Distortion::Sse).expect("valid quantizer")
}

proptest! {
    #![proptest_config(config())]

    /// Invariants 1 and 3: indices in range, and the chosen code minimises the encoder's
    /// score (brute force), ties to the lowest index.
    #[test]
    fn encoder_is_optimal_and_in_range(
        dim in 1usize..4,
        k in 1usize..40,
        lambda in 0.1f64..50.0,
        seed in any::<u64>(),
    ) {
        let q = quantizer(dim, k, lambda, seed);
        let points = Seed::new(seed ^ 1).rng().uniform_vec(50 * dim, -4.0, 4.0);
        let indices = q.encode(&points).unwrap();
        let bias = q.encoder_bias();
        for (x, &chosen) in points.chunks_exact(dim).zip(&indices) {
            prop_assert!((chosen as usize) < k);
            let score = |j: usize| encoder_score(x, &q.codebook()[j * dim..(j + 1) * dim], bias[j]);
            let best = score(chosen as usize);
            for j in 0..k {
                prop_assert!(best <= score(j));
                if j < chosen as usize {
                    prop_assert!(score(j) > best, "tie not broken towards the lowest index");
                }
            }
        }
        // Decoding gives the chosen codes.
        let decoded = q.decode(&indices).unwrap();
        prop_assert_eq!(decoded.len(), points.len());
    }

    /// Invariant 3, second half: with equal lengths the encoder is nearest-neighbour.
    #[test]
    fn equal_lengths_give_nearest_neighbours(k in 1usize..30, seed in any::<u64>()) {
        let mut rng = Seed::new(seed).rng();
        let codebook = rng.uniform_vec(k * 2, -2.0, 2.0);
        let rates = vec![(k as f64).log2(); k];
        let q = Ecvq::new(2, codebook.clone(), rates, 3.0, Distortion::Sse).unwrap();
        let points = rng.uniform_vec(60, -3.0, 3.0);
        let indices = q.encode(&points).unwrap();
        for (x, &chosen) in points.chunks_exact(2).zip(&indices) {
            let d = |j: usize| qcl_tensor::squared_distance(x, &codebook[j * 2..j * 2 + 2]);
            let nearest = (0..k).fold(0, |best, j| if d(j) < d(best) { j } else { best });
            prop_assert_eq!(chosen as usize, nearest);
        }
    }

    /// Invariant 2: the prior sums to one, lengths are non-negative and are −log₂ p.
    #[test]
    fn prior_is_a_distribution(k in 1usize..300, std in 0.0f64..30.0, seed in any::<u64>()) {
        let params = VecvqConfig {
            codes: k,
            logit_init_std: std,
            seed: Seed::new(seed),
            ..VecvqConfig::new(2.0)
        };
        let model = Vecvq::for_source(Source::Gaussian, &params).unwrap();
        let rates = model.rates_bits();
        let total: f64 = rates.iter().map(|r| (-r).exp2()).sum();
        prop_assert!((total - 1.0).abs() < 1e-6, "sum {}", total);
        prop_assert!(rates.iter().all(|&r| r >= 0.0));
        let q = model.quantizer().unwrap();
        for (r, p) in rates.iter().zip(q.probabilities()) {
            prop_assert!((r + p.log2()).abs() < 1e-9 * r.max(1.0));
        }
    }

    /// Invariant 4: rate (cross-entropy) is at least the empirical entropy, on any batch.
    #[test]
    fn rate_is_at_least_entropy(k in 1usize..50, lambda in 0.1f64..40.0, seed in any::<u64>()) {
        let q = quantizer(2, k, lambda, seed);
        let points = Seed::new(seed ^ 2).rng().uniform_vec(400, -3.0, 3.0);
        let eval = q.evaluate_points(&points, None).unwrap();
        prop_assert!(eval.rate_bits >= eval.entropy_bits - 1e-9);
        prop_assert!(eval.used_codes >= 1 && eval.used_codes <= k);
    }

    /// Invariant 5: the closed-form gradients equal candle's autograd of the same loss, and
    /// the logit gradient sums to zero.
    #[test]
    fn closed_form_gradients_match_autograd(
        k in 1usize..20,
        lambda in 0.1f64..20.0,
        mse in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let params = VecvqConfig {
            codes: k,
            distortion: if mse { Distortion::Mse } else { Distortion::Sse },
            logit_init_std: 1.0,
            seed: Seed::new(seed),
            ..VecvqConfig::new(lambda)
        };
        let mut model = Vecvq::for_source(Source::Banana, &params).unwrap();
        let batch = Source::Banana.sample(64, &mut Seed::new(seed ^ 3).rng());
        let q = model.quantizer().unwrap();
        let indices = q.encode(&batch).unwrap();
        let grads = model.gradients(&batch).unwrap();

        let dev = Device::Cpu;
        let to_f64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let codebook = Var::from_tensor(&Tensor::from_vec(to_f64(&model.codebook()), (k, 2), &dev).unwrap()).unwrap();
        let logits = Var::from_tensor(&Tensor::from_vec(model.logits().to_vec(), k, &dev).unwrap()).unwrap();
        let x = Tensor::from_vec(to_f64(&batch), (64, 2), &dev).unwrap();
        let idx = Tensor::from_vec(indices, 64, &dev).unwrap();
        let scale = params.distortion.scale(2);
        let loss = vecvq_loss(&codebook, &logits, &x, &idx, lambda, scale).unwrap();
        prop_assert!((loss.to_scalar::<f64>().unwrap() - grads.loss).abs() < 1e-5 * grads.loss.abs().max(1.0));
        let store = loss.backward().unwrap();
        let auto_c: Vec<f64> = store.get(&codebook).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let auto_l: Vec<f64> = store.get(&logits).unwrap().to_vec1().unwrap();
        for (a, b) in auto_c.iter().zip(&grads.codebook) {
            prop_assert!((a - b).abs() < 1e-5, "codebook {} vs {}", a, b);
        }
        for (a, b) in auto_l.iter().zip(&grads.logits) {
            prop_assert!((a - b).abs() < 1e-5, "logit {} vs {}", a, b);
        }
        prop_assert!(grads.logits.iter().sum::<f64>().abs() < 1e-9);
    }

    /// Invariant 6: the CLG objective never increases on a fixed set, codes only disappear,
    /// and the final indices are below the pruned K.
    #[test]
    fn clg_objective_never_increases(
        k in 2usize..40,
        lambda in 0.3f64..30.0,
        random_start in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let data = Source::Banana.sample(2_000, &mut Seed::new(seed).rng());
        let params = ClgConfig {
            codes: k,
            init: if random_start { ClgInit::RandomPoints } else { ClgInit::KMeans { iterations: 5 } },
            max_iterations: 30,
            seed: Seed::new(seed ^ 4),
            ..ClgConfig::new(lambda)
        };
        let model = ClgEcvq::fit(&data, 2, &params).unwrap();
        for w in model.objective_history.windows(2) {
            prop_assert!(w[1] <= w[0] + 1e-6 * w[0].abs(), "{:?}", model.objective_history);
        }
        for w in model.codes_history.windows(2) {
            prop_assert!(w[1] <= w[0]);
        }
        prop_assert!(model.original_indices.windows(2).all(|w| w[0] < w[1]));
        let used = model.quantizer.len();
        prop_assert!(used <= k);
        let indices = model.quantizer.encode(&data).unwrap();
        prop_assert!(indices.iter().all(|&i| (i as usize) < used));
    }

    /// Bit-exact entropy-coding round trip for random tables and streams.
    #[test]
    fn rans_round_trips(
        weights in prop::collection::vec(1e-6f64..1.0, 1..300),
        precision in 9u32..=31,
        len in 0usize..3000,
        seed in any::<u64>(),
    ) {
        prop_assume!(weights.len() as u64 <= 1u64 << precision);
        let table = FrequencyTable::from_probabilities(&weights, precision).unwrap();
        prop_assert_eq!(table.frequencies().iter().map(|&f| u64::from(f)).sum::<u64>(), 1u64 << precision);
        let mut rng = Seed::new(seed).rng();
        let symbols: Vec<u32> = (0..len).map(|_| rng.below(weights.len()).unwrap() as u32).collect();
        let stream = encode(&symbols, &table).unwrap();
        let parsed = RansStream::from_bytes(&stream.to_bytes()).unwrap();
        prop_assert_eq!(&parsed, &stream);
        prop_assert_eq!(decode(&parsed, &table).unwrap(), symbols.clone());
        // A damaged word is detected.
        if stream.words.len() > 2 {
            let mut damaged = stream.clone();
            let at = rng.below(damaged.words.len()).unwrap();
            damaged.words[at] ^= 1 << rng.below(32).unwrap();
            let refused = matches!(decode(&damaged, &table), Err(Error::CorruptStream { .. }));
            prop_assert!(refused, "a damaged stream decoded");
        }
    }
}

/// Invariant 6, last part: with a negligible length term CLG is k-means (Lloyd) from the
/// same start.
#[test]
fn clg_without_rate_term_is_kmeans() {
    let data = Source::Gaussian.sample(3_000, &mut Seed::new(5).rng());
    let k = 12;
    let mut centroids: Vec<f32> = data[..k * 2].to_vec();
    let start = Ecvq::new(
        2,
        centroids.clone(),
        vec![(k as f64).log2(); k],
        1e30,
        Distortion::Sse,
    )
    .unwrap();
    let params = ClgConfig {
        max_iterations: 10,
        tolerance: 0.0,
        ..ClgConfig::new(1e30)
    };
    let model = ClgEcvq::fit_from(&data, &start, &params).unwrap();
    // Plain Lloyd, written out.
    for _ in 0..10 {
        let mut sums = vec![0f64; k * 2];
        let mut counts = vec![0f64; k];
        for x in data.chunks_exact(2) {
            let d = |j: usize| qcl_tensor::squared_distance(x, &centroids[j * 2..j * 2 + 2]);
            let j = (0..k).fold(0, |b, j| if d(j) < d(b) { j } else { b });
            counts[j] += 1.0;
            sums[j * 2] += f64::from(x[0]);
            sums[j * 2 + 1] += f64::from(x[1]);
        }
        assert!(
            counts.iter().all(|&c| c > 0.0),
            "the test assumes no empty cluster"
        );
        for j in 0..k {
            centroids[j * 2] = (sums[j * 2] / counts[j]) as f32;
            centroids[j * 2 + 1] = (sums[j * 2 + 1] / counts[j]) as f32;
        }
    }
    assert_eq!(model.quantizer.codebook(), &centroids[..]);
}

/// Invariant 8: a tiny λ leaves one code at the mean: rate 0, distortion = total variance.
#[test]
fn zero_rate_means_one_code_at_the_mean() {
    for source in [Source::Gaussian, Source::Banana] {
        let data = source.sample(50_000, &mut Seed::new(6).rng());
        let model = ClgEcvq::fit(
            &data,
            2,
            &ClgConfig {
                codes: 16,
                ..ClgConfig::new(1e-3)
            },
        )
        .unwrap();
        let eval = model
            .quantizer
            .evaluate(source, 200_000, Seed::new(7))
            .unwrap();
        assert_eq!(model.quantizer.len(), 1);
        assert_eq!(eval.used_codes, 1);
        assert_eq!(eval.rate_bits, 0.0);
        let tv = source.total_variance();
        assert!(
            (eval.distortion - tv).abs() < 0.02 * tv,
            "{} vs {tv}",
            eval.distortion
        );
    }
}

/// Invariants 7 and 11, and the coder's efficiency: trained points sit above the bound,
/// rate rises and distortion falls with λ, R − H is small and the real stream is within 1 %
/// of R on a million samples.
#[test]
fn clg_sweep_is_above_the_bound_and_monotone() {
    let data = Source::Gaussian.sample(100_000, &mut Seed::new(8).rng());
    let mut previous: Option<(f64, f64)> = None;
    for lambda in [2.0, 8.0] {
        let model = ClgEcvq::fit(
            &data,
            2,
            &ClgConfig {
                codes: 96,
                ..ClgConfig::new(lambda)
            },
        )
        .unwrap();
        let eval = model
            .quantizer
            .evaluate(Source::Gaussian, 1_000_000, Seed::new(9))
            .unwrap();
        let bound = 2.0 * (-eval.rate_bits).exp2();
        assert!(eval.distortion > bound * 0.995, "{eval:?}");
        assert!(
            eval.gap_db.unwrap() > 1.0 && eval.gap_db.unwrap() < 1.7,
            "{eval:?}"
        );
        assert!(eval.rate_bits - eval.entropy_bits < 0.01, "{eval:?}");
        assert!(
            (eval.coded_bits - eval.rate_bits).abs() < 0.01 * eval.rate_bits,
            "{eval:?}"
        );
        if let Some((r, d)) = previous {
            assert!(eval.rate_bits > r && eval.distortion < d);
        }
        previous = Some((eval.rate_bits, eval.distortion));
    }
}

/// VECVQ training lowers the loss towards the CLG fixed point, reproducibly.
#[test]
fn vecvq_training_is_deterministic_and_converges() {
    let params = VecvqConfig {
        codes: 64,
        steps: 1_500,
        batch_size: 512,
        ..VecvqConfig::new(4.0)
    };
    let (a, training) = Vecvq::fit(Source::Gaussian, &params).unwrap();
    let (b, _) = Vecvq::fit(Source::Gaussian, &params).unwrap();
    assert_eq!(a.codebook(), b.codebook());
    assert_eq!(a.logits(), b.logits());
    let first = training.curve.first().unwrap().loss;
    let last = training.curve.last().unwrap().loss;
    assert!(last < first, "loss {first} → {last}");
    let eval = a
        .quantizer()
        .unwrap()
        .evaluate(Source::Gaussian, 200_000, Seed::new(10))
        .unwrap();
    // Reference value for the recipe of docs/methods/vecvq.md § The scaled-down experiment:
    // J ≈ 4.365 at λ = 4 with K = 256 and 10,000 steps.
    assert!(eval.lagrangian < 4.45, "{eval:?}");
    assert!(eval.rate_bits - eval.entropy_bits < 0.03, "{eval:?}");
    assert_eq!(a.codebook().len(), 64 * 2);
}

/// Invariant 9: the bananas' sample moments match the exact ones, and the densities
/// integrate to one.
#[test]
fn sources_match_their_moments_and_densities() {
    let n = 400_000;
    for source in Source::ALL {
        let dim = source.dim();
        let x = source.sample(n, &mut Seed::new(11).rng());
        let mean = source.mean();
        let cov = source.covariance();
        for i in 0..dim {
            let m: f64 = x
                .iter()
                .skip(i)
                .step_by(dim)
                .map(|&v| f64::from(v))
                .sum::<f64>()
                / n as f64;
            let se = (cov[i * dim + i] / n as f64).sqrt();
            assert!(
                (m - mean[i]).abs() < 4.0 * se,
                "{source} mean[{i}] {m} vs {}",
                mean[i]
            );
        }
        if dim == 2 {
            let c01: f64 = x
                .chunks_exact(2)
                .map(|p| (f64::from(p[0]) - mean[0]) * (f64::from(p[1]) - mean[1]))
                .sum::<f64>()
                / n as f64;
            assert!(
                (c01 - cov[1]).abs() < 0.03 * cov[0].max(cov[3]),
                "{source} cov {c01} vs {}",
                cov[1]
            );
        }
        // ∫ p over a wide grid.
        let (lo, hi, steps) = (-25.0f64, 25.0f64, 1000usize);
        let h = (hi - lo) / steps as f64;
        let integral: f64 = if dim == 1 {
            (0..steps)
                .map(|i| source.log_density(&[lo + (i as f64 + 0.5) * h]).exp() * h)
                .sum()
        } else {
            (0..steps)
                .flat_map(|i| (0..steps).map(move |j| (i, j)))
                .map(|(i, j)| {
                    source
                        .log_density(&[lo + (i as f64 + 0.5) * h, lo + (j as f64 + 0.5) * h])
                        .exp()
                        * h
                        * h
                })
                .sum()
        };
        assert!((integral - 1.0).abs() < 1e-3, "{source}: ∫p = {integral}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    for lambda in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            Vecvq::for_source(Source::Gaussian, &VecvqConfig::new(lambda)),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            ClgEcvq::fit(
                &[0.0; 8],
                2,
                &ClgConfig {
                    codes: 2,
                    ..ClgConfig::new(lambda)
                }
            ),
            Err(Error::InvalidParameter { .. })
        ));
    }
    assert!(matches!(
        Vecvq::for_source(
            Source::Gaussian,
            &VecvqConfig {
                codes: 0,
                ..VecvqConfig::new(1.0)
            }
        ),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        ClgEcvq::fit(
            &[0.0; 8],
            2,
            &ClgConfig {
                codes: 5,
                ..ClgConfig::new(1.0)
            }
        ),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        ClgEcvq::fit(
            &[0.0, f32::NAN],
            2,
            &ClgConfig {
                codes: 1,
                ..ClgConfig::new(1.0)
            }
        ),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        ClgEcvq::fit(
            &[0.0; 7],
            2,
            &ClgConfig {
                codes: 1,
                ..ClgConfig::new(1.0)
            }
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    let q = quantizer(2, 4, 1.0, 0);
    assert!(matches!(
        q.decode(&[0, 4]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        q.encode(&[0.0, f32::INFINITY]),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        Ecvq::new(2, vec![0.0; 4], vec![1.0, -1.0], 1.0, Distortion::Sse),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        FrequencyTable::from_probabilities(&[0.5, 0.0, 0.5], 16),
        Err(Error::InvalidParameter { .. })
    ));
    let stream = q.compress(&[0, 1, 2, 3, 3, 2]).unwrap();
    let bytes = stream.to_bytes();
    assert!(matches!(
        RansStream::from_bytes(&bytes[..bytes.len() - 2]),
        Err(Error::CorruptStream { .. })
    ));
    let mut foreign = bytes.clone();
    foreign[0] = b'X';
    assert!(matches!(
        RansStream::from_bytes(&foreign),
        Err(Error::CorruptStream { .. })
    ));
    assert!(matches!(
        "uniform".parse::<Source>(),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn save_and_load_round_trip_and_refuse_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.safetensors");
    let q = quantizer(2, 7, 3.5, 12);
    q.save(&path).unwrap();
    let back = Ecvq::load(&path).unwrap();
    assert_eq!(back, q);
    let stream = q.compress(&[6, 0, 3]).unwrap();
    assert_eq!(back.decompress(&stream).unwrap(), vec![6, 0, 3]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(Ecvq::load(&path), Err(Error::BadFile { .. })));
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    assert!(matches!(Ecvq::load(&path), Err(Error::BadFile { .. })));
}

#[test]
fn empirical_entropy_of_counts() {
    assert_eq!(entropy_of_counts(&[5, 5]), 1.0);
    assert_eq!(entropy_of_counts(&[7, 0]), 0.0);
    assert!((entropy_of_counts(&[1, 1, 2]) - 1.5).abs() < 1e-12);
}
