//! Unit tests of the replay buffers: typed errors, the documented rules, exact figures.

use qcl_continual::{
    BufferItem, Capacity, ClassBalancedBuffer, Filter, InsertStatus, ItemId, Keep, PerTaskBuffer,
    RawImage, ReplayBuffer, ReservoirBuffer,
};
use qcl_tensor::{Error, Seed};

fn is_invalid<T: std::fmt::Debug>(result: qcl_tensor::Result<T>, name: &str) -> bool {
    matches!(result, Err(Error::InvalidParameter { name: ref n, .. }) if n == name)
}

#[test]
fn zero_capacity_is_refused_by_every_buffer() {
    for cap in [Capacity::items(0), Capacity::bytes(0), Capacity::new(5, 0)] {
        assert!(ReservoirBuffer::<Vec<u8>>::new(cap, Seed::new(0)).is_err());
        assert!(ClassBalancedBuffer::<Vec<u8>>::new(cap, Seed::new(0)).is_err());
        assert!(PerTaskBuffer::<Vec<u8>>::new(cap, Keep::Count(1), Seed::new(0)).is_err());
    }
    let mut buffer = ReservoirBuffer::<Vec<u8>>::new(Capacity::items(3), Seed::new(0)).unwrap();
    assert!(is_invalid(
        buffer.set_capacity(Capacity::items(0)),
        "capacity.max_items"
    ));
    assert_eq!(buffer.capacity(), Capacity::items(3));
}

#[test]
fn an_item_larger_than_the_byte_capacity_is_a_typed_error_and_changes_nothing() {
    let cap = Capacity::bytes(100);
    let mut reservoir = ReservoirBuffer::new(cap, Seed::new(1)).unwrap();
    let mut balanced = ClassBalancedBuffer::new(cap, Seed::new(1)).unwrap();
    let mut per_task = PerTaskBuffer::new(cap, Keep::Count(3), Seed::new(1)).unwrap();
    reservoir.insert(0, 0, vec![0u8; 100]).unwrap();
    balanced.insert(0, 0, vec![0u8; 100]).unwrap();
    per_task.insert(0, 0, vec![0u8; 100]).unwrap();
    let err = reservoir.insert(1, 0, vec![0u8; 101]).unwrap_err();
    assert!(
        err.to_string()
            .contains("a buffer capacity smaller than one item"),
        "{err}"
    );
    assert!(is_invalid(balanced.insert(1, 0, vec![0u8; 101]), "item"));
    assert!(is_invalid(per_task.insert(1, 0, vec![0u8; 101]), "item"));
    assert_eq!(
        (reservoir.len(), reservoir.seen(), reservoir.next_id()),
        (1, 1, ItemId(1))
    );
    assert_eq!((balanced.len(), balanced.next_id()), (1, ItemId(1)));
    assert_eq!(per_task.pending_len(), 1);
}

#[test]
fn delta_outside_zero_one_and_a_zero_count_are_refused() {
    for delta in [0.0, -0.1, 1.0 + 1e-9, 2.0, f64::NAN, f64::INFINITY] {
        let result = PerTaskBuffer::<Vec<u8>>::new(
            Capacity::unbounded(),
            Keep::Fraction(delta),
            Seed::new(0),
        );
        assert!(is_invalid(result, "delta"), "δ = {delta}");
    }
    assert!(PerTaskBuffer::<Vec<u8>>::new(
        Capacity::unbounded(),
        Keep::Fraction(1.0),
        Seed::new(0)
    )
    .is_ok());
    assert!(is_invalid(
        PerTaskBuffer::<Vec<u8>>::new(Capacity::unbounded(), Keep::Count(0), Seed::new(0)),
        "count"
    ));
}

#[test]
fn duplicate_ids_are_refused_and_fresh_ids_stay_above_given_ones() {
    let mut buffer = ClassBalancedBuffer::new(Capacity::items(10), Seed::new(2)).unwrap();
    buffer.insert_with_id(ItemId(41), 3, 1, vec![1u8]).unwrap();
    assert!(is_invalid(
        buffer.insert_with_id(ItemId(41), 3, 1, vec![1u8]),
        "id"
    ));
    assert!(is_invalid(
        buffer.insert_with_id(ItemId(u64::MAX), 3, 1, vec![1u8]),
        "id"
    ));
    assert_eq!(buffer.insert(0, 0, vec![2u8]).unwrap().id, ItemId(42));
    // A removed id is not handed out again.
    buffer.remove(ItemId(42)).unwrap();
    assert_eq!(buffer.insert(0, 0, vec![2u8]).unwrap().id, ItemId(43));

    let mut per_task =
        PerTaskBuffer::new(Capacity::unbounded(), Keep::Count(5), Seed::new(0)).unwrap();
    per_task.insert_with_id(ItemId(7), 0, 0, vec![0u8]).unwrap();
    assert!(is_invalid(
        per_task.insert_with_id(ItemId(7), 0, 0, vec![0u8]),
        "id"
    ));
}

