//! Continual-learning strategies: a small trait and the usual baselines, with one trainer that
//! runs any of them over a [`Scenario`]'s tasks.
//!
//! (Over 600 lines: the `Strategy` trait and what its hooks see, the five baselines that
//! implement it and the `ContinualTrainer` that calls those hooks are one contract; the baselines
//! are short, and the trainer with its replay memory and evaluation is about 400 lines.)
//!
//! A [`Strategy`] decides three things per task: what data to train on
//! ([`Strategy::training_set`]), what to prepare before the first step
//! ([`Strategy::begin_task`], e.g. a Fisher estimate or a teacher's outputs) and the loss of
//! one mini-batch ([`Strategy::batch_loss`]). The [`ContinualTrainer`] owns everything else:
//! the replay memory (LifeQuant's random δ of each finished task, a [`PerTaskBuffer`]), a
//! fresh SGD optimizer with a multi-step schedule per task (PyTorch semantics), seeded batch
//! order, and the evaluation that fills the [`AccuracyMatrix`].
//!
//! | strategy | trains task t on | loss |
//! |---|---|---|
//! | [`FineTune`] | `D_t` | CE |
//! | [`ExperienceReplay`] | `D_t ∪ R_{<t}` | CE |
//! | [`Joint`] | `D_0 ∪ … ∪ D_t` (distinct images) | CE — the i.i.d. upper bound |
//! | [`Ewc`] | `D_t` | CE + `Σ_{s<t} λ·Σ F_s ⊙ (θ − θ*_s)²`, `F_s` from `D_s` at the end of task s |
//! | [`Lwf`] | `D_t` | CE + `α·T²·KL(softmax(z_old/T) ‖ softmax(z/T))` on the old classes |
//! | [`crate::LifeQuant`] | `D_t` or `D_t ∪ R_{<t}` | CE or BaLL, + ProxQ |
//!
//! ```
//! use candle_core::Device;
//! use qcl_continual::{ContinualTrainer, FineTune, Learner, QResNet, QResNetConfig, Scenario,
//!                     SplitConfig, TaskSchedule, TrainerConfig};
//! use qcl_data::{Normalization, SplitDataset};
//! use qcl_nn::ParamStore;
//! # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
//! let data = SplitDataset::load(path)?;
//! let data = SplitDataset::new(data.train.take_per_class(4), data.test.take_per_class(2))?;
//! let scenario = Scenario::class_incremental(&data, &SplitConfig::default())?;
//! let store = ParamStore::new(7);
//! let config = QResNetConfig { widths: [4, 4, 4], ..QResNetConfig::smoke() };
//! let model = QResNet::new(&store.root(&Device::Cpu), &config)?;
//! let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
//! let trainer = ContinualTrainer::new(TrainerConfig::default())?;
//! let schedule = TaskSchedule { epochs: 1, lr: 0.01, milestones: vec![] };
//! let run = trainer.run(&learner, &mut FineTune, scenario.tasks(), &schedule)?;
//! assert_eq!(run.accuracy.num_tasks(), 5);
//! assert!(run.accuracy.get(4, 0).is_some());
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use indicatif::{ProgressBar, ProgressStyle};
use qcl_data::{Batch, BatchConfig, BatchOrder, Dataset, Normalization};
use qcl_nn::layers::ModuleT;
use qcl_nn::loss::distillation_loss;
use qcl_nn::optim::{Optimizer, Sgd, SgdConfig};
use qcl_nn::schedule::{LrSchedule, MultiStepLr};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Result, Seed};

use crate::ball::cross_entropy;
use crate::buffer::{Capacity, Keep, PerTaskBuffer, RawImage, ReplayBuffer};
use crate::metrics::AccuracyMatrix;
use crate::proxq::{FisherAccumulator, FisherDiagonal, PenaltyUpdate, ProxQ};
use crate::scenario::Task;

/// A classifier split into its penultimate features and its head, `forward = head ∘ features`
/// (what LifeQuant's optional quantization-noise Fisher term perturbs).
pub trait FeatureHead {
    /// The features before the head, `[n, f]`; `train` selects batch statistics.
    ///
    /// # Errors
    /// Model-specific (shapes, non-finite weights).
    fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The head on `features` (`[n, f]` → logits `[n, classes]`).
    ///
    /// # Errors
    /// Model-specific.
    fn head(&self, features: &Tensor) -> Result<Tensor>;
}

