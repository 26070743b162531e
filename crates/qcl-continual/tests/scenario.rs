//! Scenarios on the committed fixtures and on synthetic data sets: LifeQuant's windows
//! (docs/methods/lifequant.md § Lifelong class shift), the partition and label invariants, the
//! online stream, permutations, determinism and errors.
//!
//! (Over 600 lines: every scenario kind against the same fixture loaders and synthetic data
//! sets.)

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::Device;
use proptest::prelude::*;
use qcl_continual::{
    sample_per_class, ClassOrder, LifelongConfig, LifelongWindows, PermutedConfig, Scenario,
    ScenarioKind, SplitConfig, StreamConfig,
};
use qcl_data::{Dataset, ImageShape, SplitDataset};
use qcl_tensor::{Error, Seed};

fn fixture(name: &str) -> SplitDataset {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(format!("{name}.safetensors"));
    SplitDataset::load(path).unwrap()
}

/// A synthetic split: `labels` train and `test_labels` test images of 1×2×2 pixels, each image's
/// pixels encoding its index so samples can be traced through a scenario.
fn synthetic(num_classes: usize, labels: Vec<u32>, test_labels: Vec<u32>) -> SplitDataset {
    let shape = ImageShape {
        channels: 1,
        height: 2,
        width: 2,
    };
    let names: Vec<String> = (0..num_classes).map(|c| format!("c{c}")).collect();
    let part = |labels: Vec<u32>, offset: usize| {
        let pixels = (0..labels.len())
            .flat_map(|i| {
                let v = (i + offset) as u32;
                [v as u8, (v >> 8) as u8, (v >> 16) as u8, 7]
            })
            .collect();
        Dataset::new("synthetic", shape, pixels, labels, names.clone()).unwrap()
    };
    SplitDataset::new(part(labels, 0), part(test_labels, 1 << 20)).unwrap()
}

/// Position of a synthetic image in its split (decoded from its pixels).
fn trace(image: &[u8]) -> usize {
    image[0] as usize | (image[1] as usize) << 8 | (image[2] as usize) << 16
}

#[test]
fn split_fmnist_5x2_class_incremental() {
    let data = fixture("fashion-mnist");
    let s = Scenario::class_incremental(&data, &SplitConfig::default()).unwrap();
    assert_eq!(s.kind(), ScenarioKind::ClassIncremental);
    assert_eq!(s.num_tasks(), 5);
    assert_eq!(s.num_classes(), 10);
    for (id, task) in s.tasks().iter().enumerate() {
        assert_eq!(task.id, id);
        assert_eq!(task.classes, vec![2 * id as u32, 2 * id as u32 + 1]);
        assert_eq!(task.task_label, None);
        assert_eq!(task.train.len(), 200);
        assert_eq!(task.test.len(), 40);
        // Global labels, single head over all ten classes.
        assert_eq!(task.train.num_classes(), 10);
        assert_eq!(
            task.train,
            data.train.select_classes(&task.classes).unwrap()
        );
        assert_eq!(task.label_of(task.classes[1]), Some(task.classes[1]));
        assert_eq!(task.class_of(task.classes[0]), Some(task.classes[0]));
        assert_eq!(task.label_of(99), None);
    }
    assert_eq!(s.orphan_classes(), (0..8).collect::<Vec<u32>>());
}

#[test]
fn split_mnist_task_incremental_remaps_labels_per_task() {
    let data = fixture("mnist");
    let params = SplitConfig {
        classes_per_task: 2,
        class_order: ClassOrder::Explicit(vec![9, 3, 0, 4]),
    };
    let s = Scenario::task_incremental(&data, &params).unwrap();
    assert_eq!(s.kind(), ScenarioKind::TaskIncremental);
    assert_eq!(s.num_tasks(), 2);
    let task = &s.tasks()[0];
    assert_eq!(task.classes, vec![9, 3]);
    assert_eq!(task.task_label, Some(0));
    assert_eq!(s.tasks()[1].task_label, Some(1));
    assert_eq!(task.train.num_classes(), 2);
    assert_eq!(
        task.train.class_names(),
        &data.train.class_names()[..][9..10]
            .iter()
            .chain(&data.train.class_names()[3..4])
            .cloned()
            .collect::<Vec<_>>()[..]
    );
    assert_eq!(
        (task.label_of(9), task.label_of(3), task.label_of(0)),
        (Some(0), Some(1), None)
    );
    assert_eq!(
        (task.class_of(0), task.class_of(1), task.class_of(2)),
        (Some(9), Some(3), None)
    );
    // Same images as the class-incremental task, labels mapped through `label_of`.
    let global = data.train.select_classes(&[9, 3]).unwrap();
    assert_eq!(task.train.pixels(), global.pixels());
    let mapped: Vec<u32> = global
        .labels()
        .iter()
        .map(|&y| task.label_of(y).unwrap())
        .collect();
    assert_eq!(task.train.labels(), &mapped[..]);
    assert!(task.test.labels().iter().all(|&y| y < 2));
}

