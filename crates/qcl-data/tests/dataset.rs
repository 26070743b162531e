//! Data sets, their file format and their mini-batches.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qcl_data::{
    BatchConfig, BatchOrder, Dataset, ImageShape, KnownDataset, Normalization, SplitDataset,
};
use qcl_tensor::{write_safetensors, Error, Seed};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(format!("{name}.safetensors"))
}

fn toy(n: usize, classes: u32) -> Dataset {
    let shape = ImageShape {
        channels: 1,
        height: 2,
        width: 2,
    };
    let pixels: Vec<u8> = (0..n * 4).map(|i| (i % 256) as u8).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % classes).collect();
    let names = (0..classes).map(|c| format!("c{c}")).collect();
    Dataset::new("toy", shape, pixels, labels, names).unwrap()
}

#[test]
fn fixtures_hold_100_train_and_20_test_images_per_class() {
    for dataset in KnownDataset::ALL {
        let split = SplitDataset::load(fixture(dataset.name())).unwrap();
        assert_eq!(split.train.class_counts(), vec![100; 10], "{dataset}");
        assert_eq!(split.test.class_counts(), vec![20; 10], "{dataset}");
        assert_eq!(split.train.shape(), ImageShape::MNIST);
        assert_eq!(split.train.class_names(), dataset.class_names().as_slice());
        let stats = split.train.pixel_stats().unwrap();
        // Both sets are mostly dark background: mean well below one half, some spread.
        assert!(
            stats.mean > 0.05 && stats.mean < 0.45,
            "{dataset}: {stats:?}"
        );
        assert!(stats.std > 0.2, "{dataset}: {stats:?}");
    }
}

#[test]
fn new_refuses_inconsistent_parts() {
    let shape = ImageShape {
        channels: 1,
        height: 2,
        width: 2,
    };
    let err = Dataset::new("x", shape, vec![0; 7], vec![0, 0], vec!["a".into()]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let err = Dataset::new(
        "x",
        shape,
        vec![0; 8],
        vec![0, 3],
        vec!["a".into(), "b".into()],
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidRecord { index: 1, .. }),
        "{err}"
    );
    assert!(Dataset::new("x", shape, vec![], vec![], vec![]).is_err());
}

#[test]
fn select_classes_keeps_order_and_refuses_unknown_classes() {
    let ds = toy(12, 4);
    let sel = ds.select_classes(&[3, 1]).unwrap();
    assert_eq!(sel.labels(), &[1, 3, 1, 3, 1, 3]);
    assert_eq!(sel.image(0), ds.image(1));
    let err = ds.select_classes(&[4]).unwrap_err();
    assert!(err.to_string().contains("class 4"), "{err}");
    assert!(ds.subset(&[12]).is_err());
}

#[test]
fn normalisations_map_the_pixel_range_as_documented() {
    let ds = Dataset::new(
        "px",
        ImageShape {
            channels: 1,
            height: 1,
            width: 3,
        },
        vec![0, 51, 255],
        vec![0],
        vec!["a".into()],
    )
    .unwrap();
    let check = |n: Normalization, want: [f32; 3]| {
        let (images, labels) = ds.to_tensors(n, &Device::Cpu).unwrap();
        assert_eq!(images.dims(), &[1, 1, 1, 3]);
        assert_eq!(labels.dtype(), DType::U32);
        let got = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{n:?}: {got:?} vs {want:?}");
        }
    };
    check(Normalization::UnitInterval, [0.0, 0.2, 1.0]);
    check(Normalization::Symmetric, [-1.0, -0.6, 1.0]);
    check(
        Normalization::Standardize {
            mean: 0.2,
            std: 0.5,
        },
        [-0.4, 0.0, 1.6],
    );
    let bad = BatchConfig {
        normalization: Normalization::Standardize {
            mean: 0.0,
            std: 0.0,
        },
        ..Default::default()
    };
    assert!(ds.batches(bad, &Device::Cpu).is_err());
}

