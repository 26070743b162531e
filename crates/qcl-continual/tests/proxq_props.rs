//! Property tests of ProxQ and its Fisher estimate: docs/methods/lifequant.md § Tested
//! invariants, items 9–11.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use qcl_continual::{FisherAccumulator, FisherDiagonal, ProxQ};

type Params = Vec<(String, Var)>;

fn vals(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Two named parameters ("a": a matrix, "b": a vector) with the given values.
fn params(a: &[f32], b: &[f32]) -> Params {
    let dev = Device::Cpu;
    vec![
        ("a".to_string(), Var::new(a, &dev).unwrap()),
        ("b".to_string(), Var::new(b, &dev).unwrap()),
    ]
}

fn set(params: &Params, values: &[Vec<f32>]) {
    for ((_, var), v) in params.iter().zip(values) {
        var.set(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

fn scalar(x: &Tensor) -> f64 {
    x.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A parameter layout with values: anchor θ*, Fisher F ≥ 0 (built as g²), and a displacement Δ.
#[derive(Debug, Clone)]
struct Case {
    anchor: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    delta: Vec<Vec<f32>>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..24, 1usize..8).prop_flat_map(|(na, nb)| {
        let v = move |n: usize| prop::collection::vec(-2.0f32..2.0, n);
        ((v(na), v(nb)), (v(na), v(nb)), (v(na), v(nb))).prop_map(|(anchor, grads, delta)| Case {
            anchor: vec![anchor.0, anchor.1],
            grads: vec![grads.0, grads.1],
            delta: vec![delta.0, delta.1],
        })
    })
}

fn named(values: &[Vec<f32>]) -> Vec<(String, Tensor)> {
    ["a", "b"]
        .iter()
        .zip(values)
        .map(|(n, v)| {
            (
                n.to_string(),
                Tensor::new(v.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

fn prox(c: &Case, lambda: f64) -> (ProxQ, Params) {
    let p = params(&c.anchor[0], &c.anchor[1]);
    let fisher = FisherDiagonal::from_grads(&named(&c.grads)).unwrap();
    (
        ProxQ::new(ProxQ::snapshot(&p).unwrap(), fisher, lambda).unwrap(),
        p,
    )
}

fn shifted(c: &Case, alpha: f32) -> Vec<Vec<f32>> {
    c.anchor
        .iter()
        .zip(&c.delta)
        .map(|(a, d)| a.iter().zip(d).map(|(x, y)| x + alpha * y).collect())
        .collect()
}

proptest! {
    /// Item 9: P(θ*) = 0 and P ≥ 0 anywhere.
    #[test]
    fn zero_at_anchor_and_non_negative(c in case(), lambda in 0.0f64..200.0, alpha in -3.0f32..3.0) {
        let (pq, p) = prox(&c, lambda);
        prop_assert_eq!(scalar(&pq.penalty(&p).unwrap()), 0.0);
        set(&p, &shifted(&c, alpha));
        prop_assert!(scalar(&pq.penalty(&p).unwrap()) >= 0.0);
        prop_assert!(scalar(&pq.drift(&p).unwrap()) >= 0.0);
    }

    /// Item 9: F = 0 (task 0) gives P ≡ 0.
    #[test]
    fn zero_fisher_gives_zero_penalty(c in case(), alpha in -3.0f32..3.0) {
        let p = params(&c.anchor[0], &c.anchor[1]);
        let pq = ProxQ::new(ProxQ::snapshot(&p).unwrap(), FisherDiagonal::zeros(&p).unwrap(), 100.0).unwrap();
        set(&p, &shifted(&c, alpha));
        prop_assert_eq!(scalar(&pq.penalty(&p).unwrap()), 0.0);
    }

    /// Item 10: P(θ* + αΔ) = α²·P(θ* + Δ).
    #[test]
    fn quadratic_scaling(c in case(), alpha in -3.0f32..3.0, lambda in 0.1f64..200.0) {
        let (pq, p) = prox(&c, lambda);
        set(&p, &shifted(&c, 1.0));
        let base = scalar(&pq.penalty(&p).unwrap());
        set(&p, &shifted(&c, alpha));
        let scaled = scalar(&pq.penalty(&p).unwrap());
        let want = (alpha as f64).powi(2) * base;
        prop_assert!((scaled - want).abs() <= 1e-4 * (want.abs() + 1e-3 * lambda), "{scaled} vs {want}");
    }

    /// Item 10: candle's gradient of λ·P equals the closed form 2·λ·F⊙(θ − θ*), and adds to the
    /// task loss's gradient when the penalty is added to the loss.
    #[test]
    fn autograd_matches_closed_form(c in case(), alpha in -3.0f32..3.0, lambda in 0.0f64..200.0) {
        let (pq, p) = prox(&c, lambda);
        set(&p, &shifted(&c, alpha));
        let closed = pq.gradient(&p).unwrap();
        // Task loss Σ a (gradient 1 on "a", none on "b").
        let task = p[0].1.as_tensor().sum_all().unwrap();
        let grads = (task + pq.penalty(&p).unwrap()).unwrap().backward().unwrap();
        for (i, ((name, var), (cname, cg))) in p.iter().zip(&closed).enumerate() {
            prop_assert_eq!(name, cname);
            let auto = vals(grads.get(var.as_tensor()).unwrap());
            for (x, y) in auto.iter().zip(vals(cg)) {
                let want = y + if i == 0 { 1.0 } else { 0.0 };
                prop_assert!((x - want).abs() <= 1e-4 * (1.0 + want.abs()), "{name}: {x} vs {want}");
            }
        }
    }

    /// The proximal step is the exact minimiser of λ·P(θ') + ‖θ' − θ‖²/(2s): its optimality
    /// condition 2λF⊙(θ' − θ*) + (θ' − θ)/s = 0 holds, it never moves a coordinate past the
    /// anchor or away from it, and it never raises the penalty.
    #[test]
    fn proximal_step_is_the_exact_minimiser(
        c in case(),
        alpha in -3.0f32..3.0,
        lambda in 0.0f64..1000.0,
        step in 0.0f64..1.0,
    ) {
        let (pq, p) = prox(&c, lambda);
        let before = shifted(&c, alpha);
        set(&p, &before);
        let penalty_before = scalar(&pq.penalty(&p).unwrap());
        pq.proximal_step(&p, step).unwrap();
        let penalty_after = scalar(&pq.penalty(&p).unwrap());
        prop_assert!(penalty_after <= penalty_before * (1.0 + 1e-5) + 1e-6, "{penalty_after} > {penalty_before}");
        for (i, (_, var)) in p.iter().enumerate() {
            let after = vals(var.as_tensor());
            for (j, &moved) in after.iter().enumerate() {
                let (theta, star) = (before[i][j] as f64, c.anchor[i][j] as f64);
                let f = (c.grads[i][j] as f64).powi(2);
                let moved = moved as f64;
                let residual = 2.0 * lambda * f * (moved - star) * step + (moved - theta);
                prop_assert!(residual.abs() <= 1e-5 * (1.0 + theta.abs() + star.abs()) * (1.0 + 2.0 * lambda * f * step),
                    "residual {residual} at {i},{j}");
                // Between θ and θ* (inclusive), so it can never overshoot the anchor.
                let (lo, hi) = if theta <= star { (theta, star) } else { (star, theta) };
                prop_assert!(moved >= lo - 1e-5 * (1.0 + lo.abs()) && moved <= hi + 1e-5 * (1.0 + hi.abs()),
                    "{moved} outside [{lo}, {hi}]");
            }
        }
    }

    /// A zero step, λ = 0 or F = 0 leaves the parameters bit for bit as they were.
    #[test]
    fn proximal_step_without_pull_is_the_identity(c in case(), alpha in -3.0f32..3.0, step in 0.0f64..1.0) {
        let before = shifted(&c, alpha);
        for (lambda, s, zero_fisher) in [(100.0, 0.0, false), (0.0, step, false), (100.0, step, true)] {
            let (pq, p) = if zero_fisher {
                let p = params(&c.anchor[0], &c.anchor[1]);
                let pq = ProxQ::new(ProxQ::snapshot(&p).unwrap(), FisherDiagonal::zeros(&p).unwrap(), lambda).unwrap();
                (pq, p)
            } else {
                prox(&c, lambda)
            };
            set(&p, &before);
            pq.proximal_step(&p, s).unwrap();
            for (i, (_, var)) in p.iter().enumerate() {
                prop_assert_eq!(vals(var.as_tensor()), before[i].clone());
            }
        }
    }

    /// Item 11: F ≥ 0; one batch gives F = g² exactly; F is a mean over batches, so feeding the
    /// same batches twice leaves it unchanged.
    #[test]
    fn fisher_is_a_mean_of_squares(batches in prop::collection::vec(prop::collection::vec(-3.0f32..3.0, 5), 1..6)) {
        let one = FisherDiagonal::from_grads(&[("w".to_string(), Tensor::new(batches[0].as_slice(), &Device::Cpu).unwrap())]).unwrap();
        let f1 = vals(one.get("w").unwrap());
        let want: Vec<f32> = batches[0].iter().map(|g| g * g).collect();
        prop_assert_eq!(f1, want);

        let feed = |times: usize| {
            let mut acc = FisherAccumulator::new();
            for _ in 0..times {
                for b in &batches {
                    acc.accumulate_grads(&[("w".to_string(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap())]).unwrap();
                }
            }
            assert_eq!(acc.batches(), times * batches.len());
            vals(acc.finish().unwrap().get("w").unwrap())
        };
        let once = feed(1);
        let twice = feed(2);
        for (j, (x, y)) in once.iter().zip(&twice).enumerate() {
            prop_assert!(*x >= 0.0);
            prop_assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            let mean = batches.iter().map(|b| (b[j] as f64).powi(2)).sum::<f64>() / batches.len() as f64;
            prop_assert!((*x as f64 - mean).abs() <= 1e-5 * (1.0 + mean));
        }
    }

    /// Item 11 through autograd: the accumulator reads the GradStore of a real loss, and one
    /// batch gives F = g² of that loss.
    #[test]
    fn fisher_from_grad_store(w in prop::collection::vec(-2.0f32..2.0, 6), x in prop::collection::vec(-2.0f32..2.0, 6)) {
        let dev = Device::Cpu;
        let var = Var::new(w.as_slice(), &dev).unwrap();
        let unused = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let p = vec![("w".to_string(), var.clone()), ("unused".to_string(), unused)];
        // L = (Σ w⊙x)², ∂L/∂w = 2·(Σ w⊙x)·x.
        let xt = Tensor::new(x.as_slice(), &dev).unwrap();
        let loss = (var.as_tensor() * &xt).unwrap().sum_all().unwrap().sqr().unwrap();
        let mut acc = FisherAccumulator::new();
        acc.accumulate(&p, &loss.backward().unwrap()).unwrap();
        let f = acc.finish().unwrap();
        let s: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        for (got, xi) in vals(f.get("w").unwrap()).iter().zip(&x) {
            let want = (2.0 * s * xi).powi(2);
            prop_assert!((got - want).abs() <= 1e-4 * (1.0 + want), "{got} vs {want}");
        }
        prop_assert_eq!(vals(f.get("unused").unwrap()), vec![0.0, 0.0]);
    }
}
