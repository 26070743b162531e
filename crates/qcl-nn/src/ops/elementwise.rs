//! ReLU and per-channel bias as custom ops whose backward allocates one tensor.
//!
//! candle's own ReLU backward builds a mask through several full-size temporaries; these ops
//! use the saved output instead (`dx = dy · [y > 0]`).

use candle_core::{CustomOp1, CustomOp2, Layout, Shape, Tensor};
use qcl_tensor::{Error, Result};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::cpu::kernel_cpu_fwd;
use super::cpu::{
    add_relu_slice, assume_init, lane_sum, relu_grad_slice, relu_slice, shift_relu_in_place,
    supported_dtype, uninit_vec, BinaryKernel, Float, UnaryKernel,
};

/// Elements per parallel piece of an elementwise loop: below this, threads cost more than
/// they save.
const PAR_PIECE: usize = 1 << 16;

/// Applies a slice kernel to `x` in parallel pieces.
pub(crate) fn par_unary<T: Float>(x: &[T], kernel: fn(&[T], &mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = uninit_vec::<T>(x.len());
    out.par_chunks_mut(PAR_PIECE)
        .zip(x.par_chunks(PAR_PIECE))
        .for_each(|(o, i)| kernel(i, o));
    // SAFETY: the pieces of `out` and `x` pair up one to one, and each kernel writes its piece.
    unsafe { assume_init(out) }
}

/// Applies a slice kernel to `(a, b)` in parallel pieces.
fn par_binary<T: Float>(a: &[T], b: &[T], kernel: fn(&[T], &[T], &mut [MaybeUninit<T>])) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "elementwise operands differ in length");
    let mut out = uninit_vec::<T>(a.len());
    out.par_chunks_mut(PAR_PIECE)
        .zip(a.par_chunks(PAR_PIECE).zip(b.par_chunks(PAR_PIECE)))
        .for_each(|(o, (a, b))| kernel(a, b, o));
    // SAFETY: equal lengths, so the pieces pair up and each kernel writes its piece.
    unsafe { assume_init(out) }
}

fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && supported_dtype(t.dtype())
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "qcl-relu"
    }

    kernel_cpu_fwd!(unary);

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &ReluGrad)?))
    }
}

impl UnaryKernel for Relu {
    fn run<T: Float>(&self, x: &[T], _dims: &[usize]) -> Vec<T> {
        par_unary(x, relu_slice)
    }
}

/// `dx = dy · [y > 0]`.
pub(crate) struct ReluGrad;

impl BinaryKernel for ReluGrad {
    fn run<T: Float>(&self, dy: &[T], y: &[T], _dims: &[usize]) -> Vec<T> {
        par_binary(dy, y, relu_grad_slice)
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "qcl-relu-grad"
    }

    kernel_cpu_fwd!(binary);
}

/// `max(x, 0)`, with a backward that reuses the output as its mask (one allocation instead of
/// candle's several). Any device: candle's `relu` off the CPU.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-1.0f32, 0.5, 2.0], &Device::Cpu)?;
/// assert_eq!(qcl_nn::ops::relu(&x)?.to_vec1::<f32>()?, vec![0.0, 0.5, 2.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// A candle error from the underlying op.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if on_cpu(x) {
        Ok(x.contiguous()?.apply_op1(Relu)?)
    } else {
        Ok(x.relu()?)
    }
}

/// `max(a + b, 0)` (the end of a residual block).
pub(crate) struct AddRelu;

impl BinaryKernel for AddRelu {
    fn run<T: Float>(&self, a: &[T], b: &[T], _dims: &[usize]) -> Vec<T> {
        par_binary(a, b, add_relu_slice)
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "qcl-add-relu"
    }

    kernel_cpu_fwd!(binary);

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // One masked gradient, shared by both summands.
        let masked = grad.contiguous()?.apply_op2_no_bwd(res, &ReluGrad)?;
        let for_a = a.track_op().then(|| masked.clone());
        let for_b = b.track_op().then_some(masked);
        Ok((for_a, for_b))
    }
}

