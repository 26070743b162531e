//! Net_SVD (docs/methods/cacl.md § Networks) with SVD-factored convolutions, its dense twin,
//! and the multi-head task-incremental interface the training loop drives.
//!
//! (Over 600 lines: the geometry, the `TaskIncrementalModel` trait, the shared trunk and task
//! heads, and the trait's three implementations, `NetSvd` with its checkpoint, the dense twin
//! `DenseNet` and the IND arm `IndividualNets`, are one unit so that every arm runs the same
//! network.)

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use qcl_nn::layers::{Conv2d, Conv2dConfig};
use qcl_nn::ops::{max_pool2d, relu, Conv2dParams};
use qcl_nn::{Init, ParamStore};
use qcl_tensor::{write_safetensors, Error, Result, SafetensorsFile, Seed, SeededRng};
use serde::{Deserialize, Serialize};

use crate::factors::{ranks_json, ForTask, SvdConv2d, TaskRankUpdate};
use crate::rank::Growth;
use crate::regularizers::{hoyer, orthogonality};
use crate::size::{dense_conv_parameters, parameter_count, FactoredLayerSize, SizeInputs};

/// Checkpoint format tag of [`NetSvd::save`].
pub const CHECKPOINT_FORMAT: &str = "qcl-cacl/1";

/// Geometry of Net_SVD: five 'valid' stride-1 convolutions (k3, k3, maxpool + dropout, k3,
/// k3, maxpool + dropout, k2, avgpool 2), each followed by ReLU, then one linear head per task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Input height and width (square).
    pub input_size: usize,
    /// Output channels of the five convolutions.
    pub widths: [usize; 5],
    /// Dropout probability after each max-pool.
    pub dropout: f32,
}

impl NetConfig {
    /// Net_SVD-S (docs/methods/cacl.md § Networks): 1×28×28 inputs, widths 16, 16, 32, 32, 64,
    /// dropout 0.15.
    pub fn net_svd_s() -> Self {
        NetConfig {
            in_channels: 1,
            input_size: 28,
            widths: [16, 16, 32, 32, 64],
            dropout: 0.15,
        }
    }

    /// `(c_in, c_out, kernel)` of the five convolutions.
    pub fn convs(&self) -> [(usize, usize, usize); 5] {
        let w = self.widths;
        [
            (self.in_channels, w[0], 3),
            (w[0], w[1], 3),
            (w[1], w[2], 3),
            (w[2], w[3], 3),
            (w[3], w[4], 2),
        ]
    }

    /// Flattened feature size feeding the heads.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the input is too small for the topology.
    pub fn feature_dim(&self) -> Result<usize> {
        let mut s = self.input_size as isize;
        s -= 4; // two k3
        s /= 2;
        s -= 4;
        s /= 2;
        s -= 1; // k2
        s /= 2;
        if s < 1 {
            return Err(Error::invalid_parameter(
                "input_size",
                format!(
                    "{}×{} inputs are too small for Net_SVD",
                    self.input_size, self.input_size
                ),
            ));
        }
        let s = s as usize;
        Ok(self.widths[4] * s * s)
    }

    fn validate(&self) -> Result<()> {
        if self.in_channels == 0 || self.widths.contains(&0) {
            return Err(Error::invalid_parameter(
                "widths",
                "every width must be positive",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid_parameter(
                "dropout",
                format!("must lie in [0, 1), got {}", self.dropout),
            ));
        }
        self.feature_dim().map(|_| ())
    }
}

/// A model trained task by task, with one head per task (multi-head, task id known).
pub trait TaskIncrementalModel {
    /// Starts task `task` (tasks come in order 0, 1, …) with `classes` outputs: adds its head.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task out of order or zero classes.
    fn begin_task(&mut self, task: usize, classes: usize) -> Result<()>;
    /// The variables the current task trains.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Logits of the current task in training mode (dropout drawn from `rng`).
    ///
    /// # Errors
    /// Shape errors for a bad input; [`Error::InvalidParameter`] without a current task.
    fn train_logits(&self, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor>;
    /// The regularization added to the cross-entropy (`None` for dense models).
    ///
    /// # Errors
    /// A candle error from the arithmetic.
    fn penalty(&self) -> Result<Option<Tensor>>;
    /// Ends the current task (CACL: prune, freeze, grow).
    ///
    /// # Errors
    /// As the model's pruning.
    fn finish_task(&mut self) -> Result<()>;
    /// Logits of finished task `task` in evaluation mode (no dropout).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task never trained.
    fn eval_logits(&self, x: &Tensor, task: usize) -> Result<Tensor>;
    /// Model size in parameters as docs/methods/cacl.md § Model size counts it.
    fn size_parameters(&self) -> u64;

    /// The model fixed to finished task `task`: a candle `Module` computing
    /// [`eval_logits`](TaskIncrementalModel::eval_logits) for that task.
    fn for_task(&self, task: usize) -> ForTask<'_, Self>
    where
        Self: Sized,
    {
        ForTask::new(self, task)
    }
}

impl<M: TaskIncrementalModel> candle_core::Module for ForTask<'_, M> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.model().eval_logits(x, self.task())?)
    }
}

