//! The two nearest codes of chosen points, exactly by the definition of
//! [`crate::nearest_codes`]: the kernel of bound-based k-means, which searches a few groups of
//! codes for a few points at a time and needs the runner-up as a lower bound.
//!
//! Codes sit in blocks of 16 SIMD lanes, stored `[block][dim][16]`; each point coordinate is
//! broadcast and every lane computes `Σ_i (x_i − c_i)²` with the same `f32` operations in the
//! same order as [`crate::squared_distance`] (no fused multiply-add), so every value is the
//! definition's exactly. Four points run side by side, so that four dependency chains, not
//! one, set the pace. (Screening by fused multiply-add with an exact re-check, as
//! [`crate::nearest_codes`] does, was tried here: the re-check of single points is a serial
//! chain of `d` additions and cost more than it saved.)

use crate::nearest::validate_shapes;
use crate::{squared_distance, Error, Result};

/// Codes per block (SIMD lanes).
const LANES: usize = 16;
/// Points searched side by side.
const POINTS: usize = 4;

/// The nearest code of a point, its distance, and the runner-up's distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoNearest {
    /// Index of the nearest code (ties: the lowest index).
    pub index: u32,
    /// `D(x, index)`, exactly as [`crate::nearest_codes`] gives it.
    pub distance: f32,
    /// The smallest `D(x, j)` over `j ≠ index` (equal to `distance` on a tie; `+∞` for one code).
    pub second: f32,
}

/// Codes prepared for exact two-nearest searches of single points.
///
/// ```
/// use qcl_tensor::ExactCodes;
/// // Codes 1, 9 and 12 on a line; points 0 and 10.
/// let codes = ExactCodes::new(&[1.0, 9.0, 12.0], 1)?;
/// let points = [0.0, 10.0];
/// let mut found = Vec::new();
/// codes.two_nearest(&points, &[1, 0], &mut found)?;
/// assert_eq!((found[0].index, found[0].distance, found[0].second), (1, 1.0, 4.0));
/// assert_eq!((found[1].index, found[1].distance, found[1].second), (0, 1.0, 81.0));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ExactCodes {
    dim: usize,
    k: usize,
    /// The codes, row-major `[k, dim]`, for the portable path.
    rows: Vec<f32>,
    /// The codes as `[k.div_ceil(16)][dim][16]`, padding lanes zero (masked out of results).
    lanes: Vec<f32>,
}

impl ExactCodes {
    /// Prepares `codes = [k, dim]` (row-major).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `dim == 0`, [`Error::ShapeMismatch`] for codes that are
    /// not whole rows, [`Error::EmptyInput`] without codes, [`Error::NonFinite`] for NaN or
    /// infinity in them.
    pub fn new(codes: &[f32], dim: usize) -> Result<ExactCodes> {
        let (_, k) = validate_shapes(&[], codes, dim, None)?;
        let blocks = k.div_ceil(LANES);
        let mut lanes = vec![0f32; blocks * dim * LANES];
        for (j, code) in codes.chunks_exact(dim).enumerate() {
            let (block, lane) = (j / LANES, j % LANES);
            for (i, &v) in code.iter().enumerate() {
                lanes[(block * dim + i) * LANES + lane] = v;
            }
        }
        Ok(ExactCodes {
            dim,
            k,
            rows: codes.to_vec(),
            lanes,
        })
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.k
    }

    /// Always false: there is at least one code.
    pub fn is_empty(&self) -> bool {
        self.k == 0
    }

