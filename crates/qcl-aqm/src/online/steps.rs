//! The steps of one online run (docs/methods/aqm.md § The online loop), each a function so
//! that [`run`](super::run) reads as the loop itself: the replay memory a method uses, the
//! stream's batches, a replay batch, the memory's update, and what is recorded of it.

use candle_core::{Device, Tensor};
use qcl_continual::ball::cross_entropy;
use qcl_continual::{AccuracyMatrix, Scenario};
use qcl_continual::{Capacity, Filter, RawImage, ReplayBuffer, ReservoirBuffer};
use qcl_data::Dataset;
use qcl_nn::optim::{Optimizer, Sgd};
use qcl_tensor::{Error, Result, Seed};
use qcl_vq::PackedIndices;

use super::classifier::Net;
use super::{
    decode_adaptive, to_tensor, to_u8, MemoryPoint, Method, OnlineConfig, ReencodeConfig, Replay,
    ReplayBatch,
};
use crate::memory::{
    AdaptiveMemory, IncomingSample, InsertionRule, MemoryConfig, Reencoded, ReplayItem,
};
use crate::stack::{per_sample_mse, QStack, StackStep};

/// Stored samples, model cost, (original, reconstruction) examples, trimmed codes and
/// average distances per module: the memory's part of a [`RunResult`].
pub(super) type MemorySummary = (
    usize,
    u64,
    Vec<(Vec<u8>, Vec<u8>)>,
    Vec<Option<usize>>,
    Vec<f64>,
);

/// The replay memory `config.method` uses, empty.
pub(super) fn new_replay(
    config: &OnlineConfig,
    seed: Seed,
    image_bytes: usize,
    device: &Device,
) -> Result<Replay> {
    let memory_config = MemoryConfig {
        budget_bytes: config.budget_bytes,
        param_bytes: config.param_bytes,
        image_bytes,
        seed: seed.child_named("memory"),
    };
    let rule = if config.reservoir_insertion {
        InsertionRule::Reservoir
    } else {
        InsertionRule::Every
    };
    Ok(match config.method {
        Method::FineTune | Method::IidOnline => Replay::None,
        Method::ErRaw => {
            let slots = (config.budget_bytes / image_bytes as u64) as usize;
            if slots == 0 {
                return Err(Error::invalid_parameter(
                    "budget_bytes",
                    "smaller than one image",
                ));
            }
            Replay::Reservoir(
                Box::new(ReservoirBuffer::new(
                    Capacity::items(slots),
                    seed.child_named("reservoir"),
                )?),
                Box::new(seed.child_named("replay").rng()),
            )
        }
        Method::RawAqm => {
            let mut memory = AdaptiveMemory::new(memory_config, 0, 0)?;
            memory.set_insertion(rule);
            Replay::Adaptive(Box::new(memory), None)
        }
        Method::Aqm => {
            let stack = QStack::new(config.stack.clone(), seed.child_named("stack"), device)?;
            let mut memory = AdaptiveMemory::new(
                memory_config,
                stack.layers().len(),
                stack.model_cost_params() as u64,
            )?;
            memory.set_insertion(rule);
            Replay::Adaptive(Box::new(memory), Some(stack))
        }
    })
}

/// The stream's batches of `(task, index)`: per task in a seeded order, or one shuffled union
/// of every task for iid-online.
pub(super) fn stream_batches(
    config: &OnlineConfig,
    sets: &[Dataset],
    seed: Seed,
) -> Vec<Vec<(usize, usize)>> {
    let mut schedule: Vec<(usize, Vec<usize>)> = Vec::new(); // (task, indices) per batch
    let mut order_rng = seed.child_named("order").rng();
    if config.method == Method::IidOnline {
        let mut all: Vec<(usize, usize)> = sets
            .iter()
            .enumerate()
            .flat_map(|(t, d)| (0..d.len()).map(move |i| (t, i)))
            .collect();
        order_rng.shuffle(&mut all);
        for chunk in all.chunks_exact(config.batch_size) {
            // A batch may mix tasks; each row keeps its own task for lookup.
            for &(t, i) in chunk {
                schedule.push((t, vec![i]));
            }
        }
    } else {
        for (t, d) in sets.iter().enumerate() {
            let order = order_rng.permutation(d.len());
            for chunk in order.chunks_exact(config.batch_size) {
                schedule.push((t, chunk.to_vec()));
            }
        }
    }
    if config.method == Method::IidOnline {
        schedule
            .chunks(config.batch_size)
            .map(|c| c.iter().map(|(t, i)| (*t, i[0])).collect())
            .collect()
    } else {
        schedule
            .iter()
            .map(|(t, idx)| idx.iter().map(|&i| (*t, i)).collect())
            .collect()
    }
}