#[test]
fn lifelong_windows_match_the_method_tables() {
    // The paper's CIFAR-100-LL (C = 100, T = 3) and the reproduction (C = 10, T = 3):
    // docs/methods/lifequant.md § Lifelong class shift, § Scaled-down experiment.
    let cases = [
        (100, 0.25, 66, 16, vec![0..66, 16..82, 32..100]),
        (100, 0.50, 50, 25, vec![0..50, 25..75, 50..100]),
        (100, 0.75, 40, 30, vec![0..40, 30..70, 60..100]),
        (10, 0.50, 5, 2, vec![0..5, 2..7, 4..10]),
        (10, 0.75, 4, 3, vec![0..4, 3..7, 6..10]),
    ];
    for (c, d, n, s, ranges) in cases {
        let w = LifelongWindows::new(c, 3, d).unwrap();
        assert_eq!((w.window, w.shift, w.ranges), (n, s, ranges), "C={c} d={d}");
    }
    // A single task owns everything.
    assert_eq!(
        LifelongWindows::new(10, 1, 0.5).unwrap().ranges,
        vec![0..10]
    );
}

#[test]
fn lifelong_reproduction_on_fashion_mnist() {
    let data = fixture("fashion-mnist");
    let s = Scenario::lifelong(&data, &LifelongConfig::reproduction()).unwrap();
    assert_eq!(s.kind(), ScenarioKind::Lifelong);
    let pi = s.class_order().to_vec();
    let mut sorted = pi.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<u32>>());
    assert_ne!(pi, sorted, "seed 123 should not give the identity");
    let expected = [&pi[0..5], &pi[2..7], &pi[4..10]];
    for (task, classes) in s.tasks().iter().zip(expected) {
        assert_eq!(task.classes, classes);
        assert_eq!(task.task_label, None);
        // The fixture has 100 train / 20 test images per class, under the 800 cap: all kept.
        assert_eq!(task.train, data.train.select_classes(classes).unwrap());
        assert_eq!(task.test, data.test.select_classes(classes).unwrap());
    }
    assert_eq!(s.orphaned_after(0), pi[0..2].to_vec());
    assert_eq!(s.orphaned_after(1), pi[2..4].to_vec());
    assert_eq!(s.orphaned_after(2), pi[4..10].to_vec());
    assert!(s.orphaned_after(3).is_empty());
    let mut orphans = pi[0..4].to_vec();
    orphans.sort_unstable();
    assert_eq!(s.orphan_classes(), orphans);

    let description = s.description();
    assert_eq!(description.class_order, pi);
    let sizes: Vec<(usize, usize)> = description
        .tasks
        .iter()
        .map(|t| (t.train_images, t.test_images))
        .collect();
    assert_eq!(sizes, vec![(500, 100), (500, 100), (600, 120)]);
    let json = serde_json::to_string(&description).unwrap();
    let back: qcl_continual::ScenarioDescription = serde_json::from_str(&json).unwrap();
    assert_eq!(back, description);

    let stress = Scenario::lifelong(&data, &LifelongConfig::reproduction_stress()).unwrap();
    let sizes: Vec<usize> = stress.tasks().iter().map(|t| t.classes.len()).collect();
    assert_eq!(sizes, vec![4, 4, 4]);
    assert_eq!(
        stress.class_order(),
        &pi[..],
        "same class seed, same permutation"
    );
}

