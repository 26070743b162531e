//! `vq`: a VQ autoencoder (AQM, docs/methods/aqm.md § Networks, downsampling 2) with a
//! 512-code EMA codebook (its § Quantizer) trained on Fashion-MNIST twice from the same seed,
//! with and without dead-code revival; codebook usage, perplexity and reconstruction error on
//! the test set.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use plotters::prelude::*;
use qcl_data::{BatchConfig, BatchOrder, Dataset, Normalization, SplitDataset};
use qcl_nn::layers::Module;
use qcl_nn::models::{ConvDecoder, ConvEncoder};
use qcl_nn::ops::mse_loss;
use qcl_nn::optim::{Adam, AdamConfig, Optimizer};
use qcl_nn::{ParamPath, ParamStore};
use qcl_tensor::Seed;
use qcl_vq::{CodeUsage, CodebookUpdate, VectorQuantizer, VectorQuantizerConfig, VqOutput};
use serde::Serialize;
use serde_json::json;

use crate::experiments::OnData;
use crate::plot;
use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "vq",
    description: "A VQ autoencoder (AQM, docs/methods/aqm.md § Networks, 64 channels, one \
                  512-code EMA codebook) on Fashion-MNIST, trained with and without dead-code \
                  revival from the same seed: codes in use, perplexity and reconstruction MSE \
                  on the test set.",
    needs_data: true,
    takes_seeds: false,
    run,
};

/// Everything that defines a run; recorded in the results.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Latent channels C (the first conv has C/2).
    pub channels: usize,
    /// Codebook size K.
    pub codes: usize,
    /// EMA decay γ.
    pub decay: f64,
    /// Laplace smoothing ε.
    pub eps: f64,
    /// Commitment weight β.
    pub beta: f64,
    /// Adam learning rate.
    pub lr: f64,
    /// Images per batch.
    pub batch: usize,
    /// Training steps per arm.
    pub steps: usize,
    /// Codes in use on the evaluation subset are counted every this many steps.
    pub eval_every: usize,
    /// Test images of that evaluation subset (the first ones).
    pub eval_images: usize,
    /// The revival arm's dead-code threshold (EMA count per batch).
    pub revival_threshold: f64,
    /// Seed of parameters, batch order and revival.
    pub seed: u64,
}

impl Settings {
    /// The settings of `mode`.
    pub fn for_mode(mode: Mode) -> Self {
        Settings {
            channels: 64,
            codes: 512,
            decay: 0.99,
            eps: 1e-5,
            beta: 2.0,
            lr: 1e-3,
            batch: 128,
            // 600 steps (1.3 epochs) is where revival passes 90 % of K; fewer would show the
            // trend but not the result.
            steps: match mode {
                Mode::Quick => 600,
                Mode::Full => 1500,
            },
            eval_every: match mode {
                Mode::Quick => 50,
                Mode::Full => 100,
            },
            eval_images: 500,
            revival_threshold: 1.0,
            seed: 0,
        }
    }
}

/// The AQM autoencoder for `1×28×28` images with downsampling 2 and one residual block
/// (docs/methods/aqm.md § Networks): qcl-nn's [`ConvEncoder`] and [`ConvDecoder`] around a
/// trainable VQ layer.
struct VqAutoencoder {
    encoder: ConvEncoder,
    decoder: ConvDecoder,
    vq: VectorQuantizer,
}

impl VqAutoencoder {
    fn new(path: &ParamPath, channels: usize, vq: VectorQuantizerConfig) -> Result<Self> {
        Ok(Self {
            encoder: ConvEncoder::new(&path.pp("enc"), 1, channels, 2, 1)?,
            decoder: ConvDecoder::new(&path.pp("dec"), 1, channels, 2, 1)?,
            vq: VectorQuantizer::from_param_path(&path.pp("vq"), vq)?,
        })
    }

    fn forward(&mut self, x: &Tensor, train: bool) -> Result<(Tensor, VqOutput)> {
        let z_e = self.encoder.forward(x)?;
        let out = self.vq.quantize(&z_e, train)?;
        Ok((self.decoder.forward(&out.quantized)?, out))
    }
}

/// One point of the training curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Training steps done.
    pub step: usize,
    /// Codes assigned at least once on the evaluation subset.
    pub used_codes: usize,
    /// Perplexity of the code histogram on the evaluation subset.
    pub perplexity: f64,
}

