//! Unit tests of the quantizer: the EMA formulas on a hand-worked case, bad input, files,
//! revival, k-means initialisation, gradient-mode training, resuming.
//!
//! (Over 600 lines: the layer's unit tests share its builders and clustered test data.)

mod common;

use candle_core::{DType, Device, Tensor};
use qcl_nn::optim::{Adam, AdamConfig, Optimizer};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Seed};
use qcl_vq::{
    CodeUsage, CodebookUpdate, PackedIndices, ResidualVq, VectorQuantizer, VectorQuantizerConfig,
};

use common::flat_f32;

const DEV: Device = Device::Cpu;

/// The mean of `(a − b)²` over all elements.
fn mean_squared_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn quantizer(config: VectorQuantizerConfig) -> (ParamStore, VectorQuantizer) {
    let store = ParamStore::new(3);
    let vq = VectorQuantizer::from_param_path(&store.root(&DEV).pp("vq"), config).unwrap();
    (store, vq)
}

/// `n` points in `dim` dimensions around `clusters` well separated centres (point `i` in
/// cluster `i % clusters`), as one sequence `(1, n, dim)`. The centres depend only on
/// `clusters` and `dim`; `seed` draws the noise.
fn clustered(seed: u64, clusters: usize, n: usize, dim: usize) -> Tensor {
    let centres = Seed::new(0xc1)
        .child((clusters * 1000 + dim) as u64)
        .rng()
        .uniform_vec(clusters * dim, -10.0, 10.0);
    let mut rng = Seed::new(seed).rng();
    let mut values = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = i % clusters;
        for d in 0..dim {
            values.push(centres[c * dim + d] + 0.01 * (rng.uniform() - 0.5));
        }
    }
    Tensor::from_vec(values, (1, n, dim), &DEV).unwrap()
}

#[test]
fn ema_step_matches_the_formulas_worked_by_hand() {
    let config = VectorQuantizerConfig {
        update: CodebookUpdate::Ema {
            decay: 0.5,
            eps: 0.1,
        },
        ..VectorQuantizerConfig::new(1, 2)
    };
    let (_store, mut vq) = quantizer(config);
    vq.set_codebook(&Tensor::new(&[[[0f32], [10.0]]], &DEV).unwrap())
        .unwrap();
    // Vectors 1, 2 → code 0; 9 → code 1.
    let x = Tensor::new(&[[[1f32], [2.0], [9.0]]], &DEV).unwrap();
    let out = vq.quantize(&x, true).unwrap();
    assert_eq!(flat_f32(&out.quantized), vec![0.0, 0.0, 10.0]);
    assert_eq!(out.stats.batch.histogram(0), &[2, 1]);
    // c = 0.5·0 + 0.5·[2, 1] = [1, 0.5]; s = 1.5; c ← (c + 0.1)·1.5 / (1.5 + 2·0.1).
    let c: Vec<f64> = [1.0, 0.5].iter().map(|c| (c + 0.1) * 1.5 / 1.7).collect();
    // w = 0.5·E + 0.5·[1 + 2, 9] (w started as E).
    let w = [0.5 * 0.0 + 0.5 * 3.0, 0.5 * 10.0 + 0.5 * 9.0];
    let counts = flat_f32(&vq.counts().unwrap());
    let sums = flat_f32(&vq.sums().unwrap().unwrap());
    let book = flat_f32(&vq.codebook().unwrap());
    for k in 0..2 {
        assert!(
            (f64::from(counts[k]) - c[k]).abs() < 1e-6,
            "{counts:?} vs {c:?}"
        );
        assert!(
            (f64::from(sums[k]) - w[k]).abs() < 1e-6,
            "{sums:?} vs {w:?}"
        );
        assert!((f64::from(book[k]) - w[k] / c[k]).abs() < 1e-4, "{book:?}");
    }
    assert_eq!(vq.steps().unwrap(), 1);
}

