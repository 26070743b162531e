//! English WordNet 3.0 glosses: the reader of the `data.{noun,verb,adj,adv}` files and a
//! seeded split into calibration, evaluation and query glosses.
//!
//! Each synset line of a data file is (wndb(5WN))
//! `offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt (ptr offset pos src_tgt){p_cnt}
//! [f_cnt (+ f_num w_num){f_cnt}] | gloss`, where `offset` is the byte offset of the line in
//! its file. Lines that begin with two spaces are the licence header. A line that breaks any
//! of these rules is skipped and reported ([`SkippedLine`]) rather than failing the file, so
//! that one bad record costs one gloss; callers that need a clean file check
//! [`GlossFile::skipped`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use qcl_tensor::{write_atomic, Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::config::read_bounded;

/// Largest data file read: 64 MiB (`data.noun` is 15.3 MB).
pub const MAX_DATA_FILE_BYTES: u64 = 64 << 20;
/// Longest synset line accepted: 64 KiB (the longest in WordNet 3.0 is under 14 KiB).
pub const MAX_LINE_BYTES: usize = 64 << 10;
/// Largest gloss list read by [`GlossList::load`]: 256 MiB.
pub const MAX_GLOSS_LIST_BYTES: u64 = 256 << 20;
/// Format tag of [`GlossList`] files.
pub const GLOSS_LIST_FORMAT: &str = "qcl-wordnet-glosses/1";

/// The part of speech of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartOfSpeech {
    /// `data.noun`.
    Noun,
    /// `data.verb`.
    Verb,
    /// `data.adj` (head and satellite adjectives).
    Adjective,
    /// `data.adv`.
    Adverb,
}

impl PartOfSpeech {
    /// The four parts of speech, in file order.
    pub const ALL: [PartOfSpeech; 4] = [
        PartOfSpeech::Noun,
        PartOfSpeech::Verb,
        PartOfSpeech::Adjective,
        PartOfSpeech::Adverb,
    ];

    /// The data file's name (`data.noun`, ...).
    pub fn file_name(self) -> &'static str {
        match self {
            PartOfSpeech::Noun => "data.noun",
            PartOfSpeech::Verb => "data.verb",
            PartOfSpeech::Adjective => "data.adj",
            PartOfSpeech::Adverb => "data.adv",
        }
    }

    fn accepts(self, ss_type: &str) -> bool {
        matches!(
            (self, ss_type),
            (PartOfSpeech::Noun, "n")
                | (PartOfSpeech::Verb, "v")
                | (PartOfSpeech::Adjective, "a" | "s")
                | (PartOfSpeech::Adverb, "r")
        )
    }
}

impl fmt::Display for PartOfSpeech {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PartOfSpeech::Noun => "noun",
            PartOfSpeech::Verb => "verb",
            PartOfSpeech::Adjective => "adjective",
            PartOfSpeech::Adverb => "adverb",
        })
    }
}

/// One synset's gloss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gloss {
    /// Its data file.
    pub pos: PartOfSpeech,
    /// The synset offset (byte offset of its line).
    pub offset: u64,
    /// The gloss: definition and examples, trimmed.
    pub text: String,
}

/// A data-file line that was not read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedLine {
    /// The file (as named by the caller).
    pub source: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The glosses of one data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlossFile {
    /// The file's part of speech.
    pub pos: PartOfSpeech,
    /// Glosses in file order.
    pub glosses: Vec<Gloss>,
    /// Licence header lines.
    pub header_lines: usize,
    /// Malformed lines, skipped.
    pub skipped: Vec<SkippedLine>,
}

