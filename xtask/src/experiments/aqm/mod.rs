//! `aqm`: online continual compression with adaptive quantization modules (AQM,
//! docs/methods/aqm.md § Fashion-MNIST experiment) on split Fashion-MNIST — fine-tune, ER-raw,
//! raw-AQM, AQM and iid-online at budgets B50 and B20 (1- and 4-byte parameter accounting),
//! AQM's arms (decoded classifier input, reservoir insertion, re-encoding), with the small CNN
//! and the reference's reduced ResNet-18, several seeds; every run is a resumable piece.
//!
//! Modules: [`cells`] aggregates runs over seeds, [`expectations`] judges the expected
//! outcomes, [`diagnosis`] relates the reference AQM's results to its raw-versus-decoded gap,
//! [`report`] writes the text and tables, [`plots`] the figures, [`throughput`] measures one
//! module's training speed.

use std::time::Instant;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use qcl_aqm::online::{run as run_online, Classifier, ClassifierInput, Method, OnlineConfig};
use qcl_aqm::{QLayerConfig, ReencodeConfig, RunResult};
use qcl_continual::{Scenario, SplitConfig};
use serde::{Deserialize, Serialize};

use crate::experiments::OnData;
use crate::reproduce::{Context, Experiment, Mode, Outcome};
use crate::resume::Resume;

pub mod cells;
mod diagnosis;
pub mod expectations;
mod plots;
mod report;
mod throughput;

#[cfg(test)]
mod tests;

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "aqm",
    description: "AQM (docs/methods/aqm.md § Fashion-MNIST experiment) on split Fashion-MNIST: \
                  fine-tune, ER-raw, raw-AQM, AQM (also with decoded classifier input, reservoir \
                  insertion and re-encoding) and iid-online under equal byte budgets B50 and B20 \
                  (1- and 4-byte parameters), with the small CNN and the reduced ResNet-18; final \
                  accuracy over seeds, the expected outcomes judged, diagnostics of the \
                  raw-versus-decoded gap, stored samples, drift, reconstructions.",
    needs_data: true,
    takes_seeds: true,
    run,
};

/// B50 = 50 raw images per class of 10 classes of 784 bytes.
pub const B50: u64 = 392_000;
/// B20.
pub const B20: u64 = 156_800;

/// The reduced ResNet-18 runs: which and at what scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResNetSettings {
    /// Stem width of the reduced ResNet-18.
    pub nf: usize,
    /// Streamed images per task of its runs (None: all, as the small CNN's runs).
    pub samples_per_task: Option<usize>,
    /// Its runs use the first this many seeds (None: every seed).
    pub max_seeds: Option<usize>,
    /// Budgets and parameter bytes of its AQM runs (fine-tune, iid-online, ER-raw and raw-AQM
    /// at B50 and B20 always run).
    pub aqm_budgets: Vec<(u64, u64)>,
}

/// Everything that defines the experiment; recorded in the results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Streamed images per task (None: all after the hold-out).
    pub samples_per_task: Option<usize>,
    /// Test images per class (None: all).
    pub test_per_class: Option<usize>,
    /// Rate of the module's `p` EMA and of the slow decoder.
    pub stat_rate: f64,
    /// The module's threshold `d_th` (MSE in `[-1, 1]` units).
    pub d_th: f64,
    /// Budgets and parameter bytes of the AQM runs.
    pub aqm_budgets: Vec<(u64, u64)>,
    /// Budgets and parameter bytes of the AQM runs whose classifier sees decoded images
    /// ([`ClassifierInput::Decoded`]; ours, see docs/methods/aqm.md § Decoded classifier input).
    pub decoded_budgets: Vec<(u64, u64)>,
    /// Budgets and parameter bytes of the runs of each extension arm (reservoir insertion,
    /// re-encoding, both; docs/methods/aqm.md § Extensions). Re-encoding's `eps_th` is the
    /// stack's `d_th` ([`job_config`]).
    pub extension_budgets: Vec<(u64, u64)>,
    /// The reduced ResNet-18 runs (None: none).
    pub resnet: Option<ResNetSettings>,
    /// Training steps of the module throughput measurement (batch 128).
    pub bench_steps: usize,
}

