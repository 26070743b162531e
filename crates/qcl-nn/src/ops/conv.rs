//! 2-D convolution and transposed convolution with a GEMM-based CPU backward.
//!
//! (Over 600 lines: the parameters and operand checks, the public entry points with their fused
//! bias and ReLU, and the candle custom ops whose backward runs the other two products are one
//! unit, the transposed convolution being the same ops with the roles swapped; about 110 lines
//! are doc comments and examples.)

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor};
use qcl_tensor::{Error, Result};

use super::conv_kernels::{conv_forward, conv_input_grad, conv_weight_grad, ConvGeometry};
use super::cpu::kernel_cpu_fwd;
use super::cpu::{supported_dtype, BinaryKernel, Float, TernaryKernel};

/// Stride, zero padding and dilation of a 2-D convolution (the same along height and width;
/// groups = 1). Defaults: stride 1, padding 0, dilation 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Step between output positions.
    pub stride: usize,
    /// Zeros added on every side of the input.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
        }
    }
}

/// Parameters of a 2-D transposed convolution (PyTorch's `ConvTranspose2d` meaning).
/// Defaults: stride 1, padding 0, output padding 0, dilation 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2dParams {
    /// Upsampling factor.
    pub stride: usize,
    /// Rows/columns removed from every side of the full output.
    pub padding: usize,
    /// Extra rows/columns added to one side of the output (must be below the stride).
    pub output_padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
}

impl Default for ConvTranspose2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            output_padding: 0,
            dilation: 1,
        }
    }
}

fn dims4(t: &Tensor, what: &str, pattern: &str) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        other => Err(Error::ShapeMismatch {
            context: what.to_string(),
            expected: pattern.to_string(),
            actual: other.to_vec(),
        }),
    }
}

fn check_nonzero(value: usize, name: &str) -> Result<()> {
    if value == 0 {
        return Err(Error::invalid_parameter(name, "must be at least 1"));
    }
    Ok(())
}

/// Sizes of a convolution's operands, checked.
struct Operands {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
}

/// The checks both convolutions share: 4-D operands of one dtype, at least one channel each
/// way and a 1×1 kernel, matching input channels, and stride and dilation of at least 1.
/// The weight is `[c_out, c_in, kh, kw]`, or `[c_in, c_out, kh, kw]` when `transposed`.
fn check_operands(
    x: &Tensor,
    w: &Tensor,
    (stride, dilation): (usize, usize),
    transposed: bool,
) -> Result<Operands> {
    let op = if transposed {
        "conv_transpose2d"
    } else {
        "conv2d"
    };
    let (n, c_in, h, wd) = dims4(x, &format!("{op} input"), "[n, c_in, h, w]")?;
    let pattern = if transposed {
        "[c_in, c_out, kh, kw]"
    } else {
        "[c_out, c_in, kh, kw]"
    };
    let (a, b, kh, kw) = dims4(w, &format!("{op} weight"), pattern)?;
    let (c_in_w, c_out) = if transposed { (a, b) } else { (b, a) };
    check_nonzero(stride, "stride")?;
    check_nonzero(dilation, "dilation")?;
    if c_in == 0 || c_out == 0 || kh == 0 || kw == 0 {
        return Err(Error::invalid_parameter(
            "channels",
            format!(
                "a convolution needs at least one channel in and out and a 1×1 kernel, \
                 got input {:?}, weight {:?}",
                x.dims(),
                w.dims()
            ),
        ));
    }
    if c_in_w != c_in {
        return Err(Error::ShapeMismatch {
            context: format!("{op} weight (input channels)"),
            expected: pattern.replace("c_in", &c_in.to_string()),
            actual: w.dims().to_vec(),
        });
    }
    if x.dtype() != w.dtype() {
        return Err(Error::DTypeMismatch {
            context: format!("{op} weight"),
            expected: x.dtype(),
            actual: w.dtype(),
        });
    }
    Ok(Operands {
        n,
        c_in,
        h,
        w: wd,
        c_out,
        kh,
        kw,
    })
}

impl Operands {
    /// The geometry of `conv2d` over these operands.
    fn geometry(&self, p: Conv2dParams) -> Result<ConvGeometry> {
        ConvGeometry::new(
            self.n,
            self.c_in,
            (self.h, self.w),
            self.c_out,
            (self.kh, self.kw),
            p.stride,
            p.padding,
            p.dilation,
        )
        .ok_or_else(|| {
            let span = |k: usize| p.dilation * (k - 1) + 1;
            Error::invalid_parameter(
                "kernel",
                format!(
                    "the kernel spans {}×{} but the padded input is only {}×{}",
                    span(self.kh),
                    span(self.kw),
                    self.h + 2 * p.padding,
                    self.w + 2 * p.padding
                ),
            )
        })
    }

