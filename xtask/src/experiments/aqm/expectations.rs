//! The expected outcomes of the Fashion-MNIST experiment (docs/methods/aqm.md § Fashion-MNIST
//! experiment, § Expected outcomes), each judged from the runs with the numbers it rests on.
//!
//! Rules: `<` compares means over seeds; "≈" is an equivalence test on the paired difference
//! `d` (same seeds): it holds when `|d| + 2·SE ≤` [`EQUIVALENCE_MARGIN`]; "clearly positive"
//! needs `d > max(2·SE, 1 point)`. An expectation is not judged (`held` is `None`, with the
//! reason) when a run it needs is missing, when the cells share no seed, when there are no
//! stored codes to measure, or when it rests on fewer than two seeds (a standard error of 0
//! would make any comparison look exact).

use std::collections::BTreeMap;

use qcl_aqm::online::Method;
use serde::Serialize;

use super::cells::{paired_by_seed, paired_difference, Cell, Stats};
use super::{Arm, B20, B50};

/// One judged expectation.
#[derive(Debug, Clone, Serialize)]
pub struct Expectation {
    /// Short id (`ordering-B50`, `er-beats-aqm-B20-4B`, …).
    pub id: String,
    /// The classifier of the runs judged.
    pub classifier: String,
    /// What is expected.
    pub statement: String,
    /// Held or not; `None` when it could not be judged (see `reason`).
    pub held: Option<bool>,
    /// Why it was not judged (`None` when it was).
    pub reason: Option<String>,
    /// The numbers it was judged on, as text.
    pub numbers: String,
    /// The same numbers, machine-readable.
    pub values: BTreeMap<String, f64>,
}

/// The margin of "≈": two methods are about equal when the paired difference of their final
/// accuracy lies, with its two standard errors, within ±2 points. A fixed margin makes the
/// rule an equivalence test — noisier seeds widen `2·SE` and make "≈" harder to show, not
/// easier, as `|d| ≤ max(2·SE, 1 point)` would. Two points is several times smaller than the
/// AQM − ER-raw gap the paper reports on CIFAR-10, so an ordering that holds is not decided
/// within it, and larger than the last-digit rounding of the per-task accuracies on 1,000 test
/// images per class.
pub const EQUIVALENCE_MARGIN: f64 = 0.02;

/// The smallest margin of "clearly positive": one point.
const ONE_POINT: f64 = 0.01;

/// `|d| + 2·SE ≤` [`EQUIVALENCE_MARGIN`].
fn about_equal(d: &Stats) -> bool {
    d.mean.abs() + 2.0 * d.se <= EQUIVALENCE_MARGIN
}

/// `d > max(2·SE, 1 point)`.
fn clearly_positive(d: &Stats) -> bool {
    d.mean > (2.0 * d.se).max(ONE_POINT)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Not judged: a run it needs is missing.
const NOT_RUN: &str = "not run";
/// Not judged: the runs of a paired difference share no seed.
const NO_COMMON_SEED: &str = "the runs share no seed: no paired difference";
/// Not judged: fewer than two seeds.
const ONE_SEED: &str = "one seed: not judged";
/// Not judged: the AQM runs stored no codes, so there is no drift.
const NO_CODES: &str = "no stored codes to measure: the module never froze";

/// The cells of one classifier.
struct Cells<'a> {
    all: Vec<&'a Cell>,
}

impl<'a> Cells<'a> {
    fn find(&self, method: Method, budget: u64, param_bytes: u64) -> Option<&'a Cell> {
        self.all.iter().copied().find(|c| {
            c.job.method == method
                && c.job.arm == Arm::Reference
                && (c.job.budget == budget
                    || matches!(method, Method::FineTune | Method::IidOnline))
                && c.job.param_bytes == param_bytes
        })
    }
}

