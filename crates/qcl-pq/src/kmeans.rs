//! k-means (Lloyd) on the exact nearest-code kernel of qcl-tensor.
//!
//! (Over 600 lines: the model, its parameters, both initialisations, the Lloyd loop with its
//! update and repair, and save/load are one unit; about 130 lines are tests.)

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use qcl_tensor::{
    check_finite_slice, nearest_codes, nearest_codes_into_finite, pairwise_squared_distances,
    write_safetensors, Error, Nearest, Result, SafetensorsFile, Seed, SeededRng, TensorSpec,
};
use rayon::prelude::*;

use crate::bounds::{BoundedAssign, KMeansAlgorithm};
use crate::lloyd::{run_lloyd, LloydSchedule, LloydStep, LloydStop};
use crate::points::Points;
use crate::BestRun;

/// Value of the `format` metadata key of a saved k-means model.
pub const KMEANS_FORMAT: &str = "qcl-kmeans/1";

/// Largest `max_iter` accepted: far beyond any convergence, small enough to allocate for.
pub const MAX_ITERATIONS: usize = 1_000_000;

/// Largest `n_init` accepted.
pub const MAX_RESTARTS: usize = 10_000;

/// Relative perturbation used to split a cluster when repairing an empty one (faiss's value).
const SPLIT_EPS: f32 = 1.0 / 1024.0;

/// How the first centroids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KMeansInit {
    /// `k` distinct points drawn uniformly (faiss's default).
    #[default]
    Random,
    /// Greedy k-means++: each new centroid is the best, by the resulting potential, of
    /// `2 + ⌊ln k⌋` candidates drawn with probability proportional to (weighted) squared
    /// distance to the centroids chosen so far.
    KMeansPlusPlus,
}

/// Every knob of [`KMeans::fit`], each with a default (see [`KMeansConfig::new`]).
///
/// ```
/// use qcl_pq::{KMeansInit, KMeansConfig};
/// let config = KMeansConfig { init: KMeansInit::KMeansPlusPlus, max_iter: 10, ..KMeansConfig::new(16) };
/// assert_eq!(config.n_init, 1);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansConfig {
    /// Number of centroids.
    pub k: usize,
    /// Lloyd iterations at most (default 25, as faiss; at most [`MAX_ITERATIONS`]).
    pub max_iter: usize,
    /// Initialisation (default [`KMeansInit::Random`]).
    pub init: KMeansInit,
    /// Restarts from different seeds; the run with the lowest final objective is kept
    /// (default 1; at most [`MAX_RESTARTS`]).
    pub n_init: usize,
    /// Stop when the objective's relative decrease between iterations falls below this
    /// (default 0: always run `max_iter` iterations, as faiss).
    pub tolerance: f64,
    /// Train on at most `k · max_points_per_centroid` points, drawn at random (default
    /// `Some(256)`, as faiss); `None` uses every point.
    pub max_points_per_centroid: Option<usize>,
    /// Seed of every random choice (default 1234).
    pub seed: Seed,
    /// Show a progress bar on standard error (default false).
    pub show_progress: bool,
    /// Assignment step: plain, or with Hamerly/Yinyang distance bounds (default
    /// [`KMeansAlgorithm::Auto`]); every choice gives the same result.
    pub algorithm: KMeansAlgorithm,
    /// The most memory [`KMeansAlgorithm::Auto`] gives its distance bounds, as a share of the
    /// data's own size (default 0.2): `t` groups on `m` training points take `4·m·t` bytes,
    /// so `t` is capped at `⌊share · n·dim / m⌋`, and below one group the step is plain
    /// (200,000 × 64 points with k = 1024 would otherwise hold 64 bounds per point, as much
    /// memory as the points). Explicit Hamerly or Yinyang choices are not capped.
    pub bound_memory_share: f64,
}

impl KMeansConfig {
    /// The defaults, with `k` centroids.
    pub fn new(k: usize) -> Self {
        KMeansConfig {
            k,
            max_iter: 25,
            init: KMeansInit::Random,
            n_init: 1,
            tolerance: 0.0,
            max_points_per_centroid: Some(256),
            seed: Seed::new(1234),
            show_progress: false,
            algorithm: KMeansAlgorithm::Auto,
            bound_memory_share: 0.2,
        }
    }

