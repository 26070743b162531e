//! Sentence embeddings on candle for qcl's experiments with a pretrained transformer.
//!
//! - [`SentenceEncoder`]: a sentence-transformers BERT model (all-MiniLM-L6-v2 and the like)
//!   run through candle-transformers' `BertModel`, with mean pooling over the attention mask
//!   and L2 normalisation, exactly as sentence-transformers computes it. It loads a
//!   sentence-transformers folder or any `candle_nn::VarBuilder` (for example decompressed
//!   weights), and [`SentenceEncoder::forward_tapped`] shows every Linear layer its input on
//!   the real tokens, for calibration, with output equal bit for bit to the plain forward.
//! - [`wordnet`]: the glosses of English WordNet 3.0 and a seeded calibration / evaluation /
//!   query split.
//! - [`eval`]: cosine similarity per row (mean, 1st percentile) and top-k retrieval agreement
//!   between two sets of embeddings.
//!
//! ```
//! use qcl_text::{EmbedConfig, SentenceEncoder};
//! let encoder = SentenceEncoder::from_folder("../../fixtures/tiny-bert", &candle_core::Device::Cpu)?
//!     .with_options(EmbedConfig { progress: false, ..EmbedConfig::default() });
//! let texts = ["a dog is running in the park", "the cat sat on the mat.", "a dog in the park"];
//! let e = encoder.embed(&texts)?;
//! let neighbours = qcl_text::nearest_neighbours(&e, &[0], 1)?;
//! assert_eq!(neighbours[0].len(), 1);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

pub mod bert;
pub mod config;
pub mod encoder;
pub mod eval;
pub mod pooling;
pub mod tokenize;
pub mod wordnet;

pub use bert::{BertWeights, Tap, TappedBert, LAYER_LINEARS, WORD_EMBEDDINGS};
pub use config::{Pooling, SentenceConfig};
pub use encoder::{EmbedConfig, SentenceEncoder};
pub use eval::{
    cosine_summary, nearest_neighbours, percentile, retrieval_agreement, row_cosines,
    CosineSummary, RetrievalAgreement,
};
pub use pooling::{l2_normalize, mean_pool};
pub use tokenize::{SentenceTokenizer, TokenBatch};
pub use wordnet::{split_glosses, Gloss, GlossList, GlossSplit, GlossSplitConfig, PartOfSpeech};

/// candle-transformers' BERT configuration, re-exported for [`SentenceConfig::bert`].
pub use candle_transformers::models::bert::Config as BertConfig;
