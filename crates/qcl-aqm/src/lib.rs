//! # qcl-aqm
//!
//! Online learned continual compression with adaptive quantization modules (AQM).
//!
//! **Status: planned** (issue #7). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! `QLayer` / `QStack` VQ autoencoders trained online, the adaptive replay memory held under a byte
//! budget, and the online classification loop with drift measurement.
