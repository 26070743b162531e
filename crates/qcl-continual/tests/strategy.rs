//! Strategies and the continual trainer on the committed fixture: what each strategy trains
//! on, the replay memory (items 18, 19 of docs/methods/lifequant.md § Tested invariants), the
//! equivalences of item 21, the Fisher pass (item 11), EWC, LwF, determinism and bad input.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;

use candle_core::{Device, Tensor};
use qcl_continual::ball::cross_entropy;
use qcl_continual::{
    distillation_loss, fisher_diagonal, ClassAccuracy, ClassHistogram, ContinualTrainer, Ewc,
    EwcConfig, ExperienceReplay, FineTune, Joint, Keep, Learner, LifeQuant, LifeQuantConfig,
    LifeQuantMode, LifelongConfig, Lwf, LwfConfig, PenaltyUpdate, QResNet, QResNetConfig, Scenario,
    Strategy, TaskSchedule, TaskView, TrainerConfig,
};
use qcl_data::{Batch, Dataset, Normalization, SplitDataset};
use qcl_nn::layers::{Linear, Module, ModuleT};
use qcl_nn::{ParamPath, ParamStore};
use qcl_tensor::{Error, Result};

fn fixture() -> SplitDataset {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist.safetensors");
    let data = SplitDataset::load(path).unwrap();
    SplitDataset::new(data.train.take_per_class(20), data.test.take_per_class(10)).unwrap()
}

fn lifelong() -> Scenario {
    let params = LifelongConfig {
        train_per_class: Some(20),
        ..LifelongConfig::reproduction()
    };
    Scenario::lifelong(&fixture(), &params).unwrap()
}

/// A linear classifier on flattened pixels: fast, and every parameter gets a gradient.
struct LinearModel(Linear);

impl LinearModel {
    fn new(path: &ParamPath) -> Self {
        LinearModel(Linear::new(&path.pp("fc"), 784, 10, true).unwrap())
    }
}

impl ModuleT for LinearModel {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.0.forward(&x.flatten_from(1)?)
    }
}

fn schedule(epochs: usize) -> TaskSchedule {
    TaskSchedule {
        epochs,
        lr: 0.05,
        milestones: vec![1],
    }
}

fn config() -> TrainerConfig {
    TrainerConfig {
        batch_size: 16,
        ..TrainerConfig::default()
    }
}

/// Final parameters by name.
type Weights = BTreeMap<String, Vec<f32>>;
/// The rows of an accuracy matrix.
type Rows = Vec<Vec<Option<f64>>>;
/// What the trainer handed a strategy: task, replay memory, training-set size.
type Seen = Vec<(usize, Option<Dataset>, usize)>;

/// Runs `strategy` with a fresh linear model from `seed`; returns the final weights and the
/// accuracy rows.
fn run_linear(strategy: &mut dyn Strategy, seed: u64, scenario: &Scenario) -> (Weights, Rows) {
    let store = ParamStore::new(seed);
    let model = LinearModel::new(&store.root(&Device::Cpu));
    let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
    let run = ContinualTrainer::new(config())
        .unwrap()
        .run(&learner, strategy, scenario.tasks(), &schedule(2))
        .unwrap();
    let weights = store
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    (weights, run.accuracy.rows().to_vec())
}

/// Records what the trainer hands a strategy, and trains like fine-tuning.
#[derive(Default)]
struct Spy {
    seen: Rc<RefCell<Seen>>,
}

impl Strategy for Spy {
    fn name(&self) -> String {
        "spy".into()
    }
    fn begin_task(&mut self, _: &Learner<'_>, view: &TaskView<'_>, train: &Dataset) -> Result<()> {
        self.seen
            .borrow_mut()
            .push((view.task.id, view.replay.cloned(), train.len()));
        Ok(())
    }
    fn batch_loss(&self, _: &Learner<'_>, batch: &Batch, logits: &Tensor) -> Result<Tensor> {
        cross_entropy(logits, &batch.labels)
    }
}

fn images(data: &Dataset) -> HashSet<(u32, Vec<u8>)> {
    (0..data.len())
        .map(|i| (data.labels()[i], data.image(i).to_vec()))
        .collect()
}

