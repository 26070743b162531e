//! `aqm`: online continual compression with adaptive quantization modules (AQM,
//! docs/methods/aqm.md § Fashion-MNIST experiment) on split Fashion-MNIST — fine-tune, ER-raw,
//! raw-AQM, AQM and iid-online at budgets B50 and B20 (1- and 4-byte parameter accounting),
//! several seeds.
//!
//! (Over 600 lines: the settings, the module throughput measurement, the jobs per method, budget
//! and seed and their streams, and the report with its table and four figures, accuracy, samples
//! stored, drift and a reconstruction grid, are one experiment; about 30 lines are tests.)

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use plotters::prelude::*;
use qcl_aqm::online::{run as run_online, ClassifierInput, Method, OnlineConfig, RunResult};
use qcl_aqm::{QLayer, QLayerConfig};
use qcl_continual::{Scenario, SplitConfig};
use qcl_data::{KnownDataset, SplitDataset};
use serde::Serialize;
use serde_json::json;

use crate::data::dataset_path;
use crate::experiments::mean_std;
use crate::plot;
use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "aqm",
    description: "AQM (docs/methods/aqm.md § Fashion-MNIST experiment) on split Fashion-MNIST: \
                  fine-tune, ER-raw, raw-AQM, AQM and iid-online under equal byte budgets B50 \
                  and B20 (1- and 4-byte parameters), final accuracy over seeds, stored \
                  samples, drift, reconstructions.",
    needs_data: true,
    takes_seeds: false,
    run,
};

/// B50 = 50 raw images per class of 10 classes of 784 bytes.
pub const B50: u64 = 392_000;
/// B20.
pub const B20: u64 = 156_800;

/// Everything that defines the experiment; recorded in the results.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Streamed images per task (None: all 10,800).
    pub samples_per_task: Option<usize>,
    /// Test images per class (None: all 1,000).
    pub test_per_class: Option<usize>,
    /// Rate of the module's `p` EMA and of the slow decoder.
    pub stat_rate: f64,
    /// Budgets and parameter bytes of the AQM runs.
    pub aqm_budgets: Vec<(u64, u64)>,
    /// Budgets and parameter bytes of the AQM runs whose classifier sees decoded images
    /// ([`ClassifierInput::Decoded`]; in neither the paper nor the reference code, see
    /// docs/methods/aqm.md § Decoded classifier input).
    pub decoded_budgets: Vec<(u64, u64)>,
    /// Training steps of the module throughput measurement (batch 128).
    pub bench_steps: usize,
}

impl Settings {
    /// The settings of `mode`.
    pub fn for_mode(mode: Mode) -> Self {
        match mode {
            // 1,000 images per task (500 steps): the rate of p is raised to 0.05 so that the
            // module can freeze within task 0 (≥ 45 updates instead of ≥ 230).
            Mode::Quick => Settings {
                seeds: vec![0, 1, 2],
                samples_per_task: Some(1000),
                test_per_class: Some(300),
                stat_rate: 0.05,
                aqm_budgets: vec![(B50, 1), (B20, 1), (B20, 4)],
                decoded_budgets: vec![(B50, 1), (B20, 1)],
                bench_steps: 10,
            },
            Mode::Full => Settings {
                seeds: vec![0, 1, 2],
                samples_per_task: None,
                test_per_class: None,
                stat_rate: 0.01,
                aqm_budgets: vec![(B50, 1), (B50, 4), (B20, 1), (B20, 4)],
                decoded_budgets: vec![(B50, 1), (B20, 1)],
                bench_steps: 30,
            },
        }
    }
}

/// One (method, budget, param bytes) cell over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Method name.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Bytes per parameter.
    pub param_bytes: u64,
    /// Final accuracy per seed.
    pub final_accuracy: Vec<f64>,
    /// Forgetting per seed.
    pub forgetting: Vec<f64>,
    /// Stored samples at the end per seed.
    pub stored_at_end: Vec<usize>,
    /// Stream samples per second per seed.
    pub samples_per_second: Vec<f64>,
    /// Freeze step per seed (AQM).
    pub freeze_step: Vec<Option<u64>>,
    /// K' per seed (AQM).
    pub trimmed_codes: Vec<Option<usize>>,
    /// Final drift MSE per seed (AQM).
    pub final_drift: Vec<Option<f64>>,
    /// AQM: final accuracy on test images passed through the frozen module, per seed.
    pub accuracy_on_reconstructions: Vec<f64>,
}

