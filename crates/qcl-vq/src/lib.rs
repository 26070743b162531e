//! # qcl-vq
//!
//! A trainable vector-quantization layer for candle, on qcl's exact nearest-code kernel.
//!
//! - [`VectorQuantizer`] ([`VectorQuantizerConfig`]): N codebooks of K codes splitting the
//!   channels of `(B, C, H, W)` feature maps or `(B, T, C)` sequences; codebook updates by EMA
//!   with Laplace-smoothed counts (Razavi et al. 2019, as AQM, Caccia et al. 2020), by the
//!   caller's optimizer, or frozen ([`CodebookUpdate`]); commitment loss and straight-through
//!   output (VQ-VAE, van den Oord et al. 2017); optional k-means initialisation from the first
//!   batch; dead-code revival; usage telemetry ([`UsageStats`], [`CodeUsage`], [`perplexity`]);
//!   save/load.
//! - [`PackedIndices`]: indices stored with `⌈log2 K⌉` bits, checked when read back.
//! - [`ResidualVq`]: quantizers on successive residuals.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qcl_nn::ParamStore;
//! use qcl_vq::{CodebookUpdate, VectorQuantizer, VectorQuantizerConfig};
//!
//! // The AQM quantizer: one codebook of 16 codes for 32 channels, EMA decay 0.6, β = 2.
//! let config = VectorQuantizerConfig {
//!     update: CodebookUpdate::Ema { decay: 0.6, eps: 1e-5 },
//!     commitment_weight: 2.0,
//!     ..VectorQuantizerConfig::new(32, 16)
//! };
//! let store = ParamStore::new(0);
//! let mut vq = VectorQuantizer::new(&store.root(&Device::Cpu).pp("vq"), config)?;
//! let z_e = Tensor::rand(0f32, 1.0, (2, 32, 14, 14), &Device::Cpu)?;
//! let out = vq.forward(&z_e, true)?;
//! let packed = vq.encode_packed(&z_e)?;
//! assert_eq!(packed.bytes().len(), 2 * 14 * 14 * 4 / 8); // 4 bits per index
//! assert!(out.stats.mean_perplexity() >= 1.0);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

#![warn(missing_docs)]

mod config;
mod packed;
mod quantizer;
mod residual;
mod usage;

pub use config::{CodebookUpdate, VectorQuantizerConfig, DEFAULT_DEAD_CODE_THRESHOLD, MAX_CODES};
pub use packed::{PackedIndices, INDICES_FORMAT};
pub use quantizer::{VectorQuantizer, VqOutput, QUANTIZER_FORMAT};
pub use residual::{ResidualVq, ResidualVqOutput};
pub use usage::{perplexity, CodeUsage, UsageStats};
