//! BaLL, LifeQuant's Balanced Lifelong Learning loss (Chen, Yang & Chen, "Overcoming
//! Forgetting Catastrophe in Quantization-Aware Training", ICCV 2023).
//!
//! BaLL is cross-entropy on logits that have been adjusted per class from the class
//! distribution of the data the model learns from at task `t`: the current task's data plus
//! the replay of earlier tasks, `D_t ∪ R_0 ∪ … ∪ R_{t−1}`.
//!
//! - [`ClassHistogram`] counts the labels of that multiset;
//! - [`ClassStatistics`] turns the counts `n_c` into `N = Σ n_c`, the number `K` of present
//!   classes, the priors `p_c = n_c / N`, the weights `w_c = 1 / (K·p_c + 1)` (`w_c = 1` for
//!   absent classes) and the linear-prior factors `K·p_c − 1`;
//! - [`BallLoss`] adjusts the logits according to a [`BallMode`] and returns the mean
//!   cross-entropy as a node of the candle graph, so it backpropagates (also through the
//!   softmax inside the adjustment).
//!
//! The three modes, with `σ = softmax(z)`:
//!
//! | mode | adjusted logit `z'_c` |
//! |---|---|
//! | [`BallMode::PaperLinearPrior`] (default) | `z_c + σ_c·(K·p_c − 1)` |
//! | [`BallMode::CodeAdditive`] | `z_c + w_c·σ_c` |
//! | [`BallMode::CodeMultiplicative`] | `w_c·z_c` |
//!
//! `K·p_c − 1` is the first-order expansion of `log(K·p_c)`, so the paper's mode is a
//! linearised log-prior (Balanced-Softmax) adjustment in the spirit of logit adjustment
//! (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): frequent classes are
//! boosted during training, which moves the test-time logits toward rare (replayed) classes,
//! and a uniform class distribution leaves plain cross-entropy. The weights `1/(K·p_c + 1)`
//! of the two code modes point the other way (smaller for frequent classes).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use qcl_data::Dataset;
use qcl_tensor::{Error, Result};

/// Label counts of the multiset a task learns from, `D_t ∪ R_{<t}` (docs/methods/lifequant.md
/// § BaLL): add the current task's data and every replayed item, then ask for the
/// [`ClassStatistics`].
///
/// Every `add_*` method checks its whole input first, so an error leaves the counts unchanged.
///
/// ```
/// use std::collections::BTreeMap;
/// use qcl_continual::ClassHistogram;
/// let mut histogram = ClassHistogram::new(4)?;
/// histogram.add_labels(&[0, 0, 1, 1, 1, 2])?; // the current task D_t
/// histogram.add_class_counts(&BTreeMap::from([(3, 2)]))?; // replay, e.g. ReplayBuffer::class_counts
/// assert_eq!(histogram.counts(), &[2, 3, 1, 2]);
/// let stats = histogram.statistics()?;
/// assert_eq!(stats.num_present(), 4);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassHistogram {
    counts: Vec<u64>,
}

impl ClassHistogram {
    /// An empty histogram over the classes `0..num_classes`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `num_classes` is 0.
    pub fn new(num_classes: usize) -> Result<Self> {
        check_num_classes(num_classes)?;
        Ok(Self {
            counts: vec![0; num_classes],
        })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.counts.len()
    }

    /// The count of every class, indexed by label.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Counts every label once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if a label is `≥ num_classes`.
    pub fn add_labels(&mut self, labels: &[u32]) -> Result<&mut Self> {
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &label)| label as usize >= self.counts.len())
        {
            return Err(Error::invalid_parameter(
                "labels",
                format!(
                    "label {label} at index {index} is not below the number of classes {}",
                    self.counts.len()
                ),
            ));
        }
        for &label in labels {
            self.counts[label as usize] += 1;
        }
        Ok(self)
    }

    /// Counts the labels of a data set (the current task's `D_t`, or a replay set `R_i` held as
    /// a [`Dataset`]).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if a label is `≥ num_classes`.
    pub fn add_dataset(&mut self, data: &Dataset) -> Result<&mut Self> {
        self.add_labels(data.labels())
    }

    /// Adds per-class counts given as a map from label to count, the form in which replay
    /// buffers report their content ([`ReplayBuffer::class_counts`](crate::ReplayBuffer::class_counts)).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if a label is `≥ num_classes`.
    pub fn add_class_counts(&mut self, counts: &BTreeMap<u32, usize>) -> Result<&mut Self> {
        if let Some((&label, _)) = counts
            .iter()
            .find(|(&label, _)| label as usize >= self.counts.len())
        {
            return Err(Error::invalid_parameter(
                "class_counts",
                format!(
                    "label {label} is not below the number of classes {}",
                    self.counts.len()
                ),
            ));
        }
        for (&label, &count) in counts {
            self.counts[label as usize] += count as u64;
        }
        Ok(self)
    }

    /// The [`ClassStatistics`] of the counts so far.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] if nothing has been counted.
    pub fn statistics(&self) -> Result<ClassStatistics> {
        ClassStatistics::from_counts(&self.counts, self.counts.len())
    }
}

