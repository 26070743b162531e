//! `qcl wpq`: weight product quantization of a trained model ("And the bit goes down") and
//! evaluation of dense or compressed model files.

use std::path::PathBuf;

use clap::Subcommand;
use indicatif::ProgressBar;
use qcl_data::SplitDataset;
use qcl_tensor::{Error, Result, SafetensorsFile};
use qcl_wpq::{
    compress, evaluate, Arch, CompressConfig, CompressedModel, Model, CHECKPOINT_FORMAT,
};
use serde_json::json;

use crate::Report;

#[derive(Subcommand)]
pub enum WpqCommand {
    /// Compress a dense model (written by `cargo xtask reproduce wpq` or `Model::save`):
    /// activation-aware EM layer by layer with distillation, then global fine-tuning.
    Compress {
        /// The dense model (safetensors, format `qcl-wpq-model/1`).
        #[arg(long)]
        model: PathBuf,
        /// Its architecture: `fmnet` or `fmnet-bn`.
        #[arg(long)]
        arch: String,
        /// A JSON file of `CompressConfig` fields (missing fields take their defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Training images for activations and distillation (labels unused).
        #[arg(long, default_value = "data/fashion-mnist.safetensors")]
        data: PathBuf,
        /// Where to write the compressed model (a compressed checkpoint, `qcl-wpq-checkpoint/1`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Test accuracy of a dense or compressed model file.
    Eval {
        /// The model file (dense or compressed).
        #[arg(long)]
        model: PathBuf,
        /// Expected architecture (checked against the file when given).
        #[arg(long)]
        arch: Option<String>,
        /// The data set file (its test split is used).
        #[arg(long, default_value = "data/fashion-mnist.safetensors")]
        data: PathBuf,
    },
}

pub fn run(command: &WpqCommand) -> Result<Report> {
    match command {
        WpqCommand::Compress {
            model,
            arch,
            config,
            data,
            out,
        } => {
            let arch = Arch::from_name(arch)?;
            let teacher = Model::load(model, Some(arch))?;
            let cfg: CompressConfig = match config {
                Some(path) => {
                    let bytes = std::fs::read(path).map_err(|source| Error::Io {
                        path: path.clone(),
                        source,
                    })?;
                    serde_json::from_slice(&bytes).map_err(|e| {
                        Error::bad_file(path, format!("not a compression config: {e}"))
                    })?
                }
                None => CompressConfig::default(),
            };
            let data = SplitDataset::load(data)?;
            let outcome = compress(&teacher, &data.train, &cfg, &ProgressBar::new(0))?;
            let file_bytes = outcome.compressed.save(out)?;
            let size = outcome.compressed.size(outcome.uncompressed_params);
            let teacher_acc = evaluate(&teacher, &data.test, None)?;
            let acc = evaluate(&outcome.compressed.to_model()?, &data.test, None)?;
            let json = json!({
                "out": out,
                "file_bytes": file_bytes,
                "uncompressed_bytes": size.uncompressed,
                "formula_bytes": size.total,
                "ratio": size.ratio,
                "file_ratio": size.uncompressed / file_bytes as f64,
                "teacher_accuracy": teacher_acc,
                "accuracy": acc,
                "seconds": outcome.seconds,
                "layers": outcome.layers,
            });
            let text = format!(
                "compressed {} → {} ({file_bytes} bytes, {:.1}× by file, {:.1}× by the paper's accounting) in {:.1} s\n\
                 test accuracy {acc:.2} % (teacher {teacher_acc:.2} %)\n",
                model.display(),
                out.display(),
                size.uncompressed / file_bytes as f64,
                size.ratio,
                outcome.seconds
            );
            Ok(Report { json, text })
        }
        WpqCommand::Eval { model, arch, data } => {
            let expected = arch.as_deref().map(Arch::from_name).transpose()?;
            let file = SafetensorsFile::open(model)?;
            let compressed =
                file.metadata().get("format").map(String::as_str) == Some(CHECKPOINT_FORMAT);
            let dense = if compressed {
                CompressedModel::load(model, expected)?.to_model()?
            } else {
                Model::load(model, expected)?
            };
            let data = SplitDataset::load(data)?;
            let acc = evaluate(&dense, &data.test, None)?;
            let bytes = file.len_bytes();
            let json = json!({
                "model": model,
                "compressed": compressed,
                "arch": dense.arch().name(),
                "file_bytes": bytes,
                "accuracy": acc,
                "test_images": data.test.len(),
            });
            let text = format!(
                "{}: {} model, {bytes} bytes, test accuracy {acc:.2} % on {} images\n",
                model.display(),
                if compressed { "compressed" } else { "dense" },
                data.test.len()
            );
            Ok(Report { json, text })
        }
    }
}