    fn validate(&self, n: usize) -> Result<()> {
        if self.k == 0 {
            return Err(Error::invalid_parameter("k", "must be at least 1"));
        }
        if self.k > n {
            return Err(Error::invalid_parameter(
                "k",
                format!("k = {} is larger than the number of points n = {n}", self.k),
            ));
        }
        if self.max_iter > MAX_ITERATIONS {
            return Err(Error::invalid_parameter(
                "max_iter",
                format!("must be at most {MAX_ITERATIONS}, got {}", self.max_iter),
            ));
        }
        if self.n_init == 0 || self.n_init > MAX_RESTARTS {
            return Err(Error::invalid_parameter(
                "n_init",
                format!("must be in 1..={MAX_RESTARTS}, got {}", self.n_init),
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(Error::invalid_parameter(
                "tolerance",
                "must be finite and >= 0",
            ));
        }
        if !(self.bound_memory_share.is_finite() && self.bound_memory_share >= 0.0) {
            return Err(Error::invalid_parameter(
                "bound_memory_share",
                "must be finite and >= 0",
            ));
        }
        if self.max_points_per_centroid == Some(0) {
            return Err(Error::invalid_parameter(
                "max_points_per_centroid",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A trained k-means model: centroids and how the training went.
///
/// ```
/// use qcl_pq::{KMeans, KMeansConfig};
/// // Two well separated groups in 2-D.
/// let data = [0.0, 0.0, 0.1, 0.0, 0.0, 0.1, 5.0, 5.0, 5.1, 5.0, 5.0, 5.1];
/// let model = KMeans::fit(&data, 2, None, &KMeansConfig::new(2))?;
/// let labels = model.assign(&data)?.indices;
/// assert_eq!(labels[0], labels[2]);
/// assert_ne!(labels[0], labels[3]);
/// assert!(model.mse(&data)? < 0.01);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// Centroids, row-major `[k, dim]`.
    pub centroids: Vec<f32>,
    /// Dimension of the points.
    pub dim: usize,
    /// Number of centroids.
    pub k: usize,
    /// Objective (weighted mean squared distance to the assigned centroid) at each iteration's
    /// assignment step, of the kept run.
    pub objective_history: Vec<f64>,
    /// Lloyd iterations run (of the kept run).
    pub iterations: usize,
    /// Wall time of the Lloyd iterations of all runs (not loading, sampling or initialisation);
    /// not saved (0 after [`load`](KMeans::load)), so that files of the same run are identical.
    pub lloyd_seconds: f64,
    /// Empty clusters repaired by splitting (kept run).
    pub empty_cluster_repairs: usize,
    /// Share of the `n·k` point–centroid distances computed at each iteration's assignment
    /// step (kept run): 1 for plain Lloyd, less where distance bounds skip centroids.
    pub distance_share: Vec<f64>,
    /// Bytes of distance bounds held during training (0 for plain Lloyd).
    pub bound_bytes: usize,
    /// Centroid groups the distance bounds used (1: Hamerly; 0: plain Lloyd).
    pub bound_groups: usize,
}

/// Checks data and weights; returns `n`.
pub(crate) fn validate_data(data: &[f32], dim: usize, weights: Option<&[f32]>) -> Result<usize> {
    if dim == 0 {
        return Err(Error::invalid_parameter(
            "dim",
            "points need at least one dimension",
        ));
    }
    if data.is_empty() {
        return Err(Error::EmptyInput("no points".into()));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            context: "points".into(),
            expected: format!("[*, {dim}]"),
            actual: vec![data.len()],
        });
    }
    check_finite_slice("points", data)?;
    let n = data.len() / dim;
    if let Some(w) = weights {
        if w.len() != n {
            return Err(Error::ShapeMismatch {
                context: "weights".into(),
                expected: format!("[{n}]"),
                actual: vec![w.len()],
            });
        }
        check_finite_slice("weights", w)?;
        if let Some(i) = w.iter().position(|&v| v < 0.0) {
            return Err(Error::invalid_parameter(
                "weights",
                format!("weight {i} is negative"),
            ));
        }
        if w.iter().all(|&v| v == 0.0) {
            return Err(Error::invalid_parameter("weights", "all weights are zero"));
        }
    }
    Ok(n)
}

impl KMeans {
    /// Trains `config.k` centroids on `data` (row-major `[n, dim]`), optionally weighted.
    ///
    /// Each Lloyd iteration assigns every point to its nearest centroid (exact, ties to the
    /// lowest index), records the objective, then moves each centroid to the weighted mean of
    /// its points (summed in `f64`, in point order, so the result is the same with any number
    /// of threads). A centroid left without points takes half of the heaviest cluster: a copy
    /// of its centroid, the two perturbed by ±1/1024 in alternating directions.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `k = 0`, `k > n`, `dim = 0`, bad weights or options;
    /// [`Error::EmptyInput`] for no points; [`Error::ShapeMismatch`]; [`Error::NonFinite`].
    pub fn fit(
        data: &[f32],
        dim: usize,
        weights: Option<&[f32]>,
        config: &KMeansConfig,
    ) -> Result<KMeans> {
        let n = validate_data(data, dim, weights)?;
        config.validate(n)?;
        let mut best = BestRun::new();
        let mut lloyd_seconds = 0.0;
        for run in 0..config.n_init {
            let seed = config.seed.child(run as u64);
            let mut rng = seed.rng();
            // Subsample (sorted, so that point order is kept), read in place: no copy.
            let (points, sample_weights) = match config.max_points_per_centroid {
                Some(m) if n > config.k.saturating_mul(m) => {
                    let mut chosen = rng.sample_indices(n, config.k * m)?;
                    chosen.sort_unstable();
                    let w = weights.map(|w| chosen.iter().map(|&i| w[i]).collect::<Vec<f32>>());
                    (
                        Points::subset(data, dim, chosen),
                        w.map(std::borrow::Cow::Owned),
                    )
                }
                _ => (
                    Points::all(data, dim),
                    weights.map(std::borrow::Cow::Borrowed),
                ),
            };
            let sample_weights = sample_weights.as_deref();
            let centroids = match config.init {
                KMeansInit::Random => {
                    let picked = rng.sample_indices(points.len(), config.k)?;
                    picked
                        .iter()
                        .flat_map(|&i| points.row(i).iter().copied())
                        .collect()
                }
                // Seeding reads every point many times: it takes a subsample as one slice.
                KMeansInit::KMeansPlusPlus => kmeans_plus_plus(
                    &points.to_contiguous(),
                    dim,
                    sample_weights,
                    config.k,
                    &mut rng,
                )?,
            };
            let started = Instant::now();
            // Floats of bound memory Auto may use: a share of the caller's data.
            let bound_budget = (config.bound_memory_share * data.len() as f64) as usize;
            let model = lloyd(
                &points,
                sample_weights,
                centroids,
                config,
                run,
                bound_budget,
            )?;
            lloyd_seconds += started.elapsed().as_secs_f64();
            best.offer(model.objective_history.last().copied(), model);
        }
        let mut best = best.into_best().expect("n_init >= 1");
        best.lloyd_seconds = lloyd_seconds;
        Ok(best)
    }

    /// Nearest centroid of each point of `data` (`[n, dim]`).
    ///
    /// # Errors
    /// As [`qcl_tensor::nearest_codes`].
    pub fn assign(&self, data: &[f32]) -> Result<Nearest> {
        nearest_codes(data, &self.centroids, self.dim, None)
    }

    /// Mean over the points of `data` of the squared distance to the nearest centroid.
    ///
    /// # Errors
    /// As [`assign`](KMeans::assign), and [`Error::EmptyInput`] for no points.
    pub fn mse(&self, data: &[f32]) -> Result<f64> {
        if data.is_empty() {
            return Err(Error::EmptyInput("no points".into()));
        }
        let found = self.assign(data)?;
        Ok(found.distances.iter().map(|&v| f64::from(v)).sum::<f64>()
            / found.distances.len() as f64)
    }

    /// Writes the centroids (`centroids`, `f32 [k, dim]`) and the training record as metadata.
    /// The wall time (`lloyd_seconds`) is not written: the same run gives the same bytes.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let centroids = Tensor::from_vec(self.centroids.clone(), (self.k, self.dim), &Device::Cpu)?;
        let metadata = BTreeMap::from([
            ("format".to_string(), KMEANS_FORMAT.to_string()),
            ("iterations".to_string(), self.iterations.to_string()),
            (
                "empty_cluster_repairs".to_string(),
                self.empty_cluster_repairs.to_string(),
            ),
            (
                "objective_history".to_string(),
                serde_json::to_string(&self.objective_history).expect("floats serialise"),
            ),
            (
                "distance_share".to_string(),
                serde_json::to_string(&self.distance_share).expect("floats serialise"),
            ),
            ("bound_bytes".to_string(), self.bound_bytes.to_string()),
            ("bound_groups".to_string(), self.bound_groups.to_string()),
        ]);
        write_safetensors(path, &[("centroids", &centroids)], &metadata)
    }

    /// Reads a model written by [`save`](KMeans::save).
    ///
    /// # Errors
    /// [`Error::BadFile`] for a foreign or truncated file, [`Error::MissingTensor`],
    /// [`Error::ShapeMismatch`] / [`Error::DTypeMismatch`] / [`Error::NonFinite`] for bad
    /// centroids.
    pub fn load(path: impl AsRef<Path>) -> Result<KMeans> {
        let file = SafetensorsFile::open(path.as_ref())?;
        file.require_format(KMEANS_FORMAT, "a k-means model")?;
        let centroids = file.read(
            "centroids",
            &TensorSpec::new().dtype(DType::F32).rank(2).finite(),
            &Device::Cpu,
        )?;
        let (k, dim) = centroids.dims2()?;
        let meta = file.metadata();
        let parse = |key: &str| {
            meta.get(key)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(KMeans {
            centroids: centroids.flatten_all()?.to_vec1::<f32>()?,
            dim,
            k,
            objective_history: meta
                .get("objective_history")
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default(),
            iterations: parse("iterations") as usize,
            lloyd_seconds: 0.0, // a wall time, not part of the file
            empty_cluster_repairs: parse("empty_cluster_repairs") as usize,
            distance_share: meta
                .get("distance_share")
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default(),
            bound_bytes: parse("bound_bytes") as usize,
            bound_groups: parse("bound_groups") as usize,
        })
    }
}

/// Lloyd iterations from `centroids` ([`run_lloyd`] over a [`KMeansStep`]).
fn lloyd(
    points: &Points,
    weights: Option<&[f32]>,
    centroids: Vec<f32>,
    config: &KMeansConfig,
    run: usize,
    bound_budget: usize,
) -> Result<KMeans> {
    let (n, dim) = (points.len(), points.dim());
    let k = config.k;
    let bar = if config.show_progress {
        let bar = ProgressBar::new(config.max_iter as u64);
        bar.set_style(
            ProgressStyle::with_template("k-means run {msg} [{elapsed}] {bar:30} {pos}/{len} it")
                .expect("template"),
        );
        bar.set_message(format!("{}/{}", run + 1, config.n_init));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut step = KMeansStep {
        points,
        weights,
        total_weight: weights.map_or(n as f64, |w| w.iter().map(|&v| f64::from(v)).sum()),
        assign: AssignStep::new(n, dim, &centroids, config, bound_budget)?,
        centroids,
        previous: Vec::new(),
        indices: vec![0u32; n],
        distances: vec![0f32; n],
        partials: Vec::new(),
        distance_share: Vec::with_capacity(config.max_iter.min(1 << 12)),
        repairs: 0,
    };
    let schedule = LloydSchedule {
        max_iter: config.max_iter,
        stop: LloydStop::Relative {
            tolerance: config.tolerance,
        },
    };
    let history = run_lloyd(&mut step, &schedule, &bar)?;
    bar.finish_and_clear();
    Ok(KMeans {
        dim,
        k,
        iterations: history.len(),
        objective_history: history,
        lloyd_seconds: 0.0,
        empty_cluster_repairs: step.repairs,
        bound_bytes: step.assign.bound_bytes(),
        bound_groups: step.assign.groups(),
        distance_share: step.distance_share,
        centroids: step.centroids,
    })
}

/// k-means' halves of a Lloyd iteration: nearest centroid (plain or bounded), then the
/// (weighted) mean with empty clusters repaired.
struct KMeansStep<'a> {
    points: &'a Points<'a>,
    weights: Option<&'a [f32]>,
    total_weight: f64,
    assign: AssignStep,
    centroids: Vec<f32>,
    /// The centroids before the last update, for the bounds' drift.
    previous: Vec<f32>,
    indices: Vec<u32>,
    distances: Vec<f32>,
    /// The update's per-chunk sums, allocated once: fresh multi-megabyte buffers at every
    /// iteration cost more in page faults than the sums themselves.
    partials: Vec<Vec<f64>>,
    distance_share: Vec<f64>,
    repairs: usize,
}

impl LloydStep for KMeansStep<'_> {
    fn assign(&mut self) -> Result<f64> {
        let (n, k) = (self.points.len(), self.centroids.len() / self.points.dim());
        let (points, centroids) = (self.points, &self.centroids);
        let (indices, distances) = (&mut self.indices, &mut self.distances);
        // How many point–centroid distances were computed.
        let computed = match &mut self.assign {
            AssignStep::Plain => {
                // The data was checked once by `fit`.
                nearest_in_blocks(points, centroids, indices, distances)?;
                (indices.len() * k) as u64
            }
            AssignStep::Bounded(state) => state.assign(points, centroids, indices, distances)?,
        };
        self.distance_share
            .push(computed as f64 / (n as f64 * k as f64));
        let sum: f64 = match self.weights {
            None => self.distances.iter().map(|&v| f64::from(v)).sum(),
            Some(w) => self
                .distances
                .iter()
                .zip(w)
                .map(|(&v, &w)| f64::from(v) * f64::from(w))
                .sum(),
        };
        Ok(sum / self.total_weight)
    }

    fn update(&mut self) -> Result<()> {
        let (dim, k) = (self.points.dim(), self.centroids.len() / self.points.dim());
        self.previous.clone_from(&self.centroids);
        let cluster_weights = update_centroids(
            self.points,
            self.weights,
            &self.indices,
            k,
            &mut self.centroids,
            &mut self.partials,
        );
        self.repairs += repair_empty_clusters(&mut self.centroids, dim, cluster_weights);
        self.assign.centroids_moved(&self.previous, &self.centroids);
        Ok(())
    }
}

/// The assignment step of one Lloyd run.
enum AssignStep {
    Plain,
    Bounded(BoundedAssign),
}

impl AssignStep {
    /// The step `config.algorithm` names for `n` points and these initial centroids, `Auto`
    /// within `bound_budget` floats of bounds; Yinyang's groups come from a short plain
    /// k-means of the centroids.
    fn new(
        n: usize,
        dim: usize,
        centroids: &[f32],
        config: &KMeansConfig,
        bound_budget: usize,
    ) -> Result<Self> {
        let k = config.k;
        let Some(mut t) = config.algorithm.groups(k, dim) else {
            return Ok(AssignStep::Plain);
        };
        if config.algorithm == KMeansAlgorithm::Auto {
            t = t.min(bound_budget / n.max(1));
            if t == 0 {
                return Ok(AssignStep::Plain);
            }
        }
        let group_of = if t <= 1 {
            vec![0; k]
        } else {
            let grouping = KMeansConfig {
                max_iter: 5,
                max_points_per_centroid: None,
                seed: config.seed.child(u64::MAX),
                algorithm: KMeansAlgorithm::Lloyd,
                ..KMeansConfig::new(t)
            };
            let groups = KMeans::fit(centroids, dim, None, &grouping)?;
            compact_labels(groups.assign(centroids)?.indices)
        };
        Ok(AssignStep::Bounded(BoundedAssign::new(n, dim, group_of)))
    }

    fn centroids_moved(&mut self, old: &[f32], new: &[f32]) {
        if let AssignStep::Bounded(state) = self {
            state.centroids_moved(old, new);
        }
    }

    fn bound_bytes(&self) -> usize {
        match self {
            AssignStep::Plain => 0,
            AssignStep::Bounded(state) => state.bound_bytes(),
        }
    }

    fn groups(&self) -> usize {
        match self {
            AssignStep::Plain => 0,
            AssignStep::Bounded(state) => state.groups(),
        }
    }
}

/// The plain kernel's nearest centroid of every point, a block of points at a time.
pub(crate) fn nearest_in_blocks(
    points: &Points,
    centroids: &[f32],
    indices: &mut [u32],
    distances: &mut [f32],
) -> Result<()> {
    let dim = points.dim();
    points.for_each_block(|first, rows| {
        let range = first..first + rows.len() / dim;
        nearest_codes_into_finite(
            rows,
            centroids,
            dim,
            None,
            &mut indices[range.clone()],
            &mut distances[range],
        )
    })
}

/// Labels renumbered `0, 1, …` in order of first appearance, so that no group is empty.
pub(crate) fn compact_labels(labels: Vec<u32>) -> Vec<u32> {
    let mut map = BTreeMap::new();
    labels
        .into_iter()
        .map(|l| {
            let next = map.len() as u32;
            *map.entry(l).or_insert(next)
        })
        .collect()
}

/// Moves each centroid to the weighted mean of its points; returns each cluster's weight.
/// Empty clusters keep their old centroid (the repair replaces it).
///
/// The points are cut into a number of chunks that depends only on `n`, `k` and `dim` (never
/// on the thread count); each chunk sums its points per cluster in `f64`, in point order, and
/// the chunks' sums are added in chunk order: the same result with any number of threads.
pub(crate) fn update_centroids(
    points: &Points,
    weights: Option<&[f32]>,
    assignment: &[u32],
    k: usize,
    centroids: &mut [f32],
    partials: &mut Vec<Vec<f64>>,
) -> Vec<f64> {
    const PARTIAL_BUDGET_BYTES: usize = 32 << 20;
    let (n, dim) = (assignment.len(), points.dim());
    let width = dim + 1; // the sums, then the weight
    let chunks = (PARTIAL_BUDGET_BYTES / (8 * k * width))
        .clamp(1, 64)
        .min(n.max(1));
    let chunk_len = n.div_ceil(chunks).max(1);
    let chunks = n.div_ceil(chunk_len);
    // The chunks are summed a wave at a time into reused buffers and added in chunk order: the
    // buffers hold one wave, not every chunk, and the wave's size (from the thread count)
    // changes no bit of the result.
    let wave = (2 * rayon::current_num_threads()).clamp(1, chunks.max(1));
    partials.resize_with(wave, Vec::new);
    partials.truncate(wave);
    let mut total = vec![0f64; k * width];
    for wave_start in (0..chunks).step_by(wave) {
        let count = wave.min(chunks - wave_start);
        assignment
            .par_chunks(chunk_len)
            .skip(wave_start)
            .take(count)
            .zip(partials[..count].par_iter_mut())
            .enumerate()
            .for_each(|(j, (labels, acc))| {
                acc.clear();
                acc.resize(k * width, 0.0);
                let first = (wave_start + j) * chunk_len;
                for (offset, &a) in labels.iter().enumerate() {
                    let i = first + offset;
                    let w = weights.map_or(1.0, |w| f64::from(w[i]));
                    let slot = &mut acc[a as usize * width..(a as usize + 1) * width];
                    for (s, &x) in slot[..dim].iter_mut().zip(points.row(i)) {
                        *s += w * f64::from(x);
                    }
                    slot[dim] += w;
                }
            });
        for partial in &partials[..count] {
            for (t, p) in total.iter_mut().zip(partial) {
                *t += p;
            }
        }
    }
    centroids
        .chunks_mut(dim)
        .zip(total.chunks(width))
        .map(|(centroid, sums)| {
            let weight = sums[dim];
            if weight > 0.0 {
                for (c, s) in centroid.iter_mut().zip(&sums[..dim]) {
                    *c = (s / weight) as f32;
                }
            }
            weight
        })
        .collect()
}

/// Gives every cluster of zero weight half of the currently heaviest cluster (ties: lowest
/// index): a copy of its centroid, the pair pushed apart by a relative ±1/1024 in alternating
/// directions per dimension (by 1/1024 of the centroid's RMS where a component is zero).
/// Returns how many clusters were repaired.
pub(crate) fn repair_empty_clusters(
    centroids: &mut [f32],
    dim: usize,
    mut weights: Vec<f64>,
) -> usize {
    let mut repaired = 0;
    for empty in 0..weights.len() {
        if weights[empty] > 0.0 {
            continue;
        }
        let (heaviest, &w) =
            weights
                .iter()
                .enumerate()
                .fold((0, &f64::NEG_INFINITY), |best, cur| {
                    if *cur.1 > *best.1 {
                        cur
                    } else {
                        best
                    }
                });
        if w <= 0.0 {
            break;
        }
        let source: Vec<f32> = centroids[heaviest * dim..(heaviest + 1) * dim].to_vec();
        let rms = (source.iter().map(|v| v * v).sum::<f32>() / dim as f32).sqrt();
        let fallback = if rms > 0.0 { rms } else { 1.0 };
        for (l, &value) in source.iter().enumerate() {
            let delta = if value != 0.0 {
                value.abs() * SPLIT_EPS
            } else {
                fallback * SPLIT_EPS
            };
            let sign = if l % 2 == 0 { 1.0 } else { -1.0 };
            centroids[empty * dim + l] = value + sign * delta;
            centroids[heaviest * dim + l] = value - sign * delta;
        }
        weights[empty] = w / 2.0;
        weights[heaviest] = w - w / 2.0;
        repaired += 1;
    }
    repaired
}

/// Greedy k-means++ seeding: `k` rows of `data`, distinct whenever the points are.
pub(crate) fn kmeans_plus_plus(
    data: &[f32],
    dim: usize,
    weights: Option<&[f32]>,
    k: usize,
    rng: &mut SeededRng,
) -> Result<Vec<f32>> {
    let n = data.len() / dim;
    let weight = |i: usize| weights.map_or(1.0, |w| f64::from(w[i]));
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    // First centre: drawn with probability proportional to weight.
    let first = draw_proportional(&(0..n).map(weight).collect::<Vec<_>>(), rng)?;
    let mut chosen = vec![first];
    let mut min_dist: Vec<f32> = pairwise_squared_distances(data, row(first), dim)?;
    min_dist[first] = 0.0;
    let trials = 2 + (k as f64).ln().floor() as usize;
    let mut masses = vec![0f64; n];
    while chosen.len() < k {
        for (i, m) in masses.iter_mut().enumerate() {
            *m = weight(i) * f64::from(min_dist[i]);
        }
        let candidates: Vec<usize> = if masses.iter().all(|&m| m <= 0.0) {
            // Every point coincides with a centre: take any point not chosen yet.
            let rest: Vec<usize> = (0..n).filter(|i| !chosen.contains(i)).collect();
            vec![rest[rng.below(rest.len())?]]
        } else {
            (0..trials)
                .map(|_| draw_proportional(&masses, rng))
                .collect::<Result<_>>()?
        };
        let rows: Vec<f32> = candidates
            .iter()
            .flat_map(|&c| row(c).iter().copied())
            .collect();
        let dists = pairwise_squared_distances(data, &rows, dim)?;
        let m = candidates.len();
        let mut best: Option<(f64, usize)> = None;
        for t in 0..m {
            let potential: f64 = (0..n)
                .map(|i| weight(i) * f64::from(min_dist[i].min(dists[i * m + t])))
                .sum();
            if best.is_none_or(|(p, _)| potential < p) {
                best = Some((potential, t));
            }
        }
        let t = best.expect("at least one candidate").1;
        for i in 0..n {
            min_dist[i] = min_dist[i].min(dists[i * m + t]);
        }
        min_dist[candidates[t]] = 0.0;
        chosen.push(candidates[t]);
    }
    Ok(chosen
        .iter()
        .flat_map(|&c| row(c).iter().copied())
        .collect())
}

/// An index drawn with probability proportional to `masses` (zero masses are never drawn).
fn draw_proportional(masses: &[f64], rng: &mut SeededRng) -> Result<usize> {
    let total: f64 = masses.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return Err(Error::invalid_parameter(
            "weights",
            "no positive mass to draw from",
        ));
    }
    let target = f64::from(rng.uniform()) * total;
    let mut acc = 0.0;
    let mut last_positive = 0;
    for (i, &m) in masses.iter().enumerate() {
        if m > 0.0 {
            acc += m;
            last_positive = i;
            if acc > target {
                return Ok(i);
            }
        }
    }
    Ok(last_positive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn kmeans_plus_plus_never_picks_a_point_twice(seed in any::<u64>(), n in 1usize..60, dim in 1usize..5) {
            // Distinct points: a grid walk with a random offset.
            let mut rng = Seed(seed).rng();
            let offset = rng.uniform_vec(dim, -1.0, 1.0);
            let data: Vec<f32> = (0..n).flat_map(|i| (0..dim).map({ let o = offset.clone(); move |l| i as f32 * (l + 1) as f32 + o[l] })).collect();
            let k = n.min(1 + (seed % 60) as usize);
            let centroids = kmeans_plus_plus(&data, dim, None, k, &mut rng).unwrap();
            let mut rows: Vec<Vec<u32>> = centroids.chunks(dim).map(|r| r.iter().map(|v| v.to_bits()).collect()).collect();
            rows.sort();
            rows.dedup();
            prop_assert_eq!(rows.len(), k);
        }

        #[test]
        fn repair_leaves_no_empty_cluster(seed in any::<u64>(), k in 1usize..20, dim in 1usize..6, empties in any::<u32>()) {
            let mut rng = Seed(seed).rng();
            let mut centroids = rng.uniform_vec(k * dim, -2.0, 2.0);
            let mut weights: Vec<f64> = (0..k).map(|c| if empties >> (c % 32) & 1 == 1 { 0.0 } else { 1.0 + c as f64 }).collect();
            if weights.iter().all(|&w| w == 0.0) { weights[0] = 3.0; }
            let before = weights.iter().filter(|&&w| w == 0.0).count();
            let repaired = repair_empty_clusters(&mut centroids, dim, weights.clone());
            prop_assert_eq!(repaired, before);
            // Recompute the weights the repair hands out: every cluster ends with a share.
            let mut w = weights;
            for e in 0..k {
                if w[e] == 0.0 {
                    let h = (0..k).fold(0, |b, c| if w[c] > w[b] { c } else { b });
                    let half = w[h] / 2.0;
                    w[e] = half;
                    w[h] -= half;
                }
            }
            prop_assert!(w.iter().all(|&x| x > 0.0));
            prop_assert!(centroids.iter().all(|v| v.is_finite()));
        }
    }

    /// The definition the wave-by-wave sums must equal bit for bit: every chunk's sums in
    /// point order, then the chunks added in order.
    fn sums_by_definition(data: &[f32], dim: usize, labels: &[u32], k: usize) -> Vec<f32> {
        let n = labels.len();
        let width = dim + 1;
        let chunks = ((32usize << 20) / (8 * k * width))
            .clamp(1, 64)
            .min(n.max(1));
        let chunk_len = n.div_ceil(chunks).max(1);
        let mut total = vec![0f64; k * width];
        for (c, chunk) in labels.chunks(chunk_len).enumerate() {
            let mut acc = vec![0f64; k * width];
            for (o, &a) in chunk.iter().enumerate() {
                let i = c * chunk_len + o;
                let slot = &mut acc[a as usize * width..(a as usize + 1) * width];
                for (s, &x) in slot[..dim].iter_mut().zip(&data[i * dim..(i + 1) * dim]) {
                    *s += f64::from(x);
                }
                slot[dim] += 1.0;
            }
            for (t, p) in total.iter_mut().zip(&acc) {
                *t += p;
            }
        }
        total
            .chunks(width)
            .flat_map(|s| {
                s[..dim].iter().map(move |&v| {
                    if s[dim] > 0.0 {
                        (v / s[dim]) as f32
                    } else {
                        0.0
                    }
                })
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Many chunks (small k and dim), on 1 and 3 threads: the definition's bits.
        #[test]
        fn wave_sums_equal_the_definition(seed in any::<u64>(), n in 1usize..3000, k in 1usize..6, dim in 1usize..4) {
            let mut rng = Seed(seed).rng();
            let data = rng.uniform_vec(n * dim, -1e3, 1e3);
            let labels: Vec<u32> = (0..n).map(|i| (((i as u64 * 2654435761) ^ seed) % k as u64) as u32).collect();
            let expected = sums_by_definition(&data, dim, &labels, k);
            for threads in [1, 3] {
                let mut centroids = vec![0f32; k * dim];
                qcl_tensor::on_threads(threads, || update_centroids(&Points::all(&data, dim), None, &labels, k, &mut centroids, &mut Vec::new())).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&centroids), bits(&expected));
            }
        }
    }

    #[test]
    fn split_clusters_get_distinct_centroids_even_at_zero() {
        let mut centroids = vec![0.0, 0.0, 5.0, 5.0];
        let repaired = repair_empty_clusters(&mut centroids, 2, vec![0.0, 10.0]);
        assert_eq!(repaired, 1);
        assert_ne!(&centroids[0..2], &centroids[2..4]);
        let mut zeros = vec![0.0; 4];
        repair_empty_clusters(&mut zeros, 2, vec![4.0, 0.0]);
        assert_ne!(&zeros[0..2], &zeros[2..4]);
    }

    #[test]
    fn update_is_the_weighted_mean() {
        let data = [0.0, 2.0, 10.0, 4.0];
        let mut centroids = vec![9.0, 9.0];
        let w = update_centroids(
            &Points::all(&data, 1),
            Some(&[1.0, 3.0, 1.0, 1.0]),
            &[0, 0, 1, 1],
            2,
            &mut centroids,
            &mut Vec::new(),
        );
        assert_eq!(w, vec![4.0, 2.0]);
        assert_eq!(centroids, vec![1.5, 7.0]);
    }
}
