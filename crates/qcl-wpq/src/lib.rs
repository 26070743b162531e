//! # qcl-wpq
//!
//! Weight compression of any model's checkpoint: product quantization of named 2-D (linear,
//! embedding) and 4-D (convolution) weights ("And the bit goes down", Stock et al., ICLR 2020)
//! under three objectives, codebook fine-tuning on the layer output error, and scalar baselines
//! (fp16, round-to-nearest int8/int4/int3, GPTQ), all written to one safetensors file whose
//! loader gives a candle-nn `VarBuilder`. FMNet, with the paper's layer-by-layer distillation
//! and a fork's variants (BN fusion, channel-major blocks, per-block codebooks), is one user.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use indicatif::ProgressBar;
//! use qcl_wpq::{compress_checkpoint, Calibration, Checkpoint, CompressedCheckpoint, Method,
//!     Objective, PqConfig, Plan, Rule};
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1.0, (16, 32), &dev)?;
//! let checkpoint = Checkpoint::from_tensors([("fc.weight", w), ("fc.bias", Tensor::zeros(16, DType::F32, &dev)?)])?;
//! // The user's forward pass records each layer's input under its weight name.
//! let calib = Calibration::new();
//! calib.record("fc.weight", &Tensor::randn(0f32, 1.0, (64, 32), &dev)?)?;
//! let plan = Plan::new(vec![Rule::new("*.weight", Method::Pq(PqConfig::new(4, 16, Objective::ErrorFeedback)))?]);
//! let out = compress_checkpoint(&checkpoint, &plan, &calib, &ProgressBar::hidden())?;
//! assert_eq!(out.reports[0].bits.bits_per_weight(), (128.0 * 4.0 + 16.0 * 4.0 * 16.0) / 512.0);
//! let bytes = out.checkpoint.to_bytes()?;
//! let vb = CompressedCheckpoint::from_bytes("mem", &bytes)?.var_builder(DType::F32, &dev)?;
//! let fc = candle_nn::linear(32, 16, vb.pp("fc"))?;
//! # let _ = fc;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules:
//!
//! - [`select`]: name patterns and rules (first match wins).
//! - [`calibration`]: [`Calibration`], the thread-safe recorder of `H = Σxᵀx` (or token counts)
//!   that the user's forward pass feeds.
//! - [`objective`]: the output error as a quadratic ([`Quadratic`]), product quantization under
//!   each objective ([`quantize_pq`]), error feedback, least-squares codebook fine-tuning.
//! - [`scalar`]: round-to-nearest and GPTQ on per-group min-max grids.
//! - [`checkpoint`]: checkpoints kept bit for bit, the compressed file, bits accounting.
//! - [`compressor`]: [`compress_checkpoint`] / [`compress_tensor`].
//! - [`layout`], [`metric`], [`em`], [`pq_tensor`]: subvector layouts, the E-step metric, the
//!   activation-aware EM, the PQ tensor.
//! - FMNet: [`model`], [`compress`] (the paper's procedure), [`compressed`], [`sgd`],
//!   [`teacher`], [`inputs`], [`baseline`].
//!
//! ## Choices where the paper leaves room
//!
//! - E-step: `G = VΛVᵀ` in f64, points mapped by `Λ^{1/2}Vᵀ` (eigenvalues below `1e-10·max`
//!   dropped) and searched in f32 by the shared kernel — exact up to f32 rounding.
//! - Empty-cluster split: `ε = max(1e-8, 1e-6·max|c_m|)`, because `1e-8` is below f32
//!   resolution for centroids of magnitude ≳ 0.1; at most `20·K` repairs per E-step.
//! - FMNet, rows per EM iteration: `rows_per_iteration / m` patches (≈ 20,000 unrolled rows,
//!   at least `4d`), sampled with replacement as random (image, position) patches.
//! - Logged EM objective: the surrogate `mean_j (u_j − c)ᵀG_eval(u_j − c)` over all
//!   subvectors with one `G_eval` drawn once.
//! - FMNet's global fine-tuning uses one constant learning rate by default.
//! - Checkpoints from the user's own calibration use the pooled Gram of all recorded rows (no
//!   resampling); the FMNet procedure keeps the paper's resampling.

pub mod baseline;
pub mod calibration;
pub mod checkpoint;
pub mod compress;
pub mod compressed;
pub mod compressor;
pub mod em;
pub mod inputs;
pub mod layout;
pub mod metric;
pub mod model;
pub mod objective;
pub mod pq_tensor;
pub mod scalar;
pub mod select;
pub mod sgd;
pub mod staged;
pub mod teacher;

pub use baseline::{
    uniform_quantize, uniform_quantize_with, uniform_size, UniformClip, UniformConfig,
    UniformLevels, UniformRange,
};
pub use calibration::{
    Calibration, ConvInput, InputStats, LayerStats, TokenStats, CALIBRATION_FORMAT,
    DEFAULT_SAMPLE_ROWS,
};
pub use checkpoint::{
    BitsReport, Checkpoint, CompressedCheckpoint, CompressedTensor, Encoding, ExactColumns,
    RawTensor, TensorBits, CHECKPOINT_FORMAT,
};
pub use compress::{compress, CompressConfig, CompressOutcome, LayerReport};
pub use compressed::{size_report, CompressedModel, QuantizedLayer, SizeReport};
pub use compressor::{compress_checkpoint, compress_tensor, Compressed, Method, TensorReport};
pub use em::{
    activation_aware_em, e_step, pooled_gram, surrogate_objective, weighted_em, EmConfig,
    EmOutcome, MetricSource, Objective, PatchSampler,
};
pub use layout::{clamp_centroids, index_bits, LayerGeometry, LayerKind, Layout};
pub use metric::Metric;
pub use model::{Arch, Forward, ForwardConfig, Model, Pool, MODEL_FORMAT};
pub use objective::{
    finetune_codebooks, quantize_pq, Evidence, FinetuneGuard, OutlierColumns, PqConfig, PqOutcome,
    Quadratic, GUARD_STEPS, MAX_CENTROIDS, MAX_DENSE_UNKNOWNS, MAX_ROUNDS,
};
pub use pq_tensor::{PqTensor, Sharing};
pub use scalar::{gptq, rtn, ScalarCodes, ScalarConfig, ScalarTensor};
pub use select::{Pattern, Plan, Rule};
pub use sgd::CentroidSgd;
pub use staged::compress_checkpoint_staged;
pub use teacher::{evaluate, train_teacher, TeacherConfig, FMNIST_NORMALIZATION};
