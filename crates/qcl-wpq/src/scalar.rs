//! Scalar baselines: round-to-nearest on asymmetric min-max grids per group of `g` consecutive
//! weights of a row (fp16 scale and zero per group), and its error-feedback form (GPTQ,
//! Frantar et al., ICLR 2023). A row is one output (`W.reshape(O, D)`), so `g = D` is the
//! per-channel grid.
//!
//! Grid of a group with values `v`: `lo = min(min v, 0)`, `hi = max(max v, 0)` (zero is
//! always representable, as GPTQ does), `s = (hi − lo)/(2^b − 1)` rounded to fp16,
//! `z = round(−lo/s)`; a weight is stored as `q = clamp(round(w/s) + z, 0, 2^b − 1)` and
//! decoded as `s·(q − z)`.

use half::f16;
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ExactColumns;
use crate::objective::{inverse_factor, ColumnSplit, Compensation, OutlierColumns, Quadratic};

/// Largest number of bits per scalar code.
pub const MAX_SCALAR_BITS: u32 = 8;

/// Every knob of a scalar method, with defaults (int4, group 128, GPTQ's damping and batch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalarConfig {
    /// Bits per weight, `1..=8`.
    pub bits: u32,
    /// Weights per group along a row; `None` for one group per row (per channel).
    pub group: Option<usize>,
    /// Damping `λ = damp·mean(diag H)` added to the Hessian (error feedback only).
    pub damp: f64,
    /// Columns per lazy batch update (error feedback only).
    pub block_columns: usize,
    /// Input columns of a 2-D weight kept exactly in fp16 (needs recorded inputs; applied by
    /// [`crate::compress_tensor`], GPTQ ordering them last and storing their compensated
    /// values as error-feedback PQ does).
    pub outliers: OutlierColumns,
}

impl Default for ScalarConfig {
    fn default() -> Self {
        ScalarConfig {
            bits: 4,
            group: Some(128),
            damp: 0.01,
            block_columns: 128,
            outliers: OutlierColumns::None,
        }
    }
}

impl ScalarConfig {
    /// `bits` per weight in groups of `group` (`None`: per channel).
    pub fn new(bits: u32, group: Option<usize>) -> Self {
        ScalarConfig {
            bits,
            group,
            ..Default::default()
        }
    }

    /// The group size for rows of `cols` weights.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for bits outside `1..=8`, a zero group or batch, a `damp`
    /// that is not finite and `>= 0`, or a bad outlier rule.
    pub fn group_for(&self, cols: usize) -> Result<usize> {
        if !(1..=MAX_SCALAR_BITS).contains(&self.bits) {
            return Err(Error::invalid_parameter(
                "bits",
                format!("must be in 1..={MAX_SCALAR_BITS}, got {}", self.bits),
            ));
        }
        if self.block_columns == 0 {
            return Err(Error::invalid_parameter(
                "block_columns",
                "must be at least 1",
            ));
        }
        if !(self.damp.is_finite() && self.damp >= 0.0) {
            return Err(Error::invalid_parameter(
                "damp",
                format!("must be finite and >= 0, got {}", self.damp),
            ));
        }
        self.outliers.validate()?;
        match self.group {
            Some(0) => Err(Error::invalid_parameter("group", "must be at least 1")),
            Some(g) => Ok(g.min(cols)),
            None => Ok(cols),
        }
    }
}

/// Integer codes with their grids.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarCodes {
    /// One code per weight, row-major `[rows, cols]`.
    pub codes: Vec<u32>,
    /// Scale of every group, `[rows, ⌈cols/g⌉]`.
    pub scales: Vec<f16>,
    /// Zero point (an integer in fp16) of every group, `[rows, ⌈cols/g⌉]`.
    pub zeros: Vec<f16>,
}

/// A weight quantized to a scalar grid.
///
/// ```
/// use qcl_wpq::{rtn, ScalarConfig};
/// let w = [0.0f32, 1.0, 2.0, 3.0, -1.0, -0.5, 0.0, 0.5];
/// let q = rtn(&w, &[2, 4], &ScalarConfig::new(2, Some(4)))?;
/// // Row 0: lo = 0, hi = 3, s = 1 → exact; row 1: s = 0.5, also exact.
/// assert_eq!(q.decode()?, w.to_vec());
/// assert_eq!(q.index_bits() + q.scale_bits(), 8 * 2 + 2 * 32);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarTensor {
    /// The weight's shape; rows are its first dimension.
    pub shape: Vec<usize>,
    /// Bits per weight.
    pub bits: u32,
    /// Weights per group along a row (the last group of a row may be shorter).
    pub group: usize,
    /// Codes and grids.
    pub codes: ScalarCodes,
}

