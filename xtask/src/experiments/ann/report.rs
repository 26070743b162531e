//! Tables, the targets judged on this run's figures, and the recall / speed plot.

use anyhow::Result;
use plotters::prelude::*;
use serde_json::json;

use super::families::{families, Kind};
use super::{Measured, Point};
use crate::plot;
use crate::reproduce::{Context, Outcome};

/// One target, judged.
struct Target {
    what: String,
    figure: String,
    met: Option<bool>,
}

pub fn outcome(
    ctx: &Context,
    measured: &[Measured],
    skipped: &[String],
    nq: usize,
    rounds: usize,
    faiss: bool,
) -> Result<Outcome> {
    let mut markdown = format!(
        "k = 10 neighbours, {nq} queries per data set, 2 threads on each side; every setting \
         is searched {rounds} times, our round and faiss's in turn (faiss-cpu runs as a peer \
         process, `xtask/peers/faiss_ann.py --serve`, with `OMP_WAIT_POLICY=PASSIVE` so that \
         its idle threads do not spin while ours are timed); q/s is queries over the median \
         round. recall@10 is |found ∩ true top 10| / 10, recall@1 whether the true nearest \
         comes first; the truth is exact search by the GEMM distance kernel. Both sides train \
         with their defaults (k-means on at most 256 points per centroid, 25 iterations per \
         sub-quantizer, 10 for the coarse quantizer) and the same knobs; faiss's 4-bit IVF \
         codes residuals here as ours do (`by_residual`). {}\n\n",
        if faiss {
            ""
        } else {
            "**faiss was not measured** (`QCL_FAISS_PYTHON` unset): its columns are empty."
        }
    );
    for note in skipped {
        markdown.push_str(&format!("Skipped: {note}.\n\n"));
    }
    let mut figures = serde_json::Map::new();
    let mut plots = Vec::new();
    let mut summary = Vec::new();
    for set in measured {
        let targets = targets(set);
        markdown.push_str(&section(set, &targets));
        let png = format!("ann-{}.png", set.data.name);
        recall_plot(&ctx.out_dir.join(&png), set)?;
        plots.push((
            png,
            format!("{}: recall@10 against queries per second", set.data.name),
        ));
        let met = targets.iter().filter(|t| t.met == Some(true)).count();
        let judged = targets.iter().filter(|t| t.met.is_some()).count();
        summary.push(format!("{}: {met} of {judged} targets met", set.data.name));
        figures.insert(
            set.data.name.into(),
            json!({
                "source": set.data.source, "n": set.data.n(), "nq": set.data.nq(),
                "dim": set.data.dim, "metric": set.data.metric.name(), "m": set.data.m,
                "points": set.points, "builds": set.builds,
                "simd_equals_scalar": set.exact_checks.iter().map(|(f, s, same)| json!({
                    "family": f, "nprobe": s.0, "refine": s.1, "identical": same,
                })).collect::<Vec<_>>(),
                "targets": targets.iter().map(|t| json!({
                    "target": t.what, "figure": t.figure, "met": t.met,
                })).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(Outcome {
        summary: summary.join("; "),
        figures: serde_json::Value::Object(figures),
        markdown,
        plots,
    })
}

fn section(set: &Measured, targets: &[Target]) -> String {
    let data = &set.data;
    let mut out = format!(
        "## {}\n\n{}; {} base vectors of {} dimensions, {} queries; m = {} sub-quantizers.\n\n",
        data.name,
        data.source,
        data.n(),
        data.dim,
        data.nq(),
        data.m
    );
    out.push_str("| target | this run | met |\n|---|---|---|\n");
    for t in targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        out.push_str(&format!("| {} | {} | {met} |\n", t.what, t.figure));
    }
    out.push_str("\n| index | system | train s | add s | memory MB |\n|---|---|---|---|---|\n");
    for b in &set.builds {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |\n",
            b.family,
            b.system,
            b.train_seconds,
            b.add_seconds,
            b.memory_bytes as f64 / 1e6
        ));
    }
    out.push_str(
        "\nMemory: ours counts codes (whole blocks of 64), 8-byte ids, exact vectors when \
         re-ranking and the rotation; faiss's is its serialised index (also codebooks and coarse \
         centroids).\n\n| index | nprobe | re-rank | qcl recall@1 | qcl recall@10 | qcl q/s | \
         faiss recall@1 | faiss recall@10 | faiss q/s | qcl ÷ faiss |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in set.points.iter().filter(|p| p.system != "faiss") {
        let peer = find(set, p.family, "faiss", (p.nprobe, p.refine));
        let (f1, f10, fq, ratio) = match peer {
            Some(f) if p.system == "qcl" => (
                format!("{:.3}", f.recall_at_1),
                format!("{:.3}", f.recall_at_10),
                format!("{:.0}", f.queries_per_second),
                format!("{:.2}", p.queries_per_second / f.queries_per_second),
            ),
            _ => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        let name = if p.system == "qcl" {
            p.family.to_string()
        } else {
            format!("{} ({})", p.family, p.system)
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {:.3} | {:.3} | {:.0} | {f1} | {f10} | {fq} | {ratio} |\n",
            knob(p.nprobe),
            knob(p.refine),
            p.recall_at_1,
            p.recall_at_10,
            p.queries_per_second,
        ));
    }
    let same = set.exact_checks.iter().filter(|c| c.2).count();
    out.push_str(&format!(
        "\nThe SIMD scan's answer (ids and score bits) equals the scalar scan's in {same} of {} \
         settings checked in this run (flat indexes, and nprobe 16).\n\n",
        set.exact_checks.len()
    ));
    out
}

fn knob(v: usize) -> String {
    if v == 0 {
        "–".into()
    } else {
        v.to_string()
    }
}

fn find<'a>(
    set: &'a Measured,
    family: &str,
    system: &str,
    setting: (usize, usize),
) -> Option<&'a Point> {
    set.points
        .iter()
        .find(|p| p.family == family && p.system == system && (p.nprobe, p.refine) == setting)
}

