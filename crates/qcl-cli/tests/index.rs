//! `qcl index build|add|remove|search|info`: round trips on random vectors, JSON output, the
//! same bytes for the same command, and bad inputs refused with typed errors.

mod common;

use std::path::Path;

use common::qcl_raw;
use qcl_tensor::candle_core::{DType, Device, Tensor};
use qcl_tensor::Seed;
use serde_json::Value;

const N: usize = 2_000;
const D: usize = 16;

/// Writes named tensors to a safetensors file.
fn write(path: &Path, tensors: &[(&str, Tensor)]) {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    qcl_tensor::write_safetensors(path, &refs, &Default::default()).unwrap();
}

fn matrix(rows: &[f32], d: usize) -> Tensor {
    Tensor::from_vec(rows.to_vec(), (rows.len() / d, d), &Device::Cpu).unwrap()
}

/// A temporary directory with `base.safetensors` (`x`: f32 `[2000, 16]`, standard normal),
/// `more.safetensors` (`x`: 100 other rows) and `queries.safetensors` (`q`: the first 20
/// rows of the base, `q8`: 20 rows of 8).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = Seed::new(0).rng().normal_vec(N * D, 0.0, 1.0);
        let more = Seed::new(1).rng().normal_vec(100 * D, 0.0, 1.0);
        write(
            &dir.path().join("base.safetensors"),
            &[("x", matrix(&base, D))],
        );
        write(
            &dir.path().join("more.safetensors"),
            &[("x", matrix(&more, D))],
        );
        write(
            &dir.path().join("queries.safetensors"),
            &[
                ("q", matrix(&base[..20 * D], D)),
                ("q8", matrix(&base[..20 * 8], 8)),
            ],
        );
        Fixture { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `qcl index build --vectors base.safetensors --out OUT ARGS… --json`.
    fn build(&self, out: &str, args: &[&str]) -> Value {
        let base = self.path("base.safetensors");
        let out = self.path(out);
        let mut all = vec![
            "index",
            "build",
            "--vectors",
            &base,
            "--out",
            &out,
            "--train-iterations",
            "8",
        ];
        all.extend(args);
        qcl_json(&all)
    }
}

/// Runs `qcl --json ARGS`, expecting success; returns the one JSON object printed.
fn qcl_json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = qcl_raw(&[&["--json"], args].concat());
    assert!(ok, "qcl {args:?} failed: {stdout} {stderr}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

/// Runs `qcl --json ARGS`, expecting failure; returns the error kind and message.
fn qcl_error(args: &[&str]) -> (String, String) {
    let (ok, stdout, _) = qcl_raw(&[&["--json"], args].concat());
    assert!(!ok, "qcl {args:?} succeeded: {stdout}");
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let error = &v["error"];
    (
        error["kind"].as_str().unwrap().to_string(),
        error["message"].as_str().unwrap().to_string(),
    )
}

fn info(index: &str) -> Value {
    qcl_json(&["index", "info", "--index", index])
}

/// `qcl index search` of tensor `tensor` of `queries`, `k` neighbours, with `extra` flags.
fn search(index: &str, queries: &str, tensor: &str, k: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "index",
        "search",
        "--index",
        index,
        "--queries",
        queries,
        "--tensor",
        tensor,
        "--k",
        k,
    ];
    args.extend(extra);
    qcl_json(&args)
}

/// The arguments of `qcl index add` of the vectors of `vectors` to `index`, then `extra`.
fn add_args<'a>(index: &'a str, vectors: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["index", "add", "--index", index, "--vectors", vectors];
    args.extend(extra);
    args
}