/// Name of the AQM runs with decoded classifier input.
const DECODED: &str = "AQM, decoded input";

fn method_name(method: Method, input: ClassifierInput) -> &'static str {
    match (method, input) {
        (Method::Aqm, ClassifierInput::Decoded) => DECODED,
        _ => method.name(),
    }
}

fn budget_name(b: u64) -> &'static str {
    if b == B50 {
        "B50"
    } else if b == B20 {
        "B20"
    } else {
        "-"
    }
}

/// Training samples per second of one Fashion-MNIST module at batch 128 (encoder, quantizer,
/// decoder, loss, Adam), after 2 warm-up steps.
fn module_throughput(steps: usize) -> Result<f64> {
    let mut layer = QLayer::new(
        QLayerConfig::fashion_mnist(),
        1,
        [28, 28],
        0.into(),
        &Device::Cpu,
    )?;
    let x = Tensor::rand(-1f32, 1f32, (128, 1, 28, 28), &Device::Cpu)?;
    let step = |layer: &mut QLayer| -> Result<()> {
        let out = layer.forward(&x, true)?;
        let loss = layer.loss(&out, &x, 0, true)?;
        layer.optimize(&loss)?;
        Ok(())
    };
    for _ in 0..2 {
        step(&mut layer)?;
    }
    let started = Instant::now();
    for _ in 0..steps {
        step(&mut layer)?;
    }
    Ok((steps * 128) as f64 / started.elapsed().as_secs_f64())
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let data = SplitDataset::load(dataset_path(&ctx.data_dir, KnownDataset::FashionMnist))
        .context("loading Fashion-MNIST (run `cargo xtask data`)")?;
    let outcome = run_with(ctx, &data, &Settings::for_mode(ctx.mode), bar);
    if let Err(e) = &outcome {
        // The harness reports failures on the progress bar, which is hidden without a terminal.
        eprintln!("aqm: {e:#}");
    }
    outcome
}

