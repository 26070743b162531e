//! Continual-learning scenarios: a sequence of tasks, each with its train and test images and
//! its classes. A scenario is data, not a training loop.
//!
//! (Over 600 lines: the four constructors with their settings, the `Task` they all build and
//! check, the scenario's description and the online stream over any scenario share one set of
//! per-class helpers; about 270 lines are doc comments.)
//!
//! | constructor | tasks | labels | task id at test time |
//! |---|---|---|---|
//! | [`Scenario::class_incremental`] | disjoint class groups (Split-MNIST, Split-FMNIST 5×2) | global (one head over all classes) | no |
//! | [`Scenario::task_incremental`] | the same class groups | remapped per task to `0..k` (one head per task) | yes |
//! | [`Scenario::lifelong`] | LifeQuant's sliding class window (overlapping tasks) | global | no |
//! | [`Scenario::permuted`] | all classes, one fixed pixel permutation per task | global | no |
//!
//! [`Scenario::stream`] turns any scenario into one online pass of mini-batches, task after
//! task.

use std::collections::BTreeSet;
use std::ops::Range;

use candle_core::Device;
use qcl_data::{Batch, BatchConfig, BatchOrder, Batches, Dataset, Normalization, SplitDataset};
use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

/// Order in which classes are dealt out to tasks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ClassOrder {
    /// Classes `0, 1, …, C−1` (the usual Split-MNIST order: {0,1}, {2,3}, …). The default.
    #[default]
    Natural,
    /// A permutation of all classes drawn from this seed.
    Shuffled(Seed),
    /// This exact order; it may name a subset of the classes, each at most once.
    Explicit(Vec<u32>),
}

impl ClassOrder {
    /// The order for a data set of `num_classes` classes.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an explicit order naming a class that does not exist or
    /// one class twice; [`Error::EmptyInput`] for an empty explicit order.
    pub fn resolve(&self, num_classes: usize) -> Result<Vec<u32>> {
        match self {
            ClassOrder::Natural => Ok((0..num_classes as u32).collect()),
            ClassOrder::Shuffled(seed) => Ok(seed
                .rng()
                .permutation(num_classes)
                .into_iter()
                .map(|c| c as u32)
                .collect()),
            ClassOrder::Explicit(order) => {
                if order.is_empty() {
                    return Err(Error::EmptyInput("explicit class order".into()));
                }
                let mut seen = vec![false; num_classes];
                for &c in order {
                    let slot = seen.get_mut(c as usize).ok_or_else(|| {
                        Error::invalid_parameter(
                            "class_order",
                            format!("class {c} does not exist (the data set has {num_classes})"),
                        )
                    })?;
                    if *slot {
                        return Err(Error::invalid_parameter(
                            "class_order",
                            format!("class {c} appears twice"),
                        ));
                    }
                    *slot = true;
                }
                Ok(order.clone())
            }
        }
    }
}

/// Parameters of the class- and task-incremental splits.
///
/// The default is the 5×2 split of a 10-class set (Split-MNIST, Split-FMNIST): tasks
/// {0,1}, {2,3}, {4,5}, {6,7}, {8,9}.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitConfig {
    /// Classes per task (default 2). The class order must split into whole tasks.
    pub classes_per_task: usize,
    /// Order in which the classes are dealt out (default [`ClassOrder::Natural`]).
    pub class_order: ClassOrder,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            classes_per_task: 2,
            class_order: ClassOrder::Natural,
        }
    }
}

