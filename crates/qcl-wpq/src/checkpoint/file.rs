//! The compressed checkpoint file.
//!
//! One safetensors file, format [`CHECKPOINT_FORMAT`]:
//!
//! - every untouched tensor under its own name, dtype and bytes;
//! - for a compressed tensor `name`: `name#codebooks` (f16 `[G·K, d]`) and `name#codes` (u8,
//!   indices bit-packed by qcl-pq's `PackedCodes`, `⌈log2 K⌉` bits each, slab-major) for PQ;
//!   `name#codes` (u8, `bits` per weight, row-major), `name#scales` and `name#zeros` (f16
//!   `[rows, groups]`) for scalar grids; `name#fp16` for fp16;
//! - with `s` exact outlier columns (metadata `outliers: s`): `name#outlier_columns` (u32
//!   `[s]`, strictly ascending) and `name#outlier_values` (f16 `[rows, s]`), the PQ or scalar
//!   parts then encoding the `[rows, cols − s]` weight of the other columns;
//! - metadata: `format`, `qcl.tensors` (JSON object, sorted by name: method, dtype, shape and
//!   the method's parameters per compressed tensor) and the application's own keys.
//!
//! The header is written with sorted keys and the data in a fixed order (by alignment, then
//! name), so the same checkpoint always gives the same bytes. The reader checks every bound
//! against the metadata before allocating.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use qcl_pq::PackedCodes;
use qcl_tensor::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::{CompressedCheckpoint, CompressedTensor, Encoding, ExactColumns, RawTensor};
use crate::layout::{index_bits, LayerGeometry, Layout};
use crate::pq_tensor::{PqTensor, Sharing};
use crate::scalar::{ScalarCodes, ScalarTensor, MAX_SCALAR_BITS};

/// File format tag of a compressed checkpoint.
pub const CHECKPOINT_FORMAT: &str = "qcl-wpq-checkpoint/1";
/// Largest number of weights of one compressed tensor a file may declare.
pub const MAX_WEIGHTS: usize = 1 << 32;
/// Largest block size `d` a file may declare.
const MAX_BLOCK: usize = 1 << 12;
const TENSORS_KEY: &str = "qcl.tensors";
const SEPARATOR: char = '#';

/// What the metadata says about one compressed tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
enum TensorMeta {
    Fp16 {
        dtype: Dtype,
        shape: Vec<usize>,
    },
    Scalar {
        dtype: Dtype,
        shape: Vec<usize>,
        bits: u32,
        group: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        outliers: usize,
    },
    Pq {
        dtype: Dtype,
        shape: Vec<usize>,
        layout: Layout,
        d: usize,
        k: usize,
        sharing: Sharing,
        bits: u32,
        #[serde(default, skip_serializing_if = "is_zero")]
        outliers: usize,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One stored tensor: name, dtype, shape, bytes.
pub(crate) type Part<'a> = (String, Dtype, Vec<usize>, Cow<'a, [u8]>);

fn f16_bytes(values: &[f16]) -> Cow<'static, [u8]> {
    Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn packed(codes: &[u32], bits: u32) -> Result<Cow<'static, [u8]>> {
    Ok(Cow::Owned(
        PackedCodes::pack(codes, codes.len(), bits)?
            .bytes()
            .to_vec(),
    ))
}

fn bad_name(name: &str) -> Error {
    Error::invalid_parameter(
        "tensors",
        format!("tensor name `{name}` is empty, reserved or holds `{SEPARATOR}`"),
    )
}