/// An expectation that could not be judged, with the reason (and the numbers there are).
fn not_judged(
    (id, classifier, statement): (&str, &str, &str),
    reason: &str,
    numbers: String,
    values: BTreeMap<String, f64>,
) -> Expectation {
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement: statement.into(),
        held: None,
        reason: Some(reason.into()),
        numbers,
        values,
    }
}

fn missing(id: &str, classifier: &str, statement: &str, reason: &str) -> Expectation {
    not_judged(
        (id, classifier, statement),
        reason,
        String::new(),
        BTreeMap::new(),
    )
}

/// A judged expectation, or a not-judged one when it rests on fewer than two seeds.
fn judged(
    (id, classifier, statement): (&str, &str, &str),
    (held, seeds): (bool, usize),
    numbers: String,
    values: BTreeMap<String, f64>,
) -> Expectation {
    if seeds < 2 {
        let reason = if seeds == 0 { NOT_RUN } else { ONE_SEED };
        return not_judged((id, classifier, statement), reason, numbers, values);
    }
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement: statement.into(),
        held: Some(held),
        reason: None,
        numbers,
        values,
    }
}

/// Every expectation for every classifier that ran; `d_th` is the module's threshold.
pub fn judge(cells: &[Cell], d_th: f64) -> Vec<Expectation> {
    let mut classifiers: Vec<String> = Vec::new();
    for c in cells {
        if !classifiers.contains(&c.classifier) {
            classifiers.push(c.classifier.clone());
        }
    }
    let mut out = Vec::new();
    for name in classifiers {
        let cells = Cells {
            all: cells.iter().filter(|c| c.classifier == name).collect(),
        };
        out.push(ordering(&cells, &name, B50));
        out.push(ordering(&cells, &name, B20));
        out.push(model_cost_check(&cells, &name));
        out.push(stored_ratio(&cells, &name));
        out.push(drift(&cells, &name, d_th));
        out.push(task0(&cells, &name));
    }
    out
}

/// fine-tune < ER-raw ≈ raw-AQM < AQM < iid-online at `budget` with 1-byte parameters, with
/// AQM − ER-raw clearly positive.
fn ordering(cells: &Cells<'_>, classifier: &str, budget: u64) -> Expectation {
    let b = super::budget_name(budget);
    let id = format!("ordering-{b}");
    let statement = format!(
        "fine-tune < ER-raw ≈ raw-AQM < AQM < iid-online at {b} (1-byte parameters), \
         AQM − ER-raw clearly positive"
    );
    let found = (
        cells.find(Method::FineTune, budget, 1),
        cells.find(Method::ErRaw, budget, 1),
        cells.find(Method::RawAqm, budget, 1),
        cells.find(Method::Aqm, budget, 1),
        cells.find(Method::IidOnline, budget, 1),
    );
    let (Some(ft), Some(er), Some(raw), Some(aqm), Some(iid)) = found else {
        return missing(&id, classifier, &statement, NOT_RUN);
    };
    let mean = |c: &Cell| c.final_accuracy_stats.map_or(f64::NAN, |s| s.mean);
    let (Some(er_raw), Some(aqm_er)) = (paired_difference(er, raw), paired_difference(aqm, er))
    else {
        return missing(&id, classifier, &statement, NO_COMMON_SEED);
    };
    let parts = [
        mean(ft) < mean(er),
        about_equal(&er_raw),
        clearly_positive(&aqm_er),
        mean(aqm) > mean(raw),
        mean(aqm) < mean(iid),
    ];
    let seeds = [ft, er, raw, aqm, iid]
        .iter()
        .map(|c| c.seeds.len())
        .chain([er_raw.n, aqm_er.n])
        .min()
        .unwrap_or(0);
    let numbers = format!(
        "fine-tune {:.1}, ER-raw {:.1}, raw-AQM {:.1}, AQM {:.1}, iid-online {:.1} % (means over \
         {} seeds); fine-tune < ER-raw: {}; ER-raw − raw-AQM {:+.1} ± {:.1} SE (≈, |d| + 2·SE ≤ \
         {:.0} points: {}); AQM − ER-raw {:+.1} ± {:.1} SE (clearly positive: {}); AQM > \
         raw-AQM: {}; AQM < iid-online: {}",
        100.0 * mean(ft),
        100.0 * mean(er),
        100.0 * mean(raw),
        100.0 * mean(aqm),
        100.0 * mean(iid),
        aqm.seeds.len(),
        yes(parts[0]),
        100.0 * er_raw.mean,
        100.0 * er_raw.se,
        100.0 * EQUIVALENCE_MARGIN,
        yes(parts[1]),
        100.0 * aqm_er.mean,
        100.0 * aqm_er.se,
        yes(parts[2]),
        yes(parts[3]),
        yes(parts[4]),
    );
    let values = BTreeMap::from([
        ("fine_tune".to_string(), mean(ft)),
        ("er_raw".into(), mean(er)),
        ("raw_aqm".into(), mean(raw)),
        ("aqm".into(), mean(aqm)),
        ("iid_online".into(), mean(iid)),
        ("er_minus_raw_aqm".into(), er_raw.mean),
        ("er_minus_raw_aqm_se".into(), er_raw.se),
        ("aqm_minus_er".into(), aqm_er.mean),
        ("aqm_minus_er_se".into(), aqm_er.se),
    ]);
    judged(
        (&id, classifier, &statement),
        (parts.iter().all(|&p| p), seeds),
        numbers,
        values,
    )
}

