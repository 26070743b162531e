//! `qcl`: the command-line face of the qcl crates.
//!
//! Convention: every command takes `--json` and then prints exactly one JSON object on stdout,
//! on success and on failure alike (`{"error": {"kind": ..., "message": ...}}`). Exit status:
//! 0 success, 1 error (typed: bad input, missing file, ...), 2 usage error (unknown flag, a
//! value out of its range), 70 a bug (kind `internal`), 141 standard output closed by its
//! reader.

mod aqm;
mod bench;
mod ecvq;
mod flags;
mod index;
mod pq;
mod text;
mod wpq;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use qcl_tensor::{Error, Result, SafetensorsFile};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "qcl",
    version,
    about = "Learned quantization and continual learning on candle"
)]
struct Cli {
    /// Print exactly one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Data set files.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// k-means on a tensor of a safetensors file (every point used, exactly ITERS Lloyd
    /// iterations); `seconds` covers only the Lloyd iterations.
    Kmeans(KmeansArgs),
    /// Product quantization: train a quantizer, encode vectors to compact codes, decode them,
    /// search them by asymmetric distance.
    Pq {
        #[command(subcommand)]
        command: pq::PqCommand,
    },
    /// Approximate nearest-neighbour search: build an index of product-quantization codes
    /// (flat or IVF, optionally with a learned rotation and exact re-ranking), add and remove
    /// vectors, search it, describe it.
    Index {
        #[command(subcommand)]
        command: index::IndexCommand,
    },
    /// Entropy-constrained vector quantization of a toy source (VECVQ or Chou-Lookabaugh-Gray):
    /// rate, entropy, real coded size, distortion and the gap to the Shannon bound.
    Ecvq(ecvq::EcvqArgs),
    /// Benchmarks: training throughput of the reference models.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Online learned continual compression (AQM) and its baselines: one stream.
    Aqm {
        #[command(subcommand)]
        command: aqm::AqmCommand,
    },
    /// Weight compression: product quantization (And the bit goes down) of FMNet, and of any
    /// checkpoint by name rules (PQ, round-to-nearest, GPTQ, fp16); evaluate files.
    Wpq {
        #[command(subcommand)]
        command: wpq::WpqCommand,
    },
    /// Sentence embeddings with a sentence-transformers BERT model (own or compressed weights)
    /// and calibration recording for weight compression.
    Text {
        #[command(subcommand)]
        command: text::TextCommand,
    },
}

#[derive(clap::Args)]
struct KmeansArgs {
    /// The safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// The tensor: `[n, ...]` of any numeric dtype, flattened to `[n, d]` in f32.
    #[arg(long)]
    tensor: String,
    /// Number of centroids (1 to 2^24).
    #[arg(long, value_parser = flags::count(1, flags::MAX_CODES))]
    k: usize,
    /// Lloyd iterations (1 to 1,000,000).
    #[arg(long, default_value_t = 25, value_parser = flags::count(1, flags::MAX_STEPS))]
    iters: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Initialisation: `random` or `kmeans++`.
    #[arg(long, default_value = "random", value_parser = ["random", "kmeans++"])]
    init: String,
    /// Assignment step: `auto`, `lloyd` (every distance), `hamerly` or `yinyang` (distance
    /// bounds); all give the same result.
    #[arg(long, default_value = "auto", value_parser = ["auto", "lloyd", "hamerly", "yinyang"])]
    algorithm: String,
    /// Centroid groups of `--algorithm yinyang` (default: k/10, at most d).
    #[arg(long, value_parser = flags::count(1, 65_536))]
    groups: Option<usize>,
    /// Write the centroids here (safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tensor names, dtypes and shapes, metadata, and label counts of a safetensors file.
    Info {
        /// The file (e.g. data/fashion-mnist.safetensors).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    qcl_tensor::tune_process_for_numeric_loops();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors, help and version follow the `--json` convention too.
            let wants_json = std::env::args_os().any(|a| a == "--json");
            if !wants_json {
                e.exit();
            }
            let message = e.render().to_string();
            let (object, code) = if e.use_stderr() {
                let error = json!({"kind": "usage", "message": message.trim()});
                (json!({ "error": error }), ExitCode::from(2))
            } else {
                (json!({ "help": message.trim_end() }), ExitCode::SUCCESS)
            };
            let _ = print_quietly(&format!("{object}\n"));
            return code;
        }
    };
    let result = match run_catching_bugs(&cli.command, cli.json) {
        Ok(result) => result,
        Err(bug) => return report_bug(&bug, cli.json),
    };
    // What the readers want the user to know (a file loaded without checksum, say): on
    // standard error, and in the JSON object as `notes`.
    let notes = qcl_tensor::take_notes();
    for note in &notes {
        warn_quietly(&format!("note: {note}\n"));
    }
    let result = result.map(|mut report| {
        if let (false, Some(object)) = (notes.is_empty(), report.json.as_object_mut()) {
            object.insert("notes".into(), json!(notes));
        }
        report
    });
    let (text, code) = match result {
        Ok(report) if cli.json => (format!("{}\n", report.json), ExitCode::SUCCESS),
        Ok(report) => (report.text, ExitCode::SUCCESS),
        Err(e) if cli.json => (
            format!(
                "{}\n",
                json!({"error": {"kind": e.kind(), "message": e.to_string()}})
            ),
            ExitCode::FAILURE,
        ),
        Err(e) => {
            warn_quietly(&format!("error: {e}\n"));
            return ExitCode::FAILURE;
        }
    };
    match print_quietly(&text) {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(EXIT_BROKEN_PIPE),
        Err(e) => {
            warn_quietly(&format!("error: cannot write to standard output: {e}\n"));
            ExitCode::FAILURE
        }
    }
}

