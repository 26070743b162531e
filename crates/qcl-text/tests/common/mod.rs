//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Tensor;
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

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    qcl_tensor::max_abs_diff(a, b).unwrap()
}

/// Bit patterns of an f32 tensor, for exact comparisons.
pub fn bits(t: &Tensor) -> Vec<u32> {
    qcl_tensor::f32_bits(t).unwrap()
}
