//! `qcl index build|add|remove|search|info`: approximate nearest-neighbour search over
//! product-quantization codes ([`qcl_pq::index`]), one index in one safetensors file
//! ([`AnyIndex`]).
//!
//! Vectors and queries are read as `qcl pq` reads them (a tensor `[n, ...]` of any numeric
//! dtype, flattened to `[n, d]` f32); ids are a 1-D `i64` or `u32` tensor. An index is written
//! atomically (a temporary file, synced, renamed over the target), so `add` and `remove` may
//! write over the index they read: it is read whole before anything is written.

mod build;
mod search;
mod update;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use qcl_pq::index::{AnyIndex, VectorIndex};
use qcl_tensor::{Error, Result, SafetensorsFile};
use serde_json::{json, Value};

use crate::Report;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Train an index (flat PQ or IVF-PQ, optionally behind a learned OPQ rotation and with
    /// exact re-ranking) on the vectors of a safetensors file; `--add` adds them too (ids
    /// 0..n).
    Build(build::BuildArgs),
    /// Add vectors to an index, under the index's next ids or the ids of `--ids`.
    Add(update::AddArgs),
    /// Remove the vectors with the ids of `--ids` from an index (absent ids are ignored).
    Remove(update::RemoveArgs),
    /// The `k` nearest indexed vectors of each query: ids (i64, -1 where fewer were found)
    /// and scores (f32: squared distances for l2, similarities for ip and cosine).
    Search(search::SearchArgs),
    /// What an index file holds: kind, dimension, metric, vectors, code shape, sizes.
    Info(InfoArgs),
}

#[derive(clap::Args)]
pub struct InfoArgs {
    /// The index file (written by `qcl index build`).
    #[arg(long)]
    index: PathBuf,
}

/// Runs an index command; `json` hides the progress line.
pub fn run(command: &IndexCommand, json: bool) -> Result<Report> {
    match command {
        IndexCommand::Build(args) => build::run(args, json),
        IndexCommand::Add(args) => update::add(args, json),
        IndexCommand::Remove(args) => update::remove(args),
        IndexCommand::Search(args) => search::run(args),
        IndexCommand::Info(args) => info(args),
    }
}

fn info(args: &InfoArgs) -> Result<Report> {
    let index = AnyIndex::load(&args.index)?;
    let bytes = file_bytes(&args.index)?;
    let mut json = json!({
        "command": "index info",
        "index": args.index,
        "file_bytes": bytes,
    });
    let mut text = format!("{} ({bytes} bytes)\n", args.index.display());
    for (key, value) in index.describe() {
        text.push_str(&format!("  {key:<22} {value}\n"));
        json[key.as_str()] = typed(&value);
    }
    Ok(Report { json, text })
}

/// [`AnyIndex::describe`] as a JSON object, numbers and flags typed.
fn describe(index: &AnyIndex) -> Value {
    Value::Object(
        index
            .describe()
            .into_iter()
            .map(|(key, value)| (key, typed(&value)))
            .collect(),
    )
}

/// A described value as JSON: a count as a number, `true`/`false` as a flag, text as text.
fn typed(value: &str) -> Value {
    match value {
        "true" => json!(true),
        "false" => json!(false),
        _ => value
            .parse::<u64>()
            .map_or_else(|_| json!(value), |n| json!(n)),
    }
}

/// One line of the text reports: the index's kind and shape.
fn summary(index: &AnyIndex) -> String {
    let pq = index.quantizer();
    format!(
        "{}, d = {}, {} metric, m = {}, nbits = {}, {} vectors",
        index.kind(),
        index.dim(),
        index.metric(),
        pq.m(),
        pq.nbits(),
        index.len()
    )
}

/// Saves `index` to `out` (atomically) and returns the file's size.
fn save(index: &AnyIndex, out: &Path) -> Result<u64> {
    index.save(out)?;
    file_bytes(out)
}

fn file_bytes(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io(path, e))
}

/// Rows of tensor `name` of `path` (default: the file's only tensor), as `qcl pq` reads
/// vectors: `[n, ...]` of any numeric dtype, flattened to `n` rows of `d` f32 values.
///
/// # Errors
/// As [`crate::read_rows`]; [`Error::InvalidParameter`] (`tensor`) when no name is given and
/// the file does not hold exactly one tensor.
fn read_vectors(path: &Path, name: Option<&str>) -> Result<(usize, usize, Vec<f32>)> {
    if let Some(name) = name {
        return crate::read_rows(path, name);
    }
    // qcl's writers never make a tensor without a name: asking for one reads the header
    // alone, and the answer lists the tensors the file holds.
    match crate::read_rows(path, "") {
        Err(Error::MissingTensor { available, .. }) => match available.as_slice() {
            [only] => crate::read_rows(path, only),
            names => Err(Error::invalid_parameter(
                "tensor",
                format!(
                    "{} holds {} tensors {names:?}: name one with --tensor",
                    path.display(),
                    names.len()
                ),
            )),
        },
        other => other,
    }
}

