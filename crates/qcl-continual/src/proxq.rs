//! ProxQ part 2 (LifeQuant, Chen et al. ICCV 2023): a Fisher-weighted proximal penalty that
//! holds the latent parameters near their values at the start of a task, in the form of EWC
//! (Kirkpatrick et al. 2017).
//!
//! At the start of task `t`, before any training step:
//!
//! 1. the **anchor** `θ*` is a detached copy of every trainable parameter
//!    ([`ProxQ::snapshot`]);
//! 2. the **importance** `F` is the batch-level empirical Fisher diagonal over the `B`
//!    mini-batches of the old tasks, `F = (1/B)·Σ_b (∇θ L_b)²` ([`FisherAccumulator`]); at
//!    task 0 it is all zeros ([`FisherDiagonal::zeros`]);
//! 3. every training step adds `λ·P(θ)` to the loss, with
//!    `P(θ) = Σ_params Σ_elements F ⊙ (θ − θ*)²` and `∇θ [λ·P] = 2·λ·F ⊙ (θ − θ*)`.
//!
//! Step 3 is the reference code's form ([`PenaltyUpdate::Gradient`]). Because the penalty is a
//! quadratic with curvature `2λF`, an explicit SGD step of size `η` with momentum `μ` is
//! stable only while `η·2λ·max F < 2(1 + μ)`; [`PenaltyUpdate::Proximal`] applies the penalty
//! through its proximal operator instead ([`ProxQ::proximal_step`]), which is stable for any
//! `λ` and has the same fixed points.
//!
//! ProxQ part 1, the fixed standard space, is the per-tensor standardisation inside
//! [`crate::WeightQuantizer`]; the penalty itself acts on the latent full-precision
//! parameters (conv weights, BN, head), as the reference code does
//! (docs/methods/lifequant.md § Paper versus code).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use qcl_continual::{FisherAccumulator, ProxQ};
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let params = vec![("w".to_string(), w.clone())];
//! // Importance from one old-task batch with loss Σ w² (gradient 2w).
//! let mut fisher = FisherAccumulator::new();
//! let grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
//! fisher.accumulate(&params, &grads)?;
//! let fisher = fisher.finish()?; // F = (2w)² = [4, 16]
//! let prox = ProxQ::new(ProxQ::snapshot(&params)?, fisher, ProxQ::DEFAULT_LAMBDA)?;
//! assert_eq!(prox.penalty(&params)?.to_scalar::<f32>()?, 0.0); // at the anchor
//! w.set(&Tensor::new(&[1.5f32, -2.0], &Device::Cpu)?)?;
//! // λ·F·Δ² = 100 · 4 · 0.25
//! assert_eq!(prox.penalty(&params)?.to_scalar::<f32>()?, 100.0);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use qcl_tensor::{Error, Result};

use crate::quant::non_finite;

/// How a Fisher-weighted penalty `λ·P(θ)` enters training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PenaltyUpdate {
    /// `λ·P` is added to the loss and the optimizer follows its gradient `2λF ⊙ (θ − θ*)`, as
    /// the reference code does. With SGD step `η` and momentum `μ` this explicit update
    /// diverges along any coordinate where `η·2λF > 2(1 + μ)`.
    #[default]
    Gradient,
    /// The optimizer steps on the task loss alone; after each step the parameters move by the
    /// proximal operator of `λ·P` ([`ProxQ::proximal_step`]) with the momentum-effective step
    /// `s = η/(1 − μ)`. Where the explicit update is stable the two agree to first order and
    /// share their fixed points (`∇L + 2λF ⊙ (θ − θ*) = 0`); this one is stable for any `λ`.
    Proximal,
}

/// A diagonal Fisher estimate `F`: one non-negative tensor per named parameter, the same
/// shape as the parameter.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_continual::FisherDiagonal;
/// let g = Tensor::new(&[3.0f32, -0.5], &Device::Cpu)?;
/// let f = FisherDiagonal::from_grads(&[("w".to_string(), g)])?; // F = g²
/// assert_eq!(f.get("w").unwrap().to_vec1::<f32>()?, vec![9.0, 0.25]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct FisherDiagonal {
    values: BTreeMap<String, Tensor>,
}

