//! `lifequant-variants`: the runs docs/methods/lifequant.md § Scaled-down experiment names
//! beside the main one — the Strict 4-bit weight grid, the stress split d = 0.75 and the MNIST
//! sanity run — each with its own task-0 pretraining and the arms M0, M3 and M4, M4 at the λ
//! the `lifequant` experiment chose on validation (read from its `lifequant.json` in the same
//! results folder).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use indicatif::ProgressBar;
use qcl_data::{KnownDataset, SplitDataset};
use serde::Serialize;
use serde_json::json;

use super::arms::{self, Arm, ArmRun, Pretraining, Scores};
use super::report::{h2_holds, h3_holds, paired_by_seed, stat_of};
use super::{plots, Settings, Setup};
use crate::data::dataset_path;
use crate::experiments::mean_std;
use crate::reproduce::{Context, Experiment, Outcome};
use crate::resume::Resume;

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "lifequant-variants",
    description: "LifeQuant beside its main run (docs/methods/lifequant.md § Scaled-down \
                  experiment): the Strict 4-bit weight grid, the stress split d = 0.75 and \
                  the MNIST sanity run; M0, M3 and M4 at the λ chosen on validation by \
                  `lifequant`.",
    needs_data: true,
    takes_seeds: true,
    run,
};

/// One variant of the main run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Variant {
    /// Short name.
    pub name: &'static str,
    /// What changes against the main run.
    pub change: &'static str,
    /// The data set.
    #[serde(skip)]
    pub dataset: KnownDataset,
    /// Diminish rate d.
    pub diminish_rate: f64,
    /// Strict weight grid.
    pub strict_weights: bool,
}

/// The variants, in the order of the table.
pub const VARIANTS: [Variant; 3] = [
    Variant {
        name: "strict",
        change: "Strict 4-bit weight grid (≤ 16 levels in [−1, 1])",
        dataset: KnownDataset::FashionMnist,
        diminish_rate: 0.5,
        strict_weights: true,
    },
    Variant {
        name: "d0.75",
        change: "stress split d = 0.75 (n = 4, s = 3)",
        dataset: KnownDataset::FashionMnist,
        diminish_rate: 0.75,
        strict_weights: false,
    },
    Variant {
        name: "mnist",
        change: "MNIST (sanity run)",
        dataset: KnownDataset::Mnist,
        diminish_rate: 0.5,
        strict_weights: false,
    },
];

/// The arms every variant runs.
const ARMS: [Arm; 3] = [Arm::M0, Arm::M3, Arm::M4];

/// The runs of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct VariantRuns {
    /// The variant.
    pub variant: Variant,
    /// The classes of each task.
    pub tasks: Vec<Vec<u32>>,
    /// Task-0 pretraining per seed.
    pub pretraining: Vec<Pretraining>,
    /// M0, M3 and M4 on every seed.
    pub runs: Vec<ArmRun>,
}

impl VariantRuns {
    fn scores(&self, arm: Arm) -> Vec<&Scores> {
        self.runs
            .iter()
            .filter(|r| r.arm == arm.id())
            .filter_map(|r| r.scores.as_ref())
            .collect()
    }

    fn paired(&self, a: Arm, b: Arm, f: impl Fn(&Scores) -> f64) -> Vec<f64> {
        let of =
            |arm: Arm| -> Vec<&ArmRun> { self.runs.iter().filter(|r| r.arm == arm.id()).collect() };
        let seeds: Vec<u64> = self.pretraining.iter().map(|p| p.seed).collect();
        paired_by_seed(&seeds, &of(a), &of(b), f)
    }
}

/// M4's λ chosen on validation by the `lifequant` experiment whose results are in `out_dir`,
/// with the commit that chose it; a file made in another mode than `mode` is refused.
pub fn chosen_lambda(out_dir: &Path, mode: Option<&str>) -> Result<(f64, String)> {
    let path = out_dir.join("lifequant.json");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (run `cargo xtask reproduce lifequant` with the same mode first: the \
             variants run at the λ it chooses on validation)",
            path.display()
        )
    })?;
    let file: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let lambda = file["figures"]["chosen_lambda"]["M4"]["lambda"]
        .as_f64()
        .with_context(|| format!("{} holds no chosen λ of M4", path.display()))?;
    if let (Some(found), Some(mode)) = (file["mode"].as_str(), mode) {
        if found != mode {
            bail!(
                "{} was made in {found} mode, not {mode}: run `cargo xtask reproduce lifequant` \
                 in the same mode first",
                path.display()
            );
        }
    }
    let commit = file["commit"].as_str().unwrap_or("unknown").to_string();
    Ok((lambda, commit))
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let (lambda, commit) = chosen_lambda(&ctx.out_dir, Some(ctx.mode.name()))?;
    let load = |dataset| {
        SplitDataset::load(dataset_path(&ctx.data_dir, dataset))
            .with_context(|| format!("loading {}", dataset.name()))
    };
    let source = format!("lifequant.json, commit {commit}");
    run_with(
        ctx,
        &load,
        &Settings::for_context(ctx),
        (lambda, &source),
        bar,
    )
}

