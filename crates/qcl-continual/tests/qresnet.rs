//! Tests of QResNet-8: shapes, where the quantizers sit (against a hand-written reference
//! forward over the same parameters), quantization grids, gradients, bit switching,
//! determinism, training and configuration errors. Smoke widths, small batches.

use candle_core::{Device, Tensor};
use qcl_continual::ball::cross_entropy;
use qcl_continual::{
    ActivationQuantizer, QResNet, QResNetConfig, WeightQuantMode, WeightQuantizer,
};
use qcl_nn::layers::{BatchNorm2d, BatchNormConfig, Conv2d, Conv2dConfig, Linear, Module, ModuleT};
use qcl_nn::optim::{Optimizer, Sgd, SgdConfig};
use qcl_nn::{ParamPath, ParamStore};
use qcl_tensor::Error;

const DEV: Device = Device::Cpu;

fn input(seed: u64, batch: usize) -> Tensor {
    // Deterministic pseudo-random images without a global RNG.
    let n = batch * 28 * 28;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let z = (i as u64 + 1)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed.wrapping_mul(1442695040888963407));
            ((z >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (batch, 1, 28, 28), &DEV).unwrap()
}

fn build(seed: u64, config: &QResNetConfig) -> (ParamStore, QResNet) {
    let store = ParamStore::new(seed);
    let net = QResNet::new(&store.root(&DEV), config).unwrap();
    (store, net)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    qcl_tensor::max_abs_diff(a, b).unwrap()
}

/// The QResNet-8 network (docs/methods/lifequant.md § Network) written out with plain qcl-nn
/// layers that share the model's parameters (same names in the same store) and explicit
/// quantizers.
struct Reference {
    stem: (Conv2d, BatchNorm2d),
    blocks: Vec<RefBlock>,
    fc: Linear,
}

struct RefBlock {
    conv0: Conv2d,
    bn0: BatchNorm2d,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    skip: Option<(Conv2d, BatchNorm2d)>,
}

fn conv(p: &ParamPath, c_in: usize, c_out: usize, k: usize, stride: usize) -> Conv2d {
    let cfg = Conv2dConfig {
        stride,
        padding: k / 2,
        dilation: 1,
        bias: false,
    };
    Conv2d::new(p, c_in, c_out, k, cfg).unwrap()
}

fn bn(p: &ParamPath, c: usize) -> BatchNorm2d {
    BatchNorm2d::new(p, c, BatchNormConfig::default()).unwrap()
}

impl Reference {
    fn new(root: &ParamPath, widths: [usize; 3]) -> Self {
        let stem = (
            conv(&root.pp("stem").pp("conv"), 1, widths[0], 3, 1),
            bn(&root.pp("stem").pp("bn"), widths[0]),
        );
        let mut c_in = widths[0];
        let mut blocks = Vec::new();
        for (s, (w, stride)) in [(widths[0], 1), (widths[1], 2), (widths[2], 2)]
            .into_iter()
            .enumerate()
        {
            let p = root.pp("stages").pp(s).pp(0);
            let skip = (stride != 1).then(|| {
                (
                    conv(&p.pp("shortcut").pp("conv"), c_in, w, 1, stride),
                    bn(&p.pp("shortcut").pp("bn"), w),
                )
            });
            blocks.push(RefBlock {
                conv0: conv(&p.pp("conv0"), c_in, w, 3, stride),
                bn0: bn(&p.pp("bn0"), w),
                conv1: conv(&p.pp("conv1"), w, w, 3, 1),
                bn1: bn(&p.pp("bn1"), w),
                skip,
            });
            c_in = w;
        }
        let fc = Linear::new(&root.pp("fc"), widths[2], 10, true).unwrap();
        Self { stem, blocks, fc }
    }

