//! The `*_tensor` methods are a thin layer over the slice methods: same results bit for bit,
//! typed errors for tensors that are not what they should be.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qcl_pq::{
    KMeans, KMeansConfig, KMeansInit, MiniBatchKMeans, PackedCodes, ProductQuantizer,
    ProductQuantizerConfig,
};
use qcl_tensor::{Error, Seed};

const DEV: Device = Device::Cpu;

/// Bit patterns of an `f32` output (checked to be `f32`: outputs are, whatever the input).
fn f32s(t: &Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), candle_core::DType::F32);
    qcl_tensor::f32_bits(t).unwrap()
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<u32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn kmeans_tensor_path_equals_slice_path(
        n in 8usize..60, dim in 1usize..6, k in 1usize..6, seed in 0u64..1000,
        weighted in any::<bool>(), plus_plus in any::<bool>(), as_f64 in any::<bool>(),
    ) {
        let k = k.min(n);
        let mut rng = Seed::new(seed).rng();
        let data = rng.normal_vec(n * dim, 0.0, 1.0);
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let params = KMeansConfig {
            max_iter: 5,
            init: if plus_plus { KMeansInit::KMeansPlusPlus } else { KMeansInit::Random },
            seed: Seed::new(seed + 1),
            ..KMeansConfig::new(k)
        };
        let x = Tensor::from_slice(&data, (n, dim), &DEV).unwrap();
        // An f64 tensor holding the same f32 values converts back to them exactly.
        let x = if as_f64 { x.to_dtype(DType::F64).unwrap() } else { x };
        let wt = Tensor::from_slice(&w, n, &DEV).unwrap();
        let slice = KMeans::fit(&data, dim, weighted.then_some(&w[..]), &params).unwrap();
        let tensor = KMeans::fit_tensor(&x, weighted.then_some(&wt), &params).unwrap();
        prop_assert_eq!(bits(&slice.centroids), f32s(&tensor.centroids_tensor(&DEV).unwrap()));
        prop_assert_eq!(&slice.objective_history, &tensor.objective_history);
        let found = slice.assign(&data).unwrap();
        let (idx, dist) = tensor.assign_tensor(&x).unwrap();
        prop_assert_eq!(idx.dims(), &[n]);
        prop_assert_eq!(found.indices, u32s(&idx));
        prop_assert_eq!(bits(&found.distances), f32s(&dist));
        prop_assert_eq!(slice.mse(&data).unwrap().to_bits(), tensor.mse_tensor(&x).unwrap().to_bits());

        // Mini-batch k-means, started from the same batch, fed the same batches.
        let mut a = MiniBatchKMeans::from_first_batch(&data, dim, k, Seed::new(seed)).unwrap();
        let mut b = MiniBatchKMeans::from_first_batch_tensor(&x, k, Seed::new(seed)).unwrap();
        for step in 0..3 {
            let batch = Seed::new(seed).child(step).rng().normal_vec(n * dim, 0.0, 1.0);
            let bt = Tensor::from_slice(&batch, (n, dim), &DEV).unwrap();
            let ma = a.partial_fit(&batch, weighted.then_some(&w[..])).unwrap();
            let mb = b.partial_fit_tensor(&bt, weighted.then_some(&wt)).unwrap();
            prop_assert_eq!(ma.to_bits(), mb.to_bits());
        }
        prop_assert_eq!(bits(a.centroids()), f32s(&b.centroids_tensor(&DEV).unwrap()));
        let again = MiniBatchKMeans::new_tensor(&b.centroids_tensor(&DEV).unwrap()).unwrap();
        prop_assert_eq!(again.centroids(), b.centroids());
    }

    #[test]
    fn pq_tensor_path_equals_slice_path(
        n in 20usize..80, m in 1usize..4, dsub in 1usize..4, nbits in 1u32..4,
        nq in 1usize..5, top_k in 1usize..6, seed in 0u64..1000,
    ) {
        let dim = m * dsub;
        let n = n.max(1 << nbits);
        let top_k = top_k.min(n);
        let mut rng = Seed::new(seed).rng();
        let data = rng.normal_vec(n * dim, 0.0, 1.0);
        let queries = rng.normal_vec(nq * dim, 0.0, 1.0);
        let params = ProductQuantizerConfig { max_iter: 4, seed: Seed::new(seed), ..ProductQuantizerConfig::new(m, nbits) };
        let x = Tensor::from_slice(&data, (n, dim), &DEV).unwrap();
        let q = Tensor::from_slice(&queries, (nq, dim), &DEV).unwrap();
        let slice = ProductQuantizer::train(&data, dim, &params).unwrap();
        let tensor = ProductQuantizer::train_tensor(&x, &params).unwrap();
        prop_assert_eq!(&slice, &tensor);
        let books = tensor.codebooks_tensor(&DEV).unwrap();
        prop_assert_eq!(books.dims(), &[m, 1 << nbits, dsub]);
        prop_assert_eq!(&ProductQuantizer::from_codebooks_tensor(&books).unwrap(), &slice);

        let packed = slice.encode(&data).unwrap();
        let codes = tensor.encode_tensor(&x).unwrap();
        prop_assert_eq!(codes.dims(), &[n, m]);
        prop_assert_eq!(packed.unpack(), u32s(&codes));
        prop_assert_eq!(&PackedCodes::from_tensor(&codes, nbits).unwrap(), &packed);
        prop_assert_eq!(u32s(&packed.to_tensor(&DEV).unwrap()), u32s(&codes));
        let decoded = tensor.decode_tensor(&codes).unwrap();
        prop_assert_eq!(decoded.dims(), &[n, dim]);
        prop_assert_eq!(bits(&slice.decode(&packed).unwrap()), f32s(&decoded));
        let found = slice.search(&queries, &packed, top_k).unwrap();
        let (idx, dist) = tensor.search_tensor(&q, &codes, top_k).unwrap();
        prop_assert_eq!(idx.dims(), &[nq, top_k]);
        prop_assert_eq!(found.indices, u32s(&idx));
        prop_assert_eq!(bits(&found.distances), f32s(&dist));
    }
}

