//! Optimized product quantization (Ge, He, Ke & Sun, "Optimized Product Quantization", CVPR 2013
//! and TPAMI 2014), the non-parametric version.
//!
//! (Over 600 lines: the settings, the `Rotation` with its tiled product, and the training with
//! its alternation of PQ and Procrustes steps, refinement and SVD are one unit; about 160 lines
//! are this derivation and doc comments, and the tests live in opq_tests.rs.)
//!
//! Product quantization cuts a vector into `m` fixed blocks of coordinates and quantizes each
//! block on its own, so it loses whatever the blocks share. OPQ first turns the space by an
//! orthogonal `d × d` matrix `R` chosen together with the codebooks:
//!
//! ```text
//!     min over R (RᵀR = I) and PQ codebooks of   ‖X R − Ŷ‖²_F,
//! ```
//!
//! where `X` is the `n × d` training matrix (one vector a row) and `Ŷ` the product-quantized
//! reconstruction of `Y = X R`. A rotation keeps distances, so `‖X R − Ŷ‖²` is also the error
//! of the reconstruction `Ŷ Rᵀ` of `X` itself. [`train_opq`] alternates two steps:
//!
//! 1. **PQ step**, `R` fixed: train the codebooks on `Y = X R` and encode, which gives `Ŷ`.
//! 2. **Procrustes step**, `Ŷ` fixed: `‖X R − Ŷ‖² = ‖X‖² + ‖Ŷ‖² − 2 tr(Rᵀ Xᵀ Ŷ)`, so the best
//!    orthogonal `R` maximises `tr(Rᵀ M)` with `M = Xᵀ Ŷ` (`d × d`). With the SVD
//!    `M = U Σ Vᵀ` the maximum is `tr Σ`, reached at `R = U Vᵀ` (orthogonal Procrustes).
//!
//! Neither step can raise the objective, so the training error goes down round after round
//! (up to rounding and k-means's empty-cluster repair).

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use qcl_tensor::{check_finite_slice, Error, Result, Seed};
use rayon::prelude::*;

use crate::kmeans::{nearest_in_blocks, repair_empty_clusters, update_centroids};
use crate::points::Points;
use crate::{ProductQuantizer, ProductQuantizerConfig, MAX_ITERATIONS};

/// Largest `|(RᵀR − I)_ij|` that [`Rotation::from_matrix`] accepts (computed in `f64`): far
/// above the rounding of an orthogonal matrix stored in `f32`, far below any real skew.
pub const ORTHOGONALITY_TOLERANCE: f64 = 1e-4;

/// Rows per block of the `Xᵀ Ŷ` product, and blocks summed at a time.
const CROSS_BLOCK_ROWS: usize = 2048;
const CROSS_WAVE: usize = 8;

/// The knobs of [`train_opq`]; [`OpqConfig::new`] gives the defaults.
///
/// ```
/// use qcl_pq::index::opq::OpqConfig;
/// let config = OpqConfig { iterations: 10, ..OpqConfig::new(8, 8) };
/// assert_eq!(config.pq_iterations, 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OpqConfig {
    /// Number of sub-spaces; must divide the dimension.
    pub m: usize,
    /// Bits per code, in `1..=16`: each sub-space gets `2^nbits` centroids.
    pub nbits: u32,
    /// PQ steps of the alternation (default 50, as faiss's `niter`); every PQ step but the
    /// last is followed by a Procrustes step, and 1 gives plain PQ. At most [`MAX_ITERATIONS`].
    pub iterations: usize,
    /// Lloyd iterations of every PQ step after the first (default 4, as faiss's `niter_pq`):
    /// those steps start from the previous step's codebooks, so a few iterations suffice.
    pub pq_iterations: usize,
    /// Lloyd iterations of the first PQ step, which trains from scratch, and of the final
    /// quantizer (default 40, as faiss's `niter_pq_0`).
    pub first_pq_iterations: usize,
    /// Learn the rotation on at most this many training vectors, drawn at random (default
    /// `Some(65_536)`, faiss's `256 · 256`); `None` uses every vector. The final quantizer
    /// always trains on all of `data` (subsampled by k-means's own rule, 256 per centroid).
    pub max_train_points: Option<usize>,
    /// Start the alternation from a random rotation drawn from `seed` (default true, as faiss's
    /// `OPQMatrix`), or from the identity. A random start spreads every input direction over
    /// all sub-spaces, so sub-spaces of little variance (an image's blank border, say) do not
    /// hold the alternation near its start. One iteration always starts from the identity
    /// (plain PQ).
    pub random_start: bool,
    /// Seed of the subsample and of every k-means run (default 1234, as [`crate::KMeansConfig`]).
    pub seed: Seed,
}

