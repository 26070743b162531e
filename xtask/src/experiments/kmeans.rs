//! `kmeans`: Lloyd's k-means on the three workloads of the k-means issue, plain and with
//! distance bounds (Hamerly/Yinyang, [`KMeansAlgorithm::Auto`]), against faiss measured side by
//! side in the same run when `QCL_FAISS_PYTHON` names a Python with faiss-cpu (running
//! `../shared/bench/faiss_kmeans.py`, alternating with ours); without it the faiss columns stay
//! empty. Reports time per iteration over 10 iterations, time to convergence, the share of
//! distances computed per iteration, the memory of the bounds, and checks that the bounded run
//! gives plain Lloyd's result bit for bit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use plotters::prelude::*;

use qcl_pq::{KMeans, KMeansAlgorithm, KMeansConfig};
use qcl_tensor::Seed;
use serde_json::json;

use crate::experiments::OnData;
use crate::plot;
use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "kmeans",
    description: "k-means seconds per Lloyd iteration and to convergence on three workloads \
                  (weight blocks, a Gaussian mixture, Fashion-MNIST pixels), plain and with \
                  distance bounds, every point used, against faiss.",
    needs_data: true,
    takes_seeds: false,
    run,
};

/// Relative objective change below which a run has converged (or 100 iterations).
const TOLERANCE: f64 = 1e-4;
/// Iterations at most of the convergence runs.
const MAX_ITER: usize = 100;

pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) k: usize,
}

pub(crate) const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "weight-blocks",
        k: 256,
    },
    Workload {
        name: "gaussian-mixture",
        k: 1024,
    },
    Workload {
        name: "fashion-mnist-pixels",
        k: 256,
    },
];

/// The workload's `[n, d]` f32 matrix, also written to `data/kmeans-NAME.safetensors` (if
/// absent) for the faiss side; returns the path, the points and `d`.
pub(crate) fn workload(ctx: &Context, name: &str) -> Result<(PathBuf, Vec<f32>, usize)> {
    let path = ctx.data_dir.join(format!("kmeans-{name}.safetensors"));
    let (data, d): (Vec<f32>, usize) = match name {
        "weight-blocks" => qcl_pq::workloads::weight_blocks(),
        "gaussian-mixture" => qcl_pq::workloads::gaussian_mixture(),
        _ => OnData::fashion_mnist(ctx)?.all_pixels_f32(),
    };
    if !path.is_file() {
        let n = data.len() / d;
        let t = Tensor::from_vec(data.clone(), (n, d), &Device::Cpu)?;
        qcl_tensor::write_safetensors(&path, &[("x", &t)], &BTreeMap::new())?;
    }
    Ok((path, data, d))
}

fn run_faiss(
    python: &str,
    script: &Path,
    file: &Path,
    k: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let mut command = Command::new(python);
    command
        .arg(script)
        .arg(file)
        .args(["x", &k.to_string(), &iters.to_string(), "2"]);
    if let Some(core) = openblas_core() {
        command.env("OPENBLAS_CORETYPE", core);
    }
    let out = command.output().context("running faiss")?;
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

/// The OpenBLAS kernel faiss is run with, unless the caller set `OPENBLAS_CORETYPE`: the
/// OpenBLAS that faiss-cpu's wheel bundles does not recognise every recent CPU and falls back
/// to a generic core (Prescott) whose GEMM is several times slower, which would flatter us.
pub(crate) fn openblas_core() -> Option<&'static str> {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some("SkylakeX");
        }
        if is_x86_feature_detected!("avx2") {
            return Some("Haswell");
        }
    }
    None
}

/// The median of `v` (0 for none).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whether two runs ended with the same objective at every iteration and the same centroids,
/// bit for bit, and assign every point alike.
fn identical(a: &KMeans, b: &KMeans, data: &[f32]) -> Result<bool> {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cbits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Ok(bits(&a.objective_history) == bits(&b.objective_history)
        && cbits(&a.centroids) == cbits(&b.centroids)
        && a.assign(data)?.indices == b.assign(data)?.indices)
}

