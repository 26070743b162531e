use std::io::Write as _;
use std::process::Command;

use qcl_tensor::Error as QclError;

use super::*;
use crate::data::sha256_hex;
use crate::data::tests::idx;
use crate::text_data::entry_intact;
use crate::text_data::tests::leftovers;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Labelled images in file order: (label, 784 pixels).
type Images = Vec<(u32, Vec<u8>)>;

/// `per_class` images of each of the 10 classes, labels interleaved (0, 1, ..., 9, 0, ...);
/// image `i` is filled with `seed + i`. Returns the gzipped images and labels IDX files and
/// the images in file order.
fn idx_pair(per_class: usize, seed: u8) -> (Vec<u8>, Vec<u8>, Images) {
    let n = per_class * 10;
    let images: Vec<(u32, Vec<u8>)> = (0..n)
        .map(|i| ((i % 10) as u32, vec![seed.wrapping_add(i as u8); 784]))
        .collect();
    let pixels: Vec<u8> = images.iter().flat_map(|(_, p)| p.clone()).collect();
    let labels: Vec<u8> = images.iter().map(|&(l, _)| l as u8).collect();
    (
        gzip(&idx(&[n as u32, 28, 28], &pixels)),
        gzip(&idx(&[n as u32], &labels)),
        images,
    )
}

/// A tiny Fashion-MNIST in `root/usr/share/datasets/fashion-mnist/` (3 training and 2 test
/// images per class), a source pinned to it, and the train and test images in file order.
fn tiny_set(root: &Path) -> (DebianFashionMnist, Images, Images) {
    let mut source = DebianFashionMnist::pinned();
    let dir = root.join(&source.dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (train_images, train_labels, train) = idx_pair(3, 0);
    let (test_images, test_labels, test) = idx_pair(2, 100);
    for (name, bytes) in [
        ("train-images-idx3-ubyte.gz", train_images),
        ("train-labels-idx1-ubyte.gz", train_labels),
        ("t10k-images-idx3-ubyte.gz", test_images),
        ("t10k-labels-idx1-ubyte.gz", test_labels),
    ] {
        std::fs::write(dir.join(name), &bytes).unwrap();
        let pin = source.files.iter_mut().find(|p| p.name == name).unwrap();
        pin.sha256 = sha256_hex(&bytes);
    }
    source.train_per_class = 3;
    source.test_per_class = 2;
    (source, train, test)
}

/// The images of `data`, with their labels, sorted (a multiset to compare).
fn sorted_rows(data: &Dataset) -> Vec<(u32, Vec<u8>)> {
    let mut rows: Vec<(u32, Vec<u8>)> = (0..data.len())
        .map(|i| (data.labels()[i], data.image(i).to_vec()))
        .collect();
    rows.sort();
    rows
}

#[test]
fn a_tiny_idx_set_installs_with_the_official_split() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let (source, mut train, mut test) = tiny_set(&tmp.path().join("deb"));
    let entry = install(
        &data_dir,
        &tmp.path().join("deb").join(&source.dir),
        &source,
    )
    .unwrap();
    assert_eq!(entry.details["train"], 30);
    assert_eq!(entry.details["test"], 20);
    assert_eq!(
        entry.details["test_per_class"],
        serde_json::Value::from(vec![2; 10])
    );
    assert_eq!(entry.details["records_read"], 50);
    assert_eq!(entry.archive_sha256, source.deb.sha256);
    assert!(entry_intact(&data_dir, &entry));
    assert_eq!(leftovers(&data_dir), [OFFICIAL_FILE]);

    let path = official_fashion_mnist_path(&data_dir);
    let split = SplitDataset::load(&path).unwrap();
    // Every `train-*` image is train and every `t10k-*` image test: nothing moved across.
    train.sort();
    test.sort();
    assert_eq!(sorted_rows(&split.train), train);
    assert_eq!(sorted_rows(&split.test), test);
    // Grouped by class, in file order within a class.
    assert_eq!(split.test.labels()[..4], [0, 0, 1, 1]);
    assert_eq!(split.test.image(0)[0], 100);
    assert_eq!(split.test.image(1)[0], 110);
    assert_eq!(split.train.name(), "fashion-mnist-official");

    let file = qcl_tensor::SafetensorsFile::open(&path).unwrap();
    let meta = file.metadata();
    assert_eq!(meta["format"], "qcl-dataset/1");
    assert_eq!(meta["name"], "fashion-mnist-official");
    assert_eq!(meta["source"], format!("Debian {}", source.package));
    assert!(meta["split"].starts_with("official"), "{}", meta["split"]);
    for tensor in ["train.images", "train.labels", "test.images", "test.labels"] {
        assert!(file.names().iter().any(|n| n == tensor), "{tensor}");
    }
    drop(file);

    // The same files install the same bytes; a changed file is no longer intact.
    let again = install(
        &data_dir,
        &tmp.path().join("deb").join(&source.dir),
        &source,
    )
    .unwrap();
    assert_eq!(again.files, entry.files);
    std::fs::write(&path, b"changed").unwrap();
    assert!(!entry_intact(&data_dir, &entry));
}

