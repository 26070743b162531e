use candle_core::{DType, Tensor};
use qcl_tensor::{Error, Result};
use rayon::prelude::*;

use crate::layers::Module;
use crate::models::{ConvDecoder, ConvEncoder};
use crate::ops::{mse_loss, straight_through_relu};
use crate::{Init, ParamPath};

/// The AQM-style VQ autoencoder for `1×28×28` images (one module, downsampling 2, `C`
/// channels, `K` codes, one residual block: [`ConvEncoder`] and [`ConvDecoder`]), the second
/// model of qcl's training benchmark:
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
/// let x = Tensor::rand(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu)?;
/// let out = ae.forward_with_codes(&x)?;
/// assert_eq!(out.reconstruction.dims(), &[2, 1, 28, 28]);
/// assert_eq!(out.codes.len(), 2 * 14 * 14);
/// // As a candle `Module`, the model is its reconstruction.
/// use qcl_nn::layers::Module;
/// assert_eq!(ae.forward(&x)?.dims(), &[2, 1, 28, 28]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct VqAutoencoder {
    encoder: ConvEncoder,
    decoder: ConvDecoder,
    codebook: Tensor,
}

/// What one [`VqAutoencoder::forward_with_codes`] produces.
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
        let bound = 1.0 / codes as f64;
        Ok(Self {
            encoder: ConvEncoder::new(&path.pp("enc"), 1, channels, 2, 1)?,
            decoder: ConvDecoder::new(&path.pp("dec"), 1, channels, 2, 1)?,
            codebook: path
                .buffer(
                    "codebook",
                    (codes, channels),
                    Init::Uniform {
                        low: -bound,
                        high: bound,
                    },
                )?
                .as_tensor()
                .clone(),
        })
    }

    /// Encode, quantise and decode a batch `[n, 1, h, w]` (even `h`, `w`): the reconstruction
    /// with the commitment loss and the codes ([`Module::forward`] is the reconstruction alone).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for other input shapes.
    pub fn forward_with_codes(&self, x: &Tensor) -> Result<VqAutoencoderOutput> {
        if x.rank() != 4 || x.dim(1)? != 1 || x.dim(2)? % 2 == 1 || x.dim(3)? % 2 == 1 {
            return Err(Error::ShapeMismatch {
                context: "vq autoencoder input".into(),
                expected: "[n, 1, h, w] with even h, w".into(),
                actual: x.dims().to_vec(),
            });
        }
        let h = self.encoder.forward(x)?;
        let (q, codes) = quantize_nchw(&h, &self.codebook)?;
        let commitment = mse_loss(&h, &q)?;
        let g = straight_through_relu(&h, &q)?;
        let reconstruction = self.decoder.forward_rectified(&g)?;
        Ok(VqAutoencoderOutput {
            reconstruction,
            commitment,
            codes,
        })
    }
}

impl Module for VqAutoencoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_with_codes(x)?.reconstruction)
    }
}

/// Nearest codebook row of every `C`-vector of an NCHW tensor: the quantised tensor (NCHW,
/// no gradient) and the code of every position in `[n, h, w]` order.
fn quantize_nchw(h: &Tensor, codebook: &Tensor) -> Result<(Tensor, Vec<u32>)> {
    let (n, c, hh, ww) = h.dims4()?;
    let hw = hh * ww;
    let values: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let book: Vec<f32> = codebook.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    // Searched in place, channels-first: no transposed copy of the feature map.
    let nearest = qcl_tensor::nearest_codes_planar(&values, c, hw, &book, None)?;
    let mut quantized = vec![0f32; values.len()];
    quantized
        .par_chunks_mut(hw)
        .enumerate()
        .for_each(|(plane, out)| {
            let (b, ch) = (plane / c, plane % c);
            let codes = &nearest.indices[b * hw..(b + 1) * hw];
            for (o, &code) in out.iter_mut().zip(codes) {
                *o = book[code as usize * c + ch];
            }
        });
    let q = Tensor::from_vec(quantized, (n, c, hh, ww), h.device())?.to_dtype(h.dtype())?;
    Ok((q, nearest.indices))
}
