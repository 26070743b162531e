//! A weight-quantized FMNet: its quantized layers and float rest, stored as a compressed
//! checkpoint ([`crate::CHECKPOINT_FORMAT`], the architecture in its metadata), and the size
//! accounting of "And the bit goes down" (Stock et al., ICLR 2020: ideal index bits,
//! fp16 codebooks, fp32 rest).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{Error, Result};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CompressedCheckpoint, CompressedTensor, Encoding, RawTensor};
use crate::model::{check_arch, Arch, Model};
use crate::pq_tensor::PqTensor;

/// One weight-quantized layer of FMNet.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLayer {
    /// Layer name (`conv1`); the weight is `<name>.weight`.
    pub name: String,
    /// Its quantized weight.
    pub pq: PqTensor,
}

/// Sizes of a compressed model, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SizeReport {
    /// fp32 bytes of every trainable parameter of the uncompressed model.
    pub uncompressed: f64,
    /// Ideal index bytes.
    pub index: f64,
    /// Codebook bytes.
    pub codebooks: f64,
    /// fp32 bytes of the parameters that stay float (not running statistics).
    pub other: f64,
    /// `index + codebooks + other`.
    pub total: f64,
    /// `uncompressed / total`.
    pub ratio: f64,
}

/// Size by the paper's accounting from the layers `(n_sv, K, d, codebooks)` and the float
/// parameter count: `n_sv·log2(K)/8` index bytes (fractional bits allowed), `K·d·2` bytes per
/// fp16 codebook, 4 bytes per float parameter.
///
/// ```
/// use qcl_wpq::size_report;
/// // One layer of 8,192 subvectors, K = 256, d = 9 against 1 MB of float weights.
/// let r = size_report(4.0 * 73_728.0, &[(8_192, 256, 9, 1)], 0);
/// assert_eq!(r.index, 8_192.0);
/// assert_eq!(r.codebooks, 4_608.0);
/// ```
pub fn size_report(
    uncompressed_bytes: f64,
    layers: &[(usize, usize, usize, usize)],
    float_params: usize,
) -> SizeReport {
    let index: f64 = layers
        .iter()
        .map(|&(n_sv, k, _, _)| n_sv as f64 * (k as f64).log2() / 8.0)
        .sum();
    let codebooks: f64 = layers
        .iter()
        .map(|&(_, k, d, g)| (k * d * 2 * g) as f64)
        .sum();
    let other = 4.0 * float_params as f64;
    let total = index + codebooks + other;
    SizeReport {
        uncompressed: uncompressed_bytes,
        index,
        codebooks,
        other,
        total,
        ratio: uncompressed_bytes / total,
    }
}

/// A weight-quantized model: quantized layers plus every tensor that stays float.
#[derive(Debug, Clone)]
pub struct CompressedModel {
    /// The architecture the dense weights rebuild.
    pub arch: Arch,
    /// Quantized layers in forward order.
    pub layers: Vec<QuantizedLayer>,
    /// Every other tensor of the architecture (stem, biases, BN weights and running stats).
    pub floats: BTreeMap<String, Tensor>,
}

impl CompressedModel {
    /// The compressed checkpoint: each quantized layer's weight as a PQ tensor, the floats as
    /// they are, the architecture's name under the metadata key `arch`.
    ///
    /// # Errors
    /// A candle error.
    pub fn to_checkpoint(&self) -> Result<CompressedCheckpoint> {
        let mut out = CompressedCheckpoint::default();
        for layer in &self.layers {
            out.compressed.insert(
                format!("{}.weight", layer.name),
                CompressedTensor {
                    dtype: Dtype::F32,
                    shape: layer.pq.geometry.kind.weight_shape(),
                    encoding: Encoding::Pq(layer.pq.clone()),
                    outliers: None,
                },
            );
        }
        for (name, t) in &self.floats {
            out.untouched.insert(
                name.clone(),
                RawTensor::from_tensor(&t.to_dtype(DType::F32)?)?,
            );
        }
        out.metadata
            .insert("arch".into(), self.arch.name().to_string());
        Ok(out)
    }

