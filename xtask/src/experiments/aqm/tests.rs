use std::path::Path;

use indicatif::ProgressBar;
use qcl_aqm::online::{Classifier, Method};

use super::cells::{
    correlation, critical_correlation, paired_difference, task_forgetting, Cell, Stats,
};
use super::expectations::judge;
use super::*;

/// Every expectation the experiment judges, by id.
const EXPECTATION_IDS: [&str; 6] = [
    "ordering-B50",
    "ordering-B20",
    "er-beats-aqm-B20-4B",
    "stored-5x-B50",
    "drift-below-dth",
    "task0-forgetting",
];

/// The experiment scaled down to seconds: one seed, 40 images per task, tiny ResNet; a lax
/// threshold and fast statistics so that the module freezes in the first task, and the
/// extension arms at B20 with 4-byte parameters, where the memory fills up.
fn fixture_settings() -> Settings {
    Settings {
        seeds: vec![0],
        samples_per_task: Some(40),
        test_per_class: Some(5),
        stat_rate: 0.4,
        d_th: 1.0,
        aqm_budgets: vec![(B50, 1), (B20, 1), (B20, 4)],
        decoded_budgets: vec![(B50, 1)],
        extension_budgets: vec![(B20, 4)],
        resnet: Some(ResNetSettings {
            nf: 4,
            samples_per_task: Some(20),
            max_seeds: Some(1),
            aqm_budgets: vec![(B50, 1)],
        }),
        bench_steps: 1,
    }
}