#[test]
fn batch_size_zero_is_an_error() {
    let options = BatchConfig {
        batch_size: 0,
        ..Default::default()
    };
    assert!(matches!(
        toy(3, 1).batches(options, &Device::Cpu),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn batches_carry_the_right_images_and_labels() {
    let ds = toy(10, 3);
    let options = BatchConfig {
        batch_size: 4,
        order: BatchOrder::Shuffled(Seed::new(3)),
        ..Default::default()
    };
    for batch in ds.batches(options, &Device::Cpu).unwrap() {
        let batch = batch.unwrap();
        let labels = batch.labels.to_vec1::<u32>().unwrap();
        let images = batch
            .images
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (row, &i) in batch.indices.iter().enumerate() {
            assert_eq!(labels[row], ds.labels()[i]);
            assert_eq!(images[row * 4], f32::from(ds.image(i)[0]) / 255.0);
        }
    }
}

proptest! {
    #[test]
    fn one_pass_visits_every_image_once(n in 1usize..60, batch in 1usize..17, seed in any::<u64>(), drop_last in any::<bool>()) {
        let ds = toy(n, 3);
        let options = BatchConfig { batch_size: batch, order: BatchOrder::Shuffled(Seed::new(seed)), drop_last, ..Default::default() };
        let batches = ds.batches(options, &Device::Cpu).unwrap();
        let expected_batches = batches.num_batches();
        let mut seen: Vec<usize> = Vec::new();
        let mut count = 0;
        for b in batches {
            let b = b.unwrap();
            prop_assert!(b.indices.len() <= batch);
            prop_assert_eq!(b.images.dims()[0], b.indices.len());
            if drop_last { prop_assert_eq!(b.indices.len(), batch); }
            seen.extend(b.indices);
            count += 1;
        }
        prop_assert_eq!(count, expected_batches);
        seen.sort_unstable();
        seen.dedup();
        let full = if drop_last { n / batch * batch } else { n };
        prop_assert_eq!(seen.len(), full);
    }

    #[test]
    fn same_seed_same_order_on_cpu(n in 2usize..80, seed in any::<u64>()) {
        let ds = toy(n, 2);
        let order = |s: u64| -> Vec<usize> {
            let options = BatchConfig { batch_size: 7, order: BatchOrder::Shuffled(Seed::new(s)), ..Default::default() };
            ds.batches(options, &Device::Cpu).unwrap().flat_map(|b| b.unwrap().indices).collect()
        };
        prop_assert_eq!(order(seed), order(seed));
    }

    #[test]
    fn selection_partitions_the_data_set(n in 1usize..80, classes in 1u32..6, mask in any::<u8>()) {
        let ds = toy(n, classes);
        let chosen: Vec<u32> = (0..classes).filter(|c| mask >> c & 1 == 1).collect();
        let rest: Vec<u32> = (0..classes).filter(|c| mask >> c & 1 == 0).collect();
        let a = ds.select_classes(&chosen).unwrap();
        let b = ds.select_classes(&rest).unwrap();
        prop_assert_eq!(a.len() + b.len(), ds.len());
        prop_assert!(a.labels().iter().all(|l| chosen.contains(l)));
        let counts = ds.class_counts();
        for &c in &chosen { prop_assert_eq!(a.class_counts()[c as usize], counts[c as usize]); }
    }

    #[test]
    fn pixel_stats_match_the_direct_formula(pixels in proptest::collection::vec(any::<u8>(), 4..64)) {
        let n = pixels.len() / 4;
        let ds = Dataset::new("s", ImageShape { channels: 1, height: 2, width: 2 }, pixels[..n * 4].to_vec(), vec![0; n], vec!["a".into()]).unwrap();
        let values: Vec<f64> = pixels[..n * 4].iter().map(|&p| p as f64 / 255.0).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        let stats = ds.pixel_stats().unwrap();
        prop_assert!((stats.mean - mean).abs() < 1e-9 && (stats.std - std).abs() < 1e-9);
    }
}

#[test]
fn save_then_load_round_trips_and_overwrites_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.safetensors");
    let split = SplitDataset::new(toy(9, 3), toy(3, 3)).unwrap();
    let meta = BTreeMap::from([("source".to_string(), "unit test".to_string())]);
    split.save(&path, &meta).unwrap();
    assert_eq!(SplitDataset::load(&path).unwrap(), split);
    let file = qcl_tensor::SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.metadata()["source"], "unit test");
    assert_eq!(file.info("train.labels").unwrap().dtype, DType::U8);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn foreign_truncated_or_inconsistent_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A valid safetensors file that is not a data set.
    let other = dir.path().join("weights.safetensors");
    let w = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    write_safetensors(&other, &[("w", &w)], &BTreeMap::new()).unwrap();
    let err = SplitDataset::load(&other).unwrap_err();
    assert!(err.to_string().contains("not a qcl data set"), "{err}");

    // A truncated data set file.
    let good = dir.path().join("good.safetensors");
    SplitDataset::new(toy(9, 3), toy(3, 3))
        .unwrap()
        .save(&good, &BTreeMap::new())
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    assert!(matches!(
        SplitDataset::load(&cut),
        Err(Error::BadFile { .. })
    ));

    // A label outside the classes, and labels of the wrong count.
    let write = |name: &str, labels: Tensor| {
        let path = dir.path().join(name);
        let images = Tensor::zeros((2, 1, 2, 2), DType::U8, &Device::Cpu).unwrap();
        let meta = BTreeMap::from([
            ("format".to_string(), qcl_data::DATASET_FORMAT.to_string()),
            ("class_names".to_string(), "[\"a\",\"b\"]".to_string()),
        ]);
        let test_labels = Tensor::new(&[0u8, 1], &Device::Cpu).unwrap();
        write_safetensors(
            &path,
            &[
                ("train.images", &images),
                ("train.labels", &labels),
                ("test.images", &images),
                ("test.labels", &test_labels),
            ],
            &meta,
        )
        .unwrap();
        SplitDataset::load(&path)
    };
    let err = write(
        "label.safetensors",
        Tensor::new(&[0u8, 7], &Device::Cpu).unwrap(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidRecord { index: 1, .. }),
        "{err}"
    );
    let err = write(
        "count.safetensors",
        Tensor::new(&[0u8], &Device::Cpu).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let err = write(
        "dtype.safetensors",
        Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { .. }), "{err}");
}
