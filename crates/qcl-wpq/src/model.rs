//! FMNet (a small Fashion-MNIST CNN) and its BatchNorm variant on qcl-nn's fast ops, with named parameters so
//! that any weight can be replaced by a decoded (or differentiable codebook-built) tensor.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use qcl_nn::ops::{
    batch_norm_eval, batch_norm_train, conv2d, conv2d_bias_relu, max_pool2d, BatchStats,
    Conv2dParams,
};
use qcl_tensor::{Error, Result, SafetensorsFile, Seed};
use serde::{Deserialize, Serialize};

use crate::layout::LayerKind;

/// File format tag of a dense model.
pub const MODEL_FORMAT: &str = "qcl-wpq-model/1";
/// BatchNorm epsilon.
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm running-statistics momentum (PyTorch's).
pub const BN_MOMENTUM: f64 = 0.1;

/// A network architecture this crate can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// FMNet: conv-bias-ReLU layers.
    #[serde(rename = "fmnet")]
    FmNet,
    /// FMNet with conv (no bias) → BatchNorm → ReLU.
    #[serde(rename = "fmnet-bn")]
    FmNetBn,
}

/// What follows a layer's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Nothing.
    None,
    /// 2×2 max pooling.
    Max2,
    /// Global average pooling (then flatten).
    GlobalAvg,
}

/// One weight layer of an architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Parameter prefix (`conv1`, `fc`).
    pub name: &'static str,
    /// Shape.
    pub kind: LayerKind,
    /// Zero padding (same padding for 3×3).
    pub padding: usize,
    /// Pooling after the ReLU.
    pub pool: Pool,
    /// Whether weight PQ quantizes it (all but the stem).
    pub quantized: bool,
}

impl Arch {
    /// Its name on the command line and in files (`fmnet`, `fmnet-bn`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::FmNet => "fmnet",
            Arch::FmNetBn => "fmnet-bn",
        }
    }

    /// The architecture called `name`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the known architectures.
    pub fn from_name(name: &str) -> Result<Arch> {
        match name {
            "fmnet" => Ok(Arch::FmNet),
            "fmnet-bn" => Ok(Arch::FmNetBn),
            other => Err(Error::invalid_parameter(
                "arch",
                format!("unknown architecture `{other}`; known: fmnet, fmnet-bn"),
            )),
        }
    }

    /// Whether convolutions are followed by BatchNorm.
    pub fn has_bn(self) -> bool {
        self == Arch::FmNetBn
    }

    /// The weight layers in forward order.
    pub fn layers(self) -> Vec<LayerSpec> {
        let conv = |name, c_in, c_out, k: usize, pool, quantized| LayerSpec {
            name,
            kind: LayerKind::Conv {
                c_out,
                c_in,
                kh: k,
                kw: k,
            },
            padding: k / 2,
            pool,
            quantized,
        };
        vec![
            conv("conv0", 1, 16, 3, Pool::None, false),
            conv("conv1", 16, 32, 3, Pool::Max2, true),
            conv("conv2", 32, 32, 3, Pool::None, true),
            conv("conv3", 32, 64, 3, Pool::Max2, true),
            conv("conv4", 64, 64, 3, Pool::None, true),
            conv("pw5", 64, 128, 1, Pool::GlobalAvg, true),
            LayerSpec {
                name: "fc",
                kind: LayerKind::Linear { out: 10, inp: 128 },
                padding: 0,
                pool: Pool::None,
                quantized: true,
            },
        ]
    }

    /// Every tensor of the model with its shape and whether it is a trainable parameter
    /// (`false`: a BatchNorm running statistic).
    pub fn tensor_specs(self) -> Vec<(String, Vec<usize>, bool)> {
        let mut specs = Vec::new();
        for layer in self.layers() {
            let out = layer.kind.weight_shape()[0];
            specs.push((
                format!("{}.weight", layer.name),
                layer.kind.weight_shape(),
                true,
            ));
            let is_conv = matches!(layer.kind, LayerKind::Conv { .. });
            if is_conv && self.has_bn() {
                for (n, p) in [
                    ("weight", true),
                    ("bias", true),
                    ("running_mean", false),
                    ("running_var", false),
                ] {
                    specs.push((format!("{}.bn.{n}", layer.name), vec![out], p));
                }
            } else {
                specs.push((format!("{}.bias", layer.name), vec![out], true));
            }
        }
        specs
    }

    /// Number of trainable parameters (weights, biases, BN γ/β).
    pub fn n_params(self) -> usize {
        self.tensor_specs()
            .iter()
            .filter(|s| s.2)
            .map(|s| s.1.iter().product::<usize>())
            .sum()
    }
}

