//! Lloyd's assignment step with distance bounds: Hamerly (2010) and Yinyang k-means (Ding et
//! al., ICML 2015), giving exactly the assignments of the plain step.
//!
//! The centroids are split once into `t` groups. Every point keeps, per group, a lower bound
//! `ℓ_g` on its true Euclidean distance to each centroid of the group other than its own. When
//! the centroids move by `δ_j`, `ℓ_g` drops by `max_{j∈g} δ_j` (triangle inequality). At each
//! step the exact distance `s_a` to the point's previous centroid is computed (the objective
//! needs it anyway); a group whose bound proves that every member is *strictly* farther than
//! the best candidate so far (at most `s_a`) is skipped, the others are searched by the exact kernel of `qcl-tensor`, and the best
//! of the searched centroids and the previous one wins, ties to the lowest index. With `t = 1`
//! this is Hamerly's single lower bound.
//!
//! Exactness. The kernel's distance `s` is the `f32` sum `Σ (x_i − c_i)²` in index order, which
//! differs from the true `S` by at most `γ·S + ε` with `γ = γ_{d+2} = (d+2)u/(1−(d+2)u)`,
//! `u = 2⁻²⁴`, and `ε` covering underflow. Bounds are kept on the true distance (rounded
//! down when stored as `f32`) and a group is skipped only if `(1−γ)·ℓ_g² − ε > s_a`, which
//! makes every skipped centroid's kernel distance strictly larger than `s_a`: it could neither
//! win nor tie. So the assignments, the distances, and therefore the centroids and the
//! objective are bit for bit those of plain Lloyd.

use qcl_tensor::{
    nearest_codes_with_group_bounds, squared_distances_to_codes, ExactCodes, Result, TwoNearest,
    DIRECT_MAX_DIM,
};
use rayon::prelude::*;

use crate::kmeans::nearest_in_blocks;
use crate::points::Points;

/// Which assignment step [`KMeans::fit`](crate::KMeans::fit) runs. All give the same
/// assignments, centroids and objective; they differ in how many distances they compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KMeansAlgorithm {
    /// Chosen from `k` and the dimension: Hamerly for `k ≤ 20` or 1-D points, otherwise
    /// Yinyang with `t = clamp(round(k/10), 2, dim)` groups, then at most as many as
    /// [`KMeansConfig::bound_memory_share`](crate::KMeansConfig::bound_memory_share) allows
    /// (plain Lloyd where not even one fits: with the default share and every point used,
    /// points of fewer than 5 dimensions; ask for [`KMeansAlgorithm::Hamerly`] there).
    #[default]
    Auto,
    /// Every point against every centroid at every iteration.
    Lloyd,
    /// One lower bound per point (Hamerly, 2010).
    Hamerly,
    /// `groups` lower bounds per point (Ding et al., 2015); the groups come from a k-means of
    /// the initial centroids. `groups` is capped at `k`.
    Yinyang {
        /// Number of centroid groups `t`.
        groups: usize,
    },
}

impl KMeansAlgorithm {
    /// The number of centroid groups this choice uses for `k` centroids in `dim` dimensions,
    /// or `None` for plain Lloyd.
    ///
    /// ```
    /// use qcl_pq::KMeansAlgorithm;
    /// assert_eq!(KMeansAlgorithm::Auto.groups(256, 784), Some(26));
    /// assert_eq!(KMeansAlgorithm::Auto.groups(256, 9), Some(9));
    /// assert_eq!(KMeansAlgorithm::Auto.groups(16, 9), Some(1));
    /// assert_eq!(KMeansAlgorithm::Lloyd.groups(256, 9), None);
    /// ```
    pub fn groups(self, k: usize, dim: usize) -> Option<usize> {
        match self {
            KMeansAlgorithm::Lloyd => None,
            KMeansAlgorithm::Hamerly => Some(1),
            KMeansAlgorithm::Yinyang { groups } => Some(groups.clamp(1, k.max(1))),
            KMeansAlgorithm::Auto if k <= 20 || dim < 2 => Some(1),
            KMeansAlgorithm::Auto => Some((k / 10 + usize::from(k % 10 >= 5)).clamp(2, dim)),
        }
    }
}