/// Inverted dropout with a mask drawn from `rng` (so runs are reproducible).
fn dropout(x: &Tensor, p: f32, rng: &mut SeededRng) -> Result<Tensor> {
    if p == 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.uniform() < p { 0.0 } else { scale })
        .collect();
    Ok(x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)?)
}

/// The Net_SVD trunk with a convolution callback `conv(i, x)` (conv + ReLU).
fn trunk(
    x: &Tensor,
    p: f32,
    mut rng: Option<&mut SeededRng>,
    conv: impl Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut h = conv(0, x)?;
    h = max_pool2d(&conv(1, &h)?, 2, 2)?;
    if let Some(r) = rng.as_deref_mut() {
        h = dropout(&h, p, r)?;
    }
    h = conv(2, &h)?;
    h = max_pool2d(&conv(3, &h)?, 2, 2)?;
    if let Some(r) = rng {
        h = dropout(&h, p, r)?;
    }
    h = conv(4, &h)?.avg_pool2d(2)?;
    Ok(h.flatten_from(1)?)
}

fn check_input(x: &Tensor, config: &NetConfig) -> Result<()> {
    let expected = [config.in_channels, config.input_size, config.input_size];
    if x.rank() != 4 || x.dims()[1..] != expected {
        return Err(Error::ShapeMismatch {
            context: "network input".into(),
            expected: format!("[batch, {}, {}, {}]", expected[0], expected[1], expected[2]),
            actual: x.dims().to_vec(),
        });
    }
    Ok(())
}

/// A task head `y = x·Wᵀ + b`, PyTorch's default initialisation `U(±1/√in)`.
#[derive(Debug, Clone)]
struct Head {
    weight: Var,
    bias: Var,
}

impl Head {
    fn new(in_features: usize, classes: usize, seed: Seed, device: &Device) -> Result<Self> {
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut rng = seed.rng();
        Ok(Head {
            weight: Var::from_tensor(&rng.uniform_tensor(
                (classes, in_features),
                -bound,
                bound,
                device,
            )?)?,
            bias: Var::from_tensor(&rng.uniform_tensor(classes, -bound, bound, device)?)?,
        })
    }

    fn frozen(&self) -> FrozenHead {
        FrozenHead {
            weight: self.weight.as_tensor().detach(),
            bias: self.bias.as_tensor().detach(),
        }
    }
}

/// A finished task's head as plain tensors.
#[derive(Debug, Clone)]
struct FrozenHead {
    weight: Tensor,
    bias: Tensor,
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(&b.unsqueeze(0)?)?)
}

fn check_next_task(task: usize, expected: usize, classes: usize) -> Result<()> {
    if task != expected {
        return Err(Error::invalid_parameter(
            "task",
            format!("tasks are trained in order; expected task {expected}, got {task}"),
        ));
    }
    if classes == 0 {
        return Err(Error::invalid_parameter(
            "classes",
            "a task needs at least one class",
        ));
    }
    Ok(())
}

