//! Optimizers over named variables: a [`ParamStore`](crate::ParamStore)'s trainable
//! parameters or a candle-nn `VarMap`'s variables.
//!
//! Every optimizer implements candle-nn's [`candle_nn::Optimizer`] (so `backward_step`, and
//! any code generic over candle-nn optimizers, work with it) and qcl's [`Optimizer`]: one
//! update per [`Optimizer::step`] from a candle `GradStore`, a settable learning rate (driven
//! by a [`crate::schedule`]), and its whole state as named tensors plus scalars so that a
//! checkpoint can restore it exactly. Constructors take anything [`IntoNamedVars`]: named
//! variables (`store.trainable()`), a `&VarMap` (its float variables, sorted by name), or bare
//! `Var`s (`varmap.all_vars()`, named by position).
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
//! use qcl_nn::optim::{Optimizer, Sgd, SgdConfig};
//! use qcl_nn::{Init, ParamStore};
//!
//! let store = ParamStore::new(0);
//! let w = store.root(&Device::Cpu).param("w", 3, Init::Const(1.0))?;
//! let mut sgd = Sgd::new(store.trainable(), SgdConfig { lr: 0.5, ..Default::default() })?;
//! // loss = sum(w²), so the gradient is 2w and one step gives w - 0.5·2w = 0.
//! sgd.backward_step(&w.sqr()?.sum_all()?)?;
//! assert_eq!(w.to_vec1::<f32>()?, vec![0.0, 0.0, 0.0]);
//! assert_eq!(sgd.steps_taken(), 1);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```
//!
//! The same optimizer stepping a candle-nn model's `VarMap`:
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use qcl_nn::optim::{Adam, AdamConfig};
//!
//! let varmap = VarMap::new();
//! let fc = candle_nn::linear(3, 1, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! let mut adam = Adam::from_var_map(&varmap, AdamConfig { lr: 0.01, ..Default::default() })?;
//! let x = Tensor::ones((4, 3), DType::F32, &Device::Cpu)?;
//! let before = fc.forward(&x)?.sum_all()?.to_scalar::<f32>()?;
//! adam.backward_step(&fc.forward(&x)?.sum_all()?)?; // candle-nn's trait method
//! assert!(fc.forward(&x)?.sum_all()?.to_scalar::<f32>()? < before);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use qcl_tensor::{Error, Result};

mod adam;
mod sgd;

pub use adam::{Adam, AdamConfig, WeightDecay};
pub use sgd::{Sgd, SgdConfig};

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

/// A first-order optimizer whose state can be saved and restored.
///
/// Kept beside [`candle_nn::Optimizer`] (which qcl's optimizers implement too) because
/// candle-nn's trait lacks two things qcl's training needs: the whole optimizer state
/// ([`state`](Optimizer::state)/[`load_state`](Optimizer::load_state)), so that a resumed run
/// ends bit-identical to an uninterrupted one, and dynamic dispatch (candle-nn's trait is
/// `Sized`; [`crate::train::TrainLoop`] holds a `&mut dyn Optimizer`). In scope together, the
/// two traits' `step` and learning-rate methods need a path (`Optimizer::step(&mut opt, &g)`).
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

/// What an optimizer can be built over: named variables.
///
/// - `Vec<(String, Var)>`: as given (e.g. [`ParamStore::trainable`](crate::ParamStore::trainable));
///   names must be unique and every variable a float.
/// - `&VarMap`: the map's float variables, sorted by name, so state names (and with them
///   checkpoints) do not depend on the map's hash order.
/// - `Vec<Var>`: the float variables (as candle-nn's optimizers filter them), named by their
///   position `"0"`, `"1"`, …; updates do not depend on the order, but saved states do, so
///   prefer `&VarMap` when the state is saved (`VarMap::all_vars` has no fixed order).
pub trait IntoNamedVars {
    /// The variables with their names.
    fn into_named_vars(self) -> Vec<(String, Var)>;
}

impl IntoNamedVars for Vec<(String, Var)> {
    fn into_named_vars(self) -> Vec<(String, Var)> {
        self
    }
}