impl OpqConfig {
    /// `m` sub-spaces of `nbits`-bit codes, every other knob at its default.
    pub fn new(m: usize, nbits: u32) -> Self {
        OpqConfig {
            m,
            nbits,
            iterations: 50,
            pq_iterations: 4,
            first_pq_iterations: 40,
            max_train_points: Some(256 * 256),
            random_start: true,
            seed: Seed::new(1234),
        }
    }

    /// The parameters of the from-scratch PQ trainings: `first_pq_iterations` Lloyd
    /// iterations, this seed, k-means defaults otherwise. Plain PQ with these parameters is
    /// what [`train_opq`] never does worse than.
    pub fn pq_params(&self) -> ProductQuantizerConfig {
        ProductQuantizerConfig {
            max_iter: self.first_pq_iterations,
            seed: self.seed,
            ..ProductQuantizerConfig::new(self.m, self.nbits)
        }
    }

    /// Checks the knobs against `dim`; returns `(dsub, ksub)`.
    fn validate(&self, dim: usize) -> Result<(usize, usize)> {
        if dim == 0 {
            return Err(Error::invalid_parameter(
                "dim",
                "vectors need at least one dimension",
            ));
        }
        if self.m == 0 || !dim.is_multiple_of(self.m) {
            return Err(Error::invalid_parameter(
                "m",
                format!("must be at least 1 and divide dim = {dim}, got {}", self.m),
            ));
        }
        if !(1..=16).contains(&self.nbits) {
            return Err(Error::invalid_parameter(
                "nbits",
                format!("must be in 1..=16, got {}", self.nbits),
            ));
        }
        for (name, value, least) in [
            ("iterations", self.iterations, 1),
            ("pq_iterations", self.pq_iterations, 0),
            ("first_pq_iterations", self.first_pq_iterations, 0),
        ] {
            if !(least..=MAX_ITERATIONS).contains(&value) {
                return Err(Error::invalid_parameter(
                    name,
                    format!("must be in {least}..={MAX_ITERATIONS}, got {value}"),
                ));
            }
        }
        let ksub = 1usize << self.nbits;
        if let Some(points) = self.max_train_points.filter(|&p| p < ksub) {
            return Err(Error::invalid_parameter(
                "max_train_points",
                format!(
                    "{points} vectors cannot train 2^{} = {ksub} centroids",
                    self.nbits
                ),
            ));
        }
        Ok((dim / self.m, ksub))
    }
}

/// An orthogonal `d × d` matrix `R`, stored row-major, applied to row vectors: `y = x · R`,
/// that is `y_j = Σ_i x_i R_ij` (the columns of `R` are the new axes). Its inverse is `Rᵀ`:
/// `x = y · Rᵀ` ([`apply_inverse`](Self::apply_inverse)).
///
/// ```
/// use qcl_pq::index::opq::Rotation;
/// // A quarter turn in the plane: (1, 0) goes to (0, 1).
/// let r = Rotation::from_matrix(2, vec![0.0, 1.0, -1.0, 0.0])?;
/// assert_eq!(r.apply(&[1.0, 0.0, 0.0, 2.0])?, vec![0.0, 1.0, -2.0, 0.0]);
/// assert_eq!(r.apply_inverse(&[0.0, 1.0])?, vec![1.0, 0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    dim: usize,
    /// Row-major `[dim, dim]`, orthogonal.
    matrix: Vec<f32>,
}

