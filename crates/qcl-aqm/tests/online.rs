//! The online loop on the committed Fashion-MNIST fixture (small streams).

mod common;

use common::{scenario, small};
use qcl_aqm::online::{run, ClassifierInput, Method, OnlineConfig};
use qcl_tensor::Error;

#[test]
fn aqm_freezes_stores_codes_within_budget_and_is_deterministic() {
    let s = scenario();
    let config = small(Method::Aqm, 392_000);
    let a = run(&s, &config, None).unwrap();
    assert_eq!(a.samples_streamed, 5 * 40);
    assert!(
        a.freeze_steps[0].is_some_and(|f| f < 10),
        "{:?}",
        a.freeze_steps
    );
    let last = a.memory_curve.last().unwrap();
    assert!(last.used_bytes <= last.capacity_bytes);
    // AE + slow decoder, docs/methods/aqm.md § Fashion-MNIST experiment.
    assert_eq!(a.model_cost_params, 36_850); // autoencoder + slow decoder
    assert_eq!(last.capacity_bytes, (392_000 - 36_850) as f64);
    // Every streamed sample fits as codes (98 B each): nothing is evicted, most are codes.
    assert_eq!(a.stored_at_end, 200);
    assert!(last.per_block[1] > 130, "{:?}", last.per_block);
    assert!(a
        .drift
        .iter()
        .all(|d| d.all.is_none_or(|m| m.is_finite() && m >= 0.0)));
    assert!(a.drift.last().unwrap().samples > 0);
    assert_eq!(a.examples.len(), 4);
    let recon = a.accuracy_on_reconstructions.as_ref().unwrap();
    assert_eq!(recon.len(), 5);
    assert!(recon.iter().all(|x| (0.0..=1.0).contains(x)));
    for row in 0..5 {
        for col in 0..5 {
            assert_eq!(a.accuracy[row][col].is_some(), col <= row);
        }
    }
    let b = run(&s, &config, None).unwrap();
    assert_eq!(a.accuracy, b.accuracy);
    assert_eq!(a.memory_curve, b.memory_curve);
}

#[test]
fn baselines_run_and_er_holds_budget_over_image_size_slots() {
    let s = scenario();
    let er = run(&s, &small(Method::ErRaw, 20 * 784), None).unwrap();
    assert_eq!(er.stored_at_end, 20);
    let raw = run(&s, &small(Method::RawAqm, 20 * 784), None).unwrap();
    assert_eq!(raw.stored_at_end, 20);
    // Class-balanced: 10 classes × 2.
    let ft = run(&s, &small(Method::FineTune, 1), None).unwrap();
    assert_eq!(ft.stored_at_end, 0);
    assert!(ft.accuracy_on_reconstructions.is_none());
    let iid = run(&s, &small(Method::IidOnline, 1), None).unwrap();
    assert!(iid.forgetting.is_none());
    assert!((0.0..=1.0).contains(&iid.final_accuracy));
}

#[test]
fn a_budget_below_the_model_cost_is_refused() {
    let s = scenario();
    // B20 with 4-byte parameters leaves room; 100 kB with 4-byte parameters does not.
    let mut c = small(Method::Aqm, 100_000);
    c.param_bytes = 4;
    assert!(matches!(
        run(&s, &c, None),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn decoded_input_tests_through_the_module_and_changes_training_only_after_the_freeze() {
    let s = scenario();
    let mut config = small(Method::Aqm, 392_000);
    config.classifier_input = ClassifierInput::Decoded;
    let decoded = run(&s, &config, None).unwrap();
    let frozen_at = decoded.freeze_steps[0].unwrap();
    // With every module frozen at the end, the last row is measured on test images passed
    // through the module: exactly the reconstructed-image diagnostic.
    let recon = decoded.accuracy_on_reconstructions.as_ref().unwrap();
    let last = &decoded.accuracy[4];
    for (a, r) in last.iter().zip(recon) {
        assert_eq!(a.unwrap(), *r);
    }
    assert_eq!(
        decoded.freeze_steps,
        run(&s, &config, None).unwrap().freeze_steps
    );
    // The reference run is the same stream; it differs only once incoming images are decoded.
    config.classifier_input = ClassifierInput::Raw;
    let raw = run(&s, &config, None).unwrap();
    assert_eq!(raw.freeze_steps[0], Some(frozen_at));
    assert_ne!(raw.accuracy, decoded.accuracy);
    // Modules and memory do not depend on the classifier.
    assert_eq!(raw.memory_curve, decoded.memory_curve);
    assert_eq!(raw.drift, decoded.drift);

    // A module that never freezes: decoded input is the reference run, bit for bit.
    let mut never = small(Method::Aqm, 392_000);
    never.stack.layers[0].recon_threshold = 1e-9;
    never.samples_per_task = Some(10);
    let raw = run(&s, &never, None).unwrap();
    assert!(raw.freeze_steps[0].is_none());
    never.classifier_input = ClassifierInput::Decoded;
    let decoded = run(&s, &never, None).unwrap();
    assert_eq!(raw.accuracy, decoded.accuracy);
}

#[test]
fn configs_without_classifier_input_read_as_the_reference() {
    let config = small(Method::Aqm, 392_000);
    let mut json = serde_json::to_value(&config).unwrap();
    json.as_object_mut().unwrap().remove("classifier_input");
    let back: OnlineConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back.classifier_input, ClassifierInput::Raw);
    assert_eq!(back, config);
    let decoded: ClassifierInput = serde_json::from_str("\"decoded\"").unwrap();
    assert_eq!(decoded, ClassifierInput::Decoded);
}
