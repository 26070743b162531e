//! Shared by the CLI test binaries: run `qcl`, read its one JSON object, find fixtures.
#![allow(dead_code)] // each test binary uses a part

use std::process::Command;

use serde_json::Value;

/// Runs `qcl args…`: (exit success, stdout, stderr).
pub fn qcl_raw(args: &[&str]) -> (bool, String, String) {
    qcl_with_env(args, &[])
}

/// Runs `qcl args…` with extra environment variables: (exit success, stdout, stderr).
pub fn qcl_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qcl"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("qcl runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `qcl args…` (with `--json` among them): (exit success, the one JSON object on stdout).
pub fn qcl(args: &[&str]) -> (bool, Value) {
    let (ok, stdout, _) = qcl_raw(args);
    let v =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("one JSON object: {stdout}"));
    (ok, v)
}

/// Path of a committed fixture file.
pub fn fixture(name: &str) -> String {
    format!("{}/../../fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Writes an FMNet model (seed 1) to `path`, the dense model the weight-PQ commands read.
pub fn write_fmnet(path: &std::path::Path) {
    qcl_wpq::Model::new(qcl_wpq::Arch::FmNet, qcl_tensor::Seed::new(1))
        .unwrap()
        .save(path)
        .unwrap();
}

/// A `qcl wpq compress` configuration small enough for a test (1 EM iteration, 1 step each),
/// written to `path`.
pub fn write_small_wpq_config(path: &std::path::Path) {
    std::fs::write(
        path,
        r#"{"em_iterations": 1, "rows_per_iteration": 500, "activation_images": 8,
            "layer_steps": 1, "global_steps": 1, "batch_size": 8, "seed": 4}"#,
    )
    .unwrap();
}

/// Writes `tensors` (name, rows, row length) of f32 to a safetensors file.
pub fn write_f32(path: &std::path::Path, tensors: &[(&str, usize, &[f32])]) {
    use qcl_tensor::candle_core::{Device, Tensor};
    let tensors: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|&(name, rows, data)| {
            let t = Tensor::from_vec(data.to_vec(), (rows, data.len() / rows), &Device::Cpu);
            (name, t.unwrap())
        })
        .collect();
    let refs: Vec<(&str, &qcl_tensor::candle_core::Tensor)> =
        tensors.iter().map(|(n, t)| (*n, t)).collect();
    qcl_tensor::write_safetensors(path, &refs, &Default::default()).unwrap();
}

/// Runs `qcl --json ARGS`, expecting success; returns the one JSON object printed.
pub fn qcl_json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = qcl_raw(&[&["--json"], args].concat());
    assert!(ok, "qcl {args:?} failed: {stdout} {stderr}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

/// Runs `qcl --json ARGS`, expecting failure; returns the error kind and message.
pub fn qcl_error(args: &[&str]) -> (String, String) {
    let (ok, stdout, stderr) = qcl_raw(&[&["--json"], args].concat());
    assert!(!ok, "qcl {args:?} succeeded: {stdout}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout} {stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let error = &v["error"];
    (
        error["kind"].as_str().unwrap().to_string(),
        error["message"].as_str().unwrap().to_string(),
    )
}

/// Tensor `name` of the safetensors file at `path`.
pub fn read_tensor(path: &str, name: &str) -> qcl_tensor::candle_core::Tensor {
    qcl_tensor::SafetensorsFile::open(path)
        .unwrap()
        .tensor(name, &qcl_tensor::candle_core::Device::Cpu)
        .unwrap()
}

/// Arguments from a template split at spaces, each token `@NAME` replaced by `path(NAME)`
/// (after the split, so that paths may hold spaces).
pub fn template_args(template: &str, path: impl Fn(&str) -> String) -> Vec<String> {
    template
        .split_whitespace()
        .map(|token| match token.strip_prefix('@') {
            Some(name) => path(name),
            None => token.to_string(),
        })
        .collect()
}
