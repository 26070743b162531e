//! LifeQuant's quantizers for quantization-aware training: DoReFa-style uniform rounding
//! (Zhou et al. 2016, "DoReFa-Net") with straight-through gradients, a weight quantizer with
//! per-tensor standardisation ([`WeightQuantizer`]) and an activation quantizer
//! ([`ActivationQuantizer`]), following LifeQuant (Chen et al., ICCV 2023).
//!
//! Every function builds a candle graph: the forward value is the quantized tensor and the
//! backward pass is the straight-through estimator (STE) — identity through the rounding, the
//! clamp's derivative where there is a clamp, and the exact Jacobian of the standardisation
//! (its mean and standard deviation are *not* detached).
//!
//! Bit widths: `1..=16` and [`IDENTITY_BITS`] (32, no quantization). Anything else is an
//! [`Error::InvalidParameter`].
//!
//! ```
//! use candle_core::{Device, Module, Tensor, Var};
//! use qcl_continual::{ActivationQuantizer, WeightQuantizer};
//! let w = Var::new(&[0.3f32, -0.1, 0.8, -0.6, 0.05, 0.2], &Device::Cpu)?;
//! let qw = WeightQuantizer::new(4)?.quantize(w.as_tensor())?; // faithful, σ0 = 0.5
//! // Every value is an integer multiple of 1/15.
//! for v in qw.to_vec1::<f32>()? {
//!     assert!(((v * 15.0) - (v * 15.0).round()).abs() < 1e-4);
//! }
//! let x = Tensor::new(&[-0.5f32, 0.2, 0.5, 1.7], &Device::Cpu)?;
//! let qa = ActivationQuantizer::new(2)?.forward(&x)?; // levels {0, 1/3, 2/3, 1}
//! let expected = [0.0f32, 1.0 / 3.0, 2.0 / 3.0, 1.0];
//! for (got, want) in qa.to_vec1::<f32>()?.iter().zip(expected) {
//!     assert!((got - want).abs() < 1e-6);
//! }
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use qcl_nn::ops::straight_through;
use qcl_tensor::{Error, Result};
use rayon::prelude::*;

/// The bit width that means "no quantization": `Qw(W) = W`, `Qa(x) = x`, `q_32(u) = u`.
pub const IDENTITY_BITS: u32 = 32;

/// The largest bit width that is actually quantized. At 16 bits the `f32` product `u·m` of a
/// standardised weight near ±2 keeps only 6 fractional bits; wider grids would increasingly
/// round on `f32` noise rather than on the grid (and no LifeQuant setting uses them), so they
/// are refused rather than silently degraded. Use [`IDENTITY_BITS`] for full precision.
pub const MAX_BITS: u32 = 16;

/// Checks a bit width: `1..=MAX_BITS` or `IDENTITY_BITS`.
fn check_bits(bits: u32) -> Result<()> {
    if (1..=MAX_BITS).contains(&bits) || bits == IDENTITY_BITS {
        Ok(())
    } else {
        Err(Error::invalid_parameter(
            "bits",
            format!("{bits} is not a bit width: use 1..={MAX_BITS}, or {IDENTITY_BITS} for no quantization"),
        ))
    }
}

/// `m = 2^k − 1`, the number of steps of a `k`-bit grid on `[0, 1]`.
fn levels(bits: u32) -> f64 {
    ((1u64 << bits) - 1) as f64
}

/// Round half to even (like `torch.round`), elementwise, on a detached tensor. candle's
/// `round` rounds ties away from zero, which would move every exact tie (`u·m = j + ½`) one
/// level compared with the reference.
fn round_half_even(y: &Tensor) -> Result<Tensor> {
    let dtype = y.dtype();
    let floor = y.floor()?;
    let frac = (y - &floor)?;
    let above_half = frac.gt(0.5)?.to_dtype(dtype)?;
    let tie = frac.eq(0.5)?.to_dtype(dtype)?;
    // floor mod 2 is 1 exactly when floor is odd; a tie then rounds up to the even neighbour.
    let odd = (&floor - ((&floor / 2.0)?.floor()? * 2.0)?)?;
    Ok(((floor + above_half)? + (tie * odd)?)?)
}

/// The detached value of `q_k(u)` (no graph).
fn round_value(u: &Tensor, bits: u32) -> Result<Tensor> {
    let u = u.detach();
    if bits == IDENTITY_BITS {
        return Ok(u);
    }
    if bits == 1 {
        return Ok(u.sign()?);
    }
    let m = levels(bits);
    // A true division (not candle's `x / f64`, which multiplies by 1/m) makes each level the
    // f32 nearest to j/m, as torch's `round(u·m)/m` does.
    let m_t = Tensor::new(m, u.device())?.to_dtype(u.dtype())?;
    Ok(round_half_even(&(&u * m)?)?.broadcast_div(&m_t)?)
}