#[test]
fn fresh_state_follows_the_aqm_initialisation() {
    let (store, vq) = quantizer(VectorQuantizerConfig {
        codebooks: 2,
        ..VectorQuantizerConfig::new(6, 50)
    });
    let book = flat_f32(&vq.codebook().unwrap());
    assert_eq!(book.len(), 2 * 50 * 3);
    assert!(book.iter().all(|v| v.abs() <= 1.0 / 50.0));
    assert!(
        book.iter().any(|v| v.abs() > 0.5 / 50.0),
        "spread over U(−1/K, 1/K)"
    );
    assert!(flat_f32(&vq.counts().unwrap()).iter().all(|&c| c == 0.0));
    assert_eq!(flat_f32(&vq.sums().unwrap().unwrap()), book, "w = E");
    // Everything is in the store, as buffers.
    let names: Vec<String> = store.buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["vq.codebook", "vq.counts", "vq.steps", "vq.sums"]);
    assert!(store.trainable().is_empty());
}

#[test]
fn gradient_mode_codebook_is_trainable_and_learns() {
    let config = VectorQuantizerConfig {
        update: CodebookUpdate::Gradient,
        ..VectorQuantizerConfig::new(2, 4)
    };
    let (store, vq) = quantizer(config);
    assert_eq!(store.trainable().len(), 1);
    let mut adam = Adam::new(
        store.trainable(),
        AdamConfig {
            lr: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    // One cluster away from the near-zero initial codes.
    let x = (clustered(1, 1, 64, 2) + 5.0).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let out = vq.quantize(&x, true).unwrap();
        let loss = out.codebook_loss.unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        adam.backward_step(&loss).unwrap();
    }
    assert!(
        losses[29] < 0.2 * losses[0],
        "codebook loss did not fall: {losses:?}"
    );
    // The usage EMA is tracked: c = Σ_t 0.01·0.99^t·hist_t, summing to (1 − 0.99^30)·64.
    let total: f32 = flat_f32(&vq.counts().unwrap()).iter().sum();
    let expected = (1.0 - 0.99f32.powi(30)) * 64.0;
    assert!(
        (total - expected).abs() < 1e-3 * expected,
        "{total} vs {expected}"
    );
}

#[test]
fn loss_is_weighted_commitment_plus_codebook_loss() {
    for update in [CodebookUpdate::default(), CodebookUpdate::Gradient] {
        let config = VectorQuantizerConfig {
            update,
            commitment_weight: 2.0,
            ..VectorQuantizerConfig::new(3, 5)
        };
        let (_store, vq) = quantizer(config);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &DEV).unwrap();
        let out = vq.quantize(&x, false).unwrap();
        let commit = out.commitment_loss.to_scalar::<f32>().unwrap();
        let direct = mean_squared_difference(&x, &out.quantized);
        assert!((commit - direct).abs() < 1e-5 * direct.max(1.0));
        let codebook = out
            .codebook_loss
            .as_ref()
            .map_or(0.0, |t| t.to_scalar::<f32>().unwrap());
        if update == CodebookUpdate::Gradient {
            assert!((codebook - commit).abs() < 1e-5 * commit.max(1.0));
        }
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert!((loss - (2.0 * commit + codebook)).abs() < 1e-5 * loss.max(1.0));
    }
}

#[test]
fn f64_input_gives_f64_output_with_the_codebook_values() {
    let (_store, vq) = quantizer(VectorQuantizerConfig::new(4, 8));
    let x = Tensor::randn(0f64, 1.0, (2, 4, 3, 3), &DEV).unwrap();
    let out = vq.quantize(&x, true).unwrap();
    assert_eq!(out.quantized.dtype(), DType::F64);
    assert_eq!(out.loss.dtype(), DType::F64);
    let decoded = flat_f32(&vq.encode(&x).and_then(|i| vq.decode(&i)).unwrap());
    let again = flat_f32(&vq.quantize(&x, false).unwrap().quantized);
    assert_eq!(decoded, again);
}

