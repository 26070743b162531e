//! The convolutional encoder and decoder of AQM's modules (Caccia et al., ICML 2020;
//! docs/methods/aqm.md § Networks): convolutions with bias, ReLU, residual blocks, no
//! normalisation and no output activation. AQM's `QLayer`, the VQ experiment's autoencoder and
//! [`crate::models::VqAutoencoder`] are built from them, with different quantizers between.

use candle_core::Tensor;
use qcl_tensor::{Error, Result};

use crate::layers::{
    residual_relu, Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Module,
};
use crate::ops::relu;
use crate::ParamPath;

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

/// [`Error::InvalidParameter`] unless `downsample` is 2 or 4, the outer channel count is at
/// least 1 and `c` is at least 1 (even for downsampling 2, whose first convolution has `c/2`).
fn check_shape(outer: usize, c: usize, downsample: usize) -> Result<()> {
    let valid =
        outer >= 1 && c >= 1 && (downsample == 4 || (downsample == 2 && c.is_multiple_of(2)));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_parameter(
            "conv autoencoder",
            format!(
                "need downsampling 2 (even C) or 4 and at least one channel, got downsampling \
                 {downsample}, C = {c}, outer channels {outer}"
            ),
        ))
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

/// The encoder: downsampling 2 `conv4×4/2 c→C/2, ReLU, conv3×3 C/2→C`, downsampling 4
/// `conv4×4/2 c→C, ReLU, conv4×4/2 C→C`; then the residual blocks and a ReLU. Output
/// `z_e ≥ 0` of `C` channels at `1/downsample` of the input's height and width.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::Module;
/// use qcl_nn::models::{ConvDecoder, ConvEncoder};
/// let store = qcl_nn::ParamStore::new(0);
/// let root = store.root(&Device::Cpu);
/// let encoder = ConvEncoder::new(&root.pp("enc"), 1, 8, 2, 1)?;
/// let decoder = ConvDecoder::new(&root.pp("dec"), 1, 8, 2, 1)?;
/// let x = Tensor::rand(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu)?;
/// let z = encoder.forward(&x)?;
/// assert_eq!(z.dims(), &[2, 8, 14, 14]);
/// assert_eq!(decoder.forward(&z)?.dims(), x.dims());
/// // Downsampling 3 is not one of the two shapes.
/// assert!(ConvEncoder::new(&root.pp("bad"), 1, 8, 3, 1).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ConvEncoder {
    first: Conv2d,
    second: Conv2d,
    blocks: Vec<ResBlock>,
}

impl ConvEncoder {
    /// `c_in` input channels, `c` latent channels (even for downsampling 2), `downsample`
    /// 2 or 4, `res` residual blocks; parameters under `path` (`conv_a`, `conv_b`, `res{i}`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for another downsampling, no channels or an odd `c` at
    /// downsampling 2; a name clash in the store.
    pub fn new(
        path: &ParamPath,
        c_in: usize,
        c: usize,
        downsample: usize,
        res: usize,
    ) -> Result<Self> {
        check_shape(c_in, c, downsample)?;
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
        Ok(ConvEncoder {
            first,
            second,
            blocks,
        })
    }
}

impl Module for ConvEncoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.second.forward_relu(&self.first.forward_relu(x)?)?;
        for b in &self.blocks {
            h = b.forward_rectified(&h)?;
        }
        Ok(h)
    }
}

/// The decoder: ReLU, residual blocks, then downsampling 2 `convT4×4/2 C→c`, downsampling 4
/// `convT4×4/2 C→C, ReLU, convT4×4/2 C→c`. No output activation. See [`ConvEncoder`] for an
/// example.
#[derive(Debug, Clone)]
pub struct ConvDecoder {
    blocks: Vec<ResBlock>,
    hidden: Option<ConvTranspose2d>,
    out: ConvTranspose2d,
}

impl ConvDecoder {
    /// `c_out` output channels, `c` latent channels, `downsample` 2 or 4, `res` residual
    /// blocks; parameters under `path` (`res{i}`, `up_a`, `up_out`).
    ///
    /// # Errors
    /// As [`ConvEncoder::new`].
    pub fn new(
        path: &ParamPath,
        c_out: usize,
        c: usize,
        downsample: usize,
        res: usize,
    ) -> Result<Self> {
        check_shape(c_out, c, downsample)?;
        let blocks = (0..res)
            .map(|i| ResBlock::new(&path.pp(format!("res{i}")), c))
            .collect::<Result<_>>()?;
        let hidden = if downsample == 4 {
            Some(ConvTranspose2d::new(&path.pp("up_a"), c, c, 4, up())?)
        } else {
            None
        };
        Ok(ConvDecoder {
            blocks,
            hidden,
            out: ConvTranspose2d::new(&path.pp("up_out"), c, c_out, 4, up())?,
        })
    }
}

impl ConvDecoder {
    /// The decoder after its first ReLU, for a caller whose latent is already rectified (a
    /// fused straight-through ReLU, as [`crate::models::VqAutoencoder`] uses).
    ///
    /// # Errors
    /// As the convolutions.
    pub fn forward_rectified(&self, h: &Tensor) -> Result<Tensor> {
        let mut h = h.clone();
        for b in &self.blocks {
            h = b.forward_rectified(&h)?;
        }
        if let Some(hidden) = &self.hidden {
            h = relu(&hidden.forward(&h)?)?;
        }
        Ok(self.out.forward(&h)?)
    }
}

impl Module for ConvDecoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_rectified(&relu(z)?)?)
    }
}