impl FisherDiagonal {
    /// `F = 0` for every parameter (task 0: no old task, no penalty).
    ///
    /// # Errors
    /// A candle error if allocation fails.
    pub fn zeros(params: &[(String, Var)]) -> Result<Self> {
        let values = params
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().zeros_like()?.detach())))
            .collect::<Result<_>>()?;
        Ok(Self { values })
    }

    /// The Fisher of a single batch, `F = g ⊙ g`, from named gradients.
    ///
    /// # Errors
    /// As [`FisherAccumulator::accumulate_grads`].
    pub fn from_grads(grads: &[(String, Tensor)]) -> Result<Self> {
        let mut acc = FisherAccumulator::new();
        acc.accumulate_grads(grads)?;
        acc.finish()
    }

    /// `F` of the parameter `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.values.get(name)
    }

    /// `(name, F)` pairs sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.values.iter()
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no parameter is covered.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The largest entry of `F` over every parameter (0 when empty). The explicit penalty
    /// gradient step is stable only while `η·2λ·F_max ≤ 2(1 + μ)` for SGD with rate η and
    /// momentum μ (docs/methods/lifequant.md § ProxQ), so this bounds the usable λ.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_continual::FisherDiagonal;
    /// let g = Tensor::new(&[3.0f32, -0.5], &Device::Cpu)?;
    /// let f = FisherDiagonal::from_grads(&[("w".to_string(), g)])?;
    /// assert_eq!(f.max()?, 9.0);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// A candle error if a tensor cannot be read.
    pub fn max(&self) -> Result<f64> {
        let mut max = 0.0f64;
        for value in self.values.values() {
            let m = value.flatten_all()?.max(0)?.to_dtype(DType::F64)?;
            max = max.max(m.to_scalar::<f64>()?);
        }
        Ok(max)
    }
}

/// Accumulates squared gradients over mini-batches and returns their mean,
/// `F = (1/B)·Σ_{b=1..B} g_b ⊙ g_b` (LifeQuant's batch-level empirical Fisher: `B` counts
/// batches, not samples). Because `F` is a mean, feeding the same batches twice leaves it
/// unchanged.
///
/// Every batch must cover the same parameter names with the same shapes as the first. A
/// parameter that took no part in a batch's loss (no entry in the [`GradStore`]) has a zero
/// gradient there.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_continual::FisherAccumulator;
/// let mut acc = FisherAccumulator::new();
/// acc.accumulate_grads(&[("w".to_string(), Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?)])?;
/// acc.accumulate_grads(&[("w".to_string(), Tensor::new(&[3.0f32, 0.0], &Device::Cpu)?)])?;
/// assert_eq!(acc.batches(), 2);
/// let f = acc.finish()?;
/// assert_eq!(f.get("w").unwrap().to_vec1::<f32>()?, vec![5.0, 2.0]); // (1+9)/2, (4+0)/2
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct FisherAccumulator {
    sums: BTreeMap<String, Tensor>,
    batches: usize,
}