fn kind(result: qcl_tensor::Result<impl std::fmt::Debug>) -> &'static str {
    match result {
        Err(e) => e.kind(),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn bad_configurations_are_typed_errors() {
    let store = ParamStore::new(0);
    let root = store.root(&DEV);
    let base = VectorQuantizerConfig::new(8, 4);
    let bad = [
        VectorQuantizerConfig {
            codes: 0,
            ..base.clone()
        },
        VectorQuantizerConfig {
            codebooks: 3,
            ..base.clone()
        },
        VectorQuantizerConfig {
            update: CodebookUpdate::Ema {
                decay: 1.01,
                eps: 1e-5,
            },
            ..base.clone()
        },
        VectorQuantizerConfig {
            update: CodebookUpdate::Ema {
                decay: 0.9,
                eps: 0.0,
            },
            ..base.clone()
        },
    ];
    for config in bad {
        assert_eq!(
            kind(VectorQuantizer::from_param_path(&root, config.clone())),
            "invalid_parameter",
            "{config:?}"
        );
    }
    assert!(store.is_empty(), "nothing is created for a bad config");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (_store, mut vq) = quantizer(VectorQuantizerConfig {
        codebooks: 2,
        ..VectorQuantizerConfig::new(4, 3)
    });
    let wrong_channels = Tensor::zeros((2, 5, 3, 3), DType::F32, &DEV).unwrap();
    // A scalar has no channel axis; rows `[B, C]` need C on their last axis, and so does any
    // rank other than 4 under the default `ChannelAxis::Auto`.
    let wrong_rank = Tensor::new(0f32, &DEV).unwrap();
    let wrong_rows = Tensor::zeros((4, 5), DType::F32, &DEV).unwrap();
    let rank5 = Tensor::zeros((1, 4, 2, 2, 2), DType::F32, &DEV).unwrap();
    let integers = Tensor::zeros((2, 4, 3, 3), DType::U32, &DEV).unwrap();
    let empty = Tensor::zeros((0, 4, 3, 3), DType::F32, &DEV).unwrap();
    assert_eq!(kind(vq.quantize(&wrong_channels, true)), "shape_mismatch");
    assert_eq!(kind(vq.quantize(&wrong_rank, true)), "shape_mismatch");
    assert_eq!(kind(vq.quantize(&wrong_rows, true)), "shape_mismatch");
    assert_eq!(kind(vq.quantize(&rank5, true)), "shape_mismatch");
    assert_eq!(kind(vq.encode(&wrong_channels)), "shape_mismatch");
    assert_eq!(kind(vq.quantize(&integers, true)), "dtype_mismatch");
    assert_eq!(kind(vq.quantize(&empty, true)), "empty_input");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![0.5f32; 2 * 4 * 9];
        v[37] = bad;
        let x = Tensor::from_vec(v, (2, 4, 3, 3), &DEV).unwrap();
        match vq.quantize(&x, true) {
            Err(Error::NonFinite { index, .. }) => assert_eq!(index, 37),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(kind(vq.encode(&x)), "non_finite");
    }
    assert_eq!(vq.steps().unwrap(), 0, "no update after refused input");

    // decode: indices ≥ K, wrong dtype, wrong codebook axis.
    let ok = Tensor::zeros((1, 2, 2, 2), DType::U32, &DEV).unwrap();
    assert_eq!(vq.decode(&ok).unwrap().dims(), &[1, 4, 2, 2]);
    let too_big = Tensor::new(&[[[[0u32, 3]], [[1, 2]]]], &DEV).unwrap();
    assert_eq!(kind(vq.decode(&too_big)), "invalid_parameter");
    let floats = Tensor::zeros((1, 2, 2, 2), DType::F32, &DEV).unwrap();
    assert_eq!(kind(vq.decode(&floats)), "dtype_mismatch");
    let wrong_axis = Tensor::zeros((1, 3, 2, 2), DType::U32, &DEV).unwrap();
    assert_eq!(kind(vq.decode(&wrong_axis)), "shape_mismatch");
    let packed_other_k = PackedIndices::pack(&[0; 8], &[1, 2, 2, 2], 5).unwrap();
    assert_eq!(kind(vq.decode_packed(&packed_other_k)), "invalid_parameter");
    // A codebook of the wrong shape or with NaN.
    let bad_book = Tensor::zeros((2, 3, 3), DType::F32, &DEV).unwrap();
    assert_eq!(kind(vq.set_codebook(&bad_book)), "shape_mismatch");
    let nan_book = Tensor::full(f32::NAN, (2, 3, 2), &DEV).unwrap();
    assert_eq!(kind(vq.set_codebook(&nan_book)), "non_finite");
}

#[test]
fn packed_streams_refuse_truncation_corruption_and_bad_parameters() {
    // K = 5: 3 bits; 3 indices per row → 9 bits → 2 bytes per row, 7 padding bits.
    let packed = PackedIndices::pack(&[4, 0, 3, 1, 2, 4], &[2, 3], 5).unwrap();
    let bytes = packed.bytes().to_vec();
    assert_eq!(bytes.len(), 4);
    // A shape whose row of indices overflows in bits (found by the bad-input suite).
    assert_eq!(
        kind(PackedIndices::from_bytes(
            bytes.clone(),
            &[1, usize::MAX / 2],
            5
        )),
        "invalid_parameter"
    );
    assert_eq!(
        kind(PackedIndices::from_bytes(bytes[..3].to_vec(), &[2, 3], 5)),
        "shape_mismatch"
    );
    let mut padded = bytes.clone();
    padded[1] |= 0b1000_0000; // a padding bit of row 0
    assert_eq!(
        kind(PackedIndices::from_bytes(padded, &[2, 3], 5)),
        "corrupt_stream"
    );
    let mut big = bytes.clone();
    big[0] |= 0b111; // index 0 becomes 7 ≥ 5
    assert_eq!(
        kind(PackedIndices::from_bytes(big, &[2, 3], 5)),
        "corrupt_stream"
    );
    assert_eq!(
        kind(PackedIndices::pack(&[5], &[1], 5)),
        "invalid_parameter"
    );
    assert_eq!(
        kind(PackedIndices::pack(&[0], &[1], 0)),
        "invalid_parameter"
    );
    assert_eq!(
        kind(PackedIndices::pack(&[0], &[1], 65537)),
        "invalid_parameter"
    );
    assert_eq!(
        kind(PackedIndices::pack(&[0, 0], &[3], 4)),
        "shape_mismatch"
    );
    assert_eq!(kind(PackedIndices::pack(&[0], &[], 4)), "invalid_parameter");
    assert_eq!(kind(packed.sample(2)), "invalid_parameter");
    // K = 1 stores nothing and still round-trips.
    let single = PackedIndices::pack(&[0; 7], &[7], 1).unwrap();
    assert!(single.bytes().is_empty());
    assert_eq!(single.unpack(), vec![0; 7]);
    assert_eq!(
        kind(PackedIndices::from_bytes(vec![0], &[7], 1)),
        "shape_mismatch"
    );
}

#[test]
fn packed_files_round_trip_and_refuse_truncated_or_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("codes.safetensors");
    let values: Vec<u32> = (0..2 * 14 * 14).map(|i| (i * 7 % 300) as u32).collect();
    let packed = PackedIndices::pack(&values, &[2, 1, 14, 14], 300).unwrap();
    packed.save(&path).unwrap();
    let back = PackedIndices::load(&path).unwrap();
    assert_eq!(back, packed);
    assert_eq!(back.bits(), 9);
    // Empty streams (K = 1) round-trip too.
    let single = PackedIndices::pack(&[0; 3], &[3], 1).unwrap();
    single.save(dir.path().join("one.safetensors")).unwrap();
    assert_eq!(
        PackedIndices::load(dir.path().join("one.safetensors")).unwrap(),
        single
    );

    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 5]).unwrap();
    assert_eq!(kind(PackedIndices::load(&truncated)), "bad_file");
    let foreign = dir.path().join("foreign.safetensors");
    std::fs::write(&foreign, b"\x89PNG not a safetensors file").unwrap();
    assert_eq!(kind(PackedIndices::load(&foreign)), "bad_file");
    // A quantizer file is not a packed-indices file, and vice versa.
    let (_store, vq) = quantizer(VectorQuantizerConfig::new(2, 4));
    let vq_path = dir.path().join("vq.safetensors");
    vq.save(&vq_path).unwrap();
    assert_eq!(kind(PackedIndices::load(&vq_path)), "bad_file");
    assert_eq!(
        kind(VectorQuantizer::load(&path, &ParamStore::new(0).root(&DEV))),
        "bad_file"
    );
    // A stream corrupted inside a well-formed file.
    let mut corrupted = bytes.clone();
    let at = corrupted.len() - 1; // the last data byte: padding bits of the last row
    corrupted[at] = 0xff;
    let corrupted_path = dir.path().join("corrupted.safetensors");
    std::fs::write(&corrupted_path, &corrupted).unwrap();
    assert_eq!(kind(PackedIndices::load(&corrupted_path)), "bad_file");
    assert_eq!(
        kind(PackedIndices::load(dir.path().join("missing.safetensors"))),
        "io"
    );
}

