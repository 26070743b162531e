//! The arms of docs/methods/lifequant.md § Scaled-down experiment, task-0 pretraining, and one
//! run of an arm from a task-0 checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use qcl_continual::{
    BallMode, ContinualTrainer, FineTune, Learner, LifeQuant, LifeQuantConfig, LifeQuantMode,
    PenaltyUpdate, QResNet, QResNetConfig, RunRecord, Strategy, TaskView, TrainerConfig,
    WeightQuantMode,
};
use qcl_nn::ParamStore;
use qcl_tensor::Seed;
use serde::{Deserialize, Serialize};

use super::{Settings, Setup, TaskScheduleJson};
use crate::resume::Resume;

/// One arm of the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arm {
    /// M0: 4-bit fine-tuning.
    M0,
    /// M1: ProxQ as in the code (train on D_t with CE, F from BaLL on the replay).
    M1,
    /// M2: replay, CE.
    M2,
    /// M3: replay + BaLL.
    M3,
    /// M4: LifeQuant (replay + BaLL + ProxQ).
    M4,
    /// M5: FP32 fine-tuning (reference).
    M5,
    /// M0 at 2 bits.
    M0TwoBit,
    /// M4 with the penalty applied by its proximal step (ours, not from the paper): the same
    /// objective, stable for any λ.
    M4Prox,
    /// M3 with the released code's BaLL form instead of the paper's.
    M3CodeBall,
    /// M4 with the released code's BaLL form instead of the paper's.
    M4CodeBall,
}

impl Arm {
    /// The arms without a penalty weight, run on every seed.
    pub const WITHOUT_LAMBDA: [Arm; 5] = [Arm::M0, Arm::M2, Arm::M3, Arm::M5, Arm::M0TwoBit];
    /// The arms whose λ is chosen on validation; each runs at every λ of the sweep.
    pub const SWEPT: [Arm; 2] = [Arm::M1, Arm::M4];
    /// The arms run after the choice, at M4's chosen λ where they take one.
    pub const AT_CHOSEN: [Arm; 3] = [Arm::M4Prox, Arm::M3CodeBall, Arm::M4CodeBall];
    /// Every arm, in the order of the tables.
    pub const ALL: [Arm; 10] = [
        Arm::M0,
        Arm::M1,
        Arm::M2,
        Arm::M3,
        Arm::M4,
        Arm::M5,
        Arm::M0TwoBit,
        Arm::M4Prox,
        Arm::M3CodeBall,
        Arm::M4CodeBall,
    ];

