//! Every loader of a qcl file format under mutation: bit flips, truncation and inserted bytes
//! (which the checksum or the parser must catch), and edits resealed with a valid checksum
//! (a metadata value replaced by an absurd one, a data byte changed, a tensor or a metadata
//! entry dropped), which the loader's own checks must catch. Loading may fail with any typed
//! error; it must not panic. Mutations are drawn by proptest from a fixed seed.
//!
//! (Over 600 lines: one sample file and one loader for each of qcl's formats, which the
//! mutations share.)

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use qcl_tensor::candle_core::{DType, Device, Tensor};
use qcl_tensor::{Result, Seed};

use crate::common::{fixture, qcl_raw};
use crate::Tally;

/// Absurd metadata values a resealed edit puts in place of a real one.
const ABSURD: [&str; 14] = [
    "0",
    "1",
    "-1",
    "4294967297",
    "9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "nan",
    "1e308",
    "",
    "[",
    "[1,2]",
    "{\"a\":1}",
    "qcl-pq/1",
];

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: f64,
        bit: u8,
    },
    Truncate {
        at: f64,
    },
    Insert {
        at: f64,
        byte: u8,
    },
    /// Metadata value `key` (modulo their number) replaced by `ABSURD[value]`, resealed.
    MetaValue {
        key: usize,
        value: usize,
    },
    /// A data byte set to `byte`, resealed.
    DataByte {
        at: f64,
        byte: u8,
    },
    /// Tensor `which` dropped, resealed.
    DropTensor {
        which: usize,
    },
    /// Metadata entry `key` dropped, resealed.
    DropMeta {
        key: usize,
    },
}

fn mutation(safetensors: bool) -> BoxedStrategy<Mutation> {
    let raw = prop_oneof![
        (0.0..1.0f64, 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (0.0..1.0f64).prop_map(|at| Mutation::Truncate { at }),
        (0.0..1.0f64, any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
    ];
    if !safetensors {
        return raw.boxed();
    }
    prop_oneof![
        1 => raw,
        3 => (any::<usize>(), 0..ABSURD.len())
            .prop_map(|(key, value)| Mutation::MetaValue { key, value }),
        2 => (0.0..1.0f64, any::<u8>()).prop_map(|(at, byte)| Mutation::DataByte { at, byte }),
        1 => any::<usize>().prop_map(|which| Mutation::DropTensor { which }),
        1 => any::<usize>().prop_map(|key| Mutation::DropMeta { key }),
    ]
    .boxed()
}

/// The mutated bytes, or `None` when the mutation does not apply (nothing to edit).
fn apply(bytes: &[u8], m: &Mutation) -> Option<Vec<u8>> {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    let mut out = bytes.to_vec();
    match *m {
        Mutation::FlipBit { at: f, bit } => out[at(f, bytes.len())] ^= 1 << bit,
        Mutation::Truncate { at: f } => out.truncate(at(f, bytes.len())),
        Mutation::Insert { at: f, byte } => out.insert(at(f, bytes.len()), byte),
        _ => return reseal(bytes, m),
    }
    Some(out)
}

type Parts = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Applies a resealed edit: parse, edit, write again with the edited content's checksum.
fn reseal(bytes: &[u8], m: &Mutation) -> Option<Vec<u8>> {
    let parsed = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let mut tensors: Parts = parsed
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let mut meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != qcl_tensor::CHECKSUM_KEY)
        .collect();
    match *m {
        Mutation::MetaValue { key, value } => {
            let key = meta.keys().nth(key % meta.len().max(1))?.clone();
            meta.insert(key, ABSURD[value].to_string());
        }
        Mutation::DropMeta { key } => {
            let key = meta.keys().nth(key % meta.len().max(1))?.clone();
            meta.remove(&key);
        }
        Mutation::DropTensor { which } => {
            let name = tensors.keys().nth(which % tensors.len().max(1))?.clone();
            tensors.remove(&name);
        }
        Mutation::DataByte { at, byte } => {
            let total: usize = tensors.values().map(|t| t.2.len()).sum();
            let mut i = ((at * total as f64) as usize).min(total.checked_sub(1)?);
            for (_, _, data) in tensors.values_mut() {
                if i < data.len() {
                    data[i] = byte;
                    break;
                }
                i -= data.len();
            }
        }
        _ => unreachable!("raw mutations are applied in `apply`"),
    }
    qcl_tensor::serialize_safetensors(
        tensors
            .iter()
            .map(|(n, (d, s, b))| (n.as_str(), *d, &s[..], &b[..])),
        &meta,
    )
    .ok()
}

/// A loader: reads the file and uses what it read a little (so that a bad value is touched).
type Loader = Box<dyn Fn(&Path) -> Result<()>>;

struct Sample {
    name: &'static str,
    path: PathBuf,
    safetensors: bool,
    load: Loader,
}

/// Panic messages of the cases, caught by a hook instead of printed.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn check(sample: &Sample, mutated: &Path, m: &Mutation) -> std::result::Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| (sample.load)(mutated))) {
        Ok(_) => Ok(()),
        Err(_) => {
            let message = PANIC.lock().unwrap().take().unwrap_or_default();
            Err(format!("{}: {m:?} panicked: {message}", sample.name))
        }
    }
}

