//! # qcl-cacl
//!
//! Compression-aware continual learning with SVD-factored layers (CACL; Pavan Teja & Panda,
//! arXiv 2009.01956), documented in docs/methods/cacl.md.
//!
//! - [`SvdFactors`], [`SvdConv2d`], [`SvdLinear`]: weights `W = N·diag(|s|)·C` with per-task
//!   component ranges — earlier tasks' components frozen as plain tensors, task `s`
//!   evaluated with exactly its first `k_s` components; initialisation from a dense weight
//!   by SVD (faer).
//! - [`hoyer`], [`orthogonality`]: the regularizers of the objective (docs/methods/cacl.md
//!   § Objective).
//! - [`energy_prune`], [`growth_target`], [`free_slots`], [`initial_rank`]: the per-task
//!   rank update (docs/methods/cacl.md § Pruning by energy, § Growth).
//! - [`parameter_count`], [`model_size_mb`]: model size exactly as the reference counts it.
//! - [`NetSvd`] (Net_SVD / Net_SVD-S), [`DenseNet`] (its dense twin), [`IndividualNets`],
//!   the [`TaskIncrementalModel`] interface, [`train_task`] and [`run_arm`] (the arms CACL,
//!   IND, FT, CACL-noHoyer, CACL-fixed).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // A dense 6×4 weight, factored exactly and pruned to its energy.
//! let w = Tensor::new(&[[1f32, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0; 4], [0.0; 4],
//!                       [0.0; 4], [0.0; 4]], &Device::Cpu)?;
//! let mut f = qcl_cacl::SvdFactors::from_dense(&w, 4, qcl_tensor::Seed::new(0))?;
//! let update = f.finish_task(1e-3, qcl_cacl::Growth::Fixed)?;
//! assert_eq!(update.added, 2); // the two zero singular values are pruned
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

mod factors;
mod net;
mod rank;
mod regularizers;
mod size;
mod train;

pub use factors::{ForTask, SvdConv2d, SvdFactors, SvdLinear, TaskRankUpdate};
pub use net::{
    CaclConfig, DenseNet, IndividualNets, NetConfig, NetSvd, TaskIncrementalModel,
    CHECKPOINT_FORMAT,
};
pub use rank::{check_threshold, energy_prune, free_slots, growth_target, initial_rank, Growth};
pub use regularizers::{abs_with_sign_gradient, hoyer, orthogonality};
pub use size::{
    dense_conv_parameters, megabytes, model_size_mb, parameter_count, FactoredLayerSize, SizeInputs,
};
pub use train::{
    run_arm, task_accuracy, task_logits, train_task, Arm, ArmRun, TaskData, TaskTrainReport,
    TrainConfig,
};
