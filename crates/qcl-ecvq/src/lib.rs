//! # qcl-ecvq
//!
//! Entropy-constrained vector quantization: gradient-trained VECVQ and classic Chou-Lookabaugh-Gray ECVQ.
//!
//! **Status: planned** (issue #5). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! Seeded sources with exact densities, `Vecvq` (codebook + logits trained by Adam on rate +
//! lambda x distortion), `ClgEcvq` (the Lloyd-style algorithm with pruning), and evaluation against the
//! Shannon rate-distortion bound.
