//! # qcl-nn
//!
//! Layers, models, optimizers, schedules and training pieces candle lacks, with fast CPU convolutions.
//!
//! **Status: planned** (issue #3). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! Conv2d/ConvTranspose2d as im2col+GEMM custom ops with their own backward, BatchNorm2d, residual blocks,
//! ResNet-20 and the small CNNs of the specs; SGD (momentum, Nesterov, weight decay), Adam/AdamW;
//! step, multi-step, cosine and piecewise schedules; a training loop with checkpoints that resume
//! bit-identically.
