//! k-means and product quantization straight on a candle `Tensor`: cluster 20,000 points of a
//! 32-dimensional Gaussian mixture, then compress them to 8 bytes each with PQ and search them.
//!
//! ```text
//! cargo run --release -p qcl-pq --example tensor_kmeans_pq
//! ```
//!
//! The qcl calls are the lines marked `qcl`; everything else is candle, with no conversion
//! between the two (tensors in, tensors out).

use candle_core::{Device, Tensor, D};
use qcl_pq::{KMeans, KMeansConfig, KMeansInit, ProductQuantizer, ProductQuantizerConfig};

fn main() -> qcl_tensor::Result<()> {
    let device = Device::Cpu;
    // 64 centres, 20,000 points around them: any [n, d] float tensor will do.
    let (n, dim, centres) = (20_000, 32, 64);
    let mut rng = qcl_tensor::Seed::new(3).rng();
    let means = rng.normal_tensor((centres, dim), 0.0, 1.0, &device)?;
    let labels: Vec<u32> = (0..n as u32).map(|i| i % centres as u32).collect();
    let noise = rng.normal_tensor((n, dim), 0.0, 0.3, &device)?;
    let x = (means.index_select(&Tensor::new(labels, &device)?, 0)? + noise)?;

    // k-means: fit, centroids, assignment, all tensors.
    let params = KMeansConfig {
        max_iter: 20,
        init: KMeansInit::KMeansPlusPlus,
        ..KMeansConfig::new(centres)
    };
    let kmeans = KMeans::fit_tensor(&x, None, &params)?; // qcl
    let (assigned, distances) = kmeans.assign_tensor(&x)?; // qcl
    let centroids = kmeans.centroids_tensor(&device)?; // qcl
    println!(
        "k-means: {} centroids {:?}, objective {:.4} → {:.4} in {} iterations; mean squared distance {:.4}; first labels {:?}",
        centres,
        centroids.dims(),
        kmeans.objective_history[0],
        kmeans.objective_history.last().copied().unwrap_or(f64::NAN),
        kmeans.iterations,
        distances.mean_all()?.to_scalar::<f32>()?,
        assigned.narrow(0, 0, 6)?.to_vec1::<u32>()?
    );

    // Product quantization: 8 sub-spaces of 256 centroids, 8 bytes per vector instead of 128.
    let pq = ProductQuantizer::train_tensor(&x, &ProductQuantizerConfig::new(8, 8))?; // qcl
    let codes = pq.encode_tensor(&x)?; // qcl: u32 [n, 8]
    let decoded = pq.decode_tensor(&codes)?; // qcl: f32 [n, 32]
    let error = (&decoded - &x)?.sqr()?.sum(D::Minus1)?.mean_all()?;
    let energy = x.sqr()?.sum(D::Minus1)?.mean_all()?;
    println!(
        "PQ: codes {:?} ({} bytes per vector, {}× smaller than f32), relative reconstruction error {:.4}",
        codes.dims(),
        pq.code_size(),
        dim * 4 / pq.code_size(),
        (error / energy)?.to_scalar::<f32>()?
    );

    // Asymmetric-distance search of the first 5 points among all codes: each finds itself or
    // a point with the same code first.
    let (nearest, dist) = pq.search_tensor(&x.narrow(0, 0, 5)?, &codes, 3)?; // qcl
    for (q, (row, d)) in nearest
        .to_vec2::<u32>()?
        .iter()
        .zip(dist.to_vec2::<f32>()?)
        .enumerate()
    {
        println!("query {q}: nearest {row:?} at {d:.3?}");
    }
    Ok(())
}
