//! The experiments `cargo xtask reproduce` knows; each module exports one `EXPERIMENT`.

pub mod aqm;
pub mod cacl;
pub mod datasets;
pub mod ecvq;
pub mod kmeans;
pub mod lifequant;
pub mod training;
pub mod vq;
pub mod wpq;
