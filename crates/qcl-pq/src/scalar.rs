//! Uniform scalar quantization: each dimension rounded to one of `2^bits` evenly spaced levels
//! between a trained minimum and maximum (faiss's `ScalarQuantizer` with a uniform range).

use qcl_tensor::{Error, Fingerprint, Result};

use crate::pq::check_points;
use crate::quantizer::{check_codes, FitQuantizer, Quantizer};
use crate::PackedCodes;

/// Metadata `format` of a scalar quantizer (its fingerprint's kind).
pub const SCALAR_FORMAT: &str = "qcl-scalar-quantizer/1";

/// Where a [`ScalarQuantizer`]'s range comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScalarRange {
    /// Each dimension's own minimum and maximum over the training data (the default).
    #[default]
    PerDimension,
    /// One minimum and maximum over every value of the training data.
    Global,
}

/// Every knob of a [`ScalarQuantizer`], with defaults (8 bits, a range per dimension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalarQuantizerConfig {
    /// Bits per dimension, `1..=16` (default 8).
    pub bits: u32,
    /// How the range is taken from the training data (default [`ScalarRange::PerDimension`]).
    pub range: ScalarRange,
}

impl Default for ScalarQuantizerConfig {
    fn default() -> Self {
        ScalarQuantizerConfig {
            bits: 8,
            range: ScalarRange::PerDimension,
        }
    }
}

impl ScalarQuantizerConfig {
    /// `bits` per dimension, a range per dimension.
    pub fn new(bits: u32) -> Self {
        ScalarQuantizerConfig {
            bits,
            ..Default::default()
        }
    }
}

/// Uniform scalar quantizer: dimension `j` of a vector is stored as
/// `q = clamp(round((x − lo_j) / s_j), 0, 2^b − 1)` with step `s_j = (hi_j − lo_j)/(2^b − 1)`
/// and decoded as `lo_j + q·s_j`, both computed in `f64` (so that a range as wide as `f32`
/// allows still has a finite step). Inside the trained range the error of each value is at
/// most `s_j / 2`, plus the rounding of the decoded value to `f32`; values outside it are
/// clamped to the nearest end. A dimension with `hi_j = lo_j` decodes to `lo_j`.
///
/// ```
/// use qcl_pq::{FitQuantizer, Quantizer, ScalarQuantizer, ScalarQuantizerConfig};
/// let data = [0.0, 10.0, 1.0, 20.0, 0.5, 15.0];
/// let sq = ScalarQuantizer::fit(&data, 2, &ScalarQuantizerConfig::new(2))?;
/// assert_eq!(sq.bits_per_vector(), 4);
/// // Steps of 1/3 and 10/3: 0.3 rounds to level 1 of [0, 1], 12 to level 1 of [10, 20].
/// let decoded = sq.decode(&sq.encode(&[0.3, 12.0])?)?;
/// assert!((decoded[0] - 1.0 / 3.0).abs() < 1e-6 && (decoded[1] - 40.0 / 3.0).abs() < 1e-5);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarQuantizer {
    bits: u32,
    lo: Vec<f32>,
    hi: Vec<f32>,
}

impl ScalarQuantizer {
    /// A quantizer from its range: `lo[j] ≤ hi[j]`, both finite, one pair per dimension.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `bits` outside `1..=16`, no dimension, a range of
    /// another length, a non-finite bound or `lo[j] > hi[j]` (naming `j`).
    pub fn from_range(bits: u32, lo: Vec<f32>, hi: Vec<f32>) -> Result<Self> {
        check_bits(bits)?;
        if lo.is_empty() || lo.len() != hi.len() {
            return Err(Error::invalid_parameter(
                "range",
                format!(
                    "need one (lo, hi) per dimension, got {} and {}",
                    lo.len(),
                    hi.len()
                ),
            ));
        }
        if let Some(j) =
            (0..lo.len()).find(|&j| !(lo[j].is_finite() && hi[j].is_finite() && lo[j] <= hi[j]))
        {
            return Err(Error::invalid_parameter(
                "range",
                format!(
                    "dimension {j}: need finite lo ≤ hi, got [{}, {}]",
                    lo[j], hi[j]
                ),
            ));
        }
        Ok(ScalarQuantizer { bits, lo, hi })
    }

    /// Minimum of each dimension's range.
    pub fn lo(&self) -> &[f32] {
        &self.lo
    }

    /// Maximum of each dimension's range.
    pub fn hi(&self) -> &[f32] {
        &self.hi
    }

    fn levels(&self) -> u32 {
        ((1u64 << self.bits) - 1) as u32
    }

    /// `s_j` of every dimension, in `f64` (computed once per call, not per value).
    fn steps(&self) -> Vec<f64> {
        let levels = f64::from(self.levels());
        self.lo
            .iter()
            .zip(&self.hi)
            .map(|(&lo, &hi)| (f64::from(hi) - f64::from(lo)) / levels)
            .collect()
    }
}

fn check_bits(bits: u32) -> Result<()> {
    if !(1..=16).contains(&bits) {
        return Err(Error::invalid_parameter(
            "bits",
            format!("must be in 1..=16, got {bits}"),
        ));
    }
    Ok(())
}

impl Quantizer for ScalarQuantizer {
    fn dim(&self) -> usize {
        self.lo.len()
    }
    fn codes_per_vector(&self) -> usize {
        self.lo.len()
    }
    fn bits_per_code(&self) -> u32 {
        self.bits
    }
    fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        let dim = self.dim();
        check_points("data", data, dim)?;
        let top = f64::from(self.levels());
        let steps = self.steps();
        let codes: Vec<u32> = data
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let j = i % dim;
                let step = steps[j];
                if step > 0.0 {
                    ((f64::from(x) - f64::from(self.lo[j])) / step)
                        .round()
                        .clamp(0.0, top) as u32
                } else {
                    0
                }
            })
            .collect();
        PackedCodes::pack(&codes, dim, self.bits)
    }
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        check_codes(self, codes)?;
        let dim = self.dim();
        let steps = self.steps();
        Ok(codes
            .unpack()
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let j = i % dim;
                let value = f64::from(self.lo[j]) + f64::from(q) * steps[j];
                (value as f32).clamp(self.lo[j], self.hi[j])
            })
            .collect())
    }
    fn fingerprint(&self) -> String {
        Fingerprint::new(SCALAR_FORMAT)
            .number(self.lo.len() as u64)
            .number(u64::from(self.bits))
            .floats(&self.lo)
            .floats(&self.hi)
            .finish()
    }
}

impl FitQuantizer for ScalarQuantizer {
    type Config = ScalarQuantizerConfig;

    /// The range of `data`: per dimension or global, as `config.range` says.
    fn fit(data: &[f32], dim: usize, config: &ScalarQuantizerConfig) -> Result<Self> {
        check_bits(config.bits)?;
        if dim == 0 {
            return Err(Error::invalid_parameter("dim", "must be at least 1"));
        }
        check_points("data", data, dim)?;
        let mut lo = vec![f32::INFINITY; dim];
        let mut hi = vec![f32::NEG_INFINITY; dim];
        for row in data.chunks_exact(dim) {
            for (j, &x) in row.iter().enumerate() {
                lo[j] = lo[j].min(x);
                hi[j] = hi[j].max(x);
            }
        }
        if config.range == ScalarRange::Global {
            let (l, h) = (
                lo.iter().copied().fold(f32::INFINITY, f32::min),
                hi.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            );
            lo.fill(l);
            hi.fill(h);
        }
        ScalarQuantizer::from_range(config.bits, lo, hi)
    }
}
