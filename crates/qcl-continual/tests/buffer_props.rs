//! Property tests of the replay buffers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use qcl_continual::{
    Capacity, ClassBalancedBuffer, Filter, InsertStatus, ItemId, Keep, PerTaskBuffer, ReplayBuffer,
    ReservoirBuffer,
};
use qcl_tensor::Seed;

/// One step of a random workload: offer an item (label, task, size) or remove the `k`-th
/// stored entry.
#[derive(Debug, Clone)]
enum Op {
    Insert(u32, usize, usize),
    Remove(usize),
}

fn ops(max_len: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            6 => (0u32..6, 0usize..4, 0usize..60).prop_map(|(l, t, s)| Op::Insert(l, t, s)),
            1 => any::<usize>().prop_map(Op::Remove),
        ],
        0..max_len,
    )
}

fn capacity() -> impl Strategy<Value = Capacity> {
    (prop::option::of(1usize..30), prop::option::of(60usize..600)).prop_map(|(items, bytes)| {
        Capacity {
            max_items: items,
            max_bytes: bytes,
        }
    })
}

/// Checks every view of the buffer against its entries: bytes, counts, lookup by id, and that
/// filtered sampling of everything finds exactly the matching entries (the group bookkeeping
/// after swap-removes).
fn check_consistent<B: ReplayBuffer<Vec<u8>>>(buffer: &B) -> Result<(), TestCaseError> {
    let entries = buffer.entries();
    prop_assert_eq!(buffer.len(), entries.len());
    prop_assert_eq!(
        buffer.bytes_used(),
        entries.iter().map(|e| e.item.len()).sum::<usize>()
    );
    let mut classes = BTreeMap::new();
    let mut tasks = BTreeMap::new();
    for e in entries {
        *classes.entry(e.label).or_insert(0) += 1;
        *tasks.entry(e.task).or_insert(0) += 1;
        prop_assert_eq!(buffer.get(e.id), Some(e));
    }
    prop_assert_eq!(buffer.class_counts(), &classes);
    prop_assert_eq!(buffer.task_counts(), tasks);
    let mut rng = Seed::new(0).rng();
    for class in 0..6u32 {
        for task in 0..4usize {
            let filter = Filter::classes([class]).with_tasks([task]);
            let drawn: BTreeSet<ItemId> = buffer
                .sample(usize::MAX, &filter, &mut rng)
                .iter()
                .map(|e| e.id)
                .collect();
            let expected: BTreeSet<ItemId> = entries
                .iter()
                .filter(|e| e.label == class && e.task == task)
                .map(|e| e.id)
                .collect();
            prop_assert_eq!(drawn, expected);
        }
    }
    Ok(())
}

/// Runs `ops` on a buffer, checking after each step: within capacity, consistent, ids fresh
/// and never reused, label and task of an id unchanged.
fn run_ops<B: ReplayBuffer<Vec<u8>>>(buffer: &mut B, ops: &[Op]) -> Result<(), TestCaseError> {
    let cap = buffer.capacity();
    let mut given: HashMap<ItemId, (u32, usize)> = HashMap::new();
    let mut last_id: Option<ItemId> = None;
    for op in ops {
        match *op {
            Op::Insert(label, task, size) => {
                let result = buffer.insert(label, task, vec![label as u8; size]);
                if cap.max_bytes.is_some_and(|m| size > m) {
                    prop_assert!(result.is_err());
                    continue;
                }
                let ins = result.unwrap();
                prop_assert!(last_id.is_none_or(|last| ins.id > last), "ids increase");
                prop_assert!(given.insert(ins.id, (label, task)).is_none(), "id reused");
                last_id = Some(ins.id);
                if ins.status == InsertStatus::Rejected {
                    prop_assert_eq!(ins.evicted.last().map(|e| e.id), Some(ins.id));
                }
                for e in &ins.evicted {
                    prop_assert!(!buffer.contains(e.id));
                }
            }
            Op::Remove(k) => {
                if !buffer.is_empty() {
                    let id = buffer.entries()[k % buffer.len()].id;
                    let removed = buffer.remove(id).unwrap();
                    prop_assert_eq!(removed.id, id);
                    prop_assert!(!buffer.contains(id));
                    prop_assert!(buffer.remove(id).is_none());
                }
            }
        }
        prop_assert!(cap.fits(buffer.len(), buffer.bytes_used()));
        for e in buffer.iter() {
            prop_assert_eq!(given.get(&e.id), Some(&(e.label, e.task)));
        }
        check_consistent(buffer)?;
    }
    Ok(())
}

/// A buffer's entries as (id, label, task, size), and one sample's ids.
type Contents = (Vec<(ItemId, u32, usize, usize)>, Vec<ItemId>);