#[test]
fn replay_memory_is_a_delta_sample_of_each_earlier_task() {
    let scenario = lifelong();
    let mut spy = Spy::default();
    run_linear(&mut spy, 1, &scenario);
    let seen = spy.seen.borrow();
    assert_eq!(seen.len(), 3);
    assert!(seen[0].1.is_none(), "nothing to replay before task 0");
    for (t, replay, train_len) in seen.iter() {
        assert_eq!(*train_len, scenario.tasks()[*t].train.len());
        let Some(replay) = replay else { continue };
        // |R_{<t}| = Σ_{i<t} round(δ·|D_i|), every replayed image from an earlier task.
        let expected: usize = scenario.tasks()[..*t]
            .iter()
            .map(|task| Keep::Fraction(0.2).of(task.train.len()))
            .sum();
        assert_eq!(replay.len(), expected, "task {t}");
        let earlier: HashSet<_> = scenario.tasks()[..*t]
            .iter()
            .flat_map(|task| images(&task.train))
            .collect();
        assert!(images(replay).is_subset(&earlier));
    }
    // R_{<2} extends R_{<1}: R_0 is drawn once and kept.
    let r1 = images(seen[1].1.as_ref().unwrap());
    let r2 = images(seen[2].1.as_ref().unwrap());
    assert!(r1.is_subset(&r2));
    // Same seed, same selection.
    let mut again = Spy::default();
    run_linear(&mut again, 1, &scenario);
    assert_eq!(again.seen.borrow()[2].1, seen[2].1);
}

#[test]
fn replay_and_joint_train_on_what_they_say() {
    let scenario = lifelong();
    let tasks = scenario.tasks();
    let replay = tasks[0].train.take_per_class(1);
    let view = TaskView {
        task: &tasks[1],
        earlier: &tasks[..1],
        replay: Some(&replay),
    };
    let with = ExperienceReplay.training_set(&view).unwrap();
    assert_eq!(with.len(), tasks[1].train.len() + replay.len());
    assert_eq!(FineTune.training_set(&view).unwrap(), tasks[1].train);
    // Joint: the distinct images of tasks 0 and 1 (shared classes bring the same images).
    let joint = Joint.training_set(&view).unwrap();
    let union: HashSet<_> = images(&tasks[0].train)
        .union(&images(&tasks[1].train))
        .cloned()
        .collect();
    assert_eq!(joint.len(), union.len());
    assert_eq!(images(&joint), union);
    assert!(joint.len() < tasks[0].train.len() + tasks[1].train.len());
}

#[test]
fn lifequant_without_penalty_or_replay_is_fine_tuning_in_both_modes() {
    // Item 21 of docs/methods/lifequant.md § Tested invariants: with λ = 0 and no replay in
    // the loss, code-faithful LifeQuant is fine-tuning bit for bit; paper mode with CE and
    // λ = 0 is experience replay.
    let scenario = lifelong();
    let code = LifeQuantConfig {
        mode: LifeQuantMode::CodeFaithful,
        lambda: 0.0,
        ..LifeQuantConfig::default()
    };
    let (a, rows_a) = run_linear(&mut LifeQuant::new(code).unwrap(), 3, &scenario);
    let (b, rows_b) = run_linear(&mut FineTune, 3, &scenario);
    assert_eq!(a, b);
    assert_eq!(rows_a, rows_b);
    let paper_ce = LifeQuantConfig {
        lambda: 0.0,
        ball: None,
        ..LifeQuantConfig::default()
    };
    let (c, _) = run_linear(&mut LifeQuant::new(paper_ce).unwrap(), 3, &scenario);
    let (d, _) = run_linear(&mut ExperienceReplay, 3, &scenario);
    assert_eq!(c, d);
    assert_ne!(a, c, "replay changes the run");
}

#[test]
fn lifequant_statistics_count_current_data_and_replay() {
    // Item 19 of docs/methods/lifequant.md § Tested invariants: the BaLL class counts at task t
    // are the label histogram of D_t ∪ R_{<t}.
    let scenario = lifelong();
    let mut spy = Spy::default();
    run_linear(&mut spy, 2, &scenario);
    let replay = spy.seen.borrow()[2].1.clone().unwrap();
    let mut lq = LifeQuant::new(LifeQuantConfig::default()).unwrap();
    run_linear(&mut lq, 2, &scenario);
    let mut histogram = ClassHistogram::new(10).unwrap();
    histogram.add_dataset(&scenario.tasks()[2].train).unwrap();
    histogram.add_dataset(&replay).unwrap();
    let expected: Vec<f64> = histogram.counts().iter().map(|&c| c as f64).collect();
    assert_eq!(lq.statistics().unwrap().counts(), expected.as_slice());
    // The drift is recorded per task: zero at task 0 (F = 0), positive later.
    assert_eq!(lq.drift().len(), 3);
    assert_eq!(lq.drift()[0], 0.0);
    assert!(
        lq.drift()[1] > 0.0 && lq.drift()[2] > 0.0,
        "{:?}",
        lq.drift()
    );
}

