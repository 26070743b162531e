//! Why the reference AQM loses to ER-raw and varies between seeds: per reference AQM cell,
//! the raw-versus-decoded test accuracy after every task, the decoded share of replay, the
//! same per seed, and the conclusion these measurements support (written from them).

use std::fmt::Write as _;

use qcl_aqm::online::Method;
use serde::Serialize;

use super::cells::{correlation, paired_difference, Cell, GapRow, Stats};
use super::report::pct;
use super::Arm;

/// A decoded-minus-raw gap on the earlier tasks from which the text calls it marked (and by
/// which it must exceed the gap on the last task).
const MARKED_GAP: f64 = 0.05;

/// A correlation over seeds of final accuracy with that gap at or below which the text says
/// the spread follows the gap.
const STRONG_CORRELATION: f64 = -0.5;

/// One seed of a [`Diagnosis`].
#[derive(Debug, Clone, Serialize)]
pub struct SeedDiagnosis {
    /// The seed.
    pub seed: u64,
    /// Final accuracy.
    pub final_accuracy: f64,
    /// Decoded minus raw accuracy on the earlier tasks' test images at the end.
    pub old_gap: Option<f64>,
    /// Mean share of decoded images among the replay images.
    pub decoded_share: Option<f64>,
    /// Step at which the module froze.
    pub freeze_step: Option<u64>,
}

/// The diagnosis of one AQM cell: the raw-versus-decoded gap over time and across seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// The cell (method, classifier, budget, bytes).
    pub cell: String,
    /// Raw versus decoded accuracy after each task, mean over seeds.
    pub over_time: Vec<GapRow>,
    /// Per seed.
    pub per_seed: Vec<SeedDiagnosis>,
    /// Correlation over seeds of the final accuracy with the old-task gap.
    pub accuracy_gap_correlation: Option<f64>,
    /// The cell's final accuracy minus ER-raw's at the same budget (paired by seed).
    pub minus_er_raw: Option<Stats>,
    /// The decoded-input arm's final accuracy at the same budget and classifier, if it ran.
    pub decoded_input_accuracy: Option<f64>,
    /// The conclusion drawn from these numbers.
    pub conclusion: String,
}

pub(super) fn find<'a>(
    cells: &'a [Cell],
    classifier: &str,
    method: Method,
    arm: Arm,
    b: (u64, u64),
) -> Option<&'a Cell> {
    cells.iter().find(|c| {
        c.classifier == classifier
            && c.job.method == method
            && c.job.arm == arm
            && c.job.budget == b.0
            && c.job.param_bytes == b.1
    })
}

/// The diagnosis of the reference AQM cell `aqm`.
pub(super) fn diagnose(cells: &[Cell], aqm: &Cell) -> Diagnosis {
    let b = (aqm.job.budget, aqm.job.param_bytes);
    let er = find(
        cells,
        &aqm.classifier,
        Method::ErRaw,
        Arm::Reference,
        (b.0, 1),
    );
    let decoded = find(cells, &aqm.classifier, Method::Aqm, Arm::DecodedInput, b);
    let gaps = aqm.final_old_gap();
    let shares = aqm.mean_decoded_share();
    let per_seed: Vec<SeedDiagnosis> = (0..aqm.seeds.len())
        .map(|i| SeedDiagnosis {
            seed: aqm.seeds[i],
            final_accuracy: aqm.final_accuracy[i],
            old_gap: gaps[i],
            decoded_share: shares[i],
            freeze_step: aqm.freeze_step[i],
        })
        .collect();
    let pairs: Vec<(f64, f64)> = per_seed
        .iter()
        .filter_map(|s| Some((s.final_accuracy, s.old_gap?)))
        .collect();
    let over_time = aqm.gap_rows();
    let mut d = Diagnosis {
        cell: format!(
            "{}, {}, {} {}B",
            aqm.method, aqm.classifier, aqm.budget, aqm.param_bytes
        ),
        over_time,
        per_seed,
        accuracy_gap_correlation: correlation(&pairs),
        minus_er_raw: er.and_then(|er| paired_difference(aqm, er)),
        decoded_input_accuracy: decoded.and_then(|c| c.final_accuracy_stats).map(|s| s.mean),
        conclusion: String::new(),
    };
    d.conclusion = conclusion(&d);
    d
}

