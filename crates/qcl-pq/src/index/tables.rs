//! Distance tables of a query, computed across centroids with SIMD.
//!
//! Entry `(j, c)` of a table is a sum over the `dsub` components of sub-space `j`. With the
//! codebooks stored component-major (`[m, dsub, ksub]`), the sums of all `ksub` centroids
//! advance together, one component at a time: the compiler vectorises across centroids, and
//! each entry is still added in component order, so it is bit for bit the scalar definition
//! ([`qcl_tensor::squared_distance`] for L2).

use crate::ProductQuantizer;

/// A product quantizer's codebooks, transposed for making tables.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TableMaker {
    m: usize,
    ksub: usize,
    dsub: usize,
    /// `[m, dsub, ksub]`.
    transposed: Vec<f32>,
}

impl TableMaker {
    pub(crate) fn new(pq: &ProductQuantizer) -> Self {
        let (m, ksub, dsub) = (pq.m(), pq.ksub(), pq.dsub());
        let mut transposed = vec![0f32; m * dsub * ksub];
        for j in 0..m {
            for (c, centroid) in pq.codebook(j).chunks_exact(dsub).enumerate() {
                for (t, &v) in centroid.iter().enumerate() {
                    transposed[(j * dsub + t) * ksub + c] = v;
                }
            }
        }
        TableMaker {
            m,
            ksub,
            dsub,
            transposed,
        }
    }

    /// `out[j·ksub + c] = Σ_t (q_jt − C_jct)²`, added in order `t = 0, 1, …`.
    pub(crate) fn l2(&self, query: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F is available.
            return unsafe { self.l2_avx512(query, out) };
        }
        self.accumulate::<false>(query, out);
    }

    /// `out[j·ksub + c] = −Σ_t q_jt · C_jct`, the sum added in order `t = 0, 1, …`.
    pub(crate) fn negated_inner_product(&self, query: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F is available.
            unsafe { self.inner_product_avx512(query, out) };
        } else {
            self.accumulate::<true>(query, out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.accumulate::<true>(query, out);
        out.iter_mut().for_each(|v| *v = -*v);
    }

    /// The same loop compiled for 16 lanes (no fused multiply-add: the same bits).
    ///
    /// # Safety
    /// AVX-512 F is available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn l2_avx512(&self, query: &[f32], out: &mut [f32]) {
        self.accumulate::<false>(query, out);
    }

    /// # Safety
    /// AVX-512 F is available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn inner_product_avx512(&self, query: &[f32], out: &mut [f32]) {
        self.accumulate::<true>(query, out);
    }

    /// Sums of `(q − c)²` (or of `q · c` when `PRODUCT`) across all centroids at once, 64
    /// centroids at a time so their sums stay in registers over the components.
    #[inline(always)]
    fn accumulate<const PRODUCT: bool>(&self, query: &[f32], out: &mut [f32]) {
        const CHUNK: usize = 64;
        let (ksub, dsub) = (self.ksub, self.dsub);
        let term = |q: f32, c: f32| if PRODUCT { q * c } else { (q - c) * (q - c) };
        for j in 0..self.m {
            let sub = &query[j * dsub..(j + 1) * dsub];
            let columns = &self.transposed[j * dsub * ksub..(j + 1) * dsub * ksub];
            let row = &mut out[j * ksub..(j + 1) * ksub];
            if ksub % CHUNK == 0 {
                for (c0, chunk) in row.chunks_exact_mut(CHUNK).enumerate() {
                    let mut acc = [0f32; CHUNK];
                    for (t, &q) in sub.iter().enumerate() {
                        let start = t * ksub + c0 * CHUNK;
                        let components: &[f32; CHUNK] =
                            columns[start..start + CHUNK].try_into().expect("a chunk");
                        for (a, &c) in acc.iter_mut().zip(components) {
                            *a += term(q, c);
                        }
                    }
                    chunk.copy_from_slice(&acc);
                }
            } else {
                row.fill(0.0);
                for (t, &q) in sub.iter().enumerate() {
                    let components = &columns[t * ksub..(t + 1) * ksub];
                    for (a, &c) in row.iter_mut().zip(components) {
                        *a += term(q, c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use qcl_tensor::{squared_distance, Seed};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The transposed tables are bit for bit the scalar definitions.
        #[test]
        fn tables_equal_the_scalar_definition(
            seed in any::<u64>(),
            m in 1usize..5,
            dsub in 1usize..9,
            nbits in prop::sample::select(vec![1u32, 4, 8]),
        ) {
            let ksub = 1usize << nbits;
            let mut rng = Seed::new(seed).rng();
            let codebooks = rng.normal_vec(m * ksub * dsub, 0.0, 3.0);
            let pq = ProductQuantizer::from_codebooks(m * dsub, m, nbits, codebooks).unwrap();
            let query = rng.normal_vec(m * dsub, 0.0, 3.0);
            let maker = TableMaker::new(&pq);
            let (mut l2, mut ip) = (vec![0f32; m * ksub], vec![0f32; m * ksub]);
            maker.l2(&query, &mut l2);
            maker.negated_inner_product(&query, &mut ip);
            for j in 0..m {
                let sub = &query[j * dsub..(j + 1) * dsub];
                for (c, centroid) in pq.codebook(j).chunks_exact(dsub).enumerate() {
                    prop_assert_eq!(l2[j * ksub + c].to_bits(), squared_distance(sub, centroid).to_bits());
                    let mut dot = 0f32;
                    for (a, b) in sub.iter().zip(centroid) {
                        dot += a * b;
                    }
                    prop_assert_eq!(ip[j * ksub + c].to_bits(), (-dot).to_bits());
                }
            }
        }
    }
}
