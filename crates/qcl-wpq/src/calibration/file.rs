//! The calibration file: what a [`Calibration`] recorded, in one safetensors file, so that a
//! model is calibrated once and compressed many times.
//!
//! Format [`CALIBRATION_FORMAT`]:
//!
//! - a weight `name` with float inputs: `name#gram` (f64 `[D, D]`, `Σxᵀx` unscaled) and, when
//!   rows were sampled, `name#sample` (f32 `[n, D]`) and `name#sample_keys` (u64 `[n]`,
//!   ascending);
//! - an embedding table: `name#token_ids` (u32 `[m]`, strictly ascending) and
//!   `name#token_counts` (u64 `[m]`);
//! - metadata: `format`, `qcl.sample_rows`, and `qcl.layers`, a JSON object sorted by name with
//!   each weight's kind, row count, width and convolution geometry.
//!
//! The header is sorted and the data ordered by alignment, then name: the same recording gives
//! the same bytes. The reader checks every part against the metadata before using it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use qcl_tensor::{Error, Result};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::{Calibration, ConvInput, InputStats, LayerStats, TokenStats};
use crate::checkpoint::file::{open_format, serialize, take, Part, Views};

/// File format tag of a saved [`Calibration`].
pub const CALIBRATION_FORMAT: &str = "qcl-wpq-calibration/1";
const LAYERS_KEY: &str = "qcl.layers";
const SAMPLE_ROWS_KEY: &str = "qcl.sample_rows";
/// Largest input width a file may declare (`D²` f64 values per layer).
const MAX_WIDTH: usize = 1 << 15;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum LayerMeta {
    Inputs {
        width: usize,
        rows: u64,
        conv: Option<ConvInput>,
        sample: usize,
    },
    Tokens {
        rows: u64,
        ids: usize,
    },
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Cow<'static, [u8]> {
    Cow::Owned(values.iter().flat_map(|&v| f(v)).collect())
}

