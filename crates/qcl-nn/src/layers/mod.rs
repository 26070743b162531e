//! Layers built on [`crate::ops`]: each owns its parameters (created through a
//! [`ParamPath`](crate::ParamPath)) and has a `forward`.
//!
//! The layers are candle-nn citizens: those without a train/eval difference implement
//! candle's [`Module`]; the others (BatchNorm and the models containing it) implement
//! [`ModuleT`], whose `train` flag selects batch statistics (and updates running estimates) or
//! running statistics. Both traits are candle's own, re-exported here; their `candle_core`
//! errors carry qcl's typed errors, which `?` in a function returning [`qcl_tensor::Result`]
//! turns back into the same variant. [`WithMode`] fixes the mode of a [`ModuleT`] so that it
//! fits where only a [`Module`] does (`candle_nn::seq()`).

mod conv;
mod linear;
mod norm;
mod residual;

pub use conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
pub use linear::Linear;
pub use norm::{BatchNorm2d, BatchNormConfig};
pub use residual::{residual_relu, BasicBlock, Shortcut};

pub use candle_nn::{Module, ModuleT};

use candle_core::Tensor;

/// A [`ModuleT`] with its train/eval mode fixed, as a [`Module`]: what `candle_nn::seq()`
/// (which takes `Module`s only) needs.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::{BatchNorm2d, BatchNormConfig, Module, WithMode};
/// let store = qcl_nn::ParamStore::new(0);
/// let bn = BatchNorm2d::new(&store.root(&Device::Cpu).pp("bn"), 3, BatchNormConfig::default())?;
/// let net = candle_nn::seq().add(WithMode::train(bn.clone())).add(candle_nn::Activation::Relu);
/// let y = net.forward(&Tensor::randn(0f32, 1.0, (4, 3, 2, 2), &Device::Cpu)?)?;
/// assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| *v >= 0.0));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct WithMode<M> {
    module: M,
    train: bool,
}

impl<M> WithMode<M> {
    /// `module` in training mode (`forward_t(x, true)`).
    pub fn train(module: M) -> Self {
        WithMode {
            module,
            train: true,
        }
    }

    /// `module` in evaluation mode (`forward_t(x, false)`).
    pub fn eval(module: M) -> Self {
        WithMode {
            module,
            train: false,
        }
    }

    /// The wrapped module.
    pub fn inner(&self) -> &M {
        &self.module
    }

    /// Whether it runs in training mode.
    pub fn is_train(&self) -> bool {
        self.train
    }
}

impl<M: ModuleT> Module for WithMode<M> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.module.forward_t(x, self.train)
    }
}
