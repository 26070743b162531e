//! # qcl-ecvq
//!
//! Entropy-constrained vector quantization (ECVQ) of low-dimensional sources, judged against
//! the Shannon rate-distortion bound:
//!
//! - [`Vecvq`]: the "variational" ECVQ of Ballé et al., *Nonlinear Transform Coding* (IEEE
//!   J-STSP 2021): a codebook and a learned prior trained by Adam on `R + λ·D` with fresh
//!   samples every step;
//! - [`ClgEcvq`]: the Lloyd-type design algorithm of Chou, Lookabaugh and Gray (IEEE Trans.
//!   ASSP 1989) with explicit pruning, the classic baseline;
//! - [`Ecvq`]: the quantizer both produce (encoder `argmin_k r_k + λ·d(x, c_k)`, decoder,
//!   evaluation of rate, entropy, real coded size, distortion and gap to the bound, cell
//!   maps, safetensors save/load), and a `qcl_pq::Quantizer` too (fixed-length packed codes,
//!   trained by `FitQuantizer::fit` with [`ClgConfig`]);
//! - [`entropy`]: an rANS entropy coder with integer frequency tables (bit-exact decoding on
//!   any machine);
//! - [`Source`]: the seeded toy sources (2-D Gaussian, Laplace, two bananas) with exact
//!   densities and bounds.
//!
//! Rates are in bits per vector and distortions are squared errors summed over dimensions,
//! unless [`Distortion::Mse`] is asked for.
//!
//! ```
//! use qcl_ecvq::{ClgEcvq, ClgConfig, Source};
//! use qcl_tensor::Seed;
//! let train = Source::Gaussian.sample(50_000, &mut Seed::new(1).rng());
//! let model = ClgEcvq::fit(&train, 2, &ClgConfig { codes: 64, ..ClgConfig::new(8.0) })?;
//! let eval = model.quantizer.evaluate(Source::Gaussian, 100_000, Seed::new(2))?;
//! // Above the Shannon bound, by about the hexagonal-cell gap (1.37 dB) at this rate.
//! assert!(eval.gap_db.unwrap() > 0.0);
//! assert!(eval.rate_bits >= eval.entropy_bits - 1e-9);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

#![warn(missing_docs)]

mod clg;
pub mod entropy;
mod packed;
mod quantizer;
mod run;
mod source;
mod vecvq;

pub use clg::{ClgConfig, ClgEcvq, ClgInit};
pub use quantizer::{
    encoder_score, entropy_of_counts, CellMap, Distortion, Ecvq, Evaluation, ECVQ_FORMAT,
};
pub use run::{run, Method, RunConfig, RunReport};
pub use source::Source;
pub use vecvq::{
    vecvq_loss, CodebookInit, TrainingPoint, Vecvq, VecvqConfig, VecvqGradients, VecvqTraining,
};