impl Rotation {
    /// The identity of dimension `dim` (`dim = 0` gives an empty rotation).
    pub fn identity(dim: usize) -> Self {
        let mut matrix = vec![0f32; dim * dim];
        matrix.iter_mut().step_by(dim + 1).for_each(|v| *v = 1.0);
        Rotation { dim, matrix }
    }

    /// The rotation of the row-major `dim × dim` `matrix`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `dim = 0` or a matrix that is not orthogonal (an entry
    /// of `RᵀR − I` beyond [`ORTHOGONALITY_TOLERANCE`]); [`Error::ShapeMismatch`] for a
    /// matrix of another length; [`Error::NonFinite`].
    pub fn from_matrix(dim: usize, matrix: Vec<f32>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid_parameter("dim", "a rotation needs dim >= 1"));
        }
        if dim.checked_mul(dim) != Some(matrix.len()) {
            return Err(Error::ShapeMismatch {
                context: "rotation matrix".into(),
                expected: format!("[{dim}, {dim}]"),
                actual: vec![matrix.len()],
            });
        }
        check_finite_slice("rotation matrix", &matrix)?;
        let mut worst = 0f64;
        for a in 0..dim {
            for b in a..dim {
                let dot: f64 = matrix
                    .chunks_exact(dim)
                    .map(|row| f64::from(row[a]) * f64::from(row[b]))
                    .sum();
                worst = worst.max((dot - if a == b { 1.0 } else { 0.0 }).abs());
            }
        }
        if worst > ORTHOGONALITY_TOLERANCE {
            return Err(Error::invalid_parameter(
                "matrix",
                format!(
                    "not orthogonal: max |RᵀR − I| = {worst:.3e} > {ORTHOGONALITY_TOLERANCE:e}"
                ),
            ));
        }
        Ok(Rotation { dim, matrix })
    }

    /// Dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The matrix, row-major `[d, d]`.
    pub fn matrix(&self) -> &[f32] {
        &self.matrix
    }

    fn is_identity(&self) -> bool {
        let d = self.dim;
        (self.matrix.iter().enumerate())
            .all(|(t, &v)| v == if t % (d + 1) == 0 { 1.0 } else { 0.0 })
    }

    /// `x · R` for every row `x` of `rows` (row-major `[n, d]`), row-major `[n, d]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `rows` is not whole rows of `d`.
    pub fn apply(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; rows.len()];
        self.apply_into(rows, &mut out)?;
        Ok(out)
    }

    /// [`apply`](Self::apply) into `out` (of the length of `rows`). Rows are multiplied in
    /// tiles of [`TILE_ROWS`] by one sequential GEMM each (faer), a short last tile padded with
    /// zero rows, so every product has the same shape and the same order of operations: a
    /// row's result does not depend on the other rows or on the number of threads. The
    /// identity copies.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `rows` is not whole rows of `d` or `out` has another length.
    pub fn apply_into(&self, rows: &[f32], out: &mut [f32]) -> Result<()> {
        self.check_rows(rows, out)?;
        if self.is_identity() {
            out.copy_from_slice(rows);
            return Ok(());
        }
        let d = self.dim;
        let matrix = MatRef::from_row_major_slice(&self.matrix, d, d);
        let tile = TILE_ROWS * d;
        (rows.par_chunks(tile).zip(out.par_chunks_mut(tile))).for_each(|(x, y)| {
            if x.len() == tile {
                rotate_tile(x, matrix, y);
            } else {
                let (mut padded_x, mut padded_y) = (vec![0f32; tile], vec![0f32; tile]);
                padded_x[..x.len()].copy_from_slice(x);
                rotate_tile(&padded_x, matrix, &mut padded_y);
                y.copy_from_slice(&padded_y[..y.len()]);
            }
        });
        Ok(())
    }

    /// `y · Rᵀ` for every row `y` of `rows`: undoes [`apply`](Self::apply), for example to
    /// bring decoded vectors back to the original space.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `rows` is not whole rows of `d`.
    pub fn apply_inverse(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; rows.len()];
        self.check_rows(rows, &out)?;
        let d = self.dim;
        (rows.par_chunks_exact(d).zip(out.par_chunks_exact_mut(d))).for_each(|(y, x)| {
            for (xi, r) in x.iter_mut().zip(self.matrix.chunks_exact(d)) {
                *xi = y.iter().zip(r).map(|(&yj, &rij)| yj * rij).sum();
            }
        });
        Ok(out)
    }

    fn check_rows(&self, rows: &[f32], out: &[f32]) -> Result<()> {
        if self.dim == 0 || !rows.len().is_multiple_of(self.dim) || out.len() != rows.len() {
            return Err(Error::ShapeMismatch {
                context: "rows to rotate".into(),
                expected: format!("[*, {}] in and out", self.dim),
                actual: vec![rows.len(), out.len()],
            });
        }
        Ok(())
    }
}

