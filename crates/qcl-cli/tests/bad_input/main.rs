//! The bad-input suite: every loader under mutation, every command with out-of-range flags,
//! special-file and same-file `--out`, a closed standard output, and temporaries of killed
//! writes. A case fails when qcl panics, aborts, hangs, breaks the one-JSON-object contract,
//! reports a bug (`internal`), or overwrites what it must not.
//!
//! `cargo test -p qcl-cli --test bad_input -- --nocapture` prints the count of cases and
//! failures per part. `QCL_BAD_INPUT_CASES=N` sets the mutations per loader (default 24, as in
//! CI; the longer run in `docs/results/bad-input.md` uses more).

mod commands;
#[path = "../common/mod.rs"]
mod common;
mod loaders;

use std::fmt::Write as _;

/// Cases run and failures (each described) of one part of the suite.
#[derive(Default)]
pub struct Tally {
    pub cases: usize,
    pub failures: Vec<String>,
}

impl Tally {
    /// Counts a case; `Err` describes its failure.
    pub fn record(&mut self, outcome: Result<(), String>) {
        self.cases += 1;
        if let Err(failure) = outcome {
            self.failures.push(failure);
        }
    }
}

#[test]
fn bad_input_suite() {
    let parts: Vec<(&str, Tally)> = vec![
        ("loaders under mutation", loaders::run()),
        ("out-of-range flags", commands::flags()),
        ("special and same-file --out", commands::outputs()),
        ("closed standard output", commands::closed_stdout()),
        ("temporaries of killed writes", commands::killed_writes()),
    ];
    let mut summary = String::from("bad-input suite\n");
    let (mut cases, mut failures) = (0, 0);
    for (name, tally) in &parts {
        writeln!(
            summary,
            "  {name:<32} {:>6} cases {:>4} failures",
            tally.cases,
            tally.failures.len()
        )
        .unwrap();
        for failure in tally.failures.iter().take(20) {
            writeln!(summary, "    FAIL {failure}").unwrap();
        }
        cases += tally.cases;
        failures += tally.failures.len();
    }
    writeln!(
        summary,
        "  {:<32} {cases:>6} cases {failures:>4} failures",
        "total"
    )
    .unwrap();
    println!("{summary}");
    if let Ok(path) = std::env::var("QCL_BAD_INPUT_REPORT") {
        write_report(&path, &summary);
    }
    assert_eq!(failures, 0, "{summary}");
}

/// Writes the summary as a Markdown result with the commit and the command that made it.
fn write_report(path: &str, summary: &str) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let cases = std::env::var("QCL_BAD_INPUT_CASES").unwrap_or_else(|_| "24".into());
    let report = format!(
        "# Bad-input suite\n\n\
         Commit `{commit}`{}; command `QCL_BAD_INPUT_CASES={cases} QCL_BAD_INPUT_REPORT=docs/results/bad-input.md \
         cargo test -p qcl-cli --test bad_input -- --nocapture` ({cases} mutations per loader; CI runs 24).\n\n\
         A case fails when qcl panics, aborts, hangs (60 s), breaks the one-JSON-object \
         contract, reports a bug (`internal`), accepts an output it must refuse, or changes \
         what it must not.\n\n```text\n{summary}```\n",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    // A relative path is taken from the workspace root (tests run in the crate's folder).
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    qcl_tensor::write_atomic(path, report.as_bytes()).unwrap();
}