/// A replay batch of earlier tasks' samples (decoded where they are codes), if any.
pub(super) fn replay_batch(
    replay: &mut Replay,
    config: &OnlineConfig,
    task: usize,
    shape: [usize; 3],
    device: &Device,
) -> Result<Option<ReplayBatch>> {
    Ok(match replay {
        Replay::None => None,
        Replay::Reservoir(buf, rng) if task > 0 => {
            let items: Vec<(u32, Vec<u8>)> = buf
                .sample(config.replay_size, &Filter::tasks_before(task), rng)
                .into_iter()
                .map(|e| (e.label, e.item.0.clone()))
                .collect();
            if items.is_empty() {
                None
            } else {
                let imgs: Vec<&[u8]> = items.iter().map(|(_, p)| p.as_slice()).collect();
                let ys: Vec<u32> = items.iter().map(|(y, _)| *y).collect();
                Some(ReplayBatch {
                    x: to_tensor(&imgs, shape, device)?,
                    y: Tensor::from_vec(ys.clone(), ys.len(), device)?,
                    ids: Vec::new(),
                    decoded: 0,
                })
            }
        }
        Replay::Adaptive(memory, stack) if task > 0 => {
            let items = memory.sample(config.replay_size, task);
            if items.is_empty() {
                None
            } else {
                let xs = decode_adaptive(&items, stack.as_ref(), shape, device)?;
                let ys: Vec<u32> = items.iter().map(|i| i.label).collect();
                Some(ReplayBatch {
                    x: Tensor::cat(&xs, 0)?,
                    y: Tensor::from_vec(ys.clone(), ys.len(), device)?,
                    ids: items.iter().map(|i| i.id).collect(),
                    decoded: items.iter().filter(|i| i.block > 0).count(),
                })
            }
        }
        _ => None,
    })
}

/// Offers the incoming samples to the replay memory; for AQM first records newly frozen
/// modules (their code size, the step in `freeze_steps`), the model's cost and the
/// decoders' and thresholds' updates, re-encodes the replayed codes when asked and the memory
/// is full enough, then inserts each sample at its deepest usable module. Returns what
/// re-encoding did.
pub(super) fn update_memory(
    replay: &mut Replay,
    incoming: Vec<IncomingSample>,
    (stack_step, x_all): (Option<StackStep>, &Tensor),
    (replay_batch, reencode): (Option<&ReplayBatch>, Option<ReencodeConfig>),
    step: u64,
    freeze_steps: &mut [Option<u64>],
) -> Result<Reencoded> {
    let mut reencoded = Reencoded::default();
    match replay {
        Replay::None => {}
        Replay::Reservoir(buf, _) => {
            for s in incoming {
                buf.insert(s.label, s.task, RawImage::new(s.pixels))?;
            }
        }
        Replay::Adaptive(memory, None) => {
            memory.insert(&incoming, &[], &[], &[], step)?;
        }
        Replay::Adaptive(memory, Some(stack)) => {
            let out = stack_step.ok_or_else(|| {
                Error::invalid_parameter("stack step", "AQM's memory update needs the step")
            })?;
            for (m, layer) in stack.layers().iter().enumerate() {
                if layer.is_frozen() && memory.block_bits()[m + 1] == 0 {
                    memory.set_module_bits(m + 1, layer.bits_per_sample())?;
                    freeze_steps[m] = Some(step);
                }
            }
            memory.set_model_cost(stack.model_cost_params() as u64)?;
            stack.update_ema_decoders()?;
            let ok = stack.update_threshold_stats(x_all, &out.finals)?;
            let codes = frozen_codes(stack, &out)?;
            let ids = replay_batch.map_or(&[][..], |r| r.ids.as_slice());
            if let Some(re) = reencode {
                if !ids.is_empty() && memory.fullness() >= re.min_fullness {
                    let (ok_eps, codes_re) =
                        replay_decisions(x_all, &out, &codes, ids.len(), re.eps_th)?;
                    reencoded = memory.reencode(ids, &ok_eps, &codes_re, step)?;
                }
            }
            memory.insert(&incoming, ids, &ok, &codes, step)?;
        }
    }
    Ok(reencoded)
}

