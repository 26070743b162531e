//! FMNet's teacher: training with cross-entropy, test accuracy, shuffled batches.

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use qcl_data::{Dataset, Normalization};
use qcl_nn::optim::{Adam, AdamConfig, Optimizer};
use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::model::{Arch, ForwardConfig, Model};

/// Fashion-MNIST standardisation (mean and standard deviation of the training pixels).
pub const FMNIST_NORMALIZATION: Normalization = Normalization::Standardize {
    mean: 0.2860,
    std: 0.3530,
};

/// An endless stream of shuffled training batches (a new permutation per epoch).
pub(crate) struct BatchStream<'a> {
    data: &'a Dataset,
    seed: Seed,
    pub(crate) batch: usize,
    epoch: u64,
    order: Vec<usize>,
    next: usize,
}

impl<'a> BatchStream<'a> {
    pub(crate) fn new(data: &'a Dataset, batch: usize, seed: Seed) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::EmptyInput("no training images".into()));
        }
        Ok(BatchStream {
            data,
            seed,
            batch: batch.min(data.len()),
            epoch: 0,
            order: seed.child(0).rng().permutation(data.len()),
            next: 0,
        })
    }

    pub(crate) fn next_batch(&mut self) -> Result<(Tensor, Tensor)> {
        if self.next + self.batch > self.order.len() {
            self.epoch += 1;
            self.order = self
                .seed
                .child(self.epoch)
                .rng()
                .permutation(self.data.len());
            self.next = 0;
        }
        let idx = &self.order[self.next..self.next + self.batch];
        self.next += self.batch;
        self.data
            .tensors_at(idx, FMNIST_NORMALIZATION, &Device::Cpu)
    }
}

/// Test accuracy (%) of `model` in eval mode on `data` (the first `limit` images if given).
///
/// # Errors
/// [`Error::EmptyInput`] for no images, a candle error.
pub fn evaluate(model: &Model, data: &Dataset, limit: Option<usize>) -> Result<f64> {
    let n = limit.unwrap_or(data.len()).min(data.len());
    if n == 0 {
        return Err(Error::EmptyInput("no evaluation images".into()));
    }
    let mut correct = 0usize;
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(500) {
        let (x, y) = data.tensors_at(chunk, FMNIST_NORMALIZATION, &Device::Cpu)?;
        let logits = model.logits(&x)?;
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let y: Vec<u32> = y.to_vec1()?;
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    Ok(100.0 * correct as f64 / n as f64)
}

/// Teacher training (Adam lr 1e-3, last epoch 3e-4, batch 128, no augmentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// Architecture.
    pub arch: Arch,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Learning rate of the last epoch.
    pub last_epoch_lr: f64,
    /// Use only the first this many training images (all when `None`).
    pub train_images: Option<usize>,
    /// Seed of the initialisation and the batch order.
    pub seed: Seed,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            arch: Arch::FmNet,
            epochs: 8,
            batch_size: 128,
            lr: 1e-3,
            last_epoch_lr: 3e-4,
            train_images: None,
            seed: Seed::new(0),
        }
    }
}

/// Trains a teacher with cross-entropy.
///
/// # Errors
/// [`Error::EmptyInput`] without images, a candle error.
pub fn train_teacher(cfg: &TeacherConfig, train: &Dataset, bar: &ProgressBar) -> Result<Model> {
    let seed = cfg.seed;
    let model = Model::new(cfg.arch, seed.child_named("init"))?;
    let n = cfg.train_images.unwrap_or(train.len()).min(train.len());
    let subset = train.subset(&(0..n).collect::<Vec<_>>())?;
    let mut stream = BatchStream::new(&subset, cfg.batch_size, seed.child_named("batches"))?;
    let steps_per_epoch = (n / stream.batch).max(1);
    let mut opt = Adam::new(
        model.trainable(),
        AdamConfig {
            lr: cfg.lr,
            ..Default::default()
        },
    )?;
    bar.set_length((cfg.epochs * steps_per_epoch) as u64);
    bar.set_position(0);
    for epoch in 0..cfg.epochs {
        if epoch + 1 == cfg.epochs && cfg.epochs > 1 {
            opt.set_learning_rate(cfg.last_epoch_lr);
        }
        for _ in 0..steps_per_epoch {
            let (x, y) = stream.next_batch()?;
            let out = model.forward(
                &x,
                ForwardConfig {
                    train: true,
                    ..Default::default()
                },
            )?;
            let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?;
            opt.backward_step(&loss)?;
            model.update_running_stats(&out.bn_stats)?;
            bar.inc(1);
        }
    }
    Ok(model)
}