/// `max(a + b, 0)` in one op (one output, one masked gradient shared by both inputs), as at
/// the end of a residual block. `a` and `b` must have the same shape.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?;
/// let b = Tensor::new(&[-3.0f32, 1.0, 0.5], &Device::Cpu)?;
/// assert_eq!(qcl_nn::ops::add_relu(&a, &b)?.to_vec1::<f32>()?, vec![0.0, 0.0, 1.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for operands of different shapes.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::ShapeMismatch {
            context: "add_relu operands".into(),
            expected: format!("{:?}", a.dims()),
            actual: b.dims().to_vec(),
        });
    }
    if on_cpu(a) && a.dtype() == b.dtype() {
        Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
    } else {
        Ok((a + b)?.relu()?)
    }
}

/// `y[b, c, …] = x[b, c, …] + bias[c]`.
struct ChannelBias;

fn channel_layout(dims: &[usize]) -> (usize, usize, usize) {
    let n = dims.first().copied().unwrap_or(1);
    let c = dims.get(1).copied().unwrap_or(1);
    let inner = dims.iter().skip(2).product::<usize>();
    (n, c, inner)
}

/// `y[b, c, …] += bias[c]`, then `max(·, 0)` if `relu`, for `y` laid out as
/// `[n, c, plane]`: the bias of [`add_channel_bias`] and of the fused convolutions.
pub(crate) fn add_bias_in_place<T: Float>(y: &mut [T], bias: &[T], plane: usize, relu: bool) {
    let c = bias.len();
    if c == 0 || plane == 0 || y.is_empty() {
        return;
    }
    y.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, p)| shift_relu_in_place(p, bias[i % c], relu));
}

impl BinaryKernel for ChannelBias {
    fn run<T: Float>(&self, x: &[T], bias: &[T], dims: &[usize]) -> Vec<T> {
        let mut y = x.to_vec();
        add_bias_in_place(&mut y, bias, channel_layout(dims).2, false);
        y
    }
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "qcl-channel-bias"
    }

    kernel_cpu_fwd!(binary);

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(grad.clone())
        } else {
            None
        };
        let db = if bias.track_op() {
            Some(grad.contiguous()?.apply_op1_no_bwd(&ChannelSum)?)
        } else {
            None
        };
        Ok((dx, db))
    }
}

/// `s[c] = Σ_{b, …} x[b, c, …]`, accumulated in f64.
pub(crate) struct ChannelSum;

pub(crate) fn channel_sums<T: Float>(x: &[T], dims: &[usize]) -> Vec<f64> {
    let (n, c, inner) = channel_layout(dims);
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut total = 0.0f64;
            for b in 0..n {
                let start = (b * c + ch) * inner;
                total += lane_sum(&x[start..start + inner]);
            }
            total
        })
        .collect()
}

impl UnaryKernel for ChannelSum {
    fn run<T: Float>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        channel_sums(x, dims)
            .into_iter()
            .map(T::from_f64_)
            .collect()
    }

    fn output_shape(&self, l: &Layout) -> Shape {
        Shape::from(channel_layout(l.dims()).1)
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "qcl-channel-sum"
    }

    kernel_cpu_fwd!(unary);
}

/// Adds a per-channel bias: `y[b, c, …] = x[b, c, …] + bias[c]` for `x` of rank ≥ 2 and
/// `bias` of shape `[c]`. Its backward sums the gradient per channel in one pass.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::zeros((2, 3, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
/// let y = qcl_nn::ops::add_channel_bias(&x, &b)?;
/// assert_eq!(y.get(1)?.get(2)?.to_vec2::<f32>()?, vec![vec![3.0, 3.0], vec![3.0, 3.0]]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless `bias` is `[x.dim(1)]`.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = x.dims().get(1).copied();
    if x.rank() < 2 || bias.dims() != [c.unwrap_or(0)] {
        return Err(Error::ShapeMismatch {
            context: "per-channel bias".into(),
            expected: format!("[{}] for input {:?}", c.unwrap_or(0), x.dims()),
            actual: bias.dims().to_vec(),
        });
    }
    if on_cpu(x) && x.dtype() == bias.dtype() {
        Ok(x.contiguous()?
            .apply_op2(&bias.contiguous()?, ChannelBias)?)
    } else {
        let mut shape = vec![1; x.rank()];
        shape[1] = bias.dim(0)?;
        Ok(x.broadcast_add(&bias.reshape(shape)?)?)
    }
}
