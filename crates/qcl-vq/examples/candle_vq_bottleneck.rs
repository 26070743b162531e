//! A candle-nn autoencoder with a qcl vector-quantization bottleneck, trained with candle-nn's
//! AdamW: `Linear → ReLU → Linear → VQ → Linear → ReLU → Linear` in `candle_nn::seq()`, on
//! synthetic data (points around 24 centres in 16 dimensions). Prints the loss falling and the
//! codebook usage.
//!
//! ```text
//! cargo run --release -p qcl-vq --example candle_vq_bottleneck
//! ```
//!
//! The qcl parts are three lines, marked `qcl (i/3)`: the layer from the model's `VarBuilder`,
//! its place in the sequence, its loss. Everything else is plain candle-nn.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Activation, Optimizer, ParamsAdamW};
use qcl_nn::layers::WithMode;
use qcl_nn::ParamStore;
use qcl_tensor::Seed;
use qcl_vq::{CodeUsage, VectorQuantizer, VectorQuantizerConfig};

const DIM: usize = 16;
const LATENT: usize = 8;
const CENTRES: usize = 24;
const POINTS: usize = 4096;
const BATCH: usize = 256;
const STEPS: usize = 400;

/// `POINTS` points: centre `i % CENTRES` (drawn from N(0, 1)) plus N(0, 0.05²) noise.
fn data(device: &Device) -> qcl_tensor::Result<Tensor> {
    let mut rng = Seed::new(7).rng();
    let centres = rng.normal_vec(CENTRES * DIM, 0.0, 1.0);
    let noise = rng.normal_vec(POINTS * DIM, 0.0, 0.05);
    let points: Vec<f32> = (0..POINTS * DIM)
        .map(|i| centres[(i / DIM % CENTRES) * DIM + i % DIM] + noise[i])
        .collect();
    Ok(Tensor::from_vec(points, (POINTS, DIM), device)?)
}

fn main() -> qcl_tensor::Result<()> {
    let device = Device::Cpu;
    let x = data(&device)?;

    // A candle VarMap with a seeded VarBuilder over it, so that the run is reproducible
    // (`VarBuilder::from_varmap(&varmap, ..)` works the same, with candle's random init).
    let store = ParamStore::new(0);
    let (varmap, vb) = (store.var_map(), store.var_builder(&device));

    let enc1 = candle_nn::linear(DIM, 64, vb.pp("enc1"))?;
    let enc2 = candle_nn::linear(64, LATENT, vb.pp("enc2"))?;
    let config = VectorQuantizerConfig {
        kmeans_init: true,
        dead_code_threshold: Some(0.05),
        commitment_weight: 0.25,
        ..VectorQuantizerConfig::new(LATENT, 32)
    };
    let vq = VectorQuantizer::new(config, vb.pp("vq"))?; // qcl (1/3)
    let dec1 = candle_nn::linear(LATENT, 64, vb.pp("dec1"))?;
    let dec2 = candle_nn::linear(64, DIM, vb.pp("dec2"))?;
    let model = |train: bool| {
        candle_nn::seq()
            .add(enc1.clone())
            .add(Activation::Relu)
            .add(enc2.clone())
            .add(if train {
                WithMode::train(vq.clone())
            } else {
                WithMode::eval(vq.clone())
            }) // qcl (2/3)
            .add(dec1.clone())
            .add(Activation::Relu)
            .add(dec2.clone())
    };
    let (train_model, eval_model) = (model(true), model(false));

    // AdamW over every variable of the map, the quantizer's included: its EMA state gets no
    // gradient, so the optimizer leaves it to the layer's own updates.
    let params = ParamsAdamW {
        lr: 3e-3,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    let mut rng = Seed::new(1).rng();
    println!("step  loss      recon mse  perplexity  dead codes");
    for step in 0..=STEPS {
        let rows: Vec<u32> = (0..BATCH)
            .map(|_| rng.below(POINTS).map(|i| i as u32))
            .collect::<qcl_tensor::Result<_>>()?;
        let batch = x.index_select(&Tensor::new(rows, &device)?, 0)?;
        let recon = train_model.forward(&batch)?;
        let mse = (recon - &batch)?.sqr()?.mean_all()?;
        let loss = (&mse + vq.last_loss()?)?; // qcl (3/3)
        opt.backward_step(&loss)?;
        if step % 50 == 0 {
            let stats = vq.last_output().expect("a call was made").stats;
            println!(
                "{step:>4}  {:<8.5}  {:<9.5}  {:<10.2}  {}",
                loss.to_scalar::<f32>()?,
                mse.to_scalar::<f32>()?,
                stats.mean_perplexity(),
                stats.total_dead_codes()
            );
        }
    }

    // Codebook usage over the whole data set, in evaluation mode (no update).
    let recon = eval_model.forward(&x)?;
    let mse = (recon - &x)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
    let indices = vq.last_output().expect("a call was made").indices;
    let mut usage = CodeUsage::new(1, vq.config().codes);
    usage.add(&indices)?;
    println!(
        "all {POINTS} points: recon mse {mse:.5}, {} of {} codes used, perplexity {:.2} ({CENTRES} centres)",
        usage.used_codes()[0],
        vq.config().codes,
        usage.perplexity()[0]
    );
    let variance = x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.mean_all()?;
    println!(
        "(the data's variance is {:.5})",
        variance.to_scalar::<f32>()?
    );
    let state: Vec<String> = store
        .trainable()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("vq."))
        .collect();
    println!("the quantizer's state in the VarMap: {}", state.join(", "));
    Ok(())
}
