//! The trained entropy-constrained quantizer both methods produce, and its evaluation.
//!
//! (Over 600 lines: the trained `Ecvq` with its encoder, entropy coding and save/load, and the
//! evaluation and cell map computed from it, are one unit that both methods share; about 120
//! lines are doc comments.)

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{
    nearest_codes_into, squared_distance, write_safetensors, Error, Result, SafetensorsFile, Seed,
    TensorSpec,
};

use crate::entropy::{self, FrequencyTable, DEFAULT_PRECISION_BITS};
use crate::Source;

/// Metadata `format` value of a saved [`Ecvq`].
pub const ECVQ_FORMAT: &str = "qcl-ecvq/1";

/// Samples per chunk when evaluating (bounds memory; the sample stream does not depend on it).
const EVAL_CHUNK: usize = 65_536;

/// How the distortion `d(x, c)` is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distortion {
    /// Squared error summed over the `d` dimensions (the default; TF's choice for Laplace and
    /// banana, and the unit every λ in qcl's experiments assumes).
    #[default]
    Sse,
    /// Squared error averaged over the dimensions (`sse / d`): λ then means `d` times less.
    Mse,
}

impl Distortion {
    /// The factor turning a summed squared error into this distortion: 1 or `1/d`.
    pub fn scale(self, dim: usize) -> f64 {
        match self {
            Distortion::Sse => 1.0,
            Distortion::Mse => 1.0 / dim as f64,
        }
    }

    /// `sse` or `mse`.
    pub fn name(self) -> &'static str {
        match self {
            Distortion::Sse => "sse",
            Distortion::Mse => "mse",
        }
    }
}

impl fmt::Display for Distortion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Distortion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sse" => Ok(Distortion::Sse),
            "mse" => Ok(Distortion::Mse),
            _ => Err(Error::invalid_parameter(
                "distortion",
                format!("unknown distortion `{s}`; expected sse or mse"),
            )),
        }
    }
}

/// Checks a Lagrange multiplier.
pub(crate) fn check_lambda(lambda: f64) -> Result<()> {
    if lambda.is_finite() && lambda > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid_parameter(
            "lambda",
            format!("must be finite and > 0, got {lambda}"),
        ))
    }
}

/// An entropy-constrained vector quantizer: `K` codes `c_k ∈ R^d`, their code lengths
/// `r_k = −log₂ p_k` (bits) and the multiplier λ of the distortion.
///
/// The encoder is **not** nearest-neighbour: it picks
///
/// ```text
/// k*(x) = argmin_k  r_k + λ·d(x, c_k)   =   argmin_k  ‖x − c_k‖² + r_k / (λ·s)
/// ```
///
/// (`s` = 1 for [`Distortion::Sse`], `1/d` for [`Distortion::Mse`]), evaluated in `f32` as
/// qcl-tensor's nearest-code kernel with the bias `r_k/(λ·s)`, ties to the lowest index. Its
/// cells are a power (Laguerre) diagram. The decoder maps `k` back to `c_k`; indices are
/// entropy coded with the integer [`FrequencyTable`] made from `p` at construction.
///
/// ```
/// use qcl_ecvq::{Distortion, Ecvq};
/// // Two codes; the second is 7 bits more expensive, so it only wins far from the first.
/// let q = Ecvq::new(1, vec![0.0, 1.0], vec![0.01, 7.0], 4.0, Distortion::Sse)?;
/// assert_eq!(q.encode(&[0.9, 3.0])?, vec![0, 1]);
/// assert_eq!(q.decode(&[1, 0])?, vec![1.0, 0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Ecvq {
    dim: usize,
    lambda: f64,
    distortion: Distortion,
    codebook: Vec<f32>,
    rates_bits: Vec<f64>,
    table: FrequencyTable,
}

