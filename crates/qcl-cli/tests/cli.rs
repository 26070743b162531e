//! The `qcl` binary: `--json` prints exactly one JSON object, on success and on failure.

mod common;

use common::{fixture, qcl_raw as qcl};
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

/// Writes `tensors` (name, rows, row length) of f32 to a safetensors file.
fn write_f32(path: &std::path::Path, tensors: &[(&str, usize, &[f32])]) {
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
fn qcl_json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = qcl(&[&["--json"], args].concat());
    assert!(ok, "qcl {args:?} failed: {stdout} {stderr}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

/// Runs `qcl --json ARGS`, expecting failure; returns the error kind and message.
fn qcl_error(args: &[&str]) -> (String, String) {
    let (ok, stdout, stderr) = qcl(&[&["--json"], args].concat());
    assert!(!ok, "qcl {args:?} succeeded: {stdout}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout} {stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let error = &v["error"];
    (
        error["kind"].as_str().unwrap().to_string(),
        error["message"].as_str().unwrap().to_string(),
    )
}

const N: usize = 300;
const D: usize = 8;

/// A temporary directory holding `data.safetensors` with `x` (f32 `[300, 8]`, standard normal)
/// and `q` (its first 5 rows), and the paths of a few files in it.
struct PqFixture {
    dir: tempfile::TempDir,
    data: Vec<f32>,
}

impl PqFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = qcl_tensor::Seed::new(0).rng().normal_vec(N * D, 0.0, 1.0);
        write_f32(
            &dir.path().join("data.safetensors"),
            &[("x", N, &data), ("q", 5, &data[..5 * D])],
        );
        PqFixture { dir, data }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `qcl pq train` with `m` and `nbits` into `out`; returns its JSON.
    fn train(&self, m: &str, nbits: &str, out: &str) -> Value {
        qcl_json(&[
            "pq",
            "train",
            "--input",
            &self.path("data.safetensors"),
            "--tensor",
            "x",
            "--m",
            m,
            "--nbits",
            nbits,
            "--iters",
            "10",
            "--seed",
            "7",
            "--out",
            &self.path(out),
        ])
    }

    /// `qcl pq encode` of `x` with the quantizer `pq` into `out`; returns its JSON.
    fn encode(&self, pq: &str, out: &str) -> Value {
        qcl_json(&[
            "pq",
            "encode",
            "--pq",
            &self.path(pq),
            "--input",
            &self.path("data.safetensors"),
            "--tensor",
            "x",
            "--out",
            &self.path(out),
        ])
    }
}

fn read_tensor(path: &str, name: &str) -> qcl_tensor::candle_core::Tensor {
    qcl_tensor::SafetensorsFile::open(path)
        .unwrap()
        .tensor(name, &qcl_tensor::candle_core::Device::Cpu)
        .unwrap()
}

#[test]
fn pq_train_encode_decode_search_round_trip() {
    let f = PqFixture::new();
    let train = f.train("4", "4", "pq.safetensors");
    assert_eq!(train["n"], N);
    assert_eq!(train["d"], D);
    assert_eq!(train["m"], 4);
    assert_eq!(train["nbits"], 4);
    assert_eq!(train["out"], f.path("pq.safetensors"));
    assert!(train["seconds"].as_f64().unwrap() >= 0.0);
    let mse = train["mse"].as_f64().unwrap();
    // 16 centroids per 2-D sub-space of a standard normal: well below the variance (d = 8).
    assert!(mse > 0.0 && mse < 4.0, "{train}");

    let encode = f.encode("pq.safetensors", "codes.safetensors");
    assert_eq!(encode["n"], N);
    assert_eq!(encode["code_size"], 2); // 4 codes of 4 bits
    assert_eq!(encode["bytes"], N * 2);
    assert_eq!(encode["out"], f.path("codes.safetensors"));
    let file = qcl_tensor::SafetensorsFile::open(f.path("codes.safetensors")).unwrap();
    assert_eq!(file.metadata()["format"], "qcl-pq-codes/1");
    assert_eq!(file.metadata()["n"], N.to_string());
    assert_eq!(file.metadata()["m"], "4");
    assert_eq!(file.metadata()["nbits"], "4");
    let codes = read_tensor(&f.path("codes.safetensors"), "codes");
    assert_eq!(codes.dtype(), qcl_tensor::candle_core::DType::U8);
    let codes: Vec<Vec<u8>> = codes.to_vec2().unwrap();
    assert_eq!((codes.len(), codes[0].len()), (N, 2));

    let decode = qcl_json(&[
        "pq",
        "decode",
        "--pq",
        &f.path("pq.safetensors"),
        "--codes",
        &f.path("codes.safetensors"),
        "--out",
        &f.path("decoded.safetensors"),
    ]);
    assert_eq!(decode["n"], N);
    assert_eq!(decode["d"], D);
    let decoded = read_tensor(&f.path("decoded.safetensors"), "x");
    assert_eq!(decoded.dims(), [N, D]);
    let decoded: Vec<Vec<f32>> = decoded.to_vec2().unwrap();
    let error = |i: usize| qcl_tensor::squared_distance(&f.data[i * D..(i + 1) * D], &decoded[i]);
    // The reported mse is the mean squared reconstruction error of the decoded file.
    let total: f64 = (0..N).map(|i| f64::from(error(i))).sum();
    assert!(
        (total / N as f64 - mse).abs() <= 1e-4 * mse,
        "{total} vs {mse}"
    );

    let search = qcl_json(&[
        "pq",
        "search",
        "--pq",
        &f.path("pq.safetensors"),
        "--codes",
        &f.path("codes.safetensors"),
        "--queries",
        &f.path("data.safetensors"),
        "--tensor",
        "q",
        "--top-k",
        "3",
    ]);
    assert_eq!(search["nq"], 5);
    assert_eq!(search["top_k"], 3);
    assert!(search["seconds"].as_f64().unwrap() >= 0.0);
    let indices = search["indices"].as_array().unwrap();
    let distances = search["distances"].as_array().unwrap();
    assert_eq!((indices.len(), distances.len()), (5, 5));
    for (q, (idx, dist)) in indices.iter().zip(distances).enumerate() {
        let idx: Vec<usize> = serde_json::from_value(idx.clone()).unwrap();
        let dist: Vec<f32> = serde_json::from_value(dist.clone()).unwrap();
        assert_eq!((idx.len(), dist.len()), (3, 3));
        assert!(dist.windows(2).all(|w| w[0] <= w[1]), "{dist:?}");
        // A database vector's own code minimises the asymmetric distance to it: rank 0 is the
        // vector itself or one with the same code, at the vector's reconstruction error.
        assert_eq!(codes[idx[0]], codes[q], "query {q}: {idx:?}");
        assert!((dist[0] - error(q)).abs() <= 1e-5 * error(q).max(1e-6));
    }

    // Text output: a line or two, no JSON.
    let (ok, stdout, stderr) = qcl(&[
        "pq",
        "encode",
        "--pq",
        &f.path("pq.safetensors"),
        "--input",
        &f.path("data.safetensors"),
        "--tensor",
        "x",
        "--out",
        &f.path("codes2.safetensors"),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("pq encode: n = 300") && stdout.lines().count() <= 2,
        "{stdout}"
    );
}

#[test]
fn pq_errors_are_typed_json_objects() {
    let f = PqFixture::new();
    f.train("4", "4", "pq4.safetensors");
    f.train("2", "4", "pq2.safetensors");
    f.train("4", "2", "pq4x2.safetensors");
    f.encode("pq4.safetensors", "codes4.safetensors");
    let pq_path = f.path("pq4.safetensors");

    // Codes of another quantizer's m or nbits, for decode and search.
    for other in ["pq2.safetensors", "pq4x2.safetensors"] {
        let (kind, message) = qcl_error(&[
            "pq",
            "decode",
            "--pq",
            &f.path(other),
            "--codes",
            &f.path("codes4.safetensors"),
            "--out",
            &f.path("never.safetensors"),
        ]);
        assert_eq!(kind, "invalid_parameter", "{message}");
        assert!(message.contains("codes4.safetensors"), "{message}");
        let (kind, _) = qcl_error(&[
            "pq",
            "search",
            "--pq",
            &f.path(other),
            "--codes",
            &f.path("codes4.safetensors"),
            "--queries",
            &f.path("data.safetensors"),
            "--tensor",
            "q",
            "--top-k",
            "1",
        ]);
        assert_eq!(kind, "invalid_parameter");
    }
    // Codes of a quantizer of the same shape but other codebooks (another seed): refused by
    // the fingerprint the codes file carries.
    qcl_json(&[
        "pq",
        "train",
        "--input",
        &f.path("data.safetensors"),
        "--tensor",
        "x",
        "--m",
        "4",
        "--nbits",
        "4",
        "--iters",
        "10",
        "--seed",
        "8",
        "--out",
        &f.path("pq4-seed8.safetensors"),
    ]);
    let (kind, message) = qcl_error(&[
        "pq",
        "decode",
        "--pq",
        &f.path("pq4-seed8.safetensors"),
        "--codes",
        &f.path("codes4.safetensors"),
        "--out",
        &f.path("never.safetensors"),
    ]);
    assert_eq!(kind, "invalid_parameter", "{message}");
    assert!(message.contains("made by sha256:"), "{message}");
    assert!(!std::path::Path::new(&f.path("never.safetensors")).exists());

    // Not a codes file: the quantizer itself, or a data file.
    for not_codes in [&pq_path, &f.path("data.safetensors")] {
        let (kind, message) = qcl_error(&[
            "pq",
            "decode",
            "--pq",
            &pq_path,
            "--codes",
            not_codes,
            "--out",
            &f.path("never.safetensors"),
        ]);
        assert_eq!(kind, "bad_file", "{message}");
    }
    // Not a quantizer.
    let (kind, _) = qcl_error(&[
        "pq",
        "encode",
        "--pq",
        &f.path("codes4.safetensors"),
        "--input",
        &f.path("data.safetensors"),
        "--tensor",
        "x",
        "--out",
        &f.path("never.safetensors"),
    ]);
    assert_eq!(kind, "bad_file");

    // A missing tensor name, for train, encode and search.
    let (kind, message) = qcl_error(&[
        "pq",
        "train",
        "--input",
        &f.path("data.safetensors"),
        "--tensor",
        "nope",
        "--m",
        "4",
        "--nbits",
        "4",
        "--out",
        &f.path("never.safetensors"),
    ]);
    assert_eq!(kind, "missing_tensor");
    assert!(message.contains("nope"), "{message}");
    let (kind, _) = qcl_error(&[
        "pq",
        "encode",
        "--pq",
        &pq_path,
        "--input",
        &f.path("data.safetensors"),
        "--tensor",
        "nope",
        "--out",
        &f.path("never.safetensors"),
    ]);
    assert_eq!(kind, "missing_tensor");
    let (kind, _) = qcl_error(&[
        "pq",
        "search",
        "--pq",
        &pq_path,
        "--codes",
        &f.path("codes4.safetensors"),
        "--queries",
        &f.path("data.safetensors"),
        "--tensor",
        "nope",
        "--top-k",
        "1",
    ]);
    assert_eq!(kind, "missing_tensor");

    // Bad training parameters: nbits 0 or 17, m not dividing d, more centroids than vectors.
    // (Out of the flags' ranges, usage errors; the others need the data to judge.)
    for (m, nbits) in [("4", "0"), ("4", "17"), ("3", "4"), ("0", "4"), ("4", "9")] {
        let (kind, message) = qcl_error(&[
            "pq",
            "train",
            "--input",
            &f.path("data.safetensors"),
            "--tensor",
            "x",
            "--m",
            m,
            "--nbits",
            nbits,
            "--out",
            &f.path("never.safetensors"),
        ]);
        let expected = if m == "0" || nbits == "0" || nbits == "17" {
            "usage"
        } else {
            "invalid_parameter"
        };
        assert_eq!(kind, expected, "m {m}, nbits {nbits}: {message}");
    }

    // Vectors of another dimension than the quantizer's.
    let wide = qcl_tensor::Seed::new(1)
        .rng()
        .normal_vec(10 * 2 * D, 0.0, 1.0);
    write_f32(&f.dir.path().join("wide.safetensors"), &[("w", 10, &wide)]);
    let (kind, _) = qcl_error(&[
        "pq",
        "encode",
        "--pq",
        &pq_path,
        "--input",
        &f.path("wide.safetensors"),
        "--tensor",
        "w",
        "--out",
        &f.path("never.safetensors"),
    ]);
    assert_eq!(kind, "shape_mismatch");
    let (kind, _) = qcl_error(&[
        "pq",
        "search",
        "--pq",
        &pq_path,
        "--codes",
        &f.path("codes4.safetensors"),
        "--queries",
        &f.path("wide.safetensors"),
        "--tensor",
        "w",
        "--top-k",
        "1",
    ]);
    assert_eq!(kind, "shape_mismatch");

    // top_k outside 1..=n.
    for k in ["0", "301"] {
        let (kind, _) = qcl_error(&[
            "pq",
            "search",
            "--pq",
            &pq_path,
            "--codes",
            &f.path("codes4.safetensors"),
            "--queries",
            &f.path("data.safetensors"),
            "--tensor",
            "q",
            "--top-k",
            k,
        ]);
        // 0 is out of the flag's range; 301 is more than the 300 codes.
        let expected = if k == "0" {
            "usage"
        } else {
            "invalid_parameter"
        };
        assert_eq!(kind, expected, "top_k {k}");
    }
    assert!(!std::path::Path::new(&f.path("never.safetensors")).exists());
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
