//! Residual vector quantization: quantizers applied to successive residuals.

use std::sync::{Arc, Mutex};

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;
use qcl_nn::ops::straight_through;
use qcl_nn::ParamPath;
use qcl_tensor::{Error, Result};

use crate::packed::PackedIndices;
use crate::quantizer::{VectorQuantizer, VqOutput};
use crate::VectorQuantizerConfig;

/// What one [`ResidualVq::quantize`] produces.
#[derive(Debug, Clone)]
pub struct ResidualVqOutput {
    /// `Σ_i q_i` with the input's shape and dtype, gradient the identity to the input
    /// (straight-through).
    pub quantized: Tensor,
    /// The loss to add to the model's: the sum of the stages' [`VqOutput::loss`].
    pub loss: Tensor,
    /// Each stage's output (its `indices` are what [`ResidualVq::decode`] takes).
    pub stages: Vec<VqOutput>,
}

impl ResidualVqOutput {
    /// The indices of every stage, in order.
    pub fn indices(&self) -> Vec<Tensor> {
        self.stages.iter().map(|s| s.indices.clone()).collect()
    }
}

/// Residual VQ: stage `i` quantises the residual the stages before it left,
///
/// ```text
/// r_0 = z_e,   q_i = VQ_i(r_i),   r_{i+1} = r_i − sg(q_i),   z_q = z_e + sg(Σ_i q_i − z_e)
/// ```
///
/// so decoding the first `L` stages' indices gives the depth-`L` reconstruction `Σ_{i<L} q_i`.
/// Each stage is a full [`VectorQuantizer`] (own mode, codebooks, revival) whose
/// commitment loss reaches the input through its residual. When every codebook of every
/// stage contains the zero vector, the reconstruction error cannot grow with depth (the
/// nearest code is never farther than zero). Like a single quantizer, it is built from a
/// candle-nn `VarBuilder` (stage `i` under `vb.pp(i)`) or a qcl `ParamPath`, and is a candle
/// [`ModuleT`] whose output is `z_q`, the rest of the call kept as
/// [`last_output`](Self::last_output).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::ParamStore;
/// use qcl_vq::{ResidualVq, VectorQuantizerConfig};
///
/// let store = ParamStore::new(0);
/// let rvq = ResidualVq::uniform(&VectorQuantizerConfig::new(4, 8), 3, store.var_builder(&Device::Cpu).pp("rvq"))?;
/// let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu)?;
/// let out = rvq.quantize(&x, false)?;
/// let indices = out.indices();
/// assert_eq!(indices.len(), 3);
/// let full = rvq.decode(&indices)?;
/// assert_eq!(full.flatten_all()?.to_vec1::<f32>()?, out.quantized.flatten_all()?.to_vec1::<f32>()?);
/// let coarse = rvq.decode(&indices[..1])?; // the first stage alone
/// assert_eq!(coarse.dims(), x.dims());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ResidualVq {
    stages: Vec<VectorQuantizer>,
    last: Arc<Mutex<Option<ResidualVqOutput>>>,
}

/// Checks that there is a stage and that all stages read the same channels the same way.
fn check_stages(configs: &[VectorQuantizerConfig]) -> Result<()> {
    let Some(first) = configs.first() else {
        return Err(Error::invalid_parameter(
            "stages",
            "need at least one stage",
        ));
    };
    if let Some(other) = configs
        .iter()
        .find(|c| (c.dim, c.channel_axis) != (first.dim, first.channel_axis))
    {
        return Err(Error::invalid_parameter(
            "dim",
            format!(
                "every stage quantises the same channels on the same axis; got {} ({:?}) and {} ({:?})",
                first.dim, first.channel_axis, other.dim, other.channel_axis
            ),
        ));
    }
    Ok(())
}

/// `depth` copies of `config`, copy `i` seeded with `config.seed.child(i)`.
fn uniform_configs(config: &VectorQuantizerConfig, depth: usize) -> Vec<VectorQuantizerConfig> {
    (0..depth)
        .map(|i| VectorQuantizerConfig {
            seed: config.seed.child(i as u64),
            ..config.clone()
        })
        .collect()
}

impl ResidualVq {
    /// One stage per configuration, stage `i`'s state created through `vb.pp(i)` (see
    /// [`VectorQuantizer::new`]). All stages must quantise the same channels on the same axis.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for no stage or differing `dim`s or channel axes, and the
    /// errors of [`VectorQuantizer::new`].
    pub fn new(configs: &[VectorQuantizerConfig], vb: VarBuilder) -> Result<Self> {
        check_stages(configs)?;
        let stages = configs
            .iter()
            .enumerate()
            .map(|(i, c)| VectorQuantizer::new(c.clone(), vb.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self::from_stages(stages))
    }

    /// `depth` stages of the same configuration, stage `i` seeded with `config.seed.child(i)`.
    ///
    /// # Errors
    /// As [`ResidualVq::new`].
    pub fn uniform(config: &VectorQuantizerConfig, depth: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(&uniform_configs(config, depth), vb)
    }

    /// As [`new`](Self::new), stage `i`'s state under `path.pp(i)` of a qcl `ParamStore`
    /// (see [`VectorQuantizer::from_param_path`]).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_param_path(path: &ParamPath, configs: &[VectorQuantizerConfig]) -> Result<Self> {
        check_stages(configs)?;
        let stages = configs
            .iter()
            .enumerate()
            .map(|(i, c)| VectorQuantizer::from_param_path(&path.pp(i), c.clone()))
            .collect::<Result<_>>()?;
        Ok(Self::from_stages(stages))
    }

