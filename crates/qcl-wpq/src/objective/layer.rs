//! One weight as product quantization sees it: the columns it quantizes, the outlier columns it
//! keeps, the output error on the recorded inputs, and the (guarded) codebook fine-tune.

use std::borrow::Cow;

use faer::Mat;
use qcl_tensor::{Error, Result};

use crate::calibration::LayerStats;
use crate::checkpoint::ExactColumns;
use crate::em::Objective;
use crate::layout::{LayerGeometry, Layout};
use crate::objective::guard::{hold_out, HeldOut, GUARD_STEPS};
use crate::objective::outliers::{ColumnSplit, Compensation};
use crate::objective::Quadratic;
use crate::objective::{finetune_codebooks, inverse_factor, Evidence, FinetuneGuard, PqConfig};
use crate::pq_tensor::PqTensor;

/// A weight split into quantized and exact columns, with its objective.
pub(crate) struct Layer<'a> {
    /// The quantized columns' weight, row-major in `geometry`'s shape.
    pub weight: Cow<'a, [f32]>,
    /// Geometry of the quantized columns.
    pub geometry: LayerGeometry,
    /// Geometry of the whole weight with `d = 1` (its matrix order).
    full_geometry: LayerGeometry,
    /// The whole weight's matrix view `[O, D]`.
    full_matrix: Vec<f32>,
    /// Output error on every column (matrix order); `None` without recorded statistics.
    pub quad: Option<Quadratic>,
    /// The same on the quantized columns.
    pub quad_rest: Option<Quadratic>,
    split: ColumnSplit,
    objective: Objective,
    stats: Option<&'a LayerStats>,
    /// Error feedback's optimal outlier values (with outliers and recorded inputs).
    compensation: Option<Compensation>,
}

impl<'a> Layer<'a> {
    /// The layer as `config` (already checked by `PqConfig::validate`) sees it.
    pub fn new(
        weight: &'a [f32],
        shape: &[usize],
        config: &PqConfig,
        evidence: Evidence<'a>,
    ) -> Result<Self> {
        let full_geometry = LayerGeometry::from_shape(shape, config.layout, 1)?;
        let stats = match evidence {
            Evidence::Stats(s) => Some(s),
            _ => None,
        };
        let quad = stats
            .map(|s| Quadratic::from_stats(s, &full_geometry))
            .transpose()?;
        let cols = full_geometry.in_dim();
        let outliers = if config.outliers.is_requested() {
            if shape.len() != 2 {
                return Err(Error::invalid_parameter(
                    "outliers",
                    format!("outlier columns need a 2-D weight, got shape {shape:?}"),
                ));
            }
            let gram = match quad.as_ref().map(Quadratic::gram) {
                Some(Some(g)) => g,
                Some(None) => {
                    return Err(Error::invalid_parameter(
                        "outliers",
                        "outlier columns are chosen by diag(H) of recorded float inputs; token \
                         ids give none",
                    ))
                }
                None => {
                    return Err(Error::EmptyInput(
                        "outlier columns are chosen by diag(H): record this weight's inputs".into(),
                    ))
                }
            };
            let diag: Vec<f64> = (0..cols).map(|i| gram[i * cols + i]).collect();
            config.outliers.select(&diag, config.d)?
        } else {
            Vec::new()
        };
        let split = ColumnSplit::new(cols, outliers);
        let full_matrix = full_geometry.to_matrix(weight)?;
        let exact = !split.outliers.is_empty();
        let (weight, geometry, quad_rest) = if exact {
            let g = LayerGeometry::from_shape(
                &[shape[0], split.rest.len()],
                Layout::Spatial,
                config.d,
            )?;
            let q = quad.as_ref().map(|q| split.restricted(q)).transpose()?;
            (Cow::Owned(split.gather(weight, &split.rest)), g, q)
        } else {
            let g = LayerGeometry::from_shape(shape, config.layout, config.d)?;
            (Cow::Borrowed(weight), g, quad.clone())
        };
        let compensation = match (&quad, config.objective) {
            (Some(q), Objective::ErrorFeedback) if exact => Some(Compensation::new(&split, q)?),
            _ => None,
        };
        Ok(Layer {
            weight,
            geometry,
            full_geometry,
            full_matrix,
            quad,
            quad_rest,
            split,
            objective: config.objective,
            stats,
            compensation,
        })
    }

    /// The upper factor `U` (`UᵀU = (H + λI)⁻¹`) that error feedback quantizes the kept
    /// columns with: of `H` with the outlier columns ordered last, restricted to the others.
    pub fn feedback_factor(&self, quad: &Quadratic, damp: f64) -> Result<Mat<f64>> {
        if self.split.outliers.is_empty() {
            return inverse_factor(quad, damp);
        }
        let u = inverse_factor(&self.split.permuted(quad)?, damp)?;
        let q = self.split.rest.len();
        Ok(u.submatrix(0, 0, q, q).to_owned())
    }

    /// Values of the outlier columns (`[O, s]`) for the quantized columns' matrix `approx`:
    /// the weights as they are, or error feedback's compensation.
    fn outlier_values(&self, approx: &[f32]) -> Vec<f32> {
        let w_o = self.split.gather(&self.full_matrix, &self.split.outliers);
        match &self.compensation {
            Some(c) => c.values(&self.weight, &w_o, approx),
            None => w_o,
        }
    }

