//! Learning-rate schedules.
//!
//! A schedule is a pure function `t ↦ η(t)` ([`LrSchedule::lr_at`]). What `t` counts is the
//! caller's choice: epochs (PyTorch's usual `scheduler.step()` once per epoch) or optimizer
//! steps. [`crate::train::TrainLoop`] offers both (`with_schedule` per epoch,
//! `with_step_schedule` per step). Being pure, a schedule needs no state in a checkpoint.
//!
//! | schedule | `η(t)` | PyTorch |
//! |---|---|---|
//! | [`Constant`] | `η₀` | `ConstantLR(factor=1)` |
//! | [`StepLr`] | `η₀·γ^⌊t/s⌋` | `StepLR` |
//! | [`MultiStepLr`] | `η₀·γ^#{m ≤ t}` | `MultiStepLR` |
//! | [`CosineAnnealing`] | `η_min + (η₀ − η_min)·(1 + cos(π·t/T))/2` | `CosineAnnealingLR` |
//! | [`Piecewise`] | `η₀·f_i` from boundary `i` on | — (TensorFlow's piecewise constant) |
//! | [`LinearWarmup`] | ramps another schedule up over the first steps | `LinearLR` + `SequentialLR` |
//!
//! ```
//! use qcl_nn::schedule::{LrSchedule, MultiStepLr};
//! let schedule = MultiStepLr::new(0.1, vec![30, 80], 0.1)?;
//! assert_eq!(schedule.lr_at(29), 0.1);
//! assert!((schedule.lr_at(30) - 0.01).abs() < 1e-12);
//! assert!((schedule.lr_at(80) - 0.001).abs() < 1e-12);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use qcl_tensor::{Error, Result};

use crate::optim::check_non_negative;

/// A learning rate as a function of time.
///
/// `t` counts epochs or optimizer steps, as the caller decides; the schedule only sees a
/// number. Implementations must be pure (same `t`, same rate), so that a resumed run sets
/// the same rates as an uninterrupted one.
pub trait LrSchedule {
    /// The learning rate at epoch or step `t` (counted from 0).
    fn lr_at(&self, t: usize) -> f64;

    /// Sets `optimizer`'s learning rate to [`lr_at(t)`](LrSchedule::lr_at) and returns it: a
    /// qcl schedule driving any candle-nn optimizer (candle's own `AdamW`/`SGD`, or qcl's
    /// [`Sgd`](crate::optim::Sgd)/[`Adam`](crate::optim::Adam)).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// use qcl_nn::schedule::{LrSchedule, StepLr};
    /// let schedule = StepLr::new(0.1, 10, 0.5)?;
    /// let mut opt = candle_nn::AdamW::new(vec![], ParamsAdamW::default())?;
    /// assert_eq!(schedule.apply(25, &mut opt), 0.025);
    /// assert_eq!(opt.learning_rate(), 0.025);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    fn apply<O: candle_nn::Optimizer>(&self, t: usize, optimizer: &mut O) -> f64
    where
        Self: Sized,
    {
        let lr = self.lr_at(t);
        optimizer.set_learning_rate(lr);
        lr
    }
}

impl<S: LrSchedule + ?Sized> LrSchedule for &S {
    fn lr_at(&self, t: usize) -> f64 {
        (**self).lr_at(t)
    }
}

impl<S: LrSchedule + ?Sized> LrSchedule for Box<S> {
    fn lr_at(&self, t: usize) -> f64 {
        (**self).lr_at(t)
    }
}

fn power(gamma: f64, times: usize) -> f64 {
    gamma.powi(i32::try_from(times).unwrap_or(i32::MAX))
}

/// The same rate at every `t`.
///
/// ```
/// use qcl_nn::schedule::{Constant, LrSchedule};
/// assert_eq!(Constant::new(0.01)?.lr_at(1000), 0.01);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Constant {
    lr: f64,
}

impl Constant {
    /// The constant rate `lr`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `lr` is finite and `>= 0`.
    pub fn new(lr: f64) -> Result<Self> {
        check_non_negative("lr", lr)?;
        Ok(Constant { lr })
    }
}

impl LrSchedule for Constant {
    fn lr_at(&self, _t: usize) -> f64 {
        self.lr
    }
}

/// `η(t) = η₀·γ^⌊t / step_size⌋`: the rate is multiplied by `γ` every `step_size` epochs
/// (PyTorch's `StepLR`).
///
/// ```
/// use qcl_nn::schedule::{LrSchedule, StepLr};
/// let s = StepLr::new(1.0, 10, 0.5)?;
/// assert_eq!((s.lr_at(0), s.lr_at(9), s.lr_at(10), s.lr_at(25)), (1.0, 1.0, 0.5, 0.25));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLr {
    base: f64,
    step_size: usize,
    gamma: f64,
}

