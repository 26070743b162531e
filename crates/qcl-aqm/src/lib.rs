//! # qcl-aqm
//!
//! Online learned continual compression with adaptive quantization modules (AQM; Caccia,
//! Belilovsky, Caccia & Pineau, ICML 2020), as docs/methods/aqm.md describes it: VQ
//! autoencoder modules ([`QLayer`], [`QStack`]) trained online, an adaptive replay memory held
//! under a byte budget ([`AdaptiveMemory`]), the online classification loop with drift
//! measurement ([`online`]) and whole-state save/restore ([`state`]).

pub mod config;
pub mod layer;
pub mod memory;
pub mod online;
pub mod stack;
pub mod state;

pub use config::{InputKind, QLayerConfig, StackConfig};
pub use layer::{LayerForward, LayerStats, QLayer};

pub use memory::{
    AdaptiveMemory, IncomingSample, InsertionRule, MemoryConfig, Payload, Reencoded, ReplayItem,
    StoredSample,
};
pub use online::{Classifier, Method, OnlineConfig, ReencodeConfig, RunResult};
pub use stack::{per_sample_mse, QStack, StackStep};
