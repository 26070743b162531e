//! # qcl-continual
//!
//! Continual-learning scenarios, byte-budget replay buffers, metrics, ProxQ, BaLL and QAT quantizers.
//!
//! **Status: planned** (issue #6). This crate holds no code yet; it exists so that the
//! workspace layout and the dependency graph are visible from the start. It will provide:
//!
//! Class- and task-incremental scenarios, reservoir / class-balanced / per-task buffers with a
//! capacity in bytes, the accuracy matrix and its metrics, small strategies (fine-tune, replay, EWC,
//! LwF), and LifeQuant's 4-bit quantization-aware training with ProxQ and BaLL.
