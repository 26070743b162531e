use candle_core::Tensor;
use qcl_tensor::{Error, Result};

use crate::layers::{
    BasicBlock, BatchNorm2d, BatchNormConfig, Conv2d, Conv2dConfig, Linear, Module, ModuleT,
};
use crate::ParamPath;

/// Shape of a [`ResNet`] of basic blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Channels of the input images.
    pub in_channels: usize,
    /// Outputs of the final linear layer.
    pub num_classes: usize,
    /// Output channels of the 3×3 stem convolution.
    pub stem_width: usize,
    /// `(width, stride of the first block)` of each stage.
    pub stages: Vec<(usize, usize)>,
    /// Basic blocks per stage.
    pub blocks_per_stage: usize,
}

impl ResNetConfig {
    /// CIFAR-style ResNet-20 (He et al. 2016): stem 16, stages 16/32/64 with strides 1/2/2,
    /// three blocks each, projection shortcuts, global average pooling.
    pub fn resnet20(in_channels: usize, num_classes: usize) -> Self {
        Self {
            in_channels,
            num_classes,
            stem_width: 16,
            stages: vec![(16, 1), (32, 2), (64, 2)],
            blocks_per_stage: 3,
        }
    }

    /// GEM's reduced ResNet-18 (the AQM classifier): stem `nf`, stages `nf·(1, 2, 4, 8)` with
    /// strides 1/2/2/2, two blocks each.
    pub fn reduced_resnet18(in_channels: usize, num_classes: usize, nf: usize) -> Self {
        Self {
            in_channels,
            num_classes,
            stem_width: nf,
            stages: vec![(nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)],
            blocks_per_stage: 2,
        }
    }
}

/// A ResNet of [`BasicBlock`]s: `conv3×3 → BN → ReLU → stages → global average pool → linear`.
/// Works for any input size whose last stage is at least 1×1.
///
/// Parameter names: `stem.conv`, `stem.bn`, `stages.{s}.{b}.…`, `fc`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::ModuleT;
/// use qcl_nn::models::{ResNet, ResNetConfig};
/// let store = qcl_nn::ParamStore::new(0);
/// let net = ResNet::new(&store.root(&Device::Cpu), &ResNetConfig::resnet20(1, 10))?;
/// let logits = net.forward_t(&Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu)?, true)?;
/// assert_eq!(logits.dims(), &[2, 10]);
/// assert_eq!(store.trainable_elements(), 272_186); // as PyTorch counts it
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ResNet {
    stem_conv: Conv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<BasicBlock>,
    fc: Linear,
    config: ResNetConfig,
}

impl ResNet {
    /// Builds the network under `path`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero channels, classes, stages or blocks.
    pub fn new(path: &ParamPath, config: &ResNetConfig) -> Result<Self> {
        if config.stages.is_empty() || config.blocks_per_stage == 0 || config.num_classes == 0 {
            return Err(Error::invalid_parameter(
                "resnet",
                format!("need stages, blocks and classes, got {config:?}"),
            ));
        }
        let stem = path.pp("stem");
        let stem_conv = Conv2d::new(
            &stem.pp("conv"),
            config.in_channels,
            config.stem_width,
            3,
            Conv2dConfig {
                padding: 1,
                bias: false,
                ..Default::default()
            },
        )?;
        let stem_bn = BatchNorm2d::new(
            &stem.pp("bn"),
            config.stem_width,
            BatchNormConfig::default(),
        )?;
        let mut blocks = Vec::new();
        let mut width = config.stem_width;
        for (s, &(out, stride)) in config.stages.iter().enumerate() {
            for b in 0..config.blocks_per_stage {
                let p = path.pp("stages").pp(s).pp(b);
                blocks.push(BasicBlock::new(
                    &p,
                    width,
                    out,
                    if b == 0 { stride } else { 1 },
                )?);
                width = out;
            }
        }
        let fc = Linear::new(&path.pp("fc"), width, config.num_classes, true)?;
        Ok(Self {
            stem_conv,
            stem_bn,
            blocks,
            fc,
            config: config.clone(),
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// The pooled features before the linear head, `[n, last width]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for input that is not `[n, in_channels, h, w]`.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != self.config.in_channels {
            return Err(Error::ShapeMismatch {
                context: "resnet input".into(),
                expected: format!("[n, {}, h, w]", self.config.in_channels),
                actual: x.dims().to_vec(),
            });
        }
        let mut h = self
            .stem_bn
            .forward_relu_t(&self.stem_conv.forward(x)?, train)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        Ok(h.mean((2, 3))?)
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.fc.forward(&self.features_t(x, train)?)
    }
}