    /// The id in tables and JSON.
    pub fn id(self) -> &'static str {
        match self {
            Arm::M0 => "M0",
            Arm::M1 => "M1",
            Arm::M2 => "M2",
            Arm::M3 => "M3",
            Arm::M4 => "M4",
            Arm::M5 => "M5",
            Arm::M0TwoBit => "M0-2bit",
            Arm::M4Prox => "M4-prox",
            Arm::M3CodeBall => "M3-codeBaLL",
            Arm::M4CodeBall => "M4-codeBaLL",
        }
    }

    /// What the arm trains on and with.
    pub fn description(self) -> &'static str {
        match self {
            Arm::M0 => "FT 4-bit: D_t, CE, λ = 0",
            Arm::M1 => "ProxQ-code: D_t, CE, λ, F from BaLL on R",
            Arm::M2 => "Replay: D_t ∪ R, CE, λ = 0",
            Arm::M3 => "Replay + BaLL: D_t ∪ R, BaLL, λ = 0",
            Arm::M4 => "LifeQuant: D_t ∪ R, BaLL, λ",
            Arm::M5 => "FT FP32 (reference): D_t, CE",
            Arm::M0TwoBit => "FT 2-bit: D_t, CE, λ = 0",
            Arm::M4Prox => "M4 with the proximal penalty step (ours)",
            Arm::M3CodeBall => "M3 with the code's BaLL, z + σ/(K·p + 1)",
            Arm::M4CodeBall => "M4 with the code's BaLL, z + σ/(K·p + 1)",
        }
    }

    /// Whether the arm has a penalty weight λ.
    pub fn takes_lambda(self) -> bool {
        matches!(self, Arm::M1 | Arm::M4 | Arm::M4Prox | Arm::M4CodeBall)
    }

    /// Bits of weights and activations.
    fn bits(self) -> u32 {
        match self {
            Arm::M5 => 32,
            Arm::M0TwoBit => 2,
            _ => 4,
        }
    }

    /// The strategy; every quantized arm is a [`LifeQuant`] configuration, so the
    /// Fisher-weighted drift is measured in all of them.
    fn strategy(self, lambda: f64) -> Result<Box<dyn ArmStrategy>> {
        let paper = Some(BallMode::PaperLinearPrior);
        let code = Some(BallMode::CodeAdditive);
        let lq = |mode, lambda, ball, update| -> Result<Box<dyn ArmStrategy>> {
            Ok(Box::new(LifeQuant::new(LifeQuantConfig {
                mode,
                lambda,
                ball,
                update,
                ..LifeQuantConfig::default()
            })?))
        };
        let (paper_mode, code_mode) = (LifeQuantMode::Paper, LifeQuantMode::CodeFaithful);
        let (gradient, proximal) = (PenaltyUpdate::Gradient, PenaltyUpdate::Proximal);
        match self {
            // FT with λ = 0 and no replay in the training data: the code-faithful LifeQuant
            // with λ = 0 is exactly fine-tuning (item 21 of docs/methods/lifequant.md § Tested
            // invariants) and still measures drift.
            Arm::M0 | Arm::M0TwoBit => lq(code_mode, 0.0, paper, gradient),
            Arm::M1 => lq(code_mode, lambda, paper, gradient),
            Arm::M2 => lq(paper_mode, 0.0, None, gradient),
            Arm::M3 => lq(paper_mode, 0.0, paper, gradient),
            Arm::M4 => lq(paper_mode, lambda, paper, gradient),
            Arm::M5 => Ok(Box::new(FineTune)),
            Arm::M4Prox => lq(paper_mode, lambda, paper, proximal),
            Arm::M3CodeBall => lq(paper_mode, 0.0, code, gradient),
            Arm::M4CodeBall => lq(paper_mode, lambda, code, gradient),
        }
    }
}

/// A strategy whose penalty statistics can be read after the run.
trait ArmStrategy: Strategy {
    /// Σ F⊙(θ − θ*)² at the end of each trained task.
    fn drift(&self) -> Vec<f64>;
    /// The largest Fisher entry of each task's penalty.
    fn fisher_max(&self) -> Vec<f64>;
}

impl ArmStrategy for LifeQuant {
    fn drift(&self) -> Vec<f64> {
        LifeQuant::drift(self).to_vec()
    }

    fn fisher_max(&self) -> Vec<f64> {
        LifeQuant::fisher_max(self).to_vec()
    }
}

impl ArmStrategy for FineTune {
    fn drift(&self) -> Vec<f64> {
        Vec::new()
    }

    fn fisher_max(&self) -> Vec<f64> {
        Vec::new()
    }
}

/// What one finished run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    /// Test accuracy matrix (rows: after task i).
    pub matrix: Vec<Vec<Option<f64>>>,
    /// ACC = mean_s a[T−1][s] on test.
    pub acc: f64,
    /// FGT = mean_{s<T−1} (max_{t∈[s,T−2]} a[t][s] − a[T−1][s]) on test.
    pub fgt: f64,
    /// Test accuracy on the classes absent from the last task.
    pub orphan_acc: f64,
    /// Validation accuracy matrix.
    pub validation: Vec<Vec<Option<f64>>>,
    /// ACC on the validation images: what λ is chosen by.
    pub validation_acc: f64,
    /// Σ F⊙(θ − θ*)² at the end of each trained task (empty for FP32 fine-tuning).
    pub drift: Vec<f64>,
    /// The largest Fisher entry of each trained task's penalty, F_max.
    pub fisher_max: Vec<f64>,
    /// Training seconds.
    pub seconds: f64,
}

/// One arm on one seed at one λ: its scores, or where its loss became non-finite (a λ too
/// large for the explicit penalty step diverges; that is a result, not a failed experiment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmRun {
    /// Arm id.
    pub arm: String,
    /// λ used.
    pub lambda: f64,
    /// Seed.
    pub seed: u64,
    /// Where the loss became non-finite, if it did.
    pub diverged: Option<String>,
    /// The scores, if the run finished.
    pub scores: Option<Scores>,
}