#[test]
fn packed_indices_name_their_quantizer_and_another_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = VectorQuantizerConfig::new(3, 8);
    let (_store, vq) = quantizer(config.clone());
    let x = clustered(1, 8, 64, 3);
    vq.quantize(&x, true).unwrap();
    let packed = vq.encode_packed(&x).unwrap();
    assert_eq!(packed.quantizer(), Some(vq.fingerprint().unwrap().as_str()));
    let path = dir.path().join("codes.safetensors");
    packed.save(&path).unwrap();
    let back = PackedIndices::load(&path).unwrap();
    assert_eq!(back, packed);
    assert_eq!(
        flat_f32(&vq.decode_packed(&back).unwrap()),
        flat_f32(&vq.decode(&vq.encode(&x).unwrap()).unwrap())
    );
    // The same shape with another codebook (another store seed), or this one trained further.
    let store = ParamStore::new(4);
    let other = VectorQuantizer::from_param_path(&store.root(&DEV).pp("vq"), config).unwrap();
    assert_eq!(kind(other.decode_packed(&back)), "invalid_parameter");
    vq.quantize(&clustered(2, 8, 64, 3), true).unwrap();
    assert_eq!(kind(vq.decode_packed(&back)), "invalid_parameter");
    // Decoding with the changed codebook on purpose still works, through `decode`.
    assert!(vq.decode(&back.to_tensor(&DEV).unwrap()).is_ok());
}