/// Per-class statistics of a task's training multiset and the BaLL coefficients derived from
/// them (docs/methods/lifequant.md § BaLL).
///
/// With counts `n_c`, `N = Σ_c n_c`, `K = |{c : n_c > 0}|` and priors `p_c = n_c / N`:
///
/// - weights `w_c = 1 / (K·p_c + 1) = N / (K·n_c + N)` for present classes and `w_c = 1` for
///   absent ones. For present classes `w_c ∈ (0, 1)`, `Σ_present 1/w_c = 2K`, a uniform
///   distribution gives `w_c = 1/2`, and `w_c` strictly decreases as `n_c` grows;
/// - linear-prior factors `K·p_c − 1 = (K·n_c − N) / N`, the first-order expansion of
///   `log(K·p_c)`: 0 for every class of a uniform distribution, −1 for absent classes.
///
/// ```
/// use qcl_continual::ClassStatistics;
/// let stats = ClassStatistics::from_counts(&[3, 1, 0], 3)?;
/// assert_eq!((stats.total(), stats.num_present()), (4.0, 2));
/// assert_eq!(stats.priors(), vec![0.75, 0.25, 0.0]);
/// // w = 1/(2·0.75 + 1), 1/(2·0.25 + 1), and 1 for the absent class
/// assert_eq!(stats.weights(), &[0.4, 2.0 / 3.0, 1.0]);
/// assert_eq!(stats.linear_prior_factors(), &[0.5, -0.5, -1.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStatistics {
    counts: Vec<f64>,
    total: f64,
    present: usize,
    weights: Vec<f64>,
    linear_prior: Vec<f64>,
}

impl ClassStatistics {
    /// Statistics of integer label counts, `counts[c]` being the number of items of class `c`.
    ///
    /// # Errors
    /// - [`Error::InvalidParameter`] if `num_classes` is 0;
    /// - [`Error::ShapeMismatch`] unless `counts.len() == num_classes`;
    /// - [`Error::EmptyInput`] if every count is 0 (no distribution to balance).
    pub fn from_counts(counts: &[u64], num_classes: usize) -> Result<Self> {
        // Counts beyond 2^53 would lose precision; no data set is that large.
        let counts: Vec<f64> = counts.iter().map(|&n| n as f64).collect();
        Self::from_histogram(&counts, num_classes)
    }

