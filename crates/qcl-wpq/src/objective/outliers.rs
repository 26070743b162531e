//! Outlier input columns kept exactly.
//!
//! A few input features of a transformer carry massive activations (Sun et al., "Massive
//! activations in large language models", 2024; Dettmers et al., "LLM.int8()", 2022): their
//! columns of `H = Σxᵀx` are hundreds of times the median, and any quantization error on the
//! weights that read them dominates the layer's output error. The `s` columns of largest
//! `diag(H)` are therefore kept in fp16 and only the other `D − s` are quantized:
//!
//! - naive and activation-aware objectives keep them as they are;
//! - error feedback orders them last, so that quantizing every other column may lean on them,
//!   and stores their optimal values given the quantized columns,
//!   `v_O = w_O + H_OO⁻¹ H_OR (w_R − ŵ_R)` (the result of pushing all the other columns' error
//!   onto them); the codebook fine-tune then minimises the Schur complement
//!   `H_RR − H_RO H_OO⁻¹ H_OR`, the output error left after that compensation.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Par, Side};
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::objective::Quadratic;

/// Which input columns of a 2-D weight are kept exactly (fp16, with their indices) instead of
/// quantized, chosen by the recorded inputs' `diag(H)`. The count is rounded up (taking the
/// next largest columns) until the columns left are a multiple of the block size `d`, so it
/// can exceed `s` or `max` by at most `d − 1`.
///
/// ```
/// use qcl_wpq::OutlierColumns;
/// let diag = [1.0, 900.0, 1.2, 0.8, 300.0, 1.1];
/// assert_eq!(OutlierColumns::Top(1).select(&diag, 1)?, vec![1]);
/// // Above 100× the (upper) median 1.2: columns 1 and 4.
/// let rule = OutlierColumns::Threshold { ratio: 100.0, max: 8 };
/// assert_eq!(rule.select(&diag, 1)?, vec![1, 4]);
/// // With d = 4 the six columns need two outliers to leave four; one more is never needed.
/// assert_eq!(OutlierColumns::Top(1).select(&diag, 4)?, vec![1, 4]);
/// let json: OutlierColumns = serde_json::from_str(r#"{"threshold": {"ratio": 50, "max": 4}}"#)?;
/// assert_eq!(json, OutlierColumns::Threshold { ratio: 50.0, max: 4 });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutlierColumns {
    /// Every column is quantized.
    #[default]
    None,
    /// The `s` columns of largest `diag(H)`.
    Top(usize),
    /// The columns whose `diag(H)` exceeds `ratio` times its median (the upper one for an even
    /// count), largest first, at most `max` of them.
    Threshold {
        /// Multiple of the median.
        ratio: f64,
        /// Largest count (before rounding up to the block size).
        max: usize,
    },
}

impl OutlierColumns {
    /// Whether the rule may choose any column (it then needs recorded inputs).
    pub fn is_requested(&self) -> bool {
        !matches!(
            self,
            OutlierColumns::None
                | OutlierColumns::Top(0)
                | OutlierColumns::Threshold { max: 0, .. }
        )
    }

    /// Checks the rule's parameters.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a ratio that is not finite and positive.
    pub fn validate(&self) -> Result<()> {
        if let OutlierColumns::Threshold { ratio, .. } = self {
            if !(ratio.is_finite() && *ratio > 0.0) {
                return Err(Error::invalid_parameter(
                    "outliers",
                    format!("threshold ratio must be finite and > 0, got {ratio}"),
                ));
            }
        }
        Ok(())
    }

    /// The chosen columns, ascending, for inputs with `diag(H)` = `diag`, rounded up so that
    /// `d` divides the number of columns left (ties: lower index first).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad rule, a zero `d`, or a choice that leaves no
    /// column to quantize.
    pub fn select(&self, diag: &[f64], d: usize) -> Result<Vec<usize>> {
        self.validate()?;
        let n = diag.len();
        if d == 0 {
            return Err(Error::invalid_parameter("d", "must be at least 1"));
        }
        let mut by_size: Vec<usize> = (0..n).collect();
        by_size.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        let mut count = match *self {
            OutlierColumns::None => 0,
            OutlierColumns::Top(s) => s,
            OutlierColumns::Threshold { ratio, max } => {
                let mut sorted = diag.to_vec();
                sorted.sort_by(f64::total_cmp);
                let median = sorted.get(n / 2).copied().unwrap_or(0.0);
                by_size
                    .iter()
                    .take_while(|&&i| diag[i] > ratio * median)
                    .count()
                    .min(max)
            }
        };
        while count < n && !(n - count).is_multiple_of(d) {
            count += 1;
        }
        if count >= n {
            return Err(Error::invalid_parameter(
                "outliers",
                format!("{self:?} leaves none of the {n} columns to quantize with d = {d}"),
            ));
        }
        let mut chosen = by_size[..count].to_vec();
        chosen.sort_unstable();
        Ok(chosen)
    }
}

/// The columns of a `[rows, cols]` matrix split into quantized (`rest`) and exact
/// (`outliers`) ones, both ascending.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ColumnSplit {
    pub cols: usize,
    pub rest: Vec<usize>,
    pub outliers: Vec<usize>,
}

impl ColumnSplit {
    pub fn new(cols: usize, outliers: Vec<usize>) -> Self {
        let mut is_outlier = vec![false; cols];
        outliers.iter().for_each(|&c| is_outlier[c] = true);
        let rest = (0..cols).filter(|&c| !is_outlier[c]).collect();
        ColumnSplit {
            cols,
            rest,
            outliers,
        }
    }

