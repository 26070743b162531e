//! A stack of modules (docs/methods/aqm.md § The stack), each trained on its own loss, no
//! gradient between modules.

use candle_core::{Device, Tensor};
use qcl_tensor::{Error, Result, Seed};

use crate::config::{InputKind, StackConfig};
use crate::layer::{LayerForward, QLayer};

/// What one training step of the stack produced.
#[derive(Debug, Clone)]
pub struct StackStep {
    /// Per module (shallow to deep), its forward pass (pre-update weights).
    pub outputs: Vec<LayerForward>,
    /// Per module, the image-space reconstruction `x_final_i` from its codes through the live
    /// decoders of itself and every shallower module, `(B, c, H, W)`, detached.
    pub finals: Vec<Tensor>,
    /// Per module, its loss value.
    pub losses: Vec<f64>,
}

/// Modules 1..L from shallow to deep.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_aqm::{QStack, StackConfig};
/// let mut stack = QStack::new(StackConfig::fashion_mnist(), 3.into(), &Device::Cpu)?;
/// let x = Tensor::rand(-1f32, 1f32, (4, 1, 28, 28), &Device::Cpu)?;
/// let step = stack.train_step(&x, 0)?;
/// assert_eq!(step.finals.len(), 1);
/// assert_eq!(step.finals[0].dims(), x.dims());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug)]
pub struct QStack {
    config: StackConfig,
    layers: Vec<QLayer>,
    device: Device,
}

impl QStack {
    /// A fresh stack; module `i` draws its parameters from `seed.child(i)`.
    ///
    /// # Errors
    /// As [`StackConfig::validate`].
    pub fn new(config: StackConfig, seed: Seed, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut layers = Vec::with_capacity(config.layers.len());
        let (mut c, mut hw) = (config.image[0], [config.image[1], config.image[2]]);
        for (i, lc) in config.layers.iter().enumerate() {
            layers.push(QLayer::new(
                lc.clone(),
                c,
                hw,
                seed.child(i as u64),
                device,
            )?);
            c = lc.channels;
            hw = lc.latent_shape;
        }
        Ok(QStack {
            config,
            layers,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StackConfig {
        &self.config
    }

    /// The modules, shallow to deep.
    pub fn layers(&self) -> &[QLayer] {
        &self.layers
    }

    /// Mutable modules.
    pub fn layers_mut(&mut self) -> &mut [QLayer] {
        &mut self.layers
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters charged to the memory, summed over modules.
    pub fn model_cost_params(&self) -> usize {
        self.layers.iter().map(QLayer::model_cost_params).sum()
    }

    /// Forward pass of every module (each on the detached output of the one above), and the
    /// image-space reconstructions `x_final_i`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for an image of another shape; candle errors.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<(Vec<LayerForward>, Vec<Tensor>)> {
        let mut outputs: Vec<LayerForward> = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let input = match outputs.last() {
                None => x.clone(),
                Some(prev) => match self.layers[i].config().input_kind {
                    InputKind::ZE => prev.z_e.detach(),
                    InputKind::ZQ => prev.q.clone(),
                },
            };
            let out = self.layers[i].forward(&input, train)?;
            outputs.push(out);
        }
        let mut finals = Vec::with_capacity(outputs.len());
        for (i, out) in outputs.iter().enumerate() {
            let mut xf = out.reconstruction.detach();
            for j in (0..i).rev() {
                xf = self.layers[j].decode_latent(&xf, false)?;
            }
            finals.push(xf);
        }
        Ok((outputs, finals))
    }

    /// One training step (docs/methods/aqm.md § The online loop; the reference code's
    /// `stack.forward` + `stack.optimize`): forward pass, then one Adam step per module on its
    /// own loss. The last `replayed` rows of `x` are replay.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn train_step(&mut self, x: &Tensor, replayed: usize) -> Result<StackStep> {
        let (outputs, finals) = self.forward(x, true)?;
        let double = self.config.double_count_replay;
        let mut losses = Vec::with_capacity(outputs.len());
        for (i, out) in outputs.iter().enumerate() {
            let target = if i == 0 {
                x.clone()
            } else {
                match self.layers[i].config().input_kind {
                    InputKind::ZE => outputs[i - 1].z_e.detach(),
                    InputKind::ZQ => outputs[i - 1].q.clone(),
                }
            };
            let loss = self.layers[i].loss(out, &target, replayed, double)?;
            losses.push(f64::from(
                loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?,
            ));
            self.layers[i].optimize(&loss)?;
        }
        Ok(StackStep {
            outputs,
            finals,
            losses,
        })
    }

    /// Updates every module's `p` from the per-sample MSE of its final reconstruction against
    /// `x`; returns, per module, which samples are under its threshold.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `finals` does not match the stack or `x`.
    pub fn update_threshold_stats(
        &mut self,
        x: &Tensor,
        finals: &[Tensor],
    ) -> Result<Vec<Vec<bool>>> {
        if finals.len() != self.layers.len() {
            return Err(Error::ShapeMismatch {
                context: "final reconstructions".into(),
                expected: format!("{} modules", self.layers.len()),
                actual: vec![finals.len()],
            });
        }
        let mut ok = Vec::with_capacity(finals.len());
        for (layer, xf) in self.layers.iter_mut().zip(finals) {
            let mse = per_sample_mse(xf, x)?;
            ok.push(layer.update_threshold_stats(&mse));
        }
        Ok(ok)
    }

    /// The slow decoder update of every frozen module.
    ///
    /// # Errors
    /// Candle errors.
    pub fn update_ema_decoders(&mut self) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(QLayer::update_ema_decoder)
    }

