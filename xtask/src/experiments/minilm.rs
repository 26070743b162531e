//! `minilm`: weight compression of a model qcl did not build. sentence-transformers
//! all-MiniLM-L6-v2 (its own checkpoint, run through candle-transformers' BERT) is compressed by
//! scalar baselines (fp16, int8, round-to-nearest, GPTQ) and by weight product quantization with
//! the naive, activation-aware and error-feedback objectives, on inputs recorded from WordNet
//! glosses; each compressed file is reloaded and judged by how closely its embeddings of
//! held-out glosses follow the original model's. The arms are declared in [`arms`]; the
//! tables, the judged targets and the plot are in [`report`].

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use qcl_text::{
    cosine_summary, retrieval_agreement, split_glosses, EmbedConfig, GlossList, GlossSplit,
    GlossSplitConfig, SentenceConfig, SentenceEncoder, SentenceTokenizer,
};
use qcl_wpq::{
    compress_checkpoint, Calibration, Checkpoint, CompressedCheckpoint, Method, Objective,
    OutlierColumns, Plan, PqConfig, Rule, ScalarConfig,
};
use serde::{Deserialize, Serialize};

use crate::reproduce::{Context, Experiment, Mode, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "minilm",
    description: "Weight compression of sentence-transformers all-MiniLM-L6-v2 (a model qcl did \
                  not build): fp16, int8, RTN and GPTQ baselines against weight PQ with naive, \
                  activation-aware and error-feedback objectives; embedding fidelity on WordNet \
                  glosses against bits per weight and file size.",
    needs_data: false,
    takes_seeds: false,
    run,
};

/// Weights of the encoder's Linear layers (36 of them; LayerNorms and biases excluded).
const LINEARS: [&str; 2] = [
    "encoder.layer.*.attention.self.*.weight",
    "encoder.layer.*.dense.weight",
];
/// Smallest cosine between our embeddings and sentence-transformers' reference ones.
const REFERENCE_COSINE: f64 = 0.9999;
/// Texts whose embeddings from the reloaded file are compared bit for bit with the in-memory
/// compressed model's.
const IDENTITY_TEXTS: usize = 64;

/// Everything that defines the experiment; recorded in the results.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Calibration glosses.
    pub calibration: usize,
    /// Evaluation glosses.
    pub evaluation: usize,
    /// Query glosses, drawn from the evaluation ones.
    pub queries: usize,
    /// Seed of the gloss split.
    pub split_seed: u64,
    /// Seeds (k-means starts) of the repeated arms ([`Arm::repeated`]); the others use the
    /// first. Scalar arms are deterministic.
    pub seeds: Vec<u64>,
    /// Neighbours compared per query.
    pub top_k: usize,
    /// Rows of each layer's input kept for the fine-tune's held-out check.
    pub sample_rows: usize,
}

impl Settings {
    /// The settings of `mode`.
    pub fn for_mode(mode: Mode) -> Self {
        let (calibration, evaluation, queries, seeds) = match mode {
            Mode::Quick => (1024, 2000, 500, vec![0]),
            Mode::Full => (4096, 10_000, 1000, vec![0, 1, 2]),
        };
        Settings {
            calibration,
            evaluation,
            queries,
            split_seed: 0,
            seeds,
            top_k: 10,
            sample_rows: qcl_wpq::DEFAULT_SAMPLE_ROWS,
        }
    }

    /// The gloss split these settings ask for.
    pub fn split(&self) -> GlossSplitConfig {
        GlossSplitConfig {
            seed: qcl_tensor::Seed::new(self.split_seed),
            calibration: self.calibration,
            evaluation: self.evaluation,
            queries: self.queries,
        }
    }
}

/// One way of compressing the model.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    /// Row label.
    pub name: String,
    /// Series of the plot and the comparisons (`rtn`, `gptq`, `pq-naive`, ...).
    pub family: String,
    /// What is compressed, how.
    pub plan: Plan,
    /// Whether it runs once per seed of [`Settings::seeds`] (the arms of the objectives'
    /// ordering); every other arm runs with the first seed only, to keep `--full` near an hour.
    pub repeated: bool,
    /// Whether it compresses the whole model (embeddings too) rather than the Linear layers.
    pub whole_model: bool,
}

