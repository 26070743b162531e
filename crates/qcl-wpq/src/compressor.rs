//! Compression of a whole checkpoint: each selected tensor by its rule's method, with the
//! calibration recorded for it; every other tensor kept as it was.

use std::time::Instant;

use indicatif::ProgressBar;
use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::calibration::{named, Calibration, LayerStats};
use crate::checkpoint::{
    Checkpoint, CompressedCheckpoint, CompressedTensor, Encoding, RawTensor, TensorBits,
};
use crate::layout::{LayerGeometry, Layout};
use crate::objective::{quantize_pq, Evidence, PqConfig, Quadratic};
use crate::scalar::{scalar_with_outliers, ScalarConfig};
use crate::select::Plan;

/// How one tensor is compressed.
///
/// ```
/// use qcl_wpq::{Method, Objective, PqConfig};
/// let m: Method = serde_json::from_str(r#"{"pq": {"d": 4, "k": 256, "objective": "naive"}}"#)?;
/// assert_eq!(m, Method::Pq(PqConfig::new(4, 256, Objective::Naive)));
/// assert_eq!(serde_json::to_string(&Method::Fp16)?, r#""fp16""#);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every value in fp16.
    Fp16,
    /// Round-to-nearest on per-group (or per-channel) grids.
    Rtn(ScalarConfig),
    /// GPTQ: the same grids with error feedback (needs calibration).
    Gptq(ScalarConfig),
    /// Product quantization under an objective.
    Pq(PqConfig),
}

impl Method {
    /// Whether the method cannot run without recorded calibration for the tensor.
    pub fn needs_calibration(&self) -> bool {
        match self {
            Method::Fp16 => false,
            Method::Rtn(p) => p.outliers.is_requested(),
            Method::Gptq(_) => true,
            Method::Pq(p) => p.objective != crate::Objective::Naive || p.outliers.is_requested(),
        }
    }
}

/// What compressing one tensor measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Encoding label (`pq d4 K256`, `int4 g128`, ...).
    pub method: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Stored bits.
    pub bits: TensorBits,
    /// `‖W − Ŵ‖² / ‖W‖²`.
    pub weight_error: f64,
    /// Relative output error on the calibration (`None` without one).
    pub output_error: Option<f64>,
    /// EM surrogate objective per iteration (PQ).
    pub em_objective: Vec<f64>,
    /// Relative output error after each codebook fine-tune (PQ).
    pub finetune_error: Vec<f64>,
    /// Step toward the least-squares codebook each fine-tune took (PQ; see
    /// [`crate::FinetuneGuard`]).
    pub finetune_steps: Vec<f64>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// A compressed checkpoint and what compressing each tensor measured.
#[derive(Debug, Clone)]
pub struct Compressed {
    /// The checkpoint (codebooks rounded to fp16, as the file stores them).
    pub checkpoint: CompressedCheckpoint,
    /// One report per compressed tensor, sorted by name.
    pub reports: Vec<TensorReport>,
}

/// Compresses one tensor by `method` with what was recorded for it (`seed` drives k-means).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_tensor::Seed;
/// use qcl_wpq::{compress_tensor, Method, RawTensor, ScalarConfig};
/// let w = RawTensor::from_tensor(&Tensor::arange(0f32, 256.0, &Device::Cpu)?.reshape((4, 64))?)?;
/// let (t, report) = compress_tensor("w", &w, &Method::Rtn(ScalarConfig::new(4, Some(32))), None,
///     Seed::new(0))?;
/// assert_eq!(report.bits.bits_per_weight(), 5.0); // 4 + 32/32
/// assert_eq!(t.decode()?.len(), 256);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// Typed errors naming the tensor: [`Error::InvalidParameter`] for a non-float tensor or bad
/// parameters (`d` not dividing the rows, `K` above the subvectors), [`Error::ShapeMismatch`]
/// for an unsuitable shape or calibration of another width, [`Error::NonFinite`] for NaN or
/// infinite weights, [`Error::EmptyInput`] when the method needs calibration that is absent or
/// empty.
pub fn compress_tensor(
    name: &str,
    tensor: &RawTensor,
    method: &Method,
    stats: Option<&LayerStats>,
    seed: Seed,
) -> Result<(CompressedTensor, TensorReport)> {
    compress_inner(tensor, method, stats, seed)
        .map(|(t, mut report)| {
            report.name = name.to_string();
            (t, report)
        })
        .map_err(|e| named(name, e))
}

