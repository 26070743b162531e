//! Rank bookkeeping: the initial capacity `r0`, energy-threshold pruning of a task's new
//! components, and the growth rule that sizes the free slots for the next task
//! (docs/methods/cacl.md § Factored layers, § Pruning by energy, § Growth).

use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

/// The initial capacity of a factored `n_out × d` layer: the rank at which the factored
/// parameter count `(n_out + d)·r` matches the dense count `n_out·d`, `⌊n_out·d/(n_out+d)⌋`.
///
/// ```
/// // Net_SVD-S: 1→16 k3, 16→16 k3, 16→32 k3, 32→32 k3, 32→64 k2.
/// let r0: Vec<usize> = [(16, 9), (16, 144), (32, 144), (32, 288), (64, 128)]
///     .iter()
///     .map(|&(n, d)| qcl_cacl::initial_rank(n, d).unwrap())
///     .collect();
/// assert_eq!(r0, [5, 14, 26, 28, 42]);
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] when either side is zero or the rank comes out 0 (a layer
/// with no component could never learn).
pub fn initial_rank(n_out: usize, d: usize) -> Result<usize> {
    if n_out == 0 || d == 0 {
        return Err(Error::invalid_parameter(
            "rank",
            format!("a factored layer needs n_out, d > 0, got {n_out}×{d}"),
        ));
    }
    let r0 = n_out * d / (n_out + d);
    check_rank(r0, &format!("initial rank of a {n_out}×{d} layer"))?;
    Ok(r0)
}

/// Rejects a rank of 0 with a typed error naming `what`.
pub(crate) fn check_rank(rank: usize, what: &str) -> Result<()> {
    if rank == 0 {
        return Err(Error::invalid_parameter(
            "rank",
            format!("{what} is 0; every factored layer needs at least one component"),
        ));
    }
    Ok(())
}

/// Checks that a pruning threshold ε lies in the open interval (0, 1).
///
/// # Errors
/// [`Error::InvalidParameter`] otherwise (NaN included).
pub fn check_threshold(epsilon: f64) -> Result<()> {
    if epsilon > 0.0 && epsilon < 1.0 {
        Ok(())
    } else {
        Err(Error::invalid_parameter(
            "epsilon",
            format!("the energy threshold must lie in (0, 1), got {epsilon}"),
        ))
    }
}

/// Energy-threshold pruning of one task's new singular values `v`
/// (docs/methods/cacl.md § Pruning by energy).
///
/// Sort the energies `v_j²` in descending order, find the smallest `m` whose top-`m` energy
/// reaches `(1 − ε)·E`, and keep every component with `|v_j| ≥ τ = |v|_(m−1)` and `v_j ≠ 0`.
/// Returns the kept indices **in their original order**. `m` is clamped to `v.len()` so
/// rounding can never run past the end (docs/methods/cacl.md § Pruning by energy); an
/// all-zero `v` keeps nothing.
///
/// ```
/// // 99.99% of the energy sits in the 3.0 and 2.0 components.
/// let kept = qcl_cacl::energy_prune(&[0.001, 3.0, 0.0, -2.0], 1e-3).unwrap();
/// assert_eq!(kept, vec![1, 3]);
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for ε outside (0, 1); [`Error::NonFinite`] for a NaN or
/// infinite value.
pub fn energy_prune(v: &[f32], epsilon: f64) -> Result<Vec<usize>> {
    check_threshold(epsilon)?;
    if let Some((index, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::NonFinite {
            context: "singular values to prune".into(),
            index,
            value: f64::from(value),
        });
    }
    let mut energies: Vec<f64> = v.iter().map(|&x| f64::from(x) * f64::from(x)).collect();
    energies.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = energies.iter().sum();
    if total == 0.0 {
        return Ok(Vec::new());
    }
    let target = (1.0 - epsilon) * total;
    let mut running = 0.0;
    let mut m = energies.len();
    for (i, e) in energies.iter().enumerate() {
        running += e;
        if running >= target {
            m = i + 1;
            break;
        }
    }
    let tau = energies[m - 1].sqrt();
    Ok(v.iter()
        .enumerate()
        .filter(|(_, &x)| x != 0.0 && f64::from(x).abs() >= tau)
        .map(|(i, _)| i)
        .collect())
}

/// How many fresh slots a layer gets for the next task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Growth {
    /// No growth: only the pruned slots are recycled, so the capacity never changes
    /// (the CACL-fixed arm).
    Fixed,
    /// The split-dataset rule (CIFAR-100 / miniImageNet / the scaled-down reproduction):
    /// after task `t ≥ 1`, at least `⌊min(mean_{u<t} k_u, r0)⌋` slots.
    #[default]
    MeanCapped,
    /// The 5-sequence rule: after task `t ≥ 1`, at least `r0` slots.
    InitialRank,
}