/// The freshly initialised head of `task` with `classes` outputs (seeded per task).
fn task_head(
    config: &NetConfig,
    seed: Seed,
    device: &Device,
    task: usize,
    classes: usize,
) -> Result<Head> {
    Head::new(
        config.feature_dim()?,
        classes,
        seed.child_named("head").child(task as u64),
        device,
    )
}

fn never_trained(task: usize, finished: usize) -> Error {
    Error::invalid_parameter(
        "task",
        format!("task {task} was never trained; finished tasks are 0..{finished}"),
    )
}

/// The heads of a multi-head model: the finished tasks' frozen heads, in task order, and the
/// trainable head of the task in progress, if any.
#[derive(Debug, Clone, Default)]
struct TaskHeads {
    frozen: Vec<FrozenHead>,
    current: Option<(usize, Head)>,
}

impl TaskHeads {
    /// Finished tasks.
    fn finished(&self) -> usize {
        self.frozen.len()
    }

    /// Whether a task is in progress.
    fn in_progress(&self) -> bool {
        self.current.is_some()
    }

    /// Starts `task` (checked to come next) with a fresh head of `classes` outputs.
    fn begin(
        &mut self,
        config: &NetConfig,
        seed: Seed,
        device: &Device,
        task: usize,
        classes: usize,
    ) -> Result<()> {
        check_next_task(task, self.finished(), classes)?;
        self.current = Some((task, task_head(config, seed, device, task, classes)?));
        Ok(())
    }

    /// Appends the current head's variables, `head{t}.weight` and `head{t}.bias`, to `vars`.
    fn push_trainable(&self, vars: &mut Vec<(String, Var)>) {
        if let Some((t, head)) = &self.current {
            vars.push((format!("head{t}.weight"), head.weight.clone()));
            vars.push((format!("head{t}.bias"), head.bias.clone()));
        }
    }

    /// The head of the task in progress.
    fn current(&self) -> Result<&Head> {
        let (_, head) = self.current.as_ref().ok_or_else(|| {
            Error::invalid_parameter("task", "no task in progress; call begin_task")
        })?;
        Ok(head)
    }

    /// Removes the head of the task in progress, to be [`freeze`](Self::freeze)d.
    fn take_current(&mut self) -> Result<Head> {
        let (_, head) = self
            .current
            .take()
            .ok_or_else(|| Error::invalid_parameter("task", "no task in progress to finish"))?;
        Ok(head)
    }

    /// Stores `head` as the next finished task's frozen head.
    fn freeze(&mut self, head: Head) {
        self.frozen.push(head.frozen());
    }

    /// The frozen head of finished task `task`.
    fn frozen_head(&self, task: usize) -> Result<&FrozenHead> {
        self.frozen
            .get(task)
            .ok_or_else(|| never_trained(task, self.finished()))
    }