impl Calibration {
    /// The file's bytes (see the module documentation).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a weight name that is empty or holds `#`.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.to_bytes_with(&BTreeMap::new())
    }

    /// The file's bytes with the application's own `metadata` keys beside the format's (for
    /// example the hash of the checkpoint the inputs were recorded on).
    ///
    /// # Errors
    /// As [`Calibration::to_bytes`]; [`Error::InvalidParameter`] for a key the format reserves
    /// (`format`, `qcl.layers`, `qcl.sample_rows`).
    pub fn to_bytes_with(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        if let Some(key) = metadata.keys().find(|k| is_reserved(k)) {
            return Err(Error::invalid_parameter(
                "metadata",
                format!("key `{key}` is reserved by the calibration format"),
            ));
        }
        let mut metas = BTreeMap::new();
        let mut parts: Vec<Part<'static>> = Vec::new();
        for name in self.names() {
            if name.is_empty() || name.contains('#') || name == "__metadata__" {
                return Err(Error::invalid_parameter(
                    "calibration",
                    format!("weight name `{name}` is empty, reserved or holds `#`"),
                ));
            }
            let Some(stats) = self.stats(&name) else {
                continue;
            };
            let part = |suffix: &str, dtype, shape, bytes| {
                (format!("{name}#{suffix}"), dtype, shape, bytes)
            };
            match stats {
                LayerStats::Inputs(s) => {
                    let n = s.sample_len();
                    let w = s.width;
                    parts.push(part(
                        "gram",
                        Dtype::F64,
                        vec![w, w],
                        le_bytes(&s.gram, f64::to_le_bytes),
                    ));
                    if n > 0 {
                        let keys = self.keys(&name);
                        parts.push(part(
                            "sample",
                            Dtype::F32,
                            vec![n, w],
                            le_bytes(&s.sample, f32::to_le_bytes),
                        ));
                        parts.push(part(
                            "sample_keys",
                            Dtype::U64,
                            vec![n],
                            le_bytes(&keys, u64::to_le_bytes),
                        ));
                    }
                    metas.insert(
                        name.clone(),
                        LayerMeta::Inputs {
                            width: w,
                            rows: s.rows,
                            conv: s.conv,
                            sample: n,
                        },
                    );
                }
                LayerStats::Tokens(t) => {
                    let ids: Vec<u32> = t.counts.keys().copied().collect();
                    let counts: Vec<u64> = t.counts.values().copied().collect();
                    let m = ids.len();
                    parts.push(part(
                        "token_ids",
                        Dtype::U32,
                        vec![m],
                        le_bytes(&ids, u32::to_le_bytes),
                    ));
                    parts.push(part(
                        "token_counts",
                        Dtype::U64,
                        vec![m],
                        le_bytes(&counts, u64::to_le_bytes),
                    ));
                    metas.insert(
                        name.clone(),
                        LayerMeta::Tokens {
                            rows: t.rows,
                            ids: m,
                        },
                    );
                }
            }
        }
        let mut metadata = metadata.clone();
        metadata.extend([
            ("format".to_string(), CALIBRATION_FORMAT.to_string()),
            (SAMPLE_ROWS_KEY.to_string(), self.sample_rows.to_string()),
            (
                LAYERS_KEY.to_string(),
                serde_json::to_string(&metas)
                    .map_err(|e| Error::invalid_parameter("metadata", e.to_string()))?,
            ),
        ]);
        serialize(&metadata, parts)
    }

    /// Writes the recording atomically to `path` and returns the file's size in bytes.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_wpq::Calibration;
    /// let calib = Calibration::new();
    /// calib.record("fc.weight", &Tensor::randn(0f32, 1.0, (6, 4), &Device::Cpu)?)?;
    /// calib.record("emb.weight", &Tensor::new(&[3u32, 1, 3], &Device::Cpu)?)?;
    /// let dir = tempfile::tempdir()?;
    /// calib.save(dir.path().join("calib.safetensors"))?;
    /// let back = Calibration::load(dir.path().join("calib.safetensors"))?;
    /// assert_eq!(back.stats("fc.weight"), calib.stats("fc.weight"));
    /// assert_eq!(back.stats("emb.weight"), calib.stats("emb.weight"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Calibration::to_bytes`]; [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<u64> {
        self.save_with(path, &BTreeMap::new())
    }

    /// [`Calibration::save`] with the application's own `metadata` (see
    /// [`Calibration::to_bytes_with`]), read back by [`Calibration::load_with_metadata`].
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use candle_core::{Device, Tensor};
    /// use qcl_wpq::Calibration;
    /// let calib = Calibration::new();
    /// calib.record("fc.weight", &Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?)?;
    /// let meta = BTreeMap::from([("texts".to_string(), "2".to_string())]);
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("calib.safetensors");
    /// calib.save_with(&path, &meta)?;
    /// let (back, back_meta) = Calibration::load_with_metadata(&path)?;
    /// assert_eq!((back.stats("fc.weight"), back_meta), (calib.stats("fc.weight"), meta));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Calibration::to_bytes_with`]; [`Error::Io`].
    pub fn save_with(
        &self,
        path: impl AsRef<Path>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<u64> {
        let bytes = self.to_bytes_with(metadata)?;
        qcl_tensor::write_atomic(path, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// A file written by [`Calibration::save_with`] and the application's metadata in it.
    ///
    /// # Errors
    /// As [`Calibration::load`].
    pub fn load_with_metadata(path: impl AsRef<Path>) -> Result<(Self, BTreeMap<String, String>)> {
        let path = path.as_ref();
        let bytes = qcl_tensor::read_safetensors_bytes(path)?;
        Self::parse(path, &bytes)
    }

    /// Reads a file written by [`Calibration::save`].
    ///
    /// # Errors
    /// [`Error::Io`]; as [`Calibration::from_bytes`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = qcl_tensor::read_safetensors_bytes(path)?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses a file's bytes; `path` is used in messages only.
    ///
    /// # Errors
    /// [`Error::BadFile`] for a truncated or foreign file, foreign metadata, a missing,
    /// unexpected or wrongly shaped part, an absurd width, a non-finite value, sample keys
    /// out of order, or token counts that do not add up to the recorded rows.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        Self::parse(path.as_ref(), bytes).map(|(calib, _)| calib)
    }

    /// The calibration in a file's bytes and the application's metadata in it.
    fn parse(path: &Path, bytes: &[u8]) -> Result<(Self, BTreeMap<String, String>)> {
        let bad = |reason: String| Error::bad_file(path, reason);
        let (parsed, mut metadata) =
            open_format(path, bytes, CALIBRATION_FORMAT, "qcl-wpq calibration")?;
        let sample_rows: usize = metadata
            .get(SAMPLE_ROWS_KEY)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("no valid `{SAMPLE_ROWS_KEY}` metadata")))?;
        let metas: BTreeMap<String, LayerMeta> = serde_json::from_str(
            metadata
                .get(LAYERS_KEY)
                .ok_or_else(|| bad(format!("no `{LAYERS_KEY}` metadata")))?,
        )
        .map_err(|e| bad(format!("foreign `{LAYERS_KEY}` metadata: {e}")))?;
        let mut views: Views<'_> = parsed
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data())))
            .collect();
        let calib = Calibration::new().with_sample_rows(sample_rows);
        for (name, meta) in metas {
            let (stats, keys) = read_layer(&name, &meta, &mut views)
                .map_err(|e| bad(format!("weight `{name}`: {e}")))?;
            calib.insert_with_keys(&name, stats, keys);
        }
        if let Some(name) = views.keys().next() {
            return Err(bad(format!("unexpected tensor `{name}`")));
        }
        metadata.retain(|k, _| !is_reserved(k));
        Ok((calib, metadata))
    }
}