#[test]
fn moving_an_item_between_buffers_keeps_its_id_label_and_task() {
    let mut raw = ClassBalancedBuffer::new(Capacity::bytes(1_000), Seed::new(0)).unwrap();
    let mut codes = ClassBalancedBuffer::new(Capacity::bytes(1_000), Seed::new(0)).unwrap();
    let id = raw.insert(4, 2, vec![9u8; 784]).unwrap().id;
    let entry = raw.remove(id).unwrap();
    codes
        .insert_with_id(entry.id, entry.label, entry.task, vec![0u8; 98])
        .unwrap();
    let moved = codes.get(id).unwrap();
    assert_eq!(
        (moved.label, moved.task, moved.item.size_bytes()),
        (4, 2, 98)
    );
    assert!(raw.is_empty() && raw.bytes_used() == 0);
}

#[test]
fn reservoir_fills_first_then_replaces_and_reports_every_removal() {
    let mut buffer = ReservoirBuffer::new(Capacity::items(5), Seed::new(3)).unwrap();
    for i in 0..5u32 {
        let ins = buffer.insert(i, 0, vec![i as u8]).unwrap();
        assert_eq!(
            (ins.id, ins.status),
            (ItemId(i as u64), InsertStatus::Stored)
        );
        assert!(ins.evicted.is_empty());
    }
    let (mut stored, mut rejected) = (0, 0);
    for i in 5..1_000u32 {
        let ins = buffer.insert(i % 7, 0, vec![0u8]).unwrap();
        match ins.status {
            InsertStatus::Stored => {
                stored += 1;
                assert_eq!(ins.evicted.len(), 1);
                assert!(buffer.contains(ins.id));
            }
            InsertStatus::Rejected => {
                rejected += 1;
                assert_eq!(ins.evicted.len(), 1);
                assert_eq!(ins.evicted[0].id, ins.id);
                assert!(!buffer.contains(ins.id));
            }
            InsertStatus::Pending => panic!("a reservoir has no pending items"),
        }
        assert_eq!(buffer.len(), 5);
    }
    // Expected number of replacements: Σ_{n=6}^{1000} 5/n ≈ 5·ln(1000/5.5) ≈ 26.
    assert!((10..60).contains(&stored), "{stored} replacements");
    assert_eq!(stored + rejected, 995);
    assert_eq!(buffer.seen(), 1_000);
}

#[test]
fn reservoir_with_varying_sizes_evicts_until_the_new_item_fits() {
    let mut buffer = ReservoirBuffer::new(Capacity::bytes(100), Seed::new(4)).unwrap();
    for _ in 0..10 {
        buffer.insert(0, 0, vec![0u8; 10]).unwrap();
    }
    // A 95-byte item that wins its coin needs nine more 10-byte evictions.
    let mut seen_big = false;
    for _ in 0..200 {
        let ins = buffer.insert(1, 0, vec![0u8; 95]).unwrap();
        assert!(buffer.bytes_used() <= 100);
        if ins.status == InsertStatus::Stored && !seen_big {
            seen_big = true;
            assert_eq!(ins.evicted.len(), 10);
            assert_eq!(buffer.len(), 1);
        }
    }
    assert!(seen_big);
}

#[test]
fn set_capacity_shrinks_by_the_buffers_rule() {
    let mut buffer = ClassBalancedBuffer::new(Capacity::items(30), Seed::new(5)).unwrap();
    for i in 0..30u32 {
        buffer
            .insert(if i < 20 { 0 } else { 1 }, 0, vec![0u8; 2])
            .unwrap();
    }
    // 15 evictions: ten from class 0 until it levels with class 1, then five split between them.
    let evicted = buffer.set_capacity(Capacity::bytes(30)).unwrap();
    assert_eq!(evicted.len(), 15);
    assert!(evicted[..10].iter().all(|e| e.label == 0));
    let (a, b) = (buffer.class_counts()[&0], buffer.class_counts()[&1]);
    assert_eq!(a + b, 15);
    assert!(a.abs_diff(b) <= 1, "{a} vs {b}");
    assert_eq!(buffer.bytes_used(), 30);

    let mut reservoir = ReservoirBuffer::new(Capacity::items(30), Seed::new(5)).unwrap();
    reservoir
        .extend((0..30).map(|i| (i, 0, vec![0u8])))
        .unwrap();
    assert_eq!(
        reservoir.set_capacity(Capacity::items(12)).unwrap().len(),
        18
    );
    assert_eq!(reservoir.len(), 12);
}

