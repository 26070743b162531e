//! The nearest-code kernel every quantizer of qcl uses.
//!
//! For points `x [n, d]` and codes `c [k, d]` (row-major `f32` slices) it returns, for each
//! point, the index `j` minimising
//!
//! ```text
//! D(x, j) = Σ_{i=0}^{d-1} (x_i − c_{j,i})²  +  bias_j
//! ```
//!
//! and that value, with **ties going to the lowest index**. The sum is defined as accumulated in
//! `f32` in order `i = 0, 1, …` without fused multiply-add ([`squared_distance`]), and the
//! result equals that brute-force definition *exactly*, whatever the thread count:
//!
//! - for small `d` a direct kernel computes `D` for 16 codes at a time in SIMD lanes, each lane
//!   performing the same operations in the same order as the scalar definition;
//! - for larger `d` a GEMM (`−2·x·cᵀ + ‖c‖² + bias`) screens the codes, and every code within
//!   a proven rounding margin of the best is re-scored exactly.
//!
//! Points are processed in fixed tiles in parallel (rayon); no `n × k` matrix is materialised.
//!
//! (Over 600 lines: the direct and GEMM kernels, top-k, the grouped bounds and their shared
//! exact re-check must agree bit for bit, so they live together; a third is tests.)

use rayon::prelude::*;

use crate::{check_finite_slice, Error, Result};

/// Dimensions up to which the direct kernel is used; above it, GEMM screening.
pub const DIRECT_MAX_DIM: usize = 32;

/// SIMD width of the direct kernel (codes per block).
const LANES: usize = 16;
/// Points per block of the direct kernel.
const POINT_BLOCK: usize = 8;
/// Points per parallel work item (fixed, so that work division never depends on threads).
const PARALLEL_CHUNK: usize = 512;

/// Indices and values of the nearest codes (or of the `top_k` nearest, row-major `[n, top_k]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    /// Code indices.
    pub indices: Vec<u32>,
    /// `D(x, j)` of each returned index.
    pub distances: Vec<f32>,
}

/// The reference squared distance: `Σ (a_i − b_i)²` in `f32`, in index order, no FMA.
///
/// ```
/// assert_eq!(qcl_tensor::squared_distance(&[1.0, 2.0], &[4.0, 6.0]), 25.0);
/// ```
#[inline]
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (x, c) in a.iter().zip(b) {
        let diff = x - c;
        acc += diff * diff;
    }
    acc
}

/// Independent sums computed side by side by [`exact_eight`].
const EIGHT: usize = 8;

/// [`squared_distance`] of eight `(x, c)` pairs of equal length: eight independent sums, each
/// accumulated over dimensions in order exactly as the definition does, so that the dependency
/// chain of one sum no longer sets the pace.
#[inline]
fn exact_eight(xs: [&[f32]; EIGHT], cs: [&[f32]; EIGHT]) -> [f32; EIGHT] {
    let d = xs[0].len();
    let mut acc = [0f32; EIGHT];
    for i in 0..d {
        for l in 0..EIGHT {
            let diff = xs[l][i] - cs[l][i];
            acc[l] += diff * diff;
        }
    }
    acc
}

/// The exact squared distance ([`squared_distance`]) of every point to one given code,
/// `out[p] = ‖x_p − c_{codes_of[p]}‖²`: the error of an assignment made earlier, or the
/// distance a bound-based search needs to the code a point held before.
///
/// ```
/// let points = [0.0, 0.0, 3.0, 4.0];
/// let codes = [0.0, 1.0, 3.0, 0.0];
/// let mut out = [0.0; 2];
/// qcl_tensor::squared_distances_to_codes(&points, &codes, 2, &[1, 0], &mut out)?;
/// assert_eq!(out, [9.0, 18.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`nearest_codes_into_finite`] (points are not checked for finiteness), and
/// [`Error::InvalidParameter`] for a code index out of range.
pub fn squared_distances_to_codes(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    codes_of: &[u32],
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = validate_shapes(points, codes, dim, None)?;
    check_lengths(&[("codes_of", codes_of.len(), n), ("out", out.len(), n)])?;
    if let Some(p) = codes_of.iter().position(|&j| j as usize >= k) {
        return Err(Error::invalid_parameter(
            "codes_of",
            format!("point {p} names code {} of {k}", codes_of[p]),
        ));
    }
    points
        .par_chunks(PARALLEL_CHUNK * dim)
        .zip(codes_of.par_chunks(PARALLEL_CHUNK))
        .zip(out.par_chunks_mut(PARALLEL_CHUNK))
        .for_each(|((pts, of), dst)| {
            for ((xs, js), values) in pts
                .chunks(EIGHT * dim)
                .zip(of.chunks(EIGHT))
                .zip(dst.chunks_mut(EIGHT))
            {
                let last = js.len() - 1;
                let sums = exact_eight(
                    std::array::from_fn(|l| &xs[l.min(last) * dim..(l.min(last) + 1) * dim]),
                    std::array::from_fn(|l| {
                        let j = js[l.min(last)] as usize;
                        &codes[j * dim..(j + 1) * dim]
                    }),
                );
                values.copy_from_slice(&sums[..js.len()]);
            }
        });
    Ok(())
}

