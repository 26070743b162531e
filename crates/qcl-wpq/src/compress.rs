//! The whole-network procedure (spec §4): layer by layer, inputs recorded from the student,
//! activation-aware EM, layer-wise distillation with CentroidSGD (§5), then global
//! fine-tuning; the teacher's training and evaluation.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use qcl_data::{Dataset, Normalization};
use qcl_nn::ops::{conv2d, Conv2dParams};
use qcl_nn::optim::{Adam, AdamParams, Optimizer};
use qcl_tensor::{Error, Result, Seed, SeededRng};
use serde::{Deserialize, Serialize};

use crate::compressed::{CompressedModel, QuantizedLayer};
use crate::em::{activation_aware_em, EmParams, MetricSource, Objective, PatchSampler};
use crate::layout::{clamp_centroids, LayerGeometry, LayerKind, Layout};
use crate::model::{distillation_loss, Arch, ForwardOptions, LayerSpec, Model};

/// Fashion-MNIST standardisation of spec §10.
pub const FMNIST_NORMALIZATION: Normalization = Normalization::Standardize {
    mean: 0.2860,
    std: 0.3530,
};

/// Every knob of [`compress`], with the defaults of spec §10 (FMNet, K = 64 everywhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressConfig {
    /// E-step metric.
    pub objective: Objective,
    /// Block size of k×k convolutions with k > 1 (`cv`).
    pub block_conv: usize,
    /// Block size of 1×1 convolutions (`pw`).
    pub block_pointwise: usize,
    /// Block size of linear layers (`fc`).
    pub block_linear: usize,
    /// Centroids of k×k convolutions (before the clamp).
    pub centroids_conv: usize,
    /// Centroids of 1×1 convolutions.
    pub centroids_pointwise: usize,
    /// Centroids of linear layers.
    pub centroids_linear: usize,
    /// Flattening order (ChangeDim = channel-major).
    pub layout: Layout,
    /// One codebook of `K/d` centroids per input-channel block (Subspace; channel-major).
    pub per_slab_codebooks: bool,
    /// Fold BatchNorm into the convolutions first and fine-tune the biases too (Fusion).
    pub fuse_bn: bool,
    /// EM iterations per layer.
    pub em_iterations: usize,
    /// Unrolled input rows per EM iteration (patches = this / m, at least 4·d/m).
    pub rows_per_iteration: usize,
    /// Training images whose activations are recorded per layer.
    pub activation_images: usize,
    /// Layer-wise fine-tuning steps per layer.
    pub layer_steps: usize,
    /// Layer-wise CentroidSGD learning rate.
    pub layer_lr: f64,
    /// Global fine-tuning steps.
    pub global_steps: usize,
    /// Global CentroidSGD learning rate.
    pub global_lr: f64,
    /// Fractions of the global phase after which its learning rate is multiplied by 0.1
    /// (default none, spec §10's constant rate; the paper's schedule, ×0.1 every three of nine
    /// rounds, is `[1/3, 2/3]`).
    pub global_lr_drops: Vec<f64>,
    /// Momentum of CentroidSGD.
    pub momentum: f64,
    /// Weight decay of CentroidSGD.
    pub weight_decay: f64,
    /// Distillation batch size.
    pub batch_size: usize,
    /// Average (not sum) the members' gradients (upstream behaviour).
    pub mean_grad: bool,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for CompressConfig {
    fn default() -> Self {
        CompressConfig {
            objective: Objective::ActivationAware,
            block_conv: 9,
            block_pointwise: 4,
            block_linear: 4,
            centroids_conv: 64,
            centroids_pointwise: 64,
            centroids_linear: 64,
            layout: Layout::Spatial,
            per_slab_codebooks: false,
            fuse_bn: false,
            em_iterations: 30,
            rows_per_iteration: 20_000,
            activation_images: 256,
            layer_steps: 100,
            layer_lr: 0.01,
            global_steps: 400,
            global_lr: 0.005,
            global_lr_drops: Vec::new(),
            momentum: 0.9,
            weight_decay: 1e-4,
            batch_size: 128,
            mean_grad: true,
            seed: 0,
        }
    }
}