#[test]
fn class_balanced_rejects_the_new_item_when_its_class_is_the_largest() {
    let mut buffer = ClassBalancedBuffer::new(Capacity::items(4), Seed::new(6)).unwrap();
    buffer
        .extend([
            (0, 0, vec![0u8]),
            (1, 0, vec![0u8]),
            (2, 0, vec![0u8]),
            (3, 0, vec![0u8]),
        ])
        .unwrap();
    // Class 0 now has 2 and every other class 1: the eviction must come from class 0, and may
    // be the new item itself.
    for _ in 0..20 {
        let ins = buffer.insert(0, 0, vec![0u8]).unwrap();
        assert_eq!(ins.evicted.len(), 1);
        assert_eq!(ins.evicted[0].label, 0);
        if ins.status == InsertStatus::Rejected {
            assert_eq!(ins.evicted[0].id, ins.id);
        }
        assert_eq!(
            buffer.class_counts().values().copied().collect::<Vec<_>>(),
            [1, 1, 1, 1]
        );
    }
}

#[test]
fn aqm_b50_budget_holds_500_raw_images_then_more_codes() {
    // Fashion-MNIST B50: 392,000 bytes hold 500 raw images of 784 bytes, or ~4,000 codes of 98.
    let mut buffer = ClassBalancedBuffer::new(Capacity::bytes(392_000), Seed::new(7)).unwrap();
    for i in 0..1_000u32 {
        buffer
            .insert(i % 10, (i / 200) as usize, RawImage::new(vec![0; 784]))
            .unwrap();
    }
    assert_eq!(buffer.len(), 500);
    assert_eq!(buffer.bytes_used(), 392_000);
    assert!(buffer.class_counts().values().all(|&c| c == 50));
    let mut codes = ClassBalancedBuffer::new(Capacity::bytes(392_000), Seed::new(7)).unwrap();
    for i in 0..10_000u32 {
        codes.insert(i % 10, 0, vec![0u8; 98]).unwrap();
    }
    assert_eq!(codes.len(), 4_000);
}

#[test]
fn sampling_more_than_available_clamps_and_nothing_admitted_gives_an_empty_batch() {
    let mut buffer = ReservoirBuffer::new(Capacity::items(100), Seed::new(8)).unwrap();
    buffer
        .extend((0..10).map(|i| (i % 2, (i / 5) as usize, vec![0u8])))
        .unwrap();
    let mut rng = Seed::new(0).rng();
    assert_eq!(buffer.sample(50, &Filter::all(), &mut rng).len(), 10);
    assert_eq!(buffer.sample(50, &Filter::tasks([1]), &mut rng).len(), 5);
    assert!(buffer
        .sample(5, &Filter::tasks_before(0), &mut rng)
        .is_empty());
    assert!(buffer.sample(5, &Filter::classes([9]), &mut rng).is_empty());
    assert!(buffer
        .sample_class_balanced(5, &Filter::classes([]), &mut rng)
        .is_empty());
    assert!(buffer.sample(0, &Filter::all(), &mut rng).is_empty());
    let empty = ReservoirBuffer::<Vec<u8>>::new(Capacity::items(3), Seed::new(0)).unwrap();
    assert!(empty.sample(3, &Filter::all(), &mut rng).is_empty());
    assert!(empty
        .sample_class_balanced(3, &Filter::all(), &mut rng)
        .is_empty());
}

#[test]
fn uniform_sampling_is_uniform_over_items() {
    let mut buffer = ReservoirBuffer::new(Capacity::items(20), Seed::new(9)).unwrap();
    buffer
        .extend((0..20).map(|i| (i % 4, 0, vec![0u8])))
        .unwrap();
    let mut rng = Seed::new(10).rng();
    let mut hits = [0usize; 20];
    for _ in 0..10_000 {
        for e in buffer.sample(3, &Filter::all(), &mut rng) {
            hits[e.id.0 as usize] += 1;
        }
    }
    // Each item is drawn with probability 3/20: 1,500 expected, sd ≈ 36.
    assert!(
        hits.iter().all(|&h| (1_300..1_700).contains(&h)),
        "{hits:?}"
    );
}

