//! Codebook fine-tuning on the layer output error with the codes fixed.
//!
//! `Ŵ` is linear in the stacked codebook `c` (length `n = G·K·d`), so the output error
//! `Σ_o f_o (w_o − ŵ_o)ᵀ H (w_o − ŵ_o)` is a quadratic in `c` minimised by the normal equations
//! `M c = b`: the `d×d` block of `M` between codewords `p` and `q` sums `f_o H_{b₁b₂}` over every
//! row `o` whose slab `b₁` uses `p` and slab `b₂` uses `q`, and `b` sums the blocks `f_o (H w_o)_b`
//! of the slabs that use each codeword. The ridge `(M + μI) c = b + μ c_old` keeps codewords no
//! subvector uses where they are, and the solution never has a larger output error than
//! `c_old` (it minimises the error plus `μ‖c − c_old‖²`).

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Par, Side};
use qcl_tensor::{Error, Result};

use crate::objective::Quadratic;
use crate::pq_tensor::PqTensor;

/// Largest `G·K·d` (codebook coordinates) whose normal equations are solved; `M` takes
/// `8·n²` bytes (128 MiB at this bound).
pub const MAX_FINETUNE_UNKNOWNS: usize = 4096;

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
/// [`Error::InvalidParameter`] for more than [`MAX_FINETUNE_UNKNOWNS`] unknowns, a negative
/// ridge or an objective of another width; as [`PqTensor::validate`].
pub fn finetune_codebooks(
    reference: &[f32],
    tensor: &mut PqTensor,
    quad: &Quadratic,
    ridge: f64,
) -> Result<()> {
    tensor.validate()?;
    let g = &tensor.geometry;
    let (rows, width, d) = (g.out_dim(), g.in_dim(), g.block);
    let n = tensor.centroids.len();
    if n > MAX_FINETUNE_UNKNOWNS {
        return Err(Error::invalid_parameter(
            "finetune_rounds",
            format!(
                "fine-tuning solves for {n} codebook values, more than {MAX_FINETUNE_UNKNOWNS}; \
                 use fewer or smaller codebooks or no fine-tuning"
            ),
        ));
    }
    if !(ridge.is_finite() && ridge >= 0.0) || quad.width() != width {
        return Err(Error::invalid_parameter(
            "ridge",
            format!("needs a finite ridge >= 0 (got {ridge}) and an objective of width {width}"),
        ));
    }
    let matrix = g.to_matrix(reference)?;
    let codes = tensor.global_codes()?;
    let m = width / d;
    let w64: Vec<f64> = matrix.iter().map(|&v| f64::from(v)).collect();
    let hw = match quad.gram() {
        None => w64.clone(),
        Some(_) => {
            let mut hw = Mat::<f64>::zeros(rows, width);
            let w = MatRef::from_row_major_slice(&w64, rows, width);
            matmul(&mut hw, Accum::Replace, w, quad.gram_mat(), 1.0, Par::Seq);
            (0..rows * width)
                .map(|i| hw[(i / width, i % width)])
                .collect()
        }
    };
    let mut normal = vec![0f64; n * n];
    let mut rhs = vec![0f64; n];
    for o in 0..rows {
        let f = quad.row_weight(o);
        if f == 0.0 {
            continue;
        }
        for b1 in 0..m {
            let q1 = codes[b1 * rows + o] as usize * d;
            for t in 0..d {
                rhs[q1 + t] += f * hw[o * width + b1 * d + t];
            }
            match quad.gram() {
                None => (0..d).for_each(|t| normal[(q1 + t) * n + q1 + t] += f),
                Some(h) => {
                    for b2 in 0..m {
                        let q2 = codes[b2 * rows + o] as usize * d;
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
    let trace: f64 = (0..n).map(|i| normal[i * n + i]).sum();
    let mut mu = if trace > 0.0 {
        ridge * trace / n as f64
    } else {
        1.0
    };
    for _ in 0..8 {
        let a = Mat::from_fn(n, n, |i, j| {
            normal[i * n + j] + if i == j { mu } else { 0.0 }
        });
        if let Ok(llt) = a.llt(Side::Lower) {
            let b = Mat::from_fn(n, 1, |i, _| rhs[i] + mu * f64::from(tensor.centroids[i]));
            let c = llt.solve(&b);
            tensor.centroids = (0..n).map(|i| c[(i, 0)] as f32).collect();
            return Ok(());
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
