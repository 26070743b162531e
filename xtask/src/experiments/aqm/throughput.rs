//! One AQM module's training speed, beside qcl-nn's benchmark model with the same convolutions
//! measured under the same load; and, when the committed training benchmark results are there,
//! the rough ratio to PyTorch they imply (read from that file at run time, never typed in).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use qcl_aqm::{QLayer, QLayerConfig};
use serde::Serialize;

/// What the throughput measurement found.
#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    /// One module's training samples/s at batch 128.
    pub module_samples_per_second: f64,
    /// qcl-nn's benchmark VQ autoencoder (fixed codebook, SGD) right after it.
    pub fixed_codebook_model_samples_per_second: f64,
    /// The committed training benchmark's ours/PyTorch ratio for that model, if readable.
    pub pytorch: Option<PytorchRatio>,
}

/// The committed ours/PyTorch throughput ratio of qcl-nn's benchmark VQ autoencoder.
#[derive(Debug, Clone, Serialize)]
pub struct PytorchRatio {
    /// The file it was read from (relative to the workspace).
    pub file: String,
    /// The commit that file records (None: it records none).
    pub commit: Option<String>,
    /// Median over its repetitions of ours / PyTorch samples per second (`vq_ae`).
    pub median_ratio: f64,
}

/// The committed training benchmark results.
fn training_json() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/results/training.json")
}

/// Reads `figures.vq_ae.median_ratio` (and the commit) of a training benchmark result file.
pub fn pytorch_ratio(path: &Path) -> Option<PytorchRatio> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let median_ratio = v["figures"]["vq_ae"]["median_ratio"].as_f64()?;
    (median_ratio.is_finite() && median_ratio > 0.0).then(|| PytorchRatio {
        file: "docs/results/training.json".into(),
        commit: v["commit"].as_str().map(str::to_string),
        median_ratio,
    })
}

/// Training samples per second of one Fashion-MNIST module at batch 128 (encoder, quantizer,
/// decoder, loss, Adam), after 2 warm-up steps.
fn module_throughput(steps: usize) -> Result<f64> {
    let mut layer = QLayer::new(
        QLayerConfig::fashion_mnist(),
        1,
        [28, 28],
        0.into(),
        &Device::Cpu,
    )?;
    let x = Tensor::rand(-1f32, 1f32, (128, 1, 28, 28), &Device::Cpu)?;
    let step = |layer: &mut QLayer| -> Result<()> {
        let out = layer.forward(&x, true)?;
        let loss = layer.loss(&out, &x, 0, true)?;
        layer.optimize(&loss)?;
        Ok(())
    };
    for _ in 0..2 {
        step(&mut layer)?;
    }
    let started = Instant::now();
    for _ in 0..steps {
        step(&mut layer)?;
    }
    Ok((steps * 128) as f64 / started.elapsed().as_secs_f64())
}

/// The module, then qcl-nn's benchmark model with the same convolutions under the same load.
pub fn measure(steps: usize) -> Result<Speed> {
    let module = module_throughput(steps)?;
    let fixed = qcl_nn::bench::bench_training(&qcl_nn::bench::TrainBenchConfig {
        batch: 128,
        steps,
        warmup: 2,
        ..qcl_nn::bench::TrainBenchConfig::new(qcl_nn::bench::BenchModel::VqAutoencoder)
    })?
    .samples_per_s;
    Ok(Speed {
        module_samples_per_second: module,
        fixed_codebook_model_samples_per_second: fixed,
        pytorch: pytorch_ratio(&training_json()),
    })
}

impl Speed {
    /// The throughput paragraph of the report.
    pub fn paragraph(&self) -> String {
        let rel = self.module_samples_per_second / self.fixed_codebook_model_samples_per_second;
        let torch = match &self.pytorch {
            Some(p) => format!(
                " The committed training benchmark ({}, {}) measured that benchmark model at \
                 {:.2}× PyTorch's samples/s (median); by that ratio the module runs at roughly \
                 {:.2}× PyTorch.",
                p.file,
                p.commit
                    .as_deref()
                    .map_or("which records no commit".to_string(), |c| format!(
                        "commit `{c}`"
                    )),
                p.median_ratio,
                rel * p.median_ratio
            ),
            None => String::new(),
        };
        format!(
            "One module's training throughput at batch 128 (forward with the EMA quantizer, loss, \
             backward, Adam): {:.0} samples/s; qcl-nn's benchmark model with the same \
             convolutions (fixed codebook, SGD) measured right after it: {:.0} samples/s, so the \
             module runs at {rel:.2}× the benchmark model.{torch}",
            self.module_samples_per_second, self.fixed_codebook_model_samples_per_second
        )
    }
}