    /// The whole weight's matrix view as `tensor` and the outlier columns give it.
    pub fn complete(&self, tensor: &PqTensor) -> Result<Vec<f32>> {
        let approx = tensor.geometry.to_matrix(&tensor.decode()?)?;
        if self.split.outliers.is_empty() {
            return Ok(approx);
        }
        Ok(self.split.merge(&approx, &self.outlier_values(&approx)))
    }

    /// The exact columns to store with `tensor` (whose centroids are rounded to fp16 first,
    /// so that error feedback compensates the stored codebook); `None` without outliers.
    pub fn exact_columns(&self, tensor: &mut PqTensor) -> Result<Option<ExactColumns>> {
        if self.split.outliers.is_empty() {
            return Ok(None);
        }
        tensor.round_to_f16();
        let approx = tensor.geometry.to_matrix(&tensor.decode()?)?;
        Ok(Some(ExactColumns::new(
            self.split.outliers.iter().map(|&c| c as u32).collect(),
            &self.outlier_values(&approx),
        )))
    }

    /// What the least-squares codebook minimises on the quantized columns for the whole
    /// weight's objective `full`: `H_RR`, or for error feedback with outliers the Schur
    /// complement left after the outliers' compensation.
    fn finetune_objective(&self, full: &Quadratic) -> Result<Quadratic> {
        if self.split.outliers.is_empty() {
            return Ok(full.clone());
        }
        if self.objective == Objective::ErrorFeedback && full.gram().is_some() {
            return Compensation::new(&self.split, full)?.schur();
        }
        self.split.restricted(full)
    }
}

/// The codebook fine-tune of one layer: least squares on `fit`, checked by `guard`.
pub(crate) struct Finetune<'l, 'a> {
    layer: &'l Layer<'a>,
    fit: Quadratic,
    guard: Option<HeldOut>,
    /// The whole weight's objective the reported errors are measured with.
    report: Quadratic,
    ridge: f64,
    rounds: usize,
}

impl<'l, 'a> Finetune<'l, 'a> {
    pub fn new(layer: &'l Layer<'a>, config: &PqConfig) -> Result<Self> {
        let q = layer.geometry.in_dim();
        let width = layer.full_geometry.in_dim();
        let aware = layer.objective != Objective::Naive;
        let (fit, guard, report) = match (aware, layer.stats, &layer.quad) {
            (false, _, _) => (Quadratic::identity(q), None, Quadratic::identity(width)),
            (true, Some(LayerStats::Inputs(s)), Some(full))
                if config.guard == FinetuneGuard::HeldOut =>
            {
                let (fit_stats, held) = hold_out(s)?;
                let fit_full =
                    Quadratic::from_stats(&LayerStats::Inputs(fit_stats), &layer.full_geometry)?;
                let order = layer.full_geometry.patch_order();
                let mut rows = vec![0f32; held.len()];
                for (src, dst) in held.chunks_exact(width).zip(rows.chunks_exact_mut(width)) {
                    order.iter().enumerate().for_each(|(n, &r)| dst[r] = src[n]);
                }
                let guard = HeldOut::new(&rows, width, &layer.full_matrix);
                (
                    layer.finetune_objective(&fit_full)?,
                    Some(guard),
                    full.clone(),
                )
            }
            (true, _, Some(full)) => (layer.finetune_objective(full)?, None, full.clone()),
            (true, _, None) => {
                return Err(Error::EmptyInput(format!(
                    "{:?} PQ needs calibration inputs recorded for this weight",
                    layer.objective
                )))
            }
        };
        Ok(Finetune {
            layer,
            fit,
            guard,
            report,
            ridge: config.ridge,
            rounds: config.finetune_rounds,
        })
    }

    /// Fine-tune rounds (code reassignment by `reassign` between two): the relative output
    /// error after each and the step each took.
    pub fn rounds(
        &self,
        tensor: &mut PqTensor,
        mut reassign: impl FnMut(&mut PqTensor) -> Result<()>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut errors, mut steps) = (Vec::new(), Vec::new());
        for round in 0..self.rounds {
            if round > 0 {
                tensor.round_to_f16();
                reassign(tensor)?;
            }
            let start = tensor.centroids.clone();
            finetune_codebooks(&self.layer.weight, tensor, &self.fit, self.ridge)?;
            let step = match &self.guard {
                None => 1.0,
                Some(guard) => self.line_search(guard, tensor, start)?,
            };
            steps.push(step);
            let full = self.layer.complete(tensor)?;
            errors.push(self.report.relative_error(&self.layer.full_matrix, &full)?);
        }
        Ok((errors, steps))
    }

    /// Moves `tensor`'s centroids from `start` toward their least-squares values by the largest
    /// step the held-out rows accept (0: back to `start`).
    fn line_search(&self, guard: &HeldOut, tensor: &mut PqTensor, start: Vec<f32>) -> Result<f64> {
        let target = std::mem::replace(&mut tensor.centroids, start);
        let start = tensor.centroids.clone();
        let base = guard.score(&self.layer.complete(tensor)?);
        for alpha in GUARD_STEPS {
            tensor.centroids = if alpha == 1.0 {
                target.clone()
            } else {
                start
                    .iter()
                    .zip(&target)
                    .map(|(&a, &b)| (f64::from(a) + alpha * (f64::from(b) - f64::from(a))) as f32)
                    .collect()
            };
            if guard.score(&self.layer.complete(tensor)?).accepts(&base) {
                return Ok(alpha);
            }
        }
        tensor.centroids = start;
        Ok(0.0)
    }
}
