//! SGD and Adam against hand-written f64 textbook updates, state round trips, validation.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use qcl_nn::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig, WeightDecay};
use qcl_nn::{Init, ParamStore};
use qcl_tensor::{Error, Result, Seed};

/// A store with one `N(0, 1)` parameter per size, named `p0`, `p1`, ...
fn store_with(seed: u64, sizes: &[usize]) -> ParamStore {
    let store = ParamStore::new(seed);
    let root = store.root(&Device::Cpu);
    for (i, &size) in sizes.iter().enumerate() {
        root.param(
            &format!("p{i}"),
            size,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )
        .unwrap();
    }
    store
}

fn values(var: &Var) -> Vec<f64> {
    var.as_tensor()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(store: &ParamStore) -> Vec<Vec<u32>> {
    store
        .trainable()
        .iter()
        .map(|(_, v)| qcl_tensor::f32_bits(v.as_tensor()).unwrap())
        .collect()
}

/// Gradients of step `step`: `N(0, 1)` values, and for each parameter whether it has one
/// (about a quarter of them have none when `allow_missing`).
fn gradients(seed: u64, step: u64, sizes: &[usize], allow_missing: bool) -> Vec<Option<Vec<f32>>> {
    let mut rng = Seed::new(seed).child(1000 + step).rng();
    sizes
        .iter()
        .map(|&size| {
            let missing = allow_missing && rng.uniform() < 0.25;
            let g = rng.normal_vec(size, 0.0, 1.0);
            (!missing).then_some(g)
        })
        .collect()
}

fn grad_store(vars: &[(String, Var)], grads: &[Option<Vec<f32>>]) -> GradStore {
    let mut store = GradStore::default();
    for ((_, var), g) in vars.iter().zip(grads) {
        if let Some(g) = g {
            let t = Tensor::from_vec(g.clone(), var.dims(), &Device::Cpu).unwrap();
            store.insert(var.as_tensor(), t);
        }
    }
    store
}

/// Textbook SGD (PyTorch semantics) in f64.
struct ReferenceSgd {
    p: SgdConfig,
    buffers: Vec<Option<Vec<f64>>>,
}

impl ReferenceSgd {
    fn step(&mut self, params: &mut [Vec<f64>], grads: &[Option<Vec<f32>>]) {
        let SgdConfig {
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } = self.p;
        for ((p, grad), buf) in params.iter_mut().zip(grads).zip(&mut self.buffers) {
            let Some(grad) = grad else { continue };
            let mut g: Vec<f64> = grad
                .iter()
                .zip(p.iter())
                .map(|(&g, &w)| f64::from(g) + weight_decay * w)
                .collect();
            if momentum != 0.0 {
                let b = match buf.take() {
                    None => g.clone(),
                    Some(b) => b
                        .iter()
                        .zip(&g)
                        .map(|(b, g)| momentum * b + (1.0 - dampening) * g)
                        .collect(),
                };
                g = if nesterov {
                    g.iter().zip(&b).map(|(g, b)| g + momentum * b).collect()
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            for (w, g) in p.iter_mut().zip(g) {
                *w -= lr * g;
            }
        }
    }
}

/// Textbook Adam / AdamW in f64, with per-parameter step counts.
struct ReferenceAdam {
    p: AdamConfig,
    state: Vec<(u64, Vec<f64>, Vec<f64>)>,
}

impl ReferenceAdam {
    fn step(&mut self, params: &mut [Vec<f64>], grads: &[Option<Vec<f32>>]) {
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.p;
        for ((p, grad), (t, m, v)) in params.iter_mut().zip(grads).zip(&mut self.state) {
            let Some(grad) = grad else { continue };
            *t += 1;
            for i in 0..p.len() {
                let mut g = f64::from(grad[i]);
                match weight_decay {
                    WeightDecay::None => {}
                    WeightDecay::L2(wd) => g += wd * p[i],
                    WeightDecay::Decoupled(wd) => p[i] -= lr * wd * p[i],
                }
                m[i] = beta1 * m[i] + (1.0 - beta1) * g;
                v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
                let m_hat = m[i] / (1.0 - beta1.powi(*t as i32));
                let v_hat = v[i] / (1.0 - beta2.powi(*t as i32));
                p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
    }
}

fn assert_close(
    actual: &[Vec<f64>],
    expected: &[Vec<f64>],
    context: &str,
) -> std::result::Result<(), TestCaseError> {
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        for (j, (a, e)) in a.iter().zip(e).enumerate() {
            prop_assert!(
                (a - e).abs() <= 1e-5,
                "{context}: p{i}[{j}] = {a}, textbook {e}"
            );
        }
    }
    Ok(())
}

fn sgd_params() -> impl Strategy<Value = SgdConfig> {
    (
        0.0..0.2f64,
        prop_oneof![Just(0.0), 0.0..0.95f64],
        prop_oneof![Just(0.0), 0.0..0.5f64],
        any::<bool>(),
        prop_oneof![Just(0.0), 0.0..0.1f64],
    )
        .prop_map(|(lr, momentum, dampening, nesterov, weight_decay)| {
            // Nesterov needs momentum and no dampening; keep the combination valid.
            let nesterov = nesterov && momentum > 0.0;
            SgdConfig {
                lr,
                momentum,
                dampening: if nesterov { 0.0 } else { dampening },
                nesterov,
                weight_decay,
            }
        })
}

fn adam_params() -> impl Strategy<Value = AdamConfig> {
    (
        1e-4..0.1f64,
        0.0..0.99f64,
        0.9..0.9999f64,
        prop_oneof![Just(1e-8), 1e-8..1e-3f64],
        prop_oneof![
            Just(WeightDecay::None),
            (0.0..0.1f64).prop_map(WeightDecay::L2),
            (0.0..0.1f64).prop_map(WeightDecay::Decoupled),
        ],
    )
        .prop_map(|(lr, beta1, beta2, eps, weight_decay)| AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sgd_matches_the_textbook_update(
        seed in any::<u64>(),
        sizes in prop::collection::vec(1usize..6, 1..4),
        steps in 1u64..7,
        params in sgd_params(),
    ) {
        let store = store_with(seed, &sizes);
        let vars = store.trainable();
        let mut expected: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
        let mut reference = ReferenceSgd { p: params, buffers: vec![None; sizes.len()] };
        let mut sgd = Sgd::new(vars.clone(), params).unwrap();
        for step in 0..steps {
            let grads = gradients(seed, step, &sizes, true);
            sgd.step(&grad_store(&vars, &grads)).unwrap();
            reference.step(&mut expected, &grads);
            let actual: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
            assert_close(&actual, &expected, &format!("{params:?}, step {step}"))?;
        }
        prop_assert_eq!(sgd.steps_taken(), steps);
    }

    #[test]
    fn adam_matches_the_textbook_update(
        seed in any::<u64>(),
        sizes in prop::collection::vec(1usize..6, 1..4),
        steps in 1u64..7,
        params in adam_params(),
    ) {
        let store = store_with(seed, &sizes);
        let vars = store.trainable();
        let mut expected: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
        let mut reference = ReferenceAdam {
            p: params,
            state: sizes.iter().map(|&n| (0, vec![0.0; n], vec![0.0; n])).collect(),
        };
        let mut adam = Adam::new(vars.clone(), params).unwrap();
        for step in 0..steps {
            let grads = gradients(seed, step, &sizes, true);
            adam.step(&grad_store(&vars, &grads)).unwrap();
            reference.step(&mut expected, &grads);
            let actual: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
            assert_close(&actual, &expected, &format!("{params:?}, step {step}"))?;
        }
    }

    #[test]
    fn sgd_state_round_trip_continues_identically(
        seed in any::<u64>(),
        sizes in prop::collection::vec(1usize..6, 1..4),
        before in 0u64..4,
        after in 1u64..4,
        params in sgd_params(),
    ) {
        let other = SgdConfig { lr: 0.5, momentum: 0.1, ..Default::default() };
        state_round_trip(seed, &sizes, before, after,
            |vars| Ok(Box::new(Sgd::new(vars, params)?)),
            |vars| Ok(Box::new(Sgd::new(vars, other)?)))?;
    }

    #[test]
    fn adam_state_round_trip_continues_identically(
        seed in any::<u64>(),
        sizes in prop::collection::vec(1usize..6, 1..4),
        before in 0u64..4,
        after in 1u64..4,
        params in adam_params(),
    ) {
        state_round_trip(seed, &sizes, before, after,
            |vars| Ok(Box::new(Adam::new(vars, params)?)),
            |vars| Ok(Box::new(Adam::new(vars, AdamConfig::default())?)))?;
    }
}

type MakeOptimizer<'a> = &'a dyn Fn(Vec<(String, Var)>) -> Result<Box<dyn Optimizer>>;

/// Trains `before` steps, saves the state, restores it into a fresh optimizer (built with
/// other hyperparameters) over a copy of the parameters, then checks that `after` more steps
/// give the same bits on both.
fn state_round_trip(
    seed: u64,
    sizes: &[usize],
    before: u64,
    after: u64,
    make: impl Fn(Vec<(String, Var)>) -> Result<Box<dyn Optimizer>>,
    make_other: impl Fn(Vec<(String, Var)>) -> Result<Box<dyn Optimizer>>,
) -> std::result::Result<(), TestCaseError> {
    let (make, make_other): (MakeOptimizer, MakeOptimizer) = (&make, &make_other);
    let store = store_with(seed, sizes);
    let mut original = make(store.trainable()).unwrap();
    for step in 0..before {
        let grads = gradients(seed, step, sizes, true);
        original
            .step(&grad_store(&store.trainable(), &grads))
            .unwrap();
    }
    let state = original.state().unwrap();

    let copy = store_with(seed.wrapping_add(1), sizes);
    let tensors: BTreeMap<String, Tensor> = store.tensors().unwrap().into_iter().collect();
    copy.load_tensors(&tensors, std::path::Path::new("memory"))
        .unwrap();
    let mut resumed = make_other(copy.trainable()).unwrap();
    resumed.load_state(&state).unwrap();
    prop_assert_eq!(resumed.steps_taken(), before);
    prop_assert_eq!(resumed.learning_rate(), original.learning_rate());

    for step in before..before + after {
        let grads = gradients(seed, step, sizes, true);
        original
            .step(&grad_store(&store.trainable(), &grads))
            .unwrap();
        resumed
            .step(&grad_store(&copy.trainable(), &grads))
            .unwrap();
    }
    prop_assert_eq!(bits(&store), bits(&copy));
    Ok(())
}

#[test]
fn parameters_without_gradient_are_not_touched() -> Result<()> {
    let store = store_with(3, &[4, 2]);
    let vars = store.trainable();
    let before: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
    let mut sgd = Sgd::new(
        vars.clone(),
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.1,
            ..Default::default()
        },
    )?;
    let grads = vec![None, Some(vec![1.0, -1.0])];
    sgd.step(&grad_store(&vars, &grads))?;
    assert_eq!(values(&vars[0].1), before[0]);
    assert_ne!(values(&vars[1].1), before[1]);
    let state = sgd.state()?;
    assert_eq!(
        state.tensors.keys().collect::<Vec<_>>(),
        vec!["momentum.p1"],
        "no momentum buffer for a parameter never updated"
    );
    Ok(())
}

#[test]
fn adam_counts_steps_per_parameter() -> Result<()> {
    let store = store_with(4, &[3, 3]);
    let vars = store.trainable();
    let mut adam = Adam::new(vars.clone(), AdamConfig::default())?;
    adam.step(&grad_store(&vars, &[Some(vec![1.0; 3]), None]))?;
    adam.step(&grad_store(
        &vars,
        &[Some(vec![1.0; 3]), Some(vec![1.0; 3])],
    ))?;
    let state = adam.state()?;
    assert_eq!(state.scalars["step.p0"], 2.0);
    assert_eq!(state.scalars["step.p1"], 1.0);
    assert_eq!(state.scalars["steps"], 2.0);
    Ok(())
}

#[test]
fn adam_default_has_no_weight_decay() {
    let p = AdamConfig::default();
    assert_eq!(p.weight_decay, WeightDecay::None);
    assert_eq!((p.lr, p.beta1, p.beta2, p.eps), (1e-3, 0.9, 0.999, 1e-8));
}

#[test]
fn backward_step_trains_through_autograd() -> Result<()> {
    let store = ParamStore::new(0);
    let w = store.root(&Device::Cpu).param("w", 2, Init::Const(2.0))?;
    let mut sgd = Sgd::new(
        store.trainable(),
        SgdConfig {
            lr: 0.25,
            ..Default::default()
        },
    )?;
    // d/dw sum(w²) = 2w = 4, so w = 2 − 0.25·4 = 1.
    sgd.backward_step(&w.sqr()?.sum_all()?)?;
    assert_eq!(w.to_vec1::<f32>()?, vec![1.0, 1.0]);
    Ok(())
}

#[test]
fn bad_hyperparameters_are_invalid_parameter_errors() {
    let vars = || store_with(0, &[2]).trainable();
    let bad_sgd = [
        SgdConfig {
            lr: -0.1,
            ..Default::default()
        },
        SgdConfig {
            lr: f64::NAN,
            ..Default::default()
        },
        SgdConfig {
            momentum: -0.9,
            ..Default::default()
        },
        SgdConfig {
            weight_decay: -1e-4,
            ..Default::default()
        },
        SgdConfig {
            dampening: f64::INFINITY,
            ..Default::default()
        },
        SgdConfig {
            nesterov: true,
            ..Default::default()
        },
        SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        },
    ];
    for p in bad_sgd {
        let err = Sgd::new(vars(), p).unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { .. }),
            "{p:?}: {err}"
        );
    }
    let bad_adam = [
        AdamConfig {
            lr: -1e-3,
            ..Default::default()
        },
        AdamConfig {
            beta1: 1.0,
            ..Default::default()
        },
        AdamConfig {
            beta2: -0.1,
            ..Default::default()
        },
        AdamConfig {
            eps: -1e-8,
            ..Default::default()
        },
        AdamConfig {
            weight_decay: WeightDecay::L2(-0.1),
            ..Default::default()
        },
        AdamConfig {
            weight_decay: WeightDecay::Decoupled(f64::NAN),
            ..Default::default()
        },
    ];
    for p in bad_adam {
        let err = Adam::new(vars(), p).unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { .. }),
            "{p:?}: {err}"
        );
    }
    let mut twice = vars();
    twice.push(twice[0].clone());
    assert!(matches!(
        Sgd::new(twice, SgdConfig::default()),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn gradient_of_the_wrong_shape_is_a_shape_mismatch() -> Result<()> {
    let store = store_with(0, &[3]);
    let vars = store.trainable();
    let mut grads = GradStore::default();
    grads.insert(
        vars[0].1.as_tensor(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?,
    );
    let mut adam = Adam::new(vars, AdamConfig::default())?;
    assert!(matches!(
        adam.step(&grads),
        Err(Error::ShapeMismatch { .. })
    ));
    Ok(())
}

#[test]
fn load_state_refuses_other_kinds_names_and_shapes_and_changes_nothing() -> Result<()> {
    let store = store_with(5, &[3, 2]);
    let vars = store.trainable();
    let momentum = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    let mut sgd = Sgd::new(vars.clone(), momentum)?;
    sgd.step(&grad_store(
        &vars,
        &[Some(vec![1.0; 3]), Some(vec![1.0; 2])],
    ))?;
    let good = sgd.state()?;

    let mut adam = Adam::new(vars.clone(), AdamConfig::default())?;
    let err = adam.load_state(&good).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    assert!(err.to_string().contains("sgd"), "{err}");

    // A state over a parameter this optimizer does not hold.
    let mut fewer = Sgd::new(vars[..1].to_vec(), momentum)?;
    let err = fewer.load_state(&good).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    assert!(err.to_string().contains("p1"), "{err}");
    assert_eq!(fewer.steps_taken(), 0, "nothing changes on failure");

    // A buffer of the wrong shape.
    let mut wrong = good.clone();
    wrong.tensors.insert(
        "momentum.p0".into(),
        Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu)?,
    );
    let mut fresh = Sgd::new(vars.clone(), momentum)?;
    let err = fresh.load_state(&wrong).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert_eq!(fresh.steps_taken(), 0);

    // An unknown buffer and a missing scalar.
    let mut unknown = good.clone();
    let t = unknown.tensors["momentum.p0"].clone();
    unknown.tensors.insert("velocity.p0".into(), t);
    assert!(matches!(
        fresh.load_state(&unknown),
        Err(Error::InvalidParameter { .. })
    ));
    let mut no_lr = good.clone();
    no_lr.scalars.remove("lr");
    assert!(matches!(
        fresh.load_state(&no_lr),
        Err(Error::InvalidParameter { .. })
    ));

    // Adam: moments without their step count.
    adam.step(&grad_store(&vars, &[Some(vec![1.0; 3]), None]))?;
    let mut partial = adam.state()?;
    partial.scalars.remove("step.p0");
    let mut fresh_adam = Adam::new(vars, AdamConfig::default())?;
    assert!(matches!(
        fresh_adam.load_state(&partial),
        Err(Error::InvalidParameter { .. })
    ));
    fresh.load_state(&good)?;
    assert_eq!(fresh.steps_taken(), 1);
    Ok(())
}
