//! `kmeans`: time per Lloyd iteration and final mse on the three workloads of the k-means
//! issue, against faiss — measured side by side when `QCL_FAISS_PYTHON` names a Python with
//! faiss-cpu (running `../shared/bench/faiss_kmeans.py`, alternating with ours), otherwise the
//! faiss figures quoted from the issue (faiss-cpu 1.15, 2 threads, this machine kind).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use plotters::prelude::*;
use qcl_data::{KnownDataset, SplitDataset};
use qcl_pq::{KMeans, KMeansParams};
use qcl_tensor::Seed;
use serde_json::json;

use crate::data::dataset_path;
use crate::plot;
use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "kmeans",
    description:
        "k-means seconds per Lloyd iteration and final mse on three workloads (weight blocks, \
                  a Gaussian mixture, Fashion-MNIST pixels), every point used, against faiss.",
    needs_data: true,
    run,
};

struct Workload {
    name: &'static str,
    k: usize,
    /// faiss s/iter quoted in the issue (faiss-cpu 1.15, 2 threads, 10 iterations).
    faiss_quoted: f64,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "weight-blocks",
        k: 256,
        faiss_quoted: 0.150,
    },
    Workload {
        name: "gaussian-mixture",
        k: 1024,
        faiss_quoted: 0.652,
    },
    Workload {
        name: "fashion-mnist-pixels",
        k: 256,
        faiss_quoted: 0.727,
    },
];

/// The workload's `[n, d]` f32 matrix, also written to `data/kmeans-NAME.safetensors` (if
/// absent) for the faiss side; returns the path, the points and `d`.
fn workload(ctx: &Context, name: &str) -> Result<(PathBuf, Vec<f32>, usize)> {
    let path = ctx.data_dir.join(format!("kmeans-{name}.safetensors"));
    let (data, d): (Vec<f32>, usize) = match name {
        "weight-blocks" => qcl_pq::workloads::weight_blocks(),
        "gaussian-mixture" => qcl_pq::workloads::gaussian_mixture(),
        _ => {
            let split =
                SplitDataset::load(dataset_path(&ctx.data_dir, KnownDataset::FashionMnist))?;
            let pixels: Vec<f32> = split
                .train
                .pixels()
                .iter()
                .chain(split.test.pixels())
                .map(|&p| f32::from(p))
                .collect();
            (pixels, 784)
        }
    };
    if !path.is_file() {
        let n = data.len() / d;
        let t = Tensor::from_vec(data.clone(), (n, d), &Device::Cpu)?;
        qcl_tensor::write_safetensors(&path, &[("x", &t)], &BTreeMap::new())?;
    }
    Ok((path, data, d))
}

/// One side-by-side measurement.
#[derive(Default, Clone)]
struct Timing {
    seconds_per_iter: Vec<f64>,
    mse: f64,
}

