//! `qcl text calibrate`, `qcl wpq compress-checkpoint` and `qcl text embed` on the tiny BERT
//! fixture: one JSON object each, the compressed file embeds exactly as the library does, the
//! bits report is the file's, the same seed gives the same bytes, and bad input is a typed
//! error that writes nothing.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fixture, qcl};
use qcl_tensor::candle_core::{DType, Device, Tensor};
use qcl_text::{EmbedConfig, SentenceEncoder};
use qcl_wpq::CompressedCheckpoint;
use serde_json::Value;

const TEXTS: &str = "the cat sat on the mat.\na dog is running in the park\nthe park\n";
const LINEAR_RULES: [&str; 2] = [
    "encoder.layer.*.self.*.weight=pq:d=2,k=16,objective=error-feedback,finetune=1",
    "encoder.layer.*.dense.weight=rtn:bits=4,group=16",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_bert() -> String {
    fixture("tiny-bert")
}

/// Writes the fixture texts and records a calibration file in `dir`.
fn calibrate(dir: &Path) -> (PathBuf, PathBuf) {
    let texts = dir.join("texts.txt");
    std::fs::write(&texts, TEXTS).unwrap();
    let calib = dir.join("calib.safetensors");
    let (ok, v) = text_calibrate(s(&texts), &calib, &[]);
    assert!(ok, "{v}");
    (texts, calib)
}

/// `qcl text calibrate` of the tiny BERT over `input` into `out`, with `extra` flags.
fn text_calibrate(input: &str, out: &Path, extra: &[&str]) -> (bool, Value) {
    let model = tiny_bert();
    let mut args = vec!["text", "calibrate", "--model", &model, "--input", input];
    args.extend(extra);
    args.extend(["--out", s(out), "--json"]);
    qcl(&args)
}

fn compress(checkpoint: &str, rules: &[&str], extra: &[&str], out: &Path) -> (bool, Value) {
    let mut args = vec!["wpq", "compress-checkpoint", "--checkpoint", checkpoint];
    for r in rules {
        args.extend(["--rule", r]);
    }
    args.extend(extra);
    args.extend(["--out", s(out), "--json"]);
    qcl(&args)
}

/// A `qcl text embed` command line: the `model`, the `compressed` weights if given, then `rest`.
fn text_embed_args<'a>(
    model: &'a str,
    compressed: Option<&'a str>,
    rest: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["text", "embed", "--model", model];
    if let Some(file) = compressed {
        args.extend(["--compressed", file]);
    }
    args.extend(rest);
    args
}

fn embeddings_of(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v["embeddings"].clone()).unwrap()
}