#[test]
fn idx_files_that_differ_or_miscount_are_errors_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let root = tmp.path().join("deb");
    let (source, _, _) = tiny_set(&root);
    let dir = root.join(&source.dir);

    // A file that is not the pinned one: refused by hash, naming it.
    let mut wrong = source.clone();
    wrong.files[2].sha256 = "0".repeat(64);
    let err = install(&data_dir, &dir, &wrong).unwrap_err();
    match err.downcast_ref::<QclError>() {
        Some(QclError::BadFile { path, reason }) => {
            assert!(path.ends_with("t10k-images-idx3-ubyte.gz"), "{path:?}");
            assert!(reason.contains("SHA-256"), "{reason}");
        }
        _ => panic!("expected a bad-file error, got {err:#}"),
    }
    // Counts other than the pinned ones.
    let mut wrong = source.clone();
    wrong.test_per_class = 1000;
    let err = install(&data_dir, &dir, &wrong).unwrap_err();
    assert!(
        format!("{err:#}").contains("official test set has 20 images"),
        "{err:#}"
    );
    // A label outside the 10 classes (pinned, so that the importer sees it).
    let mut labels: Vec<u8> = (0..20).map(|i| i % 10).collect();
    labels[7] = 10;
    let labels = gzip(&idx(&[20], &labels));
    std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), &labels).unwrap();
    let mut wrong = source.clone();
    wrong.files[3].sha256 = sha256_hex(&labels);
    let err = install(&data_dir, &dir, &wrong).unwrap_err();
    assert!(format!("{err:#}").contains("do not validate"), "{err:#}");
    assert!(
        leftovers(&data_dir).is_empty(),
        "{:?}",
        leftovers(&data_dir)
    );
}

