//! Compressed checkpoints: every compressed tensor with its codes, every other tensor exactly as
//! it was, one safetensors file ([`CHECKPOINT_FORMAT`]), and bits accounting.

pub(crate) mod file;
mod raw;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use qcl_tensor::Result;
use safetensors::Dtype;
use serde::Serialize;

pub use file::{CHECKPOINT_FORMAT, MAX_WEIGHTS};
pub use raw::{Checkpoint, RawTensor};

use crate::pq_tensor::PqTensor;
use crate::scalar::ScalarTensor;

/// How a compressed tensor is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoding {
    /// Every value in fp16.
    Fp16(Vec<half::f16>),
    /// Integer codes on per-group grids (round-to-nearest or GPTQ).
    Scalar(ScalarTensor),
    /// Product quantization.
    Pq(PqTensor),
}

/// Input columns of a 2-D weight stored exactly in fp16 beside a quantized encoding of the
/// other columns (see [`crate::OutlierColumns`]).
///
/// ```
/// use qcl_wpq::ExactColumns;
/// // A 2×3 weight whose column 1 is exact; the encoding holds columns 0 and 2.
/// let exact = ExactColumns::new(vec![1], &[5.0, 6.0]);
/// assert_eq!(exact.merge(&[1.0, 2.0, 3.0, 4.0], 3)?, vec![1.0, 5.0, 2.0, 3.0, 6.0, 4.0]);
/// assert_eq!(exact.bits(), 2 * 16 + 32);
/// assert!(ExactColumns::new(vec![3], &[5.0, 6.0]).validate(2, 3).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ExactColumns {
    /// Column indices, strictly ascending.
    pub columns: Vec<u32>,
    /// Their values, `[rows, columns.len()]` row-major.
    pub values: Vec<half::f16>,
}

impl ExactColumns {
    /// Columns `columns` with the values `[rows, s]` (rounded to fp16).
    pub fn new(columns: Vec<u32>, values: &[f32]) -> Self {
        ExactColumns {
            columns,
            values: values.iter().map(|&v| half::f16::from_f32(v)).collect(),
        }
    }

    /// Stored bits: 16 per value and 32 per column index.
    pub fn bits(&self) -> u64 {
        16 * self.values.len() as u64 + 32 * self.columns.len() as u64
    }

    /// Checks the indices against a `[rows, cols]` weight.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::CorruptStream`] for indices that are not strictly ascending, not
    /// below `cols` or leave no column to quantize; [`qcl_tensor::Error::ShapeMismatch`] for
    /// the wrong number of values.
    pub fn validate(&self, rows: usize, cols: usize) -> Result<()> {
        let s = self.columns.len();
        let ascending = self.columns.windows(2).all(|w| w[0] < w[1]);
        if s == 0 || s >= cols || !ascending || self.columns.iter().any(|&c| c as usize >= cols) {
            return Err(qcl_tensor::Error::corrupt_stream(
                "outlier columns",
                format!(
                    "indices {:?} are not strictly ascending below {cols} with a column left",
                    &self.columns[..s.min(8)]
                ),
            ));
        }
        if self.values.len() != rows * s {
            return Err(qcl_tensor::Error::ShapeMismatch {
                context: "outlier values".into(),
                expected: format!("[{rows}, {s}]"),
                actual: vec![self.values.len()],
            });
        }
        Ok(())
    }

    /// The `[rows, cols]` weight from the other columns' values `rest` (`[rows, cols − s]`).
    ///
    /// # Errors
    /// As [`ExactColumns::validate`]; [`qcl_tensor::Error::ShapeMismatch`] for `rest` of the
    /// wrong size.
    pub fn merge(&self, rest: &[f32], cols: usize) -> Result<Vec<f32>> {
        let s = self.columns.len();
        let rows = self.values.len().checked_div(s).unwrap_or(0);
        self.validate(rows, cols)?;
        if rest.len() != rows * (cols - s) {
            return Err(qcl_tensor::Error::ShapeMismatch {
                context: "quantized columns".into(),
                expected: format!("[{rows}, {}]", cols - s),
                actual: vec![rest.len()],
            });
        }
        let split = crate::objective::ColumnSplit::new(
            cols,
            self.columns.iter().map(|&c| c as usize).collect(),
        );
        let exact: Vec<f32> = self.values.iter().map(|v| v.to_f32()).collect();
        Ok(split.merge(rest, &exact))
    }
}