/// The network being trained, its parameters and how images become tensors.
#[derive(Clone, Copy)]
pub struct Learner<'a> {
    /// The model; `forward_t(x, true)` trains (batch statistics), `false` evaluates.
    pub model: &'a dyn ModuleT,
    /// Its parameters: the trainable ones are optimised, buffers (BatchNorm statistics) are
    /// carried along.
    pub store: &'a ParamStore,
    /// Where batches are placed.
    pub device: &'a Device,
    /// Pixel normalisation of every batch.
    pub normalization: Normalization,
    /// The same model as features and head, when it offers the split
    /// ([`Learner::with_feature_head`]).
    pub feature_head: Option<&'a dyn FeatureHead>,
}

impl std::fmt::Debug for Learner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("parameters", &self.store.len())
            .field("device", self.device)
            .field("normalization", &self.normalization)
            .finish()
    }
}

impl<'a> Learner<'a> {
    /// A learner over `model`, whose parameters live in `store`.
    pub fn new(
        model: &'a dyn ModuleT,
        store: &'a ParamStore,
        device: &'a Device,
        normalization: Normalization,
    ) -> Self {
        Learner {
            model,
            store,
            device,
            normalization,
            feature_head: None,
        }
    }

    /// This learner with `split`, the same model as features and head.
    ///
    /// ```
    /// use candle_core::Device;
    /// use qcl_continual::{Learner, QResNet, QResNetConfig};
    /// use qcl_data::Normalization;
    /// use qcl_nn::ParamStore;
    /// let store = ParamStore::new(0);
    /// let model = QResNet::new(&store.root(&Device::Cpu), &QResNetConfig::smoke())?;
    /// let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval)
    ///     .with_feature_head(&model);
    /// assert!(learner.feature_head.is_some());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn with_feature_head(self, split: &'a dyn FeatureHead) -> Self {
        Learner {
            feature_head: Some(split),
            ..self
        }
    }

    /// The trainable parameters, by name.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.store.trainable()
    }

    /// Evaluation-mode logits of every image of `data`, `[n, C]`, in `batch_size` chunks.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty data set; errors of the model.
    pub fn logits(&self, data: &Dataset, batch_size: usize) -> Result<Tensor> {
        if data.is_empty() {
            return Err(Error::EmptyInput(format!("logits of {}", data.name())));
        }
        let options = self.batch_options(batch_size, BatchOrder::Sequential);
        let parts = data
            .batches(options, self.device)?
            .map(|b| Ok(self.model.forward_t(&b?.images, false)?.detach()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Per-class top-1 counts of the model (evaluation mode) on `data`.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty data set; errors of the model.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<ClassAccuracy> {
        let logits = self.logits(data, batch_size)?;
        let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let classes = logits.dim(1)?.max(data.num_classes());
        let mut counts = ClassAccuracy::new(classes);
        for (&p, &y) in predicted.iter().zip(data.labels()) {
            counts.total[y as usize] += 1;
            if p == y {
                counts.correct[y as usize] += 1;
            }
        }
        Ok(counts)
    }

    pub(crate) fn batch_options(&self, batch_size: usize, order: BatchOrder) -> BatchConfig {
        BatchConfig {
            batch_size,
            order,
            normalization: self.normalization,
            drop_last: false,
        }
    }
}

/// Correct and total test images per class.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassAccuracy {
    /// Correctly classified images of class `c`.
    pub correct: Vec<u64>,
    /// Images of class `c`.
    pub total: Vec<u64>,
}

impl ClassAccuracy {
    /// Zero counts for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        ClassAccuracy {
            correct: vec![0; num_classes],
            total: vec![0; num_classes],
        }
    }

    /// Accuracy over all images, `None` if there are none.
    pub fn overall(&self) -> Option<f64> {
        self.over((0..self.total.len() as u32).collect::<Vec<_>>().as_slice())
    }

    /// Accuracy over the images of `classes` (recall of that class set), `None` if there are
    /// none. Classes beyond the counted range are ignored.
    pub fn over(&self, classes: &[u32]) -> Option<f64> {
        let (mut correct, mut total) = (0u64, 0u64);
        for &c in classes {
            if let (Some(k), Some(n)) = (self.correct.get(c as usize), self.total.get(c as usize)) {
                correct += k;
                total += n;
            }
        }
        (total > 0).then(|| correct as f64 / total as f64)
    }

    /// Adds the counts of `other` (both must count the same classes).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a different number of classes.
    pub fn merge(&mut self, other: &ClassAccuracy) -> Result<()> {
        if other.total.len() != self.total.len() {
            return Err(Error::ShapeMismatch {
                context: "merging class accuracies".into(),
                expected: format!("[{}]", self.total.len()),
                actual: vec![other.total.len()],
            });
        }
        for c in 0..self.total.len() {
            self.correct[c] += other.correct[c];
            self.total[c] += other.total[c];
        }
        Ok(())
    }
}

