//! Ours, beyond the paper: each layer's block size `d` and centroids `K` chosen from measured
//! sensitivities under one byte budget.
//!
//! For every quantized layer and every candidate `(d, K)` that fits it, the teacher is quantized
//! in that layer alone (EM with the configuration's objective, on inputs recorded from the
//! teacher, no fine-tuning) and the distillation loss to the teacher is measured on a fixed
//! sample of training images: the layer's sensitivity at that size. [`allocate`] then picks one
//! candidate per layer minimising the summed losses with the summed storage (index bits and
//! fp16 codebooks, as the paper counts them) within the budget: a multiple-choice knapsack,
//! solved by dynamic programming over the storage in bits (exact up to 2^20 units of budget;
//! coarser units beyond, rounded up so the budget always holds).

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use indicatif::ProgressBar;
use qcl_data::Dataset;
use qcl_nn::loss::distillation_loss;
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{quantize_layer, record_inputs, CompressConfig, LayerChoice, LayerInputs};
use crate::layout::LayerKind;
use crate::model::{LayerSpec, Model};
use crate::teacher::FMNIST_NORMALIZATION;

/// One candidate of one layer and what it measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The layer.
    pub layer: String,
    /// Its block size and centroids (K after the clamp to the layer's subvectors, which the
    /// clamp leaves unchanged when fed back as an override).
    pub choice: LayerChoice,
    /// Index bits plus fp16 codebook bits.
    pub bits: u64,
    /// Distillation loss to the teacher with only this layer quantized.
    pub loss: f64,
}

/// The candidates tried for a layer: `d` from `{9, 18}` for k×k convolutions (k > 1) and
/// `{2, 4, 8}` otherwise, each with `K ∈ {16, 32, 64, 128, 256}`; those whose `d` does not
/// divide the layer's input dimension are skipped when measured.
pub fn candidate_choices(kind: LayerKind) -> Vec<LayerChoice> {
    let blocks: &[usize] = match kind {
        LayerKind::Conv { kh, kw, .. } if kh * kw > 1 => &[9, 18],
        _ => &[2, 4, 8],
    };
    blocks
        .iter()
        .flat_map(|&block| [16, 32, 64, 128, 256].map(|centroids| LayerChoice { block, centroids }))
        .collect()
}

/// Storage bits of `cfg`'s plan for `specs`: what a whole configuration costs, the budget of
/// [`allocate`] when it should match a uniform configuration's size.
///
/// # Errors
/// As [`CompressConfig::layer_plan`].
pub fn plan_bits(specs: &[LayerSpec], cfg: &CompressConfig) -> Result<u64> {
    let mut bits = 0u64;
    for spec in specs {
        let (geometry, k, n_groups) = cfg.layer_plan(spec)?;
        bits += geometry.n_subvectors() as u64 * u64::from(crate::layout::index_bits(k))
            + 16 * (n_groups * k * geometry.block) as u64;
    }
    Ok(bits)
}

/// Measures every candidate of every quantized layer of `teacher` (see the module docs): inputs
/// recorded on `cfg.activation_images` training images, the loss on `probe_images` others.
///
/// # Errors
/// [`Error::EmptyInput`] without training images; [`Error::InvalidParameter`] with `fuse_bn`
/// or `per_slab_codebooks`; as [`compress`](super::compress).
pub fn sensitivities(
    teacher: &Model,
    train: &Dataset,
    cfg: &CompressConfig,
    probe_images: usize,
    bar: &ProgressBar,
) -> Result<Vec<Candidate>> {
    cfg.validate()?;
    // Measured on the teacher's own weights with one codebook per layer: with Fusion the
    // compressed weights are the folded ones, and per-slab codebooks divide K again.
    if cfg.fuse_bn || cfg.per_slab_codebooks {
        return Err(Error::invalid_parameter(
            "cfg",
            "sensitivities are measured without fuse_bn and per_slab_codebooks",
        ));
    }
    let n_act = cfg.activation_images.min(train.len());
    let n_probe = probe_images.min(train.len());
    if n_act == 0 || n_probe == 0 {
        return Err(Error::EmptyInput("no training images".into()));
    }
    let order = cfg
        .seed
        .child_named("sensitivity")
        .rng()
        .permutation(train.len());
    let (act_images, _) = train.tensors_at(&order[..n_act], FMNIST_NORMALIZATION, &Device::Cpu)?;
    // The probe images follow the recorded ones (they overlap only in a tiny data set).
    let probe_start = n_act.min(train.len() - n_probe);
    let probe_idx = &order[probe_start..probe_start + n_probe];
    let (probe, _) = train.tensors_at(probe_idx, FMNIST_NORMALIZATION, &Device::Cpu)?;
    let teacher_logits = teacher.logits(&probe)?;
    let student = teacher.deep_copy()?;
    let specs: Vec<LayerSpec> = teacher
        .arch()
        .layers()
        .into_iter()
        .filter(|l| l.quantized)
        .collect();
    let tries: usize = specs.iter().map(|s| candidate_choices(s.kind).len()).sum();
    bar.set_length(tries as u64);
    let mut out = Vec::new();
    for (li, spec) in specs.iter().enumerate() {
        let weight_name = format!("{}.weight", spec.name);
        let reference = teacher.var(&weight_name)?.as_tensor().copy()?;
        let recorded = record_inputs(teacher, &act_images, spec.name)?;
        let mut seen = Vec::new();
        for choice in candidate_choices(spec.kind) {
            bar.inc(1);
            let one = CompressConfig {
                layer_overrides: BTreeMap::from([(spec.name.to_string(), choice)]),
                ..cfg.clone()
            };
            // A block that does not divide the layer, or a K clamped onto one already tried.
            let Ok((geometry, k, _)) = one.layer_plan(spec) else {
                continue;
            };
            let choice = LayerChoice {
                block: choice.block,
                centroids: k,
            };
            if seen.contains(&choice) {
                continue;
            }
            seen.push(choice);
            let inputs = LayerInputs::new(geometry.clone(), spec.padding, &recorded)?;
            let seed = cfg.seed.child_named("sensitivity").child(li as u64);
            let (layer, _, _) =
                quantize_layer(&one, spec, (&geometry, k), (&reference, &inputs), seed)?;
            let decoded = candle_core::Tensor::from_vec(
                layer.pq.decode()?,
                geometry.kind.weight_shape(),
                &Device::Cpu,
            )?;
            student.set(&weight_name, &decoded)?;
            let loss = distillation_loss(&student.logits(&probe)?, &teacher_logits, 1.0)?;
            out.push(Candidate {
                layer: spec.name.to_string(),
                choice,
                bits: layer.pq.index_bits() + layer.pq.codebook_bits(),
                loss: f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?),
            });
        }
        student.set(&weight_name, &reference)?;
    }
    Ok(out)
}

