//! LifeQuant's quantized ResNet for 28×28 single-channel images, "QResNet-8": the
//! `resnet20_quant` basic block of the paper's ResNet-20 with one block per stage
//! (docs/methods/lifequant.md § Network).
//!
//! ```text
//! stem   x → Qw-conv3×3(in→w0) → BN → Qa → ReLU
//! stage  s = 0, 1, 2 (widths w0/w1/w2, strides 1/2/2), one block each:
//!        a   = ReLU(Qa(BN0(Qw-conv3×3(x))))           (stride s)
//!        b   = Qa(BN1(Qw-conv3×3(a)))
//!        sc  = x                                       (stride 1, same width)
//!            | Qa(BN_s(Qw-conv1×1(x)))                 (stride 2: quantized 1×1 skip)
//!        out = ReLU(b + sc)                            (not re-quantized)
//! head   global average pool → FP32 Linear(w2, classes) with bias
//! ```
//!
//! Every convolution (stem, 3×3 and 1×1 skip) has no bias and is quantized by one
//! [`WeightQuantizer`] on each forward pass; the optimiser updates the latent FP32 weights
//! (straight-through). BatchNorm, the head and the input stay in full precision. With 32 bits
//! for weights and activations every quantizer is the identity, so one network (one set of
//! weights) serves the FP32 → 8-bit → 4-bit schedule of task 0 via [`QResNet::set_bits`].

use candle_core::Tensor;
use qcl_nn::layers::{BatchNorm2d, BatchNormConfig, Conv2d, Conv2dConfig, Linear, Module, ModuleT};
use qcl_nn::ops::{add_relu, relu};
use qcl_nn::ParamPath;
use qcl_tensor::{Error, Result};

use crate::quant::{ActivationQuantizer, WeightQuantMode, WeightQuantizer};
use crate::strategy::FeatureHead;

/// Shape and precision of a [`QResNet`].
#[derive(Debug, Clone, PartialEq)]
pub struct QResNetConfig {
    /// Channels of the three stages; the stem outputs `widths[0]`. Default `[16, 32, 64]`.
    pub widths: [usize; 3],
    /// Channels of the input images (1 for MNIST / Fashion-MNIST).
    pub in_channels: usize,
    /// Outputs of the linear head.
    pub num_classes: usize,
    /// Bit width of every conv weight: `1..=16`, or 32 for full precision. Default 4.
    pub weight_bits: u32,
    /// Bit width of every activation quantizer: `1..=16`, or 32 for full precision. Default 4.
    pub activation_bits: u32,
    /// Weight grid ([`WeightQuantMode::Faithful`] by default, as the reference code).
    pub weight_mode: WeightQuantMode,
}

impl Default for QResNetConfig {
    fn default() -> Self {
        Self::qresnet8()
    }
}

impl QResNetConfig {
    /// QResNet-8 (docs/methods/lifequant.md § Network): widths 16/32/64, 1 input channel,
    /// 10 classes, 4-bit weights and activations, faithful weight grid.
    pub fn qresnet8() -> Self {
        Self {
            widths: [16, 32, 64],
            in_channels: 1,
            num_classes: 10,
            weight_bits: 4,
            activation_bits: 4,
            weight_mode: WeightQuantMode::Faithful,
        }
    }

    /// The smoke/CI configuration (docs/methods/lifequant.md § Network): as
    /// [`QResNetConfig::qresnet8`] with widths 8/16/32.
    pub fn smoke() -> Self {
        Self {
            widths: [8, 16, 32],
            ..Self::qresnet8()
        }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero width, zero input channels or zero classes, or
    /// a bit width outside `1..=16` other than 32.
    pub fn validate(&self) -> Result<()> {
        if self.widths.contains(&0) {
            return Err(Error::invalid_parameter(
                "widths",
                format!("every stage width must be positive, got {:?}", self.widths),
            ));
        }
        if self.in_channels == 0 {
            return Err(Error::invalid_parameter(
                "in_channels",
                "must be at least 1",
            ));
        }
        if self.num_classes == 0 {
            return Err(Error::invalid_parameter(
                "num_classes",
                "must be at least 1",
            ));
        }
        WeightQuantizer::new(self.weight_bits)?;
        ActivationQuantizer::new(self.activation_bits)?;
        Ok(())
    }
}

/// A convolution whose weight goes through the network's weight quantizer on every forward.
#[derive(Debug, Clone)]
struct QConv {
    conv: Conv2d,
    name: String,
}

impl QConv {
    fn new(
        path: &ParamPath,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        let conv = Conv2d::new(
            path,
            c_in,
            c_out,
            kernel,
            Conv2dConfig {
                stride,
                padding: kernel / 2,
                dilation: 1,
                bias: false,
            },
        )?;
        Ok(Self {
            conv,
            name: path.full_name("weight"),
        })
    }