/// What a strategy sees of the run at a task boundary.
#[derive(Debug, Clone, Copy)]
pub struct TaskView<'a> {
    /// The task about to be trained (or just trained, in [`Strategy::end_task`]).
    pub task: &'a Task,
    /// The tasks before it, in order.
    pub earlier: &'a [Task],
    /// The replay memory `R_{<t}` as one data set (`None` when it is empty, e.g. at t = 0).
    pub replay: Option<&'a Dataset>,
}

impl TaskView<'_> {
    /// The classes of the earlier tasks, sorted, without repeats.
    pub fn earlier_classes(&self) -> Vec<u32> {
        let mut classes: Vec<u32> = self
            .earlier
            .iter()
            .flat_map(|t| t.classes.iter().copied())
            .collect();
        classes.sort_unstable();
        classes.dedup();
        classes
    }
}

/// A continual-learning strategy: data, preparation and loss per task.
///
/// Only [`batch_loss`](Strategy::batch_loss) is required; the defaults train on the task's
/// own data and prepare nothing.
pub trait Strategy {
    /// A short name for reports.
    fn name(&self) -> String;

    /// The images task `view.task` is trained on. Default: the task's training set `D_t`.
    ///
    /// # Errors
    /// Implementation-specific (e.g. incompatible data sets).
    fn training_set(&mut self, view: &TaskView<'_>) -> Result<Dataset> {
        Ok(view.task.train.clone())
    }

    /// Called once before the first step of a task, with the data it will be trained on
    /// (batch indices refer to positions in `train`).
    ///
    /// # Errors
    /// Implementation-specific.
    fn begin_task(
        &mut self,
        _learner: &Learner<'_>,
        _view: &TaskView<'_>,
        _train: &Dataset,
    ) -> Result<()> {
        Ok(())
    }

    /// The loss of one training batch, from the model's training-mode `logits`.
    ///
    /// # Errors
    /// Implementation-specific.
    fn batch_loss(&self, learner: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor>;

    /// Called after every optimizer step, with that step's settings (e.g. to apply a penalty
    /// by its proximal operator). Default: nothing.
    ///
    /// # Errors
    /// Implementation-specific.
    fn after_step(&mut self, _learner: &Learner<'_>, _step: &OptimizerStep) -> Result<()> {
        Ok(())
    }

    /// Called once after the last step of a task.
    ///
    /// # Errors
    /// Implementation-specific.
    fn end_task(&mut self, _learner: &Learner<'_>, _view: &TaskView<'_>) -> Result<()> {
        Ok(())
    }
}

/// The settings of the SGD step just taken, as [`Strategy::after_step`] sees them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerStep {
    /// Learning rate `η` of the step.
    pub lr: f64,
    /// Momentum `μ` of the optimizer.
    pub momentum: f64,
}

impl OptimizerStep {
    /// The step size a constant gradient sees once momentum has built up, `η / (1 − μ)`.
    pub fn effective_lr(&self) -> f64 {
        self.lr / (1.0 - self.momentum)
    }
}

/// Plain fine-tuning: each task is trained on its own data with cross-entropy (the lower
/// bound; it forgets).
#[derive(Debug, Clone, Copy, Default)]
pub struct FineTune;

impl Strategy for FineTune {
    fn name(&self) -> String {
        "fine-tune".into()
    }

    fn batch_loss(&self, _: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        cross_entropy(logits, &batch.labels)
    }
}

/// Experience replay: each task is trained on its data joined with the replay memory
/// `R_{<t}` held by the trainer, with cross-entropy.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExperienceReplay;

impl Strategy for ExperienceReplay {
    fn name(&self) -> String {
        "replay".into()
    }

    fn training_set(&mut self, view: &TaskView<'_>) -> Result<Dataset> {
        with_replay(view)
    }

    fn batch_loss(&self, _: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        cross_entropy(logits, &batch.labels)
    }
}

/// `D_t ∪ R_{<t}`: the task's data followed by the replay memory.
pub(crate) fn with_replay(view: &TaskView<'_>) -> Result<Dataset> {
    match view.replay {
        Some(replay) => view.task.train.concat(&[replay]),
        None => Ok(view.task.train.clone()),
    }
}

/// Joint training, the i.i.d. upper bound: task t is trained on the distinct images of all
/// tasks so far (an image shared by two tasks, as in a sliding class window, counts once).
#[derive(Debug, Clone, Default)]
pub struct Joint;

