//! The synthetic k-means workloads of qcl's benchmarks, generated from fixed seeds, so that
//! `cargo bench -p qcl-pq`, `cargo xtask reproduce kmeans` and a user's own comparison with
//! another library all use the same points.

use qcl_tensor::Seed;

/// 1,200,000 weight blocks of dimension 9 drawn from N(0, 0.05²) (seed 9): the shape of
/// weight-PQ's 3×3 convolution blocks. Returns `(points, dim)`.
///
/// ```
/// let (points, dim) = qcl_pq::workloads::weight_blocks();
/// assert_eq!((points.len() / dim, dim), (1_200_000, 9));
/// ```
pub fn weight_blocks() -> (Vec<f32>, usize) {
    (Seed::new(9).rng().normal_vec(1_200_000 * 9, 0.0, 0.05), 9)
}

/// 200,000 points of dimension 64 from a mixture of 16 Gaussians: centres from N(0, 1), spread
/// 0.3, point `i` drawn around centre `i mod 16` (seed 64). Returns `(points, dim)`.
///
/// ```
/// let (points, dim) = qcl_pq::workloads::gaussian_mixture();
/// assert_eq!((points.len() / dim, dim), (200_000, 64));
/// ```
pub fn gaussian_mixture() -> (Vec<f32>, usize) {
    let mut rng = Seed::new(64).rng();
    let centres = rng.normal_vec(16 * 64, 0.0, 1.0);
    let mut data = rng.normal_vec(200_000 * 64, 0.0, 0.3);
    for (i, row) in data.chunks_mut(64).enumerate() {
        let centre = &centres[(i % 16) * 64..(i % 16 + 1) * 64];
        row.iter_mut().zip(centre).for_each(|(x, m)| *x += m);
    }
    (data, 64)
}
