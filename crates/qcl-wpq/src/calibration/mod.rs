//! Calibration statistics recorded from the user's own forward pass.
//!
//! A layer `y = x·Wᵀ` with inputs `X` (one row per token or image patch) has the output error
//! `‖X(W − Ŵ)ᵀ‖² = Σ_o (w_o − ŵ_o)ᵀ H (w_o − ŵ_o)` with `H = XᵀX`: the second moment of its
//! inputs is all weight compression needs to know about them. [`Calibration`] accumulates `H`
//! (f64) and the row count per weight name; for an embedding table it counts token ids instead,
//! because the output error of a lookup is `Σ_token count · ‖w_token − ŵ_token‖²`.
//!
//! Beside `H` it keeps a uniform sample of the recorded rows themselves (bottom-k by a hash of
//! the row's position, so the sample does not depend on how the rows were batched): `H` weighs
//! every token by its squared size and a few massive-activation tokens can dominate it, while
//! the sample lets the codebook fine-tune check its result token by token on rows it did not
//! fit (see [`crate::FinetuneGuard`]).

mod file;

pub use file::CALIBRATION_FORMAT;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Tensor};
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

/// How a convolution reads its input (no groups, no dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvInput {
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
}

/// Recorded inputs of a linear layer or convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct InputStats {
    /// Input width `D` (features; `c_in·kh·kw` for a convolution).
    pub width: usize,
    /// `H = Σ xᵀx`, `[D, D]` row-major, over every recorded row; a convolution's rows are its
    /// im2col patches in natural `(c_in, kh, kw)` order.
    pub gram: Vec<f64>,
    /// Rows recorded.
    pub rows: u64,
    /// The convolution's geometry, `None` for a linear layer.
    pub conv: Option<ConvInput>,
    /// A uniform sample of the recorded rows, `[n, D]` row-major (`n` at most the recorder's
    /// [`Calibration::sample_rows`]; empty when none were kept).
    pub sample: Vec<f32>,
}

impl InputStats {
    /// Rows in [`InputStats::sample`].
    pub fn sample_len(&self) -> usize {
        self.sample.len().checked_div(self.width).unwrap_or(0)
    }
}

/// Recorded token ids of an embedding table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenStats {
    /// Occurrences of every id seen.
    pub counts: BTreeMap<u32, u64>,
    /// Ids recorded.
    pub rows: u64,
}

/// What was recorded for one weight.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerStats {
    /// Inputs of a linear layer or convolution.
    Inputs(InputStats),
    /// Token ids of an embedding table.
    Tokens(TokenStats),
}

impl LayerStats {
    /// Rows (or ids) recorded.
    pub fn rows(&self) -> u64 {
        match self {
            LayerStats::Inputs(s) => s.rows,
            LayerStats::Tokens(s) => s.rows,
        }
    }
}

/// A thread-safe recorder of layer inputs, keyed by weight name; its `&self` methods can be
/// called from an `Fn` closure inside a forward pass.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_wpq::{Calibration, LayerStats};
/// let calib = Calibration::new();
/// let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let tap = |name: &str, x: &Tensor| calib.record(name, x);
/// tap("fc.weight", &x)?;
/// tap("fc.weight", &x.narrow(0, 0, 1)?)?;
/// let ids = Tensor::new(&[[5u32, 7, 5]], &Device::Cpu)?;
/// calib.record("embeddings.weight", &ids)?;
/// match calib.stats("fc.weight").unwrap() {
///     // Σ xᵀx over the rows (1, 2), (3, 4), (1, 2).
///     LayerStats::Inputs(s) => assert_eq!((s.gram, s.rows), (vec![11.0, 16.0, 16.0, 24.0], 3)),
///     other => panic!("{other:?}"),
/// }
/// match calib.stats("embeddings.weight").unwrap() {
///     LayerStats::Tokens(t) => assert_eq!(t.counts[&5], 2),
///     other => panic!("{other:?}"),
/// }
/// // A recording of another width is refused.
/// assert!(calib.record("fc.weight", &Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu)?).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug)]
pub struct Calibration {
    state: Mutex<State>,
    sample_rows: usize,
    only: Option<BTreeSet<String>>,
}

/// Rows of each layer's input kept by default ([`Calibration::sample_rows`]).
pub const DEFAULT_SAMPLE_ROWS: usize = 1024;