impl Strategy for Joint {
    fn name(&self) -> String {
        "joint".into()
    }

    fn training_set(&mut self, view: &TaskView<'_>) -> Result<Dataset> {
        let mut seen: HashSet<(u32, &[u8])> = HashSet::new();
        let mut parts = Vec::new();
        for task in view.earlier.iter().chain(std::iter::once(view.task)) {
            let data = &task.train;
            let fresh: Vec<usize> = (0..data.len())
                .filter(|&i| seen.insert((data.labels()[i], data.image(i))))
                .collect();
            parts.push(data.subset(&fresh)?);
        }
        let (first, rest) = parts.split_first().expect("at least the current task");
        first.concat(&rest.iter().collect::<Vec<_>>())
    }

    fn batch_loss(&self, _: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        cross_entropy(logits, &batch.labels)
    }
}

/// Parameters of [`Ewc`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EwcConfig {
    /// Weight λ of each task's penalty (default 100, ProxQ's λ: both use the batch-mean
    /// Fisher of [`FisherAccumulator`]).
    pub lambda: f64,
    /// Batch size of the Fisher pass over a finished task's data (default 128).
    pub fisher_batch_size: usize,
    /// How the penalties enter training (default [`PenaltyUpdate::Gradient`]; with
    /// [`PenaltyUpdate::Proximal`] each task's penalty is applied by its proximal step in turn).
    pub update: PenaltyUpdate,
}

impl Default for EwcConfig {
    fn default() -> Self {
        EwcConfig {
            lambda: ProxQ::DEFAULT_LAMBDA,
            fisher_batch_size: 128,
            update: PenaltyUpdate::Gradient,
        }
    }
}

/// Elastic weight consolidation (Kirkpatrick et al. 2017) on the Fisher machinery shared with
/// ProxQ: at the end of task s, `F_s` is the batch-mean squared gradient of the cross-entropy
/// over `D_s` (evaluation mode) and `θ*_s` a snapshot of the parameters; task t adds
/// `Σ_{s<t} λ·Σ F_s ⊙ (θ − θ*_s)²` to the cross-entropy.
#[derive(Debug, Clone, Default)]
pub struct Ewc {
    params: EwcConfig,
    penalties: Vec<ProxQ>,
}

impl Ewc {
    /// EWC with `config`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite λ or a zero batch size.
    pub fn new(config: EwcConfig) -> Result<Self> {
        check_penalty(config.lambda, config.fisher_batch_size)?;
        Ok(Ewc {
            params: config,
            penalties: Vec::new(),
        })
    }

    /// The penalties of the finished tasks, in task order.
    pub fn penalties(&self) -> &[ProxQ] {
        &self.penalties
    }
}

impl Strategy for Ewc {
    fn name(&self) -> String {
        format!("ewc(λ={})", self.params.lambda)
    }

    fn batch_loss(&self, learner: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        let mut loss = cross_entropy(logits, &batch.labels)?;
        if self.params.update == PenaltyUpdate::Gradient && self.params.lambda > 0.0 {
            let params = learner.params();
            for penalty in &self.penalties {
                loss = (loss + penalty.penalty(&params)?)?;
            }
        }
        Ok(loss)
    }

    fn after_step(&mut self, learner: &Learner<'_>, step: &OptimizerStep) -> Result<()> {
        if self.params.update == PenaltyUpdate::Proximal && self.params.lambda > 0.0 {
            let params = learner.params();
            for penalty in &self.penalties {
                penalty.proximal_step(&params, step.effective_lr())?;
            }
        }
        Ok(())
    }

    fn end_task(&mut self, learner: &Learner<'_>, view: &TaskView<'_>) -> Result<()> {
        let fisher = fisher_diagonal(learner, &view.task.train, self.params.fisher_batch_size, {
            &|logits: &Tensor, labels: &Tensor| cross_entropy(logits, labels)
        })?;
        let anchor = ProxQ::snapshot(&learner.params())?;
        self.penalties
            .push(ProxQ::new(anchor, fisher, self.params.lambda)?);
        Ok(())
    }
}

/// Checks the knobs every Fisher-weighted penalty has: λ finite and ≥ 0, a Fisher batch of at
/// least one image.
pub(crate) fn check_penalty(lambda: f64, fisher_batch_size: usize) -> Result<()> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(Error::invalid_parameter(
            "lambda",
            format!("must be finite and >= 0, got {lambda}"),
        ));
    }
    if fisher_batch_size == 0 {
        return Err(Error::invalid_parameter(
            "fisher_batch_size",
            "must be at least 1",
        ));
    }
    Ok(())
}

