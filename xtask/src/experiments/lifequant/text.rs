//! The Markdown sections of the `lifequant` results.

use qcl_continual::TrainerConfig;

use super::arms::{Arm, ArmRun, Scores};
use super::report::{h3_holds, stat_of, Ordering, View};
use super::{Runs, Settings, Setup};
use crate::experiments::mean_std;

/// The paragraph that says what ran.
pub fn setup(settings: &Settings, setup: &Setup, view: &View<'_>) -> String {
    let scenario = &setup.scenario;
    let tasks: Vec<String> = scenario
        .tasks()
        .iter()
        .map(|t| {
            format!(
                "T{}: {:?} ({} train, {} validation images)",
                t.id,
                t.classes,
                t.train.len(),
                t.validation.as_ref().map_or(0, |v| v.len())
            )
        })
        .collect();
    let schedule =
        |s: &super::TaskScheduleJson| format!("({}, {}, {:?})", s.epochs, s.lr, s.milestones);
    format!(
        "Setup (docs/methods/lifequant.md § Scaled-down experiment): Fashion-MNIST, {per} \
         training images per class (seed 123), of which a seeded {val_pct}% per class is held \
         out as validation images (never trained on, by any task); {test} test images per \
         class; normalised with the training mean/std. Sliding class window T = 3, d = {d}, \
         class permutation {order:?}: {tasks}. Orphan classes (absent from the last task): \
         {orphans:?}. Model QResNet-8 (widths {w:?}, quantized stem and 1×1 skips, FP32 head), \
         {grid} weight grid. Task 0: FP32 {fp} → 8-bit {i8} → 4-bit {i4} (the \
         2-bit arm re-trains the 4-bit stage at 2 bits from the 8-bit weights); tasks 1–2: \
         {later} (epochs, lr, milestones), SGD momentum {mu}, weight decay 1e-4, batch {batch}, \
         a fresh optimizer per task. Replay: δ = {delta} of each finished task (seed 123). \
         ProxQ: F = batch-mean squared gradients of the BaLL loss over the replay memory \
         (evaluation mode); λ of M1 and of M4 chosen among {lambdas:?} by the mean over seeds \
         of the final average validation accuracy: M1 λ = {l1}, M4 λ = {l4} (the arms M4-prox \
         and M4-codeBaLL run at M4's). BaLL: the paper's linear prior `z + softmax(z)·(K·p − \
         1)` unless the arm says otherwise. Seeds {seeds:?}. ACC = mean_s a[2][s]; FGT = \
         mean_{{s<2}} (max_{{t∈[s,1]}} a[t][s] − a[2][s]) (not clamped).",
        per = settings.train_per_class,
        val_pct = 100.0 * settings.validation_fraction,
        test = settings
            .test_per_class
            .map_or("all".to_string(), |k| k.to_string()),
        d = settings.diminish_rate,
        order = scenario.class_order(),
        tasks = tasks.join("; "),
        orphans = scenario.orphan_classes(),
        w = settings.widths,
        grid = if settings.strict_weights {
            "Strict (≤ 2^k levels in [−1, 1])"
        } else {
            "Faithful (σ0 = 0.5)"
        },
        fp = schedule(&settings.fp32),
        i8 = schedule(&settings.int8),
        i4 = schedule(&settings.low_bit_t0),
        later = schedule(&settings.later_tasks),
        mu = TrainerConfig::default().momentum,
        batch = settings.batch,
        delta = settings.replay_fraction,
        lambdas = settings.lambdas,
        l1 = view.lambda_of(Arm::M1),
        l4 = view.lambda_of(Arm::M4),
        seeds = settings.seeds,
    )
}

/// Task-0 accuracy per stage and seed.
pub fn pretraining(runs: &Runs) -> String {
    let mut table = String::from(
        "| seed | FP32 | 8-bit | 4-bit | 2-bit | seconds |\n|---|---|---|---|---|---|\n",
    );
    for p in &runs.pretraining {
        table.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |\n",
            p.seed,
            100.0 * p.fp32_acc,
            100.0 * p.int8_acc,
            100.0 * p.int4_acc,
            100.0 * p.int2_acc,
            p.seconds
        ));
    }
    table
}

/// `mean ± std` of a percentage.
fn pct(scores: &[&Scores], f: impl Fn(&Scores) -> f64) -> String {
    let (m, s) = stat_of(scores, |x| 100.0 * f(x));
    format!("{m:.2} ± {s:.2}")
}

/// λ / λ_crit for one task: the explicit step is unstable on the stiffest coordinate at the
/// task's first learning rate where this exceeds 1 (η·2λ·F_max > 2(1 + μ)).
fn stiffness(settings: &Settings, lambda: f64, fisher_max: f64) -> f64 {
    let momentum = TrainerConfig::default().momentum;
    settings.later_tasks.lr * lambda * fisher_max / (1.0 + momentum)
}

