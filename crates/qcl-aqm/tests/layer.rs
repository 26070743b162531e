//! Modules and stacks: docs/methods/aqm.md § One module, § The stack, and items 5–8, 12, 13 of
//! its § Invariants ("invariant N" below).

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qcl_aqm::layer::{bits_for, trim_plan};
use qcl_aqm::{QLayer, QLayerConfig, QStack, StackConfig};
use qcl_tensor::Error;

fn images(b: usize, seed: u64) -> Tensor {
    let v = seed.wrapping_mul(2654435761);
    let data: Vec<f32> = (0..b * 784)
        .map(|i| (((i as u64 * 7919 + v) % 255) as f32 / 127.5) - 1.0)
        .collect();
    Tensor::from_vec(data, (b, 1, 28, 28), &Device::Cpu).unwrap()
}

fn layer() -> QLayer {
    QLayer::new(
        QLayerConfig::fashion_mnist(),
        1,
        [28, 28],
        5.into(),
        &Device::Cpu,
    )
    .unwrap()
}

/// The layer's codebook as it is now, flattened row by row.
fn codebook_values(l: &QLayer) -> Vec<f32> {
    l.quantizer()
        .codebook()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn parameter_counts_match_the_method() {
    // Fashion-MNIST: encoder 15,216 + decoder 10,817 (docs/methods/aqm.md
    // § Fashion-MNIST experiment); CIFAR (§ Hyperparameters there): 147,750 + 105,003.
    assert_eq!(layer().model_cost_params(), 26_033);
    let cifar = QLayer::new(QLayerConfig::cifar(20), 3, [32, 32], 1.into(), &Device::Cpu).unwrap();
    assert_eq!(cifar.model_cost_params(), 252_753);
}

#[test]
fn compression_rate_formula() {
    // Invariant 12: CIFAR defaults give 24 (N = 1) and 12 (N = 2); FMNIST 8.
    let c20 = QLayer::new(QLayerConfig::cifar(20), 3, [32, 32], 1.into(), &Device::Cpu).unwrap();
    let c50 = QLayer::new(QLayerConfig::cifar(50), 3, [32, 32], 1.into(), &Device::Cpu).unwrap();
    assert_eq!(c20.compression_rate(), 24.0);
    assert_eq!(c50.compression_rate(), 12.0);
    assert_eq!(layer().compression_rate(), 8.0);
    assert_eq!(layer().bits_per_sample(), 196 * 4);
    assert_eq!(
        (bits_for(16), bits_for(8), bits_for(2), bits_for(5)),
        (4, 3, 1, 3)
    );
}

#[test]
fn shapes_nonnegative_latent_and_decode_of_indices() {
    let mut l = layer();
    let x = images(3, 1);
    let codebook_before = l.quantizer().codebook().unwrap();
    let out = l.forward(&x, true).unwrap();
    assert_eq!(out.z_e.dims(), &[3, 32, 14, 14]);
    assert_eq!(out.indices.dims(), &[3, 1, 14, 14]);
    assert_eq!(out.reconstruction.dims(), x.dims());
    let ze: Vec<f32> = out.z_e.flatten_all().unwrap().to_vec1().unwrap();
    assert!(ze.iter().all(|&v| v >= 0.0));
    // z_q equals the pre-update codebook rows of the indices, and each is the nearest row.
    let book: Vec<f32> = codebook_before.flatten_all().unwrap().to_vec1().unwrap();
    let idx: Vec<u32> = out.indices.flatten_all().unwrap().to_vec1().unwrap();
    let q: Vec<f32> = out.q.flatten_all().unwrap().to_vec1().unwrap();
    for b in 0..3 {
        for p in 0..196 {
            let k = idx[b * 196 + p] as usize;
            let v: Vec<f32> = (0..32).map(|c| ze[(b * 32 + c) * 196 + p]).collect();
            let dist =
                |r: usize| -> f32 { (0..32).map(|c| (v[c] - book[r * 32 + c]).powi(2)).sum() };
            for c in 0..32 {
                assert_eq!(q[(b * 32 + c) * 196 + p], book[k * 32 + c]);
            }
            assert!((0..16).all(|r| dist(k) <= dist(r)));
        }
    }
    // The codebook moved (EMA update in training).
    assert_ne!(codebook_values(&l), book);
}

#[test]
fn freezing_waits_230_updates_at_rate_001_then_trims_and_fixes_the_codebook() {
    let mut l = layer();
    let x = images(2, 3);
    for i in 0..229 {
        l.update_threshold_stats(&[0.0, 0.0]);
        assert!(l.stats().p_ok <= 1.0 - 0.99f64.powi(i + 1) + 1e-12);
    }
    l.forward(&x, true).unwrap();
    assert!(!l.is_frozen(), "p = {} after 229 updates", l.stats().p_ok);
    l.update_threshold_stats(&[0.0, 0.0]);
    let cost_before = l.model_cost_params();
    l.forward(&x, true).unwrap();
    assert!(l.is_frozen());
    let k = l.current_codes();
    assert!(k.is_power_of_two() && (2..=16).contains(&k));
    assert!(k >= l.stats().used_at_freeze.unwrap());
    assert_eq!(l.bits_per_sample(), 196 * u64::from(bits_for(k)));
    assert_eq!(l.model_cost_params(), cost_before + 10_817);
    let book = codebook_values(&l);
    for s in 0..3 {
        let out = l.forward(&images(4, 10 + s), true).unwrap();
        let loss = l.loss(&out, &images(4, 10 + s), 0, true).unwrap();
        l.optimize(&loss).unwrap();
        let idx: Vec<u32> = out.indices.flatten_all().unwrap().to_vec1().unwrap();
        assert!(idx.iter().all(|&i| (i as usize) < k));
    }
    let after = codebook_values(&l);
    assert_eq!(book, after, "a frozen codebook must stay bit-identical");
}

#[test]
fn slow_decoder_moves_toward_the_live_one() {
    let mut l = layer();
    l.freeze().unwrap();
    let z = l.forward(&images(2, 4), true).unwrap();
    let x = images(2, 4);
    let slow0 = l.decode_latent(&z.q, true).unwrap();
    for _ in 0..3 {
        let out = l.forward(&x, true).unwrap();
        let loss = l.loss(&out, &x, 0, false).unwrap();
        l.optimize(&loss).unwrap();
    }
    let live = l.decode_latent(&z.q, false).unwrap();
    let slow_still = l.decode_latent(&z.q, true).unwrap();
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert_eq!(
        diff(&slow0, &slow_still),
        0.0,
        "the slow copy only moves in update_ema_decoder"
    );
    let gap_before = diff(&slow_still, &live);
    assert!(gap_before > 0.0);
    l.update_ema_decoder().unwrap();
    let slow1 = l.decode_latent(&z.q, true).unwrap();
    assert!(diff(&slow1, &live) < gap_before);
}

#[test]
fn replay_rows_count_twice_in_the_loss_when_asked() {
    let mut l = layer();
    let x = images(4, 7);
    let out = l.forward(&x, false).unwrap();
    let once: f32 = l.loss(&out, &x, 2, false).unwrap().to_scalar().unwrap();
    let twice: f32 = l.loss(&out, &x, 2, true).unwrap().to_scalar().unwrap();
    let none: f32 = l.loss(&out, &x, 0, true).unwrap().to_scalar().unwrap();
    assert_eq!(once, none);
    assert!(twice > once);
    assert!(matches!(
        l.loss(&out, &x, 5, true),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn bad_configurations_are_typed_errors() {
    let base = QLayerConfig::fashion_mnist();
    for th in [0.0, -1.0, f64::NAN] {
        let c = QLayerConfig {
            recon_threshold: th,
            ..base.clone()
        };
        assert!(
            matches!(c.validate(1, [28, 28]), Err(Error::InvalidParameter { .. })),
            "{th}"
        );
    }
    let c = QLayerConfig {
        codebooks: 3,
        ..base.clone()
    };
    assert!(matches!(
        c.validate(1, [28, 28]),
        Err(Error::InvalidParameter { .. })
    ));
    let c = QLayerConfig {
        latent_shape: [7, 7],
        ..base.clone()
    };
    assert!(matches!(
        c.validate(1, [28, 28]),
        Err(Error::ShapeMismatch { .. })
    ));
    let stack = StackConfig {
        layers: vec![QLayerConfig {
            latent_shape: [16, 16],
            ..base.clone()
        }],
        ..StackConfig::fashion_mnist()
    };
    assert!(matches!(
        QStack::new(stack, 0.into(), &Device::Cpu),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut l = layer();
    let wrong = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        l.forward(&wrong, true),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn shipped_configs_load_and_match_the_method() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/aqm");
    assert_eq!(
        StackConfig::load(format!("{dir}/fashion_mnist.json")).unwrap(),
        StackConfig::fashion_mnist()
    );
    assert_eq!(
        StackConfig::load(format!("{dir}/cifar_20.json")).unwrap(),
        StackConfig::cifar(20)
    );
    assert_eq!(
        StackConfig::load(format!("{dir}/cifar_50.json")).unwrap(),
        StackConfig::cifar(50)
    );
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.json");
    std::fs::write(&p, r#"{"image":[1,28,28],"layers":[]}"#).unwrap();
    assert!(matches!(
        StackConfig::load(&p),
        Err(Error::InvalidParameter { .. })
    ));
    std::fs::write(&p, "{not json").unwrap();
    assert!(matches!(StackConfig::load(&p), Err(Error::BadFile { .. })));
}

#[test]
fn two_module_stack_shapes_and_no_gradient_between_modules() {
    let second = QLayerConfig {
        channels: 16,
        downsample: 2,
        latent_shape: [7, 7],
        ..QLayerConfig::fashion_mnist()
    };
    let config = StackConfig {
        layers: vec![QLayerConfig::fashion_mnist(), second],
        ..StackConfig::fashion_mnist()
    };
    let mut stack = QStack::new(config, 2.into(), &Device::Cpu).unwrap();
    let x = images(2, 9);
    let step = stack.train_step(&x, 0).unwrap();
    assert_eq!(step.outputs[1].indices.dims(), &[2, 1, 7, 7]);
    assert_eq!(step.finals.len(), 2);
    for f in &step.finals {
        assert_eq!(f.dims(), x.dims());
    }
    // Module 2's loss has no path to module 1's parameters: its gradient store holds none.
    let (outs, _) = stack.forward(&x, false).unwrap();
    let target = outs[0].z_e.detach();
    let loss = stack.layers()[1].loss(&outs[1], &target, 0, true).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&outs[0].z_e).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Invariant 8: K' a power of two with max(2, used) ≤ K' ≤ K; the kept rows have the
    /// largest counts.
    #[test]
    fn trimming_keeps_the_highest_counts(counts in prop::collection::vec(prop_oneof![Just(0.0f32), 0.0f32..0.1, 0.1f32..50.0], 32)) {
        let (k, kept) = trim_plan(&counts, 2, 16);
        let used = (0..2).map(|n| counts[n * 16..(n + 1) * 16].iter().filter(|&&c| c > 0.1).count()).max().unwrap();
        prop_assert!(k.is_power_of_two() && k >= used.max(2) && k <= 16);
        for (n, rows) in kept.iter().enumerate() {
            let c = &counts[n * 16..(n + 1) * 16];
            prop_assert_eq!(rows.len(), k);
            let min_kept = rows.iter().map(|&r| c[r]).fold(f32::INFINITY, f32::min);
            for (r, &count) in c.iter().enumerate() {
                if !rows.contains(&r) {
                    prop_assert!(count <= min_kept);
                }
            }
            prop_assert!(rows.windows(2).all(|w| c[w[0]] <= c[w[1]]));
        }
    }

    /// Invariant 13: p stays in [0, 1].
    #[test]
    fn p_stays_in_unit_interval(batches in prop::collection::vec(prop::collection::vec(0.0f64..0.3, 1..6), 1..40)) {
        let mut l = layer();
        for b in batches {
            l.update_threshold_stats(&b);
            prop_assert!((0.0..=1.0).contains(&l.stats().p_ok));
        }
    }
}