#[test]
fn runs_on_the_fixture_and_writes_its_results() {
    let (out, ctx, data) = crate::reproduce::fixture_run();
    let settings = fixture_settings();
    let outcome = run_with(OnData::new(&ctx, &data, &ProgressBar::hidden()), &settings).unwrap();
    let cells = outcome.figures["cells"].as_array().unwrap();
    // Small CNN: 6 baselines, 3 AQM, 1 decoded, 3 extension arms; ResNet: 6 baselines, 1 AQM.
    assert_eq!(cells.len(), 6 + 3 + 1 + 3 + 6 + 1);
    for row in [
        "| AQM | small CNN | B50 | 1 |",
        "| AQM, decoded input (ours) | small CNN | B50 | 1 |",
        "| AQM + reservoir | small CNN | B20 | 4 |",
        "| AQM + re-encoding | small CNN | B20 | 4 |",
        "| AQM + reservoir + re-encoding | small CNN | B20 | 4 |",
        "| AQM | reduced ResNet-18 (nf 4) | B50 | 1 |",
        "| ER-raw | reduced ResNet-18 (nf 4) | B20 | – |",
        "## Expected outcomes",
        "## Why the reference AQM loses",
        "**Finding.**",
        "## Accuracy per task",
        "SE ",
    ] {
        assert!(
            outcome.markdown.contains(row),
            "{row}: {}",
            outcome.markdown
        );
    }
    // No throughput figure typed into the text: PyTorch's is read from the committed file.
    assert!(!outcome.markdown.contains("2,622") && !outcome.markdown.contains("2,501"));
    if outcome.markdown.contains("PyTorch") {
        assert!(outcome.markdown.contains("docs/results/training.json"));
    }
    // Every expectation, for both classifiers, with its numbers.
    let expectations = outcome.figures["expectations"].as_array().unwrap();
    assert_eq!(expectations.len(), 2 * 6);
    let ids: Vec<&str> = expectations
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    for id in EXPECTATION_IDS {
        assert!(ids.contains(&id), "{id}");
    }
    // The ResNet runs have no 4-byte AQM cell: that expectation is "not run" for them.
    let resnet_cost = expectations
        .iter()
        .find(|e| e["id"] == "er-beats-aqm-B20-4B" && e["classifier"] != "small CNN")
        .unwrap();
    assert!(resnet_cost["held"].is_null());
    assert_eq!(resnet_cost["reason"], "not run");
    // One seed: every expectation that ran is reported with its numbers but not judged.
    let small_order = &expectations[0];
    assert!(small_order["held"].is_null());
    assert_eq!(small_order["reason"], "one seed: not judged");
    assert!(small_order["numbers"].as_str().unwrap().contains("ER-raw"));
    assert!(outcome.markdown.contains("one seed: not judged"));
    assert!(outcome.markdown.contains("hardware thread"));
    assert!(!outcome.markdown.contains("2-core"));
    // Diagnostics per run: shares per task, raw and decoded matrices for AQM.
    let aqm = cells
        .iter()
        .find(|c| c["method"] == "AQM" && c["budget"] == "B50" && c["classifier"] == "small CNN")
        .unwrap();
    assert_eq!(aqm["decoded_replay_share"][0].as_array().unwrap().len(), 5);
    assert_eq!(aqm["raw_test_accuracy"][0].as_array().unwrap().len(), 5);
    assert_eq!(aqm["decoded_test_accuracy"][0].as_array().unwrap().len(), 5);
    assert!(aqm["freeze_step"][0].is_u64(), "the module froze");
    let decoded_end = &aqm["decoded_test_accuracy"][0][4];
    assert!(decoded_end.as_array().unwrap().iter().all(|a| a.is_f64()));
    assert!(aqm["decoded_replay_share"][0][4].as_f64().unwrap() > 0.0);
    let arm = |name: &str| {
        cells
            .iter()
            .find(|c| c["method"] == name && c["classifier"] == "small CNN")
            .unwrap()
    };
    // The extensions act: replayed codes refreshed, incoming samples turned away.
    assert!(
        arm("AQM + re-encoding")["reencoded"][0]["refreshed"]
            .as_u64()
            .unwrap()
            > 0
    );
    let admitted = arm("AQM + reservoir")["admitted"][0].as_u64().unwrap();
    assert!(admitted < 200, "{admitted}");
    assert_eq!(arm("AQM")["admitted"][0], 200);
    let diagnoses = outcome.figures["diagnoses"].as_array().unwrap();
    assert!(diagnoses.len() >= 2);
    assert!(diagnoses[0]["over_time"][4]["decoded_old"].is_f64());
    let resnet = cells
        .iter()
        .find(|c| c["method"] == "ER-raw" && c["classifier"] != "small CNN")
        .unwrap();
    assert_eq!(resnet["streamed_per_task"], 20);
    for (png, _) in &outcome.plots {
        let bytes = std::fs::read(out.path().join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
    assert_eq!(outcome.plots.len(), 5);
}

/// The figures without what a resumed run measures anew (timings) or notes.
fn comparable(v: &serde_json::Value) -> String {
    crate::reproduce::figures_without(v, &["timings", "samples_per_second", "resumed"])
}

/// A run that finds the pieces of an earlier start (here: seed 0's, from a one-seed run)
/// reuses them and writes the figures an uninterrupted run writes, plots included.
#[test]
fn a_resumed_run_reuses_the_finished_pieces_and_gives_the_same_figures() {
    let (_out, ctx, data) = crate::reproduce::fixture_run();
    let settings = Settings {
        seeds: vec![0, 1],
        aqm_budgets: vec![(B50, 1)],
        extension_budgets: vec![],
        ..fixture_settings()
    };
    let one_seed = Settings {
        seeds: vec![0],
        ..settings.clone()
    };
    let run = |ctx: &Context, s: &Settings| {
        run_with(OnData::new(ctx, &data, &ProgressBar::hidden()), s).unwrap()
    };
    let check = crate::reproduce::resumed_and_uninterrupted(&ctx, run, &one_seed, &settings);
    let (resumed, uninterrupted) = (&check.resumed, &check.uninterrupted);
    assert_eq!(
        comparable(&resumed.figures),
        comparable(&uninterrupted.figures)
    );
    for (png, _) in &uninterrupted.plots {
        let a = std::fs::read(check.resumed_out.path().join(png)).unwrap();
        let b = std::fs::read(check.uninterrupted_out.path().join(png)).unwrap();
        assert!(a == b, "{png} differs");
    }
    // Seed 0 ran every job (the ResNet jobs run on it only); seed 1 the small CNN's.
    let all = jobs(&settings);
    let small = all
        .iter()
        .filter(|j| j.classifier == Classifier::SmallCnn)
        .count();
    let note = resumed.figures["resumed"].as_str().unwrap();
    let expected = format!("{} of {} pieces", all.len(), all.len() + small);
    assert!(note.contains(&expected), "{note}");
    assert!(resumed.markdown.contains(note));
    assert!(uninterrupted.figures["resumed"].is_null());
}

#[test]
fn seeds_from_the_context_replace_the_default_list() {
    let ctx = Context::new("data".into(), "out".into(), Mode::Full, "test".into());
    let full = Settings::for_context(&ctx);
    assert_eq!(full.seeds, vec![0, 1, 2, 3, 4]);
    assert_eq!(full.samples_per_task, None);
    let three = Context {
        seeds: Some(3),
        ..ctx
    };
    assert_eq!(Settings::for_context(&three).seeds, vec![0, 1, 2]);
    // Full mode runs the ResNet-18 beside the small CNN at the same scale.
    let r = full.resnet.as_ref().unwrap();
    assert_eq!((r.nf, r.samples_per_task, r.max_seeds), (20, None, None));
    let quick = Settings::for_mode(Mode::Quick);
    assert!(quick.resnet.unwrap().samples_per_task.is_some());
}

#[test]
fn jobs_configure_their_arm_classifier_and_scale() {
    let settings = Settings::for_mode(Mode::Full);
    let all = jobs(&settings);
    let find = |method: Method, arm: Arm, resnet: bool| {
        all.iter()
            .find(|j| {
                j.method == method
                    && j.arm == arm
                    && matches!(j.classifier, Classifier::ReducedResNet18 { .. }) == resnet
            })
            .copied()
            .unwrap()
    };
    let both = job_config(
        &settings,
        &find(Method::Aqm, Arm::ReservoirReencode, false),
        3,
    );
    assert!(both.reservoir_insertion);
    // eps_th is the stack's d_th.
    assert_eq!(both.reencode, Some(ReencodeConfig::paper(settings.d_th)));
    assert_eq!(
        both.reencode.unwrap().eps_th,
        both.stack.layers[0].recon_threshold
    );
    assert_eq!(both.seed, qcl_tensor::Seed::new(3));
    let decoded = job_config(&settings, &find(Method::Aqm, Arm::DecodedInput, false), 0);
    assert_eq!(
        decoded.classifier_input,
        qcl_aqm::online::ClassifierInput::Decoded
    );
    assert!(!decoded.reservoir_insertion && decoded.reencode.is_none());
    let resnet = job_config(&settings, &find(Method::Aqm, Arm::Reference, true), 0);
    assert_eq!(resnet.classifier, Classifier::reference());
    // Every (method, budget, bytes, classifier, arm) is one job: no duplicates.
    let keys: std::collections::BTreeSet<String> = all.iter().map(Job::key).collect();
    assert_eq!(keys.len(), all.len());
    // ResNet: fine-tune, iid-online, ER-raw and raw-AQM at B50 and B20, AQM at B50 and B20
    // (1-byte parameters).
    assert_eq!(
        all.iter()
            .filter(|j| j.classifier != Classifier::SmallCnn)
            .count(),
        6 + 2
    );
    let quick = Settings::for_mode(Mode::Quick);
    let r = find(Method::ErRaw, Arm::Reference, true);
    assert_eq!(job_seeds(&quick, &r), vec![0]);
    assert_eq!(job_config(&quick, &r, 0).samples_per_task, Some(500));
}

#[test]
fn statistics_forgetting_and_correlation() {
    let s = Stats::of(&[0.5, 0.7, 0.9]).unwrap();
    assert!((s.mean - 0.7).abs() < 1e-12);
    assert!((s.std - 0.2).abs() < 1e-12);
    assert!((s.se - 0.2 / 3f64.sqrt()).abs() < 1e-12);
    assert!(Stats::of(&[]).is_none());
    let m = vec![
        vec![Some(0.9), None, None],
        vec![Some(0.6), Some(0.8), None],
        vec![Some(0.5), Some(0.7), Some(0.9)],
    ];
    assert!((task_forgetting(&m, 0).unwrap() - 0.4).abs() < 1e-12);
    assert!((task_forgetting(&m, 1).unwrap() - 0.1).abs() < 1e-12);
    assert!(task_forgetting(&m, 2).is_none()); // never measured before the last row
    assert!((correlation(&[(1.0, 2.0), (2.0, 4.0), (3.0, 6.5)]).unwrap() - 1.0).abs() < 0.01);
    assert!(correlation(&[(1.0, 2.0), (2.0, 1.0)]).is_none());
}

fn cell(method: Method, budget: u64, bytes: u64, accs: &[f64]) -> Cell {
    let job = Job::new(method, (budget, bytes), Classifier::SmallCnn);
    let n = accs.len();
    Cell {
        job,
        method: job.name().into(),
        classifier: job.classifier.name(),
        budget: job.budget_name().into(),
        param_bytes: bytes,
        streamed_per_task: 100,
        streamed: 500,
        seeds: (0..n as u64).collect(),
        final_accuracy: accs.to_vec(),
        forgetting: vec![Some(0.2); n],
        task0_forgetting: vec![Some(if method == Method::Aqm { 0.1 } else { 0.3 }); n],
        stored_at_end: vec![if method == Method::Aqm { 3000 } else { 500 }; n],
        samples_per_second: vec![1.0; n],
        freeze_step: vec![None; n],
        trimmed_codes: vec![None; n],
        final_drift: vec![(method == Method::Aqm).then_some(0.02); n],
        max_drift: vec![(method == Method::Aqm).then_some(0.03); n],
        accuracy: vec![],
        raw_test_accuracy: vec![],
        decoded_test_accuracy: vec![],
        decoded_replay_share: vec![],
        reencoded: vec![],
        admitted: vec![],
        final_accuracy_stats: Stats::of(accs),
        forgetting_stats: None,
        task0_forgetting_stats: Stats::of(&vec![if method == Method::Aqm { 0.1 } else { 0.3 }; n]),
    }
}

#[test]
fn expectations_are_judged_by_their_rules() {
    let base = |aqm50: [f64; 3], raw50: [f64; 3]| {
        vec![
            cell(Method::FineTune, B50, 1, &[0.2, 0.2, 0.2]),
            cell(Method::IidOnline, B50, 1, &[0.9, 0.9, 0.9]),
            cell(Method::ErRaw, B50, 1, &[0.70, 0.72, 0.74]),
            cell(Method::RawAqm, B50, 1, &raw50),
            cell(Method::Aqm, B50, 1, &aqm50),
            cell(Method::ErRaw, B20, 1, &[0.60, 0.62, 0.64]),
            cell(Method::RawAqm, B20, 1, &[0.61, 0.62, 0.63]),
            cell(Method::Aqm, B20, 1, &[0.70, 0.71, 0.72]),
            cell(Method::Aqm, B20, 4, &[0.50, 0.51, 0.52]),
        ]
    };
    let held = |cells: &[Cell], id: &str| {
        judge(cells, 0.1)
            .into_iter()
            .find(|e| e.id == id)
            .unwrap()
            .held
    };
    // AQM 8 points ahead of ER-raw on every seed; raw-AQM level with ER-raw.
    let good = base([0.80, 0.80, 0.82], [0.71, 0.72, 0.73]);
    for id in EXPECTATION_IDS {
        assert_eq!(held(&good, id), Some(true), "{id}");
    }
    // AQM behind ER-raw: the ordering fails; so does it when raw-AQM is far from ER-raw.
    assert_eq!(
        held(
            &base([0.60, 0.65, 0.70], [0.71, 0.72, 0.73]),
            "ordering-B50"
        ),
        Some(false)
    );
    assert_eq!(
        held(
            &base([0.80, 0.80, 0.82], [0.50, 0.52, 0.54]),
            "ordering-B50"
        ),
        Some(false)
    );
    // Ahead by less than two standard errors of the paired difference: not "clearly".
    assert_eq!(
        held(
            &base([0.60, 0.72, 0.90], [0.71, 0.72, 0.73]),
            "ordering-B50"
        ),
        Some(false)
    );
    // Drift above d_th fails; a missing cell is "not run".
    assert_eq!(held(&good, "drift-below-dth"), Some(true));
    let drifted = judge(&good, 0.01);
    assert_eq!(
        drifted
            .iter()
            .find(|e| e.id == "drift-below-dth")
            .unwrap()
            .held,
        Some(false)
    );
    let without_4b: Vec<Cell> = good
        .into_iter()
        .filter(|c| c.job.param_bytes == 1)
        .collect();
    assert_eq!(held(&without_4b, "er-beats-aqm-B20-4B"), None);
    let d = paired_difference(&without_4b[4], &without_4b[2]).unwrap();
    assert!((d.mean - 0.0866).abs() < 1e-3);
}

/// The rules as implemented: ≈ is an equivalence test (`|d| + 2·SE ≤ 2 points`), task-0
/// forgetting needs a clearly positive paired difference, and expectations that cannot be
/// judged say why.
#[test]
fn expectations_use_equivalence_paired_forgetting_and_give_reasons() {
    let cells = |raw50: &[f64], aqm_f0: &[f64]| {
        let n = raw50.len();
        let take = |v: &[f64]| v[..n].to_vec();
        let mut aqm = cell(Method::Aqm, B50, 1, &take(&[0.80, 0.80, 0.82]));
        aqm.task0_forgetting = aqm_f0.iter().map(|&f| Some(f)).collect();
        vec![
            cell(Method::FineTune, B50, 1, &take(&[0.2, 0.2, 0.2])),
            cell(Method::IidOnline, B50, 1, &take(&[0.9, 0.9, 0.9])),
            cell(Method::ErRaw, B50, 1, &take(&[0.70, 0.72, 0.74])),
            cell(Method::RawAqm, B50, 1, raw50),
            aqm,
            cell(Method::ErRaw, B20, 1, &take(&[0.60, 0.62, 0.64])),
            cell(Method::RawAqm, B20, 1, &take(&[0.61, 0.62, 0.63])),
            cell(Method::Aqm, B20, 1, &take(&[0.70, 0.71, 0.72])),
        ]
    };
    let find =
        |cells: &[Cell], id: &str| judge(cells, 0.1).into_iter().find(|e| e.id == id).unwrap();
    // ER-raw − raw-AQM averages 0 but spreads ±4 points: within max(2·SE, 1 point) (the old
    // rule), not equivalent within 2 points.
    let noisy = cells(&[0.66, 0.72, 0.78], &[0.1, 0.1, 0.1]);
    let order = find(&noisy, "ordering-B50");
    assert_eq!(order.held, Some(false), "{}", order.numbers);
    assert!(
        order.numbers.contains("≈, |d| + 2·SE ≤ 2 points: no"),
        "{}",
        order.numbers
    );
    let tight = cells(&[0.71, 0.72, 0.73], &[0.1, 0.1, 0.1]);
    assert_eq!(find(&tight, "ordering-B50").held, Some(true));
    // Task-0 forgetting lower on average (0.27 vs 0.30) but not clearly: not held; clearly
    // lower at both budgets: held.
    let unclear = cells(&[0.71, 0.72, 0.73], &[0.25, 0.35, 0.20]);
    let t0 = find(&unclear, "task0-forgetting");
    assert_eq!(t0.held, Some(false), "{}", t0.numbers);
    assert!(t0.numbers.contains("clearly positive: no"));
    assert_eq!(find(&tight, "task0-forgetting").held, Some(true));
    // One seed: numbers, no judgement.
    let one = cells(&[0.71], &[0.1]);
    for e in judge(&one, 0.1)
        .iter()
        .filter(|e| e.id != "er-beats-aqm-B20-4B")
    {
        assert_eq!(
            (e.held, e.reason.as_deref()),
            (None, Some("one seed: not judged")),
            "{}",
            e.id
        );
        assert!(!e.numbers.is_empty(), "{}", e.id);
    }
    // No seed in common: ran, but no paired difference.
    let mut apart = tight.clone();
    apart[3].seeds = vec![7, 8, 9];
    let e = find(&apart, "ordering-B50");
    assert_eq!(e.held, None);
    assert_eq!(
        e.reason.as_deref(),
        Some("the runs share no seed: no paired difference")
    );
    // The module never froze: no drift to judge, said so.
    let mut unfrozen = tight.clone();
    for c in unfrozen.iter_mut().filter(|c| c.job.method == Method::Aqm) {
        c.final_drift = vec![None; 3];
        c.max_drift = vec![None; 3];
    }
    let e = find(&unfrozen, "drift-below-dth");
    assert_eq!(e.held, None);
    assert!(e.reason.as_deref().unwrap().contains("never froze"));
    assert_eq!(
        find(&tight, "er-beats-aqm-B20-4B").reason.as_deref(),
        Some("not run")
    );
}

/// The critical correlation values of the t distribution (two-sided 5 %).
#[test]
fn critical_correlations_match_the_table() {
    let table = [
        (3, 0.997),
        (4, 0.950),
        (5, 0.878),
        (6, 0.811),
        (7, 0.754),
        (8, 0.707),
        (9, 0.666),
        (10, 0.632),
        (20, 0.444),
        (30, 0.361),
    ];
    for (n, r) in table {
        let c = critical_correlation(n).unwrap();
        assert!((c - r).abs() < 5e-4, "n {n}: {c} vs {r}");
    }
    assert!(critical_correlation(2).is_none());
}

/// A matrix of `T = 3` tasks whose entries after task `i` on task `j ≤ i` are `v`.
fn matrix(v: f64) -> Vec<Vec<Option<f64>>> {
    (0..3)
        .map(|i| (0..3).map(|j| (j <= i).then_some(v)).collect())
        .collect()
}

/// Raw, decoded and gap figures of a gap row speak of the same seeds (those whose module had
/// frozen); a piece whose decoded matrix is short gives no gap instead of a panic.
#[test]
fn gap_rows_pair_raw_and_decoded_over_the_same_seeds() {
    let mut c = cell(Method::Aqm, B50, 1, &[0.5, 0.6]);
    c.raw_test_accuracy = vec![matrix(0.4), matrix(0.8)];
    // Seed 0's module froze, seed 1's never did.
    c.decoded_test_accuracy = vec![matrix(0.7), vec![vec![None; 3]; 3]];
    let last = c.gap_rows().pop().unwrap();
    assert_eq!(last.seeds_decoded, 1);
    assert!((last.raw_old.unwrap() - 0.4).abs() < 1e-12);
    assert!((last.raw_old_all_seeds.unwrap() - 0.6).abs() < 1e-12);
    assert!((last.decoded_old.unwrap() - 0.7).abs() < 1e-12);
    let gap = last.gap_old.unwrap();
    assert!((gap - (last.decoded_old.unwrap() - last.raw_old.unwrap())).abs() < 1e-12);
    c.decoded_test_accuracy[0].truncate(2);
    assert_eq!(c.final_old_gap(), vec![None, None]);
}

#[test]
fn settings_without_a_seed_are_an_error() {
    let (_out, ctx, data) = crate::reproduce::fixture_run();
    let settings = Settings {
        seeds: vec![],
        ..fixture_settings()
    };
    let Err(err) = run_with(OnData::new(&ctx, &data, &ProgressBar::hidden()), &settings) else {
        panic!("settings without a seed ran");
    };
    assert!(err.to_string().contains("no seed"), "{err}");
}

#[test]
fn the_pytorch_ratio_is_read_from_the_committed_file_or_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("training.json");
    std::fs::write(
        &path,
        r#"{"commit": "abc", "figures": {"vq_ae": {"median_ratio": 1.25}}}"#,
    )
    .unwrap();
    let r = throughput::pytorch_ratio(&path).unwrap();
    assert_eq!((r.median_ratio, r.commit.as_deref()), (1.25, Some("abc")));
    std::fs::write(&path, r#"{"figures": {}}"#).unwrap();
    assert!(throughput::pytorch_ratio(&path).is_none());
    assert!(throughput::pytorch_ratio(Path::new("/nonexistent/training.json")).is_none());
}