impl Ecvq {
    /// A quantizer from a codebook (row-major `[K, dim]`) and per-code lengths in bits.
    ///
    /// The entropy coder's table is made from `p_k = 2^(−r_k)` at
    /// [`DEFAULT_PRECISION_BITS`].
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `dim = 0`, a λ that is not finite and positive, or
    /// lengths that are negative (or make a probability underflow to zero);
    /// [`Error::ShapeMismatch`] when the sizes disagree; [`Error::EmptyInput`] without codes;
    /// [`Error::NonFinite`] for a NaN or infinity.
    pub fn new(
        dim: usize,
        codebook: Vec<f32>,
        rates_bits: Vec<f64>,
        lambda: f64,
        distortion: Distortion,
    ) -> Result<Self> {
        Self::with_table(
            dim,
            codebook,
            rates_bits,
            lambda,
            distortion,
            |probabilities| {
                FrequencyTable::from_probabilities(probabilities, DEFAULT_PRECISION_BITS)
            },
        )
    }

    /// A quantizer from a codebook and lengths that pass [`check_codebook`], with the entropy
    /// coder's table that `table` makes from their probabilities `2^(−r_k)`.
    fn with_table(
        dim: usize,
        codebook: Vec<f32>,
        rates_bits: Vec<f64>,
        lambda: f64,
        distortion: Distortion,
        table: impl FnOnce(&[f64]) -> Result<FrequencyTable>,
    ) -> Result<Self> {
        let probabilities = check_codebook(dim, &codebook, &rates_bits, lambda)?;
        let table = table(&probabilities)?;
        Ok(Ecvq {
            dim,
            lambda,
            distortion,
            codebook,
            rates_bits,
            table,
        })
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of codes `K`.
    pub fn len(&self) -> usize {
        self.rates_bits.len()
    }

    /// Always false: a quantizer has at least one code.
    pub fn is_empty(&self) -> bool {
        self.rates_bits.is_empty()
    }

    /// The multiplier λ of the distortion.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// How distortion is measured.
    pub fn distortion(&self) -> Distortion {
        self.distortion
    }

    /// The codes, row-major `[K, dim]`.
    pub fn codebook(&self) -> &[f32] {
        &self.codebook
    }

    /// Code lengths `r_k = −log₂ p_k` in bits.
    pub fn rates_bits(&self) -> &[f64] {
        &self.rates_bits
    }

    /// The prior `p_k = 2^(−r_k)`.
    pub fn probabilities(&self) -> Vec<f64> {
        self.rates_bits.iter().map(|r| (-r).exp2()).collect()
    }

    /// The integer table the entropy coder uses.
    pub fn frequency_table(&self) -> &FrequencyTable {
        &self.table
    }

    /// The encoder's per-code bias `r_k / (λ·s)`, added to the squared distance.
    pub fn encoder_bias(&self) -> Vec<f32> {
        let scale = self.lambda * self.distortion.scale(self.dim);
        self.rates_bits.iter().map(|r| (r / scale) as f32).collect()
    }

    /// The index `k*(x)` of every point (row-major `[n, dim]`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a slice that is not whole rows; [`Error::NonFinite`].
    pub fn encode(&self, points: &[f32]) -> Result<Vec<u32>> {
        let n = points.len() / self.dim;
        let mut indices = vec![0u32; n];
        let mut scores = vec![0f32; n];
        nearest_codes_into(
            points,
            &self.codebook,
            self.dim,
            Some(&self.encoder_bias()),
            &mut indices,
            &mut scores,
        )?;
        Ok(indices)
    }

    /// The codes of `indices`, row-major `[n, dim]`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an index `≥ K`.
    pub fn decode(&self, indices: &[u32]) -> Result<Vec<f32>> {
        qcl_pq::rows_of(&self.codebook, self.dim, indices)
    }

    /// Entropy codes indices with this quantizer's table.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an index `≥ K`.
    pub fn compress(&self, indices: &[u32]) -> Result<entropy::RansStream> {
        entropy::encode(indices, &self.table)
    }

    /// Decodes a stream written by [`compress`](Ecvq::compress).
    ///
    /// # Errors
    /// [`Error::CorruptStream`] for a damaged stream or one coded with another table.
    pub fn decompress(&self, stream: &entropy::RansStream) -> Result<Vec<u32>> {
        entropy::decode(stream, &self.table)
    }

    /// Measures the quantizer on `points` (row-major `[n, dim]`); `bound` maps a rate to the
    /// reference distortion the gap is measured against (e.g.
    /// [`Source::distortion_bound`]).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no points, and the errors of [`encode`](Ecvq::encode).
    pub fn evaluate_points(
        &self,
        points: &[f32],
        bound: Option<&dyn Fn(f64) -> f64>,
    ) -> Result<Evaluation> {
        let mut acc = EvalAccumulator::new(self.len());
        acc.add(self, points)?;
        acc.finish(self, bound)
    }

    /// Measures the quantizer on `samples` fresh draws of `source` from `seed` (drawn and
    /// coded in chunks, so memory stays bounded apart from the index stream), against the
    /// source's [`distortion_bound`](Source::distortion_bound).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for zero samples; [`Error::ShapeMismatch`] when the source's
    /// dimension differs from the quantizer's.
    pub fn evaluate(&self, source: Source, samples: usize, seed: Seed) -> Result<Evaluation> {
        if source.dim() != self.dim {
            return Err(Error::ShapeMismatch {
                context: format!("source {source}"),
                expected: format!("vectors of dimension {}", self.dim),
                actual: vec![source.dim()],
            });
        }
        let mut rng = seed.rng();
        let mut acc = EvalAccumulator::new(self.len());
        let mut buffer = vec![0f32; EVAL_CHUNK.min(samples) * self.dim];
        let mut left = samples;
        while left > 0 {
            let n = left.min(EVAL_CHUNK);
            let chunk = &mut buffer[..n * self.dim];
            source.sample_into(chunk, &mut rng);
            acc.add(self, chunk)?;
            left -= n;
        }
        acc.finish(self, Some(&|r| source.distortion_bound(r)))
    }

    /// The index map on a `width × height` grid over `window` (pixel centres; row 0 at the
    /// top, i.e. at the largest `y`) and the source's log-density there, for cell pictures.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a quantizer or source that is not 2-D or an empty grid.
    pub fn cell_map(
        &self,
        source: Source,
        window: [(f64, f64); 2],
        width: usize,
        height: usize,
    ) -> Result<CellMap> {
        if self.dim != 2 || source.dim() != 2 {
            return Err(Error::invalid_parameter(
                "cell_map",
                "cell pictures are drawn for 2-D quantizers and sources only",
            ));
        }
        if width == 0 || height == 0 {
            return Err(Error::invalid_parameter("cell_map", "the grid is empty"));
        }
        let [(x0, x1), (y0, y1)] = window;
        let mut points = Vec::with_capacity(width * height * 2);
        let mut log_density = Vec::with_capacity(width * height);
        for row in 0..height {
            let y = y1 - (row as f64 + 0.5) * (y1 - y0) / height as f64;
            for col in 0..width {
                let x = x0 + (col as f64 + 0.5) * (x1 - x0) / width as f64;
                points.extend_from_slice(&[x as f32, y as f32]);
                log_density.push(source.log_density(&[x, y]));
            }
        }
        let indices = self.encode(&points)?;
        Ok(CellMap {
            width,
            height,
            window,
            indices,
            log_density,
        })
    }

    /// Saves codebook, lengths and the integer frequency table as safetensors (format
    /// [`ECVQ_FORMAT`]), atomically. Loading uses the stored table, so streams decode
    /// bit-exactly wherever the file is loaded.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let k = self.len();
        let device = Device::Cpu;
        let codebook = Tensor::from_slice(&self.codebook, (k, self.dim), &device)?;
        let rates = Tensor::from_slice(&self.rates_bits, k, &device)?;
        let frequencies = Tensor::from_slice(self.table.frequencies(), k, &device)?;
        let metadata = BTreeMap::from([
            ("format".to_string(), ECVQ_FORMAT.to_string()),
            ("lambda".to_string(), format!("{:?}", self.lambda)),
            ("distortion".to_string(), self.distortion.name().to_string()),
            (
                "precision_bits".to_string(),
                self.table.precision_bits().to_string(),
            ),
        ]);
        write_safetensors(
            path,
            &[
                ("codebook", &codebook),
                ("rates_bits", &rates),
                ("frequencies", &frequencies),
            ],
            &metadata,
        )
    }

