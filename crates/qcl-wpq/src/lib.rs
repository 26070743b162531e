//! # qcl-wpq
//!
//! Weight product quantization with activation-aware k-means and distillation ("And the bit
//! goes down", Stock et al., ICLR 2020) and the variants of a fork (BN fusion, ChangeDim,
//! Subspace), following `weight_pq.md`.
//!
//! - [`layout`]: subvector layouts (spatial / channel-major, slab-major order), the `K` clamp.
//! - [`metric`]/[`em`]: the activation-aware EM; the E-step maps points so that the metric `G`
//!   becomes Euclidean and runs qcl-tensor's shared nearest-code kernel.
//! - [`model`]: FMNet and its BatchNorm variant, BN folding, the distillation loss.
//! - [`compressed`]: quantized layers, the compressed-model file, size accounting.
//! - [`compress`]: the layer-by-layer procedure with CentroidSGD and global fine-tuning.
//! - [`baseline`]: uniform per-channel scalar quantization.

pub mod baseline;
pub mod compress;
pub mod compressed;
pub mod em;
pub mod layout;
pub mod metric;
pub mod model;

pub use baseline::{uniform_quantize, uniform_size};
pub use compress::{
    compress, evaluate, train_teacher, CentroidSgd, CompressConfig, CompressOutcome, LayerReport,
    TeacherConfig,
};
pub use compressed::{size_report, CompressedModel, QuantizedLayer, SizeReport, COMPRESSED_FORMAT};
pub use em::{
    activation_aware_em, e_step, pooled_gram, surrogate_objective, EmOutcome, EmParams,
    MetricSource, Objective, PatchSampler,
};
pub use layout::{clamp_centroids, index_bits, LayerGeometry, LayerKind, Layout};
pub use metric::Metric;
pub use model::{distillation_loss, Arch, Forward, ForwardOptions, Model, Pool, MODEL_FORMAT};
