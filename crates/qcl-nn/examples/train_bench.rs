//! `cargo run --release -p qcl-nn --example train_bench -- resnet20|vq-ae [steps]`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    qcl_tensor::tune_allocator_for_numeric_loops();
    let args: Vec<String> = std::env::args().collect();
    let model = qcl_nn::bench::BenchModel::from_name(args.get(1).map_or("resnet20", |s| s))?;
    let mut config = qcl_nn::bench::TrainBenchConfig::new(model);
    if let Some(steps) = args.get(2) {
        config.steps = steps.parse()?;
    }
    let report = qcl_nn::bench::bench_training(&config)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
