//! The tiny randomly initialised BERT of `fixtures/tiny-bert` against sentence-transformers'
//! embeddings of it, and the tapped forward against candle-transformers' `BertModel`.

use std::collections::HashMap;
use std::path::Path;

use crate::common::{
    bits, embed_against_reference, fixtures, max_abs_diff, reference, AgainstReference,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use qcl_tensor::{Error, SafetensorsFile};
use qcl_text::{EmbedConfig, SentenceConfig, SentenceEncoder, SentenceTokenizer, LAYER_LINEARS};

fn tiny_dir() -> std::path::PathBuf {
    fixtures().join("tiny-bert")
}

fn quiet(batch_size: usize, sort_by_length: bool) -> EmbedConfig {
    EmbedConfig {
        batch_size,
        sort_by_length,
        progress: false,
    }
}

fn tiny() -> SentenceEncoder {
    SentenceEncoder::from_folder(tiny_dir(), &Device::Cpu)
        .unwrap()
        .with_options(quiet(4, true))
}

fn tiny_tensors() -> HashMap<String, Tensor> {
    let file = SafetensorsFile::open(tiny_dir().join("model.safetensors")).unwrap();
    file.names()
        .iter()
        .map(|n| (n.clone(), file.tensor(n, &Device::Cpu).unwrap()))
        .collect()
}

fn from_tensors(tensors: HashMap<String, Tensor>) -> qcl_tensor::Result<SentenceEncoder> {
    let config = SentenceConfig::from_folder(tiny_dir())?;
    let tokenizer = SentenceTokenizer::from_file(tiny_dir().join("tokenizer.json"), 20)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    SentenceEncoder::from_var_builder(vb, config, tokenizer)
}

#[test]
fn tiny_bert_matches_the_sentence_transformers_reference() {
    let r = reference(tiny_dir().join("reference.json"));
    let encoder = tiny();
    assert_eq!(encoder.config().max_seq_length, r.max_seq_length);
    let AgainstReference {
        ours,
        theirs,
        cosines: cos,
    } = embed_against_reference(&encoder, &r);
    for (text, c) in r.sentences.iter().zip(&cos) {
        assert!(*c >= 0.9999, "cosine {c} for {text:?}");
    }
    let diff = max_abs_diff(&ours, &theirs);
    assert!(diff < 2e-6, "max |ours − reference| = {diff}");
}

#[test]
fn the_tokenizer_files_truncation_and_padding_are_overridden() {
    // The file truncates at 16 and pads to a fixed 24; sentence-transformers truncates at
    // max_seq_length (20 here) and pads to the longest text of the batch.
    let encoder = tiny();
    let long = "the long sentence goes on and on with many many many words that never end at all";
    let batch = encoder.tokenize(&[long, "a dog"]).unwrap();
    assert_eq!(batch.lengths, [20, 4]);
    assert_eq!(batch.input_ids.dims(), [2, 20]);
    let short = encoder.tokenize(&["a dog"]).unwrap();
    assert_eq!(short.input_ids.dims(), [1, 4]);
    let mask: Vec<Vec<u32>> = batch.attention_mask.to_vec2().unwrap();
    assert_eq!(mask[1].iter().sum::<u32>(), 4);
    assert!(mask[1][4..].iter().all(|&m| m == 0));
}

fn batches(encoder: &SentenceEncoder) -> Vec<qcl_text::TokenBatch> {
    let r = reference(tiny_dir().join("reference.json"));
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    vec![
        encoder.tokenize(&texts).unwrap(),
        encoder.tokenize(&texts[..2]).unwrap(),
        encoder.tokenize(&[texts[2]]).unwrap(),
        encoder.tokenize(&["", "a"]).unwrap(),
    ]
}

#[test]
fn tapped_forward_equals_bert_model_bit_for_bit() {
    let encoder = tiny();
    for batch in batches(&encoder) {
        let plain = encoder.forward(&batch).unwrap();
        let tapped = encoder.forward_tapped(&batch, &mut |_, _| Ok(())).unwrap();
        assert_eq!(bits(&plain), bits(&tapped));
        // The last hidden state too, before pooling hides padding rows.
        let hidden = encoder
            .bert()
            .forward(
                &batch.input_ids,
                &batch.token_type_ids,
                Some(&batch.attention_mask),
            )
            .unwrap();
        let weights = qcl_text::BertWeights::from_var_builder(
            &VarBuilder::from_tensors(tiny_tensors(), DType::F32, &Device::Cpu),
            &encoder.config().bert,
        )
        .unwrap();
        let ours = qcl_text::TappedBert::new(&weights, &encoder.config().bert)
            .forward(&batch, &mut |_, _| Ok(()))
            .unwrap();
        assert_eq!(bits(&hidden), bits(&ours));
    }
}

#[test]
fn taps_come_in_order_with_the_real_tokens_only() {
    let encoder = tiny();
    let r = reference(tiny_dir().join("reference.json"));
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let batch = encoder.tokenize(&texts).unwrap();
    let n_valid: usize = r.input_ids.iter().map(Vec::len).sum();
    let mut calls: Vec<(String, Tensor)> = Vec::new();
    encoder
        .forward_tapped(&batch, &mut |name, x| {
            calls.push((name.to_string(), x.clone()));
            Ok(())
        })
        .unwrap();
    let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, encoder.tapped_weight_names());
    assert_eq!(names[1], "encoder.layer.0.attention.self.query.weight");
    assert_eq!(names.len(), 1 + 2 * LAYER_LINEARS.len());
    // The ids tap: the real token ids of every text, in order.
    let ids: Vec<u32> = calls[0].1.to_vec1().unwrap();
    assert_eq!(ids, r.input_ids.concat());
    for (name, x) in &calls[1..] {
        let width = if name.ends_with("output.dense.weight") && !name.contains("attention") {
            64
        } else {
            32
        };
        assert_eq!(x.dims(), [n_valid, width], "{name}");
        assert_eq!(x.dtype(), DType::F32);
    }
    // Row by row, the batch's taps are those of each text run alone (no padding rows).
    let mut single: HashMap<String, Vec<Tensor>> = HashMap::new();
    for text in &texts {
        let b = encoder.tokenize(&[text]).unwrap();
        encoder
            .forward_tapped(&b, &mut |name, x| {
                single.entry(name.to_string()).or_default().push(x.clone());
                Ok(())
            })
            .unwrap();
    }
    for (name, x) in &calls[1..] {
        let alone = Tensor::cat(&single[name], 0).unwrap();
        assert!(max_abs_diff(x, &alone) < 1e-5, "{name}");
    }
}

