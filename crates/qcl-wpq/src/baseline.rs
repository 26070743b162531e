//! FMNet's uniform scalar baseline: by default per output channel, symmetric, `2^b` levels
//! evenly spaced on `[−s, s]` with `s` the channel's largest magnitude, applied to the layers
//! weight PQ quantizes; no fine-tuning. [`UniformConfig`] names the choices that move its
//! accuracy (where the levels sit, the range's granularity, clipping, which layers), so the
//! baseline's loss can be taken apart. (Checkpoints use [`crate::scalar`]'s grids.)

use candle_core::{Device, Tensor};
use qcl_tensor::{Error, Result};
use serde::Serialize;

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
    quantize_range(values, bits, UniformLevels::Even, s)
}

/// Where the `b`-bit levels sit on `[−s, s]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum UniformLevels {
    /// `2^b` levels `−s + i·2s/(2^b − 1)`: both ends, no zero (the default, the paper's
    /// baseline as the method notes describe it).
    #[default]
    Even,
    /// `2^b − 1` levels `i·s/(2^{b−1} − 1)` for `|i| ≤ 2^{b−1} − 1`: symmetric integers, zero
    /// included (one code unused).
    ZeroCentred,
}

/// Over which weights one range `s` is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum UniformRange {
    /// One `s` per output channel (the default).
    #[default]
    PerChannel,
    /// One `s` per weight tensor.
    PerTensor,
}

/// How `s` is chosen from the weights it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum UniformClip {
    /// `s = max |w|` (the default): no weight is clipped.
    #[default]
    Max,
    /// `s = f·max |w|` with `f ∈ {0.30, 0.32, …, 1.00}` minimising `Σ (w − q(w))²`: the
    /// outermost weights are clipped when that shrinks the squared error.
    MseOptimal,
}

/// Every choice of the uniform baseline, each with a default.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UniformConfig {
    /// Bits per weight (default 4).
    pub bits: u32,
    /// Where the levels sit (default [`UniformLevels::Even`]).
    pub levels: UniformLevels,
    /// The range's granularity (default [`UniformRange::PerChannel`]).
    pub range: UniformRange,
    /// How the range is chosen (default [`UniformClip::Max`]).
    pub clip: UniformClip,
    /// Quantize only the layer of this name (default `None`: every layer weight PQ
    /// quantizes), to measure each layer's share of the loss.
    pub only_layer: Option<String>,
}

impl Default for UniformConfig {
    fn default() -> Self {
        UniformConfig {
            bits: 4,
            levels: UniformLevels::default(),
            range: UniformRange::default(),
            clip: UniformClip::default(),
            only_layer: None,
        }
    }
}

/// `values` on the `bits`-bit grid `levels` of range `s` (returned unchanged when `s` is 0).
fn quantize_range(values: &[f32], bits: u32, levels: UniformLevels, s: f32) -> Vec<f32> {
    if s == 0.0 {
        return values.to_vec();
    }
    match levels {
        UniformLevels::Even => {
            let steps = ((1u64 << bits) - 1) as f32;
            let step = 2.0 * s / steps;
            values
                .iter()
                .map(|v| -s + ((v + s) / step).round().clamp(0.0, steps) * step)
                .collect()
        }
        UniformLevels::ZeroCentred => {
            // Integer levels around zero, so a zero weight stays exactly zero (`+ 0.0` turns
            // the −0.0 of small negative weights into the one zero level).
            let half = ((1u64 << (bits - 1)) - 1).max(1) as f32;
            let step = s / half;
            values
                .iter()
                .map(|v| (v / step).round().clamp(-half, half) * step + 0.0)
                .collect()
        }
    }
}

/// `s` for `values` under `config`'s clip rule.
fn choose_range(values: &[f32], config: &UniformConfig) -> f32 {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    match config.clip {
        UniformClip::Max => max,
        UniformClip::MseOptimal => {
            (0..=35)
                .map(|k: u32| max * ((30 + 2 * k) as f32 / 100.0))
                .map(|s| {
                    let q = quantize_range(values, config.bits, config.levels, s);
                    let err: f64 = values
                        .iter()
                        .zip(&q)
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum();
                    (err, s)
                })
                .fold(
                    (f64::INFINITY, max),
                    |best, c| if c.0 < best.0 { c } else { best },
                )
                .1
        }
    }
}

/// `model` with every quantizable layer's weight quantized to `bits` per output channel.
///
/// # Errors
/// [`Error::InvalidParameter`] for `bits` outside `1..=16`.
pub fn uniform_quantize(model: &Model, bits: u32) -> Result<Model> {
    uniform_quantize_with(
        model,
        &UniformConfig {
            bits,
            ..UniformConfig::default()
        },
    )
}

/// `model` with its quantizable layers' weights (or only `config.only_layer`'s) on the uniform
/// grid `config` describes.
///
/// ```
/// use qcl_wpq::baseline::{uniform_quantize_with, UniformConfig, UniformLevels};
/// use qcl_wpq::{Arch, Model};
/// let model = Model::new(Arch::FmNet, qcl_tensor::Seed::new(0))?;
/// let config = UniformConfig { bits: 2, levels: UniformLevels::ZeroCentred, ..Default::default() };
/// let q = uniform_quantize_with(&model, &config)?;
/// // Two-bit zero-centred levels: −s, 0, s per output channel.
/// let w: Vec<f32> = q.var("conv1.weight")?.as_tensor().flatten_all()?.to_vec1()?;
/// let distinct: std::collections::BTreeSet<u32> = w[..144].iter().map(|v| v.to_bits()).collect();
/// assert!(distinct.len() <= 3);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for `bits` outside `1..=16`, [`UniformLevels::ZeroCentred`]
/// with one bit, or an `only_layer` that is not a quantizable layer.
pub fn uniform_quantize_with(model: &Model, config: &UniformConfig) -> Result<Model> {
    if !(1..=16).contains(&config.bits) {
        return Err(Error::invalid_parameter(
            "bits",
            format!("must be in 1..=16, got {}", config.bits),
        ));
    }
    if config.bits == 1 && config.levels == UniformLevels::ZeroCentred {
        return Err(Error::invalid_parameter(
            "levels",
            "zero-centred levels need at least 2 bits",
        ));
    }
    let layers: Vec<_> = model
        .arch()
        .layers()
        .into_iter()
        .filter(|l| l.quantized)
        .filter(|l| {
            config
                .only_layer
                .as_ref()
                .is_none_or(|only| *only == l.name)
        })
        .collect();
    if layers.is_empty() {
        return Err(Error::invalid_parameter(
            "only_layer",
            format!("{:?} is not a quantizable layer", config.only_layer),
        ));
    }
    let out = model.deep_copy()?;
    for layer in layers {
        let name = format!("{}.weight", layer.name);
        let w = model.var(&name)?.as_tensor();
        let shape = w.dims().to_vec();
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let per = match config.range {
            UniformRange::PerChannel => values.len() / shape[0],
            UniformRange::PerTensor => values.len(),
        };
        let q: Vec<f32> = values
            .chunks_exact(per)
            .flat_map(|c| quantize_range(c, config.bits, config.levels, choose_range(c, config)))
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
