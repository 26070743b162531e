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
use crate::layout::{LayerGeometry, LayerKind};
use crate::model::{ForwardConfig, LayerSpec, Model};
use crate::objective::{quantize_pq, Evidence, PqConfig};
use crate::pq_tensor::Sharing;
use crate::sgd::CentroidSgd;
use crate::teacher::BatchStream;
use qcl_nn::loss::distillation_loss;

pub use crate::inputs::LayerInputs;
pub use config::{CompressConfig, LayerChoice};

pub mod allocate;
mod config;
pub use crate::teacher::FMNIST_NORMALIZATION;

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
    /// Per reassignment round, how many codes changed in each layer (empty without
    /// [`CompressConfig::reassign_rounds`]).
    pub reassigned: Vec<Vec<usize>>,
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
            ForwardConfig {
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
        // After a reassignment a centroid may have no members: it gets no gradient, and a count
        // of 1 only keeps the mean's division defined (EM itself leaves no cluster empty).
        let counts: Vec<usize> = l.cluster_sizes()?.into_iter().map(|c| c.max(1)).collect();
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
            ForwardConfig {
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

/// One reassignment of `layer`'s codes (see [`CompressConfig::reassign_rounds`]): the metric
/// from a fresh sample of `inputs` (as one EM iteration draws it), the codes of `reference`
/// chosen again, the student's weight set to the new decoding. Returns the codes that changed.
fn reassign_layer(
    cfg: &CompressConfig,
    student: &Model,
    layer: &mut QuantizedLayer,
    reference: &Tensor,
    inputs: &LayerInputs,
    rng: &mut qcl_tensor::SeededRng,
) -> Result<usize> {
    let geometry = layer.pq.geometry.clone();
    let d = geometry.block;
    let metric = if cfg.objective == Objective::Naive {
        None
    } else {
        let m = geometry.n_blocks();
        let rows = cfg.rows_per_iteration.div_ceil(m).max((4 * d).div_ceil(m));
        let source = crate::MetricSource::Sampled {
            sampler: inputs,
            patch_rows: rows,
        };
        Some(crate::metric::metric_of(source, d, rng)?)
    };
    let sub = geometry.unroll(&reference.flatten_all()?.to_vec1::<f32>()?)?;
    let changed = layer.pq.reassign(&sub, metric.as_ref())?;
    let decoded = Tensor::from_vec(
        layer.pq.decode()?,
        geometry.kind.weight_shape(),
        &Device::Cpu,
    )?;
    student.set(&format!("{}.weight", layer.name), &decoded)?;
    Ok(changed)
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
    let params = PqConfig {
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

/// What the phases of [`compress`] share, read-only; the phases are its methods, each given the
/// distillation batch stream.
struct Phases<'a> {
    teacher: &'a Model,
    student: &'a Model,
    specs: &'a [LayerSpec],
    act_images: &'a Tensor,
    cfg: &'a CompressConfig,
    bar: &'a ProgressBar,
}

/// The layer-wise phase's result: the quantized layers, their original weights, the reports.
type Layerwise = (Vec<QuantizedLayer>, Vec<Tensor>, Vec<LayerReport>);

impl Phases<'_> {
    /// The inputs of `spec`'s layer (of `geometry`), recorded from the student as it is now.
    fn student_inputs(&self, spec: &LayerSpec, geometry: &LayerGeometry) -> Result<LayerInputs> {
        LayerInputs::new(
            geometry.clone(),
            spec.padding,
            &record_inputs(self.student, self.act_images, spec.name)?,
        )
    }

    /// For each layer in forward order: inputs from the student, EM, layer-wise fine-tuning.
    fn layerwise(
        &self,
        stream: &mut BatchStream<'_>,
        plans: Vec<(LayerGeometry, usize, usize)>,
    ) -> Result<Layerwise> {
        let (student, cfg) = (self.student, self.cfg);
        let seed = cfg.seed;
        let mut layers: Vec<QuantizedLayer> = Vec::new();
        let mut references = Vec::new();
        let mut reports = Vec::new();
        for (li, (spec, (geometry, k, n_groups))) in self.specs.iter().zip(plans).enumerate() {
            let weight_name = format!("{}.weight", spec.name);
            let reference = student.var(&weight_name)?.as_tensor().copy()?;
            let inputs = self.student_inputs(spec, &geometry)?;
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
            references.push(reference.clone());
            self.bar.inc(1);
            let ft_started = Instant::now();
            let biases = if cfg.fuse_bn {
                vec![format!("{}.bias", spec.name)]
            } else {
                Vec::new()
            };
            finetune(
                self.teacher,
                student,
                &mut layers,
                &[li],
                &biases,
                cfg.layer_steps,
                (cfg.layer_lr, &[]),
                cfg,
                false,
                stream,
                self.bar,
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
        Ok((layers, references, reports))
    }

    /// Global fine-tuning of every codebook, after each reassignment round if any; returns
    /// the codes changed per round and layer.
    fn global(
        &self,
        stream: &mut BatchStream<'_>,
        layers: &mut [QuantizedLayer],
        references: &[Tensor],
    ) -> Result<Vec<Vec<usize>>> {
        let (student, cfg) = (self.student, self.cfg);
        let (seed, rounds, train_bn) = (cfg.seed, 1 + cfg.reassign_rounds, student.arch().has_bn());
        let all: Vec<usize> = (0..layers.len()).collect();
        let biases: Vec<String> = if cfg.fuse_bn {
            self.specs
                .iter()
                .map(|s| format!("{}.bias", s.name))
                .collect()
        } else {
            Vec::new()
        };
        let mut reassigned = Vec::new();
        for round in 0..rounds {
            if round > 0 {
                let round_seed = seed.child_named("reassign").child(round as u64);
                let mut changed = Vec::new();
                for (li, spec) in self.specs.iter().enumerate() {
                    let inputs = self.student_inputs(spec, &layers[li].pq.geometry)?;
                    let reference = &references[li];
                    let mut rng = round_seed.child(li as u64).rng();
                    changed.push(reassign_layer(
                        cfg,
                        student,
                        &mut layers[li],
                        reference,
                        &inputs,
                        &mut rng,
                    )?);
                    self.bar.inc(1);
                }
                reassigned.push(changed);
            }
            finetune(
                self.teacher,
                student,
                layers,
                &all,
                &biases,
                cfg.global_steps,
                (cfg.global_lr, &cfg.global_lr_drops),
                cfg,
                train_bn,
                stream,
                self.bar,
            )?;
        }
        Ok(reassigned)
    }
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
    if let Some(name) = cfg
        .layer_overrides
        .keys()
        .find(|n| !specs.iter().any(|s| s.name == n.as_str()))
    {
        return Err(Error::invalid_parameter(
            "layer_overrides",
            format!(
                "`{name}` is not a quantized layer of {}",
                student.arch().name()
            ),
        ));
    }
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
    let rounds = 1 + cfg.reassign_rounds;
    let total_steps = specs.len() * cfg.layer_steps + rounds * cfg.global_steps;
    bar.set_length((rounds * specs.len() + total_steps) as u64);
    bar.set_position(0);
    let phases = Phases {
        teacher,
        student: &student,
        specs: &specs,
        act_images: &act_images,
        cfg,
        bar,
    };
    let (mut layers, references, reports) = phases.layerwise(&mut stream, plans)?;
    let after_layerwise = snapshot(&student, &layers);
    let reassigned = phases.global(&mut stream, &mut layers, &references)?;
    Ok(CompressOutcome {
        after_layerwise,
        compressed: snapshot(&student, &layers),
        layers: reports,
        reassigned,
        seconds: started.elapsed().as_secs_f64(),
        uncompressed_params: teacher.arch().n_params(),
    })
}