/// The batch-level empirical Fisher diagonal of `loss` over `data` in evaluation mode:
/// `F = (1/B)·Σ_b (∇θ L_b)²` over the `B` batches (docs/methods/lifequant.md § ProxQ).
///
/// # Errors
/// [`Error::EmptyInput`] for empty data; errors of the model or the loss.
pub fn fisher_diagonal(
    learner: &Learner<'_>,
    data: &Dataset,
    batch_size: usize,
    loss: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<FisherDiagonal> {
    fisher_diagonal_of(learner, data, batch_size, &mut |batch| {
        loss(
            &learner.model.forward_t(&batch.images, false)?,
            &batch.labels,
        )
    })
}

/// The Fisher pass behind [`fisher_diagonal`], with the whole loss of a batch (model call
/// included) given by `batch_loss`, in sequential batches of `batch_size`.
pub(crate) fn fisher_diagonal_of(
    learner: &Learner<'_>,
    data: &Dataset,
    batch_size: usize,
    batch_loss: &mut dyn FnMut(&Batch) -> Result<Tensor>,
) -> Result<FisherDiagonal> {
    if data.is_empty() {
        return Err(Error::EmptyInput(format!(
            "Fisher estimate over {}",
            data.name()
        )));
    }
    let params = learner.params();
    let mut accumulator = FisherAccumulator::new();
    let options = learner.batch_options(batch_size, BatchOrder::Sequential);
    for batch in data.batches(options, learner.device)? {
        accumulator.accumulate(&params, &batch_loss(&batch?)?.backward()?)?;
    }
    accumulator.finish()
}

/// Parameters of [`Lwf`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LwfConfig {
    /// Weight α of the distillation term (default 1).
    pub alpha: f64,
    /// Softmax temperature T (default 2, as in Li & Hoiem 2017).
    pub temperature: f64,
    /// Batch size of the teacher pass (default 256).
    pub teacher_batch_size: usize,
}

impl Default for LwfConfig {
    fn default() -> Self {
        LwfConfig {
            alpha: 1.0,
            temperature: 2.0,
            teacher_batch_size: 256,
        }
    }
}

/// Learning without forgetting (Li & Hoiem 2017), single-head form: before task t the model's
/// evaluation-mode logits on the training images are recorded; each step adds
/// `α·T²·KL(softmax(z_old/T) ‖ softmax(z/T))` over the logits of the earlier tasks' classes.
#[derive(Debug, Clone, Default)]
pub struct Lwf {
    params: LwfConfig,
    teacher: Option<(Tensor, Tensor)>,
}

impl Lwf {
    /// LwF with `config`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative α, a temperature that is not positive, or a
    /// zero batch size.
    pub fn new(config: LwfConfig) -> Result<Self> {
        if !(config.alpha.is_finite() && config.alpha >= 0.0) {
            return Err(Error::invalid_parameter("alpha", "must be finite and >= 0"));
        }
        if !(config.temperature.is_finite() && config.temperature > 0.0) {
            return Err(Error::invalid_parameter(
                "temperature",
                "must be finite and > 0",
            ));
        }
        if config.teacher_batch_size == 0 {
            return Err(Error::invalid_parameter(
                "teacher_batch_size",
                "must be at least 1",
            ));
        }
        Ok(Lwf {
            params: config,
            teacher: None,
        })
    }
}

/// `log softmax` along the last dimension, max-shifted.
pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

impl Strategy for Lwf {
    fn name(&self) -> String {
        format!(
            "lwf(α={}, T={})",
            self.params.alpha, self.params.temperature
        )
    }

    fn begin_task(
        &mut self,
        learner: &Learner<'_>,
        view: &TaskView<'_>,
        train: &Dataset,
    ) -> Result<()> {
        let old = view.earlier_classes();
        self.teacher = if old.is_empty() {
            None
        } else {
            let logits = learner.logits(train, self.params.teacher_batch_size)?;
            let columns = Tensor::new(old.as_slice(), learner.device)?;
            Some((logits.index_select(&columns, 1)?, columns))
        };
        Ok(())
    }

    fn batch_loss(&self, _: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        let ce = cross_entropy(logits, &batch.labels)?;
        let Some((teacher, columns)) = &self.teacher else {
            return Ok(ce);
        };
        let rows: Vec<u32> = batch.indices.iter().map(|&i| i as u32).collect();
        let rows = Tensor::new(rows.as_slice(), logits.device())?;
        let target = teacher.index_select(&rows, 0)?;
        let student = logits.index_select(columns, 1)?;
        let kd = distillation_loss(&student, &target, self.params.temperature)?;
        Ok((ce + (kd * self.params.alpha)?)?)
    }

