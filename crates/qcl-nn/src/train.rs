//! Training loop and checkpoints.
//!
//! - [`Checkpoint`]: a model's tensors (parameters and buffers), the optimizer's state, the
//!   run's position and RNG, in one safetensors file (`format` = [`CHECKPOINT_FORMAT`]),
//!   written atomically, checked against the model's architecture when loaded.
//! - [`TrainLoop`]: runs a [`TrainTask`] for some epochs with a learning-rate schedule, a
//!   progress bar, per-epoch [`EpochRecord`]s, early stop and checkpoints, and resumes from
//!   its checkpoint so that a run killed at any step ends with the same bits as one that
//!   never stopped.
//!
//! (Over 600 lines: the checkpoint format and the loop that writes it and resumes from it are one
//! unit, because a resumed run must repeat an uninterrupted one bit for bit; nearly 300 lines are
//! doc comments and examples.)
//!
//! # Determinism and resuming
//!
//! A resumed run repeats an uninterrupted one exactly when every step depends only on what
//! the checkpoint holds. The loop provides what that takes:
//!
//! - each epoch gets a seed, `config.seed.child(epoch)`, handed to
//!   [`TrainTask::start_epoch`]: draw the epoch's batch order from it (for example
//!   `BatchOrder::Shuffled(seed)` of `qcl_data`), so batch `b` of epoch `e` is the same batch
//!   in every run. With a `qcl_data::Dataset`, `seed.rng().permutation(dataset.len())` is
//!   the order `BatchOrder::Shuffled(seed)` gives, and batch `b` of size `n` is
//!   `dataset.tensors_at(&order[b * n..((b + 1) * n).min(order.len())], ..)`;
//! - each step gets its batch index and a random generator ([`Step::rng`], for dropout or
//!   augmentation) whose position is saved in the checkpoint;
//! - the model's parameters and buffers, the optimizer's state, the epoch's running loss and
//!   the history are saved; learning-rate schedules are pure functions of the epoch or step.
//!
//! Randomness drawn from elsewhere (a generator kept in the task, the clock) is not restored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use qcl_tensor::{Error, Result, RngState, SafetensorsFile, Seed, SeededRng};

use crate::optim::{Optimizer, OptimizerState};
use crate::schedule::LrSchedule;
use crate::ParamStore;

/// Metadata `format` value of a checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "qcl-checkpoint/1";

/// What happened in one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// The epoch, from 0.
    pub epoch: usize,
    /// Mean of the losses the steps of the epoch returned.
    pub train_loss: f64,
    /// What [`TrainTask::evaluate`] returned after the epoch, if anything.
    pub metric: Option<f64>,
    /// Learning rate of the epoch's first step.
    pub lr: f64,
    /// Wall-clock seconds of the epoch's steps and evaluation (over all sessions when the
    /// epoch was resumed).
    pub seconds: f64,
}

/// How far a run has come: everything besides tensors and the RNG that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainProgress {
    /// The epoch in progress, or the next one to start.
    pub epoch: usize,
    /// Steps of `epoch` already done.
    pub step_in_epoch: usize,
    /// Steps done in all epochs.
    pub global_step: u64,
    /// Sum of the losses of the steps of `epoch` already done.
    pub epoch_loss_sum: f64,
    /// Seconds spent in `epoch` so far.
    pub epoch_seconds: f64,
    /// Records of the finished epochs.
    pub history: Vec<EpochRecord>,
}

/// A snapshot of a training run: model, optimizer, position, RNG, metadata.
///
/// Saved as one safetensors file: model tensors under `model.<name>`, optimizer buffers under
/// `optim.<name>`, everything else in the string metadata (floats written so that they read
/// back bit for bit), with an architecture fingerprint (a hash of the sorted tensor names and
/// shapes) that [`Checkpoint::restore`] compares with the model it restores into.
///
/// ```
/// use candle_core::Device;
/// use qcl_nn::optim::{Optimizer, Sgd, SgdConfig};
/// use qcl_nn::train::{Checkpoint, TrainProgress};
/// use qcl_nn::{Init, ParamStore};
///
/// let store = ParamStore::new(1);
/// let w = store.root(&Device::Cpu).param("w", (2, 2), Init::Normal { mean: 0.0, std: 1.0 })?;
/// let mut sgd = Sgd::new(store.trainable(), SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// sgd.backward_step(&w.sum_all()?)?;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("run.ckpt.safetensors");
/// let progress = TrainProgress { epoch: 1, global_step: 1, ..Default::default() };
/// Checkpoint { progress, ..Checkpoint::capture(&store, &sgd)? }.save(&path)?;
///
/// // Later, or in another process: the same architecture, freshly initialised.
/// let store2 = ParamStore::new(99);
/// let w2 = store2.root(&Device::Cpu).param("w", (2, 2), Init::Zeros)?;
/// let mut sgd2 = Sgd::new(store2.trainable(), SgdConfig::default())?;
/// let checkpoint = Checkpoint::load_into(&path, &store2, &mut sgd2)?;
/// assert_eq!(checkpoint.progress.global_step, 1);
/// assert_eq!(w2.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
/// assert_eq!(sgd2.learning_rate(), 0.1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Every tensor of the model's [`ParamStore`] (parameters and buffers), by name.
    pub model: BTreeMap<String, Tensor>,
    /// The optimizer's state.
    pub optimizer: OptimizerState,
    /// Where the run is.
    pub progress: TrainProgress,
    /// Position of the run's step generator ([`Step::rng`]).
    pub rng: RngState,
    /// The run's seed ([`TrainConfig::seed`]).
    pub seed: Seed,
    /// Free-form user metadata.
    pub metadata: BTreeMap<String, String>,
}

