//! Bit-packed code indices and their file format.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_pq::PackedCodes;
use qcl_tensor::{Error, Result, SafetensorsFile, TensorSpec};

use crate::config::{bits_for, MAX_CODES};

/// Metadata `format` value of a saved [`PackedIndices`] file.
pub const INDICES_FORMAT: &str = "qcl-vq-indices/1";

/// Code indices of any shape (e.g. `(B, N, H, W)` from
/// [`VectorQuantizer::encode`](crate::VectorQuantizer::encode)), each stored with
/// `⌈log2 K⌉` bits.
///
/// Layout: one row per item of the first axis (per sample; the whole stream is one row for a
/// rank-1 shape), each row bit-packed as qcl-pq's [`PackedCodes`] (index `j` of a row at bits
/// `j·b .. (j+1)·b`, least significant bit first, rows starting on a byte boundary so that a
/// sample can be read alone, zero padding at a row's end). A row of `m` indices takes
/// `⌈m·b / 8⌉` bytes; with K = 1 (b = 0) nothing is stored.
///
/// ```
/// use qcl_vq::PackedIndices;
/// // Two samples of three indices into K = 5 codes: 3 bits each, 2 bytes per sample.
/// let packed = PackedIndices::pack(&[4, 0, 3, 1, 2, 4], &[2, 3], 5)?;
/// assert_eq!(packed.bits(), 3);
/// assert_eq!(packed.bytes().len(), 4);
/// assert_eq!(packed.unpack(), vec![4, 0, 3, 1, 2, 4]);
/// assert_eq!(packed.sample(1)?, vec![1, 2, 4]);
/// // Bytes read back from elsewhere are checked: 7 ≥ K is refused.
/// assert!(PackedIndices::from_bytes(vec![0b111, 0, 0, 0], &[2, 3], 5).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// Two values are equal when their indices and the quantizer fingerprint they record
/// ([`made_by`](PackedIndices::made_by)) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedIndices {
    codes: usize,
    shape: Vec<usize>,
    bits: u32,
    /// `None` when nothing needs storing (K = 1 or no index at all).
    packed: Option<PackedCodes>,
    /// Fingerprint of the quantizer that made the indices, when known.
    quantizer: Option<String>,
}

/// Rows and indices per row of `shape`, and the total, checked for overflow.
fn rows_of(shape: &[usize]) -> Result<(usize, usize, usize)> {
    if shape.is_empty() {
        return Err(Error::invalid_parameter(
            "shape",
            "packed indices need a rank of at least 1",
        ));
    }
    let total = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid_parameter("shape", format!("{shape:?} overflows")))?;
    let (rows, per_row) = if shape.len() == 1 {
        (1, shape[0])
    } else {
        (shape[0], shape[1..].iter().product())
    };
    Ok((rows, per_row, total))
}

fn check_codes(codes: usize) -> Result<u32> {
    if codes == 0 || codes > MAX_CODES {
        return Err(Error::invalid_parameter(
            "codes",
            format!("must be in 1..={MAX_CODES}, got {codes}"),
        ));
    }
    Ok(bits_for(codes))
}

impl PackedIndices {
    /// Packs `values` (row-major, of the given `shape`), each below `codes` = K.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for K outside `1..=65536`, an empty shape, or an index ≥ K
    /// (naming its position); [`Error::ShapeMismatch`] if `values` does not hold
    /// `Π shape` indices.
    pub fn pack(values: &[u32], shape: &[usize], codes: usize) -> Result<Self> {
        let bits = check_codes(codes)?;
        let (rows, per_row, total) = rows_of(shape)?;
        if values.len() != total {
            return Err(Error::ShapeMismatch {
                context: "indices to pack".into(),
                expected: format!("{shape:?} ({total} indices)"),
                actual: vec![values.len()],
            });
        }
        if let Some(i) = values.iter().position(|&v| v as usize >= codes) {
            return Err(Error::invalid_parameter(
                "indices",
                format!(
                    "index {} at flat position {i} is not below K = {codes}",
                    values[i]
                ),
            ));
        }
        let packed = if bits == 0 || total == 0 {
            None
        } else {
            debug_assert_eq!(rows * per_row, total);
            Some(PackedCodes::pack(values, per_row, bits)?)
        };
        Ok(PackedIndices {
            codes,
            shape: shape.to_vec(),
            bits,
            packed,
            quantizer: None,
        })
    }