#[test]
fn a_strong_penalty_holds_the_fisher_weighted_drift_down() {
    // The H5 mechanism: the same seed and data order, with and without λ.
    let scenario = lifelong();
    let drift = |lambda| {
        let mut lq = LifeQuant::new(LifeQuantConfig {
            lambda,
            ..LifeQuantConfig::default()
        })
        .unwrap();
        run_linear(&mut lq, 4, &scenario);
        lq.drift()[1]
    };
    let (free, held) = (drift(0.0), drift(100.0));
    assert!(held < 0.5 * free, "λ = 100: {held}, λ = 0: {free}");
}

#[test]
fn the_proximal_update_is_stable_where_the_explicit_penalty_diverges() {
    // lr 0.05 with momentum 0.9: the explicit step diverges where 0.05·2λF > 3.8.
    let scenario = lifelong();
    let run = |lambda, update| {
        let mut lq = LifeQuant::new(LifeQuantConfig {
            lambda,
            update,
            ..LifeQuantConfig::default()
        })
        .unwrap();
        let store = ParamStore::new(4);
        let model = LinearModel::new(&store.root(&Device::Cpu));
        let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
        let run = ContinualTrainer::new(config()).unwrap().run(
            &learner,
            &mut lq,
            scenario.tasks(),
            &schedule(2),
        );
        (run.map(|r| r.accuracy.rows().to_vec()), lq.drift().to_vec())
    };
    let huge = 1e6;
    let (explicit, _) = run(huge, PenaltyUpdate::Gradient);
    assert!(
        matches!(explicit, Err(Error::NonFinite { .. })),
        "{explicit:?}"
    );
    let (proximal, held) = run(huge, PenaltyUpdate::Proximal);
    let (free_rows, free) = run(0.0, PenaltyUpdate::Proximal);
    assert!(proximal.is_ok());
    assert!(
        held[1] < 0.01 * free[1],
        "λ = 1e6: {held:?}, λ = 0: {free:?}"
    );
    // With λ = 0 the update rule is irrelevant: the same run bit for bit.
    let (gradient_rows, gradient_free) = run(0.0, PenaltyUpdate::Gradient);
    assert_eq!(free_rows.unwrap(), gradient_rows.unwrap());
    assert_eq!(free, gradient_free);
    // Where the explicit update is stable, both hold the drift down alike.
    let (_, explicit_small) = run(10.0, PenaltyUpdate::Gradient);
    let (_, proximal_small) = run(10.0, PenaltyUpdate::Proximal);
    assert!(explicit_small[1] < free[1] && proximal_small[1] < free[1]);
    let ratio = proximal_small[1] / explicit_small[1];
    assert!(
        (0.33..3.0).contains(&ratio),
        "{proximal_small:?} vs {explicit_small:?}"
    );
}

#[test]
fn fisher_is_a_mean_over_batches() {
    // Item 11 of docs/methods/lifequant.md § Tested invariants: F ≥ 0, and feeding the data
    // twice leaves F unchanged.
    let data = lifelong().tasks()[0].train.take_per_class(16);
    let store = ParamStore::new(9);
    let model = LinearModel::new(&store.root(&Device::Cpu));
    let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
    let once = fisher_diagonal(&learner, &data, 16, &cross_entropy).unwrap();
    let twice = fisher_diagonal(
        &learner,
        &data.concat(&[&data]).unwrap(),
        16,
        &cross_entropy,
    )
    .unwrap();
    for (name, f) in once.iter() {
        let a = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = twice
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a.iter().all(|&v| v >= 0.0));
        assert!(a.iter().any(|&v| v > 0.0));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1e-12) + 1e-12,
                "{name}: {x} vs {y}"
            );
        }
    }
    assert!(matches!(
        fisher_diagonal(&learner, &data.subset(&[]).unwrap(), 16, &cross_entropy),
        Err(Error::EmptyInput(_))
    ));
}