    /// The geometry of the forward convolution whose input gradient is `conv_transpose2d` over
    /// these operands (its input is the transposed convolution's output).
    fn transposed_geometry(&self, p: ConvTranspose2dParams) -> Result<ConvGeometry> {
        if p.output_padding >= p.stride {
            return Err(Error::invalid_parameter(
                "output_padding",
                format!(
                    "must be below the stride {}, got {}",
                    p.stride, p.output_padding
                ),
            ));
        }
        let full = |len: usize, k: usize| {
            (len - 1) * p.stride + p.dilation * (k - 1) + 1 + p.output_padding
        };
        let (fh, fw) = (full(self.h.max(1), self.kh), full(self.w.max(1), self.kw));
        if self.h == 0 || self.w == 0 || fh <= 2 * p.padding || fw <= 2 * p.padding {
            return Err(Error::invalid_parameter(
                "padding",
                format!(
                    "padding {} leaves an empty output for input {}×{}",
                    p.padding, self.h, self.w
                ),
            ));
        }
        Ok(ConvGeometry {
            n: self.n,
            c_in: self.c_out,
            h_in: fh - 2 * p.padding,
            w_in: fw - 2 * p.padding,
            c_out: self.c_in,
            kh: self.kh,
            kw: self.kw,
            stride: p.stride,
            padding: p.padding,
            dilation: p.dilation,
            h_out: self.h,
            w_out: self.w,
        })
    }
}

/// Checks shapes and parameters of `conv2d(x, w)` and returns its geometry.
pub(super) fn conv_geometry(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<ConvGeometry> {
    check_operands(x, w, (p.stride, p.dilation), false)?.geometry(p)
}

/// The geometry of a convolution with weight `w` applied to the output of convolution
/// `prev`, or `None` if `w`'s input channels differ from `prev`'s output channels or its kernel
/// does not fit the padded input.
pub(super) fn following_geometry(
    prev: &ConvGeometry,
    w: &Tensor,
    p: Conv2dParams,
) -> Result<Option<ConvGeometry>> {
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if c_in != prev.c_out {
        return Ok(None);
    }
    Ok(ConvGeometry::new(
        prev.n,
        prev.c_out,
        (prev.h_out, prev.w_out),
        c_out,
        (kh, kw),
        p.stride,
        p.padding,
        p.dilation,
    ))
}

fn use_custom_kernels(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && supported_dtype(x.dtype())
}

/// 2-D convolution `y = x ⋆ w` (cross-correlation, as in every deep-learning library).
///
/// `x` is `[n, c_in, h, w]`, `w` is `[c_out, c_in, kh, kw]`; the output is
/// `[n, c_out, h_out, w_out]` with `h_out = ⌊(h + 2p − d(kh−1) − 1)/s⌋ + 1`. On the CPU with
/// `f32`/`f64` this runs qcl's kernels forward and backward (implicit GEMM for `f32` convolutions
/// on AVX-512 CPUs, strided ones through a polyphase split; im2col + GEMM otherwise; the input gradient is skipped when
/// `x` needs none); elsewhere it is candle's `conv2d`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::ops::{conv2d, Conv2dParams};
/// let x = Tensor::ones((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let y = conv2d(&x, &w, Conv2dParams { padding: 1, ..Default::default() })?;
/// assert_eq!(y.dims(), &[1, 2, 4, 4]);
/// // A corner sees 2×2 ones, the centre 3×3.
/// assert_eq!(y.get(0)?.get(0)?.to_vec2::<f32>()?[0][0], 4.0);
/// assert_eq!(y.get(0)?.get(0)?.to_vec2::<f32>()?[1][1], 9.0);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] for an input or weight that is not 4-D or whose channels disagree,
/// [`Error::InvalidParameter`] for zero channels, stride or dilation, or a kernel larger than
/// the padded input, [`Error::DTypeMismatch`] for mixed dtypes.
pub fn conv2d(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    conv2d_with_bias(x, w, None, p)
}

/// [`conv2d`] plus an optional per-channel `bias` (`[c_out]`), fused into the same node: the
/// bias is added in place to the fresh output and its gradient is the per-channel sum.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::ops::{conv2d_with_bias, Conv2dParams};
/// let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
/// let y = conv2d_with_bias(&x, &w, Some(&b), Conv2dParams::default())?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9.5, 8.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`conv2d`], and [`Error::ShapeMismatch`]/[`Error::DTypeMismatch`] for a bias that is
/// not `[c_out]` of the input's dtype.
pub fn conv2d_with_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    conv2d_fused(x, w, bias, false, p)
}

