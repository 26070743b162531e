//! The two regularizers of the CACL objective (docs/methods/cacl.md § Objective): Hoyer
//! sparsity of the singular values and the soft orthogonality of the factors, as candle
//! graphs so autograd runs through them.

use candle_core::{DType, Tensor};
use qcl_tensor::{Error, Result};

/// `|x|` with the gradient `sign(x)` (0 at 0), unlike candle's `abs` whose gradient at 0 is 1
/// (docs/methods/cacl.md § Paper and original code: d|s|/ds = sign(s), 0 at 0).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let s = Var::new(&[-2f32, 0.0, 3.0], &Device::Cpu)?;
/// let a = qcl_cacl::abs_with_sign_gradient(s.as_tensor())?;
/// assert_eq!(a.to_vec1::<f32>()?, [2.0, 0.0, 3.0]);
/// let g = a.sum_all()?.backward()?;
/// assert_eq!(g.get(&s).unwrap().to_vec1::<f32>()?, [-1.0, 0.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// A candle error from the arithmetic.
pub fn abs_with_sign_gradient(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&x.sign()?.detach())?)
}

/// Hoyer sparsity `‖s‖₁/‖s‖₂ − 1` of a vector, as a scalar tensor; 0 (no NaN, no gradient)
/// for an all-zero vector. It lies in `[0, √n − 1]`: 0 for a one-hot vector, `√n − 1` when
/// all magnitudes are equal.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let s = Tensor::new(&[1f32, -1.0, 1.0, 1.0], &Device::Cpu)?;
/// let h = qcl_cacl::hoyer(&s)?.to_scalar::<f32>()?;
/// assert!((h - 1.0).abs() < 1e-6); // √4 − 1
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless `s` is 1-D.
pub fn hoyer(s: &Tensor) -> Result<Tensor> {
    if s.rank() != 1 {
        return Err(Error::ShapeMismatch {
            context: "hoyer".into(),
            expected: "a vector [n]".into(),
            actual: s.dims().to_vec(),
        });
    }
    let l1 = abs_with_sign_gradient(s)?.sum_all()?;
    // The zero vector is skipped, as the reference does (its ratio is 0/0).
    if l1.to_dtype(DType::F64)?.to_scalar::<f64>()? == 0.0 {
        return Ok(Tensor::zeros((), s.dtype(), s.device())?);
    }
    let l2 = s.sqr()?.sum_all()?.sqrt()?;
    Ok((l1.div(&l2)? - 1.0)?)
}