const MODEL_PREFIX: &str = "model.";
const OPTIM_PREFIX: &str = "optim.";
const OPTIM_SCALAR_PREFIX: &str = "optim.scalar.";
const USER_PREFIX: &str = "user.";

impl Checkpoint {
    /// The current tensors of `store` and the state of `optimizer`, at progress zero, with
    /// the RNG at the start of seed 0's stream and no metadata; set the other fields as
    /// needed (`Checkpoint { progress, ..Checkpoint::capture(&store, &opt)? }`).
    ///
    /// # Errors
    /// A candle error when copying tensors.
    pub fn capture(store: &ParamStore, optimizer: &dyn Optimizer) -> Result<Self> {
        Ok(Checkpoint {
            model: store.tensors()?.into_iter().collect(),
            optimizer: optimizer.state()?,
            progress: TrainProgress::default(),
            rng: Seed::default().rng().state(),
            seed: Seed::default(),
            metadata: BTreeMap::new(),
        })
    }

    /// The architecture fingerprint of the model tensors (see [`architecture_fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(self.model.iter().map(|(name, t)| (name.as_str(), t.dims())))
    }

    /// Writes the checkpoint to `path` atomically (temporary file, then rename): if the write
    /// fails, a previous file at `path` is left as it was.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file, or a candle error when copying tensors to the host.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut meta = BTreeMap::new();
        let mut put = |key: String, value: String| meta.insert(key, value);
        put("format".into(), CHECKPOINT_FORMAT.into());
        put("architecture".into(), self.fingerprint());
        put("seed".into(), self.seed.value().to_string());
        put("rng".into(), hex(&self.rng.to_bytes()));
        let p = &self.progress;
        put("epoch".into(), p.epoch.to_string());
        put("step_in_epoch".into(), p.step_in_epoch.to_string());
        put("global_step".into(), p.global_step.to_string());
        put("epoch_loss_sum".into(), float_text(p.epoch_loss_sum));
        // Wall times are not saved, so that the same run writes the same bytes: a resumed
        // run's history reports 0 s for the epochs and part epoch before the resume.
        put("epoch_seconds".into(), float_text(0.0));
        put("history".into(), history_text(&p.history)?);
        put("optim.kind".into(), self.optimizer.kind.clone());
        for (name, value) in &self.optimizer.scalars {
            put(format!("{OPTIM_SCALAR_PREFIX}{name}"), float_text(*value));
        }
        for (key, value) in &self.metadata {
            put(format!("{USER_PREFIX}{key}"), value.clone());
        }
        let names: Vec<(String, &Tensor)> = self
            .model
            .iter()
            .map(|(n, t)| (format!("{MODEL_PREFIX}{n}"), t))
            .chain(
                self.optimizer
                    .tensors
                    .iter()
                    .map(|(n, t)| (format!("{OPTIM_PREFIX}{n}"), t)),
            )
            .collect();
        let refs: Vec<(&str, &Tensor)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        qcl_tensor::write_safetensors(path, &refs, &meta)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`] (tensors on the CPU).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::BadFile`] if it is truncated,
    /// foreign, or inconsistent (a missing or malformed entry, tensors that do not match the
    /// recorded fingerprint).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(CHECKPOINT_FORMAT, "a qcl checkpoint")?;
        let bad = |reason: String| Error::bad_file(path, reason);
        let text = |key: &str| -> Result<&String> {
            file.metadata()
                .get(key)
                .ok_or_else(|| bad(format!("metadata `{key}` is missing")))
        };
        let float = |key: &str| -> Result<f64> {
            let value = text(key)?;
            value
                .parse()
                .map_err(|_| bad(format!("metadata `{key}` = `{value}` is not a number")))
        };
        let mut model = BTreeMap::new();
        let mut optim_tensors = BTreeMap::new();
        for name in file.names() {
            let tensor = file.tensor(name, &Device::Cpu)?;
            if let Some(param) = name.strip_prefix(MODEL_PREFIX) {
                model.insert(param.to_string(), tensor);
            } else if let Some(key) = name.strip_prefix(OPTIM_PREFIX) {
                optim_tensors.insert(key.to_string(), tensor);
            } else {
                return Err(bad(format!(
                    "tensor `{name}` is neither `{MODEL_PREFIX}*` nor `{OPTIM_PREFIX}*`"
                )));
            }
        }
        let mut scalars = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (key, value) in file.metadata() {
            if let Some(name) = key.strip_prefix(OPTIM_SCALAR_PREFIX) {
                scalars.insert(name.to_string(), float(key)?);
            } else if let Some(name) = key.strip_prefix(USER_PREFIX) {
                metadata.insert(name.to_string(), value.clone());
            }
        }
        let rng_text = text("rng")?;
        let rng = unhex(rng_text)
            .and_then(|bytes| RngState::from_bytes(&bytes).ok())
            .ok_or_else(|| bad(format!("metadata `rng` = `{rng_text}` is not an RNG state")))?;
        let history_text = text("history")?;
        let history = parse_history(history_text).ok_or_else(|| {
            bad(format!(
                "metadata `history` = `{history_text}` is malformed"
            ))
        })?;
        let checkpoint = Checkpoint {
            model,
            optimizer: OptimizerState {
                kind: text("optim.kind")?.clone(),
                scalars,
                tensors: optim_tensors,
            },
            progress: TrainProgress {
                epoch: file.metadata_value("epoch")?,
                step_in_epoch: file.metadata_value("step_in_epoch")?,
                global_step: file.metadata_value("global_step")?,
                epoch_loss_sum: float("epoch_loss_sum")?,
                epoch_seconds: float("epoch_seconds")?,
                history,
            },
            rng,
            seed: Seed::new(file.metadata_value("seed")?),
            metadata,
        };
        let recorded = text("architecture")?;
        if *recorded != checkpoint.fingerprint() {
            return Err(bad(format!(
                "its model tensors do not match its architecture fingerprint {recorded}"
            )));
        }
        Ok(checkpoint)
    }

    /// Reads the checkpoint at `path` and restores it into `store` and `optimizer`
    /// ([`Checkpoint::load`] then [`Checkpoint::restore`], with the path in error messages).
    ///
    /// # Errors
    /// Those of [`Checkpoint::load`] and [`Checkpoint::restore`].
    pub fn load_into(
        path: impl AsRef<Path>,
        store: &ParamStore,
        optimizer: &mut dyn Optimizer,
    ) -> Result<Self> {
        let path = path.as_ref();
        let checkpoint = Self::load(path)?;
        checkpoint.restore_from(path, store, Some(optimizer))?;
        Ok(checkpoint)
    }

    /// Overwrites the tensors of `store` and the state of `optimizer` with the checkpoint's.
    /// The model must have the checkpoint's architecture (same tensor names and shapes);
    /// nothing changes unless it does and the optimizer state fits.
    ///
    /// # Errors
    /// For another architecture: [`Error::ShapeMismatch`] naming a tensor whose shape
    /// differs, [`Error::MissingTensor`] for a model tensor the checkpoint lacks,
    /// [`Error::InvalidParameter`] for a checkpoint tensor the model lacks. For the
    /// optimizer: the errors of [`Optimizer::load_state`].
    pub fn restore(&self, store: &ParamStore, optimizer: &mut dyn Optimizer) -> Result<()> {
        self.restore_from(Path::new("the checkpoint"), store, Some(optimizer))
    }

    /// Overwrites the tensors of `store` only (to evaluate or fine-tune a checkpointed model).
    ///
    /// # Errors
    /// As [`Checkpoint::restore`] for another architecture.
    pub fn restore_model(&self, store: &ParamStore) -> Result<()> {
        self.restore_from(Path::new("the checkpoint"), store, None)
    }

    fn restore_from(
        &self,
        source: &Path,
        store: &ParamStore,
        optimizer: Option<&mut dyn Optimizer>,
    ) -> Result<()> {
        self.check_architecture(source, store)?;
        if let Some(optimizer) = optimizer {
            optimizer.load_state(&self.optimizer)?;
        }
        store.load_tensors(&self.model, source)
    }

    fn check_architecture(&self, source: &Path, store: &ParamStore) -> Result<()> {
        let ours = store.all();
        let here = fingerprint(ours.iter().map(|(n, v, _)| (n.as_str(), v.dims())));
        if here == self.fingerprint() {
            return Ok(());
        }
        let context = || {
            format!(
                "{} was written for another architecture (fingerprint {}, this model {here})",
                source.display(),
                self.fingerprint()
            )
        };
        for (name, var, _) in &ours {
            match self.model.get(name) {
                None => {
                    return Err(Error::MissingTensor {
                        name: name.clone(),
                        path: source.to_path_buf(),
                        available: self.model.keys().cloned().collect(),
                    })
                }
                Some(saved) if saved.dims() != var.dims() => {
                    return Err(Error::ShapeMismatch {
                        context: format!("`{name}`: {}", context()),
                        expected: format!("{:?}", var.dims()),
                        actual: saved.dims().to_vec(),
                    })
                }
                Some(_) => {}
            }
        }
        let extra = self
            .model
            .keys()
            .find(|name| store.get(name).is_none())
            .cloned()
            .unwrap_or_default();
        Err(Error::invalid_parameter(
            "checkpoint",
            format!("{}: it holds `{extra}`, which this model lacks", context()),
        ))
    }
}

