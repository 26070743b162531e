//! Learning-rate schedules hit their milestones and endpoints; bad parameters are refused.

use proptest::prelude::*;
use qcl_nn::schedule::{
    Constant, CosineAnnealing, LinearWarmup, LrSchedule, MultiStepLr, Piecewise, StepLr,
};
use qcl_tensor::Error;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-300) + 1e-300
}

proptest! {
    #[test]
    fn multistep_multiplies_by_gamma_exactly_at_each_milestone(
        base in 1e-4..1.0f64,
        gamma in 0.01..0.99f64,
        mut milestones in prop::collection::btree_set(1usize..200, 0..6),
    ) {
        let sorted: Vec<usize> = milestones.iter().copied().collect();
        // Any order is accepted.
        let mut shuffled = sorted.clone();
        shuffled.reverse();
        let s = MultiStepLr::new(base, shuffled, gamma).unwrap();
        prop_assert_eq!(s.milestones(), sorted.as_slice());
        prop_assert_eq!(s.lr_at(0), base);
        for t in 1..210 {
            let (before, now) = (s.lr_at(t - 1), s.lr_at(t));
            if milestones.remove(&t) {
                prop_assert!(close(now, before * gamma), "t {}: {} -> {}", t, before, now);
            } else {
                prop_assert_eq!(now, before, "t {} is no milestone", t);
            }
        }
        prop_assert!(close(s.lr_at(10_000), base * gamma.powi(sorted.len() as i32)));
    }

    #[test]
    fn step_lr_decays_every_step_size(
        base in 1e-4..1.0f64,
        gamma in 0.01..0.99f64,
        step_size in 1usize..20,
    ) {
        let s = StepLr::new(base, step_size, gamma).unwrap();
        for t in 1..100 {
            let (before, now) = (s.lr_at(t - 1), s.lr_at(t));
            if t % step_size == 0 {
                prop_assert!(close(now, before * gamma));
            } else {
                prop_assert_eq!(now, before);
            }
        }
    }

    #[test]
    fn cosine_goes_from_base_to_eta_min_monotonically(
        base in 1e-3..1.0f64,
        floor in 0.0..1.0f64,
        t_max in 1usize..300,
    ) {
        let eta_min = base * floor;
        let s = CosineAnnealing::new(base, t_max, eta_min).unwrap();
        prop_assert_eq!(s.lr_at(0), base);
        prop_assert!((s.lr_at(t_max) - eta_min).abs() < 1e-12);
        if t_max % 2 == 0 {
            prop_assert!((s.lr_at(t_max / 2) - (base + eta_min) / 2.0).abs() < 1e-12);
        }
        for t in 1..=t_max {
            prop_assert!(s.lr_at(t) <= s.lr_at(t - 1));
        }
        // PyTorch's closed form is periodic: back at the base rate after 2·t_max.
        prop_assert_eq!(s.lr_at(2 * t_max), base);
    }

    #[test]
    fn piecewise_fractions_change_at_the_first_epoch_past_each_fraction(
        base in 1e-3..1.0f64,
        total in 8usize..400,
    ) {
        let table = [(0.5, 0.1), (0.75, 0.01), (0.875, 0.001)];
        let s = Piecewise::fractions(base, total, &table).unwrap();
        for t in 0..total {
            let progress = t as f64 / total as f64;
            let factor = table.iter().rev().find(|(f, _)| progress >= *f).map_or(1.0, |p| p.1);
            prop_assert_eq!(s.lr_at(t), if factor == 1.0 { base } else { base * factor },
                "t {} of {}", t, total);
        }
    }

    #[test]
    fn warmup_ramps_linearly_then_follows_the_inner_schedule(
        warmup in 1usize..50,
        start in 0.0..1.0f64,
    ) {
        // The inner schedule stays constant during the warm-up, then decays.
        let inner = StepLr::new(0.1, 60, 0.5).unwrap();
        let s = LinearWarmup::new(inner, warmup, start).unwrap();
        prop_assert_eq!(s.lr_at(0), 0.1 * start);
        for t in 1..warmup {
            prop_assert!(s.lr_at(t) >= s.lr_at(t - 1));
            prop_assert!(s.lr_at(t) <= inner.lr_at(t));
        }
        for t in warmup..200 {
            prop_assert_eq!(s.lr_at(t), inner.lr_at(t));
        }
    }
}

#[test]
fn tensorflow_schedule_over_200_epochs() {
    let s = Piecewise::fractions(0.1, 200, &[(0.5, 0.1), (0.75, 0.01), (0.875, 0.001)]).unwrap();
    assert_eq!(s.boundaries(), &[(100, 0.1), (150, 0.01), (175, 0.001)]);
    // Rounding noise does not move a boundary: 0.7 · 10 is 7.
    let s = Piecewise::fractions(1.0, 10, &[(0.7, 0.5)]).unwrap();
    assert_eq!(s.boundaries(), &[(7, 0.5)]);
    // Fractions that land on the same epoch: the later one wins.
    let s = Piecewise::fractions(1.0, 2, &[(0.5, 0.1), (0.6, 0.01)]).unwrap();
    assert_eq!(s.boundaries(), &[(1, 0.1), (2, 0.01)]);
    let s = Piecewise::fractions(1.0, 1, &[(0.5, 0.1), (0.75, 0.01)]).unwrap();
    assert_eq!(s.boundaries(), &[(1, 0.01)]);
}

#[test]
fn schedules_work_as_trait_objects() {
    let schedules: Vec<Box<dyn LrSchedule>> = vec![
        Box::new(Constant::new(0.3).unwrap()),
        Box::new(StepLr::new(0.3, 1, 1.0).unwrap()),
    ];
    for s in &schedules {
        assert_eq!(s.lr_at(7), 0.3);
    }
}

#[test]
fn bad_parameters_are_invalid_parameter_errors() {
    let errors = [
        Constant::new(-1.0).err(),
        Constant::new(f64::NAN).err(),
        StepLr::new(0.1, 0, 0.1).err(),
        StepLr::new(0.1, 10, -0.1).err(),
        MultiStepLr::new(f64::INFINITY, vec![1], 0.1).err(),
        MultiStepLr::new(0.1, vec![1], f64::NAN).err(),
        CosineAnnealing::new(0.1, 0, 0.0).err(),
        CosineAnnealing::new(0.1, 10, 0.2).err(),
        CosineAnnealing::new(0.1, 10, -0.01).err(),
        Piecewise::new(0.1, vec![(10, 0.1), (10, 0.01)]).err(),
        Piecewise::new(0.1, vec![(20, 0.1), (10, 0.01)]).err(),
        Piecewise::new(0.1, vec![(10, -0.1)]).err(),
        Piecewise::fractions(0.1, 100, &[(0.5, 0.1), (0.4, 0.01)]).err(),
        Piecewise::fractions(0.1, 100, &[(1.5, 0.1)]).err(),
        LinearWarmup::new(Constant::new(0.1).unwrap(), 5, 1.5).err(),
    ];
    for (i, err) in errors.into_iter().enumerate() {
        assert!(
            matches!(err, Some(Error::InvalidParameter { .. })),
            "case {i}: {err:?}"
        );
    }
}