#[test]
fn lifelong_subsample_is_shared_between_tasks_and_seeded() {
    let data = fixture("fashion-mnist");
    let params = LifelongConfig {
        train_per_class: Some(30),
        ..LifelongConfig::reproduction()
    };
    let s = Scenario::lifelong(&data, &params).unwrap();
    let pi = s.class_order();
    for task in s.tasks() {
        let counts = task.train.class_counts();
        for &c in &task.classes {
            assert_eq!(counts[c as usize], 30);
        }
        assert_eq!(
            task.test.len(),
            20 * task.classes.len(),
            "test split kept whole"
        );
    }
    // A class shared by tasks 0 and 1 brings the same images into both.
    let shared = pi[3];
    let a = s.tasks()[0].train.select_classes(&[shared]).unwrap();
    let b = s.tasks()[1].train.select_classes(&[shared]).unwrap();
    assert_eq!(a, b);
    assert_eq!(Scenario::lifelong(&data, &params).unwrap(), s);
    let other = LifelongConfig {
        subsample_seed: Seed::new(5),
        ..params
    };
    assert_ne!(
        Scenario::lifelong(&data, &other).unwrap().tasks()[0].train,
        s.tasks()[0].train
    );
    let other_order = LifelongConfig {
        class_seed: Seed::new(9),
        ..params
    };
    assert_ne!(
        Scenario::lifelong(&data, &other_order)
            .unwrap()
            .class_order(),
        pi
    );
}

#[test]
fn permuted_mnist_tasks_are_fixed_pixel_permutations() {
    let data = fixture("mnist");
    let params = PermutedConfig {
        num_tasks: 4,
        seed: Seed::new(3),
        first_task_identity: true,
    };
    let s = Scenario::permuted(&data, &params).unwrap();
    assert_eq!(s.kind(), ScenarioKind::Permuted);
    assert_eq!(s.tasks()[0].train, data.train);
    assert_eq!(s.tasks()[0].pixel_permutation, None);
    let mut permutations = Vec::new();
    for task in &s.tasks()[1..] {
        let p = task.pixel_permutation.clone().unwrap();
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..784).collect::<Vec<_>>());
        assert_eq!(task.classes, (0..10).collect::<Vec<u32>>());
        assert_eq!(task.train.labels(), data.train.labels());
        assert_eq!(task.test.labels(), data.test.labels());
        for (split, original) in [(&task.train, &data.train), (&task.test, &data.test)] {
            for i in [0, 17, original.len() - 1] {
                let src = original.image(i);
                let expected: Vec<u8> = p.iter().map(|&k| src[k]).collect();
                assert_eq!(split.image(i), &expected[..]);
            }
        }
        permutations.push(p);
    }
    assert!(permutations[0] != permutations[1] && permutations[1] != permutations[2]);
    assert_eq!(Scenario::permuted(&data, &params).unwrap(), s);

    let all = PermutedConfig {
        first_task_identity: false,
        ..params
    };
    let s2 = Scenario::permuted(&data, &all).unwrap();
    assert!(s2.tasks()[0].pixel_permutation.is_some());
    assert_ne!(s2.tasks()[0].train, data.train);
    // Tasks ≥ 1 do not depend on whether task 0 is the identity.
    assert_eq!(s2.tasks()[1], s.tasks()[1]);
}

