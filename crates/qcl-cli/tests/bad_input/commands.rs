//! Every command with out-of-range flags and configuration values, special-file and same-file
//! `--out`, a closed standard output, and temporaries of killed writes.
//!
//! (Over 600 lines: the four checks share one table of commands, their inputs and the runner
//! that tells an error from a panic, an abort or a hang.)

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qcl_tensor::candle_core::{Device, Tensor};
use qcl_tensor::Seed;
use serde_json::Value;

use crate::common::{fixture, template_args};
use crate::Tally;

/// Longest a case may run before it counts as a hang.
const HANG: Duration = Duration::from_secs(60);

const INTEGERS: [&str; 9] = [
    "0",
    "-1",
    "4294967297",
    "9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "1e3",
    "nan",
    "",
];
const FLOATS: [&str; 8] = ["0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "1e39"];

/// What a run of `qcl` did.
struct Run {
    /// Exit code; `None` when a signal ended it (an abort) or it hung.
    code: Option<i32>,
    stdout: String,
    stderr: String,
    hung: bool,
}

/// Runs `qcl args…` with standard output to `stdout` (a pipe read here when `None`).
fn run_with(args: &[String], stdout: Option<Stdio>) -> Run {
    let capture = stdout.is_none();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcl"))
        .args(args)
        .stdout(stdout.unwrap_or_else(Stdio::piped))
        .stderr(Stdio::piped())
        .spawn()
        .expect("qcl starts");
    // Read both pipes on threads, so that a full pipe cannot stall the child.
    let out = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    });
    let mut err_pipe = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let (code, hung) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status.code(), false);
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = capture;
    Run {
        code,
        stdout: out.map(|t| t.join().unwrap()).unwrap_or_default(),
        stderr: err.join().unwrap(),
        hung,
    }
}

fn run(args: &[String]) -> Run {
    run_with(args, None)
}

/// The rules every run must keep: ends in time, by exit (no abort), with 0, 1 or 2, no panic,
/// and with `--json` exactly one JSON object that is an error (not `internal`) unless it
/// succeeded.
fn judge(label: &str, run: &Run) -> Result<(), String> {
    let fail = |why: String| Err(format!("{label}: {why}"));
    if run.hung {
        return fail(format!("still running after {HANG:?}"));
    }
    let Some(code) = run.code else {
        return fail(format!("ended by a signal: {}", tail(&run.stderr)));
    };
    if run.stderr.contains("panicked") {
        return fail(format!("panicked: {}", tail(&run.stderr)));
    }
    if !matches!(code, 0..=2) {
        return fail(format!("exit status {code}: {}", tail(&run.stdout)));
    }
    let value: Value = match serde_json::from_str(run.stdout.trim()) {
        Ok(v) => v,
        Err(_) => return fail(format!("not one JSON object: {}", tail(&run.stdout))),
    };
    let kind = value["error"]["kind"].as_str();
    match (code, kind) {
        (0, None) if value.is_object() => Ok(()),
        (1 | 2, Some(kind)) if kind != "internal" => Ok(()),
        _ => fail(format!("exit {code} with {}", tail(&run.stdout))),
    }
}

