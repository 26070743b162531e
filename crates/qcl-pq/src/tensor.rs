//! The tensor face of k-means and product quantization: every method named `*_tensor` takes
//! and returns candle tensors and is a thin layer over the slice method of the same name
//! (`[n, d]` tensors of any float dtype and device in; the rows go to the slice kernel as `f32`;
//! centroids and distances come back `f32`, indices and codes `u32`, on the input's device), so
//! both give the same results bit for bit. The slice methods stay for callers that already hold
//! `f32` rows (no tensor round trip).

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{matrix_f32, Error, Nearest, Result, Seed};

use crate::{KMeans, KMeansConfig, MiniBatchKMeans, PackedCodes, ProductQuantizer};

/// The rows of `x` (`[n, dim]`, or any width when `dim` is `None`), as `f32`, and the width.
fn rows(context: &str, x: &Tensor, dim: Option<usize>) -> Result<(Vec<f32>, usize)> {
    let (values, _, d) = matrix_f32(context, x)?;
    match dim {
        Some(dim) if d != dim => Err(Error::ShapeMismatch {
            context: context.into(),
            expected: format!("[n, {dim}]"),
            actual: x.dims().to_vec(),
        }),
        _ => Ok((values, d)),
    }
}

/// Per-row weights `[n]` of any float dtype, as `f32`.
fn weights(w: &Tensor) -> Result<Vec<f32>> {
    if w.rank() != 1 {
        return Err(Error::ShapeMismatch {
            context: "weights".into(),
            expected: "[n]".into(),
            actual: w.dims().to_vec(),
        });
    }
    if !w.dtype().is_float() {
        return Err(Error::DTypeMismatch {
            context: "weights".into(),
            expected: DType::F32,
            actual: w.dtype(),
        });
    }
    Ok(w.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// `Nearest` as an index tensor (`u32`) and a distance tensor (`f32`) of `shape`.
fn nearest_tensors(found: Nearest, shape: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::from_vec(found.indices, shape, device)?,
        Tensor::from_vec(found.distances, shape, device)?,
    ))
}

impl KMeans {
    /// [`KMeans::fit`] on the rows of `points` (`[n, dim]`, any float dtype), with optional
    /// per-row `weights` (`[n]`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_pq::{KMeans, KMeansConfig};
    /// let x = Tensor::new(&[[0f32, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], &Device::Cpu)?;
    /// let model = KMeans::fit_tensor(&x, None, &KMeansConfig::new(2))?;
    /// assert_eq!(model.centroids_tensor(&Device::Cpu)?.dims(), &[2, 2]);
    /// let (labels, distances) = model.assign_tensor(&x)?;
    /// let labels = labels.to_vec1::<u32>()?;
    /// assert_eq!(labels[0], labels[1]);
    /// assert_ne!(labels[0], labels[2]);
    /// assert!(distances.to_vec1::<f32>()?.iter().all(|&d| d < 0.01));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a rank other than 2 or weights that are not `[n]`,
    /// [`Error::DTypeMismatch`] for integer tensors, and the errors of [`KMeans::fit`].
    pub fn fit_tensor(
        points: &Tensor,
        weights: Option<&Tensor>,
        config: &KMeansConfig,
    ) -> Result<KMeans> {
        let (data, dim) = rows("points", points, None)?;
        let w = weights.map(self::weights).transpose()?;
        KMeans::fit(&data, dim, w.as_deref(), config)
    }

    /// The centroids as a tensor `f32 [k, dim]` on `device`.
    ///
    /// # Errors
    /// A candle error (e.g. from the device).
    pub fn centroids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.centroids,
            (self.k, self.dim),
            device,
        )?)
    }

    /// [`KMeans::assign`] of the rows of `points` (`[n, dim]`): the nearest centroid of each,
    /// `u32 [n]`, and its squared distance, `f32 [n]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for rows not of `dim`, and the errors of [`KMeans::assign`].
    pub fn assign_tensor(&self, points: &Tensor) -> Result<(Tensor, Tensor)> {
        let (data, _) = rows("points", points, Some(self.dim))?;
        let n = data.len() / self.dim;
        nearest_tensors(self.assign(&data)?, &[n], points.device())
    }

    /// [`KMeans::mse`] of the rows of `points` (`[n, dim]`).
    ///
    /// # Errors
    /// As [`KMeans::assign_tensor`], and [`Error::EmptyInput`] for no rows.
    pub fn mse_tensor(&self, points: &Tensor) -> Result<f64> {
        let (data, _) = rows("points", points, Some(self.dim))?;
        self.mse(&data)
    }
}

