//! Codebook fine-tuning on the layer output error with the codes fixed.
//!
//! `Ŵ` is linear in the stacked codebook `c` (length `n = G·K·d`), so the output error
//! `Σ_o f_o (w_o − ŵ_o)ᵀ H (w_o − ŵ_o)` is a quadratic in `c` minimised by the normal equations
//! `M c = b`: the `d×d` block of `M` between codewords `p` and `q` sums `f_o H_{b₁b₂}` over every
//! row `o` whose slab `b₁` uses `p` and slab `b₂` uses `q`, and `b` sums the blocks `f_o (H w_o)_b`
//! of the slabs that use each codeword. The ridge `(M + μI) c = b + μ c_old` keeps codewords no
//! subvector uses where they are, and the solution never has a larger output error than
//! `c_old` (it minimises the error plus `μ‖c − c_old‖²`).
//!
//! Up to [`MAX_DENSE_UNKNOWNS`] unknowns `M` is built and factored (Cholesky); above, the
//! system is solved without forming `M` by conjugate gradients preconditioned with `diag M`,
//! started at `c_old` (each iterate lowers the same objective, so the guarantee holds too).

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Par, Side};
use qcl_tensor::{Error, Result};

use crate::objective::Quadratic;
use crate::pq_tensor::PqTensor;

/// Largest `G·K·d` (codebook coordinates) whose normal equations are formed and factored;
/// `M` takes `8·n²` bytes (128 MiB at this bound).
pub const MAX_DENSE_UNKNOWNS: usize = 4096;
/// Iterations of the conjugate-gradient solver above [`MAX_DENSE_UNKNOWNS`].
const CG_ITERATIONS: usize = 200;

/// The pieces of the least-squares problem shared by both solvers.
struct Problem<'a> {
    quad: &'a Quadratic,
    rows: usize,
    width: usize,
    d: usize,
    /// Global codeword of every subvector, slab-major.
    codes: Vec<u32>,
}

impl Problem<'_> {
    /// `X·H` of a matrix view `[rows, width]` (f64), or `X` for `H = I`.
    fn times_gram(&self, x: Vec<f64>) -> Vec<f64> {
        if self.quad.gram().is_none() {
            return x;
        }
        let (rows, width) = (self.rows, self.width);
        let mut out = Mat::<f64>::zeros(rows, width);
        let xm = MatRef::from_row_major_slice(&x, rows, width);
        matmul(
            &mut out,
            Accum::Replace,
            xm,
            self.quad.gram_mat(),
            1.0,
            Par::Seq,
        );
        (0..rows * width)
            .map(|i| out[(i / width, i % width)])
            .collect()
    }

    /// `Σ f_o` of each row's slabs of `r` (a `[rows, width]` matrix view), summed per codeword.
    fn scatter(&self, r: &[f64], n: usize) -> Vec<f64> {
        let (rows, width, d) = (self.rows, self.width, self.d);
        let mut out = vec![0f64; n];
        for o in 0..rows {
            let f = self.quad.row_weight(o);
            for b in 0..width / d {
                let q = self.codes[b * rows + o] as usize * d;
                for t in 0..d {
                    out[q + t] += f * r[o * width + b * d + t];
                }
            }
        }
        out
    }

    /// The matrix view decoded with codebook `c`.
    fn decode(&self, c: &[f64]) -> Vec<f64> {
        let (rows, width, d) = (self.rows, self.width, self.d);
        let mut w = vec![0f64; rows * width];
        for o in 0..rows {
            for b in 0..width / d {
                let q = self.codes[b * rows + o] as usize * d;
                w[o * width + b * d..][..d].copy_from_slice(&c[q..q + d]);
            }
        }
        w
    }

    /// `diag M`.
    fn diagonal(&self, n: usize) -> Vec<f64> {
        let (rows, width, d) = (self.rows, self.width, self.d);
        let mut diag = vec![0f64; n];
        for o in 0..rows {
            let f = self.quad.row_weight(o);
            for b in 0..width / d {
                let q = self.codes[b * rows + o] as usize * d;
                for t in 0..d {
                    let i = b * d + t;
                    diag[q + t] += f * self.quad.gram().map_or(1.0, |h| h[i * width + i]);
                }
            }
        }
        diag
    }

    /// `M` (row-major `n×n`).
    fn normal_matrix(&self, n: usize) -> Vec<f64> {
        let (rows, width, d) = (self.rows, self.width, self.d);
        let m = width / d;
        let mut normal = vec![0f64; n * n];
        for o in 0..rows {
            let f = self.quad.row_weight(o);
            if f == 0.0 {
                continue;
            }
            for b1 in 0..m {
                let q1 = self.codes[b1 * rows + o] as usize * d;
                match self.quad.gram() {
                    None => (0..d).for_each(|t| normal[(q1 + t) * n + q1 + t] += f),
                    Some(h) => {
                        for b2 in 0..m {
                            let q2 = self.codes[b2 * rows + o] as usize * d;
                            for t1 in 0..d {
                                let h_row = &h[(b1 * d + t1) * width + b2 * d..][..d];
                                let m_row = &mut normal[(q1 + t1) * n + q2..][..d];
                                m_row.iter_mut().zip(h_row).for_each(|(a, v)| *a += f * v);
                            }
                        }
                    }
                }
            }
        }
        normal
    }
}

