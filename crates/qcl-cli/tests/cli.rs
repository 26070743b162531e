//! The `qcl` binary: `--json` prints exactly one JSON object, on success and on failure.

use std::process::Command;

use serde_json::Value;

fn qcl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qcl"))
        .args(args)
        .output()
        .expect("qcl runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn fixture(name: &str) -> String {
    format!("{}/../../fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn data_info_json_describes_a_data_set_file() {
    let (ok, stdout, stderr) = qcl(&[
        "data",
        "info",
        &fixture("fashion-mnist.safetensors"),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["format"], "qcl-dataset/1");
    let names: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["test.images", "test.labels", "train.images", "train.labels"]
    );
    assert_eq!(
        v["tensors"][2]["shape"],
        serde_json::json!([1000, 1, 28, 28])
    );
    assert_eq!(v["tensors"][2]["dtype"], "u8");
    assert_eq!(
        v["label_counts"]["train.labels"],
        serde_json::json!(vec![100; 10])
    );
    assert_eq!(
        v["label_counts"]["test.labels"],
        serde_json::json!(vec![20; 10])
    );
    assert_eq!(v["class_names"][9], "Ankle boot");
}

#[test]
fn data_info_text_lists_tensors() {
    let (ok, stdout, _) = qcl(&["data", "info", &fixture("mnist.safetensors")]);
    assert!(ok);
    assert!(
        stdout.contains("train.images") && stdout.contains("[1000, 1, 28, 28]"),
        "{stdout}"
    );
}

#[test]
fn errors_are_one_json_object_too() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("x.safetensors");
    std::fs::write(&foreign, b"not safetensors at all").unwrap();
    for (path, kind) in [
        (foreign.to_str().unwrap(), "bad_file"),
        ("/nonexistent/file", "io"),
    ] {
        let (ok, stdout, _) = qcl(&["--json", "data", "info", path]);
        assert!(!ok);
        let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        assert_eq!(v["error"]["kind"], kind, "{stdout}");
        assert!(v["error"]["message"].as_str().unwrap().contains(path));
    }
}