fn linear_rules(method: Method) -> Vec<Rule> {
    LINEARS
        .iter()
        .map(|p| Rule::new(p, method).expect("valid pattern"))
        .collect()
}

/// Outlier columns of the error-feedback arms: inputs whose second moment is ≥ 20× the
/// median's (massive activations), at most 8 per layer.
const OUTLIERS: OutlierColumns = OutlierColumns::Threshold {
    ratio: 20.0,
    max: 8,
};

fn pq(d: usize, k: usize, objective: Objective) -> PqConfig {
    PqConfig::new(d, k, objective)
}

/// Error-feedback PQ with outlier columns and two guarded codebook fine-tunes, the codes
/// reassigned between them.
fn pq_best(d: usize, k: usize) -> PqConfig {
    PqConfig {
        outliers: OUTLIERS,
        finetune_rounds: 2,
        ..pq(d, k, Objective::ErrorFeedback)
    }
}

/// The arms, in table order.
pub fn arms() -> Vec<Arm> {
    let arm = |name: &str, family: &str, method: Method| Arm {
        name: name.into(),
        family: family.into(),
        repeated: false,
        plan: Plan::new(linear_rules(method)),
        whole_model: false,
    };
    let rtn = |bits, group| Method::Rtn(ScalarConfig::new(bits, group));
    let gptq = |bits, group| Method::Gptq(ScalarConfig::new(bits, group));
    let mut arms = vec![
        arm("fp16", "fp16", Method::Fp16),
        arm("int8 per channel (RTN)", "rtn", rtn(8, None)),
        arm("int4 g32 RTN", "rtn", rtn(4, Some(32))),
        arm("int4 g64 RTN", "rtn", rtn(4, Some(64))),
        arm("int4 g128 RTN", "rtn", rtn(4, Some(128))),
        arm("int3 g64 RTN", "rtn", rtn(3, Some(64))),
        arm("int3 g128 RTN", "rtn", rtn(3, Some(128))),
        arm("int4 g128 GPTQ", "gptq", gptq(4, Some(128))),
        arm("int3 g128 GPTQ", "gptq", gptq(3, Some(128))),
    ];
    for (d, k) in [(2, 256), (4, 256)] {
        for (objective, family) in [
            (Objective::Naive, "pq-naive"),
            (Objective::ActivationAware, "pq-aa"),
            (Objective::ErrorFeedback, "pq-ef"),
        ] {
            let name = format!("PQ d{d} K{k} {family}");
            let mut a = arm(&name, family, Method::Pq(pq(d, k, objective)));
            a.repeated = (d, k) == (2, 256);
            arms.push(a);
        }
    }
    for (d, k) in [(2, 256), (3, 512), (2, 64), (4, 256)] {
        let name = format!("PQ d{d} K{k} ef+outliers+ft");
        arms.push(arm(&name, "pq-ef+", Method::Pq(pq_best(d, k))));
    }
    arms.push(whole_model_fp16());
    arms.push(whole_model_pq());
    arms
}

fn whole_model_fp16() -> Arm {
    let rules = ["*.weight", "*.bias"]
        .iter()
        .map(|p| Rule::new(p, Method::Fp16).expect("valid pattern"))
        .collect();
    Arm {
        name: "whole model fp16".into(),
        family: "fp16".into(),
        plan: Plan::new(rules),
        repeated: false,
        whole_model: true,
    }
}

/// Word embeddings by token-frequency-weighted PQ (d 3, K 512: 3 bits per weight; at d 4, K 256
/// the whole model fell short of the mean-cosine target), the other embeddings in fp16, the
/// Linear layers by error-feedback PQ d 2 K 256 with outliers and a fine-tune.
fn whole_model_pq() -> Arm {
    let mut rules = vec![
        Rule::new(
            qcl_text::WORD_EMBEDDINGS,
            Method::Pq(pq(3, 512, Objective::ActivationAware)),
        )
        .expect("valid pattern"),
        Rule::new("embeddings.*_embeddings.weight", Method::Fp16).expect("valid pattern"),
    ];
    rules.extend(linear_rules(Method::Pq(pq_best(2, 256))));
    Arm {
        name: "whole model: emb PQ d3 K512, linears PQ d2 K256 ef+outliers+ft".into(),
        family: "whole".into(),
        plan: Plan::new(rules),
        repeated: false,
        whole_model: true,
    }
}

