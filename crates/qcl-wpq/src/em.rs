//! Activation-aware k-means of one layer's subvectors ("And the bit goes down", Stock et al.,
//! ICLR 2020).
//!
//! Each iteration draws a fresh sample of input patches (or uses one fixed metric), builds the
//! pooled Gram matrix `G = Σ_b X_bᵀX_b`, and runs the E-step on the shared nearest-code kernel
//! in the space where `G` is Euclidean ([`Metric`]), the empty-cluster repair, and the M-step
//! (member mean, weighted by per-subvector weights when given, projected on the excited
//! directions). The iterations run on qcl-pq's one Lloyd loop ([`run_lloyd`], every iteration,
//! no early stop), with the E- and M-steps as its [`LloydStep`].

use indicatif::ProgressBar;
use qcl_pq::{run_lloyd, LloydSchedule, LloydStep, LloydStop};
use qcl_tensor::{nearest_codes, Error, Nearest, Result, Seed, SeededRng};
use serde::{Deserialize, Serialize};

use crate::metric::{metric_of, Metric};
pub use crate::metric::{pooled_gram, MetricSource, PatchSampler};

/// What weight product quantization minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Objective {
    /// `‖W − Ŵ‖²`: plain k-means on the subvectors (`G = I`, the paper's naive PQ).
    Naive,
    /// `‖X(W − Ŵ)‖²` with the layer's recorded inputs, approximated block by block with the
    /// pooled Gram matrix of the input slabs (the paper's method).
    #[default]
    ActivationAware,
    /// The codebook of [`Objective::ActivationAware`], then codes chosen column block by column
    /// block with each block's error pushed onto the blocks not yet quantized through the
    /// inverse Hessian of the inputs (GPTQ, Frantar et al. 2023; GPTVQ, van Baalen et al. 2024).
    ErrorFeedback,
}

/// EM hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmConfig {
    /// Centroids per codebook `K`.
    pub k: usize,
    /// EM iterations.
    pub iterations: usize,
    /// Standard deviation of the empty-cluster split (the paper's 1e-8, raised to 1e-6 of the split
    /// centroid's largest coordinate when that is below f32 resolution).
    pub epsilon: f32,
    /// Seed of the initialisation, the row samples and the repairs.
    pub seed: Seed,
}

impl Default for EmConfig {
    fn default() -> Self {
        EmConfig {
            k: 64,
            iterations: 30,
            epsilon: 1e-8,
            seed: Seed::new(0),
        }
    }
}

/// Result of [`activation_aware_em`].
#[derive(Debug, Clone, PartialEq)]
pub struct EmOutcome {
    /// Codebooks `[groups·K, d]` (group-major).
    pub centroids: Vec<f32>,
    /// Index of every subvector's centroid within its group's codebook.
    pub assignments: Vec<u32>,
    /// Surrogate objective `mean_j (u_j − c_{a_j})ᵀ G_eval (u_j − c_{a_j})` after each
    /// iteration, `G_eval` fixed for the whole run.
    pub objective: Vec<f64>,
    /// Empty clusters repaired in total.
    pub repairs: usize,
}

/// Activation-aware EM (the paper's) of `subvectors` (`[n_sv, d]`), one codebook of `config.k`
/// centroids per group (`groups[j]` < `n_groups`; all zero for one shared codebook).
///
/// ```
/// use qcl_wpq::{activation_aware_em, EmConfig, MetricSource};
/// let u: Vec<f32> = (0..64).map(|i| (i % 8) as f32).collect(); // 32 points in 2-D
/// let out = activation_aware_em(&u, 2, &vec![0; 32], 1, None, MetricSource::Identity,
///     EmConfig { k: 4, iterations: 5, ..Default::default() })?;
/// assert!(out.assignments.iter().all(|&a| a < 4));
/// assert_eq!(*out.objective.last().unwrap(), 0.0); // four distinct points, four centroids
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for `K` larger than a group's number of subvectors, a bad group
/// index or `d = 0`; [`Error::ShapeMismatch`] for an initial codebook of the wrong size;
/// [`Error::NonFinite`] for NaN weights.
// Same arguments as `weighted_em`: both public entry points hand them on to `em` as they are.
pub fn activation_aware_em(
    subvectors: &[f32],
    d: usize,
    groups: &[usize],
    n_groups: usize,
    init: Option<&[f32]>,
    source: MetricSource<'_>,
    config: EmConfig,
) -> Result<EmOutcome> {
    em(
        subvectors,
        d,
        (groups, n_groups),
        init,
        source,
        None,
        config,
    )
}

