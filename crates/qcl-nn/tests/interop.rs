//! candle-nn interop: qcl optimizers and schedules on a `VarMap`, the `ParamStore` ↔ `VarMap`
//! bridge, qcl layers as candle `Module`s with typed errors coming back through candle.

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use proptest::prelude::*;
use qcl_nn::layers::{BatchNorm2d, BatchNormConfig, Linear, WithMode};
use qcl_nn::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig, WeightDecay};
use qcl_nn::schedule::{LrSchedule, MultiStepLr};
use qcl_nn::{Init, ParamKind, ParamStore};
use qcl_tensor::{Error, Seed};

/// A store with one `N(0, 1)` parameter per shape, named `p0`, `p1`, ...
fn store_with(seed: u64, shapes: &[Vec<usize>]) -> ParamStore {
    let store = ParamStore::new(seed);
    let root = store.root(&Device::Cpu);
    for (i, shape) in shapes.iter().enumerate() {
        let normal = Init::Normal {
            mean: 0.0,
            std: 1.0,
        };
        root.param(&format!("p{i}"), shape.as_slice(), normal)
            .unwrap();
    }
    store
}

/// A separate `VarMap` holding copies of the store's trainable values under the same names.
fn var_map_copy(store: &ParamStore) -> VarMap {
    let varmap = VarMap::new();
    let mut data = varmap.data().lock().unwrap();
    for (name, var) in store.trainable() {
        data.insert(
            name,
            Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap(),
        );
    }
    drop(data);
    varmap
}