    /// Statistics of a histogram with real-valued, non-negative counts (for example counts
    /// summed from a tensor, or weighted counts).
    ///
    /// # Errors
    /// - [`Error::InvalidParameter`] if `num_classes` is 0 or a count is negative;
    /// - [`Error::ShapeMismatch`] unless `histogram.len() == num_classes`;
    /// - [`Error::NonFinite`] if a count is NaN or infinite;
    /// - [`Error::EmptyInput`] if every count is 0 (no distribution to balance).
    pub fn from_histogram(histogram: &[f64], num_classes: usize) -> Result<Self> {
        check_num_classes(num_classes)?;
        if histogram.len() != num_classes {
            return Err(Error::ShapeMismatch {
                context: "class histogram".into(),
                expected: format!("[{num_classes}]"),
                actual: vec![histogram.len()],
            });
        }
        if let Some((index, &value)) = histogram.iter().enumerate().find(|(_, n)| !n.is_finite()) {
            return Err(Error::NonFinite {
                context: "class histogram".into(),
                index,
                value,
            });
        }
        if let Some((index, &value)) = histogram.iter().enumerate().find(|(_, &n)| n < 0.0) {
            return Err(Error::invalid_parameter(
                "histogram",
                format!("count {value} of class {index} is negative"),
            ));
        }
        let total: f64 = histogram.iter().sum();
        if total <= 0.0 {
            return Err(Error::EmptyInput(
                "class histogram: every count is 0, so there is no class distribution".into(),
            ));
        }
        if !total.is_finite() {
            return Err(Error::invalid_parameter(
                "histogram",
                format!("the counts sum to {total}, which is not finite"),
            ));
        }
        let present = histogram.iter().filter(|&&n| n > 0.0).count();
        let k = present as f64;
        // N / (K·n + N) rather than 1 / (K·n/N + 1): one rounding fewer, and exactly 1/2 for
        // a uniform distribution (K·n = N) whatever N is.
        let weights = histogram
            .iter()
            .map(|&n| {
                if n > 0.0 {
                    total / (k * n + total)
                } else {
                    1.0
                }
            })
            .collect();
        // (K·n − N) / N is exactly 0 when K·n = N, so the paper's mode is exactly
        // cross-entropy on a uniform distribution.
        let linear_prior = histogram.iter().map(|&n| (k * n - total) / total).collect();
        Ok(Self {
            counts: histogram.to_vec(),
            total,
            present,
            weights,
            linear_prior,
        })
    }

    /// Statistics of the label multiset `D_t ∪ R_0 ∪ … ∪ R_{t−1}` (docs/methods/lifequant.md
    /// § BaLL): the current task's data and the replay sets of the earlier tasks.
    ///
    /// # Errors
    /// As [`ClassHistogram::add_labels`] and [`ClassHistogram::statistics`].
    pub fn for_task<'a>(
        current: &Dataset,
        replay: impl IntoIterator<Item = &'a Dataset>,
        num_classes: usize,
    ) -> Result<Self> {
        let mut histogram = ClassHistogram::new(num_classes)?;
        histogram.add_dataset(current)?;
        for data in replay {
            histogram.add_dataset(data)?;
        }
        histogram.statistics()
    }

    /// Number of classes `C` (the width of the logits).
    pub fn num_classes(&self) -> usize {
        self.counts.len()
    }

    /// The counts `n_c`.
    pub fn counts(&self) -> &[f64] {
        &self.counts
    }

    /// `N = Σ_c n_c`.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// `K`, the number of classes with `n_c > 0`.
    pub fn num_present(&self) -> usize {
        self.present
    }

    /// The priors `p_c = n_c / N`.
    pub fn priors(&self) -> Vec<f64> {
        self.counts.iter().map(|&n| n / self.total).collect()
    }

    /// The weights `w_c = 1 / (K·p_c + 1)` of present classes, 1 for absent classes.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The factors `K·p_c − 1` (−1 for absent classes, since `p_c = 0`).
    pub fn linear_prior_factors(&self) -> &[f64] {
        &self.linear_prior
    }

    /// The per-class coefficient `mode` uses: the linear-prior factors for
    /// [`BallMode::PaperLinearPrior`], the weights for the two code modes.
    pub fn coefficients(&self, mode: BallMode) -> &[f64] {
        match mode {
            BallMode::PaperLinearPrior => &self.linear_prior,
            BallMode::CodeAdditive | BallMode::CodeMultiplicative => &self.weights,
        }
    }
}

/// How [`BallLoss`] adjusts the logits `z` (with `σ = softmax(z)` over the classes and
/// per-class coefficients `a_c` from [`ClassStatistics::coefficients`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BallMode {
    /// The paper's rebalancing factor, `z'_c = z_c + σ_c·(K·p_c − 1)`: a linearised log-prior
    /// adjustment. A uniform class distribution gives plain cross-entropy exactly.
    ///
    /// The default: the paper-faithful pipeline trains on `D_t ∪ R_{<t}` with this mode,
    /// whose direction (frequent classes boosted during training, so rare replayed classes
    /// win at test time) matches the paper's stated purpose; the code's weights point the
    /// other way (docs/methods/lifequant.md § Paper versus code).
    #[default]
    PaperLinearPrior,
    /// The released code's additive form (ResNet-20 and ResNet-50 folders, MobileNet on
    /// Office/ImageCLEF): `z'_c = z_c + w_c·σ_c` with `w_c = 1 / (K·p_c + 1)`.
    CodeAdditive,
    /// The released code's multiplicative form (MobileNet-V2 on CIFAR only):
    /// `z'_c = w_c·z_c`.
    CodeMultiplicative,
}

