//! Checkpoint compression end to end: selection, calibration, the file (bit-identical reload,
//! same seed → same bytes, untouched tensors kept bit for bit) and every bad input as a typed
//! error.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use proptest::prelude::*;
use qcl_tensor::{Error, Seed};
use qcl_wpq::{
    compress_checkpoint, Calibration, Checkpoint, CompressedCheckpoint, ConvInput, Layout, Method,
    Objective, Plan, PqConfig, RawTensor, Rule, ScalarConfig, Sharing,
};
use safetensors::{Dtype, SafeTensors};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Seed::new(seed)
        .rng()
        .normal_tensor(shape, 0.0, 1.0, &Device::Cpu)
        .unwrap()
}

/// A small model of mixed tensors and dtypes, with the calibration its forward pass records.
fn model() -> (Checkpoint, Calibration) {
    let dev = Device::Cpu;
    let tensors = vec![
        ("emb.weight", randn(&[40, 8], 1)),
        ("fc1.weight", randn(&[24, 32], 2)),
        ("fc1.bias", randn(&[24], 3)),
        (
            "fc2.weight",
            randn(&[16, 24], 4).to_dtype(DType::F16).unwrap(),
        ),
        (
            "head.weight",
            randn(&[8, 16], 5).to_dtype(DType::BF16).unwrap(),
        ),
        ("conv.weight", randn(&[8, 4, 3, 3], 6)),
        ("ids", Tensor::arange(0i64, 12, &dev).unwrap()),
        ("mask", Tensor::new(&[1u8, 0, 1], &dev).unwrap()),
    ];
    let ckpt = Checkpoint::from_tensors(tensors).unwrap();
    let calib = Calibration::new();
    let tap = |name: &str, x: &Tensor| calib.record(name, x);
    tap(
        "emb.weight",
        &Tensor::new(&[[3u32, 3, 5, 7], [3, 1, 0, 39]], &dev).unwrap(),
    )
    .unwrap();
    tap("fc1.weight", &randn(&[2, 50, 32], 7)).unwrap();
    tap("fc2.weight", &randn(&[60, 24], 8)).unwrap();
    tap("head.weight", &randn(&[60, 16], 9)).unwrap();
    let conv = ConvInput {
        kh: 3,
        kw: 3,
        padding: 1,
        stride: 1,
    };
    calib
        .record_conv("conv.weight", &randn(&[3, 4, 6, 6], 10), conv)
        .unwrap();
    (ckpt, calib)
}

fn plan() -> Plan {
    let pq = |d, k, objective| Method::Pq(PqConfig::new(d, k, objective));
    Plan::new(vec![
        Rule::new("emb.weight", pq(4, 8, Objective::ActivationAware)).unwrap(),
        Rule::new(
            "fc1.*eight",
            Method::Pq(PqConfig {
                finetune_rounds: 2,
                sharing: Sharing::Rows(2),
                ..PqConfig::new(2, 16, Objective::ErrorFeedback)
            }),
        )
        .unwrap(),
        Rule::new("fc2.weight", Method::Gptq(ScalarConfig::new(4, Some(8)))).unwrap(),
        Rule::new("head.*", Method::Rtn(ScalarConfig::new(8, None))).unwrap(),
        Rule::new(
            "conv.weight",
            Method::Pq(PqConfig {
                layout: Layout::ChannelMajor,
                ..PqConfig::new(4, 8, Objective::ErrorFeedback)
            }),
        )
        .unwrap(),
        Rule::new("*.weight", Method::Fp16).unwrap(),
    ])
    .with_seed(11)
}

fn compress(
    ckpt: &Checkpoint,
    calib: &Calibration,
    plan: &Plan,
) -> qcl_tensor::Result<CompressedCheckpoint> {
    compress_checkpoint(ckpt, plan, calib, &ProgressBar::hidden()).map(|c| c.checkpoint)
}

