//! The online classification loop (docs/methods/aqm.md § The online loop) with the baselines
//! of its § Fashion-MNIST experiment, and drift measurement.

use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use qcl_continual::{RawImage, ReservoirBuffer, Scenario};
use qcl_data::Dataset;
use qcl_nn::optim::{Sgd, SgdConfig};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Result, Seed, SeededRng};
use serde::{Deserialize, Serialize};

use crate::config::StackConfig;
use crate::memory::{AdaptiveMemory, Reencoded, REENCODE_FULLNESS};
use crate::stack::QStack;

mod classifier;
mod drift;
mod record;
mod steps;
#[cfg(test)]
mod tests;
pub use classifier::Classifier;
use classifier::Net;
use drift::decode_adaptive;
pub use drift::measure_drift;
use record::{Records, TaskEnd};
use steps::{
    classifier_step, final_accuracy_and_forgetting, image_geometry, incoming_samples, memory_point,
    memory_summary, new_replay, replay_batch, stream_batches, test_sets, update_memory,
};

/// The compared methods (docs/methods/aqm.md § Fashion-MNIST experiment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// No replay.
    FineTune,
    /// Raw images in a reservoir (Vitter R) of `⌊budget / image bytes⌋` slots.
    ErRaw,
    /// The adaptive memory (docs/methods/aqm.md § The memory) without any module
    /// (class-balanced eviction of raw images).
    RawAqm,
    /// The full method.
    Aqm,
    /// One pass over the shuffled union of all tasks (upper bound).
    IidOnline,
}

impl Method {
    /// The name used in results.
    pub fn name(self) -> &'static str {
        match self {
            Method::FineTune => "fine-tune",
            Method::ErRaw => "ER-raw",
            Method::RawAqm => "raw-AQM",
            Method::Aqm => "AQM",
            Method::IidOnline => "iid-online",
        }
    }
}

/// What the classifier of [`Method::Aqm`] is trained and tested on.
///
/// The reference loop trains on raw incoming images and decoded replay, and tests on raw
/// images. Over a long stream the classifier can then learn "decoded-looking ⇒ an old class",
/// which raw test images of old classes do not satisfy. `Decoded` removes that cue: once the
/// deepest module is frozen, incoming images reach the classifier as their reconstruction from
/// codes (encoder, codebook, slow decoder — the path every stored sample takes), and test
/// images pass through the same path. Other methods ignore this setting.
///
/// ```
/// use qcl_aqm::online::{ClassifierInput, Method, OnlineConfig};
/// let mut config = OnlineConfig::fashion_mnist(Method::Aqm, 392_000);
/// assert_eq!(config.classifier_input, ClassifierInput::Raw); // the reference code
/// config.classifier_input = ClassifierInput::Decoded;
/// let json = serde_json::to_string(&config)?;
/// assert!(json.contains(r#""classifier_input":"decoded""#));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassifierInput {
    /// Raw incoming and test images, decoded replay (the reference code).
    #[default]
    Raw,
    /// Decoded incoming, replay and test images once the deepest module is frozen.
    Decoded,
}

/// Re-encoding of replayed compressed samples (docs/methods/aqm.md § Extensions; the paper's
/// "update buffer representation"): while the memory is at least `min_fullness` full, each
/// replayed sample stored as codes moves to the deepest frozen module that reconstructs it
/// within `eps_th`, if that is deeper than its own, else takes fresh indices from the current
/// encoder ([`AdaptiveMemory::reencode`]).
///
/// ```
/// use qcl_aqm::online::ReencodeConfig;
/// let r = ReencodeConfig::paper(0.1);
/// assert_eq!((r.eps_th, r.min_fullness), (0.1, 0.95));
/// assert!(ReencodeConfig { eps_th: -1.0, ..r }.validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReencodeConfig {
    /// `eps_th`, the threshold (MSE in `[-1, 1]` units) that replaces `d_th` for samples
    /// already stored as codes; must be > 0.
    pub eps_th: f64,
    /// The fill level `used / mem_size` from which replayed samples are re-encoded (0.95).
    #[serde(default = "default_fullness")]
    pub min_fullness: f64,
}