fn tail(text: &str) -> String {
    let text = text.trim();
    let start = text.len().saturating_sub(300);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text[start..].to_string()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Inputs the commands read, made once.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = Seed::new(0).rng().normal_vec(300 * 8, 0.0, 1.0);
        let x = Tensor::from_vec(data, (300, 8), &Device::Cpu).unwrap();
        let huge = Tensor::new(&[0i64, i64::MAX], &Device::Cpu).unwrap();
        let points = dir.path().join("points.safetensors");
        qcl_tensor::write_safetensors(
            &points,
            &[("x", &x), ("train.labels", &huge)],
            &Default::default(),
        )
        .unwrap();
        let inputs = Inputs { dir };
        let out = |name: &str| inputs.path(name);
        let args = strings(&[
            "pq",
            "train",
            "--input",
            &out("points.safetensors"),
            "--tensor",
            "x",
            "--m",
            "2",
            "--nbits",
            "3",
            "--iters",
            "3",
            "--out",
            &out("pq.safetensors"),
        ]);
        assert_eq!(run(&args).code, Some(0));
        let args = strings(&[
            "pq",
            "encode",
            "--pq",
            &out("pq.safetensors"),
            "--input",
            &out("points.safetensors"),
            "--tensor",
            "x",
            "--out",
            &out("codes.safetensors"),
        ]);
        assert_eq!(run(&args).code, Some(0));
        let args = strings(&[
            "index",
            "build",
            "--vectors",
            &out("points.safetensors"),
            "--tensor",
            "x",
            "--kind",
            "ivf-pq",
            "--nlist",
            "4",
            "--m",
            "4",
            "--refine",
            "2",
            "--train-iterations",
            "3",
            "--add",
            "--out",
            &out("index.safetensors"),
        ]);
        assert_eq!(run(&args).code, Some(0));
        // Ids for the 300 points, none of them in the index (which holds 0..300).
        let ids = Tensor::arange(1_000i64, 1_300, &Device::Cpu).unwrap();
        qcl_tensor::write_safetensors(
            inputs.dir.path().join("ids.safetensors"),
            &[("ids", &ids)],
            &Default::default(),
        )
        .unwrap();
        crate::common::write_fmnet(&inputs.dir.path().join("fmnet.safetensors"));
        std::fs::write(
            inputs.dir.path().join("texts.txt"),
            "the cat sat.\na dog ran\n",
        )
        .unwrap();
        inputs
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Arguments from a template split at spaces, where `@bert` is the tiny BERT fixture,
    /// `@bert-model` its weights, `@fmnist` the Fashion-MNIST fixture and `@NAME` the input file
    /// `NAME` (paths may hold spaces: they are substituted after the split).
    fn args(&self, template: &str) -> Vec<String> {
        template_args(template, |name| match name {
            "bert" => fixture("tiny-bert"),
            "bert-model" => format!("{}/model.safetensors", fixture("tiny-bert")),
            "fmnist" => fixture("fashion-mnist.safetensors"),
            name => self.path(name),
        })
    }

    /// A `qcl wpq compress` configuration with `field` set to `value` (raw JSON).
    fn wpq_config(&self, field: &str, value: &str) -> String {
        let body: Vec<String> = [
            ("em_iterations", "1"),
            ("rows_per_iteration", "300"),
            ("activation_images", "4"),
            ("layer_steps", "1"),
            ("global_steps", "1"),
            ("batch_size", "4"),
            ("seed", "4"),
        ]
        .into_iter()
        .map(|(k, v)| format!("\"{k}\": {}", if k == field { value } else { v }))
        .collect();
        let path = self.path(&format!("wpq-{field}.json"));
        std::fs::write(&path, format!("{{{}}}", body.join(", "))).unwrap();
        path
    }
}

/// One command's fast valid arguments and its numeric flags (integer or float).
struct Case {
    base: Vec<String>,
    integers: Vec<&'static str>,
    floats: Vec<&'static str>,
}