/// The conclusion the measurements of `d` support, with them.
fn conclusion(d: &Diagnosis) -> String {
    let Some(last) = d.over_time.last() else {
        return "No task ended with measurements.".into();
    };
    let (Some(raw_old), Some(dec_old), Some(gap_old)) =
        (last.raw_old, last.decoded_old, last.gap_old)
    else {
        return "The module did not freeze in any seed, so there is no decoded test accuracy to \
                compare."
            .into();
    };
    let gap_cur = last.gap_current;
    let share = Stats::of(
        &d.per_seed
            .iter()
            .filter_map(|s| s.decoded_share)
            .collect::<Vec<_>>(),
    );
    let mut text = format!(
        "At the end of the stream the classifier scores {:.1} % on decoded test images of the \
         earlier tasks but {:.1} % on their raw test images ({:+.1} points){}; {} of its replay \
         images were decoded (mean over tasks with replay and seeds).",
        100.0 * dec_old,
        100.0 * raw_old,
        100.0 * gap_old,
        gap_cur.map_or(String::new(), |g| format!(
            ", against {:+.1} points on the last task",
            100.0 * g
        )),
        share.map_or("–".into(), |s| format!("{:.0} %", 100.0 * s.mean)),
    );
    let behind = d.minus_er_raw.map(|s| s.mean);
    let big_gap = gap_old >= MARKED_GAP && gap_cur.is_none_or(|g| gap_old - g >= MARKED_GAP);
    if big_gap {
        text += " So the classifier learned the earlier classes from decoded images and \
                 recognises far fewer of their raw images.";
        match behind {
            Some(b) if b < 0.0 => {
                let _ = write!(
                    text,
                    " That is where it falls behind ER-raw ({:+.1} points): on raw test \
                     images of the earlier tasks.",
                    100.0 * b
                );
            }
            Some(b) => {
                let _ = write!(text, " It is still {:+.1} points from ER-raw.", 100.0 * b);
            }
            None => {}
        }
        if let Some(dec) = d.decoded_input_accuracy {
            let _ = write!(
                text,
                " Trained and tested on decoded images (the decoded-input arm) it reaches \
                 {:.1} %.",
                100.0 * dec
            );
        }
    } else {
        let _ = write!(
            text,
            " The raw-versus-decoded gap on the earlier tasks is below {:.0} points (or not \
             larger than on the last task by that much), so it does not explain {} here.",
            100.0 * MARKED_GAP,
            behind.map_or("the result".into(), |b| format!(
                "the difference to ER-raw ({:+.1} points)",
                100.0 * b
            ))
        );
    }
    match d.accuracy_gap_correlation {
        Some(r) if r <= STRONG_CORRELATION => {
            let _ = write!(
                text,
                " Across seeds the final accuracy falls as the old-task gap grows (correlation \
                 {r:.2} over {} seeds): the spread between seeds follows the gap.",
                d.per_seed.len()
            );
        }
        Some(r) => {
            let _ = write!(
                text,
                " Across seeds the final accuracy and the old-task gap correlate at {r:.2} \
                 ({} seeds), so the gap does not account for the spread between seeds.",
                d.per_seed.len()
            );
        }
        None => text += " Too few seeds to relate the spread between seeds to the gap.",
    }
    text
}

/// The diagnosis of the reference AQM cells: gap over time, per seed, conclusion.
pub(super) fn diagnosis_text(diagnoses: &[Diagnosis]) -> String {
    let mut t = String::from(
        "## Why the reference AQM loses and varies between seeds\n\nAfter each task, the \
         classifier's accuracy on the raw test images and on the same images passed through the \
         frozen module (encoder, codebook, slow decoder) — the kind of image it learns earlier \
         classes from — on the earlier tasks and on the task just finished, with the share of \
         decoded images among the replay images of that task's classifier steps (means over \
         seeds; decoded columns and the gap over the seeds whose module had frozen). The raw-versus-decoded \
         gap over time is also plotted (`aqm-gap.png`).\n\n",
    );
    for d in diagnoses {
        let _ = write!(
            t,
            "### {}\n\n| after task | earlier tasks, raw % | earlier tasks, decoded % | gap, \
             points | this task, raw % | this task, decoded % | decoded share of replay % | \
             seeds with decoded |\n|---|---|---|---|---|---|---|---|\n",
            d.cell
        );
        for r in &d.over_time {
            let gap = r.gap_old;
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.after_task,
                pct(r.raw_old),
                pct(r.decoded_old),
                gap.map_or("–".into(), |g| format!("{:+.1}", 100.0 * g)),
                pct(r.raw_current),
                pct(r.decoded_current),
                pct(r.decoded_replay_share),
                r.seeds_decoded
            );
        }
        t += "\n| seed | final accuracy % | old-task gap at the end, points | mean decoded share \
              of replay % | freeze step |\n|---|---|---|---|---|\n";
        for s in &d.per_seed {
            let _ = writeln!(
                t,
                "| {} | {:.1} | {} | {} | {} |",
                s.seed,
                100.0 * s.final_accuracy,
                s.old_gap
                    .map_or("–".into(), |g| format!("{:+.1}", 100.0 * g)),
                pct(s.decoded_share),
                s.freeze_step.map_or("–".into(), |f| f.to_string())
            );
        }
        let _ = write!(t, "\n**Finding.** {}\n\n", d.conclusion);
    }
    t
}
