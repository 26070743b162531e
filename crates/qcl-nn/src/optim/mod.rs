//! Optimizers over a [`ParamStore`](crate::ParamStore)'s trainable variables.
//!
//! Every optimizer implements [`Optimizer`]: one update per [`Optimizer::step`] from a
//! candle `GradStore`, a settable learning rate (driven by a [`crate::schedule`]), and its
//! whole state as named tensors plus scalars so that a checkpoint can restore it exactly.
//!
//! - [`Sgd`]: stochastic gradient descent with momentum, dampening, Nesterov momentum and L2
//!   weight decay, with PyTorch's `torch.optim.SGD` semantics.
//! - [`Adam`]: Adam with bias correction, and weight decay as an explicit [`WeightDecay`]
//!   choice (none, L2 as `torch.optim.Adam`, or decoupled as `torch.optim.AdamW`).
//!
//! Updates are candle tensor operations in the parameters' dtype on the parameters' device, so
//! they run anywhere and, on the CPU, give the same bits on every run.
//!
//! ```
//! use candle_core::Device;
//! use qcl_nn::optim::{Optimizer, Sgd, SgdParams};
//! use qcl_nn::{Init, ParamStore};
//!
//! let store = ParamStore::new(0);
//! let w = store.root(&Device::Cpu).param("w", 3, Init::Const(1.0))?;
//! let mut sgd = Sgd::new(store.trainable(), SgdParams { lr: 0.5, ..Default::default() })?;
//! // loss = sum(w²), so the gradient is 2w and one step gives w - 0.5·2w = 0.
//! sgd.backward_step(&w.sqr()?.sum_all()?)?;
//! assert_eq!(w.to_vec1::<f32>()?, vec![0.0, 0.0, 0.0]);
//! assert_eq!(sgd.steps_taken(), 1);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use qcl_tensor::{Error, Result};

mod adam;
mod sgd;

pub use adam::{Adam, AdamParams, WeightDecay};
pub use sgd::{Sgd, SgdParams};

/// The complete state of an optimizer, for checkpoints.
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    /// Which optimizer wrote it (e.g. `"sgd"`, `"adam"`); loading into another kind fails.
    pub kind: String,
    /// Scalars: step count, learning rate, hyperparameters.
    pub scalars: BTreeMap<String, f64>,
    /// Per-parameter buffers, named `<buffer>.<parameter name>` (e.g. `momentum.fc.weight`).
    pub tensors: BTreeMap<String, Tensor>,
}

impl OptimizerState {
    /// Checks that the state was written by an optimizer of `kind`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming both kinds.
    pub fn require_kind(&self, kind: &str) -> Result<()> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(Error::invalid_parameter(
                "optimizer state",
                format!(
                    "written by a `{}` optimizer, cannot be loaded into a `{kind}` optimizer",
                    self.kind
                ),
            ))
        }
    }

    /// The scalar `name`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when it is missing.
    pub fn scalar(&self, name: &str) -> Result<f64> {
        self.scalars.get(name).copied().ok_or_else(|| {
            Error::invalid_parameter(
                "optimizer state",
                format!("the `{}` state has no scalar `{name}`", self.kind),
            )
        })
    }

    /// The scalar `name` as a step count (a non-negative integer).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when it is missing or not a non-negative integer.
    pub fn count(&self, name: &str) -> Result<u64> {
        let value = self.scalar(name)?;
        if value >= 0.0 && value.fract() == 0.0 && value <= 2f64.powi(53) {
            Ok(value as u64)
        } else {
            Err(Error::invalid_parameter(
                "optimizer state",
                format!("scalar `{name}` = {value} is not a step count"),
            ))
        }
    }
}

/// A first-order optimizer.
pub trait Optimizer {
    /// Apply one update from `grads`; parameters without a gradient are left unchanged (and
    /// their state is not advanced).
    ///
    /// # Errors
    /// A candle error from the update arithmetic.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// The learning rate the next step will use.
    fn learning_rate(&self) -> f64;