/// Reads the glosses of a WordNet data file's bytes; `source` names it in reports.
///
/// ```
/// use qcl_text::wordnet::{parse_data_file, PartOfSpeech};
/// let text = "  1 licence header  \n\
///             00000021 02 r 01 fast 0 000 | quickly; \"she runs fast\"  \n\
///             this line is broken\n";
/// let file = parse_data_file(PartOfSpeech::Adverb, text.as_bytes(), "data.adv")?;
/// assert_eq!(file.glosses[0].text, "quickly; \"she runs fast\"");
/// assert_eq!((file.header_lines, file.skipped.len()), (1, 1));
/// assert_eq!(file.skipped[0].line, 3);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::EmptyInput`] when the bytes hold no synset line at all (skipped lines aside).
pub fn parse_data_file(pos: PartOfSpeech, bytes: &[u8], source: &str) -> Result<GlossFile> {
    let mut glosses = Vec::new();
    let mut skipped = Vec::new();
    let mut header_lines = 0;
    let mut offset = 0u64;
    let mut lines = bytes.split(|&b| b == b'\n').peekable();
    let mut number = 0;
    while let Some(raw) = lines.next() {
        number += 1;
        let line_offset = offset;
        offset += raw.len() as u64 + 1;
        if raw.is_empty() && lines.peek().is_none() {
            break; // after the final newline
        }
        if raw.starts_with(b"  ") {
            header_lines += 1;
            continue;
        }
        let parsed = std::str::from_utf8(raw)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|line| parse_synset_line(line, line_offset, pos));
        match parsed {
            Ok(gloss) => glosses.push(gloss),
            Err(reason) => skipped.push(SkippedLine {
                source: source.to_string(),
                line: number,
                reason,
            }),
        }
    }
    if glosses.is_empty() {
        return Err(Error::EmptyInput(format!(
            "{source} holds no synset line ({} skipped)",
            skipped.len()
        )));
    }
    Ok(GlossFile {
        pos,
        glosses,
        header_lines,
        skipped,
    })
}

fn field<'a>(
    it: &mut impl Iterator<Item = &'a str>,
    what: &str,
) -> std::result::Result<&'a str, String> {
    it.next().ok_or_else(|| format!("ends before {what}"))
}

fn number(token: &str, digits: usize, radix: u32, what: &str) -> std::result::Result<u64, String> {
    if token.len() != digits {
        return Err(format!("{what} `{token}` is not {digits} digits"));
    }
    u64::from_str_radix(token, radix).map_err(|_| format!("{what} `{token}` is not a number"))
}

/// One synset line → its gloss, or why it is malformed.
fn parse_synset_line(
    line: &str,
    byte_offset: u64,
    pos: PartOfSpeech,
) -> std::result::Result<Gloss, String> {
    if line.len() > MAX_LINE_BYTES {
        return Err(format!("line longer than {MAX_LINE_BYTES} bytes"));
    }
    let (fields, gloss) = line
        .split_once(" | ")
        .ok_or_else(|| "no ` | ` before a gloss".to_string())?;
    let text = gloss.trim();
    if text.is_empty() {
        return Err("empty gloss".into());
    }
    let mut it = fields.split_ascii_whitespace();
    let offset = number(field(&mut it, "the offset")?, 8, 10, "synset offset")?;
    if offset != byte_offset {
        return Err(format!(
            "synset offset {offset} is not the line's byte offset {byte_offset}"
        ));
    }
    number(field(&mut it, "lex_filenum")?, 2, 10, "lex_filenum")?;
    let ss_type = field(&mut it, "ss_type")?;
    if !pos.accepts(ss_type) {
        return Err(format!(
            "ss_type `{ss_type}` does not belong in a {pos} file"
        ));
    }
    let words = number(field(&mut it, "w_cnt")?, 2, 16, "w_cnt")?;
    if words == 0 {
        return Err("w_cnt is 0".into());
    }
    for _ in 0..words {
        field(&mut it, "a word")?;
        number(field(&mut it, "lex_id")?, 1, 16, "lex_id")?;
    }
    let pointers = number(field(&mut it, "p_cnt")?, 3, 10, "p_cnt")?;
    for _ in 0..pointers {
        field(&mut it, "a pointer symbol")?;
        number(field(&mut it, "a pointer offset")?, 8, 10, "pointer offset")?;
        let target = field(&mut it, "a pointer's pos")?;
        if !matches!(target, "n" | "v" | "a" | "s" | "r") {
            return Err(format!("pointer pos `{target}` is unknown"));
        }
        number(field(&mut it, "source/target")?, 4, 16, "source/target")?;
    }
    if pos == PartOfSpeech::Verb {
        let frames = number(field(&mut it, "f_cnt")?, 2, 10, "f_cnt")?;
        for _ in 0..frames {
            if field(&mut it, "a frame")? != "+" {
                return Err("a verb frame does not start with `+`".into());
            }
            number(field(&mut it, "f_num")?, 2, 10, "f_num")?;
            number(field(&mut it, "w_num")?, 2, 16, "w_num")?;
        }
    }
    if let Some(extra) = it.next() {
        return Err(format!("unexpected field `{extra}` before the gloss"));
    }
    Ok(Gloss {
        pos,
        offset,
        text: text.to_string(),
    })
}

