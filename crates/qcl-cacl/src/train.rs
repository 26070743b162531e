//! Multi-head task-incremental training, evaluation and the arms of the scaled-down
//! reproduction: CACL, IND, FT, CACL-noHoyer, CACL-fixed
//! (docs/methods/cacl.md § Training a task, § Evaluating a finished task, § Experiment).

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use qcl_continual::AccuracyMatrix;
use qcl_data::{BatchConfig, BatchOrder, Dataset, Normalization};
use qcl_nn::optim::{Adam, AdamConfig, Optimizer};
use qcl_nn::schedule::{LrSchedule, MultiStepLr};
use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::net::{CaclConfig, DenseNet, IndividualNets, NetConfig, NetSvd, TaskIncrementalModel};
use crate::rank::Growth;
use crate::size::megabytes;

/// Optimisation settings of one task (docs/methods/cacl.md § Training a task, § Experiment):
/// Adam (wd 0), fresh per task, and a multi-step learning-rate decay by γ at the start of the
/// milestone epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs per task.
    pub epochs: usize,
    /// Epochs at whose start the rate is multiplied by `gamma`.
    pub milestones: Vec<usize>,
    /// Decay factor.
    pub gamma: f64,
    /// Adam learning rate.
    pub lr: f64,
    /// Mini-batch size.
    pub batch_size: usize,
}

impl Default for TrainConfig {
    /// docs/methods/cacl.md § Hyperparameters: 10 epochs, milestones [6, 9], γ 0.1, Adam 1e-3,
    /// batch 64.
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            milestones: vec![6, 9],
            gamma: 0.1,
            lr: 1e-3,
            batch_size: 64,
        }
    }
}

/// One task's data: train and test sets with labels `0..classes`, and how to normalise them.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// A name for reports (e.g. `fashion-mnist 0/1`).
    pub name: String,
    /// Training images.
    pub train: Dataset,
    /// Test images.
    pub test: Dataset,
    /// Classes of the task (labels `0..classes`).
    pub classes: usize,
    /// Pixel normalisation (per data set).
    pub normalization: Normalization,
}

/// What training one task did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTrainReport {
    /// Optimiser steps.
    pub steps: usize,
    /// Mean cross-entropy of the last epoch.
    pub last_epoch_ce: f64,
    /// Mean total loss (CE + regularisation) of the last epoch.
    pub last_epoch_loss: f64,
}

/// Trains `model` on `task` (begin, epochs of Adam, finish). The optimiser is created fresh,
/// over [`TaskIncrementalModel::trainable`] only, so frozen tensors are never touched.
///
/// # Errors
/// [`Error::InvalidParameter`] for zero epochs or batch size, a task out of order, or a
/// non-finite loss (named, with the epoch); errors of the model.
pub fn train_task<M: TaskIncrementalModel>(
    model: &mut M,
    task_id: usize,
    task: &TaskData,
    config: &TrainConfig,
    seed: Seed,
    bar: Option<&ProgressBar>,
) -> Result<TaskTrainReport> {
    if config.epochs == 0 || config.batch_size == 0 {
        return Err(Error::invalid_parameter(
            "train config",
            "epochs and batch size must be at least 1",
        ));
    }
    let device = Device::Cpu;
    model.begin_task(task_id, task.classes)?;
    let mut optimizer = Adam::new(
        model.trainable(),
        AdamConfig {
            lr: config.lr,
            ..Default::default()
        },
    )?;
    let schedule = MultiStepLr::new(config.lr, config.milestones.clone(), config.gamma)?;
    let mut dropout_rng = seed.child_named("dropout").rng();
    let mut steps = 0;
    let (mut last_ce, mut last_loss) = (f64::NAN, f64::NAN);
    for epoch in 0..config.epochs {
        optimizer.set_learning_rate(schedule.lr_at(epoch));
        let options = BatchConfig {
            batch_size: config.batch_size,
            order: BatchOrder::Shuffled(seed.child_named("batches").child(epoch as u64)),
            normalization: task.normalization,
            drop_last: false,
        };
        let (mut ce_sum, mut loss_sum, mut batches) = (0.0, 0.0, 0usize);
        for batch in task.train.batches(options, &device)? {
            let batch = batch?;
            let logits = model.train_logits(&batch.images, &mut dropout_rng)?;
            let ce = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
            let loss = match model.penalty()? {
                Some(p) => (&ce + p)?,
                None => ce.clone(),
            };
            let loss_value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if !loss_value.is_finite() {
                return Err(Error::NonFinite {
                    context: format!("loss of task {task_id}, epoch {epoch}"),
                    index: steps,
                    value: loss_value,
                });
            }
            optimizer.backward_step(&loss)?;
            ce_sum += f64::from(ce.to_scalar::<f32>()?);
            loss_sum += loss_value;
            batches += 1;
            steps += 1;
            if let Some(bar) = bar {
                bar.tick();
            }
        }
        last_ce = ce_sum / batches.max(1) as f64;
        last_loss = loss_sum / batches.max(1) as f64;
    }
    model.finish_task()?;
    Ok(TaskTrainReport {
        steps,
        last_epoch_ce: last_ce,
        last_epoch_loss: last_loss,
    })
}