impl ScalarTensor {
    /// `(rows, cols)` of the matrix view.
    pub fn matrix_dims(&self) -> (usize, usize) {
        let rows = self.shape.first().copied().unwrap_or(1);
        let n: usize = self.shape.iter().product();
        (rows, n / rows.max(1))
    }

    /// Groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.matrix_dims().1.div_ceil(self.group.max(1))
    }

    /// Checks sizes and that every code fits in `bits`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::CorruptStream`].
    pub fn validate(&self) -> Result<()> {
        let (rows, cols) = self.matrix_dims();
        let per_row = self.groups_per_row();
        if self.codes.codes.len() != rows * cols
            || self.codes.scales.len() != rows * per_row
            || self.codes.zeros.len() != rows * per_row
        {
            return Err(Error::ShapeMismatch {
                context: "scalar codes".into(),
                expected: format!(
                    "{} codes and {} scales and zeros",
                    rows * cols,
                    rows * per_row
                ),
                actual: vec![
                    self.codes.codes.len(),
                    self.codes.scales.len(),
                    self.codes.zeros.len(),
                ],
            });
        }
        if let Some(i) = self.codes.codes.iter().position(|&c| c >> self.bits != 0) {
            return Err(Error::corrupt_stream(
                "scalar codes",
                format!(
                    "code {} at {i} does not fit in {} bits",
                    self.codes.codes[i], self.bits
                ),
            ));
        }
        Ok(())
    }

    /// The decoded weight, row-major in `shape`.
    ///
    /// # Errors
    /// As [`ScalarTensor::validate`].
    pub fn decode(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let (_, cols) = self.matrix_dims();
        let per_row = self.groups_per_row();
        Ok(self
            .codes
            .codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let g = (i / cols) * per_row + (i % cols) / self.group;
                dequantize(q, self.codes.scales[g], self.codes.zeros[g])
            })
            .collect())
    }

    /// Bits of the codes: `bits` per weight.
    pub fn index_bits(&self) -> u64 {
        self.codes.codes.len() as u64 * u64::from(self.bits)
    }

    /// Bits of the fp16 scales and zeros.
    pub fn scale_bits(&self) -> u64 {
        32 * self.codes.scales.len() as u64
    }
}

/// The fp16 `(scale, zero)` of a group's min-max grid (see the module documentation).
pub(crate) fn grid(values: impl Iterator<Item = f32>, bits: u32) -> (f16, f16) {
    let (mut lo, mut hi) = (0f32, 0f32);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo == hi {
        // An all-zero group: any grid holds it exactly.
        (lo, hi) = (-1.0, 1.0);
    }
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut scale = f16::from_f32((hi - lo) / maxq);
    if scale.to_f32() == 0.0 {
        scale = f16::from_bits(1); // the smallest subnormal
    } else if scale.is_infinite() {
        scale = f16::MAX;
    }
    let zero = (-lo / scale.to_f32()).round().clamp(0.0, maxq);
    (scale, f16::from_f32(zero))
}

/// `clamp(round(w/s) + z, 0, 2^bits − 1)`.
pub(crate) fn quantize(w: f32, scale: f16, zero: f16, bits: u32) -> u32 {
    let maxq = ((1u32 << bits) - 1) as f32;
    ((w / scale.to_f32()).round() + zero.to_f32()).clamp(0.0, maxq) as u32
}

/// `s·(q − z)`.
pub(crate) fn dequantize(q: u32, scale: f16, zero: f16) -> f32 {
    scale.to_f32() * (q as f32 - zero.to_f32())
}

fn matrix_of(weight: &[f32], shape: &[usize]) -> Result<(usize, usize)> {
    let n: usize = shape.iter().product();
    if shape.len() < 2 || n == 0 || n != weight.len() {
        return Err(Error::ShapeMismatch {
            context: "weight".into(),
            expected: "a non-empty weight of rank 2 or more matching its values".into(),
            actual: shape.to_vec(),
        });
    }
    qcl_tensor::check_finite_slice("weight", weight)?;
    Ok((shape[0], n / shape[0]))
}