/// The growth target `g = ⌊min(mean_{u<t} k_u, r0)⌋` from the ranks `k_0..k_{t-1}` of the
/// **previous** tasks (the current task's rank is recorded after this step;
/// docs/methods/cacl.md § Growth, § Invariants the tests check).
/// An empty history (t = 0) gives 0: no growth after the first task.
///
/// ```
/// assert_eq!(qcl_cacl::growth_target(&[4, 8, 9], 18), 7); // mean 7
/// assert_eq!(qcl_cacl::growth_target(&[40, 50], 18), 18); // capped at r0
/// assert_eq!(qcl_cacl::growth_target(&[], 18), 0);
/// ```
pub fn growth_target(previous_ranks: &[usize], r0: usize) -> usize {
    if previous_ranks.is_empty() {
        return 0;
    }
    let sum: usize = previous_ranks.iter().sum();
    // ⌊min(sum/t, r0)⌋ = min(⌊sum/t⌋, r0) for an integer r0.
    (sum / previous_ranks.len()).min(r0)
}

/// Free slots after task `t` for a layer whose capacity was `capacity` and now uses `used`
/// components, given the ranks `k_0..k_{t-1}` of the previous tasks
/// (docs/methods/cacl.md § Growth).
///
/// ```
/// use qcl_cacl::{free_slots, Growth};
/// // Recycled slots only when fewer than the growth target.
/// assert_eq!(free_slots(Growth::MeanCapped, 30, 25, &[4, 8], 18), 6);
/// assert_eq!(free_slots(Growth::MeanCapped, 30, 10, &[4, 8], 18), 20);
/// assert_eq!(free_slots(Growth::Fixed, 30, 25, &[4, 8], 18), 5);
/// ```
pub fn free_slots(
    growth: Growth,
    capacity: usize,
    used: usize,
    previous_ranks: &[usize],
    r0: usize,
) -> usize {
    let recycled = capacity.saturating_sub(used);
    if previous_ranks.is_empty() {
        return recycled;
    }
    match growth {
        Growth::Fixed => recycled,
        Growth::MeanCapped => recycled.max(growth_target(previous_ranks, r0)),
        Growth::InitialRank => recycled.max(r0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R0_NET_SVD: [usize; 5] = [18, 57, 104, 115, 170];

    #[test]
    fn initial_ranks_match_the_golden_values() {
        let net_svd = [(64, 27), (64, 576), (128, 576), (128, 1152), (256, 512)];
        let r0: Vec<usize> = net_svd
            .iter()
            .map(|&(n, d)| initial_rank(n, d).unwrap())
            .collect();
        assert_eq!(r0, R0_NET_SVD);
        assert!(matches!(
            initial_rank(0, 9),
            Err(Error::InvalidParameter { .. })
        ));
        // 1×1: ⌊1/2⌋ = 0 components.
        let err = initial_rank(1, 1).unwrap_err();
        assert!(err.to_string().contains("rank"), "{err}");
    }

    #[test]
    fn thresholds_outside_the_open_unit_interval_are_rejected() {
        for bad in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            let err = energy_prune(&[1.0], bad).unwrap_err();
            assert!(err.to_string().contains("epsilon"), "{err}");
        }
        assert!(energy_prune(&[f32::NAN], 0.1).is_err());
    }

    #[test]
    fn all_zero_keeps_nothing_and_empty_is_fine() {
        assert_eq!(energy_prune(&[0.0; 6], 3e-5).unwrap(), Vec::<usize>::new());
        assert_eq!(energy_prune(&[], 3e-5).unwrap(), Vec::<usize>::new());
    }

    /// docs/methods/cacl.md § Invariants the tests check: the four saved runs of the original
    /// code, `free = capacity − k_19`, `free = max(pruned, g)`.
    #[test]
    #[allow(clippy::needless_range_loop)] // five parallel per-layer tables
    fn growth_rule_matches_the_saved_runs() {
        struct Run {
            k: [usize; 5],
            capacity: [usize; 5],
            g: [usize; 5],
            free: [usize; 5],
        }
        let runs = [
            // miniImageNet λ_sp 0.4
            Run {
                k: [66, 135, 86, 63, 151],
                capacity: [84, 190, 130, 115, 229],
                g: [18, 55, 44, 37, 78],
                free: [18, 55, 44, 52, 78],
            },
            // CIFAR-100 λ_sp 0.4
            Run {
                k: [100, 234, 125, 171, 105],
                capacity: [118, 291, 192, 255, 170],
                g: [18, 57, 67, 84, 53],
                free: [18, 57, 67, 84, 65],
            },
            // CIFAR-100 λ_sp 0.1
            Run {
                k: [181, 519, 546, 597, 692],
                capacity: [199, 576, 650, 712, 862],
                g: R0_NET_SVD,
                free: R0_NET_SVD,
            },
            // miniImageNet λ_sp 0.1
            Run {
                k: [138, 422, 420, 413, 665],
                capacity: [156, 479, 524, 528, 835],
                g: R0_NET_SVD,
                free: R0_NET_SVD,
            },
        ];
        for run in &runs {
            for l in 0..5 {
                assert_eq!(run.capacity[l] - run.k[l], run.free[l]);
                // A history of 19 tasks whose mean is exactly g (or ≥ r0 when capped) gives g.
                let history = vec![run.g[l]; 19];
                assert_eq!(growth_target(&history, R0_NET_SVD[l]), run.g[l]);
                // The pruned count: free where free > g, anything ≤ g otherwise.
                let pruned = if run.free[l] > run.g[l] {
                    run.free[l]
                } else {
                    run.g[l] / 2
                };
                let capacity_before = run.k[l] + pruned;
                assert_eq!(
                    free_slots(
                        Growth::MeanCapped,
                        capacity_before,
                        run.k[l],
                        &history,
                        R0_NET_SVD[l]
                    ),
                    run.free[l]
                );
            }
        }
        // The mean excludes the current task: miniImageNet λ_sp 0.4 layer 1 had k_18 = 61,
        // so a mean over k_0..k_18 is at most 61 and g ≤ k_18 holds for every layer.
        let k18 = [61, 126, 82, 61, 145];
        for (g, k) in runs[0].g.iter().zip(k18) {
            assert!(*g <= k);
        }
    }

    fn energy_kept(v: &[f32], kept: &[usize]) -> f64 {
        kept.iter()
            .map(|&i| f64::from(v[i]) * f64::from(v[i]))
            .sum()
    }

    proptest! {
        #[test]
        fn r0_is_the_break_even_rank(n in 1usize..300, d in 1usize..1200) {
            match initial_rank(n, d) {
                Ok(r) => {
                    prop_assert!((n + d) * r <= n * d);
                    prop_assert!((n + d) * (r + 1) > n * d);
                }
                Err(_) => prop_assert!(n * d < n + d),
            }
        }

        #[test]
        fn pruning_keeps_the_top_energy_in_order(
            v in proptest::collection::vec(-5.0f32..5.0, 0..40),
            eps in 1e-6f64..0.5,
        ) {
            let kept = energy_prune(&v, eps).unwrap();
            // Original order (strictly increasing indices) and no zero kept.
            prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(kept.iter().all(|&i| v[i] != 0.0));
            let total = energy_kept(&v, &(0..v.len()).collect::<Vec<_>>());
            let kept_energy = energy_kept(&v, &kept);
            prop_assert!(kept_energy >= (1.0 - eps) * total - 1e-9 * total);
            // Kept ones are the largest magnitudes: every dropped nonzero is ≤ every kept.
            let min_kept = kept.iter().map(|&i| v[i].abs()).fold(f32::INFINITY, f32::min);
            for (i, x) in v.iter().enumerate() {
                if !kept.contains(&i) {
                    prop_assert!(x.abs() <= min_kept);
                }
            }
            // Minimality: dropping the smallest kept one falls below the bound, unless ties.
            if let Some(&smallest) = kept.iter().min_by(|&&a, &&b| v[a].abs().total_cmp(&v[b].abs())) {
                let ties = kept.iter().filter(|&&i| v[i].abs() == v[smallest].abs()).count();
                if ties == 1 {
                    let without = kept_energy - f64::from(v[smallest]) * f64::from(v[smallest]);
                    prop_assert!(without < (1.0 - eps) * total + 1e-9 * total);
                }
            }
        }

        #[test]
        fn tiny_epsilon_keeps_every_nonzero(v in proptest::collection::vec(0.5f32..5.0, 1..30)) {
            let kept = energy_prune(&v, 1e-12).unwrap();
            prop_assert_eq!(kept, (0..v.len()).collect::<Vec<_>>());
        }

        #[test]
        fn growth_target_is_floor_of_capped_mean(
            history in proptest::collection::vec(0usize..300, 1..25),
            r0 in 1usize..200,
        ) {
            let mean = history.iter().sum::<usize>() as f64 / history.len() as f64;
            let expected = mean.min(r0 as f64).floor() as usize;
            prop_assert_eq!(growth_target(&history, r0), expected);
            // Including the current task's rank would be a different rule.
            let free = free_slots(Growth::MeanCapped, 50, 40, &history, r0);
            prop_assert_eq!(free, 10usize.max(expected));
        }
    }
}