/// Rows read as [`read_vectors`] does, checked to have the index's dimension; `what` names
/// them in the error (`--vectors`, `--queries`).
fn read_for(
    index: &AnyIndex,
    what: &str,
    path: &Path,
    name: Option<&str>,
) -> Result<(usize, Vec<f32>)> {
    let (n, d, rows) = read_vectors(path, name)?;
    if d != index.dim() {
        return Err(Error::ShapeMismatch {
            context: format!(
                "{what} {} (flattened per row) for an index of dimension {}",
                path.display(),
                index.dim()
            ),
            expected: format!("[*, {}]", index.dim()),
            actual: vec![n, d],
        });
    }
    Ok((n, rows))
}

/// The ids of tensor `name` (default: the file's only tensor) of `path`: 1-D, `i64` (none
/// negative) or `u32`, none repeated.
///
/// # Errors
/// [`Error::Io`] / [`Error::BadFile`] for the file, [`Error::MissingTensor`],
/// [`Error::DTypeMismatch`], [`Error::ShapeMismatch`] for another rank,
/// [`Error::InvalidParameter`] (`ids`) for a negative or repeated id.
fn read_ids(path: &Path, name: Option<&str>) -> Result<Vec<u64>> {
    let file = SafetensorsFile::open(path)?;
    let name = match (name, file.names()) {
        (Some(name), _) => name,
        (None, [only]) => only.as_str(),
        (None, names) => {
            return Err(Error::invalid_parameter(
                "ids-tensor",
                format!(
                    "{} holds {} tensors {names:?}: name one with --ids-tensor",
                    path.display(),
                    names.len()
                ),
            ))
        }
    };
    let tensor = file.tensor(name, &Device::Cpu)?;
    let context = format!("ids `{name}` of {}", path.display());
    if tensor.rank() != 1 {
        return Err(Error::ShapeMismatch {
            context,
            expected: "[n] (one id per vector)".into(),
            actual: tensor.dims().to_vec(),
        });
    }
    let ids: Vec<u64> = match tensor.dtype() {
        DType::U32 => tensor
            .to_vec1::<u32>()?
            .into_iter()
            .map(u64::from)
            .collect(),
        DType::I64 => tensor
            .to_vec1::<i64>()?
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                u64::try_from(id).map_err(|_| {
                    Error::invalid_parameter(
                        "ids",
                        format!("{context}: id {id} (at {i}) is negative"),
                    )
                })
            })
            .collect::<Result<_>>()?,
        other => {
            return Err(Error::DTypeMismatch {
                context: format!("{context} (ids are i64 or u32)"),
                expected: DType::I64,
                actual: other,
            })
        }
    };
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    if let Some(id) = ids.iter().find(|&&id| !seen.insert(id)) {
        return Err(Error::invalid_parameter(
            "ids",
            format!("{context}: id {id} is given twice"),
        ));
    }
    Ok(ids)
}

/// Rows added at a time, so that the progress bar moves on long inputs.
const ADD_CHUNK: usize = 16_384;

/// Adds `rows` to `index` under `ids` (one per row) or the index's next ids, a chunk at a
/// time (the same index as one call: every row is coded on its own).
fn add_rows(
    index: &mut AnyIndex,
    rows: &[f32],
    ids: Option<&[u64]>,
    progress: &Progress,
) -> Result<()> {
    let dim = index.dim();
    let whole = ids.is_some_and(|ids| ids.len() * dim != rows.len());
    if rows.is_empty() || !rows.len().is_multiple_of(dim) || whole {
        // In one call: the index's own error for no rows, broken rows or a count of ids
        // other than of rows.
        return match ids {
            Some(ids) => index.add_with_ids(rows, ids),
            None => index.add(rows).map(|_| ()),
        };
    }
    for (c, chunk) in rows.chunks(ADD_CHUNK * dim).enumerate() {
        match ids {
            Some(ids) => {
                let first = c * ADD_CHUNK;
                index.add_with_ids(chunk, &ids[first..first + chunk.len() / dim])?;
            }
            None => {
                index.add(chunk)?;
            }
        }
        progress.0.inc((chunk.len() / dim) as u64);
    }
    Ok(())
}

/// A progress line on standard error, cleared when dropped (after success and errors
/// alike); hidden under `--json` and when standard error is not a terminal.
struct Progress(ProgressBar);

impl Progress {
    /// A spinner showing `message` while work of unknown length runs.
    fn spinner(json: bool, message: &str) -> Self {
        let bar = if json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"),
        );
        bar.set_message(message.to_string());
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Progress(bar)
    }

    /// A bar over `rows` vectors, for `what` (e.g. "adding").
    fn rows(json: bool, what: &str, rows: usize) -> Self {
        let bar = if json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(rows as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} vectors [{elapsed}<{eta}]")
                .expect("valid template"),
        );
        bar.set_message(what.to_string());
        Progress(bar)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