impl CompressConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("block_conv", self.block_conv),
            ("block_pointwise", self.block_pointwise),
            ("block_linear", self.block_linear),
            ("centroids_conv", self.centroids_conv),
            ("centroids_pointwise", self.centroids_pointwise),
            ("centroids_linear", self.centroids_linear),
            ("activation_images", self.activation_images),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                return Err(Error::invalid_parameter(name, "must be at least 1"));
            }
        }
        for (name, v) in [
            ("layer_lr", self.layer_lr),
            ("global_lr", self.global_lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be finite and >= 0, got {v}"),
                ));
            }
        }
        if let Some(bad) = self
            .global_lr_drops
            .iter()
            .find(|f| !(f.is_finite() && (0.0..=1.0).contains(*f)))
        {
            return Err(Error::invalid_parameter(
                "global_lr_drops",
                format!("fractions must lie in [0, 1], got {bad}"),
            ));
        }
        if self.per_slab_codebooks && self.layout != Layout::ChannelMajor {
            return Err(Error::invalid_parameter(
                "per_slab_codebooks",
                "Subspace codebooks need layout = channel_major",
            ));
        }
        Ok(())
    }

    /// The geometry and `(K, groups)` of one layer under this configuration.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the block size does not divide the layer's input
    /// dimension or the layer is too small for a codebook.
    pub fn layer_plan(&self, layer: &LayerSpec) -> Result<(LayerGeometry, usize, usize)> {
        let (block, k_flag) = match layer.kind {
            LayerKind::Conv { kh, kw, .. } if kh * kw > 1 => (self.block_conv, self.centroids_conv),
            LayerKind::Conv { .. } => (self.block_pointwise, self.centroids_pointwise),
            LayerKind::Linear { .. } => (self.block_linear, self.centroids_linear),
        };
        let geometry = LayerGeometry::new(layer.kind, self.layout, block).map_err(|e| {
            Error::invalid_parameter("block", format!("layer `{}`: {e}", layer.name))
        })?;
        let (n_groups, _) = geometry.groups(self.per_slab_codebooks);
        let (k_flag, per_group) = if self.per_slab_codebooks {
            ((k_flag / block).max(1), geometry.n_subvectors() / n_groups)
        } else {
            (k_flag, geometry.n_subvectors())
        };
        let k = clamp_centroids(k_flag, per_group).map_err(|e| {
            Error::invalid_parameter("centroids", format!("layer `{}`: {e}", layer.name))
        })?;
        Ok((geometry, k, n_groups))
    }
}

/// The recorded inputs of one layer (`[N, C, H, W]` for a convolution, `[N, in]` for a linear
/// layer), sampled as im2col patches in the layer's layout.
#[derive(Debug, Clone)]
pub struct LayerInputs {
    geometry: LayerGeometry,
    padding: usize,
    dims: Vec<usize>,
    data: Vec<f32>,
    tensor: Tensor,
}

impl LayerInputs {
    /// Wraps recorded inputs.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `inputs` does not fit the layer.
    pub fn new(geometry: LayerGeometry, padding: usize, inputs: &Tensor) -> Result<Self> {
        let dims = inputs.dims().to_vec();
        let ok = match geometry.kind {
            LayerKind::Conv { c_in, .. } => dims.len() == 4 && dims[1] == c_in,
            LayerKind::Linear { inp, .. } => dims.len() == 2 && dims[1] == inp,
        };
        if !ok || dims[0] == 0 {
            return Err(Error::ShapeMismatch {
                context: "layer inputs".into(),
                expected: format!("{:?} inputs", geometry.kind),
                actual: dims,
            });
        }
        let tensor = inputs.to_dtype(DType::F32)?.contiguous()?;
        let data = tensor.flatten_all()?.to_vec1()?;
        Ok(LayerInputs {
            geometry,
            padding,
            dims,
            data,
            tensor,
        })
    }

    /// `‖X(M − M̂)‖² / ‖XM‖²` on the recorded inputs: the layer's relative output error.
    ///
    /// # Errors
    /// A candle error for weights of the wrong shape.
    pub fn output_error(&self, reference: &Tensor, quantized: &Tensor) -> Result<f64> {
        let apply = |w: &Tensor| -> Result<Tensor> {
            match self.geometry.kind {
                LayerKind::Conv { .. } => conv2d(
                    &self.tensor,
                    w,
                    Conv2dParams {
                        padding: self.padding,
                        ..Default::default()
                    },
                ),
                LayerKind::Linear { .. } => Ok(self.tensor.matmul(&w.t()?)?),
            }
        };
        let y = apply(reference)?;
        let y_hat = apply(quantized)?;
        let err = (&y - &y_hat)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let norm = y.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok(f64::from(err) / f64::from(norm).max(f64::MIN_POSITIVE))
    }
}