/// The experiment on `data` with `settings`.
pub fn run_with(
    ctx: &Context,
    data: &SplitDataset,
    settings: &Settings,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let scenario = Scenario::class_incremental(data, &SplitConfig::default())?;
    let jobs = jobs(settings);
    let started = Instant::now();
    let (cells, kept) = run_streams(&scenario, settings, &jobs, bar)?;
    let stream_seconds = started.elapsed().as_secs_f64();
    bar.set_message("aqm: module throughput");
    let (module_sps, fixed_sps) = throughputs(settings)?;

    // Targets.
    let acc = |m: &str, b: &str, p: u64| -> f64 {
        cells
            .iter()
            .find(|c| c.method == m && (c.budget == b || b == "-") && (c.param_bytes == p))
            .map_or(f64::NAN, |c| mean_std(&c.final_accuracy).0)
    };
    let stored = |m: &str, b: &str, p: u64| -> f64 {
        cells
            .iter()
            .find(|c| c.method == m && c.budget == b && c.param_bytes == p)
            .map_or(f64::NAN, |c| {
                c.stored_at_end.iter().sum::<usize>() as f64 / c.stored_at_end.len().max(1) as f64
            })
    };
    let (ft, er50, aqm50, iid) = (
        acc("fine-tune", "-", 1),
        acc("ER-raw", "B50", 1),
        acc("AQM", "B50", 1),
        acc("iid-online", "-", 1),
    );
    let (er20, aqm20_4) = (acc("ER-raw", "B20", 1), acc("AQM", "B20", 4));
    let (dec50, dec20) = (acc(DECODED, "B50", 1), acc(DECODED, "B20", 1));
    let er20_1 = acc("ER-raw", "B20", 1);
    let order_b50 = ft < er50 && er50 < aqm50 && aqm50 < iid;
    let margin = aqm50 - er50;
    let b20_check = er20 > aqm20_4;
    let ratio = stored("AQM", "B50", 1) / stored("ER-raw", "B50", 1);
    let yes = |b: bool| if b { "met" } else { "**not met**" };

    let rows: String = cells.iter().map(cell_row).collect();
    let steps_total = settings.samples_per_task.map_or(10_800, |s| s) * 5 / 10;
    let markdown = format!(
        "Split Fashion-MNIST, 5 tasks of 2 classes, class-incremental with one 10-way head, one \
         pass in batches of 10 (plus ≤ 10 replayed from earlier tasks), {spt} streamed images \
         per task after holding out 10 % ({steps_total} steps), test {tpc} images per class; \
         seeds {seeds:?}; mean ± std over seeds. Classifier: the small CNN of \
         docs/methods/aqm.md § Fashion-MNIST experiment, SGD lr 0.05. \
         AQM: one module (ds 2, C 32, K 16, N 1, γ 0.6, β 2, Adam 1e-3, d_th 0.10, replay \
         counted twice), rate of `p` and of the slow decoder {rate}. Budgets: B50 = 392,000 B, \
         B20 = 156,800 B; AQM charges its autoencoder (26,033 parameters, 36,850 after freezing \
         with the slow decoder) at 1 or 4 bytes per parameter; ER-raw reservoir of ⌊budget/784⌋ \
         images; raw-AQM = the same memory without a module.\n\n\
         | method | budget | param bytes | final accuracy % | accuracy on reconstructed test images % | forgetting % | stored at end | stream samples/s | freeze step | K' | final drift MSE |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\
         *Accuracy on reconstructed test images*: the final classifier on test images passed \
         through the frozen module (encoder, codebook, slow decoder), the kind of image it learnt \
         earlier tasks from; a value above the final accuracy measures the gap between decoded \
         replay and the raw test images. *{DECODED}*: the same runs (same modules, memory and \
         drift) with `ClassifierInput::Decoded`: once the module is frozen the classifier is \
         trained on incoming images decoded from their codes and tested on test images passed \
         through the module, so that decoded-looking images stop meaning \"an old class\" (in \
         neither the paper nor the reference code, which trains on raw incoming images; \
         docs/methods/aqm.md § Decoded classifier input).\n\n\
         Targets:\n\n\
         - fine-tune < ER-raw < AQM < iid-online at B50: {t1} ({ft:.1} / {er50:.1} / {aqm50:.1} / {iid:.1} %); \
         AQM − ER-raw = {margin:+.1} points.\n\
         - ER-raw ahead of AQM at B20 with 4-byte parameters: {t2} ({er20:.1} vs {aqm20_4:.1} %).\n\
         - AQM stores ≥ 5× as many samples as ER-raw at the end of B50: {t3} ({ratio:.1}×).\n\
         - Beside the targets, {DECODED} against ER-raw: {dec50:.1} vs {er50:.1} % at B50 \
         ({dmargin:+.1} points), {dec20:.1} vs {er20_1:.1} % at B20 with 1-byte parameters.\n\n\
         Throughput: stream samples/s per run in the table (whole loop: modules, classifier, \
         memory; evaluation and drift excluded). One module's training throughput at batch 128 \
         (forward with the EMA quantizer, loss, backward, Adam): {module_sps:.0} samples/s; \
         measured right after it, qcl-nn's benchmark model with the same convolutions (fixed \
         codebook, SGD), whose PyTorch reference in docs/results/training.md (`vq_ae`, C 32, \
         K 16) ran at 2,622 samples/s against qcl's 2,501: {fixed_sps:.0} samples/s here, so \
         the module runs at {rel:.2}× the benchmark model and roughly {torch:.2}× PyTorch by that \
         ratio. All timings are from a 2-core machine that other jobs may share. \
         Wall time of all stream runs: {stream_seconds:.0} s.",
        rel = module_sps / fixed_sps,
        torch = module_sps / fixed_sps * 2501.0 / 2622.0,
        spt = settings.samples_per_task.map_or("10,800".to_string(), |s| s.to_string()),
        tpc = settings.test_per_class.map_or("1,000".to_string(), |s| s.to_string()),
        seeds = settings.seeds,
        rate = settings.stat_rate,
        t1 = yes(order_b50 && margin > 0.02),
        t2 = yes(b20_check),
        t3 = yes(ratio >= 5.0),
        ft = 100.0 * ft,
        er50 = 100.0 * er50,
        aqm50 = 100.0 * aqm50,
        iid = 100.0 * iid,
        margin = 100.0 * margin,
        er20 = 100.0 * er20,
        aqm20_4 = 100.0 * aqm20_4,
        dec50 = 100.0 * dec50,
        dec20 = 100.0 * dec20,
        er20_1 = 100.0 * er20_1,
        dmargin = 100.0 * (dec50 - er50),
    );

    let acc_png = "aqm-accuracy.png";
    accuracy_plot(&ctx.out_dir.join(acc_png), &cells)?;
    let stored_png = "aqm-stored.png";
    stored_plot(&ctx.out_dir.join(stored_png), &kept)?;
    let drift_png = "aqm-drift.png";
    drift_plot(&ctx.out_dir.join(drift_png), &kept)?;
    let grid_png = "aqm-reconstructions.png";
    if let Some((_, r)) = kept.iter().find(|(n, _)| n.starts_with("AQM B50 1B")) {
        grid(&ctx.out_dir.join(grid_png), &r.examples)?;
    }
    let summary = format!(
        "B50 final accuracy: fine-tune {:.1}, ER-raw {:.1}, AQM {:.1}, iid {:.1} %; B20/4-byte ER {:.1} vs AQM {:.1} %; AQM stores {:.1}× ER",
        100.0 * ft, 100.0 * er50, 100.0 * aqm50, 100.0 * iid, 100.0 * er20, 100.0 * aqm20_4, ratio
    );
    Ok(Outcome {
        summary,
        figures: json!({
            "settings": settings,
            "cells": cells,
            "targets": {
                "order_b50": order_b50, "aqm_minus_er_b50": margin, "er_beats_aqm_b20_4byte": b20_check,
                "stored_ratio_b50": ratio,
                "decoded_minus_er_b50": dec50 - er50,
            },
            "module_training_samples_per_second": module_sps,
            "fixed_codebook_model_samples_per_second": fixed_sps,
            "stream_seconds": stream_seconds,
            "seed0_runs": kept.iter().map(|(n, r)| json!({"name": n, "memory_curve": r.memory_curve, "drift": r.drift, "accuracy": r.accuracy})).collect::<Vec<_>>(),
        }),
        markdown,
        plots: vec![
            (acc_png.into(), "Final accuracy per method and budget (mean ± std over seeds)".into()),
            (stored_png.into(), "Stored samples over the stream (first seed, B50, 1-byte parameters)".into()),
            (drift_png.into(), "Drift: MSE of stored codes decoded now vs their originals (first seed)".into()),
            (grid_png.into(), "Stored samples at the end of the stream: originals (top) and their reconstructions from codes (bottom), AQM B50".into()),
        ],
    })
}

