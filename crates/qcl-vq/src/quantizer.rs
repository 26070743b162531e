//! The vector-quantization layer.
//!
//! This file holds the layer with its constructors, the forward pass, the state updates'
//! orchestration, encode/decode and save/load: one type whose parts share private helpers
//! (the per-codebook kernels live in `layout` and `update`), hence over 600 lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarBuilder;
use qcl_nn::ops::{mse_loss, straight_through};
use qcl_nn::{Init, ParamPath};
use qcl_pq::{KMeans, KMeansConfig, KMeansInit};
use qcl_tensor::{
    check_finite_slice, nearest_codes_into_finite, Error, Result, SafetensorsFile, TensorSpec,
};

use crate::config::{CodebookUpdate, VectorQuantizerConfig, DEFAULT_DEAD_CODE_THRESHOLD};
use crate::layout::{index_values, Geometry, InputLayout};
use crate::packed::PackedIndices;
use crate::update::{ema_update, histogram, revive};
use crate::usage::{CodeUsage, UsageStats};

/// Metadata `format` value of a saved [`VectorQuantizer`].
pub const QUANTIZER_FORMAT: &str = "qcl-vq/1";

/// What one [`VectorQuantizer::quantize`] produces.
#[derive(Debug, Clone)]
pub struct VqOutput {
    /// `z_q`: the quantised input, with the input's shape, dtype and device. Its value is the
    /// nearest codebook rows (the codebook as it was before this call's update), its gradient
    /// the identity to the input (straight-through, `z_e + sg(q − z_e)`).
    pub quantized: Tensor,
    /// The chosen code of every vector, `u32`: the input's shape with N (the number of
    /// codebooks) on the channel axis: `(B, N, H, W)` for a `(B, C, H, W)` input, `(B, T, N)`
    /// for `(B, T, C)`, `(B, N)` for `(B, C)`.
    pub indices: Tensor,
    /// `mean((z_e − sg(q))²)` over all input elements (unweighted; gradient to the input only).
    pub commitment_loss: Tensor,
    /// [`CodebookUpdate::Gradient`] only: `mean((q − sg(z_e))²)`, whose gradient reaches the
    /// codebook parameter only.
    pub codebook_loss: Option<Tensor>,
    /// `β·commitment_loss + codebook_loss`: what to add to the model's loss.
    pub loss: Tensor,
    /// Usage telemetry of this batch.
    pub stats: UsageStats,
}

