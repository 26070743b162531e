//! Layers, networks, training, checkpoints and bad input of qcl-cacl
//! (docs/methods/cacl.md § Invariants the tests check).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qcl_cacl::*;
use qcl_continual::{Scenario, SplitConfig};
use qcl_data::{Normalization, SplitDataset};
use qcl_nn::ops::{conv2d, Conv2dParams};
use qcl_tensor::{write_safetensors, Error, SafetensorsFile, Seed};

const CPU: Device = Device::Cpu;

fn random(shape: &[usize], seed: u64) -> Tensor {
    Seed::new(seed)
        .rng()
        .normal_tensor(shape, 0.0, 1.0, &CPU)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    qcl_tensor::max_abs_diff(a, b).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    qcl_tensor::f32_bits(t).unwrap()
}

/// Two (or more) task-incremental FMNIST tasks from the fixture, `per_task` train images each.
fn fixture_tasks(num: usize, per_task: usize) -> Vec<TaskData> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/fashion-mnist.safetensors"
    );
    let data = SplitDataset::load(path).unwrap();
    let stats = data.train.pixel_stats().unwrap();
    let normalization = Normalization::Standardize {
        mean: stats.mean as f32,
        std: stats.std as f32,
    };
    let scenario = Scenario::task_incremental(&data, &SplitConfig::default()).unwrap();
    scenario
        .tasks()
        .iter()
        .take(num)
        .map(|t| {
            let n = t.train.len().min(per_task);
            let m = t.test.len().min(100);
            TaskData {
                name: format!("fmnist {:?}", t.classes),
                train: t.train.subset(&(0..n).collect::<Vec<_>>()).unwrap(),
                test: t.test.subset(&(0..m).collect::<Vec<_>>()).unwrap(),
                classes: 2,
                normalization,
            }
        })
        .collect()
}

fn quick_config() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        milestones: vec![1],
        gamma: 0.1,
        lr: 1e-3,
        batch_size: 32,
    }
}

/// Enough steps (about 50 per task) to learn a fixture class pair well above chance.
fn learning_config() -> TrainConfig {
    TrainConfig {
        epochs: 4,
        milestones: vec![3],
        gamma: 0.1,
        lr: 2e-3,
        batch_size: 16,
    }
}

/// The CACL objective with a coarse energy threshold ε = 1e-3, so that pruning shows on the
/// small fixture tasks.
fn coarse_threshold() -> CaclConfig {
    CaclConfig {
        epsilon: 1e-3,
        ..Default::default()
    }
}

/// `arm` run on `tasks` with Net_SVD-S, `params`, [`learning_config`] and seed 3.
fn learned_arm(arm: Arm, tasks: &[TaskData], params: CaclConfig) -> ArmRun {
    run_arm(
        arm,
        tasks,
        NetConfig::net_svd_s(),
        params,
        &learning_config(),
        Seed::new(3),
        None,
    )
    .unwrap()
}

