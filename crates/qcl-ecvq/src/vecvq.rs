//! VECVQ: the entropy-constrained vector quantizer trained by stochastic gradient descent
//! (Ballé et al., "Nonlinear Transform Coding", IEEE J-STSP 2021).

use std::time::Instant;

use candle_core::{Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use qcl_nn::schedule::{LrSchedule, Piecewise};
use qcl_tensor::{nearest_codes_into, Error, Result, Seed, SeededRng};
use rand::Rng;

use crate::quantizer::check_lambda;
use crate::{Distortion, Ecvq, Source};

/// How the codebook starts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CodebookInit {
    /// `K` draws from the source (TF's `sample`; the default).
    #[default]
    Sample,
    /// `K` draws from the source plus `N(0, std²)` noise (TF's `sample-σ`).
    SampleWithNoise {
        /// Standard deviation of the noise.
        std: f64,
    },
    /// Uniform on `[−width/2, width/2]^d` (TF's `uniform-W`).
    Uniform {
        /// Side of the cube.
        width: f64,
    },
}

/// Every knob of VECVQ training, each with a default (see [`VecvqConfig::new`]): the recipe
/// of the scaled-down reproduction (TF's model and initialisation, Adam without weight decay,
/// lr `1e-2` with TF's piecewise decay, fresh samples every step).
///
/// ```
/// use qcl_ecvq::VecvqConfig;
/// let params = VecvqConfig { steps: 2_000, ..VecvqConfig::new(8.0) };
/// assert_eq!(params.codes, 256);
/// assert_eq!(params.batch_size, 1024);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VecvqConfig {
    /// Number of codes `K` (default 256).
    pub codes: usize,
    /// Multiplier λ of the distortion in `R + λ·D` (larger λ, higher rate).
    pub lambda: f64,
    /// Distortion measure (default [`Distortion::Sse`]).
    pub distortion: Distortion,
    /// Codebook initialisation (default [`CodebookInit::Sample`]).
    pub codebook_init: CodebookInit,
    /// Standard deviation of the initial raw logits `φ ~ N(0, σ²)` (default 0.1, TF's
    /// `logit_scale/10`).
    pub logit_init_std: f64,
    /// The logits are `θ = φ / logit_scale` (default 1).
    pub logit_scale: f64,
    /// Samples per step (default 1024).
    pub batch_size: usize,
    /// Optimizer steps (default 10,000).
    pub steps: usize,
    /// Adam's initial learning rate (default `1e-2`).
    pub learning_rate: f64,
    /// `(fraction of steps, factor)`: from step `⌈fraction·steps⌉` on the rate is
    /// `learning_rate·factor` (default TF's `[(0.5, 0.1), (0.75, 0.01), (0.875, 0.001)]`).
    pub lr_decay: Vec<(f64, f64)>,
    /// Adam's β₁ (default 0.9).
    pub beta1: f64,
    /// Adam's β₂ (default 0.999).
    pub beta2: f64,
    /// Adam's ε (default `1e-7`, Keras's). There is no weight decay.
    pub adam_epsilon: f64,
    /// Seed of the initialisation and of the training samples (default 0).
    pub seed: Seed,
    /// Show a progress bar on standard error (default false).
    pub show_progress: bool,
}

