//! The memory's extensions (docs/methods/aqm.md § Extensions): reservoir insertion and
//! re-encoding of replayed codes. Items 1–4, 9 and 10 of docs/methods/aqm.md § Invariants
//! ("invariant N") under each option, as they read there: an admitted incoming sample goes to
//! the deepest frozen module it passes, else raw; under re-encoding a replayed code moves to the
//! deepest passing module if deeper, else takes its fresh indices; class-balanced eviction
//! (invariant 10) holds without reservoir insertion, which frees space uniformly instead.

use std::collections::BTreeMap;

mod common;

use candle_core::{Device, Tensor};
use common::{check_budget, check_identity, codes, config, k_of, sample, MODULES, PER};
use proptest::prelude::*;
use qcl_aqm::memory::IncomingSample;
use qcl_aqm::{state, AdaptiveMemory, InsertionRule, MemoryConfig, Payload, QStack, StackConfig};
use qcl_continual::ItemId;
use qcl_tensor::Error;
use qcl_vq::PackedIndices;

#[derive(Debug, Clone)]
struct Step {
    labels: Vec<u32>,
    replay: usize,
    ok: Vec<Vec<bool>>,
    ok_eps: Vec<Vec<bool>>,
    freeze: Option<usize>,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let decisions = || prop::collection::vec(prop::collection::vec(any::<bool>(), 14), MODULES);
    (
        prop::collection::vec(0u32..6, 1..8),
        0usize..6,
        decisions(),
        decisions(),
        prop::option::of(1usize..=MODULES),
    )
        .prop_map(|(labels, replay, ok, ok_eps, freeze)| Step {
            labels,
            replay,
            ok,
            ok_eps,
            freeze,
        })
}

/// The deepest frozen module whose decision for `row` passes (0: none).
fn deepest(mem: &AdaptiveMemory, ok: &[Vec<bool>], row: usize) -> usize {
    (1..=MODULES)
        .rev()
        .find(|&m| mem.block_bits()[m] > 0 && ok[m - 1][row])
        .unwrap_or(0)
}

/// What one step's re-encoding must have done to each replayed row.
fn check_reencoding(
    mem: &AdaptiveMemory,
    before: &BTreeMap<ItemId, (usize, Payload)>,
    ids: &[ItemId],
    (ok_eps, fresh): (&[Vec<bool>], &[Vec<PackedIndices>]),
) -> Result<(), TestCaseError> {
    for (row, id) in ids.iter().enumerate() {
        let (old_block, old_payload) = &before[id];
        let (b, e) = mem.locate(*id).unwrap();
        if *old_block == 0 {
            prop_assert_eq!(b, 0);
            prop_assert_eq!(&e.item.payload, old_payload);
            continue;
        }
        // Invariant 9 under re-encoding: deepest passing module if deeper, else stays; either
        // way the row's fresh indices.
        let target = deepest(mem, ok_eps, row).max(*old_block);
        prop_assert_eq!(b, target);
        prop_assert_eq!(&e.item.payload, &Payload::Codes(fresh[b - 1][row].clone()));
    }
    Ok(())
}