fn compress_inner(
    tensor: &RawTensor,
    method: &Method,
    stats: Option<&LayerStats>,
    seed: Seed,
) -> Result<(CompressedTensor, TensorReport)> {
    let started = Instant::now();
    if !tensor.is_float() {
        return Err(Error::invalid_parameter(
            "dtype",
            format!(
                "a {:?} tensor holds no float weights to compress",
                tensor.dtype()
            ),
        ));
    }
    let values = tensor.to_f32()?;
    qcl_tensor::check_finite_slice("weight", &values)?;
    let shape = tensor.shape().to_vec();
    let stats = stats.filter(|s| s.rows() > 0);
    if method.needs_calibration() && stats.is_none() {
        return Err(Error::EmptyInput(
            "the method needs calibration inputs and none were recorded".into(),
        ));
    }
    // The output error in natural order (rows = outputs) for rank-2 and rank-4 weights.
    let quad = match (stats, LayerGeometry::from_shape(&shape, Layout::Spatial, 1)) {
        (Some(s), Ok(g)) => Some(Quadratic::from_stats(s, &g)?),
        _ => None,
    };
    let (mut em_objective, mut finetune_error, mut finetune_steps) = (vec![], vec![], vec![]);
    let (encoding, outliers) = match method {
        Method::Fp16 => (
            Encoding::Fp16(values.iter().map(|&v| half::f16::from_f32(v)).collect()),
            None,
        ),
        Method::Rtn(p) | Method::Gptq(p) => {
            let feedback = matches!(method, Method::Gptq(_));
            if feedback && quad.is_none() {
                return Err(Error::ShapeMismatch {
                    context: "weight".into(),
                    expected: "a 2-D or 4-D weight for GPTQ".into(),
                    actual: shape.clone(),
                });
            }
            let (t, outliers) = scalar_with_outliers(&values, &shape, p, quad.as_ref(), feedback)?;
            (Encoding::Scalar(t), outliers)
        }
        Method::Pq(p) => {
            let evidence = stats.map_or(Evidence::None, Evidence::Stats);
            let out = quantize_pq(&values, &shape, p, evidence, seed)?;
            em_objective = out.em_objective;
            finetune_error = out.finetune_error;
            finetune_steps = out.finetune_steps;
            let mut t = out.tensor;
            t.round_to_f16();
            (Encoding::Pq(t), out.outliers)
        }
    };
    let compressed = CompressedTensor {
        dtype: tensor.dtype(),
        shape: shape.clone(),
        encoding,
        outliers,
    };
    let decoded = compressed.decode()?;
    let norm: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
    let err: f64 = values
        .iter()
        .zip(&decoded)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let output_error = quad
        .map(|q| q.relative_error(&values, &decoded))
        .transpose()?;
    let report = TensorReport {
        name: String::new(),
        method: compressed.label(),
        shape,
        bits: compressed.bits(),
        weight_error: err / norm.max(f64::MIN_POSITIVE),
        output_error,
        em_objective,
        finetune_error,
        finetune_steps,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((compressed, report))
}

/// Compresses every tensor of `checkpoint` that a rule of `plan` selects, with the inputs
/// recorded in `calibration`; `bar` counts tensors.
///
/// # Errors
/// [`Error::InvalidParameter`] for a rule that matches no tensor, or calibration recorded for a
/// name the checkpoint does not hold; as [`compress_tensor`] for each tensor. Nothing is
/// returned (and so nothing written) unless every tensor succeeds.
pub fn compress_checkpoint(
    checkpoint: &Checkpoint,
    plan: &Plan,
    calibration: &Calibration,
    bar: &ProgressBar,
) -> Result<Compressed> {
    let chosen = plan.select(checkpoint.names())?;
    if let Some(unknown) = calibration
        .names()
        .into_iter()
        .find(|n| checkpoint.get(n).is_none())
    {
        return Err(Error::invalid_parameter(
            "calibration",
            format!(
                "unknown tensor name `{unknown}`: recorded, but the checkpoint has no such tensor"
            ),
        ));
    }
    bar.set_length(chosen.len() as u64);
    bar.set_position(0);
    let mut out = CompressedCheckpoint::untouched(checkpoint);
    let mut reports = Vec::with_capacity(chosen.len());
    let seed = plan.seed;
    for (name, rule) in chosen {
        bar.set_message(name.clone());
        let method = &plan.rules[rule].method;
        reports.push(compress_into(&mut out, name, method, calibration, seed)?);
        bar.inc(1);
    }
    Ok(Compressed {
        checkpoint: out,
        reports,
    })
}

/// Moves the untouched tensor `name` of `out` into its compressed tensors, compressed by
/// `method` with the inputs `calibration` recorded for it, and returns its report.
///
/// # Errors
/// [`Error::InvalidParameter`] when `out` holds no untouched tensor `name`; as
/// [`compress_tensor`].
pub(crate) fn compress_into(
    out: &mut CompressedCheckpoint,
    name: String,
    method: &Method,
    calibration: &Calibration,
    seed: Seed,
) -> Result<TensorReport> {
    let raw = out
        .untouched
        .remove(&name)
        .ok_or_else(|| Error::invalid_parameter("tensors", format!("no tensor `{name}`")))?;
    let stats = calibration.stats(&name);
    let (t, report) =
        compress_tensor(&name, &raw, method, stats.as_ref(), seed.child_named(&name))?;
    out.compressed.insert(name, t);
    Ok(report)
}