/// What one compressed model measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measure {
    /// Arm name.
    pub arm: String,
    /// Its family.
    pub family: String,
    /// Seed of the run.
    pub seed: u64,
    /// Bits per compressed weight, codebooks, scales and outlier columns counted.
    pub bits_per_weight: f64,
    /// The compressed file's bytes.
    pub file_bytes: u64,
    /// Mean cosine between compressed and original embeddings of the evaluation glosses.
    pub mean_cosine: f64,
    /// Their 1st percentile.
    pub p1_cosine: f64,
    /// Top-k retrieval agreement of the query glosses.
    pub top_k_agreement: f64,
    /// Compression wall time (seconds, calibration recorded once beforehand not included).
    pub compress_seconds: f64,
    /// Whether the reloaded file embedded [`IDENTITY_TEXTS`] glosses to the same bits as the
    /// in-memory compressed model.
    pub reload_identical: bool,
    /// Outlier columns kept, summed over the tensors.
    pub outlier_columns: usize,
    /// Guarded fine-tune steps taken (1: full least-squares step, 0: kept the codebook).
    pub finetune_steps: Vec<f64>,
}

/// Shared inputs of every arm.
struct Bench<'a> {
    dir: &'a Path,
    config: SentenceConfig,
    tokenizer: SentenceTokenizer,
    checkpoint: Checkpoint,
    calibration: Calibration,
    split: GlossSplit,
    reference: Tensor,
    settings: Settings,
}

fn run(ctx: &Context, _bar: &ProgressBar) -> Result<Outcome> {
    let settings = Settings::for_mode(ctx.mode);
    let dir = ctx.data_dir.join("minilm");
    let encoder = SentenceEncoder::from_folder(&dir, &Device::Cpu)
        .with_context(|| format!("loading the model from {}", dir.display()))?
        .with_options(quiet());
    let reference_check = check_reference(&encoder)?;
    let glosses = GlossList::load(ctx.data_dir.join("wordnet/glosses.json"))?;
    let split = split_glosses(&glosses.glosses, &settings.split())?;
    let texts = |g: &[qcl_text::Gloss]| g.iter().map(|g| g.text.clone()).collect::<Vec<_>>();
    let (cal_texts, eval_texts) = (texts(&split.calibration), texts(&split.evaluation));
    let started = Instant::now();
    let calibration = Calibration::new().with_sample_rows(settings.sample_rows);
    let bar = progress("calibrating", cal_texts.len());
    let refs: Vec<&str> = cal_texts.iter().map(String::as_str).collect();
    let tokens = encoder.tap_texts(&refs, &bar, &mut |name, x| calibration.record(name, x))?;
    bar.finish_and_clear();
    let calibration_seconds = started.elapsed().as_secs_f64();
    let refs: Vec<&str> = eval_texts.iter().map(String::as_str).collect();
    let bar = progress("embedding (original)", refs.len());
    let reference = encoder.embed_with_progress(&refs, &bar)?;
    bar.finish_and_clear();
    let bench = Bench {
        dir: &dir,
        config: SentenceConfig::from_folder(&dir)?,
        tokenizer: encoder.tokenizer().clone(),
        checkpoint: Checkpoint::open(dir.join("model.safetensors"))?,
        calibration,
        split,
        reference,
        settings: settings.clone(),
    };
    let mut measures = Vec::new();
    for arm in arms() {
        let seeds = if arm.repeated {
            &settings.seeds[..]
        } else {
            &settings.seeds[..1]
        };
        for &seed in seeds {
            let m = bench
                .measure(&arm, seed, &eval_texts)
                .with_context(|| format!("arm `{}` seed {seed}", arm.name))?;
            eprintln!(
                "{} (seed {seed}): {:.3} b/w, cos {:.4} / p1 {:.4}, top-{} {:.3}, {:.1} s",
                m.arm,
                m.bits_per_weight,
                m.mean_cosine,
                m.p1_cosine,
                settings.top_k,
                m.top_k_agreement,
                m.compress_seconds
            );
            measures.push(m);
        }
    }
    let fp32_bytes = std::fs::metadata(dir.join("model.safetensors"))?.len();
    report::outcome(
        ctx,
        &settings,
        &measures,
        report::Context {
            fp32_bytes,
            reference_check,
            calibration_seconds,
            calibration_tokens: tokens,
        },
    )
}