/// [`nearest_codes_into_finite`] that also bounds, per point `p` and group `g` of codes, the
/// distance to every code of `g` other than the nearest: `lower[p·groups + g] ≤ D(x_p, j)` for
/// every `j` with `group_of[j] = g` and `j ≠ indices[p]` (`+∞` for a group with no such code).
/// The bounds come from the GEMM screening scores, so they cost almost nothing beyond the
/// search; bound-based k-means starts from them. For `dim ≤` [`DIRECT_MAX_DIM`] the codes are
/// screened by GEMM too, to have the scores.
///
/// ```
/// use qcl_tensor::nearest_codes_with_group_bounds;
/// let points = [0.0, 0.0];
/// let codes = [1.0, 0.0, 3.0, 0.0, 0.0, 2.0];
/// let (mut idx, mut dist, mut lower) = ([0u32; 1], [0f32; 1], [0f32; 2]);
/// nearest_codes_with_group_bounds(&points, &codes, 2, &[0, 1, 0], 2, &mut idx, &mut dist, &mut lower)?;
/// assert_eq!((idx[0], dist[0]), (0, 1.0));
/// assert!(lower[0] <= 4.0 && lower[0] > 3.9); // code 2, the other member of group 0
/// assert!(lower[1] <= 9.0 && lower[1] > 8.9); // code 1
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`nearest_codes_into_finite`]; [`Error::ShapeMismatch`] for `group_of` not one group per
/// code or `lower` not `n·groups` long; [`Error::InvalidParameter`] for a group `≥ groups`.
#[allow(clippy::too_many_arguments)]
pub fn nearest_codes_with_group_bounds(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    group_of: &[u32],
    groups: usize,
    indices: &mut [u32],
    distances: &mut [f32],
    lower: &mut [f32],
) -> Result<()> {
    let (n, k) = validate_shapes(points, codes, dim, None)?;
    check_lengths(&[
        ("group_of", group_of.len(), k),
        ("indices", indices.len(), n),
        ("distances", distances.len(), n),
        ("lower", lower.len(), n * groups),
    ])?;
    if let Some(&g) = group_of.iter().find(|&&g| g as usize >= groups) {
        return Err(Error::invalid_parameter(
            "group_of",
            format!("group {g} of {groups}"),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let mut members = vec![Vec::new(); groups];
    for (j, &g) in group_of.iter().enumerate() {
        members[g as usize].push(j as u32);
    }
    let screen = GemmCodes::new(codes, dim, k, None);
    let tile = screen.tile_points();
    points
        .par_chunks(tile * dim)
        .zip(indices.par_chunks_mut(tile))
        .zip(distances.par_chunks_mut(tile))
        .zip(lower.par_chunks_mut(tile * groups))
        .for_each(|(((pts, idx), dst), low)| {
            with_scratch(tile * k, |scratch| {
                screen.search_tile_grouped(pts, scratch, (idx, dst), (group_of, &members), low)
            })
        });
    Ok(())
}

/// [`Error::ShapeMismatch`] for the first `(name, length, expected length)` that differs.
pub(crate) fn check_lengths(buffers: &[(&str, usize, usize)]) -> Result<()> {
    match buffers.iter().find(|(_, len, expected)| len != expected) {
        Some(&(name, len, expected)) => Err(Error::ShapeMismatch {
            context: name.into(),
            expected: format!("[{expected}]"),
            actual: vec![len],
        }),
        None => Ok(()),
    }
}

/// Checks shapes and finiteness; returns `(n, k)`.
fn validate(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
) -> Result<(usize, usize)> {
    let shape = validate_shapes(points, codes, dim, bias)?;
    check_finite_slice("points", points)?;
    Ok(shape)
}

/// Checks shapes, and finiteness of codes and bias; returns `(n, k)`.
pub(crate) fn validate_shapes(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
) -> Result<(usize, usize)> {
    if dim == 0 {
        return Err(Error::invalid_parameter(
            "dim",
            "points and codes need at least one dimension",
        ));
    }
    if !points.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            context: "points".into(),
            expected: format!("[*, {dim}]"),
            actual: vec![points.len()],
        });
    }
    if !codes.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            context: "codes".into(),
            expected: format!("[*, {dim}]"),
            actual: vec![codes.len()],
        });
    }
    let (n, k) = (points.len() / dim, codes.len() / dim);
    if k == 0 {
        return Err(Error::EmptyInput("no codes to search".into()));
    }
    if k > u32::MAX as usize {
        return Err(Error::invalid_parameter("codes", "more than 2^32 codes"));
    }
    if let Some(b) = bias {
        if b.len() != k {
            return Err(Error::ShapeMismatch {
                context: "bias".into(),
                expected: format!("[{k}]"),
                actual: vec![b.len()],
            });
        }
        check_finite_slice("bias", b)?;
    }
    check_finite_slice("codes", codes)?;
    Ok((n, k))
}

/// Nearest code of every point (see the module documentation for the exact definition).
///
/// ```
/// use qcl_tensor::nearest_codes;
/// let points = [0.0, 0.0, 10.0, 10.0];
/// let codes = [9.0, 9.0, 1.0, 0.0];
/// let found = nearest_codes(&points, &codes, 2, None)?;
/// assert_eq!(found.indices, vec![1, 0]);
/// assert_eq!(found.distances, vec![1.0, 2.0]);
/// // A bias (e.g. a code's rate) shifts the choice.
/// let found = nearest_codes(&points, &codes, 2, Some(&[0.0, 500.0]))?;
/// assert_eq!(found.indices, vec![0, 0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for `dim == 0`, [`Error::ShapeMismatch`] for slices that are not
/// whole rows or a bias of the wrong length, [`Error::EmptyInput`] without codes,
/// [`Error::NonFinite`] for a NaN or infinity anywhere.
pub fn nearest_codes(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
) -> Result<Nearest> {
    let n = points.len() / dim.max(1);
    let mut indices = vec![0u32; n];
    let mut distances = vec![0f32; n];
    nearest_codes_into(points, codes, dim, bias, &mut indices, &mut distances)?;
    Ok(Nearest { indices, distances })
}

/// [`nearest_codes`] writing into caller-owned buffers (of length `n`), for loops that search
/// many times.
///
/// # Errors
/// As [`nearest_codes`], and [`Error::ShapeMismatch`] for output buffers of the wrong length.
pub fn nearest_codes_into(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
    indices: &mut [u32],
    distances: &mut [f32],
) -> Result<()> {
    let shape = validate(points, codes, dim, bias)?;
    search_into(points, codes, dim, shape, bias, indices, distances)
}