    /// Columns `which` of the row-major `[rows, cols]` `matrix`.
    pub fn gather(&self, matrix: &[f32], which: &[usize]) -> Vec<f32> {
        matrix
            .chunks_exact(self.cols)
            .flat_map(|row| which.iter().map(move |&c| row[c]))
            .collect()
    }

    /// The full matrix from its quantized columns `rest` (`[rows, |rest|]`) and outlier
    /// columns `exact` (`[rows, |outliers|]`).
    pub fn merge(&self, rest: &[f32], exact: &[f32]) -> Vec<f32> {
        let (q, s) = (self.rest.len(), self.outliers.len());
        let rows = rest.len().checked_div(q).unwrap_or(exact.len() / s.max(1));
        let mut out = vec![0f32; rows * self.cols];
        for (o, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.rest
                .iter()
                .enumerate()
                .for_each(|(j, &c)| row[c] = rest[o * q + j]);
            self.outliers
                .iter()
                .enumerate()
                .for_each(|(j, &c)| row[c] = exact[o * s + j]);
        }
        out
    }

    /// `H[a, b]` of a row-major `[cols, cols]` Gram matrix.
    pub fn block(&self, gram: &[f64], a: &[usize], b: &[usize]) -> Mat<f64> {
        Mat::from_fn(a.len(), b.len(), |i, j| gram[a[i] * self.cols + b[j]])
    }

    /// The quadratic with its columns in the order `rest`, then `outliers`.
    pub fn permuted(&self, quad: &Quadratic) -> Result<Quadratic> {
        let Some(g) = quad.gram() else {
            return Ok(quad.clone());
        };
        let order: Vec<usize> = self.rest.iter().chain(&self.outliers).copied().collect();
        let n = self.cols;
        let gram = (0..n * n)
            .map(|i| g[order[i / n] * n + order[i % n]])
            .collect();
        Quadratic::from_gram(gram, n)
    }

    /// The quadratic restricted to the quantized columns (`H_RR`).
    pub fn restricted(&self, quad: &Quadratic) -> Result<Quadratic> {
        match quad.gram() {
            None => Ok(Quadratic::identity(self.rest.len())),
            Some(g) => {
                let m = self.block(g, &self.rest, &self.rest);
                Quadratic::from_gram(row_major(&m), self.rest.len())
            }
        }
    }
}

fn row_major(m: &Mat<f64>) -> Vec<f64> {
    (0..m.nrows() * m.ncols())
        .map(|i| m[(i / m.ncols(), i % m.ncols())])
        .collect()
}

/// The optimal outlier values given the quantized columns, `v_O = w_O + A (w_R − ŵ_R)` with
/// `A = H_OO⁻¹ H_OR`, and the Schur complement that is left to minimise.
pub(crate) struct Compensation {
    /// `A`, `[s, q]`.
    a: Mat<f64>,
    /// `H_RR − H_RO A`, row-major `[q, q]`.
    schur: Vec<f64>,
}

impl Compensation {
    /// For the Gram matrix of `quad` (natural column order).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `H_OO` stays singular after a small ridge (outlier
    /// columns that were never excited).
    pub fn new(split: &ColumnSplit, quad: &Quadratic) -> Result<Self> {
        let g = quad.gram().ok_or_else(|| {
            Error::invalid_parameter("outliers", "compensation needs recorded inputs")
        })?;
        let h_oo = split.block(g, &split.outliers, &split.outliers);
        let h_or = split.block(g, &split.outliers, &split.rest);
        let s = split.outliers.len();
        let scale = (0..s).map(|i| h_oo[(i, i)]).sum::<f64>() / s.max(1) as f64;
        let mut jitter = 1e-10 * scale.max(f64::MIN_POSITIVE);
        for _ in 0..8 {
            let damped = Mat::from_fn(s, s, |i, j| {
                h_oo[(i, j)] + if i == j { jitter } else { 0.0 }
            });
            if let Ok(llt) = damped.llt(Side::Lower) {
                let a = llt.solve(&h_or);
                let mut schur = split.block(g, &split.rest, &split.rest);
                matmul(&mut schur, Accum::Add, h_or.transpose(), &a, -1.0, Par::Seq);
                return Ok(Compensation {
                    a,
                    schur: row_major(&schur),
                });
            }
            jitter *= 100.0;
        }
        Err(Error::invalid_parameter(
            "outliers",
            "the inputs' second moment on the outlier columns is singular",
        ))
    }

    /// `H_RR − H_RO H_OO⁻¹ H_OR` as an objective on the quantized columns.
    pub fn schur(&self) -> Result<Quadratic> {
        let q = self.a.ncols();
        // Symmetrise: the two products are equal up to rounding.
        let sym = (0..q * q)
            .map(|i| {
                let (r, c) = (i / q, i % q);
                0.5 * (self.schur[r * q + c] + self.schur[c * q + r])
            })
            .collect();
        Quadratic::from_gram(sym, q)
    }

    /// `v_O` (`[rows, s]`) for the reference columns `w_r`, `w_o` and the quantized `approx_r`.
    pub fn values(&self, w_r: &[f32], w_o: &[f32], approx_r: &[f32]) -> Vec<f32> {
        let (s, q) = (self.a.nrows(), self.a.ncols());
        let rows = w_r.len() / q.max(1);
        let err = Mat::from_fn(rows, q, |o, j| {
            f64::from(w_r[o * q + j]) - f64::from(approx_r[o * q + j])
        });
        let mut v = Mat::from_fn(rows, s, |o, j| f64::from(w_o[o * s + j]));
        matmul(&mut v, Accum::Add, &err, self.a.transpose(), 1.0, Par::Seq);
        (0..rows * s).map(|i| v[(i / s, i % s)] as f32).collect()
    }
}