/// Parameters of LifeQuant's lifelong class-shift generator (Chen, Yang & Chen, ICCV 2023;
/// docs/methods/lifequant.md § Lifelong class shift).
///
/// With C classes, T tasks and diminish rate d: window `n = ⌊C / (1 + d·(T−1))⌋`, shift
/// `s = ⌊n·d⌋`; task `i < T−1` owns classes `π[i·s .. i·s+n]` of a seeded class permutation π,
/// the last task owns `π[(T−1)·s .. C]` (everything left, so it may hold more than n classes).
/// The default is the paper's CIFAR-100-LL setting (T = 3, d = 0.25, seed 123, no
/// subsampling); [`LifelongConfig::reproduction`] is the scaled-down Fashion-MNIST/MNIST run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LifelongConfig {
    /// Number of tasks T (default 3).
    pub num_tasks: usize,
    /// Fraction d of a task's classes that leave at each task switch, in (0, 1) (default 0.25).
    pub diminish_rate: f64,
    /// Seed of the class permutation π (default 123, drawn with [`Seed`], not numpy, so π
    /// differs from the paper's); record [`Scenario::class_order`] with the results.
    pub class_seed: Seed,
    /// Keep at most this many training images per class, drawn once with `subsample_seed`
    /// before the tasks are built, so a class shared by two tasks brings the same images into
    /// both (default `None`: all images). The test split is always kept whole.
    pub train_per_class: Option<usize>,
    /// Seed of the per-class training subsample (default 123).
    pub subsample_seed: Seed,
    /// Share of each class's training images (after subsampling) held out as validation
    /// images, in `[0, 1)` (default 0: none). The draw is per class, seeded by
    /// `subsample_seed.child_named("validation")`, and made once before the tasks are built,
    /// so an image held out for one task is never trained on by another that shares its
    /// class. Each task then carries the held-out images of its classes in
    /// [`Task::validation`], which [`ContinualTrainer`](crate::ContinualTrainer) evaluates
    /// beside the test sets; hyperparameters are chosen on them, never on the test split.
    pub validation_fraction: f64,
}

impl Default for LifelongConfig {
    fn default() -> Self {
        LifelongConfig {
            num_tasks: 3,
            diminish_rate: 0.25,
            class_seed: Seed::new(123),
            train_per_class: None,
            subsample_seed: Seed::new(123),
            validation_fraction: 0.0,
        }
    }
}

impl LifelongConfig {
    /// The scaled-down reproduction on a 10-class set (docs/methods/lifequant.md § Scaled-down
    /// experiment): T = 3, d = 0.5 (n = 5, s = 2: tasks {π0..π4}, {π2..π6}, {π4..π9}), 800
    /// training images per class.
    pub fn reproduction() -> Self {
        LifelongConfig {
            diminish_rate: 0.5,
            train_per_class: Some(800),
            ..Default::default()
        }
    }

    /// The stress variant of [`reproduction`](Self::reproduction): d = 0.75 (n = 4, s = 3).
    pub fn reproduction_stress() -> Self {
        LifelongConfig {
            diminish_rate: 0.75,
            ..Self::reproduction()
        }
    }
}

/// Geometry of the lifelong generator: which positions of the class permutation each task owns.
///
/// ```
/// use qcl_continual::LifelongWindows;
/// let w = LifelongWindows::new(10, 3, 0.5)?;
/// assert_eq!((w.window, w.shift), (5, 2));
/// assert_eq!(w.ranges, vec![0..5, 2..7, 4..10]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifelongWindows {
    /// Window size n = ⌊C / (1 + d·(T−1))⌋.
    pub window: usize,
    /// Shift s = ⌊n·d⌋ between consecutive windows (= classes dropped per switch).
    pub shift: usize,
    /// Positions in the class permutation owned by each task.
    pub ranges: Vec<Range<usize>>,
}

impl LifelongWindows {
    /// The windows for `num_classes` classes, `num_tasks` tasks and diminish rate `d`.
    ///
    /// The floors are taken on `f64` arithmetic, so the windows match the paper's benchmark
    /// (docs/methods/lifequant.md § Lifelong class shift).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for no task, `d` outside the open interval (0, 1) (d = 1
    /// would be disjoint tasks: use [`Scenario::class_incremental`]), a window of no class, or
    /// a shift of zero with more than one task (no class would ever leave).
    pub fn new(num_classes: usize, num_tasks: usize, diminish_rate: f64) -> Result<Self> {
        if num_tasks == 0 {
            return Err(Error::invalid_parameter(
                "num_tasks",
                "a scenario needs at least one task",
            ));
        }
        if !(diminish_rate > 0.0 && diminish_rate < 1.0) {
            return Err(Error::invalid_parameter(
                "diminish_rate",
                format!("must lie in the open interval (0, 1), got {diminish_rate}"),
            ));
        }
        let window =
            (num_classes as f64 / (1.0 + diminish_rate * (num_tasks - 1) as f64)).floor() as usize;
        if window == 0 {
            return Err(Error::invalid_parameter(
                "num_tasks",
                format!(
                    "{num_tasks} tasks at diminish rate {diminish_rate} leave a window of no \
                     class out of {num_classes}"
                ),
            ));
        }
        let shift = (window as f64 * diminish_rate).floor() as usize;
        if shift == 0 && num_tasks > 1 {
            return Err(Error::invalid_parameter(
                "diminish_rate",
                format!(
                    "{diminish_rate} of a {window}-class window drops no class at a task \
                     switch; raise it to at least {:.4}",
                    1.0 / window as f64
                ),
            ));
        }
        let ranges = (0..num_tasks)
            .map(|i| {
                let start = i * shift;
                let end = if i + 1 == num_tasks {
                    num_classes
                } else {
                    start + window
                };
                start..end
            })
            .collect();
        Ok(LifelongWindows {
            window,
            shift,
            ranges,
        })
    }
}