/// [`nearest_codes_into`] without the finiteness check of `points`, for callers that searched
/// the same, already validated points before (k-means checks its data once, not at every
/// iteration). Shapes, codes and bias are still checked. For points holding NaN or infinity the
/// indices are unspecified (but in range).
///
/// # Errors
/// As [`nearest_codes_into`], except [`Error::NonFinite`] for points.
// Repeats `nearest_codes_into`'s parameters: public twins that differ in one check of points.
pub fn nearest_codes_into_finite(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
    indices: &mut [u32],
    distances: &mut [f32],
) -> Result<()> {
    let shape = validate_shapes(points, codes, dim, bias)?;
    search_into(points, codes, dim, shape, bias, indices, distances)
}

/// The search itself, on validated input of `(n, k)` points and codes.
fn search_into(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
    indices: &mut [u32],
    distances: &mut [f32],
) -> Result<()> {
    check_lengths(&[
        ("indices", indices.len(), n),
        ("distances", distances.len(), n),
    ])?;
    if n == 0 {
        return Ok(());
    }
    if dim <= DIRECT_MAX_DIM {
        let prepared = DirectCodes::new(codes, dim, k, bias);
        points
            .par_chunks(PARALLEL_CHUNK * dim)
            .zip(indices.par_chunks_mut(PARALLEL_CHUNK))
            .zip(distances.par_chunks_mut(PARALLEL_CHUNK))
            .for_each(|((pts, idx), dst)| direct_search(pts, &prepared, idx, dst));
    } else {
        let screen = GemmCodes::new(codes, dim, k, bias);
        let tile = screen.tile_points();
        points
            .par_chunks(tile * dim)
            .zip(indices.par_chunks_mut(tile))
            .zip(distances.par_chunks_mut(tile))
            .for_each(|((pts, idx), dst)| {
                with_scratch(tile * k, |scratch| {
                    screen.search_tile(pts, scratch, idx, dst)
                })
            });
    }
    Ok(())
}

/// Candidate `(point, code)` pairs and their exact distances.
type CandidateBuffers = (Vec<(u32, u32)>, Vec<f32>);

thread_local! {
    /// Candidate `(point, code)` pairs of a tile and their exact distances, reused across calls.
    static CANDIDATES: std::cell::RefCell<CandidateBuffers> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Per-thread screening buffer, reused across calls: fresh buffers cost page faults.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, work: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buffer = cell.borrow_mut();
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        work(&mut buffer[..len])
    })
}

/// The smallest value of `row` (NaN ignored), in 16 independent lanes so that it vectorises.
#[inline]
fn row_min(row: &[f32]) -> f32 {
    let mut lanes = [f32::INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            lanes[l] = if chunk[l] < lanes[l] {
                chunk[l]
            } else {
                lanes[l]
            };
        }
    }
    let mut best = chunks
        .remainder()
        .iter()
        .fold(f32::INFINITY, |m, &v| if v < m { v } else { m });
    for v in lanes {
        best = if v < best { v } else { best };
    }
    best
}

/// Calls `visit(j)` for every `j` with `row[j] <= limit` or `row[j]` NaN, in increasing order;
/// 16 comparisons at a time into a bit mask, since hits are rare.
#[inline]
fn for_each_at_most(row: &[f32], limit: f32, mut visit: impl FnMut(usize)) {
    let mut chunks = row.chunks_exact(LANES);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut mask = 0u32;
        for (l, &v) in chunk.iter().enumerate() {
            mask |= u32::from(v <= limit || v.is_nan()) << l;
        }
        while mask != 0 {
            visit(base + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
        base += LANES;
    }
    for (j, &v) in chunks.remainder().iter().enumerate() {
        if v <= limit || v.is_nan() {
            visit(base + j);
        }
    }
}

/// The `top_k` nearest codes of every point, sorted by distance (ties: lower index first),
/// row-major `[n, top_k]`.
///
/// ```
/// let points = [0.0];
/// let codes = [3.0, -1.0, 1.0, 2.0];
/// let found = qcl_tensor::top_k_codes(&points, &codes, 1, None, 3)?;
/// assert_eq!(found.indices, vec![1, 2, 3]);
/// assert_eq!(found.distances, vec![1.0, 1.0, 4.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`nearest_codes`], and [`Error::InvalidParameter`] unless `1 <= top_k <= k`.
pub fn top_k_codes(
    points: &[f32],
    codes: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
    top_k: usize,
) -> Result<Nearest> {
    let (n, k) = validate(points, codes, dim, bias)?;
    if top_k == 0 || top_k > k {
        return Err(Error::invalid_parameter(
            "top_k",
            format!("must be in 1..={k}, got {top_k}"),
        ));
    }
    let mut indices = vec![0u32; n * top_k];
    let mut distances = vec![0f32; n * top_k];
    if n == 0 {
        return Ok(Nearest { indices, distances });
    }
    let screen = GemmCodes::new(codes, dim, k, bias);
    let tile = screen.tile_points();
    points
        .par_chunks(tile * dim)
        .zip(indices.par_chunks_mut(tile * top_k))
        .zip(distances.par_chunks_mut(tile * top_k))
        .for_each_init(Vec::new, |candidates, ((pts, idx), dst)| {
            with_scratch(tile * k, |scratch| {
                screen.top_k_tile(pts, top_k, scratch, candidates, idx, dst)
            })
        });
    Ok(Nearest { indices, distances })
}

/// All squared distances `‖x_p − c_j‖²`, row-major `[n, k]`, computed as
/// `‖x‖² + ‖c‖² − 2·x·c` by GEMM in fixed tiles and clamped at zero.
///
/// Unlike [`nearest_codes`] this is exact only up to rounding, and it materialises `n × k`: it is
/// meant for a few codes at a time (k-means++ candidates, diagnostics). It is deterministic
/// whatever the thread count.
///
/// ```
/// let d = qcl_tensor::pairwise_squared_distances(&[0.0, 0.0], &[3.0, 4.0, 0.0, 1.0], 2)?;
/// assert_eq!(d, vec![25.0, 1.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`nearest_codes`].
pub fn pairwise_squared_distances(points: &[f32], codes: &[f32], dim: usize) -> Result<Vec<f32>> {
    let (n, k) = validate(points, codes, dim, None)?;
    let mut out = vec![0f32; n * k];
    if n == 0 {
        return Ok(out);
    }
    let screen = GemmCodes::new(codes, dim, k, None);
    let tile = screen.tile_points();
    points
        .par_chunks(tile * dim)
        .zip(out.par_chunks_mut(tile * k))
        .for_each(|(pts, dst)| {
            screen.screen(pts, dst);
            for (row, x) in dst.chunks_mut(k).zip(pts.chunks(dim)) {
                let x_norm: f32 = x.iter().map(|v| v * v).sum();
                for v in row.iter_mut() {
                    *v = (*v + x_norm).max(0.0);
                }
            }
        });
    Ok(out)
}

/// The codes being searched, with what every kernel needs of them: the exact distance, the
/// screening offsets `‖c_j‖² + bias_j`, and the rounding margin of a screening score.
struct CodeSet<'a> {
    codes: &'a [f32],
    bias: Option<&'a [f32]>,
    dim: usize,
    k: usize,
    /// `‖c_j‖² + bias_j`.
    offset: Vec<f32>,
    /// `max_j ‖c_j‖`.
    max_norm: f32,
    /// `max_j |bias_j|`.
    max_bias: f32,
}