#[test]
fn saved_quantizer_resumes_bit_identically() {
    let config = VectorQuantizerConfig {
        codebooks: 2,
        dead_code_threshold: Some(0.5),
        kmeans_init: true,
        ..VectorQuantizerConfig::new(4, 6)
    };
    let inputs: Vec<Tensor> = (0..4)
        .map(|i| {
            Seed::new(i)
                .rng()
                .normal_tensor((3, 4, 2, 2), 0.0, 1.0, &DEV)
                .unwrap()
        })
        .collect();
    let (_store, straight) = quantizer(config.clone());
    for x in &inputs {
        straight.quantize(x, true).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vq.safetensors");
    let (_store2, first) = quantizer(config);
    for x in &inputs[..2] {
        first.quantize(x, true).unwrap();
    }
    first.save(&path).unwrap();
    let other = ParamStore::new(99);
    let resumed = VectorQuantizer::load(&path, &other.root(&DEV).pp("vq")).unwrap();
    assert_eq!(resumed.steps().unwrap(), 2);
    for x in &inputs[2..] {
        resumed.quantize(x, true).unwrap();
    }
    for (a, b) in [
        (straight.codebook(), resumed.codebook()),
        (straight.counts(), resumed.counts()),
        (
            straight.sums().map(Option::unwrap),
            resumed.sums().map(Option::unwrap),
        ),
    ] {
        assert_eq!(flat_f32(&a.unwrap()), flat_f32(&b.unwrap()));
    }
}

#[test]
fn quantizer_files_with_a_foreign_state_are_refused() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vq.safetensors");
    let (_store, vq) = quantizer(VectorQuantizerConfig::new(4, 8));
    vq.save(&path).unwrap();
    let root = ParamStore::new(0).root(&DEV);
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(kind(VectorQuantizer::load(&truncated, &root)), "bad_file");

    // A file whose codebook does not fit its configuration.
    let file = qcl_tensor::SafetensorsFile::open(&path).unwrap();
    let meta: BTreeMap<String, String> = file.metadata().clone();
    let small = Tensor::zeros((1, 4, 4), DType::F32, &DEV).unwrap();
    let counts = file.tensor("counts", &DEV).unwrap();
    let steps = file.tensor("steps", &DEV).unwrap();
    let sums = file.tensor("sums", &DEV).unwrap();
    let wrong = dir.path().join("wrong.safetensors");
    qcl_tensor::write_safetensors(
        &wrong,
        &[
            ("codebook", &small),
            ("counts", &counts),
            ("steps", &steps),
            ("sums", &sums),
        ],
        &meta,
    )
    .unwrap();
    let fresh = ParamStore::new(0);
    assert_eq!(
        kind(VectorQuantizer::load(&wrong, &fresh.root(&DEV))),
        "shape_mismatch"
    );
    // A configuration that does not validate.
    let mut bad_meta = meta.clone();
    bad_meta.insert("decay".into(), "1.5".into());
    let bad = dir.path().join("bad.safetensors");
    qcl_tensor::write_safetensors(&bad, &[("counts", &counts)], &bad_meta).unwrap();
    assert_eq!(
        kind(VectorQuantizer::load(&bad, &fresh.root(&DEV))),
        "bad_file"
    );
    // EMA without its sums.
    let no_sums = dir.path().join("no-sums.safetensors");
    let codebook = file.tensor("codebook", &DEV).unwrap();
    qcl_tensor::write_safetensors(
        &no_sums,
        &[
            ("codebook", &codebook),
            ("counts", &counts),
            ("steps", &steps),
        ],
        &meta,
    )
    .unwrap();
    assert_eq!(
        kind(VectorQuantizer::load(&no_sums, &fresh.root(&DEV))),
        "missing_tensor"
    );
}

