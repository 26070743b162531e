//! Input validation shared by every crate: shapes, dtypes and finiteness.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// What a tensor must look like: dtype, shape pattern (`None` = any size), finiteness.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_tensor::TensorSpec;
/// let spec = TensorSpec::new().dtype(DType::F32).shape(&[None, Some(3)]).finite();
/// let ok = Tensor::zeros((5, 3), DType::F32, &Device::Cpu)?;
/// spec.check("x", &ok)?;
/// let bad = Tensor::zeros((5, 4), DType::F32, &Device::Cpu)?;
/// assert!(spec.check("x", &bad).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorSpec {
    /// Required dtype, if any.
    pub dtype: Option<DType>,
    /// Required shape: one entry per dimension, `None` for "any size". `None` here: any shape.
    pub shape: Option<Vec<Option<usize>>>,
    /// Whether every element must be finite (checked for float dtypes only).
    pub finite: bool,
}

impl TensorSpec {
    /// A spec that accepts any tensor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires this dtype.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Requires this shape pattern (`None` entries match any size).
    pub fn shape(mut self, pattern: &[Option<usize>]) -> Self {
        self.shape = Some(pattern.to_vec());
        self
    }

    /// Requires this rank, any sizes.
    pub fn rank(mut self, rank: usize) -> Self {
        self.shape = Some(vec![None; rank]);
        self
    }

    /// Requires every element to be finite.
    pub fn finite(mut self) -> Self {
        self.finite = true;
        self
    }

    /// Checks dtype, then shape, then finiteness; `context` names the tensor in errors.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`], [`Error::ShapeMismatch`] or [`Error::NonFinite`].
    pub fn check(&self, context: &str, tensor: &Tensor) -> Result<()> {
        if let Some(expected) = self.dtype {
            if tensor.dtype() != expected {
                return Err(Error::DTypeMismatch {
                    context: context.to_string(),
                    expected,
                    actual: tensor.dtype(),
                });
            }
        }
        if let Some(pattern) = &self.shape {
            check_shape(context, tensor.dims(), pattern)?;
        }
        if self.finite {
            check_finite(context, tensor)?;
        }
        Ok(())
    }
}

/// Renders a shape pattern as `[*, 1, 28, 28]`.
pub fn format_shape_pattern(pattern: &[Option<usize>]) -> String {
    let parts: Vec<String> = pattern
        .iter()
        .map(|d| d.map_or_else(|| "*".to_string(), |n| n.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Checks `actual` against `pattern` (`None` = any size).
///
/// # Errors
/// [`Error::ShapeMismatch`] naming both shapes.
pub fn check_shape(context: &str, actual: &[usize], pattern: &[Option<usize>]) -> Result<()> {
    let fits = actual.len() == pattern.len()
        && actual
            .iter()
            .zip(pattern)
            .all(|(&a, p)| p.is_none_or(|p| p == a));
    if fits {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            context: context.to_string(),
            expected: format_shape_pattern(pattern),
            actual: actual.to_vec(),
        })
    }
}

/// Checks that every element of a float tensor is finite; integer tensors always pass.
///
/// The check runs on the host (the tensor is copied there if needed).
///
/// # Errors
/// [`Error::NonFinite`] with the row-major index of the first NaN or infinity.
pub fn check_finite(context: &str, tensor: &Tensor) -> Result<()> {
    let flat = tensor.flatten_all()?;
    match tensor.dtype() {
        DType::F64 => {
            let values = flat.to_vec1::<f64>()?;
            first_non_finite(values.iter().copied(), context)
        }
        DType::F32 | DType::F16 | DType::BF16 => {
            let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            check_finite_slice(context, &values)
        }
        _ => Ok(()),
    }
}

/// The rows of a float matrix `[n, d]` as row-major `f32` values on the host, with `n` and
/// `d`: how the tensor APIs of qcl's quantizers hand a tensor to their slice kernels. Any float
/// dtype is accepted and converted (`f64` rounds to nearest); the tensor may be on any device
/// and strided. Finiteness is left to the kernel that reads the values.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f64, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?;
/// let (values, n, d) = qcl_tensor::matrix_f32("points", &x)?;
/// assert_eq!((n, d), (2, 3));
/// assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// assert!(qcl_tensor::matrix_f32("points", &x.flatten_all()?).is_err()); // rank 1
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for a rank other than 2, [`Error::DTypeMismatch`] for an integer
/// dtype.
pub fn matrix_f32(context: &str, tensor: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (n, d) = match *tensor.dims() {
        [n, d] => (n, d),
        _ => {
            return Err(Error::ShapeMismatch {
                context: context.to_string(),
                expected: "[n, d]".into(),
                actual: tensor.dims().to_vec(),
            })
        }
    };
    if !tensor.dtype().is_float() {
        return Err(Error::DTypeMismatch {
            context: context.to_string(),
            expected: DType::F32,
            actual: tensor.dtype(),
        });
    }
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((values, n, d))
}

/// Checks that every value of a slice is finite.
///
/// ```
/// assert!(qcl_tensor::check_finite_slice("x", &[1.0, 2.0]).is_ok());
/// let err = qcl_tensor::check_finite_slice("x", &[1.0, f32::NAN]).unwrap_err();
/// assert!(err.to_string().contains("index 1"));
/// ```
///
/// # Errors
/// [`Error::NonFinite`] with the index of the first NaN or infinity.
pub fn check_finite_slice(context: &str, values: &[f32]) -> Result<()> {
    first_non_finite(values.iter().map(|&v| f64::from(v)), context)
}

fn first_non_finite(values: impl Iterator<Item = f64>, context: &str) -> Result<()> {
    for (index, value) in values.enumerate() {
        if !value.is_finite() {
            return Err(Error::NonFinite {
                context: context.to_string(),
                index,
                value,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shape_pattern_accepts_wildcards_and_rejects_rank_or_size() {
        assert!(check_shape("t", &[5, 1, 28, 28], &[None, Some(1), Some(28), Some(28)]).is_ok());
        let err = check_shape("t", &[5, 28, 28], &[None, Some(1), Some(28), Some(28)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape mismatch in t: expected [*, 1, 28, 28], got [5, 28, 28]"
        );
        assert!(check_shape("t", &[5, 2], &[Some(5), Some(3)]).is_err());
    }

    #[test]
    fn finite_check_finds_the_first_bad_index() -> Result<()> {
        let t = Tensor::new(&[[1f32, 2.0], [f32::INFINITY, f32::NAN]], &Device::Cpu)?;
        match check_finite("w", &t) {
            Err(Error::NonFinite { index, value, .. }) => {
                assert_eq!(index, 2);
                assert!(value.is_infinite());
            }
            other => panic!("{other:?}"),
        }
        let half = t.to_dtype(DType::F16)?;
        assert!(check_finite("w", &half).is_err());
        let ints = Tensor::new(&[1u32, 2], &Device::Cpu)?;
        check_finite("ints", &ints)?;
        Ok(())
    }

    #[test]
    fn spec_checks_dtype_first() -> Result<()> {
        let t = Tensor::zeros((2, 2), DType::F64, &Device::Cpu)?;
        let err = TensorSpec::new()
            .dtype(DType::F32)
            .rank(3)
            .check("t", &t)
            .unwrap_err();
        assert!(matches!(err, Error::DTypeMismatch { .. }));
        Ok(())
    }
}
