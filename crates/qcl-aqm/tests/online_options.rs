//! The online loop's options (docs/methods/aqm.md § Classifier, § Extensions, § Diagnostics)
//! on the committed Fashion-MNIST fixture: the reduced ResNet-18, reservoir insertion,
//! re-encoding, and the per-task diagnostics every run records.

mod common;

use common::{scenario, small, TIGHT};
use qcl_aqm::online::{run, Classifier, ClassifierInput, Method, OnlineConfig, ReencodeConfig};
use qcl_tensor::Error;

#[test]
fn the_reduced_resnet18_trains_evaluates_and_is_deterministic() {
    let s = scenario();
    let mut config = small(Method::Aqm, 392_000);
    config.classifier = Classifier::ReducedResNet18 { nf: 4 };
    config.samples_per_task = Some(20);
    let a = run(&s, &config, None).unwrap();
    for (i, row) in a.accuracy.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            assert_eq!(v.is_some(), j <= i);
            assert!(v.is_none_or(|v| (0.0..=1.0).contains(&v)));
        }
    }
    let b = run(&s, &config, None).unwrap();
    assert_eq!(a.accuracy, b.accuracy);
    assert_eq!(a.final_accuracy.to_bits(), b.final_accuracy.to_bits());
    // The modules and the memory do not depend on the classifier.
    let mut cnn = config.clone();
    cnn.classifier = Classifier::SmallCnn;
    let c = run(&s, &cnn, None).unwrap();
    assert_eq!(a.memory_curve, c.memory_curve);
    assert_eq!(a.drift, c.drift);
}

#[test]
fn every_run_records_replay_shares_and_raw_versus_decoded_accuracy() {
    let s = scenario();
    let aqm = run(&s, &small(Method::Aqm, TIGHT), None).unwrap();
    let frozen_at = aqm.freeze_steps[0].unwrap() as usize;
    let steps_per_task = 40 / 10;
    assert_eq!(aqm.decoded_replay_share.len(), 5);
    assert!(aqm.decoded_replay_share[0].is_none(), "no replay in task 0");
    for t in 1..5 {
        let share = aqm.decoded_replay_share[t].unwrap();
        assert!((0.0..=1.0).contains(&share));
        if t * steps_per_task > frozen_at + 1 {
            assert!(share > 0.0, "task {t}: codes are replayed after the freeze");
        }
    }
    for i in 0..5 {
        for j in 0..5 {
            // The raw matrix is the method's accuracy matrix for a raw-input run.
            assert_eq!(aqm.raw_test_accuracy[i][j], aqm.accuracy[i][j]);
            let frozen_by_then = (i + 1) * steps_per_task > frozen_at;
            assert_eq!(
                aqm.decoded_test_accuracy[i][j].is_some(),
                j <= i && frozen_by_then,
                "[{i}][{j}]"
            );
        }
    }
    let last: Vec<f64> = aqm.decoded_test_accuracy[4]
        .iter()
        .map(|a| a.unwrap())
        .collect();
    assert_eq!(aqm.accuracy_on_reconstructions.as_ref().unwrap(), &last);
    assert_eq!(aqm.admitted, Some(200));
    // ER-raw replays raw images only; fine-tune does not replay.
    let er = run(&s, &small(Method::ErRaw, 20 * 784), None).unwrap();
    assert!(er.decoded_replay_share[1..].iter().all(|s| *s == Some(0.0)));
    assert!(er.raw_test_accuracy.is_empty() && er.decoded_test_accuracy.is_empty());
    let ft = run(&s, &small(Method::FineTune, 1), None).unwrap();
    assert!(ft.decoded_replay_share.iter().all(Option::is_none));
    // A decoded-input run: its matrix is the decoded one once frozen, the raw one before.
    let mut config = small(Method::Aqm, TIGHT);
    config.classifier_input = ClassifierInput::Decoded;
    let dec = run(&s, &config, None).unwrap();
    for i in 0..5 {
        for j in 0..=i {
            let expected = dec.decoded_test_accuracy[i][j].or(dec.raw_test_accuracy[i][j]);
            assert_eq!(dec.accuracy[i][j], expected);
        }
    }
}

#[test]
fn reservoir_insertion_turns_samples_away_and_is_deterministic() {
    let s = scenario();
    let mut config = small(Method::Aqm, TIGHT);
    config.reservoir_insertion = true;
    let a = run(&s, &config, None).unwrap();
    let admitted = a.admitted.unwrap();
    assert!(admitted < 200, "{admitted}");
    let last = a.memory_curve.last().unwrap();
    assert!(last.used_bytes <= last.capacity_bytes);
    let b = run(&s, &config, None).unwrap();
    assert_eq!((a.accuracy, a.memory_curve), (b.accuracy, b.memory_curve));
    // raw-AQM takes the rule too.
    let mut raw = small(Method::RawAqm, 20 * 784);
    raw.reservoir_insertion = true;
    let r = run(&s, &raw, None).unwrap();
    assert!(r.admitted.unwrap() < 200);
    assert_eq!(r.stored_at_end, 20);
}