fn kind<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
    r.unwrap_err().kind()
}

#[test]
fn bad_tensors_are_typed_errors() {
    let x = Tensor::zeros((10, 4), DType::F32, &DEV).unwrap();
    let params = KMeansConfig::new(2);
    assert_eq!(
        kind(KMeans::fit_tensor(&x.flatten_all().unwrap(), None, &params)),
        "shape_mismatch"
    );
    assert_eq!(
        kind(KMeans::fit_tensor(
            &x.to_dtype(DType::U8).unwrap(),
            None,
            &params
        )),
        "dtype_mismatch"
    );
    assert_eq!(
        kind(KMeans::fit_tensor(
            &Tensor::zeros((0, 4), DType::F32, &DEV).unwrap(),
            None,
            &params
        )),
        "empty_input"
    );
    let bad_weights = Tensor::ones((10, 1), DType::F32, &DEV).unwrap();
    assert_eq!(
        kind(KMeans::fit_tensor(&x, Some(&bad_weights), &params)),
        "shape_mismatch"
    );
    let nan = Tensor::new(&[[0f32, f32::NAN], [1.0, 1.0]], &DEV).unwrap();
    assert_eq!(
        kind(KMeans::fit_tensor(&nan, None, &KMeansConfig::new(1))),
        "non_finite"
    );

    let data = Seed::new(0)
        .rng()
        .normal_tensor((40, 4), 0.0, 1.0, &DEV)
        .unwrap();
    let model = KMeans::fit_tensor(&data, None, &params).unwrap();
    // Rows of another width are refused even when the element count would fit.
    let wide = Tensor::zeros((5, 8), DType::F32, &DEV).unwrap();
    assert_eq!(kind(model.assign_tensor(&wide)), "shape_mismatch");
    let mut mini = MiniBatchKMeans::from_first_batch_tensor(&data, 3, Seed::new(0)).unwrap();
    assert_eq!(kind(mini.partial_fit_tensor(&wide, None)), "shape_mismatch");

    let pq = ProductQuantizer::train_tensor(&data, &ProductQuantizerConfig::new(2, 2)).unwrap();
    assert_eq!(kind(pq.encode_tensor(&wide)), "shape_mismatch");
    let codes = pq.encode_tensor(&data).unwrap();
    assert_eq!(
        kind(pq.decode_tensor(&codes.to_dtype(DType::F32).unwrap())),
        "dtype_mismatch"
    );
    assert_eq!(
        kind(pq.decode_tensor(&codes.flatten_all().unwrap())),
        "shape_mismatch"
    );
    let too_big = Tensor::new(&[[4u32, 0]], &DEV).unwrap();
    assert_eq!(kind(pq.decode_tensor(&too_big)), "invalid_parameter");
    assert_eq!(
        kind(pq.search_tensor(&data, &codes, 0)),
        "invalid_parameter"
    );
    let three = Tensor::zeros((2, 3, 2), DType::F32, &DEV).unwrap();
    assert_eq!(
        kind(ProductQuantizer::from_codebooks_tensor(&three)),
        "invalid_parameter"
    );
}
