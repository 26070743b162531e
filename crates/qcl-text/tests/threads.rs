//! Embeddings are the same bytes on 1 and 2 threads. Alone in its test binary because it sets
//! `RAYON_NUM_THREADS`, which candle reads at every matrix product.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use common::{bits, fixtures};
use qcl_tensor::Seed;
use qcl_text::{
    bert::bert_tensor_shapes, EmbedOptions, SentenceConfig, SentenceEncoder, SentenceTokenizer,
};

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
        .with_options(EmbedOptions {
            batch_size: 16,
            sort_by_length: true,
            progress: false,
        })
}

fn embed_on(threads: usize, encoder: &SentenceEncoder, texts: &[&str]) -> Tensor {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let out = pool.install(|| encoder.embed(texts).unwrap());
    let batch = encoder.tokenize(texts).unwrap();
    let tapped = pool.install(|| encoder.forward_tapped(&batch, &mut |_, _| Ok(())).unwrap());
    assert_eq!(bits(&tapped), bits(&encoder.forward(&batch).unwrap()));
    out
}

#[test]
fn embeddings_are_the_same_bytes_on_one_and_two_threads() {
    let encoder = wide_encoder();
    let words = [
        "the", "cat", "sat", "on", "mat", "dog", "park", "running", "long", "sentence",
    ];
    let texts: Vec<String> = (0..40)
        .map(|i| {
            (0..(3 + i % 17))
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let one = embed_on(1, &encoder, &texts);
    let two = embed_on(2, &encoder, &texts);
    assert_eq!(one.dims(), [40, 256]);
    assert_eq!(bits(&one), bits(&two));
}
