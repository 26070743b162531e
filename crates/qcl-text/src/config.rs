//! The configuration of a sentence-transformers model folder.
//!
//! A folder written by sentence-transformers for a BERT model holds `config.json` (the BERT
//! hyper-parameters), `modules.json` (the pipeline: Transformer → Pooling → optionally
//! Normalize), `sentence_bert_config.json` (`max_seq_length`), `1_Pooling/config.json` (the
//! pooling mode), `tokenizer.json` and `model.safetensors`.

use std::path::{Path, PathBuf};

use candle_transformers::models::bert::Config as BertConfig;
use qcl_tensor::{Error, Result};
use serde::Deserialize;

/// Largest JSON configuration file read (`config.json`, `modules.json`, ...): 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// How token embeddings become one sentence embedding. Only the mean over the attention mask
/// (sentence-transformers' `pooling_mode_mean_tokens`) is implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean of the token embeddings over the non-padding tokens.
    Mean,
}

/// What a sentence encoder needs besides its weights and tokenizer.
///
/// ```
/// use qcl_text::SentenceConfig;
/// let config = SentenceConfig::from_folder("../../fixtures/tiny-bert")?;
/// assert_eq!((config.bert.hidden_size, config.max_seq_length), (32, 20));
/// assert!(config.normalize);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    /// BERT hyper-parameters (`config.json`), in candle-transformers' type.
    pub bert: BertConfig,
    /// Tokens per text after truncation, special tokens included (sentence-transformers'
    /// `max_seq_length`; 256 for all-MiniLM-L6-v2).
    pub max_seq_length: usize,
    /// Pooling of the token embeddings.
    pub pooling: Pooling,
    /// Whether the pooled embedding is divided by its L2 norm (a `Normalize` module).
    pub normalize: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

pub use qcl_tensor::read_bounded;

/// Parses the JSON file `path` (at most [`MAX_CONFIG_BYTES`]).
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_bounded(path, MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

impl SentenceConfig {
    /// A configuration with mean pooling and L2 normalisation, as all-MiniLM-L6-v2 uses.
    ///
    /// # Errors
    /// As [`validate`](SentenceConfig::validate).
    pub fn new(bert: BertConfig, max_seq_length: usize) -> Result<Self> {
        let config = SentenceConfig {
            bert,
            max_seq_length,
            pooling: Pooling::Mean,
            normalize: true,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads `config.json`, `sentence_bert_config.json`, `modules.json` and the pooling
    /// configuration of a sentence-transformers folder.
    ///
    /// Without `sentence_bert_config.json`, `max_seq_length` is the model's
    /// `max_position_embeddings`; without `modules.json`, the pipeline is mean pooling with
    /// normalisation.
    ///
    /// # Errors
    /// [`Error::Io`] for a missing `config.json`; [`Error::BadFile`] naming the file for invalid
    /// JSON, a pipeline other than Transformer → Pooling (→ Normalize), a pooling mode other
    /// than the mean, or `do_lower_case` (not implemented); as
    /// [`validate`](SentenceConfig::validate).
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let bert: BertConfig = read_json(&dir.join("config.json"))?;
        let sbert_path = dir.join("sentence_bert_config.json");
        let max_seq_length = if sbert_path.is_file() {
            let sbert: SentenceBertConfig = read_json(&sbert_path)?;
            if sbert.do_lower_case {
                return Err(Error::bad_file(
                    sbert_path,
                    "do_lower_case = true is not implemented (lowercasing belongs in the tokenizer's normalizer)",
                ));
            }
            sbert.max_seq_length
        } else {
            bert.max_position_embeddings
        };
        let (pooling_dir, normalize) = read_modules(dir)?;
        let pooling = read_pooling(&dir.join(pooling_dir).join("config.json"))?;
        let config = SentenceConfig {
            bert,
            max_seq_length,
            pooling,
            normalize,
        };
        config.validate().map_err(|e| match e {
            Error::InvalidParameter { name, reason } => {
                Error::bad_file(dir.join("config.json"), format!("{name}: {reason}"))
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Checks the hyper-parameters the forward pass relies on.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when a size is zero, the hidden size is not a multiple of
    /// the number of heads, or `max_seq_length` is below 2 or above `max_position_embeddings`.
    pub fn validate(&self) -> Result<()> {
        let b = &self.bert;
        for (name, value) in [
            ("vocab_size", b.vocab_size),
            ("hidden_size", b.hidden_size),
            ("num_hidden_layers", b.num_hidden_layers),
            ("num_attention_heads", b.num_attention_heads),
            ("intermediate_size", b.intermediate_size),
            ("type_vocab_size", b.type_vocab_size),
        ] {
            if value == 0 {
                return Err(Error::invalid_parameter(name, "must be positive"));
            }
        }
        if !b.hidden_size.is_multiple_of(b.num_attention_heads) {
            return Err(Error::invalid_parameter(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not a multiple of {} heads",
                    b.hidden_size, b.num_attention_heads
                ),
            ));
        }
        if self.max_seq_length < 2 || self.max_seq_length > b.max_position_embeddings {
            return Err(Error::invalid_parameter(
                "max_seq_length",
                format!(
                    "{} is outside 2..={} (max_position_embeddings); [CLS] and [SEP] need 2",
                    self.max_seq_length, b.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }
}

/// The pooling module's folder and whether a Normalize module follows.
fn read_modules(dir: &Path) -> Result<(PathBuf, bool)> {
    let path = dir.join("modules.json");
    if !path.is_file() {
        return Ok((PathBuf::from("1_Pooling"), true));
    }
    let modules: Vec<ModuleEntry> = read_json(&path)?;
    let kinds: Vec<&str> = modules
        .iter()
        .map(|m| m.kind.rsplit('.').next().unwrap_or(""))
        .collect();
    let normalize = match kinds.as_slice() {
        ["Transformer", "Pooling"] => false,
        ["Transformer", "Pooling", "Normalize"] => true,
        _ => {
            return Err(Error::bad_file(
                path,
                format!("pipeline {kinds:?} is not Transformer → Pooling (→ Normalize)"),
            ))
        }
    };
    Ok((PathBuf::from(&modules[1].path), normalize))
}

fn read_pooling(path: &Path) -> Result<Pooling> {
    let p: PoolingConfig = read_json(path)?;
    let others = p.pooling_mode_cls_token
        || p.pooling_mode_max_tokens
        || p.pooling_mode_mean_sqrt_len_tokens
        || p.pooling_mode_weightedmean_tokens
        || p.pooling_mode_lasttoken;
    if !p.pooling_mode_mean_tokens || others {
        return Err(Error::bad_file(
            path,
            "only mean pooling (pooling_mode_mean_tokens alone) is implemented",
        ));
    }
    Ok(Pooling::Mean)
}