impl<'a> CodeSet<'a> {
    fn new(codes: &'a [f32], dim: usize, k: usize, bias: Option<&'a [f32]>) -> Self {
        let norms: Vec<f32> = codes
            .chunks(dim)
            .map(|c| c.iter().map(|v| v * v).sum())
            .collect();
        let offset = (0..k)
            .map(|j| norms[j] + bias.map_or(0.0, |b| b[j]))
            .collect();
        let max_norm = norms.iter().fold(0f32, |m, &v| m.max(v)).sqrt();
        let max_bias = bias.map_or(0.0, |b| b.iter().fold(0f32, |m, v| m.max(v.abs())));
        CodeSet {
            codes,
            bias,
            dim,
            k,
            offset,
            max_norm,
            max_bias,
        }
    }

    /// Exact `D(x, j)`.
    fn exact(&self, x: &[f32], j: usize) -> f32 {
        squared_distance(x, &self.codes[j * self.dim..(j + 1) * self.dim])
            + self.bias.map_or(0.0, |b| b[j])
    }

    /// An upper bound on how far the screening score of any code can sit from its exact
    /// distance, doubled twice for safety: rounding of the dot product (≤ d·u·‖x‖‖c‖), of the
    /// norms, of the exact sum (≤ d·u·(‖x‖+‖c‖)²) and of the bias.
    fn margin(&self, x_norm: f32) -> f32 {
        let scale = (x_norm + self.max_norm).powi(2) + self.max_bias;
        (4 * self.dim + 16) as f32 * f32::EPSILON * scale
    }

    /// The nearest code by the definition, scanning every code: the fallback for points whose
    /// screening scores overflowed.
    fn nearest_by_definition(&self, x: &[f32]) -> (u32, f32) {
        let (mut index, mut value) = (0, self.exact(x, 0));
        for j in 1..self.k {
            let exact = self.exact(x, j);
            if exact < value {
                (index, value) = (j, exact);
            }
        }
        (index as u32, value)
    }

    /// The code of least exact distance among those `candidates` visits (in increasing
    /// order, so ties keep the lowest index); when every candidate's distance overflowed, the
    /// definition over all codes.
    fn pick_exact(&self, x: &[f32], candidates: impl FnOnce(&mut dyn FnMut(usize))) -> (u32, f32) {
        let mut best: Option<(usize, f32)> = None;
        candidates(&mut |j| {
            let exact = self.exact(x, j);
            if best.is_none_or(|(_, v)| exact < v) {
                best = Some((j, exact));
            }
        });
        match best {
            Some((index, value)) if value.is_finite() => (index as u32, value),
            _ => self.nearest_by_definition(x),
        }
    }
}

/// Codes in the screening form of the direct kernels: `−2·c` transposed to `[d][k_padded]`,
/// and the offsets padded with infinity (so the padding never wins).
struct DirectCodes<'a> {
    set: CodeSet<'a>,
    padded: usize,
    scaled: Vec<f32>,
    padded_offset: Vec<f32>,
}

impl<'a> DirectCodes<'a> {
    fn new(codes: &'a [f32], dim: usize, k: usize, bias: Option<&'a [f32]>) -> Self {
        let set = CodeSet::new(codes, dim, k, bias);
        let padded = k.div_ceil(LANES) * LANES;
        let mut scaled = vec![0f32; dim * padded];
        for j in 0..k {
            for i in 0..dim {
                scaled[i * padded + j] = -2.0 * codes[j * dim + i];
            }
        }
        let mut padded_offset = vec![f32::INFINITY; padded];
        padded_offset[..k].copy_from_slice(&set.offset);
        DirectCodes {
            set,
            padded,
            scaled,
            padded_offset,
        }
    }
}

fn direct_search(points: &[f32], codes: &DirectCodes, indices: &mut [u32], distances: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { direct_search_avx512(points, codes, indices, distances) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { direct_search_avx2(points, codes, indices, distances) };
        }
    }
    direct_search_body(points, codes, indices, distances)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn direct_search_avx512(
    points: &[f32],
    codes: &DirectCodes,
    indices: &mut [u32],
    distances: &mut [f32],
) {
    let d = codes.set.dim;
    let n = points.len() / d;
    let full = n / POINT_BLOCK * POINT_BLOCK;
    let mut p = 0;
    while p < full {
        // SAFETY: AVX-512F is enabled on this function; the block holds POINT_BLOCK points.
        unsafe {
            direct_block_avx512(
                &points[p * d..(p + POINT_BLOCK) * d],
                codes,
                &mut indices[p..p + POINT_BLOCK],
                &mut distances[p..p + POINT_BLOCK],
            );
        }
        p += POINT_BLOCK;
    }
    if p < n {
        direct_search_body(
            &points[p * d..],
            codes,
            &mut indices[p..],
            &mut distances[p..],
        );
    }
}

