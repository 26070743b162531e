//! LifeQuant (Chen, Yang & Chen, ICCV 2023) as a [`Strategy`]: quantization-aware training
//! over a task sequence with the ProxQ penalty and BaLL rebalancing of the replay data.
//!
//! Before task t ≥ 1 (docs/methods/lifequant.md § ProxQ): the anchor `θ*` is a snapshot of
//! every trainable parameter, and the importance `F` is the batch-mean squared gradient, in
//! evaluation mode, of the BaLL loss (or CE) over the replay memory `R_{<t}` (the reference
//! code's ResNet-20 folder used the old tasks' *test* sets; we use replay, as its other folders
//! do: docs/methods/lifequant.md § Paper versus code). Each step then minimises
//! `L_task + λ·Σ F ⊙ (θ − θ*)²` on the latent FP32 parameters, with the penalty's gradient in
//! the loss as the reference does ([`PenaltyUpdate::Gradient`], the default) or by its proximal
//! step after each optimizer step ([`PenaltyUpdate::Proximal`], stable for any λ: the explicit
//! form diverges once `η·2λ·max F > 2(1 + μ)`, which the Fashion-MNIST reproduction meets at
//! λ = 100 on the stem of one seed).
//!
//! Two modes (docs/methods/lifequant.md § Paper versus code), selectable:
//!
//! - [`LifeQuantMode::Paper`] (the default): train on the shuffled union `D_t ∪ R_{<t}` with
//!   BaLL;
//! - [`LifeQuantMode::CodeFaithful`]: train on `D_t` with plain CE; replay and BaLL only shape
//!   `F`, as in the released code.
//!
//! Optionally (docs/methods/lifequant.md § ProxQ; off by default, found only in the
//! reference's MobileNet folder) the Fisher loss of each batch gains a quantization-noise term
//! ([`QuantizationNoise`]), which needs a learner that exposes features and head
//! ([`Learner::with_feature_head`]).
//!
//! With λ = 0 and no replay the two modes are the same run (item 21 of
//! docs/methods/lifequant.md § Tested invariants). The quantized network itself is
//! [`crate::QResNet`]; its bit widths are set by the caller ([`crate::QResNet::set_bits`])
//! between the FP32, 8-bit and 4-bit phases.
//!
//! ```
//! use candle_core::Device;
//! use qcl_continual::{ContinualTrainer, LifeQuant, LifeQuantConfig, Learner, LifelongConfig,
//!                     QResNet, QResNetConfig, Scenario, TaskSchedule, TrainerConfig};
//! use qcl_data::{Normalization, SplitDataset};
//! use qcl_nn::ParamStore;
//! # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
//! let data = SplitDataset::load(path)?;
//! let data = SplitDataset::new(data.train.take_per_class(6), data.test.take_per_class(2))?;
//! let scenario = Scenario::lifelong(&data, &LifelongConfig::reproduction())?;
//! let store = ParamStore::new(1);
//! let config = QResNetConfig { widths: [4, 4, 4], weight_bits: 4, activation_bits: 4,
//!                              ..QResNetConfig::smoke() };
//! let model = QResNet::new(&store.root(&Device::Cpu), &config)?;
//! let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
//! let mut lifequant = LifeQuant::new(LifeQuantConfig::default())?;
//! let schedule = TaskSchedule { epochs: 1, lr: 0.01, milestones: vec![] };
//! let run = ContinualTrainer::new(TrainerConfig::default())?
//!     .run(&learner, &mut lifequant, scenario.tasks(), &schedule)?;
//! assert_eq!(lifequant.drift().len(), 3); // Σ F⊙(θ − θ*)² at the end of each task
//! assert_eq!(lifequant.drift()[0], 0.0);  // F = 0 at task 0
//! assert!(run.accuracy.forgetting().is_ok());
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use candle_core::{DType, Tensor};
use qcl_data::{Batch, Dataset};
use qcl_tensor::{Error, Result, Seed, SeededRng};

use crate::ball::{cross_entropy, BallLoss, BallMode, ClassStatistics};
use crate::proxq::{FisherDiagonal, PenaltyUpdate, ProxQ};
use crate::strategy::{
    check_penalty, fisher_diagonal, fisher_diagonal_of, log_softmax, with_replay, FeatureHead,
    Learner, OptimizerStep, Strategy, TaskView,
};

/// Which data LifeQuant trains on and with which loss (docs/methods/lifequant.md § Paper
/// versus code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LifeQuantMode {
    /// The paper and README: `D_t ∪ R_{<t}` with the task loss (BaLL when enabled).
    #[default]
    Paper,
    /// The released code: `D_t` with CE; replay (and BaLL) only enter the Fisher estimate.
    CodeFaithful,
}

