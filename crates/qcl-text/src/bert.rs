//! BERT's weights by checkpoint name, and a forward pass that shows every Linear its input.
//!
//! [`TappedBert`] is candle-transformers' `BertModel` forward (`models/bert.rs` of
//! candle-transformers 0.11) written out with the same candle-nn layers and candle ops in the
//! same order, so that its output equals `BertModel`'s bit for bit, with one addition: before
//! every Linear it calls a *tap* with the Linear's input restricted to the real (non-padding)
//! tokens. Weight-compression methods record calibration statistics through it.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config as BertConfig, HiddenAct};
use qcl_tensor::{check_finite, Error, Result};

use crate::tokenize::TokenBatch;

/// The six Linear layers of a BERT layer, by weight name under `encoder.layer.{i}.`, in the
/// order the forward pass applies them.
pub const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
];

/// Name of the word-embedding table, tapped with the batch's real token ids.
pub const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";

/// A calibration tap: called with a checkpoint weight name and that layer's input.
pub type Tap<'a> = dyn FnMut(&str, &Tensor) -> Result<()> + 'a;

/// Every tensor `BertModel` loads, with its shape, by name relative to the model's prefix.
///
/// ```
/// let config = qcl_text::SentenceConfig::from_folder("../../fixtures/tiny-bert")?;
/// let shapes = qcl_text::bert::bert_tensor_shapes(&config.bert);
/// assert_eq!(shapes.len(), 5 + 2 * 16); // embeddings, then 16 tensors per layer
/// assert_eq!(shapes[0], ("embeddings.word_embeddings.weight".to_string(), vec![333, 32]));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub fn bert_tensor_shapes(config: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut out = vec![
        (WORD_EMBEDDINGS.to_string(), vec![config.vocab_size, h]),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![config.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![config.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (name, out_dim, in_dim) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            out.push((format!("{p}{name}.weight"), vec![out_dim, in_dim]));
            out.push((format!("{p}{name}.bias"), vec![out_dim]));
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            out.push((format!("{p}{ln}.weight"), vec![h]));
            out.push((format!("{p}{ln}.bias"), vec![h]));
        }
    }
    out
}

/// The checkpoint prefix of the BERT tensors in `vb`: `""`, or `"{model_type}."` / `"bert."`
/// for checkpoints of a model with a head.
fn detect_prefix(vb: &VarBuilder, config: &BertConfig) -> Result<String> {
    let mut candidates = vec![String::new(), "bert.".to_string()];
    if let Some(t) = &config.model_type {
        candidates.push(format!("{t}."));
    }
    candidates
        .into_iter()
        .find(|p| vb.contains_tensor(&format!("{p}{WORD_EMBEDDINGS}")))
        .ok_or_else(|| {
            Error::invalid_parameter(
                "var_builder",
                format!("holds no `{WORD_EMBEDDINGS}` (with or without a `bert.` prefix)"),
            )
        })
}

/// BERT's tensors, read once from a `VarBuilder` as `f32` and checked (present, shape, finite).
#[derive(Clone)]
pub struct BertWeights {
    prefix: String,
    tensors: BTreeMap<String, Tensor>,
}

impl BertWeights {
    /// Reads every tensor `BertModel` needs from `vb`, whatever its backend (a safetensors
    /// file, a `VarMap`, decompressed weights).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming a missing tensor, [`Error::ShapeMismatch`] naming a
    /// tensor of the wrong shape, [`Error::NonFinite`] naming a tensor with a NaN or infinity.
    pub fn from_var_builder(vb: &VarBuilder, config: &BertConfig) -> Result<Self> {
        let prefix = detect_prefix(vb, config)?;
        let vb = vb.clone().set_dtype(DType::F32);
        let mut tensors = BTreeMap::new();
        for (name, shape) in bert_tensor_shapes(config) {
            let full = format!("{prefix}{name}");
            if !vb.contains_tensor(&full) {
                return Err(Error::invalid_parameter(
                    "var_builder",
                    format!("has no tensor `{full}`"),
                ));
            }
            let t = vb
                .get_unchecked_dtype(&full, DType::F32)
                .or_else(|_| vb.get(shape.as_slice(), &full))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    context: full,
                    expected: format!("{shape:?}"),
                    actual: t.dims().to_vec(),
                });
            }
            check_finite(&full, &t)?;
            tensors.insert(name, t);
        }
        Ok(BertWeights { prefix, tensors })
    }

    /// The checkpoint prefix (`""` for a sentence-transformers folder).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Tensor `name` (relative to the prefix).
    fn get(&self, name: &str) -> Tensor {
        // Every name asked for is one of `bert_tensor_shapes`, all loaded by the constructor.
        self.tensors[name].clone()
    }

    /// candle-transformers' `BertModel` on these tensors (shared, not copied).
    pub fn bert_model(&self, config: &BertConfig, device: &Device) -> Result<BertModel> {
        let map: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(BertModel::load(
            VarBuilder::from_tensors(map, DType::F32, device),
            config,
        )?)
    }
}

