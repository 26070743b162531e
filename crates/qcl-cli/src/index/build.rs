//! `qcl index build`: train an index on vectors, optionally add them, save it.

use std::path::PathBuf;
use std::time::Instant;

use qcl_pq::index::opq::OpqConfig;
use qcl_pq::index::{
    AnyIndex, IvfPqConfig, IvfPqIndex, Metric, PqIndex, PqIndexConfig, Refine, Rotated,
};
use qcl_tensor::{Error, Result, Seed};
use serde_json::json;

use super::{add_rows, describe, read_vectors, save, summary, Progress};
use crate::flags::{count, small, MAX_CODES, MAX_STEPS};
use crate::Report;

#[derive(clap::Args)]
pub struct BuildArgs {
    /// The safetensors file of the vectors to train on.
    #[arg(long)]
    vectors: PathBuf,
    /// The vectors' tensor: `[n, ...]` of any numeric dtype, flattened to `[n, d]` in f32
    /// (default: the file's only tensor).
    #[arg(long)]
    tensor: Option<String>,
    /// Write the index here (safetensors, format `qcl-index/1`).
    #[arg(long)]
    out: PathBuf,
    /// `pq` (every code scanned) or `ivf-pq` (an inverted file of residual codes: a query
    /// scans its `--nprobe` nearest lists).
    #[arg(long, default_value = "pq", value_parser = ["pq", "ivf-pq"])]
    kind: String,
    /// Sub-spaces, codes per vector; must divide d (default: d/2, or d when d is odd).
    #[arg(long, value_parser = count(1, 65_536))]
    m: Option<usize>,
    /// Bits per code: 8 (256 centroids per sub-space) or 4 (16, scanned fastest).
    #[arg(long, default_value_t = 8, value_parser = small(1, 16))]
    nbits: u32,
    /// Inverted lists of `--kind ivf-pq`, in 1..=n (default: 4·√n, at most n).
    #[arg(long, value_parser = count(1, MAX_CODES))]
    nlist: Option<usize>,
    /// What "nearest" means: `l2` (squared distance), `ip` (inner product) or `cosine`.
    #[arg(long, default_value = "l2")]
    metric: String,
    /// Learn an orthogonal rotation (OPQ) that fits the sub-spaces to the data; vectors and
    /// queries are rotated before they reach the codes.
    #[arg(long)]
    opq: bool,
    /// Rounds of the OPQ alternation (PQ step, then rotation), 1 to 1,000.
    #[arg(long, default_value_t = 50, value_parser = count(1, 1_000), requires = "opq")]
    opq_iterations: usize,
    /// Keep the exact vectors and re-rank `k · K_FACTOR` candidates by exact distance
    /// (1 to 65,536); `qcl index search --k-factor` changes it per search.
    #[arg(long, value_name = "K_FACTOR", value_parser = count(1, 65_536))]
    refine: Option<usize>,
    /// Lloyd iterations of every sub-space's k-means (1 to 1,000,000).
    #[arg(long, default_value_t = 25, value_parser = count(1, MAX_STEPS))]
    train_iterations: usize,
    /// Seed of every random choice: the same seed gives the same file.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Add the training vectors to the index too, with ids 0..n.
    #[arg(long)]
    add: bool,
}

