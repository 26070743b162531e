//! Every `qcl` command that writes a file writes the same bytes for the same inputs and seed,
//! on 1 and on 2 threads, wherever its output lies: no wall time, host or path in a file.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, qcl_with_env};
use qcl_tensor::Seed;

/// Runs the command `args(out)` on 1 and on 2 threads, each into its own directory, and checks
/// that both runs succeed and write identical, checksummed files.
fn same_bytes_on_1_and_2_threads(dir: &Path, name: &str, args: impl Fn(&str) -> Vec<String>) {
    let mut files = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.join(format!("run{threads}")).join(name);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let args = args(out.to_str().unwrap());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = qcl_with_env(&args, &[("RAYON_NUM_THREADS", threads)]);
        assert!(ok, "{name} on {threads} threads: {stdout}{stderr}");
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(
        files[0] == files[1],
        "{name}: 1 and 2 threads wrote different bytes"
    );
    // Checksummed (some formats hold dtypes only their own reader takes, so look at the bytes).
    let bytes = qcl_tensor::read_safetensors_bytes(&dir.join("run1").join(name)).unwrap();
    let needle = format!("\"{}\":\"crc32:", qcl_tensor::CHECKSUM_KEY);
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "{name} has no checksum"
    );
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn write_points(dir: &Path) -> PathBuf {
    let path = dir.join("points.safetensors");
    let data = Seed::new(0).rng().normal_vec(600 * 8, 0.0, 1.0);
    let x = qcl_tensor::candle_core::Tensor::from_vec(
        data,
        (600, 8),
        &qcl_tensor::candle_core::Device::Cpu,
    )
    .unwrap();
    qcl_tensor::write_safetensors(&path, &[("x", &x)], &Default::default()).unwrap();
    path
}

#[test]
fn kmeans_and_pq_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let points = write_points(dir.path());
    let points = points.to_str().unwrap();
    same_bytes_on_1_and_2_threads(dir.path(), "centroids.safetensors", |out| {
        strings(&[
            "kmeans", "--input", points, "--tensor", "x", "--k", "16", "--iters", "5", "--out", out,
        ])
    });
    same_bytes_on_1_and_2_threads(dir.path(), "pq.safetensors", |out| {
        strings(&[
            "pq", "train", "--input", points, "--tensor", "x", "--m", "4", "--nbits", "4",
            "--iters", "5", "--out", out,
        ])
    });
    let pq = dir.path().join("run1/pq.safetensors");
    let pq = pq.to_str().unwrap();
    same_bytes_on_1_and_2_threads(dir.path(), "codes.safetensors", |out| {
        strings(&[
            "pq", "encode", "--pq", pq, "--input", points, "--tensor", "x", "--out", out,
        ])
    });
    let codes = dir.path().join("run1/codes.safetensors");
    let codes = codes.to_str().unwrap();
    same_bytes_on_1_and_2_threads(dir.path(), "decoded.safetensors", |out| {
        strings(&["pq", "decode", "--pq", pq, "--codes", codes, "--out", out])
    });
}

#[test]
fn index_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let points = write_points(dir.path());
    let points = points.to_str().unwrap();
    same_bytes_on_1_and_2_threads(dir.path(), "index.safetensors", |out| {
        strings(&[
            "index",
            "build",
            "--vectors",
            points,
            "--tensor",
            "x",
            "--kind",
            "ivf-pq",
            "--nlist",
            "8",
            "--m",
            "4",
            "--nbits",
            "4",
            "--opq",
            "--opq-iterations",
            "3",
            "--refine",
            "4",
            "--train-iterations",
            "5",
            "--add",
            "--out",
            out,
        ])
    });
    let index = dir.path().join("run1/index.safetensors");
    let index = index.to_str().unwrap();
    same_bytes_on_1_and_2_threads(dir.path(), "found.safetensors", |out| {
        strings(&[
            "index",
            "search",
            "--index",
            index,
            "--queries",
            points,
            "--tensor",
            "x",
            "--k",
            "5",
            "--nprobe",
            "3",
            "--out",
            out,
        ])
    });
}

#[test]
fn ecvq_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["vecvq", "clg"] {
        same_bytes_on_1_and_2_threads(dir.path(), &format!("{method}.safetensors"), |out| {
            strings(&[
                "ecvq",
                "--source",
                "gaussian",
                "--method",
                method,
                "--lambda",
                "4",
                "--k",
                "16",
                "--steps",
                "100",
                "--batch",
                "128",
                "--train-samples",
                "2000",
                "--eval-samples",
                "2000",
                "--seed",
                "3",
                "--out",
                out,
            ])
        });
    }
}

#[test]
fn weight_compression_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    common::write_fmnet(&model);
    let config = dir.path().join("config.json");
    common::write_small_wpq_config(&config);
    let data = fixture("fashion-mnist.safetensors");
    same_bytes_on_1_and_2_threads(dir.path(), "fmnet.safetensors", |out| {
        strings(&[
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
            out,
        ])
    });
}

#[test]
fn text_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let bert = fixture("tiny-bert");
    let texts = dir.path().join("texts.txt");
    std::fs::write(&texts, "the cat sat on the mat.\na dog runs in the park\n").unwrap();
    let texts = texts.to_str().unwrap();
    same_bytes_on_1_and_2_threads(dir.path(), "calib.safetensors", |out| {
        strings(&[
            "text",
            "calibrate",
            "--model",
            &bert,
            "--input",
            texts,
            "--out",
            out,
        ])
    });
    let calib = dir.path().join("run1/calib.safetensors");
    let checkpoint = format!("{bert}/model.safetensors");
    same_bytes_on_1_and_2_threads(dir.path(), "compressed.safetensors", |out| {
        strings(&[
            "wpq",
            "compress-checkpoint",
            "--checkpoint",
            &checkpoint,
            "--rule",
            "encoder.layer.*.self.*.weight=pq:d=2,k=16,objective=error-feedback,finetune=1",
            "--rule",
            "encoder.layer.*.dense.weight=rtn:bits=4,group=16",
            "--calibration",
            calib.to_str().unwrap(),
            "--out",
            out,
        ])
    });
    let compressed = dir.path().join("run1/compressed.safetensors");
    same_bytes_on_1_and_2_threads(dir.path(), "embeddings.safetensors", |out| {
        strings(&[
            "text",
            "embed",
            "--model",
            &bert,
            "--compressed",
            compressed.to_str().unwrap(),
            "--input",
            texts,
            "--out",
            out,
        ])
    });
}
