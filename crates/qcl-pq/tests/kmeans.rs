//! k-means: Lloyd's invariants, determinism, bad input.

use proptest::prelude::*;
use qcl_pq::{KMeans, KMeansAlgorithm, KMeansConfig, KMeansInit, MiniBatchKMeans};
use qcl_tensor::{Error, Seed};

/// `centres` Gaussian blobs in `dim` dimensions, `per` points each.
fn blobs(seed: u64, centres: usize, per: usize, dim: usize, spread: f32) -> Vec<f32> {
    let mut rng = Seed(seed).rng();
    let means = rng.uniform_vec(centres * dim, -10.0, 10.0);
    let mut data = Vec::with_capacity(centres * per * dim);
    for _ in 0..per {
        for c in 0..centres {
            let noise = rng.normal_vec(dim, 0.0, spread);
            data.extend(
                means[c * dim..(c + 1) * dim]
                    .iter()
                    .zip(noise)
                    .map(|(m, e)| m + e),
            );
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn objective_never_increases_and_indices_are_below_k(
        seed in any::<u64>(), k in 1usize..24, dim in 1usize..12, plus_plus in any::<bool>(),
    ) {
        let data = blobs(seed, 5, 40, dim, 1.0);
        let params = KMeansConfig {
            max_iter: 12,
            seed: Seed(seed),
            init: if plus_plus { KMeansInit::KMeansPlusPlus } else { KMeansInit::Random },
            ..KMeansConfig::new(k)
        };
        let model = KMeans::fit(&data, dim, None, &params).unwrap();
        for w in model.objective_history.windows(2) {
            prop_assert!(w[1] <= w[0] * (1.0 + 1e-6) + 1e-12, "{:?}", model.objective_history);
        }
        let found = model.assign(&data).unwrap();
        prop_assert!(found.indices.iter().all(|&i| (i as usize) < k));
        prop_assert_eq!(model.centroids.len(), k * dim);
    }
}

#[test]
fn same_seed_same_centroids_with_one_and_two_threads() {
    let data = blobs(3, 8, 500, 9, 0.5);
    let fit = |threads: usize, init| {
        qcl_tensor::on_threads(threads, || {
            let params = KMeansConfig {
                max_iter: 8,
                init,
                n_init: 2,
                ..KMeansConfig::new(32)
            };
            KMeans::fit(&data, 9, None, &params).unwrap()
        })
        .unwrap()
    };
    for init in [KMeansInit::Random, KMeansInit::KMeansPlusPlus] {
        let (a, b) = (fit(1, init), fit(2, init));
        assert_eq!(a.centroids, b.centroids);
        assert_eq!(a.objective_history, b.objective_history);
    }
}

#[test]
fn finds_well_separated_blobs() {
    let data = blobs(11, 4, 200, 3, 0.1);
    let params = KMeansConfig {
        init: KMeansInit::KMeansPlusPlus,
        max_iter: 20,
        ..KMeansConfig::new(4)
    };
    let model = KMeans::fit(&data, 3, None, &params).unwrap();
    // Within-blob variance is 3 · 0.1² = 0.03 per point.
    let mse = model.mse(&data).unwrap();
    assert!(mse < 0.04, "mse {mse}");
}

#[test]
fn a_weight_of_two_counts_as_a_duplicate() {
    let data = [0.0, 1.0, 4.0];
    let params = KMeansConfig::new(1);
    let weighted = KMeans::fit(&data, 1, Some(&[1.0, 1.0, 2.0]), &params).unwrap();
    let duplicated = KMeans::fit(&[0.0, 1.0, 4.0, 4.0], 1, None, &params).unwrap();
    assert_eq!(weighted.centroids, duplicated.centroids);
    assert_eq!(weighted.centroids, vec![2.25]);
}

#[test]
fn tolerance_stops_early_and_restarts_keep_the_best() {
    let data = blobs(5, 3, 100, 2, 0.2);
    let params = KMeansConfig {
        tolerance: 1e-3,
        max_iter: 100,
        ..KMeansConfig::new(3)
    };
    let early = KMeans::fit(&data, 2, None, &params).unwrap();
    assert!(early.iterations < 100, "{}", early.iterations);
    let one = KMeans::fit(
        &data,
        2,
        None,
        &KMeansConfig {
            max_iter: 10,
            ..KMeansConfig::new(6)
        },
    )
    .unwrap();
    let params = KMeansConfig {
        max_iter: 10,
        n_init: 4,
        ..KMeansConfig::new(6)
    };
    let best_of_4 = KMeans::fit(&data, 2, None, &params).unwrap();
    assert!(best_of_4.objective_history.last() <= one.objective_history.last());
}

#[test]
fn subsampling_is_deterministic() {
    let data = blobs(9, 4, 500, 2, 0.3);
    let params = KMeansConfig {
        max_points_per_centroid: Some(10),
        max_iter: 5,
        ..KMeansConfig::new(4)
    };
    let a = KMeans::fit(&data, 2, None, &params).unwrap();
    let b = KMeans::fit(&data, 2, None, &params).unwrap();
    assert_eq!(a.centroids, b.centroids);
    assert_eq!(a.objective_history, b.objective_history);
}

#[test]
fn bad_input_is_a_typed_error() {
    let data = [0.0f32, 1.0, 2.0, 3.0];
    let fit = |data: &[f32], dim, weights: Option<&[f32]>, k| {
        KMeans::fit(data, dim, weights, &KMeansConfig::new(k))
    };
    assert!(matches!(
        fit(&data, 1, None, 0),
        Err(Error::InvalidParameter { .. })
    ));
    let err = fit(&data, 1, None, 5).unwrap_err();
    assert!(
        err.to_string().contains("k = 5") && err.to_string().contains("n = 4"),
        "{err}"
    );
    assert!(matches!(fit(&[], 1, None, 1), Err(Error::EmptyInput(_))));
    assert!(matches!(
        fit(&data, 0, None, 1),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        fit(&data, 3, None, 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        fit(&[0.0, f32::NAN], 1, None, 1),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        fit(&data, 1, Some(&[1.0]), 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        fit(&data, 1, Some(&[1.0, -1.0, 1.0, 1.0]), 1),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        fit(&data, 1, Some(&[0.0; 4]), 1),
        Err(Error::InvalidParameter { .. })
    ));
    let params = KMeansConfig {
        n_init: 0,
        ..KMeansConfig::new(1)
    };
    assert!(KMeans::fit(&data, 1, None, &params).is_err());
    // Out-of-range counts are refused before anything is allocated or looped over.
    for params in [
        KMeansConfig {
            max_iter: usize::MAX,
            ..KMeansConfig::new(1)
        },
        KMeansConfig {
            n_init: usize::MAX,
            ..KMeansConfig::new(1)
        },
        KMeansConfig::new(usize::MAX),
    ] {
        assert!(matches!(
            KMeans::fit(&data, 1, None, &params),
            Err(Error::InvalidParameter { .. })
        ));
    }
    assert!(KMeansAlgorithm::Auto.groups(usize::MAX, 9).is_some());
}

#[test]
fn save_and_load_round_trip_and_refuse_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = blobs(1, 3, 50, 4, 0.5);
    let model = KMeans::fit(
        &data,
        4,
        None,
        &KMeansConfig {
            max_iter: 5,
            ..KMeansConfig::new(3)
        },
    )
    .unwrap();
    let path = dir.path().join("km.safetensors");
    model.save(&path).unwrap();
    let back = KMeans::load(&path).unwrap();
    assert_eq!(back.centroids, model.centroids);
    assert_eq!(back.objective_history, model.objective_history);
    assert_eq!(
        (back.k, back.dim, back.iterations),
        (3, 4, model.iterations)
    );
    std::fs::write(&path, b"nope").unwrap();
    assert!(matches!(KMeans::load(&path), Err(Error::BadFile { .. })));
}

#[test]
fn mini_batch_converges_to_the_blobs() {
    let data = blobs(21, 3, 400, 2, 0.1);
    let mut model = MiniBatchKMeans::from_first_batch(&data[..60 * 2], 2, 3, Seed(4)).unwrap();
    for batch in data.chunks(100 * 2) {
        model.partial_fit(batch, None).unwrap();
    }
    let params = KMeansConfig {
        init: KMeansInit::KMeansPlusPlus,
        ..KMeansConfig::new(3)
    };
    let full = KMeans::fit(&data, 2, None, &params).unwrap();
    let mse_full = full.mse(&data).unwrap();
    let mini = KMeans {
        centroids: model.centroids().to_vec(),
        ..full
    };
    let mse_mini = mini.mse(&data).unwrap();
    assert!(
        mse_mini < mse_full * 1.5 + 0.05,
        "mini {mse_mini} vs full {mse_full}"
    );
    assert!(MiniBatchKMeans::from_first_batch(&data[..4], 2, 3, Seed(0)).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Hamerly, Yinyang and the automatic choice give plain Lloyd's run bit for bit: the
    /// objective after every iteration, the final centroids and the assignments, on data with
    /// planted duplicates and ties (a coarse grid) and with empty clusters to repair.
    #[test]
    fn every_algorithm_gives_plain_lloyds_run(seed in any::<u64>(), n in 20usize..300, dim in 1usize..40, k in 2usize..40) {
        let k = k.min(n);
        let mut rng = Seed(seed).rng();
        let mut data: Vec<f32> = rng.uniform_vec(n * dim, -2.0, 2.0).into_iter().map(|v| v.round()).collect();
        data.copy_within(0..dim * (n / 3), dim * (n - n / 3));
        let run = |algorithm| {
            let params = KMeansConfig { max_iter: 12, max_points_per_centroid: None, seed: Seed(seed), algorithm, ..KMeansConfig::new(k) };
            KMeans::fit(&data, dim, None, &params).unwrap()
        };
        let plain = run(KMeansAlgorithm::Lloyd);
        for algorithm in [KMeansAlgorithm::Auto, KMeansAlgorithm::Hamerly, KMeansAlgorithm::Yinyang { groups: 3 }] {
            let other = run(algorithm);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&other.objective_history), bits(&plain.objective_history), "{:?}", algorithm);
            prop_assert_eq!(&other.centroids, &plain.centroids);
            prop_assert_eq!(other.assign(&data).unwrap().indices, plain.assign(&data).unwrap().indices);
            prop_assert!(other.distance_share.iter().all(|&s| s > 0.0 && s <= 1.0 + 1e-9));
        }
    }
}

#[test]
fn a_subsample_read_in_place_gives_every_algorithm_the_same_centroids() {
    // Half of the points are drawn (k · 15 of 3,000); plain and bounded steps must agree.
    let data = blobs(11, 100, 30, 8, 0.1);
    let fit = |algorithm, bound_memory_share| {
        let params = KMeansConfig {
            max_iter: 8,
            max_points_per_centroid: Some(15),
            // One seed per blob: the centroids settle at once and the bounds pay.
            init: KMeansInit::KMeansPlusPlus,
            algorithm,
            bound_memory_share,
            ..KMeansConfig::new(100)
        };
        KMeans::fit(&data, 8, None, &params).unwrap()
    };
    let plain = fit(KMeansAlgorithm::Lloyd, 0.2);
    assert_eq!(plain.bound_groups, 0);
    for (algorithm, share) in [
        (KMeansAlgorithm::Auto, 1.0),
        (KMeansAlgorithm::Yinyang { groups: 20 }, 0.0),
    ] {
        let bounded = fit(algorithm, share);
        assert_eq!(bounded.centroids, plain.centroids, "{algorithm:?}");
        assert_eq!(bounded.objective_history, plain.objective_history);
        assert!(bounded.bound_groups >= 1, "{algorithm:?}");
        // The bounds skipped distances: the block-wise bounded step really ran.
        let skipped = bounded.distance_share[1..].iter().any(|&s| s < 0.5);
        assert!(skipped, "{algorithm:?} {:?}", bounded.distance_share);
    }
}

#[test]
fn auto_keeps_its_bounds_within_the_memory_share() {
    let data = blobs(5, 40, 50, 16, 1.0);
    let (n, dim) = (data.len() / 16, 16);
    for share in [0.0, 0.05, 0.2, 1.0] {
        let params = KMeansConfig {
            max_iter: 3,
            bound_memory_share: share,
            ..KMeansConfig::new(40)
        };
        let model = KMeans::fit(&data, dim, None, &params).unwrap();
        // Auto wants 4 groups here; the share allows ⌊share · dim⌋ bounds per point.
        let allowed = ((share * (n * dim) as f64) as usize / n).min(4);
        assert_eq!(model.bound_groups, allowed, "share {share}");
        assert_eq!(model.bound_bytes, n * allowed * 4);
        assert!(model.bound_bytes as f64 <= share * (data.len() * 4) as f64);
    }
    let bad = KMeansConfig {
        bound_memory_share: f64::NAN,
        ..KMeansConfig::new(4)
    };
    assert!(matches!(
        KMeans::fit(&data, dim, None, &bad),
        Err(Error::InvalidParameter { .. })
    ));
}
