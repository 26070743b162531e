//! The experiments `cargo xtask reproduce` knows; each module exports one `EXPERIMENT`.

pub mod ann;
pub mod aqm;
pub mod cacl;
pub mod datasets;
pub mod ecvq;
pub mod kmeans;
pub mod lifequant;
pub mod memory;
pub mod minilm;
pub mod training;
pub mod vq;
pub mod wpq;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use qcl_data::{KnownDataset, SplitDataset};

use crate::data::dataset_path;
use crate::reproduce::Context;

/// What an experiment on one image data set runs with: its context, the data and the progress
/// bar. `cargo xtask reproduce` passes the prepared Fashion-MNIST ([`OnData::fashion_mnist`]);
/// the tests pass the committed fixture and a hidden bar.
#[derive(Clone, Copy)]
pub struct OnData<'a> {
    /// Output directory, mode, commit, resume directory.
    pub ctx: &'a Context,
    /// The images.
    pub data: &'a SplitDataset,
    /// Progress.
    pub bar: &'a ProgressBar,
}

impl<'a> OnData<'a> {
    /// `data` in `ctx`, with progress on `bar`.
    pub fn new(ctx: &'a Context, data: &'a SplitDataset, bar: &'a ProgressBar) -> Self {
        OnData { ctx, data, bar }
    }

    /// Fashion-MNIST from `ctx`'s data directory, for `run` to lend to an experiment.
    pub fn fashion_mnist(ctx: &Context) -> Result<SplitDataset> {
        SplitDataset::load(dataset_path(&ctx.data_dir, KnownDataset::FashionMnist))
            .context("loading Fashion-MNIST")
    }
}

/// Mean and sample standard deviation (n − 1; 0 for one value) of `values`.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}
