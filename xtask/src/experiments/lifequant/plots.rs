//! The plots of the `lifequant` results: mean accuracy matrices, ACC/FGT bars, and the λ
//! sweeps on validation and test.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::arms::{Arm, Scores};
use super::report::{mean_matrix, stat_of, View};
use super::Setup;
use crate::plot;
use crate::reproduce::Context;

/// Writes every plot into `ctx.out_dir`; returns (file, caption) pairs.
pub fn all(ctx: &Context, view: &View<'_>, setup: &Setup) -> Result<Vec<(String, String)>> {
    let mut plots = Vec::new();
    for arm in Arm::ALL {
        let png = format!("lifequant-matrix-{}.png", arm.id());
        mean_matrix(view, arm, setup.scenario.num_tasks())?.save_heatmap_png(
            ctx.out_dir.join(&png),
            &format!("{}: {}", arm.id(), arm.description()),
        )?;
        let caption = format!(
            "{} ({}, λ = {}): test accuracy matrix a[i][j], mean over {} seeds",
            arm.id(),
            arm.description(),
            view.lambda_of(arm),
            view.scores(arm).len()
        );
        plots.push((png, caption));
    }
    let bars = "lifequant-acc-fgt.png";
    acc_fgt(&ctx.out_dir.join(bars), view)?;
    plots.push((
        bars.into(),
        "ACC and FGT per arm at its λ (test, mean ± std over seeds)".into(),
    ));
    let sweep = "lifequant-lambda.png";
    lambda_sweep(&ctx.out_dir.join(sweep), view)?;
    plots.push((
        sweep.into(),
        "ACC of M1 and M4 against λ: validation (chooses λ) and test (mean over seeds)".into(),
    ));
    Ok(plots)
}

/// A labelled line of (λ, ACC %) points.
type Series = (String, RGBColor, Vec<(f64, f64)>);

/// `colour` halfway to white.
fn lighter(colour: RGBColor) -> RGBColor {
    let half = |c: u8| ((u16::from(c) + 255) / 2) as u8;
    RGBColor(half(colour.0), half(colour.1), half(colour.2))
}

/// Validation and test ACC of the swept arms against λ (log axis).
fn lambda_sweep(path: &Path, view: &View<'_>) -> Result<()> {
    let lambdas = &view.settings.lambdas;
    let lo = lambdas
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    let hi = lambdas.iter().copied().fold(lo, f64::max);
    let series: Vec<Series> = [
        (Arm::M1, RGBColor(44, 160, 44)),
        (Arm::M4, RGBColor(31, 119, 180)),
    ]
    .into_iter()
    .flat_map(|(arm, colour)| {
        let points = |f: fn(&Scores) -> f64| -> Vec<(f64, f64)> {
            lambdas
                .iter()
                .filter_map(|&l| {
                    let runs = view.runs_at(arm, l);
                    let scores: Vec<&Scores> =
                        runs.iter().filter_map(|r| r.scores.as_ref()).collect();
                    (!scores.is_empty()).then(|| (l, stat_of(&scores, |s| 100.0 * f(s)).0))
                })
                .collect()
        };
        [
            (
                format!("{} validation", arm.id()),
                colour,
                points(|s| s.validation_acc),
            ),
            (
                format!("{} test", arm.id()),
                lighter(colour),
                points(|s| s.acc),
            ),
        ]
    })
    .collect();
    let values = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|&(_, y)| y));
    let (ymin, ymax) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let (ymin, ymax) = if ymin.is_finite() {
        (ymin - 2.0, ymax + 2.0)
    } else {
        (0.0, 100.0)
    };
    plot::png(path, (760, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("LifeQuant: ACC against λ", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), ymin..ymax)?;
        chart.configure_mesh().x_desc("λ").y_desc("ACC %").draw()?;
        for (label, colour, points) in &series {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        Ok(())
    })
}

/// ACC and FGT per arm as grouped bars with ±std whiskers.
fn acc_fgt(path: &Path, view: &View<'_>) -> Result<()> {
    let groups: Vec<String> = Arm::ALL.iter().map(|a| a.id().to_string()).collect();
    let series = [
        ("ACC", (|s: &Scores| s.acc) as fn(&Scores) -> f64),
        ("FGT", |s: &Scores| s.fgt),
    ]
    .map(|(label, f)| {
        let values = Arm::ALL
            .iter()
            .map(|&arm| view.stat(arm, |s| 100.0 * f(s)))
            .collect();
        (label.to_string(), values)
    });
    grouped_bars(path, "LifeQuant arms: ACC and FGT (%)", &groups, &series)
}

/// Bars of `series` (label, one (mean, std) per group) side by side in each group, with ±std
/// whiskers; the y axis takes in 0 and every whisker.
pub fn grouped_bars(
    path: &Path,
    caption: &str,
    groups: &[String],
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let ends = series
        .iter()
        .flat_map(|(_, v)| v.iter().flat_map(|&(m, s)| [m - s, m + s]))
        .filter(|v| v.is_finite());
    let (low, top) = ends.fold((0.0f64, 10.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let width = 0.7 / series.len().max(1) as f64;
    const COLOURS: [RGBColor; 4] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    plot::png(path, (900, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..groups.len() as f64, low * 1.1..top * 1.1)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Ticks every half unit; only those at the middle of a group's slot get its name.
            .x_labels(2 * groups.len() + 1)
            .x_label_formatter(&|x| {
                if (x.fract() - 0.5).abs() > 0.01 {
                    return String::new();
                }
                groups.get(x.floor() as usize).cloned().unwrap_or_default()
            })
            .y_desc("%")
            .draw()?;
        for (k, (label, values)) in series.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let bars: Vec<(f64, f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(i, &(m, s))| (i as f64 + 0.15 + width * k as f64, m, s))
                .filter(|&(_, m, _)| m.is_finite())
                .collect();
            chart
                .draw_series(bars.iter().map(|&(x, m, _)| {
                    Rectangle::new([(x, 0.0), (x + 0.9 * width, m)], colour.filled())
                }))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
            chart.draw_series(bars.iter().map(|&(x, m, s)| {
                let mid = x + 0.45 * width;
                PathElement::new(vec![(mid, m - s), (mid, m + s)], BLACK.stroke_width(2))
            }))?;
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        Ok(())
    })
}