/// `POINT_BLOCK` points against every code with AVX-512: a screening pass computes
/// `‖c‖² + bias − 2·x·c` for 16 codes at a time with FMA (one instruction per dimension), keeps
/// the scores and their minimum, then every code whose score lies within the rounding margin
/// of the minimum is re-scored exactly with [`squared_distance`]. The result is that of the
/// definition (see the module documentation), ties to the lowest index.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn direct_block_avx512(
    points: &[f32],
    codes: &DirectCodes,
    indices: &mut [u32],
    distances: &mut [f32],
) {
    use std::arch::x86_64::*;
    const P: usize = POINT_BLOCK;
    let d = codes.set.dim;
    let padded = codes.padded;
    assert!(points.len() == P * d && indices.len() == P && distances.len() == P);
    assert!(codes.scaled.len() == d * padded && codes.padded_offset.len() == padded);
    // Screening scores of the block, `[P][padded]`, reused across calls on this thread.
    SCORES.with(|cell| {
        let mut scores = cell.borrow_mut();
        if scores.len() < P * padded {
            scores.resize(P * padded, 0.0);
        }
        // Constant offsets for the broadcasts below, instead of `q·d + i`.
        let transposed = transpose_block(points, d);
        let (scaled, offsets, k) = (
            codes.scaled.as_ptr(),
            codes.padded_offset.as_ptr(),
            codes.set.k,
        );
        let mut lane_min = [_mm512_set1_ps(f32::INFINITY); P];
        let mut block = 0;
        while block < padded {
            // SAFETY: block + 16 <= padded = offset.len().
            let offset = unsafe { _mm512_loadu_ps(offsets.add(block)) };
            let mut acc = [offset; P];
            for (i, column) in transposed.iter().enumerate().take(d) {
                // SAFETY: i < d and block + 16 <= padded, checked by the asserts above.
                let c = unsafe { _mm512_loadu_ps(scaled.add(i * padded + block)) };
                for q in 0..P {
                    *acc.get_mut(q).expect("q < P") =
                        _mm512_fmadd_ps(_mm512_set1_ps(column[q]), c, acc[q]);
                }
            }
            for q in 0..P {
                // SAFETY: q·padded + block + 16 <= P·padded <= scores.len().
                unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(q * padded + block), acc[q]) };
                lane_min[q] = _mm512_min_ps(lane_min[q], acc[q]);
            }
            block += LANES;
        }
        for q in 0..P {
            let x = &points[q * d..(q + 1) * d];
            let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            let limit = _mm512_reduce_min_ps(lane_min[q]) + codes.set.margin(x_norm);
            let limit_v = _mm512_set1_ps(limit);
            let (index, value) = codes.set.pick_exact(x, |visit| {
                let mut block = 0;
                while block < padded {
                    // SAFETY: q·padded + block + 16 <= P·padded <= scores.len().
                    let s = unsafe { _mm512_loadu_ps(scores.as_ptr().add(q * padded + block)) };
                    // Not greater than the limit, NaN included (overflow is re-scored exactly).
                    let mut mask = _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(s, limit_v);
                    while mask != 0 {
                        let j = block + mask.trailing_zeros() as usize;
                        mask &= mask - 1;
                        if j < k {
                            visit(j);
                        }
                    }
                    block += LANES;
                }
            });
            indices[q] = index;
            distances[q] = value;
        }
    })
}

thread_local! {
    /// Screening scores of the direct kernels, reused across calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn direct_search_avx2(
    points: &[f32],
    codes: &DirectCodes,
    indices: &mut [u32],
    distances: &mut [f32],
) {
    direct_search_body(points, codes, indices, distances)
}

/// Up to `POINT_BLOCK` points of dimension `d` transposed to `[d][POINT_BLOCK]`, zero past
/// the last point and the last dimension.
#[inline(always)]
fn transpose_block(points: &[f32], d: usize) -> [[f32; POINT_BLOCK]; DIRECT_MAX_DIM] {
    let rows = points.len() / d;
    let mut transposed = [[0f32; POINT_BLOCK]; DIRECT_MAX_DIM];
    for (i, column) in transposed.iter_mut().enumerate().take(d) {
        for (q, value) in column.iter_mut().enumerate().take(rows) {
            *value = points[q * d + i];
        }
    }
    transposed
}

// Opens like `direct_search_avx512`: the two drivers stay apart, each built for its own ISA.
#[inline(always)]
fn direct_search_body(
    points: &[f32],
    codes: &DirectCodes,
    indices: &mut [u32],
    distances: &mut [f32],
) {
    let d = codes.set.dim;
    let n = points.len() / d;
    let mut p = 0;
    while p < n {
        let size = POINT_BLOCK.min(n - p);
        direct_block_portable(
            &points[p * d..(p + size) * d],
            codes,
            &mut indices[p..p + size],
            &mut distances[p..p + size],
        );
        p += size;
    }
}