/// The optional quantization-noise term of the Fisher loss (docs/methods/lifequant.md § ProxQ;
/// from the reference's MobileNet folder). For each Fisher batch with penultimate features `h`
/// and logits `z = head(h)`, it draws `ε ~ U(−a, a)` elementwise,
/// `a = activation_range / (2^bits − 1)`, `draws` times, and adds
///
/// `(1 / (draws·B)) · Σ_r −log mean(log_softmax(head(h + ε_r)) ⊙ log_softmax(z))`
///
/// to the batch loss, `B` the number of Fisher batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantizationNoise {
    /// Noise draws per batch (default 100).
    pub draws: usize,
    /// The activation range (default 2).
    pub activation_range: f64,
    /// The weight bit width `k_w` in `a` (default 4).
    pub bits: u32,
    /// Seed of the draws (default 0).
    pub seed: Seed,
}

impl Default for QuantizationNoise {
    fn default() -> Self {
        QuantizationNoise {
            draws: 100,
            activation_range: 2.0,
            bits: 4,
            seed: Seed::new(0),
        }
    }
}

impl QuantizationNoise {
    /// Half-width `a` of the uniform noise.
    pub fn amplitude(&self) -> f64 {
        self.activation_range / ((1u64 << self.bits) - 1) as f64
    }

    fn validate(&self) -> Result<()> {
        if self.draws == 0 {
            return Err(Error::invalid_parameter(
                "quantization_noise.draws",
                "must be at least 1",
            ));
        }
        if !(self.activation_range.is_finite() && self.activation_range >= 0.0) {
            return Err(Error::invalid_parameter(
                "quantization_noise.activation_range",
                format!("must be finite and >= 0, got {}", self.activation_range),
            ));
        }
        if !(1..=16).contains(&self.bits) {
            return Err(Error::invalid_parameter(
                "quantization_noise.bits",
                format!("must be in 1..=16, got {}", self.bits),
            ));
        }
        Ok(())
    }

    /// The term's sum over the draws for one batch, `Σ_r −log mean(log_softmax(head(h + ε_r))
    /// ⊙ log_softmax(z))`, on the graph of `features` and `logits` (`rng` supplies the draws).
    ///
    /// # Errors
    /// Errors of the head; [`Error::InvalidParameter`] for bad settings.
    pub fn batch_sum(
        &self,
        split: &dyn FeatureHead,
        features: &Tensor,
        logits: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<Tensor> {
        self.validate()?;
        let a = self.amplitude() as f32;
        let clean = log_softmax(logits)?;
        let mut sum: Option<Tensor> = None;
        for _ in 0..self.draws {
            let eps = rng.uniform_tensor(features.shape(), -a, a, features.device())?;
            let noisy = log_softmax(&split.head(&(features + eps.to_dtype(features.dtype())?)?)?)?;
            let term = (noisy * &clean)?.mean_all()?.log()?.neg()?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum.expect("draws >= 1"))
    }
}

/// Parameters of [`LifeQuant`], each with a default (docs/methods/lifequant.md § Training
/// and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LifeQuantConfig {
    /// Paper or code-faithful training data and loss (default paper).
    pub mode: LifeQuantMode,
    /// ProxQ weight λ (default 100; 0 turns the penalty off, the drift is still measured).
    pub lambda: f64,
    /// BaLL in the task loss (paper mode) and in the Fisher loss; `None` uses plain CE in both
    /// (default `Some(PaperLinearPrior)`).
    pub ball: Option<BallMode>,
    /// Batch size of the Fisher pass over the replay memory (default 128).
    pub fisher_batch_size: usize,
    /// How the ProxQ penalty enters training (default [`PenaltyUpdate::Gradient`], the
    /// reference's loss term).
    pub update: PenaltyUpdate,
    /// The quantization-noise term of the Fisher loss (default `None`: off, as
    /// docs/methods/lifequant.md § ProxQ describes).
    pub quantization_noise: Option<QuantizationNoise>,
}

impl Default for LifeQuantConfig {
    fn default() -> Self {
        LifeQuantConfig {
            mode: LifeQuantMode::Paper,
            lambda: ProxQ::DEFAULT_LAMBDA,
            ball: Some(BallMode::PaperLinearPrior),
            fisher_batch_size: 128,
            update: PenaltyUpdate::Gradient,
            quantization_noise: None,
        }
    }
}

/// The LifeQuant strategy (see the module docs).
#[derive(Debug, Clone)]
pub struct LifeQuant {
    params: LifeQuantConfig,
    statistics: Option<ClassStatistics>,
    prox: Option<ProxQ>,
    drift: Vec<f64>,
    fisher_max: Vec<f64>,
}

