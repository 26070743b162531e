//! The expected outcomes of the Fashion-MNIST experiment (docs/methods/aqm.md § Fashion-MNIST
//! experiment, § Expected outcomes), each judged from the runs with the numbers it rests on.
//!
//! Rules: `<` compares means over seeds; "≈" holds when the paired difference (same seeds)
//! is within two standard errors of it, and at least within one point; "clearly positive"
//! needs the paired difference above both.

use std::collections::BTreeMap;

use qcl_aqm::online::Method;
use serde::Serialize;

use super::cells::{paired_difference, Cell, Stats};
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
    /// Held or not; `None` when a run it needs is missing.
    pub held: Option<bool>,
    /// The numbers it was judged on, as text.
    pub numbers: String,
    /// The same numbers, machine-readable.
    pub values: BTreeMap<String, f64>,
}

/// The smallest tolerance of "≈" and margin of "clearly positive": one point.
const ONE_POINT: f64 = 0.01;

/// `|d| ≤ max(2·SE, 1 point)`.
fn about_equal(d: &Stats) -> bool {
    d.mean.abs() <= (2.0 * d.se).max(ONE_POINT)
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

    fn mean(&self, method: Method, budget: u64, param_bytes: u64) -> Option<f64> {
        self.find(method, budget, param_bytes)?
            .final_accuracy_stats
            .map(|s| s.mean)
    }
}

fn missing(id: &str, classifier: &str, statement: &str) -> Expectation {
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement: statement.into(),
        held: None,
        numbers: "not run".into(),
        values: BTreeMap::new(),
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
        return missing(&id, classifier, &statement);
    };
    let mean = |c: &Cell| c.final_accuracy_stats.map_or(f64::NAN, |s| s.mean);
    let (Some(er_raw), Some(aqm_er)) = (paired_difference(er, raw), paired_difference(aqm, er))
    else {
        return missing(&id, classifier, &statement);
    };
    let parts = [
        mean(ft) < mean(er),
        about_equal(&er_raw),
        clearly_positive(&aqm_er),
        mean(aqm) > mean(raw),
        mean(aqm) < mean(iid),
    ];
    let numbers = format!(
        "fine-tune {:.1}, ER-raw {:.1}, raw-AQM {:.1}, AQM {:.1}, iid-online {:.1} % (means over \
         {} seeds); fine-tune < ER-raw: {}; ER-raw − raw-AQM {:+.1} ± {:.1} SE (≈: {}); AQM − \
         ER-raw {:+.1} ± {:.1} SE (clearly positive: {}); AQM > raw-AQM: {}; AQM < iid-online: {}",
        100.0 * mean(ft),
        100.0 * mean(er),
        100.0 * mean(raw),
        100.0 * mean(aqm),
        100.0 * mean(iid),
        aqm.seeds.len(),
        yes(parts[0]),
        100.0 * er_raw.mean,
        100.0 * er_raw.se,
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
    Expectation {
        id,
        classifier: classifier.into(),
        statement,
        held: Some(parts.iter().all(|&p| p)),
        numbers,
        values,
    }
}

/// ER-raw ahead of AQM at B20 when parameters cost 4 bytes.
fn model_cost_check(cells: &Cells<'_>, classifier: &str) -> Expectation {
    let id = "er-beats-aqm-B20-4B";
    let statement = "ER-raw > AQM at B20 with 4-byte parameters (the model eats the budget)";
    let (Some(er), Some(aqm)) = (
        cells.mean(Method::ErRaw, B20, 1),
        cells.mean(Method::Aqm, B20, 4),
    ) else {
        return missing(id, classifier, statement);
    };
    let stored = cells
        .find(Method::Aqm, B20, 4)
        .map_or(0.0, Cell::mean_stored);
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement: statement.into(),
        held: Some(er > aqm),
        numbers: format!(
            "ER-raw {:.1} % vs AQM {:.1} % (AQM stores {stored:.0} samples)",
            100.0 * er,
            100.0 * aqm
        ),
        values: BTreeMap::from([
            ("er_raw".to_string(), er),
            ("aqm".into(), aqm),
            ("aqm_stored".into(), stored),
        ]),
    }
}