/// Task-0 pretraining of one seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pretraining {
    /// Seed.
    pub seed: u64,
    /// Task-0 test accuracy after each stage.
    pub fp32_acc: f64,
    /// After the 8-bit stage.
    pub int8_acc: f64,
    /// After the 4-bit stage.
    pub int4_acc: f64,
    /// After the 2-bit stage (from the 8-bit checkpoint).
    pub int2_acc: f64,
    /// Seconds of the four stages.
    pub seconds: f64,
}

/// Task-0 parameters by bit width (32 is the FP32 one).
pub type Checkpoints = BTreeMap<u32, BTreeMap<String, Tensor>>;

fn model_config(settings: &Settings, bits: u32) -> QResNetConfig {
    QResNetConfig {
        widths: settings.widths,
        weight_bits: bits,
        activation_bits: bits,
        weight_mode: if settings.strict_weights {
            WeightQuantMode::Strict
        } else {
            WeightQuantMode::Faithful
        },
        ..QResNetConfig::qresnet8()
    }
}

fn trainer(settings: &Settings, seed: u64) -> Result<ContinualTrainer> {
    Ok(ContinualTrainer::new(TrainerConfig {
        batch_size: settings.batch,
        replay_keep: qcl_continual::Keep::Fraction(settings.replay_fraction),
        order_seed: Seed::new(seed).child_named("batch order"),
        ..TrainerConfig::default()
    })?)
}

/// Trains task 0 FP32 → 8-bit → 4-bit (and 2-bit from the 8-bit weights); returns the
/// checkpoints by bit width.
pub fn pretrain(
    settings: &Settings,
    setup: &Setup,
    seed: u64,
) -> Result<(Pretraining, Checkpoints)> {
    let started = Instant::now();
    let device = Device::Cpu;
    let store = ParamStore::new(seed);
    let mut model = QResNet::new(&store.root(&device), &model_config(settings, 32))?;
    let trainer = trainer(settings, seed)?;
    let task0 = &setup.scenario.tasks()[0];
    let view = TaskView {
        task: task0,
        earlier: &[],
        replay: None,
    };
    let snapshot = |store: &ParamStore| -> Result<BTreeMap<String, Tensor>> {
        Ok(store.tensors()?.into_iter().collect())
    };
    let accuracy = |model: &QResNet, store: &ParamStore| -> Result<f64> {
        let learner = Learner::new(model, store, &device, setup.normalization);
        learner
            .evaluate(&task0.test, 256)?
            .overall()
            .context("empty test set")
    };
    let stage = |model: &QResNet, schedule: &TaskScheduleJson| -> Result<()> {
        let learner = Learner::new(model, &store, &device, setup.normalization);
        trainer.train_task(&learner, &mut FineTune, &view, &schedule.schedule())?;
        Ok(())
    };
    let mut checkpoints = BTreeMap::new();
    stage(&model, &settings.fp32)?;
    let fp32_acc = accuracy(&model, &store)?;
    checkpoints.insert(32, snapshot(&store)?);
    model.set_bits(8, 8)?;
    stage(&model, &settings.int8)?;
    let int8_acc = accuracy(&model, &store)?;
    let int8 = snapshot(&store)?;
    model.set_bits(4, 4)?;
    stage(&model, &settings.low_bit_t0)?;
    let int4_acc = accuracy(&model, &store)?;
    checkpoints.insert(4, snapshot(&store)?);
    store.load_tensors(&int8, Path::new("8-bit checkpoint"))?;
    model.set_bits(2, 2)?;
    stage(&model, &settings.low_bit_t0)?;
    let int2_acc = accuracy(&model, &store)?;
    checkpoints.insert(2, snapshot(&store)?);
    let pretraining = Pretraining {
        seed,
        fp32_acc,
        int8_acc,
        int4_acc,
        int2_acc,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((pretraining, checkpoints))
}

/// [`pretrain`], or its checkpoints and scores read back from an earlier start through
/// `resume` (piece `pretrain-seed{seed}`).
pub fn pretrain_or_resume(
    resume: &Resume,
    settings: &Settings,
    setup: &Setup,
    seed: u64,
) -> Result<(Pretraining, Checkpoints)> {
    let (pretraining, flat) = resume.with_tensors(&format!("pretrain-seed{seed}"), || {
        let (pretraining, checkpoints) = pretrain(settings, setup, seed)?;
        let flat = checkpoints
            .into_iter()
            .flat_map(|(bits, named)| {
                named
                    .into_iter()
                    .map(move |(name, t)| (format!("{bits}/{name}"), t))
            })
            .collect();
        Ok((pretraining, flat))
    })?;
    let mut checkpoints = Checkpoints::new();
    for (key, t) in flat {
        let (bits, name) = key
            .split_once('/')
            .and_then(|(b, n)| Some((b.parse::<u32>().ok()?, n)))
            .with_context(|| format!("checkpoint entry {key:?} is not `bits/name`"))?;
        checkpoints
            .entry(bits)
            .or_default()
            .insert(name.to_string(), t);
    }
    Ok((pretraining, checkpoints))
}

/// What every arm of one seed starts from: the settings, the scenario and the task-0
/// checkpoints.
#[derive(Clone, Copy)]
pub struct ArmStart<'a> {
    /// The experiment's settings.
    pub settings: &'a Settings,
    /// Scenario and normalisation.
    pub setup: &'a Setup,
    /// Task-0 parameters by bit width.
    pub checkpoints: &'a Checkpoints,
}

