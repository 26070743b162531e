//! The quantizer as a candle-nn layer: built from a `VarBuilder` it equals the `ParamStore`
//! path bit for bit, takes any `[.., C]` input (equal to the reshaped 2-D call), keeps its EMA
//! state out of the user's optimizer, and sits inside `candle_nn::seq()`.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use proptest::prelude::*;
use qcl_nn::layers::WithMode;
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Seed};
use qcl_vq::{ChannelAxis, CodebookUpdate, ResidualVq, VectorQuantizer, VectorQuantizerConfig};

const DEV: Device = Device::Cpu;

fn bits(t: &Tensor) -> Vec<u32> {
    qcl_tensor::f32_bits(t).unwrap()
}

fn indices(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every state variable of a quantizer, as raw bits (steps as its value).
fn state(vq: &VectorQuantizer) -> Vec<Vec<u32>> {
    let mut s = vec![
        bits(&vq.codebook().unwrap()),
        bits(&vq.counts().unwrap()),
        vec![vq.steps().unwrap() as u32],
    ];
    if let Some(sums) = vq.sums().unwrap() {
        s.push(bits(&sums));
    }
    s
}

fn normal(seed: u64, shape: &[usize]) -> Tensor {
    Seed::new(seed)
        .rng()
        .normal_tensor(shape, 0.0, 1.0, &DEV)
        .unwrap()
}

fn var_map_quantizer(config: VectorQuantizerConfig) -> (VarMap, VectorQuantizer) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let vq = VectorQuantizer::new(config, vb.pp("vq")).unwrap();
    (varmap, vq)
}

/// The same quantizer built both ways, the candle-nn one given the qcl one's codebook.
fn twins(config: &VectorQuantizerConfig) -> (VectorQuantizer, VarMap, VectorQuantizer) {
    let store = ParamStore::new(9);
    let ours =
        VectorQuantizer::from_param_path(&store.root(&DEV).pp("vq"), config.clone()).unwrap();
    let (varmap, mut theirs) = var_map_quantizer(config.clone());
    theirs.set_codebook(&ours.codebook().unwrap()).unwrap();
    assert_eq!(state(&ours), state(&theirs));
    (ours, varmap, theirs)
}

#[test]
fn the_candle_nn_path_equals_the_param_store_path() {
    let configs = [
        VectorQuantizerConfig {
            codebooks: 2,
            dead_code_threshold: Some(0.5),
            update: CodebookUpdate::Ema {
                decay: 0.6,
                eps: 1e-5,
            },
            ..VectorQuantizerConfig::new(6, 8)
        },
        VectorQuantizerConfig {
            kmeans_init: true,
            ..VectorQuantizerConfig::new(6, 8)
        },
        VectorQuantizerConfig {
            update: CodebookUpdate::Gradient,
            dead_code_threshold: Some(0.2),
            ..VectorQuantizerConfig::new(6, 4)
        },
    ];
    for config in configs {
        let (ours, _varmap, theirs) = twins(&config);
        for step in 0..4 {
            let x = normal(step, &[3, 6, 4, 4]);
            let a = ours.quantize(&x, true).unwrap();
            let z = theirs.forward_t(&x, true).unwrap();
            let b = theirs.last_output().unwrap();
            assert_eq!(bits(&a.quantized), bits(&z), "{config:?} step {step}");
            assert_eq!(indices(&a.indices), indices(&b.indices));
            assert_eq!(bits(&a.loss), bits(&b.loss));
            assert_eq!(a.stats.batch.counts(), b.stats.batch.counts());
            assert_eq!(a.stats.revived_codes, b.stats.revived_codes);
            assert_eq!(state(&ours), state(&theirs), "{config:?} step {step}");
        }
    }
}

#[test]
fn state_lives_in_the_var_map_and_is_reused_from_it() {
    let config = VectorQuantizerConfig::new(4, 8);
    let (varmap, vq) = var_map_quantizer(config.clone());
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["vq.codebook", "vq.counts", "vq.steps", "vq.sums"]);
    vq.quantize(&normal(1, &[5, 4]), true).unwrap();
    // The map's variables are the layer's: the update is visible there.
    let steps = varmap.data().lock().unwrap()["vq.steps"]
        .as_tensor()
        .to_vec1::<u32>()
        .unwrap();
    assert_eq!(steps, vec![1]);
    let in_map = varmap.data().lock().unwrap()["vq.codebook"]
        .as_tensor()
        .clone();
    assert_eq!(bits(&in_map), bits(&vq.codebook().unwrap()));
    // A second layer over the same map reuses the state (a checkpoint loaded into the map).
    let again = VectorQuantizer::new(
        config,
        VarBuilder::from_varmap(&varmap, DType::F32, &DEV).pp("vq"),
    )
    .unwrap();
    assert_eq!(state(&again), state(&vq));
    // The store's seeded builder draws the same codebook as the ParamPath constructor.
    let a = ParamStore::new(4);
    let b = ParamStore::new(4);
    let from_path =
        VectorQuantizer::from_param_path(&a.root(&DEV).pp("vq"), VectorQuantizerConfig::new(4, 8))
            .unwrap();
    let from_vb = VectorQuantizer::new(
        VectorQuantizerConfig::new(4, 8),
        b.var_builder(&DEV).pp("vq"),
    )
    .unwrap();
    assert_eq!(state(&from_path), state(&from_vb));
}