fn family_name(kind: Kind) -> &'static str {
    families(true)
        .into_iter()
        .find(|f| f.kind == kind)
        .map_or("", |f| f.name)
}

fn targets(set: &Measured) -> Vec<Target> {
    let mut out = Vec::new();
    let ratio_target = |what: &str, ours: Option<&Point>, theirs: Option<&Point>, goal: f64| {
        let (figure, met) = match (ours, theirs) {
            (Some(o), Some(t)) => {
                let r = o.queries_per_second / t.queries_per_second;
                (
                    format!(
                        "{:.0} / {:.0} q/s = {r:.2}×",
                        o.queries_per_second, t.queries_per_second
                    ),
                    Some(r >= goal),
                )
            }
            _ => ("not measured".into(), None),
        };
        Target {
            what: what.into(),
            figure,
            met,
        }
    };
    let pq8 = family_name(Kind::Pq8);
    let pq4 = family_name(Kind::Pq4);
    out.push(ratio_target(
        "flat PQ 8-bit ≥ 2× faiss `IndexPQ`",
        find(set, pq8, "qcl", (0, 0)),
        find(set, pq8, "faiss", (0, 0)),
        2.0,
    ));
    out.push(ratio_target(
        "4-bit fast scan ≥ 1× faiss `IndexPQFastScan`",
        find(set, pq4, "qcl", (0, 0)),
        find(set, pq4, "faiss", (0, 0)),
        1.0,
    ));
    out.push(ratio_target(
        "4-bit fast scan ≥ 10× our scalar 4-bit scan",
        find(set, pq4, "qcl", (0, 0)),
        find(set, pq4, "qcl scalar", (0, 0)),
        10.0,
    ));
    for kind in [Kind::OpqIvfPq8, Kind::IvfPq4] {
        out.push(at_equal_recall(set, family_name(kind)));
    }
    out.push(rerank_target(set, family_name(Kind::OpqIvfPq8)));
    out.push(build_target(set));
    out.push(recall_parity(set));
    out
}

