//! Tensors exactly as a safetensors file stores them, and checkpoints of them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use qcl_tensor::{Error, Result};
use safetensors::{Dtype, SafeTensors};

/// A tensor as stored: dtype, shape and little-endian bytes, kept bit for bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Bytes of `numel` elements of `dtype` (sub-byte types packed), `None` on overflow.
pub(crate) fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    Some(numel.checked_mul(dtype.bitsize())?.div_ceil(8))
}

macro_rules! le_bytes {
    ($t:expr, $ty:ty) => {
        $t.flatten_all()?
            .to_vec1::<$ty>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    };
}

impl RawTensor {
    /// A tensor from its parts.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `bytes` is not the size of `shape` in `dtype`.
    pub fn new(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        if byte_len(dtype, &shape) != Some(bytes.len()) {
            return Err(Error::ShapeMismatch {
                context: format!("{dtype:?} tensor bytes"),
                expected: format!("{shape:?}"),
                actual: vec![bytes.len()],
            });
        }
        Ok(RawTensor {
            dtype,
            shape,
            bytes,
        })
    }

    /// The bytes of a candle tensor (any device; u8, u32, i64, f16, bf16, f32, f64).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_wpq::RawTensor;
    /// let t = Tensor::new(&[[1f32, -2.0]], &Device::Cpu)?;
    /// let raw = RawTensor::from_tensor(&t)?;
    /// assert_eq!((raw.shape(), raw.bytes().len()), (&[1usize, 2][..], 8));
    /// assert_eq!(raw.to_tensor(&Device::Cpu)?.to_vec2::<f32>()?, vec![vec![1.0, -2.0]]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for another dtype; a candle error.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let bytes = match t.dtype() {
            DType::U8 => t.flatten_all()?.to_vec1::<u8>()?,
            DType::U32 => le_bytes!(t, u32),
            DType::I64 => le_bytes!(t, i64),
            DType::F16 => le_bytes!(t, half::f16),
            DType::BF16 => le_bytes!(t, half::bf16),
            DType::F32 => le_bytes!(t, f32),
            DType::F64 => le_bytes!(t, f64),
            other => {
                return Err(Error::invalid_parameter(
                    "dtype",
                    format!("cannot take the bytes of a {other:?} tensor"),
                ))
            }
        };
        RawTensor::new(t.dtype().into(), t.dims().to_vec(), bytes)
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the dtype is a float type this crate compresses (f16, bf16, f32, f64).
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
        )
    }

    /// The values as f32 (float dtypes only).
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`]-like [`Error::InvalidParameter`] for a non-float dtype.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = &self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(Error::invalid_parameter(
                    "dtype",
                    format!("a {other:?} tensor holds no float weights"),
                ))
            }
        })
    }

    /// f32 `values` of `shape` converted to `dtype` (a float dtype).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a non-float dtype; as [`RawTensor::new`].
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: Dtype) -> Result<Self> {
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::F64 => values
                .iter()
                .flat_map(|v| f64::from(*v).to_le_bytes())
                .collect(),
            other => {
                return Err(Error::invalid_parameter(
                    "dtype",
                    format!("cannot store weights as {other:?}"),
                ))
            }
        };
        RawTensor::new(dtype, shape, bytes)
    }

    /// The tensor on `device`, in its own dtype.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a dtype candle does not have (e.g. bool, u16).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let dtype = DType::try_from(self.dtype).map_err(|_| {
            Error::invalid_parameter("dtype", format!("candle has no {:?} tensors", self.dtype))
        })?;
        let t = Tensor::from_raw_buffer(&self.bytes, dtype, &self.shape, &Device::Cpu)?;
        Ok(t.to_device(device)?)
    }
}

/// Named tensors of a model, kept exactly as stored.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use qcl_wpq::Checkpoint;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let _fc = candle_nn::linear(4, 2, vb.pp("fc"))?;
/// let ckpt = Checkpoint::from_varmap(&varmap)?;
/// assert_eq!(ckpt.names().collect::<Vec<_>>(), ["fc.bias", "fc.weight"]);
/// assert_eq!(ckpt.get("fc.weight").unwrap().shape(), &[2, 4]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    tensors: BTreeMap<String, RawTensor>,
}

impl Checkpoint {
    /// Reads a safetensors file (any dtype; every tensor's bytes are kept).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::BadFile`] for a truncated or foreign file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = qcl_tensor::read_safetensors_bytes(path)?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses safetensors bytes; `path` is used in messages only.
    ///
    /// # Errors
    /// [`Error::BadFile`] for a truncated or foreign file.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let parsed = SafeTensors::deserialize(bytes).map_err(|e| {
            Error::bad_file(
                path.as_ref(),
                format!("not a complete safetensors file ({e})"),
            )
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in parsed.tensors() {
            let raw = RawTensor::new(view.dtype(), view.shape().to_vec(), view.data().to_vec())
                .map_err(|e| Error::bad_file(path.as_ref(), format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, raw);
        }
        Ok(Checkpoint { tensors })
    }

    /// A checkpoint of candle tensors.
    ///
    /// # Errors
    /// As [`RawTensor::from_tensor`].
    pub fn from_tensors<S: Into<String>>(
        tensors: impl IntoIterator<Item = (S, Tensor)>,
    ) -> Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n.into(), RawTensor::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        Ok(Checkpoint { tensors })
    }

    /// The variables of a candle-nn `VarMap`, by their paths.
    ///
    /// # Errors
    /// As [`RawTensor::from_tensor`].
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let tensors: HashMap<String, Tensor> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        drop(data);
        Self::from_tensors(tensors)
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name`.
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name)
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: RawTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Every tensor, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