/// A fingerprint of a model's architecture: a 64-bit FNV-1a hash (16 hex digits) of its sorted
/// tensor names and shapes. Equal for two stores with the same names and shapes, whatever
/// their values.
///
/// ```
/// use candle_core::Device;
/// use qcl_nn::train::architecture_fingerprint;
/// use qcl_nn::{Init, ParamStore};
/// let (a, b) = (ParamStore::new(1), ParamStore::new(2));
/// a.root(&Device::Cpu).param("w", (3, 4), Init::Zeros)?;
/// b.root(&Device::Cpu).param("w", (3, 4), Init::Ones)?;
/// assert_eq!(architecture_fingerprint(&a), architecture_fingerprint(&b));
/// b.root(&Device::Cpu).param("bias", 3, Init::Zeros)?;
/// assert_ne!(architecture_fingerprint(&a), architecture_fingerprint(&b));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub fn architecture_fingerprint(store: &ParamStore) -> String {
    let all = store.all();
    fingerprint(all.iter().map(|(n, v, _)| (n.as_str(), v.dims())))
}

fn fingerprint<'a>(entries: impl Iterator<Item = (&'a str, &'a [usize])>) -> String {
    let mut entries: Vec<_> = entries.collect();
    entries.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, dims) in entries {
        feed(&(name.len() as u64).to_le_bytes());
        feed(name.as_bytes());
        feed(&(dims.len() as u64).to_le_bytes());
        for &d in dims {
            feed(&(d as u64).to_le_bytes());
        }
    }
    format!("{hash:016x}")
}

