//! The `qcl pq` commands: train, encode, decode and search round trips, and every error they
//! report as one typed JSON object.

mod common;

use common::{qcl_error, qcl_json, qcl_raw as qcl, read_tensor, template_args, write_f32};
use serde_json::Value;

/// The arguments as `&str`s.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
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

    /// Arguments from a template split at spaces, `@NAME` standing for the path of file `NAME`
    /// here (substituted after the split: the path may hold spaces).
    fn args(&self, template: &str) -> Vec<String> {
        template_args(template, |name| self.path(name))
    }

    /// [`qcl_json`] of the template's arguments.
    fn json(&self, template: &str) -> Value {
        qcl_json(&strs(&self.args(template)))
    }

    /// [`qcl_error`] of the template's arguments.
    fn error(&self, template: &str) -> (String, String) {
        qcl_error(&strs(&self.args(template)))
    }

    /// [`qcl`] (without `--json`) of the template's arguments.
    fn raw(&self, template: &str) -> (bool, String, String) {
        qcl(&strs(&self.args(template)))
    }

    /// `qcl pq train` with `m` and `nbits` into `out`; returns its JSON.
    fn train(&self, m: &str, nbits: &str, out: &str) -> Value {
        self.json(&format!("pq train --input @data.safetensors --tensor x --m {m} --nbits {nbits} --iters 10 --seed 7 --out @{out}"))
    }

    /// `qcl pq encode` of `x` with the quantizer `pq` into `out`; returns its JSON.
    fn encode(&self, pq: &str, out: &str) -> Value {
        self.json(&format!(
            "pq encode --pq @{pq} --input @data.safetensors --tensor x --out @{out}"
        ))
    }
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

    let decode = f.json(
        "pq decode --pq @pq.safetensors --codes @codes.safetensors --out @decoded.safetensors",
    );
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

    let search = f.json("pq search --pq @pq.safetensors --codes @codes.safetensors --queries @data.safetensors --tensor q --top-k 3");
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
    let (ok, stdout, stderr) = f.raw("pq encode --pq @pq.safetensors --input @data.safetensors --tensor x --out @codes2.safetensors");
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("pq encode: n = 300") && stdout.lines().count() <= 2,
        "{stdout}"
    );
}

/// The fixture of the `pq` error tests: quantizers of shapes 4×4, 2×4 and 4×2 bits, and codes
/// of the first.
fn pq_error_fixture() -> PqFixture {
    let f = PqFixture::new();
    f.train("4", "4", "pq4.safetensors");
    f.train("2", "4", "pq2.safetensors");
    f.train("4", "2", "pq4x2.safetensors");
    f.encode("pq4.safetensors", "codes4.safetensors");
    f
}

/// Codes files of another quantizer, or files that are not codes, are typed JSON errors.
#[test]
fn pq_codes_of_another_quantizer_are_refused() {
    let f = pq_error_fixture();
    // Codes of another quantizer's m or nbits, for decode and search.
    for other in ["pq2.safetensors", "pq4x2.safetensors"] {
        let (kind, message) = f.error(&format!(
            "pq decode --pq @{other} --codes @codes4.safetensors --out @never.safetensors"
        ));
        assert_eq!(kind, "invalid_parameter", "{message}");
        assert!(message.contains("codes4.safetensors"), "{message}");
        let (kind, _) = f.error(&format!("pq search --pq @{other} --codes @codes4.safetensors --queries @data.safetensors --tensor q --top-k 1"));
        assert_eq!(kind, "invalid_parameter");
    }
    // Codes of a quantizer of the same shape but other codebooks (another seed): refused by
    // the fingerprint the codes file carries.
    f.json("pq train --input @data.safetensors --tensor x --m 4 --nbits 4 --iters 10 --seed 8 --out @pq4-seed8.safetensors");
    let (kind, message) = f.error("pq decode --pq @pq4-seed8.safetensors --codes @codes4.safetensors --out @never.safetensors");
    assert_eq!(kind, "invalid_parameter", "{message}");
    assert!(message.contains("made by sha256:"), "{message}");
    assert!(!std::path::Path::new(&f.path("never.safetensors")).exists());

    // Not a codes file: the quantizer itself, or a data file.
    for not_codes in ["pq4.safetensors", "data.safetensors"] {
        let (kind, message) = f.error(&format!(
            "pq decode --pq @pq4.safetensors --codes @{not_codes} --out @never.safetensors"
        ));
        assert_eq!(kind, "bad_file", "{message}");
    }
    // No failing command left an output behind.
    assert!(!std::path::Path::new(&f.path("never.safetensors")).exists());
}

/// A file that is not a quantizer and missing tensor names are typed JSON errors.
#[test]
fn pq_bad_files_and_tensor_names_are_typed() {
    let f = pq_error_fixture();
    // Not a quantizer.
    let (kind, _) = f.error("pq encode --pq @codes4.safetensors --input @data.safetensors --tensor x --out @never.safetensors");
    assert_eq!(kind, "bad_file");

    // A missing tensor name, for train, encode and search.
    let (kind, message) = f.error(
        "pq train --input @data.safetensors --tensor nope --m 4 --nbits 4 --out @never.safetensors",
    );
    assert_eq!(kind, "missing_tensor");
    assert!(message.contains("nope"), "{message}");
    let (kind, _) = f.error("pq encode --pq @pq4.safetensors --input @data.safetensors --tensor nope --out @never.safetensors");
    assert_eq!(kind, "missing_tensor");
    let (kind, _) = f.error("pq search --pq @pq4.safetensors --codes @codes4.safetensors --queries @data.safetensors --tensor nope --top-k 1");
    assert_eq!(kind, "missing_tensor");
    // No failing command left an output behind.
    assert!(!std::path::Path::new(&f.path("never.safetensors")).exists());
}

/// Bad training parameters, vectors of another dimension and `top_k` out of range are typed
/// JSON errors.
#[test]
fn pq_bad_parameters_and_shapes_are_typed() {
    let f = pq_error_fixture();
    // Bad training parameters: nbits 0 or 17, m not dividing d, more centroids than vectors.
    // (Out of the flags' ranges, usage errors; the others need the data to judge.)
    for (m, nbits) in [("4", "0"), ("4", "17"), ("3", "4"), ("0", "4"), ("4", "9")] {
        let (kind, message) = f.error(&format!("pq train --input @data.safetensors --tensor x --m {m} --nbits {nbits} --out @never.safetensors"));
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
    let (kind, _) = f.error("pq encode --pq @pq4.safetensors --input @wide.safetensors --tensor w --out @never.safetensors");
    assert_eq!(kind, "shape_mismatch");
    let (kind, _) = f.error("pq search --pq @pq4.safetensors --codes @codes4.safetensors --queries @wide.safetensors --tensor w --top-k 1");
    assert_eq!(kind, "shape_mismatch");

    // top_k outside 1..=n.
    for k in ["0", "301"] {
        let (kind, _) = f.error(&format!("pq search --pq @pq4.safetensors --codes @codes4.safetensors --queries @data.safetensors --tensor q --top-k {k}"));
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