    /// `quant = None`: no quantizer anywhere (plain ResNet); otherwise `Qw` on every conv
    /// weight and `Qa` after every BatchNorm.
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        quant: Option<(WeightQuantizer, ActivationQuantizer)>,
    ) -> Tensor {
        let cv = |c: &Conv2d, x: &Tensor| match quant {
            Some((wq, _)) => c
                .forward_with_weight(x, &wq.quantize(c.weight()).unwrap())
                .unwrap(),
            None => c.forward(x).unwrap(),
        };
        let qa = |x: Tensor| match quant {
            Some((_, aq)) => aq.forward(&x).unwrap(),
            None => x,
        };
        let mut h = qa(self.stem.1.forward_t(&cv(&self.stem.0, x), train).unwrap())
            .relu()
            .unwrap();
        for b in &self.blocks {
            let a = qa(b.bn0.forward_t(&cv(&b.conv0, &h), train).unwrap())
                .relu()
                .unwrap();
            let out = qa(b.bn1.forward_t(&cv(&b.conv1, &a), train).unwrap());
            let sc = match &b.skip {
                Some((c, n)) => qa(n.forward_t(&cv(c, &h), train).unwrap()),
                None => h.clone(),
            };
            h = (out + sc).unwrap().relu().unwrap();
        }
        self.fc.forward(&h.mean((2, 3)).unwrap()).unwrap()
    }
}