    /// Loads a file written by [`save`](Ecvq::save).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::BadFile`] for a truncated or foreign file or inconsistent
    /// contents, [`Error::MissingTensor`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(ECVQ_FORMAT, "an ECVQ quantizer")?;
        let lambda: f64 = file.metadata_value("lambda")?;
        let precision_bits: u32 = file.metadata_value("precision_bits")?;
        let distortion: Distortion = file
            .metadata_value::<String>("distortion")?
            .parse()
            .map_err(|e: Error| Error::bad_file(path, e.to_string()))?;
        let device = Device::Cpu;
        let codebook = file.read(
            "codebook",
            &TensorSpec::new().dtype(DType::F32).rank(2).finite(),
            &device,
        )?;
        let (k, dim) = codebook.dims2()?;
        let rates = file.read(
            "rates_bits",
            &TensorSpec::new().dtype(DType::F64).shape(&[Some(k)]),
            &device,
        )?;
        let frequencies = file.read(
            "frequencies",
            &TensorSpec::new().dtype(DType::U32).shape(&[Some(k)]),
            &device,
        )?;
        let codebook: Vec<f32> = codebook.flatten_all()?.to_vec1()?;
        let rates_bits: Vec<f64> = rates.to_vec1()?;
        let frequencies: Vec<u32> = frequencies.to_vec1()?;
        Self::with_table(dim, codebook, rates_bits, lambda, distortion, |_| {
            FrequencyTable::from_frequencies(frequencies, precision_bits)
        })
        .map_err(|e| Error::bad_file(path, e.to_string()))
    }
}

