//! # qcl-data
//!
//! Labelled image data sets for qcl.
//!
//! - [`Dataset`]: `u8` images in **NCHW** order (`[N, C, H, W]`) with labels; selection by
//!   class set, subsets, pixel statistics, normalised tensors and seeded mini-batches
//!   ([`Dataset::batches`]) on any candle device;
//! - [`SplitDataset`]: the fixed train/test parts, stored as one safetensors file (the files
//!   `cargo xtask data` writes to `data/`);
//! - [`import`]: validated import from the npm JSON packages and from IDX files.
//!
//! ```
//! use qcl_data::{BatchConfig, BatchOrder, Normalization, SplitDataset};
//! use qcl_tensor::Seed;
//! # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
//! let data = SplitDataset::load(path)?;
//! let task = data.train.select_classes(&[0, 1])?;
//! let options = BatchConfig {
//!     batch_size: 32,
//!     order: BatchOrder::Shuffled(Seed::new(0)),
//!     normalization: Normalization::Symmetric,
//!     drop_last: false,
//! };
//! for batch in task.batches(options, &candle_core::Device::Cpu)? {
//!     let batch = batch?;
//!     assert_eq!(batch.images.dims()[1..], [1, 28, 28]);
//! }
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

mod dataset;
pub mod import;

pub use dataset::{
    Batch, BatchConfig, BatchOrder, Batches, Dataset, ImageShape, Normalization, PixelStats,
    SplitDataset, DATASET_FORMAT,
};
pub use import::{ImportReport, KnownDataset, MAX_DECOMPRESSED_BYTES};