/// Options of [`Model::forward`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardConfig<'a> {
    /// BatchNorm uses batch statistics (and returns them) instead of running statistics.
    pub train: bool,
    /// Tensors used instead of the model's own (e.g. a weight decoded from a codebook).
    pub overrides: Option<&'a BTreeMap<String, Tensor>>,
    /// Return the input of this layer.
    pub capture: Option<&'a str>,
    /// Cut the graph at the parameters (teacher forward: no gradients).
    pub detach: bool,
}

/// Output of [`Model::forward`].
#[derive(Debug)]
pub struct Forward {
    /// Logits `[B, 10]`.
    pub logits: Tensor,
    /// Input of the captured layer.
    pub captured: Option<Tensor>,
    /// Batch statistics of each BatchNorm (train mode), by prefix.
    pub bn_stats: Vec<(String, BatchStats)>,
}

/// A dense model: an architecture and its named tensors.
///
/// ```
/// use qcl_wpq::{Arch, ForwardConfig, Model};
/// let model = Model::new(Arch::FmNet, qcl_tensor::Seed::new(1))?;
/// let x = candle_core::Tensor::zeros((2, 1, 28, 28), candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// let out = model.forward(&x, ForwardConfig::default())?;
/// assert_eq!(out.logits.dims(), &[2, 10]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Model {
    arch: Arch,
    tensors: BTreeMap<String, Var>,
}

impl Model {
    /// He-initialised weights (normal, std `√(2/fan_in)`) drawn from `seed.child_named(name)`,
    /// zero biases, BatchNorm γ = 1, β = 0, running mean 0 and variance 1.
    ///
    /// # Errors
    /// A candle error.
    pub fn new(arch: Arch, seed: Seed) -> Result<Model> {
        let dev = Device::Cpu;
        let mut tensors = BTreeMap::new();
        for (name, shape, _) in arch.tensor_specs() {
            let n: usize = shape.iter().product();
            let values = if name.ends_with(".weight") && !name.contains(".bn.") {
                let fan_in: usize = shape[1..].iter().product();
                seed.child_named(&name)
                    .rng()
                    .normal_vec(n, 0.0, (2.0 / fan_in as f32).sqrt())
            } else if name.ends_with("bn.weight") || name.ends_with("running_var") {
                vec![1.0; n]
            } else {
                vec![0.0; n]
            };
            tensors.insert(
                name,
                Var::from_tensor(&Tensor::from_vec(values, shape, &dev)?)?,
            );
        }
        Ok(Model { arch, tensors })
    }

    /// A model from named tensors, checked against the architecture.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming a missing, extra or wrongly shaped tensor
    /// (architecture mismatch).
    pub fn from_tensors(arch: Arch, mut values: BTreeMap<String, Tensor>) -> Result<Model> {
        let mut tensors = BTreeMap::new();
        for (name, shape, _) in arch.tensor_specs() {
            let t = values.remove(&name).ok_or_else(|| {
                Error::invalid_parameter(
                    "arch",
                    format!(
                        "architecture mismatch: `{}` needs tensor `{name}`",
                        arch.name()
                    ),
                )
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::invalid_parameter(
                    "arch",
                    format!(
                        "architecture mismatch: `{name}` of `{}` is {shape:?}, got {:?}",
                        arch.name(),
                        t.dims()
                    ),
                ));
            }
            tensors.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        if let Some(extra) = values.keys().next() {
            return Err(Error::invalid_parameter(
                "arch",
                format!(
                    "architecture mismatch: `{}` has no tensor `{extra}`",
                    arch.name()
                ),
            ));
        }
        Ok(Model { arch, tensors })
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The tensor `name`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an unknown name.
    pub fn var(&self, name: &str) -> Result<&Var> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::invalid_parameter("name", format!("no tensor `{name}`")))
    }

    /// Every tensor by name (values, detached).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The trainable parameters as vars.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.tensors
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A deep copy (the clone shares storage; this one does not).
    ///
    /// # Errors
    /// A candle error.
    pub fn deep_copy(&self) -> Result<Model> {
        Model::from_tensors(
            self.arch,
            self.tensors
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
        )
    }