#[test]
fn save_load_is_bit_identical_and_deterministic() {
    let (ckpt, calib) = model();
    let out = compress_checkpoint(&ckpt, &plan(), &calib, &ProgressBar::hidden()).unwrap();
    assert_eq!(out.reports.len(), 5);
    for r in &out.reports {
        assert!(r.output_error.unwrap() < 1.0, "{r:?}");
    }
    let c = out.checkpoint;
    // Untouched tensors are the original bytes; decompressed ones keep their dtype and shape.
    for name in ["fc1.bias", "ids", "mask"] {
        assert_eq!(c.untouched[name], *ckpt.get(name).unwrap());
    }
    let dense = c.decompress().unwrap();
    for (name, t) in ckpt.iter() {
        let d = dense.get(name).unwrap();
        assert_eq!((d.dtype(), d.shape()), (t.dtype(), t.shape()), "{name}");
    }
    // Same seed, same bytes; another seed, other bytes.
    let bytes = c.to_bytes().unwrap();
    assert_eq!(
        compress(&ckpt, &calib, &plan())
            .unwrap()
            .to_bytes()
            .unwrap(),
        bytes
    );
    let other = compress(&ckpt, &calib, &plan().with_seed(12)).unwrap();
    assert_ne!(other.to_bytes().unwrap(), bytes);
    // Save → load → the same checkpoint and bit-identical tensors.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    assert_eq!(c.save(&path).unwrap(), bytes.len() as u64);
    let back = CompressedCheckpoint::load(&path).unwrap();
    assert_eq!(back, c);
    let (a, b) = (c.decompress().unwrap(), back.decompress().unwrap());
    assert_eq!(a, b);
    // A VarBuilder of the decompressed tensors, converted to the asked dtype.
    let vb = back.var_builder(DType::F32, &Device::Cpu).unwrap();
    let head = vb.get((8, 16), "head.weight").unwrap();
    assert_eq!(head.dtype(), DType::F32);
    // Bits: the report sums its tensors; PQ codebooks are counted.
    let bits = c.bits().unwrap();
    assert_eq!(bits.file_bytes, bytes.len() as u64);
    assert_eq!(bits.tensors.len(), 5);
    let fc1 = bits.tensors["fc1.weight"];
    // 384 subvectors × 4 bits + 2 codebooks × 16 × 2 fp16 values.
    assert_eq!(
        (fc1.index_bits, fc1.codebook_bits),
        (384 * 4, 2 * 16 * 2 * 16)
    );
    assert!(bits.payload_bytes() < bytes.len() as f64);
}

#[test]
fn an_unchanged_candle_model_runs_from_the_file() {
    let (ckpt, calib) = model();
    let plan = Plan::new(vec![Rule::new("fc1.weight", Method::Fp16).unwrap()]);
    let c = compress(&ckpt, &calib, &plan).unwrap();
    let vb = c.var_builder(DType::F32, &Device::Cpu).unwrap();
    let fc = candle_nn::linear(32, 24, vb.pp("fc1")).unwrap();
    let x = randn(&[3, 32], 20);
    let y = candle_nn::Module::forward(&fc, &x).unwrap();
    let w = ckpt
        .get("fc1.weight")
        .unwrap()
        .to_tensor(&Device::Cpu)
        .unwrap();
    let b = ckpt
        .get("fc1.bias")
        .unwrap()
        .to_tensor(&Device::Cpu)
        .unwrap();
    let reference = x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let diff = (y - reference).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-2);
}

fn err_of(plan: Plan, ckpt: &Checkpoint, calib: &Calibration) -> Error {
    compress(ckpt, calib, &plan).unwrap_err()
}

fn one(pattern: &str, method: Method) -> Plan {
    Plan::new(vec![Rule::new(pattern, method).unwrap()])
}

#[test]
fn bad_plans_and_weights_are_typed_errors() {
    let (ckpt, calib) = model();
    let empty = Calibration::new();
    let naive = |d, k| Method::Pq(PqConfig::new(d, k, Objective::Naive));
    assert!(Rule::new("fc[12].weight", Method::Fp16).is_err());
    let e = err_of(one("decoder.*", Method::Fp16), &ckpt, &empty);
    assert!(
        e.to_string()
            .contains("pattern `decoder.*` matches no tensor"),
        "{e}"
    );
    let e = err_of(one("fc3.weight", Method::Fp16), &ckpt, &empty);
    assert!(
        e.to_string().contains("unknown tensor name `fc3.weight`"),
        "{e}"
    );
    // d does not divide the row; K above the subvectors.
    let e = err_of(one("fc1.weight", naive(5, 4)), &ckpt, &empty);
    assert!(
        e.to_string().contains("fc1.weight") && e.to_string().contains("does not divide"),
        "{e}"
    );
    let e = err_of(one("fc1.weight", naive(4, 1000)), &ckpt, &empty);
    assert!(e.to_string().contains("K = 1000"), "{e}");
    // A 1-D tensor, a non-float tensor.
    assert_eq!(
        err_of(one("fc1.bias", naive(4, 4)), &ckpt, &empty).kind(),
        "shape_mismatch"
    );
    let e = err_of(one("ids", Method::Fp16), &ckpt, &empty);
    assert!(
        e.to_string().contains("ids") && e.to_string().contains("I64"),
        "{e}"
    );
    // Methods that need calibration, without it.
    for m in [
        Method::Gptq(ScalarConfig::default()),
        Method::Pq(PqConfig::new(4, 4, Objective::ActivationAware)),
        Method::Pq(PqConfig::new(4, 4, Objective::ErrorFeedback)),
    ] {
        let e = err_of(one("fc1.weight", m), &ckpt, &empty);
        assert_eq!(e.kind(), "empty_input", "{e}");
        assert!(e.to_string().contains("fc1.weight"), "{e}");
    }
    // Non-finite weights.
    let mut nan = ckpt.clone();
    let mut w = ckpt.get("fc1.weight").unwrap().to_f32().unwrap();
    w[5] = f32::NAN;
    nan.insert(
        "fc1.weight",
        RawTensor::from_f32(&w, vec![24, 32], Dtype::F32).unwrap(),
    );
    let e = err_of(one("fc1.weight", Method::Fp16), &nan, &empty);
    assert_eq!(e.kind(), "non_finite", "{e}");
    // Calibration for a name the checkpoint lacks, of the wrong width, with ids beyond the table.
    let stray = Calibration::new();
    stray.record("fc9.weight", &randn(&[2, 4], 1)).unwrap();
    let e = err_of(one("fc1.weight", Method::Fp16), &ckpt, &stray);
    assert!(
        e.to_string().contains("unknown tensor name `fc9.weight`"),
        "{e}"
    );
    let wrong = Calibration::new();
    wrong.record("fc1.weight", &randn(&[2, 16], 1)).unwrap();
    let e = err_of(
        one("fc1.weight", Method::Gptq(ScalarConfig::default())),
        &ckpt,
        &wrong,
    );
    assert_eq!(e.kind(), "shape_mismatch", "{e}");
    let ids = Calibration::new();
    ids.record("emb.weight", &Tensor::new(&[41u32], &Device::Cpu).unwrap())
        .unwrap();
    let m = Method::Pq(PqConfig::new(4, 4, Objective::ActivationAware));
    let e = err_of(one("emb.weight", m), &ckpt, &ids);
    assert!(e.to_string().contains("token id 41"), "{e}");
    let _ = calib;
}