/// A compressed tensor: its original dtype and shape, and its encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressedTensor {
    /// The dtype it decompresses to.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The stored form (of the columns not in `outliers`, when there are any).
    pub encoding: Encoding,
    /// Input columns of a 2-D weight kept exactly; `encoding` then holds a `[rows, cols − s]`
    /// weight of the other columns.
    pub outliers: Option<ExactColumns>,
}

impl CompressedTensor {
    /// The decompressed values (f32), row-major in `shape`.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::CorruptStream`] or [`qcl_tensor::Error::ShapeMismatch`] for codes
    /// that do not fit their codebooks or grids, or outlier columns that do not fit the shape.
    pub fn decode(&self) -> Result<Vec<f32>> {
        let inner = match &self.encoding {
            Encoding::Fp16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Encoding::Scalar(s) => s.decode()?,
            Encoding::Pq(p) => p.decode()?,
        };
        match (&self.outliers, self.shape.as_slice()) {
            (None, _) => Ok(inner),
            (Some(e), &[_, cols]) => e.merge(&inner, cols),
            (Some(_), shape) => Err(qcl_tensor::Error::ShapeMismatch {
                context: "outlier columns".into(),
                expected: "a 2-D weight".into(),
                actual: shape.to_vec(),
            }),
        }
    }

    /// The decompressed tensor in its original dtype.
    ///
    /// # Errors
    /// As [`CompressedTensor::decode`].
    pub fn to_raw(&self) -> Result<RawTensor> {
        RawTensor::from_f32(&self.decode()?, self.shape.clone(), self.dtype)
    }

    /// The stored bits of this tensor.
    pub fn bits(&self) -> TensorBits {
        let weights = self.shape.iter().product::<usize>() as u64;
        let (index_bits, codebook_bits, scale_bits) = match &self.encoding {
            Encoding::Fp16(v) => (16 * v.len() as u64, 0, 0),
            Encoding::Scalar(s) => (s.index_bits(), 0, s.scale_bits()),
            Encoding::Pq(p) => (p.index_bits(), p.codebook_bits(), 0),
        };
        TensorBits {
            weights,
            index_bits,
            codebook_bits,
            scale_bits,
            outlier_bits: self.outliers.as_ref().map_or(0, ExactColumns::bits),
        }
    }

    /// A short name of the encoding (`fp16`, `int4 g128`, `pq d4 K256`, `pq d2 K256 +8 fp16
    /// cols`).
    pub fn label(&self) -> String {
        let base = self.base_label();
        match &self.outliers {
            Some(e) => format!("{base} +{} fp16 cols", e.columns.len()),
            None => base,
        }
    }

    fn base_label(&self) -> String {
        match &self.encoding {
            Encoding::Fp16(_) => "fp16".into(),
            Encoding::Scalar(s) => {
                let cols = s.matrix_dims().1;
                if s.group >= cols {
                    format!("int{} per channel", s.bits)
                } else {
                    format!("int{} g{}", s.bits, s.group)
                }
            }
            Encoding::Pq(p) => format!("pq d{} K{}", p.geometry.block, p.k),
        }
    }
}

/// Stored bits of one compressed tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TensorBits {
    /// Weights.
    pub weights: u64,
    /// Bits of per-weight codes: PQ indices (`⌈log2 K⌉` per subvector), integer levels, or fp16
    /// values.
    pub index_bits: u64,
    /// Bits of fp16 codebooks.
    pub codebook_bits: u64,
    /// Bits of fp16 scales and zeros.
    pub scale_bits: u64,
    /// Bits of exact outlier columns: fp16 values and 32-bit indices.
    pub outlier_bits: u64,
}

impl TensorBits {
    /// All stored bits.
    pub fn total(&self) -> u64 {
        self.index_bits + self.codebook_bits + self.scale_bits + self.outlier_bits
    }

    /// `total / weights`.
    pub fn bits_per_weight(&self) -> f64 {
        self.total() as f64 / (self.weights as f64).max(1.0)
    }

    fn add(&mut self, other: &TensorBits) {
        self.weights += other.weights;
        self.index_bits += other.index_bits;
        self.codebook_bits += other.codebook_bits;
        self.scale_bits += other.scale_bits;
        self.outlier_bits += other.outlier_bits;
    }
}