impl StepLr {
    /// Starts at `base` and multiplies by `gamma` every `step_size`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `step_size = 0` or a negative or non-finite `base` or
    /// `gamma`.
    pub fn new(base: f64, step_size: usize, gamma: f64) -> Result<Self> {
        check_non_negative("base", base)?;
        check_non_negative("gamma", gamma)?;
        if step_size == 0 {
            return Err(Error::invalid_parameter("step_size", "must be at least 1"));
        }
        Ok(StepLr {
            base,
            step_size,
            gamma,
        })
    }
}

impl LrSchedule for StepLr {
    fn lr_at(&self, t: usize) -> f64 {
        self.base * power(self.gamma, t / self.step_size)
    }
}

/// `η(t) = η₀·γ^k` with `k` the number of milestones `≤ t` (PyTorch's `MultiStepLR`; a
/// milestone listed twice counts twice, as there).
///
/// ```
/// use qcl_nn::schedule::{LrSchedule, MultiStepLr};
/// let s = MultiStepLr::new(1.0, vec![5, 2], 0.5)?; // order does not matter
/// assert_eq!([0, 1, 2, 4, 5, 100].map(|t| s.lr_at(t)), [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MultiStepLr {
    base: f64,
    milestones: Vec<usize>,
    gamma: f64,
}

impl MultiStepLr {
    /// Starts at `base` and multiplies by `gamma` at each of `milestones` (any order).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite `base` or `gamma`.
    pub fn new(base: f64, mut milestones: Vec<usize>, gamma: f64) -> Result<Self> {
        check_non_negative("base", base)?;
        check_non_negative("gamma", gamma)?;
        milestones.sort_unstable();
        Ok(MultiStepLr {
            base,
            milestones,
            gamma,
        })
    }

    /// The milestones, sorted.
    pub fn milestones(&self) -> &[usize] {
        &self.milestones
    }
}

impl LrSchedule for MultiStepLr {
    fn lr_at(&self, t: usize) -> f64 {
        let passed = self.milestones.partition_point(|&m| m <= t);
        self.base * power(self.gamma, passed)
    }
}

/// Cosine annealing from `η₀` to `η_min` over `t_max`, PyTorch's closed form of
/// `CosineAnnealingLR`:
///
/// `η(t) = η_min + (η₀ − η_min)·(1 + cos(π·t / t_max)) / 2`
///
/// so `η(0) = η₀` and `η(t_max) = η_min` (both exactly). Like PyTorch's, the curve is periodic: past
/// `t_max` it rises again towards `η₀` at `2·t_max`; choose `t_max` as the run's length.
///
/// ```
/// use qcl_nn::schedule::{CosineAnnealing, LrSchedule};
/// let s = CosineAnnealing::new(0.1, 100, 0.0)?;
/// assert_eq!(s.lr_at(0), 0.1);
/// assert!((s.lr_at(50) - 0.05).abs() < 1e-12);
/// assert!(s.lr_at(100).abs() < 1e-12);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineAnnealing {
    base: f64,
    t_max: usize,
    eta_min: f64,
}

impl CosineAnnealing {
    /// Anneals from `base` at `t = 0` to `eta_min` at `t = t_max`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `t_max = 0`, a negative or non-finite rate, or
    /// `eta_min > base`.
    pub fn new(base: f64, t_max: usize, eta_min: f64) -> Result<Self> {
        check_non_negative("base", base)?;
        check_non_negative("eta_min", eta_min)?;
        if t_max == 0 {
            return Err(Error::invalid_parameter("t_max", "must be at least 1"));
        }
        if eta_min > base {
            return Err(Error::invalid_parameter(
                "eta_min",
                format!("must not exceed the base rate {base}, got {eta_min}"),
            ));
        }
        Ok(CosineAnnealing {
            base,
            t_max,
            eta_min,
        })
    }
}

impl LrSchedule for CosineAnnealing {
    fn lr_at(&self, t: usize) -> f64 {
        if t.is_multiple_of(self.t_max.saturating_mul(2)) {
            // cos = 1: the base rate exactly, not up to rounding.
            return self.base;
        }
        let phase = std::f64::consts::PI * t as f64 / self.t_max as f64;
        self.eta_min + (self.base - self.eta_min) * (1.0 + phase.cos()) / 2.0
    }
}

/// Piecewise constant: `η(t) = η₀·f_i` where boundary `i = (at_i, f_i)` is the last one with
/// `at_i ≤ t`, and `η₀` before the first boundary.
///
/// ```
/// use qcl_nn::schedule::{LrSchedule, Piecewise};
/// // The TensorFlow ResNet schedule over 200 epochs: ×0.1 at 50 %, ×0.01 at 75 %,
/// // ×0.001 at 87.5 %.
/// let s = Piecewise::fractions(0.1, 200, &[(0.5, 0.1), (0.75, 0.01), (0.875, 0.001)])?;
/// assert_eq!(s.boundaries(), &[(100, 0.1), (150, 0.01), (175, 0.001)]);
/// assert_eq!(s.lr_at(99), 0.1);
/// assert_eq!(s.lr_at(100), 0.1 * 0.1);
/// assert_eq!(s.lr_at(199), 0.1 * 0.001);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Piecewise {
    base: f64,
    boundaries: Vec<(usize, f64)>,
}

