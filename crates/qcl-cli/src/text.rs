//! `qcl text`: sentence embeddings with a sentence-transformers BERT model (all-MiniLM-L6-v2),
//! from its own weights or from a compressed checkpoint, and calibration recording for weight
//! compression.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use qcl_cli::{sha256_file, CHECKPOINT_SHA256_KEY};
use qcl_tensor::{Error, Result};
use qcl_text::{SentenceConfig, SentenceEncoder, SentenceTokenizer};
use qcl_wpq::{Calibration, CompressedCheckpoint};
use serde_json::json;

use crate::Report;

/// Largest text input read: 256 MiB.
const MAX_INPUT_BYTES: u64 = 256 << 20;
/// Format tag of the embeddings file `qcl text embed --out` writes.
const EMBEDDINGS_FORMAT: &str = "qcl-embeddings/1";

#[derive(Subcommand)]
pub enum TextCommand {
    /// Run the model over texts with every Linear's input recorded (`H = Σxᵀx` per weight, and
    /// token counts for the word embeddings) and write a calibration file for
    /// `qcl wpq compress-checkpoint --calibration`.
    Calibrate {
        /// A sentence-transformers folder (config.json, model.safetensors, tokenizer.json, ...).
        #[arg(long)]
        model: PathBuf,
        /// Texts, one per line (a final newline ends the last one); `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
        /// Where to write the calibration file.
        #[arg(long)]
        out: PathBuf,
        /// Use only the first N texts.
        #[arg(long, value_parser = crate::flags::count(1, crate::flags::MAX_SAMPLES))]
        limit: Option<usize>,
    },
    /// Embed texts (mean pooling, L2 normalisation, as sentence-transformers does), with the
    /// model's own weights or those of a compressed checkpoint of it.
    Embed {
        /// A sentence-transformers folder; with `--compressed` only its configuration and
        /// tokenizer are read (its model.safetensors, when present, must be the checkpoint
        /// the compressed file was made from).
        #[arg(long)]
        model: PathBuf,
        /// A compressed checkpoint of the model (`qcl wpq compress-checkpoint`).
        #[arg(long)]
        compressed: Option<PathBuf>,
        /// Texts, one per line (a final newline ends the last one); `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
        /// Write the embeddings here (safetensors, tensor `embeddings` f32 `[count, dim]`)
        /// instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(command: &TextCommand) -> Result<Report> {
    match command {
        TextCommand::Calibrate {
            model,
            input,
            out,
            limit,
        } => {
            qcl_tensor::check_output(out, &[input])?;
            calibrate(model, input, out, *limit)
        }
        TextCommand::Embed {
            model,
            compressed,
            input,
            out,
        } => {
            if let Some(out) = out {
                let mut inputs = vec![input.as_path()];
                inputs.extend(compressed.as_deref());
                qcl_tensor::check_output(out, &inputs)?;
            }
            embed(model, compressed.as_deref(), input, out.as_deref())
        }
    }
}

/// The texts of `input` (`-`: standard input), one per line.
///
/// # Errors
/// [`Error::Io`], [`Error::BadFile`] for input that is not UTF-8 or too large,
/// [`Error::EmptyInput`] for no text.
fn read_texts(input: &Path) -> Result<Vec<String>> {
    let mut bytes = Vec::new();
    let read = if input == Path::new("-") {
        std::io::stdin()
            .take(MAX_INPUT_BYTES + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(input).and_then(|f| f.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| Error::io(input, e))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(Error::bad_file(
            input,
            format!("more than the {MAX_INPUT_BYTES} bytes allowed"),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::bad_file(input, format!("not UTF-8 text ({e})")))?;
    let body = text.strip_suffix('\n').unwrap_or(&text);
    if body.is_empty() {
        return Err(Error::EmptyInput(format!(
            "{} holds no text (one per line)",
            input.display()
        )));
    }
    Ok(body
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect())
}

/// The encoder of `model`, on the weights of `compressed` when given (checked to have been
/// made from the folder's model.safetensors when the folder has one).
fn encoder(model: &Path, compressed: Option<&Path>) -> Result<SentenceEncoder> {
    let Some(path) = compressed else {
        return SentenceEncoder::from_folder(model, &Device::Cpu);
    };
    let checkpoint = CompressedCheckpoint::load(path)?;
    let weights = model.join("model.safetensors");
    if let (Some(expected), true) = (
        checkpoint.metadata.get(CHECKPOINT_SHA256_KEY),
        weights.is_file(),
    ) {
        let found = sha256_file(&weights)?;
        if &found != expected {
            return Err(Error::bad_file(
                &weights,
                format!(
                    "sha256 {found} differs from {expected}, the checkpoint {} was compressed \
                     from: the folder holds another model",
                    path.display()
                ),
            ));
        }
    }
    let config = SentenceConfig::from_folder(model)?;
    let tokenizer =
        SentenceTokenizer::from_file(model.join("tokenizer.json"), config.max_seq_length)?;
    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu)?;
    SentenceEncoder::from_var_builder(vb, config, tokenizer)
}

fn calibrate(model: &Path, input: &Path, out: &Path, limit: Option<usize>) -> Result<Report> {
    let started = Instant::now();
    let mut texts = read_texts(input)?;
    if let Some(limit) = limit {
        if limit == 0 {
            return Err(Error::invalid_parameter("limit", "must be positive"));
        }
        texts.truncate(limit);
    }
    let encoder = SentenceEncoder::from_folder(model, &Device::Cpu)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let calibration = Calibration::new();
    let bar = ProgressBar::new(refs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} texts [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    let tokens = encoder.tap_texts(&refs, &bar, &mut |name, x| calibration.record(name, x))?;
    bar.finish_and_clear();
    let metadata = BTreeMap::from([
        (
            CHECKPOINT_SHA256_KEY.to_string(),
            sha256_file(model.join("model.safetensors"))?,
        ),
        ("qcl.texts".to_string(), refs.len().to_string()),
        ("qcl.tokens".to_string(), tokens.to_string()),
    ]);
    let file_bytes = calibration.save_with(out, &metadata)?;
    let layers = calibration.names();
    let seconds = started.elapsed().as_secs_f64();
    let json = json!({
        "command": "text calibrate",
        "model": model,
        "texts": refs.len(),
        "tokens": tokens,
        "layers": layers,
        "out": out,
        "file_bytes": file_bytes,
        "seconds": seconds,
    });
    let text = format!(
        "recorded the inputs of {} weights on {} texts ({tokens} tokens) → {} ({file_bytes} bytes) in {seconds:.1} s\n",
        layers.len(),
        refs.len(),
        out.display()
    );
    Ok(Report { json, text })
}

fn embed(
    model: &Path,
    compressed: Option<&Path>,
    input: &Path,
    out: Option<&Path>,
) -> Result<Report> {
    let texts = read_texts(input)?;
    let encoder = encoder(model, compressed)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let embeddings = encoder.embed(&refs)?;
    let (count, dim) = embeddings.dims2()?;
    let mut json = json!({
        "command": "text embed",
        "model": model,
        "compressed": compressed,
        "count": count,
        "dim": dim,
        "out": out,
    });
    let text = match out {
        Some(path) => {
            // The inputs by content, not by path: the same inputs give the same bytes
            // wherever they lie.
            let mut metadata = BTreeMap::from([
                ("format".to_string(), EMBEDDINGS_FORMAT.to_string()),
                (
                    CHECKPOINT_SHA256_KEY.to_string(),
                    sha256_file(model.join("model.safetensors"))?,
                ),
            ]);
            if let Some(compressed) = compressed {
                metadata.insert(
                    "qcl.compressed.sha256".to_string(),
                    sha256_file(compressed)?,
                );
            }
            qcl_tensor::write_safetensors(path, &[("embeddings", &embeddings)], &metadata)?;
            format!("{count} embeddings of {dim} values → {}\n", path.display())
        }
        None => {
            let rows = embeddings.to_vec2::<f32>()?;
            let text = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                        + "\n"
                })
                .collect();
            json["embeddings"] = json!(rows);
            text
        }
    };
    Ok(Report { json, text })
}