#[test]
fn adamw_over_the_var_map_leaves_ema_state_alone() {
    for update in [
        CodebookUpdate::default(),
        CodebookUpdate::Frozen,
        CodebookUpdate::Gradient,
    ] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
        let enc = candle_nn::linear(5, 4, vb.pp("enc")).unwrap();
        let config = VectorQuantizerConfig {
            update,
            ..VectorQuantizerConfig::new(4, 8)
        };
        let vq = VectorQuantizer::new(config, vb.pp("vq")).unwrap();
        let dec = candle_nn::linear(4, 5, vb.pp("dec")).unwrap();
        // candle-nn's AdamW decays every variable it steps by 1% (its default weight decay).
        let mut opt =
            candle_nn::AdamW::new(varmap.all_vars(), candle_nn::ParamsAdamW::default()).unwrap();
        let x = normal(3, &[16, 5]);
        let z = vq.forward_t(&enc.forward(&x).unwrap(), true).unwrap();
        let recon = dec.forward(&z).unwrap();
        let loss = ((recon - &x).unwrap().sqr().unwrap().mean_all().unwrap()
            + vq.last_loss().unwrap())
        .unwrap();
        let after_forward = state(&vq);
        let enc_before = bits(enc.weight());
        let grads = loss.backward().unwrap();
        let codebook_var = varmap.data().lock().unwrap()["vq.codebook"].clone();
        assert_eq!(
            grads.get(codebook_var.as_tensor()).is_some(),
            update == CodebookUpdate::Gradient
        );
        opt.step(&grads).unwrap();
        assert_ne!(bits(enc.weight()), enc_before, "the encoder trains");
        let after_step = state(&vq);
        if update == CodebookUpdate::Gradient {
            assert_ne!(
                after_step[0], after_forward[0],
                "a gradient-mode codebook is the optimizer's"
            );
            assert_eq!(after_step[1..], after_forward[1..]);
        } else {
            assert_eq!(
                after_step, after_forward,
                "{update:?}: AdamW moved the quantizer's state"
            );
        }
    }
}

#[test]
fn two_dimensional_rows_and_sequences_agree() {
    let config = VectorQuantizerConfig {
        codebooks: 2,
        ..VectorQuantizerConfig::new(6, 8)
    };
    let (_m1, rows) = var_map_quantizer(config.clone());
    let (_m2, seq) = var_map_quantizer(config);
    let mut seq = seq;
    seq.set_codebook(&rows.codebook().unwrap()).unwrap();
    let x = normal(5, &[7, 6]);
    let a = rows.quantize(&x, true).unwrap();
    let b = seq.quantize(&x.unsqueeze(0).unwrap(), true).unwrap();
    assert_eq!(a.indices.dims(), &[7, 2]);
    assert_eq!(indices(&a.indices), indices(&b.indices));
    assert_eq!(bits(&a.quantized), bits(&b.quantized));
    assert_eq!(state(&rows), state(&seq));
    // Decoding the 2-D indices gives the 2-D values back.
    assert_eq!(rows.decode(&a.indices).unwrap().dims(), &[7, 6]);
}

#[test]
fn channels_first_sequences_equal_their_transpose() {
    let first = VectorQuantizerConfig {
        channel_axis: ChannelAxis::ChannelsFirst,
        ..VectorQuantizerConfig::new(4, 8)
    };
    let last = VectorQuantizerConfig {
        channel_axis: ChannelAxis::ChannelsLast,
        ..first.clone()
    };
    let (_m1, a) = var_map_quantizer(first);
    let (_m2, mut b) = var_map_quantizer(last);
    b.set_codebook(&a.codebook().unwrap()).unwrap();
    let x = normal(8, &[2, 4, 5]); // (B, C, L)
    let oa = a.quantize(&x, true).unwrap();
    let xt = x.transpose(1, 2).unwrap().contiguous().unwrap(); // (B, L, C)
    let ob = b.quantize(&xt, true).unwrap();
    assert_eq!(oa.indices.dims(), &[2, 1, 5]);
    let ia = oa.indices.transpose(1, 2).unwrap().contiguous().unwrap();
    assert_eq!(indices(&ia), indices(&ob.indices));
    let qa = oa.quantized.transpose(1, 2).unwrap().contiguous().unwrap();
    assert_eq!(bits(&qa), bits(&ob.quantized));
    assert_eq!(state(&a), state(&b));
    // A 4-D channels-last input needs the knob: under Auto its axis 1 is the channel axis.
    let (_m3, auto) = var_map_quantizer(VectorQuantizerConfig::new(4, 8));
    let nhwc = normal(2, &[2, 3, 3, 4]);
    assert_eq!(
        Error::from(auto.forward_t(&nhwc, false).unwrap_err()).kind(),
        "shape_mismatch"
    );
    assert_eq!(
        b.quantize(&nhwc, false).unwrap().indices.dims(),
        &[2, 3, 3, 1]
    );
}

