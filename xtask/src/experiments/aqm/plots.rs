//! The experiment's figures: final accuracy per cell, stored samples and drift over the stream
//! (first seed), stored samples against their reconstructions, and the raw-versus-decoded gap
//! over task ends.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use qcl_aqm::online::{Classifier, Method};
use qcl_aqm::RunResult;

use super::cells::Cell;
use super::{Arm, Job, SeedRun, B50};
use crate::plot;

const COLOURS: [RGBColor; 8] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// A short label of a job for axes and legends.
fn short(job: &Job) -> String {
    let method = match (job.method, job.arm) {
        (Method::FineTune, _) => "fine-tune",
        (Method::IidOnline, _) => "iid",
        (Method::ErRaw, _) => "ER",
        (Method::RawAqm, _) => "raw-AQM",
        (Method::Aqm, Arm::Reference) => "AQM",
        (Method::Aqm, Arm::DecodedInput) => "AQM-dec",
        (Method::Aqm, Arm::Reservoir) => "AQM+res",
        (Method::Aqm, Arm::Reencode) => "AQM+reenc",
        (Method::Aqm, Arm::ReservoirReencode) => "AQM+res+reenc",
    };
    let budget = match job.method {
        Method::FineTune | Method::IidOnline => String::new(),
        Method::Aqm => format!(" {} {}B", job.budget_name(), job.param_bytes),
        _ => format!(" {}", job.budget_name()),
    };
    let classifier = match job.classifier {
        Classifier::SmallCnn => "",
        Classifier::ReducedResNet18 { .. } => " R18",
    };
    format!("{method}{budget}{classifier}")
}

fn colour(job: &Job) -> RGBColor {
    match (job.method, job.arm) {
        (Method::FineTune, _) => COLOURS[0],
        (Method::ErRaw, _) => COLOURS[1],
        (Method::RawAqm, _) => COLOURS[2],
        (Method::Aqm, Arm::Reference) => COLOURS[3],
        (Method::IidOnline, _) => COLOURS[4],
        (Method::Aqm, Arm::DecodedInput) => COLOURS[5],
        (Method::Aqm, Arm::Reservoir) => COLOURS[6],
        (Method::Aqm, _) => COLOURS[7],
    }
}

/// Draws every figure into `dir`; returns the files with their captions.
pub fn draw(
    dir: &Path,
    cells: &[Cell],
    jobs: &[Job],
    runs: &[Vec<SeedRun>],
) -> Result<Vec<(String, String)>> {
    let first: Vec<(&Job, &RunResult)> = jobs
        .iter()
        .zip(runs)
        .filter_map(|(j, r)| Some((j, &r.first()?.result)))
        .collect();
    let mut out = Vec::new();
    accuracy(&dir.join("aqm-accuracy.png"), cells)?;
    out.push((
        "aqm-accuracy.png".into(),
        "Final accuracy per run (mean ± std over seeds; R18: reduced ResNet-18)".into(),
    ));
    let b50_small = |j: &Job| {
        j.budget == B50
            && j.param_bytes == 1
            && j.classifier == Classifier::SmallCnn
            && matches!(j.method, Method::ErRaw | Method::RawAqm | Method::Aqm)
            && j.arm != Arm::DecodedInput
    };
    let chosen: Vec<(&Job, &RunResult)> = first
        .iter()
        .copied()
        .filter(|(j, _)| b50_small(j))
        .collect();
    stored(&dir.join("aqm-stored.png"), &chosen)?;
    out.push((
        "aqm-stored.png".into(),
        "Stored samples over the stream (first seed, B50, 1-byte parameters, small CNN)".into(),
    ));
    let with_drift: Vec<(&Job, &RunResult)> = first
        .iter()
        .copied()
        .filter(|(j, r)| {
            j.classifier == Classifier::SmallCnn
                && j.arm != Arm::DecodedInput
                && !r.drift.is_empty()
        })
        .collect();
    drift(&dir.join("aqm-drift.png"), &with_drift)?;
    out.push((
        "aqm-drift.png".into(),
        "Drift: MSE of stored codes decoded now vs their originals (first seed, small CNN; \
         decoded-input runs share the reference runs' modules and memory)"
            .into(),
    ));
    if let Some((_, r)) = first
        .iter()
        .find(|(j, _)| b50_small(j) && j.method == Method::Aqm && j.arm == Arm::Reference)
    {
        grid(&dir.join("aqm-reconstructions.png"), &r.examples)?;
        out.push((
            "aqm-reconstructions.png".into(),
            "Stored samples at the end of the stream: originals (top) and their reconstructions \
             from codes (bottom), AQM B50, first seed"
                .into(),
        ));
    }
    let diagnosed: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.is_aqm(Arm::Reference) && c.job.param_bytes == 1)
        .collect();
    gap(&dir.join("aqm-gap.png"), &diagnosed)?;
    out.push((
        "aqm-gap.png".into(),
        "Accuracy on the earlier tasks' raw test images (solid) and on the same images through \
         the frozen module (dashed) after each task, reference AQM (mean over seeds)"
            .into(),
    ));
    Ok(out)
}

