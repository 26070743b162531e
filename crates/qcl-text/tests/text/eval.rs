//! Properties of the fidelity metrics: cosine per row, percentiles, nearest neighbours and
//! retrieval agreement.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use qcl_tensor::{Error, Seed};
use qcl_text::{cosine_summary, nearest_neighbours, percentile, retrieval_agreement, row_cosines};

fn random(rows: usize, dim: usize, seed: u64) -> Tensor {
    let values = Seed::new(seed).rng().normal_vec(rows * dim, 0.0, 1.0);
    Tensor::from_vec(values, (rows, dim), &Device::Cpu).unwrap()
}

fn cosine64(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn row_cosines_are_symmetric_scale_free_and_one_on_themselves(
        rows in 1usize..20, dim in 1usize..40, seed in any::<u64>(), scale in 0.01f32..100.0,
    ) {
        let a = random(rows, dim, seed);
        let b = random(rows, dim, seed.wrapping_add(1));
        let ab = row_cosines(&a, &b).unwrap();
        let ba = row_cosines(&b, &a).unwrap();
        let scaled = row_cosines(&(&a * f64::from(scale)).unwrap(), &b).unwrap();
        for i in 0..rows {
            prop_assert!((ab[i] - ba[i]).abs() < 1e-12);
            prop_assert!((ab[i] - scaled[i]).abs() < 1e-5);
            prop_assert!((-1.0 - 1e-9..=1.0 + 1e-9).contains(&ab[i]));
        }
        let s = cosine_summary(&a, &a).unwrap();
        prop_assert!((s.mean - 1.0).abs() < 1e-9 && (s.min - 1.0).abs() < 1e-9);
        let s = cosine_summary(&a, &b).unwrap();
        prop_assert!(s.min <= s.p1 + 1e-12 && s.p1 <= s.mean + 1e-12);
    }

    #[test]
    fn percentiles_are_monotone_and_bounded(values in proptest::collection::vec(-1e3f64..1e3, 1..50), q in 0.0f64..100.0) {
        let p = percentile(&values, q).unwrap();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        prop_assert!(min <= p && p <= max);
        prop_assert!(p <= percentile(&values, (q + 1.0).min(100.0)).unwrap() + 1e-9);
        prop_assert_eq!(percentile(&values, 0.0).unwrap(), min);
        prop_assert_eq!(percentile(&values, 100.0).unwrap(), max);
    }

    #[test]
    fn nearest_neighbours_are_the_best_cosines_without_the_query(
        rows in 3usize..80, dim in 2usize..24, seed in any::<u64>(), k_frac in 0.0f64..1.0,
    ) {
        let e = random(rows, dim, seed);
        let k = 1 + ((rows - 2) as f64 * k_frac) as usize;
        let queries: Vec<usize> = (0..rows).step_by(3).collect();
        let found = nearest_neighbours(&e, &queries, k).unwrap();
        let m: Vec<Vec<f32>> = e.to_vec2().unwrap();
        for (&q, got) in queries.iter().zip(&found) {
            prop_assert_eq!(got.len(), k);
            prop_assert!(!got.contains(&q));
            let mut distinct = got.clone();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), k);
            // Exact cosines in f64: every neighbour is at least as close as the k-th best
            // non-neighbour, up to f32 rounding in the matrix product.
            let mut exact: Vec<(f64, usize)> = (0..rows).filter(|&i| i != q).map(|i| (cosine64(&m[q], &m[i]), i)).collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let kth = exact[k - 1].0;
            for &i in got {
                prop_assert!(cosine64(&m[q], &m[i]) >= kth - 1e-5);
            }
            // Best first.
            for w in got.windows(2) {
                prop_assert!(cosine64(&m[q], &m[w[0]]) >= cosine64(&m[q], &m[w[1]]) - 1e-5);
            }
        }
    }

    #[test]
    fn retrieval_agreement_is_one_on_itself_and_symmetric(rows in 12usize..60, dim in 2usize..16, seed in any::<u64>()) {
        let a = random(rows, dim, seed);
        let noise = random(rows, dim, seed.wrapping_add(7));
        let b = (&a + (noise * 0.5).unwrap()).unwrap();
        let queries: Vec<usize> = (0..rows).collect();
        let same = retrieval_agreement(&a, &(&a * 2.5).unwrap(), &queries, 10).unwrap();
        prop_assert_eq!(same.mean, 1.0);
        let ab = retrieval_agreement(&a, &b, &queries, 10).unwrap();
        let ba = retrieval_agreement(&b, &a, &queries, 10).unwrap();
        prop_assert_eq!(&ab.per_query, &ba.per_query);
        prop_assert!(ab.per_query.iter().all(|&x| (0.0..=1.0).contains(&x)));
        prop_assert!((ab.mean - ab.per_query.iter().sum::<f64>() / rows as f64).abs() < 1e-12);
    }
}

#[test]
fn unrelated_embeddings_agree_at_chance() {
    // Independent random embeddings share about k/(n−1) of their top-k neighbours.
    let (n, k) = (400, 10);
    let a = random(n, 16, 1);
    let b = random(n, 16, 2);
    let queries: Vec<usize> = (0..n).collect();
    let agreement = retrieval_agreement(&a, &b, &queries, k).unwrap();
    let chance = k as f64 / (n - 1) as f64;
    assert!(
        (agreement.mean - chance).abs() < 0.02,
        "{} vs {chance}",
        agreement.mean
    );
}

#[test]
fn the_metrics_refuse_bad_input_with_typed_errors() {
    let a = random(5, 3, 0);
    let b = random(4, 3, 0);
    assert!(matches!(
        row_cosines(&a, &b),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        retrieval_agreement(&a, &b, &[0], 2),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(
        matches!(nearest_neighbours(&a, &[0], 5), Err(Error::InvalidParameter { ref name, .. }) if name == "k")
    );
    assert!(matches!(
        nearest_neighbours(&a, &[0], 0),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(
        matches!(nearest_neighbours(&a, &[5], 1), Err(Error::InvalidParameter { ref name, .. }) if name == "queries")
    );
    assert!(matches!(
        retrieval_agreement(&a, &a, &[], 1),
        Err(Error::EmptyInput(_))
    ));
    let mut values = vec![0f32; 15];
    values[7] = f32::NAN;
    let nan = Tensor::from_vec(values, (5, 3), &Device::Cpu).unwrap();
    assert!(matches!(
        row_cosines(&a, &nan),
        Err(Error::NonFinite { index: 7, .. })
    ));
    let ints = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    assert!(matches!(
        row_cosines(&ints, &ints),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        percentile(&[1.0], 101.0),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(percentile(&[], 1.0), Err(Error::EmptyInput(_))));
    // A zero row has cosine 0 with anything.
    let zero = Tensor::zeros((5, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(row_cosines(&a, &zero).unwrap(), vec![0.0; 5]);
}

#[test]
fn the_percentile_matches_numpy() {
    // numpy.percentile([0.2, 0.9, 0.5, 0.7, 0.1], 1) = 0.104
    let p = percentile(&[0.2, 0.9, 0.5, 0.7, 0.1], 1.0).unwrap();
    assert!((p - 0.104).abs() < 1e-12, "{p}");
}