    fn forward(&self, x: &Tensor, wq: &WeightQuantizer) -> Result<Tensor> {
        self.conv
            .forward_with_weight(x, &wq.quantize(self.conv.weight())?)
    }
}

/// The quantized basic block of the paper's ResNet-20 (docs/methods/lifequant.md § Network).
#[derive(Debug, Clone)]
struct QBlock {
    conv0: QConv,
    bn0: BatchNorm2d,
    conv1: QConv,
    bn1: BatchNorm2d,
    /// The quantized 1×1 projection and its BatchNorm when the stride or width changes.
    shortcut: Option<(QConv, BatchNorm2d)>,
}

impl QBlock {
    fn new(path: &ParamPath, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let bn = BatchNormConfig::default();
        let shortcut = if stride != 1 || c_in != c_out {
            let p = path.pp("shortcut");
            Some((
                QConv::new(&p.pp("conv"), c_in, c_out, 1, stride)?,
                BatchNorm2d::new(&p.pp("bn"), c_out, bn)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv0: QConv::new(&path.pp("conv0"), c_in, c_out, 3, stride)?,
            bn0: BatchNorm2d::new(&path.pp("bn0"), c_out, bn)?,
            conv1: QConv::new(&path.pp("conv1"), c_out, c_out, 3, 1)?,
            bn1: BatchNorm2d::new(&path.pp("bn1"), c_out, bn)?,
            shortcut,
        })
    }

    fn convs(&self) -> impl Iterator<Item = &QConv> {
        [&self.conv0, &self.conv1]
            .into_iter()
            .chain(self.shortcut.as_ref().map(|(c, _)| c))
    }

    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        wq: &WeightQuantizer,
        aq: &ActivationQuantizer,
    ) -> Result<Tensor> {
        let a = relu(&aq.forward(&self.bn0.forward_t(&self.conv0.forward(x, wq)?, train)?)?)?;
        let b = aq.forward(&self.bn1.forward_t(&self.conv1.forward(&a, wq)?, train)?)?;
        let shortcut = match &self.shortcut {
            Some((conv, bn)) => aq.forward(&bn.forward_t(&conv.forward(x, wq)?, train)?)?,
            None => x.clone(),
        };
        add_relu(&b, &shortcut)
    }
}

/// LifeQuant's "QResNet-8" for `[n, in_channels, h, w]` images (28×28 in the reproduction,
/// any size whose last stage is at least 1×1 works; docs/methods/lifequant.md § Network).
///
/// Parameter names under the path given to [`QResNet::new`]: `stem.conv.weight`, `stem.bn.*`,
/// `stages.{s}.0.{conv0,conv1}.weight`, `stages.{s}.0.{bn0,bn1}.*`,
/// `stages.{s}.0.shortcut.conv.weight` and `stages.{s}.0.shortcut.bn.*` (stages 1 and 2),
/// `fc.weight`, `fc.bias`. [`QResNet::quantized_weight_names`] lists the latent conv weights
/// (what ProxQ regularises); [`QResNet::head_parameter_names`] the FP32 head.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_continual::{QResNet, QResNetConfig};
/// use qcl_nn::layers::ModuleT;
/// let store = qcl_nn::ParamStore::new(0);
/// let mut net = QResNet::new(&store.root(&Device::Cpu), &QResNetConfig::smoke())?;
/// let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu)?;
/// let logits = net.forward_t(&x, true)?; // 4-bit weights and activations
/// assert_eq!(logits.dims(), &[2, 10]);
/// // The reproduction trains task 0 in FP32, then 8 bits, then 4 bits, with the same weights
/// // (docs/methods/lifequant.md § Scaled-down experiment).
/// net.set_bits(32, 32)?;
/// assert_eq!(net.forward_t(&x, false)?.dims(), &[2, 10]);
/// assert_eq!(net.quantized_weight_names().len(), 9); // stem + 2·3 convs + 2 skips
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct QResNet {
    stem_conv: QConv,
    stem_bn: BatchNorm2d,
    blocks: Vec<QBlock>,
    fc: Linear,
    fc_names: Vec<String>,
    weight_quantizer: WeightQuantizer,
    activation_quantizer: ActivationQuantizer,
    config: QResNetConfig,
}

impl QResNet {
    /// Builds the network under `path` (parameters are created, or reused if they exist).
    ///
    /// # Errors
    /// As [`QResNetConfig::validate`]; [`Error::InvalidParameter`] for a name clash in the
    /// store.
    pub fn new(path: &ParamPath, config: &QResNetConfig) -> Result<Self> {
        config.validate()?;
        let [w0, w1, w2] = config.widths;
        let stem = path.pp("stem");
        let stem_conv = QConv::new(&stem.pp("conv"), config.in_channels, w0, 3, 1)?;
        let stem_bn = BatchNorm2d::new(&stem.pp("bn"), w0, BatchNormConfig::default())?;
        let mut blocks = Vec::with_capacity(3);
        let mut c_in = w0;
        for (s, (width, stride)) in [(w0, 1), (w1, 2), (w2, 2)].into_iter().enumerate() {
            blocks.push(QBlock::new(
                &path.pp("stages").pp(s).pp(0),
                c_in,
                width,
                stride,
            )?);
            c_in = width;
        }
        let fc_path = path.pp("fc");
        let fc = Linear::new(&fc_path, w2, config.num_classes, true)?;
        Ok(Self {
            stem_conv,
            stem_bn,
            blocks,
            fc,
            fc_names: vec![fc_path.full_name("weight"), fc_path.full_name("bias")],
            weight_quantizer: WeightQuantizer {
                mode: config.weight_mode,
                ..WeightQuantizer::new(config.weight_bits)?
            },
            activation_quantizer: ActivationQuantizer::new(config.activation_bits)?,
            config: config.clone(),
        })
    }

