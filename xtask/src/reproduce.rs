//! `cargo xtask reproduce`: a registry of experiments, each writing `NAME.json` (figures),
//! `NAME.md` (a table a person reads) and PNG plots into the output directory, and
//! `REPORT.md` linking every experiment whose results are there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::experiments;

/// How much work an experiment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Scaled down to minutes on 2 cores (the default).
    Quick,
    /// The full scaled-down protocol of the method's document (docs/methods/).
    Full,
}

/// What an experiment gets to work with.
#[derive(Debug, Clone)]
pub struct Context {
    /// Directory of the prepared data sets.
    pub data_dir: PathBuf,
    /// Directory the results go to.
    pub out_dir: PathBuf,
    /// Quick or full.
    pub mode: Mode,
    /// The workspace's commit (`git rev-parse HEAD`, `-dirty` when tracked files changed),
    /// recorded in every result file.
    pub commit: String,
    /// The command line that produced the results (`cargo xtask reproduce ...`).
    pub command: String,
    /// Seeds `0..n` instead of the experiment's own list (`--seeds n`), for the experiments that
    /// take it ([`Experiment::takes_seeds`]); `None` keeps each experiment's default.
    pub seeds: Option<u64>,
    /// Where long experiments keep their finished pieces so that a stopped run resumes
    /// (`data/resume` for `cargo xtask reproduce`; `None` keeps nothing). See [`crate::resume`].
    /// With it, an experiment whose results this build already wrote (same clean commit, mode
    /// and seeds) is not run again: a stopped `reproduce` of many experiments picks up at the
    /// first one it had not finished.
    pub resume_dir: Option<PathBuf>,
}

impl Context {
    /// Whether the commit names the code exactly: a full hash, without `-dirty`, not `unknown`
    /// (what may be reused by a later start of the same build).
    pub fn at_clean_commit(&self) -> bool {
        self.commit.len() == 40 && self.commit.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// A context for `command`, with the commit this program was built from.
    pub fn new(data_dir: PathBuf, out_dir: PathBuf, mode: Mode, command: String) -> Self {
        Context {
            data_dir,
            out_dir,
            mode,
            commit: BUILD_COMMIT.to_string(),
            command,
            seeds: None,
            resume_dir: None,
        }
    }
}

/// The commit this program was built from: `git rev-parse HEAD` of the workspace when
/// `build.rs` last ran (it runs again on every commit and code change), with `-dirty` when a
/// tracked file outside `docs/results/` differed, `unknown` without git (`git_commit.rs`). A
/// result names the code that made it, even when the workspace moves on during a long run.
pub const BUILD_COMMIT: &str = env!("QCL_BUILD_COMMIT");

/// `cargo xtask` followed by `args`, each quoted for a POSIX shell when it needs it, so that
/// the line can be pasted back into a terminal.
pub fn command_line<S: AsRef<str>>(args: &[S]) -> String {
    let mut line = String::from("cargo xtask");
    for arg in args {
        let arg = arg.as_ref();
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
        line.push(' ');
        if plain {
            line.push_str(arg);
        } else {
            line.push('\'');
            line.push_str(&arg.replace('\'', "'\\''"));
            line.push('\'');
        }
    }
    line
}

/// What an experiment produced.
pub struct Outcome {
    /// One line for REPORT.md.
    pub summary: String,
    /// Machine-readable figures, stored under `figures` in NAME.json.
    pub figures: serde_json::Value,
    /// Markdown body of NAME.md (tables), without the title.
    pub markdown: String,
    /// PNG files written into the output directory, with a caption each.
    pub plots: Vec<(String, String)>,
}

/// A registered experiment.
pub struct Experiment {
    /// Name used on the command line and for the output files.
    pub name: &'static str,
    /// One sentence.
    pub description: &'static str,
    /// Whether it needs `cargo xtask data` to have run.
    pub needs_data: bool,
    /// Whether it takes `--seeds N` (seeds `0..N` instead of its own list).
    pub takes_seeds: bool,
    /// The work.
    pub run: fn(&Context, &ProgressBar) -> Result<Outcome>,
}

/// Every experiment, in report order.
pub fn registry() -> Vec<Experiment> {
    vec![
        experiments::datasets::EXPERIMENT,
        experiments::kmeans::EXPERIMENT,
        experiments::memory::EXPERIMENT,
        experiments::ann::EXPERIMENT,
        experiments::training::EXPERIMENT,
        experiments::vq::EXPERIMENT,
        experiments::ecvq::EXPERIMENT,
        experiments::lifequant::EXPERIMENT,
        experiments::lifequant::variants::EXPERIMENT,
        experiments::aqm::EXPERIMENT,
        experiments::wpq::EXPERIMENT,
        experiments::minilm::EXPERIMENT,
        experiments::cacl::EXPERIMENT,
    ]
}

/// The JSON file each experiment writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResultFile {
    /// Experiment name.
    pub experiment: String,
    /// Its description.
    pub description: String,
    /// Quick or full.
    pub mode: Mode,
    /// Wall time of the run in seconds.
    pub seconds: f64,
    /// The commit the results were produced at (see [`BUILD_COMMIT`]).
    #[serde(default)]
    pub commit: String,
    /// The exact command that produced them.
    #[serde(default)]
    pub command: String,
    /// `--seeds N` when the run asked for it.
    #[serde(default)]
    pub seeds: Option<u64>,
    /// One-line summary.
    pub summary: String,
    /// PNG files with captions.
    pub plots: Vec<(String, String)>,
    /// The figures.
    pub figures: serde_json::Value,
}