    fn end_task(&mut self, _: &Learner<'_>, _: &TaskView<'_>) -> Result<()> {
        self.teacher = None;
        Ok(())
    }
}

/// Epochs and learning rates of one task: SGD at `lr`, multiplied by 0.1 at each milestone
/// epoch (PyTorch's `MultiStepLR` stepped at epoch start: `lr(e) = lr·0.1^{|{m ≤ e}|}`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSchedule {
    /// Passes over the training set.
    pub epochs: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Epochs at which the rate drops tenfold.
    pub milestones: Vec<usize>,
}

impl TaskSchedule {
    /// The learning rate of epoch `e`.
    ///
    /// ```
    /// use qcl_continual::TaskSchedule;
    /// let s = TaskSchedule { epochs: 5, lr: 0.01, milestones: vec![2, 4] };
    /// let rates: Vec<f64> = (0..5).map(|e| s.lr_at(e).unwrap()).collect();
    /// for (got, want) in rates.iter().zip([0.01, 0.01, 0.001, 0.001, 0.0001]) {
    ///     assert!((got - want).abs() < 1e-15);
    /// }
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite rate.
    pub fn lr_at(&self, epoch: usize) -> Result<f64> {
        Ok(MultiStepLr::new(self.lr, self.milestones.clone(), 0.1)?.lr_at(epoch))
    }
}

/// Settings of [`ContinualTrainer`], each with a default (docs/methods/lifequant.md § Training
/// and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerConfig {
    /// Momentum (default 0.9).
    pub momentum: f64,
    /// L2 weight decay on every parameter (default 1e-4).
    pub weight_decay: f64,
    /// Training batch size (default 128).
    pub batch_size: usize,
    /// Evaluation batch size (default 256; evaluation-mode results do not depend on it).
    pub eval_batch_size: usize,
    /// Fraction δ of each finished task kept for replay (default 0.2).
    pub replay_keep: Keep,
    /// Seed of the replay selection (default 123, the reference code's).
    pub replay_seed: Seed,
    /// Seed of the batch order: task t, epoch e use `order_seed.child(t).child(e)`.
    pub order_seed: Seed,
    /// Show a progress bar.
    pub show_progress: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            momentum: 0.9,
            weight_decay: 1e-4,
            batch_size: 128,
            eval_batch_size: 256,
            replay_keep: Keep::Fraction(0.2),
            replay_seed: Seed::new(123),
            order_seed: Seed::new(0),
            show_progress: false,
        }
    }
}

/// What one task's training did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskRecord {
    /// The task.
    pub task: usize,
    /// Images per epoch.
    pub train_images: usize,
    /// Mean training loss per epoch.
    pub epoch_loss: Vec<f64>,
    /// Wall time of the training (not the evaluation), seconds.
    pub seconds: f64,
}

/// The result of [`ContinualTrainer::run`].
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// `a[i][j]`: accuracy on task j's test set after training task i.
    pub accuracy: AccuracyMatrix,
    /// Per-class counts after each task, over the test sets of the tasks seen so far (a class
    /// shared by several tasks is counted once).
    pub class_accuracy: Vec<ClassAccuracy>,
    /// One record per trained task.
    pub tasks: Vec<TaskRecord>,
    /// `v[i][j]`: accuracy on task j's validation images after training task i, when every
    /// task holds validation images ([`Task::validation`]); `None` otherwise.
    pub validation: Option<AccuracyMatrix>,
}

/// Runs a [`Strategy`] over a sequence of tasks (see the module docs).
#[derive(Debug, Clone)]
pub struct ContinualTrainer {
    config: TrainerConfig,
}

