//! Custom candle ops with their own backward: the fast CPU paths of qcl's layers.
//!
//! Each public function checks its input (typed errors, never a panic), runs qcl's CPU kernels
//! for `f32`/`f64` tensors on the CPU, and candle's own ops on other devices and dtypes.

pub(crate) mod basic_block;
mod batch_norm;
mod conv;
#[cfg(target_arch = "x86_64")]
mod conv_implicit;
mod conv_kernels;
pub(crate) mod cpu;
mod elementwise;
mod fused;
mod loss;
mod pool;
pub(crate) mod residual_unit;

pub use batch_norm::{batch_norm_eval, batch_norm_train, BatchStats};
pub use conv::{
    conv2d, conv2d_bias_relu, conv2d_with_bias, conv_transpose2d, conv_transpose2d_with_bias,
    Conv2dParams, ConvTranspose2dParams,
};
pub use elementwise::{add_channel_bias, add_relu, relu};
pub use loss::{mse_loss, straight_through, straight_through_relu};
pub use pool::max_pool2d;