impl MiniBatchKMeans {
    /// [`MiniBatchKMeans::new`] from centroids `[k, dim]`.
    ///
    /// # Errors
    /// As [`MiniBatchKMeans::new`], and shape/dtype errors for a tensor that is not a float
    /// matrix.
    pub fn new_tensor(centroids: &Tensor) -> Result<Self> {
        let (values, dim) = rows("centroids", centroids, None)?;
        MiniBatchKMeans::new(values, dim)
    }

    /// [`MiniBatchKMeans::from_first_batch`] on the rows of `batch` (`[n, dim]`).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_pq::MiniBatchKMeans;
    /// use qcl_tensor::Seed;
    /// let mut rng = Seed::new(1).rng();
    /// let first = rng.normal_tensor((100, 2), 0.0, 1.0, &Device::Cpu)?;
    /// let mut model = MiniBatchKMeans::from_first_batch_tensor(&first, 4, Seed::new(2))?;
    /// let mse = model.partial_fit_tensor(&rng.normal_tensor((100, 2), 0.0, 1.0, &Device::Cpu)?, None)?;
    /// assert!(mse > 0.0);
    /// assert_eq!(model.centroids_tensor(&Device::Cpu)?.dims(), &[4, 2]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`MiniBatchKMeans::from_first_batch`], and shape/dtype errors for a tensor that is
    /// not a float matrix.
    pub fn from_first_batch_tensor(batch: &Tensor, k: usize, seed: Seed) -> Result<Self> {
        let (values, dim) = rows("batch", batch, None)?;
        MiniBatchKMeans::from_first_batch(&values, dim, k, seed)
    }

    /// [`MiniBatchKMeans::partial_fit`] with the rows of `batch` (`[n, dim]`) and optional
    /// weights `[n]`.
    ///
    /// # Errors
    /// As [`MiniBatchKMeans::partial_fit`], and [`Error::ShapeMismatch`] for rows not of `dim`.
    pub fn partial_fit_tensor(&mut self, batch: &Tensor, weights: Option<&Tensor>) -> Result<f64> {
        let (values, _) = rows("batch", batch, Some(self.dim()))?;
        let w = weights.map(self::weights).transpose()?;
        self.partial_fit(&values, w.as_deref())
    }

    /// The centroids as a tensor `f32 [k, dim]` on `device`.
    ///
    /// # Errors
    /// A candle error.
    pub fn centroids_tensor(&self, device: &Device) -> Result<Tensor> {
        let k = self.centroids().len() / self.dim();
        Ok(Tensor::from_slice(
            self.centroids(),
            (k, self.dim()),
            device,
        )?)
    }
}

impl PackedCodes {
    /// Packs a code tensor `u32 [n, m]` with `nbits` bits per code.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] for another dtype, [`Error::ShapeMismatch`] for another rank,
    /// and the errors of [`PackedCodes::pack`].
    pub fn from_tensor(codes: &Tensor, nbits: u32) -> Result<Self> {
        if codes.dtype() != DType::U32 {
            return Err(Error::DTypeMismatch {
                context: "codes".into(),
                expected: DType::U32,
                actual: codes.dtype(),
            });
        }
        let (_, m) = match *codes.dims() {
            [n, m] => (n, m),
            _ => {
                return Err(Error::ShapeMismatch {
                    context: "codes".into(),
                    expected: "[n, m]".into(),
                    actual: codes.dims().to_vec(),
                })
            }
        };
        let values = codes.flatten_all()?.to_vec1::<u32>()?;
        PackedCodes::pack(&values, m, nbits)
    }

    /// The codes as a tensor `u32 [n, m]` on `device`.
    ///
    /// # Errors
    /// A candle error.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.unpack(),
            (self.n(), self.m()),
            device,
        )?)
    }
}

