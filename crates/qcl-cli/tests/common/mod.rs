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
