//! The uniform scalar baseline's choices ([`UniformConfig`]) against their definitions, on
//! FMNet with random (heavy-tailed) weights in `conv2`.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use qcl_tensor::Seed;
use qcl_wpq::{
    uniform_quantize_with, Arch, Model, UniformClip, UniformConfig, UniformLevels, UniformRange,
};

const CHANNEL: usize = 32 * 9; // conv2: 32 → 32, 3×3

/// FMNet whose conv2 holds Gaussian weights with a few outliers, and those weights.
fn model(seed: u64, outlier: f32) -> (Model, Vec<f32>) {
    let model = Model::new(Arch::FmNet, Seed::new(seed)).unwrap();
    let mut rng = Seed::new(seed).child_named("weights").rng();
    let mut w = rng.normal_vec(32 * CHANNEL, 0.0, 0.1);
    for i in (0..w.len()).step_by(97) {
        w[i] *= outlier;
    }
    // Exact zeros, which zero-centred levels keep.
    for i in (5..w.len()).step_by(41) {
        w[i] = 0.0;
    }
    let t = Tensor::from_vec(w.clone(), (32, 32, 3, 3), &Device::Cpu).unwrap();
    model.set("conv2.weight", &t).unwrap();
    (model, w)
}

fn weights(model: &Model, name: &str) -> Vec<f32> {
    model.tensors()[name]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn distinct(values: &[f32]) -> usize {
    values
        .iter()
        .map(|v| v.to_bits())
        .collect::<BTreeSet<_>>()
        .len()
}

fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn levels_ranges_and_clipping_keep_their_definitions(
        seed in 0u64..1_000,
        bits in 2u32..6,
        outlier in 1.0f32..12.0,
    ) {
        let (m, w) = model(seed, outlier);
        let run = |levels, range, clip| {
            let config = UniformConfig { bits, levels, range, clip, only_layer: None };
            weights(&uniform_quantize_with(&m, &config).unwrap(), "conv2.weight")
        };
        use UniformClip::{Max, MseOptimal};
        use UniformLevels::{Even, ZeroCentred};
        use UniformRange::{PerChannel, PerTensor};
        let even = run(Even, PerChannel, Max);
        let zero = run(ZeroCentred, PerChannel, Max);
        let tensor = run(Even, PerTensor, Max);
        let clipped = run(Even, PerChannel, MseOptimal);
        for (c, orig) in w.chunks_exact(CHANNEL).enumerate() {
            let at = |v: &[f32]| v[c * CHANNEL..(c + 1) * CHANNEL].to_vec();
            let s = orig.iter().fold(0f32, |a, v| a.max(v.abs()));
            // At most 2^b levels (2^b − 1 zero-centred), each weight within half a step.
            prop_assert!(distinct(&at(&even)) <= 1 << bits);
            prop_assert!(distinct(&at(&zero)) < 1 << bits);
            let step = 2.0 * s / ((1u32 << bits) - 1) as f32;
            for (q, v) in at(&even).iter().zip(orig) {
                prop_assert!((q - v).abs() <= 0.5 * step * (1.0 + 1e-5));
            }
            // Zero-centred levels keep exact zeros; clipping never does worse than the max.
            for (q, v) in at(&zero).iter().zip(orig) {
                if *v == 0.0 {
                    prop_assert_eq!(*q, 0.0);
                }
            }
            prop_assert!(squared_error(&at(&clipped), orig) <= squared_error(&at(&even), orig));
        }
        // One range for the whole tensor: one grid of at most 2^b levels.
        prop_assert!(distinct(&tensor) <= 1 << bits);
        prop_assert!(squared_error(&tensor, &w) >= squared_error(&even, &w));
    }
}

#[test]
fn only_the_named_layer_changes_and_bad_choices_are_refused() {
    let (m, _) = model(1, 4.0);
    let config = UniformConfig {
        only_layer: Some("conv2".into()),
        ..UniformConfig::default()
    };
    let q = uniform_quantize_with(&m, &config).unwrap();
    for (name, tensor) in m.tensors() {
        let same = weights(&q, &name) == tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(same, name != "conv2.weight", "{name}");
    }
    for bad in [
        UniformConfig {
            only_layer: Some("conv0".into()),
            ..UniformConfig::default()
        },
        UniformConfig {
            bits: 17,
            ..UniformConfig::default()
        },
        UniformConfig {
            bits: 1,
            levels: UniformLevels::ZeroCentred,
            ..UniformConfig::default()
        },
    ] {
        assert!(matches!(
            uniform_quantize_with(&m, &bad),
            Err(qcl_tensor::Error::InvalidParameter { .. })
        ));
    }
}