#[test]
fn class_balanced_sampling_is_uniform_over_classes_of_earlier_tasks() {
    // Class 0 has 1,000 items, class 1 ten, class 2 one; class 3 belongs to the current task.
    let mut buffer = ClassBalancedBuffer::new(Capacity::items(10_000), Seed::new(11)).unwrap();
    buffer
        .extend((0..1_000).map(|_| (0, 0, vec![0u8])))
        .unwrap();
    buffer.extend((0..10).map(|_| (1, 1, vec![0u8]))).unwrap();
    buffer.extend([(2, 1, vec![0u8])]).unwrap();
    buffer.extend((0..50).map(|_| (3, 2, vec![0u8]))).unwrap();
    let mut rng = Seed::new(12).rng();
    let mut per_class = [0usize; 4];
    let mut total = 0;
    for _ in 0..3_000 {
        let batch = buffer.sample_class_balanced(9, &Filter::tasks_before(2), &mut rng);
        assert!(batch.len() <= 9);
        // Class 2 has a single item, so it appears at most once per batch.
        assert!(batch.iter().filter(|e| e.label == 2).count() <= 1);
        total += batch.len();
        for e in batch {
            per_class[e.label as usize] += 1;
        }
    }
    assert_eq!(per_class[3], 0);
    // Labels are uniform over {0, 1, 2}: 9,000 draws each; class 1 loses a few to its 10-item
    // limit, class 2 many to its single item.
    assert!((8_500..9_500).contains(&per_class[0]), "{per_class:?}");
    assert!((8_400..9_500).contains(&per_class[1]), "{per_class:?}");
    assert!(
        per_class[2] < 3_000 && per_class[2] > 2_000,
        "{per_class:?}"
    );
    assert!(total < 27_000);
}

#[test]
fn per_task_rounding_auto_finish_and_finished_tasks() {
    let mut buffer =
        PerTaskBuffer::new(Capacity::unbounded(), Keep::Fraction(0.5), Seed::new(13)).unwrap();
    // round(0.5 · 3) = 2: halves round away from zero.
    for i in 0..3 {
        let ins = buffer.insert(i, 0, vec![0u8]).unwrap();
        assert_eq!(ins.status, InsertStatus::Pending);
    }
    assert_eq!((buffer.len(), buffer.pending_task()), (0, Some(0)));
    // An item of task 1 finishes task 0.
    buffer.insert(0, 1, vec![0u8]).unwrap();
    assert_eq!(buffer.task_counts().get(&0), Some(&2));
    assert!(buffer.finished_tasks().contains(&0));
    assert!(is_invalid(buffer.insert(0, 0, vec![0u8]), "task"));
    assert!(is_invalid(buffer.add_task(0, [(0, vec![0u8])]), "task"));
    // round(0.5 · 1) = 1.
    let summary = buffer.finish_task().unwrap().unwrap();
    assert_eq!((summary.task, summary.offered, summary.selected), (1, 1, 1));
    assert_eq!(buffer.finish_task().unwrap(), None);
    assert_eq!(Keep::Fraction(0.2).of(800), 160);
    assert_eq!(Keep::Fraction(0.2).of(2), 0);
    assert_eq!(Keep::Count(50).of(20), 20);
}

#[test]
fn per_task_selection_depends_only_on_the_seed_and_the_task() {
    let run = |other_tasks: usize| {
        let mut buffer =
            PerTaskBuffer::new(Capacity::unbounded(), Keep::Fraction(0.3), Seed::new(14)).unwrap();
        for t in 0..other_tasks {
            buffer.add_task(t, (0..10).map(|i| (i, vec![0u8]))).unwrap();
        }
        let summary = buffer
            .add_task(99, (0..40).map(|i| (i, vec![i as u8])))
            .unwrap();
        let mut picked: Vec<u8> = summary
            .kept
            .iter()
            .map(|&id| buffer.get(id).unwrap().item[0])
            .collect();
        picked.sort_unstable();
        picked
    };
    assert_eq!(run(0), run(3));
    assert_eq!(run(0).len(), 12);
}

#[test]
fn per_task_selection_is_cut_short_by_the_capacity() {
    let mut buffer =
        PerTaskBuffer::new(Capacity::new(15, 1_000), Keep::Count(10), Seed::new(15)).unwrap();
    assert_eq!(
        buffer
            .add_task(0, (0..100).map(|i| (i, vec![0u8; 10])))
            .unwrap()
            .kept
            .len(),
        10
    );
    let summary = buffer
        .add_task(1, (0..100).map(|i| (i, vec![0u8; 10])))
        .unwrap();
    assert_eq!((summary.selected, summary.kept.len()), (10, 5));
    assert_eq!(buffer.len(), 15);
}

#[test]
fn item_sizes_of_the_provided_payloads() {
    assert_eq!(vec![0u8; 5].size_bytes(), 5);
    assert_eq!(vec![0f32; 5].size_bytes(), 20);
    assert_eq!(vec![0u8; 3].into_boxed_slice().size_bytes(), 3);
    assert_eq!(RawImage::new(vec![1, 2]).size_bytes(), 2);
}
