//! What weight compression minimises, and the steps that minimise it.
//!
//! Every method minimises the layer output error `Σ_o f_o (w_o − ŵ_o)ᵀ H (w_o − ŵ_o)`
//! ([`Quadratic`]) or an approximation of it:
//!
//! - naive PQ: `H = I` (plain k-means of the subvectors);
//! - activation-aware PQ ("And the bit goes down", Stock et al., ICLR 2020): the pooled `d×d`
//!   Gram matrix of the input slabs (for an embedding: token-frequency-weighted k-means);
//! - error-feedback PQ and GPTQ (Frantar et al., ICLR 2023; GPTVQ, van Baalen et al. 2024):
//!   the full `H` through its damped inverse Cholesky factor;
//! - codebook fine-tuning: the exact least-squares codebook for fixed codes.

mod feedback;
mod finetune;
mod pq;
mod quadratic;

pub(crate) use feedback::{feedback_pq, feedback_scalar, inverse_factor, PqCodebooks};
pub use finetune::{finetune_codebooks, MAX_DENSE_UNKNOWNS};
pub use pq::{quantize_pq, Evidence, PqOutcome, PqParams};
pub use quadratic::Quadratic;
