//! Configurations of modules and stacks (docs/methods/aqm.md § One module, § The stack,
//! § Hyperparameters, § Fashion-MNIST experiment), as serde/JSON.

use std::path::Path;

use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which output of a module the next module encodes (docs/methods/aqm.md § The stack,
/// `input_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// The encoder output `z_e` (CIFAR configs).
    #[default]
    ZE,
    /// The quantized latent `z_q` (ImageNet/LiDAR configs).
    ZQ,
}

/// One quantization module (docs/methods/aqm.md § One module; the reference code's yaml keys
/// in brackets).
///
/// ```
/// let c = qcl_aqm::QLayerConfig::fashion_mnist();
/// assert_eq!((c.channels, c.codes, c.codebooks, c.downsample), (32, 16, 1, 2));
/// assert!(c.validate(1, [28, 28]).is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QLayerConfig {
    /// Hidden and embedding width C (`channel`).
    pub channels: usize,
    /// Spatial downsampling of the encoder, 2 or 4 (`downsample`).
    pub downsample: usize,
    /// Residual blocks in encoder and decoder (`n_res_blocks`, default 1).
    #[serde(default = "one")]
    pub res_blocks: usize,
    /// N, codebooks splitting the C channels (`n_codebooks`).
    pub codebooks: usize,
    /// K, codes per codebook (`n_embeds`).
    pub codes: usize,
    /// EMA decay γ of the codebook (`decay`, 0.6 in AQM).
    #[serde(default = "default_decay")]
    pub decay: f64,
    /// ε of the Laplace smoothing.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// β, the commitment weight (`commit_coef`, 2).
    #[serde(default = "default_beta")]
    pub commit_coef: f64,
    /// Adam learning rate (`lr`, 1e-3).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// d_th, the reconstruction threshold (`recon_th`), MSE in [-1, 1] units; must be > 0.
    pub recon_threshold: f64,
    /// Latent shape `[H/ds, W/ds]` (`argmin_shp`); checked against the image.
    pub latent_shape: [usize; 2],
    /// Rate of the EMA `p ← (1−r)·p + r·ok` of the fraction under threshold (0.01).
    #[serde(default = "default_rate")]
    pub stat_rate: f64,
    /// The codebook freezes when `p` exceeds this (0.9).
    #[serde(default = "default_freeze_at")]
    pub freeze_at: f64,
    /// Rate of the slow decoder copy `θ_ema ← (1−r)·θ_ema + r·θ` (0.01).
    #[serde(default = "default_rate")]
    pub ema_decoder_rate: f64,
    /// Output given to the next module.
    #[serde(default)]
    pub input_kind: InputKind,
}

fn one() -> usize {
    1
}
fn default_decay() -> f64 {
    0.6
}
fn default_eps() -> f64 {
    1e-5
}
fn default_beta() -> f64 {
    2.0
}
fn default_lr() -> f64 {
    1e-3
}
fn default_rate() -> f64 {
    0.01
}
fn default_freeze_at() -> f64 {
    0.9
}
fn default_true() -> bool {
    true
}

impl QLayerConfig {
    /// The Fashion-MNIST module of docs/methods/aqm.md § Fashion-MNIST experiment: ds 2, C 32,
    /// one ResBlock, 14×14 latent, N 1, K 16, γ 0.6, β 2, Adam 1e-3, d_th 0.10.
    pub fn fashion_mnist() -> Self {
        QLayerConfig {
            channels: 32,
            downsample: 2,
            res_blocks: 1,
            codebooks: 1,
            codes: 16,
            decay: 0.6,
            eps: 1e-5,
            commit_coef: 2.0,
            lr: 1e-3,
            recon_threshold: 0.10,
            latent_shape: [14, 14],
            stat_rate: 0.01,
            freeze_at: 0.9,
            ema_decoder_rate: 0.01,
            input_kind: InputKind::ZE,
        }
    }

    /// The CIFAR module of `cifar_20_final` (M = 20: N 1, d_th 0.5) or `cifar_50_final`
    /// (M = 50: N 2, d_th 0.1), docs/methods/aqm.md § Hyperparameters.
    pub fn cifar(mem_per_class: usize) -> Self {
        let (codebooks, recon_threshold) = if mem_per_class <= 20 {
            (1, 0.5)
        } else {
            (2, 0.1)
        };
        QLayerConfig {
            channels: 100,
            codebooks,
            recon_threshold,
            latent_shape: [16, 16],
            ..Self::fashion_mnist()
        }
    }