/// Parameters of permuted MNIST-style scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermutedConfig {
    /// Number of tasks (default 10).
    pub num_tasks: usize,
    /// Seed of the pixel permutations; task `i` uses `seed.child(i)` (default 0).
    pub seed: Seed,
    /// Task 0 sees the original images (identity permutation), as in van de Ven & Tolias'
    /// "three scenarios" benchmarks; when false every task, task 0 included, is permuted at
    /// random, as in Avalanche (default true).
    pub first_task_identity: bool,
}

impl Default for PermutedConfig {
    fn default() -> Self {
        PermutedConfig {
            num_tasks: 10,
            seed: Seed::new(0),
            first_task_identity: true,
        }
    }
}

/// What kind of scenario a [`Scenario`] is; it decides the label space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScenarioKind {
    /// Disjoint class groups, global labels, single head, no task id.
    ClassIncremental,
    /// Disjoint class groups, labels remapped to `0..k` per task, one head per task, task id
    /// given.
    TaskIncremental,
    /// LifeQuant's overlapping sliding class windows, global labels, single head, no task id.
    Lifelong,
    /// Every class in every task, pixels permuted per task (domain-incremental), global labels,
    /// no task id.
    Permuted,
}

/// One task: its classes and its train and test images.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Position of the task in the scenario (`0, 1, …`).
    pub id: usize,
    /// Global classes of the task, in the scenario's class order. In a task-incremental
    /// scenario the local label of `classes[k]` is `k`.
    pub classes: Vec<u32>,
    /// The task label given to a multi-head model: `Some(id)` in task-incremental scenarios,
    /// `None` where no task id is available at test time.
    pub task_label: Option<usize>,
    /// Training images of the task's classes (labels as described by [`ScenarioKind`]).
    pub train: Dataset,
    /// Test images of the task's classes, labelled like `train`.
    pub test: Dataset,
    /// Held-out training images of the task's classes, labelled like `train`, for choosing
    /// hyperparameters (`None` when the scenario holds none out; see
    /// [`LifelongConfig::validation_fraction`]).
    pub validation: Option<Dataset>,
    /// The pixel permutation of a permuted task: output position `p` takes input position
    /// `permutation[p]` of each `H·W` channel plane. `None` for unpermuted tasks.
    pub pixel_permutation: Option<Vec<usize>>,
}

impl Task {
    /// The label a sample of global class `class` carries in this task's datasets: its position
    /// in [`classes`](Task::classes) in a task-incremental scenario, `class` itself otherwise.
    /// `None` if the class is not part of the task.
    pub fn label_of(&self, class: u32) -> Option<u32> {
        let position = self.classes.iter().position(|&c| c == class)?;
        Some(if self.task_label.is_some() {
            position as u32
        } else {
            class
        })
    }

    /// The global class of a label found in this task's datasets (inverse of
    /// [`label_of`](Task::label_of)).
    pub fn class_of(&self, label: u32) -> Option<u32> {
        if self.task_label.is_some() {
            self.classes.get(label as usize).copied()
        } else {
            self.classes.contains(&label).then_some(label)
        }
    }
}

