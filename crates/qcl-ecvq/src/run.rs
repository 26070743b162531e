//! One experiment point: train a quantizer on a source with either method and evaluate it.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use qcl_tensor::{Error, Result, Seed};

use crate::{ClgConfig, ClgEcvq, Ecvq, Evaluation, Source, Vecvq, VecvqConfig};

/// Which design algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// [`Vecvq`]: Adam on fresh samples.
    Vecvq,
    /// [`ClgEcvq`]: Lloyd iterations on a fixed training set.
    Clg,
}

impl Method {
    /// `vecvq` or `clg`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Vecvq => "vecvq",
            Method::Clg => "clg",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "vecvq" => Ok(Method::Vecvq),
            "clg" => Ok(Method::Clg),
            _ => Err(Error::invalid_parameter(
                "method",
                format!("unknown method `{s}`; expected vecvq or clg"),
            )),
        }
    }
}

/// Everything one run needs; [`RunConfig::new`] gives the scaled-down reproduction's recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The source.
    pub source: Source,
    /// The method.
    pub method: Method,
    /// VECVQ's parameters (used when `method` is VECVQ).
    pub vecvq: VecvqConfig,
    /// CLG's parameters (used when `method` is CLG).
    pub clg: ClgConfig,
    /// Size of CLG's fixed training set (default 200,000), drawn from the child `"clg-train"`
    /// of CLG's seed.
    pub clg_samples: usize,
    /// Fresh evaluation samples (default 1,000,000).
    pub eval_samples: usize,
    /// Seed of the evaluation samples (default 82913749, fixed across runs as in the
    /// reference).
    pub eval_seed: Seed,
}

impl RunConfig {
    /// The defaults for `source`, `method` and multiplier `lambda`.
    pub fn new(source: Source, method: Method, lambda: f64) -> Self {
        RunConfig {
            source,
            method,
            vecvq: VecvqConfig::new(lambda),
            clg: ClgConfig::new(lambda),
            clg_samples: 200_000,
            eval_samples: 1_000_000,
            eval_seed: Seed::new(82_913_749),
        }
    }
}

impl RunConfig {
    /// λ of the chosen method.
    pub fn lambda(&self) -> f64 {
        match self.method {
            Method::Vecvq => self.vecvq.lambda,
            Method::Clg => self.clg.lambda,
        }
    }

    /// Initial number of codes `K` of the chosen method.
    pub fn codes(&self) -> usize {
        match self.method {
            Method::Vecvq => self.vecvq.codes,
            Method::Clg => self.clg.codes,
        }
    }

    /// Training seed of the chosen method.
    pub fn seed(&self) -> Seed {
        match self.method {
            Method::Vecvq => self.vecvq.seed,
            Method::Clg => self.clg.seed,
        }
    }

    /// Sets `K` for both methods, so that switching `method` keeps it.
    pub fn set_codes(&mut self, codes: usize) {
        self.vecvq.codes = codes;
        self.clg.codes = codes;
    }

    /// Sets the training seed for both methods.
    pub fn set_seed(&mut self, seed: Seed) {
        self.vecvq.seed = seed;
        self.clg.seed = seed;
    }

    /// Shows (or hides) both methods' progress bars.
    pub fn set_show_progress(&mut self, show: bool) {
        self.vecvq.show_progress = show;
        self.clg.show_progress = show;
    }
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The configuration.
    pub config: RunConfig,
    /// The trained quantizer.
    pub quantizer: Ecvq,
    /// Its evaluation on the fresh samples.
    pub evaluation: Evaluation,
    /// Wall time of training (VECVQ's steps, sampling included; CLG's iterations, without
    /// drawing the training set).
    pub train_seconds: f64,
    /// Wall time of the evaluation (sampling, encoding and entropy coding).
    pub eval_seconds: f64,
    /// VECVQ's steps or CLG's iterations.
    pub iterations: usize,
}

/// Trains and evaluates one quantizer.
///
/// ```
/// use qcl_ecvq::{run, Method, RunConfig, Source};
/// let mut config = RunConfig::new(Source::Gaussian, Method::Clg, 4.0);
/// config.clg.codes = 32;
/// config.clg_samples = 10_000;
/// config.eval_samples = 10_000;
/// let report = run(&config)?;
/// assert!(report.evaluation.used_codes <= 32);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// The errors of [`Vecvq::fit`], [`ClgEcvq::fit`] and [`Ecvq::evaluate`].
pub fn run(config: &RunConfig) -> Result<RunReport> {
    let (quantizer, train_seconds, iterations) = match config.method {
        Method::Vecvq => {
            let (model, training) = Vecvq::fit(config.source, &config.vecvq)?;
            (
                model.quantizer()?,
                training.train_seconds,
                config.vecvq.steps,
            )
        }
        Method::Clg => {
            let data = config.source.sample(
                config.clg_samples,
                &mut config.clg.seed.child_named("clg-train").rng(),
            );
            let model = ClgEcvq::fit(&data, config.source.dim(), &config.clg)?;
            (model.quantizer, model.train_seconds, model.iterations)
        }
    };
    let started = Instant::now();
    let evaluation = quantizer.evaluate(config.source, config.eval_samples, config.eval_seed)?;
    Ok(RunReport {
        config: config.clone(),
        quantizer,
        evaluation,
        train_seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
        iterations,
    })
}