/// `max(conv2d(x, w) + bias, 0)` as one node: the ReLU runs in place on the fresh output and
/// its backward masks the output gradient once, saving the separate ReLU tensor and node.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::ops::{conv2d_bias_relu, Conv2dParams};
/// let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[0.5f32, -10.0], &Device::Cpu)?;
/// let y = conv2d_bias_relu(&x, &w, Some(&b), Conv2dParams::default())?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9.5, 0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`conv2d_with_bias`].
pub fn conv2d_bias_relu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    conv2d_fused(x, w, bias, true, p)
}

fn conv2d_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    p: Conv2dParams,
) -> Result<Tensor> {
    let g = conv_geometry(x, w, p)?;
    check_bias(bias, g.c_out, x.dtype())?;
    if !use_custom_kernels(x) {
        let mut y = x.conv2d(w, p.padding, p.stride, p.dilation, 1)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&b.reshape((1, g.c_out, 1, 1))?)?;
        }
        return Ok(if relu { y.relu()? } else { y });
    }
    apply_conv(
        x,
        w,
        bias,
        relu,
        ConvOp {
            g,
            transposed: false,
        },
    )
}

/// 2-D transposed convolution (the adjoint of [`conv2d`], PyTorch's `conv_transpose2d`).
///
/// `x` is `[n, c_in, h, w]`, `w` is `[c_in, c_out, kh, kw]`; the output is
/// `[n, c_out, h_out, w_out]` with `h_out = (h−1)s − 2p + d(kh−1) + output_padding + 1`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::ops::{conv_transpose2d, ConvTranspose2dParams};
/// let x = Tensor::ones((1, 3, 7, 7), candle_core::DType::F32, &Device::Cpu)?;
/// let w = Tensor::ones((3, 1, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let p = ConvTranspose2dParams { stride: 2, padding: 1, ..Default::default() };
/// assert_eq!(conv_transpose2d(&x, &w, p)?.dims(), &[1, 1, 14, 14]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`conv2d`], and [`Error::InvalidParameter`] for an output padding not below the stride
/// or an empty output.
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, p: ConvTranspose2dParams) -> Result<Tensor> {
    conv_transpose2d_with_bias(x, w, None, p)
}

/// [`conv_transpose2d`] plus an optional per-channel `bias` (`[c_out]`) in the same node.
///
/// # Errors
/// As [`conv_transpose2d`], and [`Error::ShapeMismatch`]/[`Error::DTypeMismatch`] for a bias
/// that is not `[c_out]` of the input's dtype.
pub fn conv_transpose2d_with_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvTranspose2dParams,
) -> Result<Tensor> {
    let g = check_operands(x, w, (p.stride, p.dilation), true)?.transposed_geometry(p)?;
    check_bias(bias, g.c_in, x.dtype())?;
    if !use_custom_kernels(x) {
        let y = x.conv_transpose2d(w, p.padding, p.output_padding, p.stride, p.dilation)?;
        return match bias {
            Some(b) => Ok(y.broadcast_add(&b.reshape((1, g.c_in, 1, 1))?)?),
            None => Ok(y),
        };
    }
    apply_conv(
        x,
        w,
        bias,
        false,
        ConvOp {
            g,
            transposed: true,
        },
    )
}

/// Which product of a convolution an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    Forward,
    InputGrad,
    WeightGrad,
}

/// Runs one product of the convolution `g` on host slices `(a, b)`:
/// forward `(x, w)`, input gradient `(dy, w)`, weight gradient `(x, dy)`.
struct ConvProduct {
    g: ConvGeometry,
    product: Product,
}

impl ConvProduct {
    fn compute<T: Float>(&self, a: &[T], b: &[T]) -> Vec<T> {
        match self.product {
            Product::Forward => conv_forward(&self.g, a, b),
            Product::InputGrad => conv_input_grad(&self.g, a, b),
            Product::WeightGrad => conv_weight_grad(&self.g, a, b),
        }
    }

    fn shape(&self) -> Shape {
        let g = &self.g;
        match self.product {
            Product::Forward => (g.n, g.c_out, g.h_out, g.w_out).into(),
            Product::InputGrad => (g.n, g.c_in, g.h_in, g.w_in).into(),
            Product::WeightGrad => (g.c_out, g.c_in, g.kh, g.kw).into(),
        }
    }
}

impl BinaryKernel for ConvProduct {
    fn run<T: Float>(&self, a: &[T], b: &[T], _dims: &[usize]) -> Vec<T> {
        self.compute(a, b)
    }

    fn output_shape(&self, _l1: &Layout, _l2: &Layout) -> Shape {
        self.shape()
    }
}