impl BallMode {
    /// `z'` for logits `z` of shape `[B, C]` and one coefficient `a_c` per class: `z + a ⊙ σ(z)`
    /// for the additive modes, `a ⊙ z` for the multiplicative one. The result stays on the
    /// candle graph; the gradient also flows through `σ`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `logits` is `[B, C]` with `C = coefficients.len()`;
    /// [`Error::DTypeMismatch`] unless `logits` is a float tensor.
    pub fn adjust(self, logits: &Tensor, coefficients: &[f64]) -> Result<Tensor> {
        let (_, classes) = logits_dims(logits)?;
        if classes != coefficients.len() {
            return Err(Error::ShapeMismatch {
                context: "BaLL logits (one column per class coefficient)".into(),
                expected: format!("[*, {}]", coefficients.len()),
                actual: logits.dims().to_vec(),
            });
        }
        let a = Tensor::from_vec(coefficients.to_vec(), (1, classes), logits.device())?
            .to_dtype(logits.dtype())?;
        Ok(match self {
            BallMode::PaperLinearPrior | BallMode::CodeAdditive => {
                (logits + softmax_rows(logits)?.broadcast_mul(&a)?)?
            }
            BallMode::CodeMultiplicative => logits.broadcast_mul(&a)?,
        })
    }
}

/// LifeQuant's Balanced Lifelong Learning loss: the batch mean of the cross-entropy of
/// adjusted logits,
///
/// `L_BaLL = (1/B)·Σ_i −log softmax(z'_i)_{y_i}`,
///
/// with `z'` from [`BallMode::adjust`] and the coefficients of a [`ClassStatistics`].
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use qcl_continual::{BallLoss, BallMode, ClassStatistics};
/// let logits = Var::new(&[[2.0f64, 0.5, -1.0], [0.0, 1.0, 0.0]], &Device::Cpu)?;
/// let labels = Tensor::new(&[0u32, 2], &Device::Cpu)?;
///
/// // A uniform distribution: the paper's mode (the default) is plain cross-entropy.
/// let uniform = ClassStatistics::from_counts(&[5, 5, 5], 3)?;
/// let ball = BallLoss::default().loss(&logits, &labels, &uniform)?;
/// let ce = qcl_continual::ball::cross_entropy(&logits, &labels)?;
/// assert_eq!(ball.to_scalar::<f64>()?, ce.to_scalar::<f64>()?);
///
/// // An imbalanced one: the loss is a graph node and backpropagates.
/// let stats = ClassStatistics::from_counts(&[8, 1, 1], 3)?;
/// let loss = BallLoss::new(BallMode::CodeAdditive).loss(&logits, &labels, &stats)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 3]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BallLoss {
    /// How the logits are adjusted; default [`BallMode::PaperLinearPrior`].
    pub mode: BallMode,
}

impl BallLoss {
    /// BaLL with the given mode.
    pub fn new(mode: BallMode) -> Self {
        Self { mode }
    }

    /// The adjusted logits `z'` (shape `[B, C]`) for `stats`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `logits` is `[B, C]` with `C = stats.num_classes()`;
    /// [`Error::DTypeMismatch`] unless `logits` is a float tensor.
    pub fn adjusted_logits(&self, logits: &Tensor, stats: &ClassStatistics) -> Result<Tensor> {
        self.mode.adjust(logits, stats.coefficients(self.mode))
    }