#[test]
fn output_shape_and_parameter_names() {
    let (store, net) = build(0, &QResNetConfig::smoke());
    for train in [true, false] {
        let y = net.forward_t(&input(1, 3), train).unwrap();
        assert_eq!(y.dims(), &[3, 10]);
        assert!(y
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }
    assert_eq!(
        net.features_t(&input(1, 2), false).unwrap().dims(),
        &[2, 32]
    );
    let names = net.quantized_weight_names();
    assert_eq!(
        names,
        [
            "stem.conv.weight",
            "stages.0.0.conv0.weight",
            "stages.0.0.conv1.weight",
            "stages.1.0.conv0.weight",
            "stages.1.0.conv1.weight",
            "stages.1.0.shortcut.conv.weight",
            "stages.2.0.conv0.weight",
            "stages.2.0.conv1.weight",
            "stages.2.0.shortcut.conv.weight",
        ]
    );
    assert_eq!(net.head_parameter_names(), ["fc.weight", "fc.bias"]);
    // Every named latent weight is a trainable parameter of the store, with the right shape.
    for (name, w) in net.quantized_weights() {
        let var = store.get(&name).unwrap();
        assert_eq!(var.dims(), w.dims());
    }
    assert_eq!(
        store.get("stages.1.0.shortcut.conv.weight").unwrap().dims(),
        &[16, 8, 1, 1]
    );
    // Bias-free convs (9), 9 BatchNorms (weight, bias) and the head (weight, bias).
    assert_eq!(store.trainable().len(), 9 + 2 * 9 + 2);
    // Full size: QResNet-8 has widths 16/32/64 and a 64→10 head.
    let (_, big) = build(0, &QResNetConfig::qresnet8());
    assert_eq!(big.forward_t(&input(2, 1), false).unwrap().dims(), &[1, 10]);
    assert_eq!(
        big.features_t(&input(2, 1), false).unwrap().dims(),
        &[1, 64]
    );
}

#[test]
fn fp32_forward_equals_plain_network() {
    let config = QResNetConfig {
        weight_bits: 32,
        activation_bits: 32,
        ..QResNetConfig::smoke()
    };
    let (store, net) = build(3, &config);
    let reference = Reference::new(&store.root(&DEV), config.widths);
    let x = input(4, 4);
    for train in [false, true] {
        let got = net.forward_t(&x, train).unwrap();
        let want = reference.forward(&x, train, None);
        assert!(max_abs_diff(&got, &want) < 1e-5, "train = {train}");
    }
}

#[test]
fn quantized_forward_matches_reference_quantizer_placement() {
    for mode in [WeightQuantMode::Faithful, WeightQuantMode::Strict] {
        for bits in [2, 4, 8] {
            let config = QResNetConfig {
                weight_bits: bits,
                activation_bits: bits,
                weight_mode: mode,
                ..QResNetConfig::smoke()
            };
            let (store, net) = build(5, &config);
            let reference = Reference::new(&store.root(&DEV), config.widths);
            let wq = WeightQuantizer {
                mode,
                ..WeightQuantizer::new(bits).unwrap()
            };
            let quant = Some((wq, ActivationQuantizer::new(bits).unwrap()));
            let x = input(6, 4);
            let got = net.forward_t(&x, false).unwrap();
            let want = reference.forward(&x, false, quant);
            assert!(max_abs_diff(&got, &want) < 1e-5, "{mode:?}, {bits} bits");
            // ... and differs from the unquantized network.
            let plain = reference.forward(&x, false, None);
            assert!(max_abs_diff(&got, &plain) > 1e-4, "{mode:?}, {bits} bits");
        }
    }
}

fn distinct(t: &Tensor) -> Vec<f32> {
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.sort_by(f32::total_cmp);
    v.dedup();
    v
}

#[test]
fn four_bit_weights_lie_on_the_grid() {
    // Strict: at most 16 levels per tensor, all in {−1 + 2j/15}.
    let strict = QResNetConfig {
        weight_mode: WeightQuantMode::Strict,
        ..QResNetConfig::smoke()
    };
    let (_, net) = build(7, &strict);
    let eff = net.effective_weights().unwrap();
    assert_eq!(eff.len(), 9);
    for (name, w) in &eff {
        let levels = distinct(w);
        assert!(levels.len() <= 16, "{name}: {} levels", levels.len());
        assert!(levels.len() >= 2, "{name}");
        for v in levels {
            let j = (v + 1.0) * 7.5;
            assert!(
                (j - j.round()).abs() < 1e-4 && (-1e-4..=15.0001).contains(&j),
                "{name}: {v}"
            );
        }
    }
    // Faithful: integer multiples of 1/15, no clamp.
    let (_, net) = build(7, &QResNetConfig::smoke());
    for (name, w) in net.effective_weights().unwrap() {
        for v in distinct(&w) {
            assert!((v * 15.0 - (v * 15.0).round()).abs() < 1e-3, "{name}: {v}");
        }
    }
}

#[test]
fn gradients_reach_every_latent_conv_weight_and_the_head() {
    for mode in [WeightQuantMode::Faithful, WeightQuantMode::Strict] {
        let config = QResNetConfig {
            weight_mode: mode,
            ..QResNetConfig::smoke()
        };
        let (store, net) = build(8, &config);
        let labels = Tensor::new(&[0u32, 3, 7, 9], &DEV).unwrap();
        let loss = cross_entropy(&net.forward_t(&input(9, 4), true).unwrap(), &labels).unwrap();
        let grads = loss.backward().unwrap();
        let mut names = net.quantized_weight_names();
        names.extend(net.head_parameter_names().iter().cloned());
        for name in names {
            let var = store.get(&name).unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{mode:?}: no gradient for {name}"));
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{mode:?}: {name} gradient {norm}"
            );
        }
    }
}

#[test]
fn set_bits_changes_outputs_not_parameters() {
    let (store, mut net) = build(10, &QResNetConfig::smoke());
    let x = input(11, 4);
    let before = store.tensors().unwrap();
    let y4 = net.forward_t(&x, false).unwrap();
    net.set_bits(32, 32).unwrap();
    assert_eq!(
        (net.config().weight_bits, net.config().activation_bits),
        (32, 32)
    );
    assert_eq!(net.weight_quantizer().bits, 32);
    assert_eq!(net.weight_quantizer().mode, WeightQuantMode::Faithful);
    let y32 = net.forward_t(&x, false).unwrap();
    net.set_bits(8, 8).unwrap();
    let y8 = net.forward_t(&x, false).unwrap();
    assert!(max_abs_diff(&y4, &y32) > 1e-4);
    assert!(max_abs_diff(&y8, &y32) > 1e-6);
    // 8 bits is closer to full precision than 4 bits.
    assert!(max_abs_diff(&y8, &y32) < max_abs_diff(&y4, &y32));
    net.set_bits(4, 4).unwrap();
    assert_eq!(max_abs_diff(&net.forward_t(&x, false).unwrap(), &y4), 0.0);
    let after = store.tensors().unwrap();
    assert_eq!(before.len(), after.len());
    for ((n0, t0), (n1, t1)) in before.iter().zip(&after) {
        assert_eq!(n0, n1);
        assert_eq!(max_abs_diff(t0, t1), 0.0, "{n0} changed");
    }
}

