//! Named, seeded parameters and buffers of a model.
//!
//! A [`ParamStore`] owns every tensor a model learns ([`ParamKind::Trainable`]) or tracks
//! without gradients ([`ParamKind::Buffer`], e.g. BatchNorm running statistics), under
//! dotted names such as `layer1.0.conv1.weight`. Names are kept sorted, so iteration order, and
//! with it optimizer state and checkpoints, does not depend on construction order. Random
//! initialisation draws from `seed.child_named(full_name)`, so a parameter's initial value
//! depends only on the store's seed and its name.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
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

#[derive(Debug, Clone)]
struct Entry {
    var: Var,
    kind: ParamKind,
}

/// The parameters and buffers of one model, by name.
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
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ParamStore {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
    seed: Seed,
}

/// Metadata `format` value of a parameter file.
pub const PARAMS_FORMAT: &str = "qcl-params/1";

impl ParamStore {
    /// An empty store whose random initialisations derive from `seed`.
    pub fn new(seed: impl Into<Seed>) -> Self {
        Self {
            entries: Arc::new(Mutex::new(BTreeMap::new())),
            seed: seed.into(),
        }
    }

    /// The seed random initialisation derives from.
    pub fn seed(&self) -> Seed {
        self.seed
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (every update is
        // a single insert), so a poisoned lock is still safe to use.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Trainable parameters, sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.of_kind(ParamKind::Trainable)
    }

    /// Buffers, sorted by name.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.of_kind(ParamKind::Buffer)
    }

    fn of_kind(&self, kind: ParamKind) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.kind == kind)
            .map(|(n, e)| (n.clone(), e.var.clone()))
            .collect()
    }

    /// Every stored tensor with its kind, sorted by name.
    pub fn all(&self) -> Vec<(String, Var, ParamKind)> {
        self.lock()
            .iter()
            .map(|(n, e)| (n.clone(), e.var.clone(), e.kind))
            .collect()
    }

    /// The variable stored under `name`, if any.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().get(name).map(|e| e.var.clone())
    }

    /// Number of stored tensors.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
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
        self.lock()
            .iter()
            .map(|(n, e)| Ok((n.clone(), e.var.as_tensor().copy()?.detach())))
            .collect()
    }

    /// Overwrite every stored tensor from `values`, which must hold exactly the stored names
    /// with the stored shapes (dtype is converted). Nothing changes unless all match.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] for a stored name absent from `values`,
    /// [`Error::InvalidParameter`] for an extra name, [`Error::ShapeMismatch`] for a shape.
    pub fn load_tensors(&self, values: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        let entries = self.lock();
        for (name, entry) in entries.iter() {
            let value = values.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: source.to_path_buf(),
                available: values.keys().cloned().collect(),
            })?;
            if value.dims() != entry.var.dims() {
                return Err(Error::ShapeMismatch {
                    context: format!("parameter `{name}` loaded from {}", source.display()),
                    expected: format!("{:?}", entry.var.dims()),
                    actual: value.dims().to_vec(),
                });
            }
        }
        if let Some(extra) = values.keys().find(|n| !entries.contains_key(*n)) {
            return Err(Error::invalid_parameter(
                "parameters",
                format!(
                    "{} holds `{extra}`, which this model does not have (another architecture?)",
                    source.display()
                ),
            ));
        }
        for (name, entry) in entries.iter() {
            let value = values[name]
                .to_dtype(entry.var.dtype())?
                .to_device(entry.var.device())?;
            entry.var.set(&value)?;
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
        let mut entries = self.lock();
        if let Some(existing) = entries.get(&name) {
            if existing.var.shape() != &shape || existing.kind != kind {
                return Err(Error::invalid_parameter(
                    "name",
                    format!(
                        "`{name}` already exists with shape {:?} ({:?}); asked for {:?} ({kind:?})",
                        existing.var.dims(),
                        existing.kind,
                        shape.dims()
                    ),
                ));
            }
            return Ok(existing.var.clone());
        }
        let tensor = init_tensor(self.seed.child_named(&name), &shape, dtype, device, init)?;
        let var = Var::from_tensor(&tensor)?;
        entries.insert(
            name,
            Entry {
                var: var.clone(),
                kind,
            },
        );
        Ok(var)
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