pub fn run() -> Tally {
    let cases: usize = std::env::var("QCL_BAD_INPUT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let dir = tempfile::tempdir().unwrap();
    let samples = samples(dir.path());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        *PANIC.lock().unwrap() = Some(info.to_string());
    }));
    let mut tally = Tally::default();
    let mut runner = TestRunner::deterministic();
    let mutated = dir.path().join("mutated");
    for sample in &samples {
        let original = std::fs::read(&sample.path).unwrap();
        // The unmutated file loads: the loader is the right one.
        tally.record(
            (sample.load)(&sample.path)
                .map_err(|e| format!("{}: the valid file: {e}", sample.name)),
        );
        let strategy = mutation(sample.safetensors);
        let mut done = 0;
        while done < cases {
            let m = strategy.new_tree(&mut runner).unwrap().current();
            let Some(bytes) = apply(&original, &m) else {
                continue;
            };
            std::fs::write(&mutated, bytes).unwrap();
            tally.record(check(sample, &mutated, &m));
            done += 1;
        }
    }
    std::panic::set_hook(previous);
    tally
}

fn points(n: usize, d: usize) -> Vec<f32> {
    Seed::new(0).rng().normal_vec(n * d, 0.0, 1.0)
}

fn samples(dir: &Path) -> Vec<Sample> {
    let mut out = library_samples(dir);
    out.extend(command_samples(dir));
    out
}

fn sample(name: &'static str, path: PathBuf, load: Loader) -> Sample {
    Sample {
        name,
        path,
        safetensors: true,
        load,
    }
}

/// Files written by the library crates' own writers.
fn library_samples(dir: &Path) -> Vec<Sample> {
    let data = points(200, 8);
    let mut out = quantizer_samples(dir, &data);
    out.extend(model_samples(dir, &data));
    out.extend(state_samples(dir));
    out
}

