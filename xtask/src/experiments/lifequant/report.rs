//! The choice of λ on validation, the expected orderings and the outcome of the `lifequant`
//! experiment (its sections come from [`text`](super::text), its plots from
//! [`plots`](super::plots)).

use anyhow::{bail, Result};
use qcl_continual::{AccuracyMatrix, TrainerConfig};
use serde::Serialize;
use serde_json::json;

use super::arms::{Arm, ArmRun, Scores};
use super::{plots, text, Runs, Settings, Setup};
use crate::experiments::mean_std;
use crate::reproduce::{Context, Outcome};

/// One λ of a sweep, as the choice saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// λ.
    pub lambda: f64,
    /// Seeds whose run finished.
    pub finished: usize,
    /// Mean final validation ACC over the seeds, when every seed finished.
    pub validation_acc: Option<f64>,
}

/// The λ an arm runs at, chosen on validation.
#[derive(Debug, Clone, Serialize)]
pub struct LambdaChoice {
    /// The arm.
    pub arm: String,
    /// The chosen λ: the best mean final validation ACC among the λ every seed finished
    /// (the smallest λ on a tie).
    pub lambda: f64,
    /// Its mean final validation ACC.
    pub validation_acc: f64,
    /// Every λ of the sweep.
    pub candidates: Vec<Candidate>,
}

/// Chooses `arm`'s λ among `settings.lambdas` by mean final validation accuracy over seeds;
/// test accuracy plays no part.
pub fn choose_lambda(runs: &[ArmRun], arm: Arm, settings: &Settings) -> Result<LambdaChoice> {
    let candidates: Vec<Candidate> = settings
        .lambdas
        .iter()
        .map(|&lambda| {
            let at: Vec<&ArmRun> = runs
                .iter()
                .filter(|r| r.arm == arm.id() && r.lambda == lambda)
                .collect();
            let finished: Vec<f64> = at
                .iter()
                .filter_map(|r| r.scores.as_ref().map(|s| s.validation_acc))
                .collect();
            Candidate {
                lambda,
                finished: finished.len(),
                validation_acc: (finished.len() == at.len() && !at.is_empty())
                    .then(|| mean_std(&finished).0),
            }
        })
        .collect();
    // The best validation ACC; the smaller λ on a tie, whatever the sweep's order; a NaN mean
    // is never chosen.
    let best = candidates
        .iter()
        .filter(|c| c.validation_acc.is_some_and(f64::is_finite))
        .max_by(|a, b| {
            let (va, vb) = (
                a.validation_acc.unwrap_or(0.0),
                b.validation_acc.unwrap_or(0.0),
            );
            va.total_cmp(&vb).then(b.lambda.total_cmp(&a.lambda))
        });
    let Some(best) = best else {
        bail!(
            "{}: no λ of {:?} finished on every seed",
            arm.id(),
            settings.lambdas
        );
    };
    Ok(LambdaChoice {
        arm: arm.id().into(),
        lambda: best.lambda,
        validation_acc: best.validation_acc.unwrap_or(f64::NAN),
        candidates,
    })
}

/// One ordering of docs/methods/lifequant.md § Expected orderings and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct Ordering {
    /// H1..H5, S1..S5.
    pub id: String,
    /// Hard (the reproduction's pass criteria) or soft (reported).
    pub hard: bool,
    /// The statement.
    pub statement: String,
    /// The measured values.
    pub measured: String,
    /// Whether it held.
    pub held: bool,
}

/// The runs seen through the chosen λ: each arm at the λ it is judged at.
pub struct View<'a> {
    /// The settings.
    pub settings: &'a Settings,
    /// Every run.
    pub runs: &'a Runs,
}