/// Soft orthogonality `Σ (G − I)² / dim(G)²` of a matrix `M [a, b]`, with the Gram matrix on
/// the smaller side: `G = M·Mᵀ` when `a ≤ b`, `Mᵀ·M` otherwise. It is 0 for a matrix with
/// orthonormal rows (wide) or columns (tall), and `Orth(M) = Orth(Mᵀ)`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu)?;
/// assert_eq!(qcl_cacl::orthogonality(&q)?.to_scalar::<f32>()?, 0.0);
/// let m = Tensor::new(&[[2f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// assert_eq!(qcl_cacl::orthogonality(&m)?.to_scalar::<f32>()?, 9.0 / 4.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless `m` is a non-empty matrix.
pub fn orthogonality(m: &Tensor) -> Result<Tensor> {
    let (a, b) = match m.dims() {
        &[a, b] if a > 0 && b > 0 => (a, b),
        _ => {
            return Err(Error::ShapeMismatch {
                context: "orthogonality".into(),
                expected: "a non-empty matrix [a, b]".into(),
                actual: m.dims().to_vec(),
            })
        }
    };
    let gram = if a <= b {
        m.matmul(&m.t()?)?
    } else {
        m.t()?.matmul(m)?
    };
    let n = a.min(b);
    let eye = Tensor::eye(n, m.dtype(), m.device())?;
    Ok(((gram - eye)?.sqr()?.sum_all()? / (n * n) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use proptest::prelude::*;
    use qcl_tensor::Seed;

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    fn vector(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    /// A matrix with orthonormal columns (`rows ≥ cols`) from a thin SVD.
    fn orthonormal_columns(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = Seed::new(seed).rng();
        let values = rng.normal_vec(rows * cols, 0.0, 1.0);
        let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(values[i * cols + j]));
        let svd = m.thin_svd().unwrap();
        let u = svd.U();
        let flat: Vec<f32> = (0..rows)
            .flat_map(|i| (0..cols).map(move |j| u[(i, j)] as f32))
            .collect();
        Tensor::from_vec(flat, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn hoyer_of_zero_is_zero_without_nan_or_gradient() {
        let s = Var::zeros(5, DType::F32, &Device::Cpu).unwrap();
        let h = hoyer(s.as_tensor()).unwrap();
        assert_eq!(scalar(&h), 0.0);
        assert!(hoyer(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn orthogonality_of_orthonormal_factors_is_zero_and_generic_is_positive() {
        for (rows, cols) in [(12, 5), (7, 7), (30, 1)] {
            let q = orthonormal_columns(rows, cols, 3);
            assert!(scalar(&orthogonality(&q).unwrap()) < 1e-6);
            assert!(scalar(&orthogonality(&q.t().unwrap()).unwrap()) < 1e-6);
        }
        let m = Seed::new(9)
            .rng()
            .normal_tensor((6, 4), 0.0, 1.0, &Device::Cpu)
            .unwrap();
        assert!(scalar(&orthogonality(&m).unwrap()) > 1e-3);
        assert!(orthogonality(&vector(&[1.0, 2.0])).is_err());
    }

    #[test]
    fn orthogonality_uses_the_smaller_gram_matrix() {
        // A 1×3 row [1, 1, 1]: G = [3] (1×1), so Orth = (3 − 1)² / 1 = 4. Had the 3×3 side
        // been used the value would be Σ(J − I)²/9 = (6·1 + 3·0)/9.
        let m = Tensor::new(&[[1f32, 1.0, 1.0]], &Device::Cpu).unwrap();
        assert_eq!(scalar(&orthogonality(&m).unwrap()), 4.0);
    }

    proptest! {
        #[test]
        fn hoyer_properties(
            values in proptest::collection::vec(-10.0f32..10.0, 1..40),
            alpha in prop_oneof![-5.0f32..-0.1, 0.1f32..5.0],
            seed in 0u64..1000,
        ) {
            prop_assume!(values.iter().any(|&x| x.abs() > 1e-3));
            let n = values.len();
            let h = scalar(&hoyer(&vector(&values)).unwrap());
            prop_assert!(h >= -1e-5 && h <= (n as f32).sqrt() - 1.0 + 1e-4);
            let scaled: Vec<f32> = values.iter().map(|x| x * alpha).collect();
            prop_assert!((scalar(&hoyer(&vector(&scaled)).unwrap()) - h).abs() < 1e-4);
            let mut permuted: Vec<f32> = values.iter().map(|x| -x).collect();
            Seed::new(seed).rng().shuffle(&mut permuted);
            prop_assert!((scalar(&hoyer(&vector(&permuted)).unwrap()) - h).abs() < 1e-4);
            // One-hot and equal magnitudes are the two ends.
            let mut one_hot = vec![0.0f32; n];
            one_hot[seed as usize % n] = alpha;
            prop_assert!(scalar(&hoyer(&vector(&one_hot)).unwrap()).abs() < 1e-6);
            let equal: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { alpha } else { -alpha }).collect();
            let top = (n as f32).sqrt() - 1.0;
            prop_assert!((scalar(&hoyer(&vector(&equal)).unwrap()) - top).abs() < 1e-4);
        }

        #[test]
        fn orthogonality_is_transpose_invariant(rows in 1usize..12, cols in 1usize..12, seed in 0u64..500) {
            let m = Seed::new(seed).rng().normal_tensor((rows, cols), 0.0, 1.0, &Device::Cpu).unwrap();
            let a = scalar(&orthogonality(&m).unwrap());
            let b = scalar(&orthogonality(&m.t().unwrap().contiguous().unwrap()).unwrap());
            prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0));
        }
    }
}
