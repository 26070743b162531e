//! Re-encoding as the online loop wires it (docs/methods/aqm.md § Extensions): one memory
//! update of an AQM step ([`update_memory`]) whose replay batch is a stored code, checked
//! against an independent encoding of the decoded replayed image by the current encoder (which
//! rows the codes are read from, which reconstruction `eps_th` is checked against, the fill
//! level from which re-encoding acts), and the decisions ([`replay_decisions`]) on a batch
//! built by hand (which rows they are read from).

use candle_core::{Device, Tensor};
use qcl_continual::ItemId;
use qcl_tensor::Seed;
use qcl_vq::PackedIndices;

use super::steps::{replay_decisions, update_memory};
use super::{ReencodeConfig, Replay, ReplayBatch};
use crate::config::{QLayerConfig, StackConfig};
use crate::memory::{AdaptiveMemory, IncomingSample, MemoryConfig, Payload, Reencoded};
use crate::stack::{per_sample_mse, QStack, StackStep};

const PIXELS: usize = 784;
/// Incoming rows of the step: the replayed row is the fourth.
const INCOMING: usize = 3;
/// Grey level of the stored (and replayed) image.
const LIGHT: f32 = 0.6;
/// Grey level of the incoming images.
const DARK: f32 = -0.6;

/// Seeded noisy images around the grey level `level`: light ones are stored and replayed, dark
/// ones arrive, so that the incoming rows' codes differ from the replayed row's and codes read
/// from the wrong row show.
fn images(n: usize, seed: u64, level: f32) -> Tensor {
    let noise = Seed::new(seed)
        .rng()
        .uniform_tensor((n, 1, 28, 28), -0.3, 0.3, &Device::Cpu)
        .unwrap();
    (noise + f64::from(level)).unwrap()
}

/// Row `row` of module `m`'s (0-based) `indices`, packed as the memory stores it.
fn pack(stack: &QStack, m: usize, indices: &Tensor, row: usize) -> PackedIndices {
    stack.layers()[m]
        .pack_codes(indices)
        .unwrap()
        .swap_remove(row)
}

/// A stack, a memory charged its cost, and the id and codes of the one sample stored as
/// module-1 codes (class 5, task 0) beside raw images of class 0.
struct Setup {
    stack: QStack,
    memory: AdaptiveMemory,
    id: ItemId,
    old: PackedIndices,
}

/// `modules` frozen modules (the second as in tests/layer.rs), `room` bytes for samples, and
/// `raw` raw images besides the code; the encoder then trains on, so that fresh codes differ.
fn setup(modules: usize, room: u64, raw: usize) -> Setup {
    let mut config = StackConfig::fashion_mnist();
    if modules == 2 {
        config.layers.push(QLayerConfig {
            channels: 16,
            latent_shape: [7, 7],
            ..QLayerConfig::fashion_mnist()
        });
    }
    let mut stack = QStack::new(config, Seed::new(4), &Device::Cpu).unwrap();
    let train = Tensor::cat(&[&images(4, 1, LIGHT), &images(4, 2, DARK)], 0).unwrap();
    for _ in 0..20 {
        stack.train_step(&train, 0).unwrap();
    }
    for layer in stack.layers_mut() {
        layer.freeze().unwrap();
    }
    let cost = stack.model_cost_params() as u64;
    let config = MemoryConfig {
        budget_bytes: cost + room,
        seed: Seed::new(2),
        ..MemoryConfig::per_class(1, 1, PIXELS)
    };
    let mut memory = AdaptiveMemory::new(config, modules, cost).unwrap();
    for m in 0..modules {
        let bits = stack.layers()[m].bits_per_sample();
        memory.set_module_bits(m + 1, bits).unwrap();
    }
    let (outs, _) = stack.forward(&images(1, 7, LIGHT), false).unwrap();
    let codes: Vec<Vec<PackedIndices>> = (0..modules)
        .map(|m| vec![pack(&stack, m, &outs[m].indices, 0)])
        .collect();
    let sample = |label: u32, i: usize| IncomingSample {
        label,
        task: 0,
        dataset_index: i,
        pixels: vec![9; PIXELS],
    };
    let mut ok = vec![vec![false]; modules];
    for i in 1..=raw {
        memory.insert(&[sample(0, i)], &[], &ok, &codes, 0).unwrap();
    }
    ok[0][0] = true;
    let id = memory.next_id();
    memory.insert(&[sample(5, 0)], &[], &ok, &codes, 0).unwrap();
    assert_eq!(memory.locate(id).unwrap().0, 1, "stored as module-1 codes");
    for _ in 0..8 {
        stack.train_step(&train, 0).unwrap();
    }
    Setup {
        stack,
        memory,
        id,
        old: codes[0][0].clone(),
    }
}