/// [`activation_aware_em`] with a weight per subvector: the M-step takes weighted member means
/// and the logged objective is weighted (an embedding table whose rows are weighted by token
/// frequency).
///
/// ```
/// use qcl_wpq::{weighted_em, EmConfig, MetricSource};
/// // Two points, one centroid: the weighted mean, three times closer to the heavier point.
/// let out = weighted_em(&[0.0, 4.0], 1, &[0, 0], 1, None, MetricSource::Identity, &[3.0, 1.0],
///     EmConfig { k: 1, iterations: 2, ..Default::default() })?;
/// assert_eq!(out.centroids, vec![1.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`activation_aware_em`], and [`Error::InvalidParameter`] for weights that are not one
/// finite non-negative value per subvector.
#[allow(clippy::too_many_arguments)]
pub fn weighted_em(
    subvectors: &[f32],
    d: usize,
    groups: &[usize],
    n_groups: usize,
    init: Option<&[f32]>,
    source: MetricSource<'_>,
    weights: &[f32],
    config: EmConfig,
) -> Result<EmOutcome> {
    if weights.len() != subvectors.len() / d.max(1)
        || weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
    {
        return Err(Error::invalid_parameter(
            "weights",
            "need one finite, non-negative weight per subvector",
        ));
    }
    em(
        subvectors,
        d,
        (groups, n_groups),
        init,
        source,
        Some(weights),
        config,
    )
}

fn em(
    subvectors: &[f32],
    d: usize,
    (groups, n_groups): (&[usize], usize),
    init: Option<&[f32]>,
    source: MetricSource<'_>,
    weights: Option<&[f32]>,
    config: EmConfig,
) -> Result<EmOutcome> {
    let k = config.k;
    let (n_sv, members) = group_members(subvectors, d, (groups, n_groups), k)?;
    let centroids = initial_centroids(init, subvectors, d, &members, k, config.seed)?;
    let group_points: Vec<Vec<f32>> = members
        .iter()
        .map(|m| {
            m.iter()
                .flat_map(|&j| subvectors[j * d..(j + 1) * d].iter().copied())
                .collect()
        })
        .collect();
    let group_weights: Option<Vec<Vec<f32>>> = weights.map(|w| {
        members
            .iter()
            .map(|m| m.iter().map(|&j| w[j]).collect())
            .collect()
    });
    let eval_metric = metric_of(source, d, &mut config.seed.child_named("eval").rng())?;
    let mut step = EmStep {
        subvectors,
        d,
        k,
        groups,
        members: &members,
        group_points: &group_points,
        group_weights: group_weights.as_deref(),
        weights,
        source,
        epsilon: config.epsilon,
        sample_rng: config.seed.child_named("rows").rng(),
        repair_rng: config.seed.child_named("repair").rng(),
        eval_metric,
        metric: None,
        centroids,
        group_assign: vec![Vec::new(); members.len()],
        assignments: vec![0u32; n_sv],
        objective: Vec::with_capacity(config.iterations),
        repairs: 0,
    };
    let schedule = LloydSchedule {
        max_iter: config.iterations,
        stop: LloydStop::Never,
    };
    run_lloyd(&mut step, &schedule, &ProgressBar::hidden())?;
    let EmStep {
        centroids,
        mut assignments,
        objective,
        repairs,
        ..
    } = step;
    if config.iterations == 0 {
        // Assignments of the initial codebook, so the outcome is always consistent.
        for (g, m) in members.iter().enumerate() {
            let codebook = &centroids[g * k * d..(g + 1) * k * d];
            let found = nearest_codes(&group_points[g], codebook, d, None)?;
            for (&j, &a) in m.iter().zip(&found.indices) {
                assignments[j] = a;
            }
        }
    }
    Ok(EmOutcome {
        centroids,
        assignments,
        objective,
        repairs,
    })
}

/// EM's halves of a Lloyd iteration: the E-step of every group under a metric drawn afresh
/// (with the empty-cluster repair), then the M-step of every group and the surrogate
/// objective under the fixed evaluation metric. Groups are independent, so all E-steps before
/// all M-steps gives what group-by-group alternation gives.
struct EmStep<'a> {
    subvectors: &'a [f32],
    d: usize,
    k: usize,
    groups: &'a [usize],
    members: &'a [Vec<usize>],
    group_points: &'a [Vec<f32>],
    group_weights: Option<&'a [Vec<f32>]>,
    weights: Option<&'a [f32]>,
    source: MetricSource<'a>,
    epsilon: f32,
    sample_rng: SeededRng,
    repair_rng: SeededRng,
    eval_metric: Metric,
    /// The metric of the current iteration's E-step.
    metric: Option<Metric>,
    centroids: Vec<f32>,
    /// Each group's assignment from the last E-step.
    group_assign: Vec<Vec<u32>>,
    assignments: Vec<u32>,
    /// The surrogate objective after each M-step.
    objective: Vec<f64>,
    repairs: usize,
}