fn run_faiss(
    python: &str,
    script: &Path,
    file: &Path,
    k: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let out = Command::new(python)
        .arg(script)
        .arg(file)
        .args(["x", &k.to_string(), &iters.to_string(), "2"])
        .output()
        .context("running faiss")?;
    anyhow::ensure!(
        out.status.success(),
        "faiss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["seconds_per_iter"].as_f64().context("seconds_per_iter")?,
        v["mse"].as_f64().context("mse")?,
    ))
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let iters = 10;
    let repeats = match ctx.mode {
        Mode::Quick => 2,
        Mode::Full => 5,
    };
    let faiss_python = std::env::var("QCL_FAISS_PYTHON").ok();
    let faiss_script = ctx.data_dir.join("../../shared/bench/faiss_kmeans.py");
    let faiss_script = if faiss_script.is_file() {
        faiss_script
    } else {
        PathBuf::from("../shared/bench/faiss_kmeans.py")
    };
    let mut rows = String::new();
    let mut figures = serde_json::Map::new();
    let mut curves: Vec<(String, Vec<f64>)> = Vec::new();
    let mut ratios = Vec::new();
    for w in &WORKLOADS {
        bar.set_message(format!("kmeans: {}", w.name));
        let (file, data, d) = workload(ctx, w.name)?;
        let n = data.len() / d;
        let params = KMeansParams {
            max_iter: iters,
            max_points_per_centroid: None,
            seed: Seed::new(0),
            ..KMeansParams::new(w.k)
        };
        let mut ours = Timing::default();
        let mut faiss = Timing::default();
        let mut history = Vec::new();
        for _ in 0..repeats {
            let model = KMeans::fit(&data, d, None, &params)?;
            ours.seconds_per_iter
                .push(model.lloyd_seconds / model.iterations as f64);
            ours.mse = model.mse(&data)?;
            history = model.objective_history.clone();
            if let Some(python) = &faiss_python {
                let (s, mse) = run_faiss(python, &faiss_script, &file, w.k, iters)?;
                faiss.seconds_per_iter.push(s);
                faiss.mse = mse;
            }
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let ours_s = best(&ours.seconds_per_iter);
        let (faiss_s, faiss_source) = if faiss.seconds_per_iter.is_empty() {
            (w.faiss_quoted, "quoted")
        } else {
            (best(&faiss.seconds_per_iter), "measured")
        };
        let ratio = ours_s / faiss_s;
        ratios.push(ratio);
        let mse_vs = if faiss.seconds_per_iter.is_empty() {
            "–".to_string()
        } else {
            format!("{:+.2}%", (ours.mse / faiss.mse - 1.0) * 100.0)
        };
        rows.push_str(&format!(
            "| {} | {n} × {d} | {} | {ours_s:.4} | {faiss_s:.4} ({faiss_source}) | {ratio:.2} | {:.2} | {:.6e} | {} | {mse_vs} |\n",
            w.name,
            w.k,
            ours_s / w.faiss_quoted,
            ours.mse,
            if faiss.seconds_per_iter.is_empty() { "–".to_string() } else { format!("{:.6e}", faiss.mse) },
        ));
        figures.insert(
            w.name.into(),
            json!({
                "n": n, "d": d, "k": w.k, "iters": iters,
                "ours_seconds_per_iter": ours.seconds_per_iter,
                "ours_mse": ours.mse,
                "faiss_seconds_per_iter": if faiss.seconds_per_iter.is_empty() { json!([w.faiss_quoted]) } else { json!(faiss.seconds_per_iter) },
                "faiss_source": faiss_source,
                "faiss_mse": if faiss.seconds_per_iter.is_empty() { serde_json::Value::Null } else { json!(faiss.mse) },
                "ratio_ours_over_faiss": ratio,
                "ratio_ours_over_quoted_faiss": ours_s / w.faiss_quoted,
                "objective_history": history,
            }),
        );
        curves.push((w.name.to_string(), history));
    }
    let png = "kmeans-objective.png";
    objective_plot(&ctx.out_dir.join(png), &curves)?;
    let markdown = format!(
        "Lloyd iterations: {iters}, every point used, random init (seed 0), 2 threads; best of {repeats} runs. \
         `ratio` = our s/iter ÷ faiss s/iter (target ≤ 0.5). faiss is *measured* side by side (alternating) \
         when `QCL_FAISS_PYTHON` names a Python with faiss-cpu, else *quoted* from the issue.\n\n\
         `ratio vs quoted` divides by the faiss figures quoted in the issue (0.150, 0.652, 0.727 s/iter).\n\n\
         | workload | n × d | k | ours s/iter | faiss s/iter | ratio | ratio vs quoted | ours mse | faiss mse | mse vs faiss |\n\
         |---|---|---|---|---|---|---|---|---|---|\n{rows}"
    );
    Ok(Outcome {
        summary: format!(
            "s/iter ratio ours/faiss: {}",
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        figures: serde_json::Value::Object(figures),
        markdown,
        plots: vec![(
            png.into(),
            "objective (mean squared distance) per Lloyd iteration, relative to the first".into(),
        )],
    })
}

fn objective_plot(path: &Path, curves: &[(String, Vec<f64>)]) -> Result<()> {
    let iters = curves.iter().map(|(_, c)| c.len()).max().unwrap_or(1);
    plot::png(path, (760, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("k-means objective / first iteration's", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(1usize..iters, 0.0f64..1.05)?;
        chart
            .configure_mesh()
            .x_desc("Lloyd iteration")
            .y_desc("relative objective")
            .draw()?;
        let colours = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
        ];
        for ((name, curve), colour) in curves.iter().zip(colours) {
            let first = curve.first().copied().unwrap_or(1.0);
            chart
                .draw_series(LineSeries::new(
                    curve.iter().enumerate().map(|(i, v)| (i + 1, v / first)),
                    colour.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}