impl ContinualTrainer {
    /// A trainer with `config`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero batch size or bad SGD hyperparameters.
    pub fn new(config: TrainerConfig) -> Result<Self> {
        if config.batch_size == 0 || config.eval_batch_size == 0 {
            return Err(Error::invalid_parameter(
                "batch_size",
                "batch sizes must be at least 1",
            ));
        }
        SgdConfig {
            lr: 0.0,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            ..SgdConfig::default()
        }
        .validate()?;
        PerTaskBuffer::<RawImage>::new(
            Capacity::unbounded(),
            config.replay_keep,
            config.replay_seed,
        )?;
        Ok(ContinualTrainer { config })
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Trains `strategy` on every task of `tasks` in order, with `schedule` for each.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no task or an empty training set; errors of the strategy and
    /// the model.
    pub fn run(
        &self,
        learner: &Learner<'_>,
        strategy: &mut dyn Strategy,
        tasks: &[Task],
        schedule: &TaskSchedule,
    ) -> Result<RunRecord> {
        self.run_from(learner, strategy, tasks, 0, schedule)
    }

    /// As [`run`](Self::run), but the tasks before `start` count as already learned (the model
    /// comes from a checkpoint taken after them): they enter the replay memory and row
    /// `start − 1` of the accuracy matrix is measured before training, and training starts at
    /// task `start`.
    ///
    /// # Errors
    /// As [`run`](Self::run); [`Error::InvalidParameter`] if `start ≥ tasks.len()`.
    pub fn run_from(
        &self,
        learner: &Learner<'_>,
        strategy: &mut dyn Strategy,
        tasks: &[Task],
        start: usize,
        schedule: &TaskSchedule,
    ) -> Result<RunRecord> {
        if tasks.is_empty() {
            return Err(Error::EmptyInput("a continual run needs tasks".into()));
        }
        if start >= tasks.len() {
            return Err(Error::invalid_parameter(
                "start",
                format!("task {start} does not exist ({} tasks)", tasks.len()),
            ));
        }
        let mut memory = PerTaskBuffer::<RawImage>::new(
            Capacity::unbounded(),
            self.config.replay_keep,
            self.config.replay_seed,
        )?;
        let mut accuracy = AccuracyMatrix::new(tasks.len())?;
        let mut class_accuracy = Vec::new();
        for task in &tasks[..start] {
            remember(&mut memory, task)?;
        }
        let mut validation = tasks
            .iter()
            .all(|t| t.validation.is_some())
            .then(|| AccuracyMatrix::new(tasks.len()))
            .transpose()?;
        if start > 0 {
            class_accuracy.push(self.evaluate_row(learner, tasks, start - 1, &mut accuracy)?);
            self.validation_row(learner, tasks, start - 1, validation.as_mut())?;
        }
        let mut records = Vec::new();
        for t in start..tasks.len() {
            let replay = replay_dataset(&memory, &tasks[t].train, t)?;
            let view = TaskView {
                task: &tasks[t],
                earlier: &tasks[..t],
                replay: replay.as_ref(),
            };
            records.push(self.train_task(learner, strategy, &view, schedule)?);
            class_accuracy.push(self.evaluate_row(learner, tasks, t, &mut accuracy)?);
            self.validation_row(learner, tasks, t, validation.as_mut())?;
            remember(&mut memory, &tasks[t])?;
        }
        Ok(RunRecord {
            accuracy,
            class_accuracy,
            tasks: records,
            validation,
        })
    }

    /// Trains one task: [`Strategy::training_set`], [`Strategy::begin_task`], `schedule.epochs`
    /// epochs of SGD (a fresh optimizer: momentum buffers do not cross tasks) on seeded
    /// shuffled batches, then [`Strategy::end_task`].
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty training set; errors of the strategy and the model.
    pub fn train_task(
        &self,
        learner: &Learner<'_>,
        strategy: &mut dyn Strategy,
        view: &TaskView<'_>,
        schedule: &TaskSchedule,
    ) -> Result<TaskRecord> {
        let t = view.task.id;
        let train = strategy.training_set(view)?;
        if train.is_empty() {
            return Err(Error::EmptyInput(format!("training set of task {t}")));
        }
        schedule.lr_at(0)?;
        strategy.begin_task(learner, view, &train)?;
        let started = Instant::now();
        let mut optimizer = Sgd::new(
            learner.params(),
            SgdConfig {
                lr: schedule.lr,
                momentum: self.config.momentum,
                weight_decay: self.config.weight_decay,
                ..SgdConfig::default()
            },
        )?;
        let batches_per_epoch = train.len().div_ceil(self.config.batch_size);
        let bar = self.progress(
            (schedule.epochs * batches_per_epoch) as u64,
            &strategy.name(),
            t,
        );
        let mut epoch_loss = Vec::with_capacity(schedule.epochs);
        for epoch in 0..schedule.epochs {
            let step = OptimizerStep {
                lr: schedule.lr_at(epoch)?,
                momentum: self.config.momentum,
            };
            optimizer.set_learning_rate(step.lr);
            let order =
                BatchOrder::Shuffled(self.config.order_seed.child(t as u64).child(epoch as u64));
            let options = learner.batch_options(self.config.batch_size, order);
            let (mut sum, mut count) = (0.0, 0usize);
            for batch in train.batches(options, learner.device)? {
                let batch = batch?;
                let logits = learner.model.forward_t(&batch.images, true)?;
                let loss = strategy.batch_loss(learner, &batch, &logits)?;
                let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                if !value.is_finite() {
                    return Err(Error::NonFinite {
                        context: format!("training loss of task {t}, epoch {epoch}"),
                        index: 0,
                        value,
                    });
                }
                optimizer.backward_step(&loss)?;
                strategy.after_step(learner, &step)?;
                sum += value * batch.indices.len() as f64;
                count += batch.indices.len();
                bar.inc(1);
            }
            epoch_loss.push(sum / count as f64);
            bar.set_message(format!(
                "task {t} epoch {epoch} loss {:.4}",
                sum / count as f64
            ));
        }
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        strategy.end_task(learner, view)?;
        Ok(TaskRecord {
            task: t,
            train_images: train.len(),
            epoch_loss,
            seconds,
        })
    }

    /// Row `after` of the validation matrix, when there is one.
    fn validation_row(
        &self,
        learner: &Learner<'_>,
        tasks: &[Task],
        after: usize,
        matrix: Option<&mut AccuracyMatrix>,
    ) -> Result<()> {
        let Some(matrix) = matrix else {
            return Ok(());
        };
        for (s, task) in tasks[..=after].iter().enumerate() {
            let Some(held_out) = &task.validation else {
                continue;
            };
            let overall = learner
                .evaluate(held_out, self.config.eval_batch_size)?
                .overall()
                .ok_or_else(|| Error::EmptyInput(format!("validation set of task {s}")))?;
            matrix.set(after, s, overall)?;
        }
        Ok(())
    }

    /// Fills row `after` of `accuracy` (tasks `0..=after`) and returns the per-class counts
    /// over the union of those tasks' test sets.
    fn evaluate_row(
        &self,
        learner: &Learner<'_>,
        tasks: &[Task],
        after: usize,
        accuracy: &mut AccuracyMatrix,
    ) -> Result<ClassAccuracy> {
        let mut union: Option<ClassAccuracy> = None;
        let mut counted = HashSet::new();
        for (s, task) in tasks[..=after].iter().enumerate() {
            let counts = learner.evaluate(&task.test, self.config.eval_batch_size)?;
            let overall = counts
                .overall()
                .ok_or_else(|| Error::EmptyInput(format!("test set of task {s}")))?;
            accuracy.set(after, s, overall)?;
            // Overlapping tasks share classes (and their test images): count each class once.
            let mut fresh = ClassAccuracy::new(counts.total.len());
            for c in 0..counts.total.len() {
                if counts.total[c] > 0 && counted.insert(c) {
                    fresh.correct[c] = counts.correct[c];
                    fresh.total[c] = counts.total[c];
                }
            }
            match union.as_mut() {
                Some(u) => u.merge(&fresh)?,
                None => union = Some(fresh),
            }
        }
        Ok(union.expect("at least one task"))
    }

    fn progress(&self, len: u64, name: &str, task: usize) -> ProgressBar {
        if !self.config.show_progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed}] {bar:30} {pos}/{len} {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(format!("{name} task {task}"));
        bar
    }
}

