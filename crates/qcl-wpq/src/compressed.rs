//! Quantized layers, the compressed model, its file (spec §6, §7) and size accounting.
//!
//! File (safetensors, format [`COMPRESSED_FORMAT`]): three blobs — `codebooks` (f16, every
//! layer's `[groups·K, d]` codebook in turn), `assignments` (u8, every layer's indices bit-packed
//! with `⌈log2 K⌉` bits each by qcl-pq's `PackedCodes`, each layer byte-aligned) and `floats`
//! (f32: stem, biases, BatchNorm γ/β and running statistics) — and JSON metadata describing each
//! layer (geometry, K, groups, offsets) and each float tensor (shape, offset). Blobs keep the
//! header small, so the file is close to the ideal size.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_pq::PackedCodes;
use qcl_tensor::{Error, Result, SafetensorsFile};
use serde::{Deserialize, Serialize};

use crate::layout::{index_bits, LayerGeometry, Layout};
use crate::model::{file_arch, Arch, Model};

/// File format tag of a compressed model.
pub const COMPRESSED_FORMAT: &str = "qcl-wpq-compressed/1";

/// One weight-quantized layer: codebook(s) and assignments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedLayer {
    /// Layer name (`conv1`); the weight is `<name>.weight`.
    pub name: String,
    /// Shape, layout and block size.
    pub geometry: LayerGeometry,
    /// Centroids per codebook.
    pub k: usize,
    /// Number of codebooks (1, or one per input-channel block for Subspace).
    pub n_groups: usize,
    /// `[n_groups·K, d]` row-major.
    #[serde(skip)]
    pub centroids: Vec<f32>,
    /// Index (within its group's codebook) of every subvector, slab-major.
    #[serde(skip)]
    pub assignments: Vec<u32>,
}

impl QuantizedLayer {
    /// Checks that sizes agree and every index is below `K`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::CorruptStream`] naming the layer.
    pub fn validate(&self) -> Result<()> {
        let d = self.geometry.block;
        if self.centroids.len() != self.n_groups * self.k * d {
            return Err(Error::ShapeMismatch {
                context: format!("centroids of {}", self.name),
                expected: format!("[{}, {d}]", self.n_groups * self.k),
                actual: vec![self.centroids.len()],
            });
        }
        if self.assignments.len() != self.geometry.n_subvectors() {
            return Err(Error::ShapeMismatch {
                context: format!("assignments of {}", self.name),
                expected: format!("[{}]", self.geometry.n_subvectors()),
                actual: vec![self.assignments.len()],
            });
        }
        if let Some(i) = self.assignments.iter().position(|&a| a as usize >= self.k) {
            return Err(Error::CorruptStream {
                context: format!("assignments of {}", self.name),
                reason: format!(
                    "index {} at {i} is not below K = {}",
                    self.assignments[i], self.k
                ),
            });
        }
        Ok(())
    }

    /// Row of every subvector in the stacked `[n_groups·K, d]` codebook.
    pub fn global_codes(&self) -> Vec<u32> {
        let (_, groups) = self.geometry.groups(self.n_groups > 1);
        self.assignments
            .iter()
            .zip(groups)
            .map(|(&a, g)| (g * self.k) as u32 + a)
            .collect()
    }

    /// The decoded weight, row-major in the layer's weight shape.
    ///
    /// # Errors
    /// As [`QuantizedLayer::validate`].
    pub fn decode(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let d = self.geometry.block;
        let sub: Vec<f32> = self
            .global_codes()
            .iter()
            .flat_map(|&c| {
                self.centroids[c as usize * d..(c as usize + 1) * d]
                    .iter()
                    .copied()
            })
            .collect();
        self.geometry.roll(&sub)
    }

    /// The decoded weight built from `centroids` (a `[n_groups·K, d]` tensor, e.g. a trainable
    /// var) with differentiable gathers, so autograd gives each centroid the sum of its members'
    /// gradients.
    ///
    /// # Errors
    /// A candle error for a codebook of the wrong shape.
    pub fn decode_tensor(&self, centroids: &Tensor) -> Result<Tensor> {
        let dev = centroids.device();
        let codes = Tensor::from_vec(self.global_codes(), self.assignments.len(), dev)?;
        let sub = centroids.index_select(&codes, 0)?.flatten_all()?;
        let perm = self.geometry.permutation();
        let mut inverse = vec![0u32; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i as u32;
        }
        let inverse = Tensor::from_vec(inverse, perm.len(), dev)?;
        Ok(sub
            .index_select(&inverse, 0)?
            .reshape(self.geometry.kind.weight_shape())?)
    }