#[derive(Debug, Default)]
struct State {
    layers: BTreeMap<String, LayerStats>,
    /// Sample keys of every layer with float inputs, ascending, one per sampled row.
    keys: BTreeMap<String, Vec<u64>>,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            state: Mutex::new(State::default()),
            sample_rows: DEFAULT_SAMPLE_ROWS,
            only: None,
        }
    }
}

impl Calibration {
    /// An empty recorder keeping [`DEFAULT_SAMPLE_ROWS`] rows of each layer's input.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same recorder keeping up to `rows` sampled rows per layer (0: none).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_wpq::{Calibration, LayerStats};
    /// let calib = Calibration::new().with_sample_rows(2);
    /// calib.record("fc.weight", &Tensor::randn(0f32, 1.0, (5, 3), &Device::Cpu)?)?;
    /// let Some(LayerStats::Inputs(s)) = calib.stats("fc.weight") else { unreachable!() };
    /// assert_eq!((s.rows, s.sample_len()), (5, 2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_sample_rows(mut self, rows: usize) -> Self {
        self.sample_rows = rows;
        self
    }

    /// A recorder that keeps only the weights in `names` and ignores every other recording,
    /// so that a forward pass that taps every layer costs nothing for the others.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_wpq::Calibration;
    /// let calib = Calibration::new().restricted_to(["b.weight"]);
    /// let x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?;
    /// calib.record("a.weight", &x)?;
    /// calib.record("b.weight", &x)?;
    /// assert_eq!(calib.names(), ["b.weight"]);
    /// assert!(!calib.wants("a.weight"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn restricted_to<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Rows of each layer's input kept in [`InputStats::sample`].
    pub fn sample_rows(&self) -> usize {
        self.sample_rows
    }

    /// Whether recordings of `name` are kept (see [`Calibration::restricted_to`]).
    pub fn wants(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(name))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another recording thread leaves the map consistent (entries are replaced
        // whole), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the input `x` of the weight `name`: a float tensor whose last dimension is the
    /// layer's input width (every other dimension counts rows; pass only real, non-padding
    /// rows) adds `xᵀx` to `H`; an integer tensor (u8, u32, i64) of token ids adds to the
    /// counts of an embedding table.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a width other than the earlier recordings' (or a
    /// zero-dimensional tensor), [`Error::NonFinite`] for NaN or infinity,
    /// [`Error::InvalidParameter`] for a negative id, or ids recorded for a weight that had
    /// float inputs (and the reverse).
    pub fn record(&self, name: &str, x: &Tensor) -> Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        match x.dtype() {
            DType::U8 | DType::U32 | DType::I64 | DType::I32 | DType::I16 => {
                self.record_ids(name, x)
            }
            _ => {
                let width = *x.dims().last().ok_or_else(|| Error::ShapeMismatch {
                    context: format!("calibration input of `{name}`"),
                    expected: "[.., width]".into(),
                    actual: vec![],
                })?;
                let rows = x.elem_count().checked_div(width).unwrap_or(0);
                let x = x.to_dtype(DType::F64)?.reshape((rows, width))?;
                self.add_gram(name, &x, None)
            }
        }
    }

    /// Records the NCHW input `x` of the convolution whose weight is `name`, as its im2col
    /// patches (natural `(c_in, kh, kw)` order), so that `H` is the second moment of the rows
    /// the convolution multiplies its weight with.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use qcl_wpq::{Calibration, ConvInput, LayerStats};
    /// let calib = Calibration::new();
    /// let x = Tensor::ones((2, 3, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
    /// calib.record_conv("conv.weight", &x, ConvInput { kh: 3, kw: 3, padding: 1, stride: 1 })?;
    /// let LayerStats::Inputs(s) = calib.stats("conv.weight").unwrap() else { unreachable!() };
    /// assert_eq!((s.width, s.rows), (27, 2 * 16));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Calibration::record`]; [`Error::ShapeMismatch`] for an input that is not 4-D or
    /// smaller than the kernel, [`Error::InvalidParameter`] for a zero kernel or stride, or a
    /// geometry other than the earlier recordings'.
    pub fn record_conv(&self, name: &str, x: &Tensor, conv: ConvInput) -> Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        let patches = im2col(x, conv).map_err(|e| named(name, e))?;
        self.add_gram(name, &patches, Some(conv))
    }

    fn add_gram(&self, name: &str, x: &Tensor, conv: Option<ConvInput>) -> Result<()> {
        let (rows, width) = x.dims2()?;
        if width == 0 {
            return Err(Error::ShapeMismatch {
                context: format!("calibration input of `{name}`"),
                expected: "[.., width > 0]".into(),
                actual: vec![rows, width],
            });
        }
        let values: Vec<f64> = x.flatten_all()?.to_vec1()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                context: format!("calibration input of `{name}`"),
                index: i,
                value: values[i],
            });
        }
        // xᵀx outside the lock; the f64 GEMM splits no sum across threads, so the result does
        // not depend on the thread count.
        let gram: Vec<f64> = if rows == 0 {
            vec![0.0; width * width]
        } else {
            x.t()?.matmul(x)?.flatten_all()?.to_vec1()?
        };
        let mut state = self.lock();
        let State { layers, keys } = &mut *state;
        match layers.get_mut(name) {
            None => {
                let mut s = InputStats {
                    width,
                    gram,
                    rows: 0,
                    conv,
                    sample: Vec::new(),
                };
                let kept = keys.entry(name.to_string()).or_default();
                self.add_sample(name, &mut s, kept, &values, rows);
                s.rows = rows as u64;
                layers.insert(name.to_string(), LayerStats::Inputs(s));
            }
            Some(LayerStats::Inputs(s)) => {
                if s.width != width {
                    return Err(Error::ShapeMismatch {
                        context: format!("calibration input of `{name}`"),
                        expected: format!("[.., {}] as recorded before", s.width),
                        actual: vec![rows, width],
                    });
                }
                if s.conv != conv {
                    return Err(Error::invalid_parameter(
                        "calibration",
                        format!(
                            "`{name}` was recorded with convolution geometry {:?}, now {conv:?}",
                            s.conv
                        ),
                    ));
                }
                s.gram.iter_mut().zip(&gram).for_each(|(a, b)| *a += b);
                let kept = keys.entry(name.to_string()).or_default();
                self.add_sample(name, s, kept, &values, rows);
                s.rows += rows as u64;
            }
            Some(LayerStats::Tokens(_)) => {
                return Err(Error::invalid_parameter(
                    "calibration",
                    format!("`{name}` was recorded with token ids before, now with floats"),
                ))
            }
        }
        Ok(())
    }

    /// Adds the rows `values` (`[rows, width]`, numbered from `s.rows` on) to the bottom-k
    /// sample: each row's key is a hash of the weight name and its position, and the rows of
    /// the `sample_rows` smallest keys are kept, in key order.
    fn add_sample(
        &self,
        name: &str,
        s: &mut InputStats,
        kept: &mut Vec<u64>,
        values: &[f64],
        rows: usize,
    ) {
        let cap = self.sample_rows;
        let width = s.width;
        let salt = name_hash(name);
        let threshold = match kept.last() {
            Some(&last) if kept.len() >= cap => last,
            _ => u64::MAX,
        };
        let mut fresh: Vec<(u64, usize)> = (0..rows)
            .map(|r| (row_key(salt, s.rows + r as u64), r))
            .filter(|&(k, _)| k < threshold)
            .collect();
        if cap == 0 || fresh.is_empty() {
            return;
        }
        if fresh.len() > cap {
            fresh.select_nth_unstable(cap - 1);
            fresh.truncate(cap);
        }
        let mut entries: Vec<(u64, Vec<f32>)> = kept
            .iter()
            .zip(s.sample.chunks_exact(width))
            .map(|(&k, r)| (k, r.to_vec()))
            .collect();
        let before = entries.len();
        for (key, r) in fresh {
            let row = &values[r * width..(r + 1) * width];
            entries.push((key, row.iter().map(|&v| v as f32).collect()));
        }
        if entries.len() == before {
            return;
        }
        entries.sort_by_key(|(k, _)| *k);
        entries.truncate(cap);
        *kept = entries.iter().map(|(k, _)| *k).collect();
        s.sample = entries.into_iter().flat_map(|(_, r)| r).collect();
    }

    fn record_ids(&self, name: &str, ids: &Tensor) -> Result<()> {
        let ids: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        let mut counts = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| {
                Error::invalid_parameter(
                    "calibration",
                    format!("token id {id} at {i} recorded for `{name}` is not a valid row"),
                )
            })?;
            *counts.entry(id).or_insert(0u64) += 1;
        }
        let mut state = self.lock();
        let entry = state
            .layers
            .entry(name.to_string())
            .or_insert_with(|| LayerStats::Tokens(TokenStats::default()));
        match entry {
            LayerStats::Tokens(t) => {
                for (id, n) in counts {
                    *t.counts.entry(id).or_insert(0) += n;
                }
                t.rows += ids.len() as u64;
                Ok(())
            }
            LayerStats::Inputs(_) => Err(Error::invalid_parameter(
                "calibration",
                format!("`{name}` was recorded with float inputs before, now with token ids"),
            )),
        }
    }

    /// A copy of what was recorded for `name`.
    pub fn stats(&self, name: &str) -> Option<LayerStats> {
        self.lock().layers.get(name).cloned()
    }

    /// The recorded weight names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().layers.keys().cloned().collect()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().layers.is_empty()
    }

    /// Adds statistics computed elsewhere, replacing any for `name` (rows recorded for `name`
    /// afterwards fill its sample up without displacing the inserted rows).
    pub fn insert(&self, name: &str, stats: LayerStats) {
        let mut state = self.lock();
        // The inserted sample's rows get the smallest keys: they stay in the sample.
        let keys = match &stats {
            LayerStats::Inputs(s) => (0..s.sample_len() as u64).collect(),
            LayerStats::Tokens(_) => Vec::new(),
        };
        state.keys.insert(name.to_string(), keys);
        state.layers.insert(name.to_string(), stats);
    }

    fn keys(&self, name: &str) -> Vec<u64> {
        self.lock().keys.get(name).cloned().unwrap_or_default()
    }

    fn insert_with_keys(&self, name: &str, stats: LayerStats, keys: Vec<u64>) {
        let mut state = self.lock();
        state.keys.insert(name.to_string(), keys);
        state.layers.insert(name.to_string(), stats);
    }
}