fn default_fullness() -> f64 {
    REENCODE_FULLNESS
}

impl ReencodeConfig {
    /// The paper's rule with threshold `eps_th`: re-encode once the memory is 95 % full.
    pub fn paper(eps_th: f64) -> Self {
        ReencodeConfig {
            eps_th,
            min_fullness: REENCODE_FULLNESS,
        }
    }

    /// Checks the setting.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `eps_th` not finite and positive or `min_fullness`
    /// outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps_th.is_finite() && self.eps_th > 0.0) {
            return Err(Error::invalid_parameter(
                "reencode.eps_th",
                format!("must be finite and positive, got {}", self.eps_th),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_fullness) {
            return Err(Error::invalid_parameter(
                "reencode.min_fullness",
                format!("must be in [0, 1], got {}", self.min_fullness),
            ));
        }
        Ok(())
    }
}

/// Everything that defines one run. Fields added after the first release default (in JSON
/// too) to the behaviour before them: the small CNN, the reference insertion, no re-encoding.
///
/// ```
/// use qcl_aqm::online::{Classifier, Method, OnlineConfig, ReencodeConfig};
/// let mut config = OnlineConfig::fashion_mnist(Method::Aqm, 392_000);
/// assert!(!config.reservoir_insertion && config.reencode.is_none());
/// config.classifier = Classifier::reference();
/// config.reservoir_insertion = true;
/// config.reencode = Some(ReencodeConfig::paper(0.1));
/// let back: OnlineConfig = serde_json::from_str(&serde_json::to_string(&config)?)?;
/// assert_eq!(back, config);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineConfig {
    /// The method.
    pub method: Method,
    /// What the AQM classifier sees (default [`ClassifierInput::Raw`], the reference).
    #[serde(default)]
    pub classifier_input: ClassifierInput,
    /// The classifier (default [`Classifier::SmallCnn`]).
    #[serde(default)]
    pub classifier: Classifier,
    /// Reservoir insertion for raw-AQM and AQM ([`crate::InsertionRule::Reservoir`]; paper
    /// Alg. 4); off by default.
    #[serde(default)]
    pub reservoir_insertion: bool,
    /// Re-encoding of replayed compressed samples (AQM); `None`, the default, is off.
    #[serde(default)]
    pub reencode: Option<ReencodeConfig>,
    /// Modules (used by [`Method::Aqm`]).
    pub stack: StackConfig,
    /// Total memory budget in bytes (B50 on Fashion-MNIST: 392,000).
    pub budget_bytes: u64,
    /// Bytes per model parameter, 1 or 4.
    pub param_bytes: u64,
    /// Incoming batch size (10).
    pub batch_size: usize,
    /// Replay batch size (10).
    pub replay_size: usize,
    /// Classifier SGD learning rate (0.05).
    pub classifier_lr: f64,
    /// Fraction of each task's training images held out (0.1).
    pub holdout_fraction: f64,
    /// Streamed images per task after the hold-out (`None`: all).
    pub samples_per_task: Option<usize>,
    /// Test images per class (`None`: all).
    pub test_per_class: Option<usize>,
    /// Steps between two points of the stored-sample curve.
    pub record_every: usize,
    /// Steps between two drift measurements (also measured at each task end).
    pub drift_every: usize,
    /// Stored samples kept for the original-vs-reconstruction grid.
    pub examples: usize,
    /// Seed of everything.
    pub seed: Seed,
}

impl OnlineConfig {
    /// The defaults of docs/methods/aqm.md § Fashion-MNIST experiment for `method` at
    /// `budget_bytes`.
    pub fn fashion_mnist(method: Method, budget_bytes: u64) -> Self {
        OnlineConfig {
            method,
            classifier_input: ClassifierInput::Raw,
            classifier: Classifier::SmallCnn,
            reservoir_insertion: false,
            reencode: None,
            stack: StackConfig::fashion_mnist(),
            budget_bytes,
            param_bytes: 1,
            batch_size: 10,
            replay_size: 10,
            classifier_lr: 0.05,
            holdout_fraction: 0.1,
            samples_per_task: None,
            test_per_class: None,
            record_every: 100,
            drift_every: 500,
            examples: 16,
            seed: Seed::new(0),
        }
    }
}