/// Up to `POINT_BLOCK` points against every code in portable Rust: the screening scores
/// `‖c‖² + bias − 2·x·c` are accumulated 16 codes at a time in plain arrays (which the
/// compiler vectorises for the enabled instruction set), then every code within the rounding
/// margin of the best score is re-scored exactly. Same result as the AVX-512 kernel.
#[inline(always)]
fn direct_block_portable(
    points: &[f32],
    codes: &DirectCodes,
    indices: &mut [u32],
    distances: &mut [f32],
) {
    let (d, padded) = (codes.set.dim, codes.padded);
    let rows = points.len() / d;
    SCORES.with(|cell| {
        let mut scores = cell.borrow_mut();
        if scores.len() < POINT_BLOCK * padded {
            scores.resize(POINT_BLOCK * padded, 0.0);
        }
        // Constant loop bounds below, so that they vectorise.
        let transposed = transpose_block(points, d);
        let mut block = 0;
        while block < padded {
            let offset: &[f32; LANES] = codes.padded_offset[block..][..LANES]
                .try_into()
                .expect("LANES");
            let mut acc = [*offset; POINT_BLOCK];
            for (i, column) in transposed.iter().enumerate().take(d) {
                let c: &[f32; LANES] = codes.scaled[i * padded + block..][..LANES]
                    .try_into()
                    .expect("LANES");
                for (a, &x) in acc.iter_mut().zip(column) {
                    for (slot, &cl) in a.iter_mut().zip(c) {
                        *slot += x * cl;
                    }
                }
            }
            for (q, a) in acc.iter().enumerate().take(rows) {
                scores[q * padded + block..][..LANES].copy_from_slice(a);
            }
            block += LANES;
        }
        for q in 0..rows {
            let x = &points[q * d..(q + 1) * d];
            let row = &scores[q * padded..q * padded + codes.set.k];
            let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            let limit = row_min(row) + codes.set.margin(x_norm);
            let (index, value) = codes
                .set
                .pick_exact(x, |visit| for_each_at_most(row, limit, visit));
            indices[q] = index;
            distances[q] = value;
        }
    })
}

/// Codes prepared for GEMM screening.
struct GemmCodes<'a> {
    set: CodeSet<'a>,
}

impl<'a> GemmCodes<'a> {
    fn new(codes: &'a [f32], dim: usize, k: usize, bias: Option<&'a [f32]>) -> Self {
        GemmCodes {
            set: CodeSet::new(codes, dim, k, bias),
        }
    }

    /// Points per tile: the tile's `points × k` scores stay within about 1 MiB.
    fn tile_points(&self) -> usize {
        (262_144 / self.set.k).clamp(16, 512)
    }

