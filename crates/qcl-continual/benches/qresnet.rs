//! `cargo bench -p qcl-continual --bench qresnet`: one SGD training step of LifeQuant's
//! QResNet-8 (docs/methods/lifequant.md § Network) on a batch of 128 random 1×28×28 images, at
//! full precision and with 4-bit weights and activations, for the reproduction's widths
//! (16/32/64) and the quick widths (8/16/32). Throughput is reported in images per second.

use candle_core::{Device, ModuleT, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcl_continual::ball::cross_entropy;
use qcl_continual::{QResNet, QResNetConfig};
use qcl_nn::optim::{Optimizer, Sgd, SgdConfig};
use qcl_nn::ParamStore;
use qcl_tensor::Seed;

const BATCH: usize = 128;

fn training_step(c: &mut Criterion) {
    qcl_tensor::tune_process_for_numeric_loops();
    let device = Device::Cpu;
    let mut group = c.benchmark_group("qresnet_step");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    let mut rng = Seed::new(0).rng();
    let pixels: Vec<f32> = (0..BATCH * 784).map(|_| rng.uniform()).collect();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    let x = Tensor::from_vec(pixels, (BATCH, 1, 28, 28), &device).unwrap();
    let y = Tensor::from_vec(labels, BATCH, &device).unwrap();
    for (name, widths) in [("qresnet8", [16, 32, 64]), ("smoke", [8, 16, 32])] {
        for bits in [32, 4] {
            let store = ParamStore::new(1);
            let config = QResNetConfig {
                widths,
                weight_bits: bits,
                activation_bits: bits,
                ..QResNetConfig::qresnet8()
            };
            let model = QResNet::new(&store.root(&device), &config).unwrap();
            let params = SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 1e-4,
                ..SgdConfig::default()
            };
            let mut sgd = Sgd::new(store.trainable(), params).unwrap();
            group.bench_function(format!("{name}_{bits}bit"), |b| {
                b.iter(|| {
                    let loss = cross_entropy(&model.forward_t(&x, true).unwrap(), &y).unwrap();
                    sgd.backward_step(&loss).unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, training_step);
criterion_main!(benches);
