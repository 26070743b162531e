//! One adaptive quantization module (docs/methods/aqm.md § One module): encoder, EMA vector
//! quantizer, decoder, its own Adam, threshold statistics, freezing with codebook trimming and
//! the slow decoder copy.

use candle_core::{DType, Device, Tensor};
use qcl_nn::layers::Module;
use qcl_nn::ops::mse_loss;
use qcl_nn::optim::{Adam, AdamConfig, Optimizer};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Result, Seed};
use qcl_vq::{CodebookUpdate, PackedIndices, VectorQuantizer, VectorQuantizerConfig};
use serde::{Deserialize, Serialize};

use crate::config::QLayerConfig;
use qcl_nn::models::{ConvDecoder, ConvEncoder};

/// Running statistics of a module (docs/methods/aqm.md § Freezing and the slow decoder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LayerStats {
    /// `p`: EMA of the fraction of samples whose final reconstruction MSE is under `d_th`.
    pub p_ok: f64,
    /// EMA of the mean final reconstruction MSE (logging).
    pub avg_l2: f64,
    /// Updates of `p` so far.
    pub stat_updates: u64,
    /// Training forwards so far.
    pub train_steps: u64,
    /// `stat_updates` when the codebook froze.
    pub frozen_after: Option<u64>,
    /// Codes with count > 0.1 at freezing (max over codebooks).
    pub used_at_freeze: Option<usize>,
    /// K' after trimming.
    pub trimmed_codes: Option<usize>,
}

/// What one forward pass of a module produced.
#[derive(Debug, Clone)]
pub struct LayerForward {
    /// Encoder output `(B, C, h, w)`, ≥ 0.
    pub z_e: Tensor,
    /// Straight-through quantized latent (value `q`, gradient identity to `z_e`).
    pub z_q: Tensor,
    /// The quantized values `q`, detached.
    pub q: Tensor,
    /// Code indices `(B, N, h, w)`, `u32`, below the current K (K' once frozen).
    pub indices: Tensor,
    /// This module's reconstruction of its own input, `dec(z_q)`.
    pub reconstruction: Tensor,
}

/// One AQM module.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_aqm::{QLayer, QLayerConfig};
/// let mut layer = QLayer::new(QLayerConfig::fashion_mnist(), 1, [28, 28], 7.into(), &Device::Cpu)?;
/// let x = Tensor::zeros((2, 1, 28, 28), candle_core::DType::F32, &Device::Cpu)?;
/// let out = layer.forward(&x, true)?;
/// assert_eq!(out.indices.dims(), &[2, 1, 14, 14]);
/// assert_eq!(out.reconstruction.dims(), x.dims());
/// // Parameter counts of docs/methods/aqm.md § Fashion-MNIST experiment.
/// assert_eq!(layer.model_cost_params(), 15_216 + 10_817);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug)]
pub struct QLayer {
    config: QLayerConfig,
    in_channels: usize,
    input_hw: [usize; 2],
    seed: Seed,
    store: ParamStore,
    encoder: ConvEncoder,
    decoder: ConvDecoder,
    quantizer: VectorQuantizer,
    optimizer: Adam,
    ema: Option<(ParamStore, ConvDecoder)>,
    stats: LayerStats,
    device: Device,
}