/// A vector-quantization layer (VQ-VAE, van den Oord et al. 2017) with N codebooks of K codes,
/// EMA (Razavi et al. 2019), gradient or frozen codebook updates, commitment loss,
/// straight-through output, optional k-means initialisation and dead-code revival.
///
/// For an input `z_e` with C channels on its channel axis ([`ChannelAxis`](crate::ChannelAxis):
/// by default axis 1 of `(B, C, H, W)` feature maps and the last axis of any other shape, such
/// as `(B, T, C)` sequences or `(B, C)` rows), the channels split into N groups of D = C / N
/// (channel `n·D + d` belongs to codebook n), and every group vector `v` of every position is
/// replaced by its nearest codebook row
///
/// ```text
/// idx = argmin_k ‖v − E[n,k]‖²   (exact, ties to the lowest k: qcl_tensor::nearest_codes)
/// q   = E[n, idx]
/// ```
///
/// **A candle-nn layer.** [`VectorQuantizer::new`] takes the configuration and a candle-nn
/// `VarBuilder` (last, as candle-nn's constructors do); the layer implements
/// [`ModuleT`](candle_core::ModuleT), whose output is the straight-through `z_q`, and keeps
/// the whole [`VqOutput`] of its last call ([`last_output`](Self::last_output),
/// [`last_loss`](Self::last_loss)) for the loss and telemetry. Inside `candle_nn::seq()`, which
/// takes `Module`s, wrap it in [`qcl_nn::layers::WithMode`].
///
/// **State.** The codebook `E [N,K,D]`, the running counts `c [N,K]`, the EMA sums
/// `w [N,K,D]` (EMA mode) and a step counter (`u32`) are variables named `codebook`, `counts`,
/// `sums` and `steps` under the builder's prefix: in the user's `VarMap` (saved with it), or in
/// a [`ParamStore`](qcl_nn::ParamStore) ([`from_param_path`](Self::from_param_path)) as
/// buffers, except the codebook in [`CodebookUpdate::Gradient`] mode, which is a trainable
/// parameter for the caller's optimizer. Initially `E ~ U(−1/K, 1/K)`, `c = 0`, `w = E` (AQM).
/// In EMA and frozen modes nothing of the state enters the autograd graph, so an optimizer
/// stepping every variable of the `VarMap` (candle-nn's `AdamW` over `varmap.all_vars()`)
/// never moves it; only the layer's own training updates do. Training updates the variables in
/// place through `&self` ([`quantize`](Self::quantize) with `train`); a clone shares the state
/// and the last output (it is a second handle, not a copy), and one quantizer is not meant to
/// be trained from two threads at once.
///
/// **Speed.** Assignment, EMA and revival run on the host in plain loops over one gathered
/// `[M, D]` `f32` slice per codebook (the nearest-code kernel is multi-threaded); only
/// the outputs are built as tensors.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use qcl_vq::{VectorQuantizer, VectorQuantizerConfig};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let config = VectorQuantizerConfig { codebooks: 2, ..VectorQuantizerConfig::new(8, 16) };
/// let vq = VectorQuantizer::new(config, vb.pp("vq"))?;
/// assert_eq!(varmap.all_vars().len(), 4); // codebook, counts, sums, steps
/// let z_e = Tensor::randn(0f32, 1.0, (4, 8, 5, 5), &Device::Cpu)?;
/// let z_q = vq.forward_t(&z_e, true)?; // EMA update of the codebook
/// assert_eq!(z_q.dims(), &[4, 8, 5, 5]);
/// let out = vq.last_output().expect("one call made");
/// assert_eq!(out.indices.dims(), &[4, 2, 5, 5]);
/// // Decoding the indices gives the forward value again (with the pre-update codebook; here
/// // we encode again with the updated one).
/// let indices = vq.encode(&z_e)?;
/// let again = vq.quantize(&z_e, false)?;
/// assert_eq!(
///     vq.decode(&indices)?.flatten_all()?.to_vec1::<f32>()?,
///     again.quantized.flatten_all()?.to_vec1::<f32>()?
/// );
/// // Rows `[B, C]` work the same way.
/// let rows = vq.quantize(&Tensor::randn(0f32, 1.0, (6, 8), &Device::Cpu)?, false)?;
/// assert_eq!(rows.indices.dims(), &[6, 2]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    config: VectorQuantizerConfig,
    codebook: Var,
    counts: Var,
    sums: Option<Var>,
    steps: Var,
    device: Device,
    last: Arc<Mutex<Option<VqOutput>>>,
}

/// Assignment of one batch: per codebook, its gathered vectors and their codes.
struct Assignment {
    geometry: Geometry,
    /// Per codebook, `[M, D]`.
    points: Vec<Vec<f32>>,
    /// Per codebook, `[M]`.
    codes: Vec<Vec<u32>>,
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn set_var(var: &Var, values: Vec<f32>) -> Result<()> {
    let t = Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_device(var.device())?;
    var.set(&t)?;
    Ok(())
}

impl VectorQuantizer {
    /// A quantizer whose state is created through a candle-nn `VarBuilder` (`f32` whatever
    /// the builder's dtype, `u32` for `steps`): with a `VarMap`-backed builder the variables are
    /// the map's own (shared, updated in place, saved with the map), and a map that already
    /// holds them (e.g. loaded from a checkpoint) is reused as it is. The initial codebook
    /// `U(−1/K, 1/K)` comes from the builder (seeded by name with
    /// [`ParamStore::var_builder`](qcl_nn::ParamStore::var_builder)).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad configuration (see
    /// [`VectorQuantizerConfig::validate`]); the builder's errors (e.g. a stored variable of
    /// another shape), typed when the builder is qcl's.
    pub fn new(config: VectorQuantizerConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let (n, k, d) = (config.codebooks, config.codes, config.code_dim());
        let bound = 1.0 / k as f64;
        let uniform = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let zeros = candle_nn::Init::Const(0.0);
        let get = |shape: &[usize], name: &str, init, dtype| -> Result<Var> {
            let t = vb.get_with_hints_dtype(shape, name, init, dtype)?;
            // A variable already (VarMap-backed builders): shared, not copied.
            Ok(Var::from_tensor(&t)?)
        };
        let fresh_sums = !vb.contains_tensor("sums");
        let codebook = get(&[n, k, d], "codebook", uniform, DType::F32)?;
        let counts = get(&[n, k], "counts", zeros, DType::F32)?;
        let sums = match config.update {
            CodebookUpdate::Ema { .. } => {
                let sums = get(&[n, k, d], "sums", zeros, DType::F32)?;
                if fresh_sums {
                    // w = E at initialisation (AQM).
                    sums.set(&codebook.as_tensor().copy()?)?;
                }
                Some(sums)
            }
            _ => None,
        };
        let steps = get(&[1], "steps", zeros, DType::U32)?;
        let device = vb.device().clone();
        Ok(Self::with_state(
            config, codebook, counts, sums, steps, device,
        ))
    }

