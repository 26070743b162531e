//! Property tests of the quantizers: docs/methods/lifequant.md § Tested invariants, items 1–8.

use candle_core::{Device, Module, Tensor, Var};
use proptest::prelude::*;
use qcl_continual::{round_to_bits, ActivationQuantizer, WeightQuantMode, WeightQuantizer};

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn vals(x: &Tensor) -> Vec<f32> {
    x.to_vec1::<f32>().unwrap()
}

fn m(bits: u32) -> f32 {
    ((1u32 << bits) - 1) as f32
}

/// Whether `v` is an integer multiple of `1/m`, to f32 precision (the tolerance stays below
/// half a grid step for every `m ≤ 2^16 − 1` and `|v| ≤ 3`).
fn on_grid(v: f32, m: f32) -> bool {
    (v - (v * m).round() / m).abs() <= 1e-6 * (1.0 + v.abs())
}

fn distinct(v: &[f32]) -> usize {
    let mut v = v.to_vec();
    v.sort_by(f32::total_cmp);
    v.dedup();
    v.len()
}

/// Weights with a non-degenerate spread: at least 4 elements, std well above zero.
fn weights() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-1.0f32..1.0, 4..96).prop_filter("spread", |w| {
        let n = w.len() as f64;
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        var.sqrt() > 0.05
    })
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