/// Runs the named experiments (all when `names` is empty) and rewrites REPORT.md.
pub fn run(names: &[String], ctx: &Context) -> Result<()> {
    let all = registry();
    let chosen: Vec<&Experiment> = if names.is_empty() {
        all.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                all.iter().find(|e| e.name == n).with_context(|| {
                    let known: Vec<&str> = all.iter().map(|e| e.name).collect();
                    format!("unknown experiment `{n}`; known: {}", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    std::fs::create_dir_all(&ctx.out_dir)
        .with_context(|| format!("creating {}", ctx.out_dir.display()))?;
    let bar = ProgressBar::new(chosen.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut failures = Vec::new();
    for experiment in chosen {
        bar.set_message(experiment.name.to_string());
        if let Some(found) = made_by_this_build(ctx, experiment) {
            bar.println(format!(
                "{}: kept the results this build already wrote ({} mode, commit {}, `{}`)",
                experiment.name,
                found.mode.name(),
                found.commit,
                found.command
            ));
            bar.inc(1);
            continue;
        }
        let started = Instant::now();
        match (experiment.run)(ctx, &bar) {
            Ok(outcome) => {
                let seconds = started.elapsed().as_secs_f64();
                write_outputs(ctx, experiment, outcome, seconds)?;
                bar.println(format!("{}: done in {seconds:.1} s", experiment.name));
            }
            Err(e) => {
                // Straight to stderr: a hidden bar (no terminal) would swallow the reason.
                bar.suspend(|| eprintln!("{}: FAILED: {e:#}", experiment.name));
                failures.push(experiment.name);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_report(&ctx.out_dir)?;
    println!("report: {}", ctx.out_dir.join("REPORT.md").display());
    if !failures.is_empty() {
        bail!("failed experiments: {}", failures.join(", "));
    }
    Ok(())
}

/// The seeds `ctx` asks of `experiment` (`None`: its default).
fn seeds_for(ctx: &Context, experiment: &Experiment) -> Option<u64> {
    ctx.seeds.filter(|_| experiment.takes_seeds)
}

/// The results of `experiment` in `ctx`'s output directory when this build wrote them for the
/// same mode and seeds at a clean commit and resuming is on ([`Context::resume_dir`]).
fn made_by_this_build(ctx: &Context, experiment: &Experiment) -> Option<ResultFile> {
    if ctx.resume_dir.is_none() || !ctx.at_clean_commit() {
        return None;
    }
    let md = ctx.out_dir.join(format!("{}.md", experiment.name));
    let json = std::fs::read(ctx.out_dir.join(format!("{}.json", experiment.name))).ok()?;
    let file: ResultFile = serde_json::from_slice(&json).ok()?;
    (md.is_file()
        && file.commit == ctx.commit
        && file.mode == ctx.mode
        && file.seeds == seeds_for(ctx, experiment))
    .then_some(file)
}

fn write_outputs(
    ctx: &Context,
    experiment: &Experiment,
    outcome: Outcome,
    seconds: f64,
) -> Result<()> {
    let file = ResultFile {
        experiment: experiment.name.into(),
        description: experiment.description.into(),
        mode: ctx.mode,
        seconds,
        commit: ctx.commit.clone(),
        command: ctx.command.clone(),
        seeds: seeds_for(ctx, experiment),
        summary: outcome.summary,
        plots: outcome.plots,
        figures: outcome.figures,
    };
    let json = serde_json::to_vec_pretty(&file)?;
    qcl_tensor::write_atomic(ctx.out_dir.join(format!("{}.json", experiment.name)), &json)?;
    let mut md = format!(
        "# {}\n\n{}\n\nMode `{}`, {:.1} s, commit `{}`. Produced by `{}`.\n\n{}\n",
        experiment.name,
        experiment.description,
        mode_name(ctx.mode),
        seconds,
        file.commit,
        file.command,
        outcome.markdown.trim_end()
    );
    for (png, caption) in &file.plots {
        md.push_str(&format!("\n![{caption}]({png})\n\n*{caption}*\n"));
    }
    qcl_tensor::write_atomic(
        ctx.out_dir.join(format!("{}.md", experiment.name)),
        md.as_bytes(),
    )?;
    Ok(())
}

fn mode_name(mode: Mode) -> &'static str {
    mode.name()
}

impl Mode {
    /// The mode as results files name it (`quick`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

/// Rewrites `REPORT.md` from the result files present in `out_dir`, in registry order.
pub fn write_report(out_dir: &Path) -> Result<()> {
    let mut md = String::from(
        "# qcl results\n\nWritten by `cargo xtask reproduce`; each line links an experiment's tables and plots.\n\n\
         | experiment | mode | time (s) | summary |\n|---|---|---|---|\n",
    );
    let mut missing = Vec::new();
    for experiment in registry() {
        let path = out_dir.join(format!("{}.json", experiment.name));
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ResultFile>(&b).ok())
        {
            Some(result) => md.push_str(&format!(
                "| [{name}]({name}.md) | {} | {:.1} | {} |\n",
                mode_name(result.mode),
                result.seconds,
                result.summary.replace('|', "\\|"),
                name = experiment.name
            )),
            None => missing.push(experiment.name),
        }
    }
    if !missing.is_empty() {
        md.push_str(&format!("\nNot run yet: {}.\n", missing.join(", ")));
    }
    qcl_tensor::write_atomic(out_dir.join("REPORT.md"), md.as_bytes())?;
    Ok(())
}

/// For experiments' tests: a temporary output directory, a quick-mode context reading the
/// committed fixtures, and the Fashion-MNIST fixture itself.
#[cfg(test)]
pub fn fixture_run() -> (tempfile::TempDir, Context, qcl_data::SplitDataset) {
    let out = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let ctx = Context::new(
        fixtures,
        out.path().to_path_buf(),
        Mode::Quick,
        "cargo xtask reproduce".into(),
    );
    let data = crate::experiments::OnData::fashion_mnist(&ctx).unwrap();
    (out, ctx, data)
}

/// A clean commit for tests that keep pieces (no build has it).
#[cfg(test)]
pub const TEST_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What [`resumed_and_uninterrupted`] gives: both outcomes and their output directories.
#[cfg(test)]
pub struct ResumeCheck {
    /// The run that read the first start's pieces back.
    pub resumed: Outcome,
    /// Where it wrote its files.
    pub resumed_out: tempfile::TempDir,
    /// The same settings run afresh.
    pub uninterrupted: Outcome,
    /// Where that run wrote its files.
    pub uninterrupted_out: tempfile::TempDir,
}

/// For experiments' resume tests: `run` on `one_seed` with pieces kept (a start that stopped
/// after its first seed), then on `all` twice, resuming from those pieces and afresh, each
/// into its own output directory.
#[cfg(test)]
pub fn resumed_and_uninterrupted<S>(
    ctx: &Context,
    run: impl Fn(&Context, &S) -> Outcome,
    one_seed: &S,
    all: &S,
) -> ResumeCheck {
    let pieces = tempfile::tempdir().unwrap();
    let (resumed_out, uninterrupted_out) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let keeping = Context {
        commit: TEST_COMMIT.into(),
        resume_dir: Some(pieces.path().to_path_buf()),
        out_dir: resumed_out.path().to_path_buf(),
        ..ctx.clone()
    };
    run(&keeping, one_seed);
    let resumed = run(&keeping, all);
    let fresh = Context {
        resume_dir: None,
        out_dir: uninterrupted_out.path().to_path_buf(),
        ..ctx.clone()
    };
    ResumeCheck {
        resumed,
        resumed_out,
        uninterrupted: run(&fresh, all),
        uninterrupted_out,
    }
}

/// `figures` as text without the keys that differ between two runs of the same build (measured
/// times and the resume note), at any depth: what a resumed run must reproduce.
#[cfg(test)]
pub fn figures_without(figures: &serde_json::Value, keys: &[&str]) -> String {
    fn strip(v: &mut serde_json::Value, keys: &[&str]) {
        if let Some(map) = v.as_object_mut() {
            for key in keys {
                map.remove(*key);
            }
            map.values_mut().for_each(|v| strip(v, keys));
        } else if let Some(list) = v.as_array_mut() {
            list.iter_mut().for_each(|v| strip(v, keys));
        }
    }
    let mut v = figures.clone();
    strip(&mut v, keys);
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    include!("git_commit.rs");

    #[test]
    fn datasets_experiment_runs_on_the_fixtures_and_the_report_links_it() {
        let out = tempfile::tempdir().unwrap();
        let ctx = Context::new(
            // The fixtures have the data files' names, so they stand in for `data/`.
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"),
            out.path().to_path_buf(),
            Mode::Quick,
            command_line(&["reproduce", "datasets", "--out", "/tmp/a b"]),
        );
        run(&["datasets".to_string()], &ctx).unwrap();
        let result: ResultFile =
            serde_json::from_slice(&std::fs::read(out.path().join("datasets.json")).unwrap())
                .unwrap();
        assert_eq!(result.figures["fashion-mnist"]["train"], 1000);
        assert_eq!(
            result.figures["mnist"]["test_per_class"],
            serde_json::json!(vec![20; 10])
        );
        for (png, _) in &result.plots {
            let bytes = std::fs::read(out.path().join(png)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
        }
        let md = std::fs::read_to_string(out.path().join("datasets.md")).unwrap();
        assert!(md.contains("| 9 | Ankle boot | 100 | 20 |"), "{md}");
        // Provenance: the commit and the command, in the JSON and the Markdown header.
        assert_eq!(
            result.command,
            "cargo xtask reproduce datasets --out '/tmp/a b'"
        );
        assert!(!result.commit.is_empty());
        assert!(
            md.contains(&format!("commit `{}`", result.commit)) && md.contains(&result.command),
            "{md}"
        );
        let report = std::fs::read_to_string(out.path().join("REPORT.md")).unwrap();
        assert!(report.contains("[datasets](datasets.md)"), "{report}");
        // No temporary files are left behind.
        assert!(std::fs::read_dir(out.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')));
    }

    #[test]
    fn results_this_build_wrote_are_kept_unless_mode_seeds_or_commit_differ() {
        let out = tempfile::tempdir().unwrap();
        let ctx = Context {
            commit: TEST_COMMIT.into(),
            resume_dir: Some(out.path().join("resume")),
            ..Context::new(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"),
                out.path().to_path_buf(),
                Mode::Quick,
                "cargo xtask reproduce datasets".into(),
            )
        };
        let json = out.path().join("datasets.json");
        let written = |ctx: &Context| {
            std::fs::write(&json, b"{}").unwrap();
            run(&["datasets".to_string()], ctx).unwrap();
            std::fs::read(&json).unwrap() != b"{}"
        };
        assert!(written(&ctx));
        // The same build, mode and seeds: kept as it is.
        let first = std::fs::read(&json).unwrap();
        run(&["datasets".to_string()], &ctx).unwrap();
        assert_eq!(std::fs::read(&json).unwrap(), first);
        let datasets = registry()
            .into_iter()
            .find(|e| e.name == "datasets")
            .unwrap();
        assert!(made_by_this_build(&ctx, &datasets).is_some());
        let other_mode = Context {
            mode: Mode::Full,
            ..ctx.clone()
        };
        let other_commit = Context {
            commit: "f".repeat(40),
            ..ctx.clone()
        };
        let dirty = Context {
            commit: format!("{}-dirty", ctx.commit),
            ..ctx.clone()
        };
        let rerun = Context {
            resume_dir: None,
            ..ctx.clone()
        };
        for other in [other_mode, other_commit, dirty, rerun] {
            std::fs::write(&json, &first).unwrap();
            assert!(made_by_this_build(&other, &datasets).is_none());
        }
        // Seeds count only for the experiments that take them.
        let lifequant = registry()
            .into_iter()
            .find(|e| e.name == "lifequant")
            .unwrap();
        let five = Context {
            seeds: Some(5),
            ..ctx.clone()
        };
        assert!(made_by_this_build(&five, &datasets).is_some());
        assert_eq!(seeds_for(&five, &lifequant), Some(5));
        assert_eq!(seeds_for(&five, &datasets), None);
    }

    #[test]
    fn unknown_experiment_is_an_error_naming_the_known_ones() {
        let out = tempfile::tempdir().unwrap();
        let ctx = Context::new(
            out.path().to_path_buf(),
            out.path().to_path_buf(),
            Mode::Quick,
            "cargo xtask reproduce nope".into(),
        );
        let err = run(&["nope".to_string()], &ctx).unwrap_err();
        assert!(err.to_string().contains("datasets"), "{err}");
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        assert_eq!(
            command_line(&["reproduce", "minilm", "--quick"]),
            "cargo xtask reproduce minilm --quick"
        );
        assert_eq!(
            command_line(&["--out", "a b", "it's", ""]),
            "cargo xtask --out 'a b' 'it'\\''s' ''"
        );
    }

    #[test]
    fn commit_is_a_hash_or_unknown() {
        let root = crate::workspace_root();
        for commit in [git_commit(&root), BUILD_COMMIT.to_string()] {
            let hash = commit.trim_end_matches("-dirty");
            assert!(
                commit == "unknown"
                    || (hash.len() == 40 && hash.chars().all(|c| c.is_ascii_hexdigit())),
                "{commit}"
            );
        }
        let outside = tempfile::tempdir().unwrap();
        assert_eq!(git_commit(outside.path()), "unknown");
    }

    #[test]
    fn changed_results_leave_the_commit_clean_and_changed_code_does_not() {
        let repo = tempfile::tempdir().unwrap();
        let root = repo.path();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .args(["-C", root.to_str().unwrap()])
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .map(|o| o.status.success());
            assert!(matches!(ok, Ok(true)), "git {args:?}");
        };
        std::fs::create_dir_all(root.join("docs/results")).unwrap();
        std::fs::write(root.join("docs/results/x.md"), "old").unwrap();
        std::fs::write(root.join("code.rs"), "fn f() {}").unwrap();
        git(&["init", "-q"]);
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "x"]);
        let clean = git_commit(root);
        assert_eq!(clean.len(), 40, "{clean}");
        std::fs::write(root.join("docs/results/x.md"), "new").unwrap();
        assert_eq!(git_commit(root), clean);
        std::fs::write(root.join("code.rs"), "fn g() {}").unwrap();
        assert_eq!(git_commit(root), format!("{clean}-dirty"));
    }

    #[test]
    fn result_files_without_provenance_still_read() {
        let old = r#"{"experiment": "x", "description": "d", "mode": "quick", "seconds": 1.0,
            "summary": "s", "plots": [], "figures": {}}"#;
        let file: ResultFile = serde_json::from_str(old).unwrap();
        assert_eq!((file.commit.as_str(), file.command.as_str()), ("", ""));
    }

    #[test]
    fn report_lists_experiments_not_run_yet() {
        let out = tempfile::tempdir().unwrap();
        write_report(out.path()).unwrap();
        let report = std::fs::read_to_string(out.path().join("REPORT.md")).unwrap();
        assert!(
            report.contains(
                "Not run yet: datasets, kmeans, memory, ann, training, vq, ecvq, lifequant, lifequant-variants, aqm, wpq, minilm, cacl"
            ),
            "{report}"
        );
    }
}
