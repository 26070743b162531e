//! The online classification loop (docs/methods/aqm.md § The online loop) with the baselines
//! of its § Fashion-MNIST experiment, and drift measurement.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use qcl_continual::ball::cross_entropy;
use qcl_continual::{
    AccuracyMatrix, Capacity, Filter, RawImage, ReplayBuffer, ReservoirBuffer, Scenario,
};
use qcl_data::Dataset;
use qcl_nn::layers::Module;
use qcl_nn::models::SmallCnn;
use qcl_nn::optim::{Optimizer, Sgd, SgdParams};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Result, Seed, SeededRng};
use qcl_vq::PackedIndices;
use serde::{Deserialize, Serialize};

use crate::config::StackConfig;
use crate::memory::{AdaptiveMemory, IncomingSample, MemoryConfig, Payload, ReplayItem};
use crate::stack::QStack;

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

/// Everything that defines one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineConfig {
    /// The method.
    pub method: Method,
    /// What the AQM classifier sees (default [`ClassifierInput::Raw`], the reference).
    #[serde(default)]
    pub classifier_input: ClassifierInput,
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
fn through_frozen_stack(stack: &mut QStack, x: &Tensor) -> Result<Tensor> {
    if !stack.all_frozen() {
        return Ok(x.clone());
    }
    let deepest = stack.layers().len();
    let (outs, _) = stack.forward(x, false)?;
    stack.decode_codes(deepest, &outs[deepest - 1].indices)
}

