//! `qcl index add` and `qcl index remove`: change an index and save it, over itself by
//! default (the file is read whole first and replaced atomically).

use std::path::{Path, PathBuf};
use std::time::Instant;

use qcl_pq::index::{AnyIndex, VectorIndex};
use qcl_tensor::{Error, Result};
use serde_json::json;

use super::{add_rows, describe, read_for, read_ids, save, summary, Progress};
use crate::Report;

#[derive(clap::Args)]
pub struct AddArgs {
    /// The index file (written by `qcl index build`).
    #[arg(long)]
    index: PathBuf,
    /// The safetensors file of the vectors to add.
    #[arg(long)]
    vectors: PathBuf,
    /// The vectors' tensor: `[n, ...]` flattening to `[n, d]` with the index's d (default:
    /// the file's only tensor).
    #[arg(long)]
    tensor: Option<String>,
    /// A safetensors file of the vectors' ids: a 1-D i64 (not negative) or u32 tensor, one
    /// per vector, none already in the index (default: the index's next ids).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// The ids' tensor (default: the file's only tensor).
    #[arg(long, requires = "ids")]
    ids_tensor: Option<String>,
    /// Write the index here (default: over `--index`).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RemoveArgs {
    /// The index file (written by `qcl index build`).
    #[arg(long)]
    index: PathBuf,
    /// A safetensors file of the ids to remove: a 1-D i64 (not negative) or u32 tensor; ids
    /// not in the index are ignored.
    #[arg(long)]
    ids: PathBuf,
    /// The ids' tensor (default: the file's only tensor).
    #[arg(long)]
    ids_tensor: Option<String>,
    /// Write the index here (default: over `--index`).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn add(args: &AddArgs, json: bool) -> Result<Report> {
    let out = args.out.as_deref().unwrap_or(&args.index);
    // Writing over the index read is what `add` does by default; writing over the vectors or
    // the ids is refused.
    let mut inputs: Vec<&Path> = vec![&args.vectors];
    inputs.extend(args.ids.as_deref());
    qcl_tensor::check_output(out, &inputs)?;
    let mut index = AnyIndex::load(&args.index)?;
    let before = index.len();
    let (n, rows) = read_for(&index, "--vectors", &args.vectors, args.tensor.as_deref())?;
    let ids = match &args.ids {
        Some(path) => {
            let ids = read_ids(path, args.ids_tensor.as_deref())?;
            if ids.len() != n {
                return Err(Error::ShapeMismatch {
                    context: format!(
                        "the ids of {} for the {n} vectors of {}",
                        path.display(),
                        args.vectors.display()
                    ),
                    expected: format!("[{n}] (one id per vector)"),
                    actual: vec![ids.len()],
                });
            }
            Some(ids)
        }
        None => None,
    };
    let first_id = index.next_id();
    let started = Instant::now();
    add_rows(
        &mut index,
        &rows,
        ids.as_deref(),
        &Progress::rows(json, "adding", n),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let file_bytes = save(&index, out)?;
    // Ids given by the index are a range; given ids are in their file.
    let range = ids.is_none().then(|| [first_id, first_id + n as u64]);
    let json = json!({
        "command": "index add",
        "index": args.index,
        "vectors": args.vectors,
        "added": n,
        "ids": range,
        "before": before,
        "seconds": seconds,
        "out": out,
        "file_bytes": file_bytes,
        "info": describe(&index),
    });
    let given = match &args.ids {
        Some(path) => format!("the ids of {}", path.display()),
        None => format!("ids {first_id}..{}", first_id + n as u64),
    };
    let text = format!(
        "index add: {n} vectors under {given} in {seconds:.3} s; now {}\nwrote {} ({file_bytes} bytes)\n",
        summary(&index),
        out.display()
    );
    Ok(Report { json, text })
}

pub fn remove(args: &RemoveArgs) -> Result<Report> {
    let out = args.out.as_deref().unwrap_or(&args.index);
    qcl_tensor::check_output(out, &[&args.ids])?;
    let mut index = AnyIndex::load(&args.index)?;
    let ids = read_ids(&args.ids, args.ids_tensor.as_deref())?;
    let before = index.len();
    let removed = index.remove(&ids);
    let file_bytes = save(&index, out)?;
    let json = json!({
        "command": "index remove",
        "index": args.index,
        "asked": ids.len(),
        "removed": removed,
        "before": before,
        "out": out,
        "file_bytes": file_bytes,
        "info": describe(&index),
    });
    let text = format!(
        "index remove: {removed} of {} ids were in the index; now {}\nwrote {} ({file_bytes} bytes)\n",
        ids.len(),
        summary(&index),
        out.display()
    );
    Ok(Report { json, text })
}