    /// Member count of every centroid (`[n_groups·K]`).
    pub fn cluster_sizes(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.n_groups * self.k];
        self.global_codes()
            .iter()
            .for_each(|&c| counts[c as usize] += 1);
        counts
    }

    /// Ideal index bytes `n_sv·log2(K)/8` (spec §6, fractional bits allowed).
    pub fn index_bytes(&self) -> f64 {
        self.geometry.n_subvectors() as f64 * (self.k as f64).log2() / 8.0
    }

    /// Codebook bytes `groups·K·d·2` (fp16).
    pub fn codebook_bytes(&self) -> usize {
        self.n_groups * self.k * self.geometry.block * 2
    }

    /// Rounds the centroids to fp16 precision (what the file stores).
    pub fn round_to_f16(&mut self) {
        for c in &mut self.centroids {
            *c = half::f16::from_f32(*c).to_f32();
        }
    }
}

/// Sizes of a compressed model (spec §6), bytes.
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

/// Size by the spec's formula (§6) from the layers and the float parameter count.
///
/// ```
/// use qcl_wpq::size_report;
/// // One layer of 8,192 subvectors, K = 256, d = 9 against 1 MB of float weights.
/// let r = size_report(4.0 * 73_728.0, &[(8_192, 256, 9, 1)], 0);
/// assert_eq!(r.index, 8_192.0);
/// assert_eq!(r.codebooks, 4_608.0);
/// # let _ = r;
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

