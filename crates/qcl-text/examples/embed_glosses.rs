//! Embeds the evaluation glosses of WordNet with all-MiniLM-L6-v2 and reports the time taken,
//! and how close the embeddings of `fixtures/minilm/reference.json` are to sentence-transformers'.
//! Needs `cargo xtask data` to have fetched the model and the glosses.
//!
//! ```sh
//! cargo run --release -p qcl-text --example embed_glosses [-- N_EVAL BATCH_SIZE]
//! ```

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use qcl_text::{
    row_cosines, split_glosses, EmbedConfig, GlossList, GlossSplitConfig, SentenceEncoder,
};

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qcl_tensor::tune_process_for_numeric_loops();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let evaluation = args.first().copied().unwrap_or(10_000);
    let batch_size = args.get(1).copied().unwrap_or(32);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let encoder = SentenceEncoder::from_folder(root.join("data/minilm"), &Device::Cpu)?
        .with_options(EmbedConfig {
            batch_size,
            ..EmbedConfig::default()
        });

    let reference: Reference =
        serde_json::from_slice(&std::fs::read(root.join("fixtures/minilm/reference.json"))?)?;
    let texts: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();
    let ours = encoder.embed(&texts)?;
    let cos = row_cosines(&ours, &Tensor::new(reference.embeddings, &Device::Cpu)?)?;
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    println!(
        "reference sentences: {} , cosine to sentence-transformers min {min:.9} mean {mean:.9}",
        cos.len()
    );

    let glosses = GlossList::load(root.join("data/wordnet/glosses.json"))?;
    let params = GlossSplitConfig {
        evaluation,
        ..GlossSplitConfig::default()
    };
    let split = split_glosses(&glosses.glosses, &params)?;
    let eval: Vec<&str> = split.evaluation.iter().map(|g| g.text.as_str()).collect();
    let threads = rayon::current_num_threads();
    let started = Instant::now();
    let e = encoder.embed(&eval)?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "embedded {} evaluation glosses (of {} distinct) in {seconds:.2} s ({:.0} glosses/s) on {threads} threads, batch {batch_size}; shape {:?}",
        eval.len(),
        split.distinct,
        eval.len() as f64 / seconds,
        e.dims()
    );
    Ok(())
}