/// The variants with `base` settings and M4 at `chosen.0` (`chosen.1` says where it came
/// from); `load` reads a data set.
pub fn run_with(
    ctx: &Context,
    load: &dyn Fn(KnownDataset) -> Result<SplitDataset>,
    base: &Settings,
    chosen: (f64, &str),
    bar: &ProgressBar,
) -> Result<Outcome> {
    let started = Instant::now();
    let (lambda, source) = chosen;
    let per_seed = (1 + ARMS.len()) * base.seeds.len();
    let every_variant = Resume::new(ctx, EXPERIMENT.name);
    bar.set_length(bar.length().unwrap_or(0) + (VARIANTS.len() * per_seed) as u64);
    let mut results = Vec::new();
    for variant in VARIANTS {
        let settings = Settings {
            diminish_rate: variant.diminish_rate,
            strict_weights: variant.strict_weights,
            lambdas: vec![lambda],
            ..base.clone()
        };
        let setup = Setup::new(&load(variant.dataset)?, &settings)?;
        let resume = every_variant.scope(&(variant.name, settings.without_seeds()))?;
        let mut done = VariantRuns {
            variant,
            tasks: setup
                .scenario
                .tasks()
                .iter()
                .map(|t| t.classes.clone())
                .collect(),
            pretraining: Vec::new(),
            runs: Vec::new(),
        };
        for &seed in &settings.seeds {
            bar.set_message(format!("lifequant {}: seed {seed}, task 0", variant.name));
            let (pre, checkpoints) = arms::pretrain_or_resume(&resume, &settings, &setup, seed)
                .with_context(|| format!("{}: task-0 pretraining, seed {seed}", variant.name))?;
            done.pretraining.push(pre);
            bar.inc(1);
            let start = arms::ArmStart {
                settings: &settings,
                setup: &setup,
                checkpoints: &checkpoints,
            };
            for arm in ARMS {
                let l = if arm.takes_lambda() { lambda } else { 0.0 };
                bar.set_message(format!(
                    "lifequant {}: seed {seed}, {}",
                    variant.name,
                    arm.id()
                ));
                let run = arms::attempt_or_resume(&resume, start, arm, l, seed)
                    .with_context(|| variant.name)?;
                done.runs.push(run);
                bar.inc(1);
            }
        }
        results.push(done);
    }
    let resumed = every_variant.note();
    outcome(ctx, base, &results, (lambda, source), (started, resumed))
}