/// One AQM module's training samples/s at batch 128, then qcl-nn's benchmark model with the
/// same convolutions measured right after it, under the same load.
fn throughputs(settings: &Settings) -> Result<(f64, f64)> {
    let module_sps = module_throughput(settings.bench_steps)?;
    // The same convolutions with a fixed codebook and SGD: qcl-nn's benchmark model, whose
    // ratio to PyTorch is recorded in docs/results/training.md; measured here under the same
    // load as the module.
    let fixed_sps = qcl_nn::bench::bench_training(&qcl_nn::bench::TrainBenchConfig {
        batch: 128,
        steps: settings.bench_steps,
        warmup: 2,
        ..qcl_nn::bench::TrainBenchConfig::new(qcl_nn::bench::BenchModel::VqAutoencoder)
    })?
    .samples_per_s;
    Ok((module_sps, fixed_sps))
}

/// Stream runs with their names ("AQM B50 1B").
type NamedRuns = Vec<(String, RunResult)>;

/// One stream run: method, budget, bytes per module parameter, classifier input.
type Job = (Method, u64, u64, ClassifierInput);

/// The runs of the table, in its order.
fn jobs(settings: &Settings) -> Vec<Job> {
    let raw = ClassifierInput::Raw;
    let mut jobs: Vec<Job> = vec![
        (Method::FineTune, B50, 1, raw),
        (Method::IidOnline, B50, 1, raw),
    ];
    for b in [B50, B20] {
        jobs.push((Method::ErRaw, b, 1, raw));
        jobs.push((Method::RawAqm, b, 1, raw));
    }
    for &(b, p) in &settings.aqm_budgets {
        jobs.push((Method::Aqm, b, p, raw));
    }
    for &(b, p) in &settings.decoded_budgets {
        jobs.push((Method::Aqm, b, p, ClassifierInput::Decoded));
    }
    jobs
}