/// All glosses of a WordNet database, in file order (noun, verb, adjective, adverb).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlossList {
    /// Always [`GLOSS_LIST_FORMAT`].
    pub format: String,
    /// Where the data files came from.
    pub source: String,
    /// Glosses per part of speech.
    pub counts: BTreeMap<PartOfSpeech, usize>,
    /// Lines skipped while reading.
    pub skipped: Vec<SkippedLine>,
    /// The glosses.
    pub glosses: Vec<Gloss>,
}

impl GlossList {
    /// Reads `data.noun`, `data.verb`, `data.adj` and `data.adv` of `dir`.
    ///
    /// ```
    /// let list = qcl_text::GlossList::read_dir("../../fixtures/wordnet", "fixture excerpt")?;
    /// assert_eq!(list.glosses.len(), 4 * 12);
    /// assert!(list.skipped.is_empty());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] for a missing file, [`Error::BadFile`] for one larger than
    /// [`MAX_DATA_FILE_BYTES`]; as [`parse_data_file`].
    pub fn read_dir(dir: impl AsRef<Path>, source: &str) -> Result<Self> {
        let dir = dir.as_ref();
        let files = PartOfSpeech::ALL
            .iter()
            .map(|&pos| {
                let path = dir.join(pos.file_name());
                let bytes = read_bounded(&path, MAX_DATA_FILE_BYTES)?;
                parse_data_file(pos, &bytes, pos.file_name())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_files(files, source))
    }

    /// The list of parsed files.
    pub fn from_files(files: Vec<GlossFile>, source: &str) -> Self {
        let mut list = GlossList {
            format: GLOSS_LIST_FORMAT.into(),
            source: source.into(),
            counts: BTreeMap::new(),
            skipped: Vec::new(),
            glosses: Vec::new(),
        };
        for file in files {
            *list.counts.entry(file.pos).or_default() += file.glosses.len();
            list.glosses.extend(file.glosses);
            list.skipped.extend(file.skipped);
        }
        list
    }

    /// Writes the list as JSON, atomically, with a `checksum` of its content
    /// ([`qcl_tensor::bytes_checksum`] of the list's compact JSON) beside its fields.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let cannot = |e: serde_json::Error| Error::bad_file(path, format!("cannot serialise: {e}"));
        let content = serde_json::to_vec(self).map_err(cannot)?;
        let mut value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&content).map_err(cannot)?;
        value.insert(
            "checksum".into(),
            qcl_tensor::bytes_checksum(&content).into(),
        );
        write_atomic(path, &serde_json::to_vec(&value).map_err(cannot)?)
    }

    /// Reads a list written by [`save`](Self::save), checking its checksum (a list without one
    /// loads with a note), format and counts.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::BadFile`] for a file too large, not JSON, damaged (checksum), of
    /// another format, or whose counts do not match its glosses.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_bounded(path, MAX_GLOSS_LIST_BYTES)?;
        let not_a_list =
            |e: serde_json::Error| Error::bad_file(path, format!("not a gloss list: {e}"));
        let mut value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(not_a_list)?;
        let stored = value.remove("checksum");
        let list: GlossList =
            serde_json::from_value(serde_json::Value::Object(value)).map_err(not_a_list)?;
        let content = serde_json::to_vec(&list).map_err(not_a_list)?;
        qcl_tensor::check_stored_checksum(
            path,
            stored.as_ref().and_then(|c| c.as_str()),
            || qcl_tensor::bytes_checksum(&content),
            true,
        )?;
        if list.format != GLOSS_LIST_FORMAT {
            return Err(Error::bad_file(
                path,
                format!("format `{}`, expected `{GLOSS_LIST_FORMAT}`", list.format),
            ));
        }
        for pos in PartOfSpeech::ALL {
            let n = list.glosses.iter().filter(|g| g.pos == pos).count();
            if list.counts.get(&pos).copied().unwrap_or(0) != n {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "counts say {:?} {pos} glosses, the list holds {n}",
                        list.counts.get(&pos)
                    ),
                ));
            }
        }
        Ok(list)
    }
}

