//! A guard on the least-squares codebook fine-tune.
//!
//! The fine-tune minimises `Σ_t ‖(W − Ŵ)x_t‖²` over the calibration tokens. When a few tokens
//! carry massive activations that sum is theirs, and the least-squares codebook can lower it
//! with codewords far outside the weights' range that cancel along the massive direction while
//! the output of every other token gets worse. On all-MiniLM-L6-v2 (error-feedback PQ, d = 2,
//! K = 64) the fine-tune lowered the objective of `encoder.layer.0.output.dense` from 0.88 to
//! 0.36, also on held-out tokens, while the median token's relative error rose from 0.10 to 7.9
//! and the model collapsed (mean embedding cosine 0.45). A held-out objective alone does not
//! see this; a token-wise relative error does.
//!
//! [`FinetuneGuard::HeldOut`] therefore fits the codebook on every calibration row except a
//! held-out part of the recorded row sample, and moves from the current codebook `c₀` toward
//! the least-squares one `c*` by the largest step `α ∈ {1, ½, ¼, ⅛}` for which, on the held-out
//! rows, both the output error `Σ_t ‖(W − Ŵ)x_t‖²` falls and the mean token-wise relative
//! error `mean_t ‖(W − Ŵ)x_t‖² / ‖W x_t‖²` does not rise; if none passes, `c₀` stays.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::calibration::InputStats;

/// Steps toward the least-squares codebook that the guard tries, largest first.
pub const GUARD_STEPS: [f64; 4] = [1.0, 0.5, 0.25, 0.125];

/// How far the least-squares codebook fine-tune is trusted (see the module documentation of
/// [`crate::objective`]).
///
/// ```
/// use qcl_wpq::FinetuneGuard;
/// assert_eq!(FinetuneGuard::default(), FinetuneGuard::HeldOut);
/// assert_eq!(serde_json::to_string(&FinetuneGuard::Off)?, r#""off""#);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneGuard {
    /// Take the least-squares codebook as it is (it never raises the calibration objective,
    /// but can collapse a model whose inputs have massive-activation tokens).
    Off,
    /// Fit on the calibration rows outside a held-out part of the row sample (at most half the
    /// rows), and step toward the fit only as far as the held-out rows confirm it: their output
    /// error must fall and their mean token-wise relative error must not rise (steps
    /// [`GUARD_STEPS`]). Needs a row sample ([`crate::Calibration::sample_rows`]); applies to
    /// layers with recorded float inputs and a non-naive objective.
    #[default]
    HeldOut,
}

/// The held-out rows' view of a candidate weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Score {
    /// `Σ_t ‖(W − Ŵ)x_t‖²`.
    pub total: f64,
    /// `mean_t ‖(W − Ŵ)x_t‖² / ‖W x_t‖²` over the rows with a non-zero output.
    pub token_mean: f64,
}

impl Score {
    /// Whether `self` is an acceptable move from `start`.
    pub fn accepts(&self, start: &Score) -> bool {
        self.total < start.total && self.token_mean <= start.token_mean
    }
}

/// Held-out rows `X` (`[n, D]`, the weight's matrix order) and their reference outputs.
pub(crate) struct HeldOut {
    x: Mat<f64>,
    reference: Mat<f64>,
    norms: Vec<f64>,
}

impl HeldOut {
    /// For rows `x` (`[n, D]`) and the reference weight's matrix view `w` (`[O, D]`).
    pub fn new(x: &[f32], width: usize, w: &[f32]) -> Self {
        let n = x.len() / width;
        let x = Mat::from_fn(n, width, |t, i| f64::from(x[t * width + i]));
        let reference = outputs(&x, w);
        let norms = (0..n)
            .map(|t| {
                (0..reference.ncols())
                    .map(|o| reference[(t, o)].powi(2))
                    .sum()
            })
            .collect();
        HeldOut {
            x,
            reference,
            norms,
        }
    }

    /// The held-out rows' errors for the matrix view `approx` (`[O, D]`).
    pub fn score(&self, approx: &[f32]) -> Score {
        let y = outputs(&self.x, approx);
        let (mut total, mut rel, mut counted) = (0.0, 0.0, 0usize);
        for (t, &norm) in self.norms.iter().enumerate() {
            let e: f64 = (0..y.ncols())
                .map(|o| (self.reference[(t, o)] - y[(t, o)]).powi(2))
                .sum();
            total += e;
            if norm > 0.0 {
                rel += e / norm;
                counted += 1;
            }
        }
        Score {
            total,
            token_mean: rel / counted.max(1) as f64,
        }
    }
}