impl CompressedCheckpoint {
    /// The file's bytes (the same checkpoint always gives the same bytes).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a name holding `#`, a tensor both compressed and
    /// untouched, or a reserved metadata key; as [`PqTensor::validate`] and
    /// [`ScalarTensor::validate`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut parts: Vec<Part<'_>> = Vec::new();
        for (name, t) in &self.untouched {
            if name.is_empty() || name.contains(SEPARATOR) || name == "__metadata__" {
                return Err(bad_name(name));
            }
            if self.compressed.contains_key(name) {
                return Err(Error::invalid_parameter(
                    "tensors",
                    format!("`{name}` is both compressed and untouched"),
                ));
            }
            parts.push((
                name.clone(),
                t.dtype(),
                t.shape().to_vec(),
                Cow::Borrowed(t.bytes()),
            ));
        }
        let mut metas = BTreeMap::new();
        for (name, t) in &self.compressed {
            if name.is_empty() || name.contains(SEPARATOR) || name == "__metadata__" {
                return Err(bad_name(name));
            }
            let (meta, mut own) = encode(name, t)?;
            metas.insert(name.clone(), meta);
            parts.append(&mut own);
        }
        let mut metadata = self.metadata.clone();
        for key in ["format", TENSORS_KEY] {
            if metadata.contains_key(key) {
                return Err(Error::invalid_parameter(
                    "metadata",
                    format!("key `{key}` is reserved"),
                ));
            }
        }
        metadata.insert("format".into(), CHECKPOINT_FORMAT.into());
        metadata.insert(
            TENSORS_KEY.into(),
            serde_json::to_string(&metas)
                .map_err(|e| Error::invalid_parameter("metadata", e.to_string()))?,
        );
        serialize(&metadata, parts)
    }

    /// Writes the file atomically and returns its size in bytes.
    ///
    /// # Errors
    /// As [`CompressedCheckpoint::to_bytes`]; [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<u64> {
        let bytes = self.to_bytes()?;
        qcl_tensor::write_atomic(path, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Reads a file written by [`CompressedCheckpoint::save`].
    ///
    /// # Errors
    /// [`Error::Io`]; as [`CompressedCheckpoint::from_bytes`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = qcl_tensor::read_safetensors_bytes(path)?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses a file's bytes; `path` is used in messages only.
    ///
    /// # Errors
    /// [`Error::BadFile`] for a truncated or foreign file, foreign metadata, a missing,
    /// unexpected or wrongly shaped part, an absurd shape, `K`, `d` or bit width, or a
    /// non-finite codebook or scale; [`Error::CorruptStream`] for an index not below `K`.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let path = path.as_ref();
        let bad = |reason: String| Error::bad_file(path, reason);
        let (parsed, mut metadata) = open_format(
            path,
            bytes,
            CHECKPOINT_FORMAT,
            "qcl-wpq compressed checkpoint",
        )?;
        let metas: BTreeMap<String, TensorMeta> = serde_json::from_str(
            &metadata
                .remove(TENSORS_KEY)
                .ok_or_else(|| bad(format!("no `{TENSORS_KEY}` metadata")))?,
        )
        .map_err(|e| bad(format!("foreign `{TENSORS_KEY}` metadata: {e}")))?;
        let mut views: BTreeMap<String, (Dtype, Vec<usize>, &[u8])> = parsed
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data())))
            .collect();
        let mut compressed = BTreeMap::new();
        for (name, meta) in metas {
            let t = decode(&name, &meta, &mut views).map_err(|e| match e {
                Error::BadFile { reason, .. } => bad(format!("tensor `{name}`: {reason}")),
                other => crate::calibration::named(&name, other),
            })?;
            compressed.insert(name, t);
        }
        let mut untouched = BTreeMap::new();
        for (name, (dtype, shape, data)) in views {
            if name.contains(SEPARATOR) || compressed.contains_key(&name) {
                return Err(bad(format!("unexpected tensor `{name}`")));
            }
            let raw = RawTensor::new(dtype, shape, data.to_vec())
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            untouched.insert(name, raw);
        }
        Ok(CompressedCheckpoint {
            compressed,
            untouched,
            metadata,
        })
    }
}

fn encode<'a>(name: &str, t: &'a CompressedTensor) -> Result<(TensorMeta, Vec<Part<'a>>)> {
    let (dtype, shape) = (t.dtype, t.shape.clone());
    let part = |suffix: &str, dtype, shape, bytes| {
        (format!("{name}{SEPARATOR}{suffix}"), dtype, shape, bytes)
    };
    let mismatch = |what: &str, actual: Vec<usize>| Error::ShapeMismatch {
        context: format!("{what} of `{name}`"),
        expected: format!("{:?}", t.shape),
        actual,
    };
    let (inner, outliers) = match (&t.outliers, t.shape.as_slice(), &t.encoding) {
        (None, _, _) => (t.shape.clone(), 0),
        (Some(e), &[rows, cols], Encoding::Scalar(_) | Encoding::Pq(_)) => {
            e.validate(rows, cols)?;
            (vec![rows, cols - e.columns.len()], e.columns.len())
        }
        (Some(_), _, _) => {
            return Err(Error::invalid_parameter(
                "outliers",
                format!("`{name}`: outlier columns need a 2-D PQ or scalar tensor"),
            ))
        }
    };
    let (meta, mut parts) = match &t.encoding {
        Encoding::Fp16(v) => {
            if v.len() != t.shape.iter().product::<usize>() {
                return Err(mismatch("fp16 values", vec![v.len()]));
            }
            let parts = vec![part("fp16", Dtype::F16, shape.clone(), f16_bytes(v))];
            (TensorMeta::Fp16 { dtype, shape }, parts)
        }
        Encoding::Scalar(s) => {
            s.validate()?;
            if s.shape != inner {
                return Err(mismatch("scalar codes", s.shape.clone()));
            }
            let (rows, per_row) = (s.matrix_dims().0, s.groups_per_row());
            let codes = packed(&s.codes.codes, s.bits)?;
            let parts = vec![
                part("codes", Dtype::U8, vec![codes.len()], codes),
                part(
                    "scales",
                    Dtype::F16,
                    vec![rows, per_row],
                    f16_bytes(&s.codes.scales),
                ),
                part(
                    "zeros",
                    Dtype::F16,
                    vec![rows, per_row],
                    f16_bytes(&s.codes.zeros),
                ),
            ];
            let meta = TensorMeta::Scalar {
                dtype,
                shape,
                bits: s.bits,
                group: s.group,
                outliers,
            };
            (meta, parts)
        }
        Encoding::Pq(p) => {
            p.validate()?;
            if p.geometry.kind.weight_shape() != inner {
                return Err(mismatch("PQ geometry", p.geometry.kind.weight_shape()));
            }
            let (d, bits) = (p.geometry.block, index_bits(p.k));
            let book: Vec<f16> = p.centroids.iter().map(|&c| f16::from_f32(c)).collect();
            let codes = packed(&p.assignments, bits)?;
            let parts = vec![
                part(
                    "codebooks",
                    Dtype::F16,
                    vec![book.len() / d, d],
                    f16_bytes(&book),
                ),
                part("codes", Dtype::U8, vec![codes.len()], codes),
            ];
            let meta = TensorMeta::Pq {
                dtype,
                shape,
                layout: p.geometry.layout,
                d,
                k: p.k,
                sharing: p.sharing,
                bits,
                outliers,
            };
            (meta, parts)
        }
    };
    if let Some(e) = &t.outliers {
        let s = e.columns.len();
        let columns: Vec<u8> = e.columns.iter().flat_map(|c| c.to_le_bytes()).collect();
        parts.push(part(
            "outlier_columns",
            Dtype::U32,
            vec![s],
            Cow::Owned(columns),
        ));
        let values = f16_bytes(&e.values);
        parts.push(part(
            "outlier_values",
            Dtype::F16,
            vec![t.shape[0], s],
            values,
        ));
    }
    Ok((meta, parts))
}

