//! Timings of VECVQ training steps, Lloyd-ECVQ iterations and the rANS coder.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcl_ecvq::entropy::{decode, encode};
use qcl_ecvq::{ClgConfig, ClgEcvq, Source, Vecvq, VecvqConfig};
use qcl_tensor::Seed;

fn vecvq_steps(c: &mut Criterion) {
    qcl_tensor::tune_process_for_numeric_loops();
    let params = VecvqConfig::new(8.0);
    let mut model = Vecvq::for_source(Source::Gaussian, &params).expect("model");
    let mut rng = Seed::new(1).rng();
    let mut batch = vec![0f32; params.batch_size * 2];
    let mut group = c.benchmark_group("vecvq");
    group.throughput(Throughput::Elements(1));
    group.bench_function("step K=256 batch=1024 (incl. sampling)", |b| {
        b.iter(|| {
            Source::Gaussian.sample_into(&mut batch, &mut rng);
            model.step(&batch, 1e-3).expect("step")
        })
    });
    group.finish();
}

fn clg_iterations(c: &mut Criterion) {
    let data = Source::Gaussian.sample(200_000, &mut Seed::new(2).rng());
    let mut group = c.benchmark_group("clg");
    group.sample_size(10);
    group.bench_function("20 k-means + 10 ECVQ iterations K=256 n=200k", |b| {
        b.iter(|| {
            ClgEcvq::fit(
                &data,
                2,
                &ClgConfig {
                    max_iterations: 10,
                    tolerance: 0.0,
                    ..ClgConfig::new(8.0)
                },
            )
            .expect("fit")
        })
    });
    group.finish();
}

fn rans(c: &mut Criterion) {
    let train = Source::Gaussian.sample(200_000, &mut Seed::new(3).rng());
    let model = ClgEcvq::fit(&train, 2, &ClgConfig::new(8.0)).expect("fit");
    let q = &model.quantizer;
    let points = Source::Gaussian.sample(1_000_000, &mut Seed::new(4).rng());
    let indices = q.encode(&points).expect("encode");
    let stream = encode(&indices, q.frequency_table()).expect("rans");
    let mut group = c.benchmark_group("rans");
    group.throughput(Throughput::Elements(indices.len() as u64));
    group.sample_size(10);
    group.bench_function("encode 1M symbols", |b| {
        b.iter(|| encode(&indices, q.frequency_table()).expect("rans"))
    });
    group.bench_function("decode 1M symbols", |b| {
        b.iter(|| decode(&stream, q.frequency_table()).expect("rans"))
    });
    group.finish();
}

criterion_group!(benches, vecvq_steps, clg_iterations, rans);
criterion_main!(benches);
