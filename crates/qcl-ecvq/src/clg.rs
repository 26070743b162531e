//! The classic ECVQ design algorithm of Chou, Lookabaugh and Gray (IEEE Trans. ASSP
//! 37(1):31–42, 1989): Lloyd iterations on a fixed training set with explicit pruning.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use qcl_pq::{run_lloyd, LloydSchedule, LloydStep, LloydStop};
use qcl_tensor::{check_finite_slice, nearest_codes_into_finite, Error, Result, Seed};

use crate::quantizer::check_lambda;
use crate::{Distortion, Ecvq};

/// Where the Lloyd iterations start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClgInit {
    /// `K` distinct random training vectors with equal lengths `log₂ K` (the textbook start).
    RandomPoints,
    /// `K` random training vectors refined by this many plain k-means iterations (the
    /// assignment without the length term; lengths then follow the k-means counts). A
    /// fixed-rate Lloyd codebook is a better start: on the reproduction's sweep it lowered
    /// the final `R + λD` at most λ (see `docs/results/ecvq.md`). The default, with 20.
    KMeans {
        /// k-means iterations before the entropy-constrained ones.
        iterations: usize,
    },
}

impl Default for ClgInit {
    fn default() -> Self {
        ClgInit::KMeans { iterations: 20 }
    }
}

/// Every knob of [`ClgEcvq::fit`], each with a default (see [`ClgConfig::new`]).
///
/// ```
/// use qcl_ecvq::ClgConfig;
/// let params = ClgConfig { max_iterations: 100, ..ClgConfig::new(8.0) };
/// assert_eq!(params.codes, 256);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClgConfig {
    /// Initial number of codes `K` (default 256); unused ones are pruned.
    pub codes: usize,
    /// Multiplier λ of the distortion in `R + λ·D`; the classic rate multiplier is
    /// `λ_CLG = 1/λ`.
    pub lambda: f64,
    /// Distortion measure (default [`Distortion::Sse`]).
    pub distortion: Distortion,
    /// The start (default [`ClgInit::KMeans`] with 20 iterations).
    pub init: ClgInit,
    /// Independent runs from different seeds (`seed.child(r)`); the one with the lowest
    /// final training objective is kept (default 1).
    pub restarts: usize,
    /// Entropy-constrained iterations at most (default 200; at the tolerance below, runs
    /// of the reproduction converge in 30–200).
    pub max_iterations: usize,
    /// Stop when the relative decrease of the objective between iterations falls below this
    /// (default `1e-5`).
    pub tolerance: f64,
    /// Seed of the initial codes (default 0).
    pub seed: Seed,
    /// Show a progress bar on standard error (default false).
    pub show_progress: bool,
}

impl ClgConfig {
    /// The defaults, with multiplier `lambda`.
    pub fn new(lambda: f64) -> Self {
        ClgConfig {
            codes: 256,
            lambda,
            distortion: Distortion::Sse,
            init: ClgInit::default(),
            restarts: 1,
            max_iterations: 200,
            tolerance: 1e-5,
            seed: Seed::new(0),
            show_progress: false,
        }
    }
}

/// A quantizer designed by the Chou–Lookabaugh–Gray algorithm, with its history.
///
/// Starting from `K` distinct training points and equal lengths `ℓ_k = log₂ K`, each
/// iteration
///
/// 1. assigns every training vector to `argmin_k ℓ_k + λ·d(x, c_k)` (the encoder of
///    [`Ecvq`]) and records the objective `J = mean(ℓ_{k(x)}) + λ·mean(d(x, c_{k(x)}))`;
/// 2. moves every code to the mean of its vectors (summed in `f64`, in point order);
/// 3. sets `ℓ_k = −log₂(n_k/N)` and **deletes** codes with `n_k = 0`.
///
/// Each step minimises `J` over its own variables, so `J` never increases; with `1/λ → 0`
/// it is k-means. It stops when `J`'s relative decrease falls below the tolerance.
///
/// ```
/// use qcl_ecvq::{ClgEcvq, ClgConfig, Source};
/// use qcl_tensor::Seed;
/// let data = Source::Gaussian.sample(20_000, &mut Seed::new(0).rng());
/// let params = ClgConfig { codes: 64, ..ClgConfig::new(4.0) };
/// let model = ClgEcvq::fit(&data, 2, &params)?;
/// // The objective never increases, and pruning only removes codes.
/// assert!(model.objective_history.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-6)));
/// assert!(model.quantizer.len() <= 64);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClgEcvq {
    /// The final quantizer (pruned codes removed).
    ///
    /// With several restarts, everything below describes the kept run (except
    /// `train_seconds`, which covers all of them).
    pub quantizer: Ecvq,
    /// `J = R + λ·D` on the training set after each assignment step.
    pub objective_history: Vec<f64>,
    /// Codes alive at each assignment step.
    pub codes_history: Vec<usize>,
    /// For each final code, its index among the codes the entropy-constrained iterations
    /// started from.
    pub original_indices: Vec<usize>,
    /// Iterations run.
    pub iterations: usize,
    /// Wall time of the iterations, in seconds.
    pub train_seconds: f64,
}

