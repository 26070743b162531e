//! Weight compression of a user's own candle-nn model.
//!
//! A two-layer MLP (a `VarMap`) is trained briefly on synthetic data; its forward pass records
//! each layer's input into a `Calibration`; the weights are compressed (naive, activation-aware
//! and error-feedback PQ, d = 2 and K = 16: 2 bits per weight plus codebooks), saved, reloaded
//! as a `VarBuilder`, and the same model type is rebuilt from it and evaluated.
//!
//! Run with `cargo run -p qcl-wpq --example compress_candle_model`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
use indicatif::ProgressBar;
use qcl_tensor::Seed;
use qcl_wpq::{
    compress_checkpoint, Calibration, Checkpoint, CompressedCheckpoint, Method, Objective, Plan,
    PqConfig, Rule,
};

/// The user's model: nothing here knows about qcl.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            fc1: linear(32, 128, vb.pp("fc1"))?,
            fc2: linear(128, 8, vb.pp("fc2"))?,
        })
    }

    /// The forward pass, calling `tap(weight name, layer input)` before each layer.
    fn forward_tapped(
        &self,
        x: &Tensor,
        tap: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        tap("fc1.weight", x)?;
        let h = self.fc1.forward(x)?.relu()?;
        tap("fc2.weight", &h)?;
        self.fc2.forward(&h)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_tapped(x, &mut |_, _| Ok(()))
    }
}

/// Synthetic classification: correlated inputs `x = z·(I + mix)`, labels from a fixed random
/// linear map `teacher`.
fn data(n: usize, (mix, teacher): (&Tensor, &Tensor), seed: u64) -> Result<(Tensor, Tensor)> {
    let z = Seed::new(seed)
        .rng()
        .normal_tensor((n, 32), 0.0, 1.0, mix.device())
        .map_err(candle_core::Error::wrap)?;
    let x = (z.matmul(mix)? + &z)?;
    let y = x.matmul(teacher)?.argmax(D::Minus1)?;
    Ok((x, y))
}

fn accuracy(model: &Mlp, x: &Tensor, y: &Tensor) -> Result<f32> {
    let pred = model.forward(x)?.argmax(D::Minus1)?;
    pred.eq(y)?.to_dtype(DType::F32)?.mean_all()?.to_scalar()
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let mut rng = Seed::new(0).rng();
    let mix = rng.normal_tensor((32, 32), 0.0, 0.5, &dev)?;
    let teacher = rng.normal_tensor((32, 8), 0.0, 1.0, &dev)?;
    let (x, y) = data(2048, (&mix, &teacher), 1)?;
    let (x_test, y_test) = data(1024, (&mix, &teacher), 2)?;

    // The user's own training loop.
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 3e-3)?;
    for _ in 0..300 {
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
        opt.backward_step(&loss)?;
    }
    println!(
        "trained: test accuracy {:.3}",
        accuracy(&model, &x_test, &y_test)?
    );

    let dir = std::env::temp_dir().join(format!("qcl-wpq-example-{}", std::process::id()));
    for objective in [
        Objective::Naive,
        Objective::ActivationAware,
        Objective::ErrorFeedback,
    ] {
        // Glue 1: record the calibration from the model's own forward pass.
        let calib = Calibration::new();
        model.forward_tapped(&x, &mut |name, x| {
            calib.record(name, x).map_err(candle_core::Error::wrap)
        })?;
        let plan = Plan::new(vec![Rule::new(
            "*.weight",
            Method::Pq(PqConfig::new(2, 16, objective)),
        )?]);
        // Glue 2: compress the VarMap's tensors and write one file.
        let out = compress_checkpoint(
            &Checkpoint::from_varmap(&varmap)?,
            &plan,
            &calib,
            &ProgressBar::hidden(),
        )?;
        let path = dir.join(format!("{objective:?}.safetensors"));
        let file_bytes = out.checkpoint.save(&path)?;
        // Glue 3: the same model type, built from the compressed file.
        let quantized =
            Mlp::new(CompressedCheckpoint::load(&path)?.var_builder(DType::F32, &dev)?)?;

        let bits = out.checkpoint.bits()?;
        println!(
            "{objective:?}: {:.2} bits per weight (codebooks included), file {file_bytes} bytes, \
             test accuracy {:.3}",
            bits.bits_per_weight(),
            accuracy(&quantized, &x_test, &y_test)?
        );
        for r in &out.reports {
            println!(
                "  {}: {}, relative output error {:.4}",
                r.name,
                r.method,
                r.output_error.unwrap_or(f64::NAN)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
