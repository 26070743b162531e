//! `cargo bench -p qcl-pq`: one Lloyd iteration on the k-means issue's workloads, the
//! nearest-code kernel alone, and PQ encode / search.
//!
//! The Fashion-MNIST workload needs `data/fashion-mnist.safetensors` (`cargo xtask data`) and
//! is skipped without it.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use qcl_pq::workloads::{gaussian_mixture, weight_blocks};
use qcl_pq::{KMeans, KMeansConfig, ProductQuantizer, ProductQuantizerConfig};
use qcl_tensor::nearest_codes;

fn fashion_pixels() -> Option<(Vec<f32>, usize)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist.safetensors");
    Some(qcl_data::SplitDataset::load(path).ok()?.all_pixels_f32())
}

fn lloyd(c: &mut Criterion) {
    // As the `qcl` and `xtask` binaries do.
    qcl_tensor::tune_process_for_numeric_loops();
    let mut workloads = vec![
        ("weight-blocks", weight_blocks(), 256),
        ("gaussian-mixture", gaussian_mixture(), 1024),
    ];
    if let Some(f) = fashion_pixels() {
        workloads.push(("fashion-mnist-pixels", f, 256));
    }
    let mut group = c.benchmark_group("kmeans");
    group.sample_size(10);
    for (name, (data, d), k) in &workloads {
        let params = KMeansConfig {
            max_iter: 1,
            max_points_per_centroid: None,
            ..KMeansConfig::new(*k)
        };
        group.bench_function(format!("lloyd-iteration/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let model = KMeans::fit(data, *d, None, &params).unwrap();
                    total += std::time::Duration::from_secs_f64(model.lloyd_seconds);
                }
                total
            })
        });
        let centroids: Vec<f32> = data[..k * d].to_vec();
        group.bench_function(format!("nearest-codes/{name}"), |b| {
            b.iter(|| nearest_codes(data, &centroids, *d, None).unwrap())
        });
    }
    group.finish();
}

fn pq(c: &mut Criterion) {
    let (data, d) = gaussian_mixture();
    let train = &data[..50_000 * d];
    let params = ProductQuantizerConfig {
        max_iter: 10,
        ..ProductQuantizerConfig::new(8, 8)
    };
    let quantizer = ProductQuantizer::train(train, d, &params).unwrap();
    let database = &data[..100_000 * d];
    let codes = quantizer.encode(database).unwrap();
    let queries = &data[150_000 * d..150_100 * d];
    let mut group = c.benchmark_group("pq");
    group.sample_size(10);
    group.bench_function("encode/100k×64,m8,nbits8", |b| {
        b.iter(|| quantizer.encode(database).unwrap())
    });
    group.bench_function("search/100q×100k,top10", |b| {
        b.iter(|| quantizer.search(queries, &codes, 10).unwrap())
    });
    group.finish();
}

criterion_group!(benches, lloyd, pq);
criterion_main!(benches);
