//! `qcl pq train|encode|decode|search`: product quantization of a tensor of a safetensors file.
//!
//! Codes live in their own safetensors file ([`ProductQuantizer::save_codes`]), which names the
//! quantizer that made them; decoding or searching them with another quantizer is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Subcommand;
use qcl_pq::{ProductQuantizer, ProductQuantizerConfig};
use qcl_tensor::{squared_distance, write_safetensors, Error, Result};
use serde_json::json;

use crate::{read_rows, Report};

#[derive(Subcommand)]
pub enum PqCommand {
    /// Train a product quantizer on a tensor `[n, ...]` (flattened to `[n, d]` in f32) and
    /// report the mean squared reconstruction error per vector.
    Train(TrainArgs),
    /// Encode a tensor with a trained quantizer into a codes file.
    Encode(EncodeArgs),
    /// Decode a codes file into `x`, f32 `[n, d]`.
    Decode(DecodeArgs),
    /// The nearest encoded vectors of each query, by asymmetric distance.
    Search(SearchArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The safetensors file holding the training vectors.
    #[arg(long)]
    input: PathBuf,
    /// The tensor: `[n, ...]` of any numeric dtype, flattened to `[n, d]` in f32.
    #[arg(long)]
    tensor: String,
    /// Number of sub-spaces; must divide d (1 to 65,536).
    #[arg(long, value_parser = crate::flags::count(1, 65_536))]
    m: usize,
    /// Bits per code, in 1..=16 (2^nbits centroids per sub-space).
    #[arg(long, value_parser = crate::flags::small(1, 16))]
    nbits: u32,
    /// Lloyd iterations per sub-space (1 to 1,000,000).
    #[arg(long, default_value_t = 25, value_parser = crate::flags::count(1, crate::flags::MAX_STEPS))]
    iters: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Write the quantizer here (safetensors).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct EncodeArgs {
    /// The quantizer written by `qcl pq train`.
    #[arg(long)]
    pq: PathBuf,
    /// The safetensors file holding the vectors.
    #[arg(long)]
    input: PathBuf,
    /// The tensor: `[n, ...]` flattening to `[n, d]` with the quantizer's d.
    #[arg(long)]
    tensor: String,
    /// Write the codes here (safetensors).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// The quantizer written by `qcl pq train`.
    #[arg(long)]
    pq: PathBuf,
    /// The codes written by `qcl pq encode` with this quantizer.
    #[arg(long)]
    codes: PathBuf,
    /// Write the reconstruction here: tensor `x`, f32 `[n, d]`.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct SearchArgs {
    /// The quantizer written by `qcl pq train`.
    #[arg(long)]
    pq: PathBuf,
    /// The codes written by `qcl pq encode` with this quantizer (the database).
    #[arg(long)]
    codes: PathBuf,
    /// The safetensors file holding the queries.
    #[arg(long)]
    queries: PathBuf,
    /// The queries' tensor: `[nq, ...]` flattening to `[nq, d]` with the quantizer's d.
    #[arg(long)]
    tensor: String,
    /// Number of neighbours per query, in 1..=n (at most 2^28).
    #[arg(long, value_parser = crate::flags::count(1, crate::flags::MAX_SAMPLES))]
    top_k: usize,
}

pub fn run(command: &PqCommand) -> Result<Report> {
    match command {
        PqCommand::Train(args) => train(args),
        PqCommand::Encode(args) => encode(args),
        PqCommand::Decode(args) => decode(args),
        PqCommand::Search(args) => search(args),
    }
}

fn train(args: &TrainArgs) -> Result<Report> {
    qcl_tensor::check_output(&args.out, &[&args.input])?;
    let (n, d, data) = read_rows(&args.input, &args.tensor)?;
    let params = ProductQuantizerConfig {
        max_iter: args.iters,
        seed: qcl_tensor::Seed::new(args.seed),
        ..ProductQuantizerConfig::new(args.m, args.nbits)
    };
    let start = Instant::now();
    let pq = ProductQuantizer::train(&data, d, &params)?;
    let seconds = start.elapsed().as_secs_f64();
    let decoded = pq.decode(&pq.encode(&data)?)?;
    let total: f64 = data
        .chunks_exact(d)
        .zip(decoded.chunks_exact(d))
        .map(|(x, y)| f64::from(squared_distance(x, y)))
        .sum();
    let mse = total / n as f64;
    pq.save(&args.out)?;
    let out = args.out.display().to_string();
    let json = json!({
        "n": n, "d": d, "m": args.m, "nbits": args.nbits,
        "seconds": seconds, "mse": mse, "out": out,
    });
    let text = format!(
        "pq train: n = {n}, d = {d}, m = {}, nbits = {} ({} bytes per vector) in {seconds:.3} s, mse {mse:.6}\nwrote {out}\n",
        args.m,
        args.nbits,
        pq.code_size()
    );
    Ok(Report { json, text })
}

fn encode(args: &EncodeArgs) -> Result<Report> {
    qcl_tensor::check_output(&args.out, &[&args.pq, &args.input])?;
    let pq = ProductQuantizer::load(&args.pq)?;
    let (n, _, data) = read_dim(&args.input, &args.tensor, &pq)?;
    let start = Instant::now();
    let codes = pq.encode(&data)?;
    let seconds = start.elapsed().as_secs_f64();
    pq.save_codes(&codes, &args.out)?;
    let (code_size, bytes) = (codes.code_size(), codes.bytes().len());
    let out = args.out.display().to_string();
    let json = json!({
        "n": n, "code_size": code_size, "bytes": bytes, "seconds": seconds, "out": out,
    });
    let ratio = (data.len() * 4) as f64 / bytes.max(1) as f64;
    let text = format!(
        "pq encode: n = {n}, {code_size} bytes per vector, {bytes} bytes ({ratio:.1}x smaller than f32) in {seconds:.3} s\nwrote {out}\n"
    );
    Ok(Report { json, text })
}

fn decode(args: &DecodeArgs) -> Result<Report> {
    qcl_tensor::check_output(&args.out, &[&args.pq, &args.codes])?;
    let pq = ProductQuantizer::load(&args.pq)?;
    let codes = pq.load_codes(&args.codes)?;
    let decoded = pq.decode(&codes)?;
    let (n, d) = (codes.n(), pq.dim());
    let x = Tensor::from_vec(decoded, (n, d), &Device::Cpu)?;
    write_safetensors(&args.out, &[("x", &x)], &BTreeMap::new())?;
    let out = args.out.display().to_string();
    let json = json!({"n": n, "d": d, "out": out});
    let text = format!("pq decode: n = {n}, d = {d}\nwrote {out}\n");
    Ok(Report { json, text })
}

fn search(args: &SearchArgs) -> Result<Report> {
    let pq = ProductQuantizer::load(&args.pq)?;
    let codes = pq.load_codes(&args.codes)?;
    let (nq, _, queries) = read_dim(&args.queries, &args.tensor, &pq)?;
    let start = Instant::now();
    let found = pq.search(&queries, &codes, args.top_k)?;
    let seconds = start.elapsed().as_secs_f64();
    let k = args.top_k;
    let indices: Vec<&[u32]> = found.indices.chunks_exact(k).collect();
    let distances: Vec<&[f32]> = found.distances.chunks_exact(k).collect();
    let json = json!({
        "nq": nq, "top_k": k, "seconds": seconds,
        "indices": indices, "distances": distances,
    });
    let text = format!(
        "pq search: {nq} queries, top {k} of {} codes in {seconds:.3} s\nquery 0: indices {:?}, distances {:?}\n",
        codes.n(),
        indices.first().copied().unwrap_or_default(),
        distances.first().copied().unwrap_or_default()
    );
    Ok(Report { json, text })
}

/// Reads `[n, ...]` rows as [`read_rows`] does and checks they have the quantizer's dimension.
fn read_dim(path: &Path, tensor: &str, pq: &ProductQuantizer) -> Result<(usize, usize, Vec<f32>)> {
    let (n, d, data) = read_rows(path, tensor)?;
    if d != pq.dim() {
        return Err(Error::ShapeMismatch {
            context: format!("`{tensor}` of {} (flattened per row)", path.display()),
            expected: format!("[*, {}] (the quantizer's dimension)", pq.dim()),
            actual: vec![n, d],
        });
    }
    Ok((n, d, data))
}