/// AQM stores at least 5× as many samples as ER-raw at the end of B50.
fn stored_ratio(cells: &Cells<'_>, classifier: &str) -> Expectation {
    let id = "stored-5x-B50";
    let statement = "AQM stores ≥ 5× as many samples as ER-raw at the end (B50, 1-byte)";
    let (Some(er), Some(aqm)) = (
        cells.find(Method::ErRaw, B50, 1),
        cells.find(Method::Aqm, B50, 1),
    ) else {
        return missing(id, classifier, statement);
    };
    let ratio = aqm.mean_stored() / er.mean_stored().max(1e-9);
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement: statement.into(),
        held: Some(ratio >= 5.0),
        numbers: format!(
            "AQM {:.0} vs ER-raw {:.0} samples: {ratio:.1}×",
            aqm.mean_stored(),
            er.mean_stored()
        ),
        values: BTreeMap::from([
            ("aqm_stored".to_string(), aqm.mean_stored()),
            ("er_stored".into(), er.mean_stored()),
            ("ratio".into(), ratio),
        ]),
    }
}

/// The mean drift MSE of the stored codes at the end stays below `d_th` in every AQM cell.
fn drift(cells: &Cells<'_>, classifier: &str, d_th: f64) -> Expectation {
    let id = "drift-below-dth";
    let statement = format!("mean drift MSE of the stored codes < d_th = {d_th} (every AQM cell)");
    let mut values = BTreeMap::new();
    let mut parts = Vec::new();
    let mut held = true;
    for c in cells.all.iter().filter(|c| c.is_aqm(Arm::Reference)) {
        let finals: Vec<f64> = c.final_drift.iter().flatten().copied().collect();
        let Some(s) = Stats::of(&finals) else {
            continue;
        };
        let peak = c.max_drift.iter().flatten().copied().fold(0.0, f64::max);
        held &= s.mean < d_th;
        let key = format!("{} {}B", c.budget, c.param_bytes);
        parts.push(format!(
            "{key} {:.4} (largest over the stream {peak:.4})",
            s.mean
        ));
        values.insert(key, s.mean);
    }
    if parts.is_empty() {
        return missing(id, classifier, &statement);
    }
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement,
        held: Some(held),
        numbers: parts.join("; "),
        values,
    }
}

/// Task-0 forgetting lower with AQM than with ER-raw, at B50 and at B20 (1-byte).
fn task0(cells: &Cells<'_>, classifier: &str) -> Expectation {
    let id = "task0-forgetting";
    let statement = "forgetting of task 0 lower with AQM than with ER-raw (B50 and B20, 1-byte)";
    let mut values = BTreeMap::new();
    let mut parts = Vec::new();
    let mut held = true;
    for budget in [B50, B20] {
        let f = |m: Method| {
            cells
                .find(m, budget, 1)
                .and_then(|c| c.task0_forgetting_stats)
                .map(|s| s.mean)
        };
        let (Some(aqm), Some(er)) = (f(Method::Aqm), f(Method::ErRaw)) else {
            return missing(id, classifier, statement);
        };
        held &= aqm < er;
        let b = super::budget_name(budget);
        parts.push(format!(
            "{b}: AQM {:.1} vs ER-raw {:.1} points",
            100.0 * aqm,
            100.0 * er
        ));
        values.insert(format!("aqm_{b}"), aqm);
        values.insert(format!("er_raw_{b}"), er);
    }
    Expectation {
        id: id.into(),
        classifier: classifier.into(),
        statement: statement.into(),
        held: Some(held),
        numbers: parts.join("; "),
        values,
    }
}