/// Logits of finished task `task` over a whole data set, in evaluation mode, in batches.
///
/// # Errors
/// As [`TaskIncrementalModel::eval_logits`].
pub fn task_logits<M: TaskIncrementalModel>(
    model: &M,
    task: usize,
    data: &Dataset,
    normalization: Normalization,
) -> Result<Tensor> {
    let options = BatchConfig {
        batch_size: 500,
        order: BatchOrder::Sequential,
        normalization,
        drop_last: false,
    };
    let parts = data
        .batches(options, &Device::Cpu)?
        .map(|b| model.eval_logits(&b?.images, task))
        .collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Err(Error::EmptyInput(format!("test set of task {task}")));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Top-1 accuracy (a fraction in [0, 1]) of finished task `task` on `data`, with its own head.
///
/// # Errors
/// As [`task_logits`].
pub fn task_accuracy<M: TaskIncrementalModel>(
    model: &M,
    task: usize,
    data: &Dataset,
    normalization: Normalization,
) -> Result<f64> {
    let logits = task_logits(model, task, data, normalization)?;
    let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
    let correct = predicted
        .iter()
        .zip(data.labels())
        .filter(|(p, y)| p == y)
        .count();
    Ok(correct as f64 / data.len() as f64)
}

/// The compared methods (docs/methods/cacl.md § Experiment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arm {
    /// CACL with λ_sp = 0.1 and growth.
    Cacl,
    /// Individual dense models per task.
    Individual,
    /// One shared dense multi-head model, fine-tuned sequentially.
    FineTune,
    /// CACL with λ_sp = 0.
    CaclNoHoyer,
    /// CACL without growth (capacity fixed at r0).
    CaclFixed,
    /// CACL with the stronger sparsity weight λ_sp = 0.4 of the reference scripts.
    CaclSparse,
}

impl Arm {
    /// Every arm, in report order.
    pub const ALL: [Arm; 6] = [
        Arm::Cacl,
        Arm::Individual,
        Arm::FineTune,
        Arm::CaclNoHoyer,
        Arm::CaclFixed,
        Arm::CaclSparse,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Arm::Cacl => "CACL",
            Arm::Individual => "IND",
            Arm::FineTune => "FT",
            Arm::CaclNoHoyer => "CACL-noHoyer",
            Arm::CaclFixed => "CACL-fixed",
            Arm::CaclSparse => "CACL-λ0.4",
        }
    }

    /// CACL hyperparameters of the arm from a base (`None` for the dense arms).
    ///
    /// ```
    /// use qcl_cacl::{Arm, CaclConfig};
    /// let base = CaclConfig::default();
    /// assert_eq!(Arm::Cacl.cacl_params(base).unwrap().lambda_sparsity, base.lambda_sparsity);
    /// assert_eq!(Arm::CaclNoHoyer.cacl_params(base).unwrap().lambda_sparsity, 0.0);
    /// assert_eq!(Arm::CaclSparse.cacl_params(base).unwrap().lambda_sparsity, 0.4);
    /// assert!(Arm::Individual.cacl_params(base).is_none());
    /// let names: Vec<&str> = Arm::ALL.iter().map(|a| a.name()).collect();
    /// assert_eq!(names.len(), 6);
    /// assert!(names.contains(&"CACL-λ0.4"));
    /// ```
    pub fn cacl_params(self, base: CaclConfig) -> Option<CaclConfig> {
        match self {
            Arm::Cacl => Some(base),
            Arm::CaclNoHoyer => Some(CaclConfig {
                lambda_sparsity: 0.0,
                ..base
            }),
            Arm::CaclFixed => Some(CaclConfig {
                growth: Growth::Fixed,
                ..base
            }),
            Arm::CaclSparse => Some(CaclConfig {
                lambda_sparsity: 0.4,
                ..base
            }),
            Arm::Individual | Arm::FineTune => None,
        }
    }
}