impl ProductQuantizer {
    /// [`ProductQuantizer::train`] on the rows of `data` (`[n, dim]`).
    ///
    /// ```
    /// use candle_core::Device;
    /// use qcl_pq::{ProductQuantizer, ProductQuantizerConfig};
    /// use qcl_tensor::Seed;
    /// let x = Seed::new(0).rng().normal_tensor((1_000, 8), 0.0, 1.0, &Device::Cpu)?;
    /// let pq = ProductQuantizer::train_tensor(&x, &ProductQuantizerConfig::new(4, 4))?;
    /// let codes = pq.encode_tensor(&x)?; // u32 [1000, 4]
    /// let decoded = pq.decode_tensor(&codes)?; // f32 [1000, 8]
    /// let (nearest, distances) = pq.search_tensor(&x.narrow(0, 0, 5)?, &codes, 3)?;
    /// assert_eq!((codes.dims(), decoded.dims(), nearest.dims()), (&[1000, 4][..], &[1000, 8][..], &[5, 3][..]));
    /// assert_eq!(pq.codebooks_tensor(&Device::Cpu)?.dims(), &[4, 16, 2]);
    /// # let _ = distances;
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// Shape/dtype errors for a tensor that is not a float matrix, and the errors of
    /// [`ProductQuantizer::train`].
    pub fn train_tensor(data: &Tensor, config: &crate::ProductQuantizerConfig) -> Result<Self> {
        let (values, dim) = rows("data", data, None)?;
        ProductQuantizer::train(&values, dim, config)
    }

    /// [`ProductQuantizer::from_codebooks`] from a tensor `[m, 2^nbits, dsub]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for another rank, [`Error::InvalidParameter`] when the middle
    /// axis is not a power of two in `2..=65536`, and the errors of
    /// [`ProductQuantizer::from_codebooks`].
    pub fn from_codebooks_tensor(codebooks: &Tensor) -> Result<Self> {
        let (m, ksub, dsub) = match *codebooks.dims() {
            [m, ksub, dsub] => (m, ksub, dsub),
            _ => {
                return Err(Error::ShapeMismatch {
                    context: "codebooks".into(),
                    expected: "[m, 2^nbits, dsub]".into(),
                    actual: codebooks.dims().to_vec(),
                })
            }
        };
        if !ksub.is_power_of_two() || ksub < 2 {
            return Err(Error::invalid_parameter(
                "codebooks",
                format!("{ksub} centroids per sub-space is not 2^nbits with nbits >= 1"),
            ));
        }
        let (values, _) = rows("codebooks", &codebooks.reshape((m * ksub, dsub))?, None)?;
        ProductQuantizer::from_codebooks(m * dsub, m, ksub.trailing_zeros(), values)
    }

    /// The codebooks as a tensor `f32 [m, ksub, dsub]` on `device`.
    ///
    /// # Errors
    /// A candle error.
    pub fn codebooks_tensor(&self, device: &Device) -> Result<Tensor> {
        let shape = (self.m(), self.ksub(), self.dsub());
        Ok(Tensor::from_slice(self.codebooks(), shape, device)?)
    }

    /// [`ProductQuantizer::encode`] of the rows of `data` (`[n, dim]`): the codes, unpacked,
    /// `u32 [n, m]` (pack them with [`PackedCodes::from_tensor`] to store them).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for rows not of `dim`, and the errors of
    /// [`ProductQuantizer::encode`].
    pub fn encode_tensor(&self, data: &Tensor) -> Result<Tensor> {
        let (values, _) = rows("data", data, Some(self.dim()))?;
        self.encode(&values)?.to_tensor(data.device())
    }

    /// [`ProductQuantizer::decode`] of codes `u32 [n, m]`: the reconstructions `f32 [n, dim]`.
    ///
    /// # Errors
    /// As [`PackedCodes::from_tensor`] (a code of `2^nbits` or more is refused) and
    /// [`ProductQuantizer::decode`].
    pub fn decode_tensor(&self, codes: &Tensor) -> Result<Tensor> {
        let packed = PackedCodes::from_tensor(codes, self.nbits())?;
        let values = self.decode(&packed)?;
        Ok(Tensor::from_vec(
            values,
            (packed.n(), self.dim()),
            codes.device(),
        )?)
    }

    /// [`ProductQuantizer::search`] for the rows of `queries` (`[nq, dim]`) among codes
    /// `u32 [n, m]`: the `top_k` nearest database rows of each query, `u32 [nq, top_k]`, and
    /// their asymmetric distances, `f32 [nq, top_k]`, ascending.
    ///
    /// # Errors
    /// As [`ProductQuantizer::encode_tensor`], [`ProductQuantizer::decode_tensor`] and
    /// [`ProductQuantizer::search`].
    pub fn search_tensor(
        &self,
        queries: &Tensor,
        codes: &Tensor,
        top_k: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (values, _) = rows("queries", queries, Some(self.dim()))?;
        let packed = PackedCodes::from_tensor(codes, self.nbits())?;
        let found = self.search(&values, &packed, top_k)?;
        let nq = values.len() / self.dim();
        nearest_tensors(found, &[nq, top_k], queries.device())
    }
}
