//! Layers and models: running statistics, eval mode, shapes, parameter files, a model that
//! actually learns.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qcl_nn::layers::{BatchNorm2d, BatchNormConfig, Module, ModuleT};
use qcl_nn::models::{ResNet, ResNetConfig, SmallCnn};
use qcl_nn::optim::Optimizer;
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Seed};

mod common;

fn random(seed: u64, shape: &[usize]) -> Tensor {
    Seed(seed)
        .rng()
        .normal_tensor(shape, 0.5, 2.0, &Device::Cpu)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// `running = (1 − m)·running + m·batch`, with the unbiased batch variance (PyTorch's rule),
    /// over several steps.
    #[test]
    fn batch_norm_running_statistics_follow_the_momentum_rule(
        n in 2usize..5, c in 1usize..4, h in 1usize..4, momentum in 0.01f64..0.9, steps in 1usize..4, seed in 0u64..500,
    ) {
        let store = ParamStore::new(seed);
        let bn = BatchNorm2d::new(&store.root(&Device::Cpu), c, BatchNormConfig { eps: 1e-5, momentum }).unwrap();
        let mut mean = vec![0.0f64; c];
        let mut var = vec![1.0f64; c];
        for step in 0..steps {
            let x = random(seed * 10 + step as u64, &[n, c, h, h]);
            bn.forward_t(&x, true).unwrap();
            let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let m = n * h * h;
            for ch in 0..c {
                let v: Vec<f64> = (0..n)
                    .flat_map(|b| values[(b * c + ch) * h * h..(b * c + ch + 1) * h * h].to_vec())
                    .map(|v| v as f64)
                    .collect();
                let bm = v.iter().sum::<f64>() / m as f64;
                let bv = v.iter().map(|x| (x - bm).powi(2)).sum::<f64>() / (m as f64 - 1.0);
                mean[ch] = (1.0 - momentum) * mean[ch] + momentum * bm;
                var[ch] = (1.0 - momentum) * var[ch] + momentum * bv;
            }
        }
        let rm: Vec<f32> = bn.running_mean().to_vec1().unwrap();
        let rv: Vec<f32> = bn.running_var().to_vec1().unwrap();
        for ch in 0..c {
            prop_assert!((rm[ch] as f64 - mean[ch]).abs() < 1e-4 * mean[ch].abs().max(1.0));
            prop_assert!((rv[ch] as f64 - var[ch]).abs() < 1e-4 * var[ch].abs().max(1.0));
        }
    }
}

#[test]
fn eval_mode_uses_running_statistics_and_leaves_them_alone() {
    let store = ParamStore::new(1);
    let bn = BatchNorm2d::new(&store.root(&Device::Cpu), 2, BatchNormConfig::default()).unwrap();
    let x = random(3, &[4, 2, 3, 3]);
    // Fresh statistics (mean 0, variance 1): evaluation is the identity up to eps.
    let y = bn.forward_t(&x, false).unwrap();
    let diff: f32 = (y - &x)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-4 * 8.0, "{diff}");
    assert_eq!(bn.running_mean().to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    // Training mode changes them; evaluation afterwards normalises with them.
    bn.forward_t(&x, true).unwrap();
    assert_ne!(bn.running_mean().to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
}

#[test]
fn batch_norm_rejects_a_wrong_channel_count() {
    let store = ParamStore::new(1);
    let bn = BatchNorm2d::new(&store.root(&Device::Cpu), 3, BatchNormConfig::default()).unwrap();
    // candle's error type carries qcl's typed error back.
    let err = Error::from(bn.forward_t(&random(1, &[2, 4, 2, 2]), true).unwrap_err());
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn resnets_take_any_input_size_and_channel_count() {
    for (c, size, config) in [
        (1, 28, ResNetConfig::resnet20(1, 10)),
        (3, 32, ResNetConfig::resnet20(3, 100)),
        (3, 17, ResNetConfig::reduced_resnet18(3, 10, 20)),
    ] {
        let store = ParamStore::new(0);
        let net = ResNet::new(&store.root(&Device::Cpu), &config).unwrap();
        let logits = net
            .forward_t(&random(2, &[2, c, size, size]), true)
            .unwrap();
        assert_eq!(logits.dims(), &[2, config.num_classes]);
        let eval = net
            .forward_t(&random(2, &[2, c, size, size]), false)
            .unwrap();
        assert_eq!(eval.dims(), &[2, config.num_classes]);
    }
    let store = ParamStore::new(0);
    let net = ResNet::new(&store.root(&Device::Cpu), &ResNetConfig::resnet20(3, 10)).unwrap();
    let err = Error::from(
        net.forward_t(&random(2, &[2, 1, 28, 28]), true)
            .unwrap_err(),
    );
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn parameter_files_round_trip_and_refuse_other_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet.safetensors");
    let store = ParamStore::new(5);
    let net = ResNet::new(&store.root(&Device::Cpu), &ResNetConfig::resnet20(1, 10)).unwrap();
    net.forward_t(&random(4, &[4, 1, 12, 12]), true).unwrap(); // moves running stats
    store.save(&path).unwrap();
    let other = ParamStore::new(6);
    let net2 = ResNet::new(&other.root(&Device::Cpu), &ResNetConfig::resnet20(1, 10)).unwrap();
    other.load(&path).unwrap();
    let x = random(7, &[2, 1, 12, 12]);
    let eval_output = |net: &ResNet| -> Vec<f32> {
        net.forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(eval_output(&net), eval_output(&net2));
    let wrong = ParamStore::new(6);
    ResNet::new(&wrong.root(&Device::Cpu), &ResNetConfig::resnet20(1, 100)).unwrap();
    assert!(matches!(
        wrong.load(&path).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(
        other.load(&path).unwrap_err(),
        Error::BadFile { .. }
    ));
}

#[test]
fn the_small_cnn_learns_a_separable_toy_problem() {
    // Class = whether the left half is brighter than the right half.
    let mut rng = Seed(9).rng();
    let n = 64;
    let mut pixels = vec![0f32; n * 16 * 16];
    let mut labels = vec![0u32; n];
    for i in 0..n {
        let class = (i % 2) as u32;
        labels[i] = class;
        for y in 0..16 {
            for x in 0..16 {
                let bright = (x < 8) == (class == 1);
                pixels[i * 256 + y * 16 + x] = if bright { 1.0 } else { 0.0 } + 0.1 * rng.uniform();
            }
        }
    }
    let x = Tensor::from_vec(pixels, (n, 1, 16, 16), &Device::Cpu).unwrap();
    let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let store = ParamStore::new(3);
    let net = SmallCnn::new(&store.root(&Device::Cpu), 1, 16, 2).unwrap();
    let mut opt = common::momentum_sgd(&store);
    let loss =
        |net: &SmallCnn| candle_nn::loss::cross_entropy(&net.forward(&x).unwrap(), &y).unwrap();
    let first = loss(&net)
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    for _ in 0..30 {
        let l = loss(&net);
        opt.step(&l.backward().unwrap()).unwrap();
    }
    let last = loss(&net)
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(last < 0.2 * first, "loss {first} -> {last}");
}
