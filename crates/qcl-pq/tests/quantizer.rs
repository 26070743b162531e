//! The `Quantizer` contract, checked for every quantizer of this crate on random data, and the
//! uniform scalar quantizer's own invariants.

use proptest::prelude::*;
use qcl_pq::{
    reconstruction_mse, FitQuantizer, KMeans, KMeansConfig, PackedCodes, ProductQuantizer,
    ProductQuantizerConfig, Quantizer, ScalarQuantizer, ScalarQuantizerConfig, ScalarRange,
};
use qcl_tensor::{squared_distance, Error, Seed};

/// The shape rules every quantizer keeps; returns the codes of `data`.
fn check_contract<Q: FitQuantizer>(data: &[f32], dim: usize, config: &Q::Config) -> PackedCodes {
    let n = data.len() / dim;
    let q = Q::fit(data, dim, config).unwrap();
    assert_eq!(q.dim(), dim);
    let codes = q.encode(data).unwrap();
    assert_eq!((codes.n(), codes.m()), (n, q.codes_per_vector()));
    assert_eq!(codes.nbits(), q.bits_per_code());
    assert_eq!(codes.code_size(), q.bits_per_vector().div_ceil(8));
    assert_eq!(q.decode(&codes).unwrap().len(), n * dim);
    // The same data and config give the same quantizer and the same codes.
    let again = Q::fit(data, dim, config).unwrap();
    assert_eq!(again.fingerprint(), q.fingerprint());
    assert_eq!(again.encode(data).unwrap(), codes);
    // Codes of another shape are refused with a typed error.
    let wider = PackedCodes::pack(
        &vec![0; n * (q.codes_per_vector() + 1)],
        q.codes_per_vector() + 1,
        1,
    )
    .unwrap();
    assert!(matches!(q.decode(&wider), Err(Error::ShapeMismatch { .. })));
    let other_bits = q.bits_per_code() % 16 + 1;
    let narrow = PackedCodes::pack(
        &vec![0; n * q.codes_per_vector()],
        q.codes_per_vector(),
        other_bits,
    )
    .unwrap();
    assert!(matches!(
        q.decode(&narrow),
        Err(Error::InvalidParameter { .. })
    ));
    // Bad input is refused, not a panic.
    assert!(matches!(q.encode(&data[..dim - 1]), Err(Error::ShapeMismatch { .. })) || dim == 1);
    assert!(matches!(q.encode(&[]), Err(Error::EmptyInput(_))));
    let mut bad = data[..dim].to_vec();
    bad[0] = f32::NAN;
    assert!(matches!(q.encode(&bad), Err(Error::NonFinite { .. })));
    codes
}