#[test]
fn stream_is_one_pass_over_every_task_in_order() {
    let data = fixture("fashion-mnist");
    let s = Scenario::class_incremental(&data, &SplitConfig::default()).unwrap();
    let options = StreamConfig {
        batch_size: 32,
        shuffle_seed: Some(Seed::new(11)),
        ..Default::default()
    };
    let collect = |options| {
        s.stream(options, &Device::Cpu)
            .unwrap()
            .map(|b| {
                b.map(|b| {
                    (
                        b.task,
                        b.batch.indices,
                        b.batch.labels.to_vec1::<u32>().unwrap(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let items = collect(options);
    let mut seen: Vec<Vec<usize>> = vec![Vec::new(); s.num_tasks()];
    let mut last_task = 0;
    for (k, (task, indices, labels)) in items.iter().enumerate() {
        assert!(*task >= last_task, "tasks come in order");
        last_task = *task;
        assert!(indices.len() <= 32 && !indices.is_empty());
        let end_of_task = items.get(k + 1).is_none_or(|next| next.0 != *task);
        if !end_of_task {
            assert_eq!(indices.len(), 32, "only a task's last batch is smaller");
        }
        let t = &s.tasks()[*task];
        let expected: Vec<u32> = indices.iter().map(|&i| t.train.labels()[i]).collect();
        assert_eq!(labels, &expected);
        seen[*task].extend(indices);
    }
    for (task, mut indices) in seen.into_iter().enumerate() {
        indices.sort_unstable();
        assert_eq!(
            indices,
            (0..s.tasks()[task].train.len()).collect::<Vec<_>>()
        );
    }
    assert_eq!(collect(options), items, "same seed, same stream");
    let shuffled_differently = collect(StreamConfig {
        shuffle_seed: Some(Seed::new(12)),
        ..options
    });
    assert_ne!(shuffled_differently, items);
    let sequential = collect(StreamConfig {
        shuffle_seed: None,
        ..options
    });
    assert_eq!(sequential[0].1, (0..32).collect::<Vec<_>>());
}

#[test]
fn bad_input_is_a_typed_error() {
    let data = fixture("mnist");
    let split = |classes_per_task, class_order| {
        Scenario::class_incremental(
            &data,
            &SplitConfig {
                classes_per_task,
                class_order,
            },
        )
    };
    // More classes than the data set has.
    assert!(matches!(
        split(11, ClassOrder::Natural),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        split(2, ClassOrder::Explicit(vec![0, 10])),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        split(0, ClassOrder::Natural),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        split(3, ClassOrder::Natural),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        split(2, ClassOrder::Explicit(vec![1, 1])),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        split(2, ClassOrder::Explicit(vec![])),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        Scenario::task_incremental(
            &data,
            &SplitConfig {
                classes_per_task: 20,
                ..Default::default()
            }
        ),
        Err(Error::InvalidParameter { .. })
    ));

    // An empty task: classes 2 and 3 have no training image.
    let empty = synthetic(4, vec![0, 1, 0, 1], vec![0, 1, 2, 3]);
    assert!(matches!(
        Scenario::class_incremental(&empty, &SplitConfig::default()),
        Err(Error::EmptyInput(_))
    ));
    let no_test = synthetic(4, vec![0, 1, 2, 3], vec![2, 3]);
    assert!(matches!(
        Scenario::task_incremental(&no_test, &SplitConfig::default()),
        Err(Error::EmptyInput(_))
    ));
    let params = LifelongConfig {
        num_tasks: 2,
        diminish_rate: 0.5,
        ..Default::default()
    };
    let no_train = synthetic(4, vec![], vec![0, 1, 2, 3]);
    assert!(matches!(
        Scenario::lifelong(&no_train, &params),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        Scenario::permuted(&no_train, &PermutedConfig::default()),
        Err(Error::EmptyInput(_))
    ));

    // Diminish rates outside (0, 1).
    for d in [0.0, 1.0, -0.25, 1.5, f64::NAN, f64::INFINITY] {
        let params = LifelongConfig {
            diminish_rate: d,
            ..Default::default()
        };
        assert!(
            matches!(
                Scenario::lifelong(&data, &params),
                Err(Error::InvalidParameter { .. })
            ),
            "d = {d}"
        );
    }
    // No task; a window of no class; a rate too small to drop any class.
    for (tasks, d) in [(0, 0.5), (30, 0.9), (3, 0.1)] {
        let params = LifelongConfig {
            num_tasks: tasks,
            diminish_rate: d,
            ..Default::default()
        };
        assert!(matches!(
            Scenario::lifelong(&data, &params),
            Err(Error::InvalidParameter { .. })
        ));
    }
    let params = LifelongConfig {
        train_per_class: Some(0),
        ..LifelongConfig::reproduction()
    };
    assert!(matches!(
        Scenario::lifelong(&data, &params),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        sample_per_class(&data.train, 0, Seed::new(0)),
        Err(Error::InvalidParameter { .. })
    ));
    let none = PermutedConfig {
        num_tasks: 0,
        ..Default::default()
    };
    assert!(matches!(
        Scenario::permuted(&data, &none),
        Err(Error::InvalidParameter { .. })
    ));

    let s = Scenario::class_incremental(&data, &SplitConfig::default()).unwrap();
    let zero = StreamConfig {
        batch_size: 0,
        ..Default::default()
    };
    assert!(matches!(
        s.stream(zero, &Device::Cpu),
        Err(Error::InvalidParameter { .. })
    ));
}

#[test]
fn sample_per_class_caps_each_class_and_keeps_order() {
    let data = fixture("mnist");
    let sampled = sample_per_class(&data.train, 7, Seed::new(1)).unwrap();
    assert_eq!(sampled.class_counts(), vec![7; 10]);
    assert_eq!(
        sample_per_class(&data.train, 7, Seed::new(1)).unwrap(),
        sampled
    );
    assert_ne!(
        sample_per_class(&data.train, 7, Seed::new(2)).unwrap(),
        sampled
    );
    let all = sample_per_class(&data.train, 1000, Seed::new(1)).unwrap();
    assert_eq!(
        all, data.train,
        "a cap above every class keeps everything in order"
    );
}

/// A synthetic split of `c` classes, each with 1..4 train and 1..3 test images, shuffled.
fn labelled_split() -> impl Strategy<Value = SplitDataset> {
    (2usize..13).prop_flat_map(|c| {
        (
            prop::collection::vec(1usize..4, c),
            prop::collection::vec(1usize..3, c),
            any::<u64>(),
        )
            .prop_map(move |(train, test, seed)| {
                let expand = |counts: &[usize], seed: Seed| {
                    let mut labels: Vec<u32> = counts
                        .iter()
                        .enumerate()
                        .flat_map(|(c, &k)| std::iter::repeat_n(c as u32, k))
                        .collect();
                    seed.rng().shuffle(&mut labels);
                    labels
                };
                let seed = Seed::new(seed);
                synthetic(
                    c,
                    expand(&train, seed.child(0)),
                    expand(&test, seed.child(1)),
                )
            })
    })
}

proptest! {
    #[test]
    fn class_incremental_tasks_partition_classes_and_samples(
        data in labelled_split(),
        per_task_pick in 0usize..4,
        seed in any::<u64>(),
        task_incremental in any::<bool>(),
    ) {
        let c = data.train.num_classes();
        let divisors: Vec<usize> = (1..=c).filter(|k| c.is_multiple_of(*k)).collect();
        let per_task = divisors[per_task_pick % divisors.len()];
        let params = SplitConfig { classes_per_task: per_task, class_order: ClassOrder::Shuffled(Seed::new(seed)) };
        let s = if task_incremental {
            Scenario::task_incremental(&data, &params).unwrap()
        } else {
            Scenario::class_incremental(&data, &params).unwrap()
        };
        prop_assert_eq!(s.num_tasks(), c / per_task);
        // The tasks' classes partition all classes.
        let mut classes: Vec<u32> = s.tasks().iter().flat_map(|t| t.classes.clone()).collect();
        prop_assert_eq!(classes.len(), c);
        classes.sort_unstable();
        prop_assert_eq!(classes, (0..c as u32).collect::<Vec<_>>());
        // Every train and test sample appears in exactly one task, under its class.
        for (split, original) in [(0, &data.train), (1, &data.test)] {
            let mut owner = vec![usize::MAX; original.len()];
            for task in s.tasks() {
                let view = if split == 0 { &task.train } else { &task.test };
                for i in 0..view.len() {
                    let k = trace(view.image(i)) - split * (1 << 20);
                    prop_assert_eq!(owner[k], usize::MAX, "sample {} in two tasks", k);
                    owner[k] = task.id;
                    let class = task.class_of(view.labels()[i]).unwrap();
                    prop_assert_eq!(class, original.labels()[k]);
                    prop_assert!(task.classes.contains(&class));
                }
            }
            prop_assert!(owner.iter().all(|&o| o != usize::MAX));
        }
        prop_assert_eq!(Scenario::class_incremental(&data, &params).is_ok(), true);
    }

    #[test]
    fn lifelong_windows_invariants(c in 1usize..200, t in 1usize..12, d in 0.001f64..0.999) {
        let Ok(w) = LifelongWindows::new(c, t, d) else {
            return Ok(());
        };
        let n = w.window;
        prop_assert_eq!(n, (c as f64 / (1.0 + d * (t - 1) as f64)).floor() as usize);
        prop_assert_eq!(w.shift, (n as f64 * d).floor() as usize);
        prop_assert_eq!(w.ranges.len(), t);
        // The union is all C classes, consecutive tasks share n − s, only the last may exceed n.
        let union: BTreeSet<usize> = w.ranges.iter().flat_map(|r| r.clone()).collect();
        prop_assert_eq!(union, (0..c).collect::<BTreeSet<_>>());
        for (i, r) in w.ranges.iter().enumerate() {
            prop_assert!(r.end <= c);
            if i + 1 < t {
                prop_assert_eq!(r.len(), n);
                let next = &w.ranges[i + 1];
                prop_assert_eq!(r.end.saturating_sub(next.start), n - w.shift);
                prop_assert_eq!(next.start - r.start, w.shift);
            } else {
                prop_assert!(r.len() >= n);
            }
        }
    }

    #[test]
    fn lifelong_tasks_follow_the_windows_and_are_deterministic(
        data in labelled_split(),
        t in 1usize..4,
        d in 0.05f64..0.95,
        seed in any::<u64>(),
    ) {
        let params = LifelongConfig { num_tasks: t, diminish_rate: d, class_seed: Seed::new(seed), ..Default::default() };
        let Ok(s) = Scenario::lifelong(&data, &params) else {
            // Only the geometry can refuse: every class has train and test images.
            prop_assert!(LifelongWindows::new(data.train.num_classes(), t, d).is_err());
            return Ok(());
        };
        let w = LifelongWindows::new(data.train.num_classes(), t, d).unwrap();
        let pi = s.class_order();
        for (task, range) in s.tasks().iter().zip(&w.ranges) {
            prop_assert_eq!(&task.classes[..], &pi[range.clone()]);
            prop_assert!(task.test.labels().iter().all(|y| task.classes.contains(y)));
            prop_assert_eq!(&task.train, &data.train.select_classes(&task.classes).unwrap());
        }
        prop_assert_eq!(Scenario::lifelong(&data, &params).unwrap(), s);
    }

    #[test]
    fn validation_images_are_held_out_of_every_task(
        data in labelled_split(),
        fraction in 0.0f64..0.9,
        seed in any::<u64>(),
    ) {
        let base = LifelongConfig { num_tasks: 2, diminish_rate: 0.5, ..Default::default() };
        let params = LifelongConfig {
            validation_fraction: fraction,
            subsample_seed: Seed::new(seed),
            ..base
        };
        let s = match Scenario::lifelong(&data, &params) {
            Ok(s) => s,
            // The geometry, or a task whose classes are too small to hold an image out.
            Err(e) => {
                let geometry = LifelongWindows::new(data.train.num_classes(), 2, 0.5).is_err();
                prop_assert!(geometry || (fraction > 0.0 && matches!(e, Error::EmptyInput(_))), "{e}");
                return Ok(());
            }
        };
        let whole = Scenario::lifelong(&data, &base).unwrap();
        // Pixels encode the image's index: held-out and kept images are disjoint, together
        // they are the task's images, and each class holds ⌊fraction·n_c⌋ out (at least one
        // where it has two or more, never all of them).
        for (task, all) in s.tasks().iter().zip(whole.tasks()) {
            let ids = |d: &Dataset| (0..d.len()).map(|i| d.image(i).to_vec()).collect::<BTreeSet<_>>();
            let train = ids(&task.train);
            let held = task.validation.as_ref().map(ids).unwrap_or_default();
            prop_assert_eq!(task.validation.is_some(), fraction > 0.0);
            prop_assert!(train.is_disjoint(&held));
            prop_assert_eq!(train.union(&held).cloned().collect::<BTreeSet<_>>(), ids(&all.train));
            if let Some(v) = &task.validation {
                for (&n, &k) in all.train.class_counts().iter().zip(&v.class_counts()) {
                    let expected = if n < 2 { 0 } else { ((fraction * n as f64).floor() as usize).clamp(1, n - 1) };
                    prop_assert_eq!(k, expected);
                }
            }
        }
        // The same image is held out in every task that shares its class.
        if let (Some(a), Some(b)) = (&s.tasks()[0].validation, &s.tasks()[1].validation) {
            let shared: Vec<u32> = s.tasks()[0].classes.iter().filter(|c| s.tasks()[1].classes.contains(c)).copied().collect();
            prop_assert_eq!(a.select_classes(&shared).unwrap(), b.select_classes(&shared).unwrap());
        }
        prop_assert_eq!(Scenario::lifelong(&data, &params).unwrap(), s);
    }

    #[test]
    fn permuted_tasks_permute_each_image(data in labelled_split(), seed in any::<u64>()) {
        let params = PermutedConfig { num_tasks: 3, seed: Seed::new(seed), first_task_identity: false };
        let s = Scenario::permuted(&data, &params).unwrap();
        for task in s.tasks() {
            let p = task.pixel_permutation.as_ref().unwrap();
            for i in 0..data.train.len() {
                let mut a = data.train.image(i).to_vec();
                let mut b = task.train.image(i).to_vec();
                prop_assert_eq!(b.iter().enumerate().all(|(k, &v)| v == a[p[k]]), true);
                a.sort_unstable();
                b.sort_unstable();
                prop_assert_eq!(a, b);
            }
        }
    }
}