    /// Logits of the task in progress in training mode: the trunk over `x` with convolutions
    /// `conv` (conv + ReLU) and dropout drawn from `rng`, then the current head.
    fn train_logits(
        &self,
        x: &Tensor,
        config: &NetConfig,
        rng: &mut SeededRng,
        conv: impl Fn(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        check_input(x, config)?;
        let head = self.current()?;
        let features = trunk(x, config.dropout, Some(rng), conv)?;
        linear(&features, head.weight.as_tensor(), head.bias.as_tensor())
    }

    /// Logits of finished task `task` in evaluation mode: the trunk over `x` with convolutions
    /// `conv` (conv + ReLU) and no dropout, then the task's frozen head.
    fn eval_logits(
        &self,
        x: &Tensor,
        config: &NetConfig,
        task: usize,
        conv: impl Fn(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        check_input(x, config)?;
        let head = self.frozen_head(task)?;
        let features = trunk(x, 0.0, None, conv)?;
        linear(&features, &head.weight, &head.bias)
    }
}

/// Hyperparameters of the CACL objective and the per-task rank update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CaclConfig {
    /// Hoyer weight λ_sp (0.1 in the scripts; 0 for the no-Hoyer arm).
    pub lambda_sparsity: f64,
    /// Orthogonality weight λ_orth (1.0).
    pub lambda_orthogonality: f64,
    /// Energy threshold ε of the pruning, in (0, 1) (3e-5).
    pub epsilon: f64,
    /// Growth rule for the next task's free slots.
    pub growth: Growth,
}

impl Default for CaclConfig {
    fn default() -> Self {
        CaclConfig {
            lambda_sparsity: 0.1,
            lambda_orthogonality: 1.0,
            epsilon: 3e-5,
            growth: Growth::MeanCapped,
        }
    }
}

impl CaclConfig {
    /// Checks ε ∈ (0, 1) and finite non-negative weights.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the bad value.
    pub fn validate(&self) -> Result<()> {
        crate::rank::check_threshold(self.epsilon)?;
        for (name, v) in [
            ("lambda_sparsity", self.lambda_sparsity),
            ("lambda_orthogonality", self.lambda_orthogonality),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be finite and ≥ 0, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// Net_SVD with SVD-factored convolutions and one head per task: the CACL model.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_cacl::{CaclConfig, NetConfig, NetSvd, TaskIncrementalModel};
/// let mut net = NetSvd::new(NetConfig::net_svd_s(), CaclConfig::default(), qcl_tensor::Seed::new(0), &Device::Cpu)?;
/// assert_eq!(net.capacities(), vec![5, 14, 26, 28, 42]);
/// net.begin_task(0, 2)?;
/// net.finish_task()?;
/// let x = Tensor::zeros((3, 1, 28, 28), DType::F32, &Device::Cpu)?;
/// assert_eq!(net.eval_logits(&x, 0)?.dims(), &[3, 2]);
/// assert!(net.eval_logits(&x, 1).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct NetSvd {
    config: NetConfig,
    params: CaclConfig,
    seed: Seed,
    convs: Vec<SvdConv2d>,
    heads: TaskHeads,
    /// Per task, per layer: the rank update at the end of the task.
    updates: Vec<Vec<TaskRankUpdate>>,
    device: Device,
}

impl NetSvd {
    /// A fresh model; convolutions at their initial capacity `r0`, no task yet.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad configuration or parameters.
    pub fn new(
        config: NetConfig,
        cacl_config: CaclConfig,
        seed: Seed,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        cacl_config.validate()?;
        let convs = config
            .convs()
            .iter()
            .enumerate()
            .map(|(i, &(c_in, c_out, k))| {
                SvdConv2d::new(
                    c_in,
                    c_out,
                    k,
                    Conv2dParams::default(),
                    seed.child_named("conv").child(i as u64),
                    device,
                )
            })
            .collect::<Result<_>>()?;
        Ok(NetSvd {
            config,
            params: cacl_config,
            seed,
            convs,
            heads: TaskHeads::default(),
            updates: Vec::new(),
            device: device.clone(),
        })
    }

    /// The geometry.
    pub fn config(&self) -> NetConfig {
        self.config
    }

    /// The objective's hyperparameters.
    pub fn params(&self) -> CaclConfig {
        self.params
    }

    /// The factored convolutions.
    pub fn convs(&self) -> &[SvdConv2d] {
        &self.convs
    }

    /// Finished tasks.
    pub fn tasks_finished(&self) -> usize {
        self.heads.finished()
    }

    /// Current capacity `R_l` of every layer.
    pub fn capacities(&self) -> Vec<usize> {
        self.convs.iter().map(|c| c.factors().capacity()).collect()
    }

    /// `k_{t,l}`: per finished task, the components in use per layer.
    pub fn task_ranks(&self) -> Vec<Vec<usize>> {
        (0..self.tasks_finished())
            .map(|t| {
                self.convs
                    .iter()
                    .map(|c| c.factors().task_ranks()[t])
                    .collect()
            })
            .collect()
    }

    /// `chann_used[t]`: per finished task, the components it added per layer.
    pub fn components_added(&self) -> Vec<Vec<usize>> {
        self.updates
            .iter()
            .map(|u| u.iter().map(|x| x.added).collect())
            .collect()
    }

    /// The rank updates (added, used, free, capacity) per task per layer.
    pub fn rank_updates(&self) -> &[Vec<TaskRankUpdate>] {
        &self.updates
    }

    /// The size inputs (docs/methods/cacl.md § Model size) for the finished tasks.
    pub fn size_inputs(&self) -> SizeInputs {
        SizeInputs {
            layers: self
                .convs
                .iter()
                .map(|c| FactoredLayerSize {
                    d: c.factors().d(),
                    n_out: c.factors().n_out(),
                    used: c.factors().used(),
                })
                .collect(),
            heads: self
                .heads
                .frozen
                .iter()
                .map(|h| (h.weight.dim(1).unwrap_or(0), h.weight.dim(0).unwrap_or(0)))
                .collect(),
            batch_norm_channels: Vec::new(),
            tasks: self.tasks_finished(),
            count_task_ids: true,
        }
    }

    /// Writes the model (factors, heads, ranks, configuration) to a safetensors file,
    /// atomically. Only finished tasks' heads are stored.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut ranks = Vec::new();
        for (i, conv) in self.convs.iter().enumerate() {
            let name = format!("conv{i}");
            tensors.extend(conv.factors().named_tensors(&name));
            ranks.push((name, conv.factors().task_ranks().to_vec()));
        }
        for (t, h) in self.heads.frozen.iter().enumerate() {
            tensors.push((format!("head{t}.weight"), h.weight.clone()));
            tensors.push((format!("head{t}.bias"), h.bias.clone()));
        }
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let metadata = BTreeMap::from([
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.config).unwrap_or_default(),
            ),
            (
                "params".to_string(),
                serde_json::to_string(&self.params).unwrap_or_default(),
            ),
            ("seed".to_string(), self.seed.value().to_string()),
            ("ranks".to_string(), ranks_json(&ranks)),
            ("tasks".to_string(), self.tasks_finished().to_string()),
        ]);
        write_safetensors(path, &refs, &metadata)
    }