/// Offers every training image of `task` to the replay memory and closes the task.
fn remember(memory: &mut PerTaskBuffer<RawImage>, task: &Task) -> Result<()> {
    let data = &task.train;
    memory.add_task(
        task.id,
        (0..data.len()).map(|i| (data.labels()[i], RawImage::new(data.image(i).to_vec()))),
    )?;
    Ok(())
}

/// The replay memory of the tasks before `t` as a data set shaped like `like` (items in id
/// order, so the same memory always gives the same data set), `None` if it is empty.
fn replay_dataset(
    memory: &PerTaskBuffer<RawImage>,
    like: &Dataset,
    t: usize,
) -> Result<Option<Dataset>> {
    let mut entries: Vec<_> = memory.iter().filter(|e| e.task < t).collect();
    if entries.is_empty() {
        return Ok(None);
    }
    entries.sort_by_key(|e| e.id);
    let mut images = Vec::with_capacity(entries.len() * like.shape().len());
    let mut labels = Vec::with_capacity(entries.len());
    for e in entries {
        images.extend_from_slice(e.item.pixels());
        labels.push(e.label);
    }
    Dataset::new(
        format!("{} replay", like.name()),
        like.shape(),
        images,
        labels,
        like.class_names().to_vec(),
    )
    .map(Some)
}
