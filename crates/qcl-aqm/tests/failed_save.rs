//! A failed save leaves the previous state intact (own test binary: it blocks this process's
//! temporary file names).

use candle_core::Device;
use qcl_aqm::{state, AdaptiveMemory, MemoryConfig, QStack, StackConfig};

#[test]
fn a_failed_save_keeps_the_previous_file() {
    let stack = QStack::new(StackConfig::fashion_mnist(), 1.into(), &Device::Cpu).unwrap();
    let memory = AdaptiveMemory::new(
        MemoryConfig::per_class(50, 10, 784),
        1,
        stack.model_cost_params() as u64,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    state::save(&path, &stack, 1.into(), &memory).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Occupy every temporary name this process could use next with a directory, so creating
    // the temporary file fails.
    let pid = std::process::id();
    for i in 0..512 {
        std::fs::create_dir(dir.path().join(format!(".state.safetensors.{pid}-{i}.tmp"))).unwrap();
    }
    let other = QStack::new(StackConfig::fashion_mnist(), 2.into(), &Device::Cpu).unwrap();
    assert!(matches!(
        state::save(&path, &other, 2.into(), &memory),
        Err(qcl_tensor::Error::Io { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let (back, _) = state::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.config(), stack.config());
}
