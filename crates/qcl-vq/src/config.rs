//! Every knob of a [`VectorQuantizer`](crate::VectorQuantizer), each with a documented default.

use std::collections::BTreeMap;
use std::path::Path;

use qcl_tensor::{Error, Result, Seed};

/// Largest codebook size: indices are stored with at most 16 bits.
pub const MAX_CODES: usize = 1 << 16;

/// A code counts as dead in [`UsageStats::dead_codes`](crate::UsageStats::dead_codes) when its
/// running count is below this and no [`VectorQuantizerConfig::dead_code_threshold`] is set:
/// used less than once per batch on average.
pub const DEFAULT_DEAD_CODE_THRESHOLD: f64 = 1.0;

/// Which axis of the input holds the C channels.
///
/// The channel axis splits into the codebooks' groups; every other axis indexes vectors, in
/// row-major order. The index tensor has the input's shape with the channel axis of size N
/// (the number of codebooks) instead of C.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelAxis {
    /// Axis 1 for rank-4 inputs `(B, C, H, W)` (candle's image layout), the last axis for
    /// every other rank (`(B, T, C)` sequences, `(B, C)` rows, any `[.., C]`) (default).
    #[default]
    Auto,
    /// Axis 1 for every rank ≥ 2: `(B, C, ...)` with any number of trailing axes (the only
    /// axis for rank 1).
    ChannelsFirst,
    /// The last axis for every rank: `[.., C]`.
    ChannelsLast,
}

impl ChannelAxis {
    /// The channel axis of an input (or index tensor) of rank `rank ≥ 1`.
    ///
    /// ```
    /// use qcl_vq::ChannelAxis;
    /// assert_eq!(ChannelAxis::Auto.resolve(4), Some(1));
    /// assert_eq!(ChannelAxis::Auto.resolve(3), Some(2));
    /// assert_eq!(ChannelAxis::ChannelsFirst.resolve(3), Some(1));
    /// assert_eq!(ChannelAxis::ChannelsLast.resolve(4), Some(3));
    /// assert_eq!(ChannelAxis::Auto.resolve(0), None);
    /// ```
    pub fn resolve(self, rank: usize) -> Option<usize> {
        match (self, rank) {
            (_, 0) => None,
            (ChannelAxis::Auto, 4) => Some(1),
            (ChannelAxis::ChannelsFirst, r) => Some(r.min(2) - 1),
            (_, r) => Some(r - 1),
        }
    }

    /// The name used in saved files: `auto`, `channels_first` or `channels_last`.
    pub fn name(self) -> &'static str {
        match self {
            ChannelAxis::Auto => "auto",
            ChannelAxis::ChannelsFirst => "channels_first",
            ChannelAxis::ChannelsLast => "channels_last",
        }
    }

    /// The shape pattern this axis accepts, for error messages (`c` = the channel count).
    pub(crate) fn pattern(self, c: usize) -> String {
        match self {
            ChannelAxis::Auto => format!("[B, {c}, H, W] or [..., {c}]"),
            ChannelAxis::ChannelsFirst => format!("[B, {c}, ...]"),
            ChannelAxis::ChannelsLast => format!("[..., {c}]"),
        }
    }
}

/// How the codebook moves during training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CodebookUpdate {
    /// Exponential moving averages of the assignment counts and of the assigned vectors
    /// (VQ-VAE-2, Razavi et al. 2019; AQM, Caccia et al. 2020, docs/methods/aqm.md § Quantizer),
    /// on every training batch, with hist\[n,k\] the number of vectors of the batch assigned to
    /// code k of codebook n and γ = `decay`, ε = `eps`:
    ///
    /// ```text
    /// c ← γ·c + (1−γ)·hist
    /// s = Σ_k c[n,k];   c[n,k] ← (c[n,k] + ε) · s / (s + K·ε)      (Laplace smoothing, keeps Σ = s)
    /// w ← γ·w + (1−γ)·Σ_{v→k} v
    /// E ← w / c                                                     (row-wise)
    /// ```
    ///
    /// The codebook is a buffer (never given to an optimizer). `decay = 1` means no update at
    /// all, exactly like [`CodebookUpdate::Frozen`] (the literal formula would still drift by
    /// ~1e-8 per step through the smoothing).
    Ema {
        /// γ ∈ \[0, 1\]: weight of the past (default 0.99; AQM uses 0.6).
        decay: f64,
        /// ε > 0 of the Laplace smoothing (default 1e-5).
        eps: f64,
    },
    /// The codebook is a trainable parameter moved by the caller's optimizer through the
    /// codebook loss `mean((q − sg(z_e))²)` (VQ-VAE, van den Oord et al. 2017). Assignment
    /// counts are still tracked, as an EMA with [`VectorQuantizerConfig::usage_decay`], for
    /// telemetry and dead-code revival.
    Gradient,
    /// No update at all: codebook and counts stay bit-identical across steps, and no dead
    /// code is revived.
    Frozen,
}