/// The unit roundoff of `f32`.
const UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;
/// A relative step that covers the rounding of the bounds' own `f64` arithmetic.
const F64_SLACK: f64 = 1.0 / (1u64 << 50) as f64;
/// The exact group search costs about three times as much per distance as the plain kernel's
/// GEMM screening (d > 32, Fashion-MNIST pixels) and about four times as much as its direct
/// kernel (d ≤ 32, weight blocks), measured on the k-means benchmark's workloads: a bounded
/// step pays when it computes less than these shares.
const PLAIN_ABOVE: f64 = 0.3;
const PLAIN_ABOVE_SMALL_DIM: f64 = 0.2;
/// Plain steps in a row after which the bounds are dropped: even fresh bounds did not pay.
const GIVE_UP_AFTER: usize = 2;
/// `1 − 2⁻²⁰`: covers one `f32` rounding (at most `2⁻²⁴` relative) with room to spare.
const SHRINK_ROOT: f32 = 1.0 - 1.0 / (1u32 << 20) as f32;

/// The assignment state that survives between Lloyd iterations.
pub(crate) struct BoundedAssign {
    dim: usize,
    /// Group of each centroid, and the members of each group in increasing index order.
    group_of: Vec<u32>,
    members: Vec<Vec<u32>>,
    /// Lower bounds on true distances, `[n, t]`.
    lower: Vec<f32>,
    /// How far each group's centroids moved at most since the last assignment.
    drift: Vec<f64>,
    /// Relative and absolute rounding allowance of a kernel distance (module docs).
    gamma: f64,
    epsilon: f64,
    /// `(1 − 2⁻²⁰)² / (1 + γ)` rounded to `f32`: the factor under the root of `lower_bound`.
    shrink_squared: f32,
    /// Above this predicted share of distances a step searches plainly instead.
    plain_above: f64,
    /// Share of distances the last bounded step computed (1 after a plain step).
    last_share: f64,
    /// Plain steps taken in a row for that reason; at [`GIVE_UP_AFTER`] the bounds are
    /// dropped and every later step is plain.
    plain_fallbacks: usize,
    first: bool,
}

/// Points per parallel work item: a fixed function of `dim` (never of the thread count).
fn chunk_points(dim: usize) -> usize {
    (1 << 18) / (4 * dim).max(1)
}

impl BoundedAssign {
    /// State for `n` points, with the centroids split into groups by `group_of`.
    pub(crate) fn new(n: usize, dim: usize, group_of: Vec<u32>) -> BoundedAssign {
        let t = group_of.iter().map(|&g| g as usize + 1).max().unwrap_or(1);
        let mut members = vec![Vec::new(); t];
        for (j, &g) in group_of.iter().enumerate() {
            members[g as usize].push(j as u32);
        }
        let m = (dim + 2) as f64 * UNIT_ROUNDOFF;
        let gamma = m / (1.0 - m) + F64_SLACK;
        BoundedAssign {
            dim,
            group_of,
            members,
            lower: vec![0.0; n * t],
            drift: vec![0.0; t],
            gamma,
            epsilon: (3 * dim + 3) as f64 * f64::powi(2.0, -149),
            shrink_squared: ((1.0 - 2.0f64.powi(-20)).powi(2) / (1.0 + gamma)) as f32,
            plain_above: if dim <= DIRECT_MAX_DIM {
                PLAIN_ABOVE_SMALL_DIM
            } else {
                PLAIN_ABOVE
            },
            plain_fallbacks: 0,
            last_share: 1.0,
            first: true,
        }
    }

    /// Number of centroid groups `t`.
    pub(crate) fn groups(&self) -> usize {
        self.members.len()
    }

    /// Bytes the bounds take (`n · t` floats).
    pub(crate) fn bound_bytes(&self) -> usize {
        self.lower.len() * std::mem::size_of::<f32>()
    }

    /// Records how far each centroid moved (from `old` to `new`, both `[k, dim]`).
    pub(crate) fn centroids_moved(&mut self, old: &[f32], new: &[f32]) {
        let d = self.dim;
        for (j, (a, b)) in old.chunks(d).zip(new.chunks(d)).enumerate() {
            let moved = distance_f64(a, b) * (1.0 + f64_relative_error(d));
            let g = self.group_of[j] as usize;
            self.drift[g] = self.drift[g].max(moved);
        }
    }

