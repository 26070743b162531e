//! `lifequant`: LifeQuant's scaled-down reproduction (docs/methods/lifequant.md § Scaled-down
//! experiment) on Fashion-MNIST — a three-task sliding class window (d = 0.5), QResNet-8
//! pretrained FP32 → 8-bit → 4-bit on task 0, then the arms M0–M5 and M0-2bit over tasks 1
//! and 2, over several seeds; ACC and FGT with mean ± std, accuracy-matrix heatmaps and the
//! expected orderings H1–H5 / S1–S4.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use plotters::prelude::*;
use qcl_continual::{
    AccuracyMatrix, BallMode, ContinualTrainer, FineTune, Learner, LifeQuant, LifeQuantMode,
    LifeQuantParams, LifelongParams, PenaltyUpdate, QResNet, QResNetConfig, RunRecord, Scenario,
    Strategy, TaskSchedule, TaskView, TrainerConfig,
};
use qcl_data::{KnownDataset, Normalization, SplitDataset};
use qcl_nn::ParamStore;
use qcl_tensor::Seed;
use serde::Serialize;
use serde_json::json;

use crate::data::dataset_path;
use crate::experiments::mean_std;
use crate::plot;
use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "lifequant",
    description: "LifeQuant (docs/methods/lifequant.md § Scaled-down experiment): QResNet-8 \
                  on a 3-task sliding class window of Fashion-MNIST (d = 0.5), 4-bit W/A; \
                  fine-tuning, ProxQ, replay, replay + BaLL and LifeQuant against FP32 and \
                  2-bit fine-tuning; ACC/FGT over seeds and the expected orderings H1–H5, S1–S4.",
    needs_data: true,
    run,
};

/// Everything that defines the run; recorded in the results.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Channels of the three stages.
    pub widths: [usize; 3],
    /// Training images per class (drawn once, seed 123).
    pub train_per_class: usize,
    /// Test images per class (the first ones; `None`: the whole test split).
    pub test_per_class: Option<usize>,
    /// Diminish rate d.
    pub diminish_rate: f64,
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
    /// ProxQ λ of M1 and M4.
    pub lambda: f64,
    /// Extra λ values for M4 on the first seed.
    pub lambda_sweep: Vec<f64>,
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
    /// class and no λ sweep.
    pub fn for_mode(mode: Mode) -> Self {
        let quick = mode == Mode::Quick;
        Settings {
            widths: if quick { [8, 16, 32] } else { [16, 32, 64] },
            train_per_class: if quick { 300 } else { 800 },
            test_per_class: if quick { Some(500) } else { None },
            diminish_rate: 0.5,
            seeds: vec![0, 1, 2],
            fp32: TaskScheduleJson::new(6, 0.05, &[2, 4]),
            int8: TaskScheduleJson::new(2, 0.005, &[]),
            low_bit_t0: TaskScheduleJson::new(3, 0.01, &[1, 2]),
            later_tasks: TaskScheduleJson::new(5, 0.01, &[2, 4]),
            lambda: 100.0,
            lambda_sweep: if quick { vec![] } else { vec![10.0, 1000.0] },
            replay_fraction: 0.2,
            batch: 128,
        }
    }
}

/// One arm of the table in docs/methods/lifequant.md § Scaled-down experiment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
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
}

impl Arm {
    const ALL: [Arm; 8] = [
        Arm::M0,
        Arm::M1,
        Arm::M2,
        Arm::M3,
        Arm::M4,
        Arm::M5,
        Arm::M0TwoBit,
        Arm::M4Prox,
    ];

