//! Code-usage telemetry: histograms, perplexity, used and dead codes.

use candle_core::Tensor;
use qcl_tensor::{Error, Result};

use crate::config::ChannelAxis;
use crate::layout::index_values;

/// Perplexity `exp(−Σ_k p_k·log(p_k + 1e-10))` of a histogram, `p_k = h_k / Σ h` (the
/// effective number of codes in use: K for a uniform histogram, 1 when one code takes all).
/// An empty histogram has perplexity 1.
///
/// ```
/// assert!((qcl_vq::perplexity(&[5, 5, 5, 5]) - 4.0).abs() < 1e-6);
/// assert!((qcl_vq::perplexity(&[9, 0, 0]) - 1.0).abs() < 1e-6);
/// ```
pub fn perplexity(histogram: &[u64]) -> f64 {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let entropy: f64 = histogram
        .iter()
        .map(|&h| {
            let p = h as f64 / total as f64;
            -p * (p + 1e-10).ln()
        })
        .sum();
    entropy.exp()
}

/// How often each code of each codebook was chosen, over one batch or accumulated over many
/// (e.g. a whole test set).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_vq::CodeUsage;
/// let mut usage = CodeUsage::new(1, 4);
/// // Indices of a (B=1, N=1, H=1, W=3) batch.
/// usage.add(&Tensor::new(&[[[[0u32, 0, 2]]]], &Device::Cpu)?)?;
/// assert_eq!(usage.histogram(0), &[2, 0, 1, 0]);
/// assert_eq!(usage.used_codes(), vec![2]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeUsage {
    codebooks: usize,
    codes: usize,
    /// Row-major `[N, K]`.
    counts: Vec<u64>,
}

impl CodeUsage {
    /// An empty histogram for `codebooks` codebooks of `codes` codes.
    pub fn new(codebooks: usize, codes: usize) -> Self {
        CodeUsage {
            codebooks,
            codes,
            counts: vec![0; codebooks * codes],
        }
    }

    pub(crate) fn from_counts(codebooks: usize, codes: usize, counts: Vec<u64>) -> Self {
        debug_assert_eq!(counts.len(), codebooks * codes);
        CodeUsage {
            codebooks,
            codes,
            counts,
        }
    }

    /// Adds the indices of one batch: a `u32` tensor shaped as
    /// [`VectorQuantizer::encode`](crate::VectorQuantizer::encode) returns it for the default
    /// [`ChannelAxis::Auto`]: `(B, N, H, W)`, or N on the last axis of any other rank.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a codebook axis without N entries,
    /// [`Error::DTypeMismatch`] for a non-`u32` tensor, [`Error::InvalidParameter`] for an
    /// index ≥ K.
    pub fn add(&mut self, indices: &Tensor) -> Result<()> {
        self.add_along(indices, ChannelAxis::Auto)
    }

    /// [`add`](Self::add) for indices whose codebook axis is `axis` (that of a quantizer
    /// configured with [`VectorQuantizerConfig::channel_axis`](crate::VectorQuantizerConfig::channel_axis)).
    ///
    /// # Errors
    /// As [`add`](Self::add).
    pub fn add_along(&mut self, indices: &Tensor, axis: ChannelAxis) -> Result<()> {
        let (values, layout) = index_values(indices, self.codebooks, axis)?;
        let mut added = self.counts.clone();
        for (i, &code) in values.iter().enumerate() {
            let n = layout.channel_of(i);
            if code as usize >= self.codes {
                return Err(Error::invalid_parameter(
                    "indices",
                    format!(
                        "index {code} at flat position {i} is not below K = {}",
                        self.codes
                    ),
                ));
            }
            added[n * self.codes + code as usize] += 1;
        }
        self.counts = added;
        Ok(())
    }