/// The first id of every row of a search's `first_ids`.
fn first_ids(search: &Value) -> Vec<i64> {
    search["first_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0].as_i64().unwrap())
        .collect()
}

/// Builds, describes, searches, adds to (in place, then with given ids) and searches again an
/// index of kind `kind`; with exact re-ranking every query's own id comes back first.
fn round_trip(build_args: &[&str], kind: &str, search_args: &[&str]) {
    let f = Fixture::new();
    let built = f.build("index.safetensors", build_args);
    let index = f.path("index.safetensors");
    assert_eq!(
        (built["n"].as_u64(), built["d"].as_u64()),
        (Some(N as u64), Some(D as u64))
    );
    assert_eq!(built["added"], N);
    assert_eq!(built["info"]["kind"], kind);
    assert_eq!(built["out"], index);

    let described = info(&index);
    assert_eq!(described["kind"], kind);
    assert_eq!(described["dim"], D);
    assert_eq!(described["vectors"], N);
    assert_eq!(described["k_factor"], 8);
    assert_eq!(described["file_bytes"], built["file_bytes"]);
    assert!(described["memory_bytes"].as_u64().unwrap() > (N * D * 4) as u64);

    let queries = f.path("queries.safetensors");
    let results = f.path("results.safetensors");
    let mut extra = search_args.to_vec();
    extra.extend(["--out", &results]);
    let found = search(&index, &queries, "q", "5", &extra);
    assert_eq!(found["nq"], 20);
    assert_eq!(found["k"], 5);
    assert!(found["queries_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(first_ids(&found), (0..10).collect::<Vec<i64>>());
    let file = qcl_tensor::SafetensorsFile::open(&results).unwrap();
    let ids = file.tensor("ids", &Device::Cpu).unwrap();
    let scores = file.tensor("scores", &Device::Cpu).unwrap();
    assert_eq!((ids.dtype(), scores.dtype()), (DType::I64, DType::F32));
    assert_eq!(
        (ids.dims(), scores.dims()),
        ([20, 5].as_slice(), [20, 5].as_slice())
    );
    let ids: Vec<Vec<i64>> = ids.to_vec2().unwrap();
    let scores: Vec<Vec<f32>> = scores.to_vec2().unwrap();
    for (q, (ids, scores)) in ids.iter().zip(&scores).enumerate() {
        assert_eq!(ids[0], q as i64, "query {q}: {ids:?}");
        assert_eq!(scores[0], 0.0, "the exact distance to itself");
        assert!(scores.windows(2).all(|w| w[0] <= w[1]), "{scores:?}");
    }
    assert_eq!(file.metadata()["metric"], "l2");

    // In place: the ids continue from 2000.
    let more = f.path("more.safetensors");
    let added = qcl_json(&add_args(&index, &more, &[]));
    assert_eq!(added["added"], 100);
    assert_eq!(added["ids"], serde_json::json!([2000, 2100]));
    assert_eq!(added["out"], index);
    assert_eq!(info(&index)["vectors"], N + 100);
    let found = search(&index, &more, "x", "3", search_args);
    assert_eq!(first_ids(&found), (2000..2010).collect::<Vec<i64>>());

    // Given ids (u32), into another file; the input stays as it was.
    let ids = f.path("ids.safetensors");
    let given: Vec<u32> = (0..100).map(|i| 50_000 + 7 * i).collect();
    write(
        Path::new(&ids),
        &[("ids", Tensor::new(given.as_slice(), &Device::Cpu).unwrap())],
    );
    let bigger = f.path("bigger.safetensors");
    let before = std::fs::read(&index).unwrap();
    qcl_json(&add_args(
        &index,
        &more,
        &["--tensor", "x", "--ids", &ids, "--out", &bigger],
    ));
    assert_eq!(std::fs::read(&index).unwrap(), before);
    assert_eq!(info(&bigger)["vectors"], N + 200);
    let found = search(&bigger, &more, "x", "2", search_args);
    let firsts = first_ids(&found);
    // Each of the 100 rows is in the index twice now (ids 2000 + i and 50,000 + 7i), at the
    // same exact distance 0: the lower id wins the tie.
    assert_eq!(firsts, (2000..2010).collect::<Vec<i64>>());
    let second: Vec<i64> = found["first_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[1].as_i64().unwrap())
        .collect();
    assert_eq!(
        second,
        (0..10).map(|i| 50_000 + 7 * i).collect::<Vec<i64>>()
    );

    // Removing ids (i64; absent ones ignored).
    let doomed = f.path("doomed.safetensors");
    write(
        Path::new(&doomed),
        &[(
            "ids",
            Tensor::new(&[0i64, 1, 999_999], &Device::Cpu).unwrap(),
        )],
    );
    let removed = qcl_json(&["index", "remove", "--index", &bigger, "--ids", &doomed]);
    assert_eq!(
        (removed["asked"].as_u64(), removed["removed"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(info(&bigger)["vectors"], N + 198);
    let found = search(&bigger, &queries, "q", "1", search_args);
    let firsts = first_ids(&found);
    assert!(firsts[0] != 0 && firsts[1] != 1, "removed: {firsts:?}");
    assert_eq!(firsts[2..], (2..10).collect::<Vec<i64>>()[..]);
}

#[test]
fn pq_with_opq_and_refine_round_trip() {
    round_trip(
        &[
            "--m",
            "8",
            "--nbits",
            "4",
            "--opq",
            "--opq-iterations",
            "3",
            "--refine",
            "8",
            "--add",
        ],
        "refine+opq+pq",
        &[],
    );
}

#[test]
fn ivf_pq_with_refine_round_trip() {
    round_trip(
        &[
            "--kind", "ivf-pq", "--nlist", "16", "--m", "4", "--refine", "8", "--add",
        ],
        "refine+ivf-pq",
        &["--nprobe", "16"],
    );
}

#[test]
fn flat_pq_with_inner_product_finds_the_largest_dot_products() {
    let f = Fixture::new();
    f.build(
        "ip.safetensors",
        &["--m", "8", "--metric", "ip", "--refine", "16", "--add"],
    );
    let index = f.path("ip.safetensors");
    assert_eq!(info(&index)["metric"], "ip");
    let queries = f.path("queries.safetensors");
    let results = f.path("found.safetensors");
    search(&index, &queries, "q", "4", &["--out", &results]);
    let file = qcl_tensor::SafetensorsFile::open(&results).unwrap();
    let scores: Vec<Vec<f32>> = file
        .tensor("scores", &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    for row in &scores {
        assert!(
            row.windows(2).all(|w| w[0] >= w[1]),
            "similarities fall: {row:?}"
        );
    }
    assert_eq!(file.metadata()["metric"], "ip");
}

#[test]
fn bad_inputs_are_typed_errors_that_name_the_problem() {
    let f = Fixture::new();
    let index = f.path("index.safetensors");
    let base = f.path("base.safetensors");
    let queries = f.path("queries.safetensors");
    f.build("index.safetensors", &["--m", "4", "--add"]);
    let build = |extra: &[&str]| {
        let mut args = vec!["index", "build", "--vectors", &base, "--out", &index];
        args.extend(extra);
        qcl_error(&args)
    };
    let (kind, message) = build(&["--nbits", "5"]);
    assert_eq!(kind, "invalid_parameter");
    assert!(message.contains("nbits"), "{message}");
    let (_, message) = build(&["--nlist", "4"]);
    assert!(message.contains("ivf-pq"), "{message}");
    let (_, message) = build(&["--m", "5"]);
    assert!(message.contains("divide"), "{message}");
    let (_, message) = build(&["--metric", "manhattan"]);
    assert!(message.contains("manhattan"), "{message}");

    // Queries of another dimension, nprobe on a flat index, k_factor without re-ranking.
    let (kind, message) = qcl_error(&[
        "index",
        "search",
        "--index",
        &index,
        "--queries",
        &queries,
        "--tensor",
        "q8",
    ]);
    assert_eq!(kind, "shape_mismatch");
    assert!(message.contains("dimension 16"), "{message}");
    let search = |extra: &[&str]| {
        let mut args = vec!["index", "search", "--index", &index, "--queries", &queries];
        args.extend(["--tensor", "q"]);
        args.extend(extra);
        qcl_error(&args)
    };
    let (_, message) = search(&["--nprobe", "2"]);
    assert!(message.contains("nprobe"), "{message}");
    let (_, message) = search(&["--k-factor", "2"]);
    assert!(
        message.contains("k_factor") || message.contains("k-factor"),
        "{message}"
    );

    // Ids already in the index.
    let ids = f.path("taken.safetensors");
    write(
        Path::new(&ids),
        &[("ids", Tensor::arange(0i64, 100, &Device::Cpu).unwrap())],
    );
    let more = f.path("more.safetensors");
    let before = std::fs::read(&index).unwrap();
    let (_, message) = qcl_error(&add_args(&index, &more, &["--ids", &ids]));
    assert!(message.contains("0"), "{message}");
    assert_eq!(
        std::fs::read(&index).unwrap(),
        before,
        "a failed add leaves the index"
    );

    // A foreign file and a damaged index.
    let (_, message) = qcl_error(&["index", "info", "--index", &base]);
    assert!(message.contains("index"), "{message}");
    let damaged = f.path("damaged.safetensors");
    let mut bytes = before.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&damaged, &bytes).unwrap();
    let (kind, message) = qcl_error(&["index", "info", "--index", &damaged]);
    assert_eq!(kind, "bad_file", "{message}");
}

#[test]
fn text_output_describes_the_index() {
    let f = Fixture::new();
    f.build("index.safetensors", &["--m", "4", "--add"]);
    let (ok, stdout, stderr) = qcl_raw(&["index", "info", "--index", &f.path("index.safetensors")]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("kind") && stdout.contains("pq"), "{stdout}");
    assert!(stdout.contains(&N.to_string()), "{stdout}");
}
