//! Decoding stored samples (docs/methods/aqm.md § Replay) and the drift of stored codes
//! (§ The online loop; the reference code's `eval.py`).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use qcl_data::Dataset;
use qcl_tensor::{Error, Result};

use super::{to_tensor, DriftPoint};
use crate::memory::{AdaptiveMemory, Payload, ReplayItem};
use crate::stack::QStack;

/// Images of replayed `items` in their order: raw ones as stored, codes decoded by their
/// module's codebook and slow decoder and those of every shallower module.
pub(super) fn decode_adaptive(
    items: &[ReplayItem],
    stack: Option<&QStack>,
    shape: [usize; 3],
    device: &Device,
) -> Result<Vec<Tensor>> {
    // Decode group by group (raw, then each module), keeping the items' order.
    let mut out: Vec<Option<Tensor>> = vec![None; items.len()];
    let mut by_block: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        by_block.entry(it.block).or_default().push(i);
    }
    for (block, rows) in by_block {
        let x = if block == 0 {
            let imgs: Vec<&[u8]> = rows
                .iter()
                .map(|&i| match &items[i].sample.payload {
                    Payload::Raw(px) => Ok(px.as_slice()),
                    Payload::Codes(_) => {
                        Err(Error::invalid_parameter("memory", "codes in block 0"))
                    }
                })
                .collect::<Result<_>>()?;
            to_tensor(&imgs, shape, device)?
        } else {
            let stack =
                stack.ok_or_else(|| Error::invalid_parameter("memory", "codes without a stack"))?;
            let mut all = Vec::new();
            let mut ishape = Vec::new();
            for &i in &rows {
                match &items[i].sample.payload {
                    Payload::Codes(p) => {
                        all.extend(p.unpack());
                        ishape = p.shape().to_vec();
                    }
                    Payload::Raw(_) => {
                        return Err(Error::invalid_parameter(
                            "memory",
                            "raw image in a code block",
                        ))
                    }
                }
            }
            ishape[0] = rows.len();
            let idx = Tensor::from_vec(all, ishape.as_slice(), device)?;
            stack.decode_codes(block, &idx)?
        };
        for (k, &i) in rows.iter().enumerate() {
            out[i] = Some(x.narrow(0, k, 1)?);
        }
    }
    out.into_iter()
        .map(|t| t.ok_or_else(|| Error::EmptyInput("replay".into())))
        .collect()
}

/// Mean MSE of every stored code, decoded with the current slow decoders, against its
/// original image (drift, docs/methods/aqm.md § The online loop); `sets[t]` is the streamed
/// training set of task t.
///
/// # Errors
/// Decoding errors; [`Error::InvalidParameter`] for a dataset index out of range.
pub fn measure_drift(
    memory: &AdaptiveMemory,
    stack: &QStack,
    sets: &[Dataset],
    step: u64,
) -> Result<DriftPoint> {
    let device = stack.device().clone();
    let shape = stack.config().image;
    let mut per_module = Vec::new();
    let (mut sum_all, mut n_all, mut sum0, mut n0) = (0.0, 0usize, 0.0, 0usize);
    for block in 1..memory.num_blocks() {
        let entries = memory.block(block);
        let (mut s, mut n) = (0.0, 0usize);
        for chunk in entries.chunks(256) {
            let items: Vec<ReplayItem> = chunk
                .iter()
                .map(|e| ReplayItem {
                    id: e.id,
                    block,
                    label: e.label,
                    task: e.task,
                    sample: e.item.clone(),
                })
                .collect();
            let decoded = Tensor::cat(&decode_adaptive(&items, Some(stack), shape, &device)?, 0)?;
            let originals: Vec<&[u8]> = chunk
                .iter()
                .map(|e| {
                    let set = sets
                        .get(e.task)
                        .ok_or_else(|| Error::invalid_parameter("task", "out of range"))?;
                    if e.item.dataset_index >= set.len() {
                        return Err(Error::invalid_parameter("dataset_index", "out of range"));
                    }
                    Ok(set.image(e.item.dataset_index))
                })
                .collect::<Result<_>>()?;
            let x = to_tensor(&originals, shape, &device)?;
            let mse = crate::stack::per_sample_mse(&decoded, &x)?;
            for (e, m) in chunk.iter().zip(mse) {
                s += m;
                n += 1;
                if e.task == 0 {
                    sum0 += m;
                    n0 += 1;
                }
            }
        }
        sum_all += s;
        n_all += n;
        per_module.push((n > 0).then(|| s / n as f64));
    }
    Ok(DriftPoint {
        step,
        per_module,
        all: (n_all > 0).then(|| sum_all / n_all as f64),
        task0: (n0 > 0).then(|| sum0 / n0 as f64),
        samples: n_all,
    })
}
