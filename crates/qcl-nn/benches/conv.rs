//! `cargo bench -p qcl-nn --bench conv`: the convolutions of qcl's two reference models and
//! one whole training step of each.
//!
//! - `conv2d_forward` / `conv2d_backward`: ResNet-20's convolution shapes at batch 128 and the
//!   VQ autoencoder's convolutions: the strided input layer (1 → 16 channels, 28×28 → 14×14,
//!   kernel 4, stride 2, padding 1), its 3×3 and 1×1 layers at 14×14 and the transposed
//!   output layer (32 → 1 channels, 14×14 → 28×28, kernel 4, stride 2, padding 1). The
//!   backward case times the forward pass plus the backward pass of
//!   `(y * g).sum_all()` for a fixed random `g`, with both `x` and `w` variables (so both
//!   the input and the weight gradients are computed), through the public
//!   `qcl_nn::ops::{conv2d, conv_transpose2d}`.
//! - `train_step`: forward, loss, backward and SGD update of ResNet-20 (cross-entropy) and of
//!   the VQ autoencoder (MSE + 2·commitment) at batch 32, built from the public models and
//!   optimizer exactly as `qcl bench train` builds them.
//!
//! Sample counts are small (10 samples, flat sampling, a few seconds per case) so the whole
//! run takes a couple of minutes.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};
use qcl_nn::bench::BenchModel;
use qcl_nn::ops::{conv2d, conv_transpose2d, Conv2dParams, ConvTranspose2dParams};
use qcl_tensor::{Result, Seed};

/// Images per convolution call (the reference training batch).
const CONV_BATCH: usize = 128;
/// Images per training step in `train_step`.
const STEP_BATCH: usize = 32;

/// (c_in, c_out, input size, kernel, stride, padding) of ResNet-20's 3×3 convolutions on
/// 28×28 inputs, then of the VQ autoencoder's convolutions.
const CONV_SHAPES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (16, 16, 28, 3, 1, 1),
    (16, 32, 28, 3, 2, 1),
    (32, 32, 14, 3, 1, 1),
    (64, 64, 7, 3, 1, 1),
    (1, 16, 28, 4, 2, 1),
    (16, 32, 14, 3, 1, 1),
    (32, 32, 14, 1, 1, 0),
];

#[derive(Clone, Copy)]
enum Op {
    Conv(Conv2dParams),
    Transposed(ConvTranspose2dParams),
}

/// One convolution to time: its operands and the fixed output cotangent `g`.
struct Case {
    name: String,
    op: Op,
    x: Var,
    w: Var,
    g: Tensor,
}

impl Case {
    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self.op {
            Op::Conv(p) => conv2d(x, w, p),
            Op::Transposed(p) => conv_transpose2d(x, w, p),
        }
    }

    /// Forward, then the gradients of `sum(y ⊙ g)` with respect to `x` and `w`.
    fn forward_backward(&self) -> Result<candle_core::backprop::GradStore> {
        let y = self.forward(self.x.as_tensor(), self.w.as_tensor())?;
        Ok((y * &self.g)?.sum_all()?.backward()?)
    }
}

fn cases() -> Result<Vec<Case>> {
    let device = Device::Cpu;
    let mut rng = Seed(0).child_named("conv-bench").rng();
    let mut cases = Vec::new();
    for (c_in, c_out, size, kernel, stride, padding) in CONV_SHAPES {
        let p = Conv2dParams {
            stride,
            padding,
            dilation: 1,
        };
        let x = rng.normal_tensor((CONV_BATCH, c_in, size, size), 0.0, 1.0, &device)?;
        let w = rng.normal_tensor((c_out, c_in, kernel, kernel), 0.0, 0.1, &device)?;
        let y_dims = conv2d(&x, &w, p)?.dims().to_vec();
        cases.push(Case {
            name: format!("{c_in}-{c_out}_{size}x{size}_k{kernel}s{stride}p{padding}"),
            op: Op::Conv(p),
            x: Var::from_tensor(&x)?,
            w: Var::from_tensor(&w)?,
            g: rng.normal_tensor(y_dims, 0.0, 1.0, &device)?,
        });
    }
    // The VQ autoencoder's last layer: 32 → 1 channels, 14×14 → 28×28.
    let p = ConvTranspose2dParams {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    let x = rng.normal_tensor((CONV_BATCH, 32, 14, 14), 0.0, 1.0, &device)?;
    let w = rng.normal_tensor((32, 1, 4, 4), 0.0, 0.1, &device)?;
    cases.push(Case {
        name: "transposed_32-1_14x14_k4s2p1".into(),
        op: Op::Transposed(p),
        x: Var::from_tensor(&x)?,
        w: Var::from_tensor(&w)?,
        g: rng.normal_tensor((CONV_BATCH, 1, 28, 28), 0.0, 1.0, &device)?,
    });
    Ok(cases)
}

/// Few flat samples: every case runs for tens of milliseconds or more.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, measurement_secs: u64) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(measurement_secs));
}

fn convolutions(c: &mut Criterion) {
    // As the `qcl` and `xtask` binaries do.
    qcl_tensor::tune_process_for_numeric_loops();
    let cases = cases().expect("benchmark inputs");

    let mut group = c.benchmark_group("conv2d_forward");
    configure(&mut group, 2);
    for case in &cases {
        let (x, w) = (case.x.as_tensor().detach(), case.w.as_tensor().detach());
        group.bench_function(&case.name, |b| {
            b.iter(|| case.forward(black_box(&x), black_box(&w)).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("conv2d_backward");
    configure(&mut group, 3);
    for case in &cases {
        group.bench_function(&case.name, |b| b.iter(|| case.forward_backward().unwrap()));
    }
    group.finish();
}

fn train_steps(c: &mut Criterion) {
    qcl_tensor::tune_process_for_numeric_loops();
    let mut group = c.benchmark_group("train_step");
    configure(&mut group, 4);
    for model in [BenchModel::ResNet20, BenchModel::VqAutoencoder] {
        let mut step = qcl_nn::bench::training_step(model, STEP_BATCH, 0.into()).expect("model");
        group.bench_function(format!("{}/batch{STEP_BATCH}", model.name()), |b| {
            // The step reads its loss back, as a training loop does.
            b.iter(|| step().unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, convolutions, train_steps);
criterion_main!(benches);