fn cases(inputs: &Inputs) -> Vec<Case> {
    vec![
        Case {
            base: inputs.args("kmeans --input @points.safetensors --tensor x --k 4 --iters 3"),
            integers: vec!["--k", "--iters", "--seed"],
            floats: vec![],
        },
        Case {
            base: inputs.args("kmeans --input @points.safetensors --tensor x --k 40 --iters 3 --algorithm yinyang --groups 2"),
            integers: vec!["--groups"],
            floats: vec![],
        },
        Case {
            base: inputs.args("pq train --input @points.safetensors --tensor x --m 2 --nbits 2 --iters 2 --out @trained.safetensors"),
            integers: vec!["--m", "--nbits", "--iters", "--seed"],
            floats: vec![],
        },
        Case {
            base: inputs.args("pq search --pq @pq.safetensors --codes @codes.safetensors --queries @points.safetensors --tensor x --top-k 3"),
            integers: vec!["--top-k"],
            floats: vec![],
        },
        Case {
            base: inputs.args("ecvq --source gaussian --method vecvq --lambda 4 --k 8 --steps 20 --batch 32 --eval-samples 500"),
            integers: vec![
                "--k",
                "--steps",
                "--batch",
                "--eval-samples",
                "--seed",
                "--eval-seed",
            ],
            floats: vec!["--lambda", "--lr"],
        },
        Case {
            base: inputs.args("ecvq --source banana --method clg --lambda 4 --k 8 --train-samples 500 --iterations 3 --eval-samples 500"),
            integers: vec!["--k", "--train-samples", "--iterations", "--restarts"],
            floats: vec!["--lambda"],
        },
        Case {
            base: inputs.args("bench train --model vq-ae --batch 2 --steps 1 --warmup 0"),
            integers: vec!["--batch", "--steps", "--warmup", "--seed"],
            floats: vec![],
        },
        Case {
            base: inputs.args("aqm run --data @fmnist --samples-per-task 20"),
            integers: vec!["--budget", "--param-bytes", "--samples-per-task", "--seed"],
            floats: vec![],
        },
        Case {
            base: inputs.args("text calibrate --model @bert --input @texts.txt --out @calib.safetensors --limit 1"),
            integers: vec!["--limit"],
            floats: vec![],
        },
        Case {
            base: inputs.args("wpq compress-checkpoint --checkpoint @bert-model --rule encoder.layer.*.dense.weight=rtn:bits=4,group=16 --out @bert-c.safetensors"),
            integers: vec!["--seed"],
            floats: vec![],
        },
        Case {
            base: inputs.args("index build --vectors @points.safetensors --tensor x --kind ivf-pq --nlist 4 --m 2 --nbits 4 --train-iterations 2 --opq --opq-iterations 2 --refine 2 --out @built.safetensors"),
            integers: vec![
                "--m",
                "--nbits",
                "--nlist",
                "--train-iterations",
                "--opq-iterations",
                "--refine",
                "--seed",
            ],
            floats: vec![],
        },
        Case {
            base: inputs.args("index search --index @index.safetensors --queries @points.safetensors --tensor x --k 3"),
            integers: vec!["--k", "--nprobe", "--k-factor"],
            floats: vec![],
        },
        Case {
            base: inputs.args("data info @points.safetensors"),
            integers: vec![],
            floats: vec![],
        },
    ]
}

/// Runs `base` with `flag value` added (replacing the flag's value when `base` has it).
fn with_flag(base: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut args = base.to_vec();
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args.push("--json".into());
    args
}

pub fn flags() -> Tally {
    let inputs = Inputs::new();
    let mut tally = Tally::default();
    for case in cases(&inputs) {
        let name = case.base[..2].join(" ");
        let base_run = run(&[case.base.clone(), vec!["--json".into()]].concat());
        tally.record(judge(&format!("{name} (valid)"), &base_run));
        let values = case
            .integers
            .iter()
            .flat_map(|f| INTEGERS.iter().map(move |v| (*f, *v)))
            .chain(
                case.floats
                    .iter()
                    .flat_map(|f| FLOATS.iter().map(move |v| (*f, *v))),
            );
        for (flag, value) in values {
            let args = with_flag(&case.base, flag, value);
            tally.record(judge(&format!("{name} {flag} {value:?}"), &run(&args)));
        }
    }
    // Sizes in rules and configuration files.
    let bert = format!("{}/model.safetensors", fixture("tiny-bert"));
    for template in [
        "encoder.layer.*.self.*.weight=pq:d=N,k=16,objective=naive",
        "encoder.layer.*.self.*.weight=pq:d=2,k=N,objective=naive",
        "encoder.layer.*.self.*.weight=pq:d=2,k=16,objective=naive,finetune=N",
        "encoder.layer.*.dense.weight=rtn:bits=N,group=16",
        "encoder.layer.*.dense.weight=rtn:bits=4,group=N",
        "encoder.layer.*.dense.weight=gptq:bits=4,group=16,damp=N",
    ] {
        for value in INTEGERS.iter().chain(&FLOATS) {
            let rule = template.replace('N', value);
            let args = strings(&[
                "wpq",
                "compress-checkpoint",
                "--checkpoint",
                &bert,
                "--rule",
                &rule,
                "--out",
                &inputs.path("rule.safetensors"),
                "--json",
            ]);
            tally.record(judge(&format!("rule {rule}"), &run(&args)));
        }
    }
    for field in [
        "em_iterations",
        "rows_per_iteration",
        "activation_images",
        "layer_steps",
        "global_steps",
        "batch_size",
        "seed",
    ] {
        for value in [
            "0",
            "-1",
            "4294967297",
            "18446744073709551615",
            "18446744073709551616",
            "1.5",
            "null",
        ] {
            let config = inputs.wpq_config(field, value);
            let args = strings(&[
                "wpq",
                "compress",
                "--model",
                &inputs.path("fmnet.safetensors"),
                "--arch",
                "fmnet",
                "--config",
                &config,
                "--data",
                &fixture("fashion-mnist.safetensors"),
                "--out",
                &inputs.path("fmnet-c.safetensors"),
                "--json",
            ]);
            tally.record(judge(
                &format!("wpq compress config {field} = {value}"),
                &run(&args),
            ));
        }
    }
    tally
}

