//! Unit tests of ProxQ and the Fisher estimate: values, training behaviour, errors.

use candle_core::{Device, Tensor, Var};
use qcl_continual::{FisherAccumulator, FisherDiagonal, ProxQ};
use qcl_tensor::Error;

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn named(name: &str, v: &[f32]) -> (String, Tensor) {
    (name.to_string(), t(v))
}

fn var(name: &str, v: &[f32]) -> (String, Var) {
    (name.to_string(), Var::new(v, &Device::Cpu).unwrap())
}

fn scalar(x: &Tensor) -> f32 {
    x.to_scalar::<f32>().unwrap()
}

#[test]
fn penalty_value_by_hand() {
    let p = vec![var("a", &[1.0, 2.0]), var("b", &[0.5])];
    let fisher =
        FisherDiagonal::from_grads(&[named("a", &[1.0, 2.0]), named("b", &[3.0])]).unwrap();
    let pq = ProxQ::new(ProxQ::snapshot(&p).unwrap(), fisher, 10.0).unwrap();
    assert_eq!(pq.lambda(), 10.0);
    p[0].1.set(&t(&[2.0, 2.5])).unwrap();
    p[1].1.set(&t(&[0.0])).unwrap();
    // F = [1, 4], [9]; Δ = [1, 0.5], [−0.5]; P = 1 + 4·0.25 + 9·0.25 = 4.25.
    assert!((scalar(&pq.drift(&p).unwrap()) - 4.25).abs() < 1e-6);
    assert!((scalar(&pq.penalty(&p).unwrap()) - 42.5).abs() < 1e-5);
    let g = pq.gradient(&p).unwrap();
    assert_eq!(g[0].1.to_vec1::<f32>().unwrap(), vec![20.0, 40.0]);
    assert_eq!(g[1].1.to_vec1::<f32>().unwrap(), vec![-90.0]);
    // The anchor is a copy: moving the parameter did not move it.
    assert_eq!(
        pq.anchor("a").unwrap().to_vec1::<f32>().unwrap(),
        vec![1.0, 2.0]
    );
}

