//! The experiment's results: the JSON figures, the Markdown text and tables, and the plots.
//! Every figure in the text is read from the runs or the settings.

use std::fmt::Write as _;

use anyhow::Result;
use candle_core::Device;
use qcl_aqm::online::{Classifier, Method};
use qcl_aqm::QStack;
use qcl_continual::Scenario;
use serde_json::json;

use super::cells::{paired_difference, Cell, Stats};
use super::diagnosis::{diagnose, diagnosis_text, find, Diagnosis};
use super::expectations::{judge, Expectation};
use super::throughput::Speed;
use super::{job_config, plots, Arm, Job, SeedRun, Settings, B20, B50};
use crate::reproduce::{Context, Outcome};

/// `x` in percent with one decimal, `–` when absent.
pub(super) fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}", 100.0 * v))
}

/// One value per seed, `–` where there is none, joined by `/`.
fn per_seed<T: ToString>(values: &[Option<T>]) -> String {
    values
        .iter()
        .map(|v| v.as_ref().map_or("–".into(), T::to_string))
        .collect::<Vec<_>>()
        .join("/")
}

/// Everything the report is made from.
pub fn outcome(
    (ctx, scenario): (&Context, &Scenario),
    settings: &Settings,
    jobs: &[Job],
    runs: &[Vec<SeedRun>],
    (stream_seconds, speed, resumed): (f64, Speed, Option<String>),
) -> Result<Outcome> {
    let cells: Vec<Cell> = jobs
        .iter()
        .zip(runs)
        .map(|(j, r)| Cell::new(j, r))
        .collect();
    let expectations = judge(&cells, settings.d_th);
    let diagnoses: Vec<Diagnosis> = cells
        .iter()
        .filter(|c| c.is_aqm(Arm::Reference) && c.job.param_bytes == 1)
        .map(|c| diagnose(&cells, c))
        .collect();
    let plot_list = plots::draw(&ctx.out_dir, &cells, jobs, runs)?;

    let threads = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let mut markdown = setup_text(scenario, settings, jobs)?;
    markdown += &main_table(&cells);
    markdown += &expectation_table(&expectations);
    markdown += &arms_table(&cells);
    markdown += &diagnosis_text(&diagnoses);
    markdown += &task_tables(&cells);
    let _ = write!(
        markdown,
        "## Throughput\n\nStream samples/s per run in the first table (whole loop: modules, \
         classifier, memory; evaluation and drift excluded). {} All timings are from a machine \
         with {} (`std::thread::available_parallelism` when the report was written), which \
         other jobs may share; runs read back from an earlier start keep the timings of the \
         start that ran them. Wall time of all stream runs: {stream_seconds:.0} s.{}\n",
        speed.paragraph(),
        if threads == 0 {
            "an unknown number of hardware threads".to_string()
        } else {
            format!("{threads} hardware thread(s) available to the process")
        },
        resumed
            .as_deref()
            .map_or(String::new(), |n| format!("\n\n{n}"))
    );
    let summary = summary(&expectations, &cells);
    let first_seed: Vec<serde_json::Value> = jobs
        .iter()
        .zip(runs)
        .filter_map(|(j, r)| {
            let r = r.first()?;
            Some(json!({
                "name": j.key(),
                "seed": r.seed,
                "memory_curve": r.result.memory_curve,
                "drift": r.result.drift,
            }))
        })
        .collect();
    Ok(Outcome {
        summary,
        figures: json!({
            "settings": settings,
            "cells": cells,
            "expectations": expectations,
            "diagnoses": diagnoses,
            "first_seed_curves": first_seed,
            "timings": {
                "stream_seconds": stream_seconds,
                "throughput": speed,
                "available_parallelism": threads,
            },
            "resumed": resumed,
        }),
        markdown,
        plots: plot_list,
    })
}

/// One line for REPORT.md.
fn summary(expectations: &[Expectation], cells: &[Cell]) -> String {
    let held = expectations.iter().filter(|e| e.held == Some(true)).count();
    let judged = expectations.iter().filter(|e| e.held.is_some()).count();
    let acc = |m: Method, b: u64| {
        cells
            .iter()
            .find(|c| {
                c.job.classifier == Classifier::SmallCnn
                    && c.job.method == m
                    && c.job.arm == Arm::Reference
                    && c.job.budget == b
                    && c.job.param_bytes == 1
            })
            .and_then(|c| c.final_accuracy_stats)
            .map_or("–".into(), |s| format!("{:.1}", 100.0 * s.mean))
    };
    format!(
        "B50 final accuracy (small CNN): ER-raw {}, raw-AQM {}, AQM {}, iid-online {} %; \
         {held} of {judged} expected outcomes held",
        acc(Method::ErRaw, B50),
        acc(Method::RawAqm, B50),
        acc(Method::Aqm, B50),
        acc(Method::IidOnline, B50),
    )
}

