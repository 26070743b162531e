//! Property tests of the training-loop pieces: the multi-step schedule (item 20 of
//! docs/methods/lifequant.md § Tested invariants), the distillation term of LwF and the
//! per-class accuracy counts.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use qcl_continual::{distillation_loss, ClassAccuracy, TaskSchedule};

proptest! {
    /// lr(e) = lr0 · 0.1^{|{m ≤ e}|}: MultiStepLR stepped at epoch start.
    #[test]
    fn learning_rate_drops_tenfold_at_each_passed_milestone(
        lr in 1e-4f64..1.0,
        milestones in proptest::collection::vec(0usize..30, 0..5),
        epoch in 0usize..40,
    ) {
        let schedule = TaskSchedule { epochs: 40, lr, milestones: milestones.clone() };
        let passed = milestones.iter().filter(|&&m| m <= epoch).count();
        let expected = lr * 0.1f64.powi(passed as i32);
        let got = schedule.lr_at(epoch).unwrap();
        prop_assert!((got - expected).abs() <= 1e-12 * expected.max(1e-300), "{got} vs {expected}");
    }

    /// KL distillation is non-negative, zero for identical logits, invariant to a constant
    /// shift of either side's logits, and scales as T² only through its definition.
    #[test]
    fn distillation_is_a_nonnegative_divergence(
        values in proptest::collection::vec(-5.0f32..5.0, 12),
        other in proptest::collection::vec(-5.0f32..5.0, 12),
        shift in -3.0f32..3.0,
        temperature in 0.5f64..4.0,
    ) {
        let d = Device::Cpu;
        let a = Tensor::from_vec(values, (3, 4), &d).unwrap();
        let b = Tensor::from_vec(other, (3, 4), &d).unwrap();
        let kl = |s: &Tensor, t: &Tensor| {
            distillation_loss(s, t, temperature).unwrap().to_scalar::<f32>().unwrap()
        };
        prop_assert!(kl(&a, &b) >= -1e-5);
        prop_assert!(kl(&a, &a).abs() < 1e-5);
        let shifted = (&a + f64::from(shift)).unwrap();
        prop_assert!((kl(&shifted, &b) - kl(&a, &b)).abs() < 1e-3 * (1.0 + kl(&a, &b)));
    }

    /// Merging counts adds them, and the overall accuracy is the total recall.
    #[test]
    fn class_accuracy_merges_additively(
        counts in proptest::collection::vec((0u64..50, 0u64..50), 1..8),
    ) {
        let classes = counts.len();
        let mut a = ClassAccuracy::new(classes);
        let mut b = ClassAccuracy::new(classes);
        for (c, &(x, y)) in counts.iter().enumerate() {
            a.total[c] = x + y;
            a.correct[c] = x;
            b.total[c] = y;
            b.correct[c] = y / 2;
        }
        let mut merged = a.clone();
        merged.merge(&b).unwrap();
        let total: u64 = merged.total.iter().sum();
        let correct: u64 = merged.correct.iter().sum();
        let all: Vec<u32> = (0..classes as u32).collect();
        prop_assert_eq!(merged.over(&all), (total > 0).then(|| correct as f64 / total as f64));
        prop_assert_eq!(merged.overall(), merged.over(&all));
        for c in 0..classes {
            prop_assert_eq!(merged.total[c], a.total[c] + b.total[c]);
            prop_assert!(merged.correct[c] <= merged.total[c]);
        }
    }
}
