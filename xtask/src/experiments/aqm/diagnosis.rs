//! Why the reference AQM loses to ER-raw and varies between seeds: per reference AQM cell,
//! the raw-versus-decoded test accuracy after every task, the decoded share of replay, the
//! same per seed, and the conclusion these measurements support (written from them).

use std::fmt::Write as _;

use qcl_aqm::online::Method;
use serde::Serialize;

use super::cells::{
    correlation, critical_correlation, old_task_accuracy, paired_by_seed, paired_difference, Cell,
    GapRow, Stats,
};
use super::report::pct;
use super::Arm;

/// A decoded-minus-raw gap on the earlier tasks from which the text calls it marked (and by
/// which it must exceed the gap on the last task).
const MARKED_GAP: f64 = 0.05;

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
    /// Seeds the correlation is over (those with a measured old-task gap).
    pub correlation_seeds: usize,
    /// The two-sided 5 % critical value of the correlation for that many seeds.
    pub correlation_critical: Option<f64>,
    /// Tasks of the stream.
    pub tasks: usize,
    /// The cell's final accuracy minus ER-raw's at the same budget (paired by seed).
    pub minus_er_raw: Option<Stats>,
    /// ER-raw's mean accuracy on the raw test images of the earlier tasks at the end minus
    /// the cell's (`mean_{j<T−1} R[T−1][j]`, paired by seed).
    pub old_task_deficit: Option<Stats>,
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
    // Accuracy on raw test images: AQM's raw matrix, the accuracy matrix of the others.
    let old_raw = |c: &Cell, k: usize| {
        let raw = c.raw_test_accuracy.get(k).filter(|m| !m.is_empty());
        old_task_accuracy(raw.or(c.accuracy.get(k))?)
    };
    let mut d = Diagnosis {
        cell: format!(
            "{}, {}, {} {}B",
            aqm.method, aqm.classifier, aqm.budget, aqm.param_bytes
        ),
        tasks: over_time.len(),
        over_time,
        per_seed,
        accuracy_gap_correlation: correlation(&pairs),
        correlation_seeds: pairs.len(),
        correlation_critical: critical_correlation(pairs.len()),
        minus_er_raw: er.and_then(|er| paired_difference(aqm, er)),
        old_task_deficit: er.and_then(|er| paired_by_seed(er, aqm, old_raw)),
        decoded_input_accuracy: decoded.and_then(|c| c.final_accuracy_stats).map(|s| s.mean),
        conclusion: String::new(),
    };
    d.conclusion = conclusion(&d);
    d
}

/// The conclusion the measurements of `d` support, with them.
pub(super) fn conclusion(d: &Diagnosis) -> String {
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
         earlier tasks but {:.1} % on their raw test images ({:+.1} points; the {} seed(s) whose \
         module froze){}; {} of its replay images were decoded (mean over tasks with replay and \
         seeds).",
        100.0 * dec_old,
        100.0 * raw_old,
        100.0 * gap_old,
        last.seeds_decoded,
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
    text += &er_raw_sentence(d);
    if let (true, Some(dec)) = (big_gap, d.decoded_input_accuracy) {
        let _ = write!(
            text,
            " Trained and tested on decoded images (the decoded-input arm) it reaches {:.1} %.",
            100.0 * dec
        );
    }
    text + &correlation_sentence(d)
}

/// Where the cell falls behind ER-raw, said only when measured: ER-raw's paired lead on the raw
/// test images of the earlier tasks, above two standard errors and large enough to give the
/// whole final-accuracy gap (`(T−1)/T` of it enters the final accuracy).
fn er_raw_sentence(d: &Diagnosis) -> String {
    let Some(f) = d.minus_er_raw else {
        return String::new();
    };
    if f.mean >= 0.0 {
        return format!(" It is {:+.1} points from ER-raw.", 100.0 * f.mean);
    }
    let behind = format!("{:+.1} points", 100.0 * f.mean);
    let Some(o) = d.old_task_deficit else {
        return format!(" It is {behind} from ER-raw.");
    };
    let lead = format!(
        "ER-raw scores {:+.1} ± {:.1} (SE) points more than it on the raw test images of the \
         earlier tasks (paired over {} seed(s))",
        100.0 * o.mean,
        100.0 * o.se,
        o.n
    );
    let weight = d.tasks.saturating_sub(1) as f64 / d.tasks.max(1) as f64;
    let given = weight * o.mean;
    if o.n < 2 {
        format!(" It is {behind} from ER-raw; {lead}: one seed, not judged.")
    } else if o.mean > 2.0 * o.se && given >= -f.mean {
        format!(
            " That is where it falls behind ER-raw ({behind} in final accuracy): {lead}, which \
             alone costs {:.1} points of final accuracy.",
            100.0 * given
        )
    } else {
        format!(
            " It is {behind} from ER-raw in final accuracy; {lead}, {}: the runs do not place \
             the shortfall on the earlier tasks.",
            if o.mean > 2.0 * o.se {
                format!(
                    "which costs only {:.1} points of final accuracy",
                    100.0 * given
                )
            } else if o.mean < -2.0 * o.se {
                "so it is ahead of ER-raw there".into()
            } else {
                "within two standard errors".into()
            }
        )
    }
}