#[test]
fn the_quantizer_sits_inside_candle_sequential() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let vq = VectorQuantizer::new(VectorQuantizerConfig::new(3, 4), vb.pp("vq")).unwrap();
    let model = candle_nn::seq()
        .add(candle_nn::linear(8, 3, vb.pp("enc")).unwrap())
        .add(WithMode::train(vq.clone()))
        .add(candle_nn::linear(3, 8, vb.pp("dec")).unwrap());
    let y = model.forward(&normal(0, &[10, 8])).unwrap();
    assert_eq!(y.dims(), &[10, 8]);
    assert_eq!(
        vq.steps().unwrap(),
        1,
        "the clone in the model shares the state"
    );
    assert_eq!(vq.last_output().unwrap().indices.dims(), &[10, 1]);
    // Residual VQ too.
    let rvq = ResidualVq::uniform(&VectorQuantizerConfig::new(3, 4), 2, vb.pp("rvq")).unwrap();
    let z = rvq.forward_t(&normal(1, &[6, 3]), false).unwrap();
    assert_eq!(z.dims(), &[6, 3]);
    assert_eq!(rvq.last_output().unwrap().stages.len(), 2);
}

/// A shape with `c` on the channel axis of `axis` (rank 1 to 5; rank 4 with `Auto` is
/// channels-first).
fn shape_strategy() -> impl Strategy<Value = (Vec<usize>, usize, ChannelAxis)> {
    let axis = prop_oneof![
        Just(ChannelAxis::Auto),
        Just(ChannelAxis::ChannelsFirst),
        Just(ChannelAxis::ChannelsLast)
    ];
    (
        prop::collection::vec(1usize..4, 0..4),
        1usize..3,
        1usize..3,
        axis,
    )
        .prop_map(|(others, n, d, axis)| {
            let c = n * d;
            let rank = others.len() + 1;
            let a = axis.resolve(rank).unwrap();
            let mut dims = others;
            dims.insert(a, c);
            (dims, n, axis)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any input equals the same vectors as rows `[M, C]` (channel axis moved last, then
    /// flattened): same indices, values and EMA update.
    #[test]
    fn any_shape_equals_the_reshaped_rows((dims, n, axis) in shape_strategy(), seed in 0u64..1000, train in any::<bool>()) {
        let a = axis.resolve(dims.len()).unwrap();
        let c = dims[a];
        let config = VectorQuantizerConfig {
            codebooks: n,
            channel_axis: axis,
            dead_code_threshold: Some(0.3),
            ..VectorQuantizerConfig::new(c, 5)
        };
        let (_m1, any) = var_map_quantizer(config.clone());
        let (_m2, mut rows) = var_map_quantizer(VectorQuantizerConfig { channel_axis: ChannelAxis::ChannelsLast, ..config });
        rows.set_codebook(&any.codebook().unwrap()).unwrap();
        let x = normal(seed, &dims);
        // The channel axis moved last (the other axes in order), then flattened to rows.
        let to_rows = |t: &Tensor, width: usize| -> Tensor {
            if a + 1 == t.rank() {
                t.reshape(((), width)).unwrap()
            } else {
                let mut order: Vec<usize> = (0..t.rank()).filter(|&i| i != a).collect();
                order.push(a);
                let p = t.permute(order).unwrap().contiguous().unwrap();
                p.reshape(((), width)).unwrap()
            }
        };
        let out = any.quantize(&x, train).unwrap();
        let flat = rows.quantize(&to_rows(&x, c), train).unwrap();
        prop_assert_eq!(out.indices.dims().len(), dims.len());
        prop_assert_eq!(indices(&to_rows(&out.indices, n)), indices(&flat.indices));
        prop_assert_eq!(bits(&to_rows(&out.quantized, c)), bits(&flat.quantized));
        prop_assert_eq!(bits(&out.loss), bits(&flat.loss));
        prop_assert_eq!(state(&any), state(&rows));
        if !train {
            // (Training moves the codebook after the forward value is taken.)
            prop_assert_eq!(bits(&any.decode(&out.indices).unwrap()), bits(&out.quantized));
        }
    }
}