/// One point of the stored-sample curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPoint {
    /// Steps done.
    pub step: u64,
    /// Samples stored per block (0 raw, then modules); ER-raw and raw-AQM have one block.
    pub per_block: Vec<usize>,
    /// Bytes used (bits / 8).
    pub used_bytes: f64,
    /// Bytes available to samples.
    pub capacity_bytes: f64,
}

/// One drift measurement (docs/methods/aqm.md § The online loop; the reference code's
/// `eval.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftPoint {
    /// Steps done.
    pub step: u64,
    /// Mean MSE of decoded stored codes against their originals, per module (None: no codes).
    pub per_module: Vec<Option<f64>>,
    /// The same over every stored code.
    pub all: Option<f64>,
    /// The same over samples of task 0 ("drift0").
    pub task0: Option<f64>,
    /// Codes measured.
    pub samples: usize,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The configuration.
    pub config: OnlineConfig,
    /// `R[i][j]`, test accuracy on task j after task i.
    pub accuracy: Vec<Vec<Option<f64>>>,
    /// Mean accuracy over all tasks at the end.
    pub final_accuracy: f64,
    /// Mean forgetting (None for iid-online).
    pub forgetting: Option<f64>,
    /// Stored samples over the stream.
    pub memory_curve: Vec<MemoryPoint>,
    /// Drift over the stream (AQM only).
    pub drift: Vec<DriftPoint>,
    /// Stored samples at the end.
    pub stored_at_end: usize,
    /// Step at which each module froze.
    pub freeze_steps: Vec<Option<u64>>,
    /// K' of each module.
    pub trimmed_codes: Vec<Option<usize>>,
    /// Per module, `avg_l2` at the end.
    pub avg_l2: Vec<f64>,
    /// Model cost charged at the end (parameters).
    pub model_cost_params: u64,
    /// Incoming samples streamed.
    pub samples_streamed: usize,
    /// Seconds inside the training loop (evaluation and drift excluded).
    pub loop_seconds: f64,
    /// `samples_streamed / loop_seconds`.
    pub samples_per_second: f64,
    /// AQM only: final test accuracy per task on test images passed through the frozen
    /// module (encode, quantize, slow decoder) — a diagnostic of the gap between the decoded
    /// replay the classifier learns old classes from and the raw images it is tested on.
    pub accuracy_on_reconstructions: Option<Vec<f64>>,
    /// Per task, the mean over its classifier steps with replay of the share of decoded
    /// images (rebuilt from codes) among the replay images (`None`: no replay in that task).
    #[serde(default)]
    pub decoded_replay_share: Vec<Option<f64>>,
    /// AQM only: `[i][j]`, accuracy on the raw test images of task j after task i.
    #[serde(default)]
    pub raw_test_accuracy: Vec<Vec<Option<f64>>>,
    /// AQM only: `[i][j]`, accuracy on the test images of task j passed through the frozen
    /// modules after task i (`None` before every module froze); with `raw_test_accuracy`, the
    /// raw-versus-decoded gap over time.
    #[serde(default)]
    pub decoded_test_accuracy: Vec<Vec<Option<f64>>>,
    /// Replayed compressed samples moved deeper or refreshed by re-encoding.
    #[serde(default)]
    pub reencoded: Reencoded,
    /// Raw-AQM and AQM: incoming samples stored on arrival (all but those reservoir
    /// insertion turned away).
    #[serde(default)]
    pub admitted: Option<u64>,
    /// Originals and reconstructions of stored compressed samples (u8, C·H·W each).
    #[serde(skip)]
    pub examples: Vec<(Vec<u8>, Vec<u8>)>,
}

fn to_tensor(images: &[&[u8]], shape: [usize; 3], device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(images.len() * shape.iter().product::<usize>());
    for im in images {
        v.extend(im.iter().map(|&p| (f32::from(p) / 255.0 - 0.5) * 2.0));
    }
    Ok(Tensor::from_vec(
        v,
        (images.len(), shape[0], shape[1], shape[2]),
        device,
    )?)
}