/// Rows rotated by one matrix product: the rotation matrix (2.4 MB in 784 dimensions) is read
/// once per tile instead of once per row, and the product runs at GEMM speed.
const TILE_ROWS: usize = 32;

/// `y = x · R` for one full tile of [`TILE_ROWS`] rows (row-major).
fn rotate_tile(x: &[f32], matrix: MatRef<'_, f32>, y: &mut [f32]) {
    let d = matrix.nrows();
    let x = MatRef::from_row_major_slice(x, TILE_ROWS, d);
    let mut y = MatMut::from_row_major_slice_mut(y, TILE_ROWS, d);
    matmul(&mut y, Accum::Replace, x, matrix, 1.0f32, Par::Seq);
}

/// Trains an OPQ rotation and product quantizer on `data` (row-major `[n, dim]`).
///
/// The rotation is learned on at most `max_train_points` vectors, centred (a rotation has no
/// offset; the mean only gets in the way of the Procrustes step). It starts from the identity,
/// so the first PQ step is plain PQ (`first_pq_iterations` Lloyd iterations); every later PQ
/// step refines the previous codebooks with `pq_iterations` Lloyd iterations on the newly
/// rotated vectors; between PQ steps, a Procrustes step sets `R = U Vᵀ` from the SVD of
/// `Xᵀ Ŷ` (see the [module docs](self)). The rotation with the lowest training error seen is
/// kept. Last, candidate quantizers are scored by [`reconstruction_mse`] on all of `data`:
/// plain PQ ([`OpqConfig::pq_params`], identity rotation), PQ trained from scratch on
/// `data · R` with the same parameters, and the alternation's own codebooks; the lowest wins,
/// plain PQ on ties. So the result never has a higher training error than plain PQ with the
/// same configuration.
///
/// Every step is deterministic and independent of the thread count: the same seed gives the
/// same bits with any number of threads.
///
/// ```
/// use qcl_pq::index::opq::{reconstruction_mse, train_opq, OpqConfig, Rotation};
/// use qcl_pq::ProductQuantizer;
/// use qcl_tensor::Seed;
/// // 8-D vectors whose coordinates come in correlated pairs split across sub-spaces.
/// let z = Seed::new(0).rng().normal_vec(2_000 * 8, 0.0, 1.0);
/// let data: Vec<f32> = z.chunks(8).flat_map(|r| {
///     (0..8).map(move |j| if j < 4 { 3.0 * r[j] + r[j + 4] } else { 3.0 * r[j - 4] - r[j] })
/// }).collect();
/// let config = OpqConfig { iterations: 8, ..OpqConfig::new(2, 4) };
/// let (rotation, pq) = train_opq(&data, 8, &config)?;
/// let plain = ProductQuantizer::train(&data, 8, &config.pq_params())?;
/// let opq_error = reconstruction_mse(&data, &rotation, &pq)?;
/// assert!(opq_error <= reconstruction_mse(&data, &Rotation::identity(8), &plain)?);
/// // To encode: rotate, then quantize; to decode: dequantize, then rotate back.
/// let codes = pq.encode(&rotation.apply(&data)?)?;
/// let decoded = rotation.apply_inverse(&pq.decode(&codes)?)?;
/// assert_eq!(decoded.len(), data.len());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for `dim = 0`, `m = 0` or not dividing `dim`, `nbits` outside
/// `1..=16`, `iterations` outside `1..=MAX_ITERATIONS`, Lloyd iterations above
/// [`MAX_ITERATIONS`], `max_train_points < 2^nbits`, fewer than `2^nbits` vectors, or an SVD
/// that does not converge; [`Error::EmptyInput`] for no vectors; [`Error::ShapeMismatch`] if
/// `data` is not whole rows; [`Error::NonFinite`].
pub fn train_opq(
    data: &[f32],
    dim: usize,
    config: &OpqConfig,
) -> Result<(Rotation, ProductQuantizer)> {
    let (_, ksub) = config.validate(dim)?;
    if data.is_empty() {
        return Err(Error::EmptyInput("no training vectors".into()));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            context: "data".into(),
            expected: format!("[*, {dim}]"),
            actual: vec![data.len()],
        });
    }
    check_finite_slice("data", data)?;
    let n = data.len() / dim;
    if n < ksub {
        return Err(Error::invalid_parameter(
            "nbits",
            format!("{ksub} centroids per sub-space need as many vectors, got {n}"),
        ));
    }
    let (sample, mean) = centred_sample(data, dim, config)?;
    let best = alternate(&sample, dim, config)?;

    let params = config.pq_params();
    let identity = Rotation::identity(dim);
    let plain = ProductQuantizer::train(data, dim, &params)?;
    let plain_error = reconstruction_mse(data, &identity, &plain)?;
    let mut chosen = (plain_error, identity, plain);
    let rotated = best.rotation.apply(data)?;
    let mut candidates = Vec::with_capacity(2);
    if !best.rotation.is_identity() {
        candidates.push(ProductQuantizer::train(&rotated, dim, &params)?);
    }
    let offset = best.rotation.apply(&mean)?;
    candidates.push(shift_codebooks(&best.quantizer, &offset)?);
    for pq in candidates {
        let error = crate::reconstruction_mse(&pq, &rotated)?;
        if error < chosen.0 {
            chosen = (error, best.rotation.clone(), pq);
        }
    }
    Ok((chosen.1, chosen.2))
}