impl Settings {
    /// The settings of `mode`.
    pub fn for_mode(mode: Mode) -> Self {
        match mode {
            // 1,000 images per task (100 steps): the rate of p is raised to 0.05 so that the
            // module can freeze within task 0 (≥ 45 updates instead of ≥ 230). The ResNet
            // runs stream 500 images per task on the first seed only.
            Mode::Quick => Settings {
                seeds: vec![0, 1, 2],
                samples_per_task: Some(1000),
                test_per_class: Some(300),
                stat_rate: 0.05,
                d_th: QLayerConfig::fashion_mnist().recon_threshold,
                aqm_budgets: vec![(B50, 1), (B20, 1), (B20, 4)],
                decoded_budgets: vec![(B50, 1), (B20, 1)],
                extension_budgets: vec![(B50, 1)],
                resnet: Some(ResNetSettings {
                    nf: 20,
                    samples_per_task: Some(500),
                    max_seeds: Some(1),
                    aqm_budgets: vec![(B50, 1), (B20, 1)],
                }),
                bench_steps: 10,
            },
            Mode::Full => Settings {
                seeds: (0..5).collect(),
                samples_per_task: None,
                test_per_class: None,
                stat_rate: 0.01,
                d_th: QLayerConfig::fashion_mnist().recon_threshold,
                aqm_budgets: vec![(B50, 1), (B50, 4), (B20, 1), (B20, 4)],
                decoded_budgets: vec![(B50, 1), (B20, 1)],
                extension_budgets: vec![(B50, 1), (B20, 1)],
                // Slower per run than the small CNN (see the stream samples/s column): the
                // baselines and AQM at 1-byte parameters (the 4-byte accounting check is the
                // small CNN's).
                resnet: Some(ResNetSettings {
                    nf: 20,
                    samples_per_task: None,
                    max_seeds: None,
                    aqm_budgets: vec![(B50, 1), (B20, 1)],
                }),
                bench_steps: 30,
            },
        }
    }

    /// [`Settings::for_mode`] of the context's mode, with seeds `0..n` when it asks for `n`.
    pub fn for_context(ctx: &Context) -> Self {
        let mut settings = Settings::for_mode(ctx.mode);
        if let Some(n) = ctx.seeds {
            settings.seeds = (0..n).collect();
        }
        settings
    }
}

/// Which variant of AQM a run is (the reference for the other methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arm {
    /// The reference code's loop.
    Reference,
    /// The classifier sees decoded images once the module froze (ours).
    DecodedInput,
    /// Reservoir insertion (paper Alg. 4).
    Reservoir,
    /// Re-encoding of replayed compressed samples.
    Reencode,
    /// Both extensions.
    ReservoirReencode,
}

impl Arm {
    /// The extension arms.
    pub const EXTENSIONS: [Arm; 3] = [Arm::Reservoir, Arm::Reencode, Arm::ReservoirReencode];

    /// The name of an AQM run of this arm in the results.
    pub fn aqm_name(self) -> &'static str {
        match self {
            Arm::Reference => "AQM",
            Arm::DecodedInput => "AQM, decoded input (ours)",
            Arm::Reservoir => "AQM + reservoir",
            Arm::Reencode => "AQM + re-encoding",
            Arm::ReservoirReencode => "AQM + reservoir + re-encoding",
        }
    }
}

/// One stream run, repeated over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Job {
    /// The method.
    pub method: Method,
    /// Budget in bytes.
    pub budget: u64,
    /// Bytes per module parameter.
    pub param_bytes: u64,
    /// The classifier.
    pub classifier: Classifier,
    /// The AQM variant ([`Arm::Reference`] for the other methods).
    pub arm: Arm,
}