    /// A quantizer whose state lives under `path` in a qcl [`ParamStore`](qcl_nn::ParamStore)
    /// (created on first use, reused if the store already holds it with the same shapes): the
    /// counts, sums and step counter as buffers, the codebook as a buffer too except in
    /// [`CodebookUpdate::Gradient`] mode, where it is a trainable parameter.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_nn::ParamStore;
    /// use qcl_vq::{VectorQuantizer, VectorQuantizerConfig};
    /// let store = ParamStore::new(0);
    /// let vq = VectorQuantizer::from_param_path(&store.root(&Device::Cpu).pp("vq"), VectorQuantizerConfig::new(4, 8))?;
    /// assert_eq!(store.buffers().len(), 4);
    /// let out = vq.quantize(&Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu)?, true)?;
    /// assert_eq!(out.indices.dims(), &[3, 1]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad configuration (see
    /// [`VectorQuantizerConfig::validate`]) or a name already used with another shape or kind.
    pub fn from_param_path(path: &ParamPath, config: VectorQuantizerConfig) -> Result<Self> {
        config.validate()?;
        let (n, k, d) = (config.codebooks, config.codes, config.code_dim());
        let bound = 1.0 / k as f64;
        let init = Init::Uniform {
            low: -bound,
            high: bound,
        };
        let f32_path = path.with_dtype(DType::F32);
        let store = path.store();
        let codebook = match config.update {
            CodebookUpdate::Gradient => {
                f32_path.param("codebook", (n, k, d), init)?;
                store
                    .get(&path.full_name("codebook"))
                    .expect("the parameter was just created")
            }
            _ => f32_path.buffer("codebook", (n, k, d), init)?,
        };
        let counts = f32_path.buffer("counts", (n, k), Init::Zeros)?;
        let sums = match config.update {
            CodebookUpdate::Ema { .. } => {
                let fresh = store.get(&path.full_name("sums")).is_none();
                let sums = f32_path.buffer("sums", (n, k, d), Init::Zeros)?;
                if fresh {
                    // w = E at initialisation (AQM).
                    sums.set(&codebook.as_tensor().copy()?)?;
                }
                Some(sums)
            }
            _ => None,
        };
        let steps = path
            .with_dtype(DType::U32)
            .buffer("steps", 1, Init::Zeros)?;
        Ok(Self::with_state(
            config,
            codebook,
            counts,
            sums,
            steps,
            path.device().clone(),
        ))
    }