impl ClgEcvq {
    /// Designs a quantizer on `data` (row-major `[n, dim]`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for λ ≤ 0 or not finite, `K = 0`, `K > n`, `dim = 0`, a
    /// bad tolerance; [`Error::EmptyInput`]; [`Error::ShapeMismatch`]; [`Error::NonFinite`].
    pub fn fit(data: &[f32], dim: usize, config: &ClgConfig) -> Result<ClgEcvq> {
        check_data(data, dim, config)?;
        let n = data.len() / dim;
        if config.codes == 0 {
            return Err(Error::invalid_parameter("codes", "K must be at least 1"));
        }
        if config.codes > n {
            return Err(Error::invalid_parameter(
                "codes",
                format!(
                    "K = {} is larger than the number of training vectors n = {n}",
                    config.codes
                ),
            ));
        }
        if config.restarts == 0 {
            return Err(Error::invalid_parameter("restarts", "must be at least 1"));
        }
        let mut best = qcl_pq::BestRun::new();
        let mut total_seconds = 0.0;
        for restart in 0..config.restarts {
            let mut rng = config.seed.child(restart as u64).rng();
            let picked = rng.sample_indices(n, config.codes)?;
            let mut codebook: Vec<f32> = picked
                .iter()
                .flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let mut lengths = vec![(config.codes as f64).log2(); config.codes];
            if let ClgInit::KMeans { iterations } = config.init {
                let kmeans =
                    Self::iterate(data, dim, codebook, lengths, config, iterations, false)?;
                total_seconds += kmeans.train_seconds;
                codebook = kmeans.quantizer.codebook().to_vec();
                lengths = kmeans.quantizer.rates_bits().to_vec();
            }
            let run = Self::iterate(
                data,
                dim,
                codebook,
                lengths,
                config,
                config.max_iterations,
                true,
            )?;
            total_seconds += run.train_seconds;
            best.offer(run.objective_history.last().copied(), run);
        }
        let mut best = best.into_best().expect("restarts >= 1");
        best.train_seconds = total_seconds;
        Ok(best)
    }

    /// Continues the design from a given quantizer (a warm start, e.g. the solution at a
    /// neighbouring λ, or a fixed-rate k-means codebook with equal lengths): its codebook and
    /// lengths are the starting point; `config.codes` and `config.seed` are not used.
    ///
    /// # Errors
    /// As [`ClgEcvq::fit`], and [`Error::ShapeMismatch`] when the start's dimension differs.
    pub fn fit_from(data: &[f32], start: &Ecvq, config: &ClgConfig) -> Result<ClgEcvq> {
        let dim = start.dim();
        check_data(data, dim, config)?;
        Self::iterate(
            data,
            dim,
            start.codebook().to_vec(),
            start.rates_bits().to_vec(),
            config,
            config.max_iterations,
            true,
        )
    }

