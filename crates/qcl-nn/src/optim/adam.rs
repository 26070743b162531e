//! Adam and AdamW with PyTorch's semantics.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use qcl_tensor::{Error, Result};

use super::{
    check_non_negative, impl_candle_optimizer, shared_optimizer_methods, IntoNamedVars, NamedVars,
    Optimizer, OptimizerState,
};

/// How [`Adam`] decays weights. Always an explicit choice: the default is [`WeightDecay::None`].
///
/// (candle-nn's `AdamW` silently defaults to a decoupled decay of 0.01, which has surprised
/// users who thought they were running plain Adam; here no decay happens unless asked for.)
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum WeightDecay {
    /// No weight decay.
    #[default]
    None,
    /// L2 penalty `λ`, added to the gradient (`g ← ∇ + λ·p`) before the moments, as
    /// `torch.optim.Adam(weight_decay=λ)`.
    L2(f64),
    /// Decoupled weight decay `λ` (`p ← p − η·λ·p` before the Adam update), as
    /// `torch.optim.AdamW(weight_decay=λ)`.
    Decoupled(f64),
}

impl WeightDecay {
    fn code_and_value(self) -> (f64, f64) {
        match self {
            WeightDecay::None => (0.0, 0.0),
            WeightDecay::L2(v) => (1.0, v),
            WeightDecay::Decoupled(v) => (2.0, v),
        }
    }

    fn from_code(code: f64, value: f64) -> Result<Self> {
        if code == 0.0 {
            Ok(WeightDecay::None)
        } else if code == 1.0 {
            Ok(WeightDecay::L2(value))
        } else if code == 2.0 {
            Ok(WeightDecay::Decoupled(value))
        } else {
            Err(Error::invalid_parameter(
                "optimizer state",
                format!("weight decay mode {code} is not 0 (none), 1 (L2) or 2 (decoupled)"),
            ))
        }
    }
}

/// Hyperparameters of [`Adam`]. Defaults: `lr = 1e-3`, `beta1 = 0.9`, `beta2 = 0.999`,
/// `eps = 1e-8`, no weight decay (PyTorch's Adam defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate `η ≥ 0`.
    pub lr: f64,
    /// Decay `β₁ ∈ [0, 1)` of the first-moment average.
    pub beta1: f64,
    /// Decay `β₂ ∈ [0, 1)` of the second-moment average.
    pub beta2: f64,
    /// `ε ≥ 0` added to the denominator.
    pub eps: f64,
    /// Weight decay, none by default.
    pub weight_decay: WeightDecay,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: WeightDecay::None,
        }
    }
}