/// Per module, each row's indices packed for storage (empty for an unfrozen module).
fn frozen_codes(stack: &QStack, out: &StackStep) -> Result<Vec<Vec<PackedIndices>>> {
    let mut codes = Vec::with_capacity(out.outputs.len());
    for (m, o) in out.outputs.iter().enumerate() {
        let layer = &stack.layers()[m];
        if !layer.is_frozen() {
            codes.push(Vec::new());
            continue;
        }
        codes.push(layer.pack_codes(&o.indices)?);
    }
    Ok(codes)
}

/// Per module, a decision per row, and each row's codes.
type Decisions = (Vec<Vec<bool>>, Vec<Vec<PackedIndices>>);

/// The last `replayed` rows' decisions under `eps_th` (final reconstruction MSE against the
/// replayed, decoded image) and their codes, per module: the inputs of
/// [`AdaptiveMemory::reencode`].
pub(super) fn replay_decisions(
    x_all: &Tensor,
    out: &StackStep,
    codes: &[Vec<PackedIndices>],
    replayed: usize,
    eps_th: f64,
) -> Result<Decisions> {
    let rows = x_all.dims()[0];
    let first = rows - replayed;
    let x_re = x_all.narrow(0, first, replayed)?;
    let mut ok = Vec::with_capacity(out.finals.len());
    for xf in &out.finals {
        let mse = per_sample_mse(&xf.narrow(0, first, replayed)?, &x_re)?;
        ok.push(mse.iter().map(|&m| m < eps_th).collect());
    }
    let codes = codes
        .iter()
        .map(|c| c.get(first..).map_or_else(Vec::new, <[_]>::to_vec))
        .collect();
    Ok((ok, codes))
}

/// How full the replay memory is after `step`.
pub(super) fn memory_point(replay: &Replay, config: &OnlineConfig, step: u64) -> MemoryPoint {
    match replay {
        Replay::None => MemoryPoint {
            step: step + 1,
            per_block: vec![],
            used_bytes: 0.0,
            capacity_bytes: 0.0,
        },
        Replay::Reservoir(buf, _) => MemoryPoint {
            step: step + 1,
            per_block: vec![buf.len()],
            used_bytes: buf.bytes_used() as f64,
            capacity_bytes: config.budget_bytes as f64,
        },
        Replay::Adaptive(memory, _) => MemoryPoint {
            step: step + 1,
            per_block: memory.counts_per_block(),
            used_bytes: memory.used_bits() as f64 / 8.0,
            capacity_bytes: memory.capacity_bits() as f64 / 8.0,
        },
    }
}

/// What the memory holds at the end: stored samples, the model cost it was charged, up to
/// `config.examples` (original, reconstruction) pairs spread over tasks, and per module the
/// trimmed codebook size and average distance statistic.
pub(super) fn memory_summary(
    replay: &Replay,
    config: &OnlineConfig,
    sets: &[Dataset],
    shape: [usize; 3],
    device: &Device,
) -> Result<MemorySummary> {
    Ok(match replay {
        Replay::None => (0, 0, Vec::new(), vec![], vec![]),
        Replay::Reservoir(buf, _) => (buf.len(), 0, Vec::new(), vec![], vec![]),
        Replay::Adaptive(memory, stack) => {
            let mut examples = Vec::new();
            if let Some(stack) = stack {
                'outer: for block in 1..memory.num_blocks() {
                    let mut entries: Vec<_> = memory.block(block).iter().collect();
                    entries.sort_by_key(|e| (e.task, e.id));
                    // Spread the examples over tasks: take every k-th.
                    let stride = (entries.len() / config.examples.max(1)).max(1);
                    for e in entries.into_iter().step_by(stride) {
                        if examples.len() >= config.examples {
                            break 'outer;
                        }
                        let item = ReplayItem {
                            id: e.id,
                            block,
                            label: e.label,
                            task: e.task,
                            sample: e.item.clone(),
                        };
                        let x = &decode_adaptive(&[item], Some(stack), shape, device)?[0];
                        examples
                            .push((sets[e.task].image(e.item.dataset_index).to_vec(), to_u8(x)?));
                    }
                }
            }
            let (k, l2) = match stack {
                Some(s) => (
                    s.layers().iter().map(|l| l.stats().trimmed_codes).collect(),
                    s.layers().iter().map(|l| l.stats().avg_l2).collect(),
                ),
                None => (vec![], vec![]),
            };
            (memory.len(), memory.model_cost_params(), examples, k, l2)
        }
    })
}