#[test]
fn a_failing_tap_stops_the_pass_with_its_error() {
    let encoder = tiny();
    let batch = encoder.tokenize(&["a dog"]).unwrap();
    let mut seen = 0;
    let err = encoder
        .forward_tapped(&batch, &mut |name, _| {
            seen += 1;
            if name.contains("intermediate") {
                Err(Error::EmptyInput("stop here".into()))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, Error::EmptyInput(ref m) if m == "stop here"));
    assert_eq!(seen, 1 + 5);
}

#[test]
fn embeddings_do_not_depend_on_batching_or_order() {
    let r = reference(tiny_dir().join("reference.json"));
    let mut texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    texts.extend([
        "a dog",
        "the park is big",
        "cat",
        "running in the park with a dog",
    ]);
    let base = tiny().with_options(quiet(1, false)).embed(&texts).unwrap();
    for (batch_size, sort) in [(2, false), (3, true), (4, false), (64, true), (64, false)] {
        let e = tiny()
            .with_options(quiet(batch_size, sort))
            .embed(&texts)
            .unwrap();
        let diff = max_abs_diff(&base, &e);
        assert!(diff <= 1e-6, "batch {batch_size}, sorted {sort}: {diff}");
    }
    let reversed: Vec<&str> = texts.iter().rev().copied().collect();
    let e = tiny()
        .with_options(quiet(3, false))
        .embed(&reversed)
        .unwrap();
    let back = e
        .index_select(
            &Tensor::from_vec(
                (0..texts.len() as u32).rev().collect::<Vec<_>>(),
                texts.len(),
                &Device::Cpu,
            )
            .unwrap(),
            0,
        )
        .unwrap();
    assert!(max_abs_diff(&base, &back) <= 1e-6);
}

#[test]
fn embed_handles_no_texts_and_refuses_a_zero_batch_size() {
    let e = tiny().embed(&[]).unwrap();
    assert_eq!(e.dims(), [0, 32]);
    let err = tiny()
        .with_options(quiet(0, true))
        .embed(&["a"])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { ref name, .. } if name == "batch_size"));
    assert!(matches!(tiny().tokenize(&[]), Err(Error::EmptyInput(_))));
}

