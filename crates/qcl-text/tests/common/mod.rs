//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use qcl_text::{row_cosines, SentenceEncoder};
use serde::Deserialize;

/// `fixtures/` of the workspace.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// `data/` of the workspace (prepared by `cargo xtask data`, absent in CI).
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

/// A `reference.json` written by the fixture scripts.
#[derive(Deserialize)]
pub struct Reference {
    pub max_seq_length: usize,
    pub sentences: Vec<String>,
    pub input_ids: Vec<Vec<u32>>,
    pub embeddings: Vec<Vec<f32>>,
}

pub fn reference(path: PathBuf) -> Reference {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `encoder`'s embeddings of a reference's sentences beside the reference's own.
pub struct AgainstReference {
    /// Our embeddings, one row per sentence.
    pub ours: Tensor,
    /// The reference embeddings.
    pub theirs: Tensor,
    /// The cosine of each row of `ours` with the same row of `theirs`.
    pub cosines: Vec<f64>,
}

/// Asserts that `encoder` gives each of `r`'s sentences the reference token ids, then embeds
/// the sentences beside the reference embeddings.
pub fn embed_against_reference(encoder: &SentenceEncoder, r: &Reference) -> AgainstReference {
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    for (text, ids) in texts.iter().zip(&r.input_ids) {
        let batch = encoder.tokenize(&[text]).unwrap();
        let ours: Vec<u32> = batch.input_ids.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&ours, ids, "token ids of {text:?}");
    }
    let ours = encoder.embed(&texts).unwrap();
    let theirs = Tensor::new(r.embeddings.clone(), &Device::Cpu).unwrap();
    let cosines = row_cosines(&ours, &theirs).unwrap();
    AgainstReference {
        ours,
        theirs,
        cosines,
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    qcl_tensor::max_abs_diff(a, b).unwrap()
}

/// Bit patterns of an f32 tensor, for exact comparisons.
pub fn bits(t: &Tensor) -> Vec<u32> {
    qcl_tensor::f32_bits(t).unwrap()
}
