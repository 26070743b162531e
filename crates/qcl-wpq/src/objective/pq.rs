//! Product quantization of one weight under each objective.

use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::calibration::LayerStats;
use crate::checkpoint::ExactColumns;
use crate::em::{
    activation_aware_em, weighted_em, EmConfig, MetricSource, Objective, PatchSampler,
};
use crate::layout::Layout;
use crate::metric::Metric;
use crate::objective::layer::{Finetune, Layer};
use crate::objective::{feedback_pq, FinetuneGuard, OutlierColumns, PqCodebooks, Quadratic};
use crate::pq_tensor::{PqTensor, Sharing};

/// Largest `K` (codes are stored in at most 16 bits).
pub const MAX_CENTROIDS: usize = 1 << 16;

/// Every knob of product quantization of one weight, with defaults.
///
/// ```
/// use qcl_wpq::{Objective, PqConfig};
/// let p: PqConfig = serde_json::from_str(r#"{"d": 2, "k": 256, "objective": "error_feedback"}"#)?;
/// assert_eq!(p, PqConfig::new(2, 256, Objective::ErrorFeedback));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PqConfig {
    /// Block size `d`: consecutive weights of a row per subvector.
    pub d: usize,
    /// Centroids per codebook `K` (at most the subvectors of a codebook, at most 2^16).
    pub k: usize,
    /// What the codes and codebook minimise.
    pub objective: Objective,
    /// Subvector layout of a 4-D convolution weight (ignored for 2-D weights).
    pub layout: Layout,
    /// Which subvectors share a codebook.
    pub sharing: Sharing,
    /// k-means (EM) iterations.
    pub em_iterations: usize,
    /// Least-squares codebook fine-tunes on the output error, with a code reassignment between
    /// two (0: none).
    pub finetune_rounds: usize,
    /// Ridge of the fine-tune toward the current codebook, relative to `trace(M)/n`.
    pub ridge: f64,
    /// Hessian damping `λ = damp·mean(diag H)` of error feedback.
    pub damp: f64,
    /// Columns per lazy batch update of error feedback.
    pub block_columns: usize,
    /// Input columns kept exactly in fp16 (2-D weights with recorded inputs).
    pub outliers: OutlierColumns,
    /// How far the codebook fine-tune is trusted.
    pub guard: FinetuneGuard,
}

impl Default for PqConfig {
    fn default() -> Self {
        PqConfig {
            d: 4,
            k: 256,
            objective: Objective::ActivationAware,
            layout: Layout::Spatial,
            sharing: Sharing::Layer,
            em_iterations: 30,
            finetune_rounds: 0,
            ridge: 1e-4,
            damp: 0.01,
            block_columns: 128,
            outliers: OutlierColumns::None,
            guard: FinetuneGuard::HeldOut,
        }
    }
}

impl PqConfig {
    /// Block size `d`, `k` centroids, `objective`, other knobs at their defaults.
    pub fn new(d: usize, k: usize, objective: Objective) -> Self {
        PqConfig {
            d,
            k,
            objective,
            ..Default::default()
        }
    }

    /// Checks the knobs: `K` in `1..=65536`, `d` and `block_columns` at least 1, at most
    /// [`MAX_ROUNDS`] EM iterations and fine-tune rounds, `ridge` and `damp` finite and
    /// `>= 0`, and the outlier rule.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the first bad knob.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, why: String| Err(Error::invalid_parameter(name, why));
        if self.k == 0 || self.k > MAX_CENTROIDS {
            return bad(
                "k",
                format!("must be in 1..={MAX_CENTROIDS}, got {}", self.k),
            );
        }
        for (name, v) in [("d", self.d), ("block_columns", self.block_columns)] {
            if v == 0 {
                return bad(name, "must be at least 1".into());
            }
        }
        for (name, v) in [
            ("em_iterations", self.em_iterations),
            ("finetune_rounds", self.finetune_rounds),
        ] {
            if v > MAX_ROUNDS {
                return bad(name, format!("must be at most {MAX_ROUNDS}, got {v}"));
            }
        }
        for (name, v) in [("ridge", self.ridge), ("damp", self.damp)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(name, format!("must be finite and >= 0, got {v}"));
            }
        }
        self.outliers.validate()
    }
}

