//! qcl-text's integration tests, in one binary so that the test build links once:
//! the tiny BERT against sentence-transformers, the tapped forward, all-MiniLM-L6-v2 when
//! `data/minilm` exists, the WordNet reader and split, the fidelity metrics, and the same
//! bytes on 1 and 2 threads.

#[path = "../common/mod.rs"]
mod common;
mod eval;
mod minilm;
mod threads;
mod tiny_bert;
mod wordnet;
