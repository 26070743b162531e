//! Accuracy-matrix metrics on hand-made matrices, their identities on random ones, JSON and
//! the heatmap.

use proptest::prelude::*;
use qcl_continual::AccuracyMatrix;
use qcl_tensor::Error;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// A 3-task run: task 0 drops then partly recovers, task 1 drops.
fn example() -> AccuracyMatrix {
    AccuracyMatrix::from_full(vec![
        vec![0.90, 0.10, 0.05],
        vec![0.50, 0.80, 0.20],
        vec![0.70, 0.60, 0.95],
    ])
    .unwrap()
}

#[test]
fn hand_computed_metrics() {
    let a = example();
    assert!(close(
        a.average_accuracy().unwrap(),
        (0.70 + 0.60 + 0.95) / 3.0
    ));
    assert!(close(
        a.average_accuracy_after(1).unwrap(),
        (0.50 + 0.80) / 2.0
    ));
    let incremental = (0.90 + (0.50 + 0.80) / 2.0 + (0.70 + 0.60 + 0.95) / 3.0) / 3.0;
    assert!(close(
        a.average_incremental_accuracy().unwrap(),
        incremental
    ));
    // BWT = ((0.70 − 0.90) + (0.60 − 0.80)) / 2.
    assert!(close(a.backward_transfer().unwrap(), -0.20));
    // f_0 = max(0.90, 0.50) − 0.70 = 0.20; f_1 = 0.80 − 0.60 = 0.20.
    let f = a.forgetting_per_task().unwrap();
    assert!(close(f[0], 0.20) && close(f[1], 0.20) && f.len() == 2);
    assert!(close(a.forgetting().unwrap(), 0.20));
    // FWT = ((0.10 − 0.10) + (0.20 − 0.05)) / 2 with b = [0.1, 0.1, 0.05].
    assert!(close(a.forward_transfer(&[0.1, 0.1, 0.05]).unwrap(), 0.075));
}

#[test]
fn forgetting_uses_the_best_earlier_accuracy_not_the_first() {
    // Task 0 improves after task 1 (0.6 → 0.9) and then falls to 0.5: it forgot 0.4, not 0.1.
    let a =
        AccuracyMatrix::from_lower_triangle(vec![vec![0.6], vec![0.9, 0.8], vec![0.5, 0.8, 0.7]])
            .unwrap();
    let f = a.forgetting_per_task().unwrap();
    assert!(close(f[0], 0.4), "{f:?}");
    assert!(close(f[1], 0.0));
    // BWT compares with the diagonal only: ((0.5 − 0.6) + 0) / 2.
    assert!(close(a.backward_transfer().unwrap(), -0.05));
}

#[test]
fn forgetting_is_negative_when_a_task_ends_above_its_best() {
    let a = AccuracyMatrix::from_lower_triangle(vec![vec![0.5], vec![0.9, 0.8]]).unwrap();
    assert!(close(a.forgetting().unwrap(), -0.4));
    assert!(close(a.backward_transfer().unwrap(), 0.4));
}