impl QLayer {
    /// A fresh module for inputs of `in_channels × input_hw`, parameters drawn from `seed`.
    ///
    /// # Errors
    /// As [`QLayerConfig::validate`].
    pub fn new(
        config: QLayerConfig,
        in_channels: usize,
        input_hw: [usize; 2],
        seed: Seed,
        device: &Device,
    ) -> Result<Self> {
        config.validate(in_channels, input_hw)?;
        let store = ParamStore::new(seed);
        let root = store.root(device);
        let (c, ds, res) = (config.channels, config.downsample, config.res_blocks);
        let encoder = ConvEncoder::new(&root.pp("enc"), in_channels, c, ds, res)?;
        let decoder = ConvDecoder::new(&root.pp("dec"), in_channels, c, ds, res)?;
        let vq_config = VectorQuantizerConfig {
            codebooks: config.codebooks,
            update: CodebookUpdate::Ema {
                decay: config.decay,
                eps: config.eps,
            },
            commitment_weight: config.commit_coef,
            seed: seed.child_named("vq"),
            ..VectorQuantizerConfig::new(c, config.codes)
        };
        let quantizer = VectorQuantizer::from_param_path(&root.pp("vq"), vq_config)?;
        let optimizer = Adam::new(
            store.trainable(),
            AdamConfig {
                lr: config.lr,
                ..Default::default()
            },
        )?;
        Ok(QLayer {
            config,
            in_channels,
            input_hw,
            seed,
            store,
            encoder,
            decoder,
            quantizer,
            optimizer,
            ema: None,
            stats: LayerStats::default(),
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &QLayerConfig {
        &self.config
    }

    /// The statistics.
    pub fn stats(&self) -> &LayerStats {
        &self.stats
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Input height and width.
    pub fn input_hw(&self) -> [usize; 2] {
        self.input_hw
    }

    /// The seed the module was built from.
    pub fn seed(&self) -> Seed {
        self.seed
    }

    /// Whether the codebook is frozen (codes may be stored).
    pub fn is_frozen(&self) -> bool {
        self.ema.is_some()
    }

    /// The quantizer (K' codes once frozen): a candle `ModuleT` like the encoder and decoder.
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantizer
    }

    /// The encoder, a candle [`Module`] (`x → z_e`).
    pub fn encoder(&self) -> &ConvEncoder {
        &self.encoder
    }

    /// The live decoder, a candle [`Module`] (`z_q → x̂`).
    pub fn decoder(&self) -> &ConvDecoder {
        &self.decoder
    }

    /// Codes per codebook now: K, or K' after trimming.
    pub fn current_codes(&self) -> usize {
        self.quantizer.config().codes
    }

    /// Shape of one sample's indices `[N, h, w]`.
    pub fn index_shape(&self) -> [usize; 3] {
        [
            self.config.codebooks,
            self.config.latent_shape[0],
            self.config.latent_shape[1],
        ]
    }

    /// Each row of `indices` `(B, N, h, w)` (this module's, as its forward pass gives them)
    /// packed as the memory stores a sample: `[1, N, h, w]` at `⌈log2 K'⌉` bits per index.
    ///
    /// # Errors
    /// The errors of [`PackedIndices::pack`] (indices that are not whole samples of this
    /// module, or not below its current K); candle errors.
    pub fn pack_codes(&self, indices: &Tensor) -> Result<Vec<PackedIndices>> {
        let [n, h, w] = self.index_shape();
        let k = self.current_codes();
        let v: Vec<u32> = indices.flatten_all()?.to_vec1()?;
        v.chunks(n * h * w)
            .map(|c| PackedIndices::pack(c, &[1, n, h, w], k))
            .collect()
    }

    /// Bits of one stored sample, `N·h·w·⌈log2 K'⌉` (`b_i` of docs/methods/aqm.md § The stack;
    /// `b_i / 8` bytes).
    pub fn bits_per_sample(&self) -> u64 {
        let [n, h, w] = self.index_shape();
        (n * h * w) as u64 * u64::from(bits_for(self.current_codes()))
    }

    /// Compression rate `C·H·W·8 / (N·h·w·log2 K)` against the raw `u8` input
    /// (docs/methods/aqm.md § The stack).
    pub fn compression_rate(&self) -> f64 {
        let raw = (self.in_channels * self.input_hw[0] * self.input_hw[1] * 8) as f64;
        raw / self.bits_per_sample() as f64
    }

    /// Parameters charged to the memory (docs/methods/aqm.md § Budget): encoder + decoder, plus
    /// the slow decoder copy once frozen. Codebooks are free.
    pub fn model_cost_params(&self) -> usize {
        let live = self.store.trainable_elements();
        live + self.ema.as_ref().map_or(0, |(s, _)| s.trainable_elements())
    }

    /// Encodes, quantizes (updating the EMA codebook when `train` and not frozen) and
    /// decodes `x`. With `train`, a module whose `p` passed `freeze_at` freezes first.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for an input of another shape; candle errors.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<LayerForward> {
        self.check_input(x)?;
        if train {
            if !self.is_frozen() && self.stats.p_ok > self.config.freeze_at {
                self.freeze()?;
            }
            self.stats.train_steps += 1;
        }
        let z_e = self.encoder.forward(x)?;
        let out = self.quantizer.quantize(&z_e, train)?;
        let q = out.quantized.detach();
        let reconstruction = self.decoder.forward(&out.quantized)?;
        Ok(LayerForward {
            z_e,
            z_q: out.quantized,
            q,
            indices: out.indices,
            reconstruction,
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let [h, w] = self.input_hw;
        match x.dims() {
            [b, c, hh, ww] if *b > 0 && *c == self.in_channels && *hh == h && *ww == w => Ok(()),
            other => Err(Error::ShapeMismatch {
                context: "module input".into(),
                expected: format!("[B ≥ 1, {}, {h}, {w}]", self.in_channels),
                actual: other.to_vec(),
            }),
        }
    }

    /// The module loss `Rec + β·commit` (docs/methods/aqm.md § Module loss) of a forward pass
    /// on `x`, whose last `replayed` rows are replay; with `double_count_replay` those rows are
    /// counted again.
    ///
    /// # Errors
    /// Candle errors; [`Error::InvalidParameter`] if `replayed` exceeds the batch.
    pub fn loss(
        &self,
        out: &LayerForward,
        x: &Tensor,
        replayed: usize,
        double_count_replay: bool,
    ) -> Result<Tensor> {
        let b = x.dims()[0];
        if replayed > b {
            return Err(Error::invalid_parameter(
                "replayed",
                format!("{replayed} replayed rows in a batch of {b}"),
            ));
        }
        let mut rec = mse_loss(&out.reconstruction, x)?;
        let mut commit = mse_loss(&out.z_e, &out.q)?;
        if double_count_replay && replayed > 0 {
            let s = b - replayed;
            rec = (rec
                + mse_loss(
                    &out.reconstruction.narrow(0, s, replayed)?,
                    &x.narrow(0, s, replayed)?,
                )?)?;
            commit = (commit
                + mse_loss(
                    &out.z_e.narrow(0, s, replayed)?,
                    &out.q.narrow(0, s, replayed)?,
                )?)?;
        }
        Ok((rec + commit.affine(self.config.commit_coef, 0.0)?)?)
    }

    /// One Adam step of this module's encoder and decoder on `loss`.
    ///
    /// # Errors
    /// Candle errors.
    pub fn optimize(&mut self, loss: &Tensor) -> Result<()> {
        self.optimizer.backward_step(loss)
    }

    /// Updates `p` and `avg_l2` from per-sample MSEs of the final reconstructions; returns
    /// which samples are under the threshold.
    pub fn update_threshold_stats(&mut self, mse: &[f64]) -> Vec<bool> {
        let ok: Vec<bool> = mse
            .iter()
            .map(|&m| m < self.config.recon_threshold)
            .collect();
        if !mse.is_empty() {
            let r = self.config.stat_rate;
            let frac = ok.iter().filter(|&&o| o).count() as f64 / ok.len() as f64;
            let mean = mse.iter().sum::<f64>() / mse.len() as f64;
            self.stats.p_ok = (1.0 - r) * self.stats.p_ok + r * frac;
            self.stats.avg_l2 = (1.0 - r) * self.stats.avg_l2 + r * mean;
            self.stats.stat_updates += 1;
        }
        ok
    }

    /// Freezes the codebook now (docs/methods/aqm.md § Freezing and the slow decoder): trims it
    /// to `K' = 2^⌈log2 used⌉` (≥ 2, ≤ K) rows of largest count, kept in ascending count
    /// order, stops its updates, and creates the slow decoder copy. Nothing happens if already
    /// frozen.
    ///
    /// # Errors
    /// Candle errors.
    pub fn freeze(&mut self) -> Result<()> {
        if self.is_frozen() {
            return Ok(());
        }
        let (n, k, d) = (
            self.config.codebooks,
            self.current_codes(),
            self.config.channels / self.config.codebooks,
        );
        let counts: Vec<f32> = self.quantizer.counts()?.flatten_all()?.to_vec1()?;
        let book: Vec<f32> = self.quantizer.codebook()?.flatten_all()?.to_vec1()?;
        let (k_new, kept) = trim_plan(&counts, n, k);
        let mut trimmed = Vec::with_capacity(n * k_new * d);
        for (cb, rows) in kept.iter().enumerate() {
            for &row in rows {
                let start = (cb * k + row) * d;
                trimmed.extend_from_slice(&book[start..start + d]);
            }
        }
        let used = (0..n)
            .map(|cb| {
                counts[cb * k..(cb + 1) * k]
                    .iter()
                    .filter(|&&c| c > 0.1)
                    .count()
            })
            .max()
            .unwrap_or(0);
        self.quantizer = self.frozen_quantizer(k_new)?;
        self.quantizer
            .set_codebook(&Tensor::from_vec(trimmed, (n, k_new, d), &self.device)?)?;
        self.ema = Some(self.new_ema_decoder()?);
        self.copy_live_decoder_to_ema()?;
        self.stats.frozen_after = Some(self.stats.stat_updates);
        self.stats.used_at_freeze = Some(used);
        self.stats.trimmed_codes = Some(k_new);
        Ok(())
    }

    fn frozen_quantizer(&self, codes: usize) -> Result<VectorQuantizer> {
        let store = ParamStore::new(self.seed.child_named("trimmed"));
        let config = VectorQuantizerConfig {
            codebooks: self.config.codebooks,
            update: CodebookUpdate::Frozen,
            commitment_weight: self.config.commit_coef,
            ..VectorQuantizerConfig::new(self.config.channels, codes)
        };
        VectorQuantizer::from_param_path(&store.root(&self.device).pp("vq"), config)
    }

    fn new_ema_decoder(&self) -> Result<(ParamStore, ConvDecoder)> {
        let store = ParamStore::new(self.seed.child_named("ema"));
        let c = &self.config;
        let decoder = ConvDecoder::new(
            &store.root(&self.device).pp("dec"),
            self.in_channels,
            c.channels,
            c.downsample,
            c.res_blocks,
        )?;
        Ok((store, decoder))
    }

    fn copy_live_decoder_to_ema(&self) -> Result<()> {
        if let Some((ema, _)) = &self.ema {
            for (name, var, _) in ema.all() {
                let live = self.store.get(&name).ok_or_else(|| {
                    Error::invalid_parameter("ema decoder", format!("no live parameter `{name}`"))
                })?;
                var.set(&live.as_tensor().copy()?)?;
            }
        }
        Ok(())
    }

    /// `θ_ema ← (1−r)·θ_ema + r·θ` for a frozen module (nothing otherwise).
    ///
    /// # Errors
    /// Candle errors.
    pub fn update_ema_decoder(&mut self) -> Result<()> {
        let r = self.config.ema_decoder_rate;
        if let Some((ema, _)) = &self.ema {
            for (name, var, _) in ema.all() {
                if let Some(live) = self.store.get(&name) {
                    let next = (var.as_tensor().affine(1.0 - r, 0.0)?
                        + live.as_tensor().affine(r, 0.0)?)?;
                    var.set(&next.detach())?;
                }
            }
        }
        Ok(())
    }

    /// Decodes a latent with the live decoder (`slow = false`) or the slow copy (`slow = true`,
    /// falling back to the live one for an unfrozen module). No gradient is kept.
    ///
    /// # Errors
    /// Candle errors.
    pub fn decode_latent(&self, z: &Tensor, slow: bool) -> Result<Tensor> {
        let out = match (&self.ema, slow) {
            (Some((_, ema)), true) => ema.forward(&z.detach())?,
            _ => self.decoder.forward(&z.detach())?,
        };
        Ok(out.detach())
    }

    /// The codebook rows of indices `(B, N, h, w)` (below the current K).
    ///
    /// # Errors
    /// As [`VectorQuantizer::decode`].
    pub fn decode_indices(&self, indices: &Tensor) -> Result<Tensor> {
        self.quantizer.decode(indices)
    }

    /// Every tensor of the module state, named, for saving: live parameters and quantizer
    /// buffers (`live.*`), the optimizer (`adam.*`), the slow decoder (`ema.*`), the trimmed
    /// codebook (`trimmed.codebook`).
    pub(crate) fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .store
            .tensors()?
            .into_iter()
            .map(|(n, t)| (format!("live.{n}"), t))
            .collect();
        let adam = self.optimizer.state()?;
        for (n, t) in adam.tensors {
            out.push((format!("adam.{n}"), t));
        }
        if let Some((ema, _)) = &self.ema {
            for (n, t) in ema.tensors()? {
                out.push((format!("ema.{n}"), t));
            }
            out.push(("trimmed.codebook".into(), self.quantizer.codebook()?));
        }
        Ok(out)
    }

    /// Optimizer scalars for saving.
    pub(crate) fn optimizer_scalars(&self) -> Result<std::collections::BTreeMap<String, f64>> {
        Ok(self.optimizer.state()?.scalars)
    }

    /// Restores a state written by [`state_tensors`](Self::state_tensors) into a fresh module
    /// built from the same configuration.
    pub(crate) fn restore(
        &mut self,
        stats: LayerStats,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        adam_scalars: std::collections::BTreeMap<String, f64>,
        source: &std::path::Path,
    ) -> Result<()> {
        let pick = |prefix: &str| -> std::collections::BTreeMap<String, Tensor> {
            tensors
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(prefix).map(|s| (s.to_string(), t.clone())))
                .collect()
        };
        self.store.load_tensors(&pick("live."), source)?;
        let adam = qcl_nn::optim::OptimizerState {
            kind: "adam".into(),
            scalars: adam_scalars,
            tensors: pick("adam."),
        };
        self.optimizer.load_state(&adam)?;
        if let Some(k_new) = stats.trimmed_codes {
            let book = tensors.get("trimmed.codebook").ok_or_else(|| {
                Error::bad_file(source, "a frozen module without `trimmed.codebook`")
            })?;
            let d = self.config.channels / self.config.codebooks;
            if book.dims() != [self.config.codebooks, k_new, d]
                || !(2..=self.config.codes).contains(&k_new)
            {
                return Err(Error::bad_file(
                    source,
                    format!(
                        "trimmed codebook {:?} does not match K' = {k_new}",
                        book.dims()
                    ),
                ));
            }
            self.quantizer = self.frozen_quantizer(k_new)?;
            self.quantizer.set_codebook(&book.to_dtype(DType::F32)?)?;
            let (ema, dec) = self.new_ema_decoder()?;
            ema.load_tensors(&pick("ema."), source)?;
            self.ema = Some((ema, dec));
        }
        self.stats = stats;
        Ok(())
    }
}

/// Bits per index for K codes, `⌈log2 K⌉`: qcl-vq's one definition.
pub use qcl_vq::bits_for;

/// The trimming rule of docs/methods/aqm.md § Freezing and the slow decoder on counts `[N, K]`
/// (row-major): returns K' and, per codebook, the kept rows (the K' largest counts, in
/// ascending count order; ties keep the lower index later, i.e. a stable sort).
///
/// ```
/// let counts = [0.0, 5.0, 0.05, 2.0, 0.2, 0.0, 0.0, 0.0];
/// let (k, kept) = qcl_aqm::layer::trim_plan(&counts, 1, 8);
/// assert_eq!(k, 4); // 3 codes above 0.1 → next power of two
/// assert_eq!(kept[0], vec![2, 4, 3, 1]);
/// ```
pub fn trim_plan(counts: &[f32], codebooks: usize, codes: usize) -> (usize, Vec<Vec<usize>>) {
    let used = (0..codebooks)
        .map(|n| {
            counts[n * codes..(n + 1) * codes]
                .iter()
                .filter(|&&c| c > 0.1)
                .count()
        })
        .max()
        .unwrap_or(0);
    let k_new = used.max(2).next_power_of_two().min(codes);
    let kept = (0..codebooks)
        .map(|n| {
            let c = &counts[n * codes..(n + 1) * codes];
            let mut order: Vec<usize> = (0..codes).collect();
            order.sort_by(|&a, &b| c[a].total_cmp(&c[b]));
            order[codes - k_new..].to_vec()
        })
        .collect();
    (k_new, kept)
}