/// A random stream under the given options, checking the invariants after each step.
fn run_stream(
    steps: &[Step],
    budget: u64,
    (reservoir, reencode): (bool, bool),
) -> Result<Vec<(usize, u64, u32)>, TestCaseError> {
    let mut mem = AdaptiveMemory::new(config(budget, 5), MODULES, 10).unwrap();
    if reservoir {
        mem.set_insertion(InsertionRule::Reservoir);
    }
    let mut identity = BTreeMap::new();
    let (mut seen, mut admitted) = (0u64, 0u64);
    for (t, s) in steps.iter().enumerate() {
        let task = t / 3;
        if let Some(m) = s.freeze {
            if mem.block_bits()[m] == 0 {
                let bits = (PER as u64) * (k_of(m).trailing_zeros() as u64);
                mem.set_module_bits(m, bits).unwrap();
            }
        }
        let replay = mem.sample(s.replay, task);
        let ids: Vec<ItemId> = replay.iter().map(|r| r.id).collect();
        let before: BTreeMap<ItemId, (usize, Payload)> = replay
            .iter()
            .map(|r| (r.id, (r.block, r.sample.payload.clone())))
            .collect();
        if reencode {
            let ok_eps: Vec<Vec<bool>> = s.ok_eps.iter().map(|o| o[..ids.len()].to_vec()).collect();
            let fresh: Vec<Vec<PackedIndices>> = (1..=MODULES)
                .map(|m| {
                    (0..ids.len())
                        .map(|r| codes(m, 97 + (t + r) as u32))
                        .collect()
                })
                .collect();
            let done = mem.reencode(&ids, &ok_eps, &fresh, t as u64).unwrap();
            let compressed = replay.iter().filter(|r| r.block > 0).count() as u64;
            prop_assert_eq!(done.moved + done.refreshed, compressed);
            check_reencoding(&mem, &before, &ids, (&ok_eps, &fresh))?;
        }
        let after_reencoding: BTreeMap<ItemId, (usize, Payload)> = ids
            .iter()
            .map(|&id| {
                let (b, e) = mem.locate(id).unwrap();
                (id, (b, e.item.payload.clone()))
            })
            .collect();
        let incoming: Vec<IncomingSample> = s
            .labels
            .iter()
            .enumerate()
            .map(|(i, &y)| sample(y, task, i))
            .collect();
        let rows = incoming.len() + ids.len();
        let ok: Vec<Vec<bool>> = s.ok.iter().map(|o| o[..rows].to_vec()).collect();
        let code_rows: Vec<Vec<PackedIndices>> = (1..=MODULES)
            .map(|m| (0..rows).map(|r| codes(m, r as u32)).collect())
            .collect();
        let first_new = mem.next_id().0;
        let mut g = mem.class_counts();
        let evicted = mem
            .insert(&incoming, &ids, &ok, &code_rows, t as u64)
            .unwrap();
        let evicted_ids: Vec<ItemId> = evicted.iter().map(|e| e.id).collect();
        // Invariant 9: admitted incoming samples at the deepest passing module, else raw.
        seen += incoming.len() as u64;
        for (row, arrived) in incoming.iter().enumerate() {
            let id = ItemId(first_new + row as u64);
            match mem.locate(id) {
                Some((b, _)) => {
                    prop_assert_eq!(b, deepest(&mem, &ok, row));
                    admitted += 1;
                }
                None if evicted_ids.contains(&id) => {
                    // Reservoir freeing spares this batch's samples while older ones remain.
                    let older_left = mem.all_entries().iter().any(|(_, e)| e.id.0 < first_new);
                    prop_assert!(
                        !reservoir || !older_left,
                        "{id:?} evicted before older ones"
                    );
                    admitted += 1;
                }
                None => prop_assert!(reservoir, "{id:?} turned away without reservoir"),
            }
            if mem.locate(id).is_some() || evicted_ids.contains(&id) {
                *g.entry(arrived.label).or_insert(0) += 1;
            }
        }
        prop_assert_eq!((mem.seen(), mem.admitted()), (seen, admitted));
        // Replayed raw rows that pass move to codes; codes are left as re-encoding left them.
        for (j, id) in ids.iter().enumerate() {
            if evicted_ids.contains(id) {
                continue;
            }
            let (old_block, old_payload) = &after_reencoding[id];
            let (b, e) = mem.locate(*id).unwrap();
            if *old_block >= 1 {
                prop_assert_eq!((b, &e.item.payload), (*old_block, old_payload));
            } else {
                prop_assert_eq!(b, deepest(&mem, &ok, incoming.len() + j));
            }
        }
        // Invariant 10 holds for class-balanced eviction only.
        if !reservoir {
            for e in &evicted {
                let max = *g.values().max().unwrap();
                prop_assert_eq!(g[&e.label], max);
                *g.get_mut(&e.label).unwrap() -= 1;
            }
        }
        check_budget(&mem, budget, !evicted.is_empty())?;
        check_identity(&mem, &mut identity)?;
    }
    Ok(mem
        .all_entries()
        .into_iter()
        .map(|(b, e)| (b, e.id.0, e.label))
        .collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn invariants_hold_under_reservoir_insertion(
        steps in prop::collection::vec(step_strategy(), 1..40),
        budget in 40u64..400,
    ) {
        run_stream(&steps, budget, (true, false))?;
    }

    #[test]
    fn invariants_hold_under_reencoding(
        steps in prop::collection::vec(step_strategy(), 1..40),
        budget in 40u64..400,
    ) {
        run_stream(&steps, budget, (false, true))?;
    }

    #[test]
    fn invariants_hold_under_both_and_the_seed_fixes_the_memory(
        steps in prop::collection::vec(step_strategy(), 1..30),
        budget in 40u64..400,
    ) {
        let a = run_stream(&steps, budget, (true, true))?;
        let b = run_stream(&steps, budget, (true, true))?;
        prop_assert_eq!(a, b);
    }
}

/// A re-encoded sample holds the current encoder's codes of its decoded image, and a module
/// deeper than its own takes it when that module passes.
#[test]
fn reencoded_codes_are_the_current_encoders() {
    let device = Device::Cpu;
    let mut stack = QStack::new(StackConfig::fashion_mnist(), 4.into(), &device).unwrap();
    let x = Tensor::rand(-1f32, 1f32, (6, 1, 28, 28), &device).unwrap();
    stack.train_step(&x, 0).unwrap();
    stack.layers_mut()[0].freeze().unwrap();
    let layer = &stack.layers()[0];
    let (bits, [n, h, w]) = (layer.bits_per_sample(), layer.index_shape());
    let pack = |stack: &QStack, t: &Tensor, row: usize| {
        stack.layers()[0].pack_codes(t).unwrap().swap_remove(row)
    };
    let budget = stack.model_cost_params() as u64 + 100_000;
    let mut mem = AdaptiveMemory::new(
        MemoryConfig {
            budget_bytes: budget,
            ..MemoryConfig::per_class(1, 1, 784)
        },
        1,
        stack.model_cost_params() as u64,
    )
    .unwrap();
    mem.set_module_bits(1, bits).unwrap();
    let step = stack.train_step(&x, 0).unwrap();
    let stored = pack(&stack, &step.outputs[0].indices, 0);
    let s = IncomingSample {
        label: 3,
        task: 0,
        dataset_index: 0,
        pixels: vec![0; 784],
    };
    mem.insert(&[s], &[], &[vec![true]], &[vec![stored.clone()]], 0)
        .unwrap();
    // The encoder moves on.
    for _ in 0..8 {
        stack.train_step(&x, 0).unwrap();
    }
    let item = mem.sample(1, 1).remove(0);
    let Payload::Codes(old) = &item.sample.payload else {
        panic!("stored as codes")
    };
    let old_idx = Tensor::from_vec(old.unpack(), (1, n, h, w), &device).unwrap();
    let decoded = stack.decode_codes(1, &old_idx).unwrap();
    let (outs, _) = stack.forward(&decoded, false).unwrap();
    let fresh = pack(&stack, &outs[0].indices, 0);
    assert_ne!(
        fresh, stored,
        "the encoder changed: the test can tell a refresh apart"
    );
    let done = mem
        .reencode(&[item.id], &[vec![false]], &[vec![fresh.clone()]], 9)
        .unwrap();
    assert_eq!((done.moved, done.refreshed), (0, 1));
    let (b, e) = mem.locate(item.id).unwrap();
    assert_eq!((b, e.label, e.task, e.item.step), (1, 3, 0, 0));
    assert_eq!(e.item.payload, Payload::Codes(fresh));
    assert_eq!(mem.used_bits(), bits);

    // Two frozen modules: a code of module 1 that module 2 reconstructs moves there.
    let mut two = AdaptiveMemory::new(config(400, 3), MODULES, 0).unwrap();
    two.set_module_bits(1, 8).unwrap();
    two.set_module_bits(2, 12).unwrap();
    two.insert(
        &[sample(1, 0, 5)],
        &[],
        &[vec![true], vec![false]],
        &[vec![codes(1, 0)], vec![codes(2, 0)]],
        0,
    )
    .unwrap();
    let id = two.block(1)[0].id;
    let before = two.used_bits();
    let done = two
        .reencode(
            &[id],
            &[vec![true], vec![true]],
            &[vec![codes(1, 1)], vec![codes(2, 5)]],
            4,
        )
        .unwrap();
    assert_eq!((done.moved, done.refreshed), (1, 0));
    let (b, e) = two.locate(id).unwrap();
    assert_eq!((b, e.item.step, e.item.dataset_index), (2, 4, 5));
    assert_eq!(e.item.payload, Payload::Codes(codes(2, 5)));
    assert_eq!(two.used_bits(), before - 8 + 12);
    // Never shallower: a module-2 code whose only pass is module 1 is refreshed in place.
    let done = two
        .reencode(
            &[id],
            &[vec![true], vec![false]],
            &[vec![codes(1, 2)], vec![codes(2, 6)]],
            5,
        )
        .unwrap();
    assert_eq!((done.moved, done.refreshed), (0, 1));
    assert_eq!(
        two.locate(id).unwrap().1.item.payload,
        Payload::Codes(codes(2, 6))
    );
}

#[test]
fn reencoding_bad_decisions_are_typed_errors() {
    let mut mem = AdaptiveMemory::new(config(400, 3), MODULES, 0).unwrap();
    mem.set_module_bits(1, 8).unwrap();
    mem.insert(
        &[sample(1, 0, 0)],
        &[],
        &[vec![true], vec![]],
        &[vec![codes(1, 0)], vec![]],
        0,
    )
    .unwrap();
    let id = mem.block(1)[0].id;
    // Too few rows, missing module, codes of the wrong cost.
    assert!(matches!(
        mem.reencode(&[id], &[vec![], vec![]], &[vec![], vec![]], 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        mem.reencode(&[id], &[vec![true]], &[vec![codes(1, 0)]], 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        mem.reencode(
            &[id],
            &[vec![true], vec![]],
            &[vec![codes(2, 0)], vec![]],
            1
        ),
        Err(Error::InvalidParameter { .. })
    ));
    // Nothing changed; an id that is gone is skipped.
    assert_eq!(
        mem.locate(id).unwrap().1.item.payload,
        Payload::Codes(codes(1, 0))
    );
    let done = mem
        .reencode(
            &[ItemId(999)],
            &[vec![true], vec![]],
            &[vec![codes(1, 3)], vec![]],
            1,
        )
        .unwrap();
    assert_eq!((done.moved, done.refreshed), (0, 0));
}

/// The insertion rule and its counters survive a save and load; a file whose counters
/// contradict each other is a typed error.
#[test]
fn the_insertion_rule_is_saved_and_restored() {
    let device = Device::Cpu;
    let stack = QStack::new(StackConfig::fashion_mnist(), 1.into(), &device).unwrap();
    let cost = stack.model_cost_params() as u64;
    let config = MemoryConfig {
        budget_bytes: cost + 784 * 3,
        ..MemoryConfig::per_class(1, 1, 784)
    };
    let mut memory = AdaptiveMemory::new(config, 1, cost).unwrap();
    memory.set_insertion(InsertionRule::Reservoir);
    for i in 0..30 {
        let s = IncomingSample {
            label: (i % 2) as u32,
            task: 0,
            dataset_index: i,
            pixels: vec![i as u8; 784],
        };
        memory.insert(&[s], &[], &[], &[], i as u64).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aqm.safetensors");
    state::save(&path, &stack, 1.into(), &memory).unwrap();
    let (_, back) = state::load(&path, &device).unwrap();
    assert_eq!(back.insertion(), InsertionRule::Reservoir);
    assert_eq!(
        (back.seen(), back.admitted()),
        (memory.seen(), memory.admitted())
    );
    assert!(back.admitted() < 30);
    // Counters that contradict each other.
    let file = qcl_tensor::SafetensorsFile::open(&path).unwrap();
    let mut meta = file.metadata().clone();
    meta.insert("insertion".into(), r#"["reservoir", 3, 9]"#.into());
    let tensors: Vec<(String, Tensor)> = file
        .names()
        .iter()
        .map(|n| (n.clone(), file.tensor(n, &device).unwrap()))
        .collect();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bad = dir.path().join("bad.safetensors");
    qcl_tensor::write_safetensors(&bad, &refs, &meta).unwrap();
    assert!(matches!(
        state::load(&bad, &device),
        Err(Error::BadFile { .. })
    ));
    // A file without the entry (written before the extensions) loads with the reference rule.
    meta.remove("insertion");
    qcl_tensor::write_safetensors(&bad, &refs, &meta).unwrap();
    let (_, old) = state::load(&bad, &device).unwrap();
    assert_eq!((old.insertion(), old.seen()), (InsertionRule::Every, 0));
}
