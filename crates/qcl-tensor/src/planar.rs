//! Nearest codes of points stored channels-first, as a convolutional feature map is.
//!
//! A feature map `[batch, dim, positions]` (NCHW with `positions = H·W`) holds one
//! `dim`-vector per position, spread over `dim` planes. [`nearest_codes_planar`] searches it
//! in place: 16 positions sit in the lanes of one SIMD register, so a plane row is one
//! contiguous load and no `[points, dim]` copy is made. Every lane computes
//!
//! ```text
//! D(x, j) = Σ_{i=0}^{d-1} (x_i − c_{j,i})²  +  bias_j
//! ```
//!
//! with the same `f32` operations in the same order as [`crate::squared_distance`] (no fused
//! multiply-add), so the result is the definition of [`crate::nearest_codes`] exactly, ties to
//! the lowest index.

use rayon::prelude::*;

use crate::nearest::{validate_shapes, Nearest};
use crate::{check_finite_slice, nearest_codes, squared_distance, Error, Result};

/// Codes up to which the planar kernel runs; with more, the points are transposed and
/// [`nearest_codes`] screens them by GEMM, which then costs less than `3·k·d` operations per
/// 16 points.
pub const PLANAR_MAX_CODES: usize = 64;

/// Positions per SIMD block (and codes per accumulator block).
const LANES: usize = 16;

/// Nearest code of every position of a channels-first array `values = [batch, dim,
/// positions]` (row-major), against `codes = [k, dim]`: returns indices and distances in
/// `[batch, positions]` order. The result equals [`crate::nearest_codes`] on the transposed
/// points `[batch·positions, dim]`, exactly.
///
/// ```
/// use qcl_tensor::nearest_codes_planar;
/// // One image, 2 channels, 3 positions: the points are (0, 5), (1, 6), (9, 9).
/// let values = [0.0, 1.0, 9.0, 5.0, 6.0, 9.0];
/// let codes = [0.0, 5.0, 10.0, 10.0];
/// let found = nearest_codes_planar(&values, 2, 3, &codes, None)?;
/// assert_eq!(found.indices, vec![0, 0, 1]);
/// assert_eq!(found.distances, vec![0.0, 2.0, 2.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for `dim == 0` or `positions == 0`, [`Error::ShapeMismatch`]
/// when `values` is not whole `[dim, positions]` images, `codes` not whole rows or the bias
/// not one value per code, [`Error::EmptyInput`] without codes, [`Error::NonFinite`] for NaN
/// or infinity anywhere.
pub fn nearest_codes_planar(
    values: &[f32],
    dim: usize,
    positions: usize,
    codes: &[f32],
    bias: Option<&[f32]>,
) -> Result<Nearest> {
    if dim == 0 || positions == 0 {
        let name = if dim == 0 { "dim" } else { "positions" };
        return Err(Error::invalid_parameter(name, "must be at least 1"));
    }
    let image = dim * positions;
    if !values.len().is_multiple_of(image) {
        return Err(Error::ShapeMismatch {
            context: "planar values".into(),
            expected: format!("[*, {dim}, {positions}]"),
            actual: vec![values.len()],
        });
    }
    // Codes, bias and their finiteness, as the row-major search checks them.
    let (n, k) = validate_shapes(values, codes, dim, bias)?;
    if k > PLANAR_MAX_CODES {
        return nearest_codes(&to_points(values, dim, positions), codes, dim, bias);
    }
    let mut found = Nearest {
        indices: vec![0; n],
        distances: vec![0.0; n],
    };
    let search = PlanarSearch {
        dim,
        positions,
        k,
        codes,
        bias,
    };
    values
        .par_chunks(image)
        .zip(found.indices.par_chunks_mut(positions))
        .zip(found.distances.par_chunks_mut(positions))
        .for_each(|((x, idx), dist)| search.image(x, idx, dist));
    // Finite codes and finite points give finite or +inf distances: only then (rarely) is a
    // full scan needed to tell overflow from a NaN or infinity in the input.
    if found.distances.iter().any(|d| !d.is_finite()) {
        check_finite_slice("points", values)?;
    }
    Ok(found)
}