impl Default for CodebookUpdate {
    /// `Ema { decay: 0.99, eps: 1e-5 }`.
    fn default() -> Self {
        CodebookUpdate::Ema {
            decay: 0.99,
            eps: 1e-5,
        }
    }
}

impl CodebookUpdate {
    /// The name used in saved files: `ema`, `gradient` or `frozen`.
    pub fn name(&self) -> &'static str {
        match self {
            CodebookUpdate::Ema { .. } => "ema",
            CodebookUpdate::Gradient => "gradient",
            CodebookUpdate::Frozen => "frozen",
        }
    }

    /// Whether training leaves the codebook (and every other state) untouched: `Frozen`, or
    /// `Ema` with `decay = 1`.
    pub fn is_frozen(&self) -> bool {
        match self {
            CodebookUpdate::Frozen => true,
            CodebookUpdate::Ema { decay, .. } => *decay == 1.0,
            CodebookUpdate::Gradient => false,
        }
    }
}

/// The configuration of a [`VectorQuantizer`](crate::VectorQuantizer), in the style of faiss's
/// `ClusteringParameters`: every knob named, each with a default ([`VectorQuantizerConfig::new`]).
///
/// The input has `dim` = C channels on its [`channel_axis`](Self::channel_axis), split into
/// `codebooks` = N contiguous groups of D = C / N channels (channel `n·D + d` belongs to
/// codebook n); each group of each position is quantised to the nearest of the `codes` = K rows
/// of its own codebook.
///
/// ```
/// use qcl_vq::{CodebookUpdate, VectorQuantizerConfig};
/// let config = VectorQuantizerConfig {
///     update: CodebookUpdate::Ema { decay: 0.6, eps: 1e-5 },
///     commitment_weight: 2.0,
///     ..VectorQuantizerConfig::new(32, 16)
/// };
/// assert_eq!(config.code_dim(), 32);
/// assert!(config.validate().is_ok());
/// assert!(VectorQuantizerConfig { codebooks: 3, ..config }.validate().is_err()); // 32 % 3 ≠ 0
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VectorQuantizerConfig {
    /// N, the number of codebooks (default 1).
    pub codebooks: usize,
    /// K, codes per codebook, in `1..=65536` (default 512).
    pub codes: usize,
    /// C, the channels of the input; a multiple of `codebooks` (no default: see
    /// [`VectorQuantizerConfig::new`]).
    pub dim: usize,
    /// Which input axis holds the C channels (default [`ChannelAxis::Auto`]: axis 1 of
    /// `(B, C, H, W)`, the last axis of any other shape).
    pub channel_axis: ChannelAxis,
    /// How the codebook learns (default [`CodebookUpdate::Ema`] with decay 0.99, ε 1e-5).
    pub update: CodebookUpdate,
    /// β ≥ 0, the weight of the commitment loss `mean((z_e − sg(q))²)` in
    /// [`VqOutput::loss`](crate::VqOutput::loss) (default 0.25, VQ-VAE's; AQM uses 2).
    pub commitment_weight: f64,
    /// Replace the codebook, at the first training batch, by k-means centroids of that batch
    /// (qcl-pq [`KMeans`](qcl_pq::KMeans), greedy k-means++ seeding, then
    /// `kmeans_iterations` Lloyd iterations; when the batch has fewer than K vectors, the
    /// remaining codes copy batch vectors drawn at random) (default false).
    pub kmeans_init: bool,
    /// Lloyd iterations of the k-means initialisation (default 10).
    pub kmeans_iterations: usize,
    /// Dead-code revival: after each training update, every code whose running count
    /// c\[n,k\] (the EMA of its assignments per batch) is below this threshold gets a vector of
    /// the current batch, drawn at random without replacement, and the count `threshold`
    /// (default `None`: no revival, as AQM). In [`CodebookUpdate::Gradient`] mode the
    /// optimizer's moments of a revived row are left as they were.
    pub dead_code_threshold: Option<f64>,
    /// Decay of the usage EMA `c ← γ_u·c + (1−γ_u)·hist` tracked in
    /// [`CodebookUpdate::Gradient`] mode (default 0.99). Unused in the other modes.
    pub usage_decay: f64,
    /// Seed of the k-means initialisation and of dead-code revival (default 0). The initial
    /// codebook `U(−1/K, 1/K)` comes from the builder: a `ParamStore` (or its `var_builder`)
    /// draws it from its seed by name, a plain candle-nn `VarMap` from candle's generator.
    pub seed: Seed,
}

