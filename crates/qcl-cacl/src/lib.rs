//! # qcl-cacl
//!
//! Compression-aware continual learning with SVD-factored layers (CACL).
//!
//! **Status: planned** (issue #8). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! `SvdConv2d` / `SvdLinear` with per-task component ranges, the Hoyer and orthogonality terms,
//! energy-threshold pruning and growth, and model-size accounting.