/// Files of qcl-tensor and qcl-pq: tensors, a k-means model, a product quantizer, an index and codes.
fn quantizer_samples(dir: &Path, data: &[f32]) -> Vec<Sample> {
    let mut out = Vec::new();
    let path = dir.join("tensors.safetensors");
    let x = Tensor::from_vec(data.to_vec(), (200, 8), &Device::Cpu).unwrap();
    qcl_tensor::write_safetensors(&path, &[("x", &x)], &Default::default()).unwrap();
    out.push(sample(
        "tensor file",
        path,
        Box::new(|p| {
            let file = qcl_tensor::SafetensorsFile::open(p)?;
            for name in file.names() {
                file.tensor(name, &Device::Cpu)?;
            }
            Ok(())
        }),
    ));

    let config = qcl_pq::KMeansConfig {
        max_iter: 3,
        ..qcl_pq::KMeansConfig::new(8)
    };
    let path = dir.join("kmeans.safetensors");
    qcl_pq::KMeans::fit(data, 8, None, &config)
        .unwrap()
        .save(&path)
        .unwrap();
    out.push(sample(
        "k-means model",
        path,
        Box::new(|p| {
            let model = qcl_pq::KMeans::load(p)?;
            model.assign(&vec![0.5; model.dim])?;
            Ok(())
        }),
    ));

    let pq = qcl_pq::ProductQuantizer::train(
        data,
        8,
        &qcl_pq::ProductQuantizerConfig {
            max_iter: 3,
            ..qcl_pq::ProductQuantizerConfig::new(2, 3)
        },
    )
    .unwrap();
    let pq_path = dir.join("pq.safetensors");
    pq.save(&pq_path).unwrap();
    out.push(sample(
        "product quantizer",
        pq_path.clone(),
        Box::new(|p| {
            let pq = qcl_pq::ProductQuantizer::load(p)?;
            pq.decode(&pq.encode(&vec![0.5; pq.dim()])?)?;
            Ok(())
        }),
    ));
    // An index file: IVF-PQ re-ranked with exact vectors (every part of the format).
    let ivf = qcl_pq::index::IvfPqIndex::train(
        data,
        8,
        &qcl_pq::index::IvfPqConfig {
            nlist: 4,
            ..qcl_pq::index::IvfPqConfig::new(2, 4)
        },
    )
    .unwrap();
    let mut index = qcl_pq::index::Refine::new(qcl_pq::index::AnyIndex::IvfPq(ivf), 2).unwrap();
    qcl_pq::index::VectorIndex::add(&mut index, data).unwrap();
    let path = dir.join("index.safetensors");
    qcl_pq::index::AnyIndex::Refine(Box::new(index))
        .save(&path)
        .unwrap();
    out.push(sample(
        "nearest-neighbour index",
        path,
        Box::new(|p| {
            let index = qcl_pq::index::AnyIndex::load(p)?;
            let dim = qcl_pq::index::VectorIndex::dim(&index);
            qcl_pq::index::VectorIndex::search(&index, &vec![0.5; dim], 3)?;
            Ok(())
        }),
    ));
    let path = dir.join("codes.safetensors");
    pq.save_codes(&pq.encode(data).unwrap(), &path).unwrap();
    out.push(sample(
        "product-quantization codes",
        path,
        Box::new(move |p| {
            let pq = qcl_pq::ProductQuantizer::load(&pq_path)?;
            let codes = pq.load_codes(p)?;
            pq.decode(&codes)?;
            pq.search(&vec![0.5; pq.dim()], &codes, 1)?;
            Ok(())
        }),
    ));
    out
}

