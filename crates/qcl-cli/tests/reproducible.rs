//! Every `qcl` command that writes a file writes the same bytes for the same inputs and seed,
//! on 1 and on 2 threads, wherever its output lies: no wall time, host or path in a file.

mod common;

use std::path::Path;

use common::{fixture, qcl_with_env, template_args};
use qcl_tensor::Seed;

/// Runs the command of `template` on 1 and on 2 threads, each into its own directory, and checks
/// that both runs succeed and write identical, checksummed files `name`. The template is split
/// at spaces; then `@out` stands for the run's output file, `@fmnist` for the Fashion-MNIST
/// fixture, `@bert` for the tiny BERT fixture, `@bert-model` for its weights and `@NAME` for the
/// file `NAME` in `dir` (`@run1/NAME`: an earlier command's output).
fn same_bytes_on_1_and_2_threads(dir: &Path, name: &str, template: &str) {
    let mut files = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.join(format!("run{threads}")).join(name);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let args = template_args(template, |file| match file {
            "out" => out.to_str().unwrap().to_string(),
            "fmnist" => fixture("fashion-mnist.safetensors"),
            "bert" => fixture("tiny-bert"),
            "bert-model" => format!("{}/model.safetensors", fixture("tiny-bert")),
            file => dir.join(file).to_str().unwrap().to_string(),
        });
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

/// Writes `points.safetensors` to `dir`: `x`, f32 `[600, 8]`, standard normal.
fn write_points(dir: &Path) {
    let path = dir.join("points.safetensors");
    let data = Seed::new(0).rng().normal_vec(600 * 8, 0.0, 1.0);
    let x = qcl_tensor::candle_core::Tensor::from_vec(
        data,
        (600, 8),
        &qcl_tensor::candle_core::Device::Cpu,
    )
    .unwrap();
    qcl_tensor::write_safetensors(&path, &[("x", &x)], &Default::default()).unwrap();
}

#[test]
fn kmeans_and_pq_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_points(dir);
    same_bytes_on_1_and_2_threads(
        dir,
        "centroids.safetensors",
        "kmeans --input @points.safetensors --tensor x --k 16 --iters 5 --out @out",
    );
    same_bytes_on_1_and_2_threads(
        dir,
        "pq.safetensors",
        "pq train --input @points.safetensors --tensor x --m 4 --nbits 4 --iters 5 --out @out",
    );
    same_bytes_on_1_and_2_threads(
        dir,
        "codes.safetensors",
        "pq encode --pq @run1/pq.safetensors --input @points.safetensors --tensor x --out @out",
    );
    same_bytes_on_1_and_2_threads(
        dir,
        "decoded.safetensors",
        "pq decode --pq @run1/pq.safetensors --codes @run1/codes.safetensors --out @out",
    );
}

#[test]
fn index_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_points(dir);
    same_bytes_on_1_and_2_threads(
        dir,
        "index.safetensors",
        "index build --vectors @points.safetensors --tensor x --kind ivf-pq --nlist 8 --m 4 \
         --nbits 4 --opq --opq-iterations 3 --refine 4 --train-iterations 5 --add --out @out",
    );
    same_bytes_on_1_and_2_threads(
        dir,
        "found.safetensors",
        "index search --index @run1/index.safetensors --queries @points.safetensors --tensor x \
         --k 5 --nprobe 3 --out @out",
    );
}

#[test]
fn ecvq_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["vecvq", "clg"] {
        same_bytes_on_1_and_2_threads(
            dir.path(),
            &format!("{method}.safetensors"),
            &format!(
                "ecvq --source gaussian --method {method} --lambda 4 --k 16 --steps 100 \
                 --batch 128 --train-samples 2000 --eval-samples 2000 --seed 3 --out @out"
            ),
        );
    }
}

#[test]
fn weight_compression_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    common::write_fmnet(&dir.join("model.safetensors"));
    common::write_small_wpq_config(&dir.join("config.json"));
    same_bytes_on_1_and_2_threads(
        dir,
        "fmnet.safetensors",
        "wpq compress --model @model.safetensors --arch fmnet --config @config.json \
         --data @fmnist --out @out",
    );
}

#[test]
fn text_files_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let texts = "the cat sat on the mat.\na dog runs in the park\n";
    std::fs::write(dir.join("texts.txt"), texts).unwrap();
    same_bytes_on_1_and_2_threads(
        dir,
        "calib.safetensors",
        "text calibrate --model @bert --input @texts.txt --out @out",
    );
    same_bytes_on_1_and_2_threads(
        dir,
        "compressed.safetensors",
        "wpq compress-checkpoint --checkpoint @bert-model \
         --rule encoder.layer.*.self.*.weight=pq:d=2,k=16,objective=error-feedback,finetune=1 \
         --rule encoder.layer.*.dense.weight=rtn:bits=4,group=16 \
         --calibration @run1/calib.safetensors --out @out",
    );
    same_bytes_on_1_and_2_threads(
        dir,
        "embeddings.safetensors",
        "text embed --model @bert --compressed @run1/compressed.safetensors --input @texts.txt \
         --out @out",
    );
}