/// What one arm measured.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    /// `revival` or `no revival`.
    pub name: String,
    /// The dead-code threshold, if revival is on.
    pub dead_code_threshold: Option<f64>,
    /// Codes in use on the evaluation subset along training.
    pub curve: Vec<CurvePoint>,
    /// Per step: perplexity of the training batch's histogram.
    pub batch_perplexity: Vec<f64>,
    /// Per step: codes whose EMA count was below the dead threshold (1.0 per batch) after
    /// the update.
    pub dead_codes: Vec<usize>,
    /// Per step: codes revived.
    pub revived_codes: Vec<usize>,
    /// Per step: training loss (reconstruction MSE + β·commitment).
    pub train_loss: Vec<f64>,
    /// Codes assigned at least once on the whole test set.
    pub test_used_codes: usize,
    /// Perplexity of the test-set histogram.
    pub test_perplexity: f64,
    /// Reconstruction MSE on the test set (mean over pixels, images in [-1, 1]).
    pub test_mse: f64,
    /// Commitment MSE `mean((z_e − q)²)` on the test set.
    pub test_commitment: f64,
    /// Wall time of training and evaluation.
    pub seconds: f64,
}

/// Code usage, perplexity, reconstruction and commitment MSE of `model` on `data` (no update).
fn evaluate(
    model: &mut VqAutoencoder,
    data: &Dataset,
    codes: usize,
) -> Result<(CodeUsage, f64, f64)> {
    let mut usage = CodeUsage::new(1, codes);
    let (mut squared, mut commitment, mut pixels, mut latents) = (0.0, 0.0, 0usize, 0usize);
    let options = BatchConfig {
        batch_size: 500,
        normalization: Normalization::Symmetric,
        ..Default::default()
    };
    for batch in data.batches(options, &Device::Cpu)? {
        let x = batch?.images;
        let (reconstruction, out) = model.forward(&x, false)?;
        usage.add(&out.indices)?;
        let n = x.elem_count();
        squared += scalar(&mse_loss(&reconstruction, &x)?)? * n as f64;
        let m = out.quantized.elem_count();
        commitment += scalar(&out.commitment_loss)? * m as f64;
        pixels += n;
        latents += m;
    }
    Ok((
        usage,
        squared / pixels.max(1) as f64,
        commitment / latents.max(1) as f64,
    ))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Trains one arm and evaluates it.
pub fn train_arm(
    data: &SplitDataset,
    settings: &Settings,
    revival: Option<f64>,
    bar: &ProgressBar,
) -> Result<ArmResult> {
    let started = Instant::now();
    let name = if revival.is_some() {
        "revival"
    } else {
        "no revival"
    };
    let store = ParamStore::new(settings.seed);
    let config = VectorQuantizerConfig {
        update: CodebookUpdate::Ema {
            decay: settings.decay,
            eps: settings.eps,
        },
        commitment_weight: settings.beta,
        dead_code_threshold: revival,
        seed: Seed::new(settings.seed).child_named("vq"),
        ..VectorQuantizerConfig::new(settings.channels, settings.codes)
    };
    let mut model = VqAutoencoder::new(&store.root(&Device::Cpu), settings.channels, config)?;
    let mut adam = Adam::new(
        store.trainable(),
        AdamConfig {
            lr: settings.lr,
            ..Default::default()
        },
    )?;
    let eval_count = settings.eval_images.min(data.test.len());
    let eval_set = data.test.subset(&(0..eval_count).collect::<Vec<_>>())?;
    let mut result = ArmResult {
        name: name.into(),
        dead_code_threshold: revival,
        curve: Vec::new(),
        batch_perplexity: Vec::new(),
        dead_codes: Vec::new(),
        revived_codes: Vec::new(),
        train_loss: Vec::new(),
        test_used_codes: 0,
        test_perplexity: 0.0,
        test_mse: 0.0,
        test_commitment: 0.0,
        seconds: 0.0,
    };
    let curve_point = |model: &mut VqAutoencoder, step: usize| -> Result<CurvePoint> {
        let (usage, _, _) = evaluate(model, &eval_set, settings.codes)?;
        Ok(CurvePoint {
            step,
            used_codes: usage.used_codes()[0],
            perplexity: usage.perplexity()[0],
        })
    };
    result.curve.push(curve_point(&mut model, 0)?);
    let seed = Seed::new(settings.seed).child_named("batches");
    let mut step = 0;
    let mut epoch = 0;
    'training: loop {
        let options = BatchConfig {
            batch_size: settings.batch,
            order: BatchOrder::Shuffled(seed.child(epoch)),
            normalization: Normalization::Symmetric,
            drop_last: true,
        };
        for batch in data.train.batches(options, &Device::Cpu)? {
            if step == settings.steps {
                break 'training;
            }
            let x = batch?.images;
            let (reconstruction, out) = model.forward(&x, true)?;
            let loss = (mse_loss(&reconstruction, &x)? + &out.loss)?;
            adam.backward_step(&loss)?;
            step += 1;
            result.train_loss.push(scalar(&loss)?);
            result.batch_perplexity.push(out.stats.mean_perplexity());
            result.dead_codes.push(out.stats.total_dead_codes());
            result
                .revived_codes
                .push(out.stats.revived_codes.iter().sum());
            if step % settings.eval_every == 0 || step == settings.steps {
                result.curve.push(curve_point(&mut model, step)?);
            }
            bar.set_message(format!(
                "vq ({name}): step {step}/{}, loss {:.4}, dead {}",
                settings.steps,
                result.train_loss.last().copied().unwrap_or(f64::NAN),
                out.stats.total_dead_codes()
            ));
        }
        epoch += 1;
    }
    bar.set_message(format!("vq ({name}): test set"));
    let (usage, mse, commitment) = evaluate(&mut model, &data.test, settings.codes)?;
    result.test_used_codes = usage.used_codes()[0];
    result.test_perplexity = usage.perplexity()[0];
    result.test_mse = mse;
    result.test_commitment = commitment;
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let data = OnData::fashion_mnist(ctx)?;
    run_with(OnData::new(ctx, &data, bar), &Settings::for_mode(ctx.mode))
}

