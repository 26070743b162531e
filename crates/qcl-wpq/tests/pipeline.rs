//! The whole procedure on the committed Fashion-MNIST fixture (smoke scale), the compressed
//! file (size, bit-identical reload, typed errors) and determinism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use qcl_data::SplitDataset;
use qcl_tensor::{SafetensorsFile, Seed};
use qcl_wpq::compress::FMNIST_NORMALIZATION;
use qcl_wpq::{
    compress, evaluate, index_bits, train_teacher, uniform_quantize, uniform_size, Arch,
    CompressConfig, CompressedModel, ForwardConfig, Layout, Model, Objective, TeacherConfig,
    CHECKPOINT_FORMAT,
};

fn fixture() -> SplitDataset {
    SplitDataset::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist.safetensors"),
    )
    .unwrap()
}

fn smoke_config() -> CompressConfig {
    CompressConfig {
        em_iterations: 4,
        rows_per_iteration: 2_000,
        activation_images: 32,
        layer_steps: 2,
        global_steps: 2,
        batch_size: 32,
        seed: qcl_tensor::Seed::new(3),
        ..Default::default()
    }
}

fn teacher(data: &SplitDataset, arch: Arch) -> Model {
    let cfg = TeacherConfig {
        arch,
        epochs: 1,
        batch_size: 64,
        train_images: Some(512),
        ..Default::default()
    };
    train_teacher(&cfg, &data.train, &ProgressBar::hidden()).unwrap()
}