impl Job {
    fn new(method: Method, (budget, param_bytes): (u64, u64), classifier: Classifier) -> Self {
        Job {
            method,
            budget,
            param_bytes,
            classifier,
            arm: Arm::Reference,
        }
    }

    fn arm(self, arm: Arm) -> Self {
        Job { arm, ..self }
    }

    /// The method's name in the results (AQM with its arm).
    pub fn name(&self) -> &'static str {
        match self.method {
            Method::Aqm => self.arm.aqm_name(),
            m => m.name(),
        }
    }

    /// The budget's name (`-` for the methods without memory).
    pub fn budget_name(&self) -> &'static str {
        if matches!(self.method, Method::FineTune | Method::IidOnline) {
            "-"
        } else {
            budget_name(self.budget)
        }
    }

    /// A readable key: name, budget, bytes, classifier (for pieces and plot labels).
    pub fn key(&self) -> String {
        let name: String = self
            .name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!(
            "{name}_{}_{}B_{}",
            self.budget_name(),
            self.param_bytes,
            self.classifier.tag()
        )
    }
}

fn budget_name(b: u64) -> &'static str {
    if b == B50 {
        "B50"
    } else if b == B20 {
        "B20"
    } else {
        "-"
    }
}

/// The runs of the table, in its order: the small CNN's, then the ResNet-18's.
pub fn jobs(settings: &Settings) -> Vec<Job> {
    let small = Classifier::SmallCnn;
    let mut jobs = baseline_jobs(small);
    for &b in &settings.aqm_budgets {
        jobs.push(Job::new(Method::Aqm, b, small));
    }
    for &b in &settings.decoded_budgets {
        jobs.push(Job::new(Method::Aqm, b, small).arm(Arm::DecodedInput));
    }
    for arm in Arm::EXTENSIONS {
        for &b in &settings.extension_budgets {
            jobs.push(Job::new(Method::Aqm, b, small).arm(arm));
        }
    }
    if let Some(r) = &settings.resnet {
        let resnet = Classifier::ReducedResNet18 { nf: r.nf };
        jobs.extend(baseline_jobs(resnet));
        for &b in &r.aqm_budgets {
            jobs.push(Job::new(Method::Aqm, b, resnet));
        }
    }
    jobs
}

/// Fine-tune, iid-online, and ER-raw and raw-AQM at B50 and B20.
fn baseline_jobs(classifier: Classifier) -> Vec<Job> {
    let mut jobs = vec![
        Job::new(Method::FineTune, (B50, 1), classifier),
        Job::new(Method::IidOnline, (B50, 1), classifier),
    ];
    for b in [B50, B20] {
        jobs.push(Job::new(Method::ErRaw, (b, 1), classifier));
        jobs.push(Job::new(Method::RawAqm, (b, 1), classifier));
    }
    jobs
}

/// The seeds a job runs on.
pub fn job_seeds(settings: &Settings, job: &Job) -> Vec<u64> {
    match (&settings.resnet, job.classifier) {
        (Some(r), Classifier::ReducedResNet18 { .. }) => {
            let n = r.max_seeds.unwrap_or(settings.seeds.len());
            settings.seeds.iter().copied().take(n).collect()
        }
        _ => settings.seeds.clone(),
    }
}

