//! # qcl-continual
//!
//! Continual-learning scenarios, byte-budget replay buffers, metrics, ProxQ, BaLL and QAT quantizers.
//!
//! Available now:
//!
//! - [`scenario`]: [`Scenario`]s as data — class-incremental splits (Split-MNIST,
//!   Split-FMNIST 5×2), task-incremental splits with per-task labels, LifeQuant's sliding-window
//!   lifelong class shift ([`LifelongConfig`]), permuted MNIST, and an online single-pass
//!   [`Stream`] of mini-batches;
//! - [`metrics`]: the [`AccuracyMatrix`] `a[i][j]` with average accuracy, backward and forward
//!   transfer and forgetting, JSON and a PNG heatmap.
//!
//! - [`buffer`]: replay buffers with a capacity in items and in bytes and stable item ids —
//!   [`ReservoirBuffer`] (Vitter's algorithm R), [`ClassBalancedBuffer`] (AQM's eviction from
//!   the largest class), [`PerTaskBuffer`] (LifeQuant's random δ of each task) — behind the
//!   [`ReplayBuffer`] trait, with replay batches restricted by a [`Filter`] on classes and tasks;
//!   buffers of candle `Tensor`s draw stacked `(items, labels)` batches
//!   ([`ReplayBuffer::sample_batch`]; example `examples/replay_tensors.rs`).
//! - [`ball`]: LifeQuant's Balanced Lifelong Learning loss — [`ClassHistogram`] and
//!   [`ClassStatistics`] of `D_t ∪ R_{<t}` (weights `w_c = 1/(K·p_c + 1)`), [`BallLoss`] in the
//!   three [`BallMode`]s (the paper's linear prior, the code's additive and multiplicative
//!   forms) on the candle graph;
//! - [`quant`]: LifeQuant's QAT quantizers with straight-through gradients — the rounding
//!   primitive [`round_to_bits`] (`q_k`), the weight quantizer [`WeightQuantizer`] (per-tensor
//!   standardisation to `σ0`, faithful or strict DoReFa grid, 1-bit branch) and the activation
//!   quantizer [`ActivationQuantizer`];
//! - [`proxq`]: ProxQ's Fisher-weighted proximal penalty `λ·Σ F⊙(θ − θ*)²` ([`ProxQ`]) with the
//!   batch-mean squared-gradient Fisher ([`FisherAccumulator`], [`FisherDiagonal`]);
//! - [`qresnet`]: LifeQuant's quantized ResNet for 28×28 inputs, "QResNet-8" ([`QResNet`],
//!   [`QResNetConfig`]): the `resnet20_quant` block, one per stage, quantized stem and 1×1
//!   skips, FP32 head, bit widths switchable in place (32 = full precision).
//!
//! - [`strategy`]: a small [`Strategy`] trait and the baselines [`FineTune`],
//!   [`ExperienceReplay`], [`Joint`], [`Ewc`] (on the Fisher machinery shared with ProxQ) and
//!   [`Lwf`], run over a task sequence by the [`ContinualTrainer`] (replay memory, fresh SGD
//!   with a multi-step schedule per task, seeded batch order, the accuracy matrix);
//! - [`lifequant`]: [`LifeQuant`] itself as a strategy — ProxQ with the Fisher from BaLL on the
//!   replay memory, in the paper mode (train on `D_t ∪ R_{<t}` with BaLL) or the code-faithful
//!   mode (train on `D_t` with CE).
//!
//! ```
//! use qcl_continual::{AccuracyMatrix, LifelongConfig, Scenario};
//! # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
//! let data = qcl_data::SplitDataset::load(path)?;
//! let scenario = Scenario::lifelong(&data, &LifelongConfig::reproduction())?;
//! let mut accuracy = AccuracyMatrix::new(scenario.num_tasks())?;
//! for task in scenario.tasks() {
//!     // ... train on task.train, then for every seen task s ≤ task.id:
//!     for seen in 0..=task.id {
//!         accuracy.set(task.id, seen, 0.5)?; // accuracy on scenario.tasks()[seen].test
//!     }
//! }
//! assert_eq!(accuracy.average_accuracy()?, 0.5);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

#![warn(missing_docs)]

pub mod ball;
pub mod buffer;
pub mod lifequant;
pub mod metrics;
pub mod proxq;
pub mod qresnet;
pub mod quant;
pub mod scenario;
pub mod strategy;

pub use ball::{BallLoss, BallMode, ClassHistogram, ClassStatistics};
pub use buffer::stack_entries;
pub use buffer::{
    BufferItem, Capacity, ClassBalancedBuffer, Entry, Filter, InsertStatus, Insertion, ItemId,
    Keep, PerTaskBuffer, RawImage, ReplayBuffer, ReservoirBuffer, TaskSummary,
};
pub use lifequant::{LifeQuant, LifeQuantConfig, LifeQuantMode, QuantizationNoise};
pub use metrics::{AccuracyMatrix, MetricsSummary};
pub use proxq::{FisherAccumulator, FisherDiagonal, PenaltyUpdate, ProxQ};
/// The distillation loss LwF uses (one for the workspace, in qcl-nn).
pub use qcl_nn::loss::distillation_loss;
pub use qresnet::{QResNet, QResNetConfig};
pub use quant::{
    round_to_bits, ActivationQuantizer, WeightQuantMode, WeightQuantizer, IDENTITY_BITS, MAX_BITS,
};
pub use scenario::{
    sample_per_class, ClassOrder, LifelongConfig, LifelongWindows, PermutedConfig, Scenario,
    ScenarioDescription, ScenarioKind, SplitConfig, Stream, StreamBatch, StreamConfig, Task,
    TaskDescription,
};
pub use strategy::{
    fisher_diagonal, ClassAccuracy, ContinualTrainer, Ewc, EwcConfig, ExperienceReplay,
    FeatureHead, FineTune, Joint, Learner, Lwf, LwfConfig, OptimizerStep, RunRecord, Strategy,
    TaskRecord, TaskSchedule, TaskView, TrainerConfig,
};