/// The experiment on `data` with `settings`: both arms, the plots, the report.
pub fn run_with(on: OnData<'_>, settings: &Settings) -> Result<Outcome> {
    let OnData { ctx, data, bar } = on;
    let without = train_arm(data, settings, None, bar)?;
    let with = train_arm(data, settings, Some(settings.revival_threshold), bar)?;
    let k = settings.codes;
    let percent = |used: usize| 100.0 * used as f64 / k as f64;
    let png = "vq-used-codes.png";
    used_codes_plot(&ctx.out_dir.join(png), settings, &[&without, &with])?;
    let perplexity_png = "vq-perplexity.png";
    perplexity_plot(
        &ctx.out_dir.join(perplexity_png),
        settings,
        &[&without, &with],
    )?;

    let target = with.test_used_codes as f64 > 0.9 * k as f64;
    let mut rows = String::new();
    for arm in [&without, &with] {
        rows.push_str(&format!(
            "| {} | {} / {k} ({:.1} %) | {:.1} | {:.4} | {:.4} | {} | {} | {:.0} |\n",
            arm.name,
            arm.test_used_codes,
            percent(arm.test_used_codes),
            arm.test_perplexity,
            arm.test_mse,
            arm.test_commitment,
            arm.dead_codes.last().copied().unwrap_or(0),
            arm.revived_codes.iter().sum::<usize>(),
            arm.seconds,
        ));
    }
    let curve_rows: String = without
        .curve
        .iter()
        .zip(&with.curve)
        .map(|(a, b)| format!("| {} | {} | {} |\n", a.step, a.used_codes, b.used_codes))
        .collect();
    let verdict = if target {
        format!(
            "With revival {:.1} % of the codebook is in use on the test set (target > 90 %: \
             met); without it {:.1} %.",
            percent(with.test_used_codes),
            percent(without.test_used_codes)
        )
    } else {
        format!(
            "With revival only {:.1} % of the codebook is in use on the test set: the target \
             (> 90 %) is **not** met; without revival {:.1} %.",
            percent(with.test_used_codes),
            percent(without.test_used_codes)
        )
    };
    let markdown = format!(
        "{verdict}\n\n\
         Model: AQM (docs/methods/aqm.md § Networks) with downsampling 2 (conv4×4/2 \
         1→{half}, ReLU, conv3×3 {half}→{c}, one ResBlock, ReLU; decoder ResBlock, ReLU, \
         convT4×4/2 {c}→1), latent {c}×14×14, one codebook of K = {k} codes of dimension \
         {c}. Quantizer: EMA codebook (γ = {decay}, ε = {eps}, Laplace-smoothed counts), \
         initialised `E ~ U(−1/K, 1/K)`, `c = 0`, `w = E` (docs/methods/aqm.md § Quantizer), \
         no k-means initialisation, β = {beta}. Loss: reconstruction MSE + β·commitment; Adam \
         (lr {lr}) on the encoder and decoder. \
         Fashion-MNIST 60,000 training images scaled to [−1, 1], batches of {batch} (shuffled, \
         seed {seed}), {steps} steps ({epochs:.2} epochs) per arm; both arms start from the \
         same parameters and see the same batches. The revival arm replaces, after each EMA \
         update, every code whose EMA count is below {threshold} (fewer than one assignment per \
         batch on average) by a training vector of the current batch drawn at random.\n\n\
         Test set: all 10,000 test images. *Used codes*: codes assigned to at least one of the \
         10,000·196 latent vectors. *Dead at the end*: codes with an EMA count below 1 after \
         the last update (before that step's revival).\n\n\
         | arm | used codes (test) | perplexity (test) | reconstruction MSE (test) | commitment MSE (test) | dead at the end | revivals (total) | seconds |\n\
         |---|---|---|---|---|---|---|---|\n{rows}\n\
         Codes in use on the first {eval} test images during training:\n\n\
         | step | no revival | revival |\n|---|---|---|\n{curve_rows}",
        half = settings.channels / 2,
        c = settings.channels,
        decay = settings.decay,
        eps = settings.eps,
        beta = settings.beta,
        lr = settings.lr,
        batch = settings.batch,
        seed = settings.seed,
        steps = settings.steps,
        epochs = (settings.steps * settings.batch) as f64 / data.train.len() as f64,
        threshold = settings.revival_threshold,
        eval = settings.eval_images,
    );
    let summary = format!(
        "K = {k}: {} codes used on the test set with revival ({:.1} %, MSE {:.4}), {} without \
         ({:.1} %, MSE {:.4})",
        with.test_used_codes,
        percent(with.test_used_codes),
        with.test_mse,
        without.test_used_codes,
        percent(without.test_used_codes),
        without.test_mse
    );
    Ok(Outcome {
        summary,
        figures: json!({
            "settings": settings,
            "target_met": target,
            "arms": [without, with],
        }),
        markdown,
        plots: vec![
            (
                png.into(),
                format!(
                    "Codes in use on the first {} test images during training, with and without \
                     revival (dashed: 90 % of K)",
                    settings.eval_images
                ),
            ),
            (
                perplexity_png.into(),
                "Perplexity of each training batch's code histogram".into(),
            ),
        ],
    })
}

