//! `qcl aqm run` on the fixture: one JSON object with the run's result, flags override the
//! config file, and bad names or files are typed errors.

mod common;

use common::qcl;

fn fixture() -> String {
    common::fixture("fashion-mnist.safetensors")
}

/// `qcl aqm run --config PATH --data FIXTURE --json EXTRA…`.
fn run_config(path: &std::path::Path, extra: &[&str]) -> (bool, serde_json::Value) {
    let data = fixture();
    let mut args = vec![
        "aqm",
        "run",
        "--config",
        path.to_str().unwrap(),
        "--data",
        &data,
        "--json",
    ];
    args.extend(extra);
    qcl(&args)
}

#[test]
fn a_small_er_stream_reports_its_memory_and_accuracy() {
    let data = fixture();
    let (ok, v) = qcl(&[
        "aqm",
        "run",
        "--method",
        "er-raw",
        "--budget",
        "15680",
        "--samples-per-task",
        "20",
        "--seed",
        "3",
        "--data",
        &data,
        "--json",
    ]);
    assert!(ok, "{v}");
    assert_eq!(v["config"]["method"], "er-raw");
    assert_eq!(v["config"]["seed"], 3);
    assert_eq!(v["samples_streamed"], 100);
    assert_eq!(v["stored_at_end"], 20); // ⌊15,680 / 784⌋ raw images
    let acc = v["final_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(v["accuracy"].as_array().unwrap().len(), 5);
}

#[test]
fn a_config_file_is_read_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        qcl_aqm::online::OnlineConfig::fashion_mnist(qcl_aqm::online::Method::FineTune, 392_000);
    config.samples_per_task = Some(10);
    config.test_per_class = Some(4);
    let path = dir.path().join("stream.json");
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    let (ok, v) = run_config(&path, &[]);
    assert!(ok, "{v}");
    assert_eq!(v["config"]["method"], "fine-tune");
    assert_eq!(v["stored_at_end"], 0);
    let (ok, v) = run_config(&path, &["--method", "raw-aqm", "--budget", "7840"]);
    assert!(ok, "{v}");
    assert_eq!(v["config"]["method"], "raw-aqm");
    assert_eq!(v["stored_at_end"], 10);
}

#[test]
fn bad_names_and_files_are_typed_errors() {
    let data = fixture();
    let (ok, v) = qcl(&["aqm", "run", "--method", "gem", "--data", &data, "--json"]);
    assert!(!ok);
    assert_eq!(v["error"]["kind"], "invalid_parameter", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("gem"));
    let (ok, v) = qcl(&[
        "aqm",
        "run",
        "--classifier-input",
        "blurry",
        "--data",
        &data,
        "--json",
    ]);
    assert!(!ok);
    assert!(v["error"]["message"].as_str().unwrap().contains("blurry"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.json");
    std::fs::write(&path, "{\"method\": ").unwrap();
    let (ok, v) = run_config(&path, &[]);
    assert!(!ok);
    assert_eq!(v["error"]["kind"], "bad_file", "{v}");
}
