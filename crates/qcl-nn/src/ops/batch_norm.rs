//! Fused BatchNorm (+ optional ReLU) over the channel axis, with a closed-form backward.
//!
//! For channel `c` with statistics `μ_c`, `σ²_c` (training: the batch's, biased; evaluation:
//! the running ones), `x̂ = (x − μ_c)/√(σ²_c + ε)` and `y = γ_c x̂ + β_c` (then `max(y, 0)` if
//! fused). With `g = dy · [y > 0]` (or `dy`) and `M` elements per channel:
//!
//! - `∂L/∂β_c = Σ g`, `∂L/∂γ_c = Σ g x̂`;
//! - training: `∂L/∂x = γ_c/√(σ²_c+ε) · (g − ∂L/∂β_c/M − x̂ ∂L/∂γ_c/M)`;
//! - evaluation: `∂L/∂x = γ_c/√(σ²_c+ε) · g`.

use std::sync::{Arc, Mutex};

use candle_core::{CustomOp3, DType, Tensor};
use qcl_tensor::{Error, Result};
use rayon::prelude::*;

use super::cpu::kernel_cpu_fwd;
use super::cpu::{
    affine_of_grad, assume_init, chunk_count, for_each_chunk_mut, lane_grad_sums,
    lane_squared_deviation, lane_sum, relu_grad_slice, scale_shift, supported_dtype, uninit_vec,
    Float, TernaryKernel,
};

/// Per-channel statistics of one training batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Biased variance of each channel (divided by the count).
    pub variance: Vec<f64>,
    /// Elements per channel (`n · h · w`).
    pub count: usize,
}

impl BatchStats {
    /// The unbiased variance `σ² · M/(M−1)` that running statistics track (PyTorch's rule).
    pub fn unbiased_variance(&self) -> Vec<f64> {
        let m = self.count as f64;
        let factor = if self.count > 1 { m / (m - 1.0) } else { 1.0 };
        self.variance.iter().map(|v| v * factor).collect()
    }
}

fn layout(dims: &[usize]) -> (usize, usize, usize) {
    let n = dims[0];
    let c = dims[1];
    (n, c, dims[2..].iter().product())
}

/// Mean and biased variance per channel, in f64 (two passes for accuracy).
fn channel_moments<T: Float>(x: &[T], dims: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let (n, c, inner) = layout(dims);
    let count = (n * inner).max(1) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = (0..n).map(|b| &x[(b * c + ch) * inner..(b * c + ch + 1) * inner]);
            let mean = planes.clone().map(lane_sum).sum::<f64>() / count;
            let mean_t = T::from_f64_(mean);
            let var = planes
                .map(|p| lane_squared_deviation(p, mean_t))
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .unzip()
}

/// Applies `y = x·scale_c + shift_c` (then ReLU) image by image.
fn affine<T: Float>(x: &[T], dims: &[usize], scale: &[T], shift: &[T], relu: bool) -> Vec<T> {
    let (n, c, inner) = layout(dims);
    let mut y = uninit_vec::<T>(x.len());
    let image = c * inner;
    if image == 0 {
        // SAFETY: empty.
        return unsafe { assume_init(y) };
    }
    for_each_chunk_mut(&mut y, image, chunk_count(n), |first, out| {
        for (i, y_b) in out.chunks_mut(image).enumerate() {
            let x_b = &x[(first + i) * image..(first + i + 1) * image];
            for ch in 0..c {
                let (s, t) = (scale[ch], shift[ch]);
                let dst = &mut y_b[ch * inner..(ch + 1) * inner];
                let src = &x_b[ch * inner..(ch + 1) * inner];
                scale_shift(src, s, t, relu, dst);
            }
        }
    });
    // SAFETY: every image's every channel plane was written above.
    unsafe { assume_init(y) }
}

/// Statistics the forward pass used (filled by the forward pass in training mode).
#[derive(Debug, Default)]
pub(super) struct Saved {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    variance: Vec<f64>,
    count: usize,
}

impl Saved {
    /// The batch statistics of `x` (`[n, c, …]`), with `1/√(σ² + ε)` per channel.
    pub(super) fn of_batch<T: Float>(x: &[T], dims: &[usize], eps: f64) -> Self {
        let (mean, variance) = channel_moments(x, dims);
        Self {
            inv_std: variance.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
            mean,
            variance,
            count: dims[0] * dims[2..].iter().product::<usize>(),
        }
    }

