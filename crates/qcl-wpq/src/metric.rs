//! The E-step metric `(u − c)ᵀ G (u − c)` made Euclidean, and the M-step projection
//! ("And the bit goes down", Stock et al., ICLR 2020).
//!
//! `G = V Λ Vᵀ` (eigendecomposition in f64); `T = Λ₊^{1/2} Vᵀ` maps points so that
//! `‖T(u − c)‖² = (u − c)ᵀ G (u − c)` exactly up to the dropped eigenvalues (below `1e-10·max`),
//! and the shared nearest-code kernel does the search. `P = V₊V₊ᵀ` (= `X̃⁺X̃`) projects a member
//! mean on the excited input directions. Where each EM iteration's `G` comes from
//! ([`MetricSource`]): the identity, one fixed metric, or the pooled Gram matrix of a fresh
//! sample of input patches ([`PatchSampler`], [`pooled_gram`]).

use qcl_tensor::{Error, Result, SeededRng};

/// A positive semi-definite metric on `R^d`.
///
/// ```
/// use qcl_wpq::Metric;
/// let g = [4.0, 0.0, 0.0, 1.0];
/// let metric = Metric::from_gram(&g, 2)?;
/// let p = metric.transform(&[1.0, 1.0]);
/// assert!((p.iter().map(|v| v * v).sum::<f32>() - 5.0).abs() < 1e-5);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    d: usize,
    gram: Vec<f64>,
    transform: Vec<f32>,
    projection: Vec<f64>,
    identity: bool,
}

/// Relative threshold below which an eigenvalue of `G` counts as zero.
pub const EIGEN_TOLERANCE: f64 = 1e-10;

impl Metric {
    /// `G = I`: plain k-means (naive PQ).
    pub fn identity(d: usize) -> Metric {
        let mut eye = vec![0f64; d * d];
        for i in 0..d {
            eye[i * d + i] = 1.0;
        }
        Metric {
            d,
            transform: eye.iter().map(|&v| v as f32).collect(),
            projection: eye.clone(),
            gram: eye,
            identity: true,
        }
    }

    /// The metric of a Gram matrix `G` (`[d, d]` row-major, symmetric).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `gram` is `d×d`, [`Error::NonFinite`] for NaN/infinity,
    /// [`Error::InvalidParameter`] if the eigendecomposition fails or `G` is zero.
    pub fn from_gram(gram: &[f64], d: usize) -> Result<Metric> {
        check_gram(gram, d)?;
        let g = faer::Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (gram[i * d + j] + gram[j * d + i]));
        let eig = g.self_adjoint_eigen(faer::Side::Lower).map_err(|e| {
            Error::invalid_parameter("gram", format!("no eigendecomposition: {e:?}"))
        })?;
        let values: Vec<f64> = (0..d).map(|i| eig.S().column_vector()[i]).collect();
        let vectors = eig.U();
        let max = values.iter().cloned().fold(0f64, f64::max);
        if max <= 0.0 {
            return Err(Error::invalid_parameter(
                "gram",
                "the inputs are all zero: no direction is excited",
            ));
        }
        let mut transform = vec![0f32; d * d];
        let mut projection = vec![0f64; d * d];
        for (k, &lambda) in values.iter().enumerate() {
            if lambda <= EIGEN_TOLERANCE * max {
                continue;
            }
            let s = lambda.sqrt();
            for i in 0..d {
                transform[k * d + i] = (s * vectors[(i, k)]) as f32;
                for j in 0..d {
                    projection[i * d + j] += vectors[(i, k)] * vectors[(j, k)];
                }
            }
        }
        Ok(Metric {
            d,
            gram: (0..d * d)
                .map(|idx| 0.5 * (gram[idx] + gram[(idx % d) * d + idx / d]))
                .collect(),
            transform,
            projection,
            identity: false,
        })
    }

    /// The dimension `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Whether this is the identity (naive PQ).
    pub fn is_identity(&self) -> bool {
        self.identity
    }

    /// `G` (`[d, d]`, symmetric).
    pub fn gram(&self) -> &[f64] {
        &self.gram
    }

    /// `T·p` for every row `p` of `points` (`[n, d]` row-major).
    pub fn transform(&self, points: &[f32]) -> Vec<f32> {
        if self.identity {
            return points.to_vec();
        }
        let d = self.d;
        let mut out = vec![0f32; points.len()];
        for (src, dst) in points.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            for (k, o) in dst.iter_mut().enumerate() {
                let row = &self.transform[k * d..(k + 1) * d];
                *o = row.iter().zip(src).map(|(a, b)| a * b).sum();
            }
        }
        out
    }

    /// `(u − c)ᵀ G (u − c)` in f64.
    pub fn distance(&self, u: &[f32], c: &[f32]) -> f64 {
        let d = self.d;
        let diff: Vec<f64> = u
            .iter()
            .zip(c)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect();
        let mut total = 0.0;
        for i in 0..d {
            for j in 0..d {
                total += diff[i] * self.gram[i * d + j] * diff[j];
            }
        }
        total
    }

    /// `P·v` in place (drops the part of `v` in directions the inputs never excite).
    pub fn project(&self, v: &mut [f64]) {
        if self.identity {
            return;
        }
        let d = self.d;
        let src = v.to_vec();
        for (i, o) in v.iter_mut().enumerate() {
            *o = (0..d).map(|j| self.projection[i * d + j] * src[j]).sum();
        }
    }
}

