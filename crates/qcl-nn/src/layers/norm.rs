use candle_core::{Tensor, Var};
use qcl_tensor::{Error, Result};

use super::ModuleT;
use crate::ops::{batch_norm_eval, batch_norm_train, BatchStats};
use crate::{Init, ParamPath};

/// Hyperparameters of a [`BatchNorm2d`] (PyTorch's defaults: `eps` 1e-5, momentum 0.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Weight of the newest batch in the running estimates:
    /// `running = (1 − momentum)·running + momentum·batch`.
    pub momentum: f64,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
        }
    }
}

/// Batch normalisation over the channel axis of `[n, c, …]` inputs, with learned `weight`
/// (γ, ones) and `bias` (β, zeros), and `running_mean`/`running_var` buffers (zeros/ones,
/// updated with the unbiased batch variance in training mode, saved with the model).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::{BatchNorm2d, BatchNormConfig, ModuleT};
/// let store = qcl_nn::ParamStore::new(0);
/// let bn = BatchNorm2d::new(&store.root(&Device::Cpu).pp("bn"), 3, BatchNormConfig::default())?;
/// let x = Tensor::randn(0f32, 1.0, (8, 3, 4, 4), &Device::Cpu)?;
/// let _ = bn.forward_t(&x, true)?; // updates the running statistics
/// assert_eq!(store.buffers().len(), 2);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    channels: usize,
    config: BatchNormConfig,
}

impl BatchNorm2d {
    /// A BatchNorm over `channels` channels.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero channels, a negative `eps` or a momentum outside
    /// `[0, 1]`.
    pub fn new(path: &ParamPath, channels: usize, config: BatchNormConfig) -> Result<Self> {
        if channels == 0 {
            return Err(Error::invalid_parameter("channels", "must be at least 1"));
        }
        if !(config.eps >= 0.0 && (0.0..=1.0).contains(&config.momentum)) {
            return Err(Error::invalid_parameter(
                "batch norm",
                format!("need eps >= 0 and momentum in [0, 1], got {config:?}"),
            ));
        }
        Ok(Self {
            weight: path.param("weight", channels, Init::Ones)?,
            bias: path.param("bias", channels, Init::Zeros)?,
            running_mean: path.buffer("running_mean", channels, Init::Zeros)?,
            running_var: path.buffer("running_var", channels, Init::Ones)?,
            channels,
            config,
        })
    }

    /// The running mean buffer.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance buffer.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// β.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// BatchNorm followed by ReLU, fused into one op (one pass forward, one backward).
    ///
    /// # Errors
    /// As [`ModuleT::forward_t`].
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.apply(x, train, true)
    }

    fn apply(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if x.rank() < 2 || x.dim(1)? != self.channels {
            return Err(Error::ShapeMismatch {
                context: "batch norm input".into(),
                expected: format!("[n, {}, ...]", self.channels),
                actual: x.dims().to_vec(),
            });
        }
        if !train {
            return batch_norm_eval(
                x,
                &self.weight,
                &self.bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                self.config.eps,
                relu,
            );
        }
        let (y, stats) = batch_norm_train(x, &self.weight, &self.bias, self.config.eps, relu)?;
        self.update_running(&stats)?;
        Ok(y)
    }

    /// The hyperparameters.
    pub fn config(&self) -> BatchNormConfig {
        self.config
    }

    /// Folds one training batch's statistics into the running estimates:
    /// `running = (1 − momentum)·running + momentum·batch`, with the unbiased batch variance.
    pub(crate) fn update_running(&self, stats: &BatchStats) -> Result<()> {
        let m = self.config.momentum;
        let update = |var: &Var, batch: &[f64]| -> Result<()> {
            let old: Vec<f64> = var
                .as_tensor()
                .to_dtype(candle_core::DType::F64)?
                .to_vec1()?;
            let new: Vec<f64> = old
                .iter()
                .zip(batch)
                .map(|(o, b)| (1.0 - m) * o + m * b)
                .collect();
            let t = Tensor::from_vec(new, self.channels, var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
            Ok(())
        };
        update(&self.running_mean, &stats.mean)?;
        update(&self.running_var, &stats.unbiased_variance())
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.apply(x, train, false)?)
    }
}