proptest! {
    /// Item 1: q_k lands on the grid ℤ/m, is idempotent, and errs by at most 1/(2m).
    #[test]
    fn rounding_grid_idempotent_bounded(u in prop::collection::vec(-3.0f32..3.0, 1..64), bits in 2u32..=16) {
        let q = round_to_bits(&t(&u), bits).unwrap();
        let qv = vals(&q);
        let mm = m(bits);
        for (&x, &y) in u.iter().zip(&qv) {
            prop_assert!(on_grid(y, mm), "{y} not a multiple of 1/{mm}");
            prop_assert!((y - x).abs() <= 0.5 / mm + 1e-6 * (1.0 + x.abs()), "|{y} − {x}| > 1/(2m)");
        }
        let qq = vals(&round_to_bits(&q, bits).unwrap());
        prop_assert_eq!(qq, qv);
    }

    /// Item 1 for k = 1: q_1 = sign.
    #[test]
    fn one_bit_rounding_is_sign(u in prop::collection::vec(-3.0f32..3.0, 1..64)) {
        let q = vals(&round_to_bits(&t(&u), 1).unwrap());
        for (&x, &y) in u.iter().zip(&q) {
            let want = if x > 0.0 { 1.0 } else if x < 0.0 { -1.0 } else { 0.0 };
            prop_assert_eq!(y, want);
        }
    }

    /// Item 2: Qa ∈ {0, 1/m, …, 1}, at most 2^k values, monotone non-decreasing.
    #[test]
    fn activation_levels_and_monotone(mut x in prop::collection::vec(-2.0f32..3.0, 1..128), bits in 1u32..=8) {
        x.sort_by(f32::total_cmp);
        let y = vals(&ActivationQuantizer::new(bits).unwrap().forward(&t(&x)).unwrap());
        let mm = m(bits);
        for &v in &y {
            prop_assert!((0.0..=1.0).contains(&v), "{v} outside [0, 1]");
            prop_assert!(on_grid(v, mm));
        }
        prop_assert!(distinct(&y) <= 1usize << bits);
        for pair in y.windows(2) {
            prop_assert!(pair[0] <= pair[1], "not monotone: {} > {}", pair[0], pair[1]);
        }
    }

    /// Item 3: the STE gradient of Qa is 1 strictly inside (0, 1) and 0 outside (away from the
    /// boundaries).
    #[test]
    fn activation_ste_gradient(x in prop::collection::vec(-2.0f32..3.0, 1..64), bits in 1u32..=8) {
        let x: Vec<f32> = x.into_iter().filter(|v| v.abs() > 1e-3 && (v - 1.0).abs() > 1e-3).collect();
        prop_assume!(!x.is_empty());
        let var = Var::new(x.as_slice(), &Device::Cpu).unwrap();
        let y = ActivationQuantizer::new(bits).unwrap().forward(var.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = vals(g.get(var.as_tensor()).unwrap());
        for (&xi, &gi) in x.iter().zip(&g) {
            let want = if (0.0..=1.0).contains(&xi) { 1.0 } else { 0.0 };
            prop_assert_eq!(gi, want, "x = {}", xi);
        }
    }

    /// Item 4: faithful Qw is invariant to W ↦ a·W + b (a > 0): Ŵ to 1e-5, and the rounded
    /// values equal except where Ŵ·m sits at a rounding tie (within f32 noise).
    #[test]
    fn faithful_affine_invariance(w in weights(), a in 0.5f32..4.0, b in -2.0f32..2.0, bits in 2u32..=8) {
        let q = WeightQuantizer::new(bits).unwrap();
        let w2: Vec<f32> = w.iter().map(|&x| a * x + b).collect();
        let h1 = vals(&q.standardize(&t(&w)).unwrap());
        let h2 = vals(&q.standardize(&t(&w2)).unwrap());
        for (x, y) in h1.iter().zip(&h2) {
            prop_assert!((x - y).abs() <= 1e-5, "Ŵ differs: {x} vs {y}");
        }
        let q1 = vals(&q.quantize(&t(&w)).unwrap());
        let q2 = vals(&q.quantize(&t(&w2)).unwrap());
        let mm = m(bits);
        for ((x, y), h) in q1.iter().zip(&q2).zip(&h1) {
            // A 1e-5 difference in Ŵ can only flip the rounding within 1e-5·m of a tie.
            let frac = (h * mm - (h * mm).floor() - 0.5).abs();
            prop_assert!(x == y || frac <= 1e-5 * mm, "Qw differs away from a tie: {x} vs {y}");
        }
    }

    /// Item 5: the gradient w.r.t. the latent weights is orthogonal to 1 and to W (both modes),
    /// so it flows through mean and std.
    #[test]
    fn gradient_orthogonal_to_one_and_w(
        w in weights(),
        seed in prop::collection::vec(-1.0f32..1.0, 96),
        bits in 2u32..=8,
        strict in any::<bool>(),
    ) {
        let mode = if strict { WeightQuantMode::Strict } else { WeightQuantMode::Faithful };
        let q = WeightQuantizer { mode, ..WeightQuantizer::new(bits).unwrap() };
        let var = Var::new(w.as_slice(), &Device::Cpu).unwrap();
        let r = t(&seed[..w.len()]);
        let loss = (q.quantize(var.as_tensor()).unwrap() * r).unwrap().sum_all().unwrap();
        let g = vals(loss.backward().unwrap().get(var.as_tensor()).unwrap());
        let gn = norm(&g);
        prop_assume!(gn > 0.0);
        let ones = vec![1.0f32; w.len()];
        prop_assert!(dot(&g, &ones).abs() <= 1e-4 * gn * norm(&ones), "⟨g,1⟩ = {}", dot(&g, &ones));
        prop_assert!(dot(&g, &w).abs() <= 1e-4 * gn * norm(&w), "⟨g,W⟩ = {}", dot(&g, &w));
    }

    /// Item 6: Ŵ has mean 0 and unbiased std σ0.
    #[test]
    fn standardized_mean_and_std(w in weights(), sigma0 in prop_oneof![Just(0.5f64), Just(0.125), 0.05f64..2.0]) {
        let q = WeightQuantizer { sigma0, ..WeightQuantizer::new(4).unwrap() };
        let h = vals(&q.standardize(&t(&w)).unwrap());
        let (mean, std) = mean_std(&h);
        prop_assert!(mean.abs() <= 1e-5 * sigma0.max(1.0), "mean {mean}");
        prop_assert!((std - sigma0).abs() <= 1e-5 * sigma0.max(1.0), "std {std} vs {sigma0}");
    }

    /// Item 7: strict Qw has at most 2^k values, all on the grid 2j/m − 1 inside [−1, 1].
    #[test]
    fn strict_levels(w in weights(), bits in 2u32..=8, sigma0 in 0.1f64..2.0) {
        let q = WeightQuantizer { mode: WeightQuantMode::Strict, sigma0, ..WeightQuantizer::new(bits).unwrap() };
        let y = vals(&q.quantize(&t(&w)).unwrap());
        let mm = m(bits);
        for &v in &y {
            prop_assert!((-1.0..=1.0).contains(&v), "{v} outside [−1, 1]");
            prop_assert!(on_grid((v + 1.0) / 2.0, mm), "{v} off the strict grid");
        }
        prop_assert!(distinct(&y) <= 1usize << bits);
    }

    /// Item 7: the 1-bit branch gives {−E, 0, +E} with E = mean|W| (both modes), and the STE
    /// gradient is the identity.
    #[test]
    fn one_bit_branch(w in prop::collection::vec(-1.0f32..1.0, 1..64), strict in any::<bool>()) {
        let mode = if strict { WeightQuantMode::Strict } else { WeightQuantMode::Faithful };
        let q = WeightQuantizer { mode, ..WeightQuantizer::new(1).unwrap() };
        let var = Var::new(w.as_slice(), &Device::Cpu).unwrap();
        let y = q.quantize(var.as_tensor()).unwrap();
        let e = (w.iter().map(|x| x.abs() as f64).sum::<f64>() / w.len() as f64) as f32;
        for (&x, &v) in w.iter().zip(&vals(&y)) {
            let want = if x > 0.0 { e } else if x < 0.0 { -e } else { 0.0 };
            prop_assert!((v - want).abs() <= 1e-6 * (1.0 + e), "{v} vs {want}");
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        prop_assert!(vals(g.get(var.as_tensor()).unwrap()).iter().all(|&gi| gi == 1.0));
    }

    /// Item 8: 32 bits is the identity, forward and backward, for q_k, Qw and Qa.
    #[test]
    fn thirty_two_bits_is_identity(w in prop::collection::vec(-3.0f32..3.0, 1..64), mode in prop_oneof![Just(WeightQuantMode::Faithful), Just(WeightQuantMode::Strict)]) {
        let var = Var::new(w.as_slice(), &Device::Cpu).unwrap();
        let x = var.as_tensor();
        let qw = WeightQuantizer { mode, ..WeightQuantizer::new(32).unwrap() };
        let outs = [
            round_to_bits(x, 32).unwrap(),
            qw.quantize(x).unwrap(),
            ActivationQuantizer::new(32).unwrap().forward(x).unwrap(),
        ];
        for out in outs {
            prop_assert_eq!(vals(&out), w.clone());
            let g = (&out * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
            prop_assert!(vals(g.get(x).unwrap()).iter().all(|&gi| gi == 3.0));
        }
    }
}