/// The indicator of `lo ≤ x ≤ hi` (inclusive, as PyTorch's clamp passes gradient at the
/// boundaries), detached, in `x`'s dtype.
fn inside_mask(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let x = x.detach();
    Ok((x.ge(lo)?.to_dtype(x.dtype())? * x.le(hi)?.to_dtype(x.dtype())?)?)
}

/// The rounding primitive `q_k(u)` (docs/methods/lifequant.md § Quantizers; DoReFa's
/// `quantize_k`):
///
/// - `k = 32`: `q_32(u) = u`;
/// - `k = 1`: `q_1(u) = sign(u)` (with `sign(0) = 0`);
/// - otherwise, with `m = 2^k − 1`: `q_k(u) = round(u·m) / m`, rounding half to even.
///
/// There is no clamp: `u` outside `[0, 1]` rounds to the same grid `ℤ/m`. The backward pass
/// is the identity (straight-through): `∂q_k(u)/∂u := 1`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let u = Tensor::new(&[0.1f32, 0.5, 0.9, 1.4], &Device::Cpu)?;
/// // 1 bit: sign; 2 bits: multiples of 1/3, 0.5·3 = 1.5 is a tie and goes to the even 2.
/// let q = qcl_continual::round_to_bits(&u, 2)?.to_vec1::<f32>()?;
/// let want = [0.0f32, 2.0 / 3.0, 1.0, 4.0 / 3.0];
/// for (g, w) in q.iter().zip(want) {
///     assert!((g - w).abs() < 1e-6);
/// }
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a bit width outside `1..=16` other than 32; a candle error
/// for a non-float tensor.
pub fn round_to_bits(u: &Tensor, bits: u32) -> Result<Tensor> {
    check_bits(bits)?;
    if bits == IDENTITY_BITS {
        return Ok(u.clone());
    }
    straight_through(u, &round_value(u, bits)?)
}

/// How the weight quantizer maps the standardised weights onto a grid (Faithful vs Strict:
/// docs/methods/lifequant.md § Quantizers, § Paper versus code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightQuantMode {
    /// As the reference code: `Qw(W) = q_k(Ŵ)` with no clamp. The standardised weights reach
    /// about ±2, so a "4-bit" tensor carries typically 40–60 distinct levels, not 16.
    #[default]
    Faithful,
    /// The classic DoReFa weight range: `Ŵc = clamp(Ŵ, −1, 1)`, `Qw(W) = 2·q_k((Ŵc + 1)/2) − 1`,
    /// at most `2^k` levels, all in `[−1, 1]`.
    Strict,
}

/// LifeQuant's weight quantizer `Qw`, applied to a whole weight tensor on every forward pass.
///
/// With `k = bits`, `m = 2^k − 1` and `N` elements:
///
/// - `k = 32`: `Qw(W) = W` (forward and backward);
/// - `k = 1` (both modes): `E = mean(|W|)`, detached; `Qw(W) = sign(W)·E ∈ {−E, 0, +E}` with
///   gradient `∂Qw/∂W := 1` (the STE through `sign(W/E)`, scaled back by `E`);
/// - `2 ≤ k ≤ 16`: standardise the whole tensor (per tensor, not per channel) to the fixed
///   "standard space" of ProxQ part 1,
///   `Ŵ = (W − mean(W)) / std(W) · σ0`, `std` unbiased (`N − 1`), then
///   - [`WeightQuantMode::Faithful`]: `Qw(W) = q_k(Ŵ)`;
///   - [`WeightQuantMode::Strict`]: `Qw(W) = 2·q_k((clamp(Ŵ, −1, 1) + 1)/2) − 1`.
///
///   The gradient is the STE through the rounding (times the clamp's indicator in strict
///   mode), then the exact Jacobian of the standardisation. Because `Ŵ` is invariant to
///   `W ↦ a·W + b` (`a > 0`), the gradient of any loss w.r.t. `W` is orthogonal to `1` and
///   to `W`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use qcl_continual::{WeightQuantMode, WeightQuantizer};
/// let w = Var::new(&[0.3f32, -0.1, 0.8, -0.6, 0.05, 0.2, -0.4, 0.1], &Device::Cpu)?;
/// let strict = WeightQuantizer { mode: WeightQuantMode::Strict, ..WeightQuantizer::new(2)? };
/// let q = strict.quantize(w.as_tensor())?;
/// for v in q.to_vec1::<f32>()? {
///     assert!([-1.0f32, -1.0 / 3.0, 1.0 / 3.0, 1.0].iter().any(|l| (v - l).abs() < 1e-6));
/// }
/// // Gradients reach the latent weights through the mean and the standard deviation.
/// let r = Tensor::new(&[1.0f32, 2.0, -1.0, 0.5, 0.0, 3.0, -2.0, 1.0], &Device::Cpu)?;
/// let g = (q * r)?.sum_all()?.backward()?;
/// let g = g.get(w.as_tensor()).unwrap().to_vec1::<f32>()?;
/// assert!(g.iter().sum::<f32>().abs() < 1e-4);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightQuantizer {
    /// Bit width `k`: `1..=16`, or 32 for no quantization. LifeQuant's main setting is 4.
    pub bits: u32,
    /// Grid mapping; default [`WeightQuantMode::Faithful`] (as the reference code).
    pub mode: WeightQuantMode,
    /// Target standard deviation `σ0` of the standardised weights; default
    /// [`WeightQuantizer::DEFAULT_SIGMA0`] = 0.5 (`range/4` with `range = 2`, ResNet-20). The
    /// reference's MobileNet-V2 folder uses 0.125.
    pub sigma0: f64,
}

