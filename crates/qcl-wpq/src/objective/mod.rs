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
//! - codebook fine-tuning: the exact least-squares codebook for fixed codes, guarded by
//!   held-out rows ([`FinetuneGuard`]) because a few massive-activation tokens can make the
//!   least-squares optimum useless for every other token.
//!
//! Any of them can keep a few outlier input columns exactly ([`OutlierColumns`]): those of
//! massive activations, whose error would dominate the output error.

mod feedback;
mod finetune;
mod guard;
mod layer;
mod outliers;
mod pq;
mod quadratic;

pub(crate) use feedback::{feedback_pq, feedback_scalar, inverse_factor, PqCodebooks};
pub use finetune::{finetune_codebooks, MAX_DENSE_UNKNOWNS};
pub use guard::{FinetuneGuard, GUARD_STEPS};
pub use outliers::OutlierColumns;
pub(crate) use outliers::{ColumnSplit, Compensation};
pub use pq::{quantize_pq, Evidence, PqConfig, PqOutcome, MAX_CENTROIDS, MAX_ROUNDS};
pub use quadratic::Quadratic;
