use candle_core::Tensor;
use qcl_tensor::{Error, Result};

use super::Module;
use crate::ops::{
    conv2d_bias_relu, conv2d_with_bias, conv_transpose2d_with_bias, Conv2dParams,
    ConvTranspose2dParams,
};
use crate::{Init, ParamPath};

/// Checks a convolution layer's sizes and creates its `weight` (`[lead.0, lead.1, k, k]`,
/// drawn from `init`) and, if asked, its `bias` (`[c_out]`, PyTorch's `U(±1/√bias_fan_in)`).
fn weight_and_bias(
    path: &ParamPath,
    layer: &str,
    (c_in, c_out, kernel): (usize, usize, usize),
    lead: (usize, usize),
    init: Init,
    bias_fan_in: usize,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    if c_in == 0 || c_out == 0 || kernel == 0 {
        return Err(Error::invalid_parameter(
            layer,
            format!("channels and kernel must be positive, got {c_in}→{c_out}, kernel {kernel}"),
        ));
    }
    let weight = path.param("weight", (lead.0, lead.1, kernel, kernel), init)?;
    let bias = if bias {
        let init = Init::KaimingUniform {
            fan_in: bias_fan_in,
        };
        Some(path.param("bias", c_out, init)?)
    } else {
        None
    };
    Ok((weight, bias))
}

/// Hyperparameters of a [`Conv2d`]. Defaults: stride 1, padding 0, dilation 1, with bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Step between output positions.
    pub stride: usize,
    /// Zeros added on every side.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Whether the layer adds a learned per-channel bias.
    pub bias: bool,
}

/// The op's defaults ([`Conv2dParams::default`]), with a bias.
impl Default for Conv2dConfig {
    fn default() -> Self {
        let Conv2dParams {
            stride,
            padding,
            dilation,
        } = Conv2dParams::default();
        Self {
            stride,
            padding,
            dilation,
            bias: true,
        }
    }
}

impl Conv2dConfig {
    pub(crate) fn op_params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        }
    }
}

/// 2-D convolution layer: `weight [c_out, c_in, k, k]`, optional `bias [c_out]`, initialised
/// as PyTorch does (`U(±1/√fan_in)`, `fan_in = c_in·k²`).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_nn::layers::{Conv2d, Conv2dConfig, Module};
/// let store = qcl_nn::ParamStore::new(0);
/// let conv = Conv2d::new(&store.root(&Device::Cpu).pp("conv"), 1, 8, 3,
///     Conv2dConfig { padding: 1, ..Default::default() })?;
/// let y = conv.forward(&Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[2, 8, 28, 28]);
/// assert_eq!(store.trainable().len(), 2); // conv.bias, conv.weight
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    /// A `kernel × kernel` convolution from `c_in` to `c_out` channels with PyTorch's default
    /// initialisation, parameters `weight` (and `bias`) under `path`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero channels or kernel, or a name clash in the store.
    pub fn new(
        path: &ParamPath,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        let fan_in = c_in * kernel * kernel;
        Self::with_init(
            path,
            c_in,
            c_out,
            kernel,
            config,
            Init::KaimingUniform { fan_in },
        )
    }

    /// As [`Conv2d::new`] with the weight initialised by `init` (the bias keeps PyTorch's rule).
    ///
    /// # Errors
    /// As [`Conv2d::new`].
    pub fn with_init(
        path: &ParamPath,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        config: Conv2dConfig,
        init: Init,
    ) -> Result<Self> {
        let (weight, bias) = weight_and_bias(
            path,
            "conv2d",
            (c_in, c_out, kernel),
            (c_out, c_in),
            init,
            c_in * kernel * kernel,
            config.bias,
        )?;
        Ok(Self {
            weight,
            bias,
            config,
        })
    }

    /// The weight, `[c_out, c_in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layer's hyperparameters.
    pub fn config(&self) -> Conv2dConfig {
        self.config
    }

    /// The convolution with another weight of the same shape (e.g. a quantised copy of
    /// [`Conv2d::weight`] in quantisation-aware training), plus this layer's bias.
    ///
    /// # Errors
    /// As [`crate::ops::conv2d`].
    pub fn forward_with_weight(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        conv2d_with_bias(x, weight, self.bias.as_ref(), self.config.op_params())
    }
}

impl Conv2d {
    /// `max(conv(x) + bias, 0)`, fused into one op (see [`crate::ops::conv2d_bias_relu`]).
    ///
    /// # Errors
    /// As [`crate::ops::conv2d`].
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_bias_relu(x, &self.weight, self.bias.as_ref(), self.config.op_params())
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_with_weight(x, &self.weight)?)
    }
}

/// Hyperparameters of a [`ConvTranspose2d`]. Defaults: stride 1, padding 0, output padding 0,
/// dilation 1, with bias.
// Repeats `Conv2dConfig`'s fields and default: two public configs, each its op's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2dConfig {
    /// Upsampling factor.
    pub stride: usize,
    /// Rows/columns removed from every side of the full output.
    pub padding: usize,
    /// Extra rows/columns on one side (below the stride).
    pub output_padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Whether the layer adds a learned per-channel bias.
    pub bias: bool,
}

/// The op's defaults ([`ConvTranspose2dParams::default`]), with a bias.
impl Default for ConvTranspose2dConfig {
    fn default() -> Self {
        let ConvTranspose2dParams {
            stride,
            padding,
            output_padding,
            dilation,
        } = ConvTranspose2dParams::default();
        Self {
            stride,
            padding,
            output_padding,
            dilation,
            bias: true,
        }
    }
}

impl ConvTranspose2dConfig {
    /// The parameters of the op this layer runs (all but the bias flag).
    fn op_params(&self) -> ConvTranspose2dParams {
        ConvTranspose2dParams {
            stride: self.stride,
            padding: self.padding,
            output_padding: self.output_padding,
            dilation: self.dilation,
        }
    }
}

/// 2-D transposed convolution layer: `weight [c_in, c_out, k, k]`, optional `bias [c_out]`,
/// initialised as PyTorch does (which takes `fan_in = c_out·k²` from the weight's second axis).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_nn::layers::{ConvTranspose2d, ConvTranspose2dConfig, Module};
/// let store = qcl_nn::ParamStore::new(0);
/// let up = ConvTranspose2d::new(&store.root(&Device::Cpu), 32, 1, 4,
///     ConvTranspose2dConfig { stride: 2, padding: 1, ..Default::default() })?;
/// let y = up.forward(&Tensor::zeros((2, 32, 14, 14), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[2, 1, 28, 28]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: ConvTranspose2dConfig,
}

impl ConvTranspose2d {
    /// A `kernel × kernel` transposed convolution from `c_in` to `c_out` channels.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero channels or kernel, or a name clash in the store.
    pub fn new(
        path: &ParamPath,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        config: ConvTranspose2dConfig,
    ) -> Result<Self> {
        let fan_in = c_out * kernel * kernel;
        let (weight, bias) = weight_and_bias(
            path,
            "conv_transpose2d",
            (c_in, c_out, kernel),
            (c_in, c_out),
            Init::KaimingUniform { fan_in },
            fan_in,
            config.bias,
        )?;
        // Builds and exposes its weight as `Conv2d` does: two public layers with the same fields.
        Ok(Self {
            weight,
            bias,
            config,
        })
    }

    /// The weight, `[c_in, c_out, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(conv_transpose2d_with_bias(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.config.op_params(),
        )?)
    }
}