/// Mean over the rows `x` of `data` of `‖x R − decode(encode(x R))‖²`, summed in `f64`: the
/// training error [`train_opq`] minimises (equal, up to rounding, to the error of the
/// reconstruction rotated back to the original space).
///
/// # Errors
/// [`Error::ShapeMismatch`] if the rotation and quantizer differ in dimension or `data` is not
/// whole rows; [`Error::EmptyInput`] for no rows; [`Error::NonFinite`].
pub fn reconstruction_mse(data: &[f32], rotation: &Rotation, pq: &ProductQuantizer) -> Result<f64> {
    if rotation.dim() != pq.dim() {
        return Err(Error::ShapeMismatch {
            context: "rotation".into(),
            expected: format!("[{0}, {0}] as the quantizer", pq.dim()),
            actual: vec![rotation.dim(), rotation.dim()],
        });
    }
    crate::reconstruction_mse(pq, &rotation.apply(data)?)
}

/// `Σ ‖y − ŷ‖² / n` in `f64`, in order.
fn mean_squared_error(y: &[f32], decoded: &[f32], dim: usize) -> f64 {
    let sum: f64 = (y.iter().zip(decoded))
        .map(|(&a, &b)| f64::from(a - b) * f64::from(a - b))
        .sum();
    sum / (y.len() / dim) as f64
}