/// Shortest text that parses back to the same `f64` bits (NaN payloads aside).
fn float_text(value: f64) -> String {
    format!("{value:?}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// History as JSON rows `[epoch, train_loss, metric or "none", lr, seconds]` of strings.
fn history_text(history: &[EpochRecord]) -> Result<String> {
    let rows: Vec<[String; 5]> = history
        .iter()
        .map(|r| {
            [
                r.epoch.to_string(),
                float_text(r.train_loss),
                r.metric.map_or_else(|| "none".to_string(), float_text),
                float_text(r.lr),
                float_text(0.0), // wall time, not saved (see `Checkpoint::save`)
            ]
        })
        .collect();
    serde_json::to_string(&rows)
        .map_err(|e| Error::invalid_parameter("history", format!("cannot serialise: {e}")))
}

fn parse_history(text: &str) -> Option<Vec<EpochRecord>> {
    let rows: Vec<[String; 5]> = serde_json::from_str(text).ok()?;
    rows.iter()
        .map(|[epoch, loss, metric, lr, seconds]| {
            Some(EpochRecord {
                epoch: epoch.parse().ok()?,
                train_loss: loss.parse().ok()?,
                metric: match metric.as_str() {
                    "none" => None,
                    m => Some(m.parse().ok()?),
                },
                lr: lr.parse().ok()?,
                seconds: seconds.parse().ok()?,
            })
        })
        .collect()
}

/// Whether a smaller or a larger monitored value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Smaller is better (a loss, an error rate).
    Min,
    /// Larger is better (an accuracy).
    Max,
}

/// Stop when the monitored value has not improved for `patience` epochs in a row.
///
/// The monitored value is the epoch's metric ([`TrainTask::evaluate`]), or its training loss
/// when the task returns no metric. With mode [`Mode::Min`], a value improves on the best so
/// far when it is below `best − min_delta` ([`Mode::Max`]: above `best + min_delta`); NaN
/// never improves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStop {
    /// Epochs without improvement tolerated (at least 1).
    pub patience: usize,
    /// Smallest change that counts as an improvement (`>= 0`).
    pub min_delta: f64,
    /// Whether smaller or larger is better.
    pub mode: Mode,
}

