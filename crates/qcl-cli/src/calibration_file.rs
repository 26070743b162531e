//! Calibration files: what a [`Calibration`] recorded, saved so that `qcl text calibrate` and
//! `qcl wpq compress-checkpoint --calibration` can run apart.
//!
//! One safetensors file, format [`CALIBRATION_FORMAT`]:
//!
//! - for a weight `name` whose inputs were recorded: `name#gram` (f64 `[D, D]`, `H = Σxᵀx`);
//! - for an embedding table: `name#ids` (u32, ascending) and `name#counts` (i64, ≥ 1);
//! - metadata: `format`, `qcl.layers` (JSON object by name: `kind` `inputs` with `width`,
//!   `rows`, `conv`; or `tokens` with `rows`) and the application's own keys.
//!
//! ```
//! use std::collections::BTreeMap;
//! use candle_core::{Device, Tensor};
//! use qcl_cli::calibration_file;
//! use qcl_wpq::Calibration;
//! let calib = Calibration::new();
//! calib.record("fc.weight", &Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?)?;
//! calib.record("emb.weight", &Tensor::new(&[5u32, 7, 5], &Device::Cpu)?)?;
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("calib.safetensors");
//! let meta = BTreeMap::from([("qcl.texts".to_string(), "2".to_string())]);
//! calibration_file::save(&calib, &meta, &path)?;
//! let (back, back_meta) = calibration_file::load(&path)?;
//! assert_eq!(back.stats("fc.weight"), calib.stats("fc.weight"));
//! assert_eq!(back.stats("emb.weight"), calib.stats("emb.weight"));
//! assert_eq!(back_meta, meta);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{Error, Result, SafetensorsFile};
use qcl_wpq::{Calibration, ConvInput, InputStats, LayerStats, TokenStats};
use serde::{Deserialize, Serialize};

/// File format tag of a calibration file.
pub const CALIBRATION_FORMAT: &str = "qcl-calibration/1";
const LAYERS_KEY: &str = "qcl.layers";
const SEPARATOR: char = '#';

/// What the metadata says about one weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum LayerMeta {
    Inputs {
        width: usize,
        rows: u64,
        conv: Option<ConvInput>,
    },
    Tokens {
        rows: u64,
    },
}

/// Writes everything `calibration` recorded, with the application's `metadata`, atomically;
/// returns the file's size in bytes.
///
/// # Errors
/// [`Error::EmptyInput`] for a calibration that recorded nothing; [`Error::InvalidParameter`]
/// for a weight name holding `#` or a reserved metadata key (`format`, `qcl.layers`);
/// [`Error::Io`].
pub fn save(
    calibration: &Calibration,
    metadata: &BTreeMap<String, String>,
    path: impl AsRef<Path>,
) -> Result<u64> {
    let path = path.as_ref();
    if calibration.is_empty() {
        return Err(Error::EmptyInput("the calibration recorded nothing".into()));
    }
    let mut layers = BTreeMap::new();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in calibration.names() {
        if name.contains(SEPARATOR) {
            return Err(Error::invalid_parameter(
                "calibration",
                format!("weight name `{name}` holds `{SEPARATOR}`"),
            ));
        }
        let Some(stats) = calibration.stats(&name) else {
            continue;
        };
        match stats {
            LayerStats::Inputs(s) => {
                let gram = Tensor::from_vec(s.gram, (s.width, s.width), &Device::Cpu)?;
                tensors.push((format!("{name}#gram"), gram));
                let meta = LayerMeta::Inputs {
                    width: s.width,
                    rows: s.rows,
                    conv: s.conv,
                };
                layers.insert(name, meta);
            }
            LayerStats::Tokens(t) => {
                let ids: Vec<u32> = t.counts.keys().copied().collect();
                let counts: Vec<i64> = t.counts.values().map(|&c| c as i64).collect();
                let n = ids.len();
                tensors.push((format!("{name}#ids"), Tensor::from_vec(ids, n, &Device::Cpu)?));
                let counts = Tensor::from_vec(counts, n, &Device::Cpu)?;
                tensors.push((format!("{name}#counts"), counts));
                layers.insert(name, LayerMeta::Tokens { rows: t.rows });
            }
        }
    }
    let mut all = metadata.clone();
    for key in ["format", LAYERS_KEY] {
        if all.contains_key(key) {
            return Err(Error::invalid_parameter(
                "metadata",
                format!("key `{key}` is reserved"),
            ));
        }
    }
    all.insert("format".into(), CALIBRATION_FORMAT.into());
    let layers = serde_json::to_string(&layers)
        .map_err(|e| Error::invalid_parameter("metadata", e.to_string()))?;
    all.insert(LAYERS_KEY.into(), layers);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    qcl_tensor::write_safetensors(path, &refs, &all)?;
    Ok(std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len())
}