    fn id(self) -> &'static str {
        match self {
            Arm::M0 => "M0",
            Arm::M1 => "M1",
            Arm::M2 => "M2",
            Arm::M3 => "M3",
            Arm::M4 => "M4",
            Arm::M5 => "M5",
            Arm::M0TwoBit => "M0-2bit",
            Arm::M4Prox => "M4-prox",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Arm::M0 => "FT 4-bit: D_t, CE, λ = 0",
            Arm::M1 => "ProxQ-code: D_t, CE, λ, F from BaLL on R",
            Arm::M2 => "Replay: D_t ∪ R, CE, λ = 0",
            Arm::M3 => "Replay + BaLL: D_t ∪ R, BaLL, λ = 0",
            Arm::M4 => "LifeQuant: D_t ∪ R, BaLL, λ",
            Arm::M5 => "FT FP32 (reference): D_t, CE",
            Arm::M0TwoBit => "FT 2-bit: D_t, CE, λ = 0",
            Arm::M4Prox => "M4 with the proximal penalty step (ours)",
        }
    }

    /// Bits of weights and activations.
    fn bits(self) -> u32 {
        match self {
            Arm::M5 => 32,
            Arm::M0TwoBit => 2,
            _ => 4,
        }
    }

    /// The strategy; every quantized arm except M0 is a [`LifeQuant`] configuration, so the
    /// Fisher-weighted drift is measured in all of them.
    fn strategy(self, lambda: f64) -> Result<Box<dyn ArmStrategy>> {
        let ball = Some(BallMode::PaperLinearPrior);
        let lq = |mode, lambda, ball| -> Result<Box<dyn ArmStrategy>> {
            Ok(Box::new(LifeQuant::new(LifeQuantParams {
                mode,
                lambda,
                ball,
                ..LifeQuantParams::default()
            })?))
        };
        let proximal = |lambda| -> Result<Box<dyn ArmStrategy>> {
            Ok(Box::new(LifeQuant::new(LifeQuantParams {
                lambda,
                update: PenaltyUpdate::Proximal,
                ..LifeQuantParams::default()
            })?))
        };
        match self {
            // FT with λ = 0 and no replay in the training data: the code-faithful LifeQuant
            // with λ = 0 is exactly fine-tuning (item 21 of docs/methods/lifequant.md § Tested
            // invariants) and still measures drift.
            Arm::M0 | Arm::M0TwoBit => lq(LifeQuantMode::CodeFaithful, 0.0, ball),
            Arm::M1 => lq(LifeQuantMode::CodeFaithful, lambda, ball),
            Arm::M2 => lq(LifeQuantMode::Paper, 0.0, None),
            Arm::M3 => lq(LifeQuantMode::Paper, 0.0, ball),
            Arm::M4 => lq(LifeQuantMode::Paper, lambda, ball),
            Arm::M5 => Ok(Box::new(FineTune)),
            Arm::M4Prox => proximal(lambda),
        }
    }
}

/// A strategy whose Fisher-weighted drift can be read after the run.
trait ArmStrategy: Strategy {
    fn drift(&self) -> Vec<f64>;
}

impl ArmStrategy for LifeQuant {
    fn drift(&self) -> Vec<f64> {
        LifeQuant::drift(self).to_vec()
    }
}

impl ArmStrategy for FineTune {
    fn drift(&self) -> Vec<f64> {
        Vec::new()
    }
}

/// One arm on one seed.
#[derive(Debug, Clone, Serialize)]
pub struct ArmRun {
    /// Arm id.
    pub arm: String,
    /// λ used.
    pub lambda: f64,
    /// Seed.
    pub seed: u64,
    /// Accuracy matrix (rows: after task i).
    pub matrix: Vec<Vec<Option<f64>>>,
    /// ACC = mean_s a[T−1][s].
    pub acc: f64,
    /// FGT = mean_{s<T−1} (max_{t∈[s,T−2]} a[t][s] − a[T−1][s]).
    pub fgt: f64,
    /// Accuracy on the test images of the classes absent from the last task.
    pub orphan_acc: f64,
    /// Σ F⊙(θ − θ*)² at the end of each trained task (empty for FP32 fine-tuning).
    pub drift: Vec<f64>,
    /// Training seconds.
    pub seconds: f64,
}

/// One point of the λ sweep of M4.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRun {
    /// λ.
    pub lambda: f64,
    /// Seed.
    pub seed: u64,
    /// Where the loss became non-finite, if it did.
    pub diverged: Option<String>,
    /// The run, if it finished.
    pub run: Option<ArmRun>,
}

/// Task-0 pretraining of one seed.
#[derive(Debug, Clone, Serialize)]
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

type Checkpoint = BTreeMap<String, Tensor>;