impl View<'_> {
    /// The λ `arm` is judged at: M1's chosen λ for M1, M4's for the arms that take one, 0
    /// otherwise.
    pub fn lambda_of(&self, arm: Arm) -> f64 {
        match arm {
            Arm::M1 => self.runs.chosen[Arm::M1.id()].lambda,
            a if a.takes_lambda() => self.runs.chosen[Arm::M4.id()].lambda,
            _ => 0.0,
        }
    }

    /// The runs of `arm` at `lambda`, finished or not.
    pub fn runs_at(&self, arm: Arm, lambda: f64) -> Vec<&ArmRun> {
        self.runs
            .runs
            .iter()
            .filter(|r| r.arm == arm.id() && r.lambda == lambda)
            .collect()
    }

    /// The finished runs of `arm` at its λ.
    pub fn scores(&self, arm: Arm) -> Vec<&Scores> {
        self.runs_at(arm, self.lambda_of(arm))
            .into_iter()
            .filter_map(|r| r.scores.as_ref())
            .collect()
    }

    /// Mean and std over seeds of `f` for `arm` at its λ.
    pub fn stat(&self, arm: Arm, f: impl Fn(&Scores) -> f64) -> (f64, f64) {
        stat_of(&self.scores(arm), f)
    }

    fn acc(&self, arm: Arm) -> f64 {
        self.stat(arm, |s| 100.0 * s.acc).0
    }

    fn fgt(&self, arm: Arm) -> f64 {
        self.stat(arm, |s| 100.0 * s.fgt).0
    }

    fn orphan(&self, arm: Arm) -> f64 {
        self.stat(arm, |s| 100.0 * s.orphan_acc).0
    }

    /// Per seed, `f(a) − f(b)` where both arms finished, each at its λ.
    pub fn paired(&self, a: Arm, b: Arm, f: impl Fn(&Scores) -> f64) -> Vec<f64> {
        let (ra, rb) = (
            self.runs_at(a, self.lambda_of(a)),
            self.runs_at(b, self.lambda_of(b)),
        );
        paired_by_seed(&self.settings.seeds, &ra, &rb, f)
    }
}

/// Per seed of `seeds`, `f(a) − f(b)` for the runs of that seed in `a` and `b`, where both
/// finished.
pub fn paired_by_seed(
    seeds: &[u64],
    a: &[&ArmRun],
    b: &[&ArmRun],
    f: impl Fn(&Scores) -> f64,
) -> Vec<f64> {
    fn at<'r>(runs: &[&'r ArmRun], seed: u64) -> Option<&'r Scores> {
        runs.iter()
            .find(|r| r.seed == seed)
            .and_then(|r| r.scores.as_ref())
    }
    seeds
        .iter()
        .filter_map(|&seed| Some(f(at(a, seed)?) - f(at(b, seed)?)))
        .collect()
}

/// H2 on fine-tuning's means: orphan-class accuracy < 10 % and FGT ≥ 20 (percent).
pub fn h2_holds(orphan0: f64, fgt0: f64) -> bool {
    orphan0 < 10.0 && fgt0 >= 20.0
}

/// H3 for an M4-like arm's means against M0's: FGT at least 10 lower, ACC 10 higher.
pub fn h3_holds((acc4, fgt4): (f64, f64), (acc0, fgt0): (f64, f64)) -> bool {
    fgt4 <= fgt0 - 10.0 && acc4 >= acc0 + 10.0
}

/// Mean and std of `f` over `scores` (NaN for none).
pub fn stat_of(scores: &[&Scores], f: impl Fn(&Scores) -> f64) -> (f64, f64) {
    if scores.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    mean_std(&scores.iter().map(|s| f(s)).collect::<Vec<_>>())
}

