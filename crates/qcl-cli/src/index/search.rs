//! `qcl index search`: the nearest indexed vectors of each query.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use qcl_pq::index::{AnyIndex, SearchConfig, VectorIndex};
use qcl_tensor::{write_safetensors, Error, Result};
use serde_json::json;

use super::read_for;
use crate::flags::{count, MAX_CODES, MAX_SAMPLES};
use crate::Report;

/// Queries whose answers the report shows (all of them are in `--out`).
const SHOWN: usize = 10;

#[derive(clap::Args)]
pub struct SearchArgs {
    /// The index file (written by `qcl index build`).
    #[arg(long)]
    index: PathBuf,
    /// The safetensors file of the queries.
    #[arg(long)]
    queries: PathBuf,
    /// The queries' tensor: `[nq, ...]` flattening to `[nq, d]` with the index's d (default:
    /// the file's only tensor).
    #[arg(long)]
    tensor: Option<String>,
    /// Neighbours per query (1 to 2^28); slots beyond the vectors found hold id -1.
    #[arg(long, default_value_t = 10, value_parser = count(1, MAX_SAMPLES))]
    k: usize,
    /// Inverted lists visited per query, in 1..=nlist (ivf-pq indexes only; default 1).
    #[arg(long, value_parser = count(1, MAX_CODES))]
    nprobe: Option<usize>,
    /// Candidates re-ranked per neighbour (indexes built with `--refine` only; default: the
    /// index's own), 1 to 65,536.
    #[arg(long, value_parser = count(1, 65_536))]
    k_factor: Option<usize>,
    /// Write the answers here: `ids` (i64 `[nq, k]`, -1 where none) and `scores` (f32
    /// `[nq, k]`), with metadata `metric`, `k`, `nprobe`, `kind`.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: &SearchArgs) -> Result<Report> {
    if let Some(out) = &args.out {
        qcl_tensor::check_output(out, &[&args.index, &args.queries])?;
    }
    let mut index = AnyIndex::load(&args.index)?;
    let kind = index.kind();
    let ivf = kind.ends_with("ivf-pq");
    if args.nprobe.is_some() && !ivf {
        return Err(Error::invalid_parameter(
            "nprobe",
            format!("the index is `{kind}`, without inverted lists (only ivf-pq has them)"),
        ));
    }
    if let Some(k_factor) = args.k_factor {
        match &mut index {
            AnyIndex::Refine(refine) => refine.set_k_factor(k_factor)?,
            _ => {
                return Err(Error::invalid_parameter(
                    "k-factor",
                    format!(
                        "the index is `{kind}`, without exact vectors to re-rank (build it with --refine)"
                    ),
                ))
            }
        }
    }
    let len = index.len();
    if len == 0 {
        return Err(Error::EmptyInput(format!(
            "the index {} holds no vectors (add some with `qcl index add`)",
            args.index.display()
        )));
    }
    if args.k > len {
        return Err(Error::invalid_parameter(
            "k",
            format!(
                "the index holds {len} vectors: ask for at most {len}, got {}",
                args.k
            ),
        ));
    }
    let k_factor = match &mut index {
        AnyIndex::Refine(refine) => {
            let asked = refine.k_factor();
            // Past `len` candidates there is nothing more to re-rank: the same answer, without
            // tables of `k · k_factor` slots per query.
            refine.set_k_factor(asked.min(len.div_ceil(args.k)))?;
            Some(asked)
        }
        _ => None,
    };
    let (nq, queries) = read_for(&index, "--queries", &args.queries, args.tensor.as_deref())?;
    let options = SearchConfig {
        k: args.k,
        nprobe: args.nprobe.unwrap_or(1),
        ..SearchConfig::default()
    };
    let started = Instant::now();
    let found = index.search_with(&queries, &options)?;
    let seconds = started.elapsed().as_secs_f64();
    let k = args.k;
    // Ids as i64, bit for bit as the index files store them: a missing neighbour is -1.
    let ids: Vec<i64> = found.ids.iter().map(|&id| id as i64).collect();
    if let Some(out) = &args.out {
        let cpu = &Device::Cpu;
        let id_tensor = Tensor::from_vec(ids.clone(), (nq, k), cpu)?;
        let scores = Tensor::from_vec(found.scores.clone(), (nq, k), cpu)?;
        let mut metadata = BTreeMap::from([
            ("kind".to_string(), kind.clone()),
            ("metric".to_string(), index.metric().name().to_string()),
            ("k".to_string(), k.to_string()),
        ]);
        if ivf {
            metadata.insert("nprobe".into(), options.nprobe.to_string());
        }
        if let Some(k_factor) = k_factor {
            metadata.insert("k_factor".into(), k_factor.to_string());
        }
        write_safetensors(out, &[("ids", &id_tensor), ("scores", &scores)], &metadata)?;
    }
    let queries_per_s = nq as f64 / seconds.max(1e-9);
    let shown = nq.min(SHOWN);
    let first_ids: Vec<&[i64]> = ids.chunks_exact(k).take(shown).collect();
    let first_scores: Vec<&[f32]> = found.scores.chunks_exact(k).take(shown).collect();
    let json = json!({
        "command": "index search",
        "index": args.index,
        "kind": kind,
        "metric": index.metric().name(),
        "vectors": index.len(),
        "nq": nq,
        "k": k,
        "nprobe": ivf.then_some(options.nprobe),
        "k_factor": k_factor,
        "seconds": seconds,
        "queries_per_s": queries_per_s,
        "first_ids": first_ids,
        "first_scores": first_scores,
        "out": args.out,
    });
    let order = if index.metric().higher_is_better() {
        "similarities, larger is nearer"
    } else {
        "squared distances, smaller is nearer"
    };
    let mut text = format!(
        "index search: {nq} queries, top {k} of {} vectors ({kind}{}{}) in {seconds:.3} s, {queries_per_s:.0} queries/s\nscores are {order}\n",
        index.len(),
        if ivf { format!(", nprobe {}", options.nprobe) } else { String::new() },
        k_factor.map_or(String::new(), |f| format!(", k-factor {f}")),
    );
    for (q, (ids, scores)) in first_ids.iter().zip(&first_scores).take(3).enumerate() {
        text.push_str(&format!("query {q}: ids {ids:?}, scores {scores:?}\n"));
    }
    if let Some(out) = &args.out {
        text.push_str(&format!("wrote {}\n", out.display()));
    }
    Ok(Report { json, text })
}