    /// The statistics as reported to callers (for the running estimates).
    pub(super) fn batch_stats(&self) -> BatchStats {
        BatchStats {
            mean: self.mean.clone(),
            variance: self.variance.clone(),
            count: self.count,
        }
    }

    /// `y = γ·(x − μ)/√(σ² + ε) + β` (then ReLU) with these statistics.
    pub(super) fn normalise<T: Float>(
        &self,
        x: &[T],
        dims: &[usize],
        gamma: &[T],
        beta: &[T],
        relu: bool,
    ) -> Vec<T> {
        let scale: Vec<T> = (0..gamma.len())
            .map(|c| T::from_f64_(gamma[c].to_f64_() * self.inv_std[c]))
            .collect();
        let shift: Vec<T> = (0..gamma.len())
            .map(|c| {
                T::from_f64_(
                    beta[c].to_f64_() - self.mean[c] * gamma[c].to_f64_() * self.inv_std[c],
                )
            })
            .collect();
        affine(x, dims, &scale, &shift, relu)
    }
}

/// The autograd node of a BatchNorm over `(x, γ, β)`.
struct BatchNormOp {
    eps: f64,
    relu: bool,
    /// Training mode computes and stores batch statistics; evaluation fills this beforehand.
    training: bool,
    saved: Arc<Mutex<Saved>>,
}

impl BatchNormOp {
    fn forward<T: Float>(&self, x: &[T], dims: &[usize], gamma: &[T], beta: &[T]) -> Vec<T> {
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if self.training {
            *saved = Saved::of_batch(x, dims, self.eps);
        }
        saved.normalise(x, dims, gamma, beta, self.relu)
    }
}

impl TernaryKernel for BatchNormOp {
    fn run<T: Float>(&self, x: &[T], gamma: &[T], beta: &[T], dims: &[usize]) -> Vec<T> {
        self.forward(x, dims, gamma, beta)
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "qcl-batch-norm"
    }

    kernel_cpu_fwd!(ternary);

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gamma_values: Vec<f64> = gamma.to_dtype(DType::F64)?.to_vec1()?;
        let backward = BatchNormBackward {
            op: self,
            gamma: gamma_values,
            sums: Mutex::new(None),
        };
        // One pass for Σg and Σg·x̂, then one for ∂L/∂x; both inside this op.
        let dx = grad.apply_op3_no_bwd(x, res, &backward)?;
        let (sum_g, sum_gx) = backward
            .sums
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let to_tensor = |v: Vec<f64>| -> candle_core::Result<Tensor> {
            Tensor::from_vec(v, gamma.dims(), gamma.device())?.to_dtype(gamma.dtype())
        };
        let dgamma = if gamma.track_op() {
            Some(to_tensor(sum_gx)?)
        } else {
            None
        };
        let dbeta = if beta.track_op() {
            Some(to_tensor(sum_g)?)
        } else {
            None
        };
        Ok((if x.track_op() { Some(dx) } else { None }, dgamma, dbeta))
    }
}

/// Computes `∂L/∂x` of a [`BatchNormOp`] from `(dy, x, y)`, leaving `(Σg, Σg·x̂)` in `sums`.
struct BatchNormBackward<'a> {
    op: &'a BatchNormOp,
    gamma: Vec<f64>,
    sums: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

impl BatchNormBackward<'_> {
    fn input_gradient<T: Float>(&self, dy: &[T], x: &[T], y: &[T], dims: &[usize]) -> Vec<T> {
        let saved = self.op.saved.lock().unwrap_or_else(|e| e.into_inner());
        let (dx, sum_g, sum_gx) = input_gradient(
            dy,
            x,
            y,
            dims,
            &saved,
            &self.gamma,
            (self.op.relu, self.op.training),
        );
        *self.sums.lock().unwrap_or_else(|e| e.into_inner()) = Some((sum_g, sum_gx));
        dx
    }
}

