//! Named, seeded parameters and buffers of a model.
//!
//! A [`ParamStore`] owns every tensor a model learns ([`ParamKind::Trainable`]) or tracks
//! without gradients ([`ParamKind::Buffer`], e.g. BatchNorm running statistics), under
//! dotted names such as `layer1.0.conv1.weight`. Names are kept sorted, so iteration order, and
//! with it optimizer state and checkpoints, does not depend on construction order. Random
//! initialisation draws from `seed.child_named(full_name)`, so a parameter's initial value
//! depends only on the store's seed and its name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use qcl_tensor::{Error, Result, SafetensorsFile, Seed};

/// Whether the optimizer updates a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Learned by gradient descent; handed to optimizers.
    Trainable,
    /// Updated by the model itself (running statistics); saved, never given gradients.
    Buffer,
}

/// How a new parameter is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every element equal to the value.
    Const(f64),
    /// Uniform on `[low, high)`.
    Uniform {
        /// Lower bound (inclusive).
        low: f64,
        /// Upper bound (exclusive).
        high: f64,
    },
    /// Normal with the given mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// PyTorch's default for conv/linear weights: `U(-b, b)` with `b = 1/sqrt(fan_in)`
    /// (kaiming-uniform with `a = sqrt(5)`).
    KaimingUniform {
        /// Inputs feeding one output (`c_in·k·k` for a convolution).
        fan_in: usize,
    },
    /// He initialisation `N(0, 2/fan)`, with `fan` the fan-out (`c_out·k·k`) as in
    /// torchvision's ResNets or the fan-in.
    KaimingNormal {
        /// The fan the variance is divided by.
        fan: usize,
    },
}

/// The parameters and buffers of one model, by name.
///
/// The variables live in a [`candle_nn::VarMap`], shared with [`ParamStore::var_map`]: a
/// candle user sees (and can save, load or optimise) every qcl parameter there, and a
/// variable added to that map later is a trainable parameter of the store. The store adds
/// what a `VarMap` lacks: sorted iteration, buffers (tracked, saved, never handed to
/// optimizers) and seeded initialisation by name.
///
/// Cloning is cheap and shares the storage (like `candle_nn::VarMap`).
///
/// ```
/// use qcl_nn::{Init, ParamStore};
/// use candle_core::Device;
/// let store = ParamStore::new(7);
/// let root = store.root(&Device::Cpu);
/// let w = root.pp("fc").param("weight", (3, 4), Init::KaimingUniform { fan_in: 4 })?;
/// assert_eq!(w.dims(), &[3, 4]);
/// assert_eq!(store.trainable().len(), 1);
/// assert_eq!(store.trainable()[0].0, "fc.weight");
/// // The same variable, seen from candle-nn.
/// assert_eq!(store.var_map().all_vars().len(), 1);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Clone)]
pub struct ParamStore {
    vars: VarMap,
    buffers: Arc<Mutex<BTreeSet<String>>>,
    seed: Seed,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("names", &self.names())
            .field("seed", &self.seed)
            .finish()
    }
}

/// Metadata `format` value of a parameter file.
pub const PARAMS_FORMAT: &str = "qcl-params/1";