/// Files of models and data: VQ parameters and indices, a parameter store, FMNet, a calibration, a data set and a BERT checkpoint.
fn model_samples(dir: &Path, data: &[f32]) -> Vec<Sample> {
    let mut out = Vec::new();
    let store = qcl_nn::ParamStore::new(3);
    let config = qcl_vq::VectorQuantizerConfig::new(4, 8);
    let vq = qcl_vq::VectorQuantizer::from_param_path(&store.root(&Device::Cpu).pp("vq"), config)
        .unwrap();
    let path = dir.join("vq.safetensors");
    vq.save(&path).unwrap();
    out.push(sample(
        "vector quantizer",
        path,
        Box::new(|p| {
            let store = qcl_nn::ParamStore::new(0);
            let vq = qcl_vq::VectorQuantizer::load(p, &store.root(&Device::Cpu).pp("vq"))?;
            let x = Tensor::zeros((1, 3, vq.config().dim), DType::F32, &Device::Cpu)?;
            vq.decode_packed(&vq.encode_packed(&x)?)?;
            Ok(())
        }),
    ));
    let path = dir.join("indices.safetensors");
    let x = Tensor::from_vec(data[..96].to_vec(), (1, 24, 4), &Device::Cpu).unwrap();
    vq.encode_packed(&x).unwrap().save(&path).unwrap();
    out.push(sample(
        "packed VQ indices",
        path,
        Box::new(|p| {
            qcl_vq::PackedIndices::load(p)?.unpack();
            Ok(())
        }),
    ));

    let path = dir.join("params.safetensors");
    store.save(&path).unwrap();
    out.push(sample(
        "parameter file",
        path,
        Box::new(|p| {
            let store = qcl_nn::ParamStore::new(3);
            qcl_vq::VectorQuantizer::from_param_path(
                &store.root(&Device::Cpu).pp("vq"),
                qcl_vq::VectorQuantizerConfig::new(4, 8),
            )?;
            store.load(p)
        }),
    ));

    let path = dir.join("fmnet.safetensors");
    crate::common::write_fmnet(&path);
    out.push(sample(
        "weight-PQ dense model",
        path,
        Box::new(|p| qcl_wpq::Model::load(p, None).map(|_| ())),
    ));

    let path = dir.join("calibration.safetensors");
    let calibration = qcl_wpq::Calibration::new();
    calibration
        .record(
            "fc.weight",
            &Tensor::from_vec(data[..48].to_vec(), (6, 8), &Device::Cpu).unwrap(),
        )
        .unwrap();
    calibration.save(&path).unwrap();
    out.push(sample(
        "calibration",
        path,
        Box::new(|p| qcl_wpq::Calibration::load(p).map(|_| ())),
    ));

    let path = dir.join("dataset.safetensors");
    std::fs::copy(fixture("mnist.safetensors"), &path).unwrap();
    out.push(sample(
        "data set",
        path,
        Box::new(|p| {
            let split = qcl_data::SplitDataset::load(p)?;
            split.train.len();
            Ok(())
        }),
    ));

    let path = dir.join("bert.safetensors");
    std::fs::copy(format!("{}/model.safetensors", fixture("tiny-bert")), &path).unwrap();
    out.push(sample(
        "foreign checkpoint",
        path,
        Box::new(|p| qcl_wpq::Checkpoint::open(p).map(|_| ())),
    ));
    out
}