    /// The two nearest codes of the rows `which` of `points` (`[n, dim]`), in `which`'s order,
    /// written over `found`. Points are not checked for finiteness: for NaN or infinity the
    /// results are unspecified.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for points that are not whole rows, [`Error::InvalidParameter`]
    /// for a row index out of range.
    pub fn two_nearest(
        &self,
        points: &[f32],
        which: &[u32],
        found: &mut Vec<TwoNearest>,
    ) -> Result<()> {
        let d = self.dim;
        if !points.len().is_multiple_of(d) {
            return Err(Error::ShapeMismatch {
                context: "points".into(),
                expected: format!("[*, {d}]"),
                actual: vec![points.len()],
            });
        }
        let n = points.len() / d;
        if let Some(&p) = which.iter().find(|&&p| p as usize >= n) {
            return Err(Error::invalid_parameter(
                "which",
                format!("row {p} of {n} points"),
            ));
        }
        found.clear();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above; rows are in range.
            unsafe { self.two_nearest_avx512(points, which, found) };
            return Ok(());
        }
        self.two_nearest_portable(points, which, found);
        Ok(())
    }

    /// Row `p` of `points`.
    fn row<'a>(&self, points: &'a [f32], p: u32) -> &'a [f32] {
        &points[p as usize * self.dim..(p as usize + 1) * self.dim]
    }

    /// The definition, one code at a time (the reference the SIMD path must equal).
    fn two_nearest_portable(&self, points: &[f32], which: &[u32], found: &mut Vec<TwoNearest>) {
        found.extend(
            which
                .iter()
                .map(|&p| self.by_definition(self.row(points, p))),
        );
    }

    /// The two nearest codes of `x` by the definition, every code scanned.
    fn by_definition(&self, x: &[f32]) -> TwoNearest {
        let mut best = TwoNearest {
            index: 0,
            distance: f32::INFINITY,
            second: f32::INFINITY,
        };
        for (j, code) in self.rows.chunks_exact(self.dim).enumerate() {
            let v = squared_distance(x, code);
            if v < best.distance {
                best = TwoNearest {
                    index: j as u32,
                    distance: v,
                    second: best.distance,
                };
            } else if v < best.second {
                best.second = v;
            }
        }
        best
    }

    /// Four points at a time against every block; lane-wise best, runner-up and index, then
    /// one reduction per point.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    // Indexing four rows by one `i` keeps the four chains in one loop.
    #[allow(clippy::needless_range_loop)]
    unsafe fn two_nearest_avx512(
        &self,
        points: &[f32],
        which: &[u32],
        found: &mut Vec<TwoNearest>,
    ) {
        use std::arch::x86_64::*;
        let d = self.dim;
        let blocks = self.k.div_ceil(LANES);
        let tail = self.k - (blocks - 1) * LANES;
        let tail_mask: __mmask16 = if tail == LANES {
            0xffff
        } else {
            (1u16 << tail) - 1
        };
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let inf = _mm512_set1_ps(f32::INFINITY);
        for quad in which.chunks(POINTS) {
            let last = quad.len() - 1;
            let rows = [
                self.row(points, quad[0]),
                self.row(points, quad[1.min(last)]),
                self.row(points, quad[2.min(last)]),
                self.row(points, quad[3.min(last)]),
            ];
            let mut best = [inf; POINTS];
            let mut second = [inf; POINTS];
            let mut index = [_mm512_setzero_si512(); POINTS];
            for b in 0..blocks {
                let block = &self.lanes[b * d * LANES..(b + 1) * d * LANES];
                let mut acc = [_mm512_setzero_ps(); POINTS];
                for i in 0..d {
                    // SAFETY: i·16 + 16 <= block.len() = d·16.
                    let c = unsafe { _mm512_loadu_ps(block.as_ptr().add(i * LANES)) };
                    for q in 0..POINTS {
                        let diff = _mm512_sub_ps(_mm512_set1_ps(rows[q][i]), c);
                        acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(diff, diff));
                    }
                }
                let valid = if b + 1 == blocks { tail_mask } else { 0xffff };
                let codes = _mm512_add_epi32(iota, _mm512_set1_epi32((b * LANES) as i32));
                for q in 0..POINTS {
                    let v = _mm512_mask_mov_ps(inf, valid, acc[q]);
                    // Strictly less: within a lane, ties keep the lower index.
                    let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, best[q]);
                    second[q] = _mm512_mask_mov_ps(_mm512_min_ps(second[q], v), better, best[q]);
                    best[q] = _mm512_mask_mov_ps(best[q], better, v);
                    index[q] = _mm512_mask_mov_epi32(index[q], better, codes);
                }
            }
            for q in 0..quad.len() {
                let distance = _mm512_reduce_min_ps(best[q]);
                let ties = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(best[q], _mm512_set1_ps(distance));
                // Among lanes holding the smallest value, the lowest code index; lanes that
                // never held a finite value keep index 0, which is the definition's choice
                // when every distance overflows.
                let winner = _mm512_mask_reduce_min_epu32(ties, index[q]);
                let win_lane =
                    _mm512_mask_cmpeq_epi32_mask(ties, index[q], _mm512_set1_epi32(winner as i32));
                let others = _mm512_mask_mov_ps(best[q], win_lane, inf);
                let second = _mm512_reduce_min_ps(_mm512_min_ps(second[q], others));
                found.push(TwoNearest {
                    index: winner,
                    distance,
                    second,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Nearest index and distance equal the row-major kernel's; the runner-up is the
        /// second smallest distance by the definition; SIMD and portable paths agree.
        #[test]
        fn two_nearest_is_the_definition(
            seed in any::<u64>(), n in 1usize..12, k in 1usize..70, dim in 1usize..40, grid in any::<bool>(),
        ) {
            let mut rng = crate::Seed(seed).rng();
            let mut draw = |len: usize| -> Vec<f32> {
                rng.uniform_vec(len, -3.0, 3.0).into_iter().map(|v| if grid { v.round() } else { v }).collect()
            };
            let points = draw(n * dim);
            let mut codes = draw(k * dim);
            if k > 3 {
                codes.copy_within(0..dim, 3 * dim); // a duplicate code: an exact tie
            }
            let prepared = ExactCodes::new(&codes, dim).unwrap();
            let which: Vec<u32> = (0..n as u32).rev().chain(0..n as u32).collect();
            let mut found = Vec::new();
            prepared.two_nearest(&points, &which, &mut found).unwrap();
            let mut portable = Vec::new();
            prepared.two_nearest_portable(&points, &which, &mut portable);
            prop_assert_eq!(&found, &portable);
            let plain = crate::nearest_codes(&points, &codes, dim, None).unwrap();
            for (t, &p) in found.iter().zip(&which) {
                let p = p as usize;
                prop_assert_eq!(t.index, plain.indices[p]);
                prop_assert_eq!(t.distance.to_bits(), plain.distances[p].to_bits());
                let mut all: Vec<f32> = (0..k)
                    .map(|j| squared_distance(&points[p * dim..(p + 1) * dim], &codes[j * dim..(j + 1) * dim]))
                    .collect();
                all.sort_by(f32::total_cmp);
                prop_assert_eq!(t.second, if k > 1 { all[1] } else { f32::INFINITY });
            }
        }
    }

    #[test]
    fn overflow_goes_to_index_zero_and_bad_input_is_typed() {
        let codes = ExactCodes::new(&[0.0, -1.0, 2.0], 1).unwrap();
        let mut found = Vec::new();
        codes.two_nearest(&[3e19], &[0], &mut found).unwrap();
        assert_eq!(found[0].index, 0);
        assert_eq!(found[0].distance, f32::INFINITY);
        assert!(matches!(
            codes.two_nearest(&[0.0], &[1], &mut found),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            ExactCodes::new(&[0.0, f32::NAN], 1),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(ExactCodes::new(&[], 2), Err(Error::EmptyInput(_))));
    }
}