impl LayerInputs {
    /// Output positions per recorded input (`H_out·W_out`, 1 for a linear layer).
    fn positions(&self) -> (usize, usize) {
        match self.geometry.kind {
            LayerKind::Linear { .. } => (1, 1),
            LayerKind::Conv { kh, kw, .. } => {
                let p = self.padding;
                (self.dims[2] + 2 * p + 1 - kh, self.dims[3] + 2 * p + 1 - kw)
            }
        }
    }

    /// Writes the patch of input `i` at output position `(oy, ox)` (zero padding included).
    fn fill_patch(&self, i: usize, oy: usize, ox: usize, patch: &mut [f32]) {
        patch.fill(0.0);
        match self.geometry.kind {
            LayerKind::Linear { inp, .. } => {
                let row = &self.data[i * inp..(i + 1) * inp];
                for (c, v) in row.iter().enumerate() {
                    patch[self.geometry.patch_position(c, 0, 0)] = *v;
                }
            }
            LayerKind::Conv { c_in, kh, kw, .. } => {
                let (h, w) = (self.dims[2], self.dims[3]);
                let p = self.padding as isize;
                for c in 0..c_in {
                    let plane = &self.data[(i * c_in + c) * h * w..(i * c_in + c + 1) * h * w];
                    for y in 0..kh {
                        let iy = (oy + y) as isize - p;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for x in 0..kw {
                            let ix = (ox + x) as isize - p;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            patch[self.geometry.patch_position(c, y, x)] =
                                plane[iy as usize * w + ix as usize];
                        }
                    }
                }
            }
        }
    }

    /// Every patch (im2col), `[N·H_out·W_out, D]` row-major, rows ordered `(n, oy, ox)`, each
    /// in the layer's layout, so that `conv(x, W) = im2col(x)·M`.
    pub fn im2col(&self) -> Vec<f32> {
        let d_in = self.geometry.in_dim();
        let (h_out, w_out) = self.positions();
        let mut out = vec![0f32; self.dims[0] * h_out * w_out * d_in];
        for (r, patch) in out.chunks_exact_mut(d_in).enumerate() {
            let (i, pos) = (r / (h_out * w_out), r % (h_out * w_out));
            self.fill_patch(i, pos / w_out, pos % w_out, patch);
        }
        out
    }
}

impl PatchSampler for LayerInputs {
    fn patch_len(&self) -> usize {
        self.geometry.in_dim()
    }

    fn sample(&self, rows: usize, rng: &mut SeededRng) -> Result<Vec<f32>> {
        let d_in = self.geometry.in_dim();
        let (h_out, w_out) = self.positions();
        let mut out = vec![0f32; rows * d_in];
        for patch in out.chunks_exact_mut(d_in) {
            let i = rng.below(self.dims[0])?;
            let oy = rng.below(h_out)?;
            let ox = rng.below(w_out)?;
            self.fill_patch(i, oy, ox, patch);
        }
        Ok(out)
    }
}

/// CentroidSGD (spec §5) in centroid space: the gradient of the codebook (sum over members,
/// from autograd through the gather) is divided by the member counts (`mean_grad`), then
/// torch-SGD momentum with weight decay updates the centroids. Without counts it is plain
/// momentum SGD (used for the fused biases).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use qcl_wpq::CentroidSgd;
/// let c = Var::from_tensor(&Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &Device::Cpu)?)?;
/// let mut opt = CentroidSgd::new(Some(&[2, 1]), 0.1, 0.0, 0.0)?;
/// opt.step(&c, &Tensor::new(&[[2f32, 2.0], [1.0, 1.0]], &Device::Cpu)?)?;
/// assert_eq!(c.as_tensor().to_vec2::<f32>()?, vec![vec![0.9, 0.9], vec![1.9, 1.9]]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug)]
pub struct CentroidSgd {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    scale: Option<Tensor>,
    buffer: Option<Tensor>,
}