/// Validates a codebook and its lengths; returns the probabilities `2^(−r_k)`.
fn check_codebook(
    dim: usize,
    codebook: &[f32],
    rates_bits: &[f64],
    lambda: f64,
) -> Result<Vec<f64>> {
    if dim == 0 {
        return Err(Error::invalid_parameter("dim", "must be at least 1"));
    }
    check_lambda(lambda)?;
    if rates_bits.is_empty() {
        return Err(Error::EmptyInput(
            "a quantizer needs at least one code".into(),
        ));
    }
    if codebook.len() != rates_bits.len() * dim {
        return Err(Error::ShapeMismatch {
            context: "codebook".into(),
            expected: format!("[{}, {dim}]", rates_bits.len()),
            actual: vec![codebook.len()],
        });
    }
    qcl_tensor::check_finite_slice("codebook", codebook)?;
    if let Some(k) = rates_bits.iter().position(|r| !r.is_finite()) {
        return Err(Error::NonFinite {
            context: "rates_bits".into(),
            index: k,
            value: rates_bits[k],
        });
    }
    let probabilities: Vec<f64> = rates_bits.iter().map(|r| (-r).exp2()).collect();
    if let Some(k) = rates_bits
        .iter()
        .zip(&probabilities)
        .position(|(&r, &p)| r < 0.0 || p == 0.0)
    {
        return Err(Error::invalid_parameter(
            "rates_bits",
            format!(
                "code {k} has length {} bits; lengths must be >= 0 with a non-zero probability",
                rates_bits[k]
            ),
        ));
    }
    Ok(probabilities)
}

/// What a quantizer achieves on a set of points.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Number of points.
    pub samples: usize,
    /// Rate `R`: mean code length `r_{k*}` under the quantizer's prior (what an ideal
    /// arithmetic coder spends), bits per vector.
    pub rate_bits: f64,
    /// Empirical entropy `H(q̂)` of the index histogram, bits per vector (`R − H` is the
    /// KL divergence from the histogram to the prior, ≥ 0).
    pub entropy_bits: f64,
    /// Size of the real rANS bitstream of all indices (header included), bits per vector.
    pub coded_bits: f64,
    /// Mean squared error summed over dimensions, per vector (always SSE, whatever
    /// distortion the quantizer was trained with).
    pub distortion: f64,
    /// Codes chosen at least once.
    pub used_codes: usize,
    /// The trained objective `R + λ·d` (with the quantizer's own distortion measure).
    pub lagrangian: f64,
    /// The reference distortion at rate `R`, if a bound was given.
    pub bound: Option<f64>,
    /// `10·log₁₀(D / bound)`, in dB.
    pub gap_db: Option<f64>,
}

/// Running sums of an evaluation.
struct EvalAccumulator {
    samples: usize,
    rate_sum: f64,
    sse_sum: f64,
    histogram: Vec<u64>,
    indices: Vec<u32>,
    scores: Vec<f32>,
    stream: Vec<u32>,
}