/// The expected orderings at the chosen λ, on the means over seeds (H5 on every seed).
fn orderings(view: &View<'_>) -> Vec<Ordering> {
    let pre = &view.runs.pretraining;
    let fp32 = mean_std(&pre.iter().map(|p| 100.0 * p.fp32_acc).collect::<Vec<_>>()).0;
    let int4 = mean_std(&pre.iter().map(|p| 100.0 * p.int4_acc).collect::<Vec<_>>()).0;
    let drift_t1 = |s: &Scores| s.drift.first().copied().unwrap_or(f64::NAN);
    let drift_gaps = view.paired(Arm::M4, Arm::M3, drift_t1);
    let (acc, fgt, orphan) = (|a| view.acc(a), |a| view.fgt(a), |a| view.orphan(a));
    let proxq = view.paired(Arm::M4, Arm::M3, |s| 100.0 * s.acc);
    let (gain, spread) = mean_std(&proxq);
    let o = |id: &str, hard: bool, statement: &str, measured: String, held: bool| Ordering {
        id: id.into(),
        hard,
        statement: statement.into(),
        measured,
        held,
    };
    let (m0, m1, m2, m3, m4) = (Arm::M0, Arm::M1, Arm::M2, Arm::M3, Arm::M4);
    vec![
        o(
            "H1",
            true,
            "4-bit T0 accuracy ≥ FP32 T0 accuracy − 3",
            format!("{int4:.2} vs {fp32:.2}"),
            int4 >= fp32 - 3.0,
        ),
        o(
            "H2",
            true,
            "M0: orphan-class accuracy after T2 < 10 % and FGT ≥ 20",
            format!("orphan {:.2} %, FGT {:.2}", orphan(m0), fgt(m0)),
            h2_holds(orphan(m0), fgt(m0)),
        ),
        o(
            "H3",
            true,
            "FGT(M4) ≤ FGT(M0) − 10 and ACC(M4) ≥ ACC(M0) + 10",
            format!(
                "FGT {:.2} vs {:.2}; ACC {:.2} vs {:.2}",
                fgt(m4),
                fgt(m0),
                acc(m4),
                acc(m0)
            ),
            h3_holds((acc(m4), fgt(m4)), (acc(m0), fgt(m0))),
        ),
        o(
            "H4",
            true,
            "ACC(M2) > ACC(M0)",
            format!("{:.2} vs {:.2}", acc(m2), acc(m0)),
            acc(m2) > acc(m0),
        ),
        o(
            "H5",
            true,
            "Fisher-weighted drift at the end of T1 smaller with λ > 0 (M4) than λ = 0 (M3), \
             every seed",
            format!(
                "M4 − M3 per seed: {}",
                join(&drift_gaps, |d| format!("{d:.3e}"))
            ),
            drift_gaps.len() == view.settings.seeds.len() && drift_gaps.iter().all(|d| *d < 0.0),
        ),
        o(
            "S1",
            false,
            "ACC(M4) ≥ ACC(M2) and FGT(M4) ≤ FGT(M2)",
            format!(
                "ACC {:.2} vs {:.2}; FGT {:.2} vs {:.2}",
                acc(m4),
                acc(m2),
                fgt(m4),
                fgt(m2)
            ),
            acc(m4) >= acc(m2) && fgt(m4) <= fgt(m2),
        ),
        o(
            "S2",
            false,
            "FGT(M1) ≤ FGT(M0)",
            format!("{:.2} vs {:.2}", fgt(m1), fgt(m0)),
            fgt(m1) <= fgt(m0),
        ),
        o(
            "S3",
            false,
            "FGT(M0-2bit) ≥ FGT(M0)",
            format!("{:.2} vs {:.2}", fgt(Arm::M0TwoBit), fgt(m0)),
            fgt(Arm::M0TwoBit) >= fgt(m0),
        ),
        o(
            "S4",
            false,
            "old-class (orphan) recall under M3 ≥ under M2",
            format!("{:.2} vs {:.2}", orphan(m3), orphan(m2)),
            orphan(m3) >= orphan(m2),
        ),
        o(
            "S5",
            false,
            "ProxQ adds accuracy: ACC(M4) ≥ ACC(M3)",
            format!(
                "ACC(M4) − ACC(M3) = {gain:+.2} ± {spread:.2} over {} seeds",
                proxq.len()
            ),
            gain >= 0.0,
        ),
    ]
}

fn join(values: &[f64], f: impl Fn(f64) -> String) -> String {
    values.iter().map(|&v| f(v)).collect::<Vec<_>>().join("; ")
}