    /// Replaces tensor `name`'s value.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an unknown name, candle's error for a wrong shape.
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        Ok(self.var(name)?.set(&value.detach().to_dtype(DType::F32)?)?)
    }

    /// Runs the network on `x` (`[B, 1, 28, 28]`).
    ///
    /// # Errors
    /// A candle or qcl-nn error (e.g. wrong input shape).
    pub fn forward(&self, x: &Tensor, opts: ForwardConfig<'_>) -> Result<Forward> {
        let get = |name: &str| -> Result<Tensor> {
            if let Some(t) = opts.overrides.and_then(|o| o.get(name)) {
                return Ok(t.clone());
            }
            let t = self.var(name)?.as_tensor();
            Ok(if opts.detach { t.detach() } else { t.clone() })
        };
        let mut h = x.clone();
        let mut captured = None;
        let mut bn_stats = Vec::new();
        for layer in self.arch.layers() {
            if opts.capture == Some(layer.name) {
                captured = Some(h.detach());
            }
            let w = get(&format!("{}.weight", layer.name))?;
            match layer.kind {
                LayerKind::Conv { .. } => {
                    let p = Conv2dParams {
                        padding: layer.padding,
                        ..Default::default()
                    };
                    if self.arch.has_bn() {
                        let y = conv2d(&h, &w, p)?;
                        let pre = format!("{}.bn", layer.name);
                        let gamma = get(&format!("{pre}.weight"))?;
                        let beta = get(&format!("{pre}.bias"))?;
                        h = if opts.train {
                            let (y, stats) = batch_norm_train(&y, &gamma, &beta, BN_EPS, true)?;
                            bn_stats.push((pre, stats));
                            y
                        } else {
                            let mean = get(&format!("{pre}.running_mean"))?.detach();
                            let var = get(&format!("{pre}.running_var"))?.detach();
                            batch_norm_eval(&y, &gamma, &beta, &mean, &var, BN_EPS, true)?
                        };
                    } else {
                        let b = get(&format!("{}.bias", layer.name))?;
                        h = conv2d_bias_relu(&h, &w, Some(&b), p)?;
                    }
                    h = match layer.pool {
                        Pool::None => h,
                        Pool::Max2 => max_pool2d(&h, 2, 2)?,
                        Pool::GlobalAvg => h.mean(D::Minus1)?.mean(D::Minus1)?,
                    };
                }
                LayerKind::Linear { .. } => {
                    let b = get(&format!("{}.bias", layer.name))?;
                    h = h.matmul(&w.t()?)?.broadcast_add(&b)?;
                }
            }
        }
        Ok(Forward {
            logits: h,
            captured,
            bn_stats,
        })
    }

    /// Evaluation-mode logits with every parameter detached (no graph is kept).
    ///
    /// # Errors
    /// As [`Model::forward`].
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .forward(
                x,
                ForwardConfig {
                    detach: true,
                    ..Default::default()
                },
            )?
            .logits)
    }

    /// Moves the running statistics towards `stats` (PyTorch's rule, unbiased variance).
    ///
    /// # Errors
    /// A candle error.
    pub fn update_running_stats(&self, stats: &[(String, BatchStats)]) -> Result<()> {
        for (pre, s) in stats {
            let dev = Device::Cpu;
            let mean = self.var(&format!("{pre}.running_mean"))?;
            let var = self.var(&format!("{pre}.running_var"))?;
            let m = BN_MOMENTUM;
            let new_mean: Vec<f32> = mean
                .as_tensor()
                .to_vec1::<f32>()?
                .iter()
                .zip(&s.mean)
                .map(|(r, b)| ((1.0 - m) * f64::from(*r) + m * b) as f32)
                .collect();
            let new_var: Vec<f32> = var
                .as_tensor()
                .to_vec1::<f32>()?
                .iter()
                .zip(s.unbiased_variance())
                .map(|(r, b)| ((1.0 - m) * f64::from(*r) + m * b) as f32)
                .collect();
            let n = new_mean.len();
            mean.set(&Tensor::from_vec(new_mean, n, &dev)?)?;
            var.set(&Tensor::from_vec(new_var, n, &dev)?)?;
        }
        Ok(())
    }

    /// Folds every BatchNorm into its convolution (a fork's Fusion variant): `s = γ/√(σ²+ε)`,
    /// `W' = s·W`, `b' = β − s·μ`. The result is an [`Arch::FmNet`] model with the same
    /// eval-mode outputs. A model without BatchNorm is returned as a copy.
    ///
    /// # Errors
    /// A candle error.
    pub fn fold_batch_norm(&self) -> Result<Model> {
        if !self.arch.has_bn() {
            return self.deep_copy();
        }
        let mut out = BTreeMap::new();
        for layer in self.arch.layers() {
            let w_name = format!("{}.weight", layer.name);
            let w = self.var(&w_name)?.as_tensor().clone();
            match layer.kind {
                LayerKind::Conv { c_out, .. } => {
                    let pre = format!("{}.bn", layer.name);
                    let v = |n: &str| -> Result<Vec<f32>> {
                        Ok(self
                            .var(&format!("{pre}.{n}"))?
                            .as_tensor()
                            .to_vec1::<f32>()?)
                    };
                    let (gamma, beta, mean, var) = (
                        v("weight")?,
                        v("bias")?,
                        v("running_mean")?,
                        v("running_var")?,
                    );
                    let scale: Vec<f64> = gamma
                        .iter()
                        .zip(&var)
                        .map(|(g, s)| f64::from(*g) / (f64::from(*s) + BN_EPS).sqrt())
                        .collect();
                    let bias: Vec<f32> = (0..c_out)
                        .map(|o| (f64::from(beta[o]) - scale[o] * f64::from(mean[o])) as f32)
                        .collect();
                    let per = w.elem_count() / c_out;
                    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    let folded: Vec<f32> = wv
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (f64::from(*x) * scale[i / per]) as f32)
                        .collect();
                    out.insert(w_name, Tensor::from_vec(folded, w.dims(), &Device::Cpu)?);
                    out.insert(
                        format!("{}.bias", layer.name),
                        Tensor::from_vec(bias, c_out, &Device::Cpu)?,
                    );
                }
                LayerKind::Linear { .. } => {
                    out.insert(w_name, w.copy()?);
                    let b = format!("{}.bias", layer.name);
                    out.insert(b.clone(), self.var(&b)?.as_tensor().copy()?);
                }
            }
        }
        Model::from_tensors(Arch::FmNet, out)
    }

    /// Writes the model (format [`MODEL_FORMAT`]) atomically.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors = self.tensors();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let meta = BTreeMap::from([
            ("format".to_string(), MODEL_FORMAT.to_string()),
            ("arch".to_string(), self.arch.name().to_string()),
        ]);
        qcl_tensor::write_safetensors(path, &refs, &meta)
    }

    /// Reads a model written by [`Model::save`]; `expected` (if given) must match the file's
    /// architecture.
    ///
    /// # Errors
    /// [`Error::BadFile`] for a foreign file, [`Error::InvalidParameter`] for an architecture
    /// mismatch.
    pub fn load(path: impl AsRef<Path>, expected: Option<Arch>) -> Result<Model> {
        let file = SafetensorsFile::open(path.as_ref())?;
        file.require_format(MODEL_FORMAT, "a qcl-wpq model")?;
        let arch = file_arch(&file, path.as_ref(), expected)?;
        // NaN or infinite weights would evaluate to garbage without a word: refused here.
        let values = file
            .names()
            .iter()
            .map(|n| {
                let t = file.tensor(n, &Device::Cpu)?;
                if t.dtype().is_float() {
                    qcl_tensor::check_finite(&format!("`{n}` of {}", path.as_ref().display()), &t)?;
                }
                Ok((n.clone(), t))
            })
            .collect::<Result<_>>()?;
        Model::from_tensors(arch, values)
    }
}