    /// One assignment step: `indices` holds the previous assignment (ignored the first time)
    /// and receives the new one, `distances` the kernel distance to it. Returns how many
    /// point–centroid distances were computed.
    pub(crate) fn assign(
        &mut self,
        points: &Points,
        centroids: &[f32],
        indices: &mut [u32],
        distances: &mut [f32],
    ) -> Result<u64> {
        let d = self.dim;
        let n = indices.len();
        let drift: Vec<f32> = self.drift.iter().map(|&v| round_up(v)).collect();
        self.drift.iter_mut().for_each(|v| *v = 0.0);
        if self.plain_fallbacks >= GIVE_UP_AFTER {
            nearest_in_blocks(points, centroids, indices, distances)?;
            return Ok((n * self.group_of.len()) as u64);
        }
        if !self.first {
            points.for_each_block(|first, rows| {
                let range = first..first + rows.len() / d;
                squared_distances_to_codes(
                    rows,
                    centroids,
                    d,
                    &indices[range.clone()],
                    &mut distances[range],
                )
            })?;
        }
        // The prediction costs a pass over the bounds: skipped while bounded steps stay well
        // below the cut-off.
        let predict = self.last_share > self.plain_above / 2.0;
        if self.first || (predict && self.predicted_share(distances, &drift) > self.plain_above) {
            // Plain search is cheaper: take it, and start the bounds afresh.
            if !self.first {
                self.plain_fallbacks += 1;
            }
            self.last_share = 1.0;
            self.first = false;
            return self.initialize(points, centroids, indices, distances);
        }
        self.plain_fallbacks = 0;
        let group_codes = self
            .members
            .iter()
            .map(|m| {
                let rows: Vec<f32> = m
                    .iter()
                    .flat_map(|&j| &centroids[j as usize * d..(j as usize + 1) * d])
                    .copied()
                    .collect();
                ExactCodes::new(&rows, d)
            })
            .collect::<Result<Vec<_>>>()?;
        let t = self.members.len();
        let chunk = chunk_points(d);
        // Taken out while the chunks write it, so that the rest can be shared.
        let mut lower = std::mem::take(&mut self.lower);
        let step = Step {
            state: self,
            group_codes: &group_codes,
            drift: &drift,
        };
        let mut computed = n as u64;
        points.for_each_block(|first, rows| {
            let range = first..first + rows.len() / d;
            let counts: Vec<Result<u64>> = rows
                .par_chunks(chunk * d)
                .zip(indices[range.clone()].par_chunks_mut(chunk))
                .zip(distances[range.clone()].par_chunks_mut(chunk))
                .zip(lower[range.start * t..range.end * t].par_chunks_mut(chunk * t))
                .map(|(((x, idx), dist), lower)| step.chunk(x, idx, dist, lower))
                .collect();
            for c in counts {
                computed += c?;
            }
            Ok(())
        })?;
        self.lower = lower;
        self.last_share = computed as f64 / (n as f64 * self.group_of.len() as f64);
        Ok(computed)
    }
}

/// One assignment step's read-only view, shared by the parallel chunks.
struct Step<'a> {
    state: &'a BoundedAssign,
    group_codes: &'a [ExactCodes],
    /// Each group's drift, rounded up to `f32`.
    drift: &'a [f32],
}

/// Per point, the best candidate seen so far in a chunk.
#[derive(Clone, Copy)]
struct Best {
    value: f32,
    index: u32,
    /// Group the best came from, and its runner-up there (`None`: the previous centroid,
    /// its group not searched).
    group: Option<(u32, f32)>,
    /// Whether the previous centroid's group was searched.
    old_group_searched: bool,
}