fn gaussian(seed: u64, n: usize, dim: usize) -> Vec<f32> {
    Seed::new(seed).rng().normal_vec(n * dim, 0.0, 1.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// k-means: the contract, and each decoded vector is the nearest centroid (no centroid is
    /// closer), so the reconstruction error is the k-means objective.
    #[test]
    fn kmeans_codes_are_nearest_centroids(seed in 0u64..1000, dim in 1usize..6, k in 1usize..12) {
        let data = gaussian(seed, 60, dim);
        let config = KMeansConfig { max_iter: 5, seed: Seed::new(seed), ..KMeansConfig::new(k) };
        check_contract::<KMeans>(&data, dim, &config);
        let km = <KMeans as FitQuantizer>::fit(&data, dim, &config).unwrap();
        let decoded = km.decode(&km.encode(&data).unwrap()).unwrap();
        for (x, y) in data.chunks(dim).zip(decoded.chunks(dim)) {
            let best = squared_distance(x, y);
            for c in km.centroids.chunks(dim) {
                prop_assert!(best <= squared_distance(x, c));
            }
        }
        let mse = reconstruction_mse(&km, &data).unwrap();
        prop_assert!((mse - km.mse(&data).unwrap()).abs() <= 1e-4 * (1.0 + mse));
    }

    /// Product quantization: the contract, and each sub-vector of a decoded vector is the
    /// nearest centroid of its sub-space's codebook.
    #[test]
    fn pq_keeps_the_contract(seed in 0u64..1000, m in 1usize..4, dsub in 1usize..4, nbits in 1u32..4) {
        let dim = m * dsub;
        let data = gaussian(seed, 64, dim);
        let config = ProductQuantizerConfig { seed: Seed::new(seed), ..ProductQuantizerConfig::new(m, nbits) };
        let codes = check_contract::<ProductQuantizer>(&data, dim, &config);
        let pq = ProductQuantizer::train(&data, dim, &config).unwrap();
        let decoded = pq.decode(&codes).unwrap();
        for (x, y) in data.chunks(dim).zip(decoded.chunks(dim)) {
            for j in 0..m {
                let s = j * dsub..(j + 1) * dsub;
                let best = squared_distance(&x[s.clone()], &y[s.clone()]);
                for c in pq.codebook(j).chunks(dsub) {
                    prop_assert!(best <= squared_distance(&x[s.clone()], c));
                }
            }
        }
    }

    /// Scalar quantization: the contract; inside the range every value is within half a step of
    /// its reconstruction; decoding then encoding gives the codes back; outside the range values
    /// clamp to its ends.
    #[test]
    fn scalar_error_is_at_most_half_a_step(
        seed in 0u64..1000, dim in 1usize..6, bits in 1u32..10, global in any::<bool>(),
    ) {
        let data = gaussian(seed, 40, dim);
        let range = if global { ScalarRange::Global } else { ScalarRange::PerDimension };
        let config = ScalarQuantizerConfig { bits, range };
        let codes = check_contract::<ScalarQuantizer>(&data, dim, &config);
        let sq = ScalarQuantizer::fit(&data, dim, &config).unwrap();
        if global {
            prop_assert!(sq.lo().iter().all(|&l| l == sq.lo()[0]));
        }
        let decoded = sq.decode(&codes).unwrap();
        let levels = ((1u32 << bits) - 1) as f32;
        for (i, (&x, &y)) in data.iter().zip(&decoded).enumerate() {
            let j = i % dim;
            let step = (sq.hi()[j] - sq.lo()[j]) / levels;
            prop_assert!((x - y).abs() <= step / 2.0 + 1e-5 * (1.0 + x.abs()), "{x} → {y}, step {step}");
        }
        prop_assert_eq!(sq.encode(&decoded).unwrap(), codes);
        let outside: Vec<f32> = (0..dim).map(|j| sq.hi()[j] + 5.0).collect();
        let clamped = sq.decode(&sq.encode(&outside).unwrap()).unwrap();
        for (y, &h) in clamped.iter().zip(sq.hi()) {
            prop_assert!((y - h).abs() <= 1e-5 * (1.0 + h.abs()), "{y} vs {h}");
        }
    }
}

#[test]
fn scalar_quantizer_refuses_bad_ranges_and_bits() {
    assert!(ScalarQuantizer::from_range(0, vec![0.0], vec![1.0]).is_err());
    assert!(ScalarQuantizer::from_range(17, vec![0.0], vec![1.0]).is_err());
    assert!(ScalarQuantizer::from_range(4, vec![0.0, 1.0], vec![1.0]).is_err());
    let err = ScalarQuantizer::from_range(4, vec![0.0, 2.0], vec![1.0, 1.0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("dimension 1"), "{err}");
    assert!(ScalarQuantizer::from_range(4, vec![f32::NAN], vec![1.0]).is_err());
    assert!(ScalarQuantizer::fit(&[], 2, &ScalarQuantizerConfig::default()).is_err());
    assert!(ScalarQuantizer::fit(&[1.0], 0, &ScalarQuantizerConfig::default()).is_err());
}

#[test]
fn a_constant_dimension_decodes_to_its_value() {
    let sq =
        ScalarQuantizer::fit(&[3.0, 0.0, 3.0, 1.0], 2, &ScalarQuantizerConfig::new(4)).unwrap();
    let decoded = sq.decode(&sq.encode(&[7.0, 0.4]).unwrap()).unwrap();
    assert_eq!(decoded[0], 3.0);
    assert!((decoded[1] - 0.4).abs() < 1e-6);
}

#[test]
fn fingerprints_tell_quantizers_apart() {
    let a = ScalarQuantizer::from_range(4, vec![0.0], vec![1.0]).unwrap();
    let b = ScalarQuantizer::from_range(4, vec![0.0], vec![2.0]).unwrap();
    let c = ScalarQuantizer::from_range(5, vec![0.0], vec![1.0]).unwrap();
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), c.fingerprint());
    let km = KMeans::fit(&[0.0, 1.0], 1, None, &KMeansConfig::new(2)).unwrap();
    assert_ne!(km.fingerprint(), a.fingerprint());
}

