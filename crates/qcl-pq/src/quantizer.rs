//! One shape for every quantizer: [`Quantizer`] (encode to [`PackedCodes`], decode, size,
//! identity) and [`FitQuantizer`] (train one from data with its `…Config`).
//!
//! A quantizer maps a vector of `dim` floats to `codes_per_vector` codes of `bits_per_code`
//! bits each, stored bit-packed in one [`PackedCodes`] buffer, and maps codes back to a
//! reconstruction. k-means ([`KMeans`]: one code per vector), product quantization
//! ([`ProductQuantizer`]: one code per sub-space) and uniform scalar quantization
//! ([`ScalarQuantizer`](crate::ScalarQuantizer): one code per dimension) implement it here;
//! qcl-ecvq's entropy-constrained quantizer and qcl-vq's VQ layers implement it too. Code written against the trait
//! (storage, evaluation, an index) takes any of them, or one of your own:
//!
//! ```
//! use qcl_pq::{reconstruction_mse, PackedCodes, Quantizer};
//! use qcl_tensor::Result;
//!
//! /// One bit per dimension: the sign, decoded as ±`scale`.
//! struct SignQuantizer {
//!     dim: usize,
//!     scale: f32,
//! }
//!
//! impl Quantizer for SignQuantizer {
//!     fn dim(&self) -> usize {
//!         self.dim
//!     }
//!     fn codes_per_vector(&self) -> usize {
//!         self.dim
//!     }
//!     fn bits_per_code(&self) -> u32 {
//!         1
//!     }
//!     fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
//!         let signs: Vec<u32> = data.iter().map(|&x| u32::from(x >= 0.0)).collect();
//!         PackedCodes::pack(&signs, self.dim, 1)
//!     }
//!     fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
//!         qcl_pq::check_codes(self, codes)?;
//!         Ok(codes.unpack().iter().map(|&c| if c == 1 { self.scale } else { -self.scale }).collect())
//!     }
//!     fn fingerprint(&self) -> String {
//!         qcl_tensor::Fingerprint::new("sign/1").number(self.dim as u64).floats(&[self.scale]).finish()
//!     }
//! }
//!
//! let q = SignQuantizer { dim: 4, scale: 0.5 };
//! let data = [0.4, -0.6, 0.5, -0.5];
//! assert_eq!(q.bits_per_vector(), 4);
//! assert_eq!(q.decode(&q.encode(&data)?)?, vec![0.5, -0.5, 0.5, -0.5]);
//! // One vector, squared errors 0.1² + 0.1² summed over its dimensions.
//! assert!((reconstruction_mse(&q, &data)? - 0.02).abs() < 1e-6);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use qcl_tensor::{Error, Fingerprint, Result};

use crate::pq::check_points;
use crate::{KMeans, KMeansConfig, PackedCodes, ProductQuantizer, ProductQuantizerConfig};

/// A trained quantizer of `dim`-dimensional vectors into bit-packed codes.
///
/// Contract, checked by property tests for `KMeans`, `ProductQuantizer` and `ScalarQuantizer`
/// (`tests/quantizer.rs`) and by their crates' tests for `Ecvq`, `VectorQuantizer` and
/// `ResidualVq`: [`encode`](Quantizer::encode) of `n` whole rows gives `n` rows of
/// `codes_per_vector` codes of `bits_per_code` bits; [`decode`](Quantizer::decode) gives `n`
/// rows of `dim` floats and refuses codes of another shape (use [`check_codes`]) or an index
/// past a codebook with a typed error; the same quantizer gives the same codes and the same
/// [`fingerprint`](Quantizer::fingerprint) every time.
pub trait Quantizer {
    /// Dimension of the vectors.
    fn dim(&self) -> usize;

    /// Codes stored per vector (1 for VQ, `m` for PQ, `dim` for scalar quantization).
    fn codes_per_vector(&self) -> usize;