/// candle-nn's view of FMNet: `forward_t(x, train)` gives the logits, BatchNorm using batch
/// statistics when `train` (the running statistics are not updated; [`Model::forward`] returns
/// the batch statistics for [`Model::update_running_stats`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::ModuleT;
/// use qcl_wpq::{Arch, Model};
/// let model = Model::new(Arch::FmNetBn, qcl_tensor::Seed::new(1))?;
/// let x = Tensor::ones((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
/// let eval = model.forward_t(&x, false)?;
/// let train = model.forward_t(&x, true)?;
/// assert_eq!(eval.dims(), &[2, 10]);
/// // Two identical images: batch statistics differ from the running ones.
/// assert_ne!(eval.to_vec2::<f32>()?, train.to_vec2::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl candle_nn::ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward(
            xs,
            ForwardConfig {
                train,
                ..Default::default()
            },
        )
        .map(|f| f.logits)
        .map_err(candle_core::Error::wrap)
    }
}

/// The architecture a model file's `arch` metadata names, checked against `expected`.
pub(crate) fn file_arch(
    file: &SafetensorsFile,
    path: &Path,
    expected: Option<Arch>,
) -> Result<Arch> {
    let arch = Arch::from_name(&file.metadata_value::<String>("arch")?)?;
    check_arch(arch, path, expected)
}

/// `arch`, the architecture the file at `path` holds, if it is the `expected` one (or none is).
pub(crate) fn check_arch(arch: Arch, path: &Path, expected: Option<Arch>) -> Result<Arch> {
    match expected {
        Some(e) if e != arch => Err(Error::invalid_parameter(
            "arch",
            format!(
                "architecture mismatch: asked for `{}`, {} holds `{}`",
                e.name(),
                path.display(),
                arch.name()
            ),
        )),
        _ => Ok(arch),
    }
}
