//! The adaptive memory: docs/methods/aqm.md § The memory and items 1–4, 9–11, 14 of its
//! § Invariants ("invariant N" below).

use std::collections::BTreeMap;

mod common;

use common::{check_budget, check_identity, codes, config, k_of, IMAGE, MODULES, PER};
use proptest::prelude::*;
use qcl_aqm::memory::IncomingSample;
use qcl_aqm::{AdaptiveMemory, MemoryConfig, Payload};
use qcl_continual::ItemId;
use qcl_tensor::Error;
use qcl_vq::PackedIndices;

#[derive(Debug, Clone)]
struct Step {
    labels: Vec<u32>,
    replay: usize,
    ok: Vec<Vec<bool>>,
    freeze: Option<usize>,
    cost_bump: u64,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        prop::collection::vec(0u32..6, 1..8),
        0usize..6,
        prop::collection::vec(prop::collection::vec(any::<bool>(), 14), MODULES),
        prop::option::of(1usize..=MODULES),
        0u64..40,
    )
        .prop_map(|(labels, replay, ok, freeze, cost_bump)| Step {
            labels,
            replay,
            ok,
            freeze,
            cost_bump,
        })
}

/// Runs a random stream and checks every invariant after each step; returns the final contents.
fn run_stream(
    steps: &[Step],
    budget: u64,
    seed: u64,
) -> Result<Vec<(usize, u64, u32, usize)>, TestCaseError> {
    let mut mem = AdaptiveMemory::new(config(budget, seed), MODULES, 10).unwrap();
    let mut identity: BTreeMap<ItemId, (u32, usize)> = BTreeMap::new();
    let mut cost = 10u64;
    for (t, s) in steps.iter().enumerate() {
        let task = t / 3;
        if let Some(m) = s.freeze {
            if mem.block_bits()[m] == 0 {
                mem.set_module_bits(m, (PER as u64) * (k_of(m).trailing_zeros() as u64))
                    .unwrap();
                cost += s.cost_bump;
                if mem.set_model_cost(cost).is_err() {
                    cost -= s.cost_bump;
                }
            }
        }
        let replay = mem.sample(s.replay, task);
        // Invariant 11: replay batch ≤ n, only other tasks, distinct ids.
        prop_assert!(replay.len() <= s.replay);
        prop_assert!(replay.iter().all(|r| r.task != task));
        let mut ids: Vec<ItemId> = replay.iter().map(|r| r.id).collect();
        ids.sort();
        ids.dedup();
        prop_assert_eq!(ids.len(), replay.len());
        let incoming: Vec<IncomingSample> = s
            .labels
            .iter()
            .enumerate()
            .map(|(i, &y)| IncomingSample {
                label: y,
                task,
                dataset_index: i,
                pixels: vec![y as u8; IMAGE],
            })
            .collect();
        let rows = incoming.len() + replay.len();
        let ok: Vec<Vec<bool>> = s.ok.iter().map(|o| o[..rows].to_vec()).collect();
        let code_rows: Vec<Vec<PackedIndices>> = (1..=MODULES)
            .map(|m| (0..rows).map(|r| codes(m, r as u32)).collect())
            .collect();
        let replay_ids: Vec<ItemId> = replay.iter().map(|r| r.id).collect();
        let before: BTreeMap<ItemId, (usize, Payload)> = replay
            .iter()
            .map(|r| (r.id, (r.block, r.sample.payload.clone())))
            .collect();
        let first_new = mem.next_id().0;
        let g_before_evict = {
            let mut g = mem.class_counts();
            for y in &s.labels {
                *g.entry(*y).or_insert(0) += 1;
            }
            g
        };
        let evicted = mem
            .insert(&incoming, &replay_ids, &ok, &code_rows, t as u64)
            .unwrap();
        let evicted_ids: Vec<ItemId> = evicted.iter().map(|e| e.id).collect();

        // Invariant 9: each incoming sample went to the deepest frozen passing module, else raw.
        for row in 0..incoming.len() {
            let id = ItemId(first_new + row as u64);
            let expected = (1..=MODULES)
                .rev()
                .find(|&m| mem.block_bits()[m] > 0 && ok[m - 1][row])
                .unwrap_or(0);
            match mem.locate(id) {
                Some((b, e)) => {
                    prop_assert_eq!(b, expected);
                    prop_assert_eq!(e.label, incoming[row].label);
                }
                None => prop_assert!(evicted_ids.contains(&id)),
            }
        }
        // Replayed raw samples that pass move to codes; compressed ones are untouched.
        for (j, id) in replay_ids.iter().enumerate() {
            let row = incoming.len() + j;
            let (old_block, old_payload) = &before[id];
            let now = mem.locate(*id);
            if evicted_ids.contains(id) {
                prop_assert!(now.is_none());
                continue;
            }
            let (b, e) = now.unwrap();
            if *old_block >= 1 {
                prop_assert_eq!(b, *old_block);
                prop_assert_eq!(&e.item.payload, old_payload);
            } else {
                let expected = (1..=MODULES)
                    .rev()
                    .find(|&m| mem.block_bits()[m] > 0 && ok[m - 1][row])
                    .unwrap_or(0);
                prop_assert_eq!(b, expected);
            }
        }
        // Invariant 10: every evicted sample was of a class with maximal global count at the
        // time.
        let mut g = g_before_evict;
        for e in &evicted {
            let max = *g.values().max().unwrap();
            prop_assert_eq!(
                g[&e.label],
                max,
                "evicted class {} with count {} < max {}",
                e.label,
                g[&e.label],
                max
            );
            *g.get_mut(&e.label).unwrap() -= 1;
        }
        check_budget(&mem, budget, !evicted.is_empty())?;
        check_identity(&mem, &mut identity)?;
    }
    Ok(mem
        .all_entries()
        .into_iter()
        .map(|(b, e)| (b, e.id.0, e.label, e.task))
        .collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn invariants_hold_over_random_streams(steps in prop::collection::vec(step_strategy(), 1..40), budget in 40u64..400) {
        run_stream(&steps, budget, 3)?;
    }

    /// Invariant 14: the same seed gives the same memory.
    #[test]
    fn same_seed_same_memory(steps in prop::collection::vec(step_strategy(), 1..20)) {
        let a = run_stream(&steps, 200, 9)?;
        let b = run_stream(&steps, 200, 9)?;
        prop_assert_eq!(a, b);
    }
}

#[test]
fn a_class_is_not_emptied_while_another_holds_more_than_one() {
    let mut mem = AdaptiveMemory::new(config(10 * IMAGE as u64, 1), 0, 0).unwrap();
    // 30 samples of class 0, then one of class 1: the single class-1 sample survives.
    for i in 0..30 {
        let s = IncomingSample {
            label: 0,
            task: 0,
            dataset_index: i,
            pixels: vec![0; IMAGE],
        };
        mem.insert(&[s], &[], &[], &[], i as u64).unwrap();
    }
    let s = IncomingSample {
        label: 1,
        task: 0,
        dataset_index: 99,
        pixels: vec![1; IMAGE],
    };
    mem.insert(&[s], &[], &[], &[], 31).unwrap();
    let g = mem.class_counts();
    assert_eq!((g[&0], g[&1]), (9, 1));
}

#[test]
fn eviction_takes_raw_before_codes_within_a_class() {
    let mut mem = AdaptiveMemory::new(config(4 * IMAGE as u64, 1), 1, 0).unwrap();
    for i in 0..4 {
        let s = IncomingSample {
            label: 0,
            task: 0,
            dataset_index: i,
            pixels: vec![0; IMAGE],
        };
        mem.insert(&[s], &[], &[], &[], 0).unwrap();
    }
    mem.set_module_bits(1, 8).unwrap();
    let s = IncomingSample {
        label: 0,
        task: 0,
        dataset_index: 9,
        pixels: vec![0; IMAGE],
    };
    let c = PackedIndices::pack(&[1, 2, 3, 0], &[1, 4], 4).unwrap();
    let evicted = mem.insert(&[s], &[], &[vec![true]], &[vec![c]], 1).unwrap();
    assert_eq!(evicted.len(), 1);
    assert!(matches!(evicted[0].item.payload, Payload::Raw(_)));
    assert_eq!(mem.counts_per_block(), vec![3, 1]);
}

#[test]
fn replay_is_balanced_over_eligible_classes() {
    let mut mem = AdaptiveMemory::new(config(100_000, 5), 0, 0).unwrap();
    // Class 0 has 90 samples, class 1 has 10, class 2 is of the current task.
    for (y, n, task) in [(0u32, 90, 0usize), (1, 10, 0), (2, 50, 1)] {
        for i in 0..n {
            let s = IncomingSample {
                label: y,
                task,
                dataset_index: i,
                pixels: vec![0; IMAGE],
            };
            mem.insert(&[s], &[], &[], &[], 0).unwrap();
        }
    }
    let mut hist = [0usize; 3];
    for _ in 0..400 {
        for r in mem.sample(10, 1) {
            hist[r.label as usize] += 1;
        }
    }
    assert_eq!(hist[2], 0);
    // Uniform over the 2 eligible classes despite the 9:1 imbalance (±15 %).
    let ratio = hist[0] as f64 / hist[1] as f64;
    assert!((0.85..1.18).contains(&ratio), "{hist:?}");
}

#[test]
fn budget_errors_are_typed() {
    assert!(matches!(
        AdaptiveMemory::new(config(1000, 0), 1, 1000),
        Err(Error::InvalidParameter { .. })
    ));
    let four = MemoryConfig {
        param_bytes: 4,
        ..config(1000, 0)
    };
    assert!(matches!(
        AdaptiveMemory::new(four, 1, 300),
        Err(Error::InvalidParameter { .. })
    ));
    let mut mem = AdaptiveMemory::new(config(1000, 0), 1, 100).unwrap();
    assert!(matches!(
        mem.set_model_cost(1000),
        Err(Error::InvalidParameter { .. })
    ));
    assert_eq!(
        mem.model_cost_params(),
        100,
        "a refused cost changes nothing"
    );
    // Codes of the wrong cost for a block are refused.
    mem.set_module_bits(1, 8).unwrap();
    let s = IncomingSample {
        label: 0,
        task: 0,
        dataset_index: 0,
        pixels: vec![0; IMAGE],
    };
    let c = PackedIndices::pack(&[1, 2, 3, 7, 1], &[1, 5], 8).unwrap();
    assert!(mem.insert(&[s], &[], &[vec![true]], &[vec![c]], 0).is_err());
}

#[test]
fn a_replayed_sample_evicted_before_insertion_is_skipped() {
    // A freeze raises the model cost between drawing the replay batch and inserting.
    let mut mem = AdaptiveMemory::new(config(4 * IMAGE as u64 + 10, 2), 1, 10).unwrap();
    for i in 0..4 {
        let s = IncomingSample {
            label: i as u32,
            task: 0,
            dataset_index: i,
            pixels: vec![0; IMAGE],
        };
        mem.insert(&[s], &[], &[], &[], 0).unwrap();
    }
    let replay = mem.sample(40, 1); // one sample per class: all four come back
    assert_eq!(replay.len(), 4);
    mem.set_module_bits(1, 8).unwrap();
    let evicted = mem.set_model_cost(10 + 2 * IMAGE as u64).unwrap();
    assert_eq!(evicted.len(), 2);
    let ids: Vec<ItemId> = replay.iter().map(|r| r.id).collect();
    let c = PackedIndices::pack(&[1, 2, 3, 0], &[1, 4], 4).unwrap();
    mem.insert(&[], &ids, &[vec![true; 4]], &[vec![c; 4]], 1)
        .unwrap();
    assert_eq!(mem.counts_per_block(), vec![0, 2]);
}
