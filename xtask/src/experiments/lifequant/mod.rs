//! `lifequant`: LifeQuant's scaled-down reproduction (docs/methods/lifequant.md § Scaled-down
//! experiment) on Fashion-MNIST — a three-task sliding class window (d = 0.5), QResNet-8
//! pretrained FP32 → 8-bit → 4-bit on task 0, then the arms over tasks 1 and 2 on several
//! seeds. λ of M1 and M4 is chosen on a held-out validation split of the training images, never
//! on test; the orderings H1–H5 and S1–S5 are judged on test at the chosen λ.
//!
//! This file holds the settings and the order of the runs; [`arms`] what one arm is and how it
//! runs; [`report`] the choice of λ and the orderings; [`text`] and [`plots`] the results.

mod arms;
mod plots;
mod report;
mod text;
pub mod variants;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use qcl_continual::{LifelongConfig, Scenario, TaskSchedule};
use qcl_data::{Normalization, SplitDataset};
use serde::Serialize;

use crate::experiments::OnData;
use crate::reproduce::{Context, Experiment, Mode, Outcome};
use crate::resume::Resume;

pub use arms::{Arm, ArmRun, ArmStart, Pretraining};
pub use report::LambdaChoice;

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "lifequant",
    description: "LifeQuant (docs/methods/lifequant.md § Scaled-down experiment): QResNet-8 \
                  on a 3-task sliding class window of Fashion-MNIST (d = 0.5), 4-bit W/A; \
                  fine-tuning, ProxQ, replay, replay + BaLL and LifeQuant against FP32 and \
                  2-bit fine-tuning, λ chosen on a validation split; ACC/FGT over seeds and \
                  the expected orderings H1–H5, S1–S5.",
    needs_data: true,
    takes_seeds: true,
    run,
};

/// Everything that defines the run; recorded in the results.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Channels of the three stages.
    pub widths: [usize; 3],
    /// Training images per class (drawn once, seed 123), before the validation hold-out.
    pub train_per_class: usize,
    /// Test images per class (the first ones; `None`: the whole test split).
    pub test_per_class: Option<usize>,
    /// Share of each class's training images held out for choosing λ (seeded, per class).
    pub validation_fraction: f64,
    /// Diminish rate d.
    pub diminish_rate: f64,
    /// The Strict weight grid (at most 2^k levels in [−1, 1]) instead of the Faithful one.
    pub strict_weights: bool,
    /// Seeds of parameters and batch order.
    pub seeds: Vec<u64>,
    /// FP32 pretraining on task 0.
    pub fp32: TaskScheduleJson,
    /// 8-bit stage on task 0.
    pub int8: TaskScheduleJson,
    /// 4-bit (and 2-bit) stage on task 0.
    pub low_bit_t0: TaskScheduleJson,
    /// Tasks 1 and 2.
    pub later_tasks: TaskScheduleJson,
    /// The λ values M1 and M4 run at on every seed; each arm's λ is the one with the best mean
    /// final validation accuracy over seeds.
    pub lambdas: Vec<f64>,
    /// The λ of the method notes' table, reported beside the chosen one.
    pub reference_lambda: f64,
    /// Replay fraction δ.
    pub replay_fraction: f64,
    /// Batch size.
    pub batch: usize,
}

/// A [`TaskSchedule`] in the results.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScheduleJson {
    /// Epochs.
    pub epochs: usize,
    /// Initial rate.
    pub lr: f64,
    /// Tenfold drops.
    pub milestones: Vec<usize>,
}

impl TaskScheduleJson {
    fn new(epochs: usize, lr: f64, milestones: &[usize]) -> Self {
        TaskScheduleJson {
            epochs,
            lr,
            milestones: milestones.to_vec(),
        }
    }

    fn schedule(&self) -> TaskSchedule {
        TaskSchedule {
            epochs: self.epochs,
            lr: self.lr,
            milestones: self.milestones.clone(),
        }
    }
}

impl Settings {
    /// The settings of `mode`: the schedule of docs/methods/lifequant.md § Scaled-down
    /// experiment in both; quick uses the 8/16/32 widths, 300 training and 500 test images per
    /// class and two λ values.
    pub fn for_mode(mode: Mode) -> Self {
        let quick = mode == Mode::Quick;
        Settings {
            widths: if quick { [8, 16, 32] } else { [16, 32, 64] },
            train_per_class: if quick { 300 } else { 800 },
            test_per_class: if quick { Some(500) } else { None },
            validation_fraction: 0.1,
            diminish_rate: 0.5,
            strict_weights: false,
            seeds: vec![0, 1, 2],
            fp32: TaskScheduleJson::new(6, 0.05, &[2, 4]),
            int8: TaskScheduleJson::new(2, 0.005, &[]),
            low_bit_t0: TaskScheduleJson::new(3, 0.01, &[1, 2]),
            later_tasks: TaskScheduleJson::new(5, 0.01, &[2, 4]),
            lambdas: if quick {
                vec![10.0, 100.0]
            } else {
                vec![3.0, 10.0, 30.0, 50.0, 100.0]
            },
            reference_lambda: 100.0,
            replay_fraction: 0.2,
            batch: 128,
        }
    }
}

impl Settings {
    /// [`Settings::for_mode`] of the context's mode, with seeds `0..n` when it asks for `n`.
    pub fn for_context(ctx: &Context) -> Self {
        let mut settings = Settings::for_mode(ctx.mode);
        if let Some(n) = ctx.seeds {
            settings.seeds = (0..n).collect();
        }
        settings
    }