/// Per-layer metadata in the file: `[name, layout, block, K, groups]` (the shape comes from
/// the architecture, the offsets from the order).
type LayerMeta = (String, Layout, usize, usize, usize);

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
    /// The dense model: decoded weights plus the float tensors.
    ///
    /// # Errors
    /// As [`QuantizedLayer::decode`], and an architecture mismatch from [`Model::from_tensors`].
    pub fn to_model(&self) -> Result<Model> {
        let mut values = self.floats.clone();
        for layer in &self.layers {
            let w = layer.decode()?;
            values.insert(
                format!("{}.weight", layer.name),
                Tensor::from_vec(w, layer.geometry.kind.weight_shape(), &Device::Cpu)?,
            );
        }
        Model::from_tensors(self.arch, values)
    }

    /// Number of trainable float parameters (running statistics excluded).
    pub fn float_params(&self) -> usize {
        self.floats
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// Size by the spec's formula against an uncompressed model of `uncompressed_params`.
    pub fn size(&self, uncompressed_params: usize) -> SizeReport {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| (l.geometry.n_subvectors(), l.k, l.geometry.block, l.n_groups))
            .collect();
        size_report(
            4.0 * uncompressed_params as f64,
            &layers,
            self.float_params(),
        )
    }

    /// Writes the file atomically and returns its size in bytes. Centroids are stored as fp16
    /// (call [`QuantizedLayer::round_to_f16`] first to make the in-memory model match).
    ///
    /// # Errors
    /// As [`QuantizedLayer::validate`], [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<u64> {
        let mut codebooks: Vec<half::f16> = Vec::new();
        let mut assign: Vec<u8> = Vec::new();
        let mut metas: Vec<LayerMeta> = Vec::new();
        for layer in &self.layers {
            layer.validate()?;
            let bits = index_bits(layer.k);
            let packed = PackedCodes::pack(&layer.assignments, layer.assignments.len(), bits)?;
            metas.push((
                layer.name.clone(),
                layer.geometry.layout,
                layer.geometry.block,
                layer.k,
                layer.n_groups,
            ));
            codebooks.extend(layer.centroids.iter().map(|&c| half::f16::from_f32(c)));
            assign.extend_from_slice(packed.bytes());
        }
        let mut floats: Vec<f32> = Vec::new();
        for (name, shape) in float_specs(self.arch, &self.layers) {
            let t = self.floats.get(&name).ok_or_else(|| {
                Error::invalid_parameter("floats", format!("no float tensor `{name}`"))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    context: name,
                    expected: format!("{shape:?}"),
                    actual: t.dims().to_vec(),
                });
            }
            floats.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        let dev = Device::Cpu;
        let (n_cb, n_as, n_fl) = (codebooks.len(), assign.len(), floats.len());
        let codebooks = Tensor::from_vec(codebooks, n_cb, &dev)?;
        let assign = Tensor::from_vec(assign, n_as, &dev)?;
        let floats = Tensor::from_vec(floats, n_fl, &dev)?;
        let layers_json = serde_json::to_string(&metas)
            .map_err(|e| Error::invalid_parameter("metadata", e.to_string()))?;
        let meta = BTreeMap::from([
            ("format".to_string(), COMPRESSED_FORMAT.to_string()),
            ("arch".to_string(), self.arch.name().to_string()),
            ("layers".to_string(), layers_json),
        ]);
        let path = path.as_ref();
        qcl_tensor::write_safetensors(
            path,
            &[
                ("codebooks", &codebooks),
                ("assignments", &assign),
                ("floats", &floats),
            ],
            &meta,
        )?;
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Reads a file written by [`CompressedModel::save`]. With `expected`, the file's
    /// architecture must be that one.
    ///
    /// # Errors
    /// [`Error::BadFile`] for a foreign file or metadata, a missing layer or float tensor, or
    /// blobs shorter than the metadata says (truncated assignments); [`Error::InvalidParameter`]
    /// for an architecture mismatch; [`Error::CorruptStream`] for an index not below `K`.
    pub fn load(path: impl AsRef<Path>, expected: Option<Arch>) -> Result<CompressedModel> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(COMPRESSED_FORMAT, "a qcl-wpq compressed model")?;
        let bad = |reason: String| Error::bad_file(path, reason);
        let arch = file_arch(&file, path, expected)?;
        let metas: Vec<LayerMeta> = serde_json::from_str(
            file.metadata()
                .get("layers")
                .ok_or_else(|| bad("no `layers` metadata".into()))?,
        )
        .map_err(|e| bad(format!("foreign `layers` metadata: {e}")))?;
        let read = |name: &str, dtype: DType| -> Result<Tensor> {
            let t = file.tensor(name, &Device::Cpu)?;
            if t.dtype() != dtype {
                return Err(Error::DTypeMismatch {
                    context: format!("`{name}` of {}", path.display()),
                    expected: dtype,
                    actual: t.dtype(),
                });
            }
            Ok(t)
        };
        let codebooks: Vec<f32> = read("codebooks", DType::F16)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let assign: Vec<u8> = read("assignments", DType::U8)?.to_vec1()?;
        let floats: Vec<f32> = read("floats", DType::F32)?.to_vec1()?;
        // Every quantized layer of the architecture must be there, once, in order.
        let wanted: Vec<&str> = arch
            .layers()
            .iter()
            .filter(|l| l.quantized)
            .map(|l| l.name)
            .collect();
        let found: Vec<&str> = metas.iter().map(|m| m.0.as_str()).collect();
        if let Some(missing) = wanted.iter().find(|w| !found.contains(w)) {
            return Err(bad(format!("missing quantized layer `{missing}`")));
        }
        let mut layers = Vec::new();
        let (mut cb_offset, mut as_offset) = (0usize, 0usize);
        for (name, layout, block, k, n_groups) in metas {
            let spec = arch
                .layers()
                .into_iter()
                .find(|l| l.name == name && l.quantized)
                .ok_or_else(|| {
                    bad(format!(
                        "layer `{name}` is not a quantized layer of `{}`",
                        arch.name()
                    ))
                })?;
            let geometry = LayerGeometry::new(spec.kind, layout, block)
                .map_err(|e| bad(format!("layer `{name}`: {e}")))?;
            if k == 0 || n_groups == 0 || n_groups != geometry.groups(n_groups > 1).0 {
                return Err(bad(format!(
                    "layer `{name}`: inconsistent K or codebook count"
                )));
            }
            let bits = index_bits(k);
            let n_cb = n_groups * k * block;
            if cb_offset + n_cb > codebooks.len() {
                return Err(bad(format!("codebook of `{name}` is truncated")));
            }
            let centroids = codebooks[cb_offset..cb_offset + n_cb].to_vec();
            cb_offset += n_cb;
            let n_sv = geometry.n_subvectors();
            let n_bytes = (n_sv * bits as usize).div_ceil(8);
            if as_offset + n_bytes > assign.len() {
                return Err(bad(format!(
                    "assignments of `{name}` are truncated: need {n_bytes} bytes at offset \
                     {as_offset}, the file holds {}",
                    assign.len()
                )));
            }
            let packed = PackedCodes::from_bytes(
                assign[as_offset..as_offset + n_bytes].to_vec(),
                1,
                n_sv,
                bits,
            )?;
            as_offset += n_bytes;
            let layer = QuantizedLayer {
                name,
                geometry,
                k,
                n_groups,
                centroids,
                assignments: packed.unpack(),
            };
            layer.validate()?;
            layers.push(layer);
        }
        if cb_offset != codebooks.len() || as_offset != assign.len() {
            return Err(bad("codebook or assignment blob has trailing bytes".into()));
        }
        let mut float_map = BTreeMap::new();
        let mut offset = 0;
        for (name, shape) in float_specs(arch, &layers) {
            let n: usize = shape.iter().product();
            if offset + n > floats.len() {
                return Err(bad(format!("float tensor `{name}` is truncated")));
            }
            float_map.insert(
                name,
                Tensor::from_vec(floats[offset..offset + n].to_vec(), shape, &Device::Cpu)?,
            );
            offset += n;
        }
        if offset != floats.len() {
            return Err(bad("float blob has trailing values".into()));
        }
        Ok(CompressedModel {
            arch,
            layers,
            floats: float_map,
        })
    }
}

/// The float tensors of `arch` given its quantized layers, in file order.
fn float_specs(arch: Arch, layers: &[QuantizedLayer]) -> Vec<(String, Vec<usize>)> {
    arch.tensor_specs()
        .into_iter()
        .filter(|(name, _, _)| !layers.iter().any(|l| *name == format!("{}.weight", l.name)))
        .map(|(name, shape, _)| (name, shape))
        .collect()
}