/// `Σ_i Σ (c_i·v_i² + d_i·v_i)` with fixed per-variable weights, the same graph for both paths.
fn loss(vars: &[(String, Var)], seed: u64) -> Tensor {
    let mut total: Option<Tensor> = None;
    for (name, var) in vars {
        let mut rng = Seed::new(seed).child_named(name).rng();
        let c = rng
            .uniform_tensor(var.shape().clone(), 0.1, 1.0, &Device::Cpu)
            .unwrap();
        let d = rng
            .normal_tensor(var.shape().clone(), 0.0, 1.0, &Device::Cpu)
            .unwrap();
        let v = var.as_tensor();
        let term = ((v.sqr().unwrap() * c).unwrap() + (v * d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        total = Some(match total {
            None => term,
            Some(t) => (t + term).unwrap(),
        });
    }
    total.unwrap()
}

fn bits(vars: &[(String, Var)]) -> Vec<(String, Vec<u32>)> {
    vars.iter()
        .map(|(n, v)| {
            let values = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.clone(), values.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// The sorted named variables of a `VarMap`.
fn sorted(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// One optimizer step of the candle-nn side, from a loss.
type CandleStep = Box<dyn FnMut(&Tensor)>;

fn shapes() -> impl Strategy<Value = Vec<Vec<usize>>> {
    prop::collection::vec(prop::collection::vec(1usize..4, 1..3), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Steps of qcl's SGD and Adam built from `varmap.all_vars()` / `&VarMap` and stepped
    /// through candle-nn's `Optimizer` trait equal the same steps over the `ParamStore`, bit for
    /// bit.
    #[test]
    fn var_map_steps_equal_param_store_steps(shapes in shapes(), seed in 0u64..1000, adam in any::<bool>()) {
        let store = store_with(seed, &shapes);
        let varmap = var_map_copy(&store);
        let sgd = SgdConfig { lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 1e-3, ..Default::default() };
        let adam_params = AdamConfig { lr: 0.01, weight_decay: WeightDecay::Decoupled(0.1), ..Default::default() };
        let (mut ours, mut theirs): (Box<dyn Optimizer>, CandleStep) = if adam {
            let mut candle_side = <Adam as candle_nn::Optimizer>::new(varmap.all_vars(), adam_params).unwrap();
            (
                Box::new(Adam::new(store.trainable(), adam_params).unwrap()),
                Box::new(move |l: &Tensor| candle_nn::Optimizer::backward_step(&mut candle_side, l).unwrap()),
            )
        } else {
            let mut candle_side = Sgd::from_var_map(&varmap, sgd).unwrap();
            (
                Box::new(Sgd::new(store.trainable(), sgd).unwrap()),
                Box::new(move |l: &Tensor| candle_nn::Optimizer::backward_step(&mut candle_side, l).unwrap()),
            )
        };
        for step in 0..3 {
            ours.backward_step(&loss(&store.trainable(), seed + step)).unwrap();
            theirs(&loss(&sorted(&varmap), seed + step));
        }
        prop_assert_eq!(bits(&store.trainable()), bits(&sorted(&varmap)));
    }
}

#[test]
fn var_map_optimizers_skip_integer_variables_and_name_them_sorted() {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for name in ["z", "a", "m"] {
            data.insert(
                name.into(),
                Var::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            );
        }
        data.insert(
            "steps".into(),
            Var::zeros(1, DType::U32, &Device::Cpu).unwrap(),
        );
    }
    let mut sgd = Sgd::from_var_map(
        &varmap,
        SgdConfig {
            lr: 0.1,
            momentum: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let total = varmap
        .all_vars()
        .iter()
        .filter(|v| v.dtype().is_float())
        .map(|v| v.as_tensor().sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    Optimizer::backward_step(&mut sgd, &total).unwrap();
    let state = sgd.state().unwrap();
    let names: Vec<&String> = state.tensors.keys().collect();
    assert_eq!(names, ["momentum.a", "momentum.m", "momentum.z"]);
}

#[test]
fn a_schedule_drives_candle_and_qcl_optimizers() {
    let schedule = MultiStepLr::new(0.1, vec![2, 4], 0.1).unwrap();
    let mut adamw =
        <candle_nn::AdamW as candle_nn::Optimizer>::new(vec![], candle_nn::ParamsAdamW::default())
            .unwrap();
    let mut sgd = <Sgd as candle_nn::Optimizer>::new(vec![], SgdConfig::default()).unwrap();
    for t in 0..6 {
        let lr = schedule.apply(t, &mut adamw);
        assert_eq!(schedule.apply(t, &mut sgd), lr);
        assert_eq!(
            candle_nn::Optimizer::learning_rate(&adamw),
            schedule.lr_at(t)
        );
        assert_eq!(Optimizer::learning_rate(&sgd), schedule.lr_at(t));
    }
}

#[test]
fn the_var_map_shares_the_store_variables_both_ways() {
    let store = ParamStore::new(5);
    let root = store.root(&Device::Cpu);
    let w = root.pp("fc").param("weight", (2, 3), Init::Ones).unwrap();
    let rm = root
        .pp("bn")
        .buffer("running_mean", 3, Init::Zeros)
        .unwrap();
    let varmap = store.var_map();
    // Created later through the store: visible in the map taken before.
    root.pp("fc").param("bias", 2, Init::Zeros).unwrap();
    assert_eq!(varmap.all_vars().len(), 3);
    // A write through the map is a write to the store's variable.
    let mut handle = varmap.clone();
    handle
        .set_one(
            "fc.weight",
            Tensor::full(2f32, (2, 3), &Device::Cpu).unwrap(),
        )
        .unwrap();
    assert_eq!(w.to_vec2::<f32>().unwrap(), vec![vec![2.0; 3]; 2]);
    // A variable added to the map by candle-nn is a trainable parameter of the store.
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _head = candle_nn::linear_no_bias(3, 4, vb.pp("head")).unwrap();
    let trainable: Vec<String> = store.trainable().into_iter().map(|(n, _)| n).collect();
    assert_eq!(trainable, ["fc.bias", "fc.weight", "head.weight"]);
    let buffers = store.buffers();
    assert_eq!(buffers.len(), 1);
    assert_eq!(buffers[0].0, "bn.running_mean");
    assert_eq!(store.kind("bn.running_mean"), Some(ParamKind::Buffer));
    rm.set(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(
        store
            .get("bn.running_mean")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1.0; 3]
    );
    // And the other way: a store over an existing map sees its variables.
    let wrapped = ParamStore::from_var_map(varmap, 0);
    assert_eq!(wrapped.len(), 4);
    assert_eq!(wrapped.trainable().len(), 4); // the map knows no buffers
}

#[test]
fn var_builder_layers_are_seeded_by_name_and_reuse_stored_variables() {
    let a = ParamStore::new(11);
    let b = ParamStore::new(11);
    let c = ParamStore::new(12);
    let make =
        |s: &ParamStore| candle_nn::linear(6, 3, s.var_builder(&Device::Cpu).pp("enc")).unwrap();
    let x = Tensor::ones((2, 6), DType::F32, &Device::Cpu).unwrap();
    let (ya, yb, yc) = (
        make(&a).forward(&x).unwrap().to_vec2::<f32>().unwrap(),
        make(&b).forward(&x).unwrap().to_vec2::<f32>().unwrap(),
        make(&c).forward(&x).unwrap().to_vec2::<f32>().unwrap(),
    );
    assert_eq!(ya, yb);
    assert_ne!(ya, yc);
    // candle-nn's hints are honoured: the bias is drawn from U(±1/√fan_in).
    let b = a
        .get("enc.bias")
        .unwrap()
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert!(b.iter().all(|v| v.abs() <= 1.0 / 6f32.sqrt()), "{b:?}");
    // Building again returns the same variables, not fresh ones.
    let again = make(&a).forward(&x).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(again, ya);
    assert_eq!(a.len(), 2);
    // A name the store holds as a buffer is refused with a typed error.
    a.root(&Device::Cpu)
        .buffer("stats", 3, Init::Zeros)
        .unwrap();
    let err = a.var_builder(&Device::Cpu).get(3, "stats").unwrap_err();
    assert_eq!(Error::from(err).kind(), "invalid_parameter");
}

#[test]
fn qcl_layers_run_inside_candle_sequential_and_errors_come_back_typed() {
    let store = ParamStore::new(0);
    let root = store.root(&Device::Cpu);
    let fc = Linear::new(&root.pp("fc"), 4, 3, true).unwrap();
    let bn = BatchNorm2d::new(&root.pp("bn"), 3, BatchNormConfig::default()).unwrap();
    let net = candle_nn::seq()
        .add(fc.clone())
        .add(candle_nn::Activation::Relu)
        .add(|x: &Tensor| x.unsqueeze(2)?.unsqueeze(3))
        .add(WithMode::eval(bn.clone()));
    let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    let y = net.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 1, 1]);
    // Same values as calling the layers one by one.
    let direct = bn
        .forward_t(
            &fc.forward(&x)
                .unwrap()
                .relu()
                .unwrap()
                .unsqueeze(2)
                .unwrap()
                .unsqueeze(3)
                .unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        direct.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // A shape error raised by qcl's Linear inside candle's Sequential is qcl's typed error.
    let bad = Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap();
    match Error::from(net.forward(&bad).unwrap_err()) {
        Error::ShapeMismatch {
            context, actual, ..
        } => {
            assert_eq!(context, "linear input");
            assert_eq!(actual, vec![2, 5]);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}