/// Parses a safetensors file of format `format` (`what` names it in messages) and returns its
/// tensors and its metadata without the `format` key; `path` is used in messages only.
///
/// # Errors
/// [`Error::BadFile`] for a truncated or foreign file, or another `format`.
pub(crate) fn open_format<'a>(
    path: &Path,
    bytes: &'a [u8],
    format: &str,
    what: &str,
) -> Result<(SafeTensors<'a>, BTreeMap<String, String>)> {
    let bad = |reason: String| Error::bad_file(path, reason);
    let parsed = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a complete safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a complete safetensors file ({e})")))?;
    let mut metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    qcl_tensor::verify_checksum(path, &parsed, &metadata)?;
    metadata.remove(qcl_tensor::CHECKSUM_KEY);
    match metadata.remove("format") {
        Some(f) if f == format => Ok((parsed, metadata)),
        other => Err(bad(format!(
            "not a {what}: format {other:?}, expected `{format}`"
        ))),
    }
}

/// Safetensors bytes of the parts, checksummed, with a sorted header
/// ([`qcl_tensor::serialize_safetensors`]).
pub(crate) fn serialize(
    metadata: &BTreeMap<String, String>,
    parts: Vec<Part<'_>>,
) -> Result<Vec<u8>> {
    qcl_tensor::serialize_safetensors(
        parts
            .iter()
            .map(|(name, dtype, shape, bytes)| (name.as_str(), *dtype, &shape[..], &bytes[..])),
        metadata,
    )
}

pub(crate) type Views<'a> = BTreeMap<String, (Dtype, Vec<usize>, &'a [u8])>;

/// Removes part `suffix` of `name` from `views`, checking its dtype and shape.
pub(crate) fn take<'a>(
    views: &mut Views<'a>,
    name: &str,
    suffix: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    let key = format!("{name}{SEPARATOR}{suffix}");
    let (found_dtype, found_shape, data) = views
        .remove(&key)
        .ok_or_else(|| Error::bad_file("", format!("missing tensor `{key}`")))?;
    if found_dtype != dtype || found_shape != shape {
        return Err(Error::bad_file(
            "",
            format!(
                "`{key}` is {found_dtype:?} {found_shape:?}, expected {dtype:?} {shape:?} \
                 (truncated or inconsistent with the metadata)"
            ),
        ));
    }
    Ok(data)
}

fn read_f16(data: &[u8], what: &str) -> Result<Vec<f16>> {
    let values: Vec<f16> = data
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::bad_file(
            "",
            format!("{what} value {i} is not finite"),
        ));
    }
    Ok(values)
}

fn unpack(data: &[u8], n: usize, bits: u32) -> Result<Vec<u32>> {
    Ok(PackedCodes::from_bytes(data.to_vec(), 1, n, bits)?.unpack())
}

