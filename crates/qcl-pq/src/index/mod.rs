//! Approximate nearest-neighbour search over product-quantization codes.

pub mod blocks;
pub mod kernels;