#[test]
fn calibrate_compress_and_embed_with_the_compressed_file() {
    let dir = tempfile::tempdir().unwrap();
    let (texts, calib) = calibrate(dir.path());
    let (ok, c) = text_calibrate(s(&texts), &dir.path().join("c2"), &["--limit", "2"]);
    assert!(ok, "{c}");
    assert_eq!(c["texts"], 2);
    assert_eq!(c["layers"].as_array().unwrap().len(), 1 + 6 * 2);

    let weights = format!("{}/model.safetensors", tiny_bert());
    let out = dir.path().join("out.safetensors");
    let calib_flag = ["--calibration", s(&calib), "--seed", "3"];
    let (ok, v) = compress(&weights, &LINEAR_RULES, &calib_flag, &out);
    assert!(ok, "{v}");
    let file_bytes = std::fs::metadata(&out).unwrap().len();
    assert_eq!(v["file_bytes"].as_u64().unwrap(), file_bytes);
    assert_eq!(v["bits"]["file_bytes"].as_u64().unwrap(), file_bytes);
    assert_eq!(v["compressed_tensors"], 12);
    assert!(
        v["tensors"][0]["output_error"].as_f64().unwrap() < 1.0,
        "{v}"
    );
    // Same seed, same bytes.
    let again = dir.path().join("again.safetensors");
    assert!(compress(&weights, &LINEAR_RULES, &calib_flag, &again).0);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());

    // The CLI's embeddings of the compressed file are the library's, bit for bit.
    let bert = tiny_bert();
    let (ok, e) = qcl(&text_embed_args(
        &bert,
        Some(s(&out)),
        &["--input", s(&texts), "--json"],
    ));
    assert!(ok, "{e}");
    assert_eq!(
        (e["count"].as_u64(), e["dim"].as_u64()),
        (Some(3), Some(32))
    );
    let dir_path = Path::new(&tiny_bert()).to_path_buf();
    let config = qcl_text::SentenceConfig::from_folder(&dir_path).unwrap();
    let tokenizer = qcl_text::SentenceTokenizer::from_file(
        dir_path.join("tokenizer.json"),
        config.max_seq_length,
    )
    .unwrap();
    let vb = CompressedCheckpoint::load(&out)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu)
        .unwrap();
    let encoder = SentenceEncoder::from_var_builder(vb, config, tokenizer)
        .unwrap()
        .with_options(EmbedConfig {
            progress: false,
            ..EmbedConfig::default()
        });
    let lines: Vec<&str> = TEXTS.lines().collect();
    let library = encoder.embed(&lines).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(embeddings_of(&e), library);

    // The uncompressed model gives other, nearby embeddings.
    let (ok, plain) = qcl(&text_embed_args(
        &bert,
        None,
        &["--input", s(&texts), "--json"],
    ));
    assert!(ok, "{plain}");
    let plain = embeddings_of(&plain);
    assert_ne!(plain, library);
    for (a, b) in plain.iter().zip(&library) {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.5, "cosine {cos}");
    }

    // --out writes the same values to a safetensors file, and standard input works.
    let file = dir.path().join("e.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcl"))
        .args(text_embed_args(
            &bert,
            Some(s(&out)),
            &["--input", "-", "--out", s(&file), "--json"],
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(TEXTS.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let v: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(v.get("embeddings").is_none() && v["count"] == 3, "{v}");
    let stored = qcl_tensor::SafetensorsFile::open(&file).unwrap();
    let t = stored.tensor("embeddings", &Device::Cpu).unwrap();
    assert_eq!(t.to_vec2::<f32>().unwrap(), library);
}

#[test]
fn bits_report_counts_scales() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let weights = format!("{}/model.safetensors", tiny_bert());
    let (ok, v) = compress(&weights, &LINEAR_RULES[1..], &[], &out);
    assert!(ok, "{v}");
    // int4 in groups of 16 with an fp16 scale and zero each: 4 + 32/16 bits per weight.
    assert_eq!(v["bits_per_weight"].as_f64().unwrap(), 6.0);
    assert_eq!(v["compressed_tensors"], 6);
    let input = std::fs::metadata(&weights).unwrap().len() as f64;
    let ratio = input / std::fs::metadata(&out).unwrap().len() as f64;
    assert!((v["ratio"].as_f64().unwrap() - ratio).abs() < 1e-12);
}

/// A copy of the tiny BERT folder whose weights differ in one bias.
fn other_model(dir: &Path) -> PathBuf {
    let src = PathBuf::from(tiny_bert());
    let dst = dir.join("other-bert");
    std::fs::create_dir_all(dst.join("1_Pooling")).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "sentence_bert_config.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut tensors =
        qcl_tensor::candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let bias = tensors.get_mut("embeddings.LayerNorm.bias").unwrap();
    *bias = (&*bias + 0.5).unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    qcl_tensor::write_safetensors(dst.join("model.safetensors"), &refs, &Default::default())
        .unwrap();
    dst
}

fn assert_error(v: &Value, kind: &str, needle: &str) {
    assert_eq!(v["error"]["kind"], kind, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "`{needle}` not in {message}");
}

#[test]
fn bad_input_is_a_typed_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (texts, calib) = calibrate(dir.path());
    let weights = format!("{}/model.safetensors", tiny_bert());
    let out = dir.path().join("out.safetensors");
    for (rule, kind, needle) in [
        (
            "decoder.*=fp16",
            "invalid_parameter",
            "pattern `decoder.*` matches no tensor",
        ),
        (
            "pooler.dense.weight=fp16",
            "invalid_parameter",
            "unknown tensor name `pooler.dense.weight`",
        ),
        ("encoder.*[0]=fp16", "invalid_parameter", "unknown pattern"),
        ("encoder.*.weight", "invalid_parameter", "PATTERN=METHOD"),
        (
            "*.dense.weight=zstd",
            "invalid_parameter",
            "unknown method `zstd`",
        ),
        (
            "*.dense.weight=pq:d=2,kk=4",
            "invalid_parameter",
            "unknown field `kk`",
        ),
        (
            "*.dense.weight=pq:d=5,k=4,objective=naive",
            "invalid_parameter",
            "divide",
        ),
        ("*.self.*.weight=gptq", "empty_input", "needs calibration"),
    ] {
        let (ok, v) = compress(&weights, &[rule], &[], &out);
        assert!(!ok);
        assert_error(&v, kind, needle);
        assert!(!out.exists(), "{rule} left a file");
    }
    // A calibration recorded on another checkpoint.
    let other = other_model(dir.path());
    let other_weights = other.join("model.safetensors");
    let (ok, v) = compress(
        s(&other_weights),
        &LINEAR_RULES,
        &["--calibration", s(&calib)],
        &out,
    );
    assert!(!ok);
    assert_error(&v, "bad_file", "the calibration");
    // A calibration file that is not one.
    let (ok, v) = compress(&weights, &LINEAR_RULES, &["--calibration", &weights], &out);
    assert!(!ok);
    assert_error(&v, "bad_file", "not a qcl-wpq calibration");
    assert!(!out.exists());

    // A compressed file used with another model's folder, or a file that is not compressed.
    assert!(compress(&weights, &LINEAR_RULES[1..], &[], &out).0);
    let embed = |model: &str, compressed: &str, input: &str| {
        qcl(&text_embed_args(
            model,
            Some(compressed),
            &["--input", input, "--json"],
        ))
    };
    let (ok, v) = embed(s(&other), s(&out), s(&texts));
    assert!(!ok);
    assert_error(&v, "bad_file", "holds another model");
    let (ok, v) = embed(&tiny_bert(), &weights, s(&texts));
    assert!(!ok);
    assert_error(&v, "bad_file", "not a qcl-wpq compressed checkpoint");
    // Empty input, from a file or standard input (the test gives the child none).
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    for input in [s(&empty), "-"] {
        let (ok, v) = embed(&tiny_bert(), s(&out), input);
        assert!(!ok);
        assert_error(&v, "empty_input", "holds no text");
        let calib2 = dir.path().join("c2.safetensors");
        let (ok, v) = text_calibrate(input, &calib2, &[]);
        assert!(!ok);
        assert_error(&v, "empty_input", "holds no text");
        assert!(!calib2.exists());
    }
    // A model folder without a model.
    let (ok, v) = qcl(&text_embed_args(
        s(dir.path()),
        None,
        &["--input", s(&texts), "--json"],
    ));
    assert!(!ok);
    assert!(
        v["error"]["kind"] == "io" || v["error"]["kind"] == "bad_file",
        "{v}"
    );
}