    /// The model stored in `checkpoint`; with `expected`, its architecture must be that one.
    /// `path` is used in messages.
    ///
    /// # Errors
    /// [`Error::BadFile`] for a missing architecture, a missing, extra or wrongly shaped
    /// quantized layer or float tensor; [`Error::InvalidParameter`] for an architecture
    /// mismatch.
    pub fn from_checkpoint(
        checkpoint: &CompressedCheckpoint,
        path: &Path,
        expected: Option<Arch>,
    ) -> Result<Self> {
        let bad = |reason: String| Error::bad_file(path, reason);
        let arch = Arch::from_name(
            checkpoint
                .metadata
                .get("arch")
                .ok_or_else(|| bad("no `arch` metadata".into()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let arch = check_arch(arch, path, expected)?;
        let mut layers = Vec::new();
        let mut quantized = Vec::new();
        for spec in arch.layers().into_iter().filter(|l| l.quantized) {
            let name = format!("{}.weight", spec.name);
            let pq = match checkpoint.compressed.get(&name).map(|t| &t.encoding) {
                Some(Encoding::Pq(pq)) if pq.geometry.kind == spec.kind => pq.clone(),
                _ => return Err(bad(format!("missing quantized layer `{}`", spec.name))),
            };
            layers.push(QuantizedLayer {
                name: spec.name.to_string(),
                pq,
            });
            quantized.push(name);
        }
        if let Some(extra) = checkpoint
            .compressed
            .keys()
            .find(|k| !quantized.contains(k))
        {
            return Err(bad(format!(
                "`{extra}` is not a quantized layer of `{}`",
                arch.name()
            )));
        }
        let mut floats = BTreeMap::new();
        for (name, shape, _) in arch.tensor_specs() {
            if quantized.contains(&name) {
                continue;
            }
            let raw = checkpoint
                .untouched
                .get(&name)
                .filter(|t| t.shape() == shape.as_slice() && t.dtype() == Dtype::F32)
                .ok_or_else(|| bad(format!("missing or misshapen float tensor `{name}`")))?;
            floats.insert(name, raw.to_tensor(&Device::Cpu)?);
        }
        if let Some(extra) = checkpoint
            .untouched
            .keys()
            .find(|k| !floats.contains_key(*k))
        {
            return Err(bad(format!(
                "`{extra}` is not a tensor of `{}`",
                arch.name()
            )));
        }
        Ok(CompressedModel {
            arch,
            layers,
            floats,
        })
    }

    /// The dense model, rebuilt from the decompressed tensors.
    ///
    /// # Errors
    /// As [`PqTensor::decode`], and an architecture mismatch from [`Model::from_tensors`].
    pub fn to_model(&self) -> Result<Model> {
        Model::from_tensors(self.arch, self.to_checkpoint()?.tensors(&Device::Cpu)?)
    }

    /// Number of trainable float parameters (running statistics excluded).
    pub fn float_params(&self) -> usize {
        self.floats
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// Size by the paper's accounting against an uncompressed model of `uncompressed_params`.
    pub fn size(&self, uncompressed_params: usize) -> SizeReport {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| {
                let g = &l.pq.geometry;
                let groups = l.pq.centroids.len() / (l.pq.k * g.block).max(1);
                (g.n_subvectors(), l.pq.k, g.block, groups)
            })
            .collect();
        size_report(
            4.0 * uncompressed_params as f64,
            &layers,
            self.float_params(),
        )
    }

    /// Writes the compressed checkpoint atomically and returns its size in bytes. Centroids are
    /// stored as fp16 (round them first, as [`crate::compress`] does, for the in-memory model to
    /// match the file).
    ///
    /// # Errors
    /// As [`CompressedCheckpoint::save`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<u64> {
        self.to_checkpoint()?.save(path)
    }

    /// Reads a file written by [`CompressedModel::save`]. With `expected`, the file's
    /// architecture must be that one.
    ///
    /// # Errors
    /// As [`CompressedCheckpoint::load`] and [`CompressedModel::from_checkpoint`].
    pub fn load(path: impl AsRef<Path>, expected: Option<Arch>) -> Result<CompressedModel> {
        let path = path.as_ref();
        Self::from_checkpoint(&CompressedCheckpoint::load(path)?, path, expected)
    }
}