/// A continual-learning scenario: tasks in training order.
///
/// ```
/// use qcl_continual::{Scenario, SplitConfig};
/// use qcl_data::SplitDataset;
/// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
/// let data = SplitDataset::load(path)?;
/// // Split-FMNIST 5×2, class-incremental: labels stay global, one head over 10 classes.
/// let scenario = Scenario::class_incremental(&data, &SplitConfig::default())?;
/// assert_eq!(scenario.tasks().len(), 5);
/// assert_eq!(scenario.tasks()[1].classes, vec![2, 3]);
/// assert!(scenario.tasks()[1].test.labels().iter().all(|&y| y == 2 || y == 3));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    kind: ScenarioKind,
    class_order: Vec<u32>,
    num_classes: usize,
    tasks: Vec<Task>,
}

impl Scenario {
    /// Class-incremental split: the class order is cut into groups of `classes_per_task`, task
    /// `i` holds every train and test image of group `i`; labels stay global (a single head
    /// over all classes of the data set), no task id.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `classes_per_task` of zero, more classes per task than
    /// the order holds, an order that does not split into whole tasks, or a bad explicit order;
    /// [`Error::EmptyInput`] for a task without train or test images.
    pub fn class_incremental(data: &SplitDataset, config: &SplitConfig) -> Result<Self> {
        Self::split(data, config, ScenarioKind::ClassIncremental)
    }

    /// Task-incremental split: the same tasks as
    /// [`class_incremental`](Scenario::class_incremental), but labels are remapped per task,
    /// `classes[k] → k` (one head of `classes_per_task` outputs per task), and each task
    /// carries its task label (`Some(id)`).
    ///
    /// ```
    /// use qcl_continual::{Scenario, SplitConfig};
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/mnist.safetensors");
    /// let data = qcl_data::SplitDataset::load(path)?;
    /// let scenario = Scenario::task_incremental(&data, &SplitConfig::default())?;
    /// let task = &scenario.tasks()[2]; // classes 4 and 5
    /// assert_eq!(task.task_label, Some(2));
    /// assert_eq!((task.label_of(4), task.class_of(1)), (Some(0), Some(5)));
    /// assert!(task.train.labels().iter().all(|&y| y < 2));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`class_incremental`](Scenario::class_incremental).
    pub fn task_incremental(data: &SplitDataset, config: &SplitConfig) -> Result<Self> {
        Self::split(data, config, ScenarioKind::TaskIncremental)
    }

    fn split(data: &SplitDataset, config: &SplitConfig, kind: ScenarioKind) -> Result<Self> {
        let num_classes = data.train.num_classes();
        let per_task = config.classes_per_task;
        if per_task == 0 {
            return Err(Error::invalid_parameter(
                "classes_per_task",
                "must be at least 1",
            ));
        }
        if per_task > num_classes {
            return Err(Error::invalid_parameter(
                "classes_per_task",
                format!(
                    "{per_task} classes per task, but {} has only {num_classes}",
                    data.train.name()
                ),
            ));
        }
        let order = config.class_order.resolve(num_classes)?;
        if !order.len().is_multiple_of(per_task) {
            return Err(Error::invalid_parameter(
                "classes_per_task",
                format!(
                    "{} classes do not split into tasks of {per_task}; give an explicit class \
                     order of a multiple of {per_task} classes",
                    order.len()
                ),
            ));
        }
        let tasks = order
            .chunks(per_task)
            .enumerate()
            .map(|(id, classes)| {
                let (train, test) = match kind {
                    ScenarioKind::TaskIncremental => (
                        relabel(&data.train, classes)?,
                        relabel(&data.test, classes)?,
                    ),
                    _ => (
                        data.train.select_classes(classes)?,
                        data.test.select_classes(classes)?,
                    ),
                };
                let task_label = (kind == ScenarioKind::TaskIncremental).then_some(id);
                Task::checked(id, classes.to_vec(), task_label, train, test, None)
            })
            .collect::<Result<_>>()?;
        Ok(Scenario {
            kind,
            class_order: order,
            num_classes,
            tasks,
        })
    }