/// Reads a file written by [`save`]: the calibration and the application's metadata.
///
/// # Errors
/// [`Error::Io`]; [`Error::BadFile`] naming the file for a foreign or truncated file, foreign
/// metadata, a missing, extra or wrongly typed tensor, a non-finite Gram matrix, token ids
/// that are not ascending or counts that do not add up to the recorded rows.
pub fn load(path: impl AsRef<Path>) -> Result<(Calibration, BTreeMap<String, String>)> {
    let path = path.as_ref();
    let file = SafetensorsFile::open(path)?;
    file.require_format(CALIBRATION_FORMAT, "a calibration file")?;
    let bad = |reason: String| Error::bad_file(path, reason);
    let mut metadata = file.metadata().clone();
    metadata.remove("format");
    let layers: BTreeMap<String, LayerMeta> = serde_json::from_str(
        &metadata
            .remove(LAYERS_KEY)
            .ok_or_else(|| bad(format!("no `{LAYERS_KEY}` metadata")))?,
    )
    .map_err(|e| bad(format!("foreign `{LAYERS_KEY}` metadata: {e}")))?;
    let part = |name: &str, suffix: &str, dtype: DType, shape: &[usize]| -> Result<Tensor> {
        let full = format!("{name}{SEPARATOR}{suffix}");
        if !file.contains(&full) {
            return Err(bad(format!("no tensor `{full}`")));
        }
        let t = file.tensor(&full, &Device::Cpu)?;
        if t.dtype() != dtype || t.dims() != shape {
            return Err(bad(format!(
                "`{full}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                t.dtype(),
                t.dims()
            )));
        }
        Ok(t)
    };
    let calibration = Calibration::new();
    let mut expected_parts = 0;
    for (name, meta) in &layers {
        let stats = match *meta {
            LayerMeta::Inputs { width, rows, conv } => {
                expected_parts += 1;
                let gram: Vec<f64> = part(name, "gram", DType::F64, &[width, width])?
                    .flatten_all()?
                    .to_vec1()?;
                if width == 0 || gram.iter().any(|v| !v.is_finite()) {
                    return Err(bad(format!("`{name}#gram` is empty or not finite")));
                }
                LayerStats::Inputs(InputStats {
                    width,
                    gram,
                    rows,
                    conv,
                })
            }
            LayerMeta::Tokens { rows } => {
                expected_parts += 2;
                let n = file.info(&format!("{name}#ids"))?.shape.first().copied();
                let n = n.ok_or_else(|| bad(format!("`{name}#ids` is a scalar")))?;
                let ids: Vec<u32> = part(name, "ids", DType::U32, &[n])?.to_vec1()?;
                let counts: Vec<i64> = part(name, "counts", DType::I64, &[n])?.to_vec1()?;
                token_stats(name, &ids, &counts, rows).map_err(bad)?
            }
        };
        calibration.insert(name, stats);
    }
    if file.names().len() != expected_parts {
        return Err(bad(format!(
            "{} tensors, but the metadata describes {expected_parts}",
            file.names().len()
        )));
    }
    Ok((calibration, metadata))
}

