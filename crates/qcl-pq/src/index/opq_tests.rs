//! Tests of OPQ training ([`super`]).

use super::*;
use proptest::prelude::*;

/// A random orthogonal `dim × dim` matrix, checked by [`Rotation::from_matrix`].
fn random_rotation(seed: u64, dim: usize) -> Rotation {
    let r = super::random_rotation(dim, Seed::new(seed)).unwrap();
    Rotation::from_matrix(dim, r.matrix().to_vec()).unwrap()
}

/// `n` anisotropic Gaussian vectors (standard deviations `scale · 0.7^j`), turned by a
/// random rotation: coordinates correlated within and across sub-spaces.
fn correlated(seed: u64, n: usize, dim: usize, scale: f32) -> Vec<f32> {
    let mut z = Seed::new(seed).rng().normal_vec(n * dim, 0.0, 1.0);
    for row in z.chunks_exact_mut(dim) {
        for (j, v) in row.iter_mut().enumerate() {
            *v *= scale * 0.7f32.powi(j as i32);
        }
    }
    random_rotation(seed ^ 0x5eed, dim).apply(&z).unwrap()
}

fn plain_and_opq(data: &[f32], dim: usize, config: &OpqConfig) -> (f64, f64, Rotation) {
    let plain = ProductQuantizer::train(data, dim, &config.pq_params()).unwrap();
    let plain_mse = reconstruction_mse(data, &Rotation::identity(dim), &plain).unwrap();
    let (rotation, pq) = train_opq(data, dim, config).unwrap();
    (
        plain_mse,
        reconstruction_mse(data, &rotation, &pq).unwrap(),
        rotation,
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn rotation_is_orthogonal(seed in any::<u64>(), n in 64usize..300, shape in 0usize..4, nbits in 2u32..5, iterations in 2usize..6) {
        let (dim, m) = [(4, 2), (6, 3), (8, 2), (8, 4)][shape];
        let data = Seed::new(seed).rng().normal_vec(n * dim, 0.0, 2.0);
        let config = OpqConfig { iterations, seed: Seed::new(seed), ..OpqConfig::new(m, nbits) };
        let (rotation, pq) = train_opq(&data, dim, &config).unwrap();
        prop_assert_eq!((rotation.dim(), pq.dim(), pq.m(), pq.nbits()), (dim, dim, m, nbits));
        let r = rotation.matrix();
        for a in 0..dim {
            for b in 0..dim {
                let dot: f64 = (0..dim).map(|k| f64::from(r[k * dim + a]) * f64::from(r[k * dim + b])).sum();
                prop_assert!((dot - f64::from(u8::from(a == b))).abs() <= 1e-4, "RᵀR[{a},{b}] = {dot}");
            }
        }
    }

    #[test]
    fn never_worse_than_plain_pq(seed in any::<u64>(), n in 256usize..800, scale in 0.1f32..10.0, iterations in 1usize..8) {
        let data = correlated(seed, n, 8, scale);
        let config = OpqConfig { iterations, first_pq_iterations: 10, seed: Seed::new(seed), ..OpqConfig::new(4, 3) };
        let (plain, opq, _) = plain_and_opq(&data, 8, &config);
        prop_assert!(opq <= plain, "OPQ {opq} > plain PQ {plain}");
    }
}

#[test]
fn rotation_matters_on_correlated_data() {
    for seed in 0..3 {
        let data = correlated(seed, 2000, 8, 3.0);
        let config = OpqConfig {
            iterations: 20,
            ..OpqConfig::new(4, 3)
        };
        let (plain, opq, rotation) = plain_and_opq(&data, 8, &config);
        assert!(!rotation.is_identity());
        assert!(
            opq < 0.7 * plain,
            "seed {seed}: OPQ {opq} vs plain PQ {plain}"
        );
    }
}

#[test]
fn one_iteration_is_plain_pq() {
    let data = correlated(7, 500, 6, 1.0);
    let config = OpqConfig {
        iterations: 1,
        ..OpqConfig::new(3, 4)
    };
    let (rotation, pq) = train_opq(&data, 6, &config).unwrap();
    let plain = ProductQuantizer::train(&data, 6, &config.pq_params()).unwrap();
    assert!(rotation.is_identity());
    // Plain PQ, or the sample's own codebooks if they happen to do better.
    let mse = |pq| reconstruction_mse(&data, &rotation, pq).unwrap();
    assert!(pq == plain || mse(&pq) < mse(&plain));
}

#[test]
fn same_seed_same_bits_on_any_thread_count() {
    let data = correlated(3, 3000, 8, 2.0);
    let config = OpqConfig {
        iterations: 6,
        max_train_points: Some(1500), // the subsample path too
        seed: Seed::new(99),
        ..OpqConfig::new(2, 4)
    };
    let run = |threads| {
        qcl_tensor::on_threads(threads, || train_opq(&data, 8, &config))
            .unwrap()
            .unwrap()
    };
    let (r1, pq1) = run(1);
    for threads in [2, 3] {
        let (r, pq) = run(threads);
        assert_eq!(bits(r.matrix()), bits(r1.matrix()));
        assert_eq!(bits(pq.codebooks()), bits(pq1.codebooks()));
    }
    let other = OpqConfig {
        seed: Seed::new(100),
        ..config.clone()
    };
    assert_ne!(train_opq(&data, 8, &other).unwrap().1, pq1);
}

#[test]
fn bad_inputs_give_typed_errors() {
    let data = Seed::new(0).rng().normal_vec(64 * 4, 0.0, 1.0);
    let ok = OpqConfig::new(2, 2);
    let invalid = |result: Result<(Rotation, ProductQuantizer)>, name: &str| match result {
        Err(Error::InvalidParameter { name: got, .. }) => assert_eq!(got, name),
        other => panic!("expected InvalidParameter({name}), got {other:?}"),
    };
    invalid(train_opq(&data, 0, &ok), "dim");
    invalid(train_opq(&data, 4, &OpqConfig::new(0, 2)), "m");
    invalid(train_opq(&data, 4, &OpqConfig::new(3, 2)), "m");
    invalid(train_opq(&data, 4, &OpqConfig::new(2, 0)), "nbits");
    invalid(train_opq(&data, 4, &OpqConfig::new(2, 17)), "nbits");
    invalid(train_opq(&data, 4, &OpqConfig::new(2, 7)), "nbits"); // 128 centroids, 64 vectors
    invalid(
        train_opq(
            &data,
            4,
            &OpqConfig {
                iterations: 0,
                ..ok.clone()
            },
        ),
        "iterations",
    );
    let too_many = OpqConfig {
        pq_iterations: MAX_ITERATIONS + 1,
        ..ok.clone()
    };
    invalid(train_opq(&data, 4, &too_many), "pq_iterations");
    let few = OpqConfig {
        max_train_points: Some(3),
        ..ok.clone()
    };
    invalid(train_opq(&data, 4, &few), "max_train_points");
    assert!(matches!(train_opq(&[], 4, &ok), Err(Error::EmptyInput(_))));
    assert!(matches!(
        train_opq(&data[..7], 4, &ok),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan = data.clone();
    nan[5] = f32::NAN;
    assert!(matches!(
        train_opq(&nan, 4, &ok),
        Err(Error::NonFinite { index: 5, .. })
    ));
}

#[test]
fn rotations_are_checked_and_invertible() {
    assert!(matches!(
        Rotation::from_matrix(0, vec![]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        Rotation::from_matrix(2, vec![1.0; 3]),
        Err(Error::ShapeMismatch { .. })
    ));
    let nan = vec![f32::NAN, 0.0, 0.0, 1.0];
    assert!(matches!(
        Rotation::from_matrix(2, nan),
        Err(Error::NonFinite { .. })
    ));
    let skew = vec![1.0, 0.01, 0.0, 1.0];
    assert!(matches!(
        Rotation::from_matrix(2, skew),
        Err(Error::InvalidParameter { .. })
    ));
    let r = random_rotation(5, 6);
    let x = Seed::new(1).rng().normal_vec(10 * 6, 0.0, 1.0);
    let back = r.apply_inverse(&r.apply(&x).unwrap()).unwrap();
    assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-5));
    assert!(matches!(r.apply(&x[..5]), Err(Error::ShapeMismatch { .. })));
    assert_eq!(Rotation::identity(6).apply(&x).unwrap(), x);
    // Each row is rotated on its own: one row alone gives the same bits.
    assert_eq!(
        bits(&r.apply(&x[6..12]).unwrap()),
        bits(&r.apply(&x).unwrap()[6..12])
    );
    // Wider than a column tile, a row in the second tile of rows.
    let (dim, n) = (300, 11);
    let r = random_rotation(6, dim);
    let x = Seed::new(2).rng().normal_vec(n * dim, 0.0, 1.0);
    let all = r.apply(&x).unwrap();
    for row in [0, 9, 10] {
        let alone = r.apply(&x[row * dim..(row + 1) * dim]).unwrap();
        assert_eq!(
            bits(&alone),
            bits(&all[row * dim..(row + 1) * dim]),
            "row {row}"
        );
    }
}

#[test]
fn random_start_is_seeded_and_off_gives_the_identity_start() {
    // A random start is a rotation (checked by `from_matrix`), the same for the same seed.
    assert_eq!(random_rotation(5, 12), random_rotation(5, 12));
    assert_ne!(random_rotation(5, 12), random_rotation(6, 12));
    let data = correlated(3, 400, 8, 1.0);
    let config = |random_start| OpqConfig {
        iterations: 3,
        pq_iterations: 2,
        first_pq_iterations: 5,
        random_start,
        ..OpqConfig::new(2, 3)
    };
    let (random, _) = train_opq(&data, 8, &config(true)).unwrap();
    let (identity, _) = train_opq(&data, 8, &config(false)).unwrap();
    // The two starts lead to different rotations; each run repeats itself.
    assert_ne!(random, identity);
    assert_eq!(train_opq(&data, 8, &config(true)).unwrap().0, random);
}