    /// LifeQuant's lifelong class-shift scenario (docs/methods/lifequant.md § Lifelong class
    /// shift, § Scaled-down experiment): overlapping windows over a seeded class permutation
    /// (see [`LifelongConfig`], [`LifelongWindows`]). Task `i` holds **all** train images of
    /// its classes (after the optional per-class subsample), so a class shared by two tasks
    /// brings the same images into both; its test set is built the same way from the test
    /// split. Labels stay global (one head over all classes), no task id.
    ///
    /// ```
    /// use qcl_continual::{LifelongConfig, Scenario};
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
    /// let data = qcl_data::SplitDataset::load(path)?;
    /// let scenario = Scenario::lifelong(&data, &LifelongConfig::reproduction())?;
    /// let pi = scenario.class_order();
    /// assert_eq!(scenario.tasks()[1].classes, pi[2..7].to_vec());
    /// assert_eq!(scenario.tasks()[2].classes.len(), 6);
    /// assert_eq!(scenario.orphaned_after(0), pi[0..2].to_vec());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`LifelongWindows::new`] for the geometry; [`Error::InvalidParameter`] for
    /// `train_per_class` of zero; [`Error::EmptyInput`] for a task without train or test
    /// images.
    pub fn lifelong(data: &SplitDataset, config: &LifelongConfig) -> Result<Self> {
        let num_classes = data.train.num_classes();
        let windows = LifelongWindows::new(num_classes, config.num_tasks, config.diminish_rate)?;
        let order = ClassOrder::Shuffled(config.class_seed).resolve(num_classes)?;
        let train = match config.train_per_class {
            Some(per_class) => sample_per_class(&data.train, per_class, config.subsample_seed)?,
            None => data.train.clone(),
        };
        let (train, validation) = hold_out_per_class(
            &train,
            config.validation_fraction,
            config.subsample_seed.child_named("validation"),
        )?;
        let tasks = windows
            .ranges
            .iter()
            .enumerate()
            .map(|(id, range)| {
                let classes = &order[range.clone()];
                let mut task = Task::checked(
                    id,
                    classes.to_vec(),
                    None,
                    train.select_classes(classes)?,
                    data.test.select_classes(classes)?,
                    None,
                )?;
                if let Some(held_out) = &validation {
                    let held_out = held_out.select_classes(classes)?;
                    // Classes of one image hold none out; a task of only such classes would
                    // fail late, at its first evaluation.
                    if held_out.is_empty() {
                        return Err(Error::EmptyInput(format!(
                            "task {id} (classes {classes:?}) holds out no validation image: \
                             its classes have fewer than 2 training images each"
                        )));
                    }
                    task.validation = Some(held_out);
                }
                Ok(task)
            })
            .collect::<Result<_>>()?;
        Ok(Scenario {
            kind: ScenarioKind::Lifelong,
            class_order: order,
            num_classes,
            tasks,
        })
    }

    /// Permuted scenario (permuted MNIST): every task holds all train and test images, with
    /// one fixed permutation of the `H·W` pixel positions applied to every image (the same
    /// permutation to each channel plane). Labels stay global, no task id (the
    /// domain-incremental setting). Each task holds its own permuted copy of the data, so the
    /// scenario takes `num_tasks` times the data set's memory (about 55 MB per task for all of
    /// MNIST).
    ///
    /// ```
    /// use qcl_continual::{PermutedConfig, Scenario};
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/mnist.safetensors");
    /// let data = qcl_data::SplitDataset::load(path)?;
    /// let config = PermutedConfig { num_tasks: 3, ..Default::default() };
    /// let scenario = Scenario::permuted(&data, &config)?;
    /// assert_eq!(scenario.tasks()[0].train, data.train); // task 0: the original images
    /// assert_eq!(scenario.tasks()[2].train.labels(), data.train.labels());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for no task; [`Error::EmptyInput`] for an empty train or
    /// test split.
    pub fn permuted(data: &SplitDataset, config: &PermutedConfig) -> Result<Self> {
        if config.num_tasks == 0 {
            return Err(Error::invalid_parameter(
                "num_tasks",
                "a scenario needs at least one task",
            ));
        }
        let num_classes = data.train.num_classes();
        let classes: Vec<u32> = (0..num_classes as u32).collect();
        let plane = data.train.shape().height * data.train.shape().width;
        let tasks = (0..config.num_tasks)
            .map(|id| {
                let (train, test, permutation) = if id == 0 && config.first_task_identity {
                    (data.train.clone(), data.test.clone(), None)
                } else {
                    let permutation = config.seed.child(id as u64).rng().permutation(plane);
                    (
                        permute_pixels(&data.train, &permutation)?,
                        permute_pixels(&data.test, &permutation)?,
                        Some(permutation),
                    )
                };
                Task::checked(id, classes.clone(), None, train, test, permutation)
            })
            .collect::<Result<_>>()?;
        Ok(Scenario {
            kind: ScenarioKind::Permuted,
            class_order: classes,
            num_classes,
            tasks,
        })
    }