impl VectorQuantizerConfig {
    /// The defaults, for `dim` input channels and `codes` codes per codebook.
    pub fn new(dim: usize, codes: usize) -> Self {
        VectorQuantizerConfig {
            codebooks: 1,
            codes,
            dim,
            channel_axis: ChannelAxis::Auto,
            update: CodebookUpdate::default(),
            commitment_weight: 0.25,
            kmeans_init: false,
            kmeans_iterations: 10,
            dead_code_threshold: None,
            usage_decay: 0.99,
            seed: Seed::new(0),
        }
    }

    /// D = C / N, the dimension of one codebook's vectors.
    pub fn code_dim(&self) -> usize {
        self.dim.checked_div(self.codebooks).unwrap_or(0)
    }

    /// Bits per stored index, `⌈log2 K⌉` (0 for K = 1).
    pub fn index_bits(&self) -> u32 {
        bits_for(self.codes)
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the field: `codebooks`, `codes` or `dim` zero, `codes`
    /// above 65536, `dim` not a multiple of `codebooks`, a decay outside \[0, 1\], `eps ≤ 0`, a
    /// negative or non-finite `commitment_weight`, zero `kmeans_iterations` with `kmeans_init`,
    /// a dead-code threshold that is not finite and positive.
    pub fn validate(&self) -> Result<()> {
        if self.codebooks == 0 {
            return Err(Error::invalid_parameter("codebooks", "must be at least 1"));
        }
        if self.codes == 0 || self.codes > MAX_CODES {
            return Err(Error::invalid_parameter(
                "codes",
                format!("must be in 1..={MAX_CODES}, got {}", self.codes),
            ));
        }
        if self.dim == 0 {
            return Err(Error::invalid_parameter("dim", "must be at least 1"));
        }
        if !self.dim.is_multiple_of(self.codebooks) {
            return Err(Error::invalid_parameter(
                "dim",
                format!(
                    "{} channels cannot be split into {} codebooks of equal size",
                    self.dim, self.codebooks
                ),
            ));
        }
        if let CodebookUpdate::Ema { decay, eps } = self.update {
            check_unit("decay", decay)?;
            if !(eps.is_finite() && eps > 0.0) {
                return Err(Error::invalid_parameter(
                    "eps",
                    format!("must be finite and > 0, got {eps}"),
                ));
            }
        }
        check_unit("usage_decay", self.usage_decay)?;
        if !(self.commitment_weight.is_finite() && self.commitment_weight >= 0.0) {
            return Err(Error::invalid_parameter(
                "commitment_weight",
                format!("must be finite and >= 0, got {}", self.commitment_weight),
            ));
        }
        if self.kmeans_init && self.kmeans_iterations == 0 {
            return Err(Error::invalid_parameter(
                "kmeans_iterations",
                "must be at least 1 when kmeans_init is on",
            ));
        }
        if let Some(t) = self.dead_code_threshold {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::invalid_parameter(
                    "dead_code_threshold",
                    format!("must be finite and > 0, got {t}"),
                ));
            }
        }
        Ok(())
    }

    /// The configuration as string metadata of a saved file (floats in Rust's shortest
    /// round-trip form, so they read back bit for bit).
    pub(crate) fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        let mut put = |k: &str, v: String| meta.insert(k.to_string(), v);
        put("codebooks", self.codebooks.to_string());
        put("codes", self.codes.to_string());
        put("dim", self.dim.to_string());
        put("channel_axis", self.channel_axis.name().to_string());
        put("update", self.update.name().to_string());
        if let CodebookUpdate::Ema { decay, eps } = self.update {
            put("decay", format!("{decay:?}"));
            put("eps", format!("{eps:?}"));
        }
        put("commitment_weight", format!("{:?}", self.commitment_weight));
        put("kmeans_init", self.kmeans_init.to_string());
        put("kmeans_iterations", self.kmeans_iterations.to_string());
        put(
            "dead_code_threshold",
            self.dead_code_threshold
                .map_or_else(|| "none".to_string(), |t| format!("{t:?}")),
        );
        put("usage_decay", format!("{:?}", self.usage_decay));
        put("seed", self.seed.value().to_string());
        meta
    }

    /// Reads [`to_metadata`](Self::to_metadata)'s output back and validates it.
    pub(crate) fn from_metadata(meta: &BTreeMap<String, String>, path: &Path) -> Result<Self> {
        fn get<T: std::str::FromStr>(
            meta: &BTreeMap<String, String>,
            path: &Path,
            key: &str,
        ) -> Result<T> {
            meta.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("metadata `{key}` is missing or not a valid value"),
                )
            })
        }
        let update = match meta.get("update").map(String::as_str) {
            Some("ema") => CodebookUpdate::Ema {
                decay: get(meta, path, "decay")?,
                eps: get(meta, path, "eps")?,
            },
            Some("gradient") => CodebookUpdate::Gradient,
            Some("frozen") => CodebookUpdate::Frozen,
            other => {
                return Err(Error::bad_file(
                    path,
                    format!("metadata `update` is {other:?}, not ema, gradient or frozen"),
                ))
            }
        };
        // Files written before the knob existed hold the default.
        let channel_axis = match meta.get("channel_axis").map(String::as_str) {
            None | Some("auto") => ChannelAxis::Auto,
            Some("channels_first") => ChannelAxis::ChannelsFirst,
            Some("channels_last") => ChannelAxis::ChannelsLast,
            Some(other) => {
                return Err(Error::bad_file(
                    path,
                    format!("metadata `channel_axis` is `{other}`, not auto, channels_first or channels_last"),
                ))
            }
        };
        let dead_code_threshold = match meta.get("dead_code_threshold").map(String::as_str) {
            Some("none") => None,
            _ => Some(get(meta, path, "dead_code_threshold")?),
        };
        let config = VectorQuantizerConfig {
            codebooks: get(meta, path, "codebooks")?,
            codes: get(meta, path, "codes")?,
            dim: get(meta, path, "dim")?,
            channel_axis,
            update,
            commitment_weight: get(meta, path, "commitment_weight")?,
            kmeans_init: get(meta, path, "kmeans_init")?,
            kmeans_iterations: get(meta, path, "kmeans_iterations")?,
            dead_code_threshold,
            usage_decay: get(meta, path, "usage_decay")?,
            seed: Seed::new(get(meta, path, "seed")?),
        };
        config
            .validate()
            .map_err(|e| Error::bad_file(path, format!("invalid configuration: {e}")))?;
        Ok(config)
    }
}

