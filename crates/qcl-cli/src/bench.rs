//! `qcl bench train`: training throughput of qcl's two reference models on the CPU.
//!
//! A thin face of [`qcl_nn::bench::bench_training`]: random `1×28×28` inputs, SGD with
//! momentum, `--warmup` untimed steps, then `--steps` timed steps. `--json` prints the
//! [`TrainBenchReport`] (`model`, `batch`, `samples_per_s`, `threads`, `steps`, `seconds`,
//! `final_loss`, `peak_rss_bytes`).

use clap::Subcommand;
use qcl_nn::bench::{bench_training, BenchModel, TrainBenchConfig, TrainBenchReport};
use qcl_tensor::{Error, Result, Seed};
use serde_json::json;

use crate::Report;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time training steps of a reference model on one random batch and report samples per
    /// second, the thread count and the process's peak resident memory.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The model: `resnet20` (ResNet-20, cross-entropy) or `vq-ae` (the VQ autoencoder).
    #[arg(long)]
    model: String,
    /// Images per step (1 to 4,096).
    #[arg(long, default_value_t = 128, value_parser = crate::flags::count(1, 4096))]
    batch: usize,
    /// Timed steps (1 to 1,000,000).
    #[arg(long, default_value_t = 20, value_parser = crate::flags::count(1, crate::flags::MAX_STEPS))]
    steps: usize,
    /// Untimed warm-up steps before the timed ones (at most 1,000,000).
    #[arg(long, default_value_t = 3, value_parser = crate::flags::count(0, crate::flags::MAX_STEPS))]
    warmup: usize,
    /// Seed of the weights and of the random batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(command: &BenchCommand) -> Result<Report> {
    match command {
        BenchCommand::Train(args) => train(args),
    }
}

fn train(args: &TrainArgs) -> Result<Report> {
    let model = BenchModel::from_name(&args.model)?;
    if args.batch == 0 {
        return Err(Error::invalid_parameter("batch", "must be at least 1"));
    }
    if args.steps == 0 {
        return Err(Error::invalid_parameter("steps", "must be at least 1"));
    }
    let report = bench_training(&TrainBenchConfig {
        model,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        seed: Seed::new(args.seed),
    })?;
    // Plain numbers and strings: serialising cannot fail (a non-finite loss becomes `null`).
    let json = json!(report);
    let text = summary(&report);
    Ok(Report { json, text })
}

/// One line: throughput first, then what it was measured on.
fn summary(r: &TrainBenchReport) -> String {
    let memory = r
        .peak_rss_bytes
        .map(|b| format!(", peak RSS {:.0} MiB", b as f64 / (1024.0 * 1024.0)))
        .unwrap_or_default();
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    format!(
        "{}: {:.1} samples/s (batch {}, {} step{} in {:.3} s, {} thread{}, final loss {:.4}{memory})\n",
        r.model,
        r.samples_per_s,
        r.batch,
        r.steps,
        plural(r.steps),
        r.seconds,
        r.threads,
        plural(r.threads),
        r.final_loss
    )
}