    /// Bits of one code: `1..=16` for a quantizer whose codes can be packed (a codebook of
    /// more than 65,536 codes needs more, and [`encode`](Quantizer::encode) refuses it).
    fn bits_per_code(&self) -> u32;

    /// Bits one vector's codes take, `codes_per_vector · bits_per_code` (the packed buffer
    /// rounds each vector up to whole bytes).
    fn bits_per_vector(&self) -> usize {
        self.codes_per_vector() * self.bits_per_code() as usize
    }

    /// The codes of `data` (row-major `[n, dim]`).
    ///
    /// # Errors
    /// [`Error::EmptyInput`], [`Error::ShapeMismatch`] or [`Error::NonFinite`] for bad input.
    fn encode(&self, data: &[f32]) -> Result<PackedCodes>;

    /// The reconstruction of every encoded vector, row-major `[n, dim]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::InvalidParameter`] for codes of another shape;
    /// [`Error::InvalidParameter`] for an index past its codebook.
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>>;

    /// The quantizer's identity (its kind, shape and every stored value, hashed), recorded
    /// beside codes so that they are never decoded by another quantizer.
    fn fingerprint(&self) -> String;
}

/// A [`Quantizer`] trained from data with every knob in one `Config` (with a `Default`).
///
/// ```
/// use qcl_pq::{FitQuantizer, ProductQuantizer, ProductQuantizerConfig, Quantizer};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(500 * 8, 0.0, 1.0);
/// let pq = ProductQuantizer::fit(&data, 8, &ProductQuantizerConfig::new(2, 4))?;
/// assert_eq!(pq.bits_per_vector(), 8);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub trait FitQuantizer: Quantizer + Sized {
    /// Every knob of the training.
    type Config;

    /// Trains a quantizer on `data` (row-major `[n, dim]`).
    ///
    /// # Errors
    /// As the quantizer's own training function.
    fn fit(data: &[f32], dim: usize, config: &Self::Config) -> Result<Self>;
}

/// Checks that `codes` have `quantizer`'s shape: its codes per vector and bits per code.
///
/// # Errors
/// [`Error::ShapeMismatch`] for another number of codes per vector,
/// [`Error::InvalidParameter`] for another number of bits per code.
pub fn check_codes<Q: Quantizer + ?Sized>(quantizer: &Q, codes: &PackedCodes) -> Result<()> {
    let m = quantizer.codes_per_vector();
    if codes.m() != m {
        return Err(Error::ShapeMismatch {
            context: "codes".into(),
            expected: format!("[*, {m}]"),
            actual: vec![codes.n(), codes.m()],
        });
    }
    let nbits = quantizer.bits_per_code();
    if codes.nbits() != nbits {
        return Err(Error::invalid_parameter(
            "codes",
            format!(
                "packed with {} bits per code, the quantizer uses {nbits}",
                codes.nbits()
            ),
        ));
    }
    Ok(())
}

/// Mean over the vectors of `data` of `‖x − decode(encode(x))‖²`, summed in `f64`.
///
/// # Errors
/// As [`Quantizer::encode`] and [`Quantizer::decode`].
pub fn reconstruction_mse<Q: Quantizer + ?Sized>(quantizer: &Q, data: &[f32]) -> Result<f64> {
    let n = check_points("data", data, quantizer.dim())?;
    let decoded = quantizer.decode(&quantizer.encode(data)?)?;
    let total: f64 = data
        .iter()
        .zip(&decoded)
        .map(|(&x, &y)| f64::from(x - y).powi(2))
        .sum();
    Ok(total / n as f64)
}

