//! `cargo bench -p qcl-continual --bench buffer`: the cost of a replay buffer's insert + sample
//! per item at 10⁵ items.
//!
//! Each iteration streams 2·10⁵ items of 98 bytes (an AQM code on Fashion-MNIST) into a buffer
//! of 10⁵ items' worth of bytes — the first half fills it, the second half evicts — and draws a
//! replay batch of 10 from earlier tasks after every 10 inserts, so each item costs one insert
//! and one sampled entry. The reported time per element is that per-item cost.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qcl_continual::{
    Capacity, ClassBalancedBuffer, Filter, Keep, PerTaskBuffer, ReplayBuffer, ReservoirBuffer,
};
use qcl_tensor::Seed;

const HELD: usize = 100_000;
const STREAM: usize = 2 * HELD;
const CODE_BYTES: usize = 98;
const TASKS: usize = 5;

/// The stream: 10 classes, 5 tasks in order, items of 98 bytes.
fn stream() -> Vec<(u32, usize, Vec<u8>)> {
    (0..STREAM)
        .map(|i| {
            let task = i * TASKS / STREAM;
            (
                (2 * task + i % 2) as u32,
                task,
                vec![(i % 251) as u8; CODE_BYTES],
            )
        })
        .collect()
}

fn run<B: ReplayBuffer<Vec<u8>>>(mut buffer: B, items: Vec<(u32, usize, Vec<u8>)>) -> B {
    let mut rng = Seed::new(1).rng();
    let mut drawn = 0usize;
    for (i, (label, task, item)) in items.into_iter().enumerate() {
        buffer.insert(label, task, item).expect("fits");
        if (i + 1).is_multiple_of(10) {
            drawn += buffer
                .sample(10, &Filter::tasks_before(task + 1), &mut rng)
                .len();
        }
    }
    assert!(drawn > 0);
    buffer
}

fn insert_and_sample(c: &mut Criterion) {
    let capacity = Capacity::bytes(HELD * CODE_BYTES);
    let mut group = c.benchmark_group("insert_and_sample_1e5");
    group.throughput(Throughput::Elements(STREAM as u64));
    group.sample_size(10);
    group.bench_function("reservoir", |b| {
        b.iter_batched(
            stream,
            |items| run(ReservoirBuffer::new(capacity, Seed::new(0)).unwrap(), items),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("class_balanced", |b| {
        b.iter_batched(
            stream,
            |items| {
                run(
                    ClassBalancedBuffer::new(capacity, Seed::new(0)).unwrap(),
                    items,
                )
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("per_task_delta_0.5", |b| {
        b.iter_batched(
            stream,
            |items| {
                let buffer =
                    PerTaskBuffer::new(capacity, Keep::Fraction(0.5), Seed::new(0)).unwrap();
                run(buffer, items)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, insert_and_sample);
criterion_main!(benches);