    /// Fills `scratch[p·k + j] = −2·x_p·c_j + ‖c_j‖² + bias_j` for the tile's points.
    fn screen(&self, points: &[f32], scratch: &mut [f32]) {
        let rows = points.len() / self.set.dim;
        let (d, k) = (self.set.dim, self.set.k);
        debug_assert!(scratch.len() >= rows * k);
        // SAFETY: dst is rows×k (row stride k), lhs rows×d (row stride d), rhs d×k read from the
        // k×d codes with row stride 1 and column stride d; all within the slices' bounds.
        unsafe {
            gemm::gemm(
                rows,
                k,
                d,
                scratch.as_mut_ptr(),
                1,
                k as isize,
                false,
                points.as_ptr(),
                1,
                d as isize,
                self.set.codes.as_ptr(),
                d as isize,
                1,
                0.0,
                -2.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for row in scratch[..rows * k].chunks_mut(k) {
            for (s, o) in row.iter_mut().zip(&self.set.offset) {
                *s += o;
            }
        }
    }

    fn search_tile(
        &self,
        points: &[f32],
        scratch: &mut [f32],
        indices: &mut [u32],
        distances: &mut [f32],
    ) {
        let (d, k) = (self.set.dim, self.set.k);
        self.screen(points, scratch);
        CANDIDATES.with(|cell| {
            let (pairs, exact) = &mut *cell.borrow_mut();
            pairs.clear();
            // Every (point, code) whose screening score is within the margin of the point's
            // best, in point order then code order. NaN scores (overflow) are included.
            for (p, x) in points.chunks(d).enumerate() {
                let row = &scratch[p * k..(p + 1) * k];
                let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                let limit = row_min(row) + self.set.margin(x_norm);
                for_each_at_most(row, limit, |j| pairs.push((p as u32, j as u32)));
            }
            exact.clear();
            exact.resize(pairs.len(), 0.0);
            self.exact_pairs(points, pairs, exact);
            let mut best: Vec<Option<(u32, f32)>> = vec![None; points.len() / d];
            for (&(p, j), &value) in pairs.iter().zip(exact.iter()) {
                let slot = &mut best[p as usize];
                if slot.is_none_or(|(_, v)| value < v) {
                    *slot = Some((j, value));
                }
            }
            for (p, x) in points.chunks(d).enumerate() {
                let (index, value) = match best[p] {
                    Some((j, v)) if v.is_finite() => (j, v),
                    // Overflowing scores: the definition over every code.
                    _ => self.set.nearest_by_definition(x),
                };
                indices[p] = index;
                distances[p] = value;
            }
        })
    }

    /// [`search_tile`](Self::search_tile), and per point and group a lower bound on the
    /// distance to every code of the group but the nearest: the smallest screening score,
    /// plus `‖x‖²`, minus twice the margin (0 where a score overflowed).
    fn search_tile_grouped(
        &self,
        points: &[f32],
        scratch: &mut [f32],
        found: (&mut [u32], &mut [f32]),
        (group_of, members): (&[u32], &[Vec<u32>]),
        lower: &mut [f32],
    ) {
        let (d, k) = (self.set.dim, self.set.k);
        let (indices, distances) = found;
        self.search_tile(points, scratch, indices, distances);
        let t = members.len();
        for (p, x) in points.chunks(d).enumerate() {
            let x_squared = x.iter().map(|v| v * v).sum::<f32>();
            let slack = 2.0 * self.set.margin(x_squared.sqrt());
            let row = &scratch[p * k..(p + 1) * k];
            let bounds = &mut lower[p * t..(p + 1) * t];
            // An overflowed (NaN) score anywhere: no bounds for this point.
            if row.iter().any(|v| v.is_nan()) {
                bounds.fill(0.0);
                continue;
            }
            let to_bound = |smallest: f32| {
                if smallest.is_finite() {
                    (smallest + x_squared - slack).max(0.0)
                } else {
                    smallest
                }
            };
            for (bound, group) in bounds.iter_mut().zip(members) {
                // One gather per group, without branches.
                let smallest = group
                    .iter()
                    .fold(f32::INFINITY, |m, &j| m.min(row[j as usize]));
                *bound = to_bound(smallest);
            }
            // The nearest code's own group: its bound leaves that code out.
            let own = group_of[indices[p] as usize] as usize;
            let smallest = members[own]
                .iter()
                .filter(|&&j| j != indices[p])
                .fold(f32::INFINITY, |m, &j| m.min(row[j as usize]));
            bounds[own] = to_bound(smallest);
        }
    }

    /// Exact `D(x_p, j)` for each `(p, j)` pair, eight pairs at a time ([`exact_eight`]).
    fn exact_pairs(&self, points: &[f32], pairs: &[(u32, u32)], out: &mut [f32]) {
        let d = self.set.dim;
        for (group, values) in pairs.chunks(EIGHT).zip(out.chunks_mut(EIGHT)) {
            let pick = |l: usize| group[l.min(group.len() - 1)];
            let sums = exact_eight(
                std::array::from_fn(|l| {
                    let p = pick(l).0 as usize;
                    &points[p * d..(p + 1) * d]
                }),
                std::array::from_fn(|l| {
                    let j = pick(l).1 as usize;
                    &self.set.codes[j * d..(j + 1) * d]
                }),
            );
            for (l, value) in values.iter_mut().enumerate() {
                *value = sums[l] + self.set.bias.map_or(0.0, |b| b[group[l].1 as usize]);
            }
        }
    }

    fn top_k_tile(
        &self,
        points: &[f32],
        top_k: usize,
        scratch: &mut [f32],
        candidates: &mut Vec<(f32, u32)>,
        indices: &mut [u32],
        distances: &mut [f32],
    ) {
        let (d, k) = (self.set.dim, self.set.k);
        self.screen(points, scratch);
        for (p, x) in points.chunks(d).enumerate() {
            let row = &scratch[p * k..(p + 1) * k];
            // The top_k-th smallest screening score, plus the margin, bounds the exact top_k.
            candidates.clear();
            candidates.extend(row.iter().enumerate().map(|(j, &s)| (s, j as u32)));
            let kth = if candidates.iter().any(|(s, _)| !s.is_finite()) {
                f32::INFINITY
            } else {
                candidates.select_nth_unstable_by(top_k - 1, |a, b| a.0.total_cmp(&b.0));
                candidates[top_k - 1].0
            };
            let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            let limit = kth + 2.0 * self.set.margin(x_norm);
            candidates.clear();
            for (j, &s) in row.iter().enumerate() {
                if s <= limit || s.is_nan() {
                    candidates.push((self.set.exact(x, j), j as u32));
                }
            }
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for (t, &(v, j)) in candidates.iter().take(top_k).enumerate() {
                indices[p * top_k + t] = j;
                distances[p * top_k + t] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, literally.
    fn brute_force(points: &[f32], codes: &[f32], dim: usize, bias: Option<&[f32]>) -> Nearest {
        let mut indices = Vec::new();
        let mut distances = Vec::new();
        for x in points.chunks(dim) {
            let mut best = (0usize, f32::INFINITY);
            for (j, c) in codes.chunks(dim).enumerate() {
                let v = squared_distance(x, c) + bias.map_or(0.0, |b| b[j]);
                if j == 0 || v < best.1 {
                    best = (j, v);
                }
            }
            indices.push(best.0 as u32);
            distances.push(best.1);
        }
        Nearest { indices, distances }
    }

    /// Random data with many exact ties: values on a coarse grid, codes duplicated.
    fn data(seed: u64, n: usize, k: usize, dim: usize, grid: bool) -> (Vec<f32>, Vec<f32>) {
        let mut rng = crate::Seed(seed).rng();
        let mut draw = |len: usize| -> Vec<f32> {
            rng.uniform_vec(len, -3.0, 3.0)
                .into_iter()
                .map(|v| if grid { v.round() } else { v })
                .collect()
        };
        let points = draw(n * dim);
        let mut codes = draw(k * dim);
        if k >= 2 {
            let (first, rest) = codes.split_at_mut(dim);
            rest[..dim].copy_from_slice(first);
        }
        (points, codes)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn equals_brute_force_exactly(
            seed in any::<u64>(), n in 0usize..40, k in 1usize..70,
            dim in prop::sample::select(vec![1usize, 2, 3, 9, 16, 31, 32, 33, 64, 100]),
            grid in any::<bool>(), with_bias in any::<bool>(),
        ) {
            let (points, codes) = data(seed, n, k, dim, grid);
            let bias: Option<Vec<f32>> = with_bias.then(|| (0..k).map(|j| (j % 3) as f32).collect());
            let got = nearest_codes(&points, &codes, dim, bias.as_deref()).unwrap();
            let want = brute_force(&points, &codes, dim, bias.as_deref());
            prop_assert_eq!(got.indices, want.indices);
            prop_assert_eq!(got.distances, want.distances);
        }

        /// The portable kernel (used on CPUs without AVX-512, and for the last points of a
        /// chunk) driven directly, so that it is tested on every machine.
        #[test]
        fn portable_direct_kernel_equals_brute_force(
            seed in any::<u64>(), n in 0usize..40, k in 1usize..70,
            dim in 1usize..=DIRECT_MAX_DIM, grid in any::<bool>(), with_bias in any::<bool>(),
        ) {
            let (points, codes) = data(seed, n, k, dim, grid);
            let bias: Option<Vec<f32>> = with_bias.then(|| (0..k).map(|j| (j % 3) as f32).collect());
            let prepared = DirectCodes::new(&codes, dim, k, bias.as_deref());
            let mut indices = vec![0u32; n];
            let mut distances = vec![0f32; n];
            direct_search_body(&points, &prepared, &mut indices, &mut distances);
            let want = brute_force(&points, &codes, dim, bias.as_deref());
            prop_assert_eq!(indices, want.indices);
            prop_assert_eq!(distances, want.distances);
        }

        #[test]
        fn top_k_is_the_sorted_prefix_of_brute_force(
            seed in any::<u64>(), n in 1usize..10, k in 1usize..40,
            dim in prop::sample::select(vec![1usize, 4, 9, 40]), grid in any::<bool>(),
        ) {
            let (points, codes) = data(seed, n, k, dim, grid);
            let top = (k / 2).max(1);
            let got = top_k_codes(&points, &codes, dim, None, top).unwrap();
            for (p, x) in points.chunks(dim).enumerate() {
                let mut all: Vec<(f32, u32)> = codes.chunks(dim).enumerate()
                    .map(|(j, c)| (squared_distance(x, c), j as u32)).collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let want: Vec<u32> = all.iter().take(top).map(|a| a.1).collect();
                prop_assert_eq!(&got.indices[p * top..(p + 1) * top], want.as_slice());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Distances to given codes are the definition's, bit for bit, in every position of
        /// the eight-wide groups (including a partial last group).
        #[test]
        fn distances_to_given_codes_are_the_definition(seed in any::<u64>(), n in 1usize..40, k in 1usize..12, dim in 1usize..50) {
            let (points, codes) = data(seed, n, k, dim, seed % 2 == 0);
            let codes_of: Vec<u32> = (0..n).map(|p| ((p as u64 * 7 + seed) % k as u64) as u32).collect();
            let mut out = vec![0f32; n];
            squared_distances_to_codes(&points, &codes, dim, &codes_of, &mut out).unwrap();
            for p in 0..n {
                let j = codes_of[p] as usize;
                prop_assert_eq!(out[p].to_bits(), squared_distance(&points[p * dim..(p + 1) * dim], &codes[j * dim..(j + 1) * dim]).to_bits());
            }
            let mut bad = codes_of.clone();
            bad[n - 1] = k as u32;
            prop_assert!(squared_distances_to_codes(&points, &codes, dim, &bad, &mut out).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The search with group bounds finds what the plain search finds, and every bound is
        /// at most the distance to each member of its group other than the nearest.
        #[test]
        fn group_bounds_hold(seed in any::<u64>(), n in 1usize..30, k in 1usize..40, dim in 1usize..70, t in 1usize..5) {
            let (points, codes) = data(seed, n, k, dim, seed % 2 == 0);
            let group_of: Vec<u32> = (0..k).map(|j| (j % t) as u32).collect();
            let (mut idx, mut dist, mut lower) = (vec![0u32; n], vec![0f32; n], vec![0f32; n * t]);
            nearest_codes_with_group_bounds(&points, &codes, dim, &group_of, t, &mut idx, &mut dist, &mut lower).unwrap();
            let plain = nearest_codes(&points, &codes, dim, None).unwrap();
            prop_assert_eq!(&idx, &plain.indices);
            prop_assert_eq!(&dist, &plain.distances);
            for p in 0..n {
                for j in 0..k {
                    if j as u32 != idx[p] {
                        let exact = squared_distance(&points[p * dim..(p + 1) * dim], &codes[j * dim..(j + 1) * dim]);
                        prop_assert!(lower[p * t + j % t] <= exact, "p {} j {}: {} > {}", p, j, lower[p * t + j % t], exact);
                    }
                }
            }
        }
    }

    #[test]
    fn same_result_with_one_and_two_threads() {
        let (points, codes) = data(5, 3000, 37, 50, false);
        let run = |threads| {
            crate::on_threads(threads, || nearest_codes(&points, &codes, 50, None))
                .unwrap()
                .unwrap()
        };
        assert_eq!(run(1), run(2));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let ok = [0f32; 4];
        assert!(matches!(
            nearest_codes(&ok, &ok, 0, None),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            nearest_codes(&ok, &ok, 3, None),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            nearest_codes(&ok, &[], 2, None),
            Err(Error::EmptyInput(_))
        ));
        assert!(matches!(
            nearest_codes(&ok, &ok, 2, Some(&[1.0])),
            Err(Error::ShapeMismatch { .. })
        ));
        let nan = [0.0, f32::NAN];
        assert!(matches!(
            nearest_codes(&nan, &ok, 2, None),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            nearest_codes(&ok, &nan, 2, None),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            nearest_codes(&ok, &ok, 2, Some(&[0.0, f32::INFINITY])),
            Err(Error::NonFinite { .. })
        ));
        assert!(top_k_codes(&ok, &ok, 2, None, 3).is_err());
        assert!(top_k_codes(&ok, &ok, 2, None, 0).is_err());
        let mut short = [0u32; 1];
        let mut dist = [0f32; 2];
        assert!(nearest_codes_into(&ok, &ok, 2, None, &mut short, &mut dist).is_err());
    }

    #[test]
    fn huge_values_that_overflow_follow_the_definition() {
        let points = [3e38f32, -3e38, 1.0, 1.0];
        let codes = [-3e38f32, 3e38, 0.0, 0.0, 1.0, 1.0];
        let got = nearest_codes(&points, &codes, 2, None).unwrap();
        assert_eq!(got, brute_force(&points, &codes, 2, None));
        // The same through the GEMM path.
        let wide = |v: &[f32]| -> Vec<f32> {
            v.chunks(2)
                .flat_map(|r| r.iter().copied().cycle().take(40))
                .collect()
        };
        let got = nearest_codes(&wide(&points), &wide(&codes), 40, None).unwrap();
        assert_eq!(got, brute_force(&wide(&points), &wide(&codes), 40, None));
    }
}