impl EarlyStop {
    /// Whether a run with this history stops now.
    ///
    /// ```
    /// use qcl_nn::train::{EarlyStop, EpochRecord, Mode};
    /// let stop = EarlyStop { patience: 2, min_delta: 0.0, mode: Mode::Max };
    /// let record = |epoch, metric| EpochRecord { epoch, train_loss: 0.0, metric: Some(metric), lr: 0.1, seconds: 0.0 };
    /// let mut history = vec![record(0, 0.5), record(1, 0.7), record(2, 0.6)];
    /// assert!(!stop.should_stop(&history));
    /// history.push(record(3, 0.7)); // not above the best 0.7
    /// assert!(stop.should_stop(&history));
    /// ```
    pub fn should_stop(&self, history: &[EpochRecord]) -> bool {
        let mut best: Option<f64> = None;
        let mut without_improvement = 0;
        for record in history {
            let value = record.metric.unwrap_or(record.train_loss);
            let improved = !value.is_nan()
                && match (best, self.mode) {
                    (None, _) => true,
                    (Some(b), Mode::Min) => value < b - self.min_delta,
                    (Some(b), Mode::Max) => value > b + self.min_delta,
                };
            if improved {
                best = Some(value);
                without_improvement = 0;
            } else {
                without_improvement += 1;
            }
        }
        without_improvement >= self.patience
    }

    fn validate(&self) -> Result<()> {
        if self.patience == 0 {
            return Err(Error::invalid_parameter(
                "early_stop.patience",
                "must be at least 1",
            ));
        }
        crate::optim::check_non_negative("early_stop.min_delta", self.min_delta)
    }
}

/// Settings of a [`TrainLoop`], each with a default.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Number of epochs (default 1).
    pub epochs: usize,
    /// Seed of the run: epoch `e`'s seed is `seed.child(e)`, the step generator is
    /// `seed.child_named("train-steps")` (default 0).
    pub seed: Seed,
    /// Where checkpoints are written (default none: no checkpoints).
    pub checkpoint_path: Option<PathBuf>,
    /// Also write a checkpoint after every this many steps (counted over the whole run), not
    /// only at the end of each epoch (default none).
    pub checkpoint_every_steps: Option<usize>,
    /// Early stop (default none).
    pub early_stop: Option<EarlyStop>,
    /// Show a progress bar on standard error; never shown when the `CI` environment variable
    /// is set (default false).
    pub show_progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            seed: Seed::new(0),
            checkpoint_path: None,
            checkpoint_every_steps: None,
            early_stop: None,
            show_progress: false,
        }
    }
}

impl TrainConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `checkpoint_every_steps = Some(0)`, a checkpoint
    /// interval without a checkpoint path, or a bad [`EarlyStop`].
    pub fn validate(&self) -> Result<()> {
        match (self.checkpoint_every_steps, &self.checkpoint_path) {
            (Some(0), _) => {
                return Err(Error::invalid_parameter(
                    "checkpoint_every_steps",
                    "must be at least 1",
                ))
            }
            (Some(_), None) => {
                return Err(Error::invalid_parameter(
                    "checkpoint_every_steps",
                    "is set but checkpoint_path is not",
                ))
            }
            _ => {}
        }
        if let Some(early_stop) = &self.early_stop {
            early_stop.validate()?;
        }
        Ok(())
    }
}

/// What one training step gets from the [`TrainLoop`].
pub struct Step<'a> {
    /// The epoch, from 0.
    pub epoch: usize,
    /// Index of this step's batch within the epoch, from 0.
    pub batch: usize,
    /// Steps done before this one in the whole run.
    pub global_step: u64,
    /// The run's step generator (dropout, augmentation); its position is checkpointed.
    pub rng: &'a mut SeededRng,
    /// The optimizer: call [`Optimizer::backward_step`] (or `step`) with the batch's loss.
    pub optimizer: &'a mut dyn Optimizer,
}

/// The model-specific part of training, driven by a [`TrainLoop`].
///
/// For a resumed run to repeat an uninterrupted one, what a step does must depend only on the
/// epoch's seed, the batch index, [`Step::rng`] and the model and optimizer state (see the
/// [module docs](self)).
pub trait TrainTask {
    /// Prepares epoch `epoch` and returns its number of steps (at least 1). `seed` is the
    /// epoch's seed: draw the batch order from it. Also called when a run resumes in the
    /// middle of `epoch`, before its remaining steps.
    ///
    /// # Errors
    /// Whatever preparing fails with; the loop stops and returns it.
    fn start_epoch(&mut self, epoch: usize, seed: Seed) -> Result<usize>;

