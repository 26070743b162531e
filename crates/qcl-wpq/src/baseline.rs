//! FMNet's uniform per-output-channel scalar baseline: symmetric, `2^b` levels evenly spaced on
//! `[−s, s]` with `s` the channel's largest magnitude, applied to the layers weight PQ
//! quantizes; no fine-tuning. (Checkpoints use [`crate::scalar`]'s grids.)

use candle_core::{Device, Tensor};
use qcl_tensor::{Error, Result};

use crate::compressed::SizeReport;
use crate::model::Model;

/// The quantized values of one channel: nearest of `2^bits` levels on `[−s, s]`.
///
/// ```
/// let q = qcl_wpq::baseline::quantize_channel(&[0.75, -0.25, 0.1, -0.75], 2);
/// // Levels −0.75, −0.25, 0.25, 0.75.
/// assert_eq!(q, vec![0.75, -0.25, 0.25, -0.75]);
/// ```
pub fn quantize_channel(values: &[f32], bits: u32) -> Vec<f32> {
    let s = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if s == 0.0 {
        return values.to_vec();
    }
    let steps = ((1u64 << bits) - 1) as f32;
    let step = 2.0 * s / steps;
    values
        .iter()
        .map(|v| {
            let i = ((v + s) / step).round().clamp(0.0, steps);
            -s + i * step
        })
        .collect()
}

/// `model` with every quantizable layer's weight quantized to `bits` per output channel.
///
/// # Errors
/// [`Error::InvalidParameter`] for `bits` outside `1..=16`.
pub fn uniform_quantize(model: &Model, bits: u32) -> Result<Model> {
    if !(1..=16).contains(&bits) {
        return Err(Error::invalid_parameter(
            "bits",
            format!("must be in 1..=16, got {bits}"),
        ));
    }
    let out = model.deep_copy()?;
    for layer in model.arch().layers().iter().filter(|l| l.quantized) {
        let name = format!("{}.weight", layer.name);
        let w = model.var(&name)?.as_tensor();
        let shape = w.dims().to_vec();
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let per = values.len() / shape[0];
        let q: Vec<f32> = values
            .chunks_exact(per)
            .flat_map(|c| quantize_channel(c, bits))
            .collect();
        out.set(&name, &Tensor::from_vec(q, shape, &Device::Cpu)?)?;
    }
    Ok(out)
}

/// Size of [`uniform_quantize`]'s result by the paper's accounting: `bits` per quantized
/// weight, one fp32 scale per output channel, every other parameter fp32.
pub fn uniform_size(model: &Model, bits: u32) -> SizeReport {
    let arch = model.arch();
    let mut index = 0f64;
    let mut scales = 0f64;
    let mut quantized = 0usize;
    for layer in arch.layers().iter().filter(|l| l.quantized) {
        let shape = layer.kind.weight_shape();
        let n: usize = shape.iter().product();
        quantized += n;
        index += n as f64 * f64::from(bits) / 8.0;
        scales += 4.0 * shape[0] as f64;
    }
    let uncompressed = 4.0 * arch.n_params() as f64;
    let other = uncompressed - 4.0 * quantized as f64;
    let total = index + scales + other;
    SizeReport {
        uncompressed,
        index,
        codebooks: scales,
        other,
        total,
        ratio: uncompressed / total,
    }
}
