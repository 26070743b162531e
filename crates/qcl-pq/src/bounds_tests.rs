//! Tests of the bounded assignment step (kept apart from `bounds.rs` for its length).

use super::*;
use crate::kmeans::{repair_empty_clusters, update_centroids};
use crate::points::Points;
use proptest::prelude::*;
use qcl_tensor::{nearest_codes, Seed};

/// Points on a coarse grid with repeated rows (ties and duplicates), and `k` of them
/// (some repeated) as the first centroids.
fn planted(seed: u64, n: usize, dim: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Seed(seed).rng();
    let mut data: Vec<f32> = rng
        .uniform_vec(n * dim, -3.0, 3.0)
        .into_iter()
        .map(|v| (v * 2.0).round() / 2.0)
        .collect();
    for p in (0..n).step_by(5).skip(1) {
        let src = (p / 2) * dim;
        data.copy_within(src..src + dim, p * dim);
    }
    let centroids = (0..k)
        .flat_map(|j| {
            let p = (j * 7 + (seed as usize % 3)) % n;
            data[p * dim..(p + 1) * dim].to_vec()
        })
        .collect();
    (data, centroids)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// At every iteration the bounded step returns the plain kernel's assignment and
    /// distances bit for bit, and every stored bound is at most the true distance to each
    /// centroid of its group other than the point's own.
    #[test]
    fn bounded_steps_equal_plain_lloyd_and_bounds_hold(
        seed in any::<u64>(), n in 8usize..120, dim in 1usize..12, k in 1usize..24, t in 1usize..6,
    ) {
        let k = k.min(n);
        let (data, mut centroids) = planted(seed, n, dim, k);
        // Half the cases read the points as a subset (every other row of a larger array, in
        // small gathered blocks), as a subsampled k-means run does.
        let interleaved: Vec<f32> = data.chunks(dim).flat_map(|r| [r.to_vec(), vec![f32::NAN; dim]]).flatten().collect();
        let points = if seed % 4 < 2 {
            Points::all(&data, dim)
        } else {
            Points::subset(&interleaved, dim, (0..n).map(|i| 2 * i).collect()).with_block_rows(1 + (seed % 13) as usize)
        };
        let group_of: Vec<u32> = (0..k).map(|j| ((j * 5 + 1) % t.min(k)) as u32).collect();
        let group_of = crate::kmeans::compact_labels(group_of);
        let mut state = BoundedAssign::new(n, dim, group_of.clone());
        // Bounded steps throughout (never the plain fallback), half the cases.
        if seed % 2 == 0 {
            state.plain_above = f64::INFINITY;
        }
        let tg = state.members.len();
        let (mut idx, mut dist) = (vec![0u32; n], vec![0f32; n]);
        let mut partials = Vec::new();
        for _ in 0..6 {
            state.assign(&points, &centroids, &mut idx, &mut dist).unwrap();
            let plain = nearest_codes(&data, &centroids, dim, None).unwrap();
            prop_assert_eq!(&idx, &plain.indices);
            prop_assert_eq!(&dist, &plain.distances);
            let old = centroids.clone();
            let w = update_centroids(&points, None, &idx, k, &mut centroids, &mut partials);
            repair_empty_clusters(&mut centroids, dim, w);
            state.centroids_moved(&old, &centroids);
            // Bounds, after the move, against the moved centroids (unless the state gave
            // them up for plain steps).
            let kept = state.plain_fallbacks < GIVE_UP_AFTER;
            for p in (0..n).filter(|_| kept) {
                for g in 0..tg {
                    let bound = f64::from(state.lower[p * tg + g]) - state.drift[g];
                    for &j in &state.members[g] {
                        if j == idx[p] { continue; }
                        let j = j as usize;
                        let truth = data[p * dim..(p + 1) * dim].iter()
                            .zip(&centroids[j * dim..(j + 1) * dim])
                            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                            .sum::<f64>().sqrt();
                        prop_assert!(bound <= truth + 1e-12 * truth, "p {} g {} j {}: {} > {}", p, g, j, bound, truth);
                    }
                }
            }
        }
    }
}

#[test]
fn bounds_skip_most_distances_on_separated_clusters() {
    // 20 tight blobs far apart: after the first step, almost nothing needs searching.
    let mut rng = Seed(3).rng();
    let dim = 4;
    let centres = rng.uniform_vec(20 * dim, -100.0, 100.0);
    let data: Vec<f32> = (0..2000)
        .flat_map(|p| {
            let c = p % 20;
            let noise = rng.normal_vec(dim, 0.0, 0.1);
            (0..dim)
                .map(|i| centres[c * dim + i] + noise[i])
                .collect::<Vec<_>>()
        })
        .collect();
    let mut centroids = data[..20 * dim].to_vec();
    let group_of = (0..20).map(|j| (j % 4) as u32).collect();
    let mut state = BoundedAssign::new(2000, dim, group_of);
    let points = Points::all(&data, dim);
    let (mut idx, mut dist) = (vec![0u32; 2000], vec![0f32; 2000]);
    let first = state
        .assign(&points, &centroids, &mut idx, &mut dist)
        .unwrap();
    assert_eq!(first, 2000 * 20);
    let old = centroids.clone();
    let w = update_centroids(&points, None, &idx, 20, &mut centroids, &mut Vec::new());
    repair_empty_clusters(&mut centroids, dim, w);
    state.centroids_moved(&old, &centroids);
    let second = state
        .assign(&points, &centroids, &mut idx, &mut dist)
        .unwrap();
    // Only the distance to the previous centroid, for (nearly) every point.
    assert!(second < 2000 * 2, "computed {second}");
    assert_eq!(state.bound_bytes(), 2000 * 4 * 4);
}