/// [`attempt`], or its run read back from an earlier start through `resume`.
pub fn attempt_or_resume(
    resume: &Resume,
    start: ArmStart<'_>,
    arm: Arm,
    lambda: f64,
    seed: u64,
) -> Result<ArmRun> {
    let key = format!("{}-lambda{lambda}-seed{seed}", arm.id());
    resume.json(&key, || attempt(start, arm, lambda, seed))
}

/// Runs `arm` at `lambda` over tasks 1.. from the task-0 checkpoint of its bit width; a
/// non-finite loss is recorded as a diverged run, any other error fails the experiment.
fn attempt(start: ArmStart<'_>, arm: Arm, lambda: f64, seed: u64) -> Result<ArmRun> {
    let (scores, diverged) = match run_arm(start, arm, lambda, seed) {
        Ok(scores) => (Some(scores), None),
        Err(e) => match e.downcast_ref::<qcl_tensor::Error>() {
            Some(qcl_tensor::Error::NonFinite { context, .. }) => (None, Some(context.clone())),
            _ => return Err(e.context(format!("arm {}, λ = {lambda}, seed {seed}", arm.id()))),
        },
    };
    Ok(ArmRun {
        arm: arm.id().into(),
        lambda,
        seed,
        diverged,
        scores,
    })
}

fn run_arm(start: ArmStart<'_>, arm: Arm, lambda: f64, seed: u64) -> Result<Scores> {
    let ArmStart {
        settings,
        setup,
        checkpoints,
    } = start;
    let device = Device::Cpu;
    let store = ParamStore::new(seed);
    let model = QResNet::new(&store.root(&device), &model_config(settings, arm.bits()))?;
    store.load_tensors(&checkpoints[&arm.bits()], Path::new("task-0 checkpoint"))?;
    let learner = Learner::new(&model, &store, &device, setup.normalization);
    let mut strategy = arm.strategy(lambda)?;
    let scenario = &setup.scenario;
    let record: RunRecord = trainer(settings, seed)?.run_from(
        &learner,
        strategy.as_mut(),
        scenario.tasks(),
        1,
        &settings.later_tasks.schedule(),
    )?;
    let last = record.class_accuracy.last().context("no evaluation")?;
    let validation = record.validation.context("no validation images")?;
    Ok(Scores {
        matrix: record.accuracy.rows().to_vec(),
        acc: record.accuracy.average_accuracy()?,
        fgt: record.accuracy.forgetting()?,
        orphan_acc: last
            .over(&scenario.orphan_classes())
            .context("no orphan test image")?,
        validation_acc: validation.average_accuracy()?,
        validation: validation.rows().to_vec(),
        drift: strategy.drift(),
        fisher_max: strategy.fisher_max(),
        seconds: record.tasks.iter().map(|t| t.seconds).sum(),
    })
}