impl EvalAccumulator {
    fn new(k: usize) -> Self {
        EvalAccumulator {
            samples: 0,
            rate_sum: 0.0,
            sse_sum: 0.0,
            histogram: vec![0; k],
            indices: Vec::new(),
            scores: Vec::new(),
            stream: Vec::new(),
        }
    }

    fn add(&mut self, q: &Ecvq, points: &[f32]) -> Result<()> {
        let n = points.len() / q.dim;
        self.indices.resize(n, 0);
        self.scores.resize(n, 0.0);
        nearest_codes_into(
            points,
            &q.codebook,
            q.dim,
            Some(&q.encoder_bias()),
            &mut self.indices,
            &mut self.scores,
        )?;
        for (x, &k) in points.chunks_exact(q.dim).zip(&self.indices) {
            let k = k as usize;
            let code = &q.codebook[k * q.dim..(k + 1) * q.dim];
            self.sse_sum += x
                .iter()
                .zip(code)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>();
            self.rate_sum += q.rates_bits[k];
            self.histogram[k] += 1;
        }
        self.stream.extend_from_slice(&self.indices);
        self.samples += n;
        Ok(())
    }

    fn finish(self, q: &Ecvq, bound: Option<&dyn Fn(f64) -> f64>) -> Result<Evaluation> {
        if self.samples == 0 {
            return Err(Error::EmptyInput("no points to evaluate on".into()));
        }
        let n = self.samples as f64;
        let rate_bits = self.rate_sum / n;
        let distortion = self.sse_sum / n;
        let entropy_bits = entropy_of_counts(&self.histogram);
        let coded = entropy::encode(&self.stream, &q.table)?;
        let bound = bound.map(|f| f(rate_bits));
        Ok(Evaluation {
            samples: self.samples,
            rate_bits,
            entropy_bits,
            coded_bits: coded.len_bits() as f64 / n,
            distortion,
            used_codes: self.histogram.iter().filter(|&&c| c > 0).count(),
            lagrangian: rate_bits + q.lambda * q.distortion.scale(q.dim) * distortion,
            bound,
            gap_db: bound.map(|b| 10.0 * (distortion / b).log10()),
        })
    }
}

/// Entropy in bits of the distribution `counts / Σ counts`.
pub fn entropy_of_counts(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let total = total as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.log2()
        })
        .sum()
}

/// A quantizer's cells on a pixel grid, with the source density (see [`Ecvq::cell_map`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CellMap {
    /// Grid columns.
    pub width: usize,
    /// Grid rows.
    pub height: usize,
    /// `[(x_min, x_max), (y_min, y_max)]`.
    pub window: [(f64, f64); 2],
    /// Code index of each pixel, row-major, row 0 at the top.
    pub indices: Vec<u32>,
    /// Natural log of the source density at each pixel centre.
    pub log_density: Vec<f64>,
}

impl CellMap {
    /// Whether the pixel lies on a cell boundary (its right or lower neighbour has another
    /// index).
    pub fn is_boundary(&self, col: usize, row: usize) -> bool {
        let at = |c: usize, r: usize| self.indices[r * self.width + c];
        let here = at(col, row);
        (col + 1 < self.width && at(col + 1, row) != here)
            || (row + 1 < self.height && at(col, row + 1) != here)
    }

    /// The pixel `(col, row)` whose centre is nearest to the point `(x, y)`, if inside.
    pub fn pixel_of(&self, x: f64, y: f64) -> Option<(usize, usize)> {
        let [(x0, x1), (y0, y1)] = self.window;
        let col = ((x - x0) / (x1 - x0) * self.width as f64).floor();
        let row = ((y1 - y) / (y1 - y0) * self.height as f64).floor();
        if col >= 0.0 && row >= 0.0 && col < self.width as f64 && row < self.height as f64 {
            Some((col as usize, row as usize))
        } else {
            None
        }
    }
}

/// The squared distance of the brute-force definition the encoder follows (re-exported for
/// tests and callers that check encoder optimality).
pub fn encoder_score(point: &[f32], code: &[f32], bias: f32) -> f32 {
    squared_distance(point, code) + bias
}
