//! Whole-state save and restore.

use candle_core::{Device, Tensor};
use qcl_aqm::memory::IncomingSample;
use qcl_aqm::{state, AdaptiveMemory, MemoryConfig, QStack, StackConfig};
use qcl_tensor::Error;
use qcl_vq::PackedIndices;

fn images(b: usize, seed: u64) -> (Tensor, Vec<Vec<u8>>) {
    let px: Vec<Vec<u8>> = (0..b)
        .map(|i| {
            (0..784)
                .map(|p| ((p as u64 * 31 + i as u64 * 17 + seed * 101) % 256) as u8)
                .collect()
        })
        .collect();
    let v: Vec<f32> = px
        .iter()
        .flatten()
        .map(|&p| (f32::from(p) / 255.0 - 0.5) * 2.0)
        .collect();
    (
        Tensor::from_vec(v, (b, 1, 28, 28), &Device::Cpu).unwrap(),
        px,
    )
}

/// A stack with a frozen module and a memory holding raw images and codes.
fn trained() -> (QStack, AdaptiveMemory) {
    let mut stack = QStack::new(StackConfig::fashion_mnist(), 4.into(), &Device::Cpu).unwrap();
    let (x, _) = images(4, 0);
    stack.train_step(&x, 0).unwrap();
    stack.layers_mut()[0].freeze().unwrap();
    let config = MemoryConfig::per_class(1, 10, 784); // 7,840 B − model cost → tiny: use a bigger one
    let config = MemoryConfig {
        budget_bytes: config.budget_bytes + 40_000,
        ..config
    };
    let mut memory = AdaptiveMemory::new(config, 1, stack.model_cost_params() as u64).unwrap();
    memory
        .set_module_bits(1, stack.layers()[0].bits_per_sample())
        .unwrap();
    for s in 0..4u64 {
        let (x, px) = images(6, s + 1);
        let step = stack.train_step(&x, 0).unwrap();
        stack.update_ema_decoders().unwrap();
        let mut ok = stack.update_threshold_stats(&x, &step.finals).unwrap();
        ok[0][0] = false; // one raw image per step
        ok[0][1] = true;
        let k = stack.layers()[0].current_codes();
        let v: Vec<u32> = step.outputs[0]
            .indices
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let codes: Vec<PackedIndices> = v
            .chunks(196)
            .map(|c| PackedIndices::pack(c, &[1, 1, 14, 14], k).unwrap())
            .collect();
        let incoming: Vec<IncomingSample> = px
            .into_iter()
            .enumerate()
            .map(|(i, p)| IncomingSample {
                label: i as u32 % 3,
                task: s as usize / 2,
                dataset_index: i,
                pixels: p,
            })
            .collect();
        memory.insert(&incoming, &[], &ok, &[codes], s).unwrap();
    }
    assert!(memory.counts_per_block()[0] > 0 && memory.counts_per_block()[1] > 0);
    (stack, memory)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn a_restored_state_continues_exactly() {
    let (mut stack, mut memory) = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    state::save(&path, &stack, 4.into(), &memory).unwrap();
    let (mut back, mut mem_back) = state::load(&path, &Device::Cpu).unwrap();
    assert_eq!(mem_back.all_entries(), memory.all_entries());
    assert_eq!(mem_back.used_bits(), memory.used_bits());
    assert_eq!(mem_back.next_id(), memory.next_id());
    assert_eq!(back.layers()[0].stats(), stack.layers()[0].stats());
    assert_eq!(
        back.layers()[0].current_codes(),
        stack.layers()[0].current_codes()
    );
    // Decoding stored codes gives the same images.
    let idx = Tensor::from_vec(vec![1u32; 196], (1, 1, 14, 14), &Device::Cpu).unwrap();
    assert_eq!(
        values(&back.decode_codes(1, &idx).unwrap()),
        values(&stack.decode_codes(1, &idx).unwrap())
    );
    // One more training step (Adam moments restored) and replay draw agree.
    let (x, _) = images(5, 9);
    let a = stack.train_step(&x, 2).unwrap();
    let b = back.train_step(&x, 2).unwrap();
    assert_eq!(a.losses, b.losses);
    let (after_a, _) = stack.forward(&x, false).unwrap();
    let (after_b, _) = back.forward(&x, false).unwrap();
    assert_eq!(
        values(&after_a[0].reconstruction),
        values(&after_b[0].reconstruction)
    );
    assert_eq!(memory.sample(8, 5), mem_back.sample(8, 5));
}

#[test]
fn corrupted_states_are_typed_errors() {
    let (stack, memory) = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    state::save(&path, &stack, 4.into(), &memory).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.safetensors");
    // Truncated.
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        state::load(&bad, &Device::Cpu),
        Err(Error::BadFile { .. })
    ));
    // Garbage.
    std::fs::write(&bad, b"not a safetensors file at all").unwrap();
    assert!(state::load(&bad, &Device::Cpu).is_err());
    // A foreign safetensors file.
    let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    qcl_tensor::write_safetensors(&bad, &[("x", &t)], &Default::default()).unwrap();
    assert!(matches!(
        state::load(&bad, &Device::Cpu),
        Err(Error::BadFile { .. })
    ));
    // Code bytes with an index ≥ K' (all bits set) in the last row of the codes.
    let file = qcl_tensor::SafetensorsFile::open(&path).unwrap();
    let mut tensors = Vec::new();
    for n in file.names() {
        let mut t = file.tensor(n, &Device::Cpu).unwrap();
        if n == "memory.codes1" && stack.layers()[0].current_codes() < 16 {
            t = (t.ones_like().unwrap() * 255.0).unwrap();
        }
        if n == "memory.meta" {
            // Duplicate the first id into the second row.
            let mut rows: Vec<Vec<i64>> = t.to_vec2().unwrap();
            if rows.len() > 1 {
                rows[1][1] = rows[0][1];
                rows[1][0] = rows[0][0];
            }
            t = Tensor::new(rows, &Device::Cpu).unwrap();
        }
        tensors.push((n.clone(), t));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    qcl_tensor::write_safetensors(&bad, &refs, file.metadata()).unwrap();
    assert!(state::load(&bad, &Device::Cpu).is_err());
    // Metadata that is not JSON.
    let mut meta = file.metadata().clone();
    meta.insert("layer_stats".into(), "{".into());
    let refs: Vec<(&str, Tensor)> = file
        .names()
        .iter()
        .map(|n| (n.as_str(), file.tensor(n, &Device::Cpu).unwrap()))
        .collect();
    let refs2: Vec<(&str, &Tensor)> = refs.iter().map(|(n, t)| (*n, t)).collect();
    qcl_tensor::write_safetensors(&bad, &refs2, &meta).unwrap();
    assert!(matches!(
        state::load(&bad, &Device::Cpu),
        Err(Error::BadFile { .. })
    ));
}

#[test]
fn saved_states_are_the_same_bytes_on_1_and_2_threads() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = [1, 2]
        .into_iter()
        .map(|threads| {
            qcl_tensor::on_threads(threads, || {
                let (stack, memory) = trained();
                let path = dir.path().join(format!("aqm{threads}.safetensors"));
                state::save(&path, &stack, 4.into(), &memory).unwrap();
                std::fs::read(path).unwrap()
            })
            .unwrap()
        })
        .collect();
    assert!(
        files[0] == files[1],
        "1 and 2 threads saved different bytes"
    );
}