impl WeightQuantizer {
    /// The default target standard deviation `σ0 = 0.5`.
    pub const DEFAULT_SIGMA0: f64 = 0.5;

    /// A faithful quantizer with `σ0 = 0.5`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bit width outside `1..=16` other than 32.
    pub fn new(bits: u32) -> Result<Self> {
        check_bits(bits)?;
        Ok(Self {
            bits,
            mode: WeightQuantMode::Faithful,
            sigma0: Self::DEFAULT_SIGMA0,
        })
    }

    fn validate(&self) -> Result<()> {
        check_bits(self.bits)?;
        if !(self.sigma0.is_finite() && self.sigma0 > 0.0) {
            return Err(Error::invalid_parameter(
                "sigma0",
                format!("{} must be finite and > 0", self.sigma0),
            ));
        }
        Ok(())
    }

    /// The standardised weights `Ŵ = (W − mean(W)) / std(W) · σ0` (unbiased std over the
    /// whole tensor), on the graph. This is the fixed standard space of ProxQ part 1.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad `sigma0` or bit width; [`Error::EmptyInput`] for
    /// fewer than 2 elements (the unbiased std is undefined); [`Error::NonFinite`] for a NaN
    /// or infinite weight; [`Error::InvalidParameter`] for a constant tensor (std = 0).
    pub fn standardize(&self, w: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let n = w.elem_count();
        if n < 2 {
            return Err(Error::EmptyInput(format!(
                "weight standardisation needs at least 2 elements (unbiased std), got {n}"
            )));
        }
        let mean = w.mean_all()?;
        let centered = w.broadcast_sub(&mean)?;
        let std = (centered.sqr()?.sum_all()? / (n - 1) as f64)?.sqrt()?;
        // One host read per tensor: a NaN/inf weight or a constant tensor would otherwise turn
        // the whole forward pass into NaN without saying where it came from.
        let s = std.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !s.is_finite() {
            return Err(non_finite(w, "weights given to the weight quantizer"));
        }
        if s == 0.0 {
            return Err(Error::invalid_parameter(
                "weights",
                "a constant tensor has std 0 and cannot be standardised",
            ));
        }
        Ok((centered.broadcast_div(&std)? * self.sigma0)?)
    }