#[test]
fn summary_has_what_the_matrix_supports() {
    let single = AccuracyMatrix::from_full(vec![vec![0.7]]).unwrap();
    let s = single.summary(Some(&[0.1])).unwrap();
    assert_eq!(s.average_accuracy, 0.7);
    assert_eq!(
        (s.backward_transfer, s.forgetting, s.forward_transfer),
        (None, None, None)
    );

    let s = example().summary(Some(&[0.1, 0.1, 0.05])).unwrap();
    assert!(close(s.forward_transfer.unwrap(), 0.075));
    assert!(close(s.backward_transfer.unwrap(), -0.20));
    let lower = AccuracyMatrix::from_lower_triangle(vec![vec![0.6], vec![0.4, 0.8]]).unwrap();
    assert!(lower.summary(None).unwrap().forward_transfer.is_none());
    // FWT needs a[j−1][j], which a lower triangle does not hold.
    assert!(matches!(
        lower.summary(Some(&[0.1, 0.1])),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn missing_entries_and_bad_input_are_typed_errors() {
    let mut a = AccuracyMatrix::new(3).unwrap();
    assert!(matches!(
        a.average_accuracy(),
        Err(Error::InvalidParameter { .. })
    ));
    a.set(0, 0, 0.9).unwrap();
    assert_eq!(a.get(0, 0), Some(0.9));
    assert_eq!(a.get(1, 0), None);
    assert_eq!(a.get(7, 0), None);
    assert!(matches!(
        a.set(3, 0, 0.5),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        a.set(0, 1, 1.5),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        a.set(0, 1, -0.1),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        a.set(0, 1, f64::NAN),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        a.backward_transfer(),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        a.average_accuracy_after(3),
        Err(Error::InvalidParameter { .. })
    ));

    assert!(matches!(AccuracyMatrix::new(0), Err(Error::EmptyInput(_))));
    assert!(matches!(
        AccuracyMatrix::from_rows(vec![]),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        AccuracyMatrix::from_full(vec![vec![0.5, 0.5], vec![0.5]]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        AccuracyMatrix::from_lower_triangle(vec![vec![0.5], vec![0.5]]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        AccuracyMatrix::from_full(vec![vec![f64::INFINITY]]),
        Err(Error::NonFinite { .. })
    ));

    let one = AccuracyMatrix::from_full(vec![vec![0.5]]).unwrap();
    assert!(matches!(
        one.forgetting(),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        one.forward_transfer(&[0.1]),
        Err(Error::InvalidParameter { .. })
    ));
    let a = example();
    assert!(matches!(
        a.forward_transfer(&[0.1]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        a.forward_transfer(&[0.1, f64::NAN, 0.1]),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        a.forward_transfer(&[0.1, 2.0, 0.1]),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn json_round_trip_keeps_missing_entries_and_refuses_bad_matrices() {
    let a = AccuracyMatrix::from_lower_triangle(vec![vec![0.25], vec![0.5, 0.75]]).unwrap();
    let json = a.to_json();
    assert_eq!(json, r#"{"accuracy":[[0.25,null],[0.5,0.75]]}"#);
    assert_eq!(AccuracyMatrix::from_json(&json).unwrap(), a);
    for bad in [
        r#"{"accuracy":[[0.25,null],[0.5]]}"#,
        r#"{"accuracy":[[1.25]]}"#,
        r#"{"accuracy":[]}"#,
        r#"{"rows":[[0.5]]}"#,
        "not json",
    ] {
        assert!(AccuracyMatrix::from_json(bad).is_err(), "{bad}");
        // The serde path validates too.
        assert!(
            serde_json::from_str::<AccuracyMatrix>(bad).is_err(),
            "{bad}"
        );
    }
    let summary = example().summary(None).unwrap();
    let text = serde_json::to_string(&summary).unwrap();
    assert!(text.contains("\"forgetting\":"));
    let back: qcl_continual::MetricsSummary = serde_json::from_str(&text).unwrap();
    assert_eq!(back, summary);
}

#[test]
fn json_and_heatmap_files_are_written_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out/accuracy.json");
    let a = AccuracyMatrix::from_lower_triangle(vec![
        vec![0.91],
        vec![0.42, 0.88],
        vec![0.10, 0.35, 0.97],
    ])
    .unwrap();
    a.save_json(&json_path).unwrap();
    let text = std::fs::read_to_string(&json_path).unwrap();
    assert_eq!(AccuracyMatrix::from_json(&text).unwrap(), a);

    let png = dir.path().join("plots/accuracy.png");
    a.save_heatmap_png(&png, "accuracy a[i][j]").unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    assert!(matches!(
        a.save_heatmap_png(dir.path(), "x").err(),
        Some(Error::Io { .. }) | Some(Error::InvalidParameter { .. })
    ));
}

/// A random full T×T matrix with entries in [0, 1].
fn matrix() -> impl Strategy<Value = Vec<Vec<f64>>> {
    (1usize..8).prop_flat_map(|t| prop::collection::vec(prop::collection::vec(0.0..=1.0f64, t), t))
}

proptest! {
    #[test]
    fn metric_bounds_and_identities(rows in matrix(), b_seed in prop::collection::vec(0.0..=1.0f64, 8)) {
        let t = rows.len();
        let a = AccuracyMatrix::from_full(rows.clone()).unwrap();
        let acc = a.average_accuracy().unwrap();
        let last = &rows[t - 1];
        let (lo, hi) = last.iter().fold((1.0f64, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
        prop_assert!(lo - 1e-12 <= acc && acc <= hi + 1e-12);
        let inc = a.average_incremental_accuracy().unwrap();
        prop_assert!((0.0..=1.0 + 1e-12).contains(&inc));
        if t >= 2 {
            let bwt = a.backward_transfer().unwrap();
            let fgt = a.forgetting().unwrap();
            prop_assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&bwt));
            prop_assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&fgt));
            // The maximum in f_j includes a[j][j], so FGT ≥ −BWT.
            prop_assert!(fgt >= -bwt - 1e-12, "fgt {} bwt {}", fgt, bwt);
            // ACC = (Σ_j a[j][j] + (T−1)·BWT) / T.
            let diagonal: f64 = (0..t).map(|j| rows[j][j]).sum();
            prop_assert!((acc - (diagonal + (t - 1) as f64 * bwt) / t as f64).abs() < 1e-9);
            // FWT against b_j = a[j−1][j] is zero; against b = 0 it is the mean of a[j−1][j].
            let own: Vec<f64> = (0..t).map(|j| if j == 0 { 0.0 } else { rows[j - 1][j] }).collect();
            prop_assert!(a.forward_transfer(&own).unwrap().abs() < 1e-12);
            let b = &b_seed[..t];
            let fwt = a.forward_transfer(b).unwrap();
            let expected = (1..t).map(|j| rows[j - 1][j] - b[j]).sum::<f64>() / (t - 1) as f64;
            prop_assert!((fwt - expected).abs() < 1e-12);
        }
        let back = AccuracyMatrix::from_json(&a.to_json()).unwrap();
        prop_assert_eq!(back, a);
    }

    #[test]
    fn forgetting_of_non_increasing_columns(rows in matrix()) {
        // Make every column non-increasing from the diagonal down: learning never helps old
        // tasks. Then forgetting is ≥ 0 per task and FGT = −BWT exactly.
        let t = rows.len();
        prop_assume!(t >= 2);
        let mut rows = rows;
        for i in 1..t {
            let (above, below) = rows.split_at_mut(i);
            for (current, previous) in below[0][..i].iter_mut().zip(&above[i - 1][..i]) {
                *current = current.min(*previous);
            }
        }
        let a = AccuracyMatrix::from_full(rows).unwrap();
        let per_task = a.forgetting_per_task().unwrap();
        prop_assert!(per_task.iter().all(|&f| f >= 0.0));
        prop_assert!((a.forgetting().unwrap() + a.backward_transfer().unwrap()).abs() < 1e-12);
    }

    #[test]
    fn constant_columns_forget_nothing(diagonal in prop::collection::vec(0.0..=1.0f64, 2..8)) {
        let t = diagonal.len();
        let rows: Vec<Vec<f64>> = (0..t).map(|_| diagonal.clone()).collect();
        let a = AccuracyMatrix::from_full(rows).unwrap();
        prop_assert!(a.forgetting().unwrap().abs() < 1e-15);
        prop_assert!(a.backward_transfer().unwrap().abs() < 1e-15);
    }

    #[test]
    fn lower_triangle_supports_every_metric_but_forward_transfer(rows in matrix()) {
        let t = rows.len();
        let lower: Vec<Vec<f64>> = rows.iter().enumerate().map(|(i, r)| r[..=i].to_vec()).collect();
        let a = AccuracyMatrix::from_lower_triangle(lower).unwrap();
        let full = AccuracyMatrix::from_full(rows).unwrap();
        prop_assert_eq!(a.average_accuracy().unwrap(), full.average_accuracy().unwrap());
        if t >= 2 {
            prop_assert_eq!(a.forgetting().unwrap(), full.forgetting().unwrap());
            prop_assert_eq!(a.backward_transfer().unwrap(), full.backward_transfer().unwrap());
            prop_assert!(a.forward_transfer(&vec![0.0; t]).is_err());
        }
    }
}