/// Every command that writes, as (name, arguments before `--out`, its inputs).
fn writers(inputs: &Inputs) -> Vec<(String, Vec<String>, Vec<String>)> {
    // The configuration file `@wpq-seed.json` of the `wpq compress` case.
    inputs.wpq_config("seed", "4");
    let w = |args: &str, ins: &str| {
        let args = inputs.args(args);
        (args[..2].join(" "), args, inputs.args(ins))
    };
    vec![
        w("kmeans --input @points.safetensors --tensor x --k 4 --iters 2", "@points.safetensors"),
        w("pq train --input @points.safetensors --tensor x --m 2 --nbits 2 --iters 2", "@points.safetensors"),
        w("pq encode --pq @pq.safetensors --input @points.safetensors --tensor x", "@pq.safetensors @points.safetensors"),
        w("pq decode --pq @pq.safetensors --codes @codes.safetensors", "@pq.safetensors @codes.safetensors"),
        w("ecvq --source gaussian --method clg --lambda 4 --k 4 --train-samples 200 --iterations 2 --eval-samples 200", ""),
        w("wpq compress --model @fmnet.safetensors --arch fmnet --config @wpq-seed.json --data @fmnist", "@fmnet.safetensors"),
        w("wpq compress-checkpoint --checkpoint @bert-model --rule encoder.layer.*.dense.weight=rtn:bits=4,group=16", "@bert-model"),
        w("index build --vectors @points.safetensors --tensor x --m 2 --train-iterations 2", "@points.safetensors"),
        w("index add --index @index.safetensors --vectors @points.safetensors --tensor x --ids @ids.safetensors", "@points.safetensors @ids.safetensors"),
        w("index remove --index @index.safetensors --ids @ids.safetensors", "@ids.safetensors"),
        w("index search --index @index.safetensors --queries @points.safetensors --tensor x", "@index.safetensors @points.safetensors"),
        w("text calibrate --model @bert --input @texts.txt", "@texts.txt"),
        w("text embed --model @bert --input @texts.txt", "@texts.txt"),
    ]
}

pub fn outputs() -> Tally {
    let inputs = Inputs::new();
    let mut tally = Tally::default();
    let dir = inputs.dir.path();
    let fifo = dir.join("fifo");
    let has_fifo = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let dangling = dir.join("dangling");
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("nowhere/at/all"), &dangling).unwrap();
    for (name, args, ins) in writers(&inputs) {
        let mut targets: Vec<PathBuf> = vec![dir.to_path_buf(), dangling.clone()];
        targets.extend(has_fifo.then(|| fifo.clone()));
        targets.extend(
            Path::new("/dev/null")
                .exists()
                .then(|| PathBuf::from("/dev/null")),
        );
        targets.extend(ins.iter().map(PathBuf::from));
        for target in targets {
            let before = snapshot(&target);
            let mut full = args.clone();
            full.extend([
                "--out".into(),
                target.to_str().unwrap().into(),
                "--json".into(),
            ]);
            let run = run(&full);
            let label = format!("{name} --out {}", target.display());
            let outcome = judge(&label, &run).and_then(|()| {
                if run.code == Some(0) {
                    return Err(format!("{label}: accepted"));
                }
                if snapshot(&target) != before {
                    return Err(format!("{label}: the target changed"));
                }
                Ok(())
            });
            tally.record(outcome);
        }
    }
    tally
}

