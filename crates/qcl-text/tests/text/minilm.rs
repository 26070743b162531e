//! all-MiniLM-L6-v2 from `data/minilm` (prepared by `cargo xtask data`) against the embeddings
//! sentence-transformers computed in PyTorch (`fixtures/minilm/reference.json`). Skipped, with
//! a message, when the model has not been fetched (as in CI).

use crate::common::{
    bits, data_dir, embed_against_reference, fixtures, max_abs_diff, reference, AgainstReference,
};
use candle_core::Device;
use qcl_text::{EmbedConfig, SentenceEncoder};

fn minilm() -> Option<SentenceEncoder> {
    let dir = data_dir().join("minilm");
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "skipped: {} holds no model; run `cargo xtask data` to fetch all-MiniLM-L6-v2",
            dir.display()
        );
        return None;
    }
    let encoder = SentenceEncoder::from_folder(&dir, &Device::Cpu).unwrap();
    Some(encoder.with_options(EmbedConfig {
        batch_size: 4,
        sort_by_length: true,
        progress: false,
    }))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(encoder) = minilm() else { return };
    let r = reference(fixtures().join("minilm/reference.json"));
    assert_eq!(encoder.config().max_seq_length, 256);
    assert_eq!(encoder.dim(), 384);
    let AgainstReference {
        ours,
        theirs,
        cosines: cos,
    } = embed_against_reference(&encoder, &r);
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    eprintln!("all-MiniLM-L6-v2 against sentence-transformers: 1 − min cosine {:.2e}, 1 − mean {:.2e}, max |Δ| {:.2e}", 1.0 - min, 1.0 - mean, max_abs_diff(&ours, &theirs));
    assert!(min >= 0.9999, "cosines {cos:?}");
}

#[test]
fn minilm_tapped_forward_equals_bert_model_bit_for_bit() {
    let Some(encoder) = minilm() else { return };
    let r = reference(fixtures().join("minilm/reference.json"));
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let batch = encoder.tokenize(&texts).unwrap();
    let mut taps = 0;
    let tapped = encoder
        .forward_tapped(&batch, &mut |_, _| {
            taps += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(taps, 1 + 6 * 6);
    assert_eq!(bits(&tapped), bits(&encoder.forward(&batch).unwrap()));
}