pub fn run(args: &BuildArgs, json: bool) -> Result<Report> {
    qcl_tensor::check_output(&args.out, &[&args.vectors])?;
    // The knobs that need no data are checked before the data is read.
    let metric: Metric = args.metric.parse()?;
    if args.nbits != 4 && args.nbits != 8 {
        return Err(Error::invalid_parameter(
            "nbits",
            format!(
                "must be 4 or 8 (codes are scanned in 4- or 8-bit lanes), got {}",
                args.nbits
            ),
        ));
    }
    let ivf = args.kind == "ivf-pq";
    if args.nlist.is_some() && !ivf {
        return Err(Error::invalid_parameter(
            "nlist",
            "only an ivf-pq index has inverted lists (add --kind ivf-pq)",
        ));
    }
    let (n, d, data) = read_vectors(&args.vectors, args.tensor.as_deref())?;
    if d == 0 {
        return Err(Error::EmptyInput(format!(
            "the vectors of {} have no coordinates",
            args.vectors.display()
        )));
    }
    let m = args.m.unwrap_or(if d % 2 == 0 { d / 2 } else { d });
    if d % m != 0 {
        return Err(Error::invalid_parameter(
            "m",
            format!("must divide the vectors' dimension d = {d}, got {m}"),
        ));
    }
    let started = Instant::now();
    let mut index = train(args, json, metric, m, &data, d)?;
    let train_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    if args.add {
        add_rows(&mut index, &data, None, &Progress::rows(json, "adding", n))?;
    }
    let add_seconds = started.elapsed().as_secs_f64();
    let file_bytes = save(&index, &args.out)?;
    let added = if args.add { n } else { 0 };
    let json = json!({
        "command": "index build",
        "vectors": args.vectors,
        "n": n,
        "d": d,
        "added": added,
        "train_seconds": train_seconds,
        "add_seconds": add_seconds,
        "out": args.out,
        "file_bytes": file_bytes,
        "info": describe(&index),
    });
    let mut text = format!(
        "index build: {}; trained on n = {n} in {train_seconds:.3} s",
        summary(&index)
    );
    if args.add {
        text.push_str(&format!(", added them in {add_seconds:.3} s"));
    }
    text.push_str(&format!(
        "\nwrote {} ({file_bytes} bytes)\n",
        args.out.display()
    ));
    Ok(Report { json, text })
}

/// Trains the layers, innermost first: the rotation (`--opq`), the codes' index on the
/// rotated vectors, then the re-ranking wrapper (`--refine`), as [`AnyIndex`] nests them.
fn train(
    args: &BuildArgs,
    json: bool,
    metric: Metric,
    m: usize,
    data: &[f32],
    d: usize,
) -> Result<AnyIndex> {
    let seed = Seed::new(args.seed);
    let pq = PqIndexConfig {
        metric,
        train_iterations: args.train_iterations,
        seed,
        ..PqIndexConfig::new(m, args.nbits)
    };
    let progress = Progress::spinner(json, "training");
    let mut rotation = None;
    let mut rotated = Vec::new();
    if args.opq {
        progress.0.set_message(format!(
            "learning the OPQ rotation ({} rounds)",
            args.opq_iterations
        ));
        // Learned on the vectors as the index compares them (unit rows under cosine).
        let prepared = metric.prepare(data, d)?;
        let config = OpqConfig {
            iterations: args.opq_iterations,
            first_pq_iterations: args.train_iterations,
            seed,
            ..OpqConfig::new(m, args.nbits)
        };
        let learned = Rotated::<AnyIndex>::learn_rotation(&prepared, d, &config)?;
        rotated = learned.apply(&prepared)?;
        rotation = Some(learned);
    }
    let train_data = if rotation.is_some() { &rotated } else { data };
    let mut index = if args.kind == "ivf-pq" {
        let nlist = args.nlist.unwrap_or_else(|| default_nlist(data.len() / d));
        progress.0.set_message(format!(
            "training {nlist} inverted lists and the residual codebooks"
        ));
        let config = IvfPqConfig {
            nlist,
            pq,
            ..IvfPqConfig::new(m, args.nbits)
        };
        AnyIndex::IvfPq(IvfPqIndex::train(train_data, d, &config)?)
    } else {
        progress.0.set_message("training the codebooks");
        AnyIndex::Pq(PqIndex::train(train_data, d, &pq)?)
    };
    if let Some(rotation) = rotation {
        index = AnyIndex::Rotated(Box::new(Rotated::new(rotation, index)?));
    }
    if let Some(k_factor) = args.refine {
        index = AnyIndex::Refine(Box::new(Refine::new(index, k_factor)?));
    }
    Ok(index)
}

/// faiss's rule of thumb, `4·√n` lists, at most `n` (and at least 1).
fn default_nlist(n: usize) -> usize {
    ((4.0 * (n as f64).sqrt()).round() as usize).min(n).max(1)
}