impl VecvqConfig {
    /// The defaults, with multiplier `lambda`.
    pub fn new(lambda: f64) -> Self {
        VecvqConfig {
            codes: 256,
            lambda,
            distortion: Distortion::Sse,
            codebook_init: CodebookInit::Sample,
            logit_init_std: 0.1,
            logit_scale: 1.0,
            batch_size: 1024,
            steps: 10_000,
            learning_rate: 1e-2,
            lr_decay: vec![(0.5, 0.1), (0.75, 0.01), (0.875, 0.001)],
            beta1: 0.9,
            beta2: 0.999,
            adam_epsilon: 1e-7,
            seed: Seed::new(0),
            show_progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        check_lambda(self.lambda)?;
        if self.codes == 0 {
            return Err(Error::invalid_parameter("codes", "K must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid_parameter("batch_size", "must be at least 1"));
        }
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid_parameter(
                    name,
                    format!("must be finite and > 0, got {v}"),
                ))
            }
        };
        positive("logit_scale", self.logit_scale)?;
        positive("learning_rate", self.learning_rate)?;
        positive("adam_epsilon", self.adam_epsilon)?;
        if !(self.logit_init_std.is_finite() && self.logit_init_std >= 0.0) {
            return Err(Error::invalid_parameter(
                "logit_init_std",
                format!("must be finite and >= 0, got {}", self.logit_init_std),
            ));
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be in [0, 1), got {beta}"),
                ));
            }
        }
        match self.codebook_init {
            CodebookInit::SampleWithNoise { std } if !(std.is_finite() && std >= 0.0) => {
                return Err(Error::invalid_parameter(
                    "codebook_init",
                    format!("noise std must be finite and >= 0, got {std}"),
                ))
            }
            CodebookInit::Uniform { width } if !(width.is_finite() && width > 0.0) => {
                return Err(Error::invalid_parameter(
                    "codebook_init",
                    format!("width must be finite and > 0, got {width}"),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// The learning-rate schedule over the steps.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for decay fractions outside `[0, 1]` or not increasing.
    pub fn schedule(&self) -> Result<Piecewise> {
        Piecewise::fractions(self.learning_rate, self.steps, &self.lr_decay)
    }
}

/// Gradients of the batch loss, in closed form (see [`Vecvq::gradients`]).
#[derive(Debug, Clone, PartialEq)]
pub struct VecvqGradients {
    /// Batch loss `mean(r_{k*} + λ·d(x, c_{k*}))`.
    pub loss: f64,
    /// `∂L/∂c`, row-major `[K, d]`.
    pub codebook: Vec<f64>,
    /// `∂L/∂φ` of the raw logits.
    pub logits: Vec<f64>,
    /// Mean code length `r_{k*}` of the batch.
    pub rate_bits: f64,
    /// Mean distortion `d(x, c_{k*})` of the batch (in the trained measure).
    pub distortion: f64,
    /// Assignments per code.
    pub histogram: Vec<u32>,
}

/// A point of the training curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingPoint {
    /// Steps taken.
    pub step: usize,
    /// Batch loss `R + λD`.
    pub loss: f64,
    /// Batch rate, bits per vector.
    pub rate_bits: f64,
    /// Batch distortion.
    pub distortion: f64,
    /// Codes chosen in the batch.
    pub used_codes: usize,
}

/// The record of [`Vecvq::fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct VecvqTraining {
    /// The batch statistics every [`VecvqTraining::EVERY`] steps and at the last step.
    pub curve: Vec<TrainingPoint>,
    /// Wall time of the training loop, in seconds.
    pub train_seconds: f64,
}

impl VecvqTraining {
    /// Interval of the recorded curve, in steps.
    pub const EVERY: usize = 100;
}

/// Adam's moment estimates for one parameter vector.
#[derive(Debug, Clone, PartialEq)]
struct AdamMoments {
    first: Vec<f64>,
    second: Vec<f64>,
}

impl AdamMoments {
    fn new(len: usize) -> Self {
        AdamMoments {
            first: vec![0.0; len],
            second: vec![0.0; len],
        }
    }

    /// One bias-corrected Adam update (PyTorch's form, no weight decay) at step `t ≥ 1`.
    fn update(&mut self, values: &mut [f64], grads: &[f64], lr: f64, p: &VecvqConfig, t: u64) {
        let correction1 = 1.0 - p.beta1.powf(t as f64);
        let correction2 = 1.0 - p.beta2.powf(t as f64);
        for ((v, g), (m, s)) in values
            .iter_mut()
            .zip(grads)
            .zip(self.first.iter_mut().zip(self.second.iter_mut()))
        {
            *m = p.beta1 * *m + (1.0 - p.beta1) * g;
            *s = p.beta2 * *s + (1.0 - p.beta2) * g * g;
            *v -= lr * (*m / correction1) / ((*s / correction2).sqrt() + p.adam_epsilon);
        }
    }
}

/// The VECVQ model being trained: codebook `C ∈ R^{K×d}` and raw logits `φ`, prior
/// `p = softmax(φ / logit_scale)`, code lengths `r_k = −log₂ p_k`.
///
/// One step draws a batch, assigns each `x` to `k* = argmin_k r_k + λ·d(x, c_k)` (computed with
/// the current parameters and then held fixed: no straight-through estimator, no soft
/// assignment), and descends the batch loss `L = mean(r_{k*} + λ·d(x, c_{k*}))` with Adam.
/// Its gradients have a closed form ([`Vecvq::gradients`]):
///
/// ```text
/// ∂L/∂c_k = (λ/B)·Σ_{x: k*(x)=k} 2(c_k − x)·s        (s = 1 for SSE, 1/d for MSE)
/// ∂L/∂θ   = (p − q̂) / ln 2                            (q̂: batch histogram / B)
/// ```
///
/// so a stationary point has `p = q` and centroids `c_k = E[X | k*=k]`, the fixed point of the
/// Chou–Lookabaugh–Gray algorithm ([`crate::ClgEcvq`]). Codes that never win see their logit
/// pushed down every step and drop out (implicit pruning).
///
/// ```
/// use qcl_ecvq::{Source, Vecvq, VecvqConfig};
/// use qcl_tensor::Seed;
/// let params = VecvqConfig { codes: 32, steps: 300, batch_size: 256, ..VecvqConfig::new(4.0) };
/// let (model, training) = Vecvq::fit(Source::Gaussian, &params)?;
/// assert_eq!(training.curve.last().unwrap().step, 300);
/// let eval = model.quantizer()?.evaluate(Source::Gaussian, 20_000, Seed::new(1))?;
/// assert!(eval.distortion > Source::Gaussian.distortion_bound(eval.rate_bits));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Vecvq {
    dim: usize,
    params: VecvqConfig,
    codebook: Vec<f64>,
    logits: Vec<f64>,
    codebook_moments: AdamMoments,
    logit_moments: AdamMoments,
    steps_taken: u64,
    /// Scratch for the kernel, kept across steps.
    codebook_f32: Vec<f32>,
    indices: Vec<u32>,
    scores: Vec<f32>,
}