impl Step<'_> {
    /// Assigns one chunk of points; returns the distances computed in group searches.
    fn chunk(
        &self,
        x: &[f32],
        indices: &mut [u32],
        distances: &mut [f32],
        lower: &mut [f32],
    ) -> Result<u64> {
        let s = self.state;
        let (t, m) = (s.members.len(), indices.len());
        let mut best: Vec<Best> = (0..m)
            .map(|p| Best {
                value: distances[p],
                index: indices[p],
                group: None,
                old_group_searched: false,
            })
            .collect();
        // A group is skipped when its bound exceeds the point's threshold (see
        // `skip_threshold`); the threshold falls as better candidates are found.
        let mut threshold: Vec<f32> = best.iter().map(|b| s.skip_threshold(b.value)).collect();
        let active = self.move_bounds(lower, t, &threshold);
        let mut failing: Vec<u32> = Vec::with_capacity(m);
        let mut found: Vec<TwoNearest> = Vec::with_capacity(m);
        let mut computed = 0u64;
        for g in 0..t {
            failing.clear();
            failing.extend(
                active.iter().filter(|&&p| {
                    !proves_farther(lower[p as usize * t + g], threshold[p as usize])
                }),
            );
            if failing.is_empty() {
                continue;
            }
            self.group_codes[g].two_nearest(x, &failing, &mut found)?;
            computed += (failing.len() * s.members[g].len()) as u64;
            for (&p, two) in failing.iter().zip(&found) {
                let p = p as usize;
                let j = s.members[g][two.index as usize];
                lower[p * t + g] = s.lower_bound(two.distance);
                let b = &mut best[p];
                if s.group_of[indices[p] as usize] as usize == g {
                    b.old_group_searched = true;
                }
                // `j == b.index`: the group confirms the previous centroid, and its runner-up
                // is the bound to keep.
                if two.distance < b.value || (two.distance == b.value && j <= b.index) {
                    b.value = two.distance;
                    b.index = j;
                    b.group = Some((g as u32, two.second));
                    threshold[p] = s.skip_threshold(two.distance);
                }
            }
        }
        self.finish(&best, indices, distances, lower);
        Ok(computed)
    }

    /// Lowers every bound of the chunk by its group's drift ([`moved_bound`]) and returns the
    /// points that some group may hold a better centroid for: those whose smallest bound does
    /// not exceed their threshold (Yinyang's global filter).
    fn move_bounds(&self, lower: &mut [f32], t: usize, threshold: &[f32]) -> Vec<u32> {
        let m = threshold.len();
        let mut active = Vec::with_capacity(m);
        for (p, row) in lower.chunks_exact_mut(t).enumerate() {
            let mut smallest = f32::INFINITY;
            for (bound, &drift) in row.iter_mut().zip(self.drift) {
                *bound = moved_bound(*bound, drift);
                smallest = smallest.min(*bound);
            }
            if !proves_farther(smallest, threshold[p]) {
                active.push(p as u32);
            }
        }
        active
    }

    /// Writes the chosen centroids and distances, and the bounds that depend on the choice:
    /// the winner's group keeps its runner-up; a previous centroid left behind in a group that
    /// was not searched becomes an ordinary member of it.
    fn finish(&self, best: &[Best], indices: &mut [u32], distances: &mut [f32], lower: &mut [f32]) {
        let s = self.state;
        let t = s.members.len();
        for (p, b) in best.iter().enumerate() {
            if let Some((g, second)) = b.group {
                lower[p * t + g as usize] = s.lower_bound(second);
                let old = indices[p];
                if old != b.index && !b.old_group_searched {
                    let og = s.group_of[old as usize] as usize;
                    let from_old = s.lower_bound(distances[p]);
                    lower[p * t + og] = lower[p * t + og].min(from_old);
                }
            }
            indices[p] = b.index;
            distances[p] = b.value;
        }
    }
}

impl BoundedAssign {
    /// The smallest `f32` bound `ℓ` for which `ℓ > threshold` proves that every centroid at
    /// true distance `≥ ℓ` has a kernel distance strictly above `s`:
    /// `threshold ≥ √((s + ε)/(1 − γ))`, rounded up.
    fn skip_threshold(&self, s: f32) -> f32 {
        round_up(((f64::from(s) + self.epsilon) / (1.0 - self.gamma)).sqrt() * (1.0 + F64_SLACK))
    }

    /// The share of the `n·k` distances a bounded step would compute at most: per point, the
    /// members of every group whose moved bound does not prove it farther than the previous
    /// centroid.
    fn predicted_share(&self, distances: &[f32], drift: &[f32]) -> f64 {
        let t = self.members.len();
        let sizes: Vec<usize> = self.members.iter().map(Vec::len).collect();
        let searched: usize = self
            .lower
            .par_chunks(t)
            .zip(distances.par_iter())
            .map(|(row, &s)| {
                let threshold = self.skip_threshold(s);
                row.iter()
                    .zip(drift)
                    .zip(&sizes)
                    .filter(|((&bound, &moved), _)| {
                        !proves_farther(moved_bound(bound, moved), threshold)
                    })
                    .map(|(_, &size)| size)
                    .sum::<usize>()
            })
            .sum();
        searched as f64 / (distances.len() * self.group_of.len()) as f64
    }

