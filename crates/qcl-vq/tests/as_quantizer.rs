//! The VQ layer through qcl-pq's `Quantizer` trait: the same codes as its own `encode`, packed
//! N per vector, nearest per codebook slice, and codes of another shape refused.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use proptest::prelude::*;
use qcl_pq::{reconstruction_mse, PackedCodes, Quantizer};
use qcl_tensor::{squared_distance, Error, Seed};
use qcl_vq::{ResidualVq, VectorQuantizer, VectorQuantizerConfig};

fn quantizer(dim: usize, codebooks: usize, codes: usize) -> VectorQuantizer {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = VectorQuantizerConfig {
        codebooks,
        ..VectorQuantizerConfig::new(dim, codes)
    };
    VectorQuantizer::new(config, vb.pp("vq")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn packed_codes_are_the_layers_nearest_codes(
        seed in 0u64..1000, codebooks in 1usize..4, code_dim in 1usize..4, codes in 1usize..20,
    ) {
        let dim = codebooks * code_dim;
        let vq = quantizer(dim, codebooks, codes);
        let data = Seed::new(seed).rng().normal_vec(30 * dim, 0.0, 0.05);
        let packed = Quantizer::encode(&vq, &data).unwrap();
        prop_assert_eq!((packed.n(), packed.m()), (30, codebooks));
        prop_assert_eq!(packed.nbits(), qcl_pq::index_bits(codes));
        let own = VectorQuantizer::encode(&vq, &Tensor::from_slice(&data, (30, dim), &Device::Cpu).unwrap())
            .unwrap();
        prop_assert_eq!(packed.unpack(), own.flatten_all().unwrap().to_vec1::<u32>().unwrap());
        // Each slice of a decoded vector is the nearest code of its codebook.
        let decoded = Quantizer::decode(&vq, &packed).unwrap();
        let book: Vec<f32> = vq.codebook().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in data.chunks(dim).zip(decoded.chunks(dim)) {
            for n in 0..codebooks {
                let s = n * code_dim..(n + 1) * code_dim;
                let best = squared_distance(&x[s.clone()], &y[s.clone()]);
                let own_book = &book[n * codes * code_dim..(n + 1) * codes * code_dim];
                for c in own_book.chunks(code_dim) {
                    prop_assert!(best <= squared_distance(&x[s.clone()], c));
                }
            }
        }
        prop_assert!(reconstruction_mse(&vq, &data).unwrap().is_finite());
    }
}

#[test]
fn codes_of_another_shape_and_bad_rows_are_refused() {
    let vq = quantizer(4, 2, 8);
    let wrong_m = PackedCodes::pack(&[0, 0, 0], 3, 3).unwrap();
    assert!(matches!(
        Quantizer::decode(&vq, &wrong_m),
        Err(Error::ShapeMismatch { .. })
    ));
    let wrong_bits = PackedCodes::pack(&[0, 0], 2, 4).unwrap();
    assert!(matches!(
        Quantizer::decode(&vq, &wrong_bits),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        Quantizer::encode(&vq, &[0.0; 3]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Quantizer::encode(&vq, &[]),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        Quantizer::encode(&vq, &[f32::NAN, 0.0, 0.0, 0.0]),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(Quantizer::fingerprint(&vq), vq.fingerprint().unwrap());
}

#[test]
fn a_residual_stack_stores_its_stages_codes_in_order_and_decodes_their_sum() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let configs = [
        VectorQuantizerConfig::new(4, 8),
        VectorQuantizerConfig::new(4, 3),
    ];
    let rvq = ResidualVq::new(&configs, vb.pp("rvq")).unwrap();
    let data = Seed::new(3).rng().normal_vec(10 * 4, 0.0, 0.05);
    let packed = Quantizer::encode(&rvq, &data).unwrap();
    assert_eq!((packed.m(), packed.nbits()), (2, 3));
    let rows = Tensor::from_slice(&data, (10, 4), &Device::Cpu).unwrap();
    let own = ResidualVq::encode(&rvq, &rows).unwrap();
    for (stage, idx) in own.iter().enumerate() {
        let idx: Vec<u32> = idx.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            idx,
            (0..10).map(|i| packed.get(i, stage)).collect::<Vec<_>>()
        );
    }
    let decoded = Quantizer::decode(&rvq, &packed).unwrap();
    let expected: Vec<f32> = ResidualVq::decode(&rvq, &own)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(decoded, expected);
    // Stage 1 has K = 3: a stored 3 is refused, though 3 bits could hold it.
    let bad = PackedCodes::pack(&[0, 3], 2, 3).unwrap();
    assert!(Quantizer::decode(&rvq, &bad).is_err());
    assert_ne!(
        Quantizer::fingerprint(&rvq),
        Quantizer::fingerprint(&rvq.stages()[0])
    );
}
