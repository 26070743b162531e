//! The sentence encoder: tokenizer → candle-transformers' `BertModel` → mean pooling → L2
//! normalisation, as sentence-transformers runs all-MiniLM-L6-v2.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::BertModel;
use indicatif::{ProgressBar, ProgressStyle};
use qcl_tensor::{Error, Result, SafetensorsFile};

use crate::bert::{bert_tensor_shapes, BertWeights, Tap, TappedBert, LAYER_LINEARS};
use crate::config::{Pooling, SentenceConfig};
use crate::pooling::{l2_normalize, mean_pool};
use crate::tokenize::{SentenceTokenizer, TokenBatch};

/// Largest `model.safetensors` read: 4 GiB.
pub const MAX_MODEL_BYTES: u64 = 4 << 30;

/// How [`SentenceEncoder::embed`] works through a list of texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedConfig {
    /// Texts per forward pass (default 32, sentence-transformers' default).
    pub batch_size: usize,
    /// Batch texts of similar length together (longest first, by character count, as
    /// sentence-transformers does) so that less padding is computed; the output keeps the
    /// input order (default `true`).
    pub sort_by_length: bool,
    /// Show a progress bar on standard error when it is a terminal (default `true`).
    pub progress: bool,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            batch_size: 32,
            sort_by_length: true,
            progress: true,
        }
    }
}