    // Mirrors the struct's fields: the one constructor that `new` and `from_param_path` end in.
    fn with_state(
        config: VectorQuantizerConfig,
        codebook: Var,
        counts: Var,
        sums: Option<Var>,
        steps: Var,
        device: Device,
    ) -> Self {
        VectorQuantizer {
            config,
            codebook,
            counts,
            sums,
            steps,
            device,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VectorQuantizerConfig {
        &self.config
    }

    /// The device the state lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A copy of the codebook `E`, `f32 [N, K, D]`.
    ///
    /// # Errors
    /// A candle error.
    pub fn codebook(&self) -> Result<Tensor> {
        Ok(self.codebook.as_tensor().copy()?.detach())
    }

    /// A copy of the running counts `c`, `f32 [N, K]`: the EMA of assignments per batch (in
    /// [`CodebookUpdate::Gradient`] mode the usage EMA).
    ///
    /// # Errors
    /// A candle error.
    pub fn counts(&self) -> Result<Tensor> {
        Ok(self.counts.as_tensor().copy()?)
    }

    /// A copy of the EMA sums `w`, `f32 [N, K, D]` ([`CodebookUpdate::Ema`] mode only).
    ///
    /// # Errors
    /// A candle error.
    pub fn sums(&self) -> Result<Option<Tensor>> {
        self.sums
            .as_ref()
            .map(|s| Ok(s.as_tensor().copy()?))
            .transpose()
    }

    /// Training updates applied so far.
    ///
    /// # Errors
    /// A candle error.
    pub fn steps(&self) -> Result<u64> {
        Ok(u64::from(self.steps.as_tensor().to_vec1::<u32>()?[0]))
    }

    /// Replaces the codebook (`[N, K, D]`, finite). In EMA mode the sums follow so that
    /// `E = w / c` where `c > 0`; codes with `c = 0` get `w = E`, as at initialisation.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::NonFinite`].
    pub fn set_codebook(&mut self, codebook: &Tensor) -> Result<()> {
        let c = &self.config;
        TensorSpec::new()
            .shape(&[Some(c.codebooks), Some(c.codes), Some(c.code_dim())])
            .finite()
            .check("codebook", codebook)?;
        let book = host_f32(codebook)?;
        if self.sums.is_some() {
            self.set_sums_from(&book, &host_f32(self.counts.as_tensor())?)?;
        }
        set_var(&self.codebook, book)
    }

    /// In EMA mode, sets the sums to `w = E·c` for the codebook `book` and the counts `counts`,
    /// with `w = E` for codes with `c = 0` (as at initialisation); nothing in the other modes.
    fn set_sums_from(&self, book: &[f32], counts: &[f32]) -> Result<()> {
        if let Some(sums) = &self.sums {
            let d = self.config.code_dim();
            let w: Vec<f32> = book
                .iter()
                .enumerate()
                .map(|(i, &e)| match counts[i / d] {
                    c if c > 0.0 => e * c,
                    _ => e,
                })
                .collect();
            set_var(sums, w)?;
        }
        Ok(())
    }

    /// Stops every further update (the codebook's AQM freezing): the mode becomes
    /// [`CodebookUpdate::Frozen`].
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] in [`CodebookUpdate::Gradient`] mode, where the caller's
    /// optimizer moves the codebook (leave it out of the optimizer instead).
    pub fn freeze(&mut self) -> Result<()> {
        if self.config.update == CodebookUpdate::Gradient {
            return Err(Error::invalid_parameter(
                "update",
                "a gradient-mode codebook is moved by the optimizer; leave it out of the \
                 optimizer to freeze it",
            ));
        }
        self.config.update = CodebookUpdate::Frozen;
        Ok(())
    }

    /// Checks an input and returns its layout and values as `f32` (row-major).
    fn input(&self, x: &Tensor) -> Result<(Geometry, Vec<f32>)> {
        let layout = InputLayout::new(
            x.dims(),
            self.config.channel_axis,
            self.config.dim,
            "vector quantizer input",
        )?;
        if !matches!(
            x.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        ) {
            return Err(Error::DTypeMismatch {
                context: "vector quantizer input".into(),
                expected: DType::F32,
                actual: x.dtype(),
            });
        }
        if !x.device().same_device(&self.device) {
            return Err(Error::invalid_parameter(
                "input",
                format!(
                    "the input is on {:?}, the quantizer on {:?}",
                    x.device(),
                    self.device
                ),
            ));
        }
        if layout.vectors() == 0 {
            return Err(Error::EmptyInput(format!(
                "vector quantizer input {:?} holds no vector",
                x.dims()
            )));
        }
        let values = host_f32(x)?;
        check_finite_slice("vector quantizer input", &values)?;
        let geometry = Geometry {
            layout,
            codebooks: self.config.codebooks,
            code_dim: self.config.code_dim(),
        };
        Ok((geometry, values))
    }

    /// Gathers the vectors of every codebook.
    fn gather_all(&self, geometry: &Geometry, values: &[f32]) -> Vec<Vec<f32>> {
        (0..self.config.codebooks)
            .map(|n| {
                let mut points = Vec::new();
                geometry.gather(values, n, &mut points);
                points
            })
            .collect()
    }

    /// Nearest codes of the gathered vectors against `book` (`[N·K·D]`).
    fn assign(
        &self,
        geometry: Geometry,
        points: Vec<Vec<f32>>,
        book: &[f32],
    ) -> Result<Assignment> {
        let (k, d) = (self.config.codes, self.config.code_dim());
        let m = geometry.layout.vectors();
        let mut codes = Vec::with_capacity(points.len());
        let mut distances = vec![0f32; m];
        for (n, p) in points.iter().enumerate() {
            let mut idx = vec![0u32; m];
            // The input was checked for NaN/inf once, in `input`.
            nearest_codes_into_finite(
                p,
                &book[n * k * d..(n + 1) * k * d],
                d,
                None,
                &mut idx,
                &mut distances,
            )?;
            codes.push(idx);
        }
        Ok(Assignment {
            geometry,
            points,
            codes,
        })
    }

    /// The code of every vector of `x`: `u32`, the input's shape with N on the channel axis
    /// (`(B, N, H, W)` for a `(B, C, H, W)` input, `(B, T, N)` for `(B, T, C)`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a channel axis without C channels (or a scalar), [`Error::DTypeMismatch`]
    /// for a non-float input, [`Error::NonFinite`] for NaN or infinity (naming the flat
    /// position), [`Error::EmptyInput`] for an input without vectors.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (geometry, values) = self.input(x)?;
        let points = self.gather_all(&geometry, &values);
        let book = host_f32(self.codebook.as_tensor())?;
        let assignment = self.assign(geometry, points, &book)?;
        self.index_tensor(&assignment)
    }

