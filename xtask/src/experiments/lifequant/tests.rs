use super::arms::Scores;
use super::report::choose_lambda;
use super::*;

fn scores(validation_acc: f64, acc: f64) -> Scores {
    Scores {
        matrix: Vec::new(),
        acc,
        fgt: 0.0,
        orphan_acc: 0.0,
        validation: Vec::new(),
        validation_acc,
        drift: Vec::new(),
        fisher_max: Vec::new(),
        seconds: 0.0,
    }
}

fn run(arm: Arm, lambda: f64, seed: u64, validation_and_test: Option<(f64, f64)>) -> ArmRun {
    ArmRun {
        arm: arm.id().into(),
        lambda,
        seed,
        diverged: validation_and_test.is_none().then(|| "task 1 loss".into()),
        scores: validation_and_test.map(|(v, t)| scores(v, t)),
    }
}

#[test]
fn lambda_is_chosen_on_validation_among_the_values_every_seed_finished() {
    let settings = Settings {
        lambdas: vec![3.0, 10.0, 30.0, 100.0],
        seeds: vec![0, 1],
        ..Settings::for_mode(Mode::Full)
    };
    let runs = vec![
        // λ = 3: mean validation 0.60, best test.
        run(Arm::M4, 3.0, 0, Some((0.62, 0.90))),
        run(Arm::M4, 3.0, 1, Some((0.58, 0.90))),
        // λ = 10: mean validation 0.65, the best finished on both seeds.
        run(Arm::M4, 10.0, 0, Some((0.70, 0.50))),
        run(Arm::M4, 10.0, 1, Some((0.60, 0.50))),
        // λ = 30: the best validation on the seed that finished, but the other diverged.
        run(Arm::M4, 30.0, 0, Some((0.95, 0.95))),
        run(Arm::M4, 30.0, 1, None),
        // λ = 100: ties λ = 10 (the same values, seeds swapped); the smaller λ wins.
        run(Arm::M4, 100.0, 0, Some((0.60, 0.40))),
        run(Arm::M4, 100.0, 1, Some((0.70, 0.40))),
        // Another arm's runs do not count.
        run(Arm::M1, 3.0, 0, Some((0.99, 0.99))),
    ];
    let choice = choose_lambda(&runs, Arm::M4, &settings).unwrap();
    assert_eq!(choice.lambda, 10.0);
    assert!((choice.validation_acc - 0.65).abs() < 1e-12);
    assert_eq!(choice.candidates.len(), 4);
    assert_eq!(choice.candidates[2].finished, 1);
    assert_eq!(choice.candidates[2].validation_acc, None);
    // No λ finished on every seed: a typed failure, not a silent choice.
    let diverged: Vec<ArmRun> = settings
        .lambdas
        .iter()
        .flat_map(|&l| {
            [
                run(Arm::M1, l, 0, None),
                run(Arm::M1, l, 1, Some((0.5, 0.5))),
            ]
        })
        .collect();
    let err = choose_lambda(&diverged, Arm::M1, &settings).unwrap_err();
    assert!(err.to_string().contains("no λ"), "{err}");
}