    /// What kind of scenario this is.
    pub fn kind(&self) -> ScenarioKind {
        self.kind
    }

    /// The tasks, in training order.
    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    /// The tasks, by value.
    pub fn into_tasks(self) -> Vec<Task> {
        self.tasks
    }

    /// Number of tasks.
    pub fn num_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Classes of the underlying data set: the width of a single head.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The class order the tasks were cut from (the class permutation π of a lifelong
    /// scenario, to be recorded with its results).
    pub fn class_order(&self) -> &[u32] {
        &self.class_order
    }

    /// Classes of task `task` that occur in no later task ("orphaned" after it); empty for an
    /// unknown task.
    pub fn orphaned_after(&self, task: usize) -> Vec<u32> {
        let Some(current) = self.tasks.get(task) else {
            return Vec::new();
        };
        let later: BTreeSet<u32> = self.tasks[task + 1..]
            .iter()
            .flat_map(|t| t.classes.iter().copied())
            .collect();
        current
            .classes
            .iter()
            .copied()
            .filter(|c| !later.contains(c))
            .collect()
    }

    /// What the scenario is made of, for the JSON output of a run: kind, class order (the
    /// permutation π to record), and each task's classes, task label and sizes.
    ///
    /// ```
    /// use qcl_continual::{LifelongConfig, Scenario};
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
    /// let data = qcl_data::SplitDataset::load(path)?;
    /// let scenario = Scenario::lifelong(&data, &LifelongConfig::reproduction())?;
    /// let json = serde_json::to_string(&scenario.description()).unwrap();
    /// assert!(json.starts_with(r#"{"kind":"lifelong","num_classes":10,"class_order":["#));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn description(&self) -> ScenarioDescription {
        ScenarioDescription {
            kind: self.kind,
            num_classes: self.num_classes,
            class_order: self.class_order.clone(),
            tasks: self
                .tasks
                .iter()
                .map(|t| TaskDescription {
                    id: t.id,
                    classes: t.classes.clone(),
                    task_label: t.task_label,
                    train_images: t.train.len(),
                    test_images: t.test.len(),
                    validation_images: t.validation.as_ref().map(Dataset::len),
                    permuted: t.pixel_permutation.is_some(),
                })
                .collect(),
        }
    }

    /// Classes seen in some task but absent from the last one (LifeQuant's orphan classes,
    /// whose test accuracy after the last task measures forgetting of dropped classes,
    /// docs/methods/lifequant.md § Metrics: evaluate on
    /// `data.test.select_classes(&scenario.orphan_classes())`), sorted.
    pub fn orphan_classes(&self) -> Vec<u32> {
        let Some(last) = self.tasks.last() else {
            return Vec::new();
        };
        let seen: BTreeSet<u32> = self
            .tasks
            .iter()
            .flat_map(|t| t.classes.iter().copied())
            .collect();
        seen.into_iter()
            .filter(|c| !last.classes.contains(c))
            .collect()
    }