/// `[batch, dim, positions]` → `[batch·positions, dim]`.
fn to_points(values: &[f32], dim: usize, positions: usize) -> Vec<f32> {
    let mut points = vec![0f32; values.len()];
    for (image, out) in values
        .chunks_exact(dim * positions)
        .zip(points.chunks_exact_mut(dim * positions))
    {
        for (i, plane) in image.chunks_exact(positions).enumerate() {
            for (p, v) in plane.iter().enumerate() {
                out[p * dim + i] = *v;
            }
        }
    }
    points
}

/// One search's shapes and codes.
struct PlanarSearch<'a> {
    dim: usize,
    positions: usize,
    k: usize,
    codes: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl PlanarSearch<'_> {
    /// The nearest codes of one image's positions.
    fn image(&self, x: &[f32], indices: &mut [u32], distances: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { self.image_avx512(x, indices, distances) };
            return;
        }
        self.image_portable(x, indices, distances);
    }

    /// `D(x, j)` by the definition.
    fn exact(&self, point: &[f32], j: usize) -> f32 {
        squared_distance(point, &self.codes[j * self.dim..(j + 1) * self.dim])
            + self.bias.map_or(0.0, |b| b[j])
    }

    fn image_portable(&self, x: &[f32], indices: &mut [u32], distances: &mut [f32]) {
        let mut point = vec![0f32; self.dim];
        for p in 0..self.positions {
            for (i, v) in point.iter_mut().enumerate() {
                *v = x[i * self.positions + p];
            }
            let (mut best, mut value) = (0, self.exact(&point, 0));
            for j in 1..self.k {
                let d = self.exact(&point, j);
                if d < value {
                    (best, value) = (j, d);
                }
            }
            indices[p] = best as u32;
            distances[p] = value;
        }
    }

    /// 16 positions per step, up to 16 codes per accumulator block; the last, partial step
    /// masks its loads and stores.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn image_avx512(&self, x: &[f32], indices: &mut [u32], distances: &mut [f32]) {
        use std::arch::x86_64::*;
        let (d, positions, k) = (self.dim, self.positions, self.k);
        assert!(x.len() == d * positions && indices.len() == positions);
        assert!(distances.len() == positions && self.codes.len() == k * d);
        let mut p = 0;
        while p < positions {
            let lanes = LANES.min(positions - p);
            let mask: __mmask16 = if lanes == LANES {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            let mut best = _mm512_set1_ps(f32::INFINITY);
            let mut best_index = _mm512_setzero_si512();
            let mut first = 0;
            while first < k {
                let count = LANES.min(k - first);
                let mut acc = [_mm512_setzero_ps(); LANES];
                for i in 0..d {
                    // SAFETY: i·positions + p + (set lanes) <= x.len(); masked lanes are not read.
                    let xi =
                        unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i * positions + p)) };
                    for (jj, a) in acc.iter_mut().enumerate().take(count) {
                        let c = _mm512_set1_ps(self.codes[(first + jj) * d + i]);
                        let diff = _mm512_sub_ps(xi, c);
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(diff, diff));
                    }
                }
                for (jj, a) in acc.iter().enumerate().take(count) {
                    let j = first + jj;
                    let value = _mm512_add_ps(*a, _mm512_set1_ps(self.bias.map_or(0.0, |b| b[j])));
                    // Strictly less: ties keep the lower index.
                    let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(value, best);
                    best = _mm512_mask_mov_ps(best, better, value);
                    best_index =
                        _mm512_mask_mov_epi32(best_index, better, _mm512_set1_epi32(j as i32));
                }
                first += count;
            }
            // SAFETY: p + lanes <= positions = indices.len() = distances.len(); masked stores.
            unsafe {
                _mm512_mask_storeu_ps(distances.as_mut_ptr().add(p), mask, best);
                _mm512_mask_storeu_epi32(indices.as_mut_ptr().add(p).cast(), mask, best_index);
            }
            p += lanes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn planar_case() -> impl Strategy<Value = (usize, usize, usize, usize, Vec<f32>, Vec<f32>)> {
        (1usize..4, 1usize..40, 1usize..37, 1usize..80).prop_flat_map(
            |(batch, dim, positions, k)| {
                (
                    Just(batch),
                    Just(dim),
                    Just(positions),
                    Just(k),
                    // Coarse values so that exact ties happen.
                    prop::collection::vec(
                        (-4i32..4).prop_map(|v| v as f32 * 0.5),
                        batch * dim * positions,
                    ),
                    prop::collection::vec((-4i32..4).prop_map(|v| v as f32 * 0.5), k * dim),
                )
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The planar search equals the row-major search of the transposed points, bit for
        /// bit, with and without a bias, on the SIMD and the portable path.
        #[test]
        fn planar_equals_row_major((batch, dim, positions, k, values, codes) in planar_case(), biased in any::<bool>()) {
            let bias: Vec<f32> = (0..k).map(|j| (j % 3) as f32 * 0.25).collect();
            let bias = biased.then_some(bias.as_slice());
            let points = to_points(&values, dim, positions);
            let expected = nearest_codes(&points, &codes, dim, bias).unwrap();
            let found = nearest_codes_planar(&values, dim, positions, &codes, bias).unwrap();
            prop_assert_eq!(&found.indices, &expected.indices);
            prop_assert_eq!(&found.distances, &expected.distances);
            prop_assert_eq!(found.indices.len(), batch * positions);
            if k <= PLANAR_MAX_CODES {
                let search = PlanarSearch { dim, positions, k, codes: &codes, bias };
                let mut indices = vec![0; positions];
                let mut distances = vec![0.0; positions];
                search.image_portable(&values[..dim * positions], &mut indices, &mut distances);
                prop_assert_eq!(&indices[..], &expected.indices[..positions]);
                prop_assert_eq!(&distances[..], &expected.distances[..positions]);
            }
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        // Both codes sit at distance 1 from every point.
        let values = [0.0; 20];
        let codes = [1.0, -1.0];
        let found = nearest_codes_planar(&values, 1, 20, &codes, None).unwrap();
        assert!(found.indices.iter().all(|&i| i == 0));
        assert!(found.distances.iter().all(|&d| d == 1.0));
    }

    #[test]
    fn bad_input_gets_typed_errors() {
        let codes = [0.0, 1.0];
        let err = nearest_codes_planar(&[0.0; 5], 2, 2, &codes, None).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        let err = nearest_codes_planar(&[0.0; 4], 0, 2, &codes, None).unwrap_err();
        assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
        let err = nearest_codes_planar(&[0.0; 4], 2, 2, &[], None).unwrap_err();
        assert!(matches!(err, Error::EmptyInput(_)), "{err}");
        let err = nearest_codes_planar(&[0.0; 4], 2, 2, &codes, Some(&[0.0, 1.0])).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        let err = nearest_codes_planar(&[0.0, f32::NAN, 0.0, 0.0], 2, 2, &codes, None).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
        let err = nearest_codes_planar(&[0.0; 4], 2, 2, &[0.0, f32::INFINITY], None).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    }

    #[test]
    fn overflowing_distances_are_not_mistaken_for_bad_input() {
        // (3e19)² overflows f32 for both codes: distance +inf, index 0, no error.
        let found = nearest_codes_planar(&[3e19], 1, 1, &[0.0, -1.0], None).unwrap();
        assert_eq!(found.indices, vec![0]);
        assert_eq!(found.distances, vec![f32::INFINITY]);
    }
}
