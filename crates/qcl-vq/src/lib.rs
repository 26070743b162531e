//! # qcl-vq
//!
//! A trainable vector-quantization layer for candle, on qcl's exact nearest-code kernel.
//!
//! - [`VectorQuantizer`] ([`VectorQuantizerConfig`]): N codebooks of K codes splitting the
//!   channels of any input with a channel axis ([`ChannelAxis`]: `(B, C, H, W)` feature maps,
//!   `(B, T, C)` sequences, `(B, C)` rows, any `[.., C]`); codebook updates by EMA with
//!   Laplace-smoothed counts (Razavi et al. 2019, as AQM, Caccia et al. 2020), by the caller's
//!   optimizer, or frozen ([`CodebookUpdate`]); commitment loss and straight-through output
//!   (VQ-VAE, van den Oord et al. 2017); optional k-means initialisation from the first batch;
//!   dead-code revival; usage telemetry ([`UsageStats`], [`CodeUsage`], [`perplexity`]);
//!   save/load.
//! - [`PackedIndices`]: indices stored with `⌈log2 K⌉` bits, checked when read back.
//! - [`ResidualVq`]: quantizers on successive residuals.
//! - [`VectorQuantizer`] is a `qcl_pq::Quantizer` on row-major `[n, C]` slices too: N codes per
//!   vector in one `PackedCodes` buffer, like every other qcl quantizer.
//!
//! Both quantizers are candle-nn layers: built from a `VarBuilder` (their state in the user's
//! `VarMap`), `candle_core::ModuleT` with the straight-through output, the loss and statistics
//! of the last call kept. `examples/candle_vq_bottleneck.rs` trains a candle-nn model with one.
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use qcl_vq::{CodebookUpdate, VectorQuantizer, VectorQuantizerConfig};
//!
//! // The AQM quantizer: one codebook of 16 codes for 32 channels, EMA decay 0.6, β = 2.
//! let config = VectorQuantizerConfig {
//!     update: CodebookUpdate::Ema { decay: 0.6, eps: 1e-5 },
//!     commitment_weight: 2.0,
//!     ..VectorQuantizerConfig::new(32, 16)
//! };
//! let varmap = VarMap::new();
//! let vq = VectorQuantizer::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("vq"))?;
//! let z_e = Tensor::rand(0f32, 1.0, (2, 32, 14, 14), &Device::Cpu)?;
//! let z_q = vq.forward_t(&z_e, true)?; // straight-through output; EMA update
//! let loss = vq.last_loss()?; // add to the model's loss
//! let packed = vq.encode_packed(&z_e)?;
//! assert_eq!(packed.bytes().len(), 2 * 14 * 14 * 4 / 8); // 4 bits per index
//! assert!(vq.last_output().unwrap().stats.mean_perplexity() >= 1.0);
//! # let _ = (z_q, loss);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

#![warn(missing_docs)]

mod config;
mod layout;
mod packed;
mod quantizer;
mod residual;
mod rows;
mod update;
mod usage;

pub use config::{
    bits_for, ChannelAxis, CodebookUpdate, VectorQuantizerConfig, DEFAULT_DEAD_CODE_THRESHOLD,
    MAX_CODES,
};
pub use packed::{PackedIndices, INDICES_FORMAT};
pub use quantizer::{VectorQuantizer, VqOutput, QUANTIZER_FORMAT};
pub use residual::{ResidualVq, ResidualVqOutput};
pub use usage::{perplexity, CodeUsage, UsageStats};
