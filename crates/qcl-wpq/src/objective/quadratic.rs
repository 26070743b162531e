//! The layer output error as a quadratic form of the weight.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use qcl_tensor::{Error, Result};

use crate::calibration::{InputStats, LayerStats};
use crate::layout::{LayerGeometry, LayerKind};

/// `L(Ŵ) = Σ_o f_o (w_o − ŵ_o)ᵀ H (w_o − ŵ_o)` over the rows `w_o` of a weight's matrix view
/// `[O, D]` ([`LayerGeometry::to_matrix`]): `H` the inputs' second moment (identity when
/// absent), `f_o` a weight per row (one when absent; an embedding's token counts + 1).
///
/// ```
/// use qcl_wpq::Quadratic;
/// let q = Quadratic::from_gram(vec![2.0, 0.0, 0.0, 1.0], 2)?;
/// // One row, error (1, 1): 2·1 + 1·1.
/// assert_eq!(q.error(&[1.0, 1.0], &[0.0, 0.0])?, 3.0);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Quadratic {
    width: usize,
    gram: Option<Vec<f64>>,
    row_weights: Option<Vec<f64>>,
}

impl Quadratic {
    /// `H = I`, every row weighing one: `‖W − Ŵ‖²`.
    pub fn identity(width: usize) -> Self {
        Quadratic {
            width,
            gram: None,
            row_weights: None,
        }
    }

    /// `H = gram` (`[width, width]` row-major, symmetric positive semi-definite).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for the wrong size, [`Error::NonFinite`] for NaN or infinity.
    pub fn from_gram(gram: Vec<f64>, width: usize) -> Result<Self> {
        crate::metric::check_gram(&gram, width)?;
        Ok(Quadratic {
            width,
            gram: Some(gram),
            row_weights: None,
        })
    }

