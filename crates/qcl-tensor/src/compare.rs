//! Comparing tensors: the largest difference, and exact bit patterns for "same seed, same
//! bits" checks.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// `max |a − b|` over every element, in `f32` (both tensors converted first); NaN if any
/// difference is NaN, so that a tolerance check cannot pass over one.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
/// let b = Tensor::new(&[1.0f32, 2.5, 2.0], &Device::Cpu)?;
/// assert_eq!(qcl_tensor::max_abs_diff(&a, &b)?, 1.0);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for tensors of different shapes; [`Error::EmptyInput`] for empty
/// ones; a candle error for a dtype that does not convert to `f32`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        return Err(Error::ShapeMismatch {
            context: "max_abs_diff".into(),
            expected: format!("{:?}", a.dims()),
            actual: b.dims().to_vec(),
        });
    }
    if a.elem_count() == 0 {
        return Err(Error::EmptyInput("max_abs_diff of empty tensors".into()));
    }
    let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    let values = diff.abs()?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.into_iter().fold(0f32, |worst, d| {
        if d.is_nan() || worst.is_nan() {
            f32::NAN
        } else {
            worst.max(d)
        }
    }))
}

/// The bit patterns of every element as `f32` (flattened; another dtype is converted to `f32`
/// first): equal vectors mean bit-identical `f32` values.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let t = Tensor::new(&[[1.0f32, -0.0]], &Device::Cpu)?;
/// assert_eq!(qcl_tensor::f32_bits(&t)?, vec![1.0f32.to_bits(), (-0.0f32).to_bits()]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// A candle error for a dtype that does not convert to `f32`.
pub fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_nan_difference_is_not_hidden() {
        let a = Tensor::new(&[1.0f32, f32::NAN, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 2.0, 9.0], &Device::Cpu).unwrap();
        assert!(max_abs_diff(&a, &b).unwrap().is_nan());
        let c = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        assert!(matches!(
            max_abs_diff(&a, &c),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