/// FNV-1a of a weight name (the salt of its rows' sample keys).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sample key of row `row` of the weight whose name hashes to `salt`.
fn row_key(salt: u64, row: u64) -> u64 {
    mix(salt ^ mix(row.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Prefixes an error's message with the weight it concerns.
pub(crate) fn named(name: &str, err: Error) -> Error {
    match err {
        Error::InvalidParameter { name: p, reason } => Error::InvalidParameter {
            name: p,
            reason: format!("tensor `{name}`: {reason}"),
        },
        Error::ShapeMismatch {
            context,
            expected,
            actual,
        } => Error::ShapeMismatch {
            context: format!("{context} of `{name}`"),
            expected,
            actual,
        },
        Error::NonFinite {
            context,
            index,
            value,
        } => Error::NonFinite {
            context: format!("{context} of `{name}`"),
            index,
            value,
        },
        Error::EmptyInput(what) => Error::EmptyInput(format!("tensor `{name}`: {what}")),
        Error::CorruptStream { context, reason } => Error::CorruptStream {
            context: format!("{context} of `{name}`"),
            reason,
        },
        other => other,
    }
}

/// The im2col patches `[N·H_out·W_out, C·kh·kw]` (f64) of an NCHW input, natural order.
fn im2col(x: &Tensor, conv: ConvInput) -> Result<Tensor> {
    let ConvInput {
        kh,
        kw,
        padding,
        stride,
    } = conv;
    if kh == 0 || kw == 0 || stride == 0 {
        return Err(Error::invalid_parameter(
            "conv",
            format!("kernel {kh}×{kw} and stride {stride} must be positive"),
        ));
    }
    let (n, c, h, w) = x.dims4().map_err(|_| Error::ShapeMismatch {
        context: "convolution input".into(),
        expected: "[N, C, H, W]".into(),
        actual: x.dims().to_vec(),
    })?;
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    if hp < kh || wp < kw {
        return Err(Error::ShapeMismatch {
            context: "convolution input".into(),
            expected: format!("spatial size at least {kh}×{kw} after padding"),
            actual: x.dims().to_vec(),
        });
    }
    let (h_out, w_out) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
    let data: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let width = c * kh * kw;
    let mut out = vec![0f64; n * h_out * w_out * width];
    for (r, patch) in out.chunks_exact_mut(width).enumerate() {
        let (i, pos) = (r / (h_out * w_out), r % (h_out * w_out));
        let (oy, ox) = (pos / w_out * stride, pos % w_out * stride);
        for ch in 0..c {
            let plane = &data[(i * c + ch) * h * w..(i * c + ch + 1) * h * w];
            for y in 0..kh {
                let Some(iy) = (oy + y).checked_sub(padding).filter(|&v| v < h) else {
                    continue;
                };
                for xx in 0..kw {
                    let Some(ix) = (ox + xx).checked_sub(padding).filter(|&v| v < w) else {
                        continue;
                    };
                    patch[(ch * kh + y) * kw + xx] = plane[iy * w + ix];
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (n * h_out * w_out, width),
        &candle_core::Device::Cpu,
    )?)
}