impl LifeQuant {
    /// LifeQuant with `config`.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for a negative or non-finite λ or a zero batch size.
    pub fn new(config: LifeQuantConfig) -> Result<Self> {
        check_penalty(config.lambda, config.fisher_batch_size)?;
        if let Some(noise) = &config.quantization_noise {
            noise.validate()?;
        }
        Ok(LifeQuant {
            params: config,
            statistics: None,
            prox: None,
            drift: Vec::new(),
            fisher_max: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &LifeQuantConfig {
        &self.params
    }

    /// The Fisher-weighted drift `Σ F ⊙ (θ_end − θ*)²` at the end of each trained task, in
    /// order (0 where `F = 0`, i.e. without replay).
    pub fn drift(&self) -> &[f64] {
        &self.drift
    }

    /// The largest Fisher entry `F_max` of each task's penalty, in the order the tasks began
    /// (0 where `F = 0`, i.e. without replay): the explicit gradient form diverges once
    /// `η·2λ·F_max > 2(1 + μ)` ([`FisherDiagonal::max`]).
    pub fn fisher_max(&self) -> &[f64] {
        &self.fisher_max
    }

    /// The penalty of the current (or last) task, if one was built.
    pub fn proxq(&self) -> Option<&ProxQ> {
        self.prox.as_ref()
    }

    /// The BaLL statistics of the current (or last) task, `D_t ∪ R_{<t}`.
    pub fn statistics(&self) -> Option<&ClassStatistics> {
        self.statistics.as_ref()
    }

    /// The Fisher pass with the quantization-noise term added to every batch's loss.
    fn noisy_fisher(
        &self,
        learner: &Learner<'_>,
        replay: &Dataset,
        noise: &QuantizationNoise,
        task: u64,
    ) -> Result<FisherDiagonal> {
        let split = learner.feature_head.ok_or_else(|| {
            Error::invalid_parameter(
                "quantization_noise",
                "needs a learner with features and head (Learner::with_feature_head)",
            )
        })?;
        let batch_size = self.params.fisher_batch_size;
        let batches = replay.len().div_ceil(batch_size);
        let scale = 1.0 / (noise.draws * batches) as f64;
        let mut rng = noise.seed.child(task).rng();
        fisher_diagonal_of(learner, replay, batch_size, &mut |batch| {
            let features = split.features_t(&batch.images, false)?;
            let logits = split.head(&features)?;
            let term = noise.batch_sum(split, &features, &logits, &mut rng)?;
            Ok((self.task_loss(&logits, &batch.labels, true)? + (term * scale)?)?)
        })
    }

    fn task_loss(&self, logits: &Tensor, labels: &Tensor, ball: bool) -> Result<Tensor> {
        match (self.params.ball, &self.statistics, ball) {
            (Some(mode), Some(stats), true) => BallLoss::new(mode).loss(logits, labels, stats),
            _ => cross_entropy(logits, labels),
        }
    }
}

impl Strategy for LifeQuant {
    fn name(&self) -> String {
        let mode = match self.params.mode {
            LifeQuantMode::Paper => "paper",
            LifeQuantMode::CodeFaithful => "code",
        };
        let loss = match self.params.ball {
            Some(m) => format!("{m:?}"),
            None => "CE".into(),
        };
        format!("lifequant({mode}, {loss}, λ={})", self.params.lambda)
    }

    fn training_set(&mut self, view: &TaskView<'_>) -> Result<Dataset> {
        match self.params.mode {
            LifeQuantMode::Paper => with_replay(view),
            LifeQuantMode::CodeFaithful => Ok(view.task.train.clone()),
        }
    }

    fn begin_task(
        &mut self,
        learner: &Learner<'_>,
        view: &TaskView<'_>,
        _train: &Dataset,
    ) -> Result<()> {
        let params = learner.params();
        // Labels are global class indices of the data set, which is also the head's width.
        let num_classes = view.task.train.num_classes();
        self.statistics = Some(ClassStatistics::for_task(
            &view.task.train,
            view.replay,
            num_classes,
        )?);
        let fisher = match (view.replay, &self.params.quantization_noise) {
            (Some(replay), None) => {
                fisher_diagonal(learner, replay, self.params.fisher_batch_size, &|z, y| {
                    self.task_loss(z, y, true)
                })?
            }
            (Some(replay), Some(noise)) => {
                self.noisy_fisher(learner, replay, noise, view.task.id as u64)?
            }
            (None, _) => FisherDiagonal::zeros(&params)?,
        };
        self.fisher_max.push(fisher.max()?);
        self.prox = Some(ProxQ::new(
            ProxQ::snapshot(&params)?,
            fisher,
            self.params.lambda,
        )?);
        Ok(())
    }

    fn batch_loss(&self, learner: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        let ball = self.params.mode == LifeQuantMode::Paper;
        let loss = self.task_loss(logits, &batch.labels, ball)?;
        match &self.prox {
            Some(prox)
                if self.params.lambda > 0.0 && self.params.update == PenaltyUpdate::Gradient =>
            {
                Ok((loss + prox.penalty(&learner.params())?)?)
            }
            _ => Ok(loss),
        }
    }

    fn after_step(&mut self, learner: &Learner<'_>, step: &OptimizerStep) -> Result<()> {
        match &self.prox {
            Some(prox)
                if self.params.lambda > 0.0 && self.params.update == PenaltyUpdate::Proximal =>
            {
                prox.proximal_step(&learner.params(), step.effective_lr())
            }
            _ => Ok(()),
        }
    }

    fn end_task(&mut self, learner: &Learner<'_>, _view: &TaskView<'_>) -> Result<()> {
        if let Some(prox) = &self.prox {
            let drift = prox.drift(&learner.params())?;
            self.drift
                .push(f64::from(drift.to_dtype(DType::F32)?.to_scalar::<f32>()?));
        }
        Ok(())
    }
}