    /// Trains on batch `step.batch` of `step.epoch` (forward, loss, optimizer step) and
    /// returns the loss.
    ///
    /// # Errors
    /// Whatever the step fails with; the loop stops and returns it (the last checkpoint
    /// stays, to resume from).
    fn train_step(&mut self, step: &mut Step<'_>) -> Result<f64>;

    /// Evaluates the model after epoch `epoch`; the metric goes into the [`EpochRecord`] and
    /// drives [`EarlyStop`]. The default evaluates nothing.
    ///
    /// # Errors
    /// Whatever evaluation fails with; the loop stops and returns it.
    fn evaluate(&mut self, epoch: usize) -> Result<Option<f64>> {
        let _ = epoch;
        Ok(None)
    }
}

/// What [`TrainLoop::run`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Records of all finished epochs, including those of earlier sessions of a resumed run.
    pub history: Vec<EpochRecord>,
    /// Whether [`EarlyStop`] ended the run before `epochs`.
    pub stopped_early: bool,
    /// Steps done in the whole run.
    pub global_step: u64,
    /// `(epoch, step_in_epoch)` of the checkpoint this session resumed from, if any.
    pub resumed_from: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScheduleUnit {
    Epoch,
    Step,
}

/// Runs a [`TrainTask`]: schedule, progress bar, records, early stop, checkpoints, resume.
///
/// Per epoch `e`: [`TrainTask::start_epoch`] with `seed.child(e)`, the learning rate set from
/// the schedule, the steps (each may be followed by a checkpoint), [`TrainTask::evaluate`],
/// an [`EpochRecord`], the early-stop check, and a checkpoint.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::optim::{Sgd, SgdConfig};
/// use qcl_nn::schedule::StepLr;
/// use qcl_nn::train::{Step, TrainConfig, TrainLoop, TrainTask};
/// use qcl_nn::{Init, ParamStore};
/// use qcl_tensor::{Result, Seed};
///
/// /// Fits `y = 3x` with one weight, in shuffled mini-batches of 4 of 16 points.
/// struct Fit { w: Tensor, xs: Vec<f32>, order: Vec<usize> }
///
/// impl TrainTask for Fit {
///     fn start_epoch(&mut self, _epoch: usize, seed: Seed) -> Result<usize> {
///         self.order = seed.rng().permutation(self.xs.len()); // this epoch's batch order
///         Ok(self.xs.len() / 4)
///     }
///     fn train_step(&mut self, step: &mut Step<'_>) -> Result<f64> {
///         let batch: Vec<f32> = self.order[step.batch * 4..][..4].iter().map(|&i| self.xs[i]).collect();
///         let x = Tensor::new(batch.as_slice(), &Device::Cpu)?;
///         let loss = (x.broadcast_mul(&self.w)? - (&x * 3.0)?)?.sqr()?.mean_all()?;
///         step.optimizer.backward_step(&loss)?;
///         Ok(f64::from(loss.to_scalar::<f32>()?))
///     }
/// }
///
/// let store = ParamStore::new(0);
/// let w = store.root(&Device::Cpu).param("w", 1, Init::Zeros)?;
/// let mut sgd = Sgd::new(store.trainable(), SgdConfig { lr: 0.5, momentum: 0.5, ..Default::default() })?;
/// let dir = tempfile::tempdir()?;
/// let config = TrainConfig {
///     epochs: 20,
///     seed: Seed::new(1),
///     checkpoint_path: Some(dir.path().join("fit.ckpt")),
///     ..Default::default()
/// };
/// let mut task = Fit { w: w.clone(), xs: (0..16).map(|i| i as f32 / 16.0).collect(), order: vec![] };
/// // Resumes from fit.ckpt if an earlier session left one.
/// let report = TrainLoop::resume_or_start(config, &store, &mut sgd)?
///     .with_schedule(StepLr::new(0.5, 10, 0.5)?)
///     .run(&mut task)?;
/// assert_eq!(report.history.len(), 20);
/// assert_eq!(report.history[10].lr, 0.25);
/// assert!((w.to_vec1::<f32>()?[0] - 3.0).abs() < 1e-3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TrainLoop<'a> {
    config: TrainConfig,
    store: ParamStore,
    optimizer: &'a mut dyn Optimizer,
    schedule: Option<(Box<dyn LrSchedule + 'a>, ScheduleUnit)>,
    progress: TrainProgress,
    rng: SeededRng,
    metadata: BTreeMap<String, String>,
    resumed_from: Option<(usize, usize)>,
}

impl std::fmt::Debug for TrainLoop<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoop")
            .field("config", &self.config)
            .field("progress", &self.progress)
            .field("resumed_from", &self.resumed_from)
            .finish_non_exhaustive()
    }
}