/// The replay batch of the stored code, decoded as the loop decodes replay.
fn replay_batch(s: &Setup) -> ReplayBatch {
    let [n, h, w] = s.stack.layers()[0].index_shape();
    let idx = Tensor::from_vec(s.old.unpack(), (1, n, h, w), &Device::Cpu).unwrap();
    ReplayBatch {
        x: s.stack.decode_codes(1, &idx).unwrap(),
        y: Tensor::from_vec(vec![5u32], 1, &Device::Cpu).unwrap(),
        ids: vec![s.id],
        decoded: 1,
    }
}

/// Independently of the loop: per module, the current encoder's codes of the decoded replayed
/// image `x_re` alone, and the MSE of its final reconstruction (through the live decoders of
/// the module and every shallower one) against `x_re`.
fn independent(stack: &mut QStack, x_re: &Tensor) -> (Vec<PackedIndices>, Vec<f64>) {
    let (outs, finals) = stack.forward(x_re, false).unwrap();
    let fresh = (0..outs.len())
        .map(|m| pack(stack, m, &outs[m].indices, 0))
        .collect();
    let mse = finals
        .iter()
        .map(|f| per_sample_mse(f, x_re).unwrap()[0])
        .collect();
    (fresh, mse)
}

/// One AQM step as the loop runs it: the stack's training step on `INCOMING` new images
/// followed by the replayed one, then the memory update with `reencode`.
fn step(s: Setup, batch: &ReplayBatch, reencode: ReencodeConfig) -> (Reencoded, AdaptiveMemory) {
    let Setup {
        mut stack, memory, ..
    } = s;
    let x_all = Tensor::cat(&[&images(INCOMING, 11, DARK), &batch.x], 0).unwrap();
    let stack_step = stack.train_step(&x_all, 1).unwrap();
    let incoming = (0..INCOMING)
        .map(|i| IncomingSample {
            label: 0,
            task: 1,
            dataset_index: i,
            pixels: vec![3; PIXELS],
        })
        .collect();
    let mut freeze_steps = vec![None; stack.layers().len()];
    let mut replay = Replay::Adaptive(Box::new(memory), Some(stack));
    let done = update_memory(
        &mut replay,
        incoming,
        (Some(stack_step), &x_all),
        (Some(batch), Some(reencode)),
        1,
        &mut freeze_steps,
    )
    .unwrap();
    match replay {
        Replay::Adaptive(memory, _) => (done, *memory),
        _ => unreachable!("built as an adaptive memory"),
    }
}

/// The replayed row is the last of the batch: its stored codes after the step are the current
/// encoder's codes of its decoded image, in the module `eps_th` selects by the MSE of that
/// module's final reconstruction (just above it: moves to module 2; just below: stays and is
/// refreshed in module 1).
#[test]
fn a_replayed_code_takes_the_current_encoders_codes_of_its_decoded_image() {
    let mut first = setup(2, 100_000, 0);
    let batch = replay_batch(&first);
    let (fresh, mse) = independent(&mut first.stack, &batch.x);
    assert_ne!(
        fresh[0], first.old,
        "the encoder moved: a refresh can be told apart"
    );
    let id = first.id;
    let passes = ReencodeConfig {
        eps_th: mse[1] * 1.01,
        min_fullness: 0.0,
    };
    let (done, memory) = step(first, &batch, passes);
    assert_eq!(
        done,
        Reencoded {
            moved: 1,
            refreshed: 0
        }
    );
    let (b, e) = memory.locate(id).unwrap();
    assert_eq!((b, e.label, e.item.step), (2, 5, 1));
    assert_eq!(e.item.payload, Payload::Codes(fresh[1].clone()));

    let mut second = setup(2, 100_000, 0);
    assert_eq!(
        independent(&mut second.stack, &batch.x).0,
        fresh,
        "same setup"
    );
    let fails = ReencodeConfig {
        eps_th: mse[1] * 0.99,
        min_fullness: 0.0,
    };
    let (done, memory) = step(second, &batch, fails);
    assert_eq!(
        done,
        Reencoded {
            moved: 0,
            refreshed: 1
        }
    );
    let (b, e) = memory.locate(id).unwrap();
    assert_eq!((b, e.item.step), (1, 0));
    assert_eq!(e.item.payload, Payload::Codes(fresh[0].clone()));
}