    /// Every module is frozen (stored codes exist at every depth; nothing trains the codebooks).
    ///
    /// ```
    /// use candle_core::Device;
    /// use qcl_aqm::{QStack, StackConfig};
    /// let stack = QStack::new(StackConfig::fashion_mnist(), 3.into(), &Device::Cpu)?;
    /// assert!(!stack.all_frozen()); // a new module has not met its threshold yet
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn all_frozen(&self) -> bool {
        self.layers.iter().all(|l| l.is_frozen())
    }

    /// Images from indices `(B, N, h, w)` of module `module` (1-based), through the slow
    /// decoders of it and every shallower module (docs/methods/aqm.md § Replay).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a module id outside 1..=L; the decoding errors.
    pub fn decode_codes(&self, module: usize, indices: &Tensor) -> Result<Tensor> {
        if module == 0 || module > self.layers.len() {
            return Err(Error::invalid_parameter(
                "module",
                format!("must be in 1..={}, got {module}", self.layers.len()),
            ));
        }
        let layer = &self.layers[module - 1];
        let mut x = layer.decode_latent(&layer.decode_indices(indices)?, true)?;
        for j in (0..module - 1).rev() {
            x = self.layers[j].decode_latent(&x, true)?;
        }
        Ok(x)
    }
}

/// Mean squared error of each sample (mean over C·H·W), in `f64`.
///
/// # Errors
/// [`Error::ShapeMismatch`] for different shapes.
pub fn per_sample_mse(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    if a.dims() != b.dims() || a.rank() < 1 {
        return Err(Error::ShapeMismatch {
            context: "per-sample MSE".into(),
            expected: format!("{:?}", b.dims()),
            actual: a.dims().to_vec(),
        });
    }
    let n = a.dims()[0];
    let d = a.elem_count() / n.max(1);
    let av: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let bv: Vec<f32> = b.flatten_all()?.to_vec1()?;
    Ok((0..n)
        .map(|i| {
            let s: f64 = av[i * d..(i + 1) * d]
                .iter()
                .zip(&bv[i * d..(i + 1) * d])
                .map(|(&p, &q)| {
                    let e = f64::from(p - q);
                    e * e
                })
                .sum();
            s / d as f64
        })
        .collect())
}
