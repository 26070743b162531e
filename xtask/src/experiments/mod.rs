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