    /// [`encode`](Self::encode), bit-packed with `⌈log2 K⌉` bits per index.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn encode_packed(&self, x: &Tensor) -> Result<PackedIndices> {
        Ok(
            PackedIndices::from_tensor(&self.encode(x)?, self.config.codes)?
                .made_by(self.fingerprint()?),
        )
    }

    /// This quantizer's identity as it is now: a fingerprint of K, N, the dimension and the
    /// codebook's values. [`encode_packed`](Self::encode_packed) stores it with the indices
    /// and [`decode_packed`](Self::decode_packed) checks it, so that indices are never decoded
    /// with a codebook other than the one that made them. Training changes the codebook and so
    /// the fingerprint. It hashes the codebook (copied to the host) on every call, so
    /// [`encode_packed`](Self::encode_packed) and [`decode_packed`](Self::decode_packed) cost
    /// one codebook read each beyond the search.
    ///
    /// # Errors
    /// A candle error reading the codebook.
    pub fn fingerprint(&self) -> Result<String> {
        let book = host_f32(self.codebook.as_tensor())?;
        Ok(qcl_tensor::Fingerprint::new(QUANTIZER_FORMAT)
            .number(self.config.codes as u64)
            .number(self.config.codebooks as u64)
            .number(self.config.dim as u64)
            .floats(&book)
            .finish())
    }

    fn index_tensor(&self, a: &Assignment) -> Result<Tensor> {
        let shape = a.geometry.layout.shape_with(self.config.codebooks);
        let mut all = vec![0u32; shape.iter().product()];
        for (n, idx) in a.codes.iter().enumerate() {
            a.geometry.put_indices(idx, n, &mut all);
        }
        Ok(Tensor::from_vec(all, shape, &self.device)?)
    }

    /// The codebook rows of `indices` (`u32`, as [`encode`](Self::encode) returns them: N on
    /// the channel axis), re-interleaved into the input's shape (C on the channel axis), `f32`:
    /// exactly the values of [`VqOutput::quantized`] for the codebook as it is now.
    ///
    /// # Errors
    /// [`Error::DTypeMismatch`] for non-`u32` indices, [`Error::ShapeMismatch`] for a channel
    /// axis without N entries, [`Error::InvalidParameter`] for an index ≥ K.
    pub fn decode(&self, indices: &Tensor) -> Result<Tensor> {
        let (values, layout) =
            index_values(indices, self.config.codebooks, self.config.channel_axis)?;
        let k = self.config.codes;
        if let Some(i) = values.iter().position(|&v| v as usize >= k) {
            return Err(Error::invalid_parameter(
                "indices",
                format!(
                    "index {} at flat position {i} is not below K = {k}",
                    values[i]
                ),
            ));
        }
        let geometry = Geometry {
            layout,
            codebooks: self.config.codebooks,
            code_dim: self.config.code_dim(),
        };
        let book = host_f32(self.codebook.as_tensor())?;
        let shape = geometry.layout.shape_with(self.config.dim);
        let mut out = vec![0f32; shape.iter().product()];
        let kd = k * geometry.code_dim;
        for n in 0..self.config.codebooks {
            let idx = geometry.take_indices(&values, n);
            geometry.scatter(&book[n * kd..(n + 1) * kd], &idx, n, &mut out);
        }
        Ok(Tensor::from_vec(out, shape, &self.device)?)
    }

    /// [`decode`](Self::decode) of bit-packed indices, checking that this quantizer, with its
    /// codebook as it is now, made them (when they record a fingerprint). To decode indices
    /// deliberately with a codebook that has changed since (a model trained further), use
    /// `decode(&packed.to_tensor(device)?)`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if they point into another number of codes or another
    /// quantizer made them, and as [`decode`](Self::decode).
    pub fn decode_packed(&self, packed: &PackedIndices) -> Result<Tensor> {
        self.check_packed(packed)?;
        self.decode(&packed.to_tensor(&self.device)?)
    }

