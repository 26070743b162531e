//! Reservoir insertion (docs/methods/aqm.md § Extensions; Alg. 4 of the paper's ICLR 2020
//! version): the admission probability `max(raw capacity, stored) / n`, level-agnostic freeing
//! that spares the samples a batch admits, and the typed error without room for a raw image.
//! The invariants under the option are checked by tests/extensions.rs.

mod common;

use common::{codes, config, sample, IMAGE};
use qcl_aqm::memory::IncomingSample;
use qcl_aqm::{AdaptiveMemory, InsertionRule, Payload};
use qcl_continual::ItemId;
use qcl_tensor::Error;
use qcl_vq::PackedIndices;

/// Reservoir insertion admits the n-th sample with probability max(raw capacity, stored) / n:
/// over a seeded stream the number admitted is within four standard deviations of the sum of
/// those probabilities, and the kept samples are spread evenly over the stream.
#[test]
fn reservoir_admission_follows_its_probability() {
    let capacity = 200usize;
    let mut mem = AdaptiveMemory::new(config((capacity * IMAGE) as u64, 11), 0, 0).unwrap();
    mem.set_insertion(InsertionRule::Reservoir);
    assert_eq!(mem.raw_capacity(), capacity as u64);
    let (batches, batch) = (400usize, 10usize);
    let (mut expected, mut variance) = (0.0f64, 0.0f64);
    for i in 0..batches {
        // Within a batch the stored count is the one before it.
        let keep = mem.raw_capacity().max(mem.len() as u64) as f64;
        assert!(
            (mem.admission_probability() - (keep / (mem.seen() + 1) as f64).min(1.0)).abs() < 1e-12
        );
        for k in 0..batch {
            let p = (keep / (mem.seen() + k as u64 + 1) as f64).min(1.0);
            expected += p;
            variance += p * (1.0 - p);
        }
        let incoming: Vec<IncomingSample> = (0..batch)
            .map(|k| sample((k % 2) as u32, 0, i * batch + k))
            .collect();
        mem.insert(&incoming, &[], &[], &[], i as u64).unwrap();
        assert!(mem.used_bits() <= mem.capacity_bits());
    }
    let admitted = mem.admitted() as f64;
    assert!(
        (admitted - expected).abs() <= 4.0 * variance.sqrt(),
        "admitted {admitted}, expected {expected:.1} ± {:.1}",
        variance.sqrt()
    );
    assert_eq!(mem.seen(), (batches * batch) as u64);
    assert_eq!(mem.len(), capacity);
    // A uniform sample of the stream: about half of the kept samples from its first half.
    let early = mem
        .block(0)
        .iter()
        .filter(|e| e.item.dataset_index < batches * batch / 2)
        .count() as f64
        / capacity as f64;
    assert!((0.38..=0.62).contains(&early), "{early}");
}

/// Without reservoir insertion every sample is admitted (the reference rule).
#[test]
fn the_reference_rule_admits_everything() {
    let mut mem = AdaptiveMemory::new(config(64, 1), 0, 0).unwrap();
    assert_eq!(mem.insertion(), InsertionRule::Every);
    for i in 0..50 {
        mem.insert(&[sample(0, 0, i)], &[], &[], &[], 0).unwrap();
    }
    assert_eq!((mem.seen(), mem.admitted()), (50, 50));
    assert_eq!(mem.admission_probability(), 1.0);
}

/// Once more samples are stored as codes than raw images would fit, the admission probability
/// is `stored / (seen + 1)`, not `raw capacity / (seen + 1)`, and admissions follow it.
#[test]
fn admission_counts_the_stored_samples_once_they_exceed_the_raw_capacity() {
    // Room for 2 raw images (256 bits) or 32 codes of 8 bits.
    let mut mem = AdaptiveMemory::new(config(2 * IMAGE as u64, 6), 1, 0).unwrap();
    mem.set_module_bits(1, 8).unwrap();
    let code_rows = |n: usize, from: usize| -> (Vec<Vec<bool>>, Vec<Vec<PackedIndices>>) {
        (
            vec![vec![true; n]],
            vec![(0..n).map(|r| codes(1, (from + r) as u32)).collect()],
        )
    };
    // Twenty samples stored as codes under the reference rule, then reservoir insertion.
    let first: Vec<IncomingSample> = (0..20).map(|i| sample((i % 2) as u32, 0, i)).collect();
    let (ok, c) = code_rows(20, 0);
    mem.insert(&first, &[], &ok, &c, 0).unwrap();
    mem.set_insertion(InsertionRule::Reservoir);
    assert_eq!((mem.raw_capacity(), mem.len(), mem.seen()), (2, 20, 20));
    assert_eq!(mem.admission_probability(), 20.0 / 21.0);
    // Twenty more in one batch: sample k (21..=40) is admitted with probability 20 / k, about
    // 13.9 in all (standard deviation 1.9); with the raw capacity, 2 / k: about 1.4.
    let more: Vec<IncomingSample> = (20..40).map(|i| sample((i % 2) as u32, 1, i)).collect();
    let (ok, c) = code_rows(20, 20);
    mem.insert(&more, &[], &ok, &c, 1).unwrap();
    let admitted = mem.admitted() - 20;
    assert!((8..=20).contains(&admitted), "{admitted}");
    assert!(mem.used_bits() <= mem.capacity_bits());
    let stored = mem.len() as f64;
    assert!(stored > 2.0);
    assert_eq!(mem.admission_probability(), (stored / 41.0).min(1.0));
}

