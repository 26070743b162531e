//! Helpers shared by the integration tests: small memories with two modules of fake codes and
//! the checks of docs/methods/aqm.md § Invariants on them (tests/memory.rs,
//! tests/extensions.rs), and short runs of the online loop on the committed Fashion-MNIST
//! fixture (tests/online.rs, tests/online_options.rs, tests/golden.rs).
#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;

use proptest::prelude::*;
use qcl_aqm::memory::IncomingSample;
use qcl_aqm::online::{Method, OnlineConfig};
use qcl_aqm::{AdaptiveMemory, MemoryConfig, Payload};
use qcl_continual::{ItemId, Scenario, SplitConfig};
use qcl_vq::PackedIndices;

/// 16-byte "images": 128 bits.
pub const IMAGE: usize = 16;
/// Module blocks of the test memories.
pub const MODULES: usize = 2;
/// Indices per stored sample.
pub const PER: usize = 4;

/// Module m (1-based) uses K' = 4 (2 bits) or 8 (3 bits).
pub fn k_of(m: usize) -> usize {
    if m == 1 {
        4
    } else {
        8
    }
}

/// Codes of module `m` (1-based), different for different `seed`s.
pub fn codes(m: usize, seed: u32) -> PackedIndices {
    let k = k_of(m) as u32;
    let v: Vec<u32> = (0..PER as u32).map(|i| (seed + i) % k).collect();
    PackedIndices::pack(&v, &[1, PER], k_of(m)).unwrap()
}

/// A memory of `budget` bytes for [`IMAGE`]-byte images, 1-byte parameters.
pub fn config(budget: u64, seed: u64) -> MemoryConfig {
    MemoryConfig {
        budget_bytes: budget,
        seed: qcl_tensor::Seed::new(seed),
        ..MemoryConfig::per_class(1, 1, IMAGE)
    }
}

/// An incoming sample of `label` whose pixels are all `label`.
pub fn sample(label: u32, task: usize, index: usize) -> IncomingSample {
    IncomingSample {
        label,
        task,
        dataset_index: index,
        pixels: vec![label as u8; IMAGE],
    }
}

/// Invariants 1, 2: budget, exact accounting, overshoot below one item after an eviction.
pub fn check_budget(mem: &AdaptiveMemory, budget: u64, evicted: bool) -> Result<(), TestCaseError> {
    let used = mem.used_bits();
    prop_assert!(used <= mem.capacity_bits());
    let exact: u64 = mem
        .counts_per_block()
        .iter()
        .zip(mem.block_bits())
        .map(|(&n, &b)| n as u64 * b)
        .sum();
    prop_assert_eq!(used, exact);
    prop_assert_eq!(mem.capacity_bits(), 8 * (budget - mem.model_cost_params()));
    if evicted && !mem.is_empty() {
        let max_b = *mem.block_bits().iter().max().unwrap();
        prop_assert!(used + max_b > mem.capacity_bits());
    }
    Ok(())
}

/// Invariants 3, 4: ids in one block only, identity fixed, nothing in unfrozen modules,
/// indices below the module's K'.
pub fn check_identity(
    mem: &AdaptiveMemory,
    identity: &mut BTreeMap<ItemId, (u32, usize)>,
) -> Result<(), TestCaseError> {
    let mut seen = BTreeMap::new();
    for (b, e) in mem.all_entries() {
        prop_assert!(seen.insert(e.id, b).is_none(), "{:?} twice", e.id);
        if let Some(&(y, tk)) = identity.get(&e.id) {
            prop_assert_eq!((y, tk), (e.label, e.task));
        }
        identity.insert(e.id, (e.label, e.task));
        match &e.item.payload {
            Payload::Raw(_) => prop_assert_eq!(b, 0),
            Payload::Codes(p) => {
                prop_assert!(b >= 1 && mem.block_bits()[b] > 0);
                prop_assert!(p.unpack().iter().all(|&i| (i as usize) < k_of(b)));
            }
        }
    }
    Ok(())
}

/// The committed Fashion-MNIST fixture as five class-incremental tasks.
pub fn scenario() -> Scenario {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/fashion-mnist.safetensors"
    );
    let data = qcl_data::SplitDataset::load(path).unwrap();
    Scenario::class_incremental(&data, &SplitConfig::default()).unwrap()
}

/// A short stream (40 images per task) whose module freezes within the first task: fast
/// statistics and a lax threshold; every other option at its default.
pub fn small(method: Method, budget: u64) -> OnlineConfig {
    let mut c = OnlineConfig::fashion_mnist(method, budget);
    c.samples_per_task = Some(40);
    c.test_per_class = Some(10);
    c.record_every = 2;
    c.drift_every = 3;
    c.examples = 4;
    c.stack.layers[0].stat_rate = 0.3;
    c.stack.layers[0].ema_decoder_rate = 0.1;
    c.stack.layers[0].recon_threshold = 1.0;
    c
}

/// Room for about 60 codes once the module of [`small`] froze (36,850 parameters of model
/// cost at one byte, then 6,000 B): the memory fills up and evicts.
pub const TIGHT: u64 = 36_850 + 6_000;