/// Bits accounting of a compressed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BitsReport {
    /// Every compressed tensor.
    pub tensors: BTreeMap<String, TensorBits>,
    /// Their sum.
    pub compressed: TensorBits,
    /// Bytes of the tensors kept as they were.
    pub untouched_bytes: u64,
    /// Size of the file, bytes (header, byte-aligned parts and every tensor).
    pub file_bytes: u64,
}

impl BitsReport {
    /// Bits per compressed weight (codebooks and scales included).
    pub fn bits_per_weight(&self) -> f64 {
        self.compressed.bits_per_weight()
    }

    /// Ideal payload bytes: the compressed bits / 8 plus the untouched bytes (the file adds
    /// its header and pads each part to whole bytes).
    pub fn payload_bytes(&self) -> f64 {
        self.compressed.total() as f64 / 8.0 + self.untouched_bytes as f64
    }
}

/// A compressed checkpoint: compressed tensors, every other tensor as it was, and string
/// metadata of the application (e.g. an architecture name).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_wpq::{Checkpoint, CompressedCheckpoint};
/// let ckpt = Checkpoint::from_tensors([("w", Tensor::ones((2, 2), DType::F32, &Device::Cpu)?)])?;
/// let c = CompressedCheckpoint::untouched(&ckpt);
/// let dir = tempfile::tempdir()?;
/// c.save(dir.path().join("c.safetensors"))?;
/// let back = CompressedCheckpoint::load(dir.path().join("c.safetensors"))?;
/// assert_eq!(back, c);
/// let vb = back.var_builder(DType::F32, &Device::Cpu)?;
/// assert_eq!(vb.get((2, 2), "w")?.sum_all()?.to_scalar::<f32>()?, 4.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompressedCheckpoint {
    /// Compressed tensors by name.
    pub compressed: BTreeMap<String, CompressedTensor>,
    /// Every other tensor, bit for bit.
    pub untouched: BTreeMap<String, RawTensor>,
    /// The application's metadata (keys `format` and `qcl.tensors` are reserved).
    pub metadata: BTreeMap<String, String>,
}

impl CompressedCheckpoint {
    /// Every tensor of `checkpoint` kept as it was (nothing compressed yet).
    pub fn untouched(checkpoint: &Checkpoint) -> Self {
        CompressedCheckpoint {
            compressed: BTreeMap::new(),
            untouched: checkpoint
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            metadata: BTreeMap::new(),
        }
    }

    /// Every tensor decompressed to its original dtype and shape, as stored bytes.
    ///
    /// # Errors
    /// As [`CompressedTensor::decode`].
    pub fn decompress(&self) -> Result<Checkpoint> {
        let mut out = Checkpoint::default();
        for (name, t) in &self.untouched {
            out.insert(name.clone(), t.clone());
        }
        for (name, t) in &self.compressed {
            out.insert(name.clone(), t.to_raw()?);
        }
        Ok(out)
    }

    /// Every tensor decompressed to its original dtype, on `device`.
    ///
    /// # Errors
    /// As [`CompressedTensor::decode`] and [`RawTensor::to_tensor`].
    pub fn tensors(&self, device: &Device) -> Result<BTreeMap<String, Tensor>> {
        self.decompress()?
            .iter()
            .map(|(k, v)| Ok((k.to_string(), v.to_tensor(device)?)))
            .collect()
    }

    /// A candle-nn `VarBuilder` of the decompressed tensors (converted to `dtype` on `get`), so
    /// that an unchanged candle model loads from it.
    ///
    /// # Errors
    /// As [`CompressedCheckpoint::tensors`].
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let tensors: HashMap<String, Tensor> = self.tensors(device)?.into_iter().collect();
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }

    /// Bits accounting per compressed tensor and in total, and the file's size (the file is
    /// serialised in memory to measure it).
    ///
    /// # Errors
    /// As [`CompressedCheckpoint::to_bytes`].
    pub fn bits(&self) -> Result<BitsReport> {
        let tensors: BTreeMap<String, TensorBits> = self
            .compressed
            .iter()
            .map(|(k, v)| (k.clone(), v.bits()))
            .collect();
        let mut compressed = TensorBits::default();
        tensors.values().for_each(|b| compressed.add(b));
        Ok(BitsReport {
            tensors,
            compressed,
            untouched_bytes: self
                .untouched
                .values()
                .map(|t| t.bytes().len() as u64)
                .sum(),
            file_bytes: self.to_bytes()?.len() as u64,
        })
    }
}