    /// Checks that `packed` index this quantizer's K codes and, if they record a fingerprint,
    /// that this quantizer (with its codebook as it is now) made them.
    pub(crate) fn check_packed(&self, packed: &PackedIndices) -> Result<()> {
        if packed.codes() != self.config.codes {
            return Err(Error::invalid_parameter(
                "packed indices",
                format!(
                    "they index {} codes, this quantizer has K = {}",
                    packed.codes(),
                    self.config.codes
                ),
            ));
        }
        if let Some(made_by) = packed.quantizer() {
            let this = self.fingerprint()?;
            if made_by != this {
                return Err(Error::invalid_parameter(
                    "packed indices",
                    format!(
                        "another quantizer (or this one before its codebook changed) made them: \
                         {made_by}, this one is {this}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Quantises `x` (C channels on the channel axis, any other axes); with `train`, then
    /// updates the state: the k-means initialisation (first training call, if configured; it
    /// happens before the assignment), the EMA or usage update, dead-code revival, the step
    /// counter. Without `train`, or in a frozen mode, nothing changes. The output is also kept
    /// as [`last_output`](Self::last_output); [`ModuleT::forward_t`] returns its `quantized`.
    ///
    /// # Errors
    /// As [`encode`](Self::encode); a candle error.
    pub fn quantize(&self, x: &Tensor, train: bool) -> Result<VqOutput> {
        let (geometry, values) = self.input(x)?;
        let points = self.gather_all(&geometry, &values);
        drop(values);
        let update = train && !self.config.update.is_frozen();
        let step = self.steps()?;
        if update && self.config.kmeans_init && step == 0 {
            self.kmeans_init(&points)?;
        }
        let book = host_f32(self.codebook.as_tensor())?;
        let assignment = self.assign(geometry, points, &book)?;
        let geometry = &assignment.geometry;
        let (k, d) = (self.config.codes, geometry.code_dim);

        // The forward value, from the codebook as it was before this call's update.
        let shape = geometry.layout.shape_with(self.config.dim);
        let mut q_host = vec![0f32; shape.iter().product()];
        for (n, idx) in assignment.codes.iter().enumerate() {
            geometry.scatter(&book[n * k * d..(n + 1) * k * d], idx, n, &mut q_host);
        }
        let q = Tensor::from_vec(q_host, shape.as_slice(), &self.device)?.to_dtype(x.dtype())?;
        let quantized = straight_through(x, &q)?;
        let commitment_loss = mse_loss(x, &q)?;
        let codebook_loss = match self.config.update {
            CodebookUpdate::Gradient => Some(self.codebook_loss(&assignment)?.to_dtype(x.dtype())?),
            _ => None,
        };
        let mut loss = commitment_loss.affine(self.config.commitment_weight, 0.0)?;
        if let Some(cb) = &codebook_loss {
            loss = (loss + cb)?;
        }
        let indices = self.index_tensor(&assignment)?;

        let histogram = histogram(&assignment.codes, k);
        let (dead_codes, revived_codes) = if update {
            let out = self.update_state(&assignment, &histogram, book, step)?;
            self.steps.set(&Tensor::from_vec(
                vec![u32::try_from(step + 1).unwrap_or(u32::MAX)],
                1,
                &self.device,
            )?)?;
            out
        } else {
            let counts = host_f32(self.counts.as_tensor())?;
            (
                self.dead_per_codebook(&counts),
                vec![0; self.config.codebooks],
            )
        };
        let output = VqOutput {
            quantized,
            indices,
            commitment_loss,
            codebook_loss,
            loss,
            stats: UsageStats {
                batch: CodeUsage::from_counts(self.config.codebooks, k, histogram),
                dead_codes,
                revived_codes,
            },
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(output.clone());
        Ok(output)
    }

    /// The output of the last [`quantize`](Self::quantize) or
    /// [`forward_t`](ModuleT::forward_t) call (of this quantizer or a clone), if any: the loss
    /// to add to the model's, the indices and the usage statistics of that batch.
    pub fn last_output(&self) -> Option<VqOutput> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The [`VqOutput::loss`] of the last call: `β·commitment + codebook loss`, what to add
    /// to the model's loss after a [`forward_t`](ModuleT::forward_t).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] before the first call.
    pub fn last_loss(&self) -> Result<Tensor> {
        self.last_output().map(|o| o.loss).ok_or_else(|| {
            Error::EmptyInput("no vector-quantizer call yet, so no loss to return".into())
        })
    }

    /// `mean((E[idx] − sg(z_e))²)` with the codebook parameter in the graph.
    fn codebook_loss(&self, a: &Assignment) -> Result<Tensor> {
        let (k, d) = (self.config.codes, self.config.code_dim());
        let flat: Vec<u32> = a
            .codes
            .iter()
            .enumerate()
            .flat_map(|(n, idx)| idx.iter().map(move |&i| (n * k) as u32 + i))
            .collect();
        let rows = flat.len();
        let flat = Tensor::from_vec(flat, rows, &self.device)?;
        let targets: Vec<f32> = a.points.concat();
        let targets = Tensor::from_vec(targets, (rows, d), &self.device)?;
        let chosen = self
            .codebook
            .as_tensor()
            .reshape((self.config.codebooks * k, d))?
            .index_select(&flat, 0)?;
        mse_loss(&chosen, &targets)
    }

    fn dead_threshold(&self) -> f64 {
        self.config
            .dead_code_threshold
            .unwrap_or(DEFAULT_DEAD_CODE_THRESHOLD)
    }

    fn dead_per_codebook(&self, counts: &[f32]) -> Vec<usize> {
        let t = self.dead_threshold();
        counts
            .chunks_exact(self.config.codes)
            .map(|c| c.iter().filter(|&&v| f64::from(v) < t).count())
            .collect()
    }

    /// The EMA (or usage) update and revival; returns dead and revived codes per codebook.
    fn update_state(
        &self,
        a: &Assignment,
        histogram: &[u64],
        mut book: Vec<f32>,
        step: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let (nb, k, d) = (
            self.config.codebooks,
            self.config.codes,
            self.config.code_dim(),
        );
        let mut counts = host_f32(self.counts.as_tensor())?;
        let mut sums = match &self.sums {
            Some(s) => Some(host_f32(s.as_tensor())?),
            None => None,
        };
        for n in 0..nb {
            let hist = &histogram[n * k..(n + 1) * k];
            let c = &mut counts[n * k..(n + 1) * k];
            let e = &mut book[n * k * d..(n + 1) * k * d];
            match (self.config.update, sums.as_mut()) {
                (CodebookUpdate::Ema { decay, eps }, Some(w)) => ema_update(
                    &a.points[n],
                    &a.codes[n],
                    hist,
                    decay,
                    eps,
                    c,
                    &mut w[n * k * d..(n + 1) * k * d],
                    e,
                ),
                _ => {
                    // Gradient mode: only the usage EMA; the optimizer moves the codebook.
                    let g = self.config.usage_decay;
                    for (c, &h) in c.iter_mut().zip(hist) {
                        *c = (g * f64::from(*c) + (1.0 - g) * h as f64) as f32;
                    }
                }
            }
        }
        let dead = self.dead_per_codebook(&counts);
        let mut revived = vec![0; nb];
        if let Some(threshold) = self.config.dead_code_threshold {
            let revival = self.config.seed.child_named("revival").child(step);
            for (n, revived) in revived.iter_mut().enumerate() {
                *revived = revive(
                    &a.points[n],
                    d,
                    threshold as f32,
                    revival.child(n as u64),
                    &mut counts[n * k..(n + 1) * k],
                    sums.as_mut().map(|w| &mut w[n * k * d..(n + 1) * k * d]),
                    &mut book[n * k * d..(n + 1) * k * d],
                )?;
            }
        }
        set_var(&self.counts, counts)?;
        if let (Some(var), Some(w)) = (&self.sums, sums) {
            set_var(var, w)?;
        }
        let codebook_changed = matches!(self.config.update, CodebookUpdate::Ema { .. })
            || revived.iter().any(|&r| r > 0);
        if codebook_changed {
            set_var(&self.codebook, book)?;
        }
        Ok((dead, revived))
    }

    /// Replaces the codebook by k-means centroids (k-means++ seeding, then Lloyd) of this
    /// batch's vectors (per codebook; when
    /// the batch has fewer than K vectors, the remaining codes are copies of batch vectors
    /// drawn at random), and sets the counts to the cluster sizes (and `w = E·c`).
    fn kmeans_init(&self, points: &[Vec<f32>]) -> Result<()> {
        let (k, d) = (self.config.codes, self.config.code_dim());
        let mut book = Vec::with_capacity(self.config.codebooks * k * d);
        let mut counts = Vec::with_capacity(self.config.codebooks * k);
        for (n, p) in points.iter().enumerate() {
            let m = p.len() / d;
            let seed = self.config.seed.child_named("kmeans").child(n as u64);
            let fitted = k.min(m);
            let params = KMeansConfig {
                max_iter: self.config.kmeans_iterations,
                init: KMeansInit::KMeansPlusPlus,
                seed,
                ..KMeansConfig::new(fitted)
            };
            let model = KMeans::fit(p, d, None, &params)?;
            let mut centroids = model.centroids;
            let mut rng = seed.child_named("fill").rng();
            for _ in fitted..k {
                let row = rng.below(m)?;
                centroids.extend_from_slice(&p[row * d..(row + 1) * d]);
            }
            let mut idx = vec![0u32; m];
            let mut dist = vec![0f32; m];
            nearest_codes_into_finite(p, &centroids, d, None, &mut idx, &mut dist)?;
            let mut sizes = vec![0f32; k];
            for &i in &idx {
                sizes[i as usize] += 1.0;
            }
            book.extend_from_slice(&centroids);
            counts.extend_from_slice(&sizes);
        }
        self.set_sums_from(&book, &counts)?;
        set_var(&self.counts, counts)?;
        set_var(&self.codebook, book)
    }

    /// Writes the configuration (metadata, `format` = [`QUANTIZER_FORMAT`]) and the state
    /// (`codebook`, `counts`, `sums` in EMA mode, `steps`) to a safetensors file, atomically.
    ///
    /// ```
    /// use candle_core::Device;
    /// use qcl_nn::ParamStore;
    /// use qcl_vq::{VectorQuantizer, VectorQuantizerConfig};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("vq.safetensors");
    /// let vq = VectorQuantizer::from_param_path(&ParamStore::new(1).root(&Device::Cpu), VectorQuantizerConfig::new(4, 8))?;
    /// vq.save(&path)?;
    /// let back = VectorQuantizer::load(&path, &ParamStore::new(2).root(&Device::Cpu))?;
    /// assert_eq!(back.config(), vq.config());
    /// assert_eq!(back.codebook()?.flatten_all()?.to_vec1::<f32>()?, vq.codebook()?.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut meta: BTreeMap<String, String> = self.config.to_metadata();
        meta.insert("format".into(), QUANTIZER_FORMAT.into());
        let codebook = self.codebook()?;
        let counts = self.counts()?;
        let steps = self.steps.as_tensor().copy()?;
        let sums = self.sums()?;
        let mut tensors: Vec<(&str, &Tensor)> = vec![
            ("codebook", &codebook),
            ("counts", &counts),
            ("steps", &steps),
        ];
        if let Some(s) = &sums {
            tensors.push(("sums", s));
        }
        qcl_tensor::write_safetensors(path, &tensors, &meta)
    }

    /// Reads a quantizer written by [`save`](Self::save), placing its state under `path` (as
    /// [`from_param_path`](Self::from_param_path) would, then overwriting it with the file's).
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::BadFile`] for a truncated or foreign file or a bad
    /// configuration; [`Error::MissingTensor`], [`Error::ShapeMismatch`],
    /// [`Error::DTypeMismatch`], [`Error::NonFinite`] for a state that does not fit the
    /// configuration; the errors of [`from_param_path`](Self::from_param_path).
    pub fn load(file: impl AsRef<Path>, path: &ParamPath) -> Result<Self> {
        let file_path = file.as_ref();
        let file = SafetensorsFile::open(file_path)?;
        file.require_format(QUANTIZER_FORMAT, "a vector-quantizer file")?;
        let config = VectorQuantizerConfig::from_metadata(file.metadata(), file_path)?;
        let (n, k, d) = (config.codebooks, config.codes, config.code_dim());
        let f32_spec = |shape: &[usize]| {
            let pattern: Vec<Option<usize>> = shape.iter().map(|&s| Some(s)).collect();
            TensorSpec::new().dtype(DType::F32).shape(&pattern).finite()
        };
        let codebook = file.read("codebook", &f32_spec(&[n, k, d]), &Device::Cpu)?;
        let counts = file.read("counts", &f32_spec(&[n, k]), &Device::Cpu)?;
        let steps = file.read(
            "steps",
            &TensorSpec::new().dtype(DType::U32).shape(&[Some(1)]),
            &Device::Cpu,
        )?;
        let sums = match config.update {
            CodebookUpdate::Ema { .. } => {
                Some(file.read("sums", &f32_spec(&[n, k, d]), &Device::Cpu)?)
            }
            _ => None,
        };
        let vq = VectorQuantizer::from_param_path(path, config)?;
        let dev = vq.device.clone();
        vq.codebook.set(&codebook.to_device(&dev)?)?;
        vq.counts.set(&counts.to_device(&dev)?)?;
        vq.steps.set(&steps.to_device(&dev)?)?;
        if let (Some(var), Some(s)) = (&vq.sums, sums) {
            var.set(&s.to_device(&dev)?)?;
        }
        Ok(vq)
    }
}

/// The quantizer as a candle-nn layer: `forward_t(x, train)` is
/// [`quantize(x, train)`](VectorQuantizer::quantize)'s straight-through `quantized` (training
/// updates the state when `train`); the rest of that call's [`VqOutput`] is
/// [`last_output`](VectorQuantizer::last_output). qcl's typed errors travel in candle's error
/// (`qcl_tensor::Error::from` gives them back).
impl ModuleT for VectorQuantizer {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.quantize(x, train)?.quantized)
    }
}
