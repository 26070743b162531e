//! `training`: CPU training throughput of the two reference models of the qcl-nn issue
//! (ResNet-20 and the AQM-style VQ autoencoder, random 1×28×28 batches of 128, SGD momentum
//! 0.9), against PyTorch — measured side by side, alternating, when `QCL_TORCH_PYTHON` names a
//! Python with torch (running `../shared/bench/torch_reference.py 2`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use plotters::prelude::*;
use qcl_nn::bench::{bench_training, BenchModel, TrainBenchConfig};
use serde_json::json;

use crate::plot;
use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "training",
    description: "Training samples per second of ResNet-20 and the VQ autoencoder on 2 CPU \
                  threads (batch 128), alternating with PyTorch when it is available.",
    needs_data: false,
    takes_seeds: false,
    run,
};

const MODELS: [BenchModel; 2] = [BenchModel::ResNet20, BenchModel::VqAutoencoder];

/// One PyTorch run: samples per second by model name.
fn run_torch(python: &str, script: &Path) -> Result<Vec<(String, f64)>> {
    let out = Command::new(python)
        .arg(script)
        .arg("2")
        .output()
        .context("running the PyTorch reference")?;
    anyhow::ensure!(
        out.status.success(),
        "PyTorch reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok((
                v["model"].as_str().context("model")?.to_string(),
                v["samples_per_s"].as_f64().context("samples_per_s")?,
            ))
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let rounds = match ctx.mode {
        Mode::Quick => 3,
        Mode::Full => 8,
    };
    let torch_python = std::env::var("QCL_TORCH_PYTHON").ok();
    let script = ctx.data_dir.join("../../shared/bench/torch_reference.py");
    let script = if script.is_file() {
        script
    } else {
        PathBuf::from("../shared/bench/torch_reference.py")
    };
    // Per model: our samples/s per round, PyTorch's per round.
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); MODELS.len()];
    let mut torch: Vec<Vec<f64>> = vec![Vec::new(); MODELS.len()];
    let mut peak_rss = None;
    for round in 0..rounds {
        for (i, model) in MODELS.iter().enumerate() {
            bar.set_message(format!(
                "training: round {}/{rounds}, {}",
                round + 1,
                model.name()
            ));
            let report = bench_training(&TrainBenchConfig::new(*model))?;
            ours[i].push(report.samples_per_s);
            peak_rss = report.peak_rss_bytes.or(peak_rss);
        }
        if let Some(python) = &torch_python {
            bar.set_message(format!("training: round {}/{rounds}, PyTorch", round + 1));
            for (name, samples) in run_torch(python, &script)? {
                if let Some(i) = MODELS.iter().position(|m| m.name() == name) {
                    torch[i].push(samples);
                }
            }
        }
    }
    let mut rows = String::new();
    let mut figures = serde_json::Map::new();
    let mut summary = Vec::new();
    let mut series = Vec::new();
    for (i, model) in MODELS.iter().enumerate() {
        let ratios: Vec<f64> = ours[i].iter().zip(&torch[i]).map(|(o, t)| o / t).collect();
        let (torch_median, ratio_median) = if torch[i].is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (median(&torch[i]), median(&ratios))
        };
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} |\n",
            model.name(),
            median(&ours[i]),
            if torch[i].is_empty() {
                "not run".to_string()
            } else {
                format!("{torch_median:.0}")
            },
            if ratios.is_empty() {
                "–".to_string()
            } else {
                format!("{ratio_median:.2}")
            },
            if ratios.is_empty() {
                "–".to_string()
            } else {
                fmt(&ratios)
            },
        ));
        figures.insert(
            model.name().into(),
            json!({
                "batch": 128,
                "ours_samples_per_s": ours[i],
                "torch_samples_per_s": torch[i],
                "ratios": ratios,
                "median_ratio": if ratios.is_empty() { serde_json::Value::Null } else { json!(ratio_median) },
            }),
        );
        summary.push(if ratios.is_empty() {
            format!("{} {:.0} samples/s", model.name(), median(&ours[i]))
        } else {
            format!("{} {ratio_median:.2}× PyTorch", model.name())
        });
        series.push((model.name().to_string(), ratios));
    }
    figures.insert("peak_rss_bytes".into(), json!(peak_rss));
    let png = "training-throughput.png";
    let plots: Vec<(String, String)> = if series.iter().any(|(_, r)| !r.is_empty()) {
        ratio_plot(&ctx.out_dir.join(png), &series)?;
        vec![(
            png.into(),
            "qcl ÷ PyTorch training samples/s in each round (target ≥ 1)".into(),
        )]
    } else {
        Vec::new()
    };
    let markdown = format!(
        "Random 1×28×28 inputs, batch 128, SGD momentum 0.9 (lr 0.05), 3 warm-up and 20 timed \
         steps, 2 threads; {rounds} rounds, each timing qcl then PyTorch (`torch_reference.py 2`, \
         run when `QCL_TORCH_PYTHON` names a Python with torch). The machine is shared and \
         noisy, so the ratio is taken per round and the median reported. Target: ratio ≥ 1.0.\n\n\
         | model | qcl samples/s (median) | PyTorch samples/s (median) | ratio (median) | ratio per round |\n\
         |---|---|---|---|---|\n{rows}\n\
         Peak resident memory of this process (both models trained in it): {}.\n",
        peak_rss.map_or("unknown".to_string(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)),
    );
    Ok(Outcome {
        summary: summary.join("; "),
        figures: serde_json::Value::Object(figures),
        markdown,
        plots,
    })
}

/// Ratio qcl/PyTorch per round, one line per model, with the 1.0 target.
fn ratio_plot(path: &Path, series: &[(String, Vec<f64>)]) -> Result<()> {
    let rounds = series
        .iter()
        .map(|(_, r)| r.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let top = series
        .iter()
        .flat_map(|(_, r)| r.iter().copied())
        .fold(1.2f64, f64::max)
        * 1.05;
    plot::png(path, (640, 380), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "training throughput, qcl ÷ PyTorch, per round",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(1usize..rounds, 0.0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("ratio")
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(1, 1.0), (rounds, 1.0)],
            BLACK.mix(0.5).stroke_width(1),
        ))?;
        let colours = [RGBColor(31, 119, 180), RGBColor(255, 127, 14)];
        for ((name, ratios), colour) in series.iter().zip(colours) {
            chart
                .draw_series(LineSeries::new(
                    ratios.iter().enumerate().map(|(i, r)| (i + 1, *r)),
                    colour.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            chart.draw_series(
                ratios
                    .iter()
                    .enumerate()
                    .map(|(i, r)| Circle::new((i + 1, *r), 3, colour.filled())),
            )?;
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    })
}
