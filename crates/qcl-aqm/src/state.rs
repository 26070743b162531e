//! Saving and restoring the whole AQM state — modules (parameters, optimizers, codebooks,
//! statistics, slow decoders) and the memory (every stored sample with its id) — in one
//! safetensors file, written atomically, so a stream can stop and continue.
//!
//! Layout (format [`STATE_FORMAT`]): tensors `layer{i}.live.*`, `layer{i}.adam.*`,
//! `layer{i}.ema.*`, `layer{i}.trimmed.codebook`; `memory.meta` (`i64 [n, 6]`: block, id,
//! label, task, dataset index, step), `memory.raw` (`u8 [n_raw, C·H·W]`),
//! `memory.codes{b}` (`u8 [n_b, row bytes]`, bit-packed rows); metadata: the stack
//! configuration, seed, per-module statistics and optimizer scalars, memory configuration,
//! block costs, model cost, next id, RNG state and the insertion rule with its counters (seen,
//! admitted; optional, the reference rule when absent), all JSON.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_continual::{Entry, ItemId};
use qcl_tensor::{Error, Result, RngState, SafetensorsFile, Seed};
use qcl_vq::PackedIndices;

use crate::config::StackConfig;
use crate::layer::LayerStats;
use crate::memory::{AdaptiveMemory, InsertionRule, MemoryConfig, Payload, StoredSample};
use crate::stack::QStack;

/// Metadata `format` of a saved state.
pub const STATE_FORMAT: &str = "qcl-aqm-state/1";

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid_parameter("state", e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(file: &SafetensorsFile, key: &str) -> Result<T> {
    let text = file
        .metadata()
        .get(key)
        .ok_or_else(|| Error::bad_file(file.path(), format!("metadata `{key}` is missing")))?;
    serde_json::from_str(text)
        .map_err(|e| Error::bad_file(file.path(), format!("metadata `{key}`: {e}")))
}

/// Writes `stack` (built with `seed`) and `memory` to `path`, atomically: on any failure the
/// previous file at `path` is untouched.
///
/// ```
/// use candle_core::Device;
/// use qcl_aqm::{state, AdaptiveMemory, MemoryConfig, QStack, StackConfig};
/// let stack = QStack::new(StackConfig::fashion_mnist(), 1.into(), &Device::Cpu)?;
/// let memory = AdaptiveMemory::new(MemoryConfig::per_class(50, 10, 784), 1, stack.model_cost_params() as u64)?;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("aqm.safetensors");
/// state::save(&path, &stack, 1.into(), &memory)?;
/// let (back, mem) = state::load(&path, &Device::Cpu)?;
/// assert_eq!(back.config(), stack.config());
/// assert_eq!(mem.len(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Io`] when writing fails; candle errors.
pub fn save(
    path: impl AsRef<Path>,
    stack: &QStack,
    seed: Seed,
    memory: &AdaptiveMemory,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut stats = Vec::new();
    let mut adam = Vec::new();
    for (i, layer) in stack.layers().iter().enumerate() {
        for (n, t) in layer.state_tensors()? {
            tensors.push((format!("layer{i}.{n}"), t));
        }
        stats.push(layer.stats().clone());
        adam.push(layer.optimizer_scalars()?);
    }
    let entries = memory.all_entries();
    let mut meta_rows: Vec<i64> = Vec::with_capacity(entries.len() * 6);
    let mut raw: Vec<u8> = Vec::new();
    let mut codes: BTreeMap<usize, (Vec<u8>, usize, usize)> = BTreeMap::new();
    for (b, e) in &entries {
        meta_rows.extend([
            *b as i64,
            e.id.0 as i64,
            i64::from(e.label),
            e.task as i64,
            e.item.dataset_index as i64,
            e.item.step as i64,
        ]);
        match &e.item.payload {
            Payload::Raw(px) => raw.extend_from_slice(px),
            Payload::Codes(p) => {
                let slot = codes.entry(*b).or_insert((Vec::new(), 0, p.bytes().len()));
                slot.0.extend_from_slice(p.bytes());
                slot.1 += 1;
            }
        }
    }
    let dev = Device::Cpu;
    let n = entries.len();
    tensors.push((
        "memory.meta".into(),
        Tensor::from_vec(meta_rows, (n, 6), &dev)?,
    ));
    let image = memory.config().image_bytes;
    tensors.push((
        "memory.raw".into(),
        Tensor::from_vec(raw.clone(), (raw.len() / image, image), &dev)?,
    ));
    for (b, (bytes, rows, per)) in codes {
        tensors.push((
            format!("memory.codes{b}"),
            Tensor::from_vec(bytes, (rows, per), &dev)?,
        ));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), STATE_FORMAT.to_string());
    meta.insert("stack".into(), json(stack.config())?);
    meta.insert("seed".into(), json(&seed.0)?);
    meta.insert("layer_stats".into(), json(&stats)?);
    meta.insert("adam".into(), json(&adam)?);
    meta.insert("memory_config".into(), json(memory.config())?);
    meta.insert("block_bits".into(), json(&memory.block_bits().to_vec())?);
    meta.insert(
        "model_cost_params".into(),
        json(&memory.model_cost_params())?,
    );
    meta.insert("next_id".into(), json(&memory.next_id().0)?);
    meta.insert("rng".into(), json(&memory.rng_state().to_bytes().to_vec())?);
    meta.insert(
        "insertion".into(),
        json(&(memory.insertion(), memory.seen(), memory.admitted()))?,
    );
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    qcl_tensor::write_safetensors(path, &refs, &meta)
}

