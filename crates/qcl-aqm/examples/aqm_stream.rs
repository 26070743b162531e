//! Runs one method of docs/methods/aqm.md § Fashion-MNIST experiment on a Fashion-MNIST file
//! and prints the result as JSON.
//!
//! `cargo run --release -p qcl-aqm --example aqm_stream -- DATA METHOD BUDGET [SAMPLES_PER_TASK] [PARAM_BYTES] [STAT_RATE]`

use qcl_aqm::online::{run, Method, OnlineConfig};
use qcl_continual::{Scenario, SplitConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qcl_tensor::tune_process_for_numeric_loops();
    let args: Vec<String> = std::env::args().collect();
    let data = qcl_data::SplitDataset::load(&args[1])?;
    let method = match args[2].as_str() {
        "fine-tune" => Method::FineTune,
        "er-raw" => Method::ErRaw,
        "raw-aqm" => Method::RawAqm,
        "iid" => Method::IidOnline,
        _ => Method::Aqm,
    };
    let budget: u64 = args[3].parse()?;
    let mut config = OnlineConfig::fashion_mnist(method, budget);
    config.samples_per_task = args.get(4).map(|s| s.parse()).transpose()?;
    if let Some(p) = args.get(5) {
        config.param_bytes = p.parse()?;
    }
    if let Some(r) = args.get(6) {
        let r: f64 = r.parse()?;
        config.stack.layers[0].stat_rate = r;
        config.stack.layers[0].ema_decoder_rate = r;
    }
    config.test_per_class = Some(300);
    let scenario = Scenario::class_incremental(&data, &SplitConfig::default())?;
    let result = run(&scenario, &config, None)?;
    let mut v = serde_json::to_value(&result)?;
    v["memory_curve"] = serde_json::json!(result.memory_curve.last());
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