/// `[-1, 1]` floats back to `u8` (rounded, clamped).
pub fn to_u8(x: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    Ok(v.iter()
        .map(|&f| ((f / 2.0 + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect())
}

/// Training images of each task after the hold-out and the optional cap, in a seeded order.
fn stream_sets(scenario: &Scenario, config: &OnlineConfig, seed: Seed) -> Result<Vec<Dataset>> {
    scenario
        .tasks()
        .iter()
        .map(|task| {
            let n = task.train.len();
            let mut order = seed
                .child_named("holdout")
                .child(task.id as u64)
                .rng()
                .permutation(n);
            let keep = n - (n as f64 * config.holdout_fraction).round() as usize;
            order.truncate(keep);
            if let Some(cap) = config.samples_per_task {
                order.truncate(cap);
            }
            order.sort_unstable();
            task.train.subset(&order)
        })
        .collect()
}

/// `x` as the classifier of a decoded-input run sees it: through the deepest module and its
/// slow decoder, when every module is frozen (else unchanged).
pub(super) fn through_frozen_stack(stack: &mut QStack, x: &Tensor) -> Result<Tensor> {
    if !stack.all_frozen() {
        return Ok(x.clone());
    }
    let deepest = stack.layers().len();
    let (outs, _) = stack.forward(x, false)?;
    stack.decode_codes(deepest, &outs[deepest - 1].indices)
}

/// State of the replay side of a run.
enum Replay {
    None,
    Reservoir(Box<ReservoirBuffer<RawImage>>, Box<SeededRng>),
    Adaptive(Box<AdaptiveMemory>, Option<QStack>),
}

/// Decoded replay batch.
struct ReplayBatch {
    x: Tensor,
    y: Tensor,
    ids: Vec<qcl_continual::ItemId>,
    /// Rows decoded from codes (the rest are raw images).
    decoded: usize,
}

/// Runs one method over the class-incremental `scenario` (docs/methods/aqm.md
/// § The online loop, § Fashion-MNIST experiment).
///
/// ```
/// use qcl_aqm::online::{run, Method, OnlineConfig};
/// use qcl_continual::{Scenario, SplitConfig};
/// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
/// let data = qcl_data::SplitDataset::load(path)?;
/// let scenario = Scenario::class_incremental(&data, &SplitConfig::default())?;
/// let mut config = OnlineConfig::fashion_mnist(Method::ErRaw, 20 * 784);
/// config.samples_per_task = Some(20);
/// config.test_per_class = Some(5);
/// let result = run(&scenario, &config, None)?;
/// assert_eq!(result.samples_streamed, 100);
/// assert_eq!(result.stored_at_end, 20); // 20 raw images fit in the budget
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a budget smaller than the model cost or bad sizes; the
/// errors of the modules and the memory.
pub fn run(
    scenario: &Scenario,
    config: &OnlineConfig,
    bar: Option<&ProgressBar>,
) -> Result<RunResult> {
    let device = Device::Cpu;
    let seed = config.seed;
    let (shape, image_bytes) = image_geometry(scenario, config)?;
    let num_classes = scenario.num_classes();
    let num_tasks = scenario.num_tasks();
    let sets = stream_sets(scenario, config, seed)?;
    let tests = test_sets(scenario, config);

    let store = ParamStore::new(seed.child_named("classifier"));
    let net = Net::new(config.classifier, &store, shape, num_classes, &device)?;
    let mut sgd = Sgd::new(
        store.trainable(),
        SgdConfig {
            lr: config.classifier_lr,
            ..Default::default()
        },
    )?;

    let mut replay = new_replay(config, seed, image_bytes, &device)?;

    let batches = stream_batches(config, &sets, seed);
    if let Some(bar) = bar {
        bar.set_length(batches.len() as u64);
        bar.set_position(0);
    }

    let mut records = Records::new(num_tasks, config)?;
    let mut memory_curve = Vec::new();
    let mut drift = Vec::new();
    let mut loop_seconds = 0.0;
    let mut streamed = 0usize;
    let mut freeze_steps: Vec<Option<u64>> = vec![None; config.stack.layers.len()];
    let mut reencoded = Reencoded::default();
    let decoded_input =
        config.method == Method::Aqm && config.classifier_input == ClassifierInput::Decoded;

    for (step, batch) in batches.iter().enumerate() {
        let started = Instant::now();
        let step = step as u64;
        let task = batch[0].0;
        let images: Vec<&[u8]> = batch.iter().map(|&(t, i)| sets[t].image(i)).collect();
        let labels: Vec<u32> = batch.iter().map(|&(t, i)| sets[t].labels()[i]).collect();
        let x_inc = to_tensor(&images, shape, &device)?;
        let y_inc = Tensor::from_vec(labels.clone(), labels.len(), &device)?;

        let replay_batch = replay_batch(&mut replay, config, task, shape, &device)?;
        records.replay(task, replay_batch.as_ref());
        let n_re = replay_batch.as_ref().map_or(0, |r| r.y.dims()[0]);
        let x_all = match &replay_batch {
            Some(r) => Tensor::cat(&[&x_inc, &r.x], 0)?,
            None => x_inc.clone(),
        };

        // Modules first (their forward uses the pre-update weights for the insertion).
        let stack_step = match &mut replay {
            Replay::Adaptive(_, Some(stack)) => Some(stack.train_step(&x_all, n_re)?),
            _ => None,
        };

        classifier_step(
            (&net, &mut sgd),
            (&x_inc, &y_inc),
            (&replay, stack_step.as_ref(), replay_batch.as_ref()),
            decoded_input,
        )?;

        reencoded += update_memory(
            &mut replay,
            incoming_samples(batch, &labels, &sets),
            (stack_step, &x_all),
            (replay_batch.as_ref(), config.reencode),
            step,
            &mut freeze_steps,
        )?;
        loop_seconds += started.elapsed().as_secs_f64();
        streamed += batch.len();
        if let Some(bar) = bar {
            bar.inc(1);
        }

        // Records.
        let last_of_task = batches
            .get(step as usize + 1)
            .is_none_or(|b| b[0].0 != task)
            || config.method == Method::IidOnline && step as usize + 1 == batches.len();
        if step.is_multiple_of(config.record_every.max(1) as u64) || last_of_task {
            let point = memory_point(&replay, config, step);
            memory_curve.push(point);
        }
        if let Replay::Adaptive(memory, Some(stack)) = &replay {
            let memory: &AdaptiveMemory = memory;
            if step.is_multiple_of(config.drift_every.max(1) as u64) || last_of_task {
                drift.push(measure_drift(memory, stack, &sets, step + 1)?);
            }
        }
        if last_of_task && config.method != Method::IidOnline {
            records.task_end(TaskEnd::new(&net, &mut replay, &tests, &device), task)?;
        }
    }
    if config.method == Method::IidOnline {
        records.task_end(
            TaskEnd::new(&net, &mut replay, &tests, &device),
            num_tasks - 1,
        )?;
    }
    let (final_accuracy, forgetting) =
        final_accuracy_and_forgetting(&records.matrix, config.method)?;

    let (stored_at_end, model_cost_params, examples, trimmed_codes, avg_l2) =
        memory_summary(&replay, config, &sets, shape, &device)?;
    if config.method != Method::Aqm {
        freeze_steps.clear();
    }
    let admitted = match &replay {
        Replay::Adaptive(memory, _) => Some(memory.admitted()),
        _ => None,
    };
    let recorded = records.finish();
    Ok(RunResult {
        config: config.clone(),
        accuracy: recorded.accuracy,
        final_accuracy,
        forgetting,
        memory_curve,
        drift,
        stored_at_end,
        freeze_steps,
        trimmed_codes,
        avg_l2,
        model_cost_params,
        samples_streamed: streamed,
        loop_seconds,
        samples_per_second: streamed as f64 / loop_seconds.max(1e-9),
        accuracy_on_reconstructions: recorded.accuracy_on_reconstructions,
        decoded_replay_share: recorded.decoded_replay_share,
        raw_test_accuracy: recorded.raw_test_accuracy,
        decoded_test_accuracy: recorded.decoded_test_accuracy,
        reencoded,
        admitted,
        examples,
    })
}