impl LloydStep for EmStep<'_> {
    /// Returns the mean E-step distance under the iteration's own metric.
    fn assign(&mut self) -> Result<f64> {
        let (d, k) = (self.d, self.k);
        let metric = metric_of(self.source, d, &mut self.sample_rng)?;
        let mut total = 0.0;
        for (g, points) in self.group_points.iter().enumerate() {
            let codebook = &mut self.centroids[g * k * d..(g + 1) * k * d];
            let points_t = metric.transform(points);
            let (found, fixed) = e_step_with_repair(
                &points_t,
                codebook,
                &metric,
                d,
                self.epsilon,
                &mut self.repair_rng,
            )?;
            self.repairs += fixed;
            total += found.distances.iter().map(|&v| f64::from(v)).sum::<f64>();
            self.group_assign[g] = found.indices;
        }
        self.metric = Some(metric);
        Ok(total / self.assignments.len().max(1) as f64)
    }

    fn update(&mut self) -> Result<()> {
        let (d, k) = (self.d, self.k);
        let metric = self.metric.as_ref().expect("an E-step before every M-step");
        for (g, m) in self.members.iter().enumerate() {
            let codebook = &mut self.centroids[g * k * d..(g + 1) * k * d];
            let w = self.group_weights.map(|w| w[g].as_slice());
            let assign = &self.group_assign[g];
            m_step(&self.group_points[g], w, assign, codebook, metric, d);
            for (&j, &a) in m.iter().zip(assign) {
                self.assignments[j] = a;
            }
        }
        let (s, c, a, groups) = (
            self.subvectors,
            &self.centroids,
            &self.assignments,
            self.groups,
        );
        self.objective.push(match self.weights {
            None => surrogate_objective(s, c, a, groups, k, &self.eval_metric),
            Some(w) => weighted_objective(s, c, a, groups, k, &self.eval_metric, w),
        });
        Ok(())
    }
}

/// Checks the subvectors and their codebook groups; returns the number of subvectors and
/// each group's members (subvector indices, ascending).
fn group_members(
    subvectors: &[f32],
    d: usize,
    (groups, n_groups): (&[usize], usize),
    k: usize,
) -> Result<(usize, Vec<Vec<usize>>)> {
    if d == 0 || !subvectors.len().is_multiple_of(d) {
        return Err(Error::invalid_parameter(
            "block",
            format!(
                "{} values are not whole subvectors of {d}",
                subvectors.len()
            ),
        ));
    }
    qcl_tensor::check_finite_slice("subvectors", subvectors)?;
    let n_sv = subvectors.len() / d;
    if groups.len() != n_sv || groups.iter().any(|&g| g >= n_groups) {
        return Err(Error::invalid_parameter(
            "groups",
            format!("need {n_sv} group indices below {n_groups}"),
        ));
    }
    let members: Vec<Vec<usize>> = (0..n_groups)
        .map(|g| (0..n_sv).filter(|&j| groups[j] == g).collect())
        .collect();
    for (g, m) in members.iter().enumerate() {
        if k == 0 || k > m.len() {
            return Err(Error::invalid_parameter(
                "centroids",
                format!("K = {k} but codebook {g} has only {} subvectors", m.len()),
            ));
        }
    }
    Ok((n_sv, members))
}

/// The first codebooks: `init` (`[groups · K, d]`), or K subvectors of each group drawn
/// uniformly with replacement.
fn initial_centroids(
    init: Option<&[f32]>,
    subvectors: &[f32],
    d: usize,
    members: &[Vec<usize>],
    k: usize,
    seed: Seed,
) -> Result<Vec<f32>> {
    let n_groups = members.len();
    Ok(match init {
        Some(c) => {
            if c.len() != n_groups * k * d {
                return Err(Error::ShapeMismatch {
                    context: "initial centroids".into(),
                    expected: format!("[{}, {d}]", n_groups * k),
                    actual: vec![c.len()],
                });
            }
            c.to_vec()
        }
        None => {
            // K subvectors drawn uniformly with replacement (duplicates are split by the
            // empty-cluster repair at the first E-step).
            let mut rng = seed.child_named("init").rng();
            let mut c = Vec::with_capacity(n_groups * k * d);
            for m in members {
                for _ in 0..k {
                    let j = m[rng.below(m.len())?];
                    c.extend_from_slice(&subvectors[j * d..(j + 1) * d]);
                }
            }
            c
        }
    })
}

/// E-step: nearest centroid under `metric`, on the shared kernel, in the transformed space.
///
/// # Errors
/// As [`nearest_codes`].
pub fn e_step(points_t: &[f32], codebook: &[f32], metric: &Metric, d: usize) -> Result<Vec<u32>> {
    Ok(nearest_under(points_t, codebook, metric, d)?.indices)
}