/// The setup paragraph, from the settings and a fresh stack.
fn setup_text(scenario: &Scenario, settings: &Settings, jobs: &[Job]) -> Result<String> {
    let (Some(job), Some(&seed)) = (jobs.first(), settings.seeds.first()) else {
        anyhow::bail!("aqm: no job or no seed to describe (the settings name none)");
    };
    let config = job_config(settings, job, seed);
    let layer = &config.stack.layers[0];
    // The model cost, measured on a fresh stack before and after freezing its module.
    let mut stack = QStack::new(config.stack.clone(), 0.into(), &Device::Cpu)?;
    let params = stack.model_cost_params();
    stack.layers_mut()[0].freeze()?;
    let after = stack.model_cost_params();
    let resnet = match &settings.resnet {
        Some(r) => format!(
            " The reduced ResNet-18 (nf {}, BatchNorm; batch statistics in classifier steps, \
             running ones in evaluation) runs fine-tune, iid-online, ER-raw and raw-AQM at B50 \
             and B20 and AQM at {} on {} with {} streamed images per task.",
            r.nf,
            r.aqm_budgets
                .iter()
                .map(|&(b, p)| format!("{} {p}-byte", super::budget_name(b)))
                .collect::<Vec<_>>()
                .join(", "),
            match r.max_seeds {
                Some(n) if n < settings.seeds.len() => format!("the first {n} seed(s)"),
                _ => "every seed".into(),
            },
            r.samples_per_task
                .or(settings.samples_per_task)
                .map_or("all".into(), |s| s.to_string()),
        ),
        None => String::new(),
    };
    Ok(format!(
        "Split Fashion-MNIST, {tasks} tasks of {per_task} classes, class-incremental with one \
         {classes}-way head, one pass in batches of {batch} (plus ≤ {replay} replayed from earlier tasks); {spt} streamed \
         images per task after holding out {hold:.0} %, test {tpc} images per class; seeds \
         {seeds:?}; mean ± std over seeds with the standard error (std/√n). Classifier SGD lr \
         {lr}; the small CNN runs every arm.{resnet} AQM: one module (ds {ds}, C {c}, K {k}, N \
         {n}, γ {gamma}, β {beta}, Adam {alr}, d_th {dth}, replay counted twice: {double}), \
         rate of `p` and of the slow decoder {rate}. Budgets: B50 = {b50} B, B20 = {b20} B; AQM \
         charges its autoencoder ({params} parameters, {after} after freezing with the slow \
         decoder) at 1 or 4 bytes per parameter; ER-raw is a reservoir of ⌊budget / image \
         bytes⌋ raw images; raw-AQM is the same memory without a module. Arms \
         (docs/methods/aqm.md § Extensions, § Decoded classifier input): *decoded input* \
         (ours), *reservoir* insertion, *re-encoding* of replayed codes once the memory is {full:.0} \
         % full (eps_th = d_th = {eps}; with one module a replayed code can only be refreshed, \
         not moved deeper), and both.\n\n",
        tasks = scenario.num_tasks(),
        per_task = scenario.num_classes() / scenario.num_tasks().max(1),
        classes = scenario.num_classes(),
        batch = config.batch_size,
        replay = config.replay_size,
        spt = settings
            .samples_per_task
            .map_or("all".to_string(), |s| s.to_string()),
        hold = 100.0 * config.holdout_fraction,
        tpc = settings
            .test_per_class
            .map_or("all".to_string(), |s| s.to_string()),
        seeds = settings.seeds,
        lr = config.classifier_lr,
        ds = layer.downsample,
        c = layer.channels,
        k = layer.codes,
        n = layer.codebooks,
        gamma = layer.decay,
        beta = layer.commit_coef,
        alr = layer.lr,
        dth = layer.recon_threshold,
        double = config.stack.double_count_replay,
        rate = settings.stat_rate,
        b50 = B50,
        b20 = B20,
        full = 100.0 * qcl_aqm::memory::REENCODE_FULLNESS,
        eps = config
            .reencode
            .map_or(layer.recon_threshold, |r| r.eps_th),
    ))
}

/// The table of every cell.
fn main_table(cells: &[Cell]) -> String {
    let mut t = String::from(
        "## Final accuracy\n\n| method | classifier | budget | param bytes | streamed per task | \
         final accuracy % | forgetting % | task-0 forgetting % | stored at end | stream \
         samples/s | freeze step | K' | final drift MSE |\n|---|---|---|---|---|---|---|---|---|\
         ---|---|---|---|\n",
    );
    for c in cells {
        let stats = |s: Option<Stats>| s.map_or("–".into(), |s| s.percent());
        let sps = Stats::of(&c.samples_per_second).map_or(0.0, |s| s.mean);
        let drift: Vec<f64> = c.final_drift.iter().flatten().copied().collect();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            c.method,
            c.classifier,
            c.budget,
            if c.job.method == Method::Aqm {
                c.param_bytes.to_string()
            } else {
                "–".into()
            },
            c.streamed_per_task,
            stats(c.final_accuracy_stats),
            stats(c.forgetting_stats),
            stats(c.task0_forgetting_stats),
            c.mean_stored(),
            sps,
            per_seed(&c.freeze_step),
            per_seed(&c.trimmed_codes),
            Stats::of(&drift).map_or("–".into(), |s| format!("{:.4}", s.mean)),
        );
    }
    t + "\n"
}

