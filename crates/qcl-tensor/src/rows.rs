//! One tensor of a safetensors file read straight into `f32` rows, with the file's checksum
//! verified on the way, holding nothing else in memory.
//!
//! [`SafetensorsFile`](crate::SafetensorsFile) keeps the whole file and copies a tensor out of
//! it, so a large data set costs about three times its size while it is turned into rows.
//! [`read_f32_rows`] streams the file instead: each tensor's bytes pass through the checksum in
//! 1 MiB chunks, and only the wanted tensor's values are kept, converted to `f32` as they
//! arrive. Loading an `[n, d]` `f32` tensor then costs its own size and one chunk.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::Dtype;

use crate::header::{read_header, Header};
use crate::integrity::{check_stored_checksum, ContentHasher, CHECKSUM_KEY};
use crate::{Error, Result};

/// Bytes read at a time.
const CHUNK: usize = 1 << 20;

/// Tensor `name` of the safetensors file `path` (`[n, ...]`, any numeric dtype) as `n` rows of
/// `d` `f32` values (`d` the product of the other dimensions, 1 for a vector), row-major; the
/// file's checksum is verified (an older qcl file without one is noted, as
/// [`SafetensorsFile`](crate::SafetensorsFile) does). A file that is not a regular file
/// (a pipe) is read whole through [`SafetensorsFile`](crate::SafetensorsFile) instead.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("x.safetensors");
/// let x = Tensor::new(&[[1u8, 2, 3], [4, 5, 6]], &Device::Cpu)?;
/// qcl_tensor::write_safetensors(&path, &[("x", &x)], &Default::default())?;
/// let (n, d, rows) = qcl_tensor::read_f32_rows(&path, "x")?;
/// assert_eq!((n, d, rows), (2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Io`], [`Error::BadFile`] for a truncated, foreign or damaged file (checksum) or a
/// dtype qcl does not read, [`Error::MissingTensor`], [`Error::ShapeMismatch`] for a scalar.
pub fn read_f32_rows(path: impl AsRef<Path>, name: &str) -> Result<(usize, usize, Vec<f32>)> {
    let path = path.as_ref();
    let io = |e| Error::io(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?;
    if !size.is_file() {
        return via_whole_file(path, name);
    }
    let Header {
        data_start,
        metadata,
        entries,
        ..
    } = read_header(&mut file, path, Some(size.len()))?;
    let Some(wanted) = entries.get(name) else {
        return Err(Error::MissingTensor {
            name: name.to_string(),
            path: path.to_path_buf(),
            available: entries.keys().cloned().collect(),
        });
    };
    let (n, d) = rows_and_width(path, name, &wanted.shape)?;
    let convert = converter(wanted.dtype).ok_or_else(|| {
        Error::bad_file(
            path,
            format!(
                "tensor `{name}` has dtype {:?}, which qcl does not read",
                wanted.dtype
            ),
        )
    })?;
    let mut rows: Vec<f32> = Vec::new();
    rows.try_reserve_exact(n * d)
        .map_err(|_| Error::bad_file(path, format!("`{name}` is too large for this machine")))?;
    // Every tensor passes through the checksum in name order; the wanted one also into rows.
    let mut chunk = vec![0u8; CHUNK];
    let mut hasher = ContentHasher::new();
    for (tensor, entry) in &entries {
        hasher.tensor(tensor, entry.dtype, &entry.shape, entry.end - entry.start);
        file.seek(SeekFrom::Start(data_start + entry.start))
            .map_err(io)?;
        let mut left = entry.end - entry.start;
        while left > 0 {
            let take = left.min(CHUNK as u64) as usize;
            file.read_exact(&mut chunk[..take]).map_err(|e| {
                Error::bad_file(path, format!("tensor `{tensor}` is cut short ({e})"))
            })?;
            hasher.data(&chunk[..take]);
            if tensor == name {
                convert(&chunk[..take], &mut rows);
            }
            left -= take as u64;
        }
    }
    let checksum = hasher.finish(&metadata);
    let is_qcl = metadata
        .get("format")
        .is_some_and(|f| f.starts_with("qcl-"));
    let stored = metadata.get(CHECKSUM_KEY).map(String::as_str);
    check_stored_checksum(path, stored, || checksum, is_qcl)?;
    Ok((n, d, rows))
}

/// The slow path for inputs that are not regular files.
fn via_whole_file(path: &Path, name: &str) -> Result<(usize, usize, Vec<f32>)> {
    let file = crate::SafetensorsFile::open(path)?;
    let tensor = file.tensor(name, &candle_core::Device::Cpu)?;
    let (n, d) = rows_and_width(path, name, tensor.dims())?;
    let rows = tensor
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((n, d, rows))
}

/// `[n, ...]` as `n` rows of `d` values (the product of the other dimensions).
fn rows_and_width(path: &Path, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    let Some((&n, rest)) = shape.split_first() else {
        return Err(Error::ShapeMismatch {
            context: format!("`{name}` of {}", path.display()),
            expected: "[n, ...]".into(),
            actual: vec![],
        });
    };
    let d = rest
        .iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .filter(|&d| n.checked_mul(d).is_some())
        .ok_or_else(|| Error::bad_file(path, format!("tensor `{name}` has an absurd shape")))?;
    Ok((n, d))
}

/// Appends the `f32` values of little-endian `bytes` of a dtype to `out`. Chunks hold whole
/// elements (1 MiB is a multiple of every element size).
type Converter = fn(&[u8], &mut Vec<f32>);

fn converter(dtype: Dtype) -> Option<Converter> {
    fn each<const N: usize>(bytes: &[u8], out: &mut Vec<f32>, f: impl Fn([u8; N]) -> f32) {
        out.extend(
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("N bytes"))),
        );
    }
    Some(match dtype {
        Dtype::F32 => |b, out| each::<4>(b, out, f32::from_le_bytes),
        Dtype::F64 => |b, out| each::<8>(b, out, |c| f64::from_le_bytes(c) as f32),
        Dtype::F16 => |b, out| each::<2>(b, out, |c| half::f16::from_le_bytes(c).to_f32()),
        Dtype::BF16 => |b, out| each::<2>(b, out, |c| half::bf16::from_le_bytes(c).to_f32()),
        Dtype::U8 => |b, out| out.extend(b.iter().map(|&v| f32::from(v))),
        Dtype::U32 => |b, out| each::<4>(b, out, |c| u32::from_le_bytes(c) as f32),
        Dtype::I64 => |b, out| each::<8>(b, out, |c| i64::from_le_bytes(c) as f32),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use proptest::prelude::*;

    use super::*;
    use crate::{write_safetensors, SafetensorsFile};

    #[test]
    fn tensors_declaring_nearly_two_to_the_64_bytes_are_a_bad_file() {
        // Eight u8 tensors of 2^61 − 1 bytes, end to end: they tile 2^64 − 8 bytes of "data".
        let len = (1u64 << 61) - 1;
        let entries: Vec<String> = (0..8u64)
            .map(|i| {
                format!(
                    "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{len}],\"data_offsets\":[{},{}]}}",
                    i * len,
                    (i + 1) * len
                )
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_f32_rows(&path, "t0"),
            Err(Error::BadFile { .. })
        ));
        assert!(matches!(
            crate::read_safetensors_bytes(&path),
            Err(Error::BadFile { .. })
        ));
    }

    /// The rows the whole-file reader gives.
    fn reference(path: &Path, name: &str) -> (usize, usize, Vec<f32>) {
        via_whole_file(path, name).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any dtype and shape, beside other tensors: the same rows as the whole-file reader.
        #[test]
        fn rows_equal_the_whole_file_reader(
            n in 1usize..40,
            d in 1usize..9,
            dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::F16, DType::BF16, DType::U8, DType::U32, DType::I64]),
            seed in 0u64..1000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.safetensors");
            let values = crate::Seed::new(seed).rng().uniform_vec(n * d, 0.0, 200.0);
            let x = Tensor::from_vec(values, (n, d), &Device::Cpu).unwrap().round().unwrap()
                .to_dtype(dtype).unwrap();
            let other = Tensor::ones((3, 5), DType::F16, &Device::Cpu).unwrap();
            write_safetensors(&path, &[("b.other", &other), ("a.x", &x)], &Default::default()).unwrap();
            prop_assert_eq!(read_f32_rows(&path, "a.x").unwrap(), reference(&path, "a.x"));
            prop_assert_eq!(read_f32_rows(&path, "b.other").unwrap(), reference(&path, "b.other"));
        }
    }

    #[test]
    fn damage_anywhere_and_wrong_names_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[7u8, 8, 9], &Device::Cpu).unwrap();
        write_safetensors(&path, &[("x", &x), ("y", &y)], &Default::default()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // A changed byte in the other tensor's data still fails the checksum.
        let mut damaged = bytes.clone();
        *damaged.last_mut().unwrap() ^= 1;
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, &damaged).unwrap();
        assert!(matches!(
            read_f32_rows(&bad, "x"),
            Err(Error::BadFile { .. })
        ));
        std::fs::write(&bad, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            read_f32_rows(&bad, "x"),
            Err(Error::BadFile { .. })
        ));
        assert!(matches!(
            read_f32_rows(&path, "z"),
            Err(Error::MissingTensor { .. })
        ));
        let scalar = dir.path().join("scalar.safetensors");
        let s = Tensor::new(1f32, &Device::Cpu).unwrap();
        write_safetensors(&scalar, &[("s", &s)], &Default::default()).unwrap();
        assert!(matches!(
            read_f32_rows(&scalar, "s"),
            Err(Error::ShapeMismatch { .. })
        ));
        // Hand-made headers: overlapping tensors, and a shape whose row length overflows.
        let raw = |header: &str, data: usize| {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend(vec![0u8; data]);
            std::fs::write(&bad, bytes).unwrap();
        };
        raw(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            8,
        );
        assert!(matches!(
            read_f32_rows(&bad, "a"),
            Err(Error::BadFile { .. })
        ));
        raw(
            r#"{"a":{"dtype":"U8","shape":[0,8589934592,8589934592],"data_offsets":[0,0]}}"#,
            0,
        );
        assert!(matches!(
            read_f32_rows(&bad, "a"),
            Err(Error::BadFile { .. })
        ));
        // The file reader agrees that the damaged file is damaged.
        std::fs::write(&bad, &damaged).unwrap();
        assert!(SafetensorsFile::open(&bad).is_err());
    }
}
