//! # qcl-continual
//!
//! Continual-learning scenarios, byte-budget replay buffers, metrics, ProxQ, BaLL and QAT quantizers.
//!
//! **Status: in progress** (issue #6). Available now:
//!
//! - [`buffer`]: replay buffers with a capacity in items and in bytes and stable item ids —
//!   [`ReservoirBuffer`] (Vitter's algorithm R), [`ClassBalancedBuffer`] (AQM's eviction from
//!   the largest class), [`PerTaskBuffer`] (LifeQuant's random δ of each task) — behind the
//!   [`ReplayBuffer`] trait, with replay batches restricted by a [`Filter`] on classes and tasks.
//!
//! Planned: class- and task-incremental scenarios, the accuracy matrix and its metrics, small
//! strategies (fine-tune, replay, EWC, LwF), and LifeQuant's 4-bit quantization-aware training
//! with ProxQ and BaLL.

#![warn(missing_docs)]

pub mod buffer;

pub use buffer::{
    BufferItem, Capacity, ClassBalancedBuffer, Entry, Filter, InsertStatus, Insertion, ItemId,
    Keep, PerTaskBuffer, RawImage, ReplayBuffer, ReservoirBuffer, TaskSummary,
};