    /// `Qw(W)` on the graph (see the type's documentation for the formulas).
    ///
    /// # Errors
    /// As [`WeightQuantizer::standardize`] for `2 ≤ bits ≤ 16`; for 1 bit,
    /// [`Error::NonFinite`] for a NaN or infinite weight.
    pub fn quantize(&self, w: &Tensor) -> Result<Tensor> {
        self.validate()?;
        match self.bits {
            IDENTITY_BITS => Ok(w.clone()),
            1 => {
                let e = w.detach().abs()?.mean_all()?;
                let ev = e.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !ev.is_finite() {
                    return Err(non_finite(w, "weights given to the weight quantizer"));
                }
                // sign(W/E)·E written as sign(W)·E: the same for E > 0, and 0 (not NaN) for an
                // all-zero tensor.
                let value = w.detach().sign()?.broadcast_mul(&e)?;
                straight_through(w, &value)
            }
            bits => {
                let hat = self.standardize(w)?;
                match self.mode {
                    WeightQuantMode::Faithful => round_to_bits(&hat, bits),
                    WeightQuantMode::Strict => {
                        let clamped = hat.detach().clamp(-1.0, 1.0)?;
                        let u = ((clamped + 1.0)? / 2.0)?;
                        let value = ((round_value(&u, bits)? * 2.0)? - 1.0)?;
                        // d/dŴ [2·q_k((Ŵc+1)/2) − 1] = 2 · 1 · ½ · 1[−1 ≤ Ŵ ≤ 1].
                        let grad_path = (&hat * inside_mask(&hat, -1.0, 1.0)?)?;
                        straight_through(&grad_path, &value)
                    }
                }
            }
        }
    }
}

/// LifeQuant's activation quantizer `Qa` (DoReFa's activation quantizer):
///
/// - `k = 32`: `Qa(x) = x`;
/// - otherwise `Qa(x) = q_k(clamp(x, 0, 1)) ∈ {0, 1/m, …, 1}`, `m = 2^k − 1` (for `k = 1`,
///   `{0, 1}`).
///
/// Gradient: the STE times the clamp's derivative, `∂Qa/∂x := 1[0 ≤ x ≤ 1]` (boundaries
/// inclusive, as PyTorch's clamp).
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_core::Module;
/// let x = Var::new(&[-0.3f32, 0.4, 1.5], &Device::Cpu)?;
/// let y = qcl_continual::ActivationQuantizer::new(4)?.forward(x.as_tensor())?;
/// assert_eq!(y.to_vec1::<f32>()?, vec![0.0, 6.0 / 15.0, 1.0]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, vec![0.0, 1.0, 0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationQuantizer {
    /// Bit width `k`: `1..=16`, or 32 for no quantization.
    pub bits: u32,
}

impl ActivationQuantizer {
    /// A `bits`-bit activation quantizer.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bit width outside `1..=16` other than 32.
    pub fn new(bits: u32) -> Result<Self> {
        check_bits(bits)?;
        Ok(Self { bits })
    }

    /// `Qa(x)` on the graph (what [`Module::forward`](candle_core::Module::forward) runs).
    ///
    /// Activations are not checked for NaN/inf (that would cost a host read per layer and
    /// forward pass); a NaN stays NaN. Weights are checked, in [`WeightQuantizer::quantize`].
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad bit width; a candle error for a non-float tensor.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        check_bits(self.bits)?;
        if self.bits == IDENTITY_BITS {
            return Ok(x.clone());
        }
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            // One fused pass each way instead of a dozen candle elementwise ops: this
            // quantizer runs after every BatchNorm of QResNet and dominated its step time.
            return Ok(x
                .contiguous()?
                .apply_op1(FusedActivationQuantizer { bits: self.bits })?);
        }
        self.forward_graph(x)
    }

    /// `Qa` from candle ops (any device), the definition the fused CPU op must equal.
    fn forward_graph(&self, x: &Tensor) -> Result<Tensor> {
        let value = round_value(&x.detach().clamp(0.0, 1.0)?, self.bits)?;
        let grad_path = (x * inside_mask(x, 0.0, 1.0)?)?;
        straight_through(&grad_path, &value)
    }
}

/// `Qa` as a candle [`Module`](candle_core::Module): errors are qcl's, carried by candle's
/// error type (`qcl_tensor::Error::from` gives them back typed).
impl candle_core::Module for ActivationQuantizer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.apply(x)?)
    }
}

/// `Qa` as one CPU op: the same arithmetic as the graph version (clamp, `u·m` in the tensor's
/// dtype, round half to even, a true division by `m`), so the values are bit-identical; the
/// backward pass is `dy·1[0 ≤ x ≤ 1]`.
#[derive(Debug, Clone, Copy)]
struct FusedActivationQuantizer {
    bits: u32,
}

/// Elements per rayon task: large enough to amortise scheduling, small enough to split a
/// QResNet activation (≥ 10⁵ elements) across the cores.
const CHUNK: usize = 1 << 14;

fn contiguous<'a, T>(values: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("activation quantizer: non-contiguous operand"),
    }
}

