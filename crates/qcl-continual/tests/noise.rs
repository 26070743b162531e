//! The optional quantization-noise term of LifeQuant's Fisher loss (docs/methods/lifequant.md
//! § ProxQ): its value, its seeding, and the errors of a bad setting or a learner without a
//! feature/head split.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use qcl_continual::{
    ContinualTrainer, FeatureHead, Learner, LifeQuant, LifeQuantConfig, LifelongConfig, QResNet,
    QResNetConfig, QuantizationNoise, Scenario, TaskSchedule, TrainerConfig,
};
use qcl_data::{Normalization, SplitDataset};
use qcl_nn::layers::{Linear, Module};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Seed};

/// A head only: the "features" are the input itself.
struct LinearHead(Linear);

impl FeatureHead for LinearHead {
    fn features_t(&self, x: &Tensor, _train: bool) -> qcl_tensor::Result<Tensor> {
        Ok(x.clone())
    }
    fn head(&self, features: &Tensor) -> qcl_tensor::Result<Tensor> {
        Ok(self.0.forward(features)?)
    }
}

fn scalar(t: &Tensor) -> f64 {
    f64::from(t.to_scalar::<f32>().unwrap())
}

/// −log mean(log_softmax(z) ⊙ log_softmax(z)) by hand, in f64.
fn clean_term(z: &[f32], classes: usize) -> f64 {
    let mut sum = 0.0;
    for row in z.chunks(classes) {
        let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        sum += row.iter().map(|&v| (v as f64 - lse).powi(2)).sum::<f64>();
    }
    -(sum / z.len() as f64).ln()
}

proptest! {
    /// With no noise (range 0) every draw gives the clean term, so the sum is draws × it;
    /// with noise the sum stays finite and depends only on the seed.
    #[test]
    fn the_term_is_the_clean_self_product_without_noise(
        features in prop::collection::vec(-2.0f32..2.0, 12),
        draws in 1usize..6,
        seed in 0u64..1000,
    ) {
        let store = ParamStore::new(seed);
        let head = LinearHead(Linear::new(&store.root(&Device::Cpu).pp("fc"), 4, 5, true).unwrap());
        let h = Tensor::from_vec(features, (3, 4), &Device::Cpu).unwrap();
        let z = head.head(&h).unwrap();
        let silent = QuantizationNoise { draws, activation_range: 0.0, ..QuantizationNoise::default() };
        let mut rng = Seed::new(seed).rng();
        let got = scalar(&silent.batch_sum(&head, &h, &z, &mut rng).unwrap());
        let want = draws as f64 * clean_term(&z.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 5);
        prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{got} vs {want}");

        let noisy = QuantizationNoise { draws, ..QuantizationNoise::default() };
        let run = |s: u64| scalar(&noisy.batch_sum(&head, &h, &z, &mut Seed::new(s).rng()).unwrap());
        let a = run(seed);
        prop_assert!(a.is_finite());
        prop_assert_eq!(a, run(seed));
    }
}

#[test]
fn amplitude_follows_the_bit_width() {
    let noise = QuantizationNoise::default();
    assert!((noise.amplitude() - 2.0 / 15.0).abs() < 1e-12);
    let two = QuantizationNoise { bits: 2, ..noise };
    assert!((two.amplitude() - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn bad_noise_settings_are_typed_errors() {
    for noise in [
        QuantizationNoise {
            draws: 0,
            ..QuantizationNoise::default()
        },
        QuantizationNoise {
            bits: 0,
            ..QuantizationNoise::default()
        },
        QuantizationNoise {
            activation_range: f64::NAN,
            ..QuantizationNoise::default()
        },
        QuantizationNoise {
            activation_range: -1.0,
            ..QuantizationNoise::default()
        },
    ] {
        let err = LifeQuant::new(LifeQuantConfig {
            quantization_noise: Some(noise),
            ..LifeQuantConfig::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { .. }),
            "{noise:?}: {err}"
        );
    }
}

fn scenario() -> Scenario {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist.safetensors");
    let data = SplitDataset::load(path).unwrap();
    let data =
        SplitDataset::new(data.train.take_per_class(10), data.test.take_per_class(4)).unwrap();
    let params = LifelongConfig {
        train_per_class: Some(10),
        ..LifelongConfig::reproduction()
    };
    Scenario::lifelong(&data, &params).unwrap()
}

/// The Fisher of task 1 (F from the replay of task 0) with the given noise setting.
fn task1_fisher(noise: Option<QuantizationNoise>, split: bool) -> qcl_tensor::Result<Vec<f32>> {
    let scenario = scenario();
    let store = ParamStore::new(3);
    let config = QResNetConfig {
        widths: [4, 4, 8],
        ..QResNetConfig::smoke()
    };
    let model = QResNet::new(&store.root(&Device::Cpu), &config)?;
    let mut learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
    if split {
        learner = learner.with_feature_head(&model);
    }
    let mut lq = LifeQuant::new(LifeQuantConfig {
        quantization_noise: noise,
        fisher_batch_size: 4,
        ..LifeQuantConfig::default()
    })?;
    let trainer = ContinualTrainer::new(TrainerConfig {
        batch_size: 8,
        ..TrainerConfig::default()
    })?;
    let schedule = TaskSchedule {
        epochs: 1,
        lr: 0.01,
        milestones: vec![],
    };
    // Train two tasks; the second one's Fisher comes from the replay of the first.
    let tasks = &scenario.tasks()[..2];
    trainer.run(&learner, &mut lq, tasks, &schedule)?;
    let fisher = lq.proxq().expect("a penalty at task 1").fisher();
    Ok(fisher
        .iter()
        .flat_map(|(_, f)| f.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect())
}

#[test]
fn the_noise_term_changes_the_fisher_and_is_seeded() {
    let plain = task1_fisher(None, true).unwrap();
    let noisy = task1_fisher(Some(QuantizationNoise::default()), true).unwrap();
    let again = task1_fisher(Some(QuantizationNoise::default()), true).unwrap();
    let reseeded = task1_fisher(
        Some(QuantizationNoise {
            seed: qcl_tensor::Seed::new(7),
            ..QuantizationNoise::default()
        }),
        true,
    )
    .unwrap();
    assert_eq!(plain.len(), noisy.len());
    assert!(noisy.iter().all(|v| v.is_finite() && *v >= 0.0));
    assert_ne!(plain, noisy);
    assert_eq!(noisy, again);
    assert_ne!(noisy, reseeded);
    // Without the term the split changes nothing.
    assert_eq!(plain, task1_fisher(None, false).unwrap());
}

#[test]
fn the_noise_term_needs_a_feature_head_split() {
    let err = task1_fisher(Some(QuantizationNoise::default()), false).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
}