    /// One online pass over the scenario: the training images of task 0 in mini-batches of
    /// `options.batch_size`, then those of task 1, and so on; every training image is seen
    /// exactly once.
    ///
    /// ```
    /// use qcl_continual::{Scenario, SplitConfig, StreamConfig};
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
    /// let data = qcl_data::SplitDataset::load(path)?;
    /// let scenario = Scenario::class_incremental(&data, &SplitConfig::default())?;
    /// let mut seen = 0;
    /// for item in scenario.stream(StreamConfig::default(), &candle_core::Device::Cpu)? {
    ///     let item = item?;
    ///     assert!(item.batch.indices.len() <= 10);
    ///     seen += item.batch.indices.len();
    /// }
    /// assert_eq!(seen, data.train.len());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a batch size of zero or a bad normalisation.
    pub fn stream(&self, options: StreamConfig, device: &Device) -> Result<Stream<'_>> {
        let check = BatchConfig {
            batch_size: options.batch_size,
            normalization: options.normalization,
            ..Default::default()
        };
        // Validate the options once up front, so that a bad option fails here, not mid-stream
        // (every constructor makes at least one task).
        if let Some(first) = self.tasks.first() {
            first.train.batches(check, device)?;
        }
        Ok(Stream {
            scenario: self,
            options,
            device: device.clone(),
            task: 0,
            current: None,
        })
    }
}

impl Task {
    fn checked(
        id: usize,
        classes: Vec<u32>,
        task_label: Option<usize>,
        train: Dataset,
        test: Dataset,
        pixel_permutation: Option<Vec<usize>>,
    ) -> Result<Self> {
        for (part, ds) in [("train", &train), ("test", &test)] {
            if ds.is_empty() {
                return Err(Error::EmptyInput(format!(
                    "task {id} (classes {classes:?}) has no {part} image in {}",
                    ds.name()
                )));
            }
        }
        Ok(Task {
            id,
            classes,
            task_label,
            train,
            test,
            validation: None,
            pixel_permutation,
        })
    }
}

/// A serialisable summary of a [`Scenario`] (see [`Scenario::description`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScenarioDescription {
    /// The kind of scenario.
    pub kind: ScenarioKind,
    /// Classes of the data set (width of a single head).
    pub num_classes: usize,
    /// The class order the tasks were cut from.
    pub class_order: Vec<u32>,
    /// One entry per task.
    pub tasks: Vec<TaskDescription>,
}

/// One task of a [`ScenarioDescription`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDescription {
    /// Position of the task.
    pub id: usize,
    /// Global classes of the task.
    pub classes: Vec<u32>,
    /// Task label given to a multi-head model, if any.
    pub task_label: Option<usize>,
    /// Number of training images.
    pub train_images: usize,
    /// Number of test images.
    pub test_images: usize,
    /// Number of held-out validation images, if the task has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_images: Option<usize>,
    /// Whether the task's pixels are permuted.
    pub permuted: bool,
}

/// Options of [`Scenario::stream`], each with a default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamConfig {
    /// Images per batch (default 10, the usual online continual-learning setting). The last
    /// batch of a task may be smaller; batches never mix tasks.
    pub batch_size: usize,
    /// Order within each task: task `i` is shuffled with `seed.child(i)`, or read in data set
    /// order when `None` (default `Some(Seed::new(0))`).
    pub shuffle_seed: Option<Seed>,
    /// Pixel normalisation (default `[0, 1]`).
    pub normalization: Normalization,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            batch_size: 10,
            shuffle_seed: Some(Seed::new(0)),
            normalization: Normalization::UnitInterval,
        }
    }
}

/// One mini-batch of an online stream.
#[derive(Debug, Clone)]
pub struct StreamBatch {
    /// Id of the task the batch belongs to.
    pub task: usize,
    /// The batch; `batch.indices` index the task's `train` set.
    pub batch: Batch,
}

/// Iterator of [`Scenario::stream`].
#[derive(Debug)]
pub struct Stream<'a> {
    scenario: &'a Scenario,
    options: StreamConfig,
    device: Device,
    task: usize,
    current: Option<Batches<'a>>,
}

impl Iterator for Stream<'_> {
    type Item = Result<StreamBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(batches) = &mut self.current {
                if let Some(batch) = batches.next() {
                    let task = self.task;
                    return Some(batch.map(|batch| StreamBatch { task, batch }));
                }
                self.current = None;
                self.task += 1;
            }
            let task = self.scenario.tasks.get(self.task)?;
            let order = match self.options.shuffle_seed {
                Some(seed) => BatchOrder::Shuffled(seed.child(self.task as u64)),
                None => BatchOrder::Sequential,
            };
            let options = BatchConfig {
                batch_size: self.options.batch_size,
                order,
                normalization: self.options.normalization,
                drop_last: false,
            };
            match task.train.batches(options, &self.device) {
                Ok(batches) => self.current = Some(batches),
                Err(e) => {
                    // Stop after reporting the error rather than repeating it forever.
                    self.task = self.scenario.tasks.len();
                    return Some(Err(e));
                }
            }
        }
    }
}