    /// These settings without their seed list: what shapes one seed's runs, and so the scope
    /// of the pieces a stopped run resumes from (`--seeds 5` reuses the pieces of seeds 0–2).
    pub fn without_seeds(&self) -> Self {
        Settings {
            seeds: Vec::new(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
impl Settings {
    /// The experiment scaled down to seconds for the tests on the committed fixtures: tiny
    /// widths, 10 training and 4 test images per class, one epoch per stage, two seeds.
    pub fn fixture() -> Self {
        let one = TaskScheduleJson::new(1, 0.01, &[]);
        Settings {
            widths: [4, 4, 8],
            train_per_class: 10,
            test_per_class: Some(4),
            seeds: vec![0, 1],
            fp32: one.clone(),
            int8: one.clone(),
            low_bit_t0: one.clone(),
            later_tasks: one,
            batch: 16,
            ..Settings::for_mode(Mode::Quick)
        }
    }
}

/// The scenario and normalisation every run of the experiment shares.
pub struct Setup {
    /// Tasks with their held-out validation images.
    pub scenario: Scenario,
    /// The training images' mean and std.
    pub normalization: Normalization,
}

impl Setup {
    fn new(data: &SplitDataset, settings: &Settings) -> Result<Self> {
        let data = match settings.test_per_class {
            Some(k) => SplitDataset::new(data.train.clone(), data.test.take_per_class(k))?,
            None => data.clone(),
        };
        let params = LifelongConfig {
            diminish_rate: settings.diminish_rate,
            train_per_class: Some(settings.train_per_class),
            validation_fraction: settings.validation_fraction,
            ..LifelongConfig::reproduction()
        };
        let scenario = Scenario::lifelong(&data, &params)?;
        let stats = data.train.pixel_stats()?;
        Ok(Setup {
            scenario,
            normalization: Normalization::Standardize {
                mean: stats.mean as f32,
                std: stats.std as f32,
            },
        })
    }
}

/// Every run of the experiment, and the λ chosen from them.
#[derive(Debug, Clone, Serialize)]
pub struct Runs {
    /// Task-0 pretraining per seed.
    pub pretraining: Vec<Pretraining>,
    /// Every arm run, the λ sweeps included.
    pub runs: Vec<ArmRun>,
    /// The λ chosen on validation for M1 and for M4.
    pub chosen: BTreeMap<String, LambdaChoice>,
    /// What was read back from an earlier start of the run, if anything.
    pub resumed: Option<String>,
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let data = OnData::fashion_mnist(ctx)?;
    run_with(OnData::new(ctx, &data, bar), &Settings::for_context(ctx))
}

/// The experiment on `data` with `settings`: per seed, task-0 pretraining, the arms without λ
/// and the λ sweeps of M1 and M4; then λ is chosen on validation, and the arms that take M4's
/// λ run at it on every seed.
pub fn run_with(on: OnData<'_>, settings: &Settings) -> Result<Outcome> {
    let OnData { ctx, data, bar } = on;
    let started = Instant::now();
    let setup = Setup::new(data, settings)?;
    let resume = Resume::new(ctx, EXPERIMENT.name).scope(&settings.without_seeds())?;
    let per_seed = 1
        + Arm::WITHOUT_LAMBDA.len()
        + Arm::SWEPT.len() * settings.lambdas.len()
        + Arm::AT_CHOSEN.len();
    bar.set_length(bar.length().unwrap_or(0) + (settings.seeds.len() * per_seed) as u64);
    let mut pretraining = Vec::new();
    let mut checkpoints = Vec::new();
    let mut runs = Vec::new();
    for &seed in &settings.seeds {
        bar.set_message(format!("lifequant seed {seed}: task 0 FP32 → 8 → 4/2 bit"));
        let (pre, checkpoint) = arms::pretrain_or_resume(&resume, settings, &setup, seed)
            .with_context(|| format!("task-0 pretraining, seed {seed}"))?;
        pretraining.push(pre);
        bar.inc(1);
        let mut plan: Vec<(Arm, f64)> = Arm::WITHOUT_LAMBDA.iter().map(|&a| (a, 0.0)).collect();
        for arm in Arm::SWEPT {
            plan.extend(settings.lambdas.iter().map(|&l| (arm, l)));
        }
        let start = ArmStart {
            settings,
            setup: &setup,
            checkpoints: &checkpoint,
        };
        for (arm, lambda) in plan {
            bar.set_message(format!("lifequant seed {seed}: {} λ = {lambda}", arm.id()));
            runs.push(arms::attempt_or_resume(&resume, start, arm, lambda, seed)?);
            bar.inc(1);
        }
        checkpoints.push(checkpoint);
    }
    let mut chosen = BTreeMap::new();
    for arm in Arm::SWEPT {
        let choice = report::choose_lambda(&runs, arm, settings)?;
        chosen.insert(arm.id().to_string(), choice);
    }
    let m4_lambda = chosen[Arm::M4.id()].lambda;
    for (&seed, checkpoint) in settings.seeds.iter().zip(&checkpoints) {
        let start = ArmStart {
            settings,
            setup: &setup,
            checkpoints: checkpoint,
        };
        for arm in Arm::AT_CHOSEN {
            let lambda = if arm.takes_lambda() { m4_lambda } else { 0.0 };
            bar.set_message(format!("lifequant seed {seed}: {} λ = {lambda}", arm.id()));
            runs.push(arms::attempt_or_resume(&resume, start, arm, lambda, seed)?);
            bar.inc(1);
        }
    }
    let runs = Runs {
        pretraining,
        runs,
        chosen,
        resumed: resume.note(),
    };
    report::outcome(
        ctx,
        settings,
        &setup,
        &runs,
        started.elapsed().as_secs_f64(),
    )
}

#[cfg(test)]
mod tests;
