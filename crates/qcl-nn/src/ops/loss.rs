//! Fused losses and the straight-through estimator.

use candle_core::{CustomOp2, DType, Layout, Shape, Tensor};
use qcl_tensor::{Error, Result};
use rayon::prelude::*;

use super::cpu::kernel_cpu_fwd;
use super::cpu::{relu_slice, supported_dtype, BinaryKernel, Float};
use super::elementwise::{par_unary, ReluGrad};

fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::ShapeMismatch {
            context: what.to_string(),
            expected: format!("{:?}", a.dims()),
            actual: b.dims().to_vec(),
        });
    }
    Ok(())
}

fn on_cpu(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu() && supported_dtype(a.dtype()) && a.dtype() == b.dtype()
}

/// `mean((a − b)²)` as one node.
struct MeanSquaredError;

const PIECE: usize = 1 << 14;

fn sum_squared_difference<T: Float>(a: &[T], b: &[T]) -> f64 {
    a.par_chunks(PIECE)
        .zip(b.par_chunks(PIECE))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(a, b)| {
                    let d = (*a - *b).to_f64_();
                    d * d
                })
                .sum::<f64>()
        })
        .sum()
}

impl BinaryKernel for MeanSquaredError {
    fn run<T: Float>(&self, a: &[T], b: &[T], _dims: &[usize]) -> Vec<T> {
        let n = a.len().max(1) as f64;
        vec![T::from_f64_(sum_squared_difference(a, b) / n)]
    }

    fn output_shape(&self, _l1: &Layout, _l2: &Layout) -> Shape {
        Shape::from(())
    }
}

impl CustomOp2 for MeanSquaredError {
    fn name(&self) -> &'static str {
        "qcl-mse"
    }

    kernel_cpu_fwd!(binary);

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scale = 2.0 * g / a.elem_count().max(1) as f64;
        let da = if a.track_op() {
            Some(a.apply_op2_no_bwd(b, &ScaledDifference { scale })?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(a.apply_op2_no_bwd(b, &ScaledDifference { scale: -scale })?)
        } else {
            None
        };
        Ok((da, db))
    }
}

/// `scale · (a − b)`.
struct ScaledDifference {
    scale: f64,
}

fn scaled_difference<T: Float>(a: &[T], b: &[T], scale: T) -> Vec<T> {
    let mut out = vec![T::ZERO; a.len()];
    out.par_chunks_mut(PIECE)
        .zip(a.par_chunks(PIECE).zip(b.par_chunks(PIECE)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = scale * (*a - *b);
            }
        });
    out
}

impl BinaryKernel for ScaledDifference {
    fn run<T: Float>(&self, a: &[T], b: &[T], _dims: &[usize]) -> Vec<T> {
        scaled_difference(a, b, T::from_f64_(self.scale))
    }
}

impl CustomOp2 for ScaledDifference {
    fn name(&self) -> &'static str {
        "qcl-scaled-difference"
    }

    kernel_cpu_fwd!(binary);
}

/// Mean squared error `mean((a − b)²)` as a scalar, with a one-pass backward for both inputs
/// (candle's composition allocates five full-size temporaries).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
/// let b = Tensor::new(&[1.0f32, 0.0, 6.0], &Device::Cpu)?;
/// let loss = qcl_nn::ops::mse_loss(&a, &b)?.to_scalar::<f32>()?;
/// assert!((loss - 13.0 / 3.0).abs() < 1e-6);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless `a` and `b` have the same shape.
pub fn mse_loss(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape(a, b, "mse_loss operands")?;
    if on_cpu(a, b) {
        Ok(a.contiguous()?
            .apply_op2(&b.contiguous()?, MeanSquaredError)?)
    } else {
        Ok((a - b)?.sqr()?.mean_all()?)
    }
}

/// The straight-through estimator: the forward value of `quantized`, the gradient of
/// `input` (identity), none for `quantized`.
struct StraightThrough;