/// `X Wᵀ` for the matrix view `w` (`[O, D]`).
fn outputs(x: &Mat<f64>, w: &[f32]) -> Mat<f64> {
    let width = x.ncols();
    let rows = w.len() / width;
    let w = Mat::from_fn(rows, width, |o, i| f64::from(w[o * width + i]));
    let mut y = Mat::<f64>::zeros(x.nrows(), rows);
    matmul(&mut y, Accum::Replace, x, w.transpose(), 1.0, Par::Seq);
    y
}

/// Splits recorded inputs into the statistics to fit on and the held-out rows (natural input
/// order): the first `min(n, ⌊rows/2⌋)` rows of the sample (a uniform draw, in key order) are
/// held out and their `xᵀx` taken off `H`.
///
/// # Errors
/// [`Error::InvalidParameter`] when no row can be held out (no sample was recorded).
pub(crate) fn hold_out(stats: &InputStats) -> Result<(InputStats, Vec<f32>)> {
    let width = stats.width;
    let held = stats
        .sample_len()
        .min(usize::try_from(stats.rows / 2).unwrap_or(usize::MAX));
    if held == 0 {
        return Err(Error::invalid_parameter(
            "guard",
            "the held-out fine-tune guard needs a sample of the recorded rows (record through \
             Calibration::record with sample_rows > 0, at least two rows), or guard = off",
        ));
    }
    let rows = stats.sample[..held * width].to_vec();
    let mut fit = InputStats {
        width,
        gram: stats.gram.clone(),
        rows: stats.rows - held as u64,
        conv: stats.conv,
        sample: Vec::new(),
    };
    for x in rows.chunks_exact(width) {
        for i in 0..width {
            let xi = f64::from(x[i]);
            if xi == 0.0 {
                continue;
            }
            let row = &mut fit.gram[i * width..(i + 1) * width];
            row.iter_mut()
                .zip(x)
                .for_each(|(g, &xj)| *g -= xi * f64::from(xj));
        }
    }
    Ok((fit, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stats(rows: &[Vec<f32>], sample: usize) -> InputStats {
        let width = rows[0].len();
        let mut gram = vec![0f64; width * width];
        for x in rows {
            for i in 0..width {
                for j in 0..width {
                    gram[i * width + j] += f64::from(x[i]) * f64::from(x[j]);
                }
            }
        }
        InputStats {
            width,
            gram,
            rows: rows.len() as u64,
            conv: None,
            sample: rows[..sample].iter().flatten().copied().collect(),
        }
    }

    proptest! {
        /// Holding rows out takes exactly their `xᵀx` off `H` and their count off the rows,
        /// and never holds out more than half.
        #[test]
        fn hold_out_removes_exactly_the_held_rows(
            rows in prop::collection::vec(prop::collection::vec(-3.0f32..3.0, 3), 2..12),
            sample in 0usize..12,
        ) {
            let sample = sample.min(rows.len());
            let all = stats(&rows, sample);
            match hold_out(&all) {
                Ok((fit, held)) => {
                    let n = held.len() / 3;
                    prop_assert!(n >= 1 && n <= rows.len() / 2 && n <= sample);
                    prop_assert_eq!(fit.rows, rows.len() as u64 - n as u64);
                    let expected = stats(&rows[n..], 0);
                    for (a, b) in fit.gram.iter().zip(&expected.gram) {
                        prop_assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{} vs {}", a, b);
                    }
                }
                Err(e) => {
                    let invalid = matches!(e, Error::InvalidParameter { .. });
                    prop_assert!(invalid, "{:?}", e);
                    prop_assert!(sample == 0 || rows.len() < 2);
                }
            }
        }
    }

    #[test]
    fn scores_are_zero_for_the_reference_and_grow_with_the_error() {
        let x = [1.0f32, 0.0, 0.0, 1.0, 2.0, 2.0];
        let w = [1.0f32, 2.0, 3.0, 4.0];
        let held = HeldOut::new(&x, 2, &w);
        let exact = held.score(&w);
        assert_eq!((exact.total, exact.token_mean), (0.0, 0.0));
        let off = held.score(&[1.0, 2.0, 3.0, 5.0]);
        let further = held.score(&[1.0, 2.0, 3.0, 6.0]);
        assert!(off.total > 0.0 && further.total > off.total);
        assert!(off.accepts(&further) && !further.accepts(&off) && !off.accepts(&off));
    }
}