#[test]
fn bad_recordings_are_typed_errors() {
    let calib = Calibration::new();
    calib.record("a", &randn(&[4, 8], 1)).unwrap();
    let e = calib.record("a", &randn(&[4, 6], 1)).unwrap_err();
    assert_eq!(e.kind(), "shape_mismatch");
    let nan = Tensor::new(&[[1f32, f32::INFINITY]], &Device::Cpu).unwrap();
    assert_eq!(calib.record("b", &nan).unwrap_err().kind(), "non_finite");
    let e = calib
        .record("a", &Tensor::new(&[1u32], &Device::Cpu).unwrap())
        .unwrap_err();
    assert_eq!(e.kind(), "invalid_parameter");
    let e = calib
        .record("c", &Tensor::new(&[-1i64], &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("-1"), "{e}");
    let conv = ConvInput {
        kh: 3,
        kw: 3,
        padding: 0,
        stride: 1,
    };
    let e = calib
        .record_conv("d", &randn(&[1, 2, 2, 2], 1), conv)
        .unwrap_err();
    assert_eq!(e.kind(), "shape_mismatch");
    // An empty recording is no calibration.
    calib
        .record(
            "e",
            &Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let ckpt = Checkpoint::from_tensors([("e", randn(&[4, 8], 2))]).unwrap();
    let e = err_of(
        one("e", Method::Gptq(ScalarConfig::default())),
        &ckpt,
        &Calibration::new(),
    );
    assert_eq!(e.kind(), "empty_input");
    let only_e = Calibration::new();
    only_e.insert("e", calib.stats("e").unwrap());
    let e = err_of(
        one("e", Method::Gptq(ScalarConfig::default())),
        &ckpt,
        &only_e,
    );
    assert_eq!(e.kind(), "empty_input");
}

/// Rewrites a file's tensors and metadata (tensor order and metadata order do not matter to
/// the reader), with the checksum of the edited content, so that the reader's own checks are
/// what refuses the edit.
fn rewrite(
    bytes: &[u8],
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>),
) -> Vec<u8> {
    let parsed = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = parsed
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    let mut meta = SafeTensors::read_metadata(bytes)
        .unwrap()
        .1
        .metadata()
        .clone()
        .unwrap();
    edit(&mut tensors, &mut meta);
    let meta: BTreeMap<String, String> = meta.into_iter().collect();
    qcl_tensor::serialize_safetensors(
        tensors
            .iter()
            .map(|(n, (d, s, b))| (n.as_str(), *d, &s[..], &b[..])),
        &meta,
    )
    .unwrap()
}

fn load(bytes: &[u8]) -> Error {
    CompressedCheckpoint::from_bytes("bad.safetensors", bytes).unwrap_err()
}

fn set_meta(meta: &mut HashMap<String, String>, name: &str, key: &str, value: serde_json::Value) {
    let mut all: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&meta["qcl.tensors"]).unwrap();
    all[name][key] = value;
    meta.insert(
        "qcl.tensors".into(),
        serde_json::Value::Object(all).to_string(),
    );
}