    /// Packs a `u32` index tensor (any shape of rank ≥ 1).
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] for another dtype, and those of [`PackedIndices::pack`].
    pub fn from_tensor(indices: &Tensor, codes: usize) -> Result<Self> {
        if indices.dtype() != DType::U32 {
            return Err(Error::DTypeMismatch {
                context: "indices to pack".into(),
                expected: DType::U32,
                actual: indices.dtype(),
            });
        }
        let values: Vec<u32> = indices.flatten_all()?.to_vec1()?;
        Self::pack(&values, indices.dims(), codes)
    }

    /// Wraps a packed stream read from elsewhere, checking it completely: its length, zero
    /// padding bits, and every index below K.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for bad `codes` or `shape`; [`Error::ShapeMismatch`] for a
    /// truncated or overlong stream; [`Error::CorruptStream`] for set padding bits or an
    /// index ≥ K.
    pub fn from_bytes(bytes: Vec<u8>, shape: &[usize], codes: usize) -> Result<Self> {
        let bits = check_codes(codes)?;
        let (rows, per_row, total) = rows_of(shape)?;
        let packed = if bits == 0 || total == 0 {
            if !bytes.is_empty() {
                return Err(Error::ShapeMismatch {
                    context: "packed indices".into(),
                    expected: "[0] bytes".into(),
                    actual: vec![bytes.len()],
                });
            }
            None
        } else {
            let row_bits = per_row.checked_mul(bits as usize).ok_or_else(|| {
                Error::invalid_parameter("shape", format!("{shape:?} overflows at {bits} bits"))
            })?;
            let spare = row_bits % 8;
            let packed = PackedCodes::from_bytes(bytes, rows, per_row, bits)?;
            if spare != 0 {
                let row_bytes = packed.code_size();
                for (r, row) in packed.bytes().chunks_exact(row_bytes).enumerate() {
                    if row[row_bytes - 1] >> spare != 0 {
                        return Err(Error::corrupt_stream(
                            "packed indices",
                            format!("row {r} has set padding bits"),
                        ));
                    }
                }
            }
            Some(packed)
        };
        let result = PackedIndices {
            codes,
            shape: shape.to_vec(),
            bits,
            packed,
            quantizer: None,
        };
        if !codes.is_power_of_two() {
            if let Some(i) = result.unpack().iter().position(|&v| v as usize >= codes) {
                return Err(Error::corrupt_stream(
                    "packed indices",
                    format!("index at flat position {i} is not below K = {codes}"),
                ));
            }
        }
        Ok(result)
    }

    /// The same indices marked as made by the quantizer of this fingerprint
    /// ([`VectorQuantizer::fingerprint`](crate::VectorQuantizer::fingerprint)); saved with
    /// them and checked by [`decode_packed`](crate::VectorQuantizer::decode_packed).
    #[must_use]
    pub fn made_by(mut self, fingerprint: impl Into<String>) -> Self {
        self.quantizer = Some(fingerprint.into());
        self
    }

    /// Fingerprint of the quantizer that made the indices, if recorded.
    pub fn quantizer(&self) -> Option<&str> {
        self.quantizer.as_deref()
    }

    /// K, the number of codes the indices point into.
    pub fn codes(&self) -> usize {
        self.codes
    }

    /// Shape of the index array.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bits per index, `⌈log2 K⌉`.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Number of indices, `Π shape`.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether there are no indices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The packed stream.
    pub fn bytes(&self) -> &[u8] {
        self.packed.as_ref().map_or(&[], |p| p.bytes())
    }

    /// Every index, row-major.
    pub fn unpack(&self) -> Vec<u32> {
        match &self.packed {
            Some(p) => p.unpack(),
            None => vec![0; self.len()],
        }
    }

    /// The indices of item `i` of the first axis (the whole stream for a rank-1 shape,
    /// `i = 0`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `i` out of range.
    pub fn sample(&self, i: usize) -> Result<Vec<u32>> {
        let (rows, per_row, _) = rows_of(&self.shape)?;
        if i >= rows {
            return Err(Error::invalid_parameter(
                "sample",
                format!("{i} is out of range for {rows} rows"),
            ));
        }
        Ok(match &self.packed {
            Some(p) => (0..per_row).map(|j| p.get(i, j)).collect(),
            None => vec![0; per_row],
        })
    }

    /// The indices as a `u32` tensor of [`PackedIndices::shape`].
    ///
    /// # Errors
    /// A candle error.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.unpack(),
            self.shape.as_slice(),
            device,
        )?)
    }

    /// Writes the stream (tensor `packed`, `u8`) with K, the shape and the bit width as
    /// metadata (`format` = [`INDICES_FORMAT`]), atomically.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.bytes().to_vec();
        let len = bytes.len();
        let tensor = Tensor::from_vec(bytes, len, &Device::Cpu)?;
        let shape: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        let meta = BTreeMap::from([
            ("format".to_string(), INDICES_FORMAT.to_string()),
            ("codes".to_string(), self.codes.to_string()),
            ("shape".to_string(), shape.join(",")),
            ("bits".to_string(), self.bits.to_string()),
        ]);
        let meta = match &self.quantizer {
            Some(quantizer) => {
                let mut meta = meta;
                meta.insert("quantizer".to_string(), quantizer.clone());
                meta
            }
            None => meta,
        };
        qcl_tensor::write_safetensors(path, &[("packed", &tensor)], &meta)
    }

    /// Reads a file written by [`PackedIndices::save`], checking the stream as
    /// [`PackedIndices::from_bytes`] does.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::BadFile`] for a truncated or foreign file
    /// or a corrupted stream.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(INDICES_FORMAT, "a packed-indices file")?;
        let codes: usize = file.metadata_value("codes")?;
        let bits: u32 = file.metadata_value("bits")?;
        let shape: Vec<usize> = file
            .metadata()
            .get("shape")
            .and_then(|s| s.split(',').map(|d| d.parse().ok()).collect())
            .ok_or_else(|| Error::bad_file(path, "metadata `shape` is missing or malformed"))?;
        let tensor = file.read(
            "packed",
            &TensorSpec::new().dtype(DType::U8).rank(1),
            &Device::Cpu,
        )?;
        let bytes: Vec<u8> = tensor.to_vec1()?;
        let mut packed = Self::from_bytes(bytes, &shape, codes)
            .map_err(|e| Error::bad_file(path, format!("corrupted packed indices: {e}")))?;
        packed.quantizer = file.metadata().get("quantizer").cloned();
        if packed.bits != bits {
            return Err(Error::bad_file(
                path,
                format!(
                    "{bits} bits recorded, but K = {codes} needs {}",
                    packed.bits
                ),
            ));
        }
        Ok(packed)
    }
}
