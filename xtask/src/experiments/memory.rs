//! `memory`: peak resident memory of loading an `[n, d]` `f32` tensor and running k-means on
//! it, above the process's own start and above the same process warmed up by a small k-means,
//! against the tensor's size (the target: at most 1.3×, judged above the warm process).
//! Each measurement runs in a fresh process (`xtask probe-memory`), since a process's peak
//! only grows.

use std::process::Command;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use serde_json::{json, Value};

use crate::experiments::kmeans::{workload, WORKLOADS};
use crate::reproduce::{Context, Experiment, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "memory",
    description: "Peak resident memory of loading each k-means workload and of 10 Lloyd \
                  iterations on it (plain and bounded), above the process's start and above \
                  a warmed-up process, against the data's size.",
    needs_data: true,
    takes_seeds: false,
    run,
};

/// What each probe does after loading: nothing, or 10 iterations of an algorithm.
const STEPS: [&str; 3] = ["load", "lloyd", "auto"];

/// The limit the issue sets: peak above baseline at most 1.3× the data.
const TARGET: f64 = 1.3;

/// `xtask probe-memory FILE TENSOR K DIM STEP`: loads the tensor as rows (and runs k-means unless
/// STEP is `load`), then prints one JSON object of the memory figures.
///
/// Two baselines: the process's start, and (for k-means) the process after a warm-up run of
/// the same k-means on `4·k` random points, which starts the thread pool, pages in the code
/// and sets up each thread's buffers and allocator arena: a cost of running k-means at all,
/// not of the data.
pub fn probe(file: &str, tensor: &str, k: usize, dim: usize, step: &str) -> Result<()> {
    let start = qcl_nn::bench::peak_rss_bytes();
    let params = |algorithm| qcl_pq::KMeansConfig {
        max_iter: 10,
        seed: qcl_tensor::Seed::new(0),
        algorithm,
        ..qcl_pq::KMeansConfig::new(k)
    };
    let algorithm = if step == "lloyd" {
        qcl_pq::KMeansAlgorithm::Lloyd
    } else {
        qcl_pq::KMeansAlgorithm::Auto
    };
    if step != "load" {
        let points = qcl_tensor::Seed::new(1)
            .rng()
            .normal_vec(4 * k * dim, 0.0, 1.0);
        qcl_pq::KMeans::fit(&points, dim, None, &params(algorithm))?;
    }
    let warm = qcl_nn::bench::peak_rss_bytes();
    let (n, d, data) = qcl_tensor::read_f32_rows(file, tensor)?;
    let mut bound_bytes = 0;
    if step != "load" {
        bound_bytes = qcl_pq::KMeans::fit(&data, d, None, &params(algorithm))?.bound_bytes;
    }
    let peak = qcl_nn::bench::peak_rss_bytes();
    let above = |base: Option<u64>| base.zip(peak).map(|(b, p)| p.saturating_sub(b));
    println!(
        "{}",
        json!({
            "n": n, "d": d, "data_bytes": data.len() * 4, "bound_bytes": bound_bytes,
            "start_peak_rss_bytes": start,
            "warm_peak_rss_bytes": warm,
            "peak_above_start_bytes": above(start),
            "peak_above_warm_bytes": above(warm),
        })
    );
    Ok(())
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut rows = Vec::new();
    let mut markdown = String::from(
        "| workload | n × d | data MB | step | bounds MB | above start MB | ratio | above warm MB | ratio | ≤ 1.3× |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for w in &WORKLOADS {
        let (path, data, d) = workload(ctx, w.name)?;
        drop(data);
        for step in STEPS {
            bar.set_message(format!("memory: {} {step}", w.name));
            let out = Command::new(&exe)
                .args(["probe-memory", path.to_str().context("UTF-8 path")?, "x"])
                .args([w.k.to_string(), d.to_string(), step.to_string()])
                .output()
                .context("running the memory probe")?;
            anyhow::ensure!(
                out.status.success(),
                "memory probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout)?;
            let data = v["data_bytes"].as_f64().unwrap_or(0.0);
            let mb = |b: f64| b / 1e6;
            let above_start = v["peak_above_start_bytes"].as_f64().unwrap_or(f64::NAN);
            let above_warm = v["peak_above_warm_bytes"].as_f64().unwrap_or(f64::NAN);
            let (start_ratio, warm_ratio) =
                (above_start / data.max(1.0), above_warm / data.max(1.0));
            markdown.push_str(&format!(
                "| {} | {} × {} | {:.1} | {step} | {:.1} | {:.1} | {start_ratio:.2} | {:.1} | {warm_ratio:.2} | {} |\n",
                w.name,
                v["n"],
                v["d"],
                mb(data),
                mb(v["bound_bytes"].as_f64().unwrap_or(0.0)),
                mb(above_start),
                mb(above_warm),
                if warm_ratio <= TARGET { "yes" } else { "no" }
            ));
            rows.push(json!({
                "workload": w.name, "k": w.k, "step": step,
                "ratio_above_start": start_ratio, "ratio_above_warm": warm_ratio, "probe": v,
            }));
        }
    }
    markdown.push_str(
        "\nPeak resident memory (`VmHWM`) of a fresh process after loading the tensor with \
         `qcl_tensor::read_f32_rows` (the file streamed through its checksum, only the rows \
         kept) and, for `lloyd` and `auto`, 10 k-means iterations with the default parameters \
         (k as in the k-means experiment; a subsample of at most 256 points per centroid, read \
         in place; `lloyd` computes every distance, `auto` keeps distance bounds within a \
         fifth of the data's size). `bounds` is the bound-based step's own memory. Two \
         baselines: the process's start, and the same process after a warm-up k-means (same \
         k and algorithm) on 4·k random points, which starts the threads, pages in the code \
         and sets up each thread's buffers: the difference is what running k-means costs \
         whatever the data (the warm-up's own 4·k·d points count in it), and the second \
         ratio is what the data costs. The target (≤ 1.3×) \
         is judged on the second.\n",
    );
    let worst = |key: &str| {
        rows.iter()
            .filter_map(|r| r[key].as_f64())
            .fold(0.0f64, f64::max)
    };
    Ok(Outcome {
        summary: format!(
            "loading and k-means (plain and bounded) peak at most {:.2}× the data above a warm \
             process, {:.2}× above a cold start (target ≤ {TARGET}×)",
            worst("ratio_above_warm"),
            worst("ratio_above_start"),
        ),
        figures: json!({"rows": rows, "target": TARGET, "mode": format!("{:?}", ctx.mode)}),
        markdown,
        plots: vec![],
    })
}