/// Refits the centroids of `tensor` to minimise `quad`'s output error for the weight
/// `reference` (row-major in the tensor's shape), its assignments fixed; `ridge` scales
/// `μ = ridge·trace(M)/n`.
///
/// ```
/// use qcl_wpq::{finetune_codebooks, LayerGeometry, Layout, PqTensor, Quadratic, Sharing};
/// // H = I: the least-squares codebook is the mean of each codeword's subvectors.
/// let w = [1.0f32, 3.0, 5.0, 7.0];
/// let mut t = PqTensor { geometry: LayerGeometry::from_shape(&[4, 1], Layout::Spatial, 1)?,
///     k: 2, sharing: Sharing::Layer, centroids: vec![0.0, 0.0], assignments: vec![0, 0, 1, 1] };
/// finetune_codebooks(&w, &mut t, &Quadratic::identity(1), 0.0)?;
/// assert_eq!(t.centroids, vec![2.0, 6.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a negative ridge or an objective of another width; as
/// [`PqTensor::validate`].
pub fn finetune_codebooks(
    reference: &[f32],
    tensor: &mut PqTensor,
    quad: &Quadratic,
    ridge: f64,
) -> Result<()> {
    finetune_with(reference, tensor, quad, ridge, MAX_DENSE_UNKNOWNS)
}

fn finetune_with(
    reference: &[f32],
    tensor: &mut PqTensor,
    quad: &Quadratic,
    ridge: f64,
    dense_limit: usize,
) -> Result<()> {
    tensor.validate()?;
    let g = &tensor.geometry;
    let (rows, width, d) = (g.out_dim(), g.in_dim(), g.block);
    if !(ridge.is_finite() && ridge >= 0.0) || quad.width() != width {
        return Err(Error::invalid_parameter(
            "ridge",
            format!("needs a finite ridge >= 0 (got {ridge}) and an objective of width {width}"),
        ));
    }
    let problem = Problem {
        quad,
        rows,
        width,
        d,
        codes: tensor.global_codes()?,
    };
    let n = tensor.centroids.len();
    let w64: Vec<f64> = g
        .to_matrix(reference)?
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let rhs = problem.scatter(&problem.times_gram(w64), n);
    let old: Vec<f64> = tensor.centroids.iter().map(|&c| f64::from(c)).collect();
    let diag = problem.diagonal(n);
    let trace: f64 = diag.iter().sum();
    let mu = if trace > 0.0 {
        ridge * trace / n as f64
    } else {
        1.0
    };
    let solution = if n <= dense_limit {
        dense_solve(&problem.normal_matrix(n), &rhs, &old, (mu, trace))?
    } else {
        conjugate_gradients(&problem, &rhs, &old, &diag, mu)
    };
    tensor.centroids = solution.iter().map(|&c| c as f32).collect();
    Ok(())
}