/// Reads a state written by [`save`]: the stack (on `device`) and the memory.
///
/// # Errors
/// [`Error::Io`] for a missing file; [`Error::BadFile`] for a truncated, foreign or
/// inconsistent file (bad metadata, missing tensors); [`Error::ShapeMismatch`] for tensors of
/// the wrong shape; [`Error::CorruptStream`] for code bytes that do not decode;
/// [`Error::InvalidParameter`] for memory contents that break the invariants (duplicate ids,
/// wrong costs, over budget).
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<(QStack, AdaptiveMemory)> {
    let path = path.as_ref();
    let file = SafetensorsFile::open(path)?;
    file.require_format(STATE_FORMAT, "an AQM state file")?;
    let config: StackConfig = parse(&file, "stack")?;
    let seed: u64 = parse(&file, "seed")?;
    let stats: Vec<LayerStats> = parse(&file, "layer_stats")?;
    let adam: Vec<BTreeMap<String, f64>> = parse(&file, "adam")?;
    let memory_config: MemoryConfig = parse(&file, "memory_config")?;
    let block_bits: Vec<u64> = parse(&file, "block_bits")?;
    let model_cost: u64 = parse(&file, "model_cost_params")?;
    let next_id: u64 = parse(&file, "next_id")?;
    let rng: Vec<u8> = parse(&file, "rng")?;
    let rng = RngState::from_bytes(&rng)?;
    let mut stack = QStack::new(config, Seed::new(seed), device)?;
    let layers = stack.layers().len();
    if stats.len() != layers || adam.len() != layers || block_bits.len() != layers + 1 {
        return Err(Error::bad_file(
            path,
            "module count differs between metadata entries",
        ));
    }
    let mut all = BTreeMap::new();
    for name in file.names() {
        all.insert(name.clone(), file.tensor(name, device)?);
    }
    for (i, (layer, (st, ad))) in stack
        .layers_mut()
        .iter_mut()
        .zip(stats.into_iter().zip(adam))
        .enumerate()
    {
        let prefix = format!("layer{i}.");
        let mine: BTreeMap<String, Tensor> = all
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|s| (s.to_string(), t.clone())))
            .collect();
        layer.restore(st, &mine, ad, path)?;
        let frozen_bits = if layer.is_frozen() {
            layer.bits_per_sample()
        } else {
            0
        };
        if block_bits[i + 1] != frozen_bits {
            return Err(Error::bad_file(
                path,
                format!("block {} cost disagrees with module {}", i + 1, i + 1),
            ));
        }
    }
    let tensor = |name: &str| -> Result<&Tensor> {
        all.get(name)
            .ok_or_else(|| Error::bad_file(path, format!("tensor `{name}` is missing")))
    };
    let meta = tensor("memory.meta")?;
    if meta.dtype() != DType::I64 || meta.rank() != 2 || meta.dims()[1] != 6 {
        return Err(Error::bad_file(path, "memory.meta must be i64 [n, 6]"));
    }
    let rows: Vec<Vec<i64>> = meta.to_vec2()?;
    let raw = tensor("memory.raw")?;
    if raw.dtype() != DType::U8 || raw.rank() != 2 {
        return Err(Error::bad_file(path, "memory.raw must be u8 [n, C·H·W]"));
    }
    let raw: Vec<Vec<u8>> = raw.to_vec2()?;
    let mut raw_iter = raw.into_iter();
    let mut code_rows: BTreeMap<usize, std::vec::IntoIter<Vec<u8>>> = BTreeMap::new();
    let mut entries = Vec::with_capacity(rows.len());
    for r in rows {
        if r.iter().any(|&v| v < 0) || r[2] > i64::from(u32::MAX) {
            return Err(Error::bad_file(
                path,
                "negative or out-of-range memory metadata",
            ));
        }
        let b = r[0] as usize;
        let payload = if b == 0 {
            Payload::Raw(
                raw_iter
                    .next()
                    .ok_or_else(|| Error::bad_file(path, "fewer raw images than entries"))?,
            )
        } else {
            if b > layers {
                return Err(Error::bad_file(
                    path,
                    format!("block {b} beyond {layers} modules"),
                ));
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = code_rows.entry(b) {
                let t = tensor(&format!("memory.codes{b}"))?;
                if t.dtype() != DType::U8 || t.rank() != 2 {
                    return Err(Error::bad_file(path, "code rows must be u8 [n, bytes]"));
                }
                slot.insert(t.to_vec2::<u8>()?.into_iter());
            }
            let bytes = code_rows
                .get_mut(&b)
                .and_then(Iterator::next)
                .ok_or_else(|| Error::bad_file(path, "fewer code rows than entries"))?;
            let layer = &stack.layers()[b - 1];
            if !layer.is_frozen() {
                return Err(Error::bad_file(
                    path,
                    format!("codes stored in unfrozen module {b}"),
                ));
            }
            let [n, h, w] = layer.index_shape();
            Payload::Codes(PackedIndices::from_bytes(
                bytes,
                &[1, n, h, w],
                layer.current_codes(),
            )?)
        };
        entries.push((
            b,
            Entry {
                id: ItemId(r[1] as u64),
                label: r[2] as u32,
                task: r[3] as usize,
                item: StoredSample {
                    payload,
                    dataset_index: r[4] as usize,
                    step: r[5] as u64,
                },
            },
        ));
    }
    if raw_iter.next().is_some() || code_rows.values_mut().any(|it| it.next().is_some()) {
        return Err(Error::bad_file(
            path,
            "more payload rows than memory entries",
        ));
    }
    let mut memory =
        AdaptiveMemory::restore(memory_config, block_bits, model_cost, next_id, rng, entries)?;
    // The insertion rule and its counters (absent from files written before the extensions:
    // the reference rule).
    if file.metadata().contains_key("insertion") {
        let (rule, seen, admitted): (InsertionRule, u64, u64) = parse(&file, "insertion")?;
        if admitted > seen {
            return Err(Error::bad_file(path, "more samples admitted than seen"));
        }
        memory.restore_insertion(rule, seen, admitted);
    }
    Ok((stack, memory))
}