/// The table cell of a job, before any run.
fn empty_cell(&(m, b, p, input): &Job) -> Cell {
    Cell {
        method: method_name(m, input).into(),
        budget: if matches!(m, Method::FineTune | Method::IidOnline) {
            "-".into()
        } else {
            budget_name(b).into()
        },
        param_bytes: p,
        final_accuracy: vec![],
        forgetting: vec![],
        stored_at_end: vec![],
        samples_per_second: vec![],
        freeze_step: vec![],
        trimmed_codes: vec![],
        final_drift: vec![],
        accuracy_on_reconstructions: vec![],
    }
}

/// Every job on every seed: the table's cells and the first seed's runs (for the curves).
fn run_streams(
    scenario: &Scenario,
    settings: &Settings,
    jobs: &[Job],
    bar: &ProgressBar,
) -> Result<(Vec<Cell>, NamedRuns)> {
    let mut cells: Vec<Cell> = jobs.iter().map(empty_cell).collect();
    // Seed-0 runs kept for the curves.
    let mut kept: NamedRuns = Vec::new();
    for &seed in &settings.seeds {
        for (j, &(method, budget, param_bytes, input)) in jobs.iter().enumerate() {
            let name = method_name(method, input);
            bar.set_message(format!(
                "aqm: seed {seed}, {name} {} {}B",
                budget_name(budget),
                param_bytes
            ));
            let mut config = OnlineConfig::fashion_mnist(method, budget);
            config.param_bytes = param_bytes;
            config.classifier_input = input;
            config.samples_per_task = settings.samples_per_task;
            config.test_per_class = settings.test_per_class;
            config.seed = qcl_tensor::Seed::new(seed);
            config.stack.layers[0].stat_rate = settings.stat_rate;
            config.stack.layers[0].ema_decoder_rate = settings.stat_rate;
            let steps = settings.samples_per_task.unwrap_or(10_800) / 10;
            config.record_every = (steps / 20).max(1);
            config.drift_every = (steps / 4).max(1);
            let r = run_online(scenario, &config, None)
                .with_context(|| format!("{name} at {budget} B, seed {seed}"))?;
            let c = &mut cells[j];
            c.final_accuracy.push(r.final_accuracy);
            c.forgetting.push(r.forgetting.unwrap_or(f64::NAN));
            c.stored_at_end.push(r.stored_at_end);
            c.samples_per_second.push(r.samples_per_second);
            c.freeze_step
                .push(r.freeze_steps.first().copied().flatten());
            c.trimmed_codes
                .push(r.trimmed_codes.first().copied().flatten());
            c.final_drift.push(r.drift.last().and_then(|d| d.all));
            if let Some(a) = &r.accuracy_on_reconstructions {
                c.accuracy_on_reconstructions
                    .push(a.iter().sum::<f64>() / a.len().max(1) as f64);
            }
            if seed == settings.seeds[0] {
                kept.push((
                    format!("{name} {} {}B", budget_name(budget), param_bytes),
                    r,
                ));
            }
        }
    }
    Ok((cells, kept))
}

/// One value per seed, `–` where there is none, joined by `/`.
fn per_seed<T: ToString>(values: &[Option<T>]) -> String {
    values
        .iter()
        .map(|v| v.as_ref().map_or("–".into(), T::to_string))
        .collect::<Vec<_>>()
        .join("/")
}