struct TappedLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// BERT's forward pass with a tap before every Linear (see the module documentation).
///
/// ```
/// use candle_core::{DType, Device};
/// use qcl_text::{BertWeights, SentenceConfig, TappedBert};
/// let dir = std::path::Path::new("../../fixtures/tiny-bert");
/// let config = SentenceConfig::from_folder(dir)?;
/// let bytes = std::fs::read(dir.join("model.safetensors"))?;
/// let vb = candle_nn::VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)?;
/// let weights = BertWeights::from_var_builder(&vb, &config.bert)?;
/// let tapped = TappedBert::new(&weights, &config.bert);
/// let tokenizer = qcl_text::SentenceTokenizer::from_file(dir.join("tokenizer.json"), 20)?;
/// let batch = tokenizer.encode(&["a dog"], &Device::Cpu)?;
/// let mut widths = Vec::new();
/// let hidden = tapped.forward(&batch, &mut |_, x| {
///     widths.push(x.dims().last().copied().unwrap_or(0));
///     Ok(())
/// })?;
/// assert_eq!(hidden.dims(), [1, 4, 32]);
/// assert_eq!(widths[..7], [4, 32, 32, 32, 32, 32, 64]); // 4 token ids, then layer 0
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TappedBert {
    prefix: String,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embedding_norm: LayerNorm,
    layers: Vec<TappedLayer>,
    heads: usize,
    head_size: usize,
    act: HiddenAct,
}

