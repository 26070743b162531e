//! 2-D max pooling whose backward sends each output's gradient to the maximum of its window.
//!
//! candle 0.11's own `max_pool2d` backward multiplies the gradient by the fraction of the
//! window that ties for the maximum (`upsample(dy · avg_pool(mask)) · mask`), so a window with
//! one maximum passes on only `1/k²` of its gradient: every layer below a 2×2 max pool
//! trained by plain SGD learns four times slower per pool. This op gives the gradient as
//! PyTorch does: all of it to the first maximum of the window in row-major order.

use candle_core::{CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use qcl_tensor::{Error, Result};
use rayon::prelude::*;

use super::cpu::kernel_cpu_fwd;
use super::cpu::{supported_dtype, BinaryKernel, Float, UnaryKernel};

/// Window and output size of one pooling call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolGeometry {
    kernel: usize,
    stride: usize,
    h_in: usize,
    w_in: usize,
    h_out: usize,
    w_out: usize,
}

impl PoolGeometry {
    fn new(h_in: usize, w_in: usize, kernel: usize, stride: usize) -> Self {
        PoolGeometry {
            kernel,
            stride,
            h_in,
            w_in,
            h_out: (h_in - kernel) / stride + 1,
            w_out: (w_in - kernel) / stride + 1,
        }
    }

    fn from_dims(dims: &[usize], kernel: usize, stride: usize) -> Self {
        Self::new(dims[2], dims[3], kernel, stride)
    }

    /// Index in the plane of the first maximum of output `(oy, ox)`'s window; NaN counts as
    /// the largest value, so it propagates.
    fn argmax<T: Float>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let (y0, x0) = (oy * self.stride, ox * self.stride);
        let mut best = y0 * self.w_in + x0;
        let mut max = plane[best];
        for ky in 0..self.kernel {
            let row = (y0 + ky) * self.w_in + x0;
            for (kx, &v) in plane[row..row + self.kernel].iter().enumerate() {
                #[allow(clippy::eq_op)]
                let is_nan = v != v;
                #[allow(clippy::eq_op)]
                let max_is_nan = max != max;
                if !max_is_nan && (v > max || is_nan) {
                    max = v;
                    best = row + kx;
                }
            }
        }
        best
    }
}

/// Planes per parallel piece.
fn planes_per_piece(plane_len: usize) -> usize {
    (1usize << 14).div_ceil(plane_len.max(1)).max(1)
}

struct MaxPool(usize, usize);

impl UnaryKernel for MaxPool {
    fn run<T: Float>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        let g = PoolGeometry::from_dims(dims, self.0, self.1);
        let (plane_in, plane_out) = (g.h_in * g.w_in, g.h_out * g.w_out);
        let mut y = vec![T::ZERO; x.len() / plane_in.max(1) * plane_out];
        let per = planes_per_piece(plane_in);
        y.par_chunks_mut(plane_out * per)
            .zip(x.par_chunks(plane_in * per))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(plane_out).zip(x.chunks(plane_in)) {
                    for oy in 0..g.h_out {
                        for ox in 0..g.w_out {
                            y[oy * g.w_out + ox] = x[g.argmax(x, oy, ox)];
                        }
                    }
                }
            });
        y
    }

    fn output_shape(&self, l: &Layout) -> Shape {
        let dims = l.dims();
        let g = PoolGeometry::from_dims(dims, self.0, self.1);
        Shape::from((dims[0], dims[1], g.h_out, g.w_out))
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "qcl-max-pool2d"
    }

    kernel_cpu_fwd!(unary);

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &MaxPoolGrad(self.0, self.1),
        )?))
    }
}

/// `dx`: each output's gradient added at its window's first maximum.
struct MaxPoolGrad(usize, usize);

impl BinaryKernel for MaxPoolGrad {
    fn run<T: Float>(&self, x: &[T], dy: &[T], dims: &[usize]) -> Vec<T> {
        let g = PoolGeometry::from_dims(dims, self.0, self.1);
        let (plane_in, plane_out) = (g.h_in * g.w_in, g.h_out * g.w_out);
        let mut dx = vec![T::ZERO; x.len()];
        let per = planes_per_piece(plane_in);
        dx.par_chunks_mut(plane_in * per)
            .zip(
                x.par_chunks(plane_in * per)
                    .zip(dy.par_chunks(plane_out * per)),
            )
            .for_each(|(dx, (x, dy))| {
                for (dx, (x, dy)) in dx
                    .chunks_mut(plane_in)
                    .zip(x.chunks(plane_in).zip(dy.chunks(plane_out)))
                {
                    for oy in 0..g.h_out {
                        for ox in 0..g.w_out {
                            dx[g.argmax(x, oy, ox)] += dy[oy * g.w_out + ox];
                        }
                    }
                }
            });
        dx
    }
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "qcl-max-pool2d-grad"
    }

    kernel_cpu_fwd!(binary);
}