/// The expected outcomes, judged.
fn expectation_table(expectations: &[Expectation]) -> String {
    let margin = 100.0 * super::expectations::EQUIVALENCE_MARGIN;
    let mut t = format!(
        "## Expected outcomes\n\nJudged from the runs above (docs/methods/aqm.md § Expected \
         outcomes): `<` compares means over seeds; ≈ holds when the difference `d` paired by \
         seed satisfies |d| + 2·SE ≤ {margin:.0} points (an equivalence test: the interval of \
         two standard errors around `d` lies within ±{margin:.0} points); \"clearly positive\" \
         needs d > max(2·SE, 1 point); an expectation resting on fewer than two seeds is not \
         judged.\n\n| expectation | classifier | numbers | held |\n|---|---|---|---|\n",
    );
    for e in expectations {
        let held = match e.held {
            Some(true) => "held",
            Some(false) => "**not held**",
            None => e.reason.as_deref().unwrap_or("not judged"),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {held} |",
            e.statement, e.classifier, e.numbers
        );
    }
    t + "\n"
}

/// Each AQM arm against ER-raw at the same budget and classifier, paired by seed.
fn arms_table(cells: &[Cell]) -> String {
    let mut t = String::from(
        "## AQM's arms against ER-raw\n\nFinal accuracy minus ER-raw's at the same budget and \
         classifier, per seed, then mean ± standard error. Re-encoding: replayed codes moved \
         deeper / refreshed per run; admitted: share of incoming samples stored on arrival.\n\n\
         | arm | classifier | budget | param bytes | final accuracy % | − ER-raw, points | \
         re-encoded (moved / refreshed) | admitted |\n|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells.iter().filter(|c| c.job.method == Method::Aqm) {
        let er = find(
            cells,
            &c.classifier,
            Method::ErRaw,
            Arm::Reference,
            (c.job.budget, 1),
        );
        let diff = er
            .and_then(|er| paired_difference(c, er))
            .map_or("–".into(), |d| {
                format!("{:+.1} ± {:.1}", 100.0 * d.mean, 100.0 * d.se)
            });
        let n = c.reencoded.len().max(1) as f64;
        let moved = c.reencoded.iter().map(|r| r.moved).sum::<u64>() as f64 / n;
        let refreshed = c.reencoded.iter().map(|r| r.refreshed).sum::<u64>() as f64 / n;
        let admitted: Vec<f64> = c
            .admitted
            .iter()
            .flatten()
            .map(|&a| a as f64 / c.streamed.max(1) as f64)
            .collect();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {diff} | {moved:.0} / {refreshed:.0} | {} |",
            c.method,
            c.classifier,
            c.budget,
            c.param_bytes,
            c.final_accuracy_stats.map_or("–".into(), |s| s.percent()),
            Stats::of(&admitted).map_or("–".into(), |s| format!("{:.0} %", 100.0 * s.mean)),
        );
    }
    t + "\n"
}

/// The final row of the accuracy matrix per cell, and the whole matrix of AQM and ER-raw at
/// B50 (means over seeds).
fn task_tables(cells: &[Cell]) -> String {
    let tasks = cells
        .iter()
        .find_map(|c| c.accuracy.first().map(Vec::len))
        .unwrap_or(0);
    let header: String = (0..tasks).map(|j| format!(" task {j} % |")).collect();
    let mut t = format!(
        "## Accuracy per task\n\nTest accuracy on each task after the last one (the last row \
         of the accuracy matrix; mean over seeds).\n\n| method | classifier | budget | param \
         bytes |{header}\n|---|---|---|---|{}\n",
        "---|".repeat(tasks)
    );
    let mean_entry = |c: &Cell, i: usize, j: usize| -> Option<f64> {
        let v: Vec<f64> = c
            .accuracy
            .iter()
            .filter_map(|m| m.get(i)?.get(j).copied().flatten())
            .collect();
        Stats::of(&v).map(|s| s.mean)
    };
    for c in cells {
        let row: String = (0..tasks)
            .map(|j| format!(" {} |", pct(mean_entry(c, tasks - 1, j))))
            .collect();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} |{row}",
            c.method, c.classifier, c.budget, c.param_bytes
        );
    }
    for c in cells.iter().filter(|c| {
        c.job.budget == B50
            && c.job.arm == Arm::Reference
            && matches!(c.job.method, Method::Aqm | Method::ErRaw)
            && c.param_bytes == 1
    }) {
        let _ = write!(
            t,
            "\n{}, {}, B50: `R[i][j]`, accuracy on task j after task i (%).\n\n| after task \
             |{header}\n|---|{}\n",
            c.method,
            c.classifier,
            "---|".repeat(tasks)
        );
        for i in 0..tasks {
            let row: String = (0..tasks)
                .map(|j| format!(" {} |", pct(mean_entry(c, i, j))))
                .collect();
            let _ = writeln!(t, "| {i} |{row}");
        }
    }
    t + "\n"
}
