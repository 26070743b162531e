//! Product quantization: typed errors for bad input, and codebook files (round trips and
//! refusals).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use qcl_pq::{PackedCodes, ProductQuantizer, ProductQuantizerConfig, PQ_FORMAT};
use qcl_tensor::{write_safetensors, Error};

mod pq_common;
use pq_common::*;

// ---------------------------------------------------------------- errors

#[test]
fn bad_inputs_are_typed_errors() {
    let data = values(1, 40 * 4, false);
    let train =
        |data: &[f32], dim, m, nbits| ProductQuantizer::train(data, dim, &quick_params(m, nbits));
    assert!(is_invalid(train(&data, 0, 1, 2), "dim"));
    assert!(is_invalid(train(&data, 4, 0, 2), "m"));
    assert!(is_invalid(train(&data, 4, 3, 2), "m"));
    assert!(is_invalid(train(&data, 4, 2, 0), "nbits"));
    assert!(is_invalid(train(&data, 4, 2, 17), "nbits"));
    // 2^6 = 64 centroids but only 40 vectors.
    assert!(is_invalid(train(&data, 4, 2, 6), "nbits"));
    assert!(matches!(train(&[], 4, 2, 2), Err(Error::EmptyInput(_))));
    assert!(matches!(
        train(&data[..7], 4, 2, 2),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut bad = data.clone();
    bad[13] = f32::NAN;
    assert!(matches!(
        train(&bad, 4, 2, 2),
        Err(Error::NonFinite { index: 13, .. })
    ));
    bad[13] = f32::NEG_INFINITY;
    assert!(matches!(
        train(&bad, 4, 2, 2),
        Err(Error::NonFinite { index: 13, .. })
    ));
    let bad_knob = ProductQuantizerConfig {
        max_points_per_centroid: Some(0),
        ..quick_params(2, 2)
    };
    assert!(is_invalid(
        ProductQuantizer::train(&data, 4, &bad_knob),
        "max_points_per_centroid"
    ));

    let pq = train(&data, 4, 2, 2).unwrap();
    let codes = pq.encode(&data).unwrap();
    assert!(matches!(pq.encode(&[]), Err(Error::EmptyInput(_))));
    assert!(matches!(
        pq.encode(&data[..6]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        pq.encode(&bad),
        Err(Error::NonFinite { index: 13, .. })
    ));
    assert!(matches!(
        pq.search(&[0.0; 3], &codes, 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        pq.search(&[], &codes, 1),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        pq.search(&[0.0, f32::INFINITY, 0.0, 0.0], &codes, 1),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(is_invalid(pq.search(&data[..4], &codes, 0), "top_k"));
    assert!(is_invalid(pq.search(&data[..4], &codes, 41), "top_k"));
    assert!(pq.search(&data[..4], &codes, 40).is_ok());
    let empty = PackedCodes::pack(&[], 2, 2).unwrap();
    assert!(matches!(
        pq.search(&data[..4], &empty, 1),
        Err(Error::EmptyInput(_))
    ));

    // Codes of another quantizer.
    let other_m = PackedCodes::pack(&[0; 8], 4, 2).unwrap();
    assert!(matches!(
        pq.decode(&other_m),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        pq.search(&data[..4], &other_m, 1),
        Err(Error::ShapeMismatch { .. })
    ));
    let other_nbits = PackedCodes::pack(&[0; 8], 2, 3).unwrap();
    assert!(is_invalid(pq.decode(&other_nbits), "codes"));
    assert!(is_invalid(pq.search(&data[..4], &other_nbits, 1), "codes"));

    // Hand-made codebooks.
    assert!(matches!(
        ProductQuantizer::from_codebooks(4, 2, 2, vec![0.0; 15]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ProductQuantizer::from_codebooks(2, 1, 1, vec![0.0, 0.0, f32::NAN, 0.0]),
        Err(Error::NonFinite { index: 2, .. })
    ));
    assert!(is_invalid(
        ProductQuantizer::from_codebooks(3, 2, 1, vec![0.0; 6]),
        "m"
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// (e) Each kind of bad input gives its error variant, wherever it sits.
    #[test]
    fn bad_inputs_give_their_error_variants(
        seed in any::<u64>(),
        dim in 2usize..20,
        m in 2usize..8,
        nbits_bad in prop::sample::select(vec![0u32, 17, 18, 31, 32, 100]),
        nan_at in any::<prop::sample::Index>(),
        infinite in any::<bool>(),
        extra in 1usize..4,
    ) {
        let data = values(seed, 20 * dim, false);
        if !dim.is_multiple_of(m) {
            let trained = ProductQuantizer::train(&data, dim, &quick_params(m, 1));
            prop_assert!(is_invalid(trained, "m"));
        }
        let trained = ProductQuantizer::train(&data, dim, &quick_params(1, nbits_bad));
        prop_assert!(is_invalid(trained, "nbits"));
        let mut bad = data.clone();
        let index = nan_at.index(bad.len());
        bad[index] = if infinite { f32::INFINITY } else { f32::NAN };
        let trained = ProductQuantizer::train(&bad, dim, &quick_params(1, 1));
        prop_assert!(is_non_finite_at(trained, index));
        let pq = random_pq(seed, dim, 1, 2, false);
        prop_assert!(is_non_finite_at(pq.encode(&bad), index));
        // Rows of another dimension.
        let wrong = values(seed, 3 * (dim + extra), false);
        if !wrong.len().is_multiple_of(dim) {
            prop_assert!(is_shape_mismatch(pq.encode(&wrong)));
            let codes = pq.encode(&data).unwrap();
            prop_assert!(is_shape_mismatch(pq.search(&wrong, &codes, 1)));
        }
        // A code that does not fit.
        let nbits = 1 + (seed % 16) as u32;
        prop_assert!(is_invalid(PackedCodes::pack(&[0, 1 << nbits], 2, nbits), "codes"));
    }
}

// ---------------------------------------------------------------- files

/// Writes a `codebooks` tensor of the given shape with the given metadata.
fn write_codebooks(path: &std::path::Path, shape: &[usize], meta: &[(&str, String)]) {
    let len: usize = shape.iter().product();
    let tensor = Tensor::from_vec(values(0, len, false), shape, &Device::Cpu).unwrap();
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    write_safetensors(path, &[("codebooks", &tensor)], &meta).unwrap();
}

fn pq_meta(dim: usize, m: usize, nbits: u32) -> Vec<(&'static str, String)> {
    vec![
        ("format", PQ_FORMAT.to_string()),
        ("dim", dim.to_string()),
        ("m", m.to_string()),
        ("nbits", nbits.to_string()),
    ]
}

#[test]
fn save_load_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pq.safetensors");
    let data = values(2, 300 * 6, false);
    let pq = ProductQuantizer::train(&data, 6, &quick_params(3, 3)).unwrap();
    pq.save(&path).unwrap();
    let back = ProductQuantizer::load(&path).unwrap();
    assert_eq!(back, pq);
    assert_eq!(back.encode(&data).unwrap(), pq.encode(&data).unwrap());

    let bad = dir.path().join("bad.safetensors");
    let load_err = |shape: &[usize], meta: Vec<(&str, String)>| {
        write_codebooks(&bad, shape, &meta);
        ProductQuantizer::load(&bad).unwrap_err()
    };
    // Codebooks of another shape than the metadata declares.
    assert!(matches!(
        load_err(&[3, 8, 3], pq_meta(6, 3, 3)),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        load_err(&[3, 4, 2], pq_meta(6, 3, 3)),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        load_err(&[24, 2], pq_meta(6, 3, 3)),
        Error::ShapeMismatch { .. }
    ));
    // Foreign, missing or inconsistent metadata.
    let mut foreign = pq_meta(6, 3, 3);
    foreign[0].1 = "qcl-kmeans/1".into();
    assert!(matches!(
        load_err(&[3, 8, 2], foreign),
        Error::BadFile { .. }
    ));
    assert!(matches!(
        load_err(&[3, 8, 2], pq_meta(6, 3, 3)[..3].to_vec()),
        Error::BadFile { .. }
    ));
    assert!(matches!(
        load_err(&[3, 8, 2], pq_meta(7, 3, 3)),
        Error::BadFile { .. }
    ));
    assert!(matches!(
        load_err(&[3, 8, 2], pq_meta(6, 3, 17)),
        Error::BadFile { .. }
    ));
    assert!(matches!(
        load_err(&[3, 8, 2], pq_meta(6, 0, 3)),
        Error::BadFile { .. }
    ));
    // Non-finite codebooks.
    let nan = Tensor::from_vec(vec![f32::NAN; 4], (1, 2, 2), &Device::Cpu).unwrap();
    let meta: BTreeMap<String, String> = pq_meta(2, 1, 1)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    write_safetensors(&bad, &[("codebooks", &nan)], &meta).unwrap();
    assert!(matches!(
        ProductQuantizer::load(&bad),
        Err(Error::NonFinite { .. })
    ));
    // Truncated and missing files.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 3]).unwrap();
    assert!(matches!(
        ProductQuantizer::load(&bad),
        Err(Error::BadFile { .. })
    ));
    assert!(matches!(
        ProductQuantizer::load(dir.path().join("absent.safetensors")),
        Err(Error::Io { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// (f) save → load is the identity, and codebooks of any other shape are refused.
    #[test]
    fn files_round_trip_and_wrong_shapes_are_refused(
        seed in any::<u64>(),
        m in 1usize..5,
        dsub in 1usize..5,
        nbits in 1u32..=8,
        axis in 0usize..3,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pq.safetensors");
        let pq = random_pq(seed, dsub, m, nbits, false);
        pq.save(&path).unwrap();
        prop_assert_eq!(ProductQuantizer::load(&path).unwrap(), pq);
        let mut shape = [m, 1 << nbits, dsub];
        shape[axis] += 1;
        write_codebooks(&path, &shape, &pq_meta(m * dsub, m, nbits));
        prop_assert!(is_shape_mismatch(ProductQuantizer::load(&path)));
    }
}
