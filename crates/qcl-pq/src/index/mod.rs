//! Approximate nearest-neighbour search over quantization codes: product quantization with SIMD
//! scans, and any [`crate::Quantizer`]'s codes scanned exactly.
//!
//! - [`PqIndex`]: every vector's codes, scanned for each query by asymmetric distance.
//! - [`IvfPqIndex`]: an inverted file of residual codes; a query scans its `nprobe` nearest
//!   lists.
//! - [`Refine`]: either, its top candidates re-ranked with the exact vectors.
//! - [`Rotated`]: either behind a learned rotation ([`opq`]).
//! - [`QuantizedIndex`]: a flat index over the codes of any [`crate::Quantizer`] (scalar, k-means,
//!   ECVQ, a VQ layer, your own), scanned exactly against their reconstructions.
//! - [`AnyIndex`]: any PQ index as one value, saved to and loaded from one safetensors file.
//! - [`VectorIndex`]: the one shape of them all (add, remove, search).
//! - [`Metric`]: squared L2, inner product or cosine.
//! - [`Neighbors`]: the answer to a batch of queries, ids and scores.
//!
//! PQ codes are stored in blocks of 64 vectors ([`blocks`]) so a SIMD kernel ([`kernels`]) adds
//! byte-quantized distance tables for a whole block at once; those sums only *bound* the
//! distances, and the vectors that may enter the answer are rescored exactly, so every PQ
//! index returns what an exact scan of its codes returns.

pub mod blocks;
mod flat;
mod ivf;
pub mod kernels;
mod lut;
mod metric;
pub mod opq;
mod persist;
mod quantized;
mod refine;
mod rotated;
mod scan;
mod search;
mod tables;
mod topk;
mod traits;

pub use flat::{PqIndex, PqIndexConfig, SearchConfig};
pub use ivf::{IvfPqConfig, IvfPqIndex};
pub use kernels::Kernel;
pub use metric::Metric;
pub use persist::{AnyIndex, INDEX_FORMAT};
pub use quantized::QuantizedIndex;
pub use refine::Refine;
pub use rotated::Rotated;
pub use scan::Scan;
pub use topk::{Neighbors, MISSING_ID};
pub use traits::VectorIndex;

pub(crate) use topk::TopK;
