//! Mean pooling over the attention mask and L2 normalisation, as sentence-transformers'
//! `Pooling` (mean tokens) and `Normalize` modules compute them.

use candle_core::{DType, Tensor};
use qcl_tensor::Result;

/// Mean of `hidden` `[batch, seq, dim]` over the positions where `attention_mask`
/// `[batch, seq]` is non-zero: `Σ_t m_t·h_t / max(Σ_t m_t, 1e-9)`, `[batch, dim]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let h = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0], [100.0, 100.0]]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu)?;
/// let pooled = qcl_text::mean_pool(&h, &mask)?;
/// assert_eq!(pooled.to_vec2::<f32>()?, [[2.0, 3.0]]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// Candle errors for shapes that do not match.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
    let count = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(sum.broadcast_div(&count)?)
}

/// Each row of `x` `[n, dim]` divided by its L2 norm (at least `1e-12`, as
/// `torch.nn.functional.normalize`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu)?;
/// assert_eq!(qcl_text::l2_normalize(&x)?.to_vec2::<f32>()?, [[0.6, 0.8], [0.0, 0.0]]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// Candle errors for a tensor that is not 2-D.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm.to_dtype(x.dtype())?)?)
}