impl Piecewise {
    /// Rate `base × factor` from each boundary `(at, factor)` on.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite rate or factor, or
    /// boundaries whose `at` is not strictly increasing.
    pub fn new(base: f64, boundaries: Vec<(usize, f64)>) -> Result<Self> {
        check_non_negative("base", base)?;
        for (at, factor) in &boundaries {
            check_non_negative(&format!("factor at {at}"), *factor)?;
        }
        if let Some(pair) = boundaries.windows(2).find(|w| w[0].0 >= w[1].0) {
            return Err(Error::invalid_parameter(
                "boundaries",
                format!(
                    "must be strictly increasing, got {} then {}",
                    pair[0].0, pair[1].0
                ),
            ));
        }
        Ok(Piecewise { base, boundaries })
    }

    /// Boundaries at fractions of a run of `total` epochs (or steps): each `(fraction, factor)`
    /// applies from the first `t` with `t ≥ fraction·total`. When two fractions land on the
    /// same `t` (a short run), the later one wins.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a fraction outside `[0, 1]`, fractions not strictly
    /// increasing, or the errors of [`Piecewise::new`].
    pub fn fractions(base: f64, total: usize, fractions: &[(f64, f64)]) -> Result<Self> {
        if let Some(pair) = fractions.windows(2).find(|w| w[0].0 >= w[1].0) {
            return Err(Error::invalid_parameter(
                "fractions",
                format!(
                    "must be strictly increasing, got {} then {}",
                    pair[0].0, pair[1].0
                ),
            ));
        }
        let mut boundaries: Vec<(usize, f64)> = Vec::with_capacity(fractions.len());
        for &(fraction, factor) in fractions {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(Error::invalid_parameter(
                    "fractions",
                    format!("{fraction} is not in [0, 1]"),
                ));
            }
            let at = first_at_or_after(fraction * total as f64);
            match boundaries.last_mut() {
                Some(last) if last.0 == at => last.1 = factor,
                _ => boundaries.push((at, factor)),
            }
        }
        Piecewise::new(base, boundaries)
    }

    /// The boundaries `(at, factor)`, increasing.
    pub fn boundaries(&self) -> &[(usize, f64)] {
        &self.boundaries
    }
}

/// The smallest integer `t ≥ x`, ignoring rounding noise (`0.7·10` is 7, not 8).
fn first_at_or_after(x: f64) -> usize {
    let nearest = x.round();
    if (x - nearest).abs() <= 1e-9 * nearest.max(1.0) {
        nearest as usize
    } else {
        x.ceil() as usize
    }
}

impl LrSchedule for Piecewise {
    fn lr_at(&self, t: usize) -> f64 {
        let passed = self.boundaries.partition_point(|&(at, _)| at <= t);
        match passed {
            0 => self.base,
            i => self.base * self.boundaries[i - 1].1,
        }
    }
}

/// Linear warm-up in front of another schedule: for `t < warmup` the inner rate is scaled
/// by `start_factor + (1 − start_factor)·t / warmup`, then the inner schedule runs unchanged
/// (PyTorch's `LinearLR(start_factor, total_iters=warmup)` chained with it).
///
/// ```
/// use qcl_nn::schedule::{Constant, LinearWarmup, LrSchedule};
/// let s = LinearWarmup::new(Constant::new(1.0)?, 4, 0.0)?;
/// assert_eq!([0, 1, 2, 3, 4, 9].map(|t| s.lr_at(t)), [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LinearWarmup<S> {
    inner: S,
    warmup: usize,
    start_factor: f64,
}

impl<S: LrSchedule> LinearWarmup<S> {
    /// Ramps `inner` up from `start_factor` times its rate to its full rate over `warmup`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a `start_factor` outside `[0, 1]`.
    pub fn new(inner: S, warmup: usize, start_factor: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&start_factor) {
            return Err(Error::invalid_parameter(
                "start_factor",
                format!("must be in [0, 1], got {start_factor}"),
            ));
        }
        Ok(LinearWarmup {
            inner,
            warmup,
            start_factor,
        })
    }
}

impl<S: LrSchedule> LrSchedule for LinearWarmup<S> {
    fn lr_at(&self, t: usize) -> f64 {
        let lr = self.inner.lr_at(t);
        if t < self.warmup {
            let progress = t as f64 / self.warmup as f64;
            lr * (self.start_factor + (1.0 - self.start_factor) * progress)
        } else {
            lr
        }
    }
}