macro_rules! quantize_activation {
    ($values:expr, $ty:ty, $bits:expr) => {{
        let bits = $bits;
        let m = levels(bits) as $ty;
        let mut out = vec![0 as $ty; $values.len()];
        out.par_chunks_mut(CHUNK)
            .zip($values.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    let u = x.clamp(0.0, 1.0);
                    *o = if bits == 1 {
                        // sign(u) with sign(0) = 0, u ≥ 0 here.
                        if u > 0.0 {
                            1.0
                        } else {
                            u
                        }
                    } else {
                        (u * m).round_ties_even() / m
                    };
                }
            });
        out
    }};
}

macro_rules! clamp_mask_grad {
    ($grad:expr, $x:expr, $ty:ty) => {{
        let mut out = vec![0 as $ty; $grad.len()];
        out.par_chunks_mut(CHUNK)
            .zip($grad.par_chunks(CHUNK).zip($x.par_chunks(CHUNK)))
            .for_each(|(o, (g, x))| {
                for ((o, &g), &x) in o.iter_mut().zip(g).zip(x) {
                    *o = if (0.0..=1.0).contains(&x) { g } else { 0.0 };
                }
            });
        out
    }};
}

impl CustomOp1 for FusedActivationQuantizer {
    fn name(&self) -> &'static str {
        "qcl-activation-quantizer"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(quantize_activation!(contiguous(v, layout)?, f32, self.bits))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(quantize_activation!(contiguous(v, layout)?, f64, self.bits))
            }
            _ => candle_core::bail!("activation quantizer: only f32 and f64 run on the CPU"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op2_no_bwd(&arg.contiguous()?, &ClampMaskGrad)?,
        ))
    }
}

/// `dy·1[0 ≤ x ≤ 1]`, the backward pass of [`FusedActivationQuantizer`].
#[derive(Debug, Clone, Copy)]
struct ClampMaskGrad;

impl CustomOp2 for ClampMaskGrad {
    fn name(&self) -> &'static str {
        "qcl-activation-quantizer-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (grad, x) {
            (CpuStorage::F32(g), CpuStorage::F32(x)) => CpuStorage::F32(clamp_mask_grad!(
                contiguous(g, grad_layout)?,
                contiguous(x, x_layout)?,
                f32
            )),
            (CpuStorage::F64(g), CpuStorage::F64(x)) => CpuStorage::F64(clamp_mask_grad!(
                contiguous(g, grad_layout)?,
                contiguous(x, x_layout)?,
                f64
            )),
            _ => candle_core::bail!("activation quantizer gradient: mismatched dtypes"),
        };
        Ok((out, grad_layout.shape().clone()))
    }
}

/// An [`Error::NonFinite`] naming the first NaN/infinite element of `t` (error path only).
pub(crate) fn non_finite(t: &Tensor, context: &str) -> Error {
    let values = t
        .detach()
        .flatten_all()
        .and_then(|f| f.to_dtype(DType::F64))
        .and_then(|f| f.to_vec1::<f64>());
    let (index, value) = values
        .ok()
        .and_then(|v| v.into_iter().enumerate().find(|(_, x)| !x.is_finite()))
        .unwrap_or((0, f64::NAN));
    Error::NonFinite {
        context: context.to_string(),
        index,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    fn both(bits: u32, values: Vec<f32>) -> [(Vec<f32>, Vec<f32>); 2] {
        let q = ActivationQuantizer::new(bits).unwrap();
        let run = |fused: bool| {
            let x = Var::new(values.as_slice(), &Device::Cpu).unwrap();
            let y = if fused {
                q.apply(x.as_tensor()).unwrap()
            } else {
                q.forward_graph(x.as_tensor()).unwrap()
            };
            // A non-uniform upstream gradient, so the mask is really applied.
            let w = Tensor::arange(1f32, values.len() as f32 + 1.0, &Device::Cpu).unwrap();
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            (y.to_vec1::<f32>().unwrap(), g)
        };
        [run(true), run(false)]
    }

    proptest! {
        /// The fused CPU op equals the graph definition bit for bit, values and gradients,
        /// including exact ties `u·m = j + ½` and the clamp boundaries.
        #[test]
        fn fused_activation_quantizer_equals_the_graph(
            bits in 1u32..=16,
            values in proptest::collection::vec(-0.5f32..1.5, 1..300),
            ties in proptest::collection::vec(0u32..16, 0..8),
        ) {
            let m = ((1u64 << bits) - 1) as f32;
            let mut values = values;
            values.extend(ties.iter().map(|&j| ((j as f32 + 0.5) / m).min(1.0)));
            values.extend([0.0, 1.0, -0.0]);
            let [fused, graph] = both(bits, values);
            prop_assert_eq!(fused, graph);
        }
    }
}
