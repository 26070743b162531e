//! A replay buffer of candle tensors feeding training batches: a candle-nn classifier learns
//! five tasks of two new classes each (class-incremental, synthetic 20-dimensional data), once
//! with plain fine-tuning and once mixing every batch with a replay batch from a reservoir
//! buffer of 200 feature vectors. Prints the accuracy on all classes after each task.
//!
//! ```text
//! cargo run --release -p qcl-continual --example replay_tensors
//! ```
//!
//! The qcl parts are the lines marked `qcl (i/2)`: storing a sample, drawing a batch.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{loss::cross_entropy, Optimizer};
use qcl_continual::{Capacity, Filter, ReplayBuffer, ReservoirBuffer};
use qcl_nn::ParamStore;
use qcl_tensor::{Result, Seed};

const DIM: usize = 20;
const CLASSES: usize = 10;
const PER_CLASS: usize = 300;
const STEPS: usize = 150;
const BATCH: usize = 32;

/// `PER_CLASS` points of each class around its own random centre, and their labels.
fn data(seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut rng = Seed::new(seed).rng();
    let centres = Seed::new(0)
        .rng()
        .normal_tensor((CLASSES, DIM), 0.0, 1.0, device)?;
    let labels: Vec<u32> = (0..CLASSES * PER_CLASS)
        .map(|i| (i / PER_CLASS) as u32)
        .collect();
    let labels = Tensor::new(labels, device)?;
    let noise = rng.normal_tensor((CLASSES * PER_CLASS, DIM), 0.0, 0.8, device)?;
    Ok(((centres.index_select(&labels, 0)? + noise)?, labels))
}

fn accuracy(model: &candle_nn::Linear, x: &Tensor, y: &Tensor) -> Result<f32> {
    let predicted = model.forward(x)?.argmax(D::Minus1)?;
    let correct = predicted.eq(y)?.to_dtype(DType::F32)?.mean_all()?;
    Ok(correct.to_scalar::<f32>()?)
}

/// Trains the five tasks in order; with `replay`, each step also trains on a batch drawn from
/// the buffer. Returns the accuracy on all classes' test points after each task.
fn run(replay: bool) -> Result<Vec<f32>> {
    let device = Device::Cpu;
    let (train_x, train_y) = data(1, &device)?;
    let (test_x, test_y) = data(2, &device)?;
    // A seeded VarBuilder over a VarMap, so that both runs start from the same weights.
    let store = ParamStore::new(0);
    let model = candle_nn::linear(DIM, CLASSES, store.var_builder(&device))?;
    let mut opt = candle_nn::AdamW::new_lr(store.var_map().all_vars(), 0.01)?;
    let mut buffer = ReservoirBuffer::new(Capacity::items(200), Seed::new(3))?;
    let mut rng = Seed::new(4).rng();
    let mut accuracies = Vec::new();
    for task in 0..CLASSES / 2 {
        let first = task * 2 * PER_CLASS;
        for step in 0..STEPS {
            let rows: Vec<u32> = (0..BATCH)
                .map(|_| rng.below(2 * PER_CLASS).map(|i| (first + i) as u32))
                .collect::<Result<_>>()?;
            let rows = Tensor::new(rows.as_slice(), &device)?;
            let (mut x, mut y) = (
                train_x.index_select(&rows, 0)?,
                train_y.index_select(&rows, 0)?,
            );
            if replay && task > 0 {
                let (rx, ry) = buffer.sample_batch(BATCH, &Filter::tasks_before(task), &mut rng)?; // qcl (2/2)
                (x, y) = (Tensor::cat(&[&x, &rx], 0)?, Tensor::cat(&[&y, &ry], 0)?);
            }
            opt.backward_step(&cross_entropy(&model.forward(&x)?, &y)?)?;
            // Offer the first sample of each new batch (one compact copy, so that the buffer's
            // byte count is the memory it holds).
            if step % 2 == 0 {
                let i = rows.get(0)?.to_scalar::<u32>()? as usize;
                let label = train_y.get(i)?.to_scalar::<u32>()?;
                buffer.insert(label, task, train_x.get(i)?.force_contiguous()?)?;
                // qcl (1/2)
            }
        }
        accuracies.push(accuracy(&model, &test_x, &test_y)?);
    }
    Ok(accuracies)
}

fn main() -> Result<()> {
    let plain = run(false)?;
    let replayed = run(true)?;
    println!("accuracy on all 10 classes after each task (2 new classes per task)");
    println!("task  fine-tune  replay (200 stored vectors)");
    for (t, (a, b)) in plain.iter().zip(&replayed).enumerate() {
        println!("{t:>4}  {a:>9.3}  {b:>6.3}");
    }
    Ok(())
}
