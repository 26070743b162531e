//! The experiments `cargo xtask reproduce` knows; each module exports one `EXPERIMENT`.

pub mod cacl;
pub mod datasets;
pub mod ecvq;
pub mod kmeans;
pub mod training;
pub mod vq;