/// Runs the command (`json`: its output is one JSON object, so no progress line); a panic (a
/// bug: bad input gets typed errors) comes back as its message instead of unwinding out of
/// `main`.
fn run_catching_bugs(command: &Command, json: bool) -> std::result::Result<Result<Report>, String> {
    // Kept for the report below (once, in the command's format) instead of printed here.
    static PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut slot) = PANIC.lock() {
            slot.get_or_insert_with(|| info.to_string());
        }
    }));
    if let Ok(mut slot) = PANIC.lock() {
        *slot = None;
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match command {
        Command::Data {
            command: DataCommand::Info { file },
        } => data_info(file),
        Command::Kmeans(args) => kmeans(args),
        Command::Pq { command } => pq::run(command),
        Command::Index { command } => index::run(command, json),
        Command::Ecvq(args) => ecvq::run_ecvq(args),
        Command::Bench { command } => bench::run(command),
        Command::Aqm { command } => aqm::run_command(command),
        Command::Wpq { command } => wpq::run(command),
        Command::Text { command } => text::run(command),
    }));
    let _ = std::panic::take_hook();
    outcome.map_err(|_| {
        PANIC
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

/// Exit status of a bug (an internal error), as sysexits' `EX_SOFTWARE`.
const EXIT_BUG: u8 = 70;

/// Reports a bug: kind `internal` in the JSON object, or a line on standard error.
fn report_bug(message: &str, as_json: bool) -> ExitCode {
    let message = format!("qcl hit a bug ({message}); please report it with the command line");
    if as_json {
        let _ = print_quietly(&format!(
            "{}\n",
            json!({"error": {"kind": "internal", "message": message}})
        ));
    } else {
        warn_quietly(&format!("error: {message}\n"));
    }
    ExitCode::from(EXIT_BUG)
}

/// Prints to standard error, ignoring a closed standard error (no panic).
fn warn_quietly(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Exit status when standard output's reader went away: 128 + SIGPIPE, as a shell reports a
/// writer that the signal ended.
const EXIT_BROKEN_PIPE: u8 = 141;

/// Prints to standard output; a failed write (a reader that went away, `qcl … | head`, or a
/// full disk) comes back as the error instead of a panic.
fn print_quietly(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush())
}

/// Most bytes of a configuration file: the largest real one is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The bytes of a small input file (a JSON configuration); an endless or huge input
/// (`/dev/zero`) is refused after [`MAX_CONFIG_BYTES`] instead of filling the memory.
///
/// # Errors
/// [`Error::Io`] if it cannot be read, [`Error::BadFile`] if it is larger than the limit.
fn read_small_file(path: &Path) -> Result<Vec<u8>> {
    qcl_tensor::read_bounded(path, MAX_CONFIG_BYTES)
}

/// A command's result in both forms.
struct Report {
    json: Value,
    text: String,
}

/// Tensor `name` of the safetensors file `path`, `[n, ...]` of any numeric dtype, as `n` rows
/// of `d` (the product of the other dimensions; 1 for a vector) f32 values, row-major.
///
/// # Errors
/// [`Error::Io`] / [`Error::BadFile`] for the file, [`Error::MissingTensor`],
/// [`Error::ShapeMismatch`] for a scalar.
fn read_rows(path: &Path, name: &str) -> Result<(usize, usize, Vec<f32>)> {
    // Streamed: only the tensor's own rows are held, not the file and a copy besides.
    qcl_tensor::read_f32_rows(path, name)
}

fn kmeans(args: &KmeansArgs) -> Result<Report> {
    if let Some(out) = &args.out {
        qcl_tensor::check_output(out, &[&args.input])?;
    }
    let baseline_rss = qcl_nn::bench::peak_rss_bytes();
    let (n, d, data) = read_rows(&args.input, &args.tensor)?;
    let params = qcl_pq::KMeansConfig {
        max_iter: args.iters,
        init: if args.init == "kmeans++" {
            qcl_pq::KMeansInit::KMeansPlusPlus
        } else {
            qcl_pq::KMeansInit::Random
        },
        max_points_per_centroid: None,
        seed: qcl_tensor::Seed::new(args.seed),
        show_progress: true,
        algorithm: match args.algorithm.as_str() {
            "lloyd" => qcl_pq::KMeansAlgorithm::Lloyd,
            "hamerly" => qcl_pq::KMeansAlgorithm::Hamerly,
            "yinyang" => qcl_pq::KMeansAlgorithm::Yinyang {
                groups: args.groups.unwrap_or_else(|| {
                    qcl_pq::KMeansAlgorithm::Auto.groups(args.k, d).unwrap_or(1)
                }),
            },
            _ => qcl_pq::KMeansAlgorithm::Auto,
        },
        ..qcl_pq::KMeansConfig::new(args.k)
    };
    let model = qcl_pq::KMeans::fit(&data, d, None, &params)?;
    let mse = model.mse(&data)?;
    if let Some(out) = &args.out {
        model.save(out)?;
    }
    let iters = model.iterations;
    let json = json!({
        "n": n, "d": d, "k": args.k, "iters": iters,
        "seconds": model.lloyd_seconds,
        "seconds_per_iter": model.lloyd_seconds / iters.max(1) as f64,
        "mse": mse,
        "objective_history": model.objective_history,
        "algorithm": args.algorithm,
        // Groups of distance bounds used: 0 plain, 1 Hamerly.
        "groups": model.bound_groups,
        "distance_share": model.distance_share,
        "bound_bytes": model.bound_bytes,
        // Peak resident memory of loading and k-means above the process's start (Linux).
        "memory": memory_report(baseline_rss, n * d * 4),
    });
    let share = model.distance_share.iter().sum::<f64>() / iters.max(1) as f64;
    let text = format!(
        "k-means: n = {n}, d = {d}, k = {}, {iters} iterations in {:.3} s ({:.4} s/iter), mse {mse:.6}, {:.1}% of distances computed\n",
        args.k,
        model.lloyd_seconds,
        model.lloyd_seconds / iters.max(1) as f64,
        share * 100.0
    );
    Ok(Report { json, text })
}

/// The process's peak resident memory since `baseline` (its peak before the work), beside
/// the size of the data it worked on.
fn memory_report(baseline: Option<u64>, data_bytes: usize) -> Value {
    let peak = qcl_nn::bench::peak_rss_bytes();
    let above = baseline.zip(peak).map(|(b, p)| p.saturating_sub(b));
    json!({
        "data_bytes": data_bytes,
        "baseline_peak_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": above,
        "peak_above_baseline_over_data": above.map(|a| a as f64 / data_bytes.max(1) as f64),
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

fn data_info(path: &PathBuf) -> Result<Report> {
    let file = SafetensorsFile::open(path)?;
    let mut tensors = Vec::new();
    let mut text = format!(
        "{} ({} bytes, format {})\n",
        path.display(),
        file.len_bytes(),
        file.metadata()
            .get("format")
            .map_or("unknown", String::as_str)
    );
    text.push_str(&format!("  {:<16} {:<6} shape\n", "tensor", "dtype"));
    for name in file.names() {
        let info = file.info(name)?;
        text.push_str(&format!(
            "  {name:<16} {:<6} {:?}\n",
            dtype_name(info.dtype),
            info.shape
        ));
        tensors.push(json!({"name": name, "dtype": dtype_name(info.dtype), "shape": info.shape}));
    }
    let class_names: Option<Vec<String>> = file
        .metadata()
        .get("class_names")
        .and_then(|s| serde_json::from_str(s).ok());
    let mut label_counts = serde_json::Map::new();
    for name in file.names().iter().filter(|n| n.ends_with("labels")) {
        let labels = file.tensor(name, &Device::Cpu)?;
        if labels.rank() != 1 || !matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I64) {
            continue;
        }
        let labels: Vec<i64> = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        // Without class names, the largest label sets the count, within a sane bound.
        const MAX_CLASSES: i64 = 1 << 16;
        let classes = match &class_names {
            Some(names) => names.len(),
            None => labels
                .iter()
                .max()
                .map_or(0, |&m| m.clamp(-1, MAX_CLASSES) + 1) as usize,
        };
        let mut counts = vec![0usize; classes];
        for &label in &labels {
            let slot = usize::try_from(label).ok().and_then(|l| counts.get_mut(l));
            match slot {
                Some(c) => *c += 1,
                None => {
                    return Err(Error::InvalidRecord {
                        source_name: format!("`{name}` of {}", path.display()),
                        index: 0,
                        reason: format!("label {label} is outside the {classes} classes"),
                    })
                }
            }
        }
        text.push_str(&format!("  {name} per class: {counts:?}\n"));
        label_counts.insert(name.clone(), json!(counts));
    }
    for (key, value) in file.metadata() {
        text.push_str(&format!("  metadata {key} = {value}\n"));
    }
    let json = json!({
        "command": "data info",
        "file": path.display().to_string(),
        "bytes": file.len_bytes(),
        "format": file.metadata().get("format"),
        "class_names": class_names,
        "tensors": tensors,
        "label_counts": label_counts,
        "metadata": file.metadata(),
    });
    Ok(Report { json, text })
}