/// Many separated clusters, a codebook initialised as AQM does (tiny, near zero): without
/// revival most codes die at the first EMA step and the clusters share a few codes; with it,
/// the codes move onto batch vectors and cover the clusters.
#[test]
fn revival_keeps_codes_in_use() {
    let run = |threshold: Option<f64>| {
        let (_store, vq) = quantizer(VectorQuantizerConfig {
            dead_code_threshold: threshold,
            ..VectorQuantizerConfig::new(3, 32)
        });
        let mut last = None;
        for step in 0..40 {
            let x = clustered(step, 32, 256, 3);
            last = Some(vq.quantize(&x, true).unwrap());
        }
        let test = clustered(1000, 32, 256, 3);
        let mut usage = CodeUsage::new(1, 32);
        usage.add(&vq.encode(&test).unwrap()).unwrap();
        let mse = vq
            .quantize(&test, false)
            .unwrap()
            .commitment_loss
            .to_scalar::<f32>()
            .unwrap();
        eprintln!(
            "threshold {threshold:?}: {} codes used on the test batch, mse {mse}",
            usage.used_codes()[0]
        );
        (usage.used_codes()[0], mse, last.unwrap())
    };
    let (used_without, mse_without, last_without) = run(None);
    let (used_with, mse_with, last_with) = run(Some(1.0));
    assert!(
        used_with >= 28 && used_without * 2 <= used_with,
        "used codes: {used_with} with revival, {used_without} without"
    );
    assert!(mse_with < mse_without, "{mse_with} vs {mse_without}");
    assert!(last_without.stats.total_dead_codes() > 16);
    assert_eq!(last_without.stats.revived_codes, vec![0]);
    assert_eq!(
        last_with.stats.revived_codes, last_with.stats.dead_codes,
        "every dead code is revived"
    );
}

#[test]
fn revived_codes_are_batch_vectors() {
    // K = 8 fresh codes: after the first update every unused code is below threshold 1.
    let (_store, vq) = quantizer(VectorQuantizerConfig {
        dead_code_threshold: Some(1.0),
        update: CodebookUpdate::Gradient,
        ..VectorQuantizerConfig::new(2, 8)
    });
    let x = clustered(5, 3, 30, 2);
    let out = vq.quantize(&x, true).unwrap();
    let revived = out.stats.revived_codes[0];
    assert!(revived >= 5, "{:?}", out.stats);
    let points = flat_f32(&x);
    let book = flat_f32(&vq.codebook().unwrap());
    let counts = flat_f32(&vq.counts().unwrap());
    let mut matched = 0;
    for k in 0..8 {
        if counts[k] == 1.0 {
            let row = &book[k * 2..k * 2 + 2];
            assert!(
                points.chunks_exact(2).any(|p| p == row),
                "code {k} = {row:?} is no batch vector"
            );
            matched += 1;
        }
    }
    assert_eq!(matched, revived);
    // Distinct rows were drawn.
    let mut rows: Vec<[u32; 2]> = (0..8)
        .filter(|&k| counts[k] == 1.0)
        .map(|k| [book[2 * k].to_bits(), book[2 * k + 1].to_bits()])
        .collect();
    rows.sort();
    rows.dedup();
    assert_eq!(rows.len(), revived);
    // Another revival seed draws other vectors.
    let (_s, other) = quantizer(VectorQuantizerConfig {
        dead_code_threshold: Some(1.0),
        update: CodebookUpdate::Gradient,
        seed: Seed::new(1),
        ..VectorQuantizerConfig::new(2, 8)
    });
    other.quantize(&x, true).unwrap();
    assert_ne!(flat_f32(&other.codebook().unwrap()), book);
}