/// `∂L/∂x` of a BatchNorm (+ ReLU) from `(dy, x, y)` and the statistics of its forward pass,
/// with `(Σg, Σg·x̂)`, i.e. `(∂L/∂β, ∂L/∂γ)`. `y` is read only for the ReLU mask.
pub(super) fn input_gradient<T: Float>(
    dy: &[T],
    x: &[T],
    y: &[T],
    dims: &[usize],
    saved: &Saved,
    gamma: &[f64],
    (relu, training): (bool, bool),
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let (n, c, inner) = layout(dims);
    let (sum_g, sum_gx): (Vec<f64>, Vec<f64>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mean, inv) = (T::from_f64_(saved.mean[ch]), saved.inv_std[ch]);
            let (mut sg, mut sgc) = (0.0, 0.0);
            // With ReLU, mask the plane's gradient first (a vectorised select), so that the
            // sums themselves are plain lanes.
            let mut masked = if relu {
                uninit_vec::<T>(inner)
            } else {
                Vec::new()
            };
            for b in 0..n {
                let r = (b * c + ch) * inner..(b * c + ch + 1) * inner;
                let (g, gc) = if relu {
                    relu_grad_slice(&dy[r.clone()], &y[r.clone()], &mut masked);
                    // SAFETY: `relu_grad_slice` wrote all `inner` elements.
                    let g =
                        unsafe { std::slice::from_raw_parts(masked.as_ptr().cast::<T>(), inner) };
                    lane_grad_sums(g, &x[r], mean)
                } else {
                    lane_grad_sums(&dy[r.clone()], &x[r], mean)
                };
                sg += g;
                sgc += gc;
            }
            (sg, sgc * inv)
        })
        .unzip();
    let m = saved.count.max(1) as f64;
    // Per channel: dx = a·g + b·(x − μ) + k, the x̂ term as an affine map of the centred x.
    let mut coef_g = vec![T::ZERO; c];
    let mut coef_x = vec![T::ZERO; c];
    let mut centre = vec![T::ZERO; c];
    let mut offset = vec![T::ZERO; c];
    for ch in 0..c {
        let a = gamma[ch] * saved.inv_std[ch];
        coef_g[ch] = T::from_f64_(a);
        if training {
            coef_x[ch] = T::from_f64_(-a * saved.inv_std[ch] * sum_gx[ch] / m);
            centre[ch] = T::from_f64_(saved.mean[ch]);
            offset[ch] = T::from_f64_(-a * sum_g[ch] / m);
        }
    }
    let mut dx = uninit_vec::<T>(dy.len());
    let image = c * inner;
    if image > 0 {
        for_each_chunk_mut(&mut dx, image, chunk_count(n), |first, out| {
            for (i, dx_b) in out.chunks_mut(image).enumerate() {
                let base = (first + i) * image;
                for ch in 0..c {
                    let coefficients = (coef_g[ch], coef_x[ch], centre[ch], offset[ch]);
                    let r = base + ch * inner..base + (ch + 1) * inner;
                    let dst = &mut dx_b[ch * inner..(ch + 1) * inner];
                    affine_of_grad(
                        &dy[r.clone()],
                        &x[r.clone()],
                        &y[r],
                        coefficients,
                        relu,
                        dst,
                    );
                }
            }
        });
    }
    // SAFETY: every plane of every image was written above (all of dx when image > 0, and dx
    // is empty otherwise).
    (unsafe { assume_init(dx) }, sum_g, sum_gx)
}

impl TernaryKernel for BatchNormBackward<'_> {
    fn run<T: Float>(&self, dy: &[T], x: &[T], y: &[T], dims: &[usize]) -> Vec<T> {
        self.input_gradient(dy, x, y, dims)
    }
}

impl CustomOp3 for BatchNormBackward<'_> {
    fn name(&self) -> &'static str {
        "qcl-batch-norm-backward"
    }

    kernel_cpu_fwd!(ternary);
}