#[test]
fn a_var_builder_with_a_checkpoint_prefix_taps_prefixed_names() {
    let prefixed: HashMap<String, Tensor> = tiny_tensors()
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    let encoder = from_tensors(prefixed).unwrap();
    assert_eq!(
        encoder.tapped_weight_names()[0],
        "bert.embeddings.word_embeddings.weight"
    );
    let batch = encoder.tokenize(&["a dog"]).unwrap();
    assert_eq!(
        bits(&encoder.forward(&batch).unwrap()),
        bits(&tiny().forward(&batch).unwrap())
    );
}

#[test]
fn bad_weights_are_typed_errors_naming_the_tensor() {
    let name = "encoder.layer.1.intermediate.dense.weight";
    let mut missing = tiny_tensors();
    missing.remove(name);
    let err = from_tensors(missing).err().unwrap();
    assert!(
        matches!(err, Error::InvalidParameter { ref reason, .. } if reason.contains(name)),
        "{err}"
    );

    let mut wrong = tiny_tensors();
    wrong.insert(
        name.into(),
        Tensor::zeros((64, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = from_tensors(wrong).err().unwrap();
    assert!(
        matches!(err, Error::ShapeMismatch { ref context, .. } if context == name),
        "{err}"
    );

    let mut nan = tiny_tensors();
    let mut values = vec![0f32; 64 * 32];
    values[70] = f32::NAN;
    nan.insert(
        name.into(),
        Tensor::from_vec(values, (64, 32), &Device::Cpu).unwrap(),
    );
    let err = from_tensors(nan).err().unwrap();
    assert!(
        matches!(err, Error::NonFinite { ref context, index: 70, .. } if context == name),
        "{err}"
    );

    let config = SentenceConfig::from_folder(tiny_dir()).unwrap();
    let tokenizer = SentenceTokenizer::from_file(tiny_dir().join("tokenizer.json"), 16).unwrap();
    let vb = VarBuilder::from_tensors(tiny_tensors(), DType::F32, &Device::Cpu);
    let err = SentenceEncoder::from_var_builder(vb, config, tokenizer)
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidParameter { ref name, .. } if name == "tokenizer"));
}

/// A copy of the tiny model's folder in a temporary directory.
fn copy_of_tiny() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    copy(&tiny_dir(), tmp.path());
    tmp
}

fn folder_error(edit: impl FnOnce(&Path)) -> Error {
    let dir = copy_of_tiny();
    edit(dir.path());
    SentenceEncoder::from_folder(dir.path(), &Device::Cpu)
        .err()
        .expect("the edited folder must be refused")
}

fn assert_bad_file(err: Error, file: &str, words: &str) {
    match &err {
        Error::BadFile { path, reason } => {
            assert!(path.ends_with(file), "{err}");
            assert!(reason.contains(words), "{err}");
        }
        _ => panic!("expected a bad-file error naming {file}, got {err}"),
    }
}

#[test]
fn bad_model_folders_are_typed_errors_naming_the_file() {
    let err = folder_error(|d| {
        let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    });
    assert_bad_file(err, "model.safetensors", "safetensors");

    let err = folder_error(|d| std::fs::write(d.join("tokenizer.json"), b"{\"not\": 1}").unwrap());
    assert_bad_file(err, "tokenizer.json", "not a tokenizer");

    let err = folder_error(|d| {
        let p = d.join("1_Pooling/config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace(
            "\"pooling_mode_cls_token\": false",
            "\"pooling_mode_cls_token\": true",
        );
        std::fs::write(p, text).unwrap();
    });
    assert_bad_file(err, "1_Pooling/config.json", "mean pooling");

    let err = folder_error(|d| {
        std::fs::write(
            d.join("sentence_bert_config.json"),
            b"{\"max_seq_length\": 65}",
        )
        .unwrap()
    });
    assert_bad_file(err, "config.json", "max_seq_length");

    let err =
        folder_error(|d| std::fs::write(d.join("config.json"), b"{\"hidden_size\": 32").unwrap());
    assert_bad_file(err, "config.json", "invalid JSON");

    let err = folder_error(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    assert!(matches!(err, Error::Io { ref path, .. } if path.ends_with("tokenizer.json")));
}