/// A lock that a panic elsewhere cannot make unusable: every update under it is a single
/// insert, so a poisoned lock still guards a consistent map.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ParamStore {
    /// An empty store whose random initialisations derive from `seed`.
    pub fn new(seed: impl Into<Seed>) -> Self {
        Self::from_var_map(VarMap::new(), seed)
    }

    /// A store over the variables of a candle-nn `VarMap` (shared, not copied): those it holds
    /// are trainable parameters, new ones are created in it, initialised from `seed` by name.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use qcl_nn::ParamStore;
    /// let varmap = candle_nn::VarMap::new();
    /// let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _fc = candle_nn::linear(4, 2, vb.pp("fc"))?;
    /// let store = ParamStore::from_var_map(varmap.clone(), 0);
    /// let names: Vec<String> = store.trainable().into_iter().map(|(n, _)| n).collect();
    /// assert_eq!(names, ["fc.bias", "fc.weight"]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn from_var_map(vars: VarMap, seed: impl Into<Seed>) -> Self {
        Self {
            vars,
            buffers: Arc::new(Mutex::new(BTreeSet::new())),
            seed: seed.into(),
        }
    }

    /// The candle-nn `VarMap` holding this store's variables (a handle sharing them, including
    /// those created later; buffers included, since a `VarMap` has no other kind).
    pub fn var_map(&self) -> VarMap {
        self.vars.clone()
    }

    /// A candle-nn `VarBuilder` (dtype `f32` unless changed with `set_dtype`) that creates
    /// candle-nn layers' variables in this store as trainable parameters, drawn from the
    /// store's seed by name like every qcl parameter, and returns existing ones as they are.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use qcl_nn::ParamStore;
    /// let a = ParamStore::new(3);
    /// let fc = candle_nn::linear(4, 2, a.var_builder(&Device::Cpu).pp("fc"))?;
    /// let b = ParamStore::new(3);
    /// let again = candle_nn::linear(4, 2, b.var_builder(&Device::Cpu).pp("fc"))?;
    /// let x = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu)?;
    /// // Same seed, same name: same weights.
    /// assert_eq!(fc.forward(&x)?.to_vec2::<f32>()?, again.forward(&x)?.to_vec2::<f32>()?);
    /// assert_eq!(a.trainable().len(), 2);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The seed random initialisation derives from.
    pub fn seed(&self) -> Seed {
        self.seed
    }

    /// The root path, creating `f32` tensors on `device`.
    pub fn root(&self, device: &Device) -> ParamPath {
        ParamPath {
            store: self.clone(),
            prefix: String::new(),
            device: device.clone(),
            dtype: DType::F32,
        }
    }

    /// Every stored name, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(self.vars.data()).keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Every variable with its kind, sorted by name.
    fn sorted(&self) -> Vec<(String, Var, ParamKind)> {
        let vars = lock(self.vars.data());
        let buffers = lock(&self.buffers);
        let mut all: Vec<(String, Var, ParamKind)> = vars
            .iter()
            .map(|(n, v)| {
                let kind = if buffers.contains(n) {
                    ParamKind::Buffer
                } else {
                    ParamKind::Trainable
                };
                (n.clone(), v.clone(), kind)
            })
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Trainable parameters, sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.of_kind(ParamKind::Trainable)
    }

    /// Buffers, sorted by name.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.of_kind(ParamKind::Buffer)
    }

    fn of_kind(&self, kind: ParamKind) -> Vec<(String, Var)> {
        self.sorted()
            .into_iter()
            .filter(|(_, _, k)| *k == kind)
            .map(|(n, v, _)| (n, v))
            .collect()
    }

    /// Every stored tensor with its kind, sorted by name.
    pub fn all(&self) -> Vec<(String, Var, ParamKind)> {
        self.sorted()
    }

    /// The variable stored under `name`, if any.
    pub fn get(&self, name: &str) -> Option<Var> {
        lock(self.vars.data()).get(name).cloned()
    }

    /// The kind of the variable stored under `name`, if any.
    pub fn kind(&self, name: &str) -> Option<ParamKind> {
        let vars = lock(self.vars.data());
        vars.contains_key(name).then(|| {
            if lock(&self.buffers).contains(name) {
                ParamKind::Buffer
            } else {
                ParamKind::Trainable
            }
        })
    }

    /// Number of stored tensors.
    pub fn len(&self) -> usize {
        lock(self.vars.data()).len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        lock(self.vars.data()).is_empty()
    }

    /// Total number of trainable scalars.
    pub fn trainable_elements(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Snapshot of every stored tensor (detached copies), sorted by name.
    ///
    /// # Errors
    /// A candle error if a copy fails.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.sorted()
            .into_iter()
            .map(|(n, v, _)| Ok((n, v.as_tensor().copy()?.detach())))
            .collect()
    }

    /// Overwrite every stored tensor from `values`, which must hold exactly the stored names
    /// with the stored shapes (dtype is converted). Nothing changes unless all match.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] for a stored name absent from `values`,
    /// [`Error::InvalidParameter`] for an extra name, [`Error::ShapeMismatch`] for a shape.
    pub fn load_tensors(&self, values: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        let vars = lock(self.vars.data());
        let mut entries: Vec<(&String, &Var)> = vars.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for &(name, var) in &entries {
            let value = values.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: source.to_path_buf(),
                available: values.keys().cloned().collect(),
            })?;
            if value.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    context: format!("parameter `{name}` loaded from {}", source.display()),
                    expected: format!("{:?}", var.dims()),
                    actual: value.dims().to_vec(),
                });
            }
        }
        if let Some(extra) = values.keys().find(|n| !vars.contains_key(*n)) {
            return Err(Error::invalid_parameter(
                "parameters",
                format!(
                    "{} holds `{extra}`, which this model does not have (another architecture?)",
                    source.display()
                ),
            ));
        }
        for (name, var) in entries {
            let value = values[name]
                .to_dtype(var.dtype())?
                .to_device(var.device())?;
            var.set(&value)?;
        }
        Ok(())
    }

    /// Write every stored tensor to a safetensors file (atomically), with `format` metadata
    /// [`PARAMS_FORMAT`].
    ///
    /// # Errors
    /// [`Error::Io`] or a serialisation error.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors = self.tensors()?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), PARAMS_FORMAT.to_string());
        qcl_tensor::write_safetensors(path, &refs, &meta)
    }

    /// Load a file written by [`ParamStore::save`] into this store (same names and shapes).
    ///
    /// # Errors
    /// [`Error::BadFile`] for a truncated or foreign file, and the errors of
    /// [`ParamStore::load_tensors`].
    pub fn load(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(PARAMS_FORMAT, "a qcl parameter file")?;
        let mut values = BTreeMap::new();
        for name in file.names() {
            values.insert(name.clone(), file.tensor(name, &Device::Cpu)?);
        }
        self.load_tensors(&values, path)
    }

    fn get_or_create(
        &self,
        name: String,
        shape: Shape,
        dtype: DType,
        device: &Device,
        init: Init,
        kind: ParamKind,
    ) -> Result<Var> {
        let mut vars = lock(self.vars.data());
        let mut buffers = lock(&self.buffers);
        if let Some(existing) = vars.get(&name) {
            let existing_kind = if buffers.contains(&name) {
                ParamKind::Buffer
            } else {
                ParamKind::Trainable
            };
            if existing.shape() != &shape || existing_kind != kind {
                return Err(Error::invalid_parameter(
                    "name",
                    format!(
                        "`{name}` already exists with shape {:?} ({existing_kind:?}); asked for {:?} ({kind:?})",
                        existing.dims(),
                        shape.dims()
                    ),
                ));
            }
            return Ok(existing.clone());
        }
        let tensor = init_tensor(self.seed.child_named(&name), &shape, dtype, device, init)?;
        let var = Var::from_tensor(&tensor)?;
        if kind == ParamKind::Buffer {
            buffers.insert(name.clone());
        }
        vars.insert(name, var.clone());
        Ok(var)
    }
}