/// Most EM iterations or fine-tune rounds [`PqConfig`] may ask for.
pub const MAX_ROUNDS: usize = 10_000;

/// What the objective knows about a layer's inputs.
#[derive(Clone, Copy)]
pub enum Evidence<'a> {
    /// Nothing (naive PQ only).
    None,
    /// Recorded statistics ([`crate::Calibration`]).
    Stats(&'a LayerStats),
    /// Input patches resampled at every EM iteration (the paper's procedure; activation-aware
    /// PQ without fine-tuning only).
    Sampled {
        /// The layer's recorded inputs.
        sampler: &'a dyn PatchSampler,
        /// Patches per iteration.
        patch_rows: usize,
    },
}

/// Result of [`quantize_pq`].
#[derive(Debug, Clone, PartialEq)]
pub struct PqOutcome {
    /// The quantized weight. Centroids are those of the last step, not yet rounded to fp16
    /// (the file stores fp16: see [`PqTensor::round_to_f16`]).
    pub tensor: PqTensor,
    /// The EM surrogate objective after each iteration.
    pub em_objective: Vec<f64>,
    /// Empty clusters repaired by EM.
    pub repairs: usize,
    /// Relative output error after each fine-tune round.
    pub finetune_error: Vec<f64>,
    /// The input columns kept exactly (with [`PqConfig::outliers`]); `tensor` covers the rest.
    pub outliers: Option<ExactColumns>,
    /// Step taken toward the least-squares codebook in each fine-tune round (1 without a
    /// guard; 0 when the guard kept the codebook; see [`FinetuneGuard`]).
    pub finetune_steps: Vec<f64>,
}