fn token_stats(
    name: &str,
    ids: &[u32],
    counts: &[i64],
    rows: u64,
) -> std::result::Result<LayerStats, String> {
    if ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("`{name}#ids` are not strictly ascending"));
    }
    let mut total = 0u64;
    let mut map = BTreeMap::new();
    for (&id, &c) in ids.iter().zip(counts) {
        let c = u64::try_from(c)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| format!("`{name}#counts` holds {c}, not a positive count"))?;
        total = total.saturating_add(c);
        map.insert(id, c);
    }
    if total != rows {
        return Err(format!(
            "`{name}#counts` add up to {total}, the metadata says {rows} rows"
        ));
    }
    Ok(LayerStats::Tokens(TokenStats { counts: map, rows }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_raw(path: &Path, tensors: &[(&str, Tensor)], layers: &str) {
        let meta = BTreeMap::from([
            ("format".to_string(), CALIBRATION_FORMAT.to_string()),
            (LAYERS_KEY.to_string(), layers.to_string()),
        ]);
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        qcl_tensor::write_safetensors(path, &refs, &meta).unwrap();
    }

    #[test]
    fn foreign_and_inconsistent_files_are_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let cpu = Device::Cpu;
        let gram = Tensor::zeros((2, 2), DType::F64, &cpu).unwrap();
        let ids = Tensor::new(&[3u32, 1], &cpu).unwrap();
        let counts = Tensor::new(&[1i64, 1], &cpu).unwrap();
        let inputs = r#"{"w": {"kind": "inputs", "width": 2, "rows": 4, "conv": null}}"#;
        let tokens = r#"{"e": {"kind": "tokens", "rows": 2}}"#;
        for (tensors, layers, needle) in [
            (vec![("w#gram", gram.clone())], r#"{"w": {"kind": "x"}}"#, "foreign"),
            (vec![("w#gram", gram.to_dtype(DType::F32).unwrap())], inputs, "expected F64"),
            (vec![("v#gram", gram.clone())], inputs, "no tensor `w#gram`"),
            (
                vec![("w#gram", gram.clone()), ("x", gram.clone())],
                inputs,
                "metadata describes 1",
            ),
            (
                vec![("e#ids", ids.clone()), ("e#counts", counts.clone())],
                tokens,
                "not strictly ascending",
            ),
            (
                vec![
                    ("e#ids", Tensor::new(&[1u32, 3], &cpu).unwrap()),
                    ("e#counts", Tensor::new(&[1i64, 5], &cpu).unwrap()),
                ],
                tokens,
                "add up to 6",
            ),
        ] {
            write_raw(&path, &tensors, layers);
            let e = load(&path).unwrap_err();
            assert_eq!(e.kind(), "bad_file", "{e}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        // Another kind of safetensors file.
        qcl_tensor::write_safetensors(&path, &[("w", &gram)], &BTreeMap::new()).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("not a calibration file"), "{e}");
    }

    #[test]
    fn nothing_recorded_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let e = save(&Calibration::new(), &BTreeMap::new(), &path).unwrap_err();
        assert_eq!(e.kind(), "empty_input");
        assert!(!path.exists());
        let calib = Calibration::new();
        calib
            .record("w", &Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let reserved = BTreeMap::from([("format".to_string(), "x".to_string())]);
        assert!(save(&calib, &reserved, &path).is_err());
        assert!(!path.exists());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever was recorded reads back equal, and the same calibration gives the same bytes.
        #[test]
        fn recorded_statistics_round_trip(
            width in 1usize..6,
            rows in proptest::collection::vec(proptest::collection::vec(-4.0f32..4.0, 1..6), 0..5),
            ids in proptest::collection::vec(0u32..50, 1..40),
        ) {
            let calib = Calibration::new();
            for (i, row) in rows.iter().enumerate() {
                let x: Vec<f32> = row.iter().cycle().take(width * (i + 1)).copied().collect();
                calib.record("layer.weight", &Tensor::from_vec(x, (i + 1, width), &Device::Cpu).unwrap()).unwrap();
            }
            calib.record("emb.weight", &Tensor::new(ids.as_slice(), &Device::Cpu).unwrap()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            save(&calib, &BTreeMap::new(), &a).unwrap();
            save(&calib, &BTreeMap::new(), &b).unwrap();
            prop_assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            let (back, meta) = load(&a).unwrap();
            prop_assert!(meta.is_empty());
            prop_assert_eq!(back.names(), calib.names());
            for name in calib.names() {
                prop_assert_eq!(back.stats(&name), calib.stats(&name));
            }
        }
    }
}