/// The result of one arm on one task sequence with one seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmRun {
    /// The arm.
    pub arm: Arm,
    /// The seed.
    pub seed: Seed,
    /// `a[i][j]`: accuracy (fraction) on task j after training task i.
    pub accuracy: AccuracyMatrix,
    /// Mean final accuracy over the tasks (fraction).
    pub average_accuracy: f64,
    /// Mean forgetting (Chaudhry et al.), as a fraction.
    pub forgetting: f64,
    /// Size in parameters (docs/methods/cacl.md § Model size).
    pub parameters: u64,
    /// Size in MB.
    pub megabytes: f64,
    /// CACL only: `k_{t,l}` per task per layer.
    pub task_ranks: Vec<Vec<usize>>,
    /// CACL only: `chann_used[t][l]`.
    pub components_added: Vec<Vec<usize>>,
    /// CACL only: capacity `R_l` after each task.
    pub capacities: Vec<Vec<usize>>,
    /// CACL only: whether every earlier task's test logits after the last task are
    /// bit-identical to those right after its own pruning (H1 of docs/methods/cacl.md
    /// § Expected orderings).
    pub logits_bit_identical: Option<bool>,
    /// CACL only: fraction of each task's trainable slots that were pruned (all layers).
    pub pruned_fraction: Vec<f64>,
    /// Training steps per task.
    pub steps: Vec<usize>,
}

/// Trains `model` on the tasks in order, evaluating every finished task after each one.
/// With `check_logits`, the logits of each task's test set right after its training are
/// kept and compared bit for bit with those after the last task.
fn run_model<M: TaskIncrementalModel>(
    model: &mut M,
    tasks: &[TaskData],
    config: &TrainConfig,
    seed: Seed,
    check_logits: bool,
    bar: Option<&ProgressBar>,
) -> Result<(AccuracyMatrix, Option<bool>, Vec<usize>)> {
    let mut accuracy = AccuracyMatrix::new(tasks.len())?;
    let mut first_logits: Vec<Vec<u32>> = Vec::new();
    let mut steps = Vec::new();
    for (t, task) in tasks.iter().enumerate() {
        let report = train_task(model, t, task, config, seed.child(t as u64), bar)?;
        steps.push(report.steps);
        if check_logits {
            let logits = task_logits(model, t, &task.test, task.normalization)?;
            first_logits.push(qcl_tensor::f32_bits(&logits)?);
        }
        for (s, earlier) in tasks.iter().enumerate().take(t + 1) {
            let acc = task_accuracy(model, s, &earlier.test, earlier.normalization)?;
            accuracy.set(t, s, acc)?;
        }
    }
    let identical = if check_logits {
        let mut all = true;
        for (s, task) in tasks.iter().enumerate() {
            let logits = task_logits(model, s, &task.test, task.normalization)?;
            all &= qcl_tensor::f32_bits(&logits)? == first_logits[s];
        }
        Some(all)
    } else {
        None
    };
    Ok((accuracy, identical, steps))
}

