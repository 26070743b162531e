//! Encoder and decoder of one module (docs/methods/aqm.md § Networks): convolutions with
//! bias, ReLU, residual blocks, no normalisation and no output activation.

use candle_core::Tensor;
use qcl_nn::layers::{
    residual_relu, Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Module,
};
use qcl_nn::ops::relu;
use qcl_nn::ParamPath;
use qcl_tensor::Result;

/// `h = relu(x); y = h + conv1×1(relu(conv3×3(h)))`. The caller passes `h` already rectified
/// and gets `relu(y)`, because every block output is rectified next (by the next block or
/// the final ReLU), which lets the sum and the ReLU run as one fused op.
#[derive(Debug, Clone)]
struct ResBlock {
    conv3: Conv2d,
    conv1: Conv2d,
}

impl ResBlock {
    fn new(path: &ParamPath, c: usize) -> Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(ResBlock {
            conv3: Conv2d::new(&path.pp("conv3"), c, c, 3, same)?,
            conv1: Conv2d::new(&path.pp("conv1"), c, c, 1, Conv2dConfig::default())?,
        })
    }

    fn forward_rectified(&self, h: &Tensor) -> Result<Tensor> {
        residual_relu(h, &self.conv3, &self.conv1)
    }
}

fn down() -> Conv2dConfig {
    Conv2dConfig {
        stride: 2,
        padding: 1,
        ..Default::default()
    }
}

fn up() -> ConvTranspose2dConfig {
    ConvTranspose2dConfig {
        stride: 2,
        padding: 1,
        ..Default::default()
    }
}

/// The encoder: ds 2 `conv4×4/2 c→C/2, ReLU, conv3×3 C/2→C`, ds 4 `conv4×4/2 c→C, ReLU,
/// conv4×4/2 C→C`; then the residual blocks and a ReLU. Output `z_e ≥ 0`.
#[derive(Debug, Clone)]
pub struct Encoder {
    first: Conv2d,
    second: Conv2d,
    blocks: Vec<ResBlock>,
}

impl Encoder {
    /// Parameters under `path`.
    ///
    /// # Errors
    /// A name clash in the store.
    pub fn new(
        path: &ParamPath,
        c_in: usize,
        c: usize,
        downsample: usize,
        res: usize,
    ) -> Result<Self> {
        let (first, second) = if downsample == 4 {
            (
                Conv2d::new(&path.pp("conv_a"), c_in, c, 4, down())?,
                Conv2d::new(&path.pp("conv_b"), c, c, 4, down())?,
            )
        } else {
            let same = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            (
                Conv2d::new(&path.pp("conv_a"), c_in, c / 2, 4, down())?,
                Conv2d::new(&path.pp("conv_b"), c / 2, c, 3, same)?,
            )
        };
        let blocks = (0..res)
            .map(|i| ResBlock::new(&path.pp(format!("res{i}")), c))
            .collect::<Result<_>>()?;
        Ok(Encoder {
            first,
            second,
            blocks,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.second.forward_relu(&self.first.forward_relu(x)?)?;
        for b in &self.blocks {
            h = b.forward_rectified(&h)?;
        }
        Ok(h)
    }
}

/// The decoder: residual blocks, ReLU, then ds 2 `convT4×4/2 C→c`, ds 4 `convT4×4/2 C→C,
/// ReLU, convT4×4/2 C→c`. No output activation.
#[derive(Debug, Clone)]
pub struct Decoder {
    blocks: Vec<ResBlock>,
    hidden: Option<ConvTranspose2d>,
    out: ConvTranspose2d,
}

impl Decoder {
    /// Parameters under `path`.
    ///
    /// # Errors
    /// A name clash in the store.
    pub fn new(
        path: &ParamPath,
        c_out: usize,
        c: usize,
        downsample: usize,
        res: usize,
    ) -> Result<Self> {
        let blocks = (0..res)
            .map(|i| ResBlock::new(&path.pp(format!("res{i}")), c))
            .collect::<Result<_>>()?;
        let hidden = if downsample == 4 {
            Some(ConvTranspose2d::new(&path.pp("up_a"), c, c, 4, up())?)
        } else {
            None
        };
        Ok(Decoder {
            blocks,
            hidden,
            out: ConvTranspose2d::new(&path.pp("up_out"), c, c_out, 4, up())?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = relu(z)?;
        for b in &self.blocks {
            h = b.forward_rectified(&h)?;
        }
        if let Some(hidden) = &self.hidden {
            h = relu(&hidden.forward(&h)?)?;
        }
        self.out.forward(&h)
    }
}