/// Horizontal bars, one per cell from the top, so that every label reads.
fn accuracy(path: &Path, cells: &[Cell]) -> Result<()> {
    let n = cells.len();
    let height = (22 * n as u32 + 110).max(300);
    plot::png(path, (900, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("final accuracy (mean ± std over seeds)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(190)
            .build_cartesian_2d(0.0..100.0, -0.5..n as f64 - 0.5)?;
        // Row i from the top is at y = n − 1 − i.
        let names: Vec<String> = cells.iter().rev().map(|c| short(&c.job)).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n + 1)
            .y_label_formatter(&move |y| crate::plot::category_label(&names, *y))
            .y_label_style(("sans-serif", 12))
            .x_desc("accuracy %")
            .draw()?;
        for (i, c) in cells.iter().enumerate() {
            let Some(s) = c.final_accuracy_stats else {
                continue;
            };
            let y = (n - 1 - i) as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.35), (100.0 * s.mean, y + 0.35)],
                colour(&c.job).filled(),
            )))?;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(100.0 * (s.mean - s.std), y), (100.0 * (s.mean + s.std), y)],
                BLACK.stroke_width(2),
            )))?;
        }
        Ok(())
    })
}

fn stored(path: &Path, chosen: &[(&Job, &RunResult)]) -> Result<()> {
    let total = |p: &qcl_aqm::online::MemoryPoint| p.per_block.iter().sum::<usize>() as f64;
    let max_step = chosen
        .iter()
        .flat_map(|(_, r)| r.memory_curve.iter().map(|p| p.step))
        .max()
        .unwrap_or(1)
        .max(1);
    let max_n = chosen
        .iter()
        .flat_map(|(_, r)| r.memory_curve.iter().map(total))
        .fold(1.0, f64::max);
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
        for (job, r) in chosen {
            let c = colour(job);
            chart
                .draw_series(LineSeries::new(
                    r.memory_curve.iter().map(|p| (p.step, total(p))),
                    c.stroke_width(2),
                ))?
                .label(short(job))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            if job.method == Method::Aqm && job.arm == Arm::Reference {
                let raw = |p: &qcl_aqm::online::MemoryPoint| {
                    p.per_block.first().copied().unwrap_or(0) as f64
                };
                chart
                    .draw_series(LineSeries::new(
                        r.memory_curve.iter().map(|p| (p.step, raw(p))),
                        c.mix(0.5).stroke_width(1),
                    ))?
                    .label("AQM: raw images among them")
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], c.mix(0.5).stroke_width(1))
                    });
            }
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

fn drift(path: &Path, chosen: &[(&Job, &RunResult)]) -> Result<()> {
    let max_step = chosen
        .iter()
        .flat_map(|(_, r)| r.drift.iter().map(|p| p.step))
        .max()
        .unwrap_or(1)
        .max(1);
    let top = chosen
        .iter()
        .flat_map(|(_, r)| {
            r.drift
                .iter()
                .flat_map(|d| d.all.into_iter().chain(d.task0))
        })
        .fold(0.01f64, f64::max)
        * 1.2;
    plot::png(path, (820, 460), |root| {
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
        for (i, (job, r)) in chosen.iter().enumerate() {
            let c = COLOURS[(i + 1) % COLOURS.len()];
            let name = short(job);
            chart
                .draw_series(LineSeries::new(
                    r.drift.iter().filter_map(|d| d.all.map(|m| (d.step, m))),
                    c.stroke_width(2),
                ))?
                .label(format!("{name}: all codes"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            chart
                .draw_series(DashedLineSeries::new(
                    r.drift.iter().filter_map(|d| d.task0.map(|m| (d.step, m))),
                    5,
                    3,
                    c.stroke_width(1),
                ))?
                .label(format!("{name}: task-0 codes"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(1))
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
                    for (k, &v) in img.iter().enumerate().take(28 * 28) {
                        let (x, y) = (k as u32 % 28, k as u32 / 28);
                        let (px, py) = ((x0 + x * scale) as i32, (y0 + y * scale) as i32);
                        root.draw(&Rectangle::new(
                            [(px, py), (px + scale as i32, py + scale as i32)],
                            RGBColor(v, v, v).filled(),
                        ))?;
                    }
                }
            }
            Ok(())
        },
    )
}

fn gap(path: &Path, cells: &[&Cell]) -> Result<()> {
    let rows_of: Vec<_> = cells.iter().map(|c| c.gap_rows()).collect();
    let tasks = rows_of.iter().map(Vec::len).max().unwrap_or(1).max(2);
    plot::png(path, (820, 460), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "earlier tasks: raw (solid) vs decoded (dashed) test images",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0.5..(tasks as f64 - 0.5), 0.0..100.0)?;
        chart
            .configure_mesh()
            .x_desc("after task")
            .y_desc("accuracy on earlier tasks %")
            .x_labels(tasks)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (i, (c, rows)) in cells.iter().zip(&rows_of).enumerate() {
            let col = COLOURS[(i + 1) % COLOURS.len()];
            let label = short(&c.job);
            chart
                .draw_series(LineSeries::new(
                    rows.iter()
                        .filter_map(|r| Some((r.after_task as f64, 100.0 * r.raw_old?))),
                    col.stroke_width(2),
                ))?
                .label(format!("{label}: raw"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2))
                });
            chart
                .draw_series(DashedLineSeries::new(
                    rows.iter()
                        .filter_map(|r| Some((r.after_task as f64, 100.0 * r.decoded_old?))),
                    6,
                    4,
                    col.stroke_width(2),
                ))?
                .label(format!("{label}: decoded"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(1))
                });
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        Ok(())
    })
}