#[test]
fn reencoding_refreshes_replayed_codes_only_when_the_memory_is_full_enough() {
    let s = scenario();
    let mut config = small(Method::Aqm, TIGHT);
    config.reencode = Some(ReencodeConfig::paper(0.5));
    let a = run(&s, &config, None).unwrap();
    assert!(a.reencoded.refreshed > 0, "{:?}", a.reencoded);
    assert_eq!(
        a.reencoded.moved, 0,
        "one module: nothing deeper to move to"
    );
    let b = run(&s, &config, None).unwrap();
    assert_eq!(a.reencoded, b.reencoded);
    assert_eq!(a.accuracy, b.accuracy);
    // Never full enough: nothing re-encoded, the reference run bit for bit.
    config.reencode = Some(ReencodeConfig {
        eps_th: 0.5,
        min_fullness: 1.0 + f64::EPSILON,
    });
    assert!(
        run(&s, &config, None).is_err(),
        "min_fullness above 1 is refused"
    );
    config.reencode = Some(ReencodeConfig {
        eps_th: 0.5,
        min_fullness: 1.0,
    });
    let mut big = config.clone();
    big.budget_bytes = 392_000; // never full
    let never = run(&s, &big, None).unwrap();
    assert_eq!(never.reencoded.refreshed, 0);
    big.reencode = None;
    let reference = run(&s, &big, None).unwrap();
    assert_eq!(never.accuracy, reference.accuracy);
    assert_eq!(never.memory_curve, reference.memory_curve);
    assert_eq!(never.drift, reference.drift);
}

#[test]
fn bad_options_are_typed_errors() {
    let s = scenario();
    let mut c = small(Method::ErRaw, 20 * 784);
    c.classifier = Classifier::ReducedResNet18 { nf: 0 };
    assert!(matches!(
        run(&s, &c, None),
        Err(Error::InvalidParameter { .. })
    ));
    c.classifier = Classifier::ReducedResNet18 {
        nf: Classifier::MAX_NF + 1,
    };
    assert!(matches!(
        run(&s, &c, None),
        Err(Error::InvalidParameter { .. })
    ));
    let mut c = small(Method::Aqm, 392_000);
    for eps_th in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        c.reencode = Some(ReencodeConfig::paper(eps_th));
        assert!(matches!(
            run(&s, &c, None),
            Err(Error::InvalidParameter { .. })
        ));
    }
    c.reencode = Some(ReencodeConfig {
        eps_th: 0.1,
        min_fullness: -0.5,
    });
    assert!(matches!(
        run(&s, &c, None),
        Err(Error::InvalidParameter { .. })
    ));
    let bad: Result<OnlineConfig, _> = serde_json::from_str(
        &serde_json::to_string(&small(Method::Aqm, 1))
            .unwrap()
            .replace(r#""classifier":"small-cnn""#, r#""classifier":"vgg""#),
    );
    assert!(bad.is_err());
}

#[test]
fn configs_without_the_new_fields_read_as_before() {
    let config = small(Method::Aqm, 392_000);
    let mut json = serde_json::to_value(&config).unwrap();
    let map = json.as_object_mut().unwrap();
    for key in ["classifier", "reservoir_insertion", "reencode"] {
        assert!(map.remove(key).is_some(), "{key}");
    }
    let back: OnlineConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, config);
    assert_eq!(back.classifier, Classifier::SmallCnn);
    // A re-encoding setting without its fill level takes the paper's 95 %.
    let r: ReencodeConfig = serde_json::from_str(r#"{"eps_th": 0.2}"#).unwrap();
    assert_eq!(r, ReencodeConfig::paper(0.2));
    // Results written before the diagnostics still read.
    let result = run(&scenario(), &small(Method::FineTune, 1), None).unwrap();
    let mut json = serde_json::to_value(&result).unwrap();
    let map = json.as_object_mut().unwrap();
    for key in [
        "decoded_replay_share",
        "raw_test_accuracy",
        "decoded_test_accuracy",
        "reencoded",
        "admitted",
    ] {
        map.remove(key);
    }
    let back: qcl_aqm::RunResult = serde_json::from_value(json).unwrap();
    assert!(back.decoded_replay_share.is_empty());
}