/// Runs one arm on a task sequence: trains, evaluates (the full accuracy matrix), measures
/// the size and, for CACL arms, the ranks and the zero-forgetting check.
///
/// ```no_run
/// # use qcl_cacl::*;
/// # fn tasks() -> Vec<TaskData> { unimplemented!() }
/// let run = run_arm(Arm::Cacl, &tasks(), NetConfig::net_svd_s(), CaclConfig::default(),
///                   &TrainConfig::default(), 1.into(), None)?;
/// println!("{} {:.2}% {:.3} MB", run.arm.name(), 100.0 * run.average_accuracy, run.megabytes);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::EmptyInput`] for no task; errors of training.
pub fn run_arm(
    arm: Arm,
    tasks: &[TaskData],
    net: NetConfig,
    base: CaclConfig,
    config: &TrainConfig,
    seed: Seed,
    bar: Option<&ProgressBar>,
) -> Result<ArmRun> {
    if tasks.is_empty() {
        return Err(Error::EmptyInput("task sequence".into()));
    }
    let device = Device::Cpu;
    let root = seed;
    let finish = |accuracy: AccuracyMatrix, parameters: u64, steps: Vec<usize>| -> Result<ArmRun> {
        Ok(ArmRun {
            arm,
            seed,
            average_accuracy: accuracy.average_accuracy()?,
            forgetting: if tasks.len() > 1 {
                accuracy.forgetting()?
            } else {
                0.0
            },
            accuracy,
            parameters,
            megabytes: megabytes(parameters),
            task_ranks: Vec::new(),
            components_added: Vec::new(),
            capacities: Vec::new(),
            logits_bit_identical: None,
            pruned_fraction: Vec::new(),
            steps,
        })
    };
    match arm.cacl_params(base) {
        Some(params) => {
            let mut model = NetSvd::new(net, params, root.child_named("model"), &device)?;
            let (accuracy, identical, steps) = run_model(
                &mut model,
                tasks,
                config,
                root.child_named("train"),
                true,
                bar,
            )?;
            let mut run = finish(accuracy, model.size_parameters(), steps)?;
            run.task_ranks = model.task_ranks();
            run.components_added = model.components_added();
            let mut capacity_before: Vec<usize> = net
                .convs()
                .iter()
                .map(|&(c_in, c_out, k)| crate::rank::initial_rank(c_out, c_in * k * k))
                .collect::<Result<_>>()?;
            for updates in model.rank_updates() {
                let slots: usize = updates
                    .iter()
                    .zip(&capacity_before)
                    .map(|(u, cap)| cap - (u.used - u.added))
                    .sum();
                let added: usize = updates.iter().map(|u| u.added).sum();
                run.pruned_fraction
                    .push(1.0 - added as f64 / slots.max(1) as f64);
                capacity_before = updates.iter().map(|u| u.capacity).collect();
                run.capacities.push(capacity_before.clone());
            }
            run.logits_bit_identical = identical;
            Ok(run)
        }
        None => {
            let model_seed = root.child_named("model");
            let train_seed = root.child_named("train");
            let (accuracy, parameters, steps) = if arm == Arm::Individual {
                let model = IndividualNets::new(net, model_seed, &device)?;
                run_dense_model(model, tasks, config, train_seed, bar)?
            } else {
                let model = DenseNet::new(net, model_seed, &device)?;
                run_dense_model(model, tasks, config, train_seed, bar)?
            };
            finish(accuracy, parameters, steps)
        }
    }
}

/// [`run_model`] for a dense arm's model (no ranks, no zero-forgetting check): the accuracy
/// matrix, the model's size in parameters and the steps per task.
fn run_dense_model<M: TaskIncrementalModel>(
    mut model: M,
    tasks: &[TaskData],
    config: &TrainConfig,
    seed: Seed,
    bar: Option<&ProgressBar>,
) -> Result<(AccuracyMatrix, u64, Vec<usize>)> {
    let (accuracy, _, steps) = run_model(&mut model, tasks, config, seed, false, bar)?;
    Ok((accuracy, model.size_parameters(), steps))
}