impl Vecvq {
    /// A model of dimension `dim` with the given initial codebook (row-major `[K, dim]`,
    /// `K = config.codes`) and logits drawn from `config.seed`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for invalid parameters (λ ≤ 0 or not finite, `K = 0`,
    /// ...); [`Error::ShapeMismatch`] for a codebook of another size; [`Error::NonFinite`].
    pub fn new(dim: usize, codebook: Vec<f32>, config: &VecvqConfig) -> Result<Self> {
        config.validate()?;
        if dim == 0 {
            return Err(Error::invalid_parameter("dim", "must be at least 1"));
        }
        if codebook.len() != config.codes * dim {
            return Err(Error::ShapeMismatch {
                context: "initial codebook".into(),
                expected: format!("[{}, {dim}]", config.codes),
                actual: vec![codebook.len()],
            });
        }
        qcl_tensor::check_finite_slice("initial codebook", &codebook)?;
        let mut rng = config.seed.child_named("logits").rng();
        let logits = (0..config.codes)
            .map(|_| config.logit_init_std * rng.sample::<f64, _>(rand_distr::StandardNormal))
            .collect();
        let k = config.codes;
        Ok(Vecvq {
            dim,
            params: config.clone(),
            codebook: codebook.iter().map(|&c| f64::from(c)).collect(),
            logits,
            codebook_moments: AdamMoments::new(k * dim),
            logit_moments: AdamMoments::new(k),
            steps_taken: 0,
            codebook_f32: codebook,
            indices: Vec::new(),
            scores: Vec::new(),
        })
    }

    /// A model for `source`, its codebook initialised as `config.codebook_init` says (the
    /// draws come from `config.seed`).
    ///
    /// # Errors
    /// As [`Vecvq::new`].
    pub fn for_source(source: Source, config: &VecvqConfig) -> Result<Self> {
        config.validate()?;
        let dim = source.dim();
        let mut rng = config.seed.child_named("codebook").rng();
        let codebook = match config.codebook_init {
            CodebookInit::Sample => source.sample(config.codes, &mut rng),
            CodebookInit::SampleWithNoise { std } => {
                let mut c = source.sample(config.codes, &mut rng);
                for v in &mut c {
                    *v += (std * rng.sample::<f64, _>(rand_distr::StandardNormal)) as f32;
                }
                c
            }
            CodebookInit::Uniform { width } => (0..config.codes * dim)
                .map(|_| {
                    ((rng.sample::<f64, _>(rand::distr::StandardUniform) - 0.5) * width) as f32
                })
                .collect(),
        };
        Vecvq::new(dim, codebook, config)
    }