    /// `H = I` with a weight per row.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a weight that is negative or not finite.
    pub fn with_row_weights(width: usize, weights: Vec<f64>) -> Result<Self> {
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(Error::invalid_parameter(
                "row_weights",
                "must be finite and non-negative",
            ));
        }
        Ok(Quadratic {
            width,
            gram: None,
            row_weights: Some(weights),
        })
    }

    /// The objective of a weight of `geometry` given what was recorded for it: `H = Σxᵀx/rows`
    /// in the geometry's patch order, or token counts + 1 as row weights.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] if no row was recorded, [`Error::ShapeMismatch`] for inputs of
    /// another width or convolution geometry, [`Error::InvalidParameter`] for a token id beyond
    /// the table or token ids recorded for a convolution.
    pub fn from_stats(stats: &LayerStats, geometry: &LayerGeometry) -> Result<Self> {
        if stats.rows() == 0 {
            return Err(Error::EmptyInput("the calibration recorded no rows".into()));
        }
        match stats {
            LayerStats::Inputs(s) => Self::from_inputs(s, geometry),
            LayerStats::Tokens(t) => {
                let rows = match geometry.kind {
                    LayerKind::Linear { out, .. } => out,
                    LayerKind::Conv { .. } => {
                        return Err(Error::invalid_parameter(
                            "calibration",
                            "token ids were recorded for a convolution",
                        ))
                    }
                };
                let mut weights = vec![1.0; rows];
                for (&id, &n) in &t.counts {
                    let w = weights.get_mut(id as usize).ok_or_else(|| {
                        Error::invalid_parameter(
                            "calibration",
                            format!("token id {id} was recorded, the table has {rows} rows"),
                        )
                    })?;
                    *w += n as f64;
                }
                Self::with_row_weights(geometry.in_dim(), weights)
            }
        }
    }

    fn from_inputs(s: &InputStats, geometry: &LayerGeometry) -> Result<Self> {
        let d_in = geometry.in_dim();
        let conv_ok = match (geometry.kind, s.conv) {
            (LayerKind::Linear { .. }, None) => true,
            (LayerKind::Conv { kh, kw, .. }, Some(c)) => c.kh == kh && c.kw == kw,
            // A 1×1 convolution recorded as rows of channels is a linear layer.
            (LayerKind::Conv { kh: 1, kw: 1, .. }, None) => true,
            _ => false,
        };
        if s.width != d_in || !conv_ok {
            return Err(Error::ShapeMismatch {
                context: "calibration inputs".into(),
                expected: format!(
                    "width {d_in} for a weight of shape {:?}",
                    geometry.kind.weight_shape()
                ),
                actual: vec![s.width],
            });
        }
        let order = geometry.patch_order();
        let scale = 1.0 / s.rows as f64;
        let mut gram = vec![0f64; d_in * d_in];
        for (n1, &r1) in order.iter().enumerate() {
            for (n2, &r2) in order.iter().enumerate() {
                gram[r1 * d_in + r2] = s.gram[n1 * d_in + n2] * scale;
            }
        }
        Self::from_gram(gram, d_in)
    }

    /// The input width `D`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// `H`, `None` for the identity.
    pub fn gram(&self) -> Option<&[f64]> {
        self.gram.as_deref()
    }

    /// The row weights, `None` when every row weighs one.
    pub fn row_weights(&self) -> Option<&[f64]> {
        self.row_weights.as_deref()
    }

    /// Weight of row `o`.
    pub fn row_weight(&self, o: usize) -> f64 {
        self.row_weights.as_ref().map_or(1.0, |w| w[o])
    }

    /// `H` as a faer matrix (the identity when absent).
    pub(crate) fn gram_mat(&self) -> Mat<f64> {
        let n = self.width;
        match &self.gram {
            Some(g) => Mat::from_fn(n, n, |i, j| g[i * n + j]),
            None => Mat::identity(n, n),
        }
    }

    /// The pooled `d×d` Gram matrix `Σ_b H_bb / m` of the `m = D/d` diagonal blocks (the
    /// paper's block-separable approximation), `None` for the identity.
    pub fn pooled_gram(&self, d: usize) -> Option<Vec<f64>> {
        let g = self.gram.as_ref()?;
        let (n, m) = (self.width, self.width / d);
        let mut pooled = vec![0f64; d * d];
        for b in 0..m {
            for i in 0..d {
                for j in 0..d {
                    pooled[i * d + j] += g[(b * d + i) * n + b * d + j];
                }
            }
        }
        pooled.iter_mut().for_each(|v| *v /= m as f64);
        Some(pooled)
    }

    /// `L(approx)` for a weight `reference`, both matrix views `[O, D]` row-major.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for sizes that are not whole rows of `D`, or unequal.
    pub fn error(&self, reference: &[f32], approx: &[f32]) -> Result<f64> {
        let d_in = self.width;
        if reference.len() != approx.len() || !reference.len().is_multiple_of(d_in) {
            return Err(Error::ShapeMismatch {
                context: "weights".into(),
                expected: format!("two equal [*, {d_in}] matrices"),
                actual: vec![reference.len(), approx.len()],
            });
        }
        let rows = reference.len() / d_in;
        let diff: Vec<f64> = reference
            .iter()
            .zip(approx)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect();
        let per_row: Vec<f64> = match &self.gram {
            None => diff
                .chunks_exact(d_in)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect(),
            Some(_) => {
                let e = MatRef::from_row_major_slice(&diff, rows, d_in);
                let mut eh = Mat::<f64>::zeros(rows, d_in);
                matmul(&mut eh, Accum::Replace, e, self.gram_mat(), 1.0, Par::Seq);
                (0..rows)
                    .map(|o| (0..d_in).map(|i| eh[(o, i)] * e[(o, i)]).sum())
                    .collect()
            }
        };
        Ok(per_row
            .iter()
            .enumerate()
            .map(|(o, v)| self.row_weight(o) * v)
            .sum())
    }

    /// `L(approx) / L(0)`: the relative output error.
    ///
    /// # Errors
    /// As [`Quadratic::error`].
    pub fn relative_error(&self, reference: &[f32], approx: &[f32]) -> Result<f64> {
        let zero = vec![0f32; reference.len()];
        let norm = self.error(reference, &zero)?;
        Ok(self.error(reference, approx)? / norm.max(f64::MIN_POSITIVE))
    }
}