#[test]
fn kmeans_initialisation_covers_the_clusters_of_the_first_batch() {
    let run = |kmeans_init: bool| {
        let (_store, vq) = quantizer(VectorQuantizerConfig {
            kmeans_init,
            update: CodebookUpdate::Gradient, // so that only the initialisation moves codes
            ..VectorQuantizerConfig::new(4, 8)
        });
        let x = clustered(9, 8, 400, 4);
        let first = vq.quantize(&x, true).unwrap();
        let eval = vq.quantize(&x, false).unwrap();
        (first, eval, vq)
    };
    let (first, eval, vq) = run(true);
    // The first call already quantises with the k-means codebook.
    let mse = first.commitment_loss.to_scalar::<f32>().unwrap();
    assert!(mse < 1e-3, "{mse}");
    assert_eq!(eval.stats.used_codes(), vec![8]);
    // Counts are the cluster sizes (the same step's usage EMA keeps them there).
    assert_eq!(flat_f32(&vq.counts().unwrap()), vec![50.0; 8]);
    let (first_random, _, _) = run(false);
    assert!(first_random.commitment_loss.to_scalar::<f32>().unwrap() > 10.0);
    // Fewer vectors than codes: the extra codes copy batch vectors.
    let (_store, small) = quantizer(VectorQuantizerConfig {
        kmeans_init: true,
        update: CodebookUpdate::Gradient,
        ..VectorQuantizerConfig::new(4, 8)
    });
    let x = clustered(2, 3, 5, 4);
    let out = small.quantize(&x, true).unwrap();
    assert!(out.commitment_loss.to_scalar::<f32>().unwrap() < 1e-9);
}

#[test]
fn freezing_stops_updates_and_is_refused_in_gradient_mode() {
    let (store, mut vq) = quantizer(VectorQuantizerConfig::new(2, 4));
    let x = clustered(3, 4, 40, 2);
    vq.quantize(&x, true).unwrap();
    vq.freeze().unwrap();
    assert_eq!(vq.config().update, CodebookUpdate::Frozen);
    let before = store.tensors().unwrap();
    vq.quantize(&x, true).unwrap();
    for ((name, a), (_, b)) in before.iter().zip(store.tensors().unwrap()) {
        assert_eq!(
            a.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            b.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            "{name}"
        );
    }
    let (_s, mut gradient) = quantizer(VectorQuantizerConfig {
        update: CodebookUpdate::Gradient,
        ..VectorQuantizerConfig::new(2, 4)
    });
    assert_eq!(kind(gradient.freeze()), "invalid_parameter");
}

#[test]
fn telemetry_counts_dead_codes_and_batch_usage() {
    let (_store, vq) = quantizer(VectorQuantizerConfig::new(2, 16));
    let x = clustered(4, 2, 100, 2);
    // Before training every count is 0 < 1: all dead.
    let eval = vq.quantize(&x, false).unwrap();
    assert_eq!(eval.stats.dead_codes, vec![16]);
    let out = vq.quantize(&x, true).unwrap();
    let used = out.stats.used_codes()[0];
    assert!((1..=2).contains(&used), "{used}");
    assert_eq!(out.stats.batch.total(), 100);
    // After one step with decay 0.99 a code needs 100 vectors to reach a count of 1.
    assert!(out.stats.dead_codes[0] >= 15);
    let p = out.stats.mean_perplexity();
    assert!((1.0 - 1e-6..=used as f64 + 1e-6).contains(&p), "{p}");
}