/// Checks the configuration (alone and against the scenario); returns the images' `[C, H, W]`
/// and bytes.
pub(super) fn image_geometry(
    scenario: &Scenario,
    config: &OnlineConfig,
) -> Result<([usize; 3], usize)> {
    if config.batch_size == 0 {
        return Err(Error::invalid_parameter("batch_size", "must be positive"));
    }
    if !(0.0..1.0).contains(&config.holdout_fraction) {
        return Err(Error::invalid_parameter(
            "holdout_fraction",
            "must be in [0, 1)",
        ));
    }
    config.classifier.validate()?;
    if let Some(reencode) = &config.reencode {
        reencode.validate()?;
    }
    let first = scenario
        .tasks()
        .first()
        .ok_or_else(|| Error::EmptyInput("a scenario without tasks".into()))?;
    let s = first.train.shape();
    let shape = [s.channels, s.height, s.width];
    if config.method == Method::Aqm && config.stack.image != shape {
        return Err(Error::ShapeMismatch {
            context: "stack image shape".into(),
            expected: format!("{shape:?}"),
            actual: config.stack.image.to_vec(),
        });
    }
    Ok((shape, s.len()))
}

/// Each task's test set, or its first `test_per_class` images of each class.
pub(super) fn test_sets(scenario: &Scenario, config: &OnlineConfig) -> Vec<Dataset> {
    scenario
        .tasks()
        .iter()
        .map(|t| match config.test_per_class {
            Some(k) => t.test.take_per_class(k),
            None => t.test.clone(),
        })
        .collect()
}

/// One SGD step of the classifier: cross-entropy on the incoming batch (decoded through the
/// deepest module once all are frozen, when the classifier reads decoded images) plus
/// cross-entropy on the replay batch.
pub(super) fn classifier_step(
    (net, sgd): (&Net, &mut Sgd),
    (x_inc, y_inc): (&Tensor, &Tensor),
    (replay, stack_step, replay_batch): (&Replay, Option<&StackStep>, Option<&ReplayBatch>),
    decoded_input: bool,
) -> Result<()> {
    let x_cls = match (replay, stack_step) {
        (Replay::Adaptive(_, Some(stack)), Some(out)) if decoded_input && stack.all_frozen() => {
            let deepest = stack.layers().len();
            let codes = out.outputs[deepest - 1]
                .indices
                .narrow(0, 0, x_inc.dims()[0])?;
            stack.decode_codes(deepest, &codes)?
        }
        _ => x_inc.clone(),
    };
    // Two forward passes in training mode, as the reference code's two backward calls (each
    // batch with its own BatchNorm statistics).
    let mut loss = cross_entropy(&net.logits(&x_cls, true)?, y_inc)?;
    if let Some(r) = replay_batch {
        loss = (loss + cross_entropy(&net.logits(&r.x, true)?, &r.y)?)?;
    }
    sgd.backward_step(&loss)
}

/// The incoming batch as samples the memory can store.
pub(super) fn incoming_samples(
    batch: &[(usize, usize)],
    labels: &[u32],
    sets: &[Dataset],
) -> Vec<IncomingSample> {
    batch
        .iter()
        .zip(labels)
        .map(|(&(t, i), &y)| IncomingSample {
            label: y,
            task: t,
            dataset_index: i,
            pixels: sets[t].image(i).to_vec(),
        })
        .collect()
}

/// The mean accuracy over tasks after the last one, and the forgetting (none for iid-online
/// or a single task).
pub(super) fn final_accuracy_and_forgetting(
    matrix: &AccuracyMatrix,
    method: Method,
) -> Result<(f64, Option<f64>)> {
    let num_tasks = matrix.rows().len();
    let last = &matrix.rows()[num_tasks - 1];
    let final_accuracy = last.iter().map(|a| a.unwrap_or(0.0)).sum::<f64>() / num_tasks as f64;
    let forgetting = if method == Method::IidOnline || num_tasks < 2 {
        None
    } else {
        Some(matrix.forgetting()?)
    };
    Ok((final_accuracy, forgetting))
}