/// Round-to-nearest of `weight` (row-major `shape`, rows = `shape[0]`) on per-group grids.
///
/// # Errors
/// [`Error::ShapeMismatch`] for a weight of rank < 2 or the wrong size, [`Error::NonFinite`],
/// and as [`ScalarConfig::group_for`].
pub fn rtn(weight: &[f32], shape: &[usize], config: &ScalarConfig) -> Result<ScalarTensor> {
    let (rows, cols) = matrix_of(weight, shape)?;
    let group = config.group_for(cols)?;
    let per_row = cols.div_ceil(group);
    let mut codes = ScalarCodes {
        codes: Vec::with_capacity(weight.len()),
        scales: Vec::with_capacity(rows * per_row),
        zeros: Vec::with_capacity(rows * per_row),
    };
    for row in weight.chunks_exact(cols) {
        for part in row.chunks(group) {
            let (s, z) = grid(part.iter().copied(), config.bits);
            codes.scales.push(s);
            codes.zeros.push(z);
            codes
                .codes
                .extend(part.iter().map(|&w| quantize(w, s, z, config.bits)));
        }
    }
    Ok(ScalarTensor {
        shape: shape.to_vec(),
        bits: config.bits,
        group,
        codes,
    })
}

/// GPTQ of `weight` (row-major `shape`) on per-group grids with the output error `quad`
/// (width = `shape[1..]` product, natural order). With a diagonal `H` no error is fed forward
/// and the result equals [`rtn`].
///
/// # Errors
/// As [`rtn`]; [`Error::ShapeMismatch`] for an objective of another width; as the damped
/// Cholesky factorisation (inputs all zero).
pub fn gptq(
    weight: &[f32],
    shape: &[usize],
    config: &ScalarConfig,
    quad: &Quadratic,
) -> Result<ScalarTensor> {
    let (rows, cols) = matrix_of(weight, shape)?;
    let group = config.group_for(cols)?;
    if quad.width() != cols {
        return Err(Error::ShapeMismatch {
            context: "calibration inputs".into(),
            expected: format!("width {cols}"),
            actual: vec![quad.width()],
        });
    }
    let u = inverse_factor(quad, config.damp)?;
    let codes = crate::objective::feedback_scalar(
        weight,
        rows,
        &u,
        (config.bits, group),
        config.block_columns,
    );
    Ok(ScalarTensor {
        shape: shape.to_vec(),
        bits: config.bits,
        group,
        codes,
    })
}

/// Round-to-nearest (`feedback = false`) or GPTQ of `weight` with `config.outliers` kept
/// exactly: the grids then cover the other columns (a `[rows, cols − s]` tensor), and GPTQ
/// orders the outlier columns last and stores their optimal values given the quantized
/// columns (see [`crate::objective`]).
pub(crate) fn scalar_with_outliers(
    weight: &[f32],
    shape: &[usize],
    config: &ScalarConfig,
    quad: Option<&Quadratic>,
    feedback: bool,
) -> Result<(ScalarTensor, Option<ExactColumns>)> {
    let needs_quad = || {
        quad.ok_or_else(|| {
            Error::EmptyInput("the method needs calibration inputs and none were recorded".into())
        })
    };
    if !config.outliers.is_requested() {
        let t = if feedback {
            gptq(weight, shape, config, needs_quad()?)?
        } else {
            rtn(weight, shape, config)?
        };
        return Ok((t, None));
    }
    let quad = needs_quad()?;
    let (rows, cols) = match (shape, quad.gram()) {
        (&[rows, cols], Some(_)) if quad.width() == cols => (rows, cols),
        _ => {
            return Err(Error::invalid_parameter(
                "outliers",
                format!(
                    "outlier columns need a 2-D weight with recorded float inputs of its width, \
                     got shape {shape:?}"
                ),
            ))
        }
    };
    matrix_of(weight, shape)?;
    let g = quad.gram().unwrap_or_default();
    let diag: Vec<f64> = (0..cols).map(|i| g[i * cols + i]).collect();
    let split = ColumnSplit::new(cols, config.outliers.select(&diag, 1)?);
    let q = split.rest.len();
    let w_r = split.gather(weight, &split.rest);
    let w_o = split.gather(weight, &split.outliers);
    let (tensor, exact) = if feedback {
        let u = inverse_factor(&split.permuted(quad)?, config.damp)?;
        let u = u.submatrix(0, 0, q, q).to_owned();
        let group = config.group_for(q)?;
        let codes = crate::objective::feedback_scalar(
            &w_r,
            rows,
            &u,
            (config.bits, group),
            config.block_columns,
        );
        let t = ScalarTensor {
            shape: vec![rows, q],
            bits: config.bits,
            group,
            codes,
        };
        let values = Compensation::new(&split, quad)?.values(&w_r, &w_o, &t.decode()?);
        (t, values)
    } else {
        (rtn(&w_r, &[rows, q], config)?, w_o)
    };
    let columns = split.outliers.iter().map(|&c| c as u32).collect();
    Ok((tensor, Some(ExactColumns::new(columns, &exact))))
}
