//! Content checksums of qcl's safetensors files, the bounded reader, and notes for the caller.
//!
//! Every file [`write_safetensors`](crate::write_safetensors) writes carries, in its metadata,
//! `checksum` = `crc32:<8 hex digits>`: the CRC-32 of its content in a canonical order (each
//! tensor by sorted name: name, dtype, shape, data bytes; then every other metadata entry by
//! sorted key). [`SafetensorsFile`](crate::SafetensorsFile) verifies it on load, so a flipped bit
//! anywhere in a tensor or a metadata value is an [`Error::BadFile`], not a silently wrong
//! result. A qcl file without a checksum (written before checksums existed) still loads, and a
//! note says it was not verified; files of other programs (no `format` = `qcl-…`) load without
//! one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use safetensors::tensor::SafeTensors;

use crate::header::read_header;
use crate::{Error, Result};

/// Metadata key of the content checksum; the writer sets it (a caller's value is replaced).
pub const CHECKSUM_KEY: &str = "checksum";

/// Notes (not errors) collected for the caller to show, such as "loaded without verification".
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// At most this many distinct notes are kept until [`take_notes`] drains them.
const MAX_NOTES: usize = 64;

/// Records a note for the user of the program (kept once; at most 64 until [`take_notes`]):
/// something they should know that is not an error, such as a file loaded without checksum
/// verification.
///
/// ```
/// qcl_tensor::note("an example note".to_string());
/// assert!(qcl_tensor::take_notes().contains(&"an example note".to_string()));
/// ```
pub fn note(message: String) {
    let mut notes = NOTES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if notes.len() < MAX_NOTES && !notes.contains(&message) {
        notes.push(message);
    }
}

/// Takes the notes qcl's readers recorded since the last call, such as a file that was loaded
/// without checksum verification because it was written before checksums existed. A program
/// shows them to its user (the `qcl` command prints them on standard error and in its JSON).
///
/// ```
/// let notes: Vec<String> = qcl_tensor::take_notes();
/// assert!(qcl_tensor::take_notes().is_empty()); // drained
/// # let _ = notes;
/// ```
pub fn take_notes() -> Vec<String> {
    let mut notes = NOTES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    std::mem::take(&mut *notes)
}

/// The content checksum of safetensors content, `crc32:<8 hex digits>`: the CRC-32 of each
/// tensor by sorted name (name, dtype, shape, data bytes), then every metadata entry but
/// [`CHECKSUM_KEY`] by sorted key. Writers of their own safetensors layouts store it under
/// [`CHECKSUM_KEY`] and check it with [`verify_checksum`]; [`write_safetensors`] and
/// [`SafetensorsFile`] do both.
///
/// [`write_safetensors`]: crate::write_safetensors
/// [`SafetensorsFile`]: crate::SafetensorsFile
///
/// ```
/// use std::collections::BTreeMap;
/// use safetensors::Dtype;
/// let meta = BTreeMap::from([("format".to_string(), "mine/1".to_string())]);
/// let a = qcl_tensor::content_checksum([("w", Dtype::U8, &[2][..], &[1u8, 2][..])], &meta);
/// let b = qcl_tensor::content_checksum([("w", Dtype::U8, &[2][..], &[1u8, 3][..])], &meta);
/// assert_ne!(a, b);
/// ```
pub fn content_checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, safetensors::Dtype, &'a [usize], &'a [u8])>,
    metadata: &BTreeMap<String, String>,
) -> String {
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = ContentHasher::new();
    for (name, dtype, shape, data) in tensors {
        hasher.tensor(name, dtype, shape, data.len() as u64);
        hasher.data(data);
    }
    hasher.finish(metadata)
}

/// The checksum of a byte string, `crc32:<8 hex digits>`: for qcl's files that are not
/// safetensors (JSON lists), stored beside their content.
///
/// ```
/// assert_ne!(qcl_tensor::bytes_checksum(b"a"), qcl_tensor::bytes_checksum(b"b"));
/// ```
pub fn bytes_checksum(bytes: &[u8]) -> String {
    format!("crc32:{:08x}", crc32fast::hash(bytes))
}