fn check_unit(name: &str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid_parameter(
            name,
            format!("must be in [0, 1], got {value}"),
        ))
    }
}

/// `⌈log2 codes⌉`: the bits an index into `codes` codes needs (0 for a single code, which
/// needs no index stored).
///
/// ```
/// assert_eq!((qcl_vq::bits_for(1), qcl_vq::bits_for(2), qcl_vq::bits_for(16), qcl_vq::bits_for(17)), (0, 1, 4, 5));
/// ```
pub fn bits_for(codes: usize) -> u32 {
    match codes {
        0 | 1 => 0,
        k => qcl_pq::index_bits(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_the_ceiling_of_log2() {
        let cases = [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5)];
        for (k, bits) in cases {
            assert_eq!(bits_for(k), bits, "K = {k}");
        }
        assert_eq!(bits_for(MAX_CODES), 16);
        assert_eq!(bits_for(MAX_CODES - 1), 16);
    }

    #[test]
    fn metadata_round_trips_every_field() {
        let config = VectorQuantizerConfig {
            codebooks: 2,
            channel_axis: ChannelAxis::ChannelsLast,
            update: CodebookUpdate::Ema {
                decay: 0.6,
                eps: 1.0 / 3.0,
            },
            commitment_weight: 0.1 + 0.2,
            kmeans_init: true,
            kmeans_iterations: 3,
            dead_code_threshold: Some(0.7),
            usage_decay: 0.95,
            seed: Seed::new(u64::MAX),
            ..VectorQuantizerConfig::new(8, 300)
        };
        let back =
            VectorQuantizerConfig::from_metadata(&config.to_metadata(), Path::new("x")).unwrap();
        assert_eq!(back, config);
        for update in [CodebookUpdate::Gradient, CodebookUpdate::Frozen] {
            let c = VectorQuantizerConfig {
                update,
                ..config.clone()
            };
            let back =
                VectorQuantizerConfig::from_metadata(&c.to_metadata(), Path::new("x")).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        let base = VectorQuantizerConfig::new(8, 4);
        let cases: Vec<(VectorQuantizerConfig, &str)> = vec![
            (
                VectorQuantizerConfig {
                    codes: 0,
                    ..base.clone()
                },
                "codes",
            ),
            (
                VectorQuantizerConfig {
                    codes: MAX_CODES + 1,
                    ..base.clone()
                },
                "codes",
            ),
            (
                VectorQuantizerConfig {
                    codebooks: 0,
                    ..base.clone()
                },
                "codebooks",
            ),
            (
                VectorQuantizerConfig {
                    codebooks: 3,
                    ..base.clone()
                },
                "dim",
            ),
            (
                VectorQuantizerConfig {
                    dim: 0,
                    ..base.clone()
                },
                "dim",
            ),
            (
                VectorQuantizerConfig {
                    update: CodebookUpdate::Ema {
                        decay: 1.5,
                        eps: 1e-5,
                    },
                    ..base.clone()
                },
                "decay",
            ),
            (
                VectorQuantizerConfig {
                    update: CodebookUpdate::Ema {
                        decay: -0.1,
                        eps: 1e-5,
                    },
                    ..base.clone()
                },
                "decay",
            ),
            (
                VectorQuantizerConfig {
                    update: CodebookUpdate::Ema {
                        decay: f64::NAN,
                        eps: 1e-5,
                    },
                    ..base.clone()
                },
                "decay",
            ),
            (
                VectorQuantizerConfig {
                    update: CodebookUpdate::Ema {
                        decay: 0.9,
                        eps: 0.0,
                    },
                    ..base.clone()
                },
                "eps",
            ),
            (
                VectorQuantizerConfig {
                    update: CodebookUpdate::Ema {
                        decay: 0.9,
                        eps: -1.0,
                    },
                    ..base.clone()
                },
                "eps",
            ),
            (
                VectorQuantizerConfig {
                    commitment_weight: -1.0,
                    ..base.clone()
                },
                "commitment_weight",
            ),
            (
                VectorQuantizerConfig {
                    dead_code_threshold: Some(0.0),
                    ..base.clone()
                },
                "dead_code_threshold",
            ),
            (
                VectorQuantizerConfig {
                    usage_decay: 2.0,
                    ..base.clone()
                },
                "usage_decay",
            ),
            (
                VectorQuantizerConfig {
                    kmeans_init: true,
                    kmeans_iterations: 0,
                    ..base.clone()
                },
                "kmeans_iterations",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, field, "{config:?}"),
                other => panic!("{config:?}: expected an invalid `{field}`, got {other:?}"),
            }
        }
        assert!(base.validate().is_ok());
    }
}