/// For every faiss setting without re-ranking: our best q/s at no lower recall@10.
fn at_equal_recall(set: &Measured, family: &str) -> Target {
    let what = format!("{family}: at each faiss setting's recall@10, ≥ 1× its q/s");
    let theirs: Vec<&Point> = set
        .points
        .iter()
        .filter(|p| p.family == family && p.system == "faiss" && p.refine == 0)
        .collect();
    if theirs.is_empty() {
        return Target {
            what,
            figure: "not measured".into(),
            met: None,
        };
    }
    let ratios: Vec<f64> = theirs
        .iter()
        .map(|t| {
            set.points
                .iter()
                .filter(|p| {
                    p.family == family
                        && p.system == "qcl"
                        && p.refine == 0
                        && p.recall_at_10 >= t.recall_at_10
                })
                .map(|p| p.queries_per_second / t.queries_per_second)
                .fold(0.0, f64::max)
        })
        .collect();
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    Target {
        what,
        figure: format!(
            "worst {worst:.2}× over {} faiss settings (0 = recall not reached); each: {}",
            ratios.len(),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        met: Some(worst >= 1.0),
    }
}

/// Recall@10 ≥ 0.9 with re-ranking, at ≥ 1× faiss's q/s at that recall.
fn rerank_target(set: &Measured, family: &str) -> Target {
    let what =
        "with re-ranking: recall@10 ≥ 0.9 at ≥ 1× faiss IVF-PQ + `IndexRefineFlat`".to_string();
    let best = |system: &str| {
        set.points
            .iter()
            .filter(|p| p.family == family && p.system == system && p.recall_at_10 >= 0.9)
            .map(|p| p.queries_per_second)
            .fold(None, |best: Option<f64>, q| {
                Some(best.map_or(q, |b| b.max(q)))
            })
    };
    let top_recall = set
        .points
        .iter()
        .filter(|p| p.family == family && p.system == "qcl")
        .map(|p| p.recall_at_10)
        .fold(0.0, f64::max);
    match (best("qcl"), best("faiss")) {
        (Some(ours), Some(theirs)) => Target {
            what,
            figure: format!(
                "best q/s at recall@10 ≥ 0.9: {ours:.0} / {theirs:.0} = {:.2}×",
                ours / theirs
            ),
            met: Some(ours >= theirs),
        },
        (Some(ours), None) => Target {
            what,
            figure: format!(
                "{ours:.0} q/s at recall@10 ≥ 0.9; faiss did not reach it or was not measured"
            ),
            met: None,
        },
        (None, _) => Target {
            what,
            figure: format!("recall@10 ≥ 0.9 not reached (best {top_recall:.3})"),
            met: Some(false),
        },
    }
}

fn build_target(set: &Measured) -> Target {
    let what = "training + adding time ≤ faiss's".to_string();
    let mut ratios = Vec::new();
    for ours in set.builds.iter().filter(|b| b.system == "qcl") {
        if let Some(theirs) = set
            .builds
            .iter()
            .find(|b| b.system == "faiss" && b.family == ours.family)
        {
            let r = (ours.train_seconds + ours.add_seconds)
                / (theirs.train_seconds + theirs.add_seconds);
            ratios.push((ours.family, r));
        }
    }
    if ratios.is_empty() {
        return Target {
            what,
            figure: "not measured".into(),
            met: None,
        };
    }
    Target {
        what,
        figure: ratios
            .iter()
            .map(|(f, r)| format!("{f}: {r:.2}×"))
            .collect::<Vec<_>>()
            .join("; "),
        met: Some(ratios.iter().all(|(_, r)| *r <= 1.0)),
    }
}

fn recall_parity(set: &Measured) -> Target {
    let what = "recall@10 of each setting ≥ faiss's same setting − 0.01".to_string();
    let gaps: Vec<f64> = set
        .points
        .iter()
        .filter(|p| p.system == "qcl")
        .filter_map(|p| {
            find(set, p.family, "faiss", (p.nprobe, p.refine))
                .map(|f| p.recall_at_10 - f.recall_at_10)
        })
        .collect();
    if gaps.is_empty() {
        return Target {
            what,
            figure: "not measured".into(),
            met: None,
        };
    }
    let worst = gaps.iter().copied().fold(f64::INFINITY, f64::min);
    let below = gaps.iter().filter(|&&g| g < -0.01).count();
    Target {
        what,
        figure: format!(
            "worst difference {worst:+.3}; {below} of {} settings below by more than 0.01",
            gaps.len()
        ),
        met: Some(below == 0),
    }
}

/// The settings no other setting beats on both recall and speed, by recall (`points` sorted
/// by recall): the line of an ann-benchmarks plot.
fn pareto_front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut front: Vec<(f64, f64)> = Vec::new();
    for &(recall, speed) in points.iter().rev() {
        if front.last().is_none_or(|&(_, best)| speed > best) {
            front.push((recall, speed));
        }
    }
    front.reverse();
    front
}

/// recall@10 (x) against queries per second (y, log): every setting a dot, each family and
/// system's Pareto front a line.
fn recall_plot(path: &std::path::Path, set: &Measured) -> Result<()> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for p in &set.points {
        let name = format!("{} — {}", p.family, p.system);
        let at = (p.recall_at_10, p.queries_per_second);
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push(at),
            None => series.push((name, vec![at])),
        }
    }
    let max_q = set
        .points
        .iter()
        .map(|p| p.queries_per_second)
        .fold(1.0, f64::max)
        * 2.0;
    let min_q = set
        .points
        .iter()
        .map(|p| p.queries_per_second)
        .fold(f64::INFINITY, f64::min)
        .max(1.0)
        / 2.0;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    plot::png(path, (900, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("{}: recall@10 against queries/s (2 threads)", set.data.name),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0f64..1.0, (min_q..max_q).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("recall@10")
            .y_desc("queries per second")
            .draw()?;
        for (i, (name, points)) in series.iter().enumerate() {
            let mut points = points.clone();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let family_index = families(true)
                .iter()
                .position(|f| name.starts_with(f.name))
                .unwrap_or(i);
            let colour = palette[family_index % palette.len()];
            let style = if name.ends_with("— faiss") {
                colour.mix(0.45).stroke_width(2)
            } else {
                colour.stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(pareto_front(&points), style))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 2, style.filled())))?;
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pareto_front_keeps_what_nothing_beats() {
        let points = [
            (0.1, 50.0),
            (0.2, 100.0),
            (0.3, 40.0),
            (0.4, 60.0),
            (0.5, 10.0),
        ];
        assert_eq!(
            pareto_front(&points),
            vec![(0.2, 100.0), (0.4, 60.0), (0.5, 10.0)]
        );
    }
}