fn logits(model: &Model, data: &SplitDataset) -> Vec<u32> {
    let (x, _) = data
        .test
        .tensors_at(
            &(0..64).collect::<Vec<_>>(),
            FMNIST_NORMALIZATION,
            &Device::Cpu,
        )
        .unwrap();
    let out = model.forward(&x, ForwardConfig::default()).unwrap().logits;
    out.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn compress_save_reload_is_bit_identical_and_size_is_the_file_size() {
    let data = fixture();
    let teacher = teacher(&data, Arch::FmNet);
    let out = compress(
        &teacher,
        &data.train,
        &smoke_config(),
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(out.layers.len(), 6);
    for l in &out.layers {
        assert_eq!(l.em_objective.len(), 4);
        assert!(l.output_error_after_em.is_finite());
    }
    // FMNet with K = 64 everywhere: 15,128 bytes, 20.9×.
    let size = out.compressed.size(out.uncompressed_params);
    assert_eq!(out.uncompressed_params * 4, 316_328);
    assert!((size.total - 15_128.0).abs() < 1e-6, "{size:?}");
    assert!((size.ratio - 20.91).abs() < 0.01, "{size:?}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let bytes = out.compressed.save(&path).unwrap();
    assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
    // The file is the ideal size plus its header (a name, dtype, shape and offsets per stored
    // tensor, and the metadata of every compressed one).
    assert!(
        bytes as f64 >= size.total && (bytes as f64) < size.total + 3072.0,
        "{bytes} vs {}",
        size.total
    );
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.metadata()["format"], CHECKPOINT_FORMAT);
    for l in &out.compressed.layers {
        let packed = (l.pq.assignments.len() * index_bits(l.pq.k) as usize).div_ceil(8);
        let codes = file.info(&format!("{}.weight#codes", l.name)).unwrap();
        assert_eq!((codes.dtype, codes.shape), (DType::U8, vec![packed]));
        let book = file.info(&format!("{}.weight#codebooks", l.name)).unwrap();
        assert_eq!(book.dtype, DType::F16);
    }

    let loaded = CompressedModel::load(&path, Some(Arch::FmNet)).unwrap();
    for (a, b) in loaded.layers.iter().zip(&out.compressed.layers) {
        assert_eq!(a.pq, b.pq);
        assert_eq!(a.pq.decode().unwrap(), b.pq.decode().unwrap());
    }
    let in_memory = out.compressed.to_model().unwrap();
    let reloaded = loaded.to_model().unwrap();
    assert_eq!(logits(&in_memory, &data), logits(&reloaded, &data));
}

#[test]
fn reassignment_rounds_choose_codes_again_and_fine_tune_again() {
    let data = fixture();
    let teacher = Model::new(Arch::FmNet, Seed::new(5)).unwrap();
    let once = CompressConfig {
        layer_steps: 1,
        global_steps: 2,
        ..smoke_config()
    };
    let twice = CompressConfig {
        reassign_rounds: 1,
        ..once.clone()
    };
    let a = compress(&teacher, &data.train, &once, &ProgressBar::hidden()).unwrap();
    let b = compress(&teacher, &data.train, &twice, &ProgressBar::hidden()).unwrap();
    assert!(a.reassigned.is_empty());
    assert_eq!(b.reassigned.len(), 1);
    assert_eq!(b.reassigned[0].len(), b.layers.len());
    for (changed, layer) in b.reassigned[0].iter().zip(&b.layers) {
        assert!(*changed <= layer.n_subvectors);
    }
    // Everything before the reassignment is the same run.
    for (x, y) in a
        .after_layerwise
        .layers
        .iter()
        .zip(&b.after_layerwise.layers)
    {
        assert_eq!(x.pq, y.pq);
    }
    // The round after the reassignment changes the final codebooks.
    let codebooks = |o: &qcl_wpq::CompressOutcome| -> Vec<Vec<f32>> {
        o.compressed
            .layers
            .iter()
            .map(|l| l.pq.centroids.clone())
            .collect()
    };
    assert_ne!(codebooks(&a), codebooks(&b));
    // Error feedback with reassignment: centroids left without members are no error.
    let feedback = CompressConfig {
        objective: Objective::ErrorFeedback,
        ..twice.clone()
    };
    compress(&teacher, &data.train, &feedback, &ProgressBar::hidden()).unwrap();
    let c = compress(&teacher, &data.train, &twice, &ProgressBar::hidden()).unwrap();
    assert_eq!(b.reassigned, c.reassigned);
    for (x, y) in b.compressed.layers.iter().zip(&c.compressed.layers) {
        assert_eq!(x.pq, y.pq);
    }
}

#[test]
fn sensitivities_and_allocation_give_per_layer_choices_within_the_budget() {
    use qcl_wpq::compress::allocate::{allocate, plan_bits, sensitivities};
    let data = fixture();
    let teacher = Model::new(Arch::FmNet, Seed::new(5)).unwrap();
    let cfg = smoke_config();
    let candidates =
        sensitivities(&teacher, &data.train, &cfg, 64, &ProgressBar::hidden()).unwrap();
    let specs: Vec<_> = Arch::FmNet
        .layers()
        .into_iter()
        .filter(|l| l.quantized)
        .collect();
    for spec in &specs {
        let mine: Vec<_> = candidates.iter().filter(|c| c.layer == spec.name).collect();
        assert!(mine.len() >= 2, "{}", spec.name);
        // A candidate's bits are what the same choice costs as a whole plan of one layer.
        for c in mine {
            assert!(c.loss.is_finite() && c.loss >= 0.0);
            let one = CompressConfig {
                layer_overrides: [(spec.name.to_string(), c.choice)].into(),
                ..cfg.clone()
            };
            assert_eq!(plan_bits(std::slice::from_ref(spec), &one).unwrap(), c.bits);
        }
    }
    // At the default configuration's size, the allocation fits and compresses.
    let budget = plan_bits(&specs, &cfg).unwrap();
    let chosen = allocate(&candidates, budget).unwrap();
    assert_eq!(chosen.len(), specs.len());
    let allocated = CompressConfig {
        layer_overrides: chosen,
        layer_steps: 0,
        global_steps: 0,
        ..cfg.clone()
    };
    assert!(plan_bits(&specs, &allocated).unwrap() <= budget);
    let out = compress(&teacher, &data.train, &allocated, &ProgressBar::hidden()).unwrap();
    assert_eq!(out.layers.len(), specs.len());
    // Fusion's folded weights are not what the teacher measures: refused.
    let fused = CompressConfig {
        fuse_bn: true,
        ..cfg.clone()
    };
    assert!(matches!(
        sensitivities(&teacher, &data.train, &fused, 64, &ProgressBar::hidden()),
        Err(qcl_tensor::Error::InvalidParameter { .. })
    ));
    // Same seed, same measurements; a layer that does not exist is refused.
    let again = sensitivities(&teacher, &data.train, &cfg, 64, &ProgressBar::hidden()).unwrap();
    assert_eq!(candidates, again);
    let bad = CompressConfig {
        layer_overrides: [(
            "conv9".to_string(),
            qcl_wpq::compress::LayerChoice {
                block: 4,
                centroids: 8,
            },
        )]
        .into(),
        ..allocated
    };
    assert!(matches!(
        compress(&teacher, &data.train, &bad, &ProgressBar::hidden()),
        Err(qcl_tensor::Error::InvalidParameter { .. })
    ));
}

#[test]
fn compression_is_deterministic_and_naive_differs() {
    let data = fixture();
    let teacher = Model::new(Arch::FmNet, Seed::new(5)).unwrap();
    let cfg = CompressConfig {
        layer_steps: 0,
        global_steps: 1,
        ..smoke_config()
    };
    let a = compress(&teacher, &data.train, &cfg, &ProgressBar::hidden()).unwrap();
    let b = compress(&teacher, &data.train, &cfg, &ProgressBar::hidden()).unwrap();
    for (x, y) in a.compressed.layers.iter().zip(&b.compressed.layers) {
        assert_eq!(x.pq, y.pq);
    }
    // Same seed, same file bytes.
    assert_eq!(
        a.compressed.to_checkpoint().unwrap().to_bytes().unwrap(),
        b.compressed.to_checkpoint().unwrap().to_bytes().unwrap()
    );
    let acc_a = evaluate(&a.compressed.to_model().unwrap(), &data.test, Some(100)).unwrap();
    let acc_b = evaluate(&b.compressed.to_model().unwrap(), &data.test, Some(100)).unwrap();
    assert_eq!(acc_a, acc_b);
    let naive = compress(
        &teacher,
        &data.train,
        &CompressConfig {
            objective: Objective::Naive,
            ..cfg.clone()
        },
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_ne!(
        naive.compressed.layers[0].pq.assignments,
        a.compressed.layers[0].pq.assignments
    );
    // Error feedback through the same procedure: other codes, same codebook sizes.
    let feedback = compress(
        &teacher,
        &data.train,
        &CompressConfig {
            objective: Objective::ErrorFeedback,
            ..cfg
        },
        &ProgressBar::hidden(),
    )
    .unwrap();
    let (f, m) = (
        &feedback.compressed.layers[0].pq,
        &a.compressed.layers[0].pq,
    );
    assert_eq!(f.centroids.len(), m.centroids.len());
    assert_ne!(f.assignments, m.assignments);
}

#[test]
fn global_learning_rate_drops_follow_the_schedule() {
    let data = fixture();
    let teacher = Model::new(Arch::FmNet, Seed::new(6)).unwrap();
    let run = |global_lr: f64, drops: Vec<f64>| {
        let cfg = CompressConfig {
            layer_steps: 0,
            global_steps: 3,
            global_lr,
            global_lr_drops: drops,
            ..smoke_config()
        };
        compress(&teacher, &data.train, &cfg, &ProgressBar::hidden())
            .unwrap()
            .compressed
            .layers
            .iter()
            .map(|l| l.pq.centroids.clone())
            .collect::<Vec<_>>()
    };
    // Forty tenfold drops from the first step leave a rate far below any f32 update: the same
    // centroids as a zero rate, and different from the undropped schedule.
    let frozen = run(0.0, Vec::new());
    assert_eq!(run(0.05, vec![0.0; 40]), frozen);
    let moving = run(0.05, Vec::new());
    assert_ne!(moving, frozen);
    // A drop after the last step changes nothing.
    assert_eq!(run(0.05, vec![1.0]), moving);
    // A drop in the middle changes the last steps only: different from both.
    let dropped = run(0.05, vec![0.5]);
    assert_ne!(dropped, moving);
    assert_ne!(dropped, frozen);
    let bad = CompressConfig {
        global_lr_drops: vec![1.5],
        ..smoke_config()
    };
    assert!(matches!(
        bad.validate(),
        Err(qcl_tensor::Error::InvalidParameter { .. })
    ));
}

#[test]
fn fork_variants_run_and_keep_their_layouts() {
    let data = fixture();
    let bn = Model::new(Arch::FmNetBn, Seed::new(6)).unwrap();
    let fused = compress(
        &bn,
        &data.train,
        &CompressConfig {
            fuse_bn: true,
            ..smoke_config()
        },
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(fused.compressed.arch, Arch::FmNet);
    // Fusion fine-tunes the biases.
    let before = bn.fold_batch_norm().unwrap().tensors()["conv1.bias"]
        .to_vec1::<f32>()
        .unwrap();
    let after = fused.compressed.floats["conv1.bias"]
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, after);
    let teacher = Model::new(Arch::FmNet, Seed::new(6)).unwrap();
    let change = CompressConfig {
        layout: Layout::ChannelMajor,
        block_conv: 8,
        ..smoke_config()
    };
    let out = compress(&teacher, &data.train, &change, &ProgressBar::hidden()).unwrap();
    assert!(out
        .compressed
        .layers
        .iter()
        .all(|l| l.pq.geometry.layout == Layout::ChannelMajor));
    let sub = CompressConfig {
        per_slab_codebooks: true,
        ..change
    };
    let out = compress(&teacher, &data.train, &sub, &ProgressBar::hidden()).unwrap();
    // conv1: 16 input channels in blocks of 8 → 2 codebooks of K/d = 8 centroids.
    assert_eq!(
        (
            out.compressed.layers[0].pq.n_groups().unwrap(),
            out.compressed.layers[0].pq.k
        ),
        (2, 8)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    out.compressed.save(&path).unwrap();
    let back = CompressedModel::load(&path, None).unwrap();
    assert_eq!(
        back.layers[0].pq.decode().unwrap(),
        out.compressed.layers[0].pq.decode().unwrap()
    );
}

#[test]
fn uniform_baseline_sizes_match_the_paper_accounting() {
    let model = Model::new(Arch::FmNet, Seed::new(1)).unwrap();
    assert!((uniform_size(&model, 4).ratio - 7.43).abs() < 0.01);
    assert!((uniform_size(&model, 2).ratio - 13.80).abs() < 0.01);
    let q = uniform_quantize(&model, 2).unwrap();
    let w = q.tensors()["conv2.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for channel in w.chunks_exact(32 * 9) {
        let mut levels: Vec<u32> = channel.iter().map(|v| v.to_bits()).collect();
        levels.sort();
        levels.dedup();
        assert!(levels.len() <= 4);
    }
    assert!(uniform_quantize(&model, 0).is_err());
}

/// Writes a compressed file with its tensors and metadata replaced, for the error tests.
fn rewrite(
    src: &Path,
    dst: &PathBuf,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>, &mut BTreeMap<String, String>),
) {
    let file = SafetensorsFile::open(src).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = file
        .names()
        .iter()
        .map(|n| (n.clone(), file.tensor(n, &Device::Cpu).unwrap()))
        .collect();
    let mut meta = file.metadata().clone();
    edit(&mut tensors, &mut meta);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    qcl_tensor::write_safetensors(dst, &refs, &meta).unwrap();
}

#[test]
fn bad_files_are_typed_errors() {
    let data = fixture();
    let teacher = Model::new(Arch::FmNet, Seed::new(7)).unwrap();
    let cfg = CompressConfig {
        layer_steps: 0,
        global_steps: 0,
        em_iterations: 1,
        ..smoke_config()
    };
    let out = compress(&teacher, &data.train, &cfg, &ProgressBar::hidden()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    out.compressed.save(&good).unwrap();
    let bad = dir.path().join("bad.safetensors");

    // Architecture mismatch.
    let err = CompressedModel::load(&good, Some(Arch::FmNetBn)).unwrap_err();
    assert!(err.to_string().contains("architecture mismatch"), "{err}");
    let err = Model::load(&good, None).unwrap_err();
    assert_eq!(err.kind(), "bad_file");

    // Missing layer.
    rewrite(&good, &bad, |tensors, meta| {
        let mut layers: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&meta["qcl.tensors"]).unwrap();
        layers.remove("fc.weight");
        meta.insert(
            "qcl.tensors".into(),
            serde_json::to_string(&layers).unwrap(),
        );
        tensors.remove("fc.weight#codes");
        tensors.remove("fc.weight#codebooks");
    });
    let err = CompressedModel::load(&bad, None).unwrap_err();
    assert!(
        err.to_string().contains("missing quantized layer `fc`"),
        "{err}"
    );

    // Foreign metadata.
    rewrite(&good, &bad, |_, meta| {
        meta.insert("qcl.tensors".into(), "{\"something\": 1}".into());
    });
    let err = CompressedModel::load(&bad, None).unwrap_err();
    assert_eq!(err.kind(), "bad_file");
    assert!(err.to_string().contains("foreign"), "{err}");
    rewrite(&good, &bad, |_, meta| {
        meta.insert("format".into(), "something-else/1".into());
    });
    assert!(CompressedModel::load(&bad, None)
        .unwrap_err()
        .to_string()
        .contains(CHECKPOINT_FORMAT));

    // Truncated codes.
    rewrite(&good, &bad, |tensors, _| {
        let a = tensors["conv3.weight#codes"].clone();
        let n = a.dim(0).unwrap();
        tensors.insert("conv3.weight#codes".into(), a.narrow(0, 0, n - 10).unwrap());
    });
    let err = CompressedModel::load(&bad, None).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    // Dense models: an architecture that does not match the file.
    let dense = dir.path().join("dense.safetensors");
    teacher.save(&dense).unwrap();
    let err = Model::load(&dense, Some(Arch::FmNetBn)).unwrap_err();
    assert!(err.to_string().contains("architecture mismatch"), "{err}");
    let mut values = teacher.tensors();
    values.remove("conv2.bias");
    let err = Model::from_tensors(Arch::FmNet, values).unwrap_err();
    assert!(err.to_string().contains("conv2.bias"), "{err}");
    assert!(Tensor::zeros(1, DType::F32, &Device::Cpu).is_ok());
}
