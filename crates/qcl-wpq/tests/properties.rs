//! Invariants of the paper's method (layouts, EM, CentroidSGD, size accounting, im2col, BN
//! folding) as property and unit tests.
//!
//! (Over 600 lines: one short test per invariant of docs/methods/weight-pq.md, sharing the
//! layer-geometry generator; the list reads best in one place.)

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use qcl_tensor::Seed;
use qcl_wpq::compress::LayerInputs;
use qcl_wpq::{
    activation_aware_em, clamp_centroids, e_step, pooled_gram, size_report, surrogate_objective,
    Arch, CentroidSgd, EmConfig, EmOutcome, ForwardConfig, LayerGeometry, LayerKind, Layout,
    Metric, MetricSource, Model, PqTensor, Sharing,
};

fn geometry_strategy() -> impl Strategy<Value = (LayerGeometry, Vec<f32>)> {
    (
        1usize..5,
        1usize..4,
        prop::sample::select(vec![1usize, 3]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(o, c_mult, k, linear, channel_major)| {
            let c_in = 4 * c_mult;
            let kind = if linear {
                LayerKind::Linear { out: o, inp: c_in }
            } else {
                LayerKind::Conv {
                    c_out: o,
                    c_in,
                    kh: k,
                    kw: k,
                }
            };
            let layout = if channel_major {
                Layout::ChannelMajor
            } else {
                Layout::Spatial
            };
            let d_in = if linear { c_in } else { c_in * k * k };
            let blocks: Vec<usize> = (1..=d_in)
                .filter(|d| d_in % d == 0 && (layout == Layout::Spatial || c_in % d == 0))
                .collect();
            (Just(kind), Just(layout), prop::sample::select(blocks))
        })
        .prop_flat_map(|(kind, layout, block)| {
            let g = LayerGeometry::new(kind, layout, block).unwrap();
            let n = g.n_weights();
            (Just(g), prop::collection::vec(-10f32..10.0, n))
        })
}

/// The metric whose Gram matrix is pooled from the input rows `x` (rows of `d`).
fn metric_of(x: &[f32], d: usize) -> Metric {
    Metric::from_gram(&pooled_gram(x, d, d).unwrap(), d).unwrap()
}

/// Activation-aware EM of `points` (rows of `d`, one shared codebook started from `init` if
/// given) under the fixed `metric`.
fn fixed_metric_em(
    points: &[f32],
    d: usize,
    init: Option<&[f32]>,
    metric: &Metric,
    config: EmConfig,
) -> EmOutcome {
    let groups = vec![0; points.len() / d];
    activation_aware_em(
        points,
        d,
        &groups,
        1,
        init,
        MetricSource::Fixed(metric),
        config,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// roll(unroll(W)) == W bit-exactly for every layout and block size.
    #[test]
    fn reshape_round_trip((g, w) in geometry_strategy()) {
        let u = g.unroll(&w).unwrap();
        prop_assert_eq!(u.len(), g.n_subvectors() * g.block);
        let back = g.roll(&u).unwrap();
        prop_assert_eq!(back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        w.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    /// K is a power of two, ≤ K_flag and < n_sv/4.
    #[test]
    fn k_clamp(k_pow in 0u32..12, n_sv in 5usize..200_000) {
        let k_flag = 1usize << k_pow;
        let k = clamp_centroids(k_flag, n_sv).unwrap();
        prop_assert!(k.is_power_of_two());
        prop_assert!(k <= k_flag);
        prop_assert!(4 * k < n_sv);
        // Largest such power: doubling breaks one of the two bounds.
        prop_assert!(2 * k > k_flag || 8 * k >= n_sv);
    }

    /// Assignments in range, no empty cluster, and with a fixed metric the
    /// surrogate objective never increases.
    #[test]
    fn em_assignments_valid_and_objective_monotone(seed in 0u64..1000, k_pow in 1u32..4) {
        let d = 3;
        let n = 64;
        let mut rng = Seed::new(seed).rng();
        let points = rng.normal_vec(n * d, 0.0, 1.0);
        let x = rng.normal_vec(20 * d, 0.0, 1.0);
        let metric = metric_of(&x, d);
        let k = 1usize << k_pow;
        let out = fixed_metric_em(&points, d, None, &metric,
            EmConfig { k, iterations: 8, seed: Seed::new(seed), ..Default::default() });
        prop_assert!(out.assignments.iter().all(|&a| (a as usize) < k));
        let mut counts = vec![0; k];
        out.assignments.iter().for_each(|&a| counts[a as usize] += 1);
        prop_assert!(counts.iter().all(|&c| c > 0), "{:?}", counts);
        for w in out.objective.windows(2) {
            prop_assert!(w[1] <= w[0] * (1.0 + 1e-5) + 1e-12, "{:?}", out.objective);
        }
    }

    /// The E-step's choice minimises (u − c)ᵀG(u − c) (brute force), and the
    /// G-expansion equals the explicit ‖X̃(u − c)‖².
    #[test]
    fn e_step_is_optimal(seed in 0u64..1000) {
        let d = 4;
        let mut rng = Seed::new(seed).rng();
        let points = rng.normal_vec(30 * d, 0.0, 1.0);
        let codes = rng.normal_vec(6 * d, 0.0, 1.0);
        let rows = 12;
        let x = rng.normal_vec(rows * d, 0.0, 1.0);
        let gram = pooled_gram(&x, d, d).unwrap();
        let metric = Metric::from_gram(&gram, d).unwrap();
        let assign = e_step(&metric.transform(&points), &codes, &metric, d).unwrap();
        for (j, u) in points.chunks_exact(d).enumerate() {
            let dist: Vec<f64> = codes.chunks_exact(d).map(|c| metric.distance(u, c)).collect();
            let best = dist.iter().cloned().fold(f64::INFINITY, f64::min);
            prop_assert!(dist[assign[j] as usize] <= best * (1.0 + 1e-4) + 1e-9);
            // Explicit ‖X̃(u − c)‖² / rows equals the G form.
            let c = &codes[..d];
            let explicit: f64 = x.chunks_exact(d).map(|row| {
                let s: f64 = row.iter().zip(u.iter().zip(c)).map(|(a, (p, q))| f64::from(*a) * (f64::from(*p) - f64::from(*q))).sum();
                s * s
            }).sum::<f64>() / rows as f64;
            prop_assert!((explicit - metric.distance(u, c)).abs() <= 1e-6 * explicit.max(1.0));
        }
        // With G = I it is plain nearest neighbour.
        let eye = Metric::identity(d);
        let plain = e_step(&points, &codes, &eye, d).unwrap();
        let direct = qcl_tensor::nearest_codes(&points, &codes, d, None).unwrap().indices;
        prop_assert_eq!(plain, direct);
    }

    /// Reassigning codes for fixed centroids never raises the metric objective, a second
    /// reassignment changes nothing, and the codes stay below K in every codebook.
    #[test]
    fn reassignment_never_raises_the_objective(
        (g, w) in geometry_strategy(),
        seed in 0u64..1000,
        k in 1usize..6,
        per_group in any::<bool>(),
    ) {
        let d = g.block;
        let sharing = if per_group && g.layout == Layout::ChannelMajor { Sharing::ChannelBlock } else { Sharing::Layer };
        let (n_groups, _) = sharing.groups(&g).unwrap();
        let mut rng = Seed::new(seed).rng();
        let n = g.n_subvectors();
        let mut t = PqTensor {
            geometry: g.clone(),
            k,
            sharing,
            centroids: rng.normal_vec(n_groups * k * d, 0.0, 1.0),
            assignments: (0..n).map(|_| rng.below(k).unwrap() as u32).collect(),
        };
        let x = rng.normal_vec(3 * d * d, 0.0, 1.0);
        let metric = metric_of(&x, d);
        let sub = g.unroll(&w).unwrap();
        let objective = |t: &PqTensor| -> f64 {
            let codes = t.global_codes().unwrap();
            sub.chunks_exact(d).zip(codes).map(|(u, c)| metric.distance(u, &t.centroids[c as usize * d..(c as usize + 1) * d])).sum()
        };
        let before = objective(&t);
        t.reassign(&sub, Some(&metric)).unwrap();
        let after = objective(&t);
        prop_assert!(after <= before * (1.0 + 1e-4) + 1e-9, "{after} > {before}");
        prop_assert!(t.validate().is_ok());
        prop_assert_eq!(t.reassign(&sub, Some(&metric)).unwrap(), 0);
        prop_assert!(t.reassign(&sub[1..], None).is_err());
    }

    /// CentroidSGD keeps every cluster tied (bit-exact), and lr = 0 changes nothing.
    #[test]
    fn centroid_sgd_keeps_clusters_tied(seed in 0u64..1000, lr in prop::sample::select(vec![0.0, 0.05])) {
        let g = LayerGeometry::new(LayerKind::Conv { c_out: 4, c_in: 4, kh: 3, kw: 3 }, Layout::Spatial, 9).unwrap();
        let k = 4;
        let mut rng = Seed::new(seed).rng();
        let mut assignments: Vec<u32> = (0..16).map(|j| (j % k) as u32).collect();
        rng.shuffle(&mut assignments);
        let layer = PqTensor { geometry: g.clone(), k, sharing: Sharing::Layer,
            centroids: rng.normal_vec(k * 9, 0.0, 1.0), assignments };
        let var = Var::from_tensor(&Tensor::from_vec(layer.centroids.clone(), (k, 9), &Device::Cpu).unwrap()).unwrap();
        let before = layer.decode().unwrap();
        let mut opt = CentroidSgd::new(Some(&layer.cluster_sizes().unwrap()), lr, 0.9, 1e-4).unwrap();
        let target = Tensor::from_vec(rng.normal_vec(g.n_weights(), 0.0, 1.0), g.kind.weight_shape(), &Device::Cpu).unwrap();
        for _ in 0..3 {
            let w = layer.decode_tensor(var.as_tensor()).unwrap();
            let loss = (w * &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&var, grads.get(var.as_tensor()).unwrap()).unwrap();
        }
        let mut after = layer.clone();
        after.centroids = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let w = after.decode().unwrap();
        let sub = g.unroll(&w).unwrap();
        for (j, &a) in after.assignments.iter().enumerate() {
            let c = &after.centroids[a as usize * 9..(a as usize + 1) * 9];
            prop_assert_eq!(&sub[j * 9..(j + 1) * 9], c);
        }
        if lr == 0.0 {
            prop_assert_eq!(w, before);
        }
    }
}

/// The centroid-space update equals averaging the dense weight gradient over each
/// cluster's members.
#[test]
fn centroid_gradient_is_the_member_mean_of_the_dense_gradient() {
    let g = LayerGeometry::new(LayerKind::Linear { out: 3, inp: 8 }, Layout::Spatial, 4).unwrap();
    let layer = PqTensor {
        geometry: g.clone(),
        k: 2,
        sharing: Sharing::Layer,
        centroids: vec![1., 2., 3., 4., -1., 0., 1., 0.5],
        assignments: vec![0, 1, 1, 0, 0, 1],
    };
    let target = Tensor::new(&[0.3f32, -0.2, 0.5, 0.1, 0.9, -0.4, 0.2, 0.7], &Device::Cpu).unwrap();
    // The loss sum((W x)^2), and its dense gradient w.r.t. W.
    let loss_of = |w: &Tensor| {
        w.matmul(&target.reshape((8, 1)).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let w_dense =
        Var::from_tensor(&Tensor::from_vec(layer.decode().unwrap(), (3, 8), &Device::Cpu).unwrap())
            .unwrap();
    let loss = loss_of(w_dense.as_tensor());
    let dense: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(w_dense.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let sub = g.unroll(&dense).unwrap();
    let mut mean = vec![0f32; 8];
    let counts = layer.cluster_sizes().unwrap();
    for (j, &a) in layer.assignments.iter().enumerate() {
        for t in 0..4 {
            mean[a as usize * 4 + t] += sub[j * 4 + t] / counts[a as usize] as f32;
        }
    }
    let c =
        Var::from_tensor(&Tensor::from_vec(layer.centroids.clone(), (2, 4), &Device::Cpu).unwrap())
            .unwrap();
    let loss = loss_of(&layer.decode_tensor(c.as_tensor()).unwrap());
    let grad = loss.backward().unwrap().get(c.as_tensor()).unwrap().clone();
    let mut opt = CentroidSgd::new(Some(&counts), 1.0, 0.0, 0.0).unwrap();
    opt.step(&c, &grad).unwrap();
    let moved: Vec<f32> = c.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..8 {
        assert!(
            (layer.centroids[i] - moved[i] - mean[i]).abs() < 1e-5,
            "{i}: {moved:?} vs {mean:?}"
        );
    }
}

/// With full-rank inputs the M-step gives the member mean; a never-excited input
/// direction gives a zero coordinate.
#[test]
fn m_step_mean_and_null_space() {
    let d = 3;
    let mut rng = Seed::new(4).rng();
    let points = rng.normal_vec(40 * d, 0.0, 1.0);
    let full = rng.normal_vec(10 * d, 0.0, 1.0);
    let metric = metric_of(&full, d);
    let config = |iterations| EmConfig {
        k: 4,
        iterations,
        seed: Seed::new(1),
        ..Default::default()
    };
    let out = fixed_metric_em(&points, d, None, &metric, config(1));
    // The EM's last step is an M-step on its last assignments: recompute the means.
    let assign = e_step(&metric.transform(&points), &out.centroids, &metric, d).unwrap();
    let _ = assign;
    for c in 0..4 {
        let members: Vec<&[f32]> = points
            .chunks_exact(d)
            .zip(&out.assignments)
            .filter(|(_, &a)| a as usize == c)
            .map(|(p, _)| p)
            .collect();
        assert!(!members.is_empty());
        for t in 0..d {
            let mean = members.iter().map(|p| f64::from(p[t])).sum::<f64>() / members.len() as f64;
            assert!((mean - f64::from(out.centroids[c * d + t])).abs() < 1e-5);
        }
    }
    // Zero third column of X̃: centroids have coordinate 0 there.
    let mut x = rng.normal_vec(10 * d, 0.0, 1.0);
    x.chunks_exact_mut(d).for_each(|r| r[2] = 0.0);
    let metric = metric_of(&x, d);
    let out = fixed_metric_em(&points, d, None, &metric, config(2));
    for c in 0..4 {
        assert!(out.centroids[c * d + 2].abs() < 1e-6, "{:?}", out.centroids);
    }
}

/// A weight built from a codebook C* and assignments a* is a fixed point of EM
/// initialised at C*, for any full-rank G.
#[test]
fn em_fixed_point() {
    let d = 4;
    let k = 8;
    let mut rng = Seed::new(9).rng();
    let codebook = rng.normal_vec(k * d, 0.0, 1.0);
    let assign: Vec<u32> = (0..64).map(|j| (j % k) as u32).collect();
    let points: Vec<f32> = assign
        .iter()
        .flat_map(|&a| codebook[a as usize * d..(a as usize + 1) * d].to_vec())
        .collect();
    for s in 0..3 {
        let x = Seed::new(s).rng().normal_vec(16 * d, 0.0, 2.0);
        let metric = metric_of(&x, d);
        let config = EmConfig {
            k,
            iterations: 3,
            ..Default::default()
        };
        let out = fixed_metric_em(&points, d, Some(&codebook), &metric, config);
        assert_eq!(out.assignments, assign);
        for (a, b) in out.centroids.iter().zip(&codebook) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(*out.objective.last().unwrap() < 1e-10);
        assert!(
            surrogate_objective(
                &points,
                &out.centroids,
                &out.assignments,
                &[0; 64],
                k,
                &metric
            ) < 1e-10
        );
    }
}

/// The size formula reproduces the released ResNet-18 files (28.9× and 43.3×).
#[test]
fn resnet18_golden_ratios() {
    // (c_in, c_out, kernel) of every quantized layer; the fc is 512 → 1000.
    let mut convs = Vec::new();
    for _ in 0..4 {
        convs.push((64, 64, 3));
    }
    for (c_in, c_out) in [(64, 128), (128, 256), (256, 512)] {
        convs.push((c_in, c_out, 3));
        convs.push((c_out, c_out, 3));
        convs.push((c_out, c_out, 3));
        convs.push((c_out, c_out, 3));
        convs.push((c_in, c_out, 1));
    }
    let total_params = 11_689_512usize;
    let quantized: usize = convs.iter().map(|(i, o, k)| i * o * k * k).sum::<usize>() + 512 * 1000;
    assert_eq!(quantized, 11_669_504);
    let mb = (1u64 << 20) as f64;
    for (cv, expected_ratio, expected_mb) in [(9, 28.9, 1.5410), (18, 43.3, 1.0293)] {
        let mut layers = Vec::new();
        for &(c_in, c_out, k) in &convs {
            let d = if k == 3 { cv } else { 4 };
            let g = LayerGeometry::new(
                LayerKind::Conv {
                    c_out,
                    c_in,
                    kh: k,
                    kw: k,
                },
                Layout::Spatial,
                d,
            )
            .unwrap();
            let kk = clamp_centroids(256, g.n_subvectors()).unwrap();
            layers.push((g.n_subvectors(), kk, d, 1));
        }
        let fc = LayerGeometry::new(
            LayerKind::Linear {
                out: 1000,
                inp: 512,
            },
            Layout::Spatial,
            4,
        )
        .unwrap();
        layers.push((
            fc.n_subvectors(),
            clamp_centroids(2048, fc.n_subvectors()).unwrap(),
            4,
            1,
        ));
        let r = size_report(4.0 * total_params as f64, &layers, total_params - quantized);
        assert!((r.ratio - expected_ratio).abs() < 0.05, "{cv}: {}", r.ratio);
        assert!(
            (r.total / mb - expected_mb).abs() < 5e-4,
            "{cv}: {}",
            r.total / mb
        );
    }
}

/// conv2d(x, W) equals im2col(x)·M in both layouts.
#[test]
fn im2col_identity() {
    let mut rng = Seed::new(3).rng();
    for layout in [Layout::Spatial, Layout::ChannelMajor] {
        for (k, pad) in [(3usize, 1usize), (3, 0), (1, 0)] {
            let kind = LayerKind::Conv {
                c_out: 5,
                c_in: 4,
                kh: k,
                kw: k,
            };
            let g = LayerGeometry::new(kind, layout, 4).unwrap();
            let x = rng
                .normal_tensor((2, 4, 6, 5), 0.0, 1.0, &Device::Cpu)
                .unwrap();
            let w = rng.normal_vec(g.n_weights(), 0.0, 1.0);
            let wt = Tensor::from_vec(w.clone(), kind.weight_shape(), &Device::Cpu).unwrap();
            let y = qcl_nn::ops::conv2d(
                &x,
                &wt,
                qcl_nn::ops::Conv2dParams {
                    padding: pad,
                    ..Default::default()
                },
            )
            .unwrap();
            let inputs = LayerInputs::new(g.clone(), pad, &x).unwrap();
            let cols = inputs.im2col();
            let d_in = g.in_dim();
            // M[r][o] from the weight via the geometry's patch positions.
            let mut m = vec![0f32; d_in * 5];
            for o in 0..5 {
                for c in 0..4 {
                    for yy in 0..k {
                        for xx in 0..k {
                            m[g.patch_position(c, yy, xx) * 5 + o] =
                                w[((o * 4 + c) * k + yy) * k + xx];
                        }
                    }
                }
            }
            let (h_out, w_out) = (y.dim(2).unwrap(), y.dim(3).unwrap());
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for (r, patch) in cols.chunks_exact(d_in).enumerate() {
                let (n, pos) = (r / (h_out * w_out), r % (h_out * w_out));
                for o in 0..5 {
                    let v: f32 = patch
                        .iter()
                        .enumerate()
                        .map(|(i, p)| p * m[i * 5 + o])
                        .sum();
                    let expected = y[((n * 5 + o) * h_out * w_out) + pos];
                    assert!(
                        (v - expected).abs() < 1e-4,
                        "{layout:?} k{k}: {v} vs {expected}"
                    );
                }
            }
        }
    }
}

/// The folded conv gives the conv → BN (eval) output to 1e-5.
#[test]
fn bn_folding_matches() {
    let model = Model::new(Arch::FmNetBn, Seed::new(2)).unwrap();
    let mut rng = Seed::new(5).rng();
    for layer in Arch::FmNetBn.layers() {
        if layer.name == "fc" {
            continue;
        }
        let c = layer.kind.weight_shape()[0];
        let pre = format!("{}.bn", layer.name);
        for (n, lo, hi) in [
            ("weight", 0.5, 1.5),
            ("bias", -0.2, 0.2),
            ("running_mean", -0.3, 0.3),
            ("running_var", 0.5, 2.0),
        ] {
            let v = rng.uniform_vec(c, lo, hi);
            model
                .set(
                    &format!("{pre}.{n}"),
                    &Tensor::from_vec(v, c, &Device::Cpu).unwrap(),
                )
                .unwrap();
        }
    }
    let fused = model.fold_batch_norm().unwrap();
    assert_eq!(fused.arch(), Arch::FmNet);
    let x = rng
        .normal_tensor((3, 1, 28, 28), 0.0, 1.0, &Device::Cpu)
        .unwrap();
    let logits = |model: &Model| -> Vec<f32> {
        model
            .forward(&x, ForwardConfig::default())
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (logits(&model), logits(&fused));
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-4 * p.abs().max(1.0), "{p} vs {q}");
    }
}

/// Bad input: block size not dividing the input dimension, K larger than the subvectors.
#[test]
fn typed_errors_for_bad_layer_configurations() {
    let err = LayerGeometry::new(
        LayerKind::Conv {
            c_out: 4,
            c_in: 3,
            kh: 3,
            kw: 3,
        },
        Layout::Spatial,
        4,
    )
    .unwrap_err();
    assert_eq!(err.kind(), "invalid_parameter");
    assert!(err.to_string().contains("does not divide"), "{err}");
    let err = LayerGeometry::new(
        LayerKind::Conv {
            c_out: 4,
            c_in: 12,
            kh: 3,
            kw: 3,
        },
        Layout::ChannelMajor,
        9,
    )
    .unwrap_err();
    assert!(err.to_string().contains("c_in"), "{err}");
    let points = vec![0f32; 8 * 2];
    let err = activation_aware_em(
        &points,
        2,
        &[0; 8],
        1,
        None,
        MetricSource::Identity,
        EmConfig {
            k: 16,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), "invalid_parameter");
    assert!(err.to_string().contains("K = 16"), "{err}");
    assert!(clamp_centroids(64, 4).is_err());
}

proptest! {
    /// `index_bits(k)` is the least `b ≥ 1` with `2^b ≥ k`, for every `k` up to `usize::MAX`.
    #[test]
    fn index_bits_is_the_least_width_that_holds_k_codes(k in any::<usize>()) {
        let b = qcl_wpq::index_bits(k);
        prop_assert!((1..=usize::BITS).contains(&b));
        prop_assert!(b == usize::BITS || (1u128 << b) >= k as u128);
        prop_assert!(b == 1 || (1u128 << (b - 1)) < k as u128);
    }
}

proptest! {
    /// The allocation is the brute-force optimum over every combination within the budget, and
    /// an impossible budget is a typed error.
    #[test]
    fn allocation_is_the_best_combination_within_the_budget(
        table in prop::collection::vec(prop::collection::vec((1u64..40, 0.0f64..1.0), 1..4), 1..4),
        budget in 1u64..120,
    ) {
        use qcl_wpq::compress::allocate::{allocate, Candidate};
        use qcl_wpq::compress::LayerChoice;
        let candidates: Vec<Candidate> = table.iter().enumerate().flat_map(|(l, options)| {
            options.iter().enumerate().map(move |(i, &(bits, loss))| Candidate {
                layer: format!("layer{l}"),
                choice: LayerChoice { block: 1, centroids: i + 1 },
                bits,
                loss,
            })
        }).collect();
        // Brute force over every combination.
        let mut best: Option<f64> = None;
        let mut index = vec![0usize; table.len()];
        loop {
            let bits: u64 = index.iter().zip(&table).map(|(&i, o)| o[i].0).sum();
            let loss: f64 = index.iter().zip(&table).map(|(&i, o)| o[i].1).sum();
            if bits <= budget && best.is_none_or(|b| loss < b) {
                best = Some(loss);
            }
            let mut l = 0;
            while l < index.len() && index[l] + 1 == table[l].len() {
                index[l] = 0;
                l += 1;
            }
            if l == index.len() { break; }
            index[l] += 1;
        }
        match (allocate(&candidates, budget), best) {
            (Ok(chosen), Some(optimum)) => {
                prop_assert_eq!(chosen.len(), table.len());
                let pick = |l: usize| table[l][chosen[&format!("layer{l}")].centroids - 1];
                let bits: u64 = (0..table.len()).map(|l| pick(l).0).sum();
                let loss: f64 = (0..table.len()).map(|l| pick(l).1).sum();
                prop_assert!(bits <= budget);
                prop_assert!((loss - optimum).abs() <= 1e-9, "{loss} vs {optimum}");
            }
            (Err(qcl_tensor::Error::InvalidParameter { .. }), None) => {}
            (got, best) => prop_assert!(false, "{got:?} against brute force {best:?}"),
        }
    }
}
