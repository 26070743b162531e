//! `qcl ecvq`: train an entropy-constrained vector quantizer on a toy source and report rate,
//! entropy, real coded size, distortion and the gap to the Shannon bound.

use std::path::PathBuf;

use qcl_ecvq::{run, ClgInit, Method, RunConfig, RunReport, Source};
use qcl_tensor::{Error, Result, Seed};
use serde_json::json;

use crate::Report;

#[derive(clap::Args)]
pub struct EcvqArgs {
    /// The source: `gaussian` (2-D N(0, I)), `laplace` (1-D), `banana` (the paper's) or
    /// `banana-vecvq` (the PyTorch port's).
    #[arg(long, default_value = "banana")]
    source: String,
    /// The method: `vecvq` (Adam on fresh samples) or `clg` (Chou-Lookabaugh-Gray Lloyd).
    #[arg(long, default_value = "vecvq")]
    method: String,
    /// Multiplier λ of the distortion in R + λ·D (larger λ, higher rate).
    #[arg(long, value_parser = crate::flags::positive(1e12))]
    lambda: f64,
    /// Number of codes K (1 to 65,536).
    #[arg(long, default_value_t = 256, value_parser = crate::flags::count(1, 65_536))]
    k: usize,
    /// VECVQ optimizer steps (at most 1,000,000).
    #[arg(long, default_value_t = 10_000, value_parser = crate::flags::count(0, crate::flags::MAX_STEPS))]
    steps: usize,
    /// VECVQ samples per step (1 to 2^20).
    #[arg(long, default_value_t = 1024, value_parser = crate::flags::count(1, 1 << 20))]
    batch: usize,
    /// VECVQ initial learning rate (decayed ×0.1 at 50 %, ×0.01 at 75 %, ×0.001 at 87.5 %).
    #[arg(long, default_value_t = 1e-2, value_parser = crate::flags::positive(1e6))]
    lr: f64,
    /// CLG training-set size (1 to 2^28).
    #[arg(long, default_value_t = 200_000, value_parser = crate::flags::count(1, crate::flags::MAX_SAMPLES))]
    train_samples: usize,
    /// CLG entropy-constrained iterations at most (1 to 1,000,000).
    #[arg(long, default_value_t = 200, value_parser = crate::flags::count(1, crate::flags::MAX_STEPS))]
    iterations: usize,
    /// CLG start: `kmeans` (20 k-means iterations first) or `random` (random training
    /// vectors, equal lengths).
    #[arg(long, default_value = "kmeans", value_parser = ["kmeans", "random"])]
    init: String,
    /// CLG restarts (the run with the lowest training objective is kept; 1 to 10,000).
    #[arg(long, default_value_t = 1, value_parser = crate::flags::count(1, 10_000))]
    restarts: usize,
    /// Fresh evaluation samples (1 to 2^28).
    #[arg(long, default_value_t = 1_000_000, value_parser = crate::flags::count(1, crate::flags::MAX_SAMPLES))]
    eval_samples: usize,
    /// Seed of the initialisation and the training samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seed of the evaluation samples.
    #[arg(long, default_value_t = 82_913_749)]
    eval_seed: u64,
    /// Save the trained quantizer here (safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Show a progress bar on standard error.
    #[arg(long)]
    progress: bool,
}

pub fn run_ecvq(args: &EcvqArgs) -> Result<Report> {
    if let Some(out) = &args.out {
        qcl_tensor::check_output(out, &[])?;
    }
    let source: Source = args.source.parse()?;
    let method: Method = args.method.parse()?;
    if args.eval_samples == 0 {
        return Err(Error::invalid_parameter(
            "eval-samples",
            "must be at least 1",
        ));
    }
    let mut config = RunConfig::new(source, method, args.lambda);
    config.set_codes(args.k);
    config.set_seed(Seed::new(args.seed));
    config.set_show_progress(args.progress);
    config.vecvq.steps = args.steps;
    config.vecvq.batch_size = args.batch;
    config.vecvq.learning_rate = args.lr;
    config.clg.max_iterations = args.iterations;
    config.clg.init = if args.init == "random" {
        ClgInit::RandomPoints
    } else {
        ClgInit::default()
    };
    config.clg.restarts = args.restarts;
    config.clg_samples = args.train_samples;
    config.eval_samples = args.eval_samples;
    config.eval_seed = Seed::new(args.eval_seed);
    let report = run(&config)?;
    if let Some(path) = &args.out {
        report.quantizer.save(path)?;
    }
    Ok(Report {
        json: to_json(&report, args),
        text: summary(&report),
    })
}

fn to_json(r: &RunReport, args: &EcvqArgs) -> serde_json::Value {
    let e = &r.evaluation;
    json!({
        "source": r.config.source.name(),
        "method": r.config.method.name(),
        "lambda": r.config.lambda(),
        "k": r.config.codes(),
        "rate_bits": e.rate_bits,
        "entropy_bits": e.entropy_bits,
        "coded_bits": e.coded_bits,
        "distortion": e.distortion,
        "used_codes": e.used_codes,
        "gap_db": e.gap_db,
        "bound": e.bound,
        "bound_name": r.config.source.bound_name(),
        "lagrangian": e.lagrangian,
        "train_seconds": r.train_seconds,
        "eval_seconds": r.eval_seconds,
        "iterations": r.iterations,
        "eval_samples": e.samples,
        "seed": args.seed,
        "out": args.out.as_ref().map(|p| p.display().to_string()),
    })
}

fn summary(r: &RunReport) -> String {
    let e = &r.evaluation;
    let gap = e
        .gap_db
        .map(|g| format!(", {g:.3} dB above {}", r.config.source.bound_name()))
        .unwrap_or_default();
    format!(
        "{} {} λ={}: R = {:.4} bit (H = {:.4}, coded {:.4}), D = {:.5}{gap}, {} codes used; trained in {:.2} s\n",
        r.config.method,
        r.config.source,
        r.config.lambda(),
        e.rate_bits,
        e.entropy_bits,
        e.coded_bits,
        e.distortion,
        e.used_codes,
        r.train_seconds
    )
}