/// The whole experiment, scaled down to seconds, on the committed fixture.
#[test]
fn runs_on_the_fixture_and_writes_its_results() {
    let (out, ctx, data) = crate::reproduce::fixture_run();
    let settings = Settings {
        lambdas: vec![3.0, 30.0],
        reference_lambda: 30.0,
        ..Settings::fixture()
    };
    let outcome = run_with(OnData::new(&ctx, &data, &ProgressBar::hidden()), &settings).unwrap();
    let runs = outcome.figures["runs"].as_array().unwrap();
    // Per seed: five arms without λ, M1 and M4 at two λ each, three arms at the chosen λ.
    assert_eq!(runs.len(), 2 * (5 + 2 * 2 + 3));
    let chosen = outcome.figures["chosen_lambda"]["M4"]["lambda"]
        .as_f64()
        .unwrap();
    assert!(settings.lambdas.contains(&chosen));
    for r in runs {
        let Some(scores) = r["scores"].as_object() else {
            assert!(r["diverged"].is_string());
            continue;
        };
        let matrix = scores["matrix"].as_array().unwrap();
        assert_eq!(matrix.len(), 3);
        assert!(
            matrix[0][0].as_f64().is_some(),
            "row 0 measured from the checkpoint"
        );
        assert!(matrix[2][2].as_f64().is_some());
        assert_eq!(scores["validation"].as_array().unwrap().len(), 3);
        for key in ["acc", "validation_acc"] {
            assert!(
                (0.0..=1.0).contains(&scores[key].as_f64().unwrap()),
                "{key}"
            );
        }
    }
    // Validation images are held out of training: 10 % of 10 per class, one each.
    let tasks = outcome.figures["scenario"]["tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["validation_images"], 5);
    assert_eq!(tasks[0]["train_images"], 45);
    // The arms that start from the same 4-bit checkpoint share row 0.
    let row0 = |id: &str| {
        runs.iter()
            .find(|r| r["arm"] == id && r["seed"] == 0)
            .unwrap()["scores"]["matrix"][0][0]
            .as_f64()
            .unwrap()
    };
    assert_eq!(row0("M0"), row0("M3-codeBaLL"));
    assert_eq!(outcome.figures["orderings"].as_array().unwrap().len(), 10);
    for needle in [
        "| H5 |",
        "| S5 |",
        "## λ chosen on validation",
        "**chosen**",
        "| M4-prox |",
        "| M4-codeBaLL |",
        "ProxQ",
        "(1 + μ)/(η·F_max)",
    ] {
        assert!(
            outcome.markdown.contains(needle),
            "{needle}: {}",
            outcome.markdown
        );
    }
    for (png, _) in &outcome.plots {
        let bytes = std::fs::read(out.path().join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
}

#[test]
fn seeds_from_the_context_replace_the_default_list() {
    use crate::reproduce::Context;
    let ctx = Context::new("data".into(), "out".into(), Mode::Full, "test".into());
    assert_eq!(Settings::for_context(&ctx).seeds, vec![0, 1, 2]);
    let five = Context {
        seeds: Some(5),
        ..ctx
    };
    let settings = Settings::for_context(&five);
    assert_eq!(settings.seeds, vec![0, 1, 2, 3, 4]);
    assert_eq!(settings.lambdas, Settings::for_mode(Mode::Full).lambdas);
}

/// A run that finds the pieces of an earlier start (here: seed 0's, from a one-seed run)
/// reuses them and writes the figures an uninterrupted run writes.
#[test]
fn a_resumed_run_reuses_the_finished_pieces_and_gives_the_same_figures() {
    let (_out, ctx, data) = crate::reproduce::fixture_run();
    let settings = Settings {
        lambdas: vec![3.0],
        ..Settings::fixture()
    };
    let one_seed = Settings {
        seeds: vec![0],
        ..settings.clone()
    };
    let run = |ctx: &crate::reproduce::Context, s: &Settings| {
        run_with(OnData::new(ctx, &data, &ProgressBar::hidden()), s).unwrap()
    };
    let check = crate::reproduce::resumed_and_uninterrupted(&ctx, run, &one_seed, &settings);
    let (resumed, uninterrupted) = (check.resumed, check.uninterrupted);
    let figures = |o: &crate::reproduce::Outcome| {
        crate::reproduce::figures_without(&o.figures, &["seconds", "resumed"])
    };
    assert_eq!(figures(&resumed), figures(&uninterrupted));
    // Seed 0: pretraining, five arms without λ, M1 and M4 at one λ, three arms at M4's λ.
    let note = resumed.figures["resumed"].as_str().unwrap();
    assert!(note.contains("11 of 22 pieces"), "{note}");
    assert!(resumed.markdown.contains(note));
    assert!(uninterrupted.figures["resumed"].is_null());
}
