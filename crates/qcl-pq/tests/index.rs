//! The flat PQ index: bounded scans equal the exact scan, which equals ADC search.

use proptest::prelude::*;
use qcl_pq::index::{
    Kernel, Metric, PqIndex, PqIndexConfig, Scan, SearchConfig, VectorIndex, MISSING_ID,
};
use qcl_pq::{ProductQuantizer, ProductQuantizerConfig};
use qcl_tensor::{squared_distance, Seed};

fn data(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    Seed::new(seed).rng().normal_vec(n * dim, 0.0, 1.0)
}

fn small_index(seed: u64, n: usize, dim: usize, m: usize, nbits: u32, metric: Metric) -> PqIndex {
    let base = data(seed, n, dim);
    let config = PqIndexConfig {
        metric,
        train_iterations: 4,
        ..PqIndexConfig::new(m, nbits)
    };
    let mut index = PqIndex::train(&base, dim, &config).unwrap();
    index.add(&base).unwrap();
    index
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every kernel's bounded scan returns the exact scan's ids and score bits.
    #[test]
    fn bounded_scans_equal_the_exact_scan(
        seed in 0u64..1000,
        n in prop_oneof![300usize..700, 1024usize..2000],
        m in prop::sample::select(vec![1usize, 2, 3, 4, 6]),
        nbits in prop::sample::select(vec![4u32, 8]),
        metric in prop::sample::select(vec![Metric::L2, Metric::InnerProduct, Metric::Cosine]),
        k in 1usize..40,
    ) {
        let index = small_index(seed, n, 12, m, nbits, metric);
        let queries = data(seed + 1, 7, 12);
        let exact = index
            .search_with(&queries, &SearchConfig { k, scan: Scan::Exact, ..Default::default() })
            .unwrap();
        for kernel in Kernel::available() {
            let options = SearchConfig { k, scan: Scan::Bounded(kernel), ..Default::default() };
            let bounded = index.search_with(&queries, &options).unwrap();
            prop_assert_eq!(&bounded.ids, &exact.ids, "{:?}", kernel);
            let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&bounded.scores), bits(&exact.scores));
        }
    }
}

#[test]
fn the_exact_l2_scan_is_the_quantizers_adc_search() {
    let base = data(3, 1_500, 16);
    let pq = ProductQuantizer::train(&base, 16, &ProductQuantizerConfig::new(4, 8)).unwrap();
    let mut index = PqIndex::from_quantizer(pq.clone(), Metric::L2).unwrap();
    index.add(&base).unwrap();
    let queries = data(4, 20, 16);
    let reference = pq.search(&queries, &pq.encode(&base).unwrap(), 10).unwrap();
    let found = index.search(&queries, 10).unwrap();
    let ids: Vec<u64> = reference.indices.iter().map(|&i| u64::from(i)).collect();
    assert_eq!(found.ids, ids);
    assert_eq!(found.scores, reference.distances);
}

#[test]
fn adc_distance_is_the_distance_to_the_reconstruction() {
    let index = small_index(5, 800, 8, 4, 4, Metric::L2);
    let query = data(6, 1, 8);
    let found = index.search(&query, 3).unwrap();
    let packed = index.codes().to_packed();
    let decoded = index.quantizer().decode(&packed).unwrap();
    for (&id, &score) in found.ids_of(0).iter().zip(found.scores_of(0)) {
        let at = index.ids().iter().position(|&i| i == id).unwrap();
        let direct = squared_distance(&query, &decoded[at * 8..(at + 1) * 8]);
        assert!(
            (direct - score).abs() <= 1e-5 * direct.max(1.0),
            "{direct} vs {score}"
        );
    }
}

#[test]
fn inner_product_scores_descend_and_a_vector_finds_itself_under_cosine() {
    let index = small_index(7, 1_000, 16, 8, 8, Metric::Cosine);
    let base = data(7, 1_000, 16);
    let found = index.search(&base[..16 * 5], 4).unwrap();
    for q in 0..5 {
        assert!(found.scores_of(q).windows(2).all(|w| w[0] >= w[1]));
        assert!(
            found.scores_of(q)[0] > 0.9,
            "cosine of a vector with its own code"
        );
    }
    assert!(found.ids_of(0).contains(&0));
}

#[test]
fn removed_ids_are_not_found_and_short_indexes_pad_the_answer() {
    let mut index = small_index(8, 300, 8, 2, 4, Metric::L2);
    let base = data(8, 300, 8);
    let before = index.search(&base[..8], 5).unwrap();
    let gone = before.ids_of(0)[..2].to_vec();
    assert_eq!(index.remove(&gone), 2);
    assert_eq!(index.len(), 298);
    let after = index.search(&base[..8], 5).unwrap();
    assert!(after.ids_of(0).iter().all(|id| !gone.contains(id)));
    assert_eq!(after.ids_of(0)[..3], before.ids_of(0)[2..]);

    index.remove(&(0..300).collect::<Vec<_>>());
    index.add_with_ids(&base[..16], &[40, 41]).unwrap();
    let short = index.search(&base[..8], 3).unwrap();
    assert_eq!(short.ids_of(0)[2], MISSING_ID);
    assert_eq!(short.scores_of(0)[2], f32::INFINITY);
}

#[test]
fn bad_ids_and_queries_are_typed_errors() {
    let mut index = small_index(9, 300, 8, 2, 8, Metric::L2);
    let row = data(9, 2, 8);
    assert!(
        index.add_with_ids(&row, &[1_000, 1_000]).is_err(),
        "repeated id"
    );
    assert!(index.add_with_ids(&row, &[0, 1_001]).is_err(), "id present");
    assert!(
        index.add_with_ids(&row, &[1_002]).is_err(),
        "one id for two rows"
    );
    assert!(index.add_with_ids(&row, &[MISSING_ID, 3_000]).is_err());
    assert!(index.search(&row, 0).is_err());
    assert!(index.search(&row[..5], 1).is_err());
    assert!(index.search(&[f32::NAN; 8], 1).is_err());
    assert!(PqIndex::train(&data(1, 300, 8), 8, &PqIndexConfig::new(2, 6)).is_err());
    let cosine = small_index(9, 300, 8, 2, 8, Metric::Cosine);
    assert!(
        cosine.search(&[0.0; 8], 1).is_err(),
        "a zero query has no direction"
    );
}

#[test]
fn the_answer_does_not_depend_on_the_thread_count() {
    let index = small_index(10, 2_000, 16, 4, 4, Metric::L2);
    let queries = data(11, 64, 16);
    let run = |threads| {
        qcl_tensor::on_threads(threads, || index.search(&queries, 10))
            .unwrap()
            .unwrap()
    };
    assert_eq!(run(1), run(2));
}