/// One codes file for every quantizer: what one writes, only it reads back.
#[test]
fn codes_files_round_trip_and_refuse_other_quantizers() {
    let dir = tempfile::tempdir().unwrap();
    let data = gaussian(5, 40, 4);
    let km = KMeans::fit(&data, 4, None, &KMeansConfig::new(5)).unwrap();
    let sq = ScalarQuantizer::fit(&data, 4, &ScalarQuantizerConfig::new(3)).unwrap();
    let km_path = dir.path().join("km.safetensors");
    let sq_path = dir.path().join("sq.safetensors");
    let km_codes = km.encode(&data).unwrap();
    let sq_codes = sq.encode(&data).unwrap();
    qcl_pq::save_codes(&km, &km_codes, &km_path).unwrap();
    qcl_pq::save_codes(&sq, &sq_codes, &sq_path).unwrap();
    assert_eq!(qcl_pq::load_codes(&km, &km_path).unwrap(), km_codes);
    assert_eq!(qcl_pq::load_codes(&sq, &sq_path).unwrap(), sq_codes);
    assert!(qcl_pq::load_codes(&sq, &km_path).is_err());
    assert!(qcl_pq::load_codes(&km, &sq_path).is_err());
    // Same shape, other values: refused by the fingerprint.
    let other =
        ScalarQuantizer::fit(&gaussian(6, 40, 4), 4, &ScalarQuantizerConfig::new(3)).unwrap();
    let err = qcl_pq::load_codes(&other, &sq_path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("made by"), "{err}");
    // Codes of another shape are not written.
    assert!(qcl_pq::save_codes(&km, &sq_codes, dir.path().join("x.safetensors")).is_err());
}

#[test]
fn kmeans_refuses_an_index_past_its_centroids() {
    let data: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let km = KMeans::fit(&data, 1, None, &KMeansConfig::new(5)).unwrap();
    assert_eq!(km.bits_per_code(), 3);
    let past = PackedCodes::pack(&[1, 6], 1, 3).unwrap();
    let err = km.decode(&past).unwrap_err().to_string();
    assert!(err.contains("position 1"), "{err}");
}

/// A range as wide as f32 allows still gives a finite step and finite reconstructions.
#[test]
fn the_widest_range_decodes_to_finite_values() {
    let sq = ScalarQuantizer::from_range(8, vec![-3e38], vec![3e38]).unwrap();
    let data = [-3e38, -1.0, 0.0, 2e38, 3e38];
    let decoded = sq.decode(&sq.encode(&data).unwrap()).unwrap();
    assert!(decoded.iter().all(|v| v.is_finite()), "{decoded:?}");
    assert_eq!((decoded[0], decoded[4]), (-3e38, 3e38));
    let step = 6e38f64 / 255.0;
    for (&x, &y) in data.iter().zip(&decoded) {
        assert!((f64::from(x) - f64::from(y)).abs() <= step / 2.0 * (1.0 + 1e-6));
    }
}
