//! `qcl wpq`: weight product quantization of a trained model ("And the bit goes down") and
//! evaluation of dense or compressed model files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use qcl_cli::method_spec::parse_rule;
use qcl_cli::{sha256_file, CHECKPOINT_SHA256_KEY};
use qcl_data::SplitDataset;
use qcl_tensor::{Error, Result, SafetensorsFile};
use qcl_wpq::{
    compress, compress_checkpoint, evaluate, Arch, Calibration, Checkpoint, CompressConfig,
    CompressedModel, Model, Plan, CHECKPOINT_FORMAT,
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
    /// Compress the weights of any safetensors checkpoint selected by name patterns, each by
    /// its rule's METHOD, into one compressed checkpoint (`qcl-wpq-checkpoint/1`) whose
    /// tensors decompress into a candle-nn `VarBuilder`; every other tensor is kept bit for bit.
    /// Prints the bits per weight (codebooks and scales counted) and the file's size.
    ///
    /// METHOD: `fp16`; `int<B>` (per channel, e.g. `int8`); `rtn` or `gptq` with `bits`,
    /// `group` (a number or `channel`), `damp`, `block_columns` (default int4 g128); `pq` with
    /// `d`, `k`, `objective` (`naive`, `activation-aware`, `error-feedback`), `finetune`
    /// (rounds), `em-iterations`, `sharing` (`layer`, `channel-block`, `rows(N)`), `layout`,
    /// `ridge`, `damp`, `block-columns`, `outliers` (`top(N)`: N input columns kept in fp16,
    /// also for rtn and gptq), `guard` (`held-out`, `off`) (default d4 K256 activation-aware).
    /// Keys follow the
    /// name after `:`, separated by `,`: `pq:d=2,k=256,objective=error-feedback,finetune=1`.
    CompressCheckpoint {
        /// The checkpoint (safetensors, any float dtype).
        #[arg(long)]
        checkpoint: PathBuf,
        /// `PATTERN=METHOD`, repeatable, first match wins: `*` matches any run of characters
        /// (dots included), `?` one; tensors no rule matches stay as they are. A rule that
        /// matches no tensor is an error.
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
        /// Layer inputs recorded on this checkpoint (`qcl text calibrate`), needed by GPTQ and
        /// by activation-aware and error-feedback PQ.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Seed of every random choice (k-means starts); the same seed gives the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the compressed checkpoint.
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
        WpqCommand::CompressCheckpoint {
            checkpoint,
            rules,
            calibration,
            seed,
            out,
        } => {
            let mut inputs = vec![checkpoint.as_path()];
            inputs.extend(calibration.as_deref());
            qcl_tensor::check_output(out, &inputs)?;
            compress_any(checkpoint, rules, calibration.as_deref(), *seed, out)
        }
        WpqCommand::Compress {
            model,
            arch,
            config,
            data,
            out,
        } => {
            let mut inputs = vec![model.as_path(), data.as_path()];
            inputs.extend(config.as_deref());
            qcl_tensor::check_output(out, &inputs)?;
            let arch = Arch::from_name(arch)?;
            let teacher = Model::load(model, Some(arch))?;
            let cfg: CompressConfig = match config {
                Some(path) => {
                    let bytes = crate::read_small_file(path)?;
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
                "reassigned": outcome.reassigned,
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

/// The calibration in `path`, checked to have been recorded on the checkpoint whose SHA-256 is
/// `checkpoint_sha256`.
fn read_calibration(
    path: &Path,
    checkpoint: &Path,
    checkpoint_sha256: &str,
) -> Result<Calibration> {
    let (calibration, metadata) = Calibration::load_with_metadata(path)?;
    match metadata.get(CHECKPOINT_SHA256_KEY) {
        Some(recorded) if recorded != checkpoint_sha256 => Err(Error::bad_file(
            checkpoint,
            format!(
                "sha256 {checkpoint_sha256} differs from {recorded}, the checkpoint the \
                 calibration {} was recorded on",
                path.display()
            ),
        )),
        _ => Ok(calibration),
    }
}

fn compress_any(
    checkpoint_path: &Path,
    rules: &[String],
    calibration: Option<&Path>,
    seed: u64,
    out: &Path,
) -> Result<Report> {
    let started = Instant::now();
    let rules = rules
        .iter()
        .map(|r| parse_rule(r))
        .collect::<Result<Vec<_>>>()?;
    let plan = Plan::new(rules).with_seed(seed);
    let checkpoint = Checkpoint::open(checkpoint_path)?;
    let sha256 = sha256_file(checkpoint_path)?;
    let calibration = match calibration {
        Some(path) => read_calibration(path, checkpoint_path, &sha256)?,
        None => Calibration::new(),
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("compressing {bar:30} {pos}/{len} tensors [{elapsed}] {msg}")
            .expect("valid template"),
    );
    let mut compressed = compress_checkpoint(&checkpoint, &plan, &calibration, &bar)?;
    bar.finish_and_clear();
    let plan_json = serde_json::to_string(&plan)
        .map_err(|e| Error::invalid_parameter("rules", e.to_string()))?;
    let metadata = &mut compressed.checkpoint.metadata;
    metadata.insert(CHECKPOINT_SHA256_KEY.into(), sha256.clone());
    metadata.insert("qcl.plan".into(), plan_json);
    let bits = compressed.checkpoint.bits()?;
    let file_bytes = compressed.checkpoint.save(out)?;
    let input_bytes = std::fs::metadata(checkpoint_path)
        .map_err(|e| Error::io(checkpoint_path, e))?
        .len();
    let seconds = started.elapsed().as_secs_f64();
    let json = json!({
        "command": "wpq compress-checkpoint",
        "checkpoint": checkpoint_path,
        "checkpoint_sha256": sha256,
        "out": out,
        "plan": plan,
        "input_bytes": input_bytes,
        "file_bytes": file_bytes,
        "ratio": input_bytes as f64 / file_bytes as f64,
        "compressed_tensors": compressed.reports.len(),
        "bits_per_weight": bits.bits_per_weight(),
        "bits": bits,
        "tensors": compressed.reports,
        "seconds": seconds,
    });
    let text = format!(
        "compressed {} tensors of {} → {} ({file_bytes} bytes, {:.2}× smaller; {:.3} bits per \
         compressed weight, codebooks and scales counted) in {seconds:.1} s\n",
        compressed.reports.len(),
        checkpoint_path.display(),
        out.display(),
        input_bytes as f64 / file_bytes as f64,
        bits.bits_per_weight(),
    );
    Ok(Report { json, text })
}