impl IntoNamedVars for &VarMap {
    fn into_named_vars(self) -> Vec<(String, Var)> {
        let data = self.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        vars
    }
}

impl IntoNamedVars for Vec<Var> {
    fn into_named_vars(self) -> Vec<(String, Var)> {
        self.into_iter()
            .filter(|v| v.dtype().is_float())
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect()
    }
}

/// Implements [`candle_nn::Optimizer`] for a qcl optimizer by delegating to its inherent
/// constructor and to qcl's [`Optimizer`] (errors travel as candle errors and come back typed).
macro_rules! impl_candle_optimizer {
    ($ty:ty, $params:ty) => {
        impl candle_nn::Optimizer for $ty {
            type Config = $params;

            fn new(vars: Vec<Var>, config: $params) -> candle_core::Result<Self> {
                Ok(<$ty>::new(vars, config)?)
            }

            fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
                Ok(<$ty as crate::optim::Optimizer>::step(self, grads)?)
            }

            fn learning_rate(&self) -> f64 {
                <$ty as crate::optim::Optimizer>::learning_rate(self)
            }

            fn set_learning_rate(&mut self, lr: f64) {
                <$ty as crate::optim::Optimizer>::set_learning_rate(self, lr)
            }
        }
    };
}
pub(crate) use impl_candle_optimizer;

/// The [`Optimizer`] methods every qcl optimizer shares, expanded inside its `impl Optimizer`:
/// a step applies the hyperparameters' own `update` rule to each parameter that has a gradient,
/// with that parameter's state in the field `$slots`, then counts itself in `steps`; the
/// learning rate is `params.lr`.
macro_rules! shared_optimizer_methods {
    ($slots:ident) => {
        fn step(&mut self, grads: &candle_core::backprop::GradStore) -> qcl_tensor::Result<()> {
            let config = self.params;
            self.vars
                .update_each(grads, &mut self.$slots, |var, g, slot| {
                    config.update(var, g, slot)
                })?;
            self.steps += 1;
            Ok(())
        }

        fn learning_rate(&self) -> f64 {
            self.params.lr
        }

        fn set_learning_rate(&mut self, lr: f64) {
            self.params.lr = lr;
        }

        fn steps_taken(&self) -> u64 {
            self.steps
        }
    };
}
pub(crate) use shared_optimizer_methods;

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

    /// Calls `update(variable, gradient, slot)` for every parameter that has a gradient (checked
    /// and detached as [`NamedVars::gradients`] gives it), in order, with the parameter's own
    /// state slot of `slots`; parameters without a gradient keep their slot untouched.
    pub(crate) fn update_each<S>(
        &self,
        grads: &GradStore,
        slots: &mut [Option<S>],
        mut update: impl FnMut(&Var, Tensor, &mut Option<S>) -> Result<()>,
    ) -> Result<()> {
        let gradients = self.gradients(grads)?;
        for (((_, var), grad), slot) in self.entries.iter().zip(gradients).zip(slots) {
            if let Some(grad) = grad {
                update(var, grad, slot)?;
            }
        }
        Ok(())
    }

    /// The state of an optimizer of `kind`: `scalars`, and for every parameter whose slot of
    /// `slots` holds state the tensors `buffers(state)`, named `<buffer>.<parameter>` (the
    /// names [`NamedVars::resolve_state_tensor`] reads back).
    pub(crate) fn optimizer_state<S, const N: usize>(
        &self,
        kind: &str,
        scalars: BTreeMap<String, f64>,
        slots: &[Option<S>],
        buffers: impl Fn(&S) -> [(&str, Tensor); N],
    ) -> OptimizerState {
        let mut tensors = BTreeMap::new();
        for ((name, _), slot) in self.entries.iter().zip(slots) {
            if let Some(state) = slot {
                for (buffer, tensor) in buffers(state) {
                    tensors.insert(format!("{buffer}.{name}"), tensor);
                }
            }
        }
        OptimizerState {
            kind: kind.to_string(),
            scalars,
            tensors,
        }
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