#[test]
fn residual_vq_validates_and_trains() {
    let store = ParamStore::new(0);
    let root = store.root(&DEV);
    assert_eq!(
        kind(ResidualVq::from_param_path(&root, &[])),
        "invalid_parameter"
    );
    let mixed = [
        VectorQuantizerConfig::new(4, 8),
        VectorQuantizerConfig::new(2, 8),
    ];
    assert_eq!(
        kind(ResidualVq::from_param_path(&root, &mixed)),
        "invalid_parameter"
    );
    let config = VectorQuantizerConfig {
        dead_code_threshold: Some(1.0),
        ..VectorQuantizerConfig::new(2, 16)
    };
    let rvq = ResidualVq::uniform_from_param_path(&root.pp("rvq"), &config, 3).unwrap();
    assert_eq!(rvq.depth(), 3);
    assert_eq!(rvq.stages()[2].config().seed, Seed::new(0).child(2));
    let names: Vec<String> = store.buffers().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"rvq.2.codebook".to_string()), "{names:?}");
    for step in 0..20 {
        rvq.quantize(&clustered(step, 40, 200, 2), true).unwrap();
    }
    let test = clustered(77, 40, 200, 2);
    let indices = rvq.encode(&test).unwrap();
    let errors: Vec<f32> = (1..=3)
        .map(|l| {
            let rec = rvq.decode(&indices[..l]).unwrap();
            mean_squared_difference(&test, &rec)
        })
        .collect();
    assert!(errors[2] < errors[0], "{errors:?}");
    let packed = rvq.encode_packed(&test).unwrap();
    assert_eq!(packed.len(), 3);
    assert_eq!(
        flat_f32(&rvq.decode_packed(&packed).unwrap()),
        flat_f32(&rvq.decode(&indices).unwrap())
    );
    assert_eq!(kind(rvq.decode(&[])), "invalid_parameter");
    let four: Vec<Tensor> = indices.iter().chain(&indices[..1]).cloned().collect();
    assert_eq!(kind(rvq.decode(&four)), "invalid_parameter");
    // The stages' losses reach the input.
    let x = candle_core::Var::from_tensor(&test).unwrap();
    let out = rvq.quantize(x.as_tensor(), false).unwrap();
    let grads = out.loss.backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
}

#[test]
fn param_store_files_carry_the_quantizer_state() {
    let config = VectorQuantizerConfig {
        dead_code_threshold: Some(1.0),
        ..VectorQuantizerConfig::new(2, 8)
    };
    let (store, vq) = quantizer(config.clone());
    for step in 0..3 {
        vq.quantize(&clustered(step, 5, 60, 2), true).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    store.save(&path).unwrap();
    let other = ParamStore::new(42);
    let restored = VectorQuantizer::from_param_path(&other.root(&DEV).pp("vq"), config).unwrap();
    assert_ne!(
        flat_f32(&restored.codebook().unwrap()),
        flat_f32(&vq.codebook().unwrap())
    );
    other.load(&path).unwrap();
    assert_eq!(restored.steps().unwrap(), 3);
    assert_eq!(
        flat_f32(&restored.codebook().unwrap()),
        flat_f32(&vq.codebook().unwrap())
    );
    assert_eq!(
        flat_f32(&restored.counts().unwrap()),
        flat_f32(&vq.counts().unwrap())
    );
    assert_eq!(
        flat_f32(&restored.sums().unwrap().unwrap()),
        flat_f32(&vq.sums().unwrap().unwrap())
    );
}

#[test]
fn quantizer_and_index_files_are_the_same_bytes_on_1_and_2_threads() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(Vec<u8>, Vec<u8>)> = [1, 2]
        .into_iter()
        .map(|threads| {
            qcl_tensor::on_threads(threads, || {
                let config = VectorQuantizerConfig {
                    kmeans_init: true,
                    dead_code_threshold: Some(0.5),
                    ..VectorQuantizerConfig::new(4, 6)
                };
                let (_store, vq) = quantizer(config);
                let x = clustered(7, 6, 96, 4);
                for _ in 0..3 {
                    vq.quantize(&x, true).unwrap();
                }
                let codes: Vec<u32> = vq
                    .quantize(&x, false)
                    .unwrap()
                    .indices
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let packed = PackedIndices::pack(&codes, &[1, 96], 6).unwrap();
                let (q, p) = (
                    dir.path().join(format!("vq{threads}.safetensors")),
                    dir.path().join(format!("codes{threads}.safetensors")),
                );
                vq.save(&q).unwrap();
                packed.save(&p).unwrap();
                (std::fs::read(q).unwrap(), std::fs::read(p).unwrap())
            })
            .unwrap()
        })
        .collect();
    assert!(files[0].0 == files[1].0, "quantizer files differ");
    assert!(files[0].1 == files[1].1, "index files differ");
}