fn outcome(
    ctx: &Context,
    base: &Settings,
    results: &[VariantRuns],
    chosen: (f64, &str),
    (started, resumed): (Instant, Option<String>),
) -> Result<Outcome> {
    let pct = |s: &[&Scores], f: fn(&Scores) -> f64| {
        let (m, sd) = stat_of(s, |x| 100.0 * f(x));
        format!("{m:.2} ± {sd:.2}")
    };
    let mut table = String::from(
        "| variant | T0 FP32 → 4-bit % | M0 ACC / FGT % | M3 ACC / FGT % | M4 ACC / FGT % | \
         M0 orphan % | H2 | H3 | M4 − M3 ACC (S5) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut verdicts = Vec::new();
    for r in results {
        let acc_fgt = |arm| {
            let s = r.scores(arm);
            format!("{} / {}", pct(&s, |x| x.acc), pct(&s, |x| x.fgt))
        };
        let mean = |arm, f: fn(&Scores) -> f64| stat_of(&r.scores(arm), |x| 100.0 * f(x)).0;
        let (acc0, fgt0, orphan0) = (
            mean(Arm::M0, |x| x.acc),
            mean(Arm::M0, |x| x.fgt),
            mean(Arm::M0, |x| x.orphan_acc),
        );
        let (acc4, fgt4) = (mean(Arm::M4, |x| x.acc), mean(Arm::M4, |x| x.fgt));
        let h2 = h2_holds(orphan0, fgt0);
        let h3 = h3_holds((acc4, fgt4), (acc0, fgt0));
        let gain = r.paired(Arm::M4, Arm::M3, |x| 100.0 * x.acc);
        let (g, sg) = mean_std(&gain);
        let pre = |f: fn(&Pretraining) -> f64| {
            mean_std(
                &r.pretraining
                    .iter()
                    .map(|p| 100.0 * f(p))
                    .collect::<Vec<_>>(),
            )
            .0
        };
        table.push_str(&format!(
            "| {} | {:.2} → {:.2} | {} | {} | {} | {orphan0:.2} | {} | {} | {g:+.2} ± {sg:.2} |\n",
            r.variant.change,
            pre(|p| p.fp32_acc),
            pre(|p| p.int4_acc),
            acc_fgt(Arm::M0),
            acc_fgt(Arm::M3),
            acc_fgt(Arm::M4),
            if h2 { "holds" } else { "**fails**" },
            if h3 { "holds" } else { "**fails**" },
        ));
        verdicts
            .push(json!({ "variant": r.variant.name, "h2": h2, "h3": h3, "m4_minus_m3_acc": g }));
    }
    let groups: Vec<String> = results.iter().map(|r| r.variant.name.to_string()).collect();
    let series: Vec<(String, Vec<(f64, f64)>)> = ARMS
        .iter()
        .map(|&arm| {
            let values = results
                .iter()
                .map(|r| stat_of(&r.scores(arm), |x| 100.0 * x.acc))
                .collect();
            (format!("{} ACC", arm.id()), values)
        })
        .collect();
    let png = "lifequant-variants.png";
    plots::grouped_bars(
        &ctx.out_dir.join(png),
        "LifeQuant variants: ACC (%)",
        &groups,
        &series,
    )?;
    let (lambda, source) = chosen;
    let markdown = format!(
        "Each variant changes one thing of the main run (`lifequant.md`) and pretrains its own \
         task-0 checkpoints; everything else as there: {per} training images per class with \
         {val_pct}% held out, QResNet-8 at {w:?}, the same schedules, seeds {seeds:?}. M4 runs \
         at λ = {lambda}, the λ the main run chose on validation ({source}). H2: M0's orphan \
         accuracy < 10 % and FGT ≥ 20; H3: FGT(M4) ≤ FGT(M0) − 10 and ACC(M4) ≥ ACC(M0) + 10; \
         S5: M4 − M3 paired by seed, mean ± std.\n\n{table}{resumed}",
        per = base.train_per_class,
        val_pct = 100.0 * base.validation_fraction,
        w = base.widths,
        seeds = base.seeds,
        resumed = resumed
            .as_ref()
            .map(|note| format!("\n{note}\n"))
            .unwrap_or_default(),
    );
    Ok(Outcome {
        summary: format!("{} variants at λ = {lambda}", results.len()),
        figures: json!({
            "settings": base,
            "lambda": lambda,
            "lambda_source": source,
            "variants": results,
            "verdicts": verdicts,
            "resumed": resumed,
            "seconds": started.elapsed().as_secs_f64(),
        }),
        markdown,
        plots: vec![(
            png.into(),
            "ACC of M0, M3 and M4 per variant (test, mean ± std over seeds)".into(),
        )],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_run_on_the_fixtures_at_the_chosen_lambda() {
        let (out, ctx, _) = crate::reproduce::fixture_run();
        // No main run yet: a typed error that says what to run.
        let err = chosen_lambda(out.path(), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("reproduce lifequant"),
            "{err:#}"
        );
        let file = json!({
            "commit": "abc",
            "mode": "quick",
            "figures": { "chosen_lambda": { "M4": { "lambda": 30.0 } } }
        });
        std::fs::write(out.path().join("lifequant.json"), file.to_string()).unwrap();
        assert_eq!(
            chosen_lambda(out.path(), Some("quick")).unwrap(),
            (30.0, "abc".to_string())
        );
        // A quick run's λ does not drive a full run.
        let err = chosen_lambda(out.path(), Some("full")).unwrap_err();
        assert!(err.to_string().contains("quick mode"), "{err}");

        let settings = Settings::fixture();
        let load = |dataset| Ok(SplitDataset::load(dataset_path(&ctx.data_dir, dataset))?);
        let outcome = run_with(
            &ctx,
            &load,
            &settings,
            (30.0, "test"),
            &ProgressBar::hidden(),
        )
        .unwrap();
        let variants = outcome.figures["variants"].as_array().unwrap();
        assert_eq!(variants.len(), 3);
        for v in variants {
            let runs = v["runs"].as_array().unwrap();
            assert_eq!(runs.len(), 2 * 3);
            for r in runs {
                let expected = if r["arm"] == "M4" { 30.0 } else { 0.0 };
                assert_eq!(r["lambda"].as_f64().unwrap(), expected);
            }
        }
        // The stress split: windows of n = 4 classes shifted by s = 3; the others: n = 5,
        // s = 2, the last task taking the 6 classes left.
        let sizes = |v: usize| -> Vec<usize> {
            let tasks = variants[v]["tasks"].as_array().unwrap();
            tasks.iter().map(|t| t.as_array().unwrap().len()).collect()
        };
        assert_eq!(sizes(0), vec![5, 5, 6]);
        assert_eq!(sizes(1), vec![4, 4, 4]);
        assert_eq!(sizes(2), vec![5, 5, 6]);
        assert!(outcome.markdown.contains("λ = 30"), "{}", outcome.markdown);
        assert!(outcome.markdown.contains("MNIST (sanity run)"));
        let png = std::fs::read(out.path().join("lifequant-variants.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