    /// As [`uniform`](Self::uniform), under `path` of a qcl `ParamStore`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn uniform_from_param_path(
        path: &ParamPath,
        config: &VectorQuantizerConfig,
        depth: usize,
    ) -> Result<Self> {
        Self::from_param_path(path, &uniform_configs(config, depth))
    }

    fn from_stages(stages: Vec<VectorQuantizer>) -> Self {
        ResidualVq {
            stages,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// The output of the last [`quantize`](Self::quantize) (or `forward_t`) call, if any.
    pub fn last_output(&self) -> Option<ResidualVqOutput> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[VectorQuantizer] {
        &self.stages
    }

    /// The stages, mutably (to set codebooks, freeze).
    pub fn stages_mut(&mut self) -> &mut [VectorQuantizer] {
        &mut self.stages
    }

    /// Number of stages.
    pub fn depth(&self) -> usize {
        self.stages.len()
    }

    /// Quantises `x` stage by stage (each stage updates itself when `train`).
    ///
    /// # Errors
    /// As [`VectorQuantizer::quantize`].
    pub fn quantize(&self, x: &Tensor, train: bool) -> Result<ResidualVqOutput> {
        let mut residual = x.clone();
        let mut total: Option<Tensor> = None;
        let mut loss: Option<Tensor> = None;
        let mut outputs = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let out = stage.quantize(&residual, train)?;
            let q = out.quantized.detach();
            residual = (residual - &q)?;
            total = Some(match total {
                None => q,
                Some(t) => (t + q)?,
            });
            loss = Some(match loss {
                None => out.loss.clone(),
                Some(l) => (l + &out.loss)?,
            });
            outputs.push(out);
        }
        let total = total.expect("at least one stage");
        let output = ResidualVqOutput {
            quantized: straight_through(x, &total)?,
            loss: loss.expect("at least one stage"),
            stages: outputs,
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(output.clone());
        Ok(output)
    }

    /// Every stage's indices for `x` (as [`ResidualVq::quantize`] without training would
    /// choose them).
    ///
    /// # Errors
    /// As [`VectorQuantizer::encode`].
    pub fn encode(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut residual = x.clone();
        let mut indices = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let idx = stage.encode(&residual)?;
            let q = stage.decode(&idx)?.to_dtype(x.dtype())?;
            residual = (residual - q)?;
            indices.push(idx);
        }
        Ok(indices)
    }

    /// [`encode`](Self::encode), each stage's indices bit-packed.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn encode_packed(&self, x: &Tensor) -> Result<Vec<PackedIndices>> {
        self.encode(x)?
            .iter()
            .zip(&self.stages)
            .map(|(idx, s)| {
                Ok(PackedIndices::from_tensor(idx, s.config().codes)?.made_by(s.fingerprint()?))
            })
            .collect()
    }

    /// `Σ_{i<L} decode_i(indices[i])` (`f32`) for the first `L = indices.len()` stages: the
    /// depth-`L` reconstruction.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for no indices or more than [`depth`](Self::depth), and
    /// as [`VectorQuantizer::decode`].
    pub fn decode(&self, indices: &[Tensor]) -> Result<Tensor> {
        if indices.is_empty() || indices.len() > self.stages.len() {
            return Err(Error::invalid_parameter(
                "indices",
                format!(
                    "need the indices of 1 to {} stages, got {}",
                    self.stages.len(),
                    indices.len()
                ),
            ));
        }
        let mut total: Option<Tensor> = None;
        for (stage, idx) in self.stages.iter().zip(indices) {
            let q = stage.decode(idx)?;
            total = Some(match total {
                None => q,
                Some(t) => (t + q)?,
            });
        }
        Ok(total.expect("at least one stage"))
    }

    /// [`decode`](Self::decode) of bit-packed indices.
    ///
    /// # Errors
    /// As [`decode`](Self::decode) and [`VectorQuantizer::decode_packed`].
    pub fn decode_packed(&self, packed: &[PackedIndices]) -> Result<Tensor> {
        let tensors = packed
            .iter()
            .zip(&self.stages)
            .map(|(p, s)| {
                s.check_packed(p)?;
                p.to_tensor(s.device())
            })
            .collect::<Result<Vec<_>>>()?;
        if tensors.len() != packed.len() {
            return Err(Error::invalid_parameter(
                "indices",
                format!(
                    "{} stages of indices for {} stages",
                    packed.len(),
                    self.stages.len()
                ),
            ));
        }
        self.decode(&tensors)
    }
}

/// Residual VQ as a candle-nn layer: `forward_t(x, train)` is
/// [`quantize(x, train)`](ResidualVq::quantize)'s straight-through `quantized`; the rest is
/// [`last_output`](ResidualVq::last_output).
impl ModuleT for ResidualVq {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.quantize(x, train)?.quantized)
    }
}
