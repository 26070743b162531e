//! `qcl wpq compress` and `qcl wpq eval` on the fixture: one JSON object each, the reported file
//! size is the file's, the compressed file evaluates like the in-process result, and an
//! architecture mismatch is a typed error.

mod common;

use common::qcl;
use qcl_tensor::Seed;
use qcl_wpq::{Arch, Model};

#[test]
fn compress_then_eval_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    Model::new(Arch::FmNet, Seed::new(1))
        .unwrap()
        .save(&model)
        .unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"em_iterations": 2, "rows_per_iteration": 1000, "activation_images": 16,
            "layer_steps": 1, "global_steps": 1, "batch_size": 16, "seed": 4}"#,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let data = common::fixture("fashion-mnist.safetensors");
    let (ok, v) = qcl(&[
        "wpq",
        "compress",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        "fmnet",
        "--config",
        config.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{v}");
    assert_eq!(
        v["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert!((v["ratio"].as_f64().unwrap() - 20.91).abs() < 0.01, "{v}");
    assert_eq!(v["layers"].as_array().unwrap().len(), 6);

    let (ok, e) = qcl(&[
        "wpq",
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        &data,
        "--json",
    ]);
    assert!(ok, "{e}");
    assert_eq!(e["compressed"], true);
    assert_eq!(e["accuracy"], v["accuracy"]);

    let (ok, e) = qcl(&[
        "wpq",
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--arch",
        "fmnet-bn",
        "--data",
        &data,
        "--json",
    ]);
    assert!(!ok);
    assert_eq!(e["error"]["kind"], "invalid_parameter");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("architecture mismatch"));

    std::fs::write(&config, r#"{"block_conv": 5}"#).unwrap();
    let (ok, e) = qcl(&[
        "wpq",
        "compress",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        "fmnet",
        "--config",
        config.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(!ok);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not divide"),
        "{e}"
    );
}