/// The largest λ·η·F_max / (1 + μ) of a set of runs, over tasks and seeds.
fn worst_stiffness(settings: &Settings, runs: &[&ArmRun]) -> Option<f64> {
    runs.iter()
        .filter_map(|r| r.scores.as_ref().map(|s| (r.lambda, s)))
        .flat_map(|(l, s)| s.fisher_max.iter().map(move |&f| stiffness(settings, l, f)))
        .reduce(f64::max)
}

fn diverged_note(runs: &[&ArmRun]) -> String {
    let diverged: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            r.diverged
                .as_ref()
                .map(|at| format!("seed {} at {at}", r.seed))
        })
        .collect();
    if diverged.is_empty() {
        String::new()
    } else {
        format!(" (diverged: {})", diverged.join("; "))
    }
}

/// The λ sweeps of M1 and M4: validation and test figures per λ.
pub fn sweep(view: &View<'_>) -> String {
    let settings = view.settings;
    let mut table = String::from(
        "Every λ on every seed. Validation ACC chooses λ; the test columns are reported, not \
         used. `stiffness` is the largest λ·η·F_max/(1 + μ) over tasks and seeds (F_max: the \
         largest Fisher entry when the task begins, η the task's first rate): above 1 the \
         explicit penalty step is unstable on that coordinate. H3 compares with M0 as H3 \
         does.\n\n\
         | arm | λ | seeds finished | validation ACC % | test ACC % | test FGT % | orphan acc % | \
         drift after T1 | stiffness | H3 with this λ |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for arm in Arm::SWEPT {
        let choice = &view.runs.chosen[arm.id()];
        for c in &choice.candidates {
            let runs = view.runs_at(arm, c.lambda);
            let scores: Vec<&Scores> = runs.iter().filter_map(|r| r.scores.as_ref()).collect();
            let mut marks = Vec::new();
            if c.lambda == choice.lambda {
                marks.push("**chosen**");
            }
            if c.lambda == settings.reference_lambda {
                marks.push("reference");
            }
            let lambda = if marks.is_empty() {
                format!("{}", c.lambda)
            } else {
                format!("{} ({})", c.lambda, marks.join(", "))
            };
            let h3 = if arm != Arm::M4 || scores.len() < runs.len() {
                "—".to_string()
            } else {
                let (a, f) = (
                    stat_of(&scores, |s| 100.0 * s.acc).0,
                    stat_of(&scores, |s| 100.0 * s.fgt).0,
                );
                let m0 = (
                    view.stat(Arm::M0, |s| 100.0 * s.acc).0,
                    view.stat(Arm::M0, |s| 100.0 * s.fgt).0,
                );
                let held = h3_holds((a, f), m0);
                (if held { "holds" } else { "fails" }).to_string()
            };
            let drift = stat_of(&scores, |s| s.drift.first().copied().unwrap_or(f64::NAN)).0;
            table.push_str(&format!(
                "| {} | {lambda} | {} of {}{} | {} | {} | {} | {} | {drift:.3e} | {} | {h3} |\n",
                arm.id(),
                scores.len(),
                runs.len(),
                diverged_note(&runs),
                pct(&scores, |s| s.validation_acc),
                pct(&scores, |s| s.acc),
                pct(&scores, |s| s.fgt),
                pct(&scores, |s| s.orphan_acc),
                worst_stiffness(settings, &runs).map_or("—".into(), |w| format!("{w:.2}")),
            ));
        }
    }
    table
}

/// Every arm at the λ it is judged at.
pub fn arms(view: &View<'_>) -> String {
    let mut table = String::from(
        "| arm | setting | λ | seeds finished | ACC % | FGT % | orphan-class acc % | \
         validation ACC % | drift after T1 | seconds/seed |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for arm in Arm::ALL {
        let lambda = view.lambda_of(arm);
        let runs = view.runs_at(arm, lambda);
        let scores = view.scores(arm);
        let drift: Vec<f64> = scores
            .iter()
            .filter_map(|r| r.drift.first().copied())
            .collect();
        let drift = if drift.is_empty() {
            "—".to_string()
        } else {
            format!("{:.3e}", mean_std(&drift).0)
        };
        table.push_str(&format!(
            "| {} | {} | {lambda} | {} of {}{} | {} | {} | {} | {} | {drift} | {:.0} |\n",
            arm.id(),
            arm.description(),
            scores.len(),
            runs.len(),
            diverged_note(&runs),
            pct(&scores, |s| s.acc),
            pct(&scores, |s| s.fgt),
            pct(&scores, |s| s.orphan_acc),
            pct(&scores, |s| s.validation_acc),
            stat_of(&scores, |s| s.seconds).0,
        ));
    }
    table
}