impl CentroidSgd {
    /// `counts`: members per centroid (row of the codebook), or `None` for plain SGD.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a centroid without members or a negative rate.
    pub fn new(
        counts: Option<&[usize]>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        if !(lr >= 0.0 && momentum >= 0.0 && weight_decay >= 0.0) {
            return Err(Error::invalid_parameter("lr", "rates must be >= 0"));
        }
        let scale = match counts {
            Some(c) => {
                if let Some(i) = c.iter().position(|&n| n == 0) {
                    return Err(Error::invalid_parameter(
                        "centroids",
                        format!("centroid {i} has no members (EM guarantees none)"),
                    ));
                }
                let inv: Vec<f32> = c.iter().map(|&n| 1.0 / n as f32).collect();
                Some(Tensor::from_vec(inv, (c.len(), 1), &Device::Cpu)?)
            }
            None => None,
        };
        Ok(CentroidSgd {
            lr,
            momentum,
            weight_decay,
            scale,
            buffer: None,
        })
    }

    /// Changes the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// One update of `param` with its gradient `grad` (same shape).
    ///
    /// # Errors
    /// A candle error for mismatched shapes.
    pub fn step(&mut self, param: &Var, grad: &Tensor) -> Result<()> {
        let mut g = match &self.scale {
            Some(s) => grad.broadcast_mul(s)?,
            None => grad.clone(),
        };
        let w = param.as_tensor();
        if self.weight_decay != 0.0 {
            g = (g + (w * self.weight_decay)?)?;
        }
        let buf = match &self.buffer {
            Some(b) if self.momentum != 0.0 => ((b * self.momentum)? + g)?,
            _ => g,
        };
        param.set(&(w - (&buf * self.lr)?)?)?;
        self.buffer = Some(buf);
        Ok(())
    }
}

/// An endless stream of shuffled training batches (a new permutation per epoch).
struct BatchStream<'a> {
    data: &'a Dataset,
    seed: Seed,
    batch: usize,
    epoch: u64,
    order: Vec<usize>,
    next: usize,
}

impl<'a> BatchStream<'a> {
    fn new(data: &'a Dataset, batch: usize, seed: Seed) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::EmptyInput("no training images".into()));
        }
        Ok(BatchStream {
            data,
            seed,
            batch: batch.min(data.len()),
            epoch: 0,
            order: seed.child(0).rng().permutation(data.len()),
            next: 0,
        })
    }

    fn next_batch(&mut self) -> Result<(Tensor, Tensor)> {
        if self.next + self.batch > self.order.len() {
            self.epoch += 1;
            self.order = self
                .seed
                .child(self.epoch)
                .rng()
                .permutation(self.data.len());
            self.next = 0;
        }
        let idx = &self.order[self.next..self.next + self.batch];
        self.next += self.batch;
        self.data
            .tensors_at(idx, FMNIST_NORMALIZATION, &Device::Cpu)
    }
}

/// Test accuracy (%) of `model` in eval mode on `data` (the first `limit` images if given).
///
/// # Errors
/// [`Error::EmptyInput`] for no images, a candle error.
pub fn evaluate(model: &Model, data: &Dataset, limit: Option<usize>) -> Result<f64> {
    let n = limit.unwrap_or(data.len()).min(data.len());
    if n == 0 {
        return Err(Error::EmptyInput("no evaluation images".into()));
    }
    let mut correct = 0usize;
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(500) {
        let (x, y) = data.tensors_at(chunk, FMNIST_NORMALIZATION, &Device::Cpu)?;
        let logits = model.logits(&x)?;
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let y: Vec<u32> = y.to_vec1()?;
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    Ok(100.0 * correct as f64 / n as f64)
}

/// Teacher training (spec §10: Adam lr 1e-3, last epoch 3e-4, batch 128, no augmentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// Architecture.
    pub arch: Arch,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Learning rate of the last epoch.
    pub last_epoch_lr: f64,
    /// Use only the first this many training images (all when `None`).
    pub train_images: Option<usize>,
    /// Seed of the initialisation and the batch order.
    pub seed: u64,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            arch: Arch::FmNet,
            epochs: 8,
            batch_size: 128,
            lr: 1e-3,
            last_epoch_lr: 3e-4,
            train_images: None,
            seed: 0,
        }
    }
}

