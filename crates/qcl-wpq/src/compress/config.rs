//! [`CompressConfig`]: every knob of [`compress`](super::compress), its defaults, bounds and
//! the per-layer plan it gives.

use std::collections::BTreeMap;

use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::em::Objective;
use crate::layout::{clamp_centroids, LayerGeometry, LayerKind, Layout};
use crate::model::LayerSpec;

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
    /// Rounds of code reassignment after global fine-tuning (ours, beyond the paper; default
    /// 0, off): every layer's codes are chosen again for its fine-tuned centroids
    /// ([`PqTensor::reassign`](crate::pq_tensor::PqTensor::reassign) of the original weight
    /// under the activation metric (pooled Gram) of a fresh sample of the current student's
    /// inputs — for error feedback too, which does not repeat its column-by-column pass here —
    /// and `G = I` for naive PQ), then `global_steps` more steps of global fine-tuning.
    pub reassign_rounds: usize,
    /// Block size and centroids of named layers, in place of the per-kind fields above
    /// (default none). [`allocate`](super::allocate::allocate) fills it from measured
    /// sensitivities under a byte budget.
    pub layer_overrides: BTreeMap<String, LayerChoice>,
    /// Seed of every random choice.
    pub seed: Seed,
}

/// One layer's block size `d` and centroids `K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerChoice {
    /// Block size `d`.
    pub block: usize,
    /// Centroids `K` (before the clamp to the layer's subvectors).
    pub centroids: usize,
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
            reassign_rounds: 0,
            layer_overrides: BTreeMap::new(),
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
        for (layer, c) in &self.layer_overrides {
            let bad = |what: &str| {
                Error::invalid_parameter("layer_overrides", format!("layer `{layer}`: {what}"))
            };
            if !(1..=1 << 16).contains(&c.block) {
                return Err(bad("block must be in 1..=65536"));
            }
            if !(1..=crate::MAX_CENTROIDS).contains(&c.centroids) {
                return Err(bad("centroids out of range"));
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
            ("reassign_rounds", self.reassign_rounds, crate::MAX_ROUNDS),
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
        let (block, k_flag) = match (self.layer_overrides.get(layer.name), layer.kind) {
            (Some(c), _) => (c.block, c.centroids),
            (None, LayerKind::Conv { kh, kw, .. }) if kh * kw > 1 => {
                (self.block_conv, self.centroids_conv)
            }
            (None, LayerKind::Conv { .. }) => (self.block_pointwise, self.centroids_pointwise),
            (None, LayerKind::Linear { .. }) => (self.block_linear, self.centroids_linear),
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