/// The paper's rule re-encodes from 95 % full on: not at about 90 %, not one byte of room
/// short of 95 %, and at 95 %.
#[test]
fn reencoding_starts_when_the_memory_is_95_percent_full() {
    const RAW: usize = 10;
    let mut probe = setup(1, 100_000, RAW);
    let used = probe.memory.used_bits() as f64;
    let batch = replay_batch(&probe);
    let (fresh, _) = independent(&mut probe.stack, &batch.x);
    let at_95 = (used / (8.0 * 0.95)).floor() as u64;
    let rooms = [
        ((used / (8.0 * 0.90)).ceil() as u64, false),
        (at_95 + 1, false),
        (at_95, true),
    ];
    for (room, reencodes) in rooms {
        let s = setup(1, room, RAW);
        let fullness = s.memory.fullness();
        assert_eq!(fullness >= 0.95, reencodes, "{fullness}");
        assert!(fullness > 0.89, "{fullness}");
        let (id, old) = (s.id, s.old.clone());
        let (done, memory) = step(s, &batch, ReencodeConfig::paper(1e9));
        let payload = &memory.locate(id).unwrap().1.item.payload;
        if reencodes {
            assert_eq!(done.refreshed, 1, "{fullness}");
            assert_eq!(payload, &Payload::Codes(fresh[0].clone()));
            assert_ne!(fresh[0], old);
        } else {
            assert_eq!(done, Reencoded::default(), "{fullness}");
            assert_eq!(payload, &Payload::Codes(old));
        }
    }
}

/// The decisions and codes re-encoding acts on are the replayed rows' (the last of the batch):
/// each row's final reconstruction against that row's image under `eps_th`, and that row's
/// codes; an unfrozen module has none. Here the incoming rows would decide the other way.
#[test]
fn reencoding_decisions_are_read_from_the_replayed_rows() {
    let device = Device::Cpu;
    // Five rows, the last two replayed; row r is the constant image r / 10.
    let rows: Vec<f32> = (0..5).flat_map(|r| [r as f32 / 10.0; 4]).collect();
    let x_all = Tensor::from_vec(rows, (5, 1, 2, 2), &device).unwrap();
    // Module m's final reconstruction of row r is off by offsets[m][r] (MSE offset²); the
    // third module's is exact, and it is not frozen (no codes).
    let offsets = [[0.0f32, 0.0, 0.0, 0.5, 0.1], [0.5, 0.5, 0.5, 0.0, 0.3]];
    let finals = offsets
        .iter()
        .map(|o| {
            let shift = Tensor::from_vec(o.to_vec(), (5, 1, 1, 1), &device).unwrap();
            x_all.broadcast_add(&shift).unwrap()
        })
        .chain([x_all.clone()])
        .collect();
    let step = StackStep {
        outputs: Vec::new(),
        finals,
        losses: Vec::new(),
    };
    let code = |m: u32, r: u32| PackedIndices::pack(&[m, r], &[1, 2], 16).unwrap();
    let codes: Vec<Vec<PackedIndices>> = (0..2)
        .map(|m| (0..5).map(|r| code(m, r)).collect())
        .chain([Vec::new()])
        .collect();
    let (ok, picked) = replay_decisions(&x_all, &step, &codes, 2, 0.05).unwrap();
    assert_eq!(ok, [vec![false, true], vec![true, false], vec![true, true]]);
    assert_eq!(
        picked,
        [
            vec![code(0, 3), code(0, 4)],
            vec![code(1, 3), code(1, 4)],
            Vec::new()
        ]
    );
}