/// Upper bound for a chi-square statistic with `df` degrees of freedom: the mean plus 6
/// standard deviations plus 10. The statistic below is, if anything, smaller than a
/// chi-square (each count is binomial with variance `E·(1 − k/n)`), so a false alarm has
/// probability well under 1e-6 per case.
fn chi_square_bound(df: usize) -> f64 {
    df as f64 + 6.0 * (2.0 * df as f64).sqrt() + 10.0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// After `n` offers of equal-size items into a reservoir of `k`, item `i` is held with
    /// probability `k / n` for every `i`: chi-square over 1,000 seeded runs, with the capacity
    /// given in items or in bytes.
    #[test]
    fn reservoir_inclusion_probability_is_capacity_over_seen(
        k in 1usize..12, extra in 1usize..50, in_bytes in any::<bool>(), seed in any::<u64>(),
    ) {
        let n = k + extra;
        let runs = 1_000usize;
        let size = 7;
        let cap = if in_bytes { Capacity::bytes(k * size) } else { Capacity::items(k) };
        let mut held = vec![0usize; n];
        for run in 0..runs {
            let mut buffer = ReservoirBuffer::new(cap, Seed::new(seed).child(run as u64)).unwrap();
            for i in 0..n {
                buffer.insert(0, 0, vec![0u8; size]).unwrap();
                prop_assert_eq!(buffer.len(), (i + 1).min(k));
            }
            for e in buffer.iter() {
                held[e.id.0 as usize] += 1;
            }
        }
        let expected = (runs * k) as f64 / n as f64;
        let chi2: f64 = held.iter().map(|&o| (o as f64 - expected).powi(2) / expected).sum();
        prop_assert!(chi2 < chi_square_bound(n - 1), "chi2 {chi2} over {} dof, counts {held:?}", n - 1);
    }
}