impl BinaryKernel for StraightThrough {
    fn run<T: Float>(&self, _input: &[T], quantized: &[T], _dims: &[usize]) -> Vec<T> {
        quantized.to_vec()
    }

    fn output_shape(&self, _l1: &Layout, l2: &Layout) -> Shape {
        l2.shape().clone()
    }
}

impl CustomOp2 for StraightThrough {
    fn name(&self) -> &'static str {
        "qcl-straight-through"
    }

    kernel_cpu_fwd!(binary);

    fn bwd(
        &self,
        input: &Tensor,
        _quantized: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((input.track_op().then(|| grad.clone()), None))
    }
}

/// Straight-through estimator (Bengio et al. 2013, as used by VQ-VAE): returns exactly the
/// values of `quantized` while the gradient flows to `input` unchanged, i.e.
/// `input + sg(quantized − input)` without its rounding. `quantized` gets no gradient.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let h = Var::new(&[0.3f32, -0.7], &Device::Cpu)?;
/// let q = Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?;
/// let z = qcl_nn::ops::straight_through(&h, &q)?;
/// assert_eq!(z.to_vec1::<f32>()?, vec![0.5, -0.5]);
/// let grads = (z * 3.0)?.sum_all()?.backward()?;
/// assert_eq!(grads.get(&h).unwrap().to_vec1::<f32>()?, vec![3.0, 3.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless both have the same shape.
pub fn straight_through(input: &Tensor, quantized: &Tensor) -> Result<Tensor> {
    same_shape(input, quantized, "straight_through operands")?;
    if on_cpu(input, quantized) {
        Ok(input
            .contiguous()?
            .apply_op2(&quantized.contiguous()?, StraightThrough)?)
    } else {
        Ok((input + (quantized - input)?.detach())?)
    }
}

/// `max(quantized, 0)` forward, `grad · [output > 0]` to `input` backward.
struct StraightThroughRelu;

impl BinaryKernel for StraightThroughRelu {
    fn run<T: Float>(&self, _input: &[T], quantized: &[T], _dims: &[usize]) -> Vec<T> {
        par_unary(quantized, relu_slice)
    }

    fn output_shape(&self, _l1: &Layout, l2: &Layout) -> Shape {
        l2.shape().clone()
    }
}

impl CustomOp2 for StraightThroughRelu {
    fn name(&self) -> &'static str {
        "qcl-straight-through-relu"
    }

    kernel_cpu_fwd!(binary);

    fn bwd(
        &self,
        input: &Tensor,
        _quantized: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if input.track_op() {
            Some(grad.contiguous()?.apply_op2_no_bwd(res, &ReluGrad)?)
        } else {
            None
        };
        Ok((dx, None))
    }
}

/// `relu(straight_through(input, quantized))` as one node, as a VQ-VAE decoder starts: the
/// values `max(quantized, 0)`, and the gradient `∂L/∂y · [y > 0]` for `input`. It saves one
/// full-size tensor and one backward node against the composition, with the same result.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let h = Var::new(&[0.3f32, -0.7], &Device::Cpu)?;
/// let q = Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?;
/// let z = qcl_nn::ops::straight_through_relu(&h, &q)?;
/// assert_eq!(z.to_vec1::<f32>()?, vec![0.5, 0.0]);
/// let grads = (z * 3.0)?.sum_all()?.backward()?;
/// assert_eq!(grads.get(&h).unwrap().to_vec1::<f32>()?, vec![3.0, 0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless both have the same shape.
pub fn straight_through_relu(input: &Tensor, quantized: &Tensor) -> Result<Tensor> {
    same_shape(input, quantized, "straight_through_relu operands")?;
    if on_cpu(input, quantized) {
        Ok(input
            .contiguous()?
            .apply_op2(&quantized.contiguous()?, StraightThroughRelu)?)
    } else {
        Ok(super::elementwise::relu(&straight_through(
            input, quantized,
        )?)?)
    }
}