/// candle-nn's initialisation hints as qcl's [`Init`], with PyTorch's Kaiming rule
/// (`std = gain/√fan`, uniform bound `√3·std`) computed as candle-nn does.
fn from_candle_init(init: candle_nn::Init, shape: &Shape) -> Init {
    use candle_nn::init::NormalOrUniform;
    match init {
        candle_nn::Init::Const(0.0) => Init::Zeros,
        candle_nn::Init::Const(1.0) => Init::Ones,
        candle_nn::Init::Const(v) => Init::Const(v),
        candle_nn::Init::Randn { mean, stdev } => Init::Normal { mean, std: stdev },
        candle_nn::Init::Uniform { lo, up } => Init::Uniform { low: lo, high: up },
        candle_nn::Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    Init::Uniform {
                        low: -bound,
                        high: bound,
                    }
                }
                NormalOrUniform::Normal => Init::Normal { mean: 0.0, std },
            }
        }
    }
}

/// The store as a candle-nn `VarBuilder` backend ([`ParamStore::var_builder`]): `get` creates
/// a trainable parameter (seeded by name) or returns the stored one.
impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let init = from_candle_init(init, &shape);
        let var = self.get_or_create(
            name.to_string(),
            shape,
            dtype,
            device,
            init,
            ParamKind::Trainable,
        )?;
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(device),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        ParamStore::get(self, name).is_some()
    }
}

fn init_tensor(
    seed: Seed,
    shape: &Shape,
    dtype: DType,
    device: &Device,
    init: Init,
) -> Result<Tensor> {
    let mut rng = seed.rng();
    let t = match init {
        Init::Zeros => Tensor::zeros(shape, dtype, device)?,
        Init::Ones => Tensor::ones(shape, dtype, device)?,
        Init::Const(v) => Tensor::full(v, shape, device)?.to_dtype(dtype)?,
        Init::Uniform { low, high } => {
            rng.uniform_tensor(shape.clone(), low as f32, high as f32, device)?
        }
        Init::Normal { mean, std } => {
            rng.normal_tensor(shape.clone(), mean as f32, std as f32, device)?
        }
        Init::KaimingUniform { fan_in } => {
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            rng.uniform_tensor(shape.clone(), -bound, bound, device)?
        }
        Init::KaimingNormal { fan } => {
            let std = (2.0 / fan.max(1) as f32).sqrt();
            rng.normal_tensor(shape.clone(), 0.0, std, device)?
        }
    };
    Ok(t.to_dtype(dtype)?)
}

/// A position in a [`ParamStore`]'s name tree, used by layer constructors.
#[derive(Debug, Clone)]
pub struct ParamPath {
    store: ParamStore,
    prefix: String,
    device: Device,
    dtype: DType,
}

impl ParamPath {
    /// The child path `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> ParamPath {
        ParamPath {
            store: self.store.clone(),
            prefix: self.full_name(&name.to_string()),
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }

    /// The same path creating tensors of `dtype`.
    pub fn with_dtype(&self, dtype: DType) -> ParamPath {
        ParamPath {
            dtype,
            ..self.clone()
        }
    }

    /// The full dotted name of `name` under this path.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The device new tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype new tensors are created with.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The store this path belongs to.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// A trainable parameter: created with `init` the first time, returned as-is afterwards.
    /// The returned tensor shares storage with the stored variable, so optimizer updates are
    /// visible through it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `name` exists with another shape or kind.
    pub fn param(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let var = self.store.get_or_create(
            self.full_name(name),
            shape.into(),
            self.dtype,
            &self.device,
            init,
            ParamKind::Trainable,
        )?;
        Ok(var.as_tensor().clone())
    }

    /// A buffer (saved with the model, never trained), created with `init` the first time.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `name` exists with another shape or kind.
    pub fn buffer(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Var> {
        self.store.get_or_create(
            self.full_name(name),
            shape.into(),
            self.dtype,
            &self.device,
            init,
            ParamKind::Buffer,
        )
    }
}