/// The configuration of `job` on `seed`.
pub fn job_config(settings: &Settings, job: &Job, seed: u64) -> OnlineConfig {
    let mut config = OnlineConfig::fashion_mnist(job.method, job.budget);
    config.param_bytes = job.param_bytes;
    config.classifier = job.classifier;
    config.classifier_input = match job.arm {
        Arm::DecodedInput => ClassifierInput::Decoded,
        _ => ClassifierInput::Raw,
    };
    config.reservoir_insertion = matches!(job.arm, Arm::Reservoir | Arm::ReservoirReencode);
    config.samples_per_task = match (&settings.resnet, job.classifier) {
        (Some(r), Classifier::ReducedResNet18 { .. }) => r.samples_per_task,
        _ => settings.samples_per_task,
    };
    config.test_per_class = settings.test_per_class;
    config.seed = qcl_tensor::Seed::new(seed);
    config.stack.layers[0].stat_rate = settings.stat_rate;
    config.stack.layers[0].ema_decoder_rate = settings.stat_rate;
    config.stack.layers[0].recon_threshold = settings.d_th;
    // eps_th = d_th (docs/methods/aqm.md § Fashion-MNIST experiment): the stack's threshold.
    let d_th = config.stack.layers[0].recon_threshold;
    config.reencode = matches!(job.arm, Arm::Reencode | Arm::ReservoirReencode)
        .then(|| ReencodeConfig::paper(d_th));
    let steps = config.samples_per_task.unwrap_or(10_800) / config.batch_size;
    config.record_every = (steps / 20).max(1);
    config.drift_every = (steps / 4).max(1);
    config
}

/// A finished run as a resumable piece: the result with the examples its JSON skips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Piece {
    /// The run.
    pub result: RunResult,
    /// Originals and reconstructions of stored codes (`RunResult::examples`).
    pub examples: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One run of a job on one seed.
#[derive(Debug, Clone)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// The run, examples included.
    pub result: RunResult,
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let data = OnData::fashion_mnist(ctx)?;
    let outcome = run_with(OnData::new(ctx, &data, bar), &Settings::for_context(ctx));
    if let Err(e) = &outcome {
        // The harness reports failures on the progress bar, which is hidden without a terminal.
        eprintln!("aqm: {e:#}");
    }
    outcome
}

/// The experiment on `data` with `settings`.
pub fn run_with(on: OnData<'_>, settings: &Settings) -> Result<Outcome> {
    let OnData { ctx, data, bar } = on;
    anyhow::ensure!(!settings.seeds.is_empty(), "aqm: the settings name no seed");
    let scenario = Scenario::class_incremental(data, &SplitConfig::default())?;
    let jobs = jobs(settings);
    let resume = Resume::new(ctx, EXPERIMENT.name);
    let started = Instant::now();
    let runs = run_streams(&scenario, settings, &jobs, &resume, bar)?;
    let stream_seconds = started.elapsed().as_secs_f64();
    bar.set_message("aqm: module throughput");
    let speed = throughput::measure(settings.bench_steps)?;
    report::outcome(
        (ctx, &scenario),
        settings,
        &jobs,
        &runs,
        (stream_seconds, speed, resume.note()),
    )
}

/// Every job on its seeds, each run read back from an earlier start through `resume` when
/// one finished it (the piece is keyed by the run's whole configuration).
fn run_streams(
    scenario: &Scenario,
    settings: &Settings,
    jobs: &[Job],
    resume: &Resume,
    bar: &ProgressBar,
) -> Result<Vec<Vec<SeedRun>>> {
    let total: usize = jobs.iter().map(|j| job_seeds(settings, j).len()).sum();
    bar.set_length(bar.length().unwrap_or(0) + total as u64);
    let mut runs: Vec<Vec<SeedRun>> = vec![Vec::new(); jobs.len()];
    // Seed by seed, so that a stopped run has whole seeds finished.
    for &seed in &settings.seeds {
        for (j, job) in jobs.iter().enumerate() {
            if !job_seeds(settings, job).contains(&seed) {
                continue;
            }
            let key = format!("{}_seed{seed}", job.key());
            bar.set_message(format!("aqm: {key}"));
            let config = job_config(settings, job, seed);
            let piece = resume.scope(&config)?.json(&key, || {
                let mut result = run_online(scenario, &config, None)
                    .with_context(|| format!("aqm run {key}"))?;
                let examples = std::mem::take(&mut result.examples);
                Ok(Piece { result, examples })
            })?;
            let mut result = piece.result;
            result.examples = piece.examples;
            runs[j].push(SeedRun { seed, result });
            bar.inc(1);
        }
    }
    Ok(runs)
}
