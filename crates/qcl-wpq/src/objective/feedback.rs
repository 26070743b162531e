//! Error feedback: quantize column blocks in order and push each block's error onto the columns
//! not yet quantized through the inverse Hessian of the layer inputs (GPTQ, Frantar et al.,
//! ICLR 2023, Algorithm 1; its vector form, GPTVQ, van Baalen et al. 2024).
//!
//! With `U` the upper Cholesky factor of `H⁻¹` (`H⁻¹ = UᵀU`), the inverse Hessian of the
//! columns from `S` on, restricted to `S`, is `U_SSᵀU_SS`; quantizing block `S` of a row to `q`
//! with the later columns re-optimised costs `‖(w_S − q)U_SS⁻¹‖²`, and the optimal update of the
//! later columns is `−E·U[S, after]` with `E = (w_S − q)U_SS⁻¹`. Updates are applied lazily per
//! batch of about 128 columns, as GPTQ does.

use std::collections::BTreeMap;
use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatRef, Par, Side};
use qcl_tensor::{nearest_codes, Error, Result};

use crate::objective::Quadratic;
use crate::scalar::{dequantize, grid, quantize, ScalarCodes};

/// The upper-triangular `U` with `UᵀU = (H + λI)⁻¹`, `λ = damp·mean(diag H)`, raised tenfold
/// until both Cholesky factorisations succeed (the identity for `H = I`).
///
/// # Errors
/// [`Error::InvalidParameter`] for a negative or non-finite `damp`, inputs that are all zero, or
/// an `H` that stays indefinite.
pub(crate) fn inverse_factor(quad: &Quadratic, damp: f64) -> Result<Mat<f64>> {
    let n = quad.width();
    let Some(g) = quad.gram() else {
        return Ok(Mat::identity(n, n));
    };
    if !(damp.is_finite() && damp >= 0.0) {
        return Err(Error::invalid_parameter(
            "damp",
            format!("must be finite and >= 0, got {damp}"),
        ));
    }
    let mean_diag = (0..n).map(|i| g[i * n + i]).sum::<f64>() / n as f64;
    if mean_diag <= 0.0 {
        return Err(Error::invalid_parameter(
            "calibration",
            "the recorded inputs are all zero: no direction is excited",
        ));
    }
    let mut lambda = damp.max(1e-10) * mean_diag;
    for _ in 0..8 {
        let h = Mat::from_fn(n, n, |i, j| {
            g[i * n + j] + if i == j { lambda } else { 0.0 }
        });
        if let Ok(llt) = h.llt(Side::Lower) {
            if let Ok(inv) = llt.inverse().llt(Side::Lower) {
                return Ok(inv.L().transpose().to_owned());
            }
        }
        lambda *= 10.0;
    }
    Err(Error::invalid_parameter(
        "calibration",
        "the damped Hessian of the inputs is not positive definite",
    ))
}

/// `U⁻¹` of an upper-triangular `U` with a positive diagonal (back substitution).
fn upper_inverse(u: MatRef<'_, f64>) -> Mat<f64> {
    let d = u.nrows();
    let mut t = Mat::<f64>::zeros(d, d);
    for j in 0..d {
        for i in (0..=j).rev() {
            let mut s = if i == j { 1.0 } else { 0.0 };
            for k in i + 1..=j {
                s -= u[(i, k)] * t[(k, j)];
            }
            t[(i, j)] = s / u[(i, i)];
        }
    }
    t
}

/// Whether `u` is a multiple of the identity (then the block metric is plain Euclidean and the
/// search runs on the untransformed values, exactly as plain nearest-codeword assignment).
fn is_scaled_identity(u: MatRef<'_, f64>) -> bool {
    let d = u.nrows();
    (0..d).all(|i| {
        (0..d).all(|j| {
            if i == j {
                u[(i, i)] == u[(0, 0)]
            } else {
                u[(i, j)] == 0.0
            }
        })
    })
}

/// `row · t` for a row vector of length `d`.
fn times(row: impl Fn(usize) -> f64, t: &Mat<f64>, d: usize, out: &mut Vec<f32>) {
    for s in 0..d {
        out.push((0..=s).map(|r| row(r) * t[(r, s)]).sum::<f64>() as f32);
    }
}

/// Pushes the scaled error `err` of the columns `from..from + err.ncols()` onto the columns
/// `to` of `w` not yet quantized: `w[:, to] −= err · U[from.., to]` (nothing for an empty `to`).
fn push_error(w: &mut Mat<f64>, err: MatRef<'_, f64>, u: &Mat<f64>, from: usize, to: Range<usize>) {
    if to.is_empty() {
        return;
    }
    matmul(
        w.submatrix_mut(0, to.start, w.nrows(), to.len()),
        Accum::Add,
        err,
        u.submatrix(from, to.start, err.ncols(), to.len()),
        -1.0,
        Par::Seq,
    );
}