/// Trains a teacher with cross-entropy.
///
/// # Errors
/// [`Error::EmptyInput`] without images, a candle error.
pub fn train_teacher(cfg: &TeacherConfig, train: &Dataset, bar: &ProgressBar) -> Result<Model> {
    let seed = Seed::new(cfg.seed);
    let model = Model::new(cfg.arch, seed.child_named("init"))?;
    let n = cfg.train_images.unwrap_or(train.len()).min(train.len());
    let subset = train.subset(&(0..n).collect::<Vec<_>>())?;
    let mut stream = BatchStream::new(&subset, cfg.batch_size, seed.child_named("batches"))?;
    let steps_per_epoch = (n / stream.batch).max(1);
    let mut opt = Adam::new(
        model.trainable(),
        AdamParams {
            lr: cfg.lr,
            ..Default::default()
        },
    )?;
    bar.set_length((cfg.epochs * steps_per_epoch) as u64);
    bar.set_position(0);
    for epoch in 0..cfg.epochs {
        if epoch + 1 == cfg.epochs && cfg.epochs > 1 {
            opt.set_learning_rate(cfg.last_epoch_lr);
        }
        for _ in 0..steps_per_epoch {
            let (x, y) = stream.next_batch()?;
            let out = model.forward(
                &x,
                ForwardOptions {
                    train: true,
                    ..Default::default()
                },
            )?;
            let loss = candle_nn::loss::cross_entropy(&out.logits, &y)?;
            opt.backward_step(&loss)?;
            model.update_running_stats(&out.bn_stats)?;
            bar.inc(1);
        }
    }
    Ok(model)
}

/// What [`compress`] measured for one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Layer name.
    pub name: String,
    /// Block size.
    pub block: usize,
    /// Centroids per codebook.
    pub k: usize,
    /// Codebooks.
    pub n_groups: usize,
    /// Subvectors.
    pub n_subvectors: usize,
    /// EM surrogate objective after each iteration.
    pub em_objective: Vec<f64>,
    /// Empty clusters repaired.
    pub repairs: usize,
    /// Relative output error `‖X(M−M̂)‖²/‖XM‖²` on the recorded inputs right after EM.
    pub output_error_after_em: f64,
    /// The same after layer-wise fine-tuning.
    pub output_error_after_finetune: f64,
    /// Seconds of EM.
    pub em_seconds: f64,
    /// Seconds of layer-wise fine-tuning.
    pub finetune_seconds: f64,
}

/// Result of [`compress`].
#[derive(Debug, Clone)]
pub struct CompressOutcome {
    /// After EM and layer-wise fine-tuning of every layer (before the global phase).
    pub after_layerwise: CompressedModel,
    /// The final model (after global fine-tuning), codebooks rounded to fp16.
    pub compressed: CompressedModel,
    /// Per-layer figures.
    pub layers: Vec<LayerReport>,
    /// Wall time of the whole compression, seconds.
    pub seconds: f64,
    /// Trainable parameters of the uncompressed teacher.
    pub uncompressed_params: usize,
}

fn snapshot(student: &Model, layers: &[QuantizedLayer]) -> Result<CompressedModel> {
    let mut layers = layers.to_vec();
    layers.iter_mut().for_each(QuantizedLayer::round_to_f16);
    let names: Vec<String> = layers
        .iter()
        .map(|l| format!("{}.weight", l.name))
        .collect();
    let floats = student
        .tensors()
        .into_iter()
        .filter(|(k, _)| !names.contains(k))
        .collect();
    Ok(CompressedModel {
        arch: student.arch(),
        layers,
        floats,
    })
}