const COLOURS: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];

fn used_codes_plot(path: &Path, settings: &Settings, arms: &[&ArmResult]) -> Result<()> {
    let k = settings.codes;
    plot::png(path, (720, 420), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "codes in use (K = {k}), first {} test images",
                    settings.eval_images
                ),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0usize..settings.steps.max(1), 0usize..k + k / 20)?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .y_desc("codes used")
            .draw()?;
        let ninety = (k as f64 * 0.9).round() as usize;
        chart.draw_series(DashedLineSeries::new(
            [(0, ninety), (settings.steps, ninety)],
            6,
            4,
            BLACK.mix(0.6).stroke_width(1),
        ))?;
        for (arm, colour) in arms.iter().zip(COLOURS) {
            chart
                .draw_series(LineSeries::new(
                    arm.curve.iter().map(|p| (p.step, p.used_codes)),
                    colour.stroke_width(2),
                ))?
                .label(arm.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            chart.draw_series(
                arm.curve
                    .iter()
                    .map(|p| Circle::new((p.step, p.used_codes), 3, colour.filled())),
            )?;
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    })
}

fn perplexity_plot(path: &Path, settings: &Settings, arms: &[&ArmResult]) -> Result<()> {
    let top = arms
        .iter()
        .flat_map(|a| a.batch_perplexity.iter().copied())
        .fold(1.0f64, f64::max)
        * 1.05;
    plot::png(path, (720, 380), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("training-batch perplexity", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0usize..settings.steps.max(1), 0.0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .y_desc("perplexity")
            .draw()?;
        for (arm, colour) in arms.iter().zip(COLOURS) {
            chart
                .draw_series(LineSeries::new(
                    arm.batch_perplexity
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| (i + 1, p)),
                    colour.stroke_width(2),
                ))?
                .label(arm.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
        }
        crate::plot::legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole experiment, scaled down to seconds, on the committed fixture.
    #[test]
    fn runs_on_the_fixture_and_writes_its_results() {
        let (out, ctx, data) = crate::reproduce::fixture_run();
        let settings = Settings {
            channels: 8,
            codes: 32,
            batch: 16,
            steps: 6,
            eval_every: 3,
            eval_images: 40,
            ..Settings::for_mode(Mode::Quick)
        };
        let outcome =
            run_with(OnData::new(&ctx, &data, &ProgressBar::hidden()), &settings).unwrap();
        let arms = outcome.figures["arms"].as_array().unwrap();
        assert_eq!(arms.len(), 2);
        for arm in arms {
            let used = arm["test_used_codes"].as_u64().unwrap();
            assert!((1..=32).contains(&used), "{arm}");
            assert_eq!(arm["train_loss"].as_array().unwrap().len(), 6);
            assert_eq!(arm["curve"].as_array().unwrap().len(), 3);
            assert!(arm["test_mse"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(
            arms[0]["revived_codes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>(),
            0
        );
        assert!(
            arms[1]["revived_codes"][0].as_u64().unwrap() > 0,
            "fresh codes are dead at the first step"
        );
        assert!(
            outcome.markdown.contains("| revival |"),
            "{}",
            outcome.markdown
        );
        for (png, _) in &outcome.plots {
            let bytes = std::fs::read(out.path().join(png)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{png}");
        }
    }
}