#[test]
fn ewc_keeps_one_penalty_per_finished_task_and_is_fine_tuning_at_lambda_zero() {
    let scenario = lifelong();
    let mut ewc = Ewc::new(EwcConfig::default()).unwrap();
    let (w_ewc, rows_ewc) = run_linear(&mut ewc, 6, &scenario);
    assert_eq!(ewc.penalties().len(), 3);
    let mut zero = Ewc::new(EwcConfig {
        lambda: 0.0,
        ..EwcConfig::default()
    })
    .unwrap();
    let (w_zero, _) = run_linear(&mut zero, 6, &scenario);
    let (w_ft, rows_ft) = run_linear(&mut FineTune, 6, &scenario);
    assert_eq!(w_zero, w_ft);
    assert_ne!(w_ewc, w_ft);
    // Task 0 has no penalty yet: its row is the same.
    assert_eq!(rows_ewc[0], rows_ft[0]);
    assert!(Ewc::new(EwcConfig {
        lambda: -1.0,
        ..EwcConfig::default()
    })
    .is_err());
}

#[test]
fn lwf_distils_the_old_classes_and_is_fine_tuning_at_alpha_zero() {
    let scenario = lifelong();
    let mut lwf = Lwf::new(LwfConfig::default()).unwrap();
    let (w_lwf, _) = run_linear(&mut lwf, 8, &scenario);
    let mut off = Lwf::new(LwfConfig {
        alpha: 0.0,
        ..LwfConfig::default()
    })
    .unwrap();
    let (w_off, _) = run_linear(&mut off, 8, &scenario);
    let (w_ft, _) = run_linear(&mut FineTune, 8, &scenario);
    assert_eq!(w_off, w_ft);
    assert_ne!(w_lwf, w_ft);
    // The distillation term: zero for identical logits, positive otherwise.
    let z = Tensor::new(&[[1.0f32, -2.0, 0.5], [0.0, 3.0, -1.0]], &Device::Cpu).unwrap();
    let same = distillation_loss(&z, &z, 2.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(same.abs() < 1e-6, "{same}");
    let other = (&z * 0.5).unwrap();
    assert!(
        distillation_loss(&other, &z, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    );
    assert!(Lwf::new(LwfConfig {
        temperature: 0.0,
        ..LwfConfig::default()
    })
    .is_err());
}

#[test]
fn same_seed_same_run_on_qresnet() {
    let scenario = lifelong();
    let run = |seed| {
        let store = ParamStore::new(seed);
        let net = QResNetConfig {
            widths: [2, 2, 4],
            ..QResNetConfig::smoke()
        };
        let model = QResNet::new(&store.root(&Device::Cpu), &net).unwrap();
        let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
        let mut lq = LifeQuant::new(LifeQuantConfig::default()).unwrap();
        let record = ContinualTrainer::new(config())
            .unwrap()
            .run(&learner, &mut lq, scenario.tasks(), &schedule(1))
            .unwrap();
        (
            record.accuracy.rows().to_vec(),
            lq.drift().to_vec(),
            store.tensors().unwrap().len(),
        )
    };
    assert_eq!(run(11), run(11));
}

#[test]
fn run_from_a_checkpoint_measures_the_first_row_before_training() {
    let scenario = lifelong();
    let store = ParamStore::new(12);
    let model = LinearModel::new(&store.root(&Device::Cpu));
    let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
    let trainer = ContinualTrainer::new(config()).unwrap();
    let before = learner
        .evaluate(&scenario.tasks()[0].test, 64)
        .unwrap()
        .overall()
        .unwrap();
    let mut spy = Spy::default();
    let record = trainer
        .run_from(&learner, &mut spy, scenario.tasks(), 1, &schedule(1))
        .unwrap();
    assert_eq!(record.accuracy.get(0, 0), Some(before));
    assert_eq!(record.tasks.len(), 2);
    assert_eq!(record.class_accuracy.len(), 3);
    // Task 0 entered the replay memory without being trained.
    let seen = spy.seen.borrow();
    assert_eq!(seen[0].0, 1);
    assert_eq!(
        seen[0].1.as_ref().unwrap().len(),
        Keep::Fraction(0.2).of(scenario.tasks()[0].train.len())
    );
    assert!(matches!(
        trainer.run_from(&learner, &mut FineTune, scenario.tasks(), 3, &schedule(1)),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        trainer.run(&learner, &mut FineTune, &[], &schedule(1)),
        Err(Error::EmptyInput(_))
    ));
}

#[test]
fn validation_images_are_evaluated_beside_the_tests_without_changing_the_run() {
    let params = LifelongConfig {
        train_per_class: Some(20),
        validation_fraction: 0.25,
        ..LifelongConfig::reproduction()
    };
    let scenario = Scenario::lifelong(&fixture(), &params).unwrap();
    let run = |tasks: &[qcl_continual::Task]| {
        let store = ParamStore::new(21);
        let model = LinearModel::new(&store.root(&Device::Cpu));
        let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
        let mut lq = LifeQuant::new(LifeQuantConfig::default()).unwrap();
        let record = ContinualTrainer::new(config())
            .unwrap()
            .run(&learner, &mut lq, tasks, &schedule(1))
            .unwrap();
        (
            record,
            lq.fisher_max().to_vec(),
            lq.proxq().unwrap().fisher().max().unwrap(),
        )
    };
    let (record, fisher_max, last_max) = run(scenario.tasks());
    let validation = record
        .validation
        .expect("every task holds validation images");
    // The same run with the validation images as test sets: its test matrix is the first
    // run's validation matrix (evaluating does not touch training).
    let swapped: Vec<_> = scenario
        .tasks()
        .iter()
        .map(|t| qcl_continual::Task {
            test: t.validation.clone().unwrap(),
            validation: None,
            ..t.clone()
        })
        .collect();
    let (other, _, _) = run(&swapped);
    assert_eq!(validation.rows(), other.accuracy.rows());
    assert!(other.validation.is_none());
    assert_ne!(validation.rows(), record.accuracy.rows());
    // One F_max per task: 0 without replay at task 0, then the penalty's own maximum.
    assert_eq!(fisher_max.len(), 3);
    assert_eq!(fisher_max[0], 0.0);
    assert!(fisher_max[2] > 0.0);
    assert_eq!(fisher_max[2], last_max);
    // A fraction outside [0, 1) is refused.
    for fraction in [1.0, -0.1, f64::NAN] {
        let params = LifelongConfig {
            validation_fraction: fraction,
            ..params
        };
        assert!(matches!(
            Scenario::lifelong(&fixture(), &params),
            Err(Error::InvalidParameter { .. })
        ));
    }
}

#[test]
fn class_accuracy_counts_each_class_once_over_overlapping_tasks() {
    let scenario = lifelong();
    let (_, rows) = run_linear(&mut FineTune, 13, &scenario);
    assert!(rows[2].iter().all(Option::is_some));
    let store = ParamStore::new(13);
    let model = LinearModel::new(&store.root(&Device::Cpu));
    let learner = Learner::new(&model, &store, &Device::Cpu, Normalization::UnitInterval);
    let record = ContinualTrainer::new(config())
        .unwrap()
        .run(&learner, &mut FineTune, scenario.tasks(), &schedule(1))
        .unwrap();
    let last = &record.class_accuracy[2];
    // Every class's test images are counted exactly once, although tasks share classes.
    assert!(last.total.iter().all(|&n| n == 10), "{:?}", last.total);
    // Task accuracies are the class-set recalls.
    for (s, task) in scenario.tasks().iter().enumerate() {
        let from_classes = last.over(&task.classes).unwrap();
        assert!((record.accuracy.get(2, s).unwrap() - from_classes).abs() < 1e-12);
    }
    let mut merged = ClassAccuracy::new(3);
    merged
        .merge(&ClassAccuracy {
            correct: vec![1, 0, 2],
            total: vec![2, 1, 2],
        })
        .unwrap();
    assert_eq!(merged.overall(), Some(0.6));
    assert_eq!(merged.over(&[1]), Some(0.0));
    assert_eq!(ClassAccuracy::new(2).overall(), None);
    assert!(merged.merge(&ClassAccuracy::new(4)).is_err());
}

#[test]
fn bad_settings_are_typed_errors() {
    assert!(matches!(
        ContinualTrainer::new(TrainerConfig {
            batch_size: 0,
            ..TrainerConfig::default()
        }),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(ContinualTrainer::new(TrainerConfig {
        momentum: -0.5,
        ..TrainerConfig::default()
    })
    .is_err());
    assert!(ContinualTrainer::new(TrainerConfig {
        replay_keep: Keep::Fraction(1.5),
        ..TrainerConfig::default()
    })
    .is_err());
    assert!(LifeQuant::new(LifeQuantConfig {
        lambda: f64::NAN,
        ..LifeQuantConfig::default()
    })
    .is_err());
    assert!(LifeQuant::new(LifeQuantConfig {
        fisher_batch_size: 0,
        ..LifeQuantConfig::default()
    })
    .is_err());
    let bad = TaskSchedule {
        epochs: 1,
        lr: -1.0,
        milestones: vec![],
    };
    assert!(bad.lr_at(0).is_err());
}
