//! Buffers of candle tensors: byte accounting by elements × dtype size, and `sample_batch`
//! equal to stacking what `sample` draws, with typed errors for batches that cannot be formed.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qcl_continual::{
    BufferItem, Capacity, ClassBalancedBuffer, Filter, ReplayBuffer, ReservoirBuffer,
};
use qcl_tensor::{Error, Seed};

const DEV: Device = Device::Cpu;

fn item(value: f32, shape: &[usize]) -> Tensor {
    Tensor::full(value, shape, &DEV).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The batch is the drawn entries in draw order: items stacked, labels alongside.
    #[test]
    fn sample_batch_stacks_what_sample_draws(
        inserts in prop::collection::vec((0u32..5, 0usize..3), 1..60),
        n in 1usize..20,
        capacity in 1usize..30,
        seed in 0u64..1000,
        classes in prop::option::of(prop::collection::vec(0u32..5, 1..3)),
        balanced in any::<bool>(),
    ) {
        let shape = [2, 3];
        let bytes = 6 * 4;
        let mut buffer = ReservoirBuffer::new(Capacity::bytes(capacity * bytes), Seed::new(seed)).unwrap();
        for (i, &(label, task)) in inserts.iter().enumerate() {
            buffer.insert(label, task, item(i as f32, &shape)).unwrap();
        }
        prop_assert!(buffer.bytes_used() <= capacity * bytes);
        prop_assert_eq!(buffer.bytes_used(), buffer.len() * bytes);
        let filter = classes.map_or_else(Filter::all, Filter::classes);
        let drawn = if balanced {
            buffer.sample_class_balanced(n, &filter, &mut Seed::new(seed).child(1).rng())
        } else {
            buffer.sample(n, &filter, &mut Seed::new(seed).child(1).rng())
        };
        let mut rng = Seed::new(seed).child(1).rng();
        let batch = if balanced {
            buffer.sample_class_balanced_batch(n, &filter, &mut rng)
        } else {
            buffer.sample_batch(n, &filter, &mut rng)
        };
        if drawn.is_empty() {
            prop_assert_eq!(batch.unwrap_err().kind(), "empty_input");
        } else {
            let (x, y) = batch.unwrap();
            prop_assert_eq!(x.dims(), &[drawn.len(), 2, 3]);
            prop_assert_eq!(y.dtype(), DType::U32);
            let labels: Vec<u32> = drawn.iter().map(|e| e.label).collect();
            prop_assert_eq!(y.to_vec1::<u32>().unwrap(), labels);
            let firsts: Vec<f32> = drawn.iter().map(|e| e.item.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]).collect();
            let got: Vec<f32> = x.flatten_from(1).unwrap().narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            prop_assert_eq!(got, firsts);
        }
    }
}

#[test]
fn tensors_are_charged_elements_times_dtype_size() {
    assert_eq!(item(0.0, &[28, 28]).size_bytes(), 784 * 4);
    let half = Tensor::zeros((3, 5), DType::F16, &DEV).unwrap();
    assert_eq!(half.size_bytes(), 30);
    let mut buffer = ClassBalancedBuffer::new(Capacity::bytes(100), Seed::new(0)).unwrap();
    for i in 0..10 {
        buffer
            .insert(i % 2, 0, Tensor::zeros(6, DType::F32, &DEV).unwrap())
            .unwrap();
    }
    assert_eq!(buffer.len(), 4); // 4 × 24 bytes ≤ 100
    let err = buffer
        .insert(0, 0, Tensor::zeros(26, DType::F32, &DEV).unwrap())
        .unwrap_err();
    assert_eq!(
        err.kind(),
        "invalid_parameter",
        "an item larger than the capacity: {err}"
    );
}

#[test]
fn batches_that_cannot_be_formed_are_typed_errors() {
    let mut rng = Seed::new(0).rng();
    let empty = ReservoirBuffer::<Tensor>::new(Capacity::items(4), Seed::new(0)).unwrap();
    match empty.sample_batch(3, &Filter::all(), &mut rng) {
        Err(Error::EmptyInput(_)) => {}
        other => panic!("expected an empty-input error, got {other:?}"),
    }
    let mut shapes = ReservoirBuffer::new(Capacity::items(8), Seed::new(0)).unwrap();
    shapes.insert(0, 0, item(1.0, &[3])).unwrap();
    shapes.insert(1, 0, item(2.0, &[4])).unwrap();
    match shapes.sample_batch(2, &Filter::all(), &mut rng) {
        Err(Error::ShapeMismatch { context, .. }) => {
            assert!(context.starts_with("replay item"), "{context}")
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    // One of each class admitted: the batch of one works, the filter that admits nothing does not.
    let (x, y) = shapes
        .sample_batch(1, &Filter::classes([1]), &mut rng)
        .unwrap();
    assert_eq!(
        (x.dims(), y.to_vec1::<u32>().unwrap()),
        (&[1, 4][..], vec![1])
    );
    assert_eq!(
        shapes
            .sample_batch(1, &Filter::classes([7]), &mut rng)
            .unwrap_err()
            .kind(),
        "empty_input"
    );
    let mut dtypes = ReservoirBuffer::new(Capacity::items(8), Seed::new(0)).unwrap();
    dtypes.insert(0, 0, item(1.0, &[3])).unwrap();
    dtypes
        .insert(0, 0, Tensor::zeros(3, DType::F64, &DEV).unwrap())
        .unwrap();
    assert_eq!(
        dtypes
            .sample_batch(2, &Filter::all(), &mut rng)
            .unwrap_err()
            .kind(),
        "dtype_mismatch"
    );
}