/// Safetensors bytes of raw tensors (name, dtype, shape, little-endian data) and string
/// metadata, with the content checksum under [`CHECKSUM_KEY`] (a `checksum` entry of
/// `metadata` is replaced): the header's keys sorted and the data ordered by alignment, then
/// name, so the same tensors and metadata always give the same bytes. Every qcl writer of
/// safetensors ends here; [`write_safetensors`](crate::write_safetensors) feeds it candle
/// tensors.
///
/// ```
/// use safetensors::Dtype;
/// let meta = std::collections::BTreeMap::from([("format".to_string(), "mine/1".to_string())]);
/// let bytes = qcl_tensor::serialize_safetensors([("w", Dtype::U8, &[2][..], &[1u8, 2][..])], &meta)?;
/// let file = qcl_tensor::SafetensorsFile::from_bytes("mem", bytes)?; // checksum verified
/// assert_eq!(file.metadata()["format"], "mine/1");
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for an empty or repeated name, or data whose length is not its
/// dtype and shape's.
pub fn serialize_safetensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, safetensors::Dtype, &'a [usize], &'a [u8])>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        dtype: safetensors::Dtype,
        shape: &'a [usize],
        data_offsets: (usize, usize),
    }
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Header<'a> {
        Metadata(&'a BTreeMap<String, String>),
        Tensor(Entry<'a>),
    }
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut metadata = metadata.clone();
    let checksum = content_checksum(tensors.iter().copied(), &metadata);
    metadata.insert(CHECKSUM_KEY.to_string(), checksum);
    let mut header: BTreeMap<&str, Header<'_>> = BTreeMap::new();
    header.insert("__metadata__", Header::Metadata(&metadata));
    let mut offset = 0;
    for &(name, dtype, shape, bytes) in &tensors {
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize(), |a, &d| a.checked_mul(d));
        if bits != Some(bytes.len() * 8) {
            return Err(Error::invalid_parameter(
                "tensors",
                format!(
                    "tensor `{name}` holds {} bytes, not its {dtype:?} {shape:?}",
                    bytes.len()
                ),
            ));
        }
        let entry = Entry {
            dtype,
            shape,
            data_offsets: (offset, offset + bytes.len()),
        };
        if name.is_empty()
            || name == "__metadata__"
            || header.insert(name, Header::Tensor(entry)).is_some()
        {
            return Err(Error::invalid_parameter(
                "tensors",
                format!("tensor names must be unique and non-empty; `{name}` is not"),
            ));
        }
        offset += bytes.len();
    }
    let mut json = serde_json::to_vec(&header)
        .map_err(|e| Error::invalid_parameter("metadata", e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    for (_, _, _, bytes) in &tensors {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// [`content_checksum`] fed piece by piece: each tensor in name order (its header, then its
/// data in any number of pieces), then the metadata.
pub(crate) struct ContentHasher(crc32fast::Hasher);

impl ContentHasher {
    pub(crate) fn new() -> Self {
        ContentHasher(crc32fast::Hasher::new())
    }

    /// Starts the next tensor (in name order) of `len` data bytes.
    pub(crate) fn tensor(
        &mut self,
        name: &str,
        dtype: safetensors::Dtype,
        shape: &[usize],
        len: u64,
    ) {
        let hasher = &mut self.0;
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        // The dtype's name in the file format ("F32", ...), stable by the format's definition.
        let name = serde_json::to_value(dtype)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{dtype:?}"));
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        for &dim in shape {
            hasher.update(&(dim as u64).to_le_bytes());
        }
        hasher.update(&len.to_le_bytes());
    }

    /// The current tensor's next data bytes.
    pub(crate) fn data(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Ends with the metadata (every entry but [`CHECKSUM_KEY`]): `crc32:<8 hex digits>`.
    pub(crate) fn finish(mut self, metadata: &BTreeMap<String, String>) -> String {
        for (key, value) in metadata.iter().filter(|(k, _)| *k != CHECKSUM_KEY) {
            self.0.update(key.as_bytes());
            self.0.update(&[0]);
            self.0.update(value.as_bytes());
            self.0.update(&[0]);
        }
        format!("crc32:{:08x}", self.0.finalize())
    }
}

/// [`content_checksum`] of a parsed file.
pub(crate) fn parsed_checksum(
    parsed: &SafeTensors<'_>,
    metadata: &BTreeMap<String, String>,
) -> String {
    let tensors = parsed.tensors();
    content_checksum(
        tensors
            .iter()
            .map(|(name, view)| (name.as_str(), view.dtype(), view.shape(), view.data())),
        metadata,
    )
}

/// A short, stable identity of a quantizer's parameters (its codebooks and shape), stored with
/// the codes it makes so that decoding with another quantizer is an error, not garbage:
/// `sha256:` and the first 16 hex digits of the SHA-256 of everything fed in, in order.
///
/// ```
/// use qcl_tensor::Fingerprint;
/// let a = Fingerprint::new("qcl-pq/1").number(8).floats(&[0.5, 1.0]).finish();
/// let b = Fingerprint::new("qcl-pq/1").number(8).floats(&[0.5, 1.5]).finish();
/// assert_ne!(a, b);
/// assert!(a.starts_with("sha256:") && a.len() == 23);
/// ```
#[derive(Debug, Clone)]
pub struct Fingerprint(sha2::Sha256);

impl Fingerprint {
    /// Starts a fingerprint of a kind of thing (its format name, say).
    pub fn new(kind: &str) -> Self {
        Fingerprint(sha2::Sha256::default()).text(kind)
    }

    /// Feeds a string (length-prefixed, so that fields cannot run into each other).
    #[must_use]
    pub fn text(self, text: &str) -> Self {
        self.number(text.len() as u64).bytes(text.as_bytes())
    }

    /// Feeds a number.
    #[must_use]
    pub fn number(self, value: u64) -> Self {
        self.bytes(&value.to_le_bytes())
    }

    /// Feeds `f32` values by their bits (little-endian).
    #[must_use]
    pub fn floats(mut self, values: &[f32]) -> Self {
        use sha2::Digest;
        self = self.number(values.len() as u64);
        for chunk in values.chunks(4096) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.0.update(&bytes);
        }
        self
    }

    fn bytes(mut self, bytes: &[u8]) -> Self {
        use sha2::Digest;
        self.0.update(bytes);
        self
    }

    /// The fingerprint, `sha256:<16 hex digits>`.
    pub fn finish(self) -> String {
        use sha2::Digest;
        let digest = self.0.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// Checks the checksum stored under [`CHECKSUM_KEY`] in `metadata` against the content of
/// `parsed`; a qcl file (`format` = `qcl-…`) without one loads with a note ([`take_notes`]).
/// `path` is used in messages only.
///
/// # Errors
/// [`Error::BadFile`] naming the file when the content does not match its checksum.
pub fn verify_checksum(
    path: &Path,
    parsed: &SafeTensors<'_>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let is_qcl = metadata
        .get("format")
        .is_some_and(|f| f.starts_with("qcl-"));
    check_stored_checksum(
        path,
        metadata.get(CHECKSUM_KEY).map(String::as_str),
        || parsed_checksum(parsed, metadata),
        is_qcl,
    )
}

/// The one judgement of a stored checksum, for every qcl format: a `crc32:` value must equal
/// the content's (`computed`, only evaluated then); without one (or with another program's
/// own scheme) the file loads, with a note when `is_qcl` (written by an older qcl).
///
/// # Errors
/// [`Error::BadFile`] naming the file when the checksums differ.
pub fn check_stored_checksum(
    path: &Path,
    stored: Option<&str>,
    computed: impl FnOnce() -> String,
    is_qcl: bool,
) -> Result<()> {
    match stored.filter(|c| c.starts_with("crc32:")) {
        Some(stored) => {
            let computed = computed();
            if stored == computed {
                return Ok(());
            }
            Err(Error::bad_file(
                path,
                format!(
                    "the content does not match its checksum (stored {stored}, computed \
                     {computed}): the file is damaged or was edited"
                ),
            ))
        }
        None => {
            if is_qcl {
                note(format!(
                    "{} has no checksum (written by an older qcl): loaded without verification",
                    path.display()
                ));
            }
            Ok(())
        }
    }
}

/// Reads the bytes of a whole safetensors file, bounded by what its header declares: the 8-byte header
/// length (at most 100 MB), the header, then exactly the data the header's tensors cover, and
/// nothing after it. A regular file's size is checked against the header before the data is
/// allocated; a stream (a pipe, `/dev/zero`) is read no further than its header declares, and
/// a header of more than 100 MB is refused at once.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("short.safetensors");
/// std::fs::write(&path, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{'])?; // claims a 200-byte header
/// assert!(matches!(qcl_tensor::read_safetensors_bytes(&path), Err(qcl_tensor::Error::BadFile { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::BadFile`] if it is shorter or longer than its
/// header says, or its header is not a safetensors header.
pub fn read_safetensors_bytes(path: &Path) -> Result<Vec<u8>> {
    let io = |e| Error::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let size = meta.is_file().then_some(meta.len());
    let header = read_header(&mut file, path, size)?;
    let total = header
        .data_start
        .checked_add(header.data_len)
        .ok_or_else(|| too_large(path, u64::MAX))?;
    let mut bytes = Vec::new();
    let total_usize = usize::try_from(total).map_err(|_| too_large(path, total))?;
    bytes
        .try_reserve_exact(total_usize)
        .map_err(|_| too_large(path, total))?;
    bytes.extend_from_slice(&header.raw);
    drop(header);
    (&mut file)
        .take(total - bytes.len() as u64)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let mut extra = [0u8; 1];
    if bytes.len() as u64 != total || file.read(&mut extra).map_err(io)? != 0 {
        return Err(Error::bad_file(
            path,
            format!("not a complete safetensors file: its header describes {total} bytes"),
        ));
    }
    Ok(bytes)
}

/// The bytes of `path`, refusing more than `limit`: an endless or huge input (`/dev/zero`, a
/// mistaken path) ends with an error after `limit + 1` bytes instead of filling the memory.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("config.json");
/// std::fs::write(&path, b"{}")?;
/// assert_eq!(qcl_tensor::read_bounded(&path, 16)?, b"{}");
/// assert!(qcl_tensor::read_bounded(&path, 1).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Io`] if it cannot be read, [`Error::BadFile`] if it holds more than `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::bad_file(
            path,
            format!("larger than the {limit} bytes allowed"),
        ));
    }
    Ok(bytes)
}

fn too_large(path: &Path, total: u64) -> Error {
    Error::bad_file(
        path,
        format!("its header describes {total} bytes, more than this machine can hold"),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};
    use proptest::prelude::*;

    use super::*;
    use crate::{write_safetensors, SafetensorsFile};

    fn sample(dir: &Path, format: &str) -> PathBuf {
        let path = dir.join("s.safetensors");
        let a = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[7u8, 8, 9], &Device::Cpu).unwrap();
        let meta = BTreeMap::from([
            ("format".to_string(), format.to_string()),
            ("k".to_string(), "256".to_string()),
        ]);
        write_safetensors(&path, &[("a", &a), ("b", &b)], &meta).unwrap();
        path
    }

    /// Rewrites the file with `edit` applied to its bytes.
    fn edited(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = std::fs::read(path).unwrap();
        edit(&mut bytes);
        let out = path.with_extension("edited");
        std::fs::write(&out, bytes).unwrap();
        out
    }

    #[test]
    fn written_files_carry_a_checksum_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = SafetensorsFile::open(sample(dir.path(), "qcl-test/1")).unwrap();
        let stored = &file.metadata()[CHECKSUM_KEY];
        assert!(
            stored.starts_with("crc32:") && stored.len() == 14,
            "{stored}"
        );
    }

    #[test]
    fn a_changed_metadata_value_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path(), "qcl-test/1");
        let bad = edited(&path, |bytes| {
            let at = bytes.windows(5).position(|w| w == b"\"256\"").unwrap();
            bytes[at + 1] = b'9'; // k = 956, same length
        });
        let err = SafetensorsFile::open(&bad).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn a_file_without_checksum_loads_with_a_note_only_if_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        for (format, noted) in [("qcl-test/1", true), ("someone-else", false)] {
            let path = sample(dir.path(), format);
            // Blank the checksum key out of the header (`checksum` -> `checksun` would change
            // the content; renaming the key to one the reader ignores keeps the header valid).
            let old = edited(&path, |bytes| {
                let at = bytes.windows(8).position(|w| w == b"checksum").unwrap();
                bytes[at..at + 8].copy_from_slice(b"xhecksum");
            });
            let _ = take_notes();
            let file = SafetensorsFile::open(&old).unwrap();
            assert!(!file.metadata().contains_key(CHECKSUM_KEY));
            // (Other tests record notes too: only this file's count.)
            let notes = take_notes();
            let about = old.display().to_string();
            assert_eq!(
                notes
                    .iter()
                    .any(|n| n.contains("no checksum") && n.contains(&about)),
                noted,
                "{format}: {notes:?}"
            );
        }
    }

    #[test]
    fn a_given_checksum_is_replaced_by_the_true_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path(), "qcl-test/1");
        let file = SafetensorsFile::open(&path).unwrap();
        // Rewritten with a changed tensor and the old metadata (old checksum included).
        let a = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let again = dir.path().join("again.safetensors");
        write_safetensors(&again, &[("a", &a)], file.metadata()).unwrap();
        let reread = SafetensorsFile::open(&again).unwrap();
        assert_ne!(
            reread.metadata()[CHECKSUM_KEY],
            file.metadata()[CHECKSUM_KEY]
        );
    }

    #[test]
    fn trailing_bytes_and_endless_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path(), "qcl-test/1");
        let longer = edited(&path, |bytes| bytes.push(0));
        let err = SafetensorsFile::open(&longer).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
        if Path::new("/dev/zero").exists() {
            // Header length 0: refused after 8 bytes, not read until memory runs out.
            let err = SafetensorsFile::open("/dev/zero").unwrap_err();
            assert!(matches!(err, Error::BadFile { .. }), "{err}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any single flipped bit in a written file is refused (never loaded as different data).
        #[test]
        fn any_flipped_bit_is_refused(position in 0.0f64..1.0, bit in 0u8..8) {
            let dir = tempfile::tempdir().unwrap();
            let path = sample(dir.path(), "qcl-test/1");
            let len = std::fs::metadata(&path).unwrap().len() as f64;
            let at = ((position * len) as usize).min(len as usize - 1);
            let bad = edited(&path, |bytes| bytes[at] ^= 1 << bit);
            let original = SafetensorsFile::open(&path).unwrap();
            match SafetensorsFile::open(&bad) {
                Err(_) => {}
                // A flip in the header's padding or in JSON layout can leave the content as it
                // was; the content itself must then be unchanged.
                Ok(file) => {
                    // (A flip inside the key `checksum` leaves a file without a checksum,
                    // which loads with a note; its values are still the original's.)
                    prop_assert_eq!(file.metadata().len(), original.metadata().len());
                    for (key, value) in original.metadata().iter().filter(|(k, _)| *k != CHECKSUM_KEY) {
                        prop_assert_eq!(file.metadata().get(key), Some(value));
                    }
                    for name in original.names() {
                        let a = original.tensor(name, &Device::Cpu).unwrap();
                        let b = file.tensor(name, &Device::Cpu).unwrap();
                        prop_assert_eq!(a.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                            b.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap());
                    }
                }
            }
        }
    }
}
