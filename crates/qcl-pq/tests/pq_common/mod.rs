//! Helpers shared by the product-quantization tests.
// Each test crate uses a different part of them.
#![allow(dead_code)]

use qcl_pq::{PackedCodes, ProductQuantizer, ProductQuantizerConfig};
use qcl_tensor::{squared_distance, Error, Nearest, Seed};

/// A quantizer with uniform random codebooks; on a grid of integers when `grid`, so that many
/// distances tie exactly.
pub fn random_pq(seed: u64, dsub: usize, m: usize, nbits: u32, grid: bool) -> ProductQuantizer {
    let len = m * (1 << nbits) * dsub;
    let codebooks = values(seed, len, grid);
    ProductQuantizer::from_codebooks(dsub * m, m, nbits, codebooks).unwrap()
}

pub fn values(seed: u64, len: usize, grid: bool) -> Vec<f32> {
    Seed::new(seed)
        .rng()
        .uniform_vec(len, -3.0, 3.0)
        .into_iter()
        .map(|v| if grid { v.round() } else { v })
        .collect()
}

/// The ADC definition, literally: per-query tables, sums in sub-space order, a full sort.
pub fn brute_force_adc(
    pq: &ProductQuantizer,
    queries: &[f32],
    codes: &PackedCodes,
    top_k: usize,
) -> Nearest {
    let (dsub, m) = (pq.dsub(), pq.m());
    let mut indices = Vec::new();
    let mut distances = Vec::new();
    for q in queries.chunks(pq.dim()) {
        let mut all: Vec<(f32, u32)> = (0..codes.n())
            .map(|i| {
                let mut d = 0f32;
                for j in 0..m {
                    let c = codes.get(i, j) as usize;
                    let centroid = &pq.codebook(j)[c * dsub..(c + 1) * dsub];
                    d += squared_distance(&q[j * dsub..(j + 1) * dsub], centroid);
                }
                (d, i as u32)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(d, i) in &all[..top_k] {
            indices.push(i);
            distances.push(d);
        }
    }
    Nearest { indices, distances }
}

pub fn sub_vectors(data: &[f32], dim: usize, j: usize, dsub: usize) -> Vec<f32> {
    data.chunks(dim)
        .flat_map(|r| r[j * dsub..(j + 1) * dsub].to_vec())
        .collect()
}

pub fn is_invalid(result: Result<impl std::fmt::Debug, Error>, param: &str) -> bool {
    matches!(result, Err(Error::InvalidParameter { ref name, .. }) if name == param)
}

pub fn is_shape_mismatch<T>(result: Result<T, Error>) -> bool {
    matches!(result, Err(Error::ShapeMismatch { .. }))
}

pub fn is_non_finite_at<T>(result: Result<T, Error>, at: usize) -> bool {
    matches!(result, Err(Error::NonFinite { index, .. }) if index == at)
}

pub fn quick_params(m: usize, nbits: u32) -> ProductQuantizerConfig {
    ProductQuantizerConfig {
        max_iter: 10,
        ..ProductQuantizerConfig::new(m, nbits)
    }
}
