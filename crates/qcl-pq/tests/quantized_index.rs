//! The flat index over any quantizer's codes: the answer of an exact scan of the stored
//! reconstructions, ids kept through removal, typed errors for bad input.

use proptest::prelude::*;
use qcl_pq::index::{Metric, QuantizedIndex, VectorIndex, MISSING_ID};
use qcl_pq::{
    FitQuantizer, KMeans, KMeansConfig, Quantizer, ScalarQuantizer, ScalarQuantizerConfig,
};
use qcl_tensor::{squared_distance, Error, Seed};

/// The `k` best `(internal value, id)` by the definition: every reconstruction scored, sorted.
fn brute_force(
    recon: &[f32],
    ids: &[u64],
    dim: usize,
    query: &[f32],
    metric: Metric,
    k: usize,
) -> Vec<(f32, u64)> {
    let mut scored: Vec<(f32, u64)> = recon
        .chunks(dim)
        .zip(ids)
        .map(|(x, &id)| {
            let v = match metric {
                Metric::L2 => squared_distance(query, x),
                _ => -query.iter().zip(x).map(|(a, b)| a * b).sum::<f32>(),
            };
            (v, id)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.truncate(k);
    scored
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn answers_are_an_exact_scan_of_the_reconstructions(
        seed in 0u64..1000, dim in 1usize..6, bits in 1u32..9, k in 1usize..8, ip in any::<bool>(),
    ) {
        let metric = if ip { Metric::InnerProduct } else { Metric::L2 };
        let data = Seed::new(seed).rng().normal_vec(50 * dim, 0.0, 1.0);
        let sq = ScalarQuantizer::fit(&data, dim, &ScalarQuantizerConfig::new(bits)).unwrap();
        let mut index = QuantizedIndex::new(sq.clone(), metric);
        let ids: Vec<u64> = (0..50).map(|i| 1000 + 3 * i).collect();
        index.add_with_ids(&data, &ids).unwrap();
        let recon = sq.decode(&sq.encode(&data).unwrap()).unwrap();
        let queries = Seed::new(seed + 1).rng().normal_vec(4 * dim, 0.0, 1.0);
        let found = index.search(&queries, k).unwrap();
        for (q, query) in queries.chunks(dim).enumerate() {
            let expected = brute_force(&recon, &ids, dim, query, metric, k);
            let ids: Vec<u64> = expected.iter().map(|e| e.1).collect();
            // Reported scores are the metric's own: inner products come back positive-is-near.
            let scores: Vec<f32> = expected.iter().map(|e| if ip { -e.0 } else { e.0 }).collect();
            prop_assert_eq!(found.ids_of(q).to_vec(), ids);
            prop_assert_eq!(found.scores_of(q).to_vec(), scores);
        }
    }
}

#[test]
fn removal_keeps_the_other_ids_and_their_codes() {
    let dim = 3;
    let data = Seed::new(4).rng().normal_vec(30 * dim, 0.0, 1.0);
    let km = KMeans::fit(&data, dim, None, &KMeansConfig::new(8)).unwrap();
    let mut index = QuantizedIndex::new(km, Metric::L2);
    let added = index.add(&data).unwrap();
    assert_eq!(added, 0..30);
    assert_eq!(index.memory_bytes(), 30 * (1 + 8)); // 3-bit codes take one byte
    assert_eq!(index.remove(&[3, 5, 99]), 2);
    assert_eq!(index.len(), 28);
    let codes = index.codes().unwrap();
    let all = index.quantizer().encode(&data).unwrap();
    for (row, &id) in index.ids().iter().enumerate() {
        assert_eq!(codes.get(row, 0), all.get(id as usize, 0), "id {id}");
    }
    // The next id stays above every id ever added.
    assert_eq!(index.add(&data[..dim]).unwrap(), 30..31);
    // More neighbours asked than stored: the rest are missing.
    let found = index.search(&data[..dim], 40).unwrap();
    assert_eq!(
        found.ids.iter().filter(|&&id| id == MISSING_ID).count(),
        40 - 29
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    let sq = ScalarQuantizer::from_range(4, vec![-1.0; 2], vec![1.0; 2]).unwrap();
    let mut index = QuantizedIndex::new(sq, Metric::Cosine);
    assert!(matches!(
        index.add(&[0.5, 0.5, 0.1]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        index.add(&[0.0, 0.0]),
        Err(Error::InvalidParameter { .. })
    ));
    index.add_with_ids(&[0.5, 0.5], &[7]).unwrap();
    index.add_with_ids(&[0.9, -0.1], &[8]).unwrap();
    assert!(index.add_with_ids(&[0.5, -0.5], &[7]).is_err());
    assert!(index.add_with_ids(&[0.5, -0.5], &[MISSING_ID]).is_err());
    assert!(index.search(&[0.5, 0.5], 0).is_err());
    assert!(matches!(
        index.search(&[f32::NAN, 0.5], 1),
        Err(Error::NonFinite { .. })
    ));
    // Cosine: a query scaled by any positive factor finds the same vector.
    assert_eq!(index.search(&[5.0, 5.0], 1).unwrap().ids[0], 7);
    assert_eq!(index.search(&[0.3, 5.0], 1).unwrap().ids[0], 7);
    assert_eq!(index.search(&[9.0, -1.0], 1).unwrap().ids[0], 8);
    // An empty index answers with missing neighbours.
    let empty = QuantizedIndex::new(index.quantizer().clone(), Metric::L2);
    assert_eq!(
        empty.search(&[0.0, 0.0], 2).unwrap().ids,
        vec![MISSING_ID; 2]
    );
}