/// One candidate per layer (every layer named in `candidates`) minimising the summed loss with
/// the summed bits at most `budget_bits` (see the module docs).
///
/// ```
/// use qcl_wpq::compress::allocate::{allocate, Candidate};
/// use qcl_wpq::compress::LayerChoice;
/// let c = |layer: &str, centroids, bits, loss| Candidate {
///     layer: layer.into(), choice: LayerChoice { block: 4, centroids }, bits, loss };
/// let candidates = [
///     c("a", 16, 10, 0.5), c("a", 256, 30, 0.1),
///     c("b", 16, 10, 0.9), c("b", 256, 30, 0.2),
/// ];
/// // 40 bits: one layer gets the large codebook, the one it helps more.
/// let chosen = allocate(&candidates, 40)?;
/// assert_eq!(chosen["a"].centroids, 16);
/// assert_eq!(chosen["b"].centroids, 256);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::EmptyInput`] without candidates; [`Error::InvalidParameter`] when even the
/// smallest candidates exceed the budget, or a loss is not finite.
pub fn allocate(
    candidates: &[Candidate],
    budget_bits: u64,
) -> Result<BTreeMap<String, LayerChoice>> {
    let mut layers: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for c in candidates {
        if !c.loss.is_finite() {
            return Err(Error::invalid_parameter(
                "candidates",
                format!("layer `{}`: loss {} is not finite", c.layer, c.loss),
            ));
        }
        layers.entry(c.layer.as_str()).or_default().push(c);
    }
    if layers.is_empty() {
        return Err(Error::EmptyInput("no candidate to allocate".into()));
    }
    // Bits in units small enough for at most 2^20 states; sizes round up, so the budget holds.
    let unit = budget_bits.div_ceil(1 << 20).max(1);
    let cap = (budget_bits / unit) as usize;
    let units = |c: &Candidate| c.bits.div_ceil(unit) as usize;
    // best[u]: least loss of the layers so far within u units; picks[l][u]: layer l's choice.
    let mut best = vec![0.0f64; cap + 1];
    let mut picks: Vec<Vec<u16>> = Vec::with_capacity(layers.len());
    for options in layers.values() {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = vec![u16::MAX; cap + 1];
        for u in 0..=cap {
            for (i, c) in options.iter().enumerate() {
                let w = units(c);
                if w <= u && best[u - w] + c.loss < next[u] {
                    next[u] = best[u - w] + c.loss;
                    pick[u] = i as u16;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    if !best[cap].is_finite() {
        return Err(Error::invalid_parameter(
            "budget",
            format!("{budget_bits} bits cannot hold the smallest candidate of every layer"),
        ));
    }
    let mut chosen = BTreeMap::new();
    let mut u = cap;
    for ((layer, options), pick) in layers.iter().zip(&picks).rev() {
        let c = options[pick[u] as usize];
        chosen.insert(layer.to_string(), c.choice);
        u -= units(c);
    }
    Ok(chosen)
}