    /// Set the learning rate of the next steps (schedules call this).
    fn set_learning_rate(&mut self, lr: f64);

    /// Number of steps taken so far.
    fn steps_taken(&self) -> u64;

    /// The whole state, for a checkpoint.
    ///
    /// # Errors
    /// A candle error when copying buffers.
    fn state(&self) -> Result<OptimizerState>;

    /// Restore a state written by [`Optimizer::state`] of the same kind over the same
    /// parameters.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for another kind or unknown names,
    /// [`qcl_tensor::Error::ShapeMismatch`] for a buffer of the wrong shape.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;

    /// Back-propagate `loss` and apply one [`step`](Optimizer::step) with its gradients.
    ///
    /// # Errors
    /// A candle error from the backward pass or the update.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
}

/// Checks a hyperparameter that must be finite and `>= 0`.
pub(crate) fn check_non_negative(name: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid_parameter(
            name,
            format!("must be finite and >= 0, got {value}"),
        ))
    }
}

/// The variables an optimizer updates, by name, in the order given.
#[derive(Debug, Clone)]
pub(crate) struct NamedVars {
    entries: Vec<(String, Var)>,
}

impl NamedVars {
    /// Checks for empty or repeated names and non-float variables.
    pub(crate) fn new(entries: Vec<(String, Var)>) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for (name, var) in &entries {
            if name.is_empty() || !seen.insert(name.as_str()) {
                return Err(Error::invalid_parameter(
                    "params",
                    format!("parameter names must be unique and non-empty; `{name}` is not"),
                ));
            }
            if !var.dtype().is_float() {
                return Err(Error::invalid_parameter(
                    "params",
                    format!(
                        "parameter `{name}` has dtype {:?}; only float tensors can be trained",
                        var.dtype()
                    ),
                ));
            }
        }
        Ok(Self { entries })
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(String, Var)> {
        self.entries.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|(n, _)| n == name)
    }

    /// The gradient of every parameter that has one, checked to have the parameter's shape,
    /// detached; `None` for parameters without a gradient.
    pub(crate) fn gradients(&self, grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
        self.entries
            .iter()
            .map(|(name, var)| match grads.get(var.as_tensor()) {
                None => Ok(None),
                Some(grad) if grad.dims() == var.dims() => Ok(Some(grad.detach())),
                Some(grad) => Err(Error::ShapeMismatch {
                    context: format!("gradient of `{name}`"),
                    expected: format!("{:?}", var.dims()),
                    actual: grad.dims().to_vec(),
                }),
            })
            .collect()
    }

    /// Splits a state tensor name `<buffer>.<parameter>` and checks that the buffer is one of
    /// `buffers`, the parameter exists and the tensor has its shape. Returns the buffer name,
    /// the parameter index and the tensor on the parameter's device and dtype.
    pub(crate) fn resolve_state_tensor<'s>(
        &self,
        kind: &str,
        buffers: &[&str],
        key: &'s str,
        tensor: &Tensor,
    ) -> Result<(&'s str, usize, Tensor)> {
        let (buffer, param) = key.split_once('.').unwrap_or((key, ""));
        if !buffers.contains(&buffer) {
            return Err(Error::invalid_parameter(
                "optimizer state",
                format!("`{key}` is not a `{kind}` buffer (expected one of {buffers:?})"),
            ));
        }
        let index = self.index_of(param).ok_or_else(|| {
            Error::invalid_parameter(
                "optimizer state",
                format!(
                    "`{key}` belongs to parameter `{param}`, which this optimizer does not hold"
                ),
            )
        })?;
        let var = &self.entries[index].1;
        if tensor.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                context: format!("optimizer state `{key}`"),
                expected: format!("{:?}", var.dims()),
                actual: tensor.dims().to_vec(),
            });
        }
        let tensor = tensor
            .to_dtype(var.dtype())?
            .to_device(var.device())?
            .detach();
        Ok((buffer, index, tensor))
    }
}
