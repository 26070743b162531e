//! # qcl-wpq
//!
//! Weight product quantization with activation-aware k-means and distillation (And the bit goes down).
//!
//! **Status: planned** (issue #9). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! Layer layouts and per-layer configuration, the activation-aware EM on the shared nearest-code
//! kernel, layer-by-layer distillation, CentroidSGD, and a compressed-model safetensors file whose
//! size is what the report says.