    /// Trains a model on fresh draws of `source` for `config.steps` steps (samples from
    /// `config.seed`), following the learning-rate schedule.
    ///
    /// # Errors
    /// As [`Vecvq::new`], or [`Error::InvalidParameter`] for a bad schedule.
    pub fn fit(source: Source, config: &VecvqConfig) -> Result<(Self, VecvqTraining)> {
        let mut model = Vecvq::for_source(source, config)?;
        let training = model.train_with(|batch, rng| source.sample_into(batch, rng))?;
        Ok((model, training))
    }

    /// Runs `params.steps` steps, each on a batch `sample` fills (row-major
    /// `[batch_size, dim]`) from the training RNG (`params.seed`'s child `"samples"`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad schedule; the errors of [`Vecvq::step`].
    pub fn train_with(
        &mut self,
        mut sample: impl FnMut(&mut [f32], &mut SeededRng),
    ) -> Result<VecvqTraining> {
        let schedule = self.params.schedule()?;
        let steps = self.params.steps;
        let mut rng = self.params.seed.child_named("samples").rng();
        let mut batch = vec![0f32; self.params.batch_size * self.dim];
        let progress = if self.params.show_progress {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "vecvq {bar:30} {pos}/{len} steps, loss {msg} ({eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let started = Instant::now();
        let mut curve = Vec::new();
        for step in 0..steps {
            sample(&mut batch, &mut rng);
            let stats = self.step(&batch, schedule.lr_at(step))?;
            let done = step + 1;
            if done % VecvqTraining::EVERY == 0 || done == steps {
                progress.set_message(format!("{:.4}", stats.loss));
                curve.push(TrainingPoint {
                    step: done,
                    loss: stats.loss,
                    rate_bits: stats.rate_bits,
                    distortion: stats.distortion,
                    used_codes: stats.histogram.iter().filter(|&&c| c > 0).count(),
                });
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(VecvqTraining {
            curve,
            train_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One Adam step on `batch` (row-major `[n, dim]`) with learning rate `learning_rate`;
    /// returns the gradients it used (and the batch statistics).
    ///
    /// # Errors
    /// The errors of [`Vecvq::gradients`].
    pub fn step(&mut self, batch: &[f32], learning_rate: f64) -> Result<VecvqGradients> {
        let grads = self.gradients(batch)?;
        self.steps_taken += 1;
        let t = self.steps_taken;
        self.codebook_moments.update(
            &mut self.codebook,
            &grads.codebook,
            learning_rate,
            &self.params,
            t,
        );
        self.logit_moments.update(
            &mut self.logits,
            &grads.logits,
            learning_rate,
            &self.params,
            t,
        );
        for (dst, &src) in self.codebook_f32.iter_mut().zip(&self.codebook) {
            *dst = src as f32;
        }
        Ok(grads)
    }

    /// The batch loss and its closed-form gradients (see the type's documentation).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a batch that is not whole rows, [`Error::EmptyInput`] for
    /// an empty one, [`Error::NonFinite`].
    pub fn gradients(&mut self, batch: &[f32]) -> Result<VecvqGradients> {
        let dim = self.dim;
        if batch.is_empty() {
            return Err(Error::EmptyInput("an empty training batch".into()));
        }
        let n = batch.len() / dim;
        let k = self.params.codes;
        let rates = self.rates_bits();
        let probabilities: Vec<f64> = rates.iter().map(|r| (-r).exp2()).collect();
        let scale = self.params.distortion.scale(dim);
        let lambda = self.params.lambda;
        let bias: Vec<f32> = rates
            .iter()
            .map(|r| (r / (lambda * scale)) as f32)
            .collect();
        self.indices.resize(n, 0);
        self.scores.resize(n, 0.0);
        nearest_codes_into(
            batch,
            &self.codebook_f32,
            dim,
            Some(&bias),
            &mut self.indices,
            &mut self.scores,
        )?;
        let mut histogram = vec![0u32; k];
        let mut codebook_grad = vec![0f64; k * dim];
        let (mut rate_sum, mut distortion_sum) = (0f64, 0f64);
        let factor = 2.0 * lambda * scale / n as f64;
        for (x, &j) in batch.chunks_exact(dim).zip(&self.indices) {
            let j = j as usize;
            histogram[j] += 1;
            rate_sum += rates[j];
            let code = &self.codebook[j * dim..(j + 1) * dim];
            let grad = &mut codebook_grad[j * dim..(j + 1) * dim];
            let mut sse = 0.0;
            for ((g, &c), &v) in grad.iter_mut().zip(code).zip(x) {
                let diff = c - f64::from(v);
                sse += diff * diff;
                *g += factor * diff;
            }
            distortion_sum += sse * scale;
        }
        let ln2 = std::f64::consts::LN_2;
        let logit_grad = probabilities
            .iter()
            .zip(&histogram)
            .map(|(&p, &count)| (p - f64::from(count) / n as f64) / ln2 / self.params.logit_scale)
            .collect();
        let rate_bits = rate_sum / n as f64;
        let distortion = distortion_sum / n as f64;
        Ok(VecvqGradients {
            loss: rate_bits + lambda * distortion,
            codebook: codebook_grad,
            logits: logit_grad,
            rate_bits,
            distortion,
            histogram,
        })
    }

    /// Code lengths `r_k = (logsumexp(θ) − θ_k)/ln 2` in bits, from a stable log-softmax.
    pub fn rates_bits(&self) -> Vec<f64> {
        let scale = self.params.logit_scale;
        let max = self
            .logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &l| m.max(l / scale));
        let lse = max
            + self
                .logits
                .iter()
                .map(|&l| (l / scale - max).exp())
                .sum::<f64>()
                .ln();
        self.logits
            .iter()
            .map(|&l| (lse - l / scale) / std::f64::consts::LN_2)
            .collect()
    }

    /// The codebook, row-major `[K, d]`.
    pub fn codebook(&self) -> Vec<f32> {
        self.codebook_f32.clone()
    }

    /// The raw logits `φ`.
    pub fn logits(&self) -> &[f64] {
        &self.logits
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The training parameters.
    pub fn params(&self) -> &VecvqConfig {
        &self.params
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// The trained quantizer (all `K` codes, lengths from the learned prior).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if a code's probability underflowed to zero.
    pub fn quantizer(&self) -> Result<Ecvq> {
        Ecvq::new(
            self.dim,
            self.codebook(),
            self.rates_bits(),
            self.params.lambda,
            self.params.distortion,
        )
    }
}

/// The VECVQ batch loss as a candle graph, for autograd: with `indices` the assignments
/// `k*(x)` (held fixed), `mean_i(r_{k*_i} + λ·s·‖x_i − c_{k*_i}‖²)` where
/// `r = (logsumexp(θ) − θ)/ln 2`. Its gradients equal [`Vecvq::gradients`]'s closed form.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let codebook = Var::new(&[[0f32, 0.0], [1.0, 1.0]], &Device::Cpu)?;
/// let logits = Var::new(&[0f32, 0.0], &Device::Cpu)?;
/// let x = Tensor::new(&[[0.1f32, 0.0], [0.9, 1.0]], &Device::Cpu)?;
/// let indices = Tensor::new(&[0u32, 1], &Device::Cpu)?;
/// let loss = qcl_ecvq::vecvq_loss(&codebook, &logits, &x, &indices, 2.0, 1.0)?;
/// // Both codes cost 1 bit; both points are 0.1 away from theirs.
/// assert!((loss.to_scalar::<f32>()? - (1.0 + 2.0 * 0.01)).abs() < 1e-6);
/// let grads = loss.backward()?;
/// assert!(grads.get(&codebook).is_some());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// A candle error for inconsistent shapes.
pub fn vecvq_loss(
    codebook: &Tensor,
    logits: &Tensor,
    x: &Tensor,
    indices: &Tensor,
    lambda: f64,
    distortion_scale: f64,
) -> Result<Tensor> {
    let log_norm = logits.log_sum_exp(D::Minus1)?;
    let rates = (log_norm.broadcast_sub(logits)? / std::f64::consts::LN_2)?;
    let chosen_rates = rates.index_select(indices, 0)?;
    let chosen_codes = codebook.index_select(indices, 0)?;
    let sse = (x - chosen_codes)?.sqr()?.sum(D::Minus1)?;
    let per_sample = (chosen_rates + (sse * (lambda * distortion_scale))?)?;
    Ok(per_sample.mean_all()?)
}