/// docs/methods/cacl.md § Invariants the tests check: an exact SVD round-trips, and the
/// factored conv equals a dense conv.
#[test]
fn svd_initialisation_reconstructs_dense_weights_and_convolutions() {
    let w = random(&[8, 3, 3, 3], 1);
    let conv = SvdConv2d::from_dense(&w, 8, Conv2dParams::default(), Seed::new(0)).unwrap();
    let matrix = conv.factors().training_weight().unwrap();
    assert!(max_abs_diff(&matrix, &w.reshape((8, 27)).unwrap()) < 1e-5);
    let x = random(&[2, 3, 7, 7], 2);
    let dense = conv2d(&x, &w, Conv2dParams::default()).unwrap();
    assert!(max_abs_diff(&conv.forward_train(&x).unwrap(), &dense) < 1e-4);
    // Linear: the same through SvdLinear.
    let wl = random(&[5, 9], 3);
    let fc = SvdLinear::from_dense(&wl, 5, Seed::new(0)).unwrap();
    let xl = random(&[4, 9], 4);
    let dense = xl.matmul(&wl.t().unwrap()).unwrap();
    assert!(max_abs_diff(&fc.forward_train(&xl).unwrap(), &dense) < 1e-4);
    // A truncated SVD is the best rank-r approximation: its error is below the full norm.
    let half = SvdFactors::from_dense(&wl, 2, Seed::new(0)).unwrap();
    assert!(max_abs_diff(&half.training_weight().unwrap(), &wl) > 1e-3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The SVD round trip of docs/methods/cacl.md § Invariants the tests check, over shapes.
    #[test]
    fn svd_round_trip(n_out in 1usize..12, d in 1usize..12, seed in 0u64..1000) {
        let w = random(&[n_out, d], seed);
        let f = SvdFactors::from_dense(&w, n_out.min(d), Seed::new(seed)).unwrap();
        prop_assert!(max_abs_diff(&f.training_weight().unwrap(), &w) < 1e-5);
    }

    /// docs/methods/cacl.md § Invariants the tests check: sign flips and joint permutations of
    /// components change nothing.
    #[test]
    fn sign_and_permutation_gauge(r in 1usize..8, seed in 0u64..1000) {
        let (n, s, c) = (random(&[6, r], seed), random(&[r], seed + 1), random(&[r, 12], seed + 2));
        let x = random(&[2, 3, 5, 5], seed + 3);
        let output = |f: &SvdFactors| {
            let w = f.training_weight().unwrap().reshape((6, 3, 2, 2)).unwrap();
            conv2d(&x, &w, Conv2dParams::default()).unwrap()
        };
        let reference = output(&SvdFactors::from_parts(&n, &s, &c, Seed::new(0)).unwrap());
        let flipped = SvdFactors::from_parts(&n, &s.neg().unwrap(), &c, Seed::new(0)).unwrap();
        prop_assert_eq!(bits(&output(&flipped)), bits(&reference));
        let perm: Vec<u32> = Seed::new(seed).rng().permutation(r).into_iter().map(|i| i as u32).collect();
        let index = Tensor::new(perm.as_slice(), &CPU).unwrap();
        let permuted = SvdFactors::from_parts(
            &n.index_select(&index, 1).unwrap(),
            &s.index_select(&index, 0).unwrap(),
            &c.index_select(&index, 0).unwrap(),
            Seed::new(0),
        ).unwrap();
        let scale = 1.0 + reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        prop_assert!(max_abs_diff(&output(&permuted), &reference) < 1e-5 * scale);
    }
}

/// docs/methods/cacl.md § Invariants the tests check and H1 (§ Expected orderings): after
/// later tasks the frozen prefix, the heads and every earlier task's outputs are
/// bit-identical; components beyond k_s are irrelevant to task s.
#[test]
fn earlier_tasks_are_frozen_bit_for_bit() {
    let tasks = fixture_tasks(3, 96);
    let mut net = NetSvd::new(
        NetConfig::net_svd_s(),
        coarse_threshold(),
        Seed::new(5),
        &CPU,
    )
    .unwrap();
    let x = tasks[0]
        .test
        .to_tensors(tasks[0].normalization, &CPU)
        .unwrap()
        .0;
    train_task(&mut net, 0, &tasks[0], &quick_config(), Seed::new(1), None).unwrap();
    let after0 = bits(&net.eval_logits(&x, 0).unwrap());
    let prefix0: Vec<_> = net
        .convs()
        .iter()
        .map(|c| c.factors().named_tensors("l"))
        .collect();
    let k0: Vec<usize> = net.task_ranks()[0].clone();
    for (t, task) in tasks.iter().enumerate().skip(1) {
        train_task(
            &mut net,
            t,
            task,
            &quick_config(),
            Seed::new(1 + t as u64),
            None,
        )
        .unwrap();
    }
    assert_eq!(bits(&net.eval_logits(&x, 0).unwrap()), after0);
    for ((conv, before), &k) in net.convs().iter().zip(&prefix0).zip(&k0) {
        let now = conv.factors().named_tensors("l");
        for (name, dim) in [("l.frozen_n", 1), ("l.frozen_s", 0), ("l.frozen_c", 0)] {
            let find = |list: &[(String, Tensor)]| {
                list.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone())
            };
            match (find(before), find(&now)) {
                (Some(b), Some(n)) => assert_eq!(bits(&n.narrow(dim, 0, k).unwrap()), bits(&b)),
                (None, _) => assert_eq!(k, 0),
                (Some(_), None) => panic!("frozen components disappeared"),
            }
        }
    }
    // H5: monotone ranks within capacity, Σ chann_used = k_{T−1}.
    let ranks = net.task_ranks();
    let added = net.components_added();
    for l in 0..5 {
        for t in 1..3 {
            assert!(ranks[t][l] >= ranks[t - 1][l]);
        }
        assert!(ranks[2][l] <= net.capacities()[l]);
        assert_eq!(added.iter().map(|a| a[l]).sum::<usize>(), ranks[2][l]);
    }
    // The size counts exactly the used components.
    let inputs = net.size_inputs();
    assert_eq!(
        net.size_parameters(),
        inputs
            .layers
            .iter()
            .map(|l| ((l.d + l.n_out + 1) * l.used) as u64)
            .sum::<u64>()
            + 3 * 130
            + 15
    );
    // Checkpoint round trip: identical logits for every task.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cacl.safetensors");
    net.save(&path).unwrap();
    let back = NetSvd::load(&path, &CPU).unwrap();
    assert_eq!(back.task_ranks(), net.task_ranks());
    for t in 0..3 {
        assert_eq!(
            bits(&back.eval_logits(&x, t).unwrap()),
            bits(&net.eval_logits(&x, t).unwrap())
        );
    }
    // Bad input: a task never trained.
    let err = net.eval_logits(&x, 3).unwrap_err();
    assert!(err.to_string().contains("never trained"), "{err}");
    // A checkpoint whose ranks do not match the stored components.
    let file = SafetensorsFile::open(&path).unwrap();
    let names: Vec<String> = file.names().to_vec();
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| (n.clone(), file.tensor(n, &CPU).unwrap()))
        .collect();
    let mut meta: BTreeMap<String, String> = file.metadata().clone();
    let mut ranks_meta: BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&meta["ranks"]).unwrap();
    ranks_meta.get_mut("conv2").unwrap()[2] += 1;
    meta.insert("ranks".into(), serde_json::to_string(&ranks_meta).unwrap());
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bad = dir.path().join("bad.safetensors");
    write_safetensors(&bad, &refs, &meta).unwrap();
    let err = NetSvd::load(&bad, &CPU).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    assert!(err.to_string().contains("checkpoint ranks"), "{err}");
}

