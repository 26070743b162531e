//! `memory`: peak resident memory of loading an `[n, d]` `f32` tensor and running k-means on
//! it, above the process's own start, against the tensor's size (the target: at most 1.3×).
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
                  iterations on it (plain and bounded), above the process's start, against \
                  the data's size.",
    needs_data: true,
    run,
};

/// What each probe does after loading: nothing, or 10 iterations of an algorithm.
const STEPS: [&str; 3] = ["load", "lloyd", "auto"];

/// The limit the issue sets: peak above baseline at most 1.3× the data.
const TARGET: f64 = 1.3;

/// `xtask probe-memory FILE TENSOR K STEP`: loads the tensor as rows (and runs k-means unless
/// STEP is `load`), then prints one JSON object of the memory figures.
pub fn probe(file: &str, tensor: &str, k: usize, step: &str) -> Result<()> {
    let baseline = qcl_nn::bench::peak_rss_bytes();
    let (n, d, data) = qcl_tensor::read_f32_rows(file, tensor)?;
    let after_load = qcl_nn::bench::peak_rss_bytes();
    let mut bound_bytes = 0;
    if step != "load" {
        let params = qcl_pq::KMeansParams {
            max_iter: 10,
            seed: qcl_tensor::Seed::new(0),
            algorithm: if step == "lloyd" {
                qcl_pq::KMeansAlgorithm::Lloyd
            } else {
                qcl_pq::KMeansAlgorithm::Auto
            },
            ..qcl_pq::KMeansParams::new(k)
        };
        bound_bytes = qcl_pq::KMeans::fit(&data, d, None, &params)?.bound_bytes;
    }
    let peak = qcl_nn::bench::peak_rss_bytes();
    let above = |p: Option<u64>| baseline.zip(p).map(|(b, p)| p.saturating_sub(b));
    println!(
        "{}",
        json!({
            "n": n, "d": d, "data_bytes": data.len() * 4, "bound_bytes": bound_bytes,
            "baseline_peak_rss_bytes": baseline,
            "load_above_baseline_bytes": above(after_load),
            "peak_above_baseline_bytes": above(peak),
        })
    );
    Ok(())
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut rows = Vec::new();
    let mut markdown = String::from(
        "| workload | n × d | data MB | step | bounds MB | peak above start MB | ratio | ≤ 1.3× |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for w in &WORKLOADS {
        let (path, _, _) = workload(ctx, w.name)?;
        for step in STEPS {
            bar.set_message(format!("memory: {} {step}", w.name));
            let out = Command::new(&exe)
                .args(["probe-memory", path.to_str().context("UTF-8 path")?, "x"])
                .args([w.k.to_string().as_str(), step])
                .output()
                .context("running the memory probe")?;
            anyhow::ensure!(
                out.status.success(),
                "memory probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout)?;
            let data = v["data_bytes"].as_f64().unwrap_or(0.0);
            let above = v["peak_above_baseline_bytes"].as_f64().unwrap_or(f64::NAN);
            let ratio = above / data.max(1.0);
            let mb = |b: f64| b / 1e6;
            markdown.push_str(&format!(
                "| {} | {} × {} | {:.1} | {step} | {:.1} | {:.1} | {ratio:.2} | {} |\n",
                w.name,
                v["n"],
                v["d"],
                mb(data),
                mb(v["bound_bytes"].as_f64().unwrap_or(0.0)),
                mb(above),
                if ratio <= TARGET { "yes" } else { "no" }
            ));
            rows.push(
                json!({"workload": w.name, "k": w.k, "step": step, "ratio": ratio, "probe": v}),
            );
        }
    }
    markdown.push_str(
        "\nPeak resident memory (`VmHWM`) of a fresh process after loading the tensor with \
         `qcl_tensor::read_f32_rows` (the file streamed through its checksum, only the rows \
         kept) and, for `lloyd` and `auto`, 10 k-means iterations (k as in the k-means \
         experiment; `auto` uses the distance bounds), minus its peak before loading. \
         `bounds` is the bound-based step's own memory.\n",
    );
    let worst = rows
        .iter()
        .filter(|r| r["step"] != "auto")
        .filter_map(|r| r["ratio"].as_f64())
        .fold(0.0f64, f64::max);
    Ok(Outcome {
        summary: format!(
            "loading and plain Lloyd peak at most {worst:.2}× the data above the process's start \
             (target ≤ {TARGET}×)"
        ),
        figures: json!({"rows": rows, "target": TARGET, "mode": format!("{:?}", ctx.mode)}),
        markdown,
        plots: vec![],
    })
}