/// Gradient descent on a task loss pulling θ away from θ*: with λ > 0 the Fisher-weighted
/// drift at the end is smaller than with λ = 0 (H5 of docs/methods/lifequant.md § Expected
/// orderings, in miniature).
#[test]
fn penalty_reduces_fisher_weighted_drift() {
    let run = |lambda: f64| {
        let p = vec![var("w", &[0.0, 0.0, 0.0])];
        let fisher = FisherDiagonal::from_grads(&[named("w", &[1.0, 0.5, 0.0])]).unwrap();
        let pq = ProxQ::new(ProxQ::snapshot(&p).unwrap(), fisher, lambda).unwrap();
        let target = t(&[1.0, -1.0, 2.0]);
        for _ in 0..200 {
            let task = (p[0].1.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let loss = (task + pq.penalty(&p).unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(p[0].1.as_tensor()).unwrap();
            let next = (p[0].1.as_tensor() - (g * 0.01).unwrap()).unwrap();
            p[0].1.set(&next).unwrap();
        }
        let drift = scalar(&pq.drift(&p).unwrap());
        (drift, p[0].1.as_tensor().to_vec1::<f32>().unwrap())
    };
    let (free, w_free) = run(0.0);
    let (held, w_held) = run(10.0);
    assert!(held < 0.1 * free, "drift {held} vs {free}");
    // The element with F = 0 is free either way.
    assert!((w_free[2] - w_held[2]).abs() < 1e-4);
}

#[test]
fn fisher_accumulator_checks() {
    assert!(matches!(
        FisherAccumulator::new().finish(),
        Err(Error::EmptyInput(_))
    ));
    let mut acc = FisherAccumulator::new();
    acc.accumulate_grads(&[named("w", &[1.0, 2.0])]).unwrap();
    assert!(matches!(
        acc.accumulate_grads(&[named("w", &[1.0, 2.0, 3.0])]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        acc.accumulate_grads(&[named("v", &[1.0, 2.0])]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        acc.accumulate_grads(&[named("w", &[1.0, 2.0]), named("v", &[1.0])]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        acc.accumulate_grads(&[named("w", &[1.0, f32::NAN])]),
        Err(Error::NonFinite { index: 1, .. })
    ));
    // Refused batches changed nothing.
    assert_eq!(acc.batches(), 1);
    let f = acc.finish().unwrap();
    assert_eq!(
        f.get("w").unwrap().to_vec1::<f32>().unwrap(),
        vec![1.0, 4.0]
    );
    assert_eq!(f.len(), 1);
    assert!(!f.is_empty());

    let mut acc = FisherAccumulator::new();
    assert!(matches!(
        acc.accumulate_grads(&[named("w", &[1.0]), named("w", &[2.0])]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        acc.accumulate_grads(&[named("w", &[f32::INFINITY])]),
        Err(Error::NonFinite { index: 0, .. })
    ));
    assert_eq!(acc.batches(), 0);
}

#[test]
fn proxq_construction_and_use_checks() {
    let p = vec![var("a", &[1.0, 2.0])];
    let anchor = ProxQ::snapshot(&p).unwrap();
    let fisher = FisherDiagonal::zeros(&p).unwrap();
    for lambda in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            ProxQ::new(anchor.clone(), fisher.clone(), lambda),
            Err(Error::InvalidParameter { .. })
        ));
    }
    // Fisher and anchor over different names or shapes.
    let other = FisherDiagonal::from_grads(&[named("b", &[1.0, 2.0])]).unwrap();
    assert!(matches!(
        ProxQ::new(anchor.clone(), other, 1.0),
        Err(Error::InvalidParameter { .. })
    ));
    let wrong_shape = FisherDiagonal::from_grads(&[named("a", &[1.0])]).unwrap();
    assert!(matches!(
        ProxQ::new(anchor.clone(), wrong_shape, 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ProxQ::new(vec![named("a", &[f32::NAN, 0.0])], fisher.clone(), 1.0),
        Err(Error::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        ProxQ::new(
            vec![named("a", &[1.0, 2.0]), named("a", &[1.0, 2.0])],
            fisher.clone(),
            1.0
        ),
        Err(Error::InvalidParameter { .. })
    ));

    let pq = ProxQ::new(anchor, fisher, ProxQ::DEFAULT_LAMBDA).unwrap();
    // Parameters other than the anchored ones.
    assert!(matches!(
        pq.penalty(&[var("b", &[1.0, 2.0])]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        pq.penalty(&[var("a", &[1.0, 2.0]), var("b", &[0.0])]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        pq.penalty(&[var("a", &[1.0, 2.0]), var("a", &[0.0, 0.0])]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        pq.penalty(&[var("a", &[1.0, 2.0, 3.0])]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        pq.gradient(&[var("a", &[1.0])]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(scalar(&pq.penalty(&p).unwrap()), 0.0);
}

#[test]
fn proximal_step_by_hand_and_bad_steps() {
    // F = [4, 0], λ = 10, s = 0.05: 2sλF = [4, 0], so θ' = (θ + 4θ*)/5 on the first element.
    let p = vec![var("w", &[1.0, 1.0])];
    let fisher = FisherDiagonal::from_grads(&[named("w", &[2.0, 0.0])]).unwrap();
    let prox = ProxQ::new(vec![named("w", &[0.0, 0.0])], fisher, 10.0).unwrap();
    prox.proximal_step(&p, 0.05).unwrap();
    assert_eq!(p[0].1.as_tensor().to_vec1::<f32>().unwrap(), vec![0.2, 1.0]);
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(
                prox.proximal_step(&p, bad),
                Err(Error::InvalidParameter { .. })
            ),
            "{bad}"
        );
    }
    // A parameter the penalty does not know is an error, as for the penalty itself.
    assert!(prox.proximal_step(&[var("v", &[1.0, 1.0])], 0.1).is_err());
}
