use candle_core::{DType, Tensor};
use qcl_tensor::{Error, Result};

use crate::layers::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Module};
use crate::ops::relu;
use crate::{Init, ParamPath};

/// The AQM-style VQ autoencoder for `1×28×28` images (one module, downsampling 2, `C`
/// channels, `K` codes), the second model of qcl's training benchmark:
///
/// encoder `conv4×4/2 1→C/2, ReLU, conv3×3 C/2→C, ReLU, h + conv1×1(ReLU(conv3×3 h))`;
/// nearest-code quantisation of each `C`-vector against a fixed codebook `[K, C]`, with the
/// straight-through gradient `z_q = h + sg(q − h)` and commitment loss `mean((sg(q) − h)²)`;
/// decoder `ReLU, g + conv1×1(ReLU(conv3×3 g)), ReLU, transposed conv4×4/2 C→1`.
///
/// The trainable VQ layer proper (EMA or learned codebooks) lives in `qcl-vq`; this model
/// fixes the codebook, as the reference benchmark does, to time the convolutions.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let store = qcl_nn::ParamStore::new(0);
/// let ae = qcl_nn::models::VqAutoencoder::new(&store.root(&Device::Cpu), 32, 16)?;
/// let out = ae.forward(&Tensor::rand(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu)?)?;
/// assert_eq!(out.reconstruction.dims(), &[2, 1, 28, 28]);
/// assert_eq!(out.codes.len(), 2 * 14 * 14);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct VqAutoencoder {
    e1: Conv2d,
    e2: Conv2d,
    r1: Conv2d,
    r2: Conv2d,
    d1: Conv2d,
    d2: Conv2d,
    dt: ConvTranspose2d,
    codebook: Tensor,
    channels: usize,
}

/// What one [`VqAutoencoder::forward`] produces.
#[derive(Debug, Clone)]
pub struct VqAutoencoderOutput {
    /// Decoded images, `[n, 1, 28, 28]`.
    pub reconstruction: Tensor,
    /// Commitment loss `mean((sg(q) − h)²)` (a scalar).
    pub commitment: Tensor,
    /// The chosen code of every latent position, in `[n, 14, 14]` order.
    pub codes: Vec<u32>,
}

impl VqAutoencoder {
    /// `channels` (`C`, even) latent channels and `codes` (`K`) codebook entries; the codebook
    /// buffer is drawn from `U(−1/K, 1/K)`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an odd or zero `channels` or zero `codes`.
    pub fn new(path: &ParamPath, channels: usize, codes: usize) -> Result<Self> {
        if channels < 2 || channels % 2 == 1 || codes == 0 {
            return Err(Error::invalid_parameter(
                "vq autoencoder",
                format!("need an even channel count ≥ 2 and ≥ 1 code, got C={channels}, K={codes}"),
            ));
        }
        let c = channels;
        let same3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let down = Conv2dConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let one = Conv2dConfig::default();
        let bound = 1.0 / codes as f64;
        Ok(Self {
            e1: Conv2d::new(&path.pp("e1"), 1, c / 2, 4, down)?,
            e2: Conv2d::new(&path.pp("e2"), c / 2, c, 3, same3)?,
            r1: Conv2d::new(&path.pp("r1"), c, c, 3, same3)?,
            r2: Conv2d::new(&path.pp("r2"), c, c, 1, one)?,
            d1: Conv2d::new(&path.pp("d1"), c, c, 3, same3)?,
            d2: Conv2d::new(&path.pp("d2"), c, c, 1, one)?,
            dt: ConvTranspose2d::new(
                &path.pp("dt"),
                c,
                1,
                4,
                ConvTranspose2dConfig {
                    stride: 2,
                    padding: 1,
                    ..Default::default()
                },
            )?,
            codebook: path
                .buffer(
                    "codebook",
                    (codes, c),
                    Init::Uniform {
                        low: -bound,
                        high: bound,
                    },
                )?
                .as_tensor()
                .clone(),
            channels,
        })
    }

    /// Encode, quantise and decode a batch `[n, 1, 28, 28]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for other input shapes.
    pub fn forward(&self, x: &Tensor) -> Result<VqAutoencoderOutput> {
        if x.rank() != 4 || x.dim(1)? != 1 || x.dim(2)? % 2 == 1 || x.dim(3)? % 2 == 1 {
            return Err(Error::ShapeMismatch {
                context: "vq autoencoder input".into(),
                expected: "[n, 1, h, w] with even h, w".into(),
                actual: x.dims().to_vec(),
            });
        }
        let h = relu(&self.e2.forward(&relu(&self.e1.forward(x)?)?)?)?;
        let h = relu(&(&h + self.r2.forward(&relu(&self.r1.forward(&h)?)?)?)?)?;
        let (n, c, hh, ww) = h.dims4()?;
        let flat = h.permute((0, 2, 3, 1))?.reshape((n * hh * ww, c))?;
        let points: Vec<f32> = flat.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let book: Vec<f32> = self
            .codebook
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let nearest = qcl_tensor::nearest_codes(&points, &book, self.channels, None)?;
        let idx = Tensor::new(nearest.indices.as_slice(), x.device())?;
        let q = self
            .codebook
            .index_select(&idx, 0)?
            .reshape((n, hh, ww, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let commitment = (q.detach() - &h)?.sqr()?.mean_all()?;
        let zq = (&h + (q - &h)?.detach())?;
        let g = relu(&zq)?;
        let g = (&g + self.d2.forward(&relu(&self.d1.forward(&g)?)?)?)?;
        let reconstruction = self.dt.forward(&relu(&g)?)?;
        Ok(VqAutoencoderOutput {
            reconstruction,
            commitment,
            codes: nearest.indices,
        })
    }
}
