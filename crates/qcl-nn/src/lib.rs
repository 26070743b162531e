//! # qcl-nn
//!
//! The training substrate of qcl: what candle lacks to train convolutional networks quickly on
//! a CPU.
//!
//! - [`ops`]: convolution, transposed convolution, BatchNorm and ReLU as candle custom ops with
//!   their own backward (on CPU, implicit GEMM for `f32` convolutions with AVX-512, strided
//!   ones through a polyphase split, and im2col/col2im + GEMM otherwise; candle's kernels
//!   elsewhere).
//! - [`layers`]: `Conv2d`, `ConvTranspose2d`, `Linear`, `BatchNorm2d`, residual blocks.
//! - [`models`]: ResNet-20 for any input size and channel count, and the small CNNs of the methods' experiments.
//! - [`optim`] and [`schedule`]: SGD (momentum, Nesterov, weight decay), Adam/AdamW, and
//!   step / multi-step / cosine / piecewise learning-rate schedules.
//! - [`train`]: a training loop with progress, evaluation, early stop and checkpoints that
//!   resume bit-identically.
//! - [`ParamStore`]: named, seeded parameters and buffers.

#![warn(missing_docs)]

pub mod bench;
pub mod layers;
pub mod loss;
pub mod models;
pub mod ops;
pub mod optim;
mod params;
pub mod schedule;
pub mod train;

pub use params::{Init, ParamKind, ParamPath, ParamStore, PARAMS_FORMAT};