/// One workload's measurements.
struct Measured {
    lloyd: Vec<f64>,
    bounded: Vec<f64>,
    faiss: Vec<f64>,
    faiss_mse: Option<f64>,
    bounded_model: KMeans,
    lloyd_model: KMeans,
}

/// `repeats` rounds of plain Lloyd, bounded Lloyd and faiss, alternating; seconds per
/// iteration of each.
fn measure(
    data: &[f32],
    d: usize,
    k: usize,
    iters: usize,
    repeats: usize,
    faiss: Option<(&str, &Path, &Path)>,
) -> Result<Measured> {
    let params = |algorithm, max_iter, tolerance| run_params(k, algorithm, max_iter, tolerance);
    let (mut lloyd, mut bounded, mut faiss_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut faiss_mse = None;
    let mut models = None;
    for _ in 0..repeats {
        let plain = KMeans::fit(data, d, None, &params(KMeansAlgorithm::Lloyd, iters, 0.0))?;
        lloyd.push(plain.lloyd_seconds / plain.iterations as f64);
        let fast = KMeans::fit(data, d, None, &params(KMeansAlgorithm::Auto, iters, 0.0))?;
        bounded.push(fast.lloyd_seconds / fast.iterations as f64);
        if let Some((python, script, file)) = faiss {
            let (s, mse) = run_faiss(python, script, file, k, iters)?;
            faiss_s.push(s);
            faiss_mse = Some(mse);
        }
        models = Some((plain, fast));
    }
    let (lloyd_model, bounded_model) = models.context("at least one round")?;
    Ok(Measured {
        lloyd,
        bounded,
        faiss: faiss_s,
        faiss_mse,
        bounded_model,
        lloyd_model,
    })
}

/// The parameters of every run here: every point, random init from seed 0.
fn run_params(
    k: usize,
    algorithm: KMeansAlgorithm,
    max_iter: usize,
    tolerance: f64,
) -> KMeansConfig {
    KMeansConfig {
        max_iter,
        tolerance,
        max_points_per_centroid: None,
        seed: Seed::new(0),
        algorithm,
        ..KMeansConfig::new(k)
    }
}

/// Runs to convergence (relative change < [`TOLERANCE`] or [`MAX_ITER`] iterations), plain
/// and bounded: `(iterations, plain seconds, bounded seconds, identical, the bounded run's
/// distance share per iteration)`.
fn converge(data: &[f32], d: usize, k: usize) -> Result<(usize, f64, f64, bool, Vec<f64>)> {
    let params = |algorithm| run_params(k, algorithm, MAX_ITER, TOLERANCE);
    let plain = KMeans::fit(data, d, None, &params(KMeansAlgorithm::Lloyd))?;
    let fast = KMeans::fit(data, d, None, &params(KMeansAlgorithm::Auto))?;
    let same = identical(&plain, &fast, data)?;
    Ok((
        fast.iterations,
        plain.lloyd_seconds,
        fast.lloyd_seconds,
        same,
        fast.distance_share,
    ))
}

fn faiss_script(ctx: &Context) -> PathBuf {
    let script = ctx.data_dir.join("../../shared/bench/faiss_kmeans.py");
    if script.is_file() {
        script
    } else {
        PathBuf::from("../shared/bench/faiss_kmeans.py")
    }
}

fn ratio(ours: f64, faiss: f64) -> String {
    if faiss > 0.0 {
        format!("{:.2}", ours / faiss)
    } else {
        "–".into()
    }
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let iters = 10;
    let repeats = match ctx.mode {
        Mode::Quick => 3,
        Mode::Full => 7,
    };
    let faiss_python = std::env::var("QCL_FAISS_PYTHON").ok();
    let script = faiss_script(ctx);
    let (mut rows, mut conv_rows) = (String::new(), String::new());
    let mut figures = serde_json::Map::new();
    let mut curves = Vec::new();
    let mut shares = Vec::new();
    let mut ratios = Vec::new();
    for w in &WORKLOADS {
        bar.set_message(format!("kmeans: {}", w.name));
        let (file, data, d) = workload(ctx, w.name)?;
        let n = data.len() / d;
        let faiss = faiss_python
            .as_deref()
            .map(|py| (py, script.as_path(), file.as_path()));
        let m = measure(&data, d, w.k, iters, repeats, faiss)?;
        let same = identical(&m.lloyd_model, &m.bounded_model, &data)?;
        let (lloyd_s, bounded_s, faiss_s) =
            (median(&m.lloyd), median(&m.bounded), median(&m.faiss));
        let model = &m.bounded_model;
        let groups = (model.bound_groups > 0).then_some(model.bound_groups);
        let mean_share = model.distance_share[1..].iter().sum::<f64>() / (iters - 1) as f64;
        let (bound_mb, data_mb) = (
            model.bound_bytes as f64 / 1e6,
            (data.len() * 4) as f64 / 1e6,
        );
        let mse = model.mse(&data)?;
        rows.push_str(&format!(
            "| {} | {n} × {d} | {} | {} | {lloyd_s:.4} | {bounded_s:.4} | {} | {} | {} | {:.1}% | {bound_mb:.1} / {data_mb:.1} | {} | {mse:.6e} | {} |\n",
            w.name,
            w.k,
            groups.map_or("plain".into(), |t| if t == 1 { "Hamerly".to_string() } else { format!("Yinyang t = {t}") }),
            if m.faiss.is_empty() { "–".into() } else { format!("{faiss_s:.4}") },
            ratio(bounded_s, faiss_s),
            ratio(lloyd_s, faiss_s),
            mean_share * 100.0,
            if same { "yes" } else { "**no**" },
            m.faiss_mse.map_or("–".into(), |v| format!("{v:.6e}")),
        ));
        if !m.faiss.is_empty() {
            ratios.push(bounded_s / faiss_s);
        }
        bar.set_message(format!("kmeans: {} to convergence", w.name));
        let (conv_iters, plain_t, bounded_t, conv_same, conv_share) = converge(&data, d, w.k)?;
        // faiss has no early stop: its time to the same point is its time per iteration times
        // the iterations plain Lloyd needs from this start.
        let faiss_t = faiss_s * conv_iters as f64;
        conv_rows.push_str(&format!(
            "| {} | {conv_iters} | {plain_t:.3} | {bounded_t:.3} | {} | {} | {:.1}% | {} |\n",
            w.name,
            if m.faiss.is_empty() {
                "–".into()
            } else {
                format!("{faiss_t:.3}")
            },
            ratio(bounded_t, faiss_t),
            conv_share.last().copied().unwrap_or(1.0) * 100.0,
            if conv_same { "yes" } else { "**no**" },
        ));
        figures.insert(
            w.name.into(),
            json!({
                "n": n, "d": d, "k": w.k, "iters": iters, "repeats": repeats,
                "groups": groups,
                "lloyd_seconds_per_iter": m.lloyd,
                "bounded_seconds_per_iter": m.bounded,
                "faiss_seconds_per_iter": m.faiss,
                "ratio_bounded_over_faiss": (faiss_s > 0.0).then(|| bounded_s / faiss_s),
                "ratio_lloyd_over_faiss": (faiss_s > 0.0).then(|| lloyd_s / faiss_s),
                "distance_share": model.distance_share,
                "bound_bytes": model.bound_bytes,
                "data_bytes": data.len() * 4,
                "identical_to_lloyd": same,
                "mse": mse,
                "faiss_mse": m.faiss_mse,
                "objective_history": model.objective_history,
                "convergence": {
                    "iterations": conv_iters, "lloyd_seconds": plain_t, "bounded_seconds": bounded_t,
                    "faiss_seconds_estimated": (faiss_s > 0.0).then_some(faiss_t),
                    "identical_to_lloyd": conv_same, "distance_share": conv_share,
                },
            }),
        );
        curves.push((w.name.to_string(), model.objective_history.clone()));
        shares.push((w.name.to_string(), conv_share));
    }
    let objective_png = "kmeans-objective.png";
    let share_png = "kmeans-distance-share.png";
    line_plot(
        &ctx.out_dir.join(objective_png),
        "k-means objective / first iteration's",
        "relative objective",
        &curves,
        true,
    )?;
    line_plot(
        &ctx.out_dir.join(share_png),
        "share of point-centroid distances computed",
        "share",
        &shares,
        false,
    )?;
    let markdown = format!(
        "Lloyd iterations from random init (seed 0), every point used, 2 threads; median of {repeats} \
         rounds, each running plain Lloyd, bounded Lloyd (`KMeansAlgorithm::Auto`) and faiss in turn. \
         faiss is measured side by side when `QCL_FAISS_PYTHON` names a Python with faiss-cpu \
         (OpenBLAS kernel: {}); otherwise its columns are empty. `share` is the mean share of the n·k distances the bounded \
         run computed in iterations 2–10; `bounds` is their memory against the data's (MB). \
         `identical`: the bounded run's objective at every iteration, final centroids and \
         assignments equal plain Lloyd's bit for bit (checked in this run).\n\n\
         | workload | n × d | k | bounds | Lloyd s/iter | bounded s/iter | faiss s/iter | bounded ÷ faiss | Lloyd ÷ faiss | share | bounds / data MB | identical | mse | faiss mse |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\
         Time to convergence (relative objective change < {TOLERANCE:e}, or {MAX_ITER} iterations), one run each. \
         faiss has no early stop: its time is its measured s/iter times the iterations Lloyd needed \
         from this start. `last share`: distances computed at the last iteration.\n\n\
         | workload | iterations | Lloyd s | bounded s | faiss s (est.) | bounded ÷ faiss | last share | identical |\n\
         |---|---|---|---|---|---|---|---|\n{conv_rows}",
        openblas_core().map_or_else(
            || format!("`OPENBLAS_CORETYPE` as set by the caller: {:?}", std::env::var("OPENBLAS_CORETYPE").ok()),
            |core| format!("`OPENBLAS_CORETYPE={core}`, since the bundled OpenBLAS may not recognise this CPU"),
        ),
    );
    Ok(Outcome {
        summary: format!(
            "bounded s/iter ÷ faiss: {}",
            if ratios.is_empty() { "faiss not measured".to_string() } else {
                ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
            }
        ),
        figures: serde_json::Value::Object(figures),
        markdown,
        plots: vec![
            (objective_png.into(), "objective (mean squared distance) per Lloyd iteration, relative to the first".into()),
            (share_png.into(), "share of the n·k distances the bounded run computed, per iteration, until convergence".into()),
        ],
    })
}

/// Curves per workload against the Lloyd iteration, each divided by its first value when
/// `relative`.
fn line_plot(
    path: &Path,
    caption: &str,
    y_desc: &str,
    curves: &[(String, Vec<f64>)],
    relative: bool,
) -> Result<()> {
    let iters = curves
        .iter()
        .map(|(_, c)| c.len())
        .max()
        .unwrap_or(1)
        .max(2);
    plot::png(path, (760, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(1usize..iters, 0.0f64..1.05)?;
        chart
            .configure_mesh()
            .x_desc("Lloyd iteration")
            .y_desc(y_desc)
            .draw()?;
        let colours = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
        ];
        for ((name, curve), colour) in curves.iter().zip(colours) {
            let first = if relative {
                curve.first().copied().unwrap_or(1.0)
            } else {
                1.0
            };
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
        crate::plot::legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        Ok(())
    })
}