/// Files of whole states: AQM and CACL, a training checkpoint, an AQM configuration and IDX files.
fn state_samples(dir: &Path) -> Vec<Sample> {
    let mut out = Vec::new();
    let path = dir.join("aqm-state.safetensors");
    let stack = qcl_aqm::QStack::new(
        qcl_aqm::StackConfig::fashion_mnist(),
        Seed::new(4),
        &Device::Cpu,
    )
    .unwrap();
    let cost = stack.model_cost_params() as u64;
    let config = qcl_aqm::MemoryConfig {
        budget_bytes: cost + 40_000,
        ..qcl_aqm::MemoryConfig::per_class(1, 10, 784)
    };
    let memory = qcl_aqm::AdaptiveMemory::new(config, 1, cost).unwrap();
    qcl_aqm::state::save(&path, &stack, Seed::new(4), &memory).unwrap();
    out.push(sample(
        "AQM state",
        path,
        Box::new(|p| qcl_aqm::state::load(p, &Device::Cpu).map(|_| ())),
    ));

    let path = dir.join("cacl.safetensors");
    let net = qcl_cacl::NetSvd::new(
        qcl_cacl::NetConfig::net_svd_s(),
        qcl_cacl::CaclConfig::default(),
        Seed::new(5),
        &Device::Cpu,
    )
    .unwrap();
    net.save(&path).unwrap();
    out.push(sample(
        "CACL model",
        path,
        Box::new(|p| qcl_cacl::NetSvd::load(p, &Device::Cpu).map(|_| ())),
    ));

    let path = dir.join("training.ckpt.safetensors");
    let train_store = qcl_nn::ParamStore::new(1);
    let w = train_store
        .root(&Device::Cpu)
        .param(
            "w",
            (2, 3),
            qcl_nn::Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )
        .unwrap();
    let mut sgd = qcl_nn::optim::Sgd::new(
        train_store.trainable(),
        qcl_nn::optim::SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    qcl_nn::optim::Optimizer::backward_step(&mut sgd, &w.sum_all().unwrap()).unwrap();
    qcl_nn::train::Checkpoint::capture(&train_store, &sgd)
        .unwrap()
        .save(&path)
        .unwrap();
    out.push(sample(
        "training checkpoint",
        path,
        Box::new(|p| {
            let store = qcl_nn::ParamStore::new(9);
            store
                .root(&Device::Cpu)
                .param("w", (2, 3), qcl_nn::Init::Zeros)?;
            let mut sgd =
                qcl_nn::optim::Sgd::new(store.trainable(), qcl_nn::optim::SgdConfig::default())?;
            qcl_nn::train::Checkpoint::load_into(p, &store, &mut sgd).map(|_| ())
        }),
    ));

    let path = dir.join("aqm.json");
    std::fs::copy(fixture("aqm/fashion_mnist.json"), &path).unwrap();
    out.push(Sample {
        name: "AQM stack configuration (JSON)",
        path,
        safetensors: false,
        load: Box::new(|p| qcl_aqm::StackConfig::load(p).map(|_| ())),
    });

    let path = dir.join("idx");
    std::fs::write(&path, idx_pair()).unwrap();
    out.push(Sample {
        name: "IDX image and label files",
        path,
        safetensors: false,
        load: Box::new(|p| {
            let bytes = std::fs::read(p).map_err(|e| qcl_tensor::Error::io(p, e))?;
            let (images, labels) = bytes.split_at(bytes.len().min(IDX_IMAGES_LEN));
            qcl_data::import::parse_idx_pair(images, labels, 10, "idx").map(|_| ())
        }),
    });
    out
}

/// Bytes of the IDX image file of [`idx_pair`].
const IDX_IMAGES_LEN: usize = 16 + 3 * 28 * 28;

/// Three 28×28 images and their labels, as IDX files one after the other.
fn idx_pair() -> Vec<u8> {
    let mut out = vec![0, 0, 8, 3];
    for d in [3u32, 28, 28] {
        out.extend(d.to_be_bytes());
    }
    out.extend((0..3 * 28 * 28).map(|i| (i % 251) as u8));
    out.extend([0, 0, 8, 1]);
    out.extend(3u32.to_be_bytes());
    out.extend([1, 7, 9]);
    out
}

/// Files written by `qcl` commands (formats whose writers need a whole pipeline).
fn command_samples(dir: &Path) -> Vec<Sample> {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let (ok, stdout, stderr) = qcl_raw(args);
        assert!(ok, "{args:?}: {stdout}{stderr}");
    };
    let mut out = Vec::new();

    let path = dir.join("ecvq.safetensors");
    run(&[
        "ecvq",
        "--source",
        "gaussian",
        "--method",
        "clg",
        "--lambda",
        "4",
        "--k",
        "8",
        "--train-samples",
        "500",
        "--iterations",
        "5",
        "--eval-samples",
        "500",
        "--out",
        &s(&path),
    ]);
    out.push(sample(
        "entropy-constrained VQ",
        path,
        Box::new(|p| qcl_ecvq::Ecvq::load(p).map(|_| ())),
    ));

    let model = dir.join("fmnet-teacher.safetensors");
    crate::common::write_fmnet(&model);
    let config = dir.join("wpq.json");
    crate::common::write_small_wpq_config(&config);
    let path = dir.join("fmnet-compressed.safetensors");
    run(&[
        "wpq",
        "compress",
        "--model",
        &s(&model),
        "--arch",
        "fmnet",
        "--config",
        &s(&config),
        "--data",
        &fixture("fashion-mnist.safetensors"),
        "--out",
        &s(&path),
    ]);
    out.push(sample(
        "weight-PQ compressed model",
        path,
        Box::new(|p| {
            qcl_wpq::CompressedModel::load(p, None)?.to_model()?;
            Ok(())
        }),
    ));

    let path = dir.join("bert-compressed.safetensors");
    run(&[
        "wpq",
        "compress-checkpoint",
        "--checkpoint",
        &format!("{}/model.safetensors", fixture("tiny-bert")),
        "--rule",
        "encoder.layer.*.self.*.weight=pq:d=2,k=16,objective=naive",
        "--rule",
        "encoder.layer.*.dense.weight=rtn:bits=4,group=16",
        "--out",
        &s(&path),
    ]);
    out.push(sample(
        "compressed checkpoint",
        path,
        Box::new(|p| {
            let checkpoint = qcl_wpq::CompressedCheckpoint::load(p)?;
            checkpoint.decompress()?;
            Ok(())
        }),
    ));
    out
}