/// Checks a declared shape and returns its number of elements.
fn numel(shape: &[usize]) -> Result<usize> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if (1..=MAX_WEIGHTS).contains(&n) && (1..=8).contains(&shape.len()) => Ok(n),
        _ => Err(Error::bad_file(
            "",
            format!("absurd shape {shape:?} (at most {MAX_WEIGHTS} weights)"),
        )),
    }
}

fn decode(name: &str, meta: &TensorMeta, views: &mut Views<'_>) -> Result<CompressedTensor> {
    let bad = |reason: String| Error::bad_file("", reason);
    let (dtype, shape, encoding, s_out) = match meta {
        TensorMeta::Fp16 { dtype, shape } => {
            numel(shape)?;
            let values = take(views, name, "fp16", Dtype::F16, shape)?;
            let values = values
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            (*dtype, shape, Encoding::Fp16(values), 0)
        }
        TensorMeta::Scalar {
            dtype,
            shape,
            bits,
            group,
            outliers,
        } => {
            let inner = inner_shape(shape, *outliers)?;
            let n = numel(&inner)?;
            if !(1..=MAX_SCALAR_BITS).contains(bits) || *group == 0 {
                return Err(bad(format!("absurd bits {bits} or group {group}")));
            }
            let (rows, cols) = (inner[0], n / inner[0]);
            let per_row = cols.div_ceil(*group);
            let codes = take(
                views,
                name,
                "codes",
                Dtype::U8,
                &[(n * *bits as usize).div_ceil(8)],
            )?;
            let scales = take(views, name, "scales", Dtype::F16, &[rows, per_row])?;
            let zeros = take(views, name, "zeros", Dtype::F16, &[rows, per_row])?;
            let tensor = ScalarTensor {
                shape: inner,
                bits: *bits,
                group: (*group).min(cols),
                codes: ScalarCodes {
                    codes: unpack(codes, n, *bits)?,
                    scales: read_f16(scales, "scale")?,
                    zeros: read_f16(zeros, "zero")?,
                },
            };
            (*dtype, shape, Encoding::Scalar(tensor), *outliers)
        }
        TensorMeta::Pq {
            dtype,
            shape,
            layout,
            d,
            k,
            sharing,
            bits,
            outliers,
        } => {
            let inner = inner_shape(shape, *outliers)?;
            numel(&inner)?;
            if *k == 0 || *k > 1 << 16 || *bits != index_bits(*k) || *d > MAX_BLOCK {
                return Err(bad(format!("absurd K = {k}, d = {d} or bits = {bits}")));
            }
            let geometry = LayerGeometry::from_shape(&inner, *layout, *d)
                .map_err(|e| bad(format!("geometry: {e}")))?;
            // The codes' size bounds every allocation below by the file's size.
            let n_sv = geometry.n_subvectors();
            let codes = take(
                views,
                name,
                "codes",
                Dtype::U8,
                &[(n_sv * *bits as usize).div_ceil(8)],
            )?;
            let (groups, _) = sharing
                .groups(&geometry)
                .map_err(|e| bad(format!("sharing: {e}")))?;
            let rows = groups
                .checked_mul(*k)
                .filter(|r| r.checked_mul(*d).is_some_and(|n| n <= MAX_WEIGHTS))
                .ok_or_else(|| bad(format!("absurd codebook {groups}×{k}×{d}")))?;
            let book = take(views, name, "codebooks", Dtype::F16, &[rows, *d])?;
            let tensor = PqTensor {
                geometry,
                k: *k,
                sharing: *sharing,
                centroids: read_f16(book, "codebook")?
                    .iter()
                    .map(|c| c.to_f32())
                    .collect(),
                assignments: unpack(codes, n_sv, *bits)?,
            };
            tensor.validate()?;
            (*dtype, shape, Encoding::Pq(tensor), *outliers)
        }
    };
    let outliers = match s_out {
        0 => None,
        s => {
            let columns = take(views, name, "outlier_columns", Dtype::U32, &[s])?;
            let values = take(views, name, "outlier_values", Dtype::F16, &[shape[0], s])?;
            let exact = ExactColumns {
                columns: columns
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                values: read_f16(values, "outlier value")?,
            };
            exact.validate(shape[0], shape[1])?;
            Some(exact)
        }
    };
    Ok(CompressedTensor {
        dtype,
        shape: shape.clone(),
        encoding,
        outliers,
    })
}

/// The shape of the columns a scalar or PQ encoding holds beside `s` outlier columns.
fn inner_shape(shape: &[usize], s: usize) -> Result<Vec<usize>> {
    match *shape {
        _ if s == 0 => Ok(shape.to_vec()),
        [rows, cols] if s < cols => Ok(vec![rows, cols - s]),
        _ => Err(Error::bad_file(
            "",
            format!("{s} outlier columns do not fit a weight of shape {shape:?}"),
        )),
    }
}