/// Checks a Gram matrix `[d, d]` row-major: `d > 0`, the right length, finite values.
///
/// # Errors
/// [`Error::ShapeMismatch`] for the wrong size, [`Error::NonFinite`] for NaN or infinity.
pub(crate) fn check_gram(gram: &[f64], d: usize) -> Result<()> {
    if d == 0 || gram.len() != d * d {
        return Err(Error::ShapeMismatch {
            context: "gram".into(),
            expected: format!("[{d}, {d}]"),
            actual: vec![gram.len()],
        });
    }
    if let Some(i) = gram.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            context: "gram".into(),
            index: i,
            value: gram[i],
        });
    }
    Ok(())
}

/// Input patches of a layer, sampled with replacement (rows of `M`'s order, length `D`).
pub trait PatchSampler {
    /// `D`, the length of a patch.
    fn patch_len(&self) -> usize;
    /// `rows` patches drawn with `rng`, `[rows, D]` row-major.
    ///
    /// # Errors
    /// Implementation-defined (e.g. no recorded inputs).
    fn sample(&self, rows: usize, rng: &mut SeededRng) -> Result<Vec<f32>>;
}

/// Where the metric of each iteration comes from.
#[derive(Clone, Copy)]
pub enum MetricSource<'a> {
    /// `G = I` (naive PQ).
    Identity,
    /// One fixed metric for every iteration (tests; the fixed-`X̃` property).
    Fixed(&'a Metric),
    /// A fresh sample of `patch_rows` patches each iteration (the method).
    Sampled {
        /// The layer's recorded inputs.
        sampler: &'a dyn PatchSampler,
        /// Patches per iteration (each gives `D/d` unrolled rows).
        patch_rows: usize,
    },
}

/// The pooled Gram matrix `Σ_b X_bᵀX_b / (rows·m)` of patches `[rows, D]` cut into slabs of `d`.
///
/// ```
/// // Two patches of length 4, d = 2: unrolled rows (1,0), (0,1), (2,0), (0,2).
/// let g = qcl_wpq::pooled_gram(&[1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0], 4, 2)?;
/// assert_eq!(g, vec![1.25, 0.0, 0.0, 1.25]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] if `d` does not divide `patch_len`, [`Error::EmptyInput`] for no
/// patches.
pub fn pooled_gram(patches: &[f32], patch_len: usize, d: usize) -> Result<Vec<f64>> {
    if d == 0 || patch_len == 0 || !patch_len.is_multiple_of(d) {
        return Err(Error::invalid_parameter(
            "block",
            format!("block size {d} does not divide the patch length {patch_len}"),
        ));
    }
    if patches.is_empty() || !patches.len().is_multiple_of(patch_len) {
        return Err(Error::EmptyInput("no whole input patches".into()));
    }
    let mut g = vec![0f64; d * d];
    for slab in patches.chunks_exact(d) {
        for i in 0..d {
            let xi = f64::from(slab[i]);
            if xi == 0.0 {
                continue;
            }
            for j in 0..d {
                g[i * d + j] += xi * f64::from(slab[j]);
            }
        }
    }
    let rows = (patches.len() / d) as f64;
    g.iter_mut().for_each(|v| *v /= rows);
    Ok(g)
}

/// The metric of `source`; a sampled one draws its patch rows from `rng`.
pub(crate) fn metric_of(source: MetricSource<'_>, d: usize, rng: &mut SeededRng) -> Result<Metric> {
    Ok(match source {
        MetricSource::Identity => Metric::identity(d),
        MetricSource::Fixed(m) => m.clone(),
        MetricSource::Sampled {
            sampler,
            patch_rows,
        } => {
            let patches = sampler.sample(patch_rows, rng)?;
            Metric::from_gram(&pooled_gram(&patches, sampler.patch_len(), d)?, d)?
        }
    })
}
