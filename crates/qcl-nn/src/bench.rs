//! Training-throughput benchmark: the two reference models of qcl's CPU training target.
//!
//! Random `1×28×28` inputs (`N(0, 1)`), random labels, SGD with momentum 0.9 and lr 0.05,
//! a few untimed warm-up steps, then `steps` timed steps: the same protocol as the PyTorch
//! reference script, so the two numbers can be compared as a ratio.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{Error, Result, Seed};
use serde::Serialize;

use crate::layers::ModuleT;
use crate::models::{ResNet, ResNetConfig, VqAutoencoder};
use crate::optim::{Optimizer, Sgd, SgdConfig};
use crate::ParamStore;

/// Which model to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchModel {
    /// CIFAR-style ResNet-20 (16/32/64 channels, BatchNorm), cross-entropy.
    ResNet20,
    /// The AQM-style VQ autoencoder (C = 32, K = 16), MSE + 2·commitment.
    VqAutoencoder,
}

impl BenchModel {
    /// The name used in reports (`resnet20`, `vq_ae`), matching the PyTorch reference.
    pub fn name(self) -> &'static str {
        match self {
            BenchModel::ResNet20 => "resnet20",
            BenchModel::VqAutoencoder => "vq_ae",
        }
    }

    /// Parses `resnet20` or `vq-ae`/`vq_ae`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for another name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "resnet20" | "resnet-20" => Ok(BenchModel::ResNet20),
            "vq-ae" | "vq_ae" | "vqae" => Ok(BenchModel::VqAutoencoder),
            other => Err(Error::invalid_parameter(
                "model",
                format!("unknown benchmark model `{other}`; expected resnet20 or vq-ae"),
            )),
        }
    }
}

/// Settings of [`bench_training`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainBenchConfig {
    /// Model to train.
    pub model: BenchModel,
    /// Images per step (default 128).
    pub batch: usize,
    /// Timed steps (default 20).
    pub steps: usize,
    /// Untimed warm-up steps (default 3).
    pub warmup: usize,
    /// Seed of the weights and the random batch.
    pub seed: Seed,
}

impl TrainBenchConfig {
    /// The reference protocol for `model`: batch 128, 20 timed steps after 3 warm-up steps.
    pub fn new(model: BenchModel) -> Self {
        Self {
            model,
            batch: 128,
            steps: 20,
            warmup: 3,
            seed: Seed::new(0),
        }
    }
}

/// Result of [`bench_training`], serialised as the CLI's `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    /// `resnet20` or `vq_ae`.
    pub model: String,
    /// Images per step.
    pub batch: usize,
    /// Training throughput over the timed steps.
    pub samples_per_s: f64,
    /// Rayon threads used.
    pub threads: usize,
    /// Timed steps.
    pub steps: usize,
    /// Wall-clock seconds of the timed steps.
    pub seconds: f64,
    /// Loss after the last step (a sanity check that training ran).
    pub final_loss: f64,
    /// The process's peak resident memory when the run ended ([`peak_rss_bytes`]): `None`
    /// off Linux. It covers the whole process, so it includes whatever ran before.
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident memory ("high-water mark") of the current process in bytes: `VmHWM` of
/// `/proc/self/status` on Linux, `None` on other systems or when it cannot be read.
///
/// ```
/// let peak = qcl_nn::bench::peak_rss_bytes();
/// if cfg!(target_os = "linux") {
///     assert!(peak.is_some_and(|bytes| bytes > 0));
/// }
/// ```
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        // The kernel prints e.g. `VmHWM:\t  123456 kB`.
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
        let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// A boxed training step, returning the loss after the update.
pub type TrainingStep = Box<dyn FnMut() -> Result<f64>>;

/// One SGD step (momentum 0.9, lr 0.05: forward, loss, backward, update) of `model` on a fixed
/// random batch of `batch` images `N(0, 1)` with random labels, all drawn from `seed`: the step
/// [`bench_training`] times, for other harnesses (criterion) to time too.
///
/// ```
/// use qcl_nn::bench::{training_step, BenchModel};
/// let mut step = training_step(BenchModel::VqAutoencoder, 2, 0.into())?;
/// let first = step()?;
/// assert!(first.is_finite());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for an empty batch; candle errors.
pub fn training_step(model: BenchModel, batch: usize, seed: Seed) -> Result<TrainingStep> {
    if batch == 0 {
        return Err(Error::invalid_parameter("batch", "need at least one image"));
    }
    let device = Device::Cpu;
    let mut rng = seed.child_named("batch").rng();
    let x = rng.normal_tensor((batch, 1, 28, 28), 0.0, 1.0, &device)?;
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.below(10).map(|v| v as u32))
        .collect::<Result<_>>()?;
    let y = Tensor::new(labels.as_slice(), &device)?;
    let store = ParamStore::new(seed.child_named("weights"));
    let root = store.root(&device);
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    Ok(match model {
        BenchModel::ResNet20 => {
            let net = ResNet::new(&root, &ResNetConfig::resnet20(1, 10))?;
            let mut opt = Sgd::new(store.trainable(), sgd)?;
            Box::new(move || {
                let logits = net.forward_t(&x, true)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                opt.step(&loss.backward()?)?;
                Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
            })
        }
        BenchModel::VqAutoencoder => {
            let ae = VqAutoencoder::new(&root, 32, 16)?;
            let mut opt = Sgd::new(store.trainable(), sgd)?;
            Box::new(move || {
                let out = ae.forward_with_codes(&x)?;
                let loss =
                    (crate::ops::mse_loss(&out.reconstruction, &x)? + (out.commitment * 2.0)?)?;
                opt.step(&loss.backward()?)?;
                Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
            })
        }
    })
}

/// Trains `config.model` on one random batch and reports samples per second.
///
/// ```
/// use qcl_nn::bench::{bench_training, BenchModel, TrainBenchConfig};
/// let report = bench_training(&TrainBenchConfig {
///     batch: 4, steps: 1, warmup: 0, ..TrainBenchConfig::new(BenchModel::VqAutoencoder)
/// })?;
/// assert!(report.samples_per_s > 0.0);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a zero batch or step count; candle errors.
pub fn bench_training(config: &TrainBenchConfig) -> Result<TrainBenchReport> {
    if config.batch == 0 || config.steps == 0 {
        return Err(Error::invalid_parameter(
            "batch/steps",
            "need at least one image and one timed step",
        ));
    }
    let mut step = training_step(config.model, config.batch, config.seed)?;
    for _ in 0..config.warmup {
        step()?;
    }
    let start = Instant::now();
    let mut final_loss = f64::NAN;
    for _ in 0..config.steps {
        final_loss = step()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainBenchReport {
        model: config.model.name().to_string(),
        batch: config.batch,
        samples_per_s: (config.batch * config.steps) as f64 / seconds,
        threads: rayon::current_num_threads(),
        steps: config.steps,
        seconds,
        final_loss,
        peak_rss_bytes: peak_rss_bytes(),
    })
}