impl<'a> TrainLoop<'a> {
    /// A fresh run over `store`'s model with `optimizer`, from epoch 0. A checkpoint left at
    /// `config.checkpoint_path` by an earlier run is ignored and will be overwritten.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for bad settings ([`TrainConfig::validate`]).
    pub fn new(
        config: TrainConfig,
        store: &ParamStore,
        optimizer: &'a mut dyn Optimizer,
    ) -> Result<Self> {
        config.validate()?;
        Ok(TrainLoop {
            rng: config.seed.child_named("train-steps").rng(),
            config,
            store: store.clone(),
            optimizer,
            schedule: None,
            progress: TrainProgress::default(),
            metadata: BTreeMap::new(),
            resumed_from: None,
        })
    }

    /// Like [`TrainLoop::new`], but if a checkpoint exists at `config.checkpoint_path`, restores
    /// the model, the optimizer, the RNG, the history and the metadata from it, and
    /// [`run`](TrainLoop::run) continues at its epoch and step.
    ///
    /// # Errors
    /// Those of [`TrainLoop::new`] and [`Checkpoint::load_into`];
    /// [`Error::InvalidParameter`] if the checkpoint was written by a run with another seed.
    pub fn resume_or_start(
        config: TrainConfig,
        store: &ParamStore,
        optimizer: &'a mut dyn Optimizer,
    ) -> Result<Self> {
        let mut run = Self::new(config, store, optimizer)?;
        let Some(path) = run.config.checkpoint_path.clone() else {
            return Ok(run);
        };
        if !path.exists() {
            return Ok(run);
        }
        let checkpoint = Checkpoint::load(&path)?;
        if checkpoint.seed != run.config.seed {
            return Err(Error::invalid_parameter(
                "seed",
                format!(
                    "{} was written by a run with seed {}, this run has seed {}",
                    path.display(),
                    checkpoint.seed.value(),
                    run.config.seed.value()
                ),
            ));
        }
        checkpoint.restore_from(&path, &run.store, Some(&mut *run.optimizer))?;
        run.resumed_from = Some((checkpoint.progress.epoch, checkpoint.progress.step_in_epoch));
        run.rng = SeededRng::from_state(&checkpoint.rng);
        run.progress = checkpoint.progress;
        run.metadata = checkpoint.metadata;
        Ok(run)
    }

    /// Sets the learning rate at the start of each epoch `e` to `schedule.lr_at(e)`.
    pub fn with_schedule(mut self, schedule: impl LrSchedule + 'a) -> Self {
        self.schedule = Some((Box::new(schedule), ScheduleUnit::Epoch));
        self
    }

    /// Sets the learning rate before each step to `schedule.lr_at(global_step)` (for warm-up
    /// or per-iteration schedules).
    pub fn with_step_schedule(mut self, schedule: impl LrSchedule + 'a) -> Self {
        self.schedule = Some((Box::new(schedule), ScheduleUnit::Step));
        self
    }

    /// Adds `key = value` to the metadata saved in every checkpoint.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Where the run is.
    pub fn progress(&self) -> &TrainProgress {
        &self.progress
    }

    /// `(epoch, step_in_epoch)` of the checkpoint [`TrainLoop::resume_or_start`] resumed
    /// from, if any.
    pub fn resumed_from(&self) -> Option<(usize, usize)> {
        self.resumed_from
    }

