//! Property tests of BaLL (docs/methods/lifequant.md § Tested invariants, items 12–16 and 19).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use qcl_continual::ball::cross_entropy;
use qcl_continual::{BallLoss, BallMode, ClassHistogram, ClassStatistics};

/// Counts over 1..=12 classes, some absent, at least one present.
fn counts() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(prop_oneof![Just(0u64), 1u64..10_000], 1..=12)
        .prop_filter("some class present", |c| c.iter().any(|&n| n > 0))
}

/// A batch of logits `[B, C]` and labels in `0..C`.
fn batch(classes: usize) -> impl Strategy<Value = (Vec<Vec<f64>>, Vec<u32>)> {
    (1usize..6).prop_flat_map(move |b| {
        (
            prop::collection::vec(prop::collection::vec(-20.0f64..20.0, classes), b),
            prop::collection::vec(0..classes as u32, b),
        )
    })
}

fn tensors(z: &[Vec<f64>], y: &[u32]) -> (Tensor, Tensor) {
    (
        Tensor::new(z.to_vec(), &Device::Cpu).unwrap(),
        Tensor::new(y, &Device::Cpu).unwrap(),
    )
}

fn scalar(t: Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Reference cross-entropy in plain f64, independent of candle.
fn reference_ce(z: &[Vec<f64>], y: &[u32]) -> f64 {
    let total: f64 = z
        .iter()
        .zip(y)
        .map(|(row, &label)| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            lse - row[label as usize]
        })
        .sum();
    total / z.len() as f64
}