impl TappedBert {
    /// The forward pass on `weights`.
    pub fn new(weights: &BertWeights, config: &BertConfig) -> Self {
        let w = |n: &str| weights.get(n);
        let linear =
            |p: &str| Linear::new(w(&format!("{p}.weight")), Some(w(&format!("{p}.bias"))));
        let norm = |p: &str| {
            LayerNorm::new(
                w(&format!("{p}.weight")),
                w(&format!("{p}.bias")),
                config.layer_norm_eps,
            )
        };
        let h = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}.");
                TappedLayer {
                    query: linear(&format!("{p}attention.self.query")),
                    key: linear(&format!("{p}attention.self.key")),
                    value: linear(&format!("{p}attention.self.value")),
                    attention_output: linear(&format!("{p}attention.output.dense")),
                    attention_norm: norm(&format!("{p}attention.output.LayerNorm")),
                    intermediate: linear(&format!("{p}intermediate.dense")),
                    output: linear(&format!("{p}output.dense")),
                    output_norm: norm(&format!("{p}output.LayerNorm")),
                }
            })
            .collect();
        TappedBert {
            prefix: weights.prefix.clone(),
            word: Embedding::new(w(WORD_EMBEDDINGS), h),
            position: Embedding::new(w("embeddings.position_embeddings.weight"), h),
            token_type: Embedding::new(w("embeddings.token_type_embeddings.weight"), h),
            embedding_norm: norm("embeddings.LayerNorm"),
            layers,
            heads: config.num_attention_heads,
            head_size: h / config.num_attention_heads,
            act: config.hidden_act,
        }
    }

    /// The checkpoint prefix of the tapped names (`""` for a sentence-transformers folder).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn activation(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.act {
            HiddenAct::Gelu => x.gelu_erf(),
            HiddenAct::GeluApproximate => x.gelu(),
            HiddenAct::Relu => x.relu(),
        }
    }

    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.heads, self.head_size))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The last hidden state `[batch, seq, hidden]`, equal to `BertModel::forward`'s, calling
    /// `tap(name, x)` with the word-embedding name and the real token ids (1-D `u32`), then
    /// before each Linear with its weight's checkpoint name and its input on the real tokens
    /// (`[n_valid, in]`, `f32`).
    ///
    /// # Errors
    /// Whatever the tap returns (the pass stops there); candle errors.
    pub fn forward(&self, batch: &TokenBatch, tap: &mut Tap<'_>) -> Result<Tensor> {
        let device = batch.input_ids.device();
        let valid = batch.valid_positions();
        let n_valid = valid.len();
        let valid = Tensor::from_vec(valid, n_valid, device)?;
        let rows = |x: &Tensor| -> Result<Tensor> {
            let (b, s, d) = x.dims3()?;
            Ok(x.reshape((b * s, d))?.index_select(&valid, 0)?)
        };
        let name = |n: &str| format!("{}{n}", self.prefix);

        tap(
            &name(WORD_EMBEDDINGS),
            &batch.input_ids.flatten_all()?.index_select(&valid, 0)?,
        )?;
        // BertEmbeddings::forward
        let (_, seq_len) = batch.input_ids.dims2()?;
        let input_embeddings = self.word.forward(&batch.input_ids)?;
        let token_type_embeddings = self.token_type.forward(&batch.token_type_ids)?;
        let mut embeddings = (&input_embeddings + token_type_embeddings)?;
        let position_ids = (0..seq_len as u32).collect::<Vec<_>>();
        let position_ids = Tensor::new(&position_ids[..], device)?;
        embeddings = embeddings.broadcast_add(&self.position.forward(&position_ids)?)?;
        let mut hidden = self.embedding_norm.forward(&embeddings)?;

        let mask = extended_attention_mask(&batch.attention_mask, hidden.dtype())?;
        for (l, layer) in self.layers.iter().enumerate() {
            let lname = |n: &str| name(&format!("encoder.layer.{l}.{n}"));
            // BertSelfAttention::forward
            let x = rows(&hidden)?;
            for n in &LAYER_LINEARS[..3] {
                tap(&lname(n), &x)?;
            }
            let q = self.split_heads(&layer.query.forward(&hidden)?)?;
            let k = self.split_heads(&layer.key.forward(&hidden)?)?;
            let v = self.split_heads(&layer.value.forward(&hidden)?)?;
            let scores = q.matmul(&k.t()?)?;
            let scores = (scores / (self.head_size as f64).sqrt())?;
            let scores = scores.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let context = probs.matmul(&v)?;
            let context = context.transpose(1, 2)?.contiguous()?;
            let context = context.flatten_from(D::Minus2)?;
            // BertSelfOutput::forward
            tap(&lname(LAYER_LINEARS[3]), &rows(&context)?)?;
            let attended = layer.attention_output.forward(&context)?;
            let attended = layer.attention_norm.forward(&(attended + &hidden)?)?;
            // BertIntermediate::forward
            tap(&lname(LAYER_LINEARS[4]), &rows(&attended)?)?;
            let inner = self.activation(&layer.intermediate.forward(&attended)?)?;
            // BertOutput::forward
            tap(&lname(LAYER_LINEARS[5]), &rows(&inner)?)?;
            let out = layer.output.forward(&inner)?;
            hidden = layer.output_norm.forward(&(out + &attended)?)?;
        }
        Ok(hidden)
    }
}

/// `get_extended_attention_mask` of candle-transformers' BERT: 0 for real tokens, the most
/// negative finite value for padding, shaped `[batch, 1, 1, seq]`.
fn extended_attention_mask(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let mask = mask.unsqueeze(1)?.unsqueeze(1)?.to_dtype(dtype)?;
    (mask.ones_like()? - &mask)?.broadcast_mul(
        &Tensor::try_from(f32::MIN)?
            .to_device(mask.device())?
            .to_dtype(dtype)?,
    )
}