#[test]
fn foreign_truncated_and_corrupt_files_are_typed_errors() {
    let (ckpt, calib) = model();
    let plan = Plan::new(vec![
        Rule::new(
            "fc1.weight",
            Method::Pq(PqConfig::new(4, 3, Objective::Naive)),
        )
        .unwrap(),
        Rule::new("head.weight", Method::Rtn(ScalarConfig::new(4, Some(4)))).unwrap(),
    ]);
    let good = compress(&ckpt, &calib, &plan).unwrap().to_bytes().unwrap();
    assert!(CompressedCheckpoint::from_bytes("good", &good).is_ok());
    assert_eq!(
        load(b"\x89PNG\r\n\x1a\n, a foreign file").kind(),
        "bad_file"
    );
    for cut in [0, 7, 100, good.len() / 2, good.len() - 1] {
        assert_eq!(load(&good[..cut]).kind(), "bad_file", "cut {cut}");
    }
    let e = load(&rewrite(&good, |_, m| {
        m.insert("format".into(), "qcl-wpq-compressed/1".into());
    }));
    assert!(e.to_string().contains("qcl-wpq-checkpoint/1"), "{e}");
    let e = load(&rewrite(&good, |_, m| {
        m.insert("qcl.tensors".into(), "[1, 2]".into());
    }));
    assert!(e.to_string().contains("foreign"), "{e}");
    // K = 3 in 2 bits: an all-ones byte holds index 3.
    let e = load(&rewrite(&good, |t, _| {
        t.get_mut("fc1.weight#codes").unwrap().2[0] = 0xff
    }));
    assert_eq!(e.kind(), "corrupt_stream", "{e}");
    assert!(e.to_string().contains("fc1.weight"), "{e}");
    // Codes of the wrong length, a missing part, an unexpected part.
    let e = load(&rewrite(&good, |t, _| {
        let c = t.get_mut("head.weight#codes").unwrap();
        c.2.pop();
        c.1 = vec![c.2.len()];
    }));
    assert!(e.to_string().contains("truncated or inconsistent"), "{e}");
    let e = load(&rewrite(&good, |t, _| {
        t.remove("head.weight#scales");
    }));
    assert!(
        e.to_string()
            .contains("missing tensor `head.weight#scales`"),
        "{e}"
    );
    let e = load(&rewrite(&good, |t, _| {
        t.insert("x#codes".into(), (Dtype::U8, vec![1], vec![0]));
    }));
    assert!(e.to_string().contains("unexpected tensor `x#codes`"), "{e}");
    // Absurd K, bits, d or shape: refused before anything is allocated from them.
    for (key, value) in [
        ("k", serde_json::json!(1u64 << 40)),
        ("bits", serde_json::json!(7)),
        ("d", serde_json::json!(1u64 << 30)),
        ("shape", serde_json::json!([1u64 << 40, 1u64 << 40])),
    ] {
        let e = load(&rewrite(&good, |_, m| {
            set_meta(m, "fc1.weight", key, value)
        }));
        assert_eq!(e.kind(), "bad_file", "{key}: {e}");
    }
    let e = load(&rewrite(&good, |_, m| {
        set_meta(m, "head.weight", "bits", serde_json::json!(40))
    }));
    assert!(e.to_string().contains("absurd bits"), "{e}");
    // Nothing half-written: an invalid checkpoint leaves no file.
    let dir = tempfile::tempdir().unwrap();
    let mut c = CompressedCheckpoint::untouched(&ckpt);
    c.untouched
        .insert("a#b".into(), ckpt.get("mask").unwrap().clone());
    assert!(c.save(dir.path().join("x.safetensors")).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any scalar or PQ encoding survives the file: packed codes, fp16 grids and codebooks.
    #[test]
    fn packing_round_trips(seed in 0u64..1000, rows in 1usize..6, slabs in 1usize..9,
                           bits in 1u32..9, k in 1usize..6) {
        let cols = slabs * 2;
        let w = randn(&[rows, cols], seed);
        let ckpt = Checkpoint::from_tensors([("a", w.clone()), ("b", w)]).unwrap();
        let k = k.min(rows * slabs);
        let plan = Plan::new(vec![
            Rule::new("a", Method::Rtn(ScalarConfig::new(bits, Some(3)))).unwrap(),
            Rule::new("b", Method::Pq(PqConfig { em_iterations: 2, ..PqConfig::new(2, k, Objective::Naive) })).unwrap(),
        ]);
        let c = compress(&ckpt, &Calibration::new(), &plan).unwrap();
        let back = CompressedCheckpoint::from_bytes("p", &c.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(&back, &c);
        prop_assert_eq!(back.decompress().unwrap(), c.decompress().unwrap());
    }
}
