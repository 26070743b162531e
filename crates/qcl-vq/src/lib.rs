//! # qcl-vq
//!
//! A trainable vector-quantization layer for candle.
//!
//! **Status: planned** (issue #5). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! `VectorQuantizer` with several codebooks, EMA / gradient / frozen codebook updates, commitment
//! loss, straight-through output, k-means initialisation, dead-code revival, usage telemetry,
//! bit-packed indices, and residual VQ.
