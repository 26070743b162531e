//! `qcl aqm`: one online continual-compression stream (AQM or one of its baselines) over the
//! class-incremental split of a data set.

use std::path::PathBuf;

use clap::Subcommand;
use indicatif::ProgressBar;
use qcl_aqm::online::{run, ClassifierInput, Method, OnlineConfig};
use qcl_continual::{Scenario, SplitConfig};
use qcl_data::SplitDataset;
use qcl_tensor::{Error, Result, Seed};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::Report;

#[derive(Subcommand)]
pub enum AqmCommand {
    /// Stream the data set once, task by task (5 tasks of 2 classes), training the modules and
    /// the classifier online under a byte budget; prints the accuracy matrix, final accuracy,
    /// forgetting, stored samples, drift and samples/s.
    Run {
        /// A JSON file of `OnlineConfig` (default: the Fashion-MNIST settings of
        /// docs/methods/aqm.md for `--method` at `--budget`). The flags below override its
        /// fields.
        #[arg(long)]
        config: Option<PathBuf>,
        /// `aqm`, `er-raw`, `raw-aqm`, `fine-tune` or `iid-online`.
        #[arg(long)]
        method: Option<String>,
        /// Memory budget in bytes (B50 on Fashion-MNIST: 392000; B20: 156800).
        #[arg(long, value_parser = crate::flags::amount(1, 1 << 40))]
        budget: Option<u64>,
        /// Bytes charged per model parameter (1 or 4).
        #[arg(long, value_parser = crate::flags::amount(1, 8))]
        param_bytes: Option<u64>,
        /// What the AQM classifier sees: `raw` (the reference) or `decoded`.
        #[arg(long)]
        classifier_input: Option<String>,
        /// Streamed images per task (default: all after the 10 % hold-out).
        #[arg(long, value_parser = crate::flags::count(1, crate::flags::MAX_SAMPLES))]
        samples_per_task: Option<usize>,
        /// Seed of every random choice.
        #[arg(long)]
        seed: Option<u64>,
        /// The data set file.
        #[arg(long, default_value = "data/fashion-mnist.safetensors")]
        data: PathBuf,
    },
}

/// `name` as a value of a kebab-case serde enum, or a typed error naming `what`.
fn parse_name<T: DeserializeOwned>(what: &str, name: &str) -> Result<T> {
    serde_json::from_value(json!(name))
        .map_err(|_| Error::invalid_parameter(what, format!("unknown value `{name}`")))
}

pub fn run_command(command: &AqmCommand) -> Result<Report> {
    let AqmCommand::Run {
        config,
        method,
        budget,
        param_bytes,
        classifier_input,
        samples_per_task,
        seed,
        data,
    } = command;
    let method: Option<Method> = method
        .as_deref()
        .map(|m| parse_name("method", m))
        .transpose()?;
    let mut cfg = match config {
        Some(path) => {
            let bytes = crate::read_small_file(path)?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::bad_file(path, format!("not an AQM stream config: {e}")))?
        }
        None => OnlineConfig::fashion_mnist(method.unwrap_or(Method::Aqm), 392_000),
    };
    if let Some(m) = method {
        cfg.method = m;
    }
    if let Some(b) = budget {
        cfg.budget_bytes = *b;
    }
    if let Some(p) = param_bytes {
        cfg.param_bytes = *p;
    }
    if let Some(c) = classifier_input {
        cfg.classifier_input = parse_name::<ClassifierInput>("classifier_input", c)?;
    }
    if samples_per_task.is_some() {
        cfg.samples_per_task = *samples_per_task;
    }
    if let Some(s) = seed {
        cfg.seed = Seed::new(*s);
    }
    let data = SplitDataset::load(data)?;
    let scenario = Scenario::class_incremental(&data, &SplitConfig::default())?;
    let result = run(&scenario, &cfg, Some(&ProgressBar::new(0)))?;
    let text = format!(
        "{} at {} bytes: final accuracy {:.2} %, forgetting {}, {} samples stored, {:.0} samples/s\n",
        cfg.method.name(),
        cfg.budget_bytes,
        100.0 * result.final_accuracy,
        result
            .forgetting
            .map_or("–".to_string(), |f| format!("{:.2} %", 100.0 * f)),
        result.stored_at_end,
        result.samples_per_second
    );
    let json = serde_json::to_value(&result)
        .map_err(|e| Error::invalid_parameter("result", e.to_string()))?;
    Ok(Report { json, text })
}