/// Bits of the narrowest index that holds `0 … k−1`: `⌈log2 k⌉`, at least 1 (a packed code has
/// a bit), for any `k` (no loop, so a crafted `k` near `usize::MAX` from a file cannot hang a
/// reader).
///
/// ```
/// use qcl_pq::index_bits;
/// assert_eq!((index_bits(0), index_bits(2), index_bits(3), index_bits(256)), (1, 1, 2, 8));
/// assert_eq!(index_bits(usize::MAX), usize::BITS);
/// ```
pub fn index_bits(k: usize) -> u32 {
    if k <= 2 {
        1
    } else {
        usize::BITS - (k - 1).leading_zeros()
    }
}

impl Quantizer for ProductQuantizer {
    fn dim(&self) -> usize {
        ProductQuantizer::dim(self)
    }
    fn codes_per_vector(&self) -> usize {
        self.m()
    }
    fn bits_per_code(&self) -> u32 {
        self.nbits()
    }
    fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        ProductQuantizer::encode(self, data)
    }
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        ProductQuantizer::decode(self, codes)
    }
    fn fingerprint(&self) -> String {
        ProductQuantizer::fingerprint(self)
    }
}

impl FitQuantizer for ProductQuantizer {
    type Config = ProductQuantizerConfig;
    fn fit(data: &[f32], dim: usize, config: &ProductQuantizerConfig) -> Result<Self> {
        ProductQuantizer::train(data, dim, config)
    }
}

/// k-means as a vector quantizer: the code of a vector is its nearest centroid.
impl Quantizer for KMeans {
    fn dim(&self) -> usize {
        self.dim
    }
    fn codes_per_vector(&self) -> usize {
        1
    }
    fn bits_per_code(&self) -> u32 {
        index_bits(self.k)
    }
    fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        check_points("data", data, self.dim)?;
        PackedCodes::pack(&self.assign(data)?.indices, 1, self.bits_per_code())
    }
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        check_codes(self, codes)?;
        rows_of(&self.centroids, self.dim, &codes.unpack())
    }
    fn fingerprint(&self) -> String {
        Fingerprint::new(crate::KMEANS_FORMAT)
            .number(self.k as u64)
            .number(self.dim as u64)
            .floats(&self.centroids)
            .finish()
    }
}

impl FitQuantizer for KMeans {
    type Config = KMeansConfig;
    fn fit(data: &[f32], dim: usize, config: &KMeansConfig) -> Result<Self> {
        KMeans::fit(data, dim, None, config)
    }
}

/// The rows `indices` of a row-major `[K, dim]` codebook, concatenated: the decoding of every
/// quantizer with one codebook.
///
/// ```
/// let book = [0.0, 1.0, 2.0, 3.0]; // K = 2 rows of 2
/// assert_eq!(qcl_pq::rows_of(&book, 2, &[1, 0])?, vec![2.0, 3.0, 0.0, 1.0]);
/// assert!(qcl_pq::rows_of(&book, 2, &[2]).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for an index `≥ K`, naming its position.
pub fn rows_of(codebook: &[f32], dim: usize, indices: &[u32]) -> Result<Vec<f32>> {
    let k = codebook.len() / dim.max(1);
    let mut out = Vec::with_capacity(indices.len() * dim);
    for (i, &code) in indices.iter().enumerate() {
        let code = code as usize;
        if code >= k {
            return Err(Error::invalid_parameter(
                "indices",
                format!("index {code} at position {i} is not below K = {k}"),
            ));
        }
        out.extend_from_slice(&codebook[code * dim..(code + 1) * dim]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_bits_is_the_ceiling_log2_with_at_least_one_bit() {
        let expected = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (256, 8), (257, 9)];
        for (k, bits) in expected {
            assert_eq!(index_bits(k), bits, "k = {k}");
        }
    }

    #[test]
    fn rows_of_refuses_an_index_past_the_codebook() {
        let book = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(
            rows_of(&book, 2, &[1, 0]).unwrap(),
            vec![2.0, 3.0, 0.0, 1.0]
        );
        let err = rows_of(&book, 2, &[0, 2]).unwrap_err().to_string();
        assert!(err.contains("position 1"), "{err}");
    }
}
