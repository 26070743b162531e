//! Embeddings are the same bytes on 1 and 2 threads. Each thread count runs in a child process
//! of this test binary with `RAYON_NUM_THREADS` set, because rayon sizes its global pool once
//! and candle reads the variable at every matrix product.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::process::Command;

use crate::common::{bits, fixtures};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use qcl_tensor::Seed;
use qcl_text::{
    bert::bert_tensor_shapes, EmbedConfig, SentenceConfig, SentenceEncoder, SentenceTokenizer,
};

const CHILD: &str = "QCL_TEXT_THREADS_CHILD";

/// A random BERT wide enough (hidden 256, intermediate 1024) that the matrix products split
/// across threads, on the tiny fixture's vocabulary.
fn wide_encoder() -> SentenceEncoder {
    let dir = fixtures().join("tiny-bert");
    let mut bert: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    bert.hidden_size = 256;
    bert.num_attention_heads = 8;
    bert.intermediate_size = 1024;
    let seed = Seed::new(11);
    let tensors: HashMap<String, Tensor> = bert_tensor_shapes(&bert)
        .into_iter()
        .map(|(name, shape)| {
            let mut rng = seed.child_named(&name).rng();
            let n: usize = shape.iter().product();
            let mean = if name.ends_with("LayerNorm.weight") {
                1.0
            } else {
                0.0
            };
            let values = rng.normal_vec(n, mean, 0.1);
            (name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
        })
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let config = SentenceConfig::new(bert, 20).unwrap();
    let tokenizer = SentenceTokenizer::from_file(dir.join("tokenizer.json"), 20).unwrap();
    SentenceEncoder::from_var_builder(vb, config, tokenizer)
        .unwrap()
        .with_options(EmbedConfig {
            batch_size: 16,
            sort_by_length: true,
            progress: false,
        })
}

fn texts() -> Vec<String> {
    let words = [
        "the", "cat", "sat", "on", "mat", "dog", "park", "running", "long", "sentence",
    ];
    (0..40)
        .map(|i| {
            (0..(3 + i % 17))
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Runs in the child: embeds, checks the tapped forward, prints a digest of the bytes.
#[test]
#[ignore = "the child process of embeddings_are_the_same_bytes_on_one_and_two_threads"]
fn embed_in_child_process() {
    let Ok(threads) = std::env::var(CHILD) else {
        return;
    };
    assert_eq!(rayon::current_num_threads().to_string(), threads);
    let encoder = wide_encoder();
    let texts = texts();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let e = encoder.embed(&texts).unwrap();
    assert_eq!(e.dims(), [40, 256]);
    let batch = encoder.tokenize(&texts).unwrap();
    let tapped = encoder.forward_tapped(&batch, &mut |_, _| Ok(())).unwrap();
    assert_eq!(bits(&tapped), bits(&encoder.forward(&batch).unwrap()));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (bits(&e), bits(&tapped)).hash(&mut hasher);
    println!("digest {:016x}", hasher.finish());
}

fn digest_on(threads: usize) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "threads::embed_in_child_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env(CHILD, threads.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest "))
        .unwrap_or_else(|| panic!("no digest in {stdout}"))
        .to_string()
}

#[test]
fn embeddings_are_the_same_bytes_on_one_and_two_threads() {
    assert_eq!(digest_on(1), digest_on(2));
}