/// Alg. 4 frees space and then adds: a sample admitted by reservoir insertion is never evicted
/// to make room in its own batch while an older sample is stored; a batch larger than the
/// memory keeps only its own samples.
#[test]
fn reservoir_freeing_spares_the_samples_it_just_admitted() {
    let mut mem = AdaptiveMemory::new(config(4 * IMAGE as u64, 8), 0, 0).unwrap();
    mem.set_insertion(InsertionRule::Reservoir);
    let mut evicted_at_once = 0;
    for i in 0..2000 {
        let id = mem.next_id();
        let before = mem.admitted();
        let evicted = mem.insert(&[sample(0, 0, i)], &[], &[], &[], 0).unwrap();
        if mem.admitted() > before {
            assert!(mem.locate(id).is_some(), "sample {i} evicted on arrival");
            assert_eq!(evicted.len(), usize::from(i >= 4));
        }
        evicted_at_once += evicted.iter().filter(|e| e.id == id).count();
    }
    assert_eq!(evicted_at_once, 0);
    assert!(mem.admitted() > 20, "{}", mem.admitted());
    // Six new samples into a full memory of four: the older samples go first, and only when
    // the batch alone overflows are some of its own samples freed again.
    let mut overflowed = 0;
    for seed in 0..60 {
        let mut mem = AdaptiveMemory::new(config(4 * IMAGE as u64, seed), 0, 0).unwrap();
        let older: Vec<IncomingSample> = (0..4).map(|i| sample(0, 0, i)).collect();
        mem.insert(&older, &[], &[], &[], 0).unwrap();
        mem.set_insertion(InsertionRule::Reservoir);
        let batch: Vec<IncomingSample> = (4..10).map(|i| sample(1, 0, i)).collect();
        let evicted = mem.insert(&batch, &[], &[], &[], 1).unwrap();
        let admitted = mem.admitted() as usize - 4;
        let evicted_new = evicted.iter().filter(|e| e.label == 1).count();
        assert_eq!(evicted.len() - evicted_new, admitted.min(4), "seed {seed}");
        assert_eq!(evicted_new, admitted.saturating_sub(4), "seed {seed}");
        assert_eq!(mem.len(), 4);
        overflowed += usize::from(admitted > 4);
    }
    assert!(overflowed > 0, "no seed exercised an overflowing batch");
}

/// Reservoir insertion needs a raw capacity of at least one image: below it an empty memory
/// would admit nothing, so incoming samples are refused with a typed error and the memory is
/// unchanged; the reference rule still takes them (as codes where they fit).
#[test]
fn reservoir_insertion_without_room_for_a_raw_image_is_refused() {
    // 10 parameters of model cost leave IMAGE − 1 bytes: no raw image, one 8-bit code.
    let budget = IMAGE as u64 - 1 + 10;
    let mut mem = AdaptiveMemory::new(config(budget, 4), 1, 10).unwrap();
    mem.set_module_bits(1, 8).unwrap();
    mem.set_insertion(InsertionRule::Reservoir);
    assert_eq!(mem.raw_capacity(), 0);
    assert_eq!(mem.admission_probability(), 0.0);
    let ok = vec![vec![true]];
    let c = vec![vec![codes(1, 0)]];
    let err = mem.insert(&[sample(0, 0, 0)], &[], &ok, &c, 0).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidParameter { .. }) && err.to_string().contains("raw image"),
        "{err}"
    );
    assert_eq!((mem.seen(), mem.admitted(), mem.len()), (0, 0, 0));
    assert_eq!(mem.next_id(), ItemId(0));
    // A batch without incoming samples is not refused.
    assert!(mem.insert(&[], &[], &[vec![]], &[vec![]], 0).is_ok());
    mem.set_insertion(InsertionRule::Every);
    mem.insert(&[sample(0, 0, 0)], &[], &ok, &c, 0).unwrap();
    assert_eq!(mem.counts_per_block(), vec![0, 1]);
}

/// Reservoir eviction frees space in every block, not raw images first.
#[test]
fn reservoir_eviction_is_level_agnostic() {
    let run = |rule: InsertionRule| {
        let mut mem = AdaptiveMemory::new(config(40 * IMAGE as u64, 2), 1, 0).unwrap();
        mem.set_insertion(rule);
        mem.set_module_bits(1, 8).unwrap();
        let mut removed_codes = 0;
        for i in 0..400usize {
            // Alternate raw and coded samples.
            let ok = vec![vec![i % 2 == 0]];
            let c = vec![vec![codes(1, i as u32)]];
            let ev = mem
                .insert(&[sample((i / 2 % 4) as u32, 0, i)], &[], &ok, &c, 0)
                .unwrap();
            removed_codes += ev
                .iter()
                .filter(|e| matches!(e.item.payload, Payload::Codes(_)))
                .count();
        }
        (removed_codes, mem.counts_per_block())
    };
    // The reference rule takes raw images first, so codes accumulate and are rarely evicted;
    // reservoir freeing takes any stored sample, and most stored samples are codes.
    let (reference, reference_counts) = run(InsertionRule::Every);
    let (reservoir, counts) = run(InsertionRule::Reservoir);
    assert!(
        reservoir > 2 * reference.max(1),
        "codes evicted: reservoir {reservoir} {counts:?}, reference {reference} {reference_counts:?}"
    );
}
