//! The whole-network procedure of "And the bit goes down" (Stock et al., ICLR 2020) on
//! FMNet: layer by layer, inputs recorded from the student, product quantization of the layer's
//! weight (through [`quantize_pq`]), layer-wise distillation with CentroidSGD, then global
//! fine-tuning of every codebook.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use indicatif::ProgressBar;
use qcl_data::Dataset;
use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::calibration::{Calibration, ConvInput};
use crate::compressed::{CompressedModel, QuantizedLayer};
use crate::em::Objective;
use crate::layout::{clamp_centroids, LayerGeometry, LayerKind, Layout};
use crate::model::{ForwardOptions, LayerSpec, Model};
use crate::objective::{quantize_pq, Evidence, PqParams};
use crate::pq_tensor::Sharing;
use crate::sgd::CentroidSgd;
use crate::teacher::BatchStream;
use qcl_nn::loss::distillation_loss;

pub use crate::inputs::LayerInputs;
pub use crate::teacher::FMNIST_NORMALIZATION;

/// Every knob of [`compress`], with defaults for FMNet (K = 64 everywhere, the paper's block
/// sizes; step counts scaled down from the paper's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressConfig {
    /// What the codes minimise: naive, activation-aware (inputs resampled at every EM
    /// iteration, as the paper) or error feedback (the recorded inputs' full second moment).
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
    /// (default none, a constant rate; the paper's schedule, ×0.1 every three of nine
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
    pub seed: Seed,
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
            seed: Seed::new(0),
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
        // Upper bounds, checked before anything is allocated or looped over.
        for (name, v, max) in [
            ("block_conv", self.block_conv, 1 << 16),
            ("block_pointwise", self.block_pointwise, 1 << 16),
            ("block_linear", self.block_linear, 1 << 16),
            ("centroids_conv", self.centroids_conv, crate::MAX_CENTROIDS),
            (
                "centroids_pointwise",
                self.centroids_pointwise,
                crate::MAX_CENTROIDS,
            ),
            (
                "centroids_linear",
                self.centroids_linear,
                crate::MAX_CENTROIDS,
            ),
            ("em_iterations", self.em_iterations, crate::MAX_ROUNDS),
            ("rows_per_iteration", self.rows_per_iteration, 1 << 28),
            ("activation_images", self.activation_images, 1 << 20),
            ("layer_steps", self.layer_steps, 1_000_000),
            ("global_steps", self.global_steps, 1_000_000),
            ("batch_size", self.batch_size, 1 << 16),
        ] {
            if v > max {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be at most {max}, got {v}"),
                ));
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

fn snapshot(student: &Model, layers: &[QuantizedLayer]) -> CompressedModel {
    let mut layers = layers.to_vec();
    layers.iter_mut().for_each(|l| l.pq.round_to_f16());
    let names: Vec<String> = layers
        .iter()
        .map(|l| format!("{}.weight", l.name))
        .collect();
    let floats = student
        .tensors()
        .into_iter()
        .filter(|(k, _)| !names.contains(k))
        .collect();
    CompressedModel {
        arch: student.arch(),
        layers,
        floats,
    }
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
        let l = &layers[i].pq;
        let d = l.geometry.block;
        let var = Var::from_tensor(&Tensor::from_vec(
            l.centroids.clone(),
            (l.centroids.len() / d, d),
            &Device::Cpu,
        )?)?;
        let counts = l.cluster_sizes()?;
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
                l.pq.decode_tensor(var.as_tensor())?,
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
        let loss = distillation_loss(&out.logits, &t_logits, 1.0)?;
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
        l.pq.centroids = var.as_tensor().flatten_all()?.to_vec1()?;
        let w = l.pq.decode()?;
        student.set(
            &format!("{}.weight", l.name),
            &Tensor::from_vec(w, l.pq.geometry.kind.weight_shape(), &Device::Cpu)?,
        )?;
    }
    for (name, var, _) in bias_vars {
        student.set(&name, var.as_tensor())?;
    }
    Ok(())
}

/// Quantizes one layer of the student through [`quantize_pq`]: activation-aware PQ resamples
/// the recorded inputs at every EM iteration (the paper's procedure), error feedback uses their
/// full second moment.
fn quantize_layer(
    cfg: &CompressConfig,
    spec: &LayerSpec,
    (geometry, k): (&LayerGeometry, usize),
    (reference, inputs): (&Tensor, &LayerInputs),
    seed: Seed,
) -> Result<(QuantizedLayer, Vec<f64>, usize)> {
    let m = geometry.n_blocks();
    let patch_rows = cfg
        .rows_per_iteration
        .div_ceil(m)
        .max((4 * geometry.block).div_ceil(m));
    let calibration = Calibration::new();
    let weight_name = format!("{}.weight", spec.name);
    if cfg.objective == Objective::ErrorFeedback {
        match spec.kind {
            LayerKind::Conv { kh, kw, .. } => {
                let conv = ConvInput {
                    kh,
                    kw,
                    padding: spec.padding,
                    stride: 1,
                };
                calibration.record_conv(&weight_name, inputs.tensor(), conv)?;
            }
            LayerKind::Linear { .. } => calibration.record(&weight_name, inputs.tensor())?,
        }
    }
    let stats = calibration.stats(&weight_name);
    let evidence = match (cfg.objective, &stats) {
        (Objective::ActivationAware, _) => Evidence::Sampled {
            sampler: inputs,
            patch_rows,
        },
        (_, Some(s)) => Evidence::Stats(s),
        _ => Evidence::None,
    };
    let params = PqParams {
        d: geometry.block,
        k,
        objective: cfg.objective,
        layout: geometry.layout,
        sharing: if cfg.per_slab_codebooks {
            Sharing::ChannelBlock
        } else {
            Sharing::Layer
        },
        em_iterations: cfg.em_iterations,
        ..Default::default()
    };
    let weight: Vec<f32> = reference.flatten_all()?.to_vec1()?;
    let out = quantize_pq(
        &weight,
        &geometry.kind.weight_shape(),
        &params,
        evidence,
        seed,
    )?;
    let layer = QuantizedLayer {
        name: spec.name.to_string(),
        pq: out.tensor,
    };
    Ok((layer, out.em_objective, out.repairs))
}

/// Compresses `teacher`: for each quantized layer in forward order, record its inputs from the
/// student on `activation_images` training images, quantize its weight, fine-tune that layer's
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
    let seed = cfg.seed;
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
        let layer_seed = seed.child_named("em").child(li as u64);
        let (layer, em_objective, repairs) =
            quantize_layer(cfg, spec, (&geometry, k), (&reference, &inputs), layer_seed)?;
        let em_seconds = em_started.elapsed().as_secs_f64();
        let decoded = Tensor::from_vec(
            layer.pq.decode()?,
            geometry.kind.weight_shape(),
            &Device::Cpu,
        )?;
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
        reports.push(LayerReport {
            name: spec.name.to_string(),
            block: geometry.block,
            k,
            n_groups,
            n_subvectors: geometry.n_subvectors(),
            em_objective,
            repairs,
            output_error_after_em: error_em,
            output_error_after_finetune: inputs.output_error(&reference, &after)?,
            em_seconds,
            finetune_seconds: ft_started.elapsed().as_secs_f64(),
        });
    }
    let after_layerwise = snapshot(&student, &layers);
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
    Ok(CompressOutcome {
        after_layerwise,
        compressed: snapshot(&student, &layers),
        layers: reports,
        seconds: started.elapsed().as_secs_f64(),
        uncompressed_params: teacher.arch().n_params(),
    })
}