/// At most `per_class` images of each class, drawn without replacement with `seed` (class `c`
/// from `seed.child(c)`, so one class's draw does not depend on the others), kept in data set
/// order. Classes with fewer images keep all of them.
///
/// # Errors
/// [`Error::InvalidParameter`] for `per_class` of zero.
pub fn sample_per_class(data: &Dataset, per_class: usize, seed: Seed) -> Result<Dataset> {
    if per_class == 0 {
        return Err(Error::invalid_parameter(
            "train_per_class",
            "must be at least 1",
        ));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.num_classes()];
    for (i, &label) in data.labels().iter().enumerate() {
        by_class[label as usize].push(i);
    }
    let mut keep = Vec::new();
    for (class, members) in by_class.iter().enumerate() {
        let k = per_class.min(members.len());
        let drawn = seed
            .child(class as u64)
            .rng()
            .sample_indices(members.len(), k)?;
        keep.extend(drawn.into_iter().map(|j| members[j]));
    }
    keep.sort_unstable();
    data.subset(&keep)
}

/// Splits `data` into kept and held-out images: `⌊fraction·n_c⌋` images of each class `c`
/// (at least one when `fraction > 0` and the class has two or more images, so every class keeps
/// training images), drawn without replacement with `seed.child(c)`, both parts in data set
/// order. `None` for the held-out part when `fraction` is 0.
///
/// # Errors
/// [`Error::InvalidParameter`] unless `0 ≤ fraction < 1`.
fn hold_out_per_class(
    data: &Dataset,
    fraction: f64,
    seed: Seed,
) -> Result<(Dataset, Option<Dataset>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::invalid_parameter(
            "validation_fraction",
            format!("{fraction} is not in [0, 1)"),
        ));
    }
    if fraction == 0.0 {
        return Ok((data.clone(), None));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.num_classes()];
    for (i, &label) in data.labels().iter().enumerate() {
        by_class[label as usize].push(i);
    }
    let mut held = vec![false; data.len()];
    for (class, members) in by_class.iter().enumerate() {
        if members.len() < 2 {
            continue;
        }
        let k = ((fraction * members.len() as f64).floor() as usize).clamp(1, members.len() - 1);
        for j in seed
            .child(class as u64)
            .rng()
            .sample_indices(members.len(), k)?
        {
            held[members[j]] = true;
        }
    }
    let (kept, held_out): (Vec<usize>, Vec<usize>) = (0..data.len()).partition(|&i| !held[i]);
    Ok((data.subset(&kept)?, Some(data.subset(&held_out)?)))
}

/// The images of `classes`, labels remapped to positions in `classes`, class names to match.
fn relabel(data: &Dataset, classes: &[u32]) -> Result<Dataset> {
    let selected = data.select_classes(classes)?;
    let mut local = vec![u32::MAX; data.num_classes()];
    for (k, &c) in classes.iter().enumerate() {
        local[c as usize] = k as u32;
    }
    let labels = selected
        .labels()
        .iter()
        .map(|&y| local[y as usize])
        .collect();
    let names = classes
        .iter()
        .map(|&c| data.class_names()[c as usize].clone())
        .collect();
    Dataset::new(
        data.name(),
        data.shape(),
        selected.pixels().to_vec(),
        labels,
        names,
    )
}

/// `data` with every channel plane permuted: output pixel `p` is input pixel `permutation[p]`.
fn permute_pixels(data: &Dataset, permutation: &[usize]) -> Result<Dataset> {
    let plane = permutation.len();
    let mut pixels = Vec::with_capacity(data.pixels().len());
    for source in data.pixels().chunks_exact(plane) {
        pixels.extend(permutation.iter().map(|&p| source[p]));
    }
    Dataset::new(
        data.name(),
        data.shape(),
        pixels,
        data.labels().to_vec(),
        data.class_names().to_vec(),
    )
}