impl FisherAccumulator {
    /// An accumulator that has seen no batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of batches accumulated so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Adds one batch: the gradient of each of `params` in `grads` (zero if absent).
    ///
    /// # Errors
    /// As [`FisherAccumulator::accumulate_grads`].
    pub fn accumulate(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        let named = params
            .iter()
            .map(|(name, var)| {
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => g.detach(),
                    None => var.as_tensor().zeros_like()?.detach(),
                };
                Ok((name.clone(), g))
            })
            .collect::<Result<Vec<_>>>()?;
        self.accumulate_grads(&named)
    }

    /// Adds one batch from named gradients. Nothing changes if any check fails.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a repeated name or a set of names other than the first
    /// batch's; [`Error::ShapeMismatch`] for a shape other than the first batch's;
    /// [`Error::NonFinite`] for a NaN or infinite gradient.
    pub fn accumulate_grads(&mut self, grads: &[(String, Tensor)]) -> Result<()> {
        let mut squares = BTreeMap::new();
        for (name, g) in grads {
            if let Some(prev) = self.sums.get(name) {
                if prev.dims() != g.dims() {
                    return Err(Error::ShapeMismatch {
                        context: format!("gradient of `{name}`"),
                        expected: format!("{:?}", prev.dims()),
                        actual: g.dims().to_vec(),
                    });
                }
            }
            let sq = g.detach().sqr()?;
            // One host read per parameter: a NaN in F would silently turn every later penalty
            // into NaN.
            let total = sq.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !total.is_finite() {
                return Err(non_finite(g, &format!("gradient of `{name}`")));
            }
            if squares.insert(name.clone(), sq).is_some() {
                return Err(Error::invalid_parameter(
                    "grads",
                    format!("`{name}` appears twice in one batch"),
                ));
            }
        }
        if self.batches > 0 && !squares.keys().eq(self.sums.keys()) {
            return Err(Error::invalid_parameter(
                "grads",
                format!(
                    "batch covers {:?}, earlier batches covered {:?}",
                    squares.keys().collect::<Vec<_>>(),
                    self.sums.keys().collect::<Vec<_>>()
                ),
            ));
        }
        if self.batches == 0 {
            self.sums = squares;
        } else {
            for (name, sq) in squares {
                let sum = self.sums.get_mut(&name).expect("names checked above");
                *sum = (&*sum + sq)?;
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// The mean of the squared gradients, `F = Σ_b g_b² / B`.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] if no batch was accumulated (use [`FisherDiagonal::zeros`] for a
    /// task without old data).
    pub fn finish(self) -> Result<FisherDiagonal> {
        if self.batches == 0 {
            return Err(Error::EmptyInput(
                "Fisher estimate over zero batches; use FisherDiagonal::zeros at task 0".into(),
            ));
        }
        let b = self.batches as f64;
        let values = self
            .sums
            .into_iter()
            .map(|(name, sum)| Ok((name, (sum / b)?)))
            .collect::<Result<_>>()?;
        Ok(FisherDiagonal { values })
    }
}

/// The ProxQ proximal penalty `λ·P(θ)`, `P(θ) = Σ_params Σ_elements F ⊙ (θ − θ*)²`, toward
/// the anchor `θ*` (the parameters at the start of the task), weighted by the Fisher diagonal
/// `F` and by `λ` (default [`ProxQ::DEFAULT_LAMBDA`] = 100, the reference's `ll_lambda`).
///
/// See the [module documentation](crate::proxq) for a full example.
#[derive(Debug, Clone)]
pub struct ProxQ {
    anchor: BTreeMap<String, Tensor>,
    fisher: FisherDiagonal,
    lambda: f64,
}

impl ProxQ {
    /// The default penalty weight `λ = 100`.
    pub const DEFAULT_LAMBDA: f64 = 100.0;

    /// Detached copies of `params`: the anchor `θ*` at the start of a task.
    ///
    /// # Errors
    /// A candle error if a copy fails.
    pub fn snapshot(params: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
        params
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?.detach())))
            .collect()
    }

    /// A penalty toward `anchor` weighted by `fisher` and `lambda`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `λ` negative or not finite, a repeated anchor name, or
    /// anchor and Fisher covering different names; [`Error::ShapeMismatch`] for an anchor and
    /// a Fisher tensor of different shapes; [`Error::NonFinite`] for a NaN/inf anchor.
    pub fn new(anchor: Vec<(String, Tensor)>, fisher: FisherDiagonal, lambda: f64) -> Result<Self> {
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(Error::invalid_parameter(
                "lambda",
                format!("{lambda} must be finite and ≥ 0"),
            ));
        }
        let mut map = BTreeMap::new();
        for (name, t) in anchor {
            let total = t
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if !total.is_finite() {
                return Err(non_finite(&t, &format!("anchor of `{name}`")));
            }
            if let Some(f) = fisher.get(&name) {
                if f.dims() != t.dims() {
                    return Err(Error::ShapeMismatch {
                        context: format!("Fisher of `{name}` vs its anchor"),
                        expected: format!("{:?}", t.dims()),
                        actual: f.dims().to_vec(),
                    });
                }
            }
            if map.insert(name.clone(), t.detach()).is_some() {
                return Err(Error::invalid_parameter(
                    "anchor",
                    format!("`{name}` appears twice"),
                ));
            }
        }
        if !map.keys().eq(fisher.values.keys()) {
            return Err(Error::invalid_parameter(
                "fisher",
                format!(
                    "covers {:?}, the anchor covers {:?}",
                    fisher.values.keys().collect::<Vec<_>>(),
                    map.keys().collect::<Vec<_>>()
                ),
            ));
        }
        Ok(Self {
            anchor: map,
            fisher,
            lambda,
        })
    }

    /// The penalty weight `λ`.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The anchor `θ*` of `name`.
    pub fn anchor(&self, name: &str) -> Option<&Tensor> {
        self.anchor.get(name)
    }

    /// The Fisher diagonal `F`.
    pub fn fisher(&self) -> &FisherDiagonal {
        &self.fisher
    }

    /// Pairs each anchored name with its parameter in `params`.
    fn matched<'a>(&'a self, params: &'a [(String, Var)]) -> Result<Vec<(&'a str, &'a Var)>> {
        let by_name: BTreeMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        // Comparing the list's length (not the map's) also refuses a name given twice.
        if params.len() != self.anchor.len()
            || !by_name
                .keys()
                .copied()
                .eq(self.anchor.keys().map(String::as_str))
        {
            return Err(Error::invalid_parameter(
                "params",
                format!(
                    "got {:?}, the anchor covers {:?}",
                    params.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    self.anchor.keys().collect::<Vec<_>>()
                ),
            ));
        }
        for (name, var) in &by_name {
            let anchor = &self.anchor[*name];
            if var.dims() != anchor.dims() {
                return Err(Error::ShapeMismatch {
                    context: format!("parameter `{name}` vs its anchor"),
                    expected: format!("{:?}", anchor.dims()),
                    actual: var.dims().to_vec(),
                });
            }
        }
        Ok(by_name.into_iter().collect())
    }

    /// The unweighted drift `P(θ) = Σ F ⊙ (θ − θ*)²` as a scalar tensor on the graph (also the
    /// "Fisher-weighted drift" used to compare runs).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `params` holds exactly the anchored names;
    /// [`Error::ShapeMismatch`] for a shape other than the anchor's.
    pub fn drift(&self, params: &[(String, Var)]) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (name, var) in self.matched(params)? {
            let diff = var.as_tensor().sub(&self.anchor[name])?;
            let f = self.fisher.get(name).expect("names checked in new");
            let term = (f * diff.sqr()?)?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        match total {
            Some(t) => Ok(t),
            // No parameter at all: P is the empty sum.
            None => Err(Error::EmptyInput("ProxQ over no parameters".into())),
        }
    }

    /// The penalty `λ·P(θ)` as a scalar tensor on the graph, to add to the task loss.
    ///
    /// # Errors
    /// As [`ProxQ::drift`].
    pub fn penalty(&self, params: &[(String, Var)]) -> Result<Tensor> {
        Ok((self.drift(params)? * self.lambda)?)
    }

    /// One proximal step of size `step` (`s`) on the penalty: every parameter becomes the
    /// minimiser of `λ·P(θ') + ‖θ' − θ‖² / (2s)`, elementwise
    ///
    /// `θ' = (θ + 2sλF ⊙ θ*) / (1 + 2sλF)`,
    ///
    /// a move toward the anchor by the fraction `2sλF / (1 + 2sλF) ∈ [0, 1)`, so it can never
    /// overshoot, whatever `λ`, `F` and `s`. `s = 0` or `λ = 0` leaves the parameters as they are.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use qcl_continual::{FisherDiagonal, ProxQ};
    /// let w = Var::new(&[0.0f32, 0.0], &Device::Cpu)?;
    /// let params = vec![("w".to_string(), w.clone())];
    /// let fisher = FisherDiagonal::from_grads(&[("w".into(), Tensor::new(&[1.0f32, 0.0], &Device::Cpu)?)])?;
    /// let prox = ProxQ::new(ProxQ::snapshot(&params)?, fisher, 100.0)?;
    /// w.set(&Tensor::new(&[1.0f32, 1.0], &Device::Cpu)?)?;
    /// prox.proximal_step(&params, 0.005)?; // 2sλF = 1 on the first element, 0 on the second
    /// assert_eq!(w.as_tensor().to_vec1::<f32>()?, vec![0.5, 1.0]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite `step`; otherwise as
    /// [`ProxQ::drift`].
    pub fn proximal_step(&self, params: &[(String, Var)], step: f64) -> Result<()> {
        if !(step.is_finite() && step >= 0.0) {
            return Err(Error::invalid_parameter(
                "step",
                format!("{step} must be finite and ≥ 0"),
            ));
        }
        let matched = self.matched(params)?;
        if step == 0.0 || self.lambda == 0.0 {
            return Ok(());
        }
        let c = 2.0 * step * self.lambda;
        for (name, var) in matched {
            let f = self.fisher.get(name).expect("names checked in new");
            let anchor = &self.anchor[name];
            let pull = (f * c)?;
            let moved = ((var.as_tensor().detach() + (&pull * anchor)?)? / (pull + 1.0)?)?;
            var.set(&moved.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The closed-form gradient of the penalty, `∇θ [λ·P] = 2·λ·F ⊙ (θ − θ*)`, per parameter
    /// (detached), sorted by name.
    ///
    /// # Errors
    /// As [`ProxQ::drift`].
    pub fn gradient(&self, params: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
        self.matched(params)?
            .into_iter()
            .map(|(name, var)| {
                let diff = var.as_tensor().detach().sub(&self.anchor[name])?;
                let f = self.fisher.get(name).expect("names checked in new");
                Ok((name.to_string(), ((f * diff)? * (2.0 * self.lambda))?))
            })
            .collect()
    }
}