/// The table row of a cell: means ± std over seeds, per-seed freeze steps and K'.
fn cell_row(c: &Cell) -> String {
    let (a, sa) = mean_std(&c.final_accuracy);
    let f: Vec<f64> = c
        .forgetting
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let forg = if f.is_empty() {
        "–".to_string()
    } else {
        let (m, s) = mean_std(&f);
        format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * s)
    };
    let st = c.stored_at_end.iter().sum::<usize>() as f64 / c.stored_at_end.len().max(1) as f64;
    let (sps, _) = mean_std(&c.samples_per_second);
    let (freeze, k) = (per_seed(&c.freeze_step), per_seed(&c.trimmed_codes));
    let recon = if c.accuracy_on_reconstructions.is_empty() {
        "–".to_string()
    } else {
        let (m, s) = mean_std(&c.accuracy_on_reconstructions);
        format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * s)
    };
    let drift: Vec<f64> = c.final_drift.iter().flatten().copied().collect();
    let drift = if drift.is_empty() {
        "–".into()
    } else {
        format!("{:.4}", mean_std(&drift).0)
    };
    format!(
        "| {} | {} | {} | {:.1} ± {:.1} | {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
        c.method,
        c.budget,
        if c.method.starts_with("AQM") {
            c.param_bytes.to_string()
        } else {
            "–".into()
        },
        100.0 * a,
        100.0 * sa,
        recon,
        forg,
        st,
        sps,
        freeze,
        k,
        drift
    )
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn accuracy_plot(path: &Path, cells: &[Cell]) -> Result<()> {
    plot::png(path, (900, 440), |root| {
        let n = cells.len();
        let mut chart = ChartBuilder::on(root)
            .caption("final accuracy (mean ± std over seeds)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..100.0)?;
        let names: Vec<String> = cells
            .iter()
            .map(|c| {
                if c.method == "AQM" {
                    format!("{} {} {}B", c.method, c.budget, c.param_bytes)
                } else if c.method == DECODED {
                    format!("AQM-dec {} {}B", c.budget, c.param_bytes)
                } else {
                    format!("{} {}", c.method, c.budget)
                }
            })
            .collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            .x_label_formatter(&move |x| crate::plot::category_label(&names, *x))
            .x_label_style(("sans-serif", 11))
            .y_desc("accuracy %")
            .draw()?;
        for (i, c) in cells.iter().enumerate() {
            let (m, s) = mean_std(&c.final_accuracy);
            let colour = match c.method.as_str() {
                "fine-tune" => COLOURS[0],
                "ER-raw" => COLOURS[1],
                "raw-AQM" => COLOURS[2],
                "AQM" => COLOURS[3],
                DECODED => COLOURS[5],
                _ => COLOURS[4],
            };
            let x = i as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x - 0.35, 0.0), (x + 0.35, 100.0 * m)],
                colour.filled(),
            )))?;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, 100.0 * (m - s)), (x, 100.0 * (m + s))],
                BLACK.stroke_width(2),
            )))?;
        }
        Ok(())
    })
}

