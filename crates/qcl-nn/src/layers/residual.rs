use candle_core::Tensor;
use qcl_tensor::Result;

use super::{BatchNorm2d, BatchNormConfig, Conv2d, Conv2dConfig, Module, ModuleT};
use crate::ops::add_relu;
use crate::ParamPath;

/// The shortcut of a [`BasicBlock`] whose shape changes.
#[derive(Debug, Clone)]
pub enum Shortcut {
    /// The input itself (same shape).
    Identity,
    /// 1×1 convolution (no bias) with the block's stride, then BatchNorm ("option B").
    Projection(Conv2d, BatchNorm2d),
}

/// The ResNet basic block: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, 3×3
/// convolutions without bias, the first with the block's stride.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::{BasicBlock, ModuleT};
/// let store = qcl_nn::ParamStore::new(0);
/// let block = BasicBlock::new(&store.root(&Device::Cpu).pp("block"), 16, 32, 2)?;
/// let y = block.forward_t(&Tensor::randn(0f32, 1.0, (2, 16, 8, 8), &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), &[2, 32, 4, 4]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: Shortcut,
}

impl BasicBlock {
    /// A block from `c_in` to `c_out` channels; a projection shortcut is used when the stride
    /// is not 1 or the width changes. Parameters: `conv1`, `bn1`, `conv2`, `bn2`,
    /// `shortcut.0` (conv), `shortcut.1` (BatchNorm).
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for zero channels or stride.
    pub fn new(path: &ParamPath, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let conv3 = |s: usize| Conv2dConfig {
            stride: s,
            padding: 1,
            dilation: 1,
            bias: false,
        };
        let bn = BatchNormConfig::default();
        let shortcut = if stride != 1 || c_in != c_out {
            let p = path.pp("shortcut");
            Shortcut::Projection(
                Conv2d::new(
                    &p.pp(0),
                    c_in,
                    c_out,
                    1,
                    Conv2dConfig {
                        stride,
                        padding: 0,
                        dilation: 1,
                        bias: false,
                    },
                )?,
                BatchNorm2d::new(&p.pp(1), c_out, bn)?,
            )
        } else {
            Shortcut::Identity
        };
        Ok(Self {
            conv1: Conv2d::new(&path.pp("conv1"), c_in, c_out, 3, conv3(stride))?,
            bn1: BatchNorm2d::new(&path.pp("bn1"), c_out, bn)?,
            conv2: Conv2d::new(&path.pp("conv2"), c_out, c_out, 3, conv3(1))?,
            bn2: BatchNorm2d::new(&path.pp("bn2"), c_out, bn)?,
            shortcut,
        })
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        let s = match &self.shortcut {
            Shortcut::Identity => x.clone(),
            Shortcut::Projection(conv, bn) => bn.forward_t(&conv.forward(x)?, train)?,
        };
        add_relu(&h, &s)
    }
}