/// ER-raw ahead of AQM at B20 when parameters cost 4 bytes.
fn model_cost_check(cells: &Cells<'_>, classifier: &str) -> Expectation {
    let id = "er-beats-aqm-B20-4B";
    let statement = "ER-raw > AQM at B20 with 4-byte parameters (the model eats the budget)";
    let (Some(er_cell), Some(aqm_cell)) = (
        cells.find(Method::ErRaw, B20, 1),
        cells.find(Method::Aqm, B20, 4),
    ) else {
        return missing(id, classifier, statement, NOT_RUN);
    };
    let mean = |c: &Cell| c.final_accuracy_stats.map_or(f64::NAN, |s| s.mean);
    let (er, aqm) = (mean(er_cell), mean(aqm_cell));
    let stored = aqm_cell.mean_stored();
    judged(
        (id, classifier, statement),
        (er > aqm, er_cell.seeds.len().min(aqm_cell.seeds.len())),
        format!(
            "ER-raw {:.1} % vs AQM {:.1} % (AQM stores {stored:.0} samples)",
            100.0 * er,
            100.0 * aqm
        ),
        BTreeMap::from([
            ("er_raw".to_string(), er),
            ("aqm".into(), aqm),
            ("aqm_stored".into(), stored),
        ]),
    )
}

/// AQM stores at least 5× as many samples as ER-raw at the end of B50.
fn stored_ratio(cells: &Cells<'_>, classifier: &str) -> Expectation {
    let id = "stored-5x-B50";
    let statement = "AQM stores ≥ 5× as many samples as ER-raw at the end (B50, 1-byte)";
    let (Some(er), Some(aqm)) = (
        cells.find(Method::ErRaw, B50, 1),
        cells.find(Method::Aqm, B50, 1),
    ) else {
        return missing(id, classifier, statement, NOT_RUN);
    };
    let ratio = aqm.mean_stored() / er.mean_stored().max(1e-9);
    judged(
        (id, classifier, statement),
        (ratio >= 5.0, er.seeds.len().min(aqm.seeds.len())),
        format!(
            "AQM {:.0} vs ER-raw {:.0} samples: {ratio:.1}×",
            aqm.mean_stored(),
            er.mean_stored()
        ),
        BTreeMap::from([
            ("aqm_stored".to_string(), aqm.mean_stored()),
            ("er_stored".into(), er.mean_stored()),
            ("ratio".into(), ratio),
        ]),
    )
}

