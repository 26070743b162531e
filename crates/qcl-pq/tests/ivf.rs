//! The IVF-PQ index: bounded scans equal the exact scan; all lists equal a brute-force ADC
//! over every list; more probes never give a worse answer.

use proptest::prelude::*;
use qcl_pq::index::{IvfPqConfig, IvfPqIndex, Kernel, Metric, Scan, SearchConfig, VectorIndex};
use qcl_tensor::Seed;

fn data(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    Seed::new(seed).rng().normal_vec(n * dim, 0.0, 1.0)
}

/// An IVF-PQ index over `n` random 8-D rows drawn from `seed`, trained briefly, holding them all.
fn index(
    seed: u64,
    n: usize,
    nlist: usize,
    nbits: u32,
    metric: Metric,
    by_residual: bool,
    precomputed_tables: bool,
) -> IvfPqIndex {
    let base = data(seed, n, 8);
    let mut config = IvfPqConfig {
        nlist,
        by_residual,
        precomputed_tables,
        coarse_iterations: 4,
        ..IvfPqConfig::new(4, nbits)
    };
    config.pq.metric = metric;
    config.pq.train_iterations = 4;
    let mut index = IvfPqIndex::train(&base, 8, &config).unwrap();
    index.add(&base).unwrap();
    index
}

fn options(k: usize, nprobe: usize, scan: Scan) -> SearchConfig {
    SearchConfig { k, nprobe, scan }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn bounded_scans_equal_the_exact_scan_and_more_probes_never_hurt(
        seed in 0u64..500,
        nbits in prop::sample::select(vec![4u32, 8]),
        metric in prop::sample::select(vec![Metric::L2, Metric::InnerProduct, Metric::Cosine]),
        by_residual in any::<bool>(),
        k in 1usize..20,
    ) {
        let index = index(seed, 600, 8, nbits, metric, by_residual, true);
        let queries = data(seed + 7, 5, 8);
        let mut previous: Option<Vec<f32>> = None;
        for nprobe in [1, 2, 4, 8] {
            let exact = index.search_with(&queries, &options(k, nprobe, Scan::Exact)).unwrap();
            for kernel in Kernel::available() {
                let bounded = index.search_with(&queries, &options(k, nprobe, Scan::Bounded(kernel))).unwrap();
                prop_assert_eq!(&bounded, &exact);
            }
            // Internal values (smaller is better) of a superset's top k are never worse.
            let internal: Vec<f32> = exact.scores.iter()
                .map(|&s| if metric.higher_is_better() { -s } else { s }).collect();
            if let Some(previous) = &previous {
                prop_assert!(internal.iter().zip(previous).all(|(now, before)| now <= before));
            }
            previous = Some(internal);
        }
    }
}

#[test]
fn every_list_probed_is_a_brute_force_adc_over_the_reconstructions() {
    let index = index(1, 1_200, 6, 8, Metric::L2, true, false);
    let queries = data(2, 10, 8);
    let found = index
        .search_with(&queries, &options(7, 6, Scan::default()))
        .unwrap();
    let pq = index.quantizer();
    for (q, query) in queries.chunks_exact(8).enumerate() {
        let mut all: Vec<(f32, u64)> = Vec::new();
        for l in 0..index.nlist() {
            let (codes, ids) = index.list(l);
            if ids.is_empty() {
                continue;
            }
            let centroid = &index.centroids()[l * 8..(l + 1) * 8];
            let residual: Vec<f32> = query.iter().zip(centroid).map(|(x, c)| x - c).collect();
            let hits = pq.search(&residual, &codes.to_packed(), ids.len()).unwrap();
            all.extend(
                hits.distances
                    .iter()
                    .zip(&hits.indices)
                    .map(|(&d, &i)| (d, ids[i as usize])),
            );
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let expected_ids: Vec<u64> = all[..7].iter().map(|p| p.1).collect();
        let expected_scores: Vec<f32> = all[..7].iter().map(|p| p.0).collect();
        assert_eq!(found.ids_of(q), &expected_ids[..]);
        assert_eq!(found.scores_of(q), &expected_scores[..]);
    }
}

#[test]
fn removal_ids_and_bad_knobs() {
    let mut index = index(3, 500, 4, 4, Metric::L2, true, true);
    assert_eq!(index.len(), 500);
    let base = data(3, 500, 8);
    let first = index
        .search_with(&base[..8], &options(3, 4, Scan::default()))
        .unwrap();
    assert_eq!(index.remove(&first.ids_of(0)[..1]), 1);
    let again = index
        .search_with(&base[..8], &options(3, 4, Scan::default()))
        .unwrap();
    assert_eq!(again.ids_of(0)[..2], first.ids_of(0)[1..]);
    assert!(
        index
            .search_with(&base[..8], &options(3, 5, Scan::default()))
            .is_err(),
        "nprobe > nlist"
    );
    assert!(index
        .search_with(&base[..8], &options(3, 0, Scan::default()))
        .is_err());
    assert!(
        index.add_with_ids(&base[..8], &[3]).is_err(),
        "id 3 is present"
    );
    let config = IvfPqConfig {
        nlist: 501,
        ..IvfPqConfig::new(4, 4)
    };
    assert!(
        IvfPqIndex::train(&base, 8, &config).is_err(),
        "more lists than vectors"
    );
}

#[test]
fn precomputed_tables_give_the_residual_distances_up_to_rounding() {
    let direct = index(4, 1_500, 6, 8, Metric::L2, true, false);
    let precomputed = index(4, 1_500, 6, 8, Metric::L2, true, true);
    assert!(precomputed.precomputed_tables() && !direct.precomputed_tables());
    let queries = data(5, 20, 8);
    let a = direct
        .search_with(&queries, &options(10, 3, Scan::default()))
        .unwrap();
    let b = precomputed
        .search_with(&queries, &options(10, 3, Scan::default()))
        .unwrap();
    for (x, y) in a.scores.iter().zip(&b.scores) {
        assert!((x - y).abs() <= 1e-4 * x.max(1.0), "{x} vs {y}");
    }
    let same = a.ids.iter().zip(&b.ids).filter(|(x, y)| x == y).count();
    assert!(
        same * 10 >= a.ids.len() * 9,
        "{same} of {} ids agree",
        a.ids.len()
    );
}

/// Lists of 8-bit codes long enough for the bounded scan (short ones are scored exactly).
#[test]
fn long_8bit_lists_scanned_bounded_equal_the_exact_scan() {
    for (seed, metric, by_residual) in [
        (1, Metric::L2, true),
        (2, Metric::InnerProduct, true),
        (3, Metric::Cosine, false),
    ] {
        let index = index(seed, 3_000, 2, 8, metric, by_residual, true);
        assert!((0..2).any(|l| index.list(l).1.len() >= 1_100));
        let queries = data(seed + 7, 9, 8);
        for nprobe in [1, 2] {
            let exact = index
                .search_with(&queries, &options(7, nprobe, Scan::Exact))
                .unwrap();
            for kernel in Kernel::available() {
                let bounded = index
                    .search_with(&queries, &options(7, nprobe, Scan::Bounded(kernel)))
                    .unwrap();
                assert_eq!(bounded, exact, "{kernel:?} {metric:?} nprobe {nprobe}");
            }
        }
    }
}
