//! Layers built on [`crate::ops`]: each owns its parameters (created through a
//! [`ParamPath`](crate::ParamPath)) and has a `forward`.
//!
//! Layers without a train/eval difference implement [`Module`]; the others (BatchNorm and
//! the models containing it) implement [`ModuleT`], whose `train` flag selects batch
//! statistics (and updates running estimates) or running statistics.

mod conv;
mod linear;
mod norm;
mod residual;

pub use conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
pub use linear::Linear;
pub use norm::{BatchNorm2d, BatchNormConfig};
pub use residual::{residual_relu, BasicBlock, Shortcut};

use candle_core::Tensor;
use qcl_tensor::Result;

/// A layer or model with one behaviour.
pub trait Module {
    /// Apply the layer.
    ///
    /// # Errors
    /// Typed errors for inputs of the wrong shape; candle errors from the kernels.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// A layer or model that behaves differently in training (`train = true`: batch statistics,
/// running estimates updated) and evaluation.
pub trait ModuleT {
    /// Apply the layer in training or evaluation mode.
    ///
    /// # Errors
    /// Typed errors for inputs of the wrong shape; candle errors from the kernels.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
}

impl<M: Module> ModuleT for M {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.forward(x)
    }
}