/// Product quantization of `weight` (row-major `shape`, 2-D or 4-D) by `config`.
///
/// With [`PqConfig::outliers`] the chosen input columns of a 2-D weight are kept exactly and
/// the returned tensor covers the other columns (see [`crate::objective`]); its centroids are
/// then already rounded to fp16, because the outlier values of error feedback compensate the
/// codebook as stored.
///
/// ```
/// use qcl_tensor::Seed;
/// use qcl_wpq::{quantize_pq, Evidence, Objective, PqConfig};
/// let w: Vec<f32> = (0..64).map(|i| ((i * 7) % 11) as f32).collect();
/// let out = quantize_pq(&w, &[8, 8], &PqConfig::new(2, 4, Objective::Naive), Evidence::None,
///     Seed::new(0))?;
/// assert_eq!(out.tensor.decode()?.len(), 64);
/// // Activation-aware PQ needs recorded inputs.
/// let aware = PqConfig::new(2, 4, Objective::ActivationAware);
/// assert!(quantize_pq(&w, &[8, 8], &aware, Evidence::None, Seed::new(0)).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for a shape that is not 2-D or 4-D or does not fit `weight`,
/// [`Error::InvalidParameter`] for `d` not dividing the input dimension (without outlier
/// columns), `K` larger than a codebook's subvectors, outlier columns of a 4-D weight or an
/// embedding table, or a guarded fine-tune without a row sample; [`Error::NonFinite`] for NaN
/// or infinite weights; [`Error::EmptyInput`] when the objective or the outlier rule needs
/// calibration that is absent or empty.
pub fn quantize_pq(
    weight: &[f32],
    shape: &[usize],
    config: &PqConfig,
    evidence: Evidence<'_>,
    seed: Seed,
) -> Result<PqOutcome> {
    qcl_tensor::check_finite_slice("weight", weight)?;
    config.validate()?;
    let (k, d) = (config.k, config.d);
    let layer = Layer::new(weight, shape, config, evidence)?;
    let geometry = layer.geometry.clone();
    let sub = geometry.unroll(&layer.weight)?;
    let (n_groups, groups) = config.sharing.groups(&geometry)?;
    let objective = config.objective;
    let quad = layer.quad_rest.as_ref();
    let aware = objective != Objective::Naive;
    let metric = match (quad, aware) {
        (Some(q), true) => q
            .pooled_gram(d)
            .map(|g| Metric::from_gram(&g, d))
            .transpose()?,
        _ => None,
    };
    let source = match (aware, &metric, evidence) {
        (false, _, _) => MetricSource::Identity,
        (true, Some(m), _) => MetricSource::Fixed(m),
        (
            true,
            None,
            Evidence::Sampled {
                sampler,
                patch_rows,
            },
        ) if objective == Objective::ActivationAware => MetricSource::Sampled {
            sampler,
            patch_rows,
        },
        // Token-weighted rows: Euclidean subvectors, weighted means.
        (true, None, _) if quad.is_some() => MetricSource::Identity,
        _ => return Err(missing(objective)),
    };
    let em_config = EmConfig {
        k,
        iterations: config.em_iterations,
        seed,
        ..Default::default()
    };
    let rows = geometry.out_dim();
    let sub_weights: Option<Vec<f32>> = quad
        .and_then(Quadratic::row_weights)
        .filter(|_| aware)
        .map(|w| (0..sub.len() / d).map(|j| w[j % rows] as f32).collect());
    let em = match &sub_weights {
        Some(w) => weighted_em(&sub, d, &groups, n_groups, None, source, w, em_config)?,
        None => activation_aware_em(&sub, d, &groups, n_groups, None, source, em_config)?,
    };
    let mut tensor = PqTensor {
        geometry,
        k,
        sharing: config.sharing,
        centroids: em.centroids,
        assignments: em.assignments,
    };
    let matrix = tensor.geometry.to_matrix(&layer.weight)?;
    let reassign = Reassign {
        objective,
        metric: metric.as_ref(),
        factor: match (&layer.quad, objective) {
            (Some(q), Objective::ErrorFeedback) => Some(layer.feedback_factor(q, config.damp)?),
            (None, Objective::ErrorFeedback) => return Err(missing(objective)),
            _ => None,
        },
        block_columns: config.block_columns,
    };
    if objective == Objective::ErrorFeedback {
        tensor.round_to_f16();
        reassign.run(&sub, &matrix, &groups, &mut tensor)?;
    }
    let (finetune_error, finetune_steps) = if config.finetune_rounds > 0 {
        let finetune = Finetune::new(&layer, config)?;
        finetune.rounds(&mut tensor, |t| reassign.run(&sub, &matrix, &groups, t))?
    } else {
        (Vec::new(), Vec::new())
    };
    let outliers = layer.exact_columns(&mut tensor)?;
    Ok(PqOutcome {
        tensor,
        outliers,
        em_objective: em.objective,
        repairs: em.repairs,
        finetune_error,
        finetune_steps,
    })
}

fn missing(objective: Objective) -> Error {
    Error::EmptyInput(format!(
        "{objective:?} PQ needs calibration inputs recorded for this weight"
    ))
}

/// The objective's own code assignment for a fixed codebook.
struct Reassign<'a> {
    objective: Objective,
    metric: Option<&'a Metric>,
    factor: Option<faer::Mat<f64>>,
    block_columns: usize,
}

impl Reassign<'_> {
    fn run(
        &self,
        sub: &[f32],
        matrix: &[f32],
        groups: &[usize],
        tensor: &mut PqTensor,
    ) -> Result<()> {
        let (k, d) = (tensor.k, tensor.geometry.block);
        if let (Objective::ErrorFeedback, Some(u)) = (self.objective, &self.factor) {
            tensor.assignments = feedback_pq(
                matrix,
                tensor.geometry.out_dim(),
                u,
                &PqCodebooks {
                    d,
                    k,
                    centroids: &tensor.centroids,
                    groups,
                },
                self.block_columns,
            )?;
            return Ok(());
        }
        tensor.reassign(sub, self.metric)?;
        Ok(())
    }
}
