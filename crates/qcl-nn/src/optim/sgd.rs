//! Stochastic gradient descent with PyTorch's semantics.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use qcl_tensor::{Error, Result};

use super::{
    check_non_negative, impl_candle_optimizer, shared_optimizer_methods, IntoNamedVars, NamedVars,
    Optimizer, OptimizerState,
};

/// Hyperparameters of [`Sgd`], as in `torch.optim.SGD`.
///
/// The default is plain SGD with `lr = 1e-3` (PyTorch's default) and everything else off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate `η ≥ 0`.
    pub lr: f64,
    /// Momentum factor `μ ≥ 0` (0 turns momentum off).
    pub momentum: f64,
    /// Dampening `τ` of the momentum: the gradient enters the buffer scaled by `1 − τ`.
    pub dampening: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening = 0`).
    pub nesterov: bool,
    /// L2 penalty `λ ≥ 0`, added to the gradient as `λ·p`.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl SgdConfig {
    /// Checks the hyperparameters.
    ///
    /// ```
    /// use qcl_nn::optim::SgdConfig;
    /// assert!(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..Default::default() }.validate().is_ok());
    /// assert!(SgdConfig { lr: -0.1, ..Default::default() }.validate().is_err());
    /// assert!(SgdConfig { nesterov: true, ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite `lr`, `momentum` or
    /// `weight_decay`, a non-finite `dampening`, or Nesterov without momentum or with
    /// dampening.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("momentum", self.momentum)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        if !self.dampening.is_finite() {
            return Err(Error::invalid_parameter(
                "dampening",
                format!("must be finite, got {}", self.dampening),
            ));
        }
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid_parameter(
                "nesterov",
                format!(
                    "Nesterov momentum needs momentum > 0 and dampening = 0, got momentum {} and dampening {}",
                    self.momentum, self.dampening
                ),
            ));
        }
        Ok(())
    }

    /// One update of parameter `var` by its gradient `g`, advancing its momentum `buffer` (none
    /// before its first update, and always none without momentum).
    fn update(&self, var: &Var, mut g: Tensor, buffer: &mut Option<Tensor>) -> Result<()> {
        let p = var.as_tensor().detach();
        if self.weight_decay != 0.0 {
            g = (g + p.affine(self.weight_decay, 0.0)?)?;
        }
        if self.momentum != 0.0 {
            let b = match buffer.take() {
                None => g.clone(),
                Some(b) => {
                    (b.affine(self.momentum, 0.0)? + g.affine(1.0 - self.dampening, 0.0)?)?
                }
            };
            g = if self.nesterov {
                (g + b.affine(self.momentum, 0.0)?)?
            } else {
                b.clone()
            };
            *buffer = Some(b);
        }
        var.set(&(p - g.affine(self.lr, 0.0)?)?)?;
        Ok(())
    }
}

/// Stochastic gradient descent, exactly as `torch.optim.SGD`.
///
/// For each parameter `p` with gradient `∇`, at its `t`-th update:
///
/// ```text
/// g ← ∇ + λ·p                                   (weight decay λ)
/// if μ ≠ 0:
///     b ← g                   if t = 1
///     b ← μ·b + (1 − τ)·g     otherwise         (momentum μ, dampening τ)
///     g ← g + μ·b   if Nesterov,   else   g ← b
/// p ← p − η·g                                   (learning rate η)
/// ```
///
/// ```
/// use candle_core::Device;
/// use qcl_nn::optim::{Optimizer, Sgd, SgdConfig};
/// use qcl_nn::{Init, ParamStore};
///
/// let store = ParamStore::new(0);
/// let x = store.root(&Device::Cpu).param("x", 1, Init::Const(1.0))?;
/// let params = SgdConfig { lr: 0.1, momentum: 0.5, ..Default::default() };
/// let mut sgd = Sgd::new(store.trainable(), params)?;
/// for _ in 0..2 {
///     sgd.backward_step(&x.sum_all()?)?; // gradient 1
/// }
/// // Buffers 1 then 0.5·1 + 1 = 1.5, so x = 1 − 0.1·1 − 0.1·1.5 = 0.75.
/// assert!((x.to_vec1::<f32>()?[0] - 0.75).abs() < 1e-6);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Sgd {
    vars: NamedVars,
    params: SgdConfig,
    momentum_buffers: Vec<Option<Tensor>>,
    steps: u64,
}

const KIND: &str = "sgd";
const MOMENTUM: &str = "momentum";

impl Sgd {
    /// An optimizer over `vars`: [`ParamStore::trainable`](crate::ParamStore::trainable), a
    /// `&VarMap`, or `varmap.all_vars()` (see [`IntoNamedVars`]).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for bad hyperparameters (see [`SgdConfig::validate`]),
    /// repeated names or non-float variables.
    pub fn new(vars: impl IntoNamedVars, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let vars = NamedVars::new(vars.into_named_vars())?;
        Ok(Sgd {
            momentum_buffers: vec![None; vars.len()],
            vars,
            params: config,
            steps: 0,
        })
    }

    /// An optimizer over the float variables of a candle-nn `VarMap` (those it holds now),
    /// sorted by name so that its state is the same from run to run.
    ///
    /// # Errors
    /// As [`Sgd::new`].
    pub fn from_var_map(vars: &VarMap, config: SgdConfig) -> Result<Self> {
        Self::new(vars, config)
    }

    /// The hyperparameters (with the current learning rate).
    pub fn hyperparameters(&self) -> SgdConfig {
        self.params
    }
}

impl Optimizer for Sgd {
    shared_optimizer_methods!(momentum_buffers);

    /// Scalars `steps`, `lr`, `momentum`, `dampening`, `nesterov` (0 or 1), `weight_decay`;
    /// tensors `momentum.<parameter>` for every parameter that has a momentum buffer.
    fn state(&self) -> Result<OptimizerState> {
        let p = &self.params;
        let scalars = BTreeMap::from([
            ("steps".to_string(), self.steps as f64),
            ("lr".to_string(), p.lr),
            ("momentum".to_string(), p.momentum),
            ("dampening".to_string(), p.dampening),
            ("nesterov".to_string(), f64::from(u8::from(p.nesterov))),
            ("weight_decay".to_string(), p.weight_decay),
        ]);
        Ok(self
            .vars
            .optimizer_state(KIND, scalars, &self.momentum_buffers, |b| {
                [(MOMENTUM, b.clone())]
            }))
    }

    /// Restores buffers, step count and hyperparameters (like PyTorch's `load_state_dict`,
    /// the saved hyperparameters replace those given to [`Sgd::new`]). Nothing changes unless
    /// the whole state is valid.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.require_kind(KIND)?;
        let nesterov = state.scalar("nesterov")?;
        let params = SgdConfig {
            lr: state.scalar("lr")?,
            momentum: state.scalar("momentum")?,
            dampening: state.scalar("dampening")?,
            nesterov: nesterov != 0.0,
            weight_decay: state.scalar("weight_decay")?,
        };
        params.validate()?;
        let steps = state.count("steps")?;
        let mut buffers = vec![None; self.vars.len()];
        for (key, tensor) in &state.tensors {
            let (_, index, tensor) =
                self.vars
                    .resolve_state_tensor(KIND, &[MOMENTUM], key, tensor)?;
            buffers[index] = Some(tensor);
        }
        self.params = params;
        self.steps = steps;
        self.momentum_buffers = buffers;
        Ok(())
    }
}

impl_candle_optimizer!(Sgd, SgdConfig);