/// A sentence-transformers BERT model on candle.
///
/// The embedding of a text is the mean of `BertModel`'s last hidden state over its real
/// tokens, divided by its L2 norm. Texts are trimmed, truncated at `max_seq_length` tokens and
/// padded to the longest text of their batch. Embeddings do not depend on the batch size, on
/// the other texts of a batch or on their order beyond float rounding in the matrix products
/// (tested: at most 1e-6 per coordinate), and are the same bytes with 1 or 2 threads.
///
/// ```
/// use qcl_text::{EmbedConfig, SentenceEncoder};
/// let encoder = SentenceEncoder::from_folder("../../fixtures/tiny-bert", &candle_core::Device::Cpu)?
///     .with_options(EmbedConfig { batch_size: 2, progress: false, ..EmbedConfig::default() });
/// let e = encoder.embed(&["the cat sat on the mat.", "a dog is running", "the park"])?;
/// assert_eq!(e.dims(), [3, 32]);
/// let norms = e.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
/// assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub struct SentenceEncoder {
    model: BertModel,
    tapped: TappedBert,
    tokenizer: SentenceTokenizer,
    config: SentenceConfig,
    device: Device,
    options: EmbedConfig,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers folder (`config.json`, `model.safetensors`,
    /// `tokenizer.json`, `sentence_bert_config.json`, `modules.json`, `1_Pooling/config.json`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::BadFile`] naming the file that is missing, too large or
    /// invalid; as [`from_var_builder`](Self::from_var_builder).
    pub fn from_folder(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = SentenceConfig::from_folder(dir)?;
        let tokenizer =
            SentenceTokenizer::from_file(dir.join("tokenizer.json"), config.max_seq_length)?;
        let path = dir.join("model.safetensors");
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if size > MAX_MODEL_BYTES {
            return Err(Error::bad_file(
                &path,
                format!("{size} bytes, more than the {MAX_MODEL_BYTES} allowed"),
            ));
        }
        let file = SafetensorsFile::open(&path)?;
        // Only the tensors BertModel reads (not `embeddings.position_ids`, a pooler, a head).
        let mut tensors = HashMap::new();
        for (name, _) in bert_tensor_shapes(&config.bert) {
            for prefixed in [name.clone(), format!("bert.{name}")] {
                if file.contains(&prefixed) {
                    let t = file.tensor(&prefixed, device)?;
                    if !t.dtype().is_float() {
                        return Err(Error::bad_file(
                            &path,
                            format!("tensor `{prefixed}` has dtype {:?}", t.dtype()),
                        ));
                    }
                    tensors.insert(prefixed, t.to_dtype(DType::F32)?);
                }
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::from_var_builder(vb, config, tokenizer).map_err(|e| match e {
            Error::InvalidParameter { reason, .. } => Error::bad_file(path, reason),
            other => other,
        })
    }

    /// An encoder on the BERT tensors of `vb` (any backend: a safetensors file, a `VarMap`,
    /// decompressed weights), read once as `f32`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use qcl_text::{SentenceConfig, SentenceEncoder, SentenceTokenizer};
    /// let dir = std::path::Path::new("../../fixtures/tiny-bert");
    /// let config = SentenceConfig::from_folder(dir)?;
    /// let tokenizer = SentenceTokenizer::from_file(dir.join("tokenizer.json"), 20)?;
    /// let bytes = std::fs::read(dir.join("model.safetensors"))?;
    /// let vb = candle_nn::VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)?;
    /// let encoder = SentenceEncoder::from_var_builder(vb, config, tokenizer)?;
    /// assert_eq!(encoder.embed(&["a dog"])?.dims(), [1, 32]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a missing tensor or a tokenizer whose `max_seq_length`
    /// differs from the configuration's; [`Error::ShapeMismatch`] and [`Error::NonFinite`]
    /// naming the tensor; as [`SentenceConfig::validate`].
    pub fn from_var_builder(
        vb: VarBuilder,
        config: SentenceConfig,
        tokenizer: SentenceTokenizer,
    ) -> Result<Self> {
        config.validate()?;
        if tokenizer.max_seq_length() != config.max_seq_length {
            return Err(Error::invalid_parameter(
                "tokenizer",
                format!(
                    "truncates at {} tokens, the configuration at {}",
                    tokenizer.max_seq_length(),
                    config.max_seq_length
                ),
            ));
        }
        let device = vb.device().clone();
        let weights = BertWeights::from_var_builder(&vb, &config.bert)?;
        let model = weights.bert_model(&config.bert, &device)?;
        let tapped = TappedBert::new(&weights, &config.bert);
        Ok(SentenceEncoder {
            model,
            tapped,
            tokenizer,
            config,
            device,
            options: EmbedConfig::default(),
        })
    }

    /// The encoder with these [`EmbedConfig`].
    pub fn with_options(mut self, options: EmbedConfig) -> Self {
        self.options = options;
        self
    }

    /// The options [`embed`](Self::embed) uses.
    pub fn options(&self) -> &EmbedConfig {
        &self.options
    }

    /// The model's configuration.
    pub fn config(&self) -> &SentenceConfig {
        &self.config
    }

    /// The tokenizer (truncating at `max_seq_length`, padding to the longest).
    pub fn tokenizer(&self) -> &SentenceTokenizer {
        &self.tokenizer
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// candle-transformers' model that [`forward`](Self::forward) runs.
    pub fn bert(&self) -> &BertModel {
        &self.model
    }

    /// Embedding width (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.config.bert.hidden_size
    }

    /// Checkpoint names of the weights [`forward_tapped`](Self::forward_tapped) taps, in
    /// call order: the word embeddings, then per layer query, key, value, attention output,
    /// intermediate and output Linear.
    pub fn tapped_weight_names(&self) -> Vec<String> {
        let prefix = self.tapped.prefix();
        let mut names = vec![format!("{prefix}{}", crate::bert::WORD_EMBEDDINGS)];
        for l in 0..self.config.bert.num_hidden_layers {
            for n in LAYER_LINEARS {
                names.push(format!("{prefix}encoder.layer.{l}.{n}"));
            }
        }
        names
    }

    /// Tokenizes `texts` into one batch on the encoder's device.
    ///
    /// # Errors
    /// As [`SentenceTokenizer::encode`].
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch> {
        self.tokenizer.encode(texts, &self.device)
    }

    fn pool(&self, hidden: &Tensor, batch: &TokenBatch) -> Result<Tensor> {
        let pooled = match self.config.pooling {
            Pooling::Mean => mean_pool(hidden, &batch.attention_mask)?,
        };
        if self.config.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// Sentence embeddings `[batch, dim]` of one tokenized batch, through `BertModel`.
    ///
    /// # Errors
    /// Candle errors.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor> {
        let hidden = self.model.forward(
            &batch.input_ids,
            &batch.token_type_ids,
            Some(&batch.attention_mask),
        )?;
        self.pool(&hidden, batch)
    }

    /// Sentence embeddings of one batch, equal bit for bit to [`forward`](Self::forward)'s,
    /// calling `tap(weight_name, x)` first with `embeddings.word_embeddings.weight` and the
    /// batch's real token ids (1-D `u32`), then before every Linear with its weight's
    /// checkpoint name (`encoder.layer.{i}.attention.self.query.weight`, ...) and its input
    /// on the real tokens (`[n_valid, in]`, `f32`); see
    /// [`tapped_weight_names`](Self::tapped_weight_names).
    ///
    /// ```
    /// use qcl_text::SentenceEncoder;
    /// let encoder = SentenceEncoder::from_folder("../../fixtures/tiny-bert", &candle_core::Device::Cpu)?;
    /// let batch = encoder.tokenize(&["the cat sat on the mat.", "a dog"])?;
    /// let mut rows = std::collections::BTreeMap::new();
    /// let tapped = encoder.forward_tapped(&batch, &mut |name, x| {
    ///     *rows.entry(name.to_string()).or_insert(0) += x.dim(0)?;
    ///     Ok(())
    /// })?;
    /// assert_eq!(rows["encoder.layer.1.output.dense.weight"], 9 + 4); // real tokens only
    /// assert_eq!(rows.len(), 1 + 2 * 6);
    /// let plain = encoder.forward(&batch)?;
    /// assert_eq!(tapped.to_vec2::<f32>()?, plain.to_vec2::<f32>()?);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// Whatever `tap` returns (the pass stops there); candle errors.
    pub fn forward_tapped(&self, batch: &TokenBatch, tap: &mut Tap<'_>) -> Result<Tensor> {
        let hidden = self.tapped.forward(batch, tap)?;
        self.pool(&hidden, batch)
    }

    /// Runs [`forward_tapped`](Self::forward_tapped) over `texts` in batches of
    /// [`EmbedConfig::batch_size`] (grouped by length as [`embed`](Self::embed) groups them),
    /// for calibration: `tap` sees every Linear's input on every real token of every text.
    /// `bar` advances by one per text. Returns the number of real tokens seen.
    ///
    /// ```
    /// use indicatif::ProgressBar;
    /// use qcl_text::SentenceEncoder;
    /// let encoder = SentenceEncoder::from_folder("../../fixtures/tiny-bert", &candle_core::Device::Cpu)?;
    /// let mut rows = 0;
    /// let tokens = encoder.tap_texts(&["the cat sat on the mat.", "a dog"], &ProgressBar::hidden(),
    ///     &mut |name, x| {
    ///         if name == "encoder.layer.0.intermediate.dense.weight" {
    ///             rows += x.dim(0)?;
    ///         }
    ///         Ok(())
    ///     })?;
    /// assert_eq!((tokens, rows), (9 + 4, 9 + 4));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a batch size of zero; whatever `tap` returns; as
    /// [`tokenize`](Self::tokenize).
    pub fn tap_texts(&self, texts: &[&str], bar: &ProgressBar, tap: &mut Tap<'_>) -> Result<u64> {
        if self.options.batch_size == 0 {
            return Err(Error::invalid_parameter("batch_size", "must be positive"));
        }
        let mut tokens = 0u64;
        for chunk in self.batch_order(texts).chunks(self.options.batch_size) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let batch = self.tokenize(&batch_texts)?;
            tokens += batch.valid_positions().len() as u64;
            self.forward_tapped(&batch, tap)?;
            bar.inc(chunk.len() as u64);
        }
        Ok(tokens)
    }

    /// The order texts are batched in: longest first when [`EmbedConfig::sort_by_length`].
    fn batch_order(&self, texts: &[&str]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        if self.options.sort_by_length {
            order.sort_by_key(|&i| std::cmp::Reverse(texts[i].chars().count()));
        }
        order
    }

    /// Embeddings `[texts.len(), dim]` of `texts`, in order, computed in batches of
    /// [`EmbedConfig::batch_size`] with a progress bar (see [`EmbedConfig`]). No texts give a
    /// `[0, dim]` tensor.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a batch size of zero; as [`tokenize`](Self::tokenize).
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let bar = progress_bar(texts.len(), self.options.progress);
        let out = self.embed_with_progress(texts, &bar);
        bar.finish_and_clear();
        out
    }

    /// [`embed`](Self::embed) advancing the caller's progress bar by one per text (its length
    /// and style are left to the caller; [`EmbedConfig::progress`] is not consulted). The
    /// embeddings are the same bytes as `embed`'s.
    ///
    /// ```
    /// use indicatif::ProgressBar;
    /// use qcl_text::SentenceEncoder;
    /// let encoder = SentenceEncoder::from_folder("../../fixtures/tiny-bert", &candle_core::Device::Cpu)?;
    /// let bar = ProgressBar::hidden();
    /// let e = encoder.embed_with_progress(&["a dog", "the cat sat"], &bar)?;
    /// assert_eq!((e.dims(), bar.position()), (&[2, 32][..], 2));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`embed`](Self::embed).
    pub fn embed_with_progress(&self, texts: &[&str], bar: &ProgressBar) -> Result<Tensor> {
        let options = &self.options;
        if options.batch_size == 0 {
            return Err(Error::invalid_parameter("batch_size", "must be positive"));
        }
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        let order = self.batch_order(texts);
        let mut parts = Vec::with_capacity(texts.len().div_ceil(options.batch_size));
        for chunk in order.chunks(options.batch_size) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let batch = self.tokenize(&batch_texts)?;
            parts.push(self.forward(&batch)?);
            bar.inc(chunk.len() as u64);
        }
        let sorted = Tensor::cat(&parts, 0)?;
        if !options.sort_by_length {
            return Ok(sorted);
        }
        let mut inverse = vec![0u32; texts.len()];
        for (position, &i) in order.iter().enumerate() {
            inverse[i] = position as u32;
        }
        let inverse = Tensor::from_vec(inverse, texts.len(), &self.device)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }
}

fn progress_bar(len: usize, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("embedding {bar:30} {pos}/{len} texts [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    bar
}