/// Multi-head training learns: dense and factored models beat chance on a fixture task, and
/// the FT arm's shared trunk moves while IND's earlier models do not.
#[test]
fn arms_train_and_report() {
    let tasks = fixture_tasks(2, 200);
    let cacl = learned_arm(Arm::Cacl, &tasks, coarse_threshold());
    assert_eq!(cacl.logits_bit_identical, Some(true));
    assert_eq!(cacl.task_ranks.len(), 2);
    eprintln!(
        "CACL {:?} {:?} {:?}",
        cacl.accuracy, cacl.task_ranks, cacl.pruned_fraction
    );
    assert!(cacl.average_accuracy > 0.6, "{}", cacl.average_accuracy);
    assert_eq!(cacl.accuracy.get(1, 0), cacl.accuracy.get(0, 0));
    let ind = learned_arm(Arm::Individual, &tasks, CaclConfig::default());
    assert_eq!(ind.parameters, 2 * (24_624 + 130));
    assert_eq!(ind.accuracy.get(1, 0), ind.accuracy.get(0, 0));
    assert!(ind.average_accuracy > 0.6, "{}", ind.average_accuracy);
    let fixed = learned_arm(Arm::CaclFixed, &tasks, coarse_threshold());
    // No growth: the capacity never exceeds r0.
    for caps in &fixed.capacities {
        for (cap, r0) in caps.iter().zip([5, 14, 26, 28, 42]) {
            assert!(*cap <= r0);
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    // Rank 0.
    let err = SvdFactors::new(4, 4, 0, Seed::new(0), &CPU).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
    let w = random(&[4, 4], 0);
    assert!(SvdFactors::from_dense(&w, 0, Seed::new(0)).is_err());
    assert!(SvdFactors::from_dense(&w, 5, Seed::new(0)).is_err());
    assert!(SvdConv2d::new(1, 1, 1, Conv2dParams::default(), Seed::new(0), &CPU).is_err());
    // Threshold outside (0, 1).
    for eps in [0.0, 1.0, -1.0, f64::NAN] {
        let params = CaclConfig {
            epsilon: eps,
            ..Default::default()
        };
        let err = NetSvd::new(NetConfig::net_svd_s(), params, Seed::new(0), &CPU).unwrap_err();
        assert!(err.to_string().contains("epsilon"), "{err}");
        let mut f = SvdFactors::new(4, 4, 2, Seed::new(0), &CPU).unwrap();
        assert!(f.finish_task(eps, Growth::Fixed).is_err());
    }
    // Task never trained, task out of order, wrong input shape.
    let mut net = NetSvd::new(
        NetConfig::net_svd_s(),
        CaclConfig::default(),
        Seed::new(0),
        &CPU,
    )
    .unwrap();
    let x = Tensor::zeros((1, 1, 28, 28), DType::F32, &CPU).unwrap();
    assert!(net
        .eval_logits(&x, 0)
        .unwrap_err()
        .to_string()
        .contains("never trained"));
    assert!(net.begin_task(1, 2).is_err());
    net.begin_task(0, 2).unwrap();
    assert!(net
        .train_logits(
            &Tensor::zeros((1, 3, 28, 28), DType::F32, &CPU).unwrap(),
            &mut Seed::new(0).rng()
        )
        .is_err());
    let f = SvdFactors::new(4, 4, 2, Seed::new(0), &CPU).unwrap();
    assert!(f
        .task_weight(0)
        .unwrap_err()
        .to_string()
        .contains("never trained"));
    // A foreign checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.safetensors");
    write_safetensors(&path, &[("x", &x)], &BTreeMap::new()).unwrap();
    assert!(NetSvd::load(&path, &CPU).is_err());
}

/// Growth: after the second task a layer gets at least ⌊min(mean k, r0)⌋ fresh slots; the
/// fixed rule only recycles.
#[test]
fn finishing_tasks_prunes_freezes_and_grows() {
    let mut f = SvdFactors::new(16, 144, 14, Seed::new(2), &CPU).unwrap();
    // Make the first task's s very sparse: 3 large, the rest tiny.
    let first = f.finish_task(0.5, Growth::MeanCapped).unwrap();
    assert_eq!(first.used, first.added);
    assert_eq!(first.capacity, 14, "task 0 only recycles");
    let second = f.finish_task(0.5, Growth::MeanCapped).unwrap();
    let g = growth_target(&[first.used], 14);
    assert!(second.free >= g);
    assert_eq!(second.free, (second.capacity - second.used));
    assert_eq!(f.task_ranks(), &[first.used, second.used]);
    let mut fixed = SvdFactors::new(16, 144, 14, Seed::new(2), &CPU).unwrap();
    for _ in 0..3 {
        let u = fixed.finish_task(0.5, Growth::Fixed).unwrap();
        assert_eq!(u.capacity, 14);
    }
    // Trainable variables never include frozen components.
    let vars = f.trainable_vars("x");
    assert_eq!(vars[1].1.as_tensor().dims(), &[f.free()]);
}

/// Layers and models as candle `Module`s: every component for a layer, a finished task's own
/// weights and head through `for_task`, typed errors through candle's error.
#[test]
fn for_task_views_are_candle_modules() {
    use candle_core::Module;
    let mut conv = SvdConv2d::new(2, 4, 3, Conv2dParams::default(), Seed::new(1), &CPU).unwrap();
    let x = random(&[2, 2, 6, 6], 2);
    let all = conv.forward(&x).unwrap();
    assert_eq!(max_abs_diff(&all, &conv.forward_train(&x).unwrap()), 0.0);
    conv.factors_mut().finish_task(1e-3, Growth::Fixed).unwrap();
    let task0 = conv.for_task(0).forward(&x).unwrap();
    assert_eq!(
        max_abs_diff(&task0, &conv.forward_task(&x, 0).unwrap()),
        0.0
    );
    let err = Error::from(conv.for_task(3).forward(&x).unwrap_err());
    assert_eq!(err.kind(), "invalid_parameter");

    let mut net = DenseNet::new(NetConfig::net_svd_s(), Seed::new(0), &CPU).unwrap();
    net.begin_task(0, 2).unwrap();
    net.finish_task().unwrap();
    let images = random(&[3, 1, 28, 28], 4);
    let logits = net.for_task(0).forward(&images).unwrap();
    assert_eq!(
        max_abs_diff(&logits, &net.eval_logits(&images, 0).unwrap()),
        0.0
    );
    assert_eq!(
        Error::from(net.for_task(1).forward(&images).unwrap_err()).kind(),
        "invalid_parameter"
    );
}

#[test]
fn checkpoints_are_the_same_bytes_on_1_and_2_threads() {
    let tasks = fixture_tasks(2, 48);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = [1, 2]
        .into_iter()
        .map(|threads| {
            qcl_tensor::on_threads(threads, || {
                let mut net = NetSvd::new(
                    NetConfig::net_svd_s(),
                    CaclConfig::default(),
                    Seed::new(5),
                    &CPU,
                )
                .unwrap();
                for (t, task) in tasks.iter().enumerate() {
                    train_task(
                        &mut net,
                        t,
                        task,
                        &quick_config(),
                        Seed::new(t as u64),
                        None,
                    )
                    .unwrap();
                }
                let path = dir.path().join(format!("cacl{threads}.safetensors"));
                net.save(&path).unwrap();
                std::fs::read(path).unwrap()
            })
            .unwrap()
        })
        .collect();
    // The same 1-and-2-thread scaffold as qcl-aqm's state test: test crates share no helpers.
    assert!(
        files[0] == files[1],
        "1 and 2 threads saved different bytes"
    );
}