#[test]
fn a_tampered_deb_is_refused_by_hash_before_import() {
    let tmp = tempfile::tempdir().unwrap();
    let source = DebianFashionMnist::pinned();
    let cache = tmp.path().join(".cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cached = cache.join(&source.deb.name);
    std::fs::write(&cached, b"not Debian's package").unwrap();
    // The .deb is in the cache, so apt-get is not run; dpkg-deb is not reached.
    let err = fetch_and_install(
        tmp.path(),
        "qcl-test-no-such-apt-get",
        "qcl-test-no-such-dpkg-deb",
        &source,
    )
    .unwrap_err();
    match err.downcast_ref::<QclError>() {
        Some(QclError::BadFile { path, reason }) => {
            assert_eq!(path, &cached);
            assert!(reason.contains("SHA-256"), "{reason}");
        }
        _ => panic!("expected a bad-file error, got {err:#}"),
    }
    // One byte more than allowed is refused before it is read.
    let big = std::fs::File::create(&cached).unwrap();
    big.set_len(source.deb.max_bytes + 1).unwrap();
    let err =
        fetch_and_install(tmp.path(), "qcl-test-no-such-apt-get", "dpkg-deb", &source).unwrap_err();
    assert!(format!("{err:#}").contains("larger than"), "{err:#}");
    assert!(!official_fashion_mnist_path(tmp.path()).exists());
    assert_eq!(leftovers(&cache), [source.deb.name.as_str()]);
}

#[test]
fn missing_tools_or_a_failed_download_skip_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let source = DebianFashionMnist::pinned();
    match fetch_and_install(tmp.path(), "qcl-test-no-such-apt-get", "dpkg-deb", &source).unwrap() {
        Outcome::Skipped(reason) => assert!(
            reason.contains("qcl-test-no-such-apt-get") && reason.contains("not found"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // `false` runs and fails, as a download without network does.
    match fetch_and_install(tmp.path(), "false", "dpkg-deb", &source).unwrap() {
        Outcome::Skipped(reason) => assert!(reason.contains("failed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A verified .deb in the cache, but no dpkg-deb to unpack it.
    let deb = b"a package".to_vec();
    let mut source = source;
    source.deb = pin("tiny.deb", &sha256_hex(&deb), MIB);
    std::fs::create_dir_all(tmp.path().join(".cache")).unwrap();
    std::fs::write(tmp.path().join(".cache/tiny.deb"), &deb).unwrap();
    match fetch_and_install(
        tmp.path(),
        "qcl-test-no-such-apt-get",
        "qcl-test-no-such-dpkg-deb",
        &source,
    )
    .unwrap()
    {
        Outcome::Skipped(reason) => assert!(
            reason.contains("qcl-test-no-such-dpkg-deb") && reason.contains("not found"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(!official_fashion_mnist_path(tmp.path()).exists());
    assert_eq!(leftovers(&tmp.path().join(".cache")), ["tiny.deb"]);
}

#[test]
fn a_tiny_deb_is_unpacked_with_dpkg_deb_and_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pkg");
    let (mut source, _, mut test) = tiny_set(&root);
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: qcl-test-fashion-mnist\nVersion: 1\nArchitecture: all\n\
         Maintainer: qcl <qcl@example.org>\nDescription: test package\n",
    )
    .unwrap();
    let deb_path = tmp.path().join("tiny.deb");
    let built = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb_path)
        .output();
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "dpkg-deb --build failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            // The unpacking step needs dpkg-deb; the rest is tested above without it.
            eprintln!("skipped: dpkg-deb is not available ({e})");
            return;
        }
    }
    let deb = std::fs::read(&deb_path).unwrap();
    source.deb = pin("tiny.deb", &sha256_hex(&deb), MIB);
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(data_dir.join(".cache")).unwrap();
    std::fs::write(data_dir.join(".cache/tiny.deb"), &deb).unwrap();
    match fetch_and_install(&data_dir, "qcl-test-no-such-apt-get", "dpkg-deb", &source).unwrap() {
        Outcome::Prepared(entry) => {
            assert!(entry_intact(&data_dir, &entry));
            assert_eq!(entry.archive, "tiny.deb");
        }
        other => panic!("{other:?}"),
    }
    let split = SplitDataset::load(official_fashion_mnist_path(&data_dir)).unwrap();
    test.sort();
    assert_eq!(sorted_rows(&split.test), test);
    // The staging directory is gone; the .deb stays in the cache.
    assert_eq!(leftovers(&data_dir), [".cache", OFFICIAL_FILE]);
    assert_eq!(leftovers(&data_dir.join(".cache")), ["tiny.deb"]);
}

#[test]
fn the_pinned_source_is_the_official_debian_package() {
    let source = DebianFashionMnist::pinned();
    assert_eq!(
        source.package,
        "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
    );
    assert!(source.deb.max_bytes >= 30_900_652);
    let names: Vec<&str> = source.files.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz"
        ]
    );
    assert!(source.files[0].max_bytes >= 26_421_856 && source.files[2].max_bytes >= 4_422_079);
    assert_eq!(
        (source.train_per_class * 10, source.test_per_class * 10),
        (60_000, 10_000)
    );
    assert_eq!(
        TextDataset::from_name("fashion-mnist-official"),
        Some(TextDataset::FashionMnistOfficial)
    );
    assert_eq!(
        OFFICIAL_FILE,
        format!("{}.safetensors", TextDataset::FashionMnistOfficial.name())
    );
    assert_eq!(
        official_fashion_mnist_path(Path::new("d")),
        Path::new("d/fashion-mnist-official.safetensors")
    );
}
