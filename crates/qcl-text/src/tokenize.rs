//! Tokenization as sentence-transformers does it: truncate at `max_seq_length`, pad to the
//! longest text of the batch.

use std::path::Path;

use candle_core::{Device, Tensor};
use qcl_tensor::{Error, Result};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::config::read_bounded;

/// Largest `tokenizer.json` read: 64 MiB (all-MiniLM-L6-v2's is 0.47 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// A batch of tokenized texts, padded on the right to its longest member.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Token ids `[batch, seq]`, `u32`.
    pub input_ids: Tensor,
    /// Segment ids `[batch, seq]`, `u32` (all zero for single texts).
    pub token_type_ids: Tensor,
    /// 1 for a real token, 0 for padding, `[batch, seq]`, `u32`.
    pub attention_mask: Tensor,
    /// Real tokens per text, special tokens included.
    pub lengths: Vec<usize>,
}

impl TokenBatch {
    /// Number of texts.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether the batch holds no text.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Padded sequence length (the second dimension of `input_ids`).
    pub fn seq_len(&self) -> usize {
        self.input_ids.dims().get(1).copied().unwrap_or(0)
    }

    /// Flat indices `b·seq + t` of the real tokens, row by row: the rows of a `[batch·seq, _]`
    /// view that are not padding.
    pub fn valid_positions(&self) -> Vec<u32> {
        let seq = self.seq_len();
        self.lengths
            .iter()
            .enumerate()
            .flat_map(|(b, &n)| (0..n).map(move |t| (b * seq + t) as u32))
            .collect()
    }
}

/// A `tokenizers::Tokenizer` set to truncate at `max_seq_length` and pad to the longest text,
/// whatever the file had baked in (all-MiniLM-L6-v2's `tokenizer.json` truncates at 128 and
/// pads to a fixed 128, while sentence-transformers truncates at 256 and pads to the longest).
///
/// ```
/// use qcl_text::SentenceTokenizer;
/// let tok = SentenceTokenizer::from_file("../../fixtures/tiny-bert/tokenizer.json", 20)?;
/// let batch = tok.encode(&["the cat sat on the mat.", "a dog"], &candle_core::Device::Cpu)?;
/// assert_eq!(batch.lengths, [9, 4]); // [CLS] ... [SEP]
/// assert_eq!(batch.input_ids.dims(), [2, 9]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Clone)]
pub struct SentenceTokenizer {
    inner: Tokenizer,
    max_seq_length: usize,
}

impl std::fmt::Debug for SentenceTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("max_seq_length", &self.max_seq_length)
            .finish()
    }
}

impl SentenceTokenizer {
    /// Reads `tokenizer.json` (at most [`MAX_TOKENIZER_BYTES`]).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::BadFile`] if it is too large or not a
    /// tokenizer; as [`new`](SentenceTokenizer::new).
    pub fn from_file(path: impl AsRef<Path>, max_seq_length: usize) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_bounded(path, MAX_TOKENIZER_BYTES)?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::bad_file(path, format!("not a tokenizer: {e}")))?;
        Self::new(inner, max_seq_length)
            .map_err(|e| Error::bad_file(path, format!("unusable tokenizer: {e}")))
    }

    /// Wraps `tokenizer`, replacing its truncation (longest first, at `max_seq_length` tokens
    /// including the special ones) and padding (right, to the longest text, with the padding
    /// token the tokenizer names or else `[PAD]`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when `max_seq_length < 2` or no padding token is known.
    pub fn new(mut tokenizer: Tokenizer, max_seq_length: usize) -> Result<Self> {
        if max_seq_length < 2 {
            return Err(Error::invalid_parameter(
                "max_seq_length",
                "must be at least 2 ([CLS] and [SEP])",
            ));
        }
        let (pad_id, pad_token) = match tokenizer.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => {
                let id = tokenizer.token_to_id("[PAD]").ok_or_else(|| {
                    Error::invalid_parameter(
                        "tokenizer",
                        "names no padding token and has no `[PAD]` in its vocabulary",
                    )
                })?;
                (id, "[PAD]".to_string())
            }
        };
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::invalid_parameter("max_seq_length", e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(SentenceTokenizer {
            inner: tokenizer,
            max_seq_length,
        })
    }

    /// The wrapped tokenizer, with the truncation and padding set by [`new`](Self::new).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner
    }

    /// Tokens per text after truncation, special tokens included.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Tokenizes `texts` (each trimmed of surrounding white space first, as
    /// sentence-transformers does) into one batch on `device`.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no texts; [`Error::InvalidParameter`] naming the text the
    /// tokenizer refuses.
    pub fn encode(&self, texts: &[&str], device: &Device) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(Error::EmptyInput("no texts to tokenize".into()));
        }
        let inputs: Vec<&str> = texts.iter().map(|t| t.trim()).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::invalid_parameter("texts", format!("cannot tokenize: {e}")))?;
        let seq = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(texts.len() * seq);
        let mut types = Vec::with_capacity(texts.len() * seq);
        let mut mask = Vec::with_capacity(texts.len() * seq);
        let mut lengths = Vec::with_capacity(texts.len());
        for (i, e) in encodings.iter().enumerate() {
            let m = e.get_attention_mask();
            let n = m.iter().filter(|&&v| v != 0).count();
            // Right padding: the real tokens are a prefix.
            if e.get_ids().len() != seq || m[..n].contains(&0) {
                return Err(Error::invalid_parameter(
                    "texts",
                    format!("text {i} was not padded on the right to {seq} tokens"),
                ));
            }
            ids.extend_from_slice(e.get_ids());
            types.extend_from_slice(e.get_type_ids());
            mask.extend_from_slice(m);
            lengths.push(n);
        }
        let shape = (texts.len(), seq);
        Ok(TokenBatch {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            token_type_ids: Tensor::from_vec(types, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
            lengths,
        })
    }
}