/// Records the input of layer `name` of `model` (eval mode) on `images`.
fn record_inputs(model: &Model, images: &Tensor, name: &str) -> Result<Tensor> {
    let n = images.dim(0)?;
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = 128.min(n - start);
        let x = images.narrow(0, start, len)?;
        let out = model.forward(
            &x,
            ForwardOptions {
                capture: Some(name),
                detach: true,
                ..Default::default()
            },
        )?;
        parts.push(out.captured.ok_or_else(|| {
            Error::invalid_parameter("layer", format!("no layer `{name}` to record"))
        })?);
        start += len;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Distillation steps on `trainable` codebooks (and, with Fusion, biases): the student's
/// weights of those layers are rebuilt from the codebook vars in every forward pass.
#[allow(clippy::too_many_arguments)]
fn finetune(
    teacher: &Model,
    student: &Model,
    layers: &mut [QuantizedLayer],
    which: &[usize],
    biases: &[String],
    steps: usize,
    (lr, drops): (f64, &[f64]),
    cfg: &CompressConfig,
    train_mode: bool,
    stream: &mut BatchStream<'_>,
    bar: &ProgressBar,
) -> Result<()> {
    if steps == 0 {
        return Ok(());
    }
    // Step indices at which the rate drops tenfold.
    let drop_steps: Vec<usize> = drops
        .iter()
        .map(|f| (f * steps as f64).round() as usize)
        .collect();
    let mut codebooks = Vec::new();
    for &i in which {
        let l = &layers[i];
        let d = l.geometry.block;
        let var = Var::from_tensor(&Tensor::from_vec(
            l.centroids.clone(),
            (l.n_groups * l.k, d),
            &Device::Cpu,
        )?)?;
        let counts = l.cluster_sizes();
        let opt = CentroidSgd::new(
            cfg.mean_grad.then_some(counts.as_slice()),
            lr,
            cfg.momentum,
            cfg.weight_decay,
        )?;
        codebooks.push((i, var, opt));
    }
    let mut bias_vars = Vec::new();
    for name in biases {
        let var = Var::from_tensor(&student.var(name)?.as_tensor().copy()?)?;
        let opt = CentroidSgd::new(None, lr, cfg.momentum, cfg.weight_decay)?;
        bias_vars.push((name.clone(), var, opt));
    }
    for step in 0..steps {
        let drops_passed = drop_steps.iter().filter(|&&d| d <= step).count();
        let step_lr = lr * 0.1f64.powi(drops_passed as i32);
        for (_, _, opt) in &mut codebooks {
            opt.set_lr(step_lr);
        }
        for (_, _, opt) in &mut bias_vars {
            opt.set_lr(step_lr);
        }
        let (x, _) = stream.next_batch()?;
        let t_logits = teacher.logits(&x)?;
        let mut overrides = BTreeMap::new();
        for (i, var, _) in &codebooks {
            let l = &layers[*i];
            overrides.insert(
                format!("{}.weight", l.name),
                l.decode_tensor(var.as_tensor())?,
            );
        }
        for (name, var, _) in &bias_vars {
            overrides.insert(name.clone(), var.as_tensor().clone());
        }
        let out = student.forward(
            &x,
            ForwardOptions {
                train: train_mode,
                overrides: Some(&overrides),
                detach: true,
                ..Default::default()
            },
        )?;
        let loss = distillation_loss(&t_logits, &out.logits)?;
        let grads = loss.backward()?;
        for (_, var, opt) in &mut codebooks {
            if let Some(g) = grads.get(var.as_tensor()) {
                opt.step(var, g)?;
            }
        }
        for (_, var, opt) in &mut bias_vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                opt.step(var, g)?;
            }
        }
        if train_mode {
            student.update_running_stats(&out.bn_stats)?;
        }
        bar.inc(1);
    }
    for (i, var, _) in codebooks {
        let l = &mut layers[i];
        l.centroids = var.as_tensor().flatten_all()?.to_vec1()?;
        let w = l.decode()?;
        student.set(
            &format!("{}.weight", l.name),
            &Tensor::from_vec(w, l.geometry.kind.weight_shape(), &Device::Cpu)?,
        )?;
    }
    for (name, var, _) in bias_vars {
        student.set(&name, var.as_tensor())?;
    }
    Ok(())
}