    /// The configuration, with the current bit widths.
    pub fn config(&self) -> &QResNetConfig {
        &self.config
    }

    /// The weight quantizer applied to every convolution.
    pub fn weight_quantizer(&self) -> &WeightQuantizer {
        &self.weight_quantizer
    }

    /// The activation quantizer of the stem and the blocks.
    pub fn activation_quantizer(&self) -> &ActivationQuantizer {
        &self.activation_quantizer
    }

    /// Switches the precision of all quantizers (32 = full precision). Parameters and
    /// BatchNorm statistics are untouched.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bit width outside `1..=16` other than 32; the network
    /// is then unchanged.
    pub fn set_bits(&mut self, weight_bits: u32, activation_bits: u32) -> Result<()> {
        WeightQuantizer::new(weight_bits)?;
        let aq = ActivationQuantizer::new(activation_bits)?;
        self.weight_quantizer.bits = weight_bits;
        self.activation_quantizer = aq;
        self.config.weight_bits = weight_bits;
        self.config.activation_bits = activation_bits;
        Ok(())
    }

    fn convs(&self) -> impl Iterator<Item = &QConv> {
        std::iter::once(&self.stem_conv).chain(self.blocks.iter().flat_map(QBlock::convs))
    }

    /// Full names of the latent (FP32) conv weights that are quantized on every forward, in
    /// forward order: the stem, then per stage `conv0`, `conv1` and the 1×1 skip if any.
    pub fn quantized_weight_names(&self) -> Vec<String> {
        self.convs().map(|c| c.name.clone()).collect()
    }

    /// The latent conv weights, `(name, tensor)` in the order of
    /// [`QResNet::quantized_weight_names`]. The tensors share storage with the store's
    /// variables.
    pub fn quantized_weights(&self) -> Vec<(String, Tensor)> {
        self.convs()
            .map(|c| (c.name.clone(), c.conv.weight().clone()))
            .collect()
    }

    /// The weights the forward pass actually convolves with, `Qw(W)`, detached, in the order
    /// of [`QResNet::quantized_weight_names`].
    ///
    /// # Errors
    /// As [`WeightQuantizer::quantize`] (e.g. a NaN or constant weight tensor).
    pub fn effective_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.convs()
            .map(|c| {
                let q = self.weight_quantizer.quantize(c.conv.weight())?;
                Ok((c.name.clone(), q.detach()))
            })
            .collect()
    }

    /// Full names of the FP32 linear head's parameters (`fc.weight`, `fc.bias`).
    pub fn head_parameter_names(&self) -> &[String] {
        &self.fc_names
    }

    /// The pooled features before the head, `[n, widths[2]]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for input that is not `[n, in_channels, h, w]`; as
    /// [`WeightQuantizer::quantize`] for a NaN or constant weight tensor.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != self.config.in_channels {
            return Err(Error::ShapeMismatch {
                context: "qresnet input".into(),
                expected: format!("[n, {}, h, w]", self.config.in_channels),
                actual: x.dims().to_vec(),
            });
        }
        let (wq, aq) = (&self.weight_quantizer, &self.activation_quantizer);
        let stem = self
            .stem_bn
            .forward_t(&self.stem_conv.forward(x, wq)?, train)?;
        let mut h = relu(&aq.forward(&stem)?)?;
        for block in &self.blocks {
            h = block.forward(&h, train, wq, aq)?;
        }
        Ok(h.mean((2, 3))?)
    }
}

impl FeatureHead for QResNet {
    fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        QResNet::features_t(self, x, train)
    }

    fn head(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.fc.forward(features)?)
    }
}

/// Logits `[n, num_classes]`. `train` selects batch statistics (and updates the running ones)
/// in every BatchNorm. Errors as [`QResNet::features_t`], carried by candle's error type.
impl ModuleT for QResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.fc.forward(&self.features_t(x, train)?)
    }
}