fn check_inputs(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<usize> {
    if x.rank() < 2 {
        return Err(Error::ShapeMismatch {
            context: "batch norm input".into(),
            expected: "[n, c, ...]".into(),
            actual: x.dims().to_vec(),
        });
    }
    let c = x.dim(1)?;
    for (t, name) in [(gamma, "gamma"), (beta, "beta")] {
        if t.dims() != [c] {
            return Err(Error::ShapeMismatch {
                context: format!("batch norm {name}"),
                expected: format!("[{c}]"),
                actual: t.dims().to_vec(),
            });
        }
    }
    Ok(c)
}

fn custom(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> bool {
    x.device().is_cpu()
        && supported_dtype(x.dtype())
        && gamma.dtype() == x.dtype()
        && beta.dtype() == x.dtype()
}

/// Reshape a `[c]` vector to broadcast over `x`'s channel axis.
fn per_channel(v: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = v.dim(0)?;
    Ok(v.reshape(shape)?)
}

/// BatchNorm with batch statistics (training mode), optionally followed by ReLU.
///
/// `x` is `[n, c, …]` (NCHW or `[n, c]`), `gamma`/`beta` are `[c]`. Returns the output and the
/// batch statistics, from which the caller updates running estimates.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1.0f32, 10.0], [3.0, 30.0]], &Device::Cpu)?;
/// let (g, b) = (Tensor::ones(2, candle_core::DType::F32, &Device::Cpu)?,
///               Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?);
/// let (y, stats) = qcl_nn::ops::batch_norm_train(&x, &g, &b, 1e-5, false)?;
/// assert_eq!(stats.mean, vec![2.0, 20.0]);
/// assert_eq!(stats.variance, vec![1.0, 100.0]);
/// let y = y.to_vec2::<f32>()?;
/// assert!((y[0][0] + 1.0).abs() < 1e-4 && (y[1][1] - 1.0).abs() < 1e-4);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for an input of rank < 2 or `gamma`/`beta` not `[c]`,
/// [`Error::EmptyInput`] for a batch with no elements per channel.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let c = check_inputs(x, gamma, beta)?;
    let count = x.elem_count() / c.max(1);
    if count == 0 {
        return Err(Error::EmptyInput(
            "batch norm in training mode needs at least one element per channel".into(),
        ));
    }
    if custom(x, gamma, beta) {
        let saved = Arc::new(Mutex::new(Saved::default()));
        let op = BatchNormOp {
            eps,
            relu,
            training: true,
            saved: saved.clone(),
        };
        let y = x
            .contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
        let stats = saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batch_stats();
        return Ok((y, stats));
    }
    // Other devices and dtypes: candle's ops.
    let rank = x.rank();
    let axes: Vec<usize> = (0..rank).filter(|&a| a != 1).collect();
    let mean = x.mean_keepdim(axes.as_slice())?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(axes.as_slice())?;
    let xhat = centred.broadcast_div(&(var.clone() + eps)?.sqrt()?)?;
    let mut y = xhat
        .broadcast_mul(&per_channel(gamma, rank)?)?
        .broadcast_add(&per_channel(beta, rank)?)?;
    if relu {
        y = y.relu()?;
    }
    let stats = BatchStats {
        mean: mean.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
        variance: var.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
        count,
    };
    Ok((y, stats))
}

/// BatchNorm with fixed statistics (evaluation mode), optionally followed by ReLU:
/// `y = γ (x − mean)/√(var + ε) + β`.
///
/// # Errors
/// [`Error::ShapeMismatch`] as [`batch_norm_train`], or for `mean`/`var` not `[c]`.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let c = check_inputs(x, gamma, beta)?;
    check_inputs(x, mean, var)?;
    if custom(x, gamma, beta) {
        let mean: Vec<f64> = mean.to_dtype(DType::F64)?.to_vec1()?;
        let var: Vec<f64> = var.to_dtype(DType::F64)?.to_vec1()?;
        let saved = Saved {
            inv_std: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
            mean,
            variance: var,
            count: x.elem_count() / c.max(1),
        };
        let op = BatchNormOp {
            eps,
            relu,
            training: false,
            saved: Arc::new(Mutex::new(saved)),
        };
        return Ok(x
            .contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?);
    }
    let rank = x.rank();
    let inv = (per_channel(var, rank)? + eps)?.sqrt()?.recip()?;
    let scale = per_channel(gamma, rank)?.mul(&inv)?;
    let y = x
        .broadcast_sub(&per_channel(mean, rank)?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&per_channel(beta, rank)?)?;
    Ok(if relu { y.relu()? } else { y })
}
