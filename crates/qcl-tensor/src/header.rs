//! The one reader of a safetensors header, shared by the whole-file reader
//! ([`read_safetensors_bytes`](crate::read_safetensors_bytes)) and the streaming row reader
//! ([`read_f32_rows`](crate::read_f32_rows)).
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name →
//! dtype, shape and data offsets, plus string metadata under `__metadata__`), then the data.
//! The header is read only after its length is checked, and every entry is checked before any
//! data is touched: its offsets span exactly its dtype × shape, and the tensors tile the data
//! from its first byte, one after the other, as safetensors requires. The data's length is then
//! the header's own declaration, which the readers compare with what the file holds.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use safetensors::Dtype;

use crate::{Error, Result};

/// The largest header accepted (100 MB, the safetensors crate's own limit): beyond it a file is
/// refused before the header is read.
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A tensor's entry in the header; `start..end` are offsets into the data.
pub(crate) struct Entry {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// A checked header.
pub(crate) struct Header {
    /// Bytes before the data: 8 + the header's length.
    pub(crate) data_start: u64,
    /// Bytes of data the tensors cover.
    pub(crate) data_len: u64,
    /// The 8-byte prefix and the header, as read.
    pub(crate) raw: Vec<u8>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) entries: BTreeMap<String, Entry>,
}

/// Reads and checks the header at the start of `reader` (the file `path`, of `size` bytes
/// when it is a regular file): the length first (at most [`MAX_HEADER_BYTES`], and within
/// `size`), then the header, then every entry, and that the file ends where the data does.
///
/// # Errors
/// [`Error::BadFile`] for a short file or a header that is not a safetensors header;
/// [`Error::Io`] when reading fails.
pub(crate) fn read_header(
    reader: &mut impl Read,
    path: &Path,
    size: Option<u64>,
) -> Result<Header> {
    let bad = |reason: String| Error::bad_file(path, format!("not a safetensors file: {reason}"));
    let mut raw = vec![0u8; 8];
    read_exactly(reader, &mut raw, path)?;
    let header_len = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES || size.is_some_and(|s| 8 + header_len > s) {
        return Err(bad(format!("its header claims {header_len} bytes")));
    }
    raw.resize(8 + header_len as usize, 0);
    read_exactly(reader, &mut raw[8..], path)?;
    let json: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&raw[8..]).map_err(|e| bad(format!("unreadable header ({e})")))?;
    let mut metadata = BTreeMap::new();
    let mut entries = BTreeMap::new();
    for (name, value) in json {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| bad(format!("metadata that is not strings ({e})")))?;
            continue;
        }
        let entry = entry(&name, value).map_err(&bad)?;
        let bits = entry
            .shape
            .iter()
            .try_fold(entry.dtype.bitsize() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            });
        let bytes = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if entry.start > entry.end || bytes != Some(entry.end - entry.start) {
            return Err(bad(format!("tensor `{name}` does not fit its data")));
        }
        entries.insert(name, entry);
    }
    let data_len = tiled_length(&entries).map_err(bad)?;
    // A regular file holds exactly the header and the data it declares (checked: a crafted
    // header can declare tensors of nearly 2^64 bytes in all).
    if let Some(size) = size.filter(|&s| (8 + header_len).checked_add(data_len) != Some(s)) {
        return Err(Error::bad_file(
            path,
            format!(
                "not a complete safetensors file: {size} bytes, its header describes {} of \
                 header and {data_len} of data",
                8 + header_len
            ),
        ));
    }
    Ok(Header {
        data_start: 8 + header_len,
        data_len,
        raw,
        metadata,
        entries,
    })
}

/// The data's length when the tensors tile it from byte 0 without gap or overlap.
fn tiled_length(entries: &BTreeMap<String, Entry>) -> std::result::Result<u64, String> {
    let mut spans: Vec<(u64, u64)> = entries.values().map(|e| (e.start, e.end)).collect();
    spans.sort_unstable();
    let mut at = 0;
    for (start, end) in spans {
        if start != at {
            return Err(format!("its tensors overlap or leave a gap at byte {at}"));
        }
        at = end;
    }
    Ok(at)
}

/// A tensor's header entry `{"dtype", "shape", "data_offsets"}`.
fn entry(name: &str, value: serde_json::Value) -> std::result::Result<Entry, String> {
    let field = |key: &str| value.get(key).cloned().unwrap_or_default();
    let bad = |e: serde_json::Error| format!("tensor `{name}`: {e}");
    let dtype: Dtype = serde_json::from_value(field("dtype")).map_err(bad)?;
    let shape: Vec<usize> = serde_json::from_value(field("shape")).map_err(bad)?;
    let (start, end): (u64, u64) = serde_json::from_value(field("data_offsets")).map_err(bad)?;
    Ok(Entry {
        dtype,
        shape,
        start,
        end,
    })
}

/// `read_exact`, a short input being a bad file rather than an I/O failure.
pub(crate) fn read_exactly(reader: &mut impl Read, buffer: &mut [u8], path: &Path) -> Result<()> {
    reader.read_exact(buffer).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::bad_file(
                path,
                "not a complete safetensors file (shorter than its header)",
            )
        } else {
            Error::io(path, e)
        }
    })
}