    /// `L_BaLL`, a scalar on the candle graph: the mean over the batch of the cross-entropy of
    /// the adjusted logits against `labels` (shape `[B]`, integer class indices).
    ///
    /// # Errors
    /// - [`Error::ShapeMismatch`] unless `logits` is `[B, C]` with `C = stats.num_classes()`
    ///   and `labels` is `[B]`;
    /// - [`Error::EmptyInput`] if `B = 0`;
    /// - [`Error::DTypeMismatch`] unless `logits` is float and `labels` integer;
    /// - [`Error::InvalidParameter`] if a label is negative or `≥ C`.
    pub fn loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        stats: &ClassStatistics,
    ) -> Result<Tensor> {
        self.loss_with_coefficients(logits, labels, stats.coefficients(self.mode))
    }

    /// [`loss`](Self::loss) with explicit per-class coefficients `a_c` in place of those of a
    /// [`ClassStatistics`] (for example all-ones weights).
    ///
    /// # Errors
    /// As [`loss`](Self::loss), with `C = coefficients.len()`.
    pub fn loss_with_coefficients(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        coefficients: &[f64],
    ) -> Result<Tensor> {
        // Labels first: a bad batch is reported before any graph work.
        let (batch, classes) = logits_dims(logits)?;
        let index = label_index(labels, batch, classes)?;
        let adjusted = self.mode.adjust(logits, coefficients)?;
        nll_mean(&adjusted, &index)
    }
}

/// Mean cross-entropy `(1/B)·Σ_i −log softmax(z_i)_{y_i}` of logits `[B, C]` against integer
/// labels `[B]`, computed the way [`BallLoss`] computes it on the adjusted logits (a
/// max-shifted log-softmax), so that a vanishing adjustment gives bit-identical values.
///
/// # Errors
/// As [`BallLoss::loss`].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (batch, classes) = logits_dims(logits)?;
    let index = label_index(labels, batch, classes)?;
    nll_mean(logits, &index)
}

fn check_num_classes(num_classes: usize) -> Result<()> {
    if num_classes == 0 {
        return Err(Error::invalid_parameter(
            "num_classes",
            "there must be at least one class",
        ));
    }
    Ok(())
}

/// `(B, C)` of float logits `[B, C]` with `B, C ≥ 1`.
fn logits_dims(logits: &Tensor) -> Result<(usize, usize)> {
    let &[batch, classes] = logits.dims() else {
        return Err(Error::ShapeMismatch {
            context: "BaLL logits".into(),
            expected: "[B, C]".into(),
            actual: logits.dims().to_vec(),
        });
    };
    if !logits.dtype().is_float() {
        return Err(Error::DTypeMismatch {
            context: "BaLL logits".into(),
            expected: DType::F32,
            actual: logits.dtype(),
        });
    }
    if batch == 0 {
        return Err(Error::EmptyInput("BaLL logits: the batch is empty".into()));
    }
    if classes == 0 {
        return Err(Error::ShapeMismatch {
            context: "BaLL logits (at least one class)".into(),
            expected: "[B, C] with C ≥ 1".into(),
            actual: logits.dims().to_vec(),
        });
    }
    Ok((batch, classes))
}

/// Checks integer labels `[B]` in `0..C` and returns them as a `[B, 1]` `u32` index for
/// `gather`.
fn label_index(labels: &Tensor, batch: usize, classes: usize) -> Result<Tensor> {
    if labels.dims() != [batch] {
        return Err(Error::ShapeMismatch {
            context: "BaLL labels (one per row of the logits)".into(),
            expected: format!("[{batch}]"),
            actual: labels.dims().to_vec(),
        });
    }
    if !labels.dtype().is_int() {
        return Err(Error::DTypeMismatch {
            context: "BaLL labels".into(),
            expected: DType::U32,
            actual: labels.dtype(),
        });
    }
    // Out-of-range indices would make `gather` fail deep in a kernel (or read garbage on a
    // GPU), so the labels are checked on the host; they are B integers, a negligible copy.
    let values = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some((index, &label)) = values
        .iter()
        .enumerate()
        .find(|(_, &y)| y < 0 || y as u64 >= classes as u64)
    {
        return Err(Error::invalid_parameter(
            "labels",
            format!("label {label} at index {index} is not in 0..{classes}"),
        ));
    }
    Ok(labels.to_dtype(DType::U32)?.reshape((batch, 1))?)
}

/// Row-wise softmax. The subtracted maximum is detached: softmax does not depend on it, so
/// its gradient contribution is exactly zero and need not be built.
fn softmax_rows(z: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(1)?.detach();
    let e = z.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(1)?)?)
}

/// Mean over the batch of `−log softmax(z)_{y}`.
fn nll_mean(z: &Tensor, index: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(1)?.detach();
    let shifted = z.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(index, 1)?;
    Ok((log_sum - picked)?.mean_all()?)
}