fn quiet() -> EmbedConfig {
    EmbedConfig {
        progress: false,
        ..EmbedConfig::default()
    }
}

fn progress(what: &str, len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}] {{msg}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// The model's embeddings of the reference sentences against sentence-transformers' own
/// (computed in PyTorch, committed as a fixture): the smallest cosine, which must reach
/// [`REFERENCE_COSINE`].
fn check_reference(encoder: &SentenceEncoder) -> Result<f64> {
    #[derive(Deserialize)]
    struct Reference {
        sentences: Vec<String>,
        embeddings: Vec<Vec<f32>>,
    }
    let path = crate::workspace_root().join("fixtures/minilm/reference.json");
    let r: Reference = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let ours = encoder.embed(&texts)?;
    let rows = r.embeddings.len();
    let flat: Vec<f32> = r.embeddings.into_iter().flatten().collect();
    let theirs = Tensor::from_vec(flat, (rows, ours.dim(1)?), &Device::Cpu)?;
    let min = cosine_summary(&ours, &theirs)?.min;
    if min < REFERENCE_COSINE {
        bail!("our embeddings differ from sentence-transformers': smallest cosine {min}");
    }
    Ok(min)
}

impl Bench<'_> {
    fn encoder(&self, checkpoint: &CompressedCheckpoint) -> Result<SentenceEncoder> {
        let vb = checkpoint.var_builder(DType::F32, &Device::Cpu)?;
        let encoder =
            SentenceEncoder::from_var_builder(vb, self.config.clone(), self.tokenizer.clone())?;
        Ok(encoder.with_options(quiet()))
    }

    fn measure(&self, arm: &Arm, seed: u64, eval: &[String]) -> Result<Measure> {
        let plan = arm.plan.clone().with_seed(seed);
        let bar = progress("compressing", 0);
        bar.set_message(arm.name.clone());
        let started = Instant::now();
        let out = compress_checkpoint(&self.checkpoint, &plan, &self.calibration, &bar)?;
        let compress_seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let file = tempfile::NamedTempFile::new_in(self.dir)?;
        let file_bytes = out.checkpoint.save(file.path())?;
        let loaded = CompressedCheckpoint::load(file.path())?;
        let bits = loaded.bits()?;
        let encoder = self.encoder(&loaded)?;
        let texts: Vec<&str> = eval.iter().map(String::as_str).collect();
        let identity: Vec<&str> = texts.iter().take(IDENTITY_TEXTS).copied().collect();
        let in_memory = self.encoder(&out.checkpoint)?.embed(&identity)?;
        let reloaded = encoder.embed(&identity)?;
        let reload_identical = tensor_bits(&in_memory)? == tensor_bits(&reloaded)?;
        let bar = progress("embedding", texts.len());
        bar.set_message(arm.name.clone());
        let embeddings = encoder.embed_with_progress(&texts, &bar)?;
        bar.finish_and_clear();
        let cos = cosine_summary(&self.reference, &embeddings)?;
        let top = retrieval_agreement(
            &self.reference,
            &embeddings,
            &self.split.queries,
            self.settings.top_k,
        )?;
        Ok(Measure {
            arm: arm.name.clone(),
            family: arm.family.clone(),
            seed,
            bits_per_weight: bits.bits_per_weight(),
            file_bytes,
            mean_cosine: cos.mean,
            p1_cosine: cos.p1,
            top_k_agreement: top.mean,
            compress_seconds,
            reload_identical,
            outlier_columns: loaded
                .compressed
                .values()
                .filter_map(|t| t.outliers.as_ref())
                .map(|o| o.columns.len())
                .sum(),
            finetune_steps: out
                .reports
                .iter()
                .flat_map(|r| r.finetune_steps.iter().copied())
                .collect(),
        })
    }
}

fn tensor_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

mod report;