    /// A lower bound on the true distance whose kernel distance is `s`: `√((s − ε)/(1 + γ))`,
    /// computed in `f32` with each of its three roundings covered by a factor `1 − 2⁻²⁰`.
    fn lower_bound(&self, s: f32) -> f32 {
        // Below this, ε and subnormal rounding matter: the bound is simply 0.
        const TINY: f32 = 1e-30;
        if s <= TINY {
            return 0.0;
        }
        (s.min(f32::MAX) * self.shrink_squared).sqrt() * SHRINK_ROOT
    }

    /// A plain step: the plain kernel's assignment, and bounds afresh. Above
    /// [`DIRECT_MAX_DIM`] they come with the search, from its GEMM screening scores; below,
    /// from the centroids alone (Elkan's lemma): a centroid `j` of group `g` is at least
    /// `‖c_a − c_j‖ − ‖x − c_a‖` away from a point assigned to `a`.
    // Repeats `assign`'s signature: it is `assign`'s plain step, split out to keep each short.
    fn initialize(
        &mut self,
        points: &Points,
        centroids: &[f32],
        indices: &mut [u32],
        distances: &mut [f32],
    ) -> Result<u64> {
        let d = self.dim;
        let t = self.members.len();
        let k = self.group_of.len();
        if d > DIRECT_MAX_DIM {
            let mut lower = std::mem::take(&mut self.lower);
            points.for_each_block(|first, rows| {
                let range = first..first + rows.len() / d;
                nearest_codes_with_group_bounds(
                    rows,
                    centroids,
                    d,
                    &self.group_of,
                    t,
                    &mut indices[range.clone()],
                    &mut distances[range.clone()],
                    &mut lower[range.start * t..range.end * t],
                )
            })?;
            let state = &*self;
            lower
                .par_iter_mut()
                .for_each(|bound| *bound = state.lower_bound(*bound));
            self.lower = lower;
            return Ok((indices.len() * k) as u64);
        }
        nearest_in_blocks(points, centroids, indices, distances)?;
        // `apart[a·t + g] = min_{j∈g, j≠a} ‖c_a − c_j‖`, in f64, shrunk for its rounding, then
        // rounded down to f32.
        let shrink = 1.0 - f64_relative_error(d);
        let mut apart = vec![f32::INFINITY; k * t];
        apart.par_chunks_mut(t).enumerate().for_each(|(a, row)| {
            let ca = &centroids[a * d..(a + 1) * d];
            for (j, cj) in centroids.chunks_exact(d).enumerate() {
                if j != a {
                    let g = self.group_of[j] as usize;
                    row[g] = row[g].min(round_down(distance_f64(ca, cj) * shrink));
                }
            }
        });
        let mut lower = std::mem::take(&mut self.lower);
        let state = &*self;
        lower
            .par_chunks_mut(t)
            .zip(indices.par_iter())
            .zip(distances.par_iter())
            .for_each(|((row, &a), &s)| {
                // The point is at most `upper` from its centroid.
                let upper = state.skip_threshold(s);
                for (bound, &gap) in row.iter_mut().zip(&apart[a as usize * t..]) {
                    *bound = moved_bound(gap, upper);
                }
            });
        self.lower = lower;
        Ok((indices.len() * k) as u64)
    }
}

/// `‖a − b‖` of two `f32` rows, in `f64`.
fn distance_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// A generous bound on the relative error of [`distance_f64`] in `d` dimensions.
fn f64_relative_error(d: usize) -> f64 {
    (d + 4) as f64 * f64::EPSILON
}

/// A lower bound after its centroids moved by at most `drift`: `ℓ − δ` in `f32`, shrunk by 4
/// units of roundoff so that rounding never raises it, and at least 0.
#[inline]
fn moved_bound(bound: f32, drift: f32) -> f32 {
    const SHRINK: f32 = 1.0 - 2.0 * f32::EPSILON;
    ((bound - drift) * SHRINK).max(0.0)
}

/// Whether a group's bound proves all its members strictly farther than the point's
/// threshold allows (see `skip_threshold`).
#[inline]
fn proves_farther(bound: f32, threshold: f32) -> bool {
    bound > threshold
}

/// The smallest `f32` not below `v` (for `v ≥ 0`).
fn round_up(v: f64) -> f32 {
    let f = v as f32;
    if f64::from(f) < v {
        f.next_up()
    } else {
        f
    }
}

/// The largest `f32` not above `v` (for `v ≥ 0`).
fn round_down(v: f64) -> f32 {
    let f = v as f32;
    if f64::from(f) > v {
        f.next_down()
    } else {
        f
    }
}

#[cfg(test)]
#[path = "bounds_tests.rs"]
mod tests;