fn is_reserved(key: &str) -> bool {
    key == "format" || key == LAYERS_KEY || key == SAMPLE_ROWS_KEY
}

fn values<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks of N bytes")))
        .collect()
}

/// One weight's statistics and sample keys; errors are reasons (the caller names the file).
fn read_layer(
    name: &str,
    meta: &LayerMeta,
    views: &mut Views<'_>,
) -> std::result::Result<(LayerStats, Vec<u64>), String> {
    let reason = |e: Error| match e {
        Error::BadFile { reason, .. } => reason,
        other => other.to_string(),
    };
    match *meta {
        LayerMeta::Inputs {
            width,
            rows,
            conv,
            sample,
        } => {
            if width == 0 || width > MAX_WIDTH || sample as u64 > rows {
                return Err(format!(
                    "absurd width {width} or sample of {sample} of {rows} rows"
                ));
            }
            let gram: Vec<f64> = values(
                take(views, name, "gram", Dtype::F64, &[width, width]).map_err(reason)?,
                f64::from_le_bytes,
            );
            let (sample_values, keys) = if sample > 0 {
                let s =
                    take(views, name, "sample", Dtype::F32, &[sample, width]).map_err(reason)?;
                let k = take(views, name, "sample_keys", Dtype::U64, &[sample]).map_err(reason)?;
                (values(s, f32::from_le_bytes), values(k, u64::from_le_bytes))
            } else {
                (Vec::new(), Vec::new())
            };
            if gram.iter().any(|v| !v.is_finite()) || sample_values.iter().any(|v| !v.is_finite()) {
                return Err("a non-finite Gram or sample value".into());
            }
            if keys.windows(2).any(|w| w[0] > w[1]) {
                return Err("sample keys out of order".into());
            }
            let stats = InputStats {
                width,
                gram,
                rows,
                conv,
                sample: sample_values,
            };
            Ok((LayerStats::Inputs(stats), keys))
        }
        LayerMeta::Tokens { rows, ids } => {
            let id_bytes = take(views, name, "token_ids", Dtype::U32, &[ids]).map_err(reason)?;
            let count_bytes =
                take(views, name, "token_counts", Dtype::U64, &[ids]).map_err(reason)?;
            let ids: Vec<u32> = values(id_bytes, u32::from_le_bytes);
            let counts: Vec<u64> = values(count_bytes, u64::from_le_bytes);
            if ids.windows(2).any(|w| w[0] >= w[1]) {
                return Err("token ids not strictly ascending".into());
            }
            let total = counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
            if total != Some(rows) {
                return Err(format!(
                    "token counts add up to {total:?}, the metadata says {rows} rows"
                ));
            }
            let counts = ids.into_iter().zip(counts).collect();
            Ok((LayerStats::Tokens(TokenStats { counts, rows }), Vec::new()))
        }
    }
}