/// The training vectors of the rotation (a sorted random subset of at most
/// `max_train_points`), centred; and their mean.
fn centred_sample(data: &[f32], dim: usize, config: &OpqConfig) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = data.len() / dim;
    let mut sample = match config.max_train_points {
        Some(limit) if n > limit => {
            let mut rng = config.seed.child_named("opq-sample").rng();
            let mut rows = rng.sample_indices(n, limit)?;
            rows.sort_unstable();
            rows.iter()
                .flat_map(|&i| &data[i * dim..(i + 1) * dim])
                .copied()
                .collect()
        }
        _ => data.to_vec(),
    };
    let mut sum = vec![0f64; dim];
    for row in sample.chunks_exact(dim) {
        sum.iter_mut()
            .zip(row)
            .for_each(|(s, &x)| *s += f64::from(x));
    }
    let rows = (sample.len() / dim) as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / rows) as f32).collect();
    for row in sample.chunks_exact_mut(dim) {
        row.iter_mut().zip(&mean).for_each(|(x, &m)| *x -= m);
    }
    Ok((sample, mean))
}

/// The best state of the alternation: its rotation, and the codebooks of the centred,
/// rotated sample.
struct Alternation {
    rotation: Rotation,
    quantizer: ProductQuantizer,
    error: f64,
}

/// The PQ / Procrustes alternation on the centred `sample`; returns the best round.
fn alternate(sample: &[f32], dim: usize, config: &OpqConfig) -> Result<Alternation> {
    let mut rotation = if config.random_start && config.iterations > 1 {
        random_rotation(dim, config.seed.child_named("opq-start"))?
    } else {
        Rotation::identity(dim)
    };
    let mut rotated = vec![0f32; sample.len()];
    let mut previous: Option<ProductQuantizer> = None;
    let mut best: Option<Alternation> = None;
    for round in 0..config.iterations {
        rotation.apply_into(sample, &mut rotated)?;
        let pq = match previous.take() {
            None => ProductQuantizer::train(&rotated, dim, &config.pq_params())?,
            Some(pq) => refine(&rotated, &pq, config.pq_iterations)?,
        };
        let decoded = pq.decode(&pq.encode(&rotated)?)?;
        let error = mean_squared_error(&rotated, &decoded, dim);
        if best.as_ref().is_none_or(|b| error < b.error) {
            best = Some(Alternation {
                rotation: rotation.clone(),
                quantizer: pq.clone(),
                error,
            });
        }
        if round + 1 == config.iterations || error == 0.0 {
            break;
        }
        rotation = procrustes(sample, &decoded, dim)?;
        previous = Some(pq);
    }
    best.ok_or_else(|| Error::invalid_parameter("iterations", "must be at least 1"))
}

/// `iterations` Lloyd iterations in every sub-space of `rows`, from `pq`'s codebooks (the
/// hot start of the PQ step); each sub-space as [`crate::KMeans`] runs it, independent of the
/// thread count.
fn refine(rows: &[f32], pq: &ProductQuantizer, iterations: usize) -> Result<ProductQuantizer> {
    let (dim, dsub, ksub) = (pq.dim(), pq.dsub(), pq.ksub());
    let codebooks: Vec<Vec<f32>> = (0..pq.m())
        .into_par_iter()
        .map(|j| {
            let sub: Vec<f32> = (rows.chunks_exact(dim))
                .flat_map(|row| &row[j * dsub..(j + 1) * dsub])
                .copied()
                .collect();
            let points = Points::all(&sub, dsub);
            let mut centroids = pq.codebook(j).to_vec();
            let n = sub.len() / dsub;
            let (mut indices, mut distances) = (vec![0u32; n], vec![0f32; n]);
            let mut partials = Vec::new();
            for _ in 0..iterations {
                nearest_in_blocks(&points, &centroids, &mut indices, &mut distances)?;
                let weights =
                    update_centroids(&points, None, &indices, ksub, &mut centroids, &mut partials);
                repair_empty_clusters(&mut centroids, dsub, weights);
            }
            Ok(centroids)
        })
        .collect::<Result<_>>()?;
    ProductQuantizer::from_codebooks(dim, pq.m(), pq.nbits(), codebooks.concat())
}