/// Compresses `teacher` (spec §4): for each quantized layer in forward order, record its inputs
/// from the student on `activation_images` training images, run EM, fine-tune that layer's
/// centroids by distillation; then fine-tune all codebooks together. Labels are never used.
///
/// # Errors
/// [`Error::InvalidParameter`] for a bad configuration (block size not dividing a layer's
/// input dimension, a layer too small for its codebook), [`Error::EmptyInput`] without
/// training images, a candle error.
pub fn compress(
    teacher: &Model,
    train: &Dataset,
    cfg: &CompressConfig,
    bar: &ProgressBar,
) -> Result<CompressOutcome> {
    cfg.validate()?;
    let started = Instant::now();
    let seed = Seed::new(cfg.seed);
    let student = if cfg.fuse_bn {
        teacher.fold_batch_norm()?
    } else {
        teacher.deep_copy()?
    };
    let specs: Vec<LayerSpec> = student
        .arch()
        .layers()
        .into_iter()
        .filter(|l| l.quantized)
        .collect();
    let plans = specs
        .iter()
        .map(|s| cfg.layer_plan(s))
        .collect::<Result<Vec<_>>>()?;
    let n_act = cfg.activation_images.min(train.len());
    if n_act == 0 {
        return Err(Error::EmptyInput("no training images".into()));
    }
    let act_idx: Vec<usize> = seed
        .child_named("activations")
        .rng()
        .permutation(train.len())[..n_act]
        .to_vec();
    let (act_images, _) = train.tensors_at(&act_idx, FMNIST_NORMALIZATION, &Device::Cpu)?;
    let mut stream = BatchStream::new(train, cfg.batch_size, seed.child_named("distillation"))?;
    let train_bn = student.arch().has_bn();
    let total_steps = specs.len() * cfg.layer_steps + cfg.global_steps;
    bar.set_length((specs.len() + total_steps) as u64);
    bar.set_position(0);
    let mut layers: Vec<QuantizedLayer> = Vec::new();
    let mut reports = Vec::new();
    for (li, (spec, (geometry, k, n_groups))) in specs.iter().zip(plans).enumerate() {
        let weight_name = format!("{}.weight", spec.name);
        let reference = student.var(&weight_name)?.as_tensor().copy()?;
        let inputs = LayerInputs::new(
            geometry.clone(),
            spec.padding,
            &record_inputs(&student, &act_images, spec.name)?,
        )?;
        let em_started = Instant::now();
        let sub = geometry.unroll(&reference.flatten_all()?.to_vec1::<f32>()?)?;
        let (_, groups) = geometry.groups(n_groups > 1);
        let m = geometry.n_blocks();
        let patch_rows = cfg
            .rows_per_iteration
            .div_ceil(m)
            .max((4 * geometry.block).div_ceil(m));
        let source = match cfg.objective {
            Objective::Naive => MetricSource::Identity,
            Objective::ActivationAware => MetricSource::Sampled {
                sampler: &inputs,
                patch_rows,
            },
        };
        let em = activation_aware_em(
            &sub,
            geometry.block,
            &groups,
            n_groups,
            None,
            source,
            EmParams {
                k,
                iterations: cfg.em_iterations,
                seed: seed.child_named("em").child(li as u64),
                ..Default::default()
            },
        )?;
        let em_seconds = em_started.elapsed().as_secs_f64();
        let layer = QuantizedLayer {
            name: spec.name.to_string(),
            geometry: geometry.clone(),
            k,
            n_groups,
            centroids: em.centroids,
            assignments: em.assignments,
        };
        let decoded =
            Tensor::from_vec(layer.decode()?, geometry.kind.weight_shape(), &Device::Cpu)?;
        student.set(&weight_name, &decoded)?;
        let error_em = inputs.output_error(&reference, &decoded)?;
        layers.push(layer);
        bar.inc(1);
        let ft_started = Instant::now();
        let biases = if cfg.fuse_bn {
            vec![format!("{}.bias", spec.name)]
        } else {
            Vec::new()
        };
        finetune(
            teacher,
            &student,
            &mut layers,
            &[li],
            &biases,
            cfg.layer_steps,
            (cfg.layer_lr, &[]),
            cfg,
            false,
            &mut stream,
            bar,
        )?;
        let after = student.var(&weight_name)?.as_tensor().clone();
        let error_ft = inputs.output_error(&reference, &after)?;
        reports.push(LayerReport {
            name: spec.name.to_string(),
            block: geometry.block,
            k,
            n_groups,
            n_subvectors: geometry.n_subvectors(),
            em_objective: em.objective,
            repairs: em.repairs,
            output_error_after_em: error_em,
            output_error_after_finetune: error_ft,
            em_seconds,
            finetune_seconds: ft_started.elapsed().as_secs_f64(),
        });
    }
    let after_layerwise = snapshot(&student, &layers)?;
    let all: Vec<usize> = (0..layers.len()).collect();
    let biases: Vec<String> = if cfg.fuse_bn {
        specs.iter().map(|s| format!("{}.bias", s.name)).collect()
    } else {
        Vec::new()
    };
    finetune(
        teacher,
        &student,
        &mut layers,
        &all,
        &biases,
        cfg.global_steps,
        (cfg.global_lr, &cfg.global_lr_drops),
        cfg,
        train_bn,
        &mut stream,
        bar,
    )?;
    let compressed = snapshot(&student, &layers)?;
    Ok(CompressOutcome {
        after_layerwise,
        compressed,
        layers: reports,
        seconds: started.elapsed().as_secs_f64(),
        uncompressed_params: teacher.arch().n_params(),
    })
}