/// Test accuracy of `net` on `data`; with a stack, on the images passed through it
/// ([`through_frozen_stack`]).
fn accuracy(
    net: &SmallCnn,
    data: &Dataset,
    mut stack: Option<&mut QStack>,
    device: &Device,
) -> Result<f64> {
    let mut correct = 0usize;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(500) {
        let (x, y) = data.tensors_at(chunk, qcl_data::Normalization::Symmetric, device)?;
        let x = match stack.as_deref_mut() {
            Some(stack) => through_frozen_stack(stack, &x)?,
            None => x,
        };
        let pred: Vec<u32> = net.forward(&x)?.argmax(1)?.to_vec1()?;
        let y: Vec<u32> = y.to_vec1()?;
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

/// State of the replay side of a run.
enum Replay {
    None,
    Reservoir(Box<ReservoirBuffer<RawImage>>, SeededRng),
    Adaptive(AdaptiveMemory, Option<QStack>),
}

/// Decoded replay batch.
struct ReplayBatch {
    x: Tensor,
    y: Tensor,
    ids: Vec<qcl_continual::ItemId>,
}

fn decode_adaptive(
    items: &[ReplayItem],
    stack: Option<&QStack>,
    shape: [usize; 3],
    device: &Device,
) -> Result<Vec<Tensor>> {
    // Decode group by group (raw, then each module), keeping the items' order.
    let mut out: Vec<Option<Tensor>> = vec![None; items.len()];
    let mut by_block: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        by_block.entry(it.block).or_default().push(i);
    }
    for (block, rows) in by_block {
        let x = if block == 0 {
            let imgs: Vec<&[u8]> = rows
                .iter()
                .map(|&i| match &items[i].sample.payload {
                    Payload::Raw(px) => Ok(px.as_slice()),
                    Payload::Codes(_) => {
                        Err(Error::invalid_parameter("memory", "codes in block 0"))
                    }
                })
                .collect::<Result<_>>()?;
            to_tensor(&imgs, shape, device)?
        } else {
            let stack =
                stack.ok_or_else(|| Error::invalid_parameter("memory", "codes without a stack"))?;
            let mut all = Vec::new();
            let mut ishape = Vec::new();
            for &i in &rows {
                match &items[i].sample.payload {
                    Payload::Codes(p) => {
                        all.extend(p.unpack());
                        ishape = p.shape().to_vec();
                    }
                    Payload::Raw(_) => {
                        return Err(Error::invalid_parameter(
                            "memory",
                            "raw image in a code block",
                        ))
                    }
                }
            }
            ishape[0] = rows.len();
            let idx = Tensor::from_vec(all, ishape.as_slice(), device)?;
            stack.decode_codes(block, &idx)?
        };
        for (k, &i) in rows.iter().enumerate() {
            out[i] = Some(x.narrow(0, k, 1)?);
        }
    }
    out.into_iter()
        .map(|t| t.ok_or_else(|| Error::EmptyInput("replay".into())))
        .collect()
}

/// Mean MSE of every stored code, decoded with the current slow decoders, against its
/// original image (drift, docs/methods/aqm.md § The online loop); `sets[t]` is the streamed
/// training set of task t.
///
/// # Errors
/// Decoding errors; [`Error::InvalidParameter`] for a dataset index out of range.
pub fn measure_drift(
    memory: &AdaptiveMemory,
    stack: &QStack,
    sets: &[Dataset],
    step: u64,
) -> Result<DriftPoint> {
    let device = stack.device().clone();
    let shape = stack.config().image;
    let mut per_module = Vec::new();
    let (mut sum_all, mut n_all, mut sum0, mut n0) = (0.0, 0usize, 0.0, 0usize);
    for block in 1..memory.num_blocks() {
        let entries = memory.block(block);
        let (mut s, mut n) = (0.0, 0usize);
        for chunk in entries.chunks(256) {
            let items: Vec<ReplayItem> = chunk
                .iter()
                .map(|e| ReplayItem {
                    id: e.id,
                    block,
                    label: e.label,
                    task: e.task,
                    sample: e.item.clone(),
                })
                .collect();
            let decoded = Tensor::cat(&decode_adaptive(&items, Some(stack), shape, &device)?, 0)?;
            let originals: Vec<&[u8]> = chunk
                .iter()
                .map(|e| {
                    let set = sets
                        .get(e.task)
                        .ok_or_else(|| Error::invalid_parameter("task", "out of range"))?;
                    if e.item.dataset_index >= set.len() {
                        return Err(Error::invalid_parameter("dataset_index", "out of range"));
                    }
                    Ok(set.image(e.item.dataset_index))
                })
                .collect::<Result<_>>()?;
            let x = to_tensor(&originals, shape, &device)?;
            let mse = crate::stack::per_sample_mse(&decoded, &x)?;
            for (e, m) in chunk.iter().zip(mse) {
                s += m;
                n += 1;
                if e.task == 0 {
                    sum0 += m;
                    n0 += 1;
                }
            }
        }
        sum_all += s;
        n_all += n;
        per_module.push((n > 0).then(|| s / n as f64));
    }
    Ok(DriftPoint {
        step,
        per_module,
        all: (n_all > 0).then(|| sum_all / n_all as f64),
        task0: (n0 > 0).then(|| sum0 / n0 as f64),
        samples: n_all,
    })
}

/// Runs one method over the class-incremental `scenario` (docs/methods/aqm.md
/// § The online loop, § Fashion-MNIST experiment).
///
/// ```
/// use qcl_aqm::online::{run, Method, OnlineConfig};
/// use qcl_continual::{Scenario, SplitParams};
/// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
/// let data = qcl_data::SplitDataset::load(path)?;
/// let scenario = Scenario::class_incremental(&data, &SplitParams::default())?;
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
    if config.batch_size == 0 {
        return Err(Error::invalid_parameter("batch_size", "must be positive"));
    }
    if !(0.0..1.0).contains(&config.holdout_fraction) {
        return Err(Error::invalid_parameter(
            "holdout_fraction",
            "must be in [0, 1)",
        ));
    }
    let device = Device::Cpu;
    let seed = config.seed;
    let first = scenario
        .tasks()
        .first()
        .ok_or_else(|| Error::EmptyInput("a scenario without tasks".into()))?;
    let s = first.train.shape();
    let shape = [s.channels, s.height, s.width];
    if config.method == Method::Aqm && config.stack.image != shape {
        return Err(Error::ShapeMismatch {
            context: "stack image shape".into(),
            expected: format!("{shape:?}"),
            actual: config.stack.image.to_vec(),
        });
    }
    let image_bytes = s.len();
    let num_classes = scenario.num_classes();
    let num_tasks = scenario.num_tasks();
    let sets = stream_sets(scenario, config, seed)?;
    let tests: Vec<Dataset> = scenario
        .tasks()
        .iter()
        .map(|t| match config.test_per_class {
            Some(k) => t.test.take_per_class(k),
            None => t.test.clone(),
        })
        .collect();

    let store = ParamStore::new(seed.child_named("classifier"));
    let net = SmallCnn::new(&store.root(&device), shape[0], shape[1], num_classes)?;
    let mut sgd = Sgd::new(
        store.trainable(),
        SgdParams {
            lr: config.classifier_lr,
            ..Default::default()
        },
    )?;

    let memory_config = MemoryConfig {
        budget_bytes: config.budget_bytes,
        param_bytes: config.param_bytes,
        image_bytes,
        seed: seed.child_named("memory"),
    };
    let mut replay = match config.method {
        Method::FineTune | Method::IidOnline => Replay::None,
        Method::ErRaw => {
            let slots = (config.budget_bytes / image_bytes as u64) as usize;
            if slots == 0 {
                return Err(Error::invalid_parameter(
                    "budget_bytes",
                    "smaller than one image",
                ));
            }
            Replay::Reservoir(
                Box::new(ReservoirBuffer::new(
                    Capacity::items(slots),
                    seed.child_named("reservoir"),
                )?),
                seed.child_named("replay").rng(),
            )
        }
        Method::RawAqm => Replay::Adaptive(AdaptiveMemory::new(memory_config, 0, 0)?, None),
        Method::Aqm => {
            let stack = QStack::new(config.stack.clone(), seed.child_named("stack"), &device)?;
            let memory = AdaptiveMemory::new(
                memory_config,
                stack.layers().len(),
                stack.model_cost_params() as u64,
            )?;
            Replay::Adaptive(memory, Some(stack))
        }
    };

    // The stream: per task, or one shuffled union for iid-online.
    let mut schedule: Vec<(usize, Vec<usize>)> = Vec::new(); // (task, indices) per batch
    let mut order_rng = seed.child_named("order").rng();
    if config.method == Method::IidOnline {
        let mut all: Vec<(usize, usize)> = sets
            .iter()
            .enumerate()
            .flat_map(|(t, d)| (0..d.len()).map(move |i| (t, i)))
            .collect();
        order_rng.shuffle(&mut all);
        for chunk in all.chunks_exact(config.batch_size) {
            // A batch may mix tasks; each row keeps its own task for lookup.
            for &(t, i) in chunk {
                schedule.push((t, vec![i]));
            }
        }
    } else {
        for (t, d) in sets.iter().enumerate() {
            let order = order_rng.permutation(d.len());
            for chunk in order.chunks_exact(config.batch_size) {
                schedule.push((t, chunk.to_vec()));
            }
        }
    }
    let batches: Vec<Vec<(usize, usize)>> = if config.method == Method::IidOnline {
        schedule
            .chunks(config.batch_size)
            .map(|c| c.iter().map(|(t, i)| (*t, i[0])).collect())
            .collect()
    } else {
        schedule
            .iter()
            .map(|(t, idx)| idx.iter().map(|&i| (*t, i)).collect())
            .collect()
    };
    if let Some(bar) = bar {
        bar.set_length(batches.len() as u64);
        bar.set_position(0);
    }

    let mut matrix = AccuracyMatrix::new(num_tasks)?;
    let mut memory_curve = Vec::new();
    let mut drift = Vec::new();
    let mut loop_seconds = 0.0;
    let mut streamed = 0usize;
    let mut freeze_steps: Vec<Option<u64>> = vec![None; config.stack.layers.len()];
    let decoded_input =
        config.method == Method::Aqm && config.classifier_input == ClassifierInput::Decoded;
    let eval = |net: &SmallCnn,
                replay: &mut Replay,
                upto: usize,
                matrix: &mut AccuracyMatrix,
                row: usize|
     -> Result<()> {
        for (j, test) in tests.iter().enumerate().take(upto + 1) {
            let stack = match replay {
                Replay::Adaptive(_, Some(stack)) if decoded_input => Some(stack),
                _ => None,
            };
            matrix.set(row, j, accuracy(net, test, stack, &device)?)?;
        }
        Ok(())
    };

    for (step, batch) in batches.iter().enumerate() {
        let started = Instant::now();
        let step = step as u64;
        let task = batch[0].0;
        let images: Vec<&[u8]> = batch.iter().map(|&(t, i)| sets[t].image(i)).collect();
        let labels: Vec<u32> = batch.iter().map(|&(t, i)| sets[t].labels()[i]).collect();
        let x_inc = to_tensor(&images, shape, &device)?;
        let y_inc = Tensor::from_vec(labels.clone(), labels.len(), &device)?;

        // Replay batch from earlier tasks.
        let replay_batch: Option<ReplayBatch> = match &mut replay {
            Replay::None => None,
            Replay::Reservoir(buf, rng) if task > 0 => {
                let items: Vec<(u32, Vec<u8>)> = buf
                    .sample(config.replay_size, &Filter::tasks_before(task), rng)
                    .into_iter()
                    .map(|e| (e.label, e.item.0.clone()))
                    .collect();
                if items.is_empty() {
                    None
                } else {
                    let imgs: Vec<&[u8]> = items.iter().map(|(_, p)| p.as_slice()).collect();
                    let ys: Vec<u32> = items.iter().map(|(y, _)| *y).collect();
                    Some(ReplayBatch {
                        x: to_tensor(&imgs, shape, &device)?,
                        y: Tensor::from_vec(ys.clone(), ys.len(), &device)?,
                        ids: Vec::new(),
                    })
                }
            }
            Replay::Adaptive(memory, stack) if task > 0 => {
                let items = memory.sample(config.replay_size, task);
                if items.is_empty() {
                    None
                } else {
                    let xs = decode_adaptive(&items, stack.as_ref(), shape, &device)?;
                    let ys: Vec<u32> = items.iter().map(|i| i.label).collect();
                    Some(ReplayBatch {
                        x: Tensor::cat(&xs, 0)?,
                        y: Tensor::from_vec(ys.clone(), ys.len(), &device)?,
                        ids: items.iter().map(|i| i.id).collect(),
                    })
                }
            }
            _ => None,
        };
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

        // Classifier: CE on incoming plus CE on replay, one SGD step.
        let x_cls = match (&replay, &stack_step) {
            (Replay::Adaptive(_, Some(stack)), Some(out))
                if decoded_input && stack.all_frozen() =>
            {
                let deepest = stack.layers().len();
                let codes = out.outputs[deepest - 1].indices.narrow(0, 0, batch.len())?;
                stack.decode_codes(deepest, &codes)?
            }
            _ => x_inc.clone(),
        };
        let mut loss = cross_entropy(&net.forward(&x_cls)?, &y_inc)?;
        if let Some(r) = &replay_batch {
            loss = (loss + cross_entropy(&net.forward(&r.x)?, &r.y)?)?;
        }
        sgd.backward_step(&loss)?;

        // Memory update.
        let incoming: Vec<IncomingSample> = batch
            .iter()
            .zip(&labels)
            .map(|(&(t, i), &y)| IncomingSample {
                label: y,
                task: t,
                dataset_index: i,
                pixels: sets[t].image(i).to_vec(),
            })
            .collect();
        match &mut replay {
            Replay::None => {}
            Replay::Reservoir(buf, _) => {
                for s in incoming {
                    buf.insert(s.label, s.task, RawImage::new(s.pixels))?;
                }
            }
            Replay::Adaptive(memory, None) => {
                memory.insert(&incoming, &[], &[], &[], step)?;
            }
            Replay::Adaptive(memory, Some(stack)) => {
                let out = stack_step.expect("a stack step was taken");
                for (m, layer) in stack.layers().iter().enumerate() {
                    if layer.is_frozen() && memory.block_bits()[m + 1] == 0 {
                        memory.set_module_bits(m + 1, layer.bits_per_sample())?;
                        freeze_steps[m] = Some(step);
                    }
                }
                memory.set_model_cost(stack.model_cost_params() as u64)?;
                stack.update_ema_decoders()?;
                let ok = stack.update_threshold_stats(&x_all, &out.finals)?;
                let mut codes = Vec::with_capacity(out.outputs.len());
                for (m, o) in out.outputs.iter().enumerate() {
                    let layer = &stack.layers()[m];
                    if !layer.is_frozen() {
                        codes.push(Vec::new());
                        continue;
                    }
                    let [n, h, w] = layer.index_shape();
                    let k = layer.current_codes();
                    let v: Vec<u32> = o.indices.flatten_all()?.to_vec1()?;
                    let per = n * h * w;
                    codes.push(
                        v.chunks(per)
                            .map(|c| PackedIndices::pack(c, &[1, n, h, w], k))
                            .collect::<Result<Vec<_>>>()?,
                    );
                }
                let ids = replay_batch.as_ref().map_or(&[][..], |r| r.ids.as_slice());
                memory.insert(&incoming, ids, &ok, &codes, step)?;
            }
        }
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
            let point = match &replay {
                Replay::None => MemoryPoint {
                    step: step + 1,
                    per_block: vec![],
                    used_bytes: 0.0,
                    capacity_bytes: 0.0,
                },
                Replay::Reservoir(buf, _) => MemoryPoint {
                    step: step + 1,
                    per_block: vec![buf.len()],
                    used_bytes: buf.bytes_used() as f64,
                    capacity_bytes: config.budget_bytes as f64,
                },
                Replay::Adaptive(memory, _) => MemoryPoint {
                    step: step + 1,
                    per_block: memory.counts_per_block(),
                    used_bytes: memory.used_bits() as f64 / 8.0,
                    capacity_bytes: memory.capacity_bits() as f64 / 8.0,
                },
            };
            memory_curve.push(point);
        }
        if let Replay::Adaptive(memory, Some(stack)) = &replay {
            if step.is_multiple_of(config.drift_every.max(1) as u64) || last_of_task {
                drift.push(measure_drift(memory, stack, &sets, step + 1)?);
            }
        }
        if last_of_task && config.method != Method::IidOnline {
            eval(&net, &mut replay, task, &mut matrix, task)?;
        }
    }
    if config.method == Method::IidOnline {
        eval(&net, &mut replay, num_tasks - 1, &mut matrix, num_tasks - 1)?;
    }
    let last = &matrix.rows()[num_tasks - 1];
    let final_accuracy = last.iter().map(|a| a.unwrap_or(0.0)).sum::<f64>() / num_tasks as f64;
    let forgetting = if config.method == Method::IidOnline || num_tasks < 2 {
        None
    } else {
        Some(matrix.forgetting()?)
    };

    let (stored_at_end, model_cost_params, examples, trimmed_codes, avg_l2) = match &replay {
        Replay::None => (0, 0, Vec::new(), vec![], vec![]),
        Replay::Reservoir(buf, _) => (buf.len(), 0, Vec::new(), vec![], vec![]),
        Replay::Adaptive(memory, stack) => {
            let mut examples = Vec::new();
            if let Some(stack) = stack {
                'outer: for block in 1..memory.num_blocks() {
                    let mut entries: Vec<_> = memory.block(block).iter().collect();
                    entries.sort_by_key(|e| (e.task, e.id));
                    // Spread the examples over tasks: take every k-th.
                    let stride = (entries.len() / config.examples.max(1)).max(1);
                    for e in entries.into_iter().step_by(stride) {
                        if examples.len() >= config.examples {
                            break 'outer;
                        }
                        let item = ReplayItem {
                            id: e.id,
                            block,
                            label: e.label,
                            task: e.task,
                            sample: e.item.clone(),
                        };
                        let x = &decode_adaptive(&[item], Some(stack), shape, &device)?[0];
                        examples
                            .push((sets[e.task].image(e.item.dataset_index).to_vec(), to_u8(x)?));
                    }
                }
            }
            let (k, l2) = match stack {
                Some(s) => (
                    s.layers().iter().map(|l| l.stats().trimmed_codes).collect(),
                    s.layers().iter().map(|l| l.stats().avg_l2).collect(),
                ),
                None => (vec![], vec![]),
            };
            (memory.len(), memory.model_cost_params(), examples, k, l2)
        }
    };
    if config.method != Method::Aqm {
        freeze_steps.clear();
    }
    let accuracy_on_reconstructions = match &mut replay {
        Replay::Adaptive(_, Some(stack)) if stack.all_frozen() => {
            let mut accs = Vec::with_capacity(tests.len());
            for test in &tests {
                accs.push(accuracy(&net, test, Some(&mut *stack), &device)?);
            }
            Some(accs)
        }
        _ => None,
    };
    Ok(RunResult {
        config: config.clone(),
        accuracy: matrix.rows().to_vec(),
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
        accuracy_on_reconstructions,
        examples,
    })
}