impl AdamConfig {
    /// Checks the hyperparameters.
    ///
    /// ```
    /// use qcl_nn::optim::{AdamConfig, WeightDecay};
    /// assert!(AdamConfig::default().validate().is_ok());
    /// assert!(AdamConfig { beta1: 1.0, ..Default::default() }.validate().is_err());
    /// assert!(AdamConfig { weight_decay: WeightDecay::Decoupled(-0.1), ..Default::default() }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite `lr`, `eps` or weight decay,
    /// or a beta outside `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("eps", self.eps)?;
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be in [0, 1), got {beta}"),
                ));
            }
        }
        match self.weight_decay {
            WeightDecay::None => Ok(()),
            WeightDecay::L2(v) | WeightDecay::Decoupled(v) => check_non_negative("weight_decay", v),
        }
    }

    /// One update of parameter `var` by its gradient `g`, advancing its `moments` (none before
    /// its first update).
    fn update(&self, var: &Var, mut g: Tensor, moments: &mut Option<Moments>) -> Result<()> {
        let mut p = var.as_tensor().detach();
        match self.weight_decay {
            WeightDecay::None => {}
            WeightDecay::L2(wd) => g = (g + p.affine(wd, 0.0)?)?,
            WeightDecay::Decoupled(wd) => p = p.affine(1.0 - self.lr * wd, 0.0)?,
        }
        let (beta1, beta2) = (self.beta1, self.beta2);
        let (t, exp_avg, exp_avg_sq) = match moments.take() {
            None => (
                1,
                g.affine(1.0 - beta1, 0.0)?,
                g.sqr()?.affine(1.0 - beta2, 0.0)?,
            ),
            Some(m) => (
                m.t + 1,
                (m.exp_avg.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?,
                (m.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?,
            ),
        };
        // As torch: p ← p − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε).
        let exponent = i32::try_from(t).unwrap_or(i32::MAX);
        let bias_correction1 = 1.0 - beta1.powi(exponent);
        let bias_correction2 = 1.0 - beta2.powi(exponent);
        let denominator = exp_avg_sq
            .sqrt()?
            .affine(1.0 / bias_correction2.sqrt(), self.eps)?;
        let update = (&exp_avg / denominator)?.affine(self.lr / bias_correction1, 0.0)?;
        var.set(&(p - update)?)?;
        *moments = Some(Moments {
            t,
            exp_avg,
            exp_avg_sq,
        });
        Ok(())
    }
}

/// Adam (Kingma & Ba), exactly as `torch.optim.Adam` / `torch.optim.AdamW`.
///
/// For each parameter `p` with gradient `∇`, at its `t`-th update:
///
/// ```text
/// g ← ∇ + λ·p                 (only with WeightDecay::L2(λ))
/// p ← p − η·λ·p               (only with WeightDecay::Decoupled(λ))
/// m ← β₁·m + (1 − β₁)·g
/// v ← β₂·v + (1 − β₂)·g²
/// m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)
/// p ← p − η·m̂ / (√v̂ + ε)
/// ```
///
/// `t` counts the updates of that parameter: a parameter without a gradient at some step
/// keeps its moments and its `t`.
///
/// ```
/// use candle_core::Device;
/// use qcl_nn::optim::{Adam, AdamConfig, Optimizer};
/// use qcl_nn::{Init, ParamStore};
///
/// let store = ParamStore::new(0);
/// let x = store.root(&Device::Cpu).param("x", 1, Init::Const(1.0))?;
/// let mut adam = Adam::new(store.trainable(), AdamConfig { lr: 0.1, ..Default::default() })?;
/// adam.backward_step(&x.sum_all()?)?;
/// // The first bias-corrected step moves by lr·g/(|g| + ε) ≈ lr.
/// assert!((x.to_vec1::<f32>()?[0] - 0.9).abs() < 1e-6);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Adam {
    vars: NamedVars,
    params: AdamConfig,
    moments: Vec<Option<Moments>>,
    steps: u64,
}

/// The per-parameter state of Adam.
#[derive(Debug, Clone)]
struct Moments {
    /// Number of updates of this parameter.
    t: u64,
    /// First-moment average `m`.
    exp_avg: Tensor,
    /// Second-moment average `v`.
    exp_avg_sq: Tensor,
}

const KIND: &str = "adam";
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";

impl Adam {
    /// An optimizer over `vars`: [`ParamStore::trainable`](crate::ParamStore::trainable), a
    /// `&VarMap`, or `varmap.all_vars()` (see [`IntoNamedVars`]).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for bad hyperparameters (see [`AdamConfig::validate`]),
    /// repeated names or non-float variables.
    pub fn new(vars: impl IntoNamedVars, config: AdamConfig) -> Result<Self> {
        config.validate()?;
        let vars = NamedVars::new(vars.into_named_vars())?;
        Ok(Adam {
            moments: vec![None; vars.len()],
            vars,
            params: config,
            steps: 0,
        })
    }

    /// An optimizer over the float variables of a candle-nn `VarMap` (those it holds now),
    /// sorted by name so that its state is the same from run to run.
    ///
    /// # Errors
    /// As [`Adam::new`].
    pub fn from_var_map(vars: &VarMap, config: AdamConfig) -> Result<Self> {
        Self::new(vars, config)
    }

    /// The hyperparameters (with the current learning rate).
    pub fn hyperparameters(&self) -> AdamConfig {
        self.params
    }
}

impl Optimizer for Adam {
    shared_optimizer_methods!(moments);