/// 2-D max pooling of `x` `[n, c, h, w]` with a `kernel × kernel` window moved by `stride`
/// (no padding; `h_out = ⌊(h − kernel)/stride⌋ + 1`, likewise `w_out`), as candle's
/// `max_pool2d_with_stride`, but with PyTorch's gradient: each output's gradient goes in full
/// to the first maximum of its window (row-major), where candle 0.11 passes on only the tied
/// fraction of the window (¼ for one maximum in 2×2). NaN propagates.
///
/// On the CPU for `f32`/`f64` this is one pass forward and one backward; elsewhere, windows
/// that tile the input (`kernel == stride`) reduce by candle's `max` over a reshaped view (the
/// full gradient to every tied maximum), and other windows fall back to candle's op.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::new(&[[[[1.0f32, 2.0], [4.0, 0.0]]]], &Device::Cpu)?;
/// let y = qcl_nn::ops::max_pool2d(x.as_tensor(), 2, 2)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![4.0]);
/// let grads = y.sum_all()?.backward()?;
/// let dx = grads.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(dx, vec![0.0, 0.0, 1.0, 0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for an input that is not rank 4 or a window larger than it;
/// [`Error::InvalidParameter`] for a zero kernel or stride.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    if kernel == 0 || stride == 0 {
        return Err(Error::invalid_parameter(
            "kernel/stride",
            format!("must be at least 1, got kernel {kernel}, stride {stride}"),
        ));
    }
    let (h, w) = match x.dims() {
        &[_, _, h, w] => (h, w),
        other => {
            return Err(Error::ShapeMismatch {
                context: "max_pool2d input".into(),
                expected: "[n, c, h, w]".into(),
                actual: other.to_vec(),
            })
        }
    };
    if kernel > h || kernel > w {
        return Err(Error::ShapeMismatch {
            context: format!("max_pool2d: a {kernel}×{kernel} window over the input"),
            expected: format!("h, w >= {kernel}"),
            actual: x.dims().to_vec(),
        });
    }
    if x.device().is_cpu() && supported_dtype(x.dtype()) {
        return Ok(x.contiguous()?.apply_op1(MaxPool(kernel, stride))?);
    }
    if kernel == stride {
        return tiled_max_pool(x, kernel);
    }
    Ok(x.max_pool2d_with_stride(kernel, stride)?)
}

/// Max pooling with `kernel == stride` by candle's `max` over the windows of a reshaped view
/// (any device; the full gradient to every tied maximum).
fn tiled_max_pool(x: &Tensor, kernel: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let g = PoolGeometry::new(h, w, kernel, kernel);
    let windows = x
        .narrow(2, 0, g.h_out * kernel)?
        .narrow(3, 0, g.w_out * kernel)?
        .reshape((n, c, g.h_out, kernel, g.w_out, kernel))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, g.h_out, g.w_out, kernel * kernel))?;
    Ok(windows.max(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_tiled_path_of_other_devices_agrees_on_the_cpu() {
        let values: Vec<f32> = (0..2 * 3 * 7 * 5).map(|i| ((i * 37) % 11) as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(values, (2, 3, 7, 5), &Device::Cpu).unwrap())
            .unwrap();
        for k in [1, 2, 3] {
            let fused = max_pool2d(x.as_tensor(), k, k).unwrap();
            let tiled = tiled_max_pool(x.as_tensor(), k).unwrap();
            assert_eq!(fused.dims(), tiled.dims());
            assert_eq!(
                fused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tiled.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            // Without ties in a window both send the whole gradient to the maximum.
            let unique = Var::from_tensor(
                &Tensor::arange(0f32, 2.0 * 3.0 * 7.0 * 5.0, &Device::Cpu)
                    .unwrap()
                    .reshape((2, 3, 7, 5))
                    .unwrap(),
            )
            .unwrap();
            let g1 = max_pool2d(unique.as_tensor(), k, k)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = tiled_max_pool(unique.as_tensor(), k)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(
                g1.get(unique.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                g2.get(unique.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
    }
}