/// The experiment's results: figures, Markdown and plots.
pub fn outcome(
    ctx: &Context,
    settings: &Settings,
    setup: &Setup,
    runs: &Runs,
    seconds: f64,
) -> Result<Outcome> {
    let view = View { settings, runs };
    let orderings = orderings(&view);
    let plots = plots::all(ctx, &view, setup)?;
    let hard_failed: Vec<&str> = orderings
        .iter()
        .filter(|o| o.hard && !o.held)
        .map(|o| o.id.as_str())
        .collect();
    let soft_held = orderings.iter().filter(|o| !o.hard && o.held).count();
    let soft = orderings.iter().filter(|o| !o.hard).count();
    let verdict = if hard_failed.is_empty() {
        format!("All hard orderings H1–H5 held; {soft_held} of {soft} soft orderings held.")
    } else {
        format!(
            "Hard orderings that did **not** hold: {}; {soft_held} of {soft} soft orderings held.",
            hard_failed.join(", ")
        )
    };
    let markdown = [
        verdict,
        text::setup(settings, setup, &view),
        runs.resumed.clone().unwrap_or_default(),
        format!(
            "## Task 0 (test accuracy %, per stage)\n\n{}",
            text::pretraining(runs)
        ),
        format!("## λ chosen on validation\n\n{}", text::sweep(&view)),
        format!(
            "## Arms (test, mean ± std over seeds)\n\n{}",
            text::arms(&view)
        ),
        format!("## What ProxQ adds\n\n{}", text::proxq_effect(&view)),
        format!(
            "## Explicit and proximal penalty steps\n\n{}",
            text::stability(&view)
        ),
        format!(
            "## BaLL: the paper's form and the code's\n\n{}",
            text::ball_forms(&view)
        ),
        format!("## Expected orderings\n\n{}", text::orderings(&orderings)),
    ]
    .into_iter()
    .filter(|part| !part.is_empty())
    .collect::<Vec<_>>()
    .join("\n\n");
    let (acc, fgt) = (|a| view.acc(a), |a| view.fgt(a));
    let summary = format!(
        "λ(M4) = {} on validation; ACC/FGT %: M0 {:.1}/{:.1}, M2 {:.1}/{:.1}, M3 {:.1}/{:.1}, \
         M4 (LifeQuant) {:.1}/{:.1}, M5 FP32 {:.1}/{:.1}; {}",
        view.lambda_of(Arm::M4),
        acc(Arm::M0),
        fgt(Arm::M0),
        acc(Arm::M2),
        fgt(Arm::M2),
        acc(Arm::M3),
        fgt(Arm::M3),
        acc(Arm::M4),
        fgt(Arm::M4),
        acc(Arm::M5),
        fgt(Arm::M5),
        if hard_failed.is_empty() {
            "H1–H5 held".to_string()
        } else {
            format!("failed: {}", hard_failed.join(", "))
        }
    );
    Ok(Outcome {
        summary,
        figures: json!({
            "settings": settings,
            "class_order": setup.scenario.class_order(),
            "orphan_classes": setup.scenario.orphan_classes(),
            "scenario": setup.scenario.description(),
            "pretraining": runs.pretraining,
            "runs": runs.runs,
            "chosen_lambda": runs.chosen,
            "resumed": runs.resumed,
            "momentum": TrainerConfig::default().momentum,
            "orderings": orderings,
            "hard_orderings_held": hard_failed.is_empty(),
            "seconds": seconds,
        }),
        markdown,
        plots,
    })
}

/// The mean accuracy matrix of `arm` at its λ over the seeds that finished.
pub fn mean_matrix(view: &View<'_>, arm: Arm, tasks: usize) -> Result<AccuracyMatrix> {
    let rows = view.scores(arm);
    let mut mean = AccuracyMatrix::new(tasks)?;
    for i in 0..tasks {
        for j in 0..=i {
            let values: Vec<f64> = rows.iter().filter_map(|r| r.matrix[i][j]).collect();
            if !values.is_empty() {
                mean.set(i, j, mean_std(&values).0)?;
            }
        }
    }
    Ok(mean)
}