    /// A checkpoint of the run as it is now.
    ///
    /// # Errors
    /// A candle error when copying tensors.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            progress: self.progress.clone(),
            rng: self.rng.state(),
            seed: self.config.seed,
            metadata: self.metadata.clone(),
            ..Checkpoint::capture(&self.store, &*self.optimizer)?
        })
    }

    fn save_checkpoint(&self) -> Result<()> {
        match &self.config.checkpoint_path {
            Some(path) => self.checkpoint()?.save(path),
            None => Ok(()),
        }
    }

    fn progress_bar(&self) -> ProgressBar {
        if !self.config.show_progress || std::env::var_os("CI").is_some() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{elapsed}] {bar:30} {pos}/{len} {msg}")
                .expect("template"),
        );
        bar
    }

    /// Trains until `config.epochs` epochs are done or early stop fires, continuing from
    /// where the run is (epoch 0, or the resumed checkpoint's position).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when [`TrainTask::start_epoch`] returns 0 steps, or fewer
    /// than a resumed checkpoint had already done; any error of the task (returned as is,
    /// after which the last checkpoint can be resumed); [`Error::Io`] when a checkpoint
    /// cannot be written.
    pub fn run<T: TrainTask + ?Sized>(&mut self, task: &mut T) -> Result<TrainReport> {
        let bar = self.progress_bar();
        let mut stopped_early = self.should_stop();
        while !stopped_early && self.progress.epoch < self.config.epochs {
            let epoch = self.progress.epoch;
            let steps = task.start_epoch(epoch, self.config.seed.child(epoch as u64))?;
            if steps == 0 {
                return Err(Error::invalid_parameter(
                    "steps",
                    format!("the task gave epoch {epoch} no step"),
                ));
            }
            if self.progress.step_in_epoch > steps {
                return Err(Error::invalid_parameter(
                    "steps",
                    format!(
                        "the checkpoint has done {} steps of epoch {epoch}, but the task gives it only {steps}",
                        self.progress.step_in_epoch
                    ),
                ));
            }
            let lr = self.epoch_learning_rate(epoch);
            bar.set_prefix(format!("{}/{}", epoch + 1, self.config.epochs));
            bar.set_length(steps as u64);
            bar.set_position(self.progress.step_in_epoch as u64);
            let started = Instant::now();
            let seconds_before = self.progress.epoch_seconds;
            while self.progress.step_in_epoch < steps {
                if let Some((schedule, ScheduleUnit::Step)) = &self.schedule {
                    let t = usize::try_from(self.progress.global_step).unwrap_or(usize::MAX);
                    self.optimizer.set_learning_rate(schedule.lr_at(t));
                }
                let loss = task.train_step(&mut Step {
                    epoch,
                    batch: self.progress.step_in_epoch,
                    global_step: self.progress.global_step,
                    rng: &mut self.rng,
                    optimizer: &mut *self.optimizer,
                })?;
                let p = &mut self.progress;
                p.step_in_epoch += 1;
                p.global_step += 1;
                p.epoch_loss_sum += loss;
                p.epoch_seconds = seconds_before + started.elapsed().as_secs_f64();
                bar.inc(1);
                bar.set_message(format!(
                    "loss {:.4}",
                    p.epoch_loss_sum / p.step_in_epoch as f64
                ));
                let due = self
                    .config
                    .checkpoint_every_steps
                    .is_some_and(|every| p.global_step.is_multiple_of(every as u64));
                // The last step of an epoch is followed by the epoch's checkpoint anyway.
                if due && p.step_in_epoch < steps {
                    self.save_checkpoint()?;
                }
            }
            let metric = task.evaluate(epoch)?;
            let p = &mut self.progress;
            let record = EpochRecord {
                epoch,
                train_loss: p.epoch_loss_sum / steps as f64,
                metric,
                lr,
                seconds: seconds_before + started.elapsed().as_secs_f64(),
            };
            bar.println(format!(
                "epoch {}/{}: train loss {:.5}{}, lr {:.3e}, {:.1} s",
                epoch + 1,
                self.config.epochs,
                record.train_loss,
                record
                    .metric
                    .map_or_else(String::new, |m| format!(", metric {m:.5}")),
                record.lr,
                record.seconds
            ));
            p.history.push(record);
            p.epoch += 1;
            p.step_in_epoch = 0;
            p.epoch_loss_sum = 0.0;
            p.epoch_seconds = 0.0;
            stopped_early = self.should_stop();
            self.save_checkpoint()?;
        }
        bar.finish_and_clear();
        Ok(TrainReport {
            history: self.progress.history.clone(),
            stopped_early,
            global_step: self.progress.global_step,
            resumed_from: self.resumed_from,
        })
    }

    fn should_stop(&self) -> bool {
        self.config
            .early_stop
            .is_some_and(|rule| rule.should_stop(&self.progress.history))
    }

    /// Sets the epoch's learning rate from an epoch schedule and returns the rate of the
    /// epoch's first step.
    fn epoch_learning_rate(&mut self, epoch: usize) -> f64 {
        match &self.schedule {
            Some((schedule, ScheduleUnit::Epoch)) => {
                let lr = schedule.lr_at(epoch);
                self.optimizer.set_learning_rate(lr);
                lr
            }
            Some((schedule, ScheduleUnit::Step)) => {
                let first = self.progress.global_step - self.progress.step_in_epoch as u64;
                schedule.lr_at(usize::try_from(first).unwrap_or(usize::MAX))
            }
            None => self.optimizer.learning_rate(),
        }
    }
}
