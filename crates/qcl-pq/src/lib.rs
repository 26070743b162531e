//! # qcl-pq
//!
//! k-means and product quantization on one nearest-code kernel.
//!
//! **Status: planned** (issue #4). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! `KMeans` (random and k-means++ init, Lloyd with early stop, sample weights, empty-cluster repair,
//! restarts, subsampling, mini-batch) and `ProductQuantizer` (train, encode, decode, bit-packed codes,
//! asymmetric-distance search).