/// What a target is: its type and, for a regular file, its bytes.
fn snapshot(path: &Path) -> (String, Option<Vec<u8>>) {
    let kind = std::fs::symlink_metadata(path)
        .map(|m| format!("{:?}", m.file_type()))
        .unwrap_or_else(|_| "missing".into());
    let bytes = std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .and_then(|_| std::fs::read(path).ok());
    (kind, bytes)
}

pub fn closed_stdout() -> Tally {
    let inputs = Inputs::new();
    let mut tally = Tally::default();
    let p = |name: &str| inputs.path(name);
    let commands = [
        strings(&["data", "info", &fixture("mnist.safetensors")]),
        strings(&[
            "kmeans",
            "--input",
            &p("points.safetensors"),
            "--tensor",
            "x",
            "--k",
            "4",
            "--iters",
            "2",
        ]),
        strings(&[
            "pq",
            "search",
            "--pq",
            &p("pq.safetensors"),
            "--codes",
            &p("codes.safetensors"),
            "--queries",
            &p("points.safetensors"),
            "--tensor",
            "x",
            "--top-k",
            "3",
        ]),
        strings(&[
            "text",
            "embed",
            "--model",
            &fixture("tiny-bert"),
            "--input",
            &p("texts.txt"),
        ]),
        strings(&["data", "info", &p("missing.safetensors")]),
        strings(&["--help"]),
        strings(&["kmeans", "--no-such-flag"]),
    ];
    for command in commands {
        for json in [false, true] {
            let mut args = command.clone();
            if json {
                args.push("--json".into());
            }
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            let run = run_with(&args, Some(Stdio::from(writer)));
            let label = format!(
                "{} with standard output closed{}",
                command.join(" "),
                if json { " (--json)" } else { "" }
            );
            let outcome = if run.hung || run.code.is_none() || run.stderr.contains("panicked") {
                Err(format!("{label}: {:?} {}", run.code, tail(&run.stderr)))
            } else if !matches!(run.code, Some(0 | 1 | 2 | 141)) {
                Err(format!("{label}: exit status {:?}", run.code))
            } else {
                Ok(())
            };
            tally.record(outcome);
        }
    }
    tally
}

pub fn killed_writes() -> Tally {
    let inputs = Inputs::new();
    let mut tally = Tally::default();
    // A process id that no process has now: a child that has been waited for.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let dead = gone.id();
    for (index, (name, args, _)) in writers(&inputs).into_iter().enumerate() {
        let out_dir = inputs.dir.path().join(format!("killed{index}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = out_dir.join("out.safetensors");
        let stale = out_dir.join(format!(".out.safetensors.{dead}-0.tmp"));
        std::fs::write(&stale, vec![0u8; 4096]).unwrap();
        let mut full = args.clone();
        full.extend([
            "--out".into(),
            out.to_str().unwrap().into(),
            "--json".into(),
        ]);
        let run = run(&full);
        let label = format!("{name} after a killed write");
        let outcome = judge(&label, &run).and_then(|()| {
            if stale.exists() {
                Err(format!(
                    "{label}: the killed write's temporary is still there"
                ))
            } else if !out.is_file() {
                Err(format!("{label}: no output"))
            } else {
                Ok(())
            }
        });
        tally.record(outcome);
    }
    // A real kill in the middle of a command that writes over an existing file: the old file
    // stays whole, and the next run removes what the kill left.
    let (_, args, _) = writers(&inputs).swap_remove(5);
    let out = inputs.dir.path().join("kill-target.safetensors");
    std::fs::write(&out, b"the previous version").unwrap();
    for delay_ms in [50, 400, 1500] {
        let mut full = args.clone();
        full.extend(["--out".into(), out.to_str().unwrap().into()]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_qcl"))
            .args(&full)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let now = std::fs::read(&out).unwrap_or_default();
        let whole =
            now == b"the previous version" || qcl_wpq::CompressedModel::load(&out, None).is_ok();
        tally.record(if whole {
            Ok(())
        } else {
            Err(format!(
                "wpq compress killed after {delay_ms} ms: the target is damaged"
            ))
        });
    }
    tally
}