/// Cholesky solve of `(M + μI) c = b + μ c_old`, raising `μ` while `M + μI` is singular.
fn dense_solve(
    normal: &[f64],
    rhs: &[f64],
    old: &[f64],
    (mu, trace): (f64, f64),
) -> Result<Vec<f64>> {
    let n = rhs.len();
    let mut mu = mu;
    for _ in 0..8 {
        let a = Mat::from_fn(n, n, |i, j| {
            normal[i * n + j] + if i == j { mu } else { 0.0 }
        });
        if let Ok(llt) = a.llt(Side::Lower) {
            let b = Mat::from_fn(n, 1, |i, _| rhs[i] + mu * old[i]);
            let c = llt.solve(&b);
            return Ok((0..n).map(|i| c[(i, 0)]).collect());
        }
        // Singular without a ridge (unused codewords, unexcited directions): add one.
        mu = if mu > 0.0 {
            mu * 10.0
        } else {
            1e-9 * trace.max(1.0) / n as f64
        };
    }
    Err(Error::invalid_parameter(
        "ridge",
        "the normal equations of the codebook stay singular",
    ))
}

/// Conjugate gradients on `(M + μI) c = b + μ c_old` from `c_old`, `M` applied as
/// `scatter(decode(c)·H)`, preconditioned with `diag M + μ`.
fn conjugate_gradients(
    problem: &Problem<'_>,
    rhs: &[f64],
    old: &[f64],
    diag: &[f64],
    mu: f64,
) -> Vec<f64> {
    let apply = |c: &[f64]| -> Vec<f64> {
        let mc = problem.scatter(&problem.times_gram(problem.decode(c)), c.len());
        mc.iter().zip(c).map(|(a, x)| a + mu * x).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let precondition = |r: &[f64]| -> Vec<f64> {
        r.iter()
            .zip(diag)
            .map(|(v, m)| if m + mu > 0.0 { v / (m + mu) } else { *v })
            .collect()
    };
    let mut x = old.to_vec();
    let b: Vec<f64> = rhs.iter().zip(old).map(|(v, c)| v + mu * c).collect();
    let ax = apply(&x);
    let mut r: Vec<f64> = b.iter().zip(&ax).map(|(a, c)| a - c).collect();
    let mut z = precondition(&r);
    let mut p = z.clone();
    let mut rz = dot(&r, &z);
    let tolerance = 1e-20 * dot(&b, &b).max(f64::MIN_POSITIVE);
    for _ in 0..CG_ITERATIONS {
        if dot(&r, &r) <= tolerance {
            break;
        }
        let ap = apply(&p);
        let pap = dot(&p, &ap);
        if pap <= 0.0 {
            break;
        }
        let alpha = rz / pap;
        x.iter_mut().zip(&p).for_each(|(xi, pi)| *xi += alpha * pi);
        r.iter_mut().zip(&ap).for_each(|(ri, a)| *ri -= alpha * a);
        z = precondition(&r);
        let rz_next = dot(&r, &z);
        let beta = rz_next / rz;
        rz = rz_next;
        p.iter_mut()
            .zip(&z)
            .for_each(|(pi, zi)| *pi = zi + beta * *pi);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{LayerGeometry, Layout};
    use crate::pq_tensor::Sharing;
    use qcl_tensor::Seed;

    /// Conjugate gradients reach the dense solution.
    #[test]
    fn conjugate_gradients_match_the_dense_solve() {
        let (rows, cols, d, k) = (12, 16, 2, 6);
        let mut rng = Seed::new(3).rng();
        let w = rng.normal_vec(rows * cols, 0.0, 1.0);
        let x = rng.normal_vec(40 * cols, 0.0, 1.0);
        let mut gram = vec![0f64; cols * cols];
        for row in x.chunks_exact(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    // Neighbouring inputs correlated.
                    let (a, b) = (row[i] + row[(i + 1) % cols], row[j] + row[(j + 1) % cols]);
                    gram[i * cols + j] += f64::from(a) * f64::from(b);
                }
            }
        }
        let quad = Quadratic::from_gram(gram, cols).unwrap();
        let start = PqTensor {
            geometry: LayerGeometry::from_shape(&[rows, cols], Layout::Spatial, d).unwrap(),
            k,
            sharing: Sharing::Rows(2),
            centroids: rng.normal_vec(2 * k * d, 0.0, 1.0),
            assignments: (0..rows * cols / d).map(|j| (j * 7 % k) as u32).collect(),
        };
        let (mut dense, mut cg) = (start.clone(), start);
        finetune_with(&w, &mut dense, &quad, 1e-4, usize::MAX).unwrap();
        finetune_with(&w, &mut cg, &quad, 1e-4, 0).unwrap();
        for (a, b) in dense.centroids.iter().zip(&cg.centroids) {
            assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
