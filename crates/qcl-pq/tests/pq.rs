//! Product quantization: packing, training, encoding and ADC search (errors and files are in
//! `pq_errors.rs`, shared helpers in `pq_common/`).

use proptest::prelude::*;
use qcl_pq::{
    KMeans, KMeansConfig, KMeansInit, PackedCodes, ProductQuantizer, ProductQuantizerConfig,
};
use qcl_tensor::{nearest_codes, squared_distance, Error, Seed};

mod pq_common;
use pq_common::*;

// ---------------------------------------------------------------- packing

#[test]
fn packing_follows_the_documented_bit_layout() {
    // 3 bits: codes 1, 2, 3 at bits 0..3, 3..6, 6..9 (LSB first); 2 bytes per vector.
    let p = PackedCodes::pack(&[1, 2, 3, 7, 0, 5], 3, 3).unwrap();
    assert_eq!(p.bytes(), &[0b1101_0001, 0b0, 0b0100_0111, 0b1]);
    // 12 bits: the second code starts in the middle of byte 1.
    let p = PackedCodes::pack(&[0xABC, 0x123], 2, 12).unwrap();
    assert_eq!(p.bytes(), &[0xBC, 0x3A, 0x12]);
    // 16 bits: little-endian u16s.
    let p = PackedCodes::pack(&[0xABCD, 0x1234], 2, 16).unwrap();
    assert_eq!(p.bytes(), &[0xCD, 0xAB, 0x34, 0x12]);
    // 1 bit: 8 codes fill a byte, the 9th starts a second one; each vector starts afresh.
    let p = PackedCodes::pack(
        &[1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        9,
        1,
    )
    .unwrap();
    assert_eq!(p.code_size(), 2);
    assert_eq!(p.bytes(), &[0x81, 0x01, 0x01, 0x00]);
    assert_eq!(p.get(1, 0), 1);
    assert_eq!(p.get(0, 8), 1);
    assert_eq!(p.get(1, 8), 0);
}

#[test]
fn packing_refuses_bad_codes_and_shapes() {
    assert!(is_invalid(PackedCodes::pack(&[0, 8], 2, 3), "codes"));
    assert!(is_invalid(PackedCodes::pack(&[1 << 16], 1, 16), "codes"));
    assert!(is_invalid(PackedCodes::pack(&[0], 1, 0), "nbits"));
    assert!(is_invalid(PackedCodes::pack(&[0], 1, 17), "nbits"));
    assert!(is_invalid(PackedCodes::pack(&[0], 0, 8), "m"));
    assert!(matches!(
        PackedCodes::pack(&[0, 1, 2], 2, 8),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        PackedCodes::from_bytes(vec![0; 5], 2, 3, 8),
        Err(Error::ShapeMismatch { .. })
    ));
    let p = PackedCodes::from_bytes(vec![0xFF; 4], 2, 3, 5).unwrap();
    assert_eq!(p.unpack(), vec![31, 31, 31, 31, 31, 31]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (a) pack → unpack / get / from_bytes is the identity for every width.
    #[test]
    fn packed_codes_round_trip(
        nbits in 1u32..=16,
        m in 1usize..24,
        n in 0usize..12,
        raw in prop::collection::vec(any::<u32>(), 24 * 12),
        saturate in any::<bool>(),
    ) {
        let mask = (1u32 << nbits) - 1;
        let codes: Vec<u32> = raw[..n * m]
            .iter()
            .map(|&c| if saturate { mask } else { c & mask })
            .collect();
        let packed = PackedCodes::pack(&codes, m, nbits).unwrap();
        let size = (m * nbits as usize).div_ceil(8);
        prop_assert_eq!(packed.code_size(), size);
        prop_assert_eq!(packed.bytes().len(), n * size);
        prop_assert_eq!((packed.n(), packed.m(), packed.nbits()), (n, m, nbits));
        prop_assert_eq!(packed.unpack(), codes.clone());
        for i in 0..n {
            for j in 0..m {
                prop_assert_eq!(packed.get(i, j), codes[i * m + j]);
            }
            // The padding bits after the last code are zero.
            let used = m * nbits as usize;
            if !used.is_multiple_of(8) {
                let last = packed.bytes()[(i + 1) * size - 1];
                prop_assert_eq!(last >> (used % 8), 0);
            }
        }
        let again = PackedCodes::from_bytes(packed.bytes().to_vec(), n, m, nbits).unwrap();
        prop_assert_eq!(again, packed);
    }
}

// ---------------------------------------------------------------- training and encoding

#[test]
fn training_gives_declared_shapes_and_beats_the_mean() {
    let (n, dim) = (1_000, 16);
    let data = Seed::new(3).rng().normal_vec(n * dim, 0.0, 1.0);
    let pq = ProductQuantizer::train(&data, dim, &ProductQuantizerConfig::new(4, 4)).unwrap();
    assert_eq!(
        (pq.dim(), pq.m(), pq.nbits(), pq.dsub(), pq.ksub()),
        (16, 4, 4, 4, 16)
    );
    assert_eq!(pq.codebooks().len(), 4 * 16 * 4);
    assert_eq!(pq.code_size(), 2);
    let codes = pq.encode(&data).unwrap();
    assert_eq!(codes.n(), n);
    let decoded = pq.decode(&codes).unwrap();
    assert_eq!(decoded.len(), n * dim);
    let mse: f32 = data
        .chunks(dim)
        .zip(decoded.chunks(dim))
        .map(|(x, y)| squared_distance(x, y))
        .sum::<f32>()
        / (n * dim) as f32;
    // Unit-variance data: the mean alone gives ~1; 16 centroids per 4-D sub-space give ~0.32.
    assert!(mse < 0.45, "mse {mse}");
    // More bits, less error.
    let finer = ProductQuantizer::train(&data, dim, &ProductQuantizerConfig::new(4, 6)).unwrap();
    let finer_decoded = finer.decode(&finer.encode(&data).unwrap()).unwrap();
    let finer_mse: f32 = data
        .chunks(dim)
        .zip(finer_decoded.chunks(dim))
        .map(|(x, y)| squared_distance(x, y))
        .sum::<f32>()
        / (n * dim) as f32;
    assert!(finer_mse < mse, "{finer_mse} >= {mse}");
}

#[test]
fn data_with_ksub_values_per_subspace_is_encoded_losslessly() {
    // Each 3-D sub-vector is one of 4 fixed points: 2-bit k-means++ recovers them exactly.
    let points: [[f32; 3]; 4] = [
        [0.0, 0.0, 0.0],
        [5.0, 0.0, 1.0],
        [0.0, 7.0, 2.0],
        [3.0, 3.0, -4.0],
    ];
    let mut rng = Seed::new(9).rng();
    let (n, m) = (200, 2);
    let data: Vec<f32> = (0..n * m)
        .flat_map(|_| points[rng.below(4).unwrap()])
        .collect();
    let params = ProductQuantizerConfig {
        init: KMeansInit::KMeansPlusPlus,
        ..ProductQuantizerConfig::new(m, 2)
    };
    let pq = ProductQuantizer::train(&data, 6, &params).unwrap();
    let codes = pq.encode(&data).unwrap();
    assert_eq!(pq.decode(&codes).unwrap(), data);
}

#[test]
fn training_is_seeded_and_independent_of_thread_count() {
    let data = Seed::new(4).rng().normal_vec(600 * 8, 0.0, 1.0);
    let params = quick_params(2, 3);
    let run = |threads: usize, params: &ProductQuantizerConfig| {
        qcl_tensor::on_threads(threads, || ProductQuantizer::train(&data, 8, params))
            .unwrap()
            .unwrap()
    };
    let one = run(1, &params);
    assert_eq!(one, run(2, &params));
    let other_seed = ProductQuantizerConfig {
        seed: Seed::new(99),
        ..params.clone()
    };
    assert_ne!(one.codebooks(), run(2, &other_seed).codebooks());
    // Sub-space j is plain k-means on its sub-vectors, seeded with `seed.child(j)`.
    for j in 0..2 {
        let kmeans = KMeansConfig {
            max_iter: params.max_iter,
            seed: params.seed.child(j as u64),
            ..KMeansConfig::new(8)
        };
        let alone = KMeans::fit(&sub_vectors(&data, 8, j, 4), 4, None, &kmeans).unwrap();
        assert_eq!(one.codebook(j), alone.centroids.as_slice(), "sub-space {j}");
    }
}

#[test]
fn sixteen_bit_codes_are_the_exact_nearest_centroids() {
    let pq = random_pq(11, 1, 3, 16, false);
    let data = values(12, 30 * 3, false);
    let codes = pq.encode(&data).unwrap();
    assert_eq!(codes.code_size(), 6);
    for j in 0..3 {
        let want = nearest_codes(&sub_vectors(&data, 3, j, 1), pq.codebook(j), 1, None).unwrap();
        let got: Vec<u32> = (0..30).map(|i| codes.get(i, j)).collect();
        assert_eq!(got, want.indices);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// (b) The reconstruction error of a vector is the sum of its sub-quantizers' errors, and
    /// the codes are the per-sub-space nearest centroids.
    #[test]
    fn reconstruction_error_is_the_sum_of_subspace_errors(
        seed in any::<u64>(),
        m in 1usize..5,
        dsub in 1usize..5,
        nbits in 1u32..=4,
        n in 64usize..200,
    ) {
        let dim = m * dsub;
        let data = Seed::new(seed).rng().normal_vec(n * dim, 0.0, 1.0);
        let params = ProductQuantizerConfig { seed: Seed::new(seed), ..quick_params(m, nbits) };
        let pq = ProductQuantizer::train(&data, dim, &params).unwrap();
        let codes = pq.encode(&data).unwrap();
        let decoded = pq.decode(&codes).unwrap();
        let mut expected = vec![0f64; n];
        for j in 0..m {
            let found = nearest_codes(&sub_vectors(&data, dim, j, dsub), pq.codebook(j), dsub, None)
                .unwrap();
            for (i, sum) in expected.iter_mut().enumerate() {
                prop_assert_eq!(codes.get(i, j), found.indices[i]);
                *sum += f64::from(found.distances[i]);
            }
        }
        for (i, (x, y)) in data.chunks(dim).zip(decoded.chunks(dim)).enumerate() {
            let error = f64::from(squared_distance(x, y));
            prop_assert!(
                (error - expected[i]).abs() <= 1e-4 * expected[i].max(error),
                "vector {}: {} vs {}", i, error, expected[i]
            );
        }
    }

    /// (d) Every code is below 2^nbits and decodes to its centroid.
    #[test]
    fn codes_fit_in_nbits_and_decode_to_their_centroids(
        seed in any::<u64>(),
        m in 1usize..4,
        dsub in 1usize..4,
        nbits in 1u32..=12,
        n in 1usize..40,
    ) {
        let pq = random_pq(seed, dsub, m, nbits, false);
        let data = values(seed ^ 1, n * m * dsub, false);
        let codes = pq.encode(&data).unwrap();
        prop_assert!(codes.unpack().iter().all(|&c| c < 1 << nbits));
        let decoded = pq.decode(&codes).unwrap();
        for (i, row) in decoded.chunks(m * dsub).enumerate() {
            for j in 0..m {
                let c = codes.get(i, j) as usize;
                prop_assert_eq!(
                    &row[j * dsub..(j + 1) * dsub],
                    &pq.codebook(j)[c * dsub..(c + 1) * dsub]
                );
            }
        }
    }
}

// ---------------------------------------------------------------- search

#[test]
fn search_known_answer_with_ties_to_the_lower_index() {
    // Sub-space 0 centroids {0, 1}, sub-space 1 centroids {0, 2}.
    let pq = ProductQuantizer::from_codebooks(2, 2, 1, vec![0.0, 1.0, 0.0, 2.0]).unwrap();
    let codes = PackedCodes::pack(&[1, 1, 0, 0, 1, 0, 0, 0, 0, 1], 2, 1).unwrap();
    // From (0, 0): distances 5, 0, 1, 0, 4.
    let found = pq.search(&[0.0, 0.0], &codes, 4).unwrap();
    assert_eq!(found.indices, vec![1, 3, 2, 4]);
    assert_eq!(found.distances, vec![0.0, 0.0, 1.0, 4.0]);
    // From (1, 2) and (1, 0), top 2 each, row-major [nq, top_k].
    let found = pq.search(&[1.0, 2.0, 1.0, 0.0], &codes, 2).unwrap();
    assert_eq!(found.indices, vec![0, 4, 2, 1]);
    assert_eq!(found.distances, vec![0.0, 1.0, 0.0, 1.0]);
}

#[test]
fn a_database_vector_finds_its_own_code_first() {
    let (n, dim) = (1_500, 12);
    let data = Seed::new(5).rng().normal_vec(n * dim, 0.0, 1.0);
    let pq = ProductQuantizer::train(&data, dim, &quick_params(3, 5)).unwrap();
    let codes = pq.encode(&data).unwrap();
    let decoded = pq.decode(&codes).unwrap();
    let found = pq.search(&data[..20 * dim], &codes, 5).unwrap();
    for q in 0..20 {
        let best = found.indices[q * 5] as usize;
        assert!(best <= q);
        assert!((0..3).all(|j| codes.get(best, j) == codes.get(q, j)));
        let error = squared_distance(
            &data[q * dim..(q + 1) * dim],
            &decoded[q * dim..(q + 1) * dim],
        );
        assert!((found.distances[q * 5] - error).abs() <= 1e-5 * error.max(1e-30));
        assert!(found.distances[q * 5..(q + 1) * 5]
            .windows(2)
            .all(|w| w[0] <= w[1]));
    }
}

#[test]
fn search_is_independent_of_thread_count() {
    let pq = random_pq(6, 2, 4, 6, true);
    let data = values(7, 3_000 * 8, true);
    let codes = pq.encode(&data).unwrap();
    let queries = values(8, 17 * 8, false);
    let run = |threads: usize| {
        qcl_tensor::on_threads(threads, || pq.search(&queries, &codes, 10))
            .unwrap()
            .unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, brute_force_adc(&pq, &queries, &codes, 10));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (c) Search equals the brute-force ADC reference, ties included.
    #[test]
    fn search_equals_brute_force_adc(
        seed in any::<u64>(),
        m in 1usize..5,
        dsub in 1usize..4,
        nbits in 1u32..=5,
        n in 1usize..60,
        nq in 1usize..5,
        top_k_fraction in 0.0f64..1.0,
        grid in any::<bool>(),
    ) {
        let dim = m * dsub;
        let pq = random_pq(seed, dsub, m, nbits, grid);
        let mut database = values(seed ^ 2, n * dim, grid);
        // Duplicate vectors, so that whole database rows tie.
        if n >= 2 {
            let (first, rest) = database.split_at_mut(dim);
            rest[(n - 2) * dim..].copy_from_slice(first);
        }
        let codes = pq.encode(&database).unwrap();
        let queries = values(seed ^ 3, nq * dim, grid);
        let top_k = 1 + ((n - 1) as f64 * top_k_fraction) as usize;
        let got = pq.search(&queries, &codes, top_k).unwrap();
        prop_assert_eq!(got, brute_force_adc(&pq, &queries, &codes, top_k));
    }
}