/// M4 against M3 (LifeQuant against replay + BaLL alone), paired by seed.
pub fn proxq_effect(view: &View<'_>) -> String {
    let acc = view.paired(Arm::M4, Arm::M3, |s| 100.0 * s.acc);
    let fgt = view.paired(Arm::M4, Arm::M3, |s| 100.0 * s.fgt);
    let (da, sa) = mean_std(&acc);
    let (df, sf) = mean_std(&fgt);
    let n = acc.len();
    let se = sa / (n as f64).sqrt();
    let measurable = n >= 2 && da.abs() > 2.0 * se;
    let lambda = view.lambda_of(Arm::M4);
    let sentence = if measurable && da > 0.0 {
        format!("At the chosen λ = {lambda}, ProxQ adds a measurable {da:.2} points of ACC to replay + BaLL (more than twice the standard error of the paired difference, {se:.2}).")
    } else if measurable {
        format!("At the chosen λ = {lambda}, ProxQ costs a measurable {:.2} points of ACC against replay + BaLL alone (standard error {se:.2}).", -da)
    } else {
        format!("At the chosen λ = {lambda}, ProxQ adds nothing measurable to replay + BaLL: the paired ACC difference, {da:+.2} points, is within twice its standard error ({se:.2}) over {n} seeds.")
    };
    format!(
        "Paired by seed (same task-0 checkpoint, same batch order), M4 − M3: ACC {da:+.2} ± \
         {sa:.2} (per seed: {}), FGT {df:+.2} ± {sf:.2} (per seed: {}). {sentence}",
        acc.iter()
            .map(|d| format!("{d:+.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        fgt.iter()
            .map(|d| format!("{d:+.2}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// Where the explicit penalty gradient becomes unstable, with the measured F_max.
pub fn stability(view: &View<'_>) -> String {
    let settings = view.settings;
    let momentum = TrainerConfig::default().momentum;
    let eta = settings.later_tasks.lr;
    let mut lines = Vec::new();
    for arm in Arm::SWEPT {
        let finished: Vec<&Scores> = settings
            .lambdas
            .iter()
            .flat_map(|&l| view.runs_at(arm, l))
            .filter_map(|r| r.scores.as_ref())
            .collect();
        for task in 1..=2 {
            let values: Vec<f64> = finished
                .iter()
                .filter_map(|s| s.fisher_max.get(task - 1).copied())
                .collect();
            let Some(high) = values.iter().copied().reduce(f64::max) else {
                continue;
            };
            let low = values.iter().copied().fold(f64::INFINITY, f64::min);
            lines.push(format!(
                "- {} T{task}: F_max {low:.3e} to {high:.3e} over its finished runs, so the \
                 explicit step is unstable for λ > (1 + μ)/(η·F_max) = {:.1} (at the largest \
                 F_max) to {:.1}",
                arm.id(),
                (1.0 + momentum) / (eta * high),
                (1.0 + momentum) / (eta * low),
            ));
        }
    }
    let diverged: Vec<String> = view
        .runs
        .runs
        .iter()
        .filter_map(|r| {
            r.diverged
                .as_ref()
                .map(|at| format!("{} λ = {} seed {} ({at})", r.arm, r.lambda, r.seed))
        })
        .collect();
    format!(
        "The explicit form adds the penalty's gradient to the loss; with SGD rate η and \
         momentum μ it diverges on any coordinate where η·2λF > 2(1 + μ), i.e. λ > (1 + μ)/(η·F). \
         With η = {eta} (each task's first rate) and μ = {momentum}:\n\n{}\n\n\
         Runs whose loss became non-finite: {}. M4-prox applies the same penalty by its \
         proximal step after each SGD step and is stable at any λ; it runs at M4's chosen λ \
         (table above).",
        lines.join("\n"),
        if diverged.is_empty() {
            "none".to_string()
        } else {
            diverged.join("; ")
        }
    )
}

/// The paper's BaLL against the released code's, with and without the penalty.
pub fn ball_forms(view: &View<'_>) -> String {
    let row = |arm: Arm| {
        let s = view.scores(arm);
        format!(
            "ACC {}, FGT {}, orphan {}",
            pct(&s, |x| x.acc),
            pct(&s, |x| x.fgt),
            pct(&s, |x| x.orphan_acc)
        )
    };
    format!(
        "The paper's linear prior `z + σ(z)·(K·p − 1)` boosts frequent classes during training; \
         the released code's `z + σ(z)/(K·p + 1)` boosts rare ones (docs/methods/lifequant.md \
         § Paper versus code).\n\n\
         - M3 (paper's BaLL): {}\n- M3-codeBaLL: {}\n- M4 (paper's BaLL, λ = {l}): {}\n\
         - M4-codeBaLL (λ = {l}): {}",
        row(Arm::M3),
        row(Arm::M3CodeBall),
        row(Arm::M4),
        row(Arm::M4CodeBall),
        l = view.lambda_of(Arm::M4),
    )
}

/// The orderings as a table.
pub fn orderings(orderings: &[Ordering]) -> String {
    let mut table =
        String::from("| id | kind | statement | measured | held |\n|---|---|---|---|---|\n");
    for o in orderings {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            o.id,
            if o.hard { "hard" } else { "soft" },
            o.statement,
            o.measured,
            if o.held { "yes" } else { "**no**" }
        ));
    }
    table
}