fn stored_plot(path: &Path, kept: &[(String, RunResult)]) -> Result<()> {
    let chosen: Vec<&(String, RunResult)> = kept
        .iter()
        .filter(|(n, _)| {
            n.contains("B50 1B")
                && !n.starts_with("fine")
                && !n.starts_with("iid")
                && !n.starts_with(DECODED)
        })
        .collect();
    let max_step = chosen
        .iter()
        .flat_map(|(_, r)| r.memory_curve.iter().map(|p| p.step))
        .max()
        .unwrap_or(1);
    let max_n = chosen
        .iter()
        .flat_map(|(_, r)| {
            r.memory_curve
                .iter()
                .map(|p| p.per_block.iter().sum::<usize>())
        })
        .max()
        .unwrap_or(1) as f64;
    plot::png(path, (760, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("stored samples over the stream (B50)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, 0.0..max_n * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("stored samples")
            .draw()?;
        for (i, (name, r)) in chosen.iter().enumerate() {
            let colour = COLOURS[(i + 1) % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    r.memory_curve
                        .iter()
                        .map(|p| (p.step, p.per_block.iter().sum::<usize>() as f64)),
                    colour.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            if name.starts_with("AQM") {
                chart
                    .draw_series(LineSeries::new(
                        r.memory_curve
                            .iter()
                            .map(|p| (p.step, p.per_block.first().copied().unwrap_or(0) as f64)),
                        colour.mix(0.5).stroke_width(1),
                    ))?
                    .label("AQM: raw images among them")
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], colour.mix(0.5).stroke_width(1))
                    });
            }
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

fn drift_plot(path: &Path, kept: &[(String, RunResult)]) -> Result<()> {
    let chosen: Vec<&(String, RunResult)> = kept
        .iter()
        // Decoded-input runs share the reference runs' modules, memory and drift.
        .filter(|(n, r)| n.starts_with("AQM ") && !r.drift.is_empty())
        .collect();
    let max_step = chosen
        .iter()
        .flat_map(|(_, r)| r.drift.iter().map(|p| p.step))
        .max()
        .unwrap_or(1);
    let top = chosen
        .iter()
        .flat_map(|(_, r)| {
            r.drift
                .iter()
                .flat_map(|d| d.all.into_iter().chain(d.task0))
        })
        .fold(0.01f64, f64::max)
        * 1.2;
    plot::png(path, (760, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "drift of stored codes (MSE vs original, [-1, 1] units)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, 0.0..top)?;
        chart.configure_mesh().x_desc("step").y_desc("MSE").draw()?;
        for (i, (name, r)) in chosen.iter().enumerate() {
            let colour = COLOURS[(i + 1) % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    r.drift.iter().filter_map(|d| d.all.map(|m| (d.step, m))),
                    colour.stroke_width(2),
                ))?
                .label(format!("{name}: all codes"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(DashedLineSeries::new(
                    r.drift.iter().filter_map(|d| d.task0.map(|m| (d.step, m))),
                    5,
                    3,
                    colour.stroke_width(1),
                ))?
                .label(format!("{name}: task-0 codes"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(1))
                });
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    })
}

fn grid(path: &Path, examples: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    let scale = 3u32;
    let (w, gap) = (28 * scale, 4u32);
    let n = examples.len().max(1) as u32;
    plot::png(
        path,
        (gap + n * (w + gap), 30 + 2 * (w + gap) + gap),
        |root| {
            root.draw(&Text::new(
                "original (top) vs reconstructed from codes (bottom)",
                (6, 6),
                ("sans-serif", 16).into_font(),
            ))?;
            for (i, (orig, rec)) in examples.iter().enumerate() {
                for (row, img) in [orig, rec].into_iter().enumerate() {
                    let x0 = gap + i as u32 * (w + gap);
                    let y0 = 30 + row as u32 * (w + gap);
                    for y in 0..28u32 {
                        for x in 0..28u32 {
                            let v = img[(y * 28 + x) as usize];
                            let (px, py) = ((x0 + x * scale) as i32, (y0 + y * scale) as i32);
                            root.draw(&Rectangle::new(
                                [(px, py), (px + scale as i32, py + scale as i32)],
                                RGBColor(v, v, v).filled(),
                            ))?;
                        }
                    }
                }
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The experiment scaled down to seconds on the committed fixture.
    #[test]
    fn runs_on_the_fixture_and_writes_its_results() {
        let (out, ctx, data) = crate::reproduce::fixture_run();
        let settings = Settings {
            seeds: vec![0],
            samples_per_task: Some(20),
            test_per_class: Some(5),
            stat_rate: 0.4,
            aqm_budgets: vec![(B50, 1)],
            decoded_budgets: vec![(B50, 1)],
            bench_steps: 1,
        };
        let outcome = run_with(&ctx, &data, &settings, &ProgressBar::hidden()).unwrap();
        let cells = outcome.figures["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 8);
        for row in ["| AQM | B50 | 1 |", "| AQM, decoded input | B50 | 1 |"] {
            assert!(outcome.markdown.contains(row), "{}", outcome.markdown);
        }
        for (png, _) in &outcome.plots {
            let bytes = std::fs::read(out.path().join(png)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{png}");
        }
    }
}