fn model_config(settings: &Settings, bits: u32) -> QResNetConfig {
    QResNetConfig {
        widths: settings.widths,
        weight_bits: bits,
        activation_bits: bits,
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
/// checkpoints by bit width (32 is the FP32 one).
fn pretrain(
    settings: &Settings,
    scenario: &Scenario,
    normalization: Normalization,
    seed: u64,
) -> Result<(Pretraining, BTreeMap<u32, Checkpoint>)> {
    let started = Instant::now();
    let device = Device::Cpu;
    let store = ParamStore::new(seed);
    let mut model = QResNet::new(&store.root(&device), &model_config(settings, 32))?;
    let trainer = trainer(settings, seed)?;
    let task0 = &scenario.tasks()[0];
    let view = TaskView {
        task: task0,
        earlier: &[],
        replay: None,
    };
    let snapshot =
        |store: &ParamStore| -> Result<Checkpoint> { Ok(store.tensors()?.into_iter().collect()) };
    let accuracy = |model: &QResNet, store: &ParamStore| -> Result<f64> {
        let learner = Learner::new(model, store, &device, normalization);
        learner
            .evaluate(&task0.test, 256)?
            .overall()
            .context("empty test set")
    };
    let mut checkpoints = BTreeMap::new();
    let stage = |model: &QResNet, schedule: &TaskScheduleJson| -> Result<()> {
        let learner = Learner::new(model, &store, &device, normalization);
        trainer.train_task(&learner, &mut FineTune, &view, &schedule.schedule())?;
        Ok(())
    };
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
    Ok((
        Pretraining {
            seed,
            fp32_acc,
            int8_acc,
            int4_acc,
            int2_acc,
            seconds: started.elapsed().as_secs_f64(),
        },
        checkpoints,
    ))
}

/// Runs `arm` over tasks 1.. from the task-0 checkpoint of its bit width.
fn run_arm(
    settings: &Settings,
    scenario: &Scenario,
    normalization: Normalization,
    checkpoints: &BTreeMap<u32, Checkpoint>,
    arm: Arm,
    lambda: f64,
    seed: u64,
) -> Result<ArmRun> {
    let device = Device::Cpu;
    let store = ParamStore::new(seed);
    let model = QResNet::new(&store.root(&device), &model_config(settings, arm.bits()))?;
    store.load_tensors(&checkpoints[&arm.bits()], Path::new("task-0 checkpoint"))?;
    let learner = Learner::new(&model, &store, &device, normalization);
    let mut strategy = arm.strategy(lambda)?;
    let record: RunRecord = trainer(settings, seed)?.run_from(
        &learner,
        strategy.as_mut(),
        scenario.tasks(),
        1,
        &settings.later_tasks.schedule(),
    )?;
    let last = record.class_accuracy.last().context("no evaluation")?;
    let orphans = scenario.orphan_classes();
    Ok(ArmRun {
        arm: arm.id().into(),
        lambda,
        seed,
        matrix: record.accuracy.rows().to_vec(),
        acc: record.accuracy.average_accuracy()?,
        fgt: record.accuracy.forgetting()?,
        orphan_acc: last.over(&orphans).context("no orphan test image")?,
        drift: strategy.drift(),
        seconds: record.tasks.iter().map(|t| t.seconds).sum(),
    })
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let data = SplitDataset::load(dataset_path(&ctx.data_dir, KnownDataset::FashionMnist))
        .context("loading Fashion-MNIST")?;
    run_with(ctx, &data, &Settings::for_mode(ctx.mode), bar)
}

/// One ordering of docs/methods/lifequant.md § Expected orderings and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct Ordering {
    /// H1..H5, S1..S4.
    pub id: String,
    /// Hard (required of the end-to-end run, docs/methods/lifequant.md § Expected orderings)
    /// or soft (reported).
    pub hard: bool,
    /// The statement.
    pub statement: String,
    /// The measured values.
    pub measured: String,
    /// Whether it held.
    pub held: bool,
}

/// The experiment on `data` with `settings`.
pub fn run_with(
    ctx: &Context,
    data: &SplitDataset,
    settings: &Settings,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let started = Instant::now();
    let data = match settings.test_per_class {
        Some(k) => SplitDataset::new(data.train.clone(), data.test.take_per_class(k))?,
        None => data.clone(),
    };
    let params = LifelongParams {
        diminish_rate: settings.diminish_rate,
        train_per_class: Some(settings.train_per_class),
        ..LifelongParams::reproduction()
    };
    let scenario = Scenario::lifelong(&data, &params)?;
    let stats = data.train.pixel_stats()?;
    let normalization = Normalization::Standardize {
        mean: stats.mean as f32,
        std: stats.std as f32,
    };
    let total = settings.seeds.len() * (1 + Arm::ALL.len() + settings.lambda_sweep.len());
    bar.set_length(bar.length().unwrap_or(0) + total as u64);
    let mut pretraining = Vec::new();
    let mut runs: Vec<ArmRun> = Vec::new();
    let mut sweep_runs: Vec<SweepRun> = Vec::new();
    for &seed in &settings.seeds {
        bar.set_message(format!("lifequant seed {seed}: task 0 FP32 → 8 → 4/2 bit"));
        let (pre, checkpoints) = pretrain(settings, &scenario, normalization, seed)
            .with_context(|| format!("task-0 pretraining, seed {seed}"))?;
        pretraining.push(pre);
        bar.inc(1);
        for arm in Arm::ALL {
            bar.set_message(format!("lifequant seed {seed}: {}", arm.id()));
            runs.push(
                run_arm(
                    settings,
                    &scenario,
                    normalization,
                    &checkpoints,
                    arm,
                    settings.lambda,
                    seed,
                )
                .with_context(|| format!("arm {}, seed {seed}", arm.id()))?,
            );
            bar.inc(1);
        }
        // The λ sweep of M4 on every seed; a λ too large for the explicit step diverges, which
        // is a result to report, not a failed experiment.
        for &lambda in &settings.lambda_sweep {
            bar.set_message(format!("lifequant seed {seed}: M4 λ = {lambda}"));
            let run = run_arm(
                settings,
                &scenario,
                normalization,
                &checkpoints,
                Arm::M4,
                lambda,
                seed,
            );
            sweep_runs.push(match run {
                Ok(run) => SweepRun {
                    lambda,
                    seed,
                    diverged: None,
                    run: Some(run),
                },
                Err(e) => match e.downcast_ref::<qcl_tensor::Error>() {
                    Some(qcl_tensor::Error::NonFinite { context, .. }) => SweepRun {
                        lambda,
                        seed,
                        diverged: Some(context.clone()),
                        run: None,
                    },
                    _ => return Err(e),
                },
            });
            bar.inc(1);
        }
    }
    let main_runs = |arm: Arm| -> Vec<&ArmRun> {
        runs.iter()
            .filter(|r| r.arm == arm.id() && r.lambda == settings.lambda)
            .collect()
    };
    let stat = |arm: Arm, f: fn(&ArmRun) -> f64| -> (f64, f64) {
        mean_std(&main_runs(arm).iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let acc = |arm| stat(arm, |r| 100.0 * r.acc).0;
    let fgt = |arm| stat(arm, |r| 100.0 * r.fgt).0;
    let orphan = |arm| stat(arm, |r| 100.0 * r.orphan_acc).0;

    // The orderings, on the means over seeds (H5 on every seed: same seed and data order).
    let fp32 = mean_std(
        &pretraining
            .iter()
            .map(|p| 100.0 * p.fp32_acc)
            .collect::<Vec<_>>(),
    )
    .0;
    let int4 = mean_std(
        &pretraining
            .iter()
            .map(|p| 100.0 * p.int4_acc)
            .collect::<Vec<_>>(),
    )
    .0;
    let drift_pairs: Vec<(f64, f64)> = settings
        .seeds
        .iter()
        .map(|&s| {
            let at = |arm: Arm| {
                runs.iter()
                    .find(|r| r.arm == arm.id() && r.seed == s && r.lambda == settings.lambda)
                    .and_then(|r| r.drift.first().copied())
                    .unwrap_or(f64::NAN)
            };
            (at(Arm::M4), at(Arm::M3))
        })
        .collect();
    let o = |id: &str, hard: bool, statement: &str, measured: String, held: bool| Ordering {
        id: id.into(),
        hard,
        statement: statement.into(),
        measured,
        held,
    };
    let orderings = vec![
        o(
            "H1",
            true,
            "4-bit T0 accuracy ≥ FP32 T0 accuracy − 3",
            format!("{int4:.2} vs {fp32:.2}"),
            int4 >= fp32 - 3.0,
        ),
        o(
            "H2",
            true,
            "M0: orphan-class accuracy after T2 < 10 % and FGT ≥ 20",
            format!("orphan {:.2} %, FGT {:.2}", orphan(Arm::M0), fgt(Arm::M0)),
            orphan(Arm::M0) < 10.0 && fgt(Arm::M0) >= 20.0,
        ),
        o(
            "H3",
            true,
            "FGT(M4) ≤ FGT(M0) − 10 and ACC(M4) ≥ ACC(M0) + 10",
            format!(
                "FGT {:.2} vs {:.2}; ACC {:.2} vs {:.2}",
                fgt(Arm::M4),
                fgt(Arm::M0),
                acc(Arm::M4),
                acc(Arm::M0)
            ),
            fgt(Arm::M4) <= fgt(Arm::M0) - 10.0 && acc(Arm::M4) >= acc(Arm::M0) + 10.0,
        ),
        o(
            "H4",
            true,
            "ACC(M2) > ACC(M0)",
            format!("{:.2} vs {:.2}", acc(Arm::M2), acc(Arm::M0)),
            acc(Arm::M2) > acc(Arm::M0),
        ),
        o(
            "H5",
            true,
            "Fisher-weighted drift at the end of T1 smaller with λ > 0 (M4) than λ = 0 (M3), \
             every seed",
            drift_pairs
                .iter()
                .map(|(a, b)| format!("{a:.3e} vs {b:.3e}"))
                .collect::<Vec<_>>()
                .join("; "),
            drift_pairs.iter().all(|(a, b)| a < b),
        ),
        o(
            "S1",
            false,
            "ACC(M4) ≥ ACC(M2) and FGT(M4) ≤ FGT(M2)",
            format!(
                "ACC {:.2} vs {:.2}; FGT {:.2} vs {:.2}",
                acc(Arm::M4),
                acc(Arm::M2),
                fgt(Arm::M4),
                fgt(Arm::M2)
            ),
            acc(Arm::M4) >= acc(Arm::M2) && fgt(Arm::M4) <= fgt(Arm::M2),
        ),
        o(
            "S2",
            false,
            "FGT(M1) ≤ FGT(M0)",
            format!("{:.2} vs {:.2}", fgt(Arm::M1), fgt(Arm::M0)),
            fgt(Arm::M1) <= fgt(Arm::M0),
        ),
        o(
            "S3",
            false,
            "FGT(M0-2bit) ≥ FGT(M0)",
            format!("{:.2} vs {:.2}", fgt(Arm::M0TwoBit), fgt(Arm::M0)),
            fgt(Arm::M0TwoBit) >= fgt(Arm::M0),
        ),
        o(
            "S4",
            false,
            "old-class (orphan) recall under M3 ≥ under M2",
            format!("{:.2} vs {:.2}", orphan(Arm::M3), orphan(Arm::M2)),
            orphan(Arm::M3) >= orphan(Arm::M2),
        ),
    ];

    // Heatmaps of the mean matrix of each arm.
    let mut plots = Vec::new();
    for arm in Arm::ALL {
        let rows = main_runs(arm);
        let t = scenario.num_tasks();
        let mut mean = AccuracyMatrix::new(t)?;
        for i in 0..t {
            for j in 0..=i {
                let values: Vec<f64> = rows.iter().filter_map(|r| r.matrix[i][j]).collect();
                if !values.is_empty() {
                    mean.set(i, j, mean_std(&values).0)?;
                }
            }
        }
        let png = format!("lifequant-matrix-{}.png", arm.id());
        mean.save_heatmap_png(
            ctx.out_dir.join(&png),
            &format!("{}: {}", arm.id(), arm.description()),
        )?;
        plots.push((
            png,
            format!(
                "{} ({}): accuracy matrix a[i][j], mean over {} seeds",
                arm.id(),
                arm.description(),
                rows.len()
            ),
        ));
    }
    let bars_png = "lifequant-acc-fgt.png";
    acc_fgt_plot(&ctx.out_dir.join(bars_png), &runs, settings)?;
    plots.push((
        bars_png.into(),
        "ACC and FGT per arm (mean ± std over seeds)".into(),
    ));

    // Tables.
    let mut table = String::from(
        "| arm | setting | ACC % | FGT % | orphan-class acc % | drift after T1 | seconds/seed |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for arm in Arm::ALL {
        let (a, sa) = stat(arm, |r| 100.0 * r.acc);
        let (f, sf) = stat(arm, |r| 100.0 * r.fgt);
        let (or, so) = stat(arm, |r| 100.0 * r.orphan_acc);
        let drift: Vec<f64> = main_runs(arm)
            .iter()
            .filter_map(|r| r.drift.first().copied())
            .collect();
        let drift = if drift.is_empty() {
            "—".to_string()
        } else {
            format!("{:.3e}", mean_std(&drift).0)
        };
        let secs = stat(arm, |r| r.seconds).0;
        table.push_str(&format!(
            "| {} | {} | {a:.2} ± {sa:.2} | {f:.2} ± {sf:.2} | {or:.2} ± {so:.2} | {drift} | {secs:.0} |\n",
            arm.id(),
            arm.description()
        ));
    }
    // The λ sweep (every seed) and H3 under the alternatives to M4 as planned
    // (docs/methods/lifequant.md § Scaled-down experiment).
    let h3 = |acc4: f64, fgt4: f64| -> String {
        let held = fgt4 <= fgt(Arm::M0) - 10.0 && acc4 >= acc(Arm::M0) + 10.0;
        format!(
            "ACC {acc4:.2}, FGT {fgt4:.2}: H3 {}",
            if held { "holds" } else { "fails" }
        )
    };
    let mut sweep = String::new();
    if !sweep_runs.is_empty() {
        sweep = String::from(
            "\nλ sweep of M4 (explicit penalty gradient, as the reference), every seed; `H3` \
             compares with M0 as H3 does:\n\n\
             | λ | seeds finished | ACC % | FGT % | orphan acc % | drift after T1 | H3 with this λ |\n\
             |---|---|---|---|---|---|---|\n",
        );
        let mut lambdas: Vec<f64> = vec![settings.lambda];
        lambdas.extend(settings.lambda_sweep.iter().copied());
        for lambda in lambdas {
            let (finished, diverged): (Vec<&ArmRun>, Vec<&SweepRun>) = if lambda == settings.lambda
            {
                (main_runs(Arm::M4), Vec::new())
            } else {
                let at: Vec<&SweepRun> = sweep_runs.iter().filter(|r| r.lambda == lambda).collect();
                (
                    at.iter().filter_map(|r| r.run.as_ref()).collect(),
                    at.into_iter().filter(|r| r.run.is_none()).collect(),
                )
            };
            let total = finished.len() + diverged.len();
            let diverged_note = if diverged.is_empty() {
                String::new()
            } else {
                format!(
                    " (diverged: {})",
                    diverged
                        .iter()
                        .map(|r| format!(
                            "seed {} at {}",
                            r.seed,
                            r.diverged.as_deref().unwrap_or("?")
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            };
            if finished.is_empty() {
                sweep.push_str(&format!(
                    "| {lambda} | 0 of {total}{diverged_note} | — | — | — | — | — |\n"
                ));
                continue;
            }
            let ms = |f: &dyn Fn(&ArmRun) -> f64| {
                mean_std(&finished.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let (a, sa) = ms(&|r| 100.0 * r.acc);
            let (f, sf) = ms(&|r| 100.0 * r.fgt);
            let (or, so) = ms(&|r| 100.0 * r.orphan_acc);
            let drift = ms(&|r| r.drift.first().copied().unwrap_or(f64::NAN)).0;
            let verdict = if diverged.is_empty() {
                h3(a, f)
            } else {
                "— (not every seed finished)".to_string()
            };
            sweep.push_str(&format!(
                "| {lambda}{} | {} of {total}{diverged_note} | {a:.2} ± {sa:.2} | {f:.2} ± {sf:.2} | \
                 {or:.2} ± {so:.2} | {drift:.3e} | {verdict} |\n",
                if lambda == settings.lambda { " (M4)" } else { "" },
                finished.len(),
            ));
        }
    }
    let prox_h3 = h3(acc(Arm::M4Prox), fgt(Arm::M4Prox));
    let mut pre_table = String::from(
        "| seed | FP32 | 8-bit | 4-bit | 2-bit | seconds |\n|---|---|---|---|---|---|\n",
    );
    for p in &pretraining {
        pre_table.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |\n",
            p.seed,
            100.0 * p.fp32_acc,
            100.0 * p.int8_acc,
            100.0 * p.int4_acc,
            100.0 * p.int2_acc,
            p.seconds
        ));
    }
    let mut order_table =
        String::from("| id | kind | statement | measured | held |\n|---|---|---|---|---|\n");
    for o in &orderings {
        order_table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            o.id,
            if o.hard { "hard" } else { "soft" },
            o.statement,
            o.measured,
            if o.held { "yes" } else { "**no**" }
        ));
    }
    let hard_failed: Vec<&str> = orderings
        .iter()
        .filter(|o| o.hard && !o.held)
        .map(|o| o.id.as_str())
        .collect();
    let soft_held = orderings.iter().filter(|o| !o.hard && o.held).count();
    let verdict = if hard_failed.is_empty() {
        format!("All hard orderings H1–H5 held; {soft_held} of 4 soft orderings held.")
    } else {
        format!(
            "Hard orderings that did **not** hold: {}; {soft_held} of 4 soft orderings held.",
            hard_failed.join(", ")
        )
    };
    let tasks: Vec<String> = scenario
        .tasks()
        .iter()
        .map(|t| {
            format!(
                "T{}: {:?} ({} train images)",
                t.id,
                t.classes,
                t.train.len()
            )
        })
        .collect();
    let markdown = format!(
        "{verdict}\n\n\
         Setup (docs/methods/lifequant.md § Scaled-down experiment): Fashion-MNIST, {per} \
         training images per class (seed 123), {test} \
         test images per class, normalised with the training mean/std. Sliding class window \
         T = 3, d = {d}, class permutation {order:?}: {tasks}. Orphan classes (absent from the \
         last task): {orphans:?}. Model QResNet-8 (widths {w:?}, quantized stem and 1×1 skips, \
         FP32 head), faithful weight grid (σ0 = 0.5). Task 0: FP32 {fp:?} → 8-bit {i8:?} → \
         4-bit {i4:?} (the 2-bit arm re-trains the 4-bit stage at 2 bits from the 8-bit \
         weights); tasks 1–2: {later:?} (epochs, lr, milestones), SGD momentum 0.9, weight \
         decay 1e-4, batch {batch}, a fresh optimizer per task. Replay: δ = {delta} of each \
         finished task (seed 123). ProxQ λ = {lambda}, F = batch-mean squared gradients of the \
         BaLL loss over the replay memory (evaluation mode). BaLL: the paper's linear prior \
         `z + softmax(z)·(K·p − 1)`. Seeds {seeds:?}. ACC = mean_s a[2][s]; FGT = \
         mean_{{s<2}} (max_{{t∈[s,1]}} a[t][s] − a[2][s]) (not clamped).\n\n\
         ## Task 0 (test accuracy %, per stage)\n\n{pre_table}\n\
         ## Arms (mean ± std over seeds)\n\n{table}\n\
         M4-prox is ours, not from the paper: M4's objective with the penalty applied by its \
         proximal step after each SGD step (step η/(1 − μ)) instead of its gradient in the loss; \
         the explicit form diverges wherever η·2λF > 2(1 + μ). With it, {prox_h3}.\n{sweep}\n\
         ## Expected orderings\n\n{order_table}",
        per = settings.train_per_class,
        test = settings
            .test_per_class
            .map_or("all".to_string(), |k| k.to_string()),
        d = settings.diminish_rate,
        order = scenario.class_order(),
        tasks = tasks.join("; "),
        orphans = scenario.orphan_classes(),
        w = settings.widths,
        fp = (
            settings.fp32.epochs,
            settings.fp32.lr,
            &settings.fp32.milestones
        ),
        i8 = (
            settings.int8.epochs,
            settings.int8.lr,
            &settings.int8.milestones
        ),
        i4 = (
            settings.low_bit_t0.epochs,
            settings.low_bit_t0.lr,
            &settings.low_bit_t0.milestones
        ),
        later = (
            settings.later_tasks.epochs,
            settings.later_tasks.lr,
            &settings.later_tasks.milestones
        ),
        batch = settings.batch,
        delta = settings.replay_fraction,
        lambda = settings.lambda,
        seeds = settings.seeds,
    );
    let summary = format!(
        "ACC/FGT %: M0 {:.1}/{:.1}, M2 {:.1}/{:.1}, M4 (LifeQuant) {:.1}/{:.1}, M5 FP32 {:.1}/{:.1}; {}",
        acc(Arm::M0),
        fgt(Arm::M0),
        acc(Arm::M2),
        fgt(Arm::M2),
        acc(Arm::M4),
        fgt(Arm::M4),
        acc(Arm::M5),
        fgt(Arm::M5),
        if hard_failed.is_empty() {
            "H1–H5 held".to_string()
        } else {
            format!("failed: {}", hard_failed.join(", "))
        }
    );
    Ok(Outcome {
        summary,
        figures: json!({
            "settings": settings,
            "class_order": scenario.class_order(),
            "orphan_classes": scenario.orphan_classes(),
            "pretraining": pretraining,
            "runs": runs,
            "lambda_sweep": sweep_runs,
            "orderings": orderings,
            "hard_orderings_held": hard_failed.is_empty(),
            "seconds": started.elapsed().as_secs_f64(),
        }),
        markdown,
        plots,
    })
}

/// ACC and FGT per arm as grouped bars with ±std whiskers.
fn acc_fgt_plot(path: &Path, runs: &[ArmRun], settings: &Settings) -> Result<()> {
    let arms = Arm::ALL;
    let values: Vec<((f64, f64), (f64, f64))> = arms
        .iter()
        .map(|arm| {
            let rows: Vec<&ArmRun> = runs
                .iter()
                .filter(|r| r.arm == arm.id() && r.lambda == settings.lambda)
                .collect();
            (
                mean_std(&rows.iter().map(|r| 100.0 * r.acc).collect::<Vec<_>>()),
                mean_std(&rows.iter().map(|r| 100.0 * r.fgt).collect::<Vec<_>>()),
            )
        })
        .collect();
    let top = values
        .iter()
        .map(|((a, sa), (f, sf))| (a + sa).max(f + sf))
        .fold(10.0f64, f64::max)
        * 1.1;
    let low = values
        .iter()
        .map(|(_, (f, sf))| f - sf)
        .fold(0.0f64, f64::min)
        .min(0.0);
    plot::png(path, (900, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("LifeQuant arms: ACC and FGT (%)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..arms.len() as f64, low..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Ticks every half unit; only those at the middle of an arm's slot get its name.
            .x_labels(2 * arms.len() + 1)
            .x_label_formatter(&|x| {
                if (x.fract() - 0.5).abs() > 0.01 {
                    return String::new();
                }
                arms.get(x.floor() as usize)
                    .map_or(String::new(), |a| a.id().to_string())
            })
            .y_desc("%")
            .draw()?;
        let colours = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
        for (k, (label, colour)) in [("ACC", colours[0]), ("FGT", colours[1])]
            .into_iter()
            .enumerate()
        {
            let bars: Vec<(f64, f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(i, (a, f))| {
                    let (m, s) = if k == 0 { *a } else { *f };
                    (i as f64 + 0.15 + 0.35 * k as f64, m, s)
                })
                .collect();
            chart
                .draw_series(
                    bars.iter().map(|&(x, m, _)| {
                        Rectangle::new([(x, 0.0), (x + 0.3, m)], colour.filled())
                    }),
                )?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
            chart.draw_series(bars.iter().map(|&(x, m, s)| {
                PathElement::new(
                    vec![(x + 0.15, m - s), (x + 0.15, m + s)],
                    BLACK.stroke_width(2),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole experiment, scaled down to seconds, on the committed fixture.
    #[test]
    fn runs_on_the_fixture_and_writes_its_results() {
        let (out, ctx, data) = crate::reproduce::fixture_run();
        let one = TaskScheduleJson::new(1, 0.01, &[]);
        let settings = Settings {
            widths: [4, 4, 8],
            train_per_class: 8,
            test_per_class: Some(4),
            seeds: vec![0, 1],
            fp32: one.clone(),
            int8: one.clone(),
            low_bit_t0: one.clone(),
            later_tasks: one,
            lambda_sweep: vec![1000.0],
            batch: 16,
            ..Settings::for_mode(Mode::Quick)
        };
        let outcome = run_with(&ctx, &data, &settings, &ProgressBar::hidden()).unwrap();
        let runs = outcome.figures["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2 * 8);
        // The sweep runs on every seed.
        assert_eq!(outcome.figures["lambda_sweep"].as_array().unwrap().len(), 2);
        for r in runs {
            let matrix = r["matrix"].as_array().unwrap();
            assert_eq!(matrix.len(), 3);
            assert!(
                matrix[0][0].as_f64().is_some(),
                "row 0 measured from the checkpoint"
            );
            assert!(matrix[2][2].as_f64().is_some());
            let acc = r["acc"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc));
        }
        // The arms that start from the same 4-bit checkpoint share row 0.
        let row0 = |id: &str| {
            runs.iter()
                .find(|r| r["arm"] == id && r["seed"] == 0)
                .unwrap()["matrix"][0][0]
                .as_f64()
                .unwrap()
        };
        assert_eq!(row0("M0"), row0("M4"));
        assert_eq!(outcome.figures["orderings"].as_array().unwrap().len(), 9);
        assert!(outcome.markdown.contains("| H5 |"), "{}", outcome.markdown);
        assert!(outcome.markdown.contains("λ sweep"));
        assert!(outcome.markdown.contains("| M4-prox |"));
        assert!(outcome.markdown.contains("H3 with this λ"));
        for (png, _) in &outcome.plots {
            let bytes = std::fs::read(out.path().join(png)).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{png}");
        }
    }
}