impl CustomOp2 for ConvProduct {
    fn name(&self) -> &'static str {
        match self.product {
            Product::Forward => "qcl-conv2d",
            Product::InputGrad => "qcl-conv2d-input-grad",
            Product::WeightGrad => "qcl-conv2d-weight-grad",
        }
    }

    kernel_cpu_fwd!(binary);
}

/// The autograd node: forward (or, for the transposed convolution, input-gradient) product
/// with a backward made of the other two products.
struct ConvOp {
    g: ConvGeometry,
    transposed: bool,
}

impl ConvOp {
    fn product(&self, product: Product) -> ConvProduct {
        ConvProduct { g: self.g, product }
    }

    /// The product the node's forward pass computes.
    fn main_product(&self) -> ConvProduct {
        self.product(if self.transposed {
            Product::InputGrad
        } else {
            Product::Forward
        })
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        if self.transposed {
            "qcl-conv-transpose2d"
        } else {
            "qcl-conv2d"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.main_product().cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The network's input needs no gradient: skip the most expensive product.
        let dx = if x.track_op() {
            let product = if self.transposed {
                Product::Forward
            } else {
                Product::InputGrad
            };
            Some(grad.apply_op2_no_bwd(w, &self.product(product))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = if self.transposed {
                // The forward convolution's input is our output gradient, its output gradient is x.
                grad.apply_op2_no_bwd(x, &self.product(Product::WeightGrad))?
            } else {
                x.apply_op2_no_bwd(&grad, &self.product(Product::WeightGrad))?
            };
            Some(dw)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// A convolution plus a per-channel bias as one node: the bias is added in place to the fresh
/// output (no extra tensor), and its gradient is the per-channel sum of the output gradient.
struct ConvBiasOp {
    conv: ConvOp,
    /// Apply `max(·, 0)` after the bias (backward masks the gradient by the output).
    relu: bool,
}

/// The convolution's product followed by the per-channel bias (and ReLU), in place.
impl TernaryKernel for ConvBiasOp {
    fn run<T: Float>(&self, a: &[T], b: &[T], bias: &[T], _dims: &[usize]) -> Vec<T> {
        let product = self.conv.main_product();
        let mut y = product.compute(a, b);
        let shape = product.shape();
        super::elementwise::add_bias_in_place(
            &mut y,
            bias,
            shape.dims()[2] * shape.dims()[3],
            self.relu,
        );
        y
    }

    fn output_shape(&self, _l1: &Layout, _l2: &Layout, _l3: &Layout) -> Shape {
        self.conv.main_product().shape()
    }
}

impl CustomOp3 for ConvBiasOp {
    fn name(&self) -> &'static str {
        if self.conv.transposed {
            "qcl-conv-transpose2d-bias"
        } else {
            "qcl-conv2d-bias"
        }
    }

    kernel_cpu_fwd!(ternary);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grad = grad.contiguous()?;
        if self.relu {
            grad = grad.apply_op2_no_bwd(res, &super::elementwise::ReluGrad)?;
        }
        let (dx, dw) = self.conv.bwd(x, w, res, &grad)?;
        let db = if bias.track_op() {
            Some(grad.apply_op1_no_bwd(&super::elementwise::ChannelSum)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Applies a convolution op, with its bias fused in when there is one (an empty batch gives an
/// empty output).
fn apply_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    conv: ConvOp,
) -> Result<Tensor> {
    if conv.g.n == 0 {
        return Ok(Tensor::zeros(
            conv.main_product().shape(),
            x.dtype(),
            x.device(),
        )?);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let channels = if conv.transposed {
        conv.g.c_in
    } else {
        conv.g.c_out
    };
    Ok(match (bias, relu) {
        (None, false) => x.apply_op2(&w, conv)?,
        (Some(b), _) => x.apply_op3(&w, &b.contiguous()?, ConvBiasOp { conv, relu })?,
        (None, true) => {
            // A zero bias that needs no gradient keeps one fused op for both cases.
            let zero = Tensor::zeros(channels, x.dtype(), x.device())?;
            x.apply_op3(&w, &zero, ConvBiasOp { conv, relu })?
        }
    })
}

fn check_bias(bias: Option<&Tensor>, channels: usize, dtype: candle_core::DType) -> Result<()> {
    if let Some(b) = bias {
        if b.dims() != [channels] {
            return Err(Error::ShapeMismatch {
                context: "convolution bias".into(),
                expected: format!("[{channels}]"),
                actual: b.dims().to_vec(),
            });
        }
        if b.dtype() != dtype {
            return Err(Error::DTypeMismatch {
                context: "convolution bias".into(),
                expected: dtype,
                actual: b.dtype(),
            });
        }
    }
    Ok(())
}