/// `pq` with every centroid moved by the matching block of `offset` (`[dim]`).
fn shift_codebooks(pq: &ProductQuantizer, offset: &[f32]) -> Result<ProductQuantizer> {
    let dsub = pq.dsub();
    let mut codebooks = pq.codebooks().to_vec();
    for (t, centroid) in codebooks.chunks_exact_mut(dsub).enumerate() {
        let j = t / pq.ksub();
        centroid
            .iter_mut()
            .zip(&offset[j * dsub..(j + 1) * dsub])
            .for_each(|(c, &o)| *c += o);
    }
    ProductQuantizer::from_codebooks(pq.dim(), pq.m(), pq.nbits(), codebooks)
}

/// A random rotation of `dim` dimensions: the orthogonal polar factor of a matrix of
/// standard normal entries drawn from `seed` (uniformly distributed over the rotations).
fn random_rotation(dim: usize, seed: Seed) -> Result<Rotation> {
    let entries = seed.rng().normal_vec(dim * dim, 0.0, 1.0);
    let gaussian = Mat::<f64>::from_fn(dim, dim, |i, j| f64::from(entries[i * dim + j]));
    Ok(Rotation {
        dim,
        matrix: nearest_orthogonal(&gaussian)?,
    })
}

/// The Procrustes step: the orthogonal `R` minimising `‖X R − Ŷ‖²`, `U Vᵀ` from the SVD of
/// `Xᵀ Ŷ`.
fn procrustes(x: &[f32], decoded: &[f32], dim: usize) -> Result<Rotation> {
    let cross = cross_product(x, decoded, dim);
    Ok(Rotation {
        dim,
        matrix: nearest_orthogonal(&cross)?,
    })
}

/// `Xᵀ Ŷ` in `f64`: products of fixed blocks of rows (faer, sequential), added in block
/// order; the blocks depend only on `n`, so the bits do not depend on the thread count.
fn cross_product(x: &[f32], y: &[f32], dim: usize) -> Mat<f64> {
    let blocks: Vec<(&[f32], &[f32])> = (x.chunks(CROSS_BLOCK_ROWS * dim))
        .zip(y.chunks(CROSS_BLOCK_ROWS * dim))
        .collect();
    let mut total = Mat::<f64>::zeros(dim, dim);
    for wave in blocks.chunks(CROSS_WAVE) {
        let partials: Vec<Mat<f64>> = wave
            .par_iter()
            .map(|&(xb, yb)| {
                let rows = xb.len() / dim;
                let xm = Mat::<f64>::from_fn(rows, dim, |i, j| f64::from(xb[i * dim + j]));
                let ym = Mat::<f64>::from_fn(rows, dim, |i, j| f64::from(yb[i * dim + j]));
                let mut partial = Mat::<f64>::zeros(dim, dim);
                matmul(
                    &mut partial,
                    Accum::Replace,
                    xm.transpose(),
                    &ym,
                    1.0,
                    Par::Seq,
                );
                partial
            })
            .collect();
        for partial in &partials {
            for j in 0..dim {
                for i in 0..dim {
                    total[(i, j)] += partial[(i, j)];
                }
            }
        }
    }
    total
}

/// The orthogonal matrix nearest to the square `m` (its polar factor `U Vᵀ`, from a
/// sequential faer SVD), row-major in `f32`.
fn nearest_orthogonal(m: &Mat<f64>) -> Result<Vec<f32>> {
    let d = m.nrows();
    let (mut u, mut v) = (Mat::<f64>::zeros(d, d), Mat::<f64>::zeros(d, d));
    let mut s = Diag::<f64>::zeros(d);
    let full = ComputeSvdVectors::Full;
    let scratch = svd_scratch::<f64>(d, d, full, full, Par::Seq, Default::default());
    let mut buffer = MemBuffer::new(scratch);
    svd(
        m.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .map_err(|e| {
        Error::invalid_parameter("data", format!("the SVD of Xᵀ Ŷ did not converge ({e:?})"))
    })?;
    let mut r = Mat::<f64>::zeros(d, d);
    matmul(&mut r, Accum::Replace, &u, v.transpose(), 1.0, Par::Seq);
    Ok((0..d * d).map(|t| r[(t / d, t % d)] as f32).collect())
}

#[cfg(test)]
#[path = "opq_tests.rs"]
mod tests;