    /// Scalars `steps`, `lr`, `beta1`, `beta2`, `eps`, `weight_decay_mode` (0 none, 1 L2,
    /// 2 decoupled), `weight_decay`, and `step.<parameter>`; tensors `exp_avg.<parameter>` and
    /// `exp_avg_sq.<parameter>`, for every parameter updated at least once.
    fn state(&self) -> Result<OptimizerState> {
        let p = &self.params;
        let (mode, decay) = p.weight_decay.code_and_value();
        let mut scalars = BTreeMap::from([
            ("steps".to_string(), self.steps as f64),
            ("lr".to_string(), p.lr),
            ("beta1".to_string(), p.beta1),
            ("beta2".to_string(), p.beta2),
            ("eps".to_string(), p.eps),
            ("weight_decay_mode".to_string(), mode),
            ("weight_decay".to_string(), decay),
        ]);
        for ((name, _), moments) in self.vars.iter().zip(&self.moments) {
            if let Some(m) = moments {
                scalars.insert(format!("{STEP}.{name}"), m.t as f64);
            }
        }
        Ok(self
            .vars
            .optimizer_state(KIND, scalars, &self.moments, |m| {
                [
                    (EXP_AVG, m.exp_avg.clone()),
                    (EXP_AVG_SQ, m.exp_avg_sq.clone()),
                ]
            }))
    }

    /// Restores moments, step counts and hyperparameters (like PyTorch's `load_state_dict`,
    /// the saved hyperparameters replace those given to [`Adam::new`]). Nothing changes
    /// unless the whole state is valid.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.require_kind(KIND)?;
        let params = AdamConfig {
            lr: state.scalar("lr")?,
            beta1: state.scalar("beta1")?,
            beta2: state.scalar("beta2")?,
            eps: state.scalar("eps")?,
            weight_decay: WeightDecay::from_code(
                state.scalar("weight_decay_mode")?,
                state.scalar("weight_decay")?,
            )?,
        };
        params.validate()?;
        let steps = state.count("steps")?;
        let n = self.vars.len();
        let mut exp_avgs: Vec<Option<Tensor>> = vec![None; n];
        let mut exp_avg_sqs: Vec<Option<Tensor>> = vec![None; n];
        for (key, tensor) in &state.tensors {
            let (buffer, index, tensor) =
                self.vars
                    .resolve_state_tensor(KIND, &[EXP_AVG, EXP_AVG_SQ], key, tensor)?;
            if buffer == EXP_AVG {
                exp_avgs[index] = Some(tensor);
            } else {
                exp_avg_sqs[index] = Some(tensor);
            }
        }
        let mut moments = Vec::with_capacity(n);
        for (((name, _), exp_avg), exp_avg_sq) in self.vars.iter().zip(exp_avgs).zip(exp_avg_sqs) {
            let step_key = format!("{STEP}.{name}");
            let has_step = state.scalars.contains_key(&step_key);
            moments.push(match (exp_avg, exp_avg_sq, has_step) {
                (None, None, false) => None,
                (Some(exp_avg), Some(exp_avg_sq), true) => {
                    let t = state.count(&step_key)?;
                    if t == 0 {
                        return Err(Error::invalid_parameter(
                            "optimizer state",
                            format!("`{step_key}` is 0 although `{name}` has moments"),
                        ));
                    }
                    Some(Moments {
                        t,
                        exp_avg,
                        exp_avg_sq,
                    })
                }
                _ => {
                    return Err(Error::invalid_parameter(
                        "optimizer state",
                        format!(
                            "parameter `{name}` needs all or none of `{EXP_AVG}.{name}`, \
                             `{EXP_AVG_SQ}.{name}` and the scalar `{step_key}`"
                        ),
                    ))
                }
            });
        }
        if let Some(key) = state.scalars.keys().find(|k| {
            k.strip_prefix("step.")
                .is_some_and(|name| self.vars.index_of(name).is_none())
        }) {
            return Err(Error::invalid_parameter(
                "optimizer state",
                format!("`{key}` belongs to a parameter this optimizer does not hold"),
            ));
        }
        self.params = params;
        self.steps = steps;
        self.moments = moments;
        Ok(())
    }
}

impl_candle_optimizer!(Adam, AdamConfig);
