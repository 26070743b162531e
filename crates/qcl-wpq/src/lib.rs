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
//!
//! ## Departures from the spec
//!
//! - E-step: `G = VΛVᵀ` in f64, points mapped by `Λ^{1/2}Vᵀ` (eigenvalues below `1e-10·max`
//!   dropped) and searched in f32 by the shared kernel — exact up to f32 rounding.
//! - Empty-cluster split: `ε = max(1e-8, 1e-6·max|c_m|)`, because `1e-8` is below f32
//!   resolution for centroids of magnitude ≳ 0.1; at most `20·K` repairs per E-step.
//! - Rows per EM iteration: `rows_per_iteration / m` patches (≈ 20,000 unrolled rows, at least
//!   `4d`), sampled with replacement as random (image, position) patches of the recorded inputs.
//! - Logged EM objective: the surrogate `mean_j (u_j − c)ᵀG_eval(u_j − c)` over all
//!   subvectors with one `G_eval` drawn once, instead of a 128-row Frobenius norm.
//! - Global fine-tuning uses one constant learning rate (the §10 prototype), no step decay.
//! - File: three blobs (fp16 codebooks, bit-packed `⌈log2 K⌉`-bit assignments, fp32 floats) and
//!   compact JSON metadata, rather than one tensor per layer, so the header stays small.
//! - Uniform baseline: `2^b` levels evenly spaced on `[−s, s]` (no zero level for even counts).

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