/// The mean drift MSE of the stored codes at the end stays below `d_th` in every AQM cell that
/// stored codes.
fn drift(cells: &Cells<'_>, classifier: &str, d_th: f64) -> Expectation {
    let id = "drift-below-dth";
    let statement = format!("mean drift MSE of the stored codes < d_th = {d_th} (every AQM cell)");
    let mut values = BTreeMap::new();
    let mut parts = Vec::new();
    let mut held = true;
    let mut seeds = usize::MAX;
    let aqm: Vec<&Cell> = cells
        .all
        .iter()
        .copied()
        .filter(|c| c.is_aqm(Arm::Reference))
        .collect();
    if aqm.is_empty() {
        return missing(id, classifier, &statement, NOT_RUN);
    }
    for c in &aqm {
        let key = format!("{} {}B", c.budget, c.param_bytes);
        let finals: Vec<f64> = c.final_drift.iter().flatten().copied().collect();
        let Some(s) = Stats::of(&finals) else {
            parts.push(format!("{key}: no stored codes"));
            continue;
        };
        let peak = c.max_drift.iter().flatten().copied().fold(0.0, f64::max);
        held &= s.mean < d_th;
        seeds = seeds.min(s.n);
        parts.push(format!(
            "{key} {:.4} (largest over the stream {peak:.4})",
            s.mean
        ));
        values.insert(key, s.mean);
    }
    if values.is_empty() {
        return not_judged(
            (id, classifier, &statement),
            NO_CODES,
            parts.join("; "),
            values,
        );
    }
    judged(
        (id, classifier, &statement),
        (held, seeds),
        parts.join("; "),
        values,
    )
}

/// Task-0 forgetting markedly lower with AQM than with ER-raw, at B50 and at B20 (1-byte): the
/// paired difference ER-raw − AQM clearly positive at both.
fn task0(cells: &Cells<'_>, classifier: &str) -> Expectation {
    let id = "task0-forgetting";
    let statement = "forgetting of task 0 markedly lower with AQM than with ER-raw (ER-raw − AQM \
                     clearly positive, B50 and B20, 1-byte)";
    let mut values = BTreeMap::new();
    let mut parts = Vec::new();
    let mut held = true;
    let mut seeds = usize::MAX;
    for budget in [B50, B20] {
        let (Some(aqm), Some(er)) = (
            cells.find(Method::Aqm, budget, 1),
            cells.find(Method::ErRaw, budget, 1),
        ) else {
            return missing(id, classifier, statement, NOT_RUN);
        };
        let forgetting = |c: &Cell, k: usize| c.task0_forgetting.get(k).copied().flatten();
        let Some(d) = paired_by_seed(er, aqm, forgetting) else {
            return missing(id, classifier, statement, NO_COMMON_SEED);
        };
        let mean = |c: &Cell| c.task0_forgetting_stats.map_or(f64::NAN, |s| s.mean);
        let clear = clearly_positive(&d);
        held &= clear;
        seeds = seeds.min(d.n);
        let b = super::budget_name(budget);
        parts.push(format!(
            "{b}: AQM {:.1} vs ER-raw {:.1} points, ER-raw − AQM {:+.1} ± {:.1} SE (clearly \
             positive: {})",
            100.0 * mean(aqm),
            100.0 * mean(er),
            100.0 * d.mean,
            100.0 * d.se,
            yes(clear)
        ));
        values.insert(format!("aqm_{b}"), mean(aqm));
        values.insert(format!("er_raw_{b}"), mean(er));
        values.insert(format!("er_minus_aqm_{b}"), d.mean);
        values.insert(format!("er_minus_aqm_se_{b}"), d.se);
    }
    judged(
        (id, classifier, statement),
        (held, seeds),
        parts.join("; "),
        values,
    )
}