    /// Checks the configuration for a module whose input has `in_channels` channels of
    /// `input_hw` size.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a threshold ≤ 0, channels not divisible by the
    /// codebooks, a downsampling other than 2 or 4, a bad rate; [`Error::ShapeMismatch`] for a
    /// `latent_shape` that does not match the input size.
    pub fn validate(&self, in_channels: usize, input_hw: [usize; 2]) -> Result<()> {
        if !(self.recon_threshold.is_finite() && self.recon_threshold > 0.0) {
            return Err(Error::invalid_parameter(
                "recon_threshold",
                format!("must be > 0, got {}", self.recon_threshold),
            ));
        }
        if self.channels == 0
            || self.codebooks == 0
            || !self.channels.is_multiple_of(self.codebooks)
        {
            return Err(Error::invalid_parameter(
                "codebooks",
                format!(
                    "channels ({}) must be a positive multiple of codebooks ({})",
                    self.channels, self.codebooks
                ),
            ));
        }
        if self.downsample == 2 && !self.channels.is_multiple_of(2) {
            return Err(Error::invalid_parameter(
                "channels",
                format!("downsampling 2 needs an even width, got {}", self.channels),
            ));
        }
        if !matches!(self.downsample, 2 | 4) {
            return Err(Error::invalid_parameter(
                "downsample",
                format!(
                    "supported: 2 or 4 (quantizer-only ds = 1 modules are not implemented), got {}",
                    self.downsample
                ),
            ));
        }
        if !(2..=qcl_vq::MAX_CODES).contains(&self.codes) {
            return Err(Error::invalid_parameter(
                "codes",
                format!("must be in 2..={}, got {}", qcl_vq::MAX_CODES, self.codes),
            ));
        }
        if in_channels == 0 {
            return Err(Error::invalid_parameter("in_channels", "must be positive"));
        }
        for (name, v) in [
            ("stat_rate", self.stat_rate),
            ("ema_decoder_rate", self.ema_decoder_rate),
            ("freeze_at", self.freeze_at),
            ("decay", self.decay),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be in [0, 1], got {v}"),
                ));
            }
        }
        if !(self.eps > 0.0 && self.lr >= 0.0 && self.commit_coef >= 0.0) {
            return Err(Error::invalid_parameter(
                "eps/lr/commit_coef",
                "eps must be > 0, lr and commit_coef ≥ 0",
            ));
        }
        let ds = self.downsample;
        let expected = [input_hw[0] / ds, input_hw[1] / ds];
        if !input_hw[0].is_multiple_of(ds)
            || !input_hw[1].is_multiple_of(ds)
            || expected != self.latent_shape
        {
            return Err(Error::ShapeMismatch {
                context: "module latent_shape (argmin_shp)".into(),
                expected: format!("{:?} (input {:?} / downsample {ds})", expected, input_hw),
                actual: self.latent_shape.to_vec(),
            });
        }
        Ok(())
    }
}

/// A stack of modules for images of one shape, plus the training knobs of
/// docs/methods/aqm.md § Module loss and § The memory.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/aqm/fashion_mnist.json");
/// let config = qcl_aqm::StackConfig::load(path)?;
/// assert_eq!(config.image, [1, 28, 28]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// Image shape `[C, H, W]`.
    pub image: [usize; 3],
    /// Modules from shallow to deep.
    pub layers: Vec<QLayerConfig>,
    /// Count replayed samples twice in the module losses (a quirk of the reference code;
    /// docs/methods/aqm.md § Module loss, § Paper and reference code).
    #[serde(default = "default_true")]
    pub double_count_replay: bool,
}

impl StackConfig {
    /// One Fashion-MNIST module (docs/methods/aqm.md § Fashion-MNIST experiment).
    pub fn fashion_mnist() -> Self {
        StackConfig {
            image: [1, 28, 28],
            layers: vec![QLayerConfig::fashion_mnist()],
            double_count_replay: true,
        }
    }

    /// One CIFAR module (`cifar_20_final` / `cifar_50_final`).
    pub fn cifar(mem_per_class: usize) -> Self {
        StackConfig {
            image: [3, 32, 32],
            layers: vec![QLayerConfig::cifar(mem_per_class)],
            double_count_replay: true,
        }
    }

    /// Checks every module against the shape it receives.
    ///
    /// # Errors
    /// As [`QLayerConfig::validate`]; [`Error::InvalidParameter`] for no module or an empty image.
    pub fn validate(&self) -> Result<()> {
        if self.layers.is_empty() {
            return Err(Error::invalid_parameter(
                "layers",
                "a stack needs at least one module",
            ));
        }
        if self.image.contains(&0) {
            return Err(Error::invalid_parameter(
                "image",
                "image dimensions must be positive",
            ));
        }
        let (mut c, mut hw) = (self.image[0], [self.image[1], self.image[2]]);
        for layer in &self.layers {
            layer.validate(c, hw)?;
            c = layer.channels;
            hw = layer.latent_shape;
        }
        Ok(())
    }

    /// Reads and validates a JSON configuration.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::BadFile`] for invalid JSON, and the errors of
    /// [`StackConfig::validate`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // A configuration is a few hundred bytes; 1 MiB bounds a mistaken path.
        let bytes = qcl_tensor::read_bounded(path, 1 << 20)?;
        let config: StackConfig =
            serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Writes the configuration as pretty JSON, atomically.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid_parameter("config", e.to_string()))?;
        qcl_tensor::write_atomic(path, text.as_bytes())
    }
}