    /// The iterations, from a validated start ([`run_lloyd`] over a [`ClgStep`]); without
    /// `entropy_constrained` the assignment ignores the lengths (plain k-means, with the same
    /// centroid and length updates).
    fn iterate(
        data: &[f32],
        dim: usize,
        codebook: Vec<f32>,
        lengths: Vec<f64>,
        config: &ClgConfig,
        max_iterations: usize,
        entropy_constrained: bool,
    ) -> Result<ClgEcvq> {
        let n = data.len() / dim;
        let progress = if config.show_progress {
            let bar = ProgressBar::new(config.max_iterations as u64);
            bar.set_style(
                ProgressStyle::with_template("clg-ecvq {bar:30} {pos}/{len} iterations, J {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let started = Instant::now();
        let mut step = ClgStep {
            data,
            dim,
            scale: config.lambda * config.distortion.scale(dim),
            entropy_constrained,
            original: (0..lengths.len()).collect(),
            codebook,
            lengths,
            indices: vec![0u32; n],
            scores: vec![0f32; n],
            counts: Vec::new(),
            sums: Vec::new(),
            codes_history: Vec::new(),
            progress: progress.clone(),
        };
        let schedule = LloydSchedule {
            max_iter: max_iterations,
            stop: LloydStop::RelativeThenUpdate {
                tolerance: config.tolerance,
            },
        };
        let objective_history = run_lloyd(&mut step, &schedule, &progress)?;
        progress.finish_and_clear();
        Ok(ClgEcvq {
            quantizer: Ecvq::new(
                dim,
                step.codebook,
                step.lengths,
                config.lambda,
                config.distortion,
            )?,
            iterations: objective_history.len(),
            objective_history,
            codes_history: step.codes_history,
            original_indices: step.original,
            train_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// CLG's halves of a Lloyd iteration: the encoder (nearest code under squared error plus the
/// code's length over λ·scale), then the decoder (cell means) and the lengths `−log₂ p_j`,
/// pruning the codes no point chose.
struct ClgStep<'a> {
    data: &'a [f32],
    dim: usize,
    /// `λ` times the distortion's scale: `J = E[len] + scale·E[sse]`.
    scale: f64,
    entropy_constrained: bool,
    codebook: Vec<f32>,
    lengths: Vec<f64>,
    /// Each surviving code's index in the starting codebook.
    original: Vec<usize>,
    indices: Vec<u32>,
    scores: Vec<f32>,
    /// Points and coordinate sums per code, of the last assignment.
    counts: Vec<u64>,
    sums: Vec<f64>,
    codes_history: Vec<usize>,
    progress: ProgressBar,
}

impl LloydStep for ClgStep<'_> {
    fn assign(&mut self) -> Result<f64> {
        let (dim, k) = (self.dim, self.lengths.len());
        let n = self.data.len() / dim;
        let bias: Vec<f32> = if self.entropy_constrained {
            self.lengths
                .iter()
                .map(|l| (l / self.scale) as f32)
                .collect()
        } else {
            vec![0.0; k]
        };
        nearest_codes_into_finite(
            self.data,
            &self.codebook,
            dim,
            Some(&bias),
            &mut self.indices,
            &mut self.scores,
        )?;
        // Reused across iterations: cleared and sized to this iteration's codes.
        self.counts.clear();
        self.counts.resize(k, 0);
        self.sums.clear();
        self.sums.resize(k * dim, 0.0);
        let (mut length_sum, mut sse_sum) = (0f64, 0f64);
        for (x, &j) in self.data.chunks_exact(dim).zip(&self.indices) {
            let j = j as usize;
            self.counts[j] += 1;
            length_sum += self.lengths[j];
            let code = &self.codebook[j * dim..(j + 1) * dim];
            for ((s, &v), &c) in self.sums[j * dim..(j + 1) * dim]
                .iter_mut()
                .zip(x)
                .zip(code)
            {
                let v = f64::from(v);
                *s += v;
                sse_sum += (v - f64::from(c)).powi(2);
            }
        }
        let objective = length_sum / n as f64 + self.scale * sse_sum / n as f64;
        self.codes_history.push(k);
        self.progress.set_message(format!("{objective:.5}"));
        Ok(objective)
    }

    fn update(&mut self) -> Result<()> {
        let dim = self.dim;
        let n = (self.data.len() / dim) as f64;
        let k = self.lengths.len();
        let mut codebook = Vec::with_capacity(self.codebook.len());
        let mut lengths = Vec::with_capacity(k);
        let mut original = Vec::with_capacity(k);
        for j in (0..k).filter(|&j| self.counts[j] > 0) {
            let count = self.counts[j] as f64;
            codebook.extend(
                self.sums[j * dim..(j + 1) * dim]
                    .iter()
                    .map(|s| (s / count) as f32),
            );
            lengths.push(-(count / n).log2());
            original.push(self.original[j]);
        }
        self.codebook = codebook;
        self.lengths = lengths;
        self.original = original;
        Ok(())
    }
}

/// Checks training data and the parameters shared by every start.
fn check_data(data: &[f32], dim: usize, config: &ClgConfig) -> Result<()> {
    check_lambda(config.lambda)?;
    if dim == 0 {
        return Err(Error::invalid_parameter("dim", "must be at least 1"));
    }
    if data.is_empty() {
        return Err(Error::EmptyInput("no training vectors".into()));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            context: "training data".into(),
            expected: format!("[*, {dim}]"),
            actual: vec![data.len()],
        });
    }
    check_finite_slice("training data", data)?;
    if !(config.tolerance.is_finite() && config.tolerance >= 0.0) {
        return Err(Error::invalid_parameter(
            "tolerance",
            format!("must be finite and >= 0, got {}", config.tolerance),
        ));
    }
    Ok(())
}