/// The E-step's nearest centroids and their distances in the transformed space.
fn nearest_under(points_t: &[f32], codebook: &[f32], metric: &Metric, d: usize) -> Result<Nearest> {
    nearest_codes(points_t, &metric.transform(codebook), d, None)
}

fn e_step_with_repair(
    points_t: &[f32],
    codebook: &mut [f32],
    metric: &Metric,
    d: usize,
    epsilon: f32,
    rng: &mut SeededRng,
) -> Result<(Nearest, usize)> {
    let k = codebook.len() / d;
    let mut found = nearest_under(points_t, codebook, metric, d)?;
    let mut repairs = 0;
    // Bounded: a group with fewer than K distinct points cannot fill every cluster.
    for _ in 0..20 * k {
        let mut counts = vec![0usize; k];
        found.indices.iter().for_each(|&a| counts[a as usize] += 1);
        let empty: Vec<usize> = (0..k).filter(|&c| counts[c] == 0).collect();
        if empty.is_empty() {
            break;
        }
        let target = empty[rng.below(empty.len())?];
        let fullest = (0..k)
            .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
            .unwrap_or(0);
        let largest = codebook[fullest * d..(fullest + 1) * d]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        let scale = epsilon.max(1e-6 * largest);
        let noise = rng.normal_vec(d, 0.0, scale);
        for (t, e) in noise.iter().enumerate() {
            let base = codebook[fullest * d + t];
            codebook[target * d + t] = base + e;
            codebook[fullest * d + t] = base - e;
        }
        repairs += 1;
        found = nearest_under(points_t, codebook, metric, d)?;
    }
    Ok((found, repairs))
}

/// M-step: each non-empty cluster's centroid becomes the projected (weighted) mean of its
/// members; a cluster whose members all weigh zero keeps its centroid.
fn m_step(
    points: &[f32],
    weights: Option<&[f32]>,
    assign: &[u32],
    codebook: &mut [f32],
    metric: &Metric,
    d: usize,
) {
    let k = codebook.len() / d;
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0f64; k];
    for (i, (p, &a)) in points.chunks_exact(d).zip(assign).enumerate() {
        let a = a as usize;
        match weights {
            None => {
                counts[a] += 1.0;
                for (s, v) in sums[a * d..(a + 1) * d].iter_mut().zip(p) {
                    *s += f64::from(*v);
                }
            }
            Some(w) => {
                let w = f64::from(w[i]);
                counts[a] += w;
                for (s, v) in sums[a * d..(a + 1) * d].iter_mut().zip(p) {
                    *s += w * f64::from(*v);
                }
            }
        }
    }
    for c in 0..k {
        if counts[c] <= 0.0 {
            continue;
        }
        let mean = &mut sums[c * d..(c + 1) * d];
        mean.iter_mut().for_each(|v| *v /= counts[c]);
        metric.project(mean);
        for (o, v) in codebook[c * d..(c + 1) * d].iter_mut().zip(mean.iter()) {
            *o = *v as f32;
        }
    }
}

/// `mean_j (u_j − c_{a_j})ᵀ G (u_j − c_{a_j})`.
pub fn surrogate_objective(
    subvectors: &[f32],
    centroids: &[f32],
    assignments: &[u32],
    groups: &[usize],
    k: usize,
    metric: &Metric,
) -> f64 {
    let d = metric.dim();
    let n = assignments.len().max(1);
    subvectors
        .chunks_exact(d)
        .zip(assignments)
        .zip(groups)
        .map(|((u, &a), &g)| {
            let c = (g * k + a as usize) * d;
            metric.distance(u, &centroids[c..c + d])
        })
        .sum::<f64>()
        / n as f64
}

/// `Σ_j w_j (u_j − c_{a_j})ᵀ G (u_j − c_{a_j}) / Σ_j w_j`.
fn weighted_objective(
    subvectors: &[f32],
    centroids: &[f32],
    assignments: &[u32],
    groups: &[usize],
    k: usize,
    metric: &Metric,
    weights: &[f32],
) -> f64 {
    let d = metric.dim();
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    subvectors
        .chunks_exact(d)
        .zip(assignments)
        .zip(groups)
        .zip(weights)
        .map(|(((u, &a), &g), &w)| {
            let c = (g * k + a as usize) * d;
            f64::from(w) * metric.distance(u, &centroids[c..c + d])
        })
        .sum::<f64>()
        / total.max(f64::MIN_POSITIVE)
}

/// Per-cluster member counts of one group's assignments.
pub fn cluster_sizes(assignments: &[u32], k: usize) -> Vec<usize> {
    let mut counts = vec![0usize; k];
    assignments
        .iter()
        .for_each(|&a| counts[(a as usize).min(k - 1)] += 1);
    counts
}