proptest! {
    /// Item 12: w_c ∈ (0, 1) for present classes and Σ_present 1/w_c = 2K.
    #[test]
    fn present_weights_lie_in_the_open_unit_interval(counts in counts()) {
        let s = ClassStatistics::from_counts(&counts, counts.len()).unwrap();
        let k = counts.iter().filter(|&&n| n > 0).count();
        prop_assert_eq!(s.num_present(), k);
        let mut inverse_sum = 0.0;
        for (&n, &w) in counts.iter().zip(s.weights()) {
            if n > 0 {
                prop_assert!(w > 0.0 && w < 1.0, "w = {} for n = {}", w, n);
                inverse_sum += 1.0 / w;
            }
        }
        prop_assert!((inverse_sum - 2.0 * k as f64).abs() <= 1e-12 * k as f64);
    }

    /// Item 12: uniform counts give w_c = 1/2 for every class (exactly), and the
    /// linear-prior factors vanish exactly.
    #[test]
    fn uniform_counts_give_one_half(classes in 1usize..=20, n in 1u64..1_000_000) {
        let s = ClassStatistics::from_counts(&vec![n; classes], classes).unwrap();
        prop_assert!(s.weights().iter().all(|&w| w == 0.5));
        prop_assert!(s.linear_prior_factors().iter().all(|&f| f == 0.0));
    }

    /// Item 13: at fixed N and K, w_c strictly decreases in n_c; absent classes get w = 1.
    #[test]
    fn weights_decrease_with_the_count(counts in counts()) {
        let s = ClassStatistics::from_counts(&counts, counts.len()).unwrap();
        let w = s.weights();
        for a in 0..counts.len() {
            if counts[a] == 0 {
                prop_assert_eq!(w[a], 1.0);
            }
            for b in 0..counts.len() {
                if counts[a] < counts[b] {
                    prop_assert!(w[a] > w[b], "n {} < {} but w {} ≤ {}", counts[a], counts[b], w[a], w[b]);
                }
            }
        }
    }

    /// Item 14: PaperLinearPrior on a uniform class distribution is cross-entropy exactly.
    #[test]
    fn paper_mode_on_uniform_counts_is_cross_entropy(
        (classes, n, (z, y)) in (1usize..=10, 1u64..1000)
            .prop_flat_map(|(c, n)| (Just(c), Just(n), batch(c)))
    ) {
        let s = ClassStatistics::from_counts(&vec![n; classes], classes).unwrap();
        let (zt, yt) = tensors(&z, &y);
        let ball = BallLoss::new(BallMode::PaperLinearPrior);
        let adjusted = ball.adjusted_logits(&zt, &s).unwrap().to_vec2::<f64>().unwrap();
        prop_assert_eq!(&adjusted, &z);
        let loss = scalar(ball.loss(&zt, &yt, &s).unwrap());
        prop_assert_eq!(loss, scalar(cross_entropy(&zt, &yt).unwrap()));
        let reference = reference_ce(&z, &y);
        prop_assert!((loss - reference).abs() <= 1e-12 * (1.0 + reference), "{} vs {}", loss, reference);
    }

    /// Item 15: CodeAdditive with uniform w keeps the argmax: the largest raw logit is still a
    /// largest adjusted logit.
    #[test]
    fn code_additive_with_uniform_weights_keeps_the_argmax(
        (classes, n, (z, y)) in (1usize..=10, 1u64..1000)
            .prop_flat_map(|(c, n)| (Just(c), Just(n), batch(c)))
    ) {
        let s = ClassStatistics::from_counts(&vec![n; classes], classes).unwrap();
        let (zt, _) = tensors(&z, &y);
        let adjusted = BallLoss::new(BallMode::CodeAdditive)
            .adjusted_logits(&zt, &s)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (row, new) in z.iter().zip(&adjusted) {
            let arg = (0..classes).fold(0, |best, c| if row[c] > row[best] { c } else { best });
            let max = new.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            prop_assert_eq!(new[arg], max);
        }
    }

    /// Item 16: CodeMultiplicative with all w = 1 is cross-entropy.
    #[test]
    fn code_multiplicative_with_unit_weights_is_cross_entropy(
        (classes, (z, y)) in (1usize..=10).prop_flat_map(|c| (Just(c), batch(c)))
    ) {
        let (zt, yt) = tensors(&z, &y);
        let loss = scalar(
            BallLoss::new(BallMode::CodeMultiplicative)
                .loss_with_coefficients(&zt, &yt, &vec![1.0; classes])
                .unwrap(),
        );
        prop_assert_eq!(loss, scalar(cross_entropy(&zt, &yt).unwrap()));
        let reference = reference_ce(&z, &y);
        prop_assert!((loss - reference).abs() <= 1e-12 * (1.0 + reference));
    }

    /// Every mode gives a finite, non-negative loss for bounded logits.
    #[test]
    fn loss_is_finite_and_non_negative(
        (counts, (z, y)) in counts().prop_flat_map(|c| { let k = c.len(); (Just(c), batch(k)) })
    ) {
        let s = ClassStatistics::from_counts(&counts, counts.len()).unwrap();
        let (zt, yt) = tensors(&z, &y);
        for mode in [BallMode::PaperLinearPrior, BallMode::CodeAdditive, BallMode::CodeMultiplicative] {
            let loss = scalar(BallLoss::new(mode).loss(&zt, &yt, &s).unwrap());
            prop_assert!(loss.is_finite() && loss >= 0.0, "{:?}: {}", mode, loss);
        }
    }

    /// Item 19: the counts at task t are the label histogram of D_t ∪ R_0 ∪ … ∪ R_{t−1}.
    #[test]
    fn counts_are_the_histogram_of_current_data_and_replay(
        classes in 1usize..=8,
        seed_sets in prop::collection::vec(prop::collection::vec(0u32..1000, 0..30), 1..5),
    ) {
        let sets: Vec<Vec<u32>> = seed_sets
            .iter()
            .map(|s| s.iter().map(|v| v % classes as u32).collect())
            .collect();
        let (current, replay) = sets.split_first().unwrap();
        let mut histogram = ClassHistogram::new(classes).unwrap();
        histogram.add_labels(current).unwrap();
        for r in replay {
            let mut map = BTreeMap::new();
            for &label in r {
                *map.entry(label).or_insert(0usize) += 1;
            }
            histogram.add_class_counts(&map).unwrap();
        }
        let mut expected = vec![0u64; classes];
        for &label in sets.iter().flatten() {
            expected[label as usize] += 1;
        }
        prop_assert_eq!(histogram.counts(), &expected[..]);
        match histogram.statistics() {
            Ok(s) => {
                let want = ClassStatistics::from_counts(&expected, classes).unwrap();
                prop_assert_eq!(s, want);
            }
            Err(e) => prop_assert!(expected.iter().all(|&n| n == 0), "{e}"),
        }
    }
}