    /// Reads a model written by [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::BadFile`] for a foreign file or bad metadata; [`Error::InvalidParameter`]
    /// ("checkpoint ranks") when the stored ranks do not match the stored components, the
    /// layer shapes or the number of heads.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(CHECKPOINT_FORMAT, "a CACL model")?;
        let bad = |what: &str, e: String| Error::bad_file(path, format!("metadata `{what}`: {e}"));
        let meta = |key: &str| -> Result<&String> {
            file.metadata()
                .get(key)
                .ok_or_else(|| bad(key, "missing".into()))
        };
        let config: NetConfig =
            serde_json::from_str(meta("config")?).map_err(|e| bad("config", e.to_string()))?;
        let params: CaclConfig =
            serde_json::from_str(meta("params")?).map_err(|e| bad("params", e.to_string()))?;
        let seed: u64 = meta("seed")?
            .parse()
            .map_err(|e: std::num::ParseIntError| bad("seed", e.to_string()))?;
        let ranks: BTreeMap<String, Vec<usize>> =
            serde_json::from_str(meta("ranks")?).map_err(|e| bad("ranks", e.to_string()))?;
        let tasks: usize = meta("tasks")?
            .parse()
            .map_err(|e: std::num::ParseIntError| bad("tasks", e.to_string()))?;
        let mut net = NetSvd::new(config, params, Seed::new(seed), device)?;
        for (i, conv) in net.convs.iter_mut().enumerate() {
            let name = format!("conv{i}");
            let layer_ranks = ranks
                .get(&name)
                .ok_or_else(|| bad("ranks", format!("no entry for {name}")))?;
            if layer_ranks.len() != tasks {
                return Err(Error::invalid_parameter(
                    "checkpoint ranks",
                    format!(
                        "{name} has ranks for {} tasks, the model has {tasks}",
                        layer_ranks.len()
                    ),
                ));
            }
            conv.factors_mut().load_from(&file, &name, layer_ranks)?;
        }
        let feature_dim = config.feature_dim()?;
        for t in 0..tasks {
            let weight = file
                .tensor(&format!("head{t}.weight"), device)?
                .to_dtype(DType::F32)?;
            let bias = file
                .tensor(&format!("head{t}.bias"), device)?
                .to_dtype(DType::F32)?;
            let classes = bias.dims1()?;
            if weight.dims() != [classes, feature_dim] {
                return Err(Error::ShapeMismatch {
                    context: format!("head{t}.weight in {}", path.display()),
                    expected: format!("[{classes}, {feature_dim}]"),
                    actual: weight.dims().to_vec(),
                });
            }
            net.heads.frozen.push(FrozenHead { weight, bias });
        }
        // Per-task updates are not stored; rebuild `added` and `used` from the ranks.
        net.updates = (0..tasks)
            .map(|t| {
                net.convs
                    .iter()
                    .map(|c| {
                        let r = c.factors().task_ranks();
                        let used = r[t];
                        let added = used - if t == 0 { 0 } else { r[t - 1] };
                        TaskRankUpdate {
                            added,
                            used,
                            free: 0,
                            capacity: used,
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(net)
    }
}

impl TaskIncrementalModel for NetSvd {
    fn begin_task(&mut self, task: usize, classes: usize) -> Result<()> {
        self.heads
            .begin(&self.config, self.seed, &self.device, task, classes)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = self
            .convs
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.factors().trainable_vars(&format!("conv{i}")))
            .collect();
        self.heads.push_trainable(&mut vars);
        vars
    }

    fn train_logits(&self, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        self.heads.train_logits(x, &self.config, rng, |i, h| {
            relu(&self.convs[i].forward_train(h)?)
        })
    }

    fn penalty(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            total = Some(match total.take() {
                Some(acc) => (acc + t)?,
                None => t,
            });
            Ok(())
        };
        for conv in &self.convs {
            let (n, s, c) = conv.factors().all_components()?;
            if self.params.lambda_sparsity > 0.0 {
                add((hoyer(&s)? * self.params.lambda_sparsity)?)?;
            }
            if self.params.lambda_orthogonality > 0.0 {
                let orth = (orthogonality(&n)? + orthogonality(&c)?)?;
                add((orth * self.params.lambda_orthogonality)?)?;
            }
        }
        Ok(total)
    }

    fn finish_task(&mut self) -> Result<()> {
        let head = self.heads.take_current()?;
        let updates = self
            .convs
            .iter_mut()
            .map(|c| {
                c.factors_mut()
                    .finish_task(self.params.epsilon, self.params.growth)
            })
            .collect::<Result<_>>()?;
        self.updates.push(updates);
        self.heads.freeze(head);
        Ok(())
    }

    fn eval_logits(&self, x: &Tensor, task: usize) -> Result<Tensor> {
        self.heads.eval_logits(x, &self.config, task, |i, h| {
            relu(&self.convs[i].forward_task(h, task)?)
        })
    }

    fn size_parameters(&self) -> u64 {
        parameter_count(&self.size_inputs())
    }
}

/// The dense twin of Net_SVD: the same topology with plain convolutions with bias, one head
/// per task, every shared weight trainable in every task (the FT arm).
///
/// ```
/// use candle_core::Device;
/// use qcl_cacl::{DenseNet, NetConfig, TaskIncrementalModel};
/// let mut net = DenseNet::new(NetConfig::net_svd_s(), qcl_tensor::Seed::new(0), &Device::Cpu)?;
/// net.begin_task(0, 2)?;
/// net.finish_task()?;
/// assert_eq!(net.size_parameters(), 24_624 + 130);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DenseNet {
    config: NetConfig,
    seed: Seed,
    store: ParamStore,
    convs: Vec<Conv2d>,
    heads: TaskHeads,
    device: Device,
}

impl DenseNet {
    /// A fresh dense model (PyTorch's default conv initialisation), no task yet.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad configuration.
    pub fn new(config: NetConfig, seed: Seed, device: &Device) -> Result<Self> {
        config.validate()?;
        let store = ParamStore::new(seed.child_named("convs"));
        let root = store.root(device);
        let convs = config
            .convs()
            .iter()
            .enumerate()
            .map(|(i, &(c_in, c_out, k))| {
                Conv2d::with_init(
                    &root.pp(format!("conv{i}")),
                    c_in,
                    c_out,
                    k,
                    Conv2dConfig::default(),
                    Init::KaimingUniform {
                        fan_in: c_in * k * k,
                    },
                )
            })
            .collect::<Result<_>>()?;
        Ok(DenseNet {
            config,
            seed,
            store,
            convs,
            heads: TaskHeads::default(),
            device: device.clone(),
        })
    }