#[test]
fn same_seed_same_outputs() {
    let x = input(12, 3);
    let run = |seed| {
        build(seed, &QResNetConfig::smoke())
            .1
            .forward_t(&x, true)
            .unwrap()
    };
    assert_eq!(max_abs_diff(&run(13), &run(13)), 0.0);
    assert!(max_abs_diff(&run(13), &run(14)) > 1e-6);
}

#[test]
fn sgd_reduces_the_loss_on_a_fixed_batch() {
    for bits in [4, 32] {
        let config = QResNetConfig {
            weight_bits: bits,
            activation_bits: bits,
            ..QResNetConfig::smoke()
        };
        let (store, net) = build(15, &config);
        let x = input(16, 8);
        let labels = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &DEV).unwrap();
        let params = SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        };
        let mut sgd = Sgd::new(store.trainable(), params).unwrap();
        let loss_at = |net: &QResNet| {
            cross_entropy(&net.forward_t(&x, true).unwrap(), &labels)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let first = loss_at(&net);
        for _ in 0..30 {
            let loss = cross_entropy(&net.forward_t(&x, true).unwrap(), &labels).unwrap();
            sgd.step(&loss.backward().unwrap()).unwrap();
        }
        let last = loss_at(&net);
        assert!(last < 0.8 * first, "{bits} bits: loss {first} → {last}");
    }
}

#[test]
fn bad_configuration_and_input_are_typed_errors() {
    let bad = [
        QResNetConfig {
            widths: [8, 0, 32],
            ..QResNetConfig::smoke()
        },
        QResNetConfig {
            in_channels: 0,
            ..QResNetConfig::smoke()
        },
        QResNetConfig {
            num_classes: 0,
            ..QResNetConfig::smoke()
        },
        QResNetConfig {
            weight_bits: 0,
            ..QResNetConfig::smoke()
        },
        QResNetConfig {
            weight_bits: 17,
            ..QResNetConfig::smoke()
        },
        QResNetConfig {
            activation_bits: 33,
            ..QResNetConfig::smoke()
        },
    ];
    for config in &bad {
        assert!(config.validate().is_err(), "{config:?}");
        let store = ParamStore::new(0);
        let err = QResNet::new(&store.root(&DEV), config).unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { .. }),
            "{config:?}: {err}"
        );
    }
    assert_eq!(QResNetConfig::default(), QResNetConfig::qresnet8());
    assert!(QResNetConfig::qresnet8().validate().is_ok());

    let (_, mut net) = build(0, &QResNetConfig::smoke());
    for (w, a) in [(0, 4), (4, 20), (64, 32)] {
        let err = net.set_bits(w, a).unwrap_err();
        assert!(matches!(err, Error::InvalidParameter { .. }));
    }
    // A failed set_bits leaves the network unchanged.
    assert_eq!(
        (net.config().weight_bits, net.config().activation_bits),
        (4, 4)
    );
    assert_eq!(net.activation_quantizer().bits, 4);

    let three_channel = Tensor::zeros((1, 3, 28, 28), candle_core::DType::F32, &DEV).unwrap();
    assert!(matches!(
        Error::from(net.forward_t(&three_channel, false).unwrap_err()),
        Error::ShapeMismatch { .. }
    ));
    let flat = Tensor::zeros((1, 784), candle_core::DType::F32, &DEV).unwrap();
    assert!(matches!(
        net.features_t(&flat, false).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
}