/// The relation over seeds of final accuracy and old-task gap: said to follow the gap only
/// when `|r|` exceeds the two-sided 5 % critical value for the seeds it is over.
fn correlation_sentence(d: &Diagnosis) -> String {
    let n = d.correlation_seeds;
    match (d.accuracy_gap_correlation, d.correlation_critical) {
        (Some(r), Some(c)) if r.abs() > c => format!(
            " Across seeds the final accuracy {} as the old-task gap grows (r = {r:.2} over {n} \
             seeds, beyond ±{c:.3}, the two-sided 5 % critical value for {n}): {}.",
            if r < 0.0 { "falls" } else { "rises" },
            if r < 0.0 {
                "the spread between seeds follows the gap"
            } else {
                "the gap does not account for the spread between seeds"
            }
        ),
        (Some(r), Some(c)) => format!(
            " Across seeds the final accuracy and the old-task gap correlate at r = {r:.2} over \
             {n} seeds, within ±{c:.3}, the two-sided 5 % critical value for {n}: the seeds are \
             too few to tell whether the spread between seeds follows the gap."
        ),
        _ => format!(
            " Too few seeds ({n} with a measured gap) or no spread between them to relate the \
             spread between seeds to the gap."
        ),
    }
}

/// The diagnosis of the reference AQM cells: gap over time, per seed, conclusion.
pub(super) fn diagnosis_text(diagnoses: &[Diagnosis]) -> String {
    let mut t = String::from(
        "## Why the reference AQM loses and varies between seeds\n\nAfter each task, the \
         classifier's accuracy on the raw test images and on the same images passed through the \
         frozen module (encoder, codebook, slow decoder) — the kind of image it learns earlier \
         classes from — on the earlier tasks and on the task just finished, with the share of \
         decoded images among the replay images of that task's classifier steps (means over \
         seeds; the raw, decoded and gap columns over the seeds whose module had frozen, so that \
         gap = decoded − raw; the first column over every seed). The raw-versus-decoded gap over \
         time is also plotted (`aqm-gap.png`). A correlation over seeds is called a relation \
         only beyond the two-sided 5 % critical value for the number of seeds.\n\n",
    );
    for d in diagnoses {
        let _ = write!(
            t,
            "### {}\n\n| after task | earlier tasks, raw %, all seeds | earlier tasks, raw % | \
             earlier tasks, decoded % | gap, points | this task, raw % | this task, decoded % | \
             decoded share of replay % | seeds with decoded |\n|---|---|---|---|---|---|---|---|\
             ---|\n",
            d.cell
        );
        for r in &d.over_time {
            let gap = r.gap_old;
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.after_task,
                pct(r.raw_old_all_seeds),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mean: f64, se: f64, n: usize) -> Stats {
        Stats {
            mean,
            std: se * (n as f64).sqrt(),
            se,
            n,
        }
    }

    /// The last task's row with decoded measurements: raw 0.50 on the earlier tasks, decoded
    /// `0.50 + gap_old`; `gap_current` on the last task.
    fn row(gap_old: f64, gap_current: f64) -> GapRow {
        GapRow {
            after_task: 4,
            raw_old_all_seeds: Some(0.5),
            raw_old: Some(0.5),
            decoded_old: Some(0.5 + gap_old),
            gap_old: Some(gap_old),
            raw_current: Some(0.9),
            decoded_current: Some(0.9 + gap_current),
            gap_current: Some(gap_current),
            decoded_replay_share: Some(0.8),
            seeds_decoded: 5,
        }
    }

    /// A diagnosis of 5 tasks: AQM 5 points behind ER-raw, whose lead on the earlier tasks is
    /// 8 ± 1 points over 5 seeds; a correlation of −0.95 over 5 seeds.
    fn diagnosis(last: GapRow) -> Diagnosis {
        Diagnosis {
            cell: "AQM".into(),
            over_time: vec![last],
            per_seed: Vec::new(),
            accuracy_gap_correlation: Some(-0.95),
            correlation_seeds: 5,
            correlation_critical: critical_correlation(5),
            tasks: 5,
            minus_er_raw: Some(stats(-0.05, 0.01, 5)),
            old_task_deficit: Some(stats(0.08, 0.01, 5)),
            decoded_input_accuracy: Some(0.6),
            conclusion: String::new(),
        }
    }

    #[test]
    fn nothing_measured_or_nothing_frozen() {
        let mut d = diagnosis(row(0.1, 0.0));
        d.over_time.clear();
        assert_eq!(conclusion(&d), "No task ended with measurements.");
        let mut unfrozen = row(0.1, 0.0);
        (unfrozen.raw_old, unfrozen.decoded_old, unfrozen.gap_old) = (Some(0.5), None, None);
        assert!(conclusion(&diagnosis(unfrozen)).contains("did not freeze in any seed"));
    }

    #[test]
    fn a_marked_gap_is_named_and_a_small_one_is_not() {
        let big = conclusion(&diagnosis(row(0.10, 0.01)));
        assert!(
            big.contains("learned the earlier classes from decoded images"),
            "{big}"
        );
        assert!(
            big.contains("(the decoded-input arm) it reaches 60.0 %"),
            "{big}"
        );
        assert!(
            big.contains("+10.0 points; the 5 seed(s) whose module froze"),
            "{big}"
        );
        // As large on the last task: not marked.
        for small in [row(0.02, 0.0), row(0.10, 0.08)] {
            let text = conclusion(&diagnosis(small));
            assert!(!text.contains("learned the earlier classes"), "{text}");
            assert!(
                text.contains("does not explain the difference to ER-raw (-5.0 points)"),
                "{text}"
            );
            assert!(!text.contains("decoded-input arm"), "{text}");
        }
    }

    #[test]
    fn falling_behind_on_the_earlier_tasks_is_said_only_when_measured() {
        // 8 ± 1 points on the earlier tasks: 4/5 · 8 = 6.4 ≥ 5 points of final accuracy.
        let claim = conclusion(&diagnosis(row(0.10, 0.0)));
        assert!(
            claim.contains("That is where it falls behind ER-raw (-5.0 points"),
            "{claim}"
        );
        assert!(claim.contains("alone costs 6.4 points"), "{claim}");
        let mut d = diagnosis(row(0.10, 0.0));
        d.old_task_deficit = Some(stats(0.08, 0.05, 5)); // within two standard errors
        let text = conclusion(&d);
        assert!(!text.contains("That is where"), "{text}");
        assert!(text.contains("within two standard errors"), "{text}");
        d.old_task_deficit = Some(stats(0.04, 0.005, 5)); // 3.2 of the 5 points
        let text = conclusion(&d);
        assert!(!text.contains("That is where"), "{text}");
        assert!(text.contains("costs only 3.2 points"), "{text}");
        d.old_task_deficit = Some(stats(-0.04, 0.005, 5));
        assert!(conclusion(&d).contains("so it is ahead of ER-raw there"));
        d.old_task_deficit = Some(stats(0.08, 0.0, 1));
        assert!(conclusion(&d).contains("one seed, not judged"));
        d.old_task_deficit = None;
        let text = conclusion(&d);
        assert!(text.contains("It is -5.0 points from ER-raw.") && !text.contains("That is"));
        d.minus_er_raw = Some(stats(0.03, 0.01, 5));
        assert!(conclusion(&d).contains("It is +3.0 points from ER-raw."));
        d.minus_er_raw = None;
        assert!(!conclusion(&d).contains("ER-raw."));
    }

    #[test]
    fn a_correlation_is_a_relation_only_beyond_its_critical_value() {
        let mut d = diagnosis(row(0.10, 0.0));
        let text = conclusion(&d);
        assert!(
            text.contains("falls as the old-task gap grows (r = -0.95 over 5 seeds, beyond ±0.878")
        );
        assert!(
            text.contains("the spread between seeds follows the gap"),
            "{text}"
        );
        d.accuracy_gap_correlation = Some(0.95);
        let text = conclusion(&d);
        assert!(text.contains("rises as the old-task gap grows"), "{text}");
        assert!(text.contains("does not account for the spread"), "{text}");
        // −0.8 over 5 seeds is within ±0.878: too few to tell (the old rule, r ≤ −0.5, said
        // the spread follows the gap).
        d.accuracy_gap_correlation = Some(-0.8);
        let text = conclusion(&d);
        assert!(
            text.contains("r = -0.80 over 5 seeds, within ±0.878"),
            "{text}"
        );
        assert!(text.contains("too few to tell"), "{text}");
        assert!(
            !text.contains(": the spread between seeds follows"),
            "{text}"
        );
        d.accuracy_gap_correlation = None;
        (d.correlation_seeds, d.correlation_critical) = (2, None);
        assert!(conclusion(&d).contains("Too few seeds (2 with a measured gap)"));
    }
}