/// Sizes and seed of [`split_glosses`]; every knob named, with a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlossSplitConfig {
    /// Seed of the shuffle (default 0).
    pub seed: Seed,
    /// Calibration glosses (default 4,096).
    pub calibration: usize,
    /// Evaluation glosses (default 10,000).
    pub evaluation: usize,
    /// Query glosses, drawn from the evaluation set (default 1,000).
    pub queries: usize,
}

impl Default for GlossSplitConfig {
    fn default() -> Self {
        GlossSplitConfig {
            seed: Seed::new(0),
            calibration: 4096,
            evaluation: 10_000,
            queries: 1000,
        }
    }
}

/// Disjoint calibration and evaluation glosses, and the evaluation rows used as queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlossSplit {
    /// Glosses to record calibration statistics on.
    pub calibration: Vec<Gloss>,
    /// Glosses to measure on.
    pub evaluation: Vec<Gloss>,
    /// Indices into `evaluation` of the query glosses, ascending.
    pub queries: Vec<usize>,
    /// Distinct gloss texts the split drew from.
    pub distinct: usize,
}

/// Splits `glosses` for a seed: identical texts are kept once (the first occurrence), the
/// distinct glosses are shuffled by `seed.child_named("glosses")`, the first
/// `calibration` become the calibration set and the next `evaluation` the evaluation set;
/// `queries` evaluation rows are drawn by `seed.child_named("queries")`.
///
/// ```
/// use qcl_text::wordnet::{split_glosses, GlossList, GlossSplitConfig};
/// let list = GlossList::read_dir("../../fixtures/wordnet", "fixture")?;
/// let config = GlossSplitConfig { calibration: 8, evaluation: 30, queries: 5, ..Default::default() };
/// let split = split_glosses(&list.glosses, &config)?;
/// assert_eq!((split.calibration.len(), split.evaluation.len(), split.queries.len()), (8, 30, 5));
/// assert_eq!(split, split_glosses(&list.glosses, &config)?); // same seed, same split
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] when `evaluation` is 0, `queries > evaluation`, or there are
/// fewer distinct glosses than `calibration + evaluation`.
pub fn split_glosses(glosses: &[Gloss], config: &GlossSplitConfig) -> Result<GlossSplit> {
    if config.evaluation == 0 {
        return Err(Error::invalid_parameter("evaluation", "must be positive"));
    }
    if config.queries > config.evaluation {
        return Err(Error::invalid_parameter(
            "queries",
            format!(
                "{} queries cannot be drawn from {} evaluation glosses",
                config.queries, config.evaluation
            ),
        ));
    }
    let mut seen = HashSet::new();
    let distinct: Vec<&Gloss> = glosses
        .iter()
        .filter(|g| seen.insert(g.text.as_str()))
        .collect();
    let needed = config.calibration + config.evaluation;
    if distinct.len() < needed {
        return Err(Error::invalid_parameter(
            "calibration + evaluation",
            format!(
                "{needed} glosses asked, {} distinct available",
                distinct.len()
            ),
        ));
    }
    let order = config
        .seed
        .child_named("glosses")
        .rng()
        .permutation(distinct.len());
    let take = |range: std::ops::Range<usize>| -> Vec<Gloss> {
        order[range].iter().map(|&i| distinct[i].clone()).collect()
    };
    let mut queries = config
        .seed
        .child_named("queries")
        .rng()
        .sample_indices(config.evaluation, config.queries)?;
    queries.sort_unstable();
    Ok(GlossSplit {
        calibration: take(0..config.calibration),
        evaluation: take(config.calibration..needed),
        queries,
        distinct: distinct.len(),
    })
}
