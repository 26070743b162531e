//! The `qcl` binary: `--json` prints exactly one JSON object, on success and on failure.

mod common;

use common::{fixture, qcl_error, qcl_json, qcl_raw as qcl, read_tensor, write_f32};
use serde_json::Value;

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

#[test]
fn usage_errors_are_one_json_object_with_json() {
    let (ok, stdout, _) = qcl(&["kmeans", "--json", "--k", "abc"]);
    assert!(!ok);
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["error"]["kind"], "usage", "{stdout}");
}

#[test]
fn bench_train_reports_throughput_as_json() {
    let v = qcl_json(&[
        "bench", "train", "--model", "vq-ae", "--batch", "4", "--steps", "1", "--warmup", "0",
    ]);
    assert_eq!(v["model"], "vq_ae", "{v}");
    assert_eq!(v["batch"], 4);
    assert_eq!(v["steps"], 1);
    assert!(v["threads"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["samples_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["final_loss"].as_f64().unwrap().is_finite(), "{v}");
    if cfg!(target_os = "linux") {
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0, "{v}");
    } else {
        assert!(v["peak_rss_bytes"].is_null(), "{v}");
    }
}

#[test]
fn bench_train_text_is_one_line() {
    let (ok, stdout, stderr) = qcl(&[
        "bench", "train", "--model", "vq_ae", "--batch", "2", "--steps", "1", "--warmup", "0",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("vq_ae: ") && stdout.contains("samples/s"),
        "{stdout}"
    );
}

#[test]
fn bench_train_errors_are_typed_json_objects() {
    let (kind, message) = qcl_error(&["bench", "train", "--model", "resnet50"]);
    assert_eq!(kind, "invalid_parameter");
    assert!(message.contains("resnet50"), "{message}");
    // Out of the flags' ranges: usage errors naming the flag.
    for (flag, value) in [("--batch", "0"), ("--steps", "0"), ("--batch", "100000")] {
        let (kind, message) = qcl_error(&["bench", "train", "--model", "vq-ae", flag, value]);
        assert_eq!(kind, "usage", "{flag} {value}");
        assert!(message.contains(&flag[2..]), "{message}");
    }
    // Not a number at all: a usage error, still one JSON object.
    let (kind, _) = qcl_error(&["bench", "train", "--model", "vq-ae", "--batch", "-1"]);
    assert_eq!(kind, "usage");
}

#[test]
fn ecvq_reports_rate_distortion_and_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.safetensors");
    for method in ["vecvq", "clg"] {
        let v = qcl_json(&[
            "ecvq",
            "--source",
            "gaussian",
            "--method",
            method,
            "--lambda",
            "4",
            "--k",
            "32",
            "--steps",
            "300",
            "--batch",
            "256",
            "--train-samples",
            "5000",
            "--eval-samples",
            "20000",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        for key in [
            "source",
            "method",
            "lambda",
            "rate_bits",
            "entropy_bits",
            "coded_bits",
            "distortion",
            "used_codes",
            "gap_db",
            "train_seconds",
        ] {
            assert!(v.get(key).is_some(), "{method}: `{key}` missing from {v}");
        }
        assert_eq!(v["method"], method);
        let (rate, entropy) = (
            v["rate_bits"].as_f64().unwrap(),
            v["entropy_bits"].as_f64().unwrap(),
        );
        assert!(rate >= entropy - 1e-9 && rate > 1.0, "{v}");
        // Above D(R) = 2·2^(−R).
        assert!(
            v["distortion"].as_f64().unwrap() > 2.0 * (-rate).exp2(),
            "{v}"
        );
        assert!(v["gap_db"].as_f64().unwrap() > 0.0);
        assert!(v["used_codes"].as_u64().unwrap() <= 32);
        assert!(qcl_ecvq::Ecvq::load(&out).is_ok());
    }
}

#[test]
fn ecvq_refuses_bad_lambda_and_unknown_sources() {
    for lambda in ["0", "-2", "nan", "inf"] {
        let flag = format!("--lambda={lambda}");
        let (kind, message) = qcl_error(&["ecvq", &flag, "--steps", "10", "--json"]);
        assert_eq!(kind, "usage", "{lambda}: {message}");
        assert!(message.contains("lambda"), "{message}");
    }
    let (kind, _) = qcl_error(&["ecvq", "--lambda", "1", "--source", "uniform", "--json"]);
    assert_eq!(kind, "invalid_parameter");
    let (kind, _) = qcl_error(&[
        "ecvq", "--lambda", "1", "--k", "0", "--steps", "10", "--json",
    ]);
    assert_eq!(kind, "usage");
}

#[test]
fn kmeans_algorithms_agree_and_report_their_distance_share() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("points.safetensors");
    let points = qcl_tensor::Seed(5).rng().normal_vec(600 * 3, 0.0, 1.0);
    write_f32(&input, &[("x", 600, &points)]);
    let input = input.to_str().unwrap();
    let mut centroids = Vec::new();
    for algorithm in ["lloyd", "hamerly", "yinyang", "auto"] {
        let out = dir.path().join(format!("{algorithm}.safetensors"));
        let report = qcl_json(&[
            "kmeans",
            "--input",
            input,
            "--tensor",
            "x",
            "--k",
            "24",
            "--iters",
            "8",
            "--seed",
            "3",
            "--algorithm",
            algorithm,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(report["algorithm"], algorithm);
        let share: Vec<f64> = serde_json::from_value(report["distance_share"].clone()).unwrap();
        assert_eq!(share.len(), report["iters"].as_u64().unwrap() as usize);
        assert!(
            share.iter().all(|&s| s > 0.0 && s <= 1.0 + 1e-9),
            "{report}"
        );
        if algorithm == "lloyd" {
            assert!(share.iter().all(|&s| s == 1.0));
            assert_eq!(report["bound_bytes"], 0);
        }
        centroids.push(
            read_tensor(out.to_str().unwrap(), "centroids")
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    assert!(centroids.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn out_naming_an_input_or_a_directory_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("points.safetensors");
    let points = qcl_tensor::Seed(6).rng().normal_vec(100 * 2, 0.0, 1.0);
    write_f32(&input, &[("x", 100, &points)]);
    let before = std::fs::read(&input).unwrap();
    let path = input.to_str().unwrap();
    for out in [path, dir.path().to_str().unwrap()] {
        let (kind, message) = qcl_error(&[
            "kmeans", "--input", path, "--tensor", "x", "--k", "4", "--out", out,
        ]);
        assert_eq!(kind, "invalid_parameter", "{message}");
        assert!(message.contains("refusing"), "{message}");
        let (kind, _) = qcl_error(&[
            "pq", "train", "--input", path, "--tensor", "x", "--m", "1", "--nbits", "2", "--out",
            out,
        ]);
        assert_eq!(kind, "invalid_parameter");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn a_reader_that_went_away_ends_the_output_quietly() {
    // The pipe's read end is closed before qcl writes: every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_qcl"))
        .args(["--json", "data", "info", &fixture("mnist.safetensors")])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // 141 = 128 + SIGPIPE, the status a shell shows for a writer whose reader went away.
    assert!(
        output.status.code().is_some_and(|c| c == 141),
        "{:?} {stderr}",
        output.status
    );
}

#[test]
fn out_of_range_kmeans_counts_are_typed_errors() {
    let mnist = fixture("mnist.safetensors");
    let huge = "18446744073709551615";
    for (k, iters) in [("4", huge), (huge, "10")] {
        let (kind, message) = qcl_error(&[
            "kmeans",
            "--input",
            &mnist,
            "--tensor",
            "train.images",
            "--k",
            k,
            "--iters",
            iters,
        ]);
        assert_eq!(kind, "usage", "k {k} iters {iters}: {message}");
        assert!(
            message.contains(if k == huge { "--k" } else { "--iters" }),
            "{message}"
        );
    }
}

#[cfg(unix)]
#[test]
fn paths_that_are_not_utf8_work() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.safetensors");
    let input = dir.path().join(name);
    let data: Vec<f32> = (0..40 * 3).map(|i| (i % 7) as f32).collect();
    let x = qcl_tensor::candle_core::Tensor::from_vec(
        data,
        (40, 3),
        &qcl_tensor::candle_core::Device::Cpu,
    )
    .unwrap();
    qcl_tensor::write_safetensors(&input, &[("x", &x)], &Default::default()).unwrap();
    let out = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"out-\xff.safetensors"));
    let run = |args: Vec<&std::ffi::OsStr>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qcl"))
            .args(args)
            .output()
            .unwrap()
    };
    let s = std::ffi::OsStr::new;
    let output = run(vec![
        s("kmeans"),
        s("--input"),
        input.as_os_str(),
        s("--tensor"),
        s("x"),
        s("--k"),
        s("3"),
        s("--out"),
        out.as_os_str(),
        s("--json"),
    ]);
    assert!(output.status.success(), "{output:?}");
    assert!(qcl_pq::KMeans::load(&out).is_ok());
    // A flag value that is not UTF-8 where text is needed: a usage error, one JSON object.
    let output = run(vec![
        s("kmeans"),
        s("--input"),
        input.as_os_str(),
        s("--tensor"),
        std::ffi::OsStr::from_bytes(b"\xff"),
        s("--k"),
        s("3"),
        s("--json"),
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let v: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "usage");
    // Reading a file that is not a model, by a non-UTF-8 path: a typed error, no panic.
    for args in [
        vec![
            s("wpq"),
            s("eval"),
            s("--model"),
            input.as_os_str(),
            s("--json"),
        ],
        vec![s("data"), s("info"), out.as_os_str(), s("--json")],
    ] {
        let output = run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        let v: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(
            output.status.code() == Some(1) || output.status.success(),
            "{v}"
        );
    }
}

#[test]
fn a_file_from_before_checksums_loads_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.safetensors");
    let x =
        qcl_tensor::candle_core::Tensor::new(&[1f32, 2.0], &qcl_tensor::candle_core::Device::Cpu)
            .unwrap();
    let meta = std::collections::BTreeMap::from([("format".to_string(), "qcl-test/1".to_string())]);
    qcl_tensor::write_safetensors(&path, &[("x", &x)], &meta).unwrap();
    // Rename the checksum key to one no reader knows: the file as an older qcl wrote it.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(8).position(|w| w == b"checksum").unwrap();
    bytes[at..at + 8].copy_from_slice(b"xhecksum");
    std::fs::write(&path, &bytes).unwrap();
    let (ok, stdout, stderr) = qcl(&["data", "info", path.to_str().unwrap(), "--json"]);
    assert!(ok, "{stdout}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let notes = v["notes"].as_array().unwrap();
    assert!(notes[0].as_str().unwrap().contains("no checksum"), "{v}");
    assert!(stderr.contains("note:"), "{stderr}");
    // A damaged file is an error, not a note.
    let last = bytes.len() - 1;
    bytes[at..at + 8].copy_from_slice(b"checksum");
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (kind, message) = qcl_error(&["data", "info", path.to_str().unwrap()]);
    assert_eq!(kind, "bad_file", "{message}");
    assert!(message.contains("checksum"), "{message}");
}

#[test]
fn help_and_version_under_json_are_one_object() {
    for args in [
        &["--help", "--json"][..],
        &["kmeans", "--help", "--json"],
        &["--version", "--json"],
    ] {
        let (ok, stdout, _) = qcl(args);
        assert!(ok, "{args:?}");
        let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        assert!(!v["help"].as_str().unwrap().is_empty(), "{v}");
    }
}
