//! `qcl wpq compress` and `qcl wpq eval` on the fixture: one JSON object each, the reported file
//! size is the file's, the compressed file evaluates like the in-process result, and an
//! architecture mismatch is a typed error.

mod common;

use std::path::Path;

use common::qcl;
use serde_json::Value;

/// `qcl wpq compress --json` of the FMNet `model` with `config` on the Fashion-MNIST fixture,
/// into `out`: (exit success, its JSON).
fn compress(model: &Path, config: &Path, out: &Path) -> (bool, Value) {
    qcl(&[
        "wpq",
        "compress",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        "fmnet",
        "--config",
        config.to_str().unwrap(),
        "--data",
        &common::fixture("fashion-mnist.safetensors"),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
}

/// `qcl wpq eval --json` of `model`, with the `extra` flags, on the Fashion-MNIST fixture:
/// (exit success, its JSON).
fn eval(model: &Path, extra: &[&str]) -> (bool, Value) {
    let data = common::fixture("fashion-mnist.safetensors");
    let mut args = vec!["wpq", "eval", "--model", model.to_str().unwrap()];
    args.extend(extra);
    args.extend(["--data", &data, "--json"]);
    qcl(&args)
}

#[test]
fn compress_then_eval_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    common::write_fmnet(&model);
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"em_iterations": 2, "rows_per_iteration": 1000, "activation_images": 16,
            "layer_steps": 1, "global_steps": 1, "batch_size": 16, "seed": 4}"#,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let (ok, v) = compress(&model, &config, &out);
    assert!(ok, "{v}");
    assert_eq!(
        v["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert!((v["ratio"].as_f64().unwrap() - 20.91).abs() < 0.01, "{v}");
    assert_eq!(v["layers"].as_array().unwrap().len(), 6);

    let (ok, e) = eval(&out, &[]);
    assert!(ok, "{e}");
    assert_eq!(e["compressed"], true);
    assert_eq!(e["accuracy"], v["accuracy"]);

    let (ok, e) = eval(&out, &["--arch", "fmnet-bn"]);
    assert!(!ok);
    assert_eq!(e["error"]["kind"], "invalid_parameter");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("architecture mismatch"));

    std::fs::write(&config, r#"{"block_conv": 5}"#).unwrap();
    let (ok, e) = compress(&model, &config, &out);
    assert!(!ok);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not divide"),
        "{e}"
    );
}

#[test]
fn a_model_with_a_nan_weight_is_refused_by_eval() {
    use qcl_tensor::candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    common::write_fmnet(&model);
    // The same file with one weight set to NaN (and a valid checksum: the writer's own).
    let file = qcl_tensor::SafetensorsFile::open(&model).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file
        .names()
        .iter()
        .map(|n| (n.clone(), file.tensor(n, &Device::Cpu).unwrap()))
        .collect();
    let (name, first) = tensors
        .iter_mut()
        .find(|(_, t)| t.dtype() == qcl_tensor::candle_core::DType::F32)
        .unwrap();
    let mut values = first.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[0] = f32::NAN;
    *first = Tensor::from_vec(values, first.dims(), &Device::Cpu).unwrap();
    let name = name.clone();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    qcl_tensor::write_safetensors(&model, &refs, file.metadata()).unwrap();
    let (ok, e) = eval(&model, &[]);
    assert!(!ok);
    assert_eq!(e["error"]["kind"], "non_finite", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains(&name),
        "{e}"
    );
}