/// What [`feedback_pq`] quantizes with.
pub(crate) struct PqCodebooks<'a> {
    /// Block size `d`.
    pub d: usize,
    /// Centroids per codebook.
    pub k: usize,
    /// `[groups·K, d]`.
    pub centroids: &'a [f32],
    /// Codebook of every subvector, slab-major.
    pub groups: &'a [usize],
}

/// Codes (slab-major) of the matrix view `[rows, D]` chosen with error feedback through `u`.
///
/// # Errors
/// As [`nearest_codes`].
pub(crate) fn feedback_pq(
    matrix: &[f32],
    rows: usize,
    u: &Mat<f64>,
    books: &PqCodebooks<'_>,
    block_columns: usize,
) -> Result<Vec<u32>> {
    let (n, d, k) = (u.nrows(), books.d, books.k);
    let mut w = Mat::<f64>::from_fn(rows, n, |o, i| f64::from(matrix[o * n + i]));
    let mut codes = vec![0u32; rows * (n / d)];
    let width = (block_columns / d).max(1) * d;
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + width).min(n);
        let mut err = Mat::<f64>::zeros(rows, i2 - i1);
        for c in (i1..i2).step_by(d) {
            let b = c / d;
            let uss = u.submatrix(c, c, d, d);
            let t = upper_inverse(uss);
            let plain = is_scaled_identity(uss);
            let mut by_group: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for o in 0..rows {
                by_group
                    .entry(books.groups[b * rows + o])
                    .or_default()
                    .push(o);
            }
            for (g, members) in by_group {
                let book = &books.centroids[g * k * d..(g + 1) * k * d];
                let mut points = Vec::with_capacity(members.len() * d);
                for &o in &members {
                    if plain {
                        points.extend((0..d).map(|r| w[(o, c + r)] as f32));
                    } else {
                        times(|r| w[(o, c + r)], &t, d, &mut points);
                    }
                }
                let book_t = if plain {
                    book.to_vec()
                } else {
                    let mut out = Vec::with_capacity(book.len());
                    for code in book.chunks_exact(d) {
                        times(|r| f64::from(code[r]), &t, d, &mut out);
                    }
                    out
                };
                let found = nearest_codes(&points, &book_t, d, None)?;
                for (&o, &a) in members.iter().zip(&found.indices) {
                    codes[b * rows + o] = a;
                    let q = &book[a as usize * d..(a as usize + 1) * d];
                    for s in 0..d {
                        err[(o, c - i1 + s)] = (0..=s)
                            .map(|r| (w[(o, c + r)] - f64::from(q[r])) * t[(r, s)])
                            .sum();
                    }
                }
            }
            push_error(&mut w, err.submatrix(0, c - i1, rows, d), u, c, c + d..i2);
        }
        push_error(&mut w, err.as_ref(), u, i1, i2..n);
        i1 = i2;
    }
    Ok(codes)
}

/// Integer codes of the matrix view `[rows, D]` on per-group min-max grids, chosen column by
/// column with error feedback through `u` (GPTQ); each group's grid is fitted to the weights as
/// updated when the group's first column is reached.
pub(crate) fn feedback_scalar(
    matrix: &[f32],
    rows: usize,
    u: &Mat<f64>,
    (bits, group): (u32, usize),
    block_columns: usize,
) -> ScalarCodes {
    let n = u.nrows();
    let per_row = n.div_ceil(group);
    let mut w = Mat::<f64>::from_fn(rows, n, |o, i| f64::from(matrix[o * n + i]));
    let mut out = ScalarCodes {
        codes: vec![0; rows * n],
        scales: vec![half::f16::ZERO; rows * per_row],
        zeros: vec![half::f16::ZERO; rows * per_row],
    };
    let width = block_columns.max(1);
    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + width).min(n);
        let mut err = Mat::<f64>::zeros(rows, i2 - i1);
        for i in i1..i2 {
            let gi = i / group;
            if i % group == 0 {
                let end = (i + group).min(n);
                for o in 0..rows {
                    let (s, z) = grid((i..end).map(|j| w[(o, j)] as f32), bits);
                    out.scales[o * per_row + gi] = s;
                    out.zeros[o * per_row + gi] = z;
                }
            }
            let uii = u[(i, i)];
            for o in 0..rows {
                let (s, z) = (out.scales[o * per_row + gi], out.zeros[o * per_row + gi]);
                let q = quantize(w[(o, i)] as f32, s, z, bits);
                out.codes[o * n + i] = q;
                err[(o, i - i1)] = (w[(o, i)] - f64::from(dequantize(q, s, z))) / uii;
            }
            push_error(&mut w, err.submatrix(0, i - i1, rows, 1), u, i, i + 1..i2);
        }
        push_error(&mut w, err.as_ref(), u, i1, i2..n);
        i1 = i2;
    }
    out
}