    /// Finished tasks.
    pub fn tasks_finished(&self) -> usize {
        self.heads.finished()
    }

    /// Parameters of the shared convolutions.
    pub fn conv_parameters(&self) -> u64 {
        dense_conv_parameters(&self.config.convs())
    }
}

impl TaskIncrementalModel for DenseNet {
    fn begin_task(&mut self, task: usize, classes: usize) -> Result<()> {
        self.heads
            .begin(&self.config, self.seed, &self.device, task, classes)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut vars = self.store.trainable();
        self.heads.push_trainable(&mut vars);
        vars
    }

    fn train_logits(&self, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        self.heads
            .train_logits(x, &self.config, rng, |i, h| self.convs[i].forward_relu(h))
    }

    fn penalty(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn finish_task(&mut self) -> Result<()> {
        let head = self.heads.take_current()?;
        self.heads.freeze(head);
        Ok(())
    }

    fn eval_logits(&self, x: &Tensor, task: usize) -> Result<Tensor> {
        self.heads
            .eval_logits(x, &self.config, task, |i, h| self.convs[i].forward_relu(h))
    }

    fn size_parameters(&self) -> u64 {
        let heads: u64 = self
            .heads
            .frozen
            .iter()
            .map(|h| (h.weight.elem_count() + h.bias.elem_count()) as u64)
            .sum();
        self.conv_parameters() + heads
    }
}

/// Individual task models (the IND arm): a fresh [`DenseNet`] per task, so nothing is
/// shared and nothing is forgotten; its size is `T×` a dense model.
///
/// ```
/// use candle_core::Device;
/// use qcl_cacl::{IndividualNets, NetConfig, TaskIncrementalModel};
/// let mut ind = IndividualNets::new(NetConfig::net_svd_s(), qcl_tensor::Seed::new(0), &Device::Cpu)?;
/// for t in 0..5 {
///     ind.begin_task(t, 2)?;
///     ind.finish_task()?;
/// }
/// assert_eq!(ind.size_parameters(), 123_770);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct IndividualNets {
    config: NetConfig,
    seed: Seed,
    nets: Vec<DenseNet>,
    device: Device,
}

impl IndividualNets {
    /// No model yet; one is created per task.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad configuration.
    pub fn new(config: NetConfig, seed: Seed, device: &Device) -> Result<Self> {
        config.validate()?;
        Ok(IndividualNets {
            config,
            seed,
            nets: Vec::new(),
            device: device.clone(),
        })
    }