    /// Adds another histogram of the same shape.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for another number of codebooks or codes.
    pub fn merge(&mut self, other: &CodeUsage) -> Result<()> {
        if (other.codebooks, other.codes) != (self.codebooks, self.codes) {
            return Err(Error::ShapeMismatch {
                context: "code usage".into(),
                expected: format!("[{}, {}]", self.codebooks, self.codes),
                actual: vec![other.codebooks, other.codes],
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// Number of codebooks N.
    pub fn codebooks(&self) -> usize {
        self.codebooks
    }

    /// Codes per codebook K.
    pub fn codes(&self) -> usize {
        self.codes
    }

    /// All counts, row-major `[N, K]`.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The counts of codebook `n`.
    ///
    /// # Panics
    /// If `n ≥ N`, like slice indexing.
    pub fn histogram(&self, n: usize) -> &[u64] {
        &self.counts[n * self.codes..(n + 1) * self.codes]
    }

    /// Vectors counted per codebook.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() / self.codebooks.max(1) as u64
    }

    /// Per codebook, the number of codes chosen at least once.
    pub fn used_codes(&self) -> Vec<usize> {
        self.per_codebook(|h| h.iter().filter(|&&c| c > 0).count())
    }

    /// Per codebook, the [`perplexity`] of its histogram.
    pub fn perplexity(&self) -> Vec<f64> {
        self.per_codebook(perplexity)
    }

    /// The counts as an `f32` tensor `[N, K]` on the CPU (for logging).
    ///
    /// # Errors
    /// A candle error.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let values: Vec<f32> = self.counts.iter().map(|&c| c as f32).collect();
        Ok(Tensor::from_vec(
            values,
            (self.codebooks, self.codes),
            &candle_core::Device::Cpu,
        )?)
    }

    fn per_codebook<T>(&self, f: impl Fn(&[u64]) -> T) -> Vec<T> {
        (0..self.codebooks).map(|n| f(self.histogram(n))).collect()
    }
}

/// What one forward pass tells about code usage (see [`VqOutput`](crate::VqOutput)).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageStats {
    /// This batch's assignments per code.
    pub batch: CodeUsage,
    /// Per codebook, the codes whose running count c\[n,k\] is below the dead-code threshold
    /// ([`dead_code_threshold`](crate::VectorQuantizerConfig::dead_code_threshold), or
    /// [`DEFAULT_DEAD_CODE_THRESHOLD`](crate::DEFAULT_DEAD_CODE_THRESHOLD) when it is unset),
    /// after this step's update and before revival.
    pub dead_codes: Vec<usize>,
    /// Per codebook, the codes replaced by batch vectors in this step (0 without revival or
    /// outside training).
    pub revived_codes: Vec<usize>,
}

impl UsageStats {
    /// Per codebook, [`perplexity`] of this batch's histogram.
    pub fn perplexity(&self) -> Vec<f64> {
        self.batch.perplexity()
    }

    /// Mean over codebooks of [`UsageStats::perplexity`].
    pub fn mean_perplexity(&self) -> f64 {
        let p = self.perplexity();
        p.iter().sum::<f64>() / p.len().max(1) as f64
    }

    /// Per codebook, codes chosen at least once in this batch.
    pub fn used_codes(&self) -> Vec<usize> {
        self.batch.used_codes()
    }

    /// Dead codes summed over codebooks.
    pub fn total_dead_codes(&self) -> usize {
        self.dead_codes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_of_uniform_and_degenerate_histograms() {
        for k in [1usize, 2, 7, 512] {
            let p = perplexity(&vec![3; k]);
            assert!((p - k as f64).abs() < 1e-6 * k as f64, "K = {k}: {p}");
        }
        assert_eq!(perplexity(&[0, 0]), 1.0);
        let skewed = perplexity(&[90, 10]);
        assert!(skewed > 1.0 && skewed < 2.0, "{skewed}");
    }

    #[test]
    fn add_counts_per_codebook_and_refuses_out_of_range() {
        let dev = candle_core::Device::Cpu;
        let mut usage = CodeUsage::new(2, 3);
        // (B=1, N=2, H=1, W=2)
        let idx = Tensor::new(&[[[[0u32, 1]], [[2, 2]]]], &dev).unwrap();
        usage.add(&idx).unwrap();
        assert_eq!(usage.counts(), &[1, 1, 0, 0, 0, 2]);
        assert_eq!(usage.used_codes(), vec![2, 1]);
        assert_eq!(usage.total(), 2);
        // (B=1, T=2, N=2): the codebook is the last axis.
        let seq = Tensor::new(&[[[0u32, 2], [1, 2]]], &dev).unwrap();
        usage.add(&seq).unwrap();
        assert_eq!(usage.counts(), &[2, 2, 0, 0, 0, 4]);
        let bad = Tensor::new(&[[[0u32, 3]]], &dev).unwrap();
        assert!(matches!(
            usage.add(&bad),
            Err(Error::InvalidParameter { .. })
        ));
        assert_eq!(
            usage.counts(),
            &[2, 2, 0, 0, 0, 4],
            "unchanged after an error"
        );
        let other = CodeUsage::new(2, 4);
        assert!(usage.merge(&other).is_err());
    }
}