proptest! {
    #[test]
    fn reservoir_stays_within_capacity_and_consistent(
        cap in capacity(), ops in ops(120), seed in any::<u64>(),
    ) {
        let mut buffer = ReservoirBuffer::new(cap, Seed::new(seed)).unwrap();
        run_ops(&mut buffer, &ops)?;
    }

    #[test]
    fn class_balanced_stays_within_capacity_and_consistent(
        cap in capacity(), ops in ops(120), seed in any::<u64>(),
    ) {
        let mut buffer = ClassBalancedBuffer::new(cap, Seed::new(seed)).unwrap();
        run_ops(&mut buffer, &ops)?;
    }

    #[test]
    fn per_task_stays_within_capacity_and_consistent(
        cap in capacity(), ops in ops(120), delta in 0.05f64..=1.0, seed in any::<u64>(),
    ) {
        // Tasks must come in runs: sort the inserts by task, keep removals where they are.
        let mut ops = ops;
        let mut tasks: Vec<usize> = ops.iter().filter_map(|o| match o { Op::Insert(_, t, _) => Some(*t), _ => None }).collect();
        tasks.sort_unstable();
        let mut next = tasks.into_iter();
        for op in &mut ops {
            if let Op::Insert(_, t, _) = op {
                *t = next.next().unwrap();
            }
        }
        let mut buffer = PerTaskBuffer::new(cap, Keep::Fraction(delta), Seed::new(seed)).unwrap();
        run_ops(&mut buffer, &ops)?;
        buffer.finish_task().unwrap();
        prop_assert!(cap.fits(buffer.len(), buffer.bytes_used()));
        check_consistent(&buffer)?;
    }

    /// AQM §12.1-2, 10: after every insert the bytes fit, the overshoot left is below one item,
    /// each evicted entry came from a class of maximal count, and a class is emptied only when
    /// no class holds more than one entry.
    #[test]
    fn class_balanced_evicts_from_the_largest_class(
        max_bytes in 60usize..600, items in prop::collection::vec((0u32..5, 1usize..60), 1..150),
        seed in any::<u64>(),
    ) {
        let mut buffer = ClassBalancedBuffer::new(Capacity::bytes(max_bytes), Seed::new(seed)).unwrap();
        let max_size = items.iter().map(|&(_, s)| s).max().unwrap();
        for &(label, size) in &items {
            let mut counts = buffer.class_counts().clone();
            *counts.entry(label).or_insert(0) += 1;
            let ins = buffer.insert(label, 0, vec![0u8; size]).unwrap();
            prop_assert!(buffer.bytes_used() <= max_bytes);
            if !ins.evicted.is_empty() {
                prop_assert!(buffer.bytes_used() + max_size > max_bytes, "evicted more than needed");
            }
            for e in &ins.evicted {
                let max = *counts.values().max().unwrap();
                prop_assert_eq!(counts[&e.label], max, "evicted from a class that was not largest");
                *counts.get_mut(&e.label).unwrap() -= 1;
                if !buffer.class_counts().contains_key(&e.label) {
                    prop_assert!(buffer.class_counts().values().all(|&c| c <= 1));
                }
            }
            counts.retain(|_, c| *c > 0);
            prop_assert_eq!(&counts, buffer.class_counts());
        }
    }

    /// Samples are distinct, admitted by the filter, and as many as asked for or as admitted.
    #[test]
    fn samples_are_distinct_and_admitted(
        items in prop::collection::vec((0u32..6, 0usize..4), 0..200),
        classes in prop::option::of(prop::collection::vec(0u32..7, 0..4)),
        tasks in prop::option::of(prop::collection::vec(0usize..5, 0..3)),
        n in 0usize..80, seed in any::<u64>(),
    ) {
        let mut buffer = ReservoirBuffer::new(Capacity::items(100), Seed::new(seed)).unwrap();
        for &(label, task) in &items {
            buffer.insert(label, task, vec![1u8; 3]).unwrap();
        }
        let filter = Filter { classes, tasks };
        let admitted: Vec<_> = buffer.iter().filter(|e| filter.admits(e.label, e.task)).collect();
        let mut rng = Seed::new(seed).child(1).rng();

        let batch = buffer.sample(n, &filter, &mut rng);
        prop_assert_eq!(batch.len(), n.min(admitted.len()));
        let ids: BTreeSet<ItemId> = batch.iter().map(|e| e.id).collect();
        prop_assert_eq!(ids.len(), batch.len());
        prop_assert!(batch.iter().all(|e| filter.admits(e.label, e.task)));

        let batch = buffer.sample_class_balanced(n, &filter, &mut rng);
        prop_assert!(batch.len() <= n);
        prop_assert!(admitted.is_empty() || n == 0 || !batch.is_empty());
        let ids: BTreeSet<ItemId> = batch.iter().map(|e| e.id).collect();
        prop_assert_eq!(ids.len(), batch.len());
        prop_assert!(batch.iter().all(|e| filter.admits(e.label, e.task)));
        prop_assert!(batch.windows(2).all(|w| w[0].label <= w[1].label), "grouped by class");
    }

    /// The same seed and the same offers give the same contents and the same samples.
    #[test]
    fn same_seed_same_contents(
        cap in capacity(), ops in ops(100), seed in any::<u64>(), balanced in any::<bool>(),
    ) {
        let contents = || -> Contents {
            let mut rng = Seed::new(seed).child(9).rng();
            let (entries, sample) = if balanced {
                let mut b = ClassBalancedBuffer::new(cap, Seed::new(seed)).unwrap();
                for op in &ops {
                    if let Op::Insert(l, t, s) = *op {
                        let _ = b.insert(l, t, vec![0u8; s]);
                    }
                }
                let s = b.sample_class_balanced(10, &Filter::all(), &mut rng).iter().map(|e| e.id).collect();
                (b.iter().map(|e| (e.id, e.label, e.task, e.item.len())).collect(), s)
            } else {
                let mut b = ReservoirBuffer::new(cap, Seed::new(seed)).unwrap();
                for op in &ops {
                    if let Op::Insert(l, t, s) = *op {
                        let _ = b.insert(l, t, vec![0u8; s]);
                    }
                }
                let s = b.sample(10, &Filter::all(), &mut rng).iter().map(|e| e.id).collect();
                (b.iter().map(|e| (e.id, e.label, e.task, e.item.len())).collect(), s)
            };
            (entries, sample)
        };
        prop_assert_eq!(contents(), contents());
    }

    /// Each finished task keeps exactly `round(δ·n)` of its `n` items (unbounded capacity),
    /// distinct and drawn from that task's own items.
    #[test]
    fn per_task_keeps_round_delta_n(
        sizes in prop::collection::vec(0usize..300, 1..5), delta in 0.01f64..=1.0,
        seed in any::<u64>(),
    ) {
        let mut buffer = PerTaskBuffer::new(Capacity::unbounded(), Keep::Fraction(delta), Seed::new(seed)).unwrap();
        let mut offered: Vec<BTreeSet<ItemId>> = Vec::new();
        for (task, &n) in sizes.iter().enumerate() {
            let first = buffer.next_id().0;
            let summary = buffer.add_task(task, (0..n).map(|i| ((i % 3) as u32, vec![0u8; 2]))).unwrap();
            let expected = (delta * n as f64).round() as usize;
            prop_assert_eq!(summary.offered, n);
            prop_assert_eq!(summary.kept.len(), expected);
            offered.push((first..first + n as u64).map(ItemId).collect());
        }
        for (task, ids) in offered.iter().enumerate() {
            let kept: Vec<ItemId> = buffer.iter().filter(|e| e.task == task).map(|e| e.id).collect();
            prop_assert_eq!(kept.len(), (delta * sizes[task] as f64).round() as usize);
            prop_assert!(kept.iter().all(|id| ids.contains(id)));
        }
        check_consistent(&buffer)?;
    }
}