    fn current(&self) -> Result<&DenseNet> {
        self.nets
            .last()
            .filter(|n| n.heads.in_progress())
            .ok_or_else(|| Error::invalid_parameter("task", "no task in progress; call begin_task"))
    }
}

impl TaskIncrementalModel for IndividualNets {
    fn begin_task(&mut self, task: usize, classes: usize) -> Result<()> {
        let finished = self.nets.iter().filter(|n| !n.heads.in_progress()).count();
        check_next_task(task, finished, classes)?;
        let mut net = DenseNet::new(self.config, self.seed.child(task as u64), &self.device)?;
        net.begin_task(0, classes)?;
        self.nets.push(net);
        Ok(())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.current().map(|n| n.trainable()).unwrap_or_default()
    }

    fn train_logits(&self, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        self.current()?.train_logits(x, rng)
    }

    fn penalty(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn finish_task(&mut self) -> Result<()> {
        match self.nets.last_mut() {
            Some(n) if n.heads.in_progress() => n.finish_task(),
            _ => Err(Error::invalid_parameter(
                "task",
                "no task in progress to finish",
            )),
        }
    }

    fn eval_logits(&self, x: &Tensor, task: usize) -> Result<Tensor> {
        let finished = self.nets.iter().filter(|n| !n.heads.in_progress()).count();
        match self.nets.get(task) {
            Some(n) if !n.heads.in_progress() => n.eval_logits(x, 0),
            _ => Err(never_trained(task, finished)),
        }
    }

    fn size_parameters(&self) -> u64 {
        self.nets.iter().map(|n| n.size_parameters()).sum()
    }
}
