//! faiss-cpu as a process answering build and search commands (`xtask/peers/faiss_ann.py
//! --serve`), so that its search rounds alternate with ours.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

/// A running peer over one data set.
pub struct FaissPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The peer script, kept with the benchmarks.
pub fn script() -> PathBuf {
    crate::workspace_root().join("xtask/peers/faiss_ann.py")
}

impl FaissPeer {
    /// Starts `python faiss_ann.py --serve` on the three `.npy` files, 2 threads.
    pub fn start(python: &str, files: &[PathBuf; 3], metric: &str) -> Result<Self> {
        let mut command = Command::new(python);
        command
            .arg(script())
            .args(["--base", &path(&files[0]), "--queries", &path(&files[1])])
            .args(["--truth", &path(&files[2]), "--metric", metric])
            .args(["--threads", "2", "--serve"])
            // Idle OpenMP threads sleep at once instead of spinning on the cores while qcl's
            // rounds are timed.
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(core) = super::super::kmeans::openblas_core() {
            command.env("OPENBLAS_CORETYPE", core);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {python}"))?;
        let stdin = child.stdin.take().context("peer stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        Ok(FaissPeer {
            child,
            stdin,
            stdout,
        })
    }

    /// Builds (trains and fills) the index `config` names; the reply has its timings.
    pub fn build(&mut self, config: &Value) -> Result<Value> {
        self.ask(&json!({"op": "build", "config": config}))
    }

    /// One timed search of every query; the reply has `seconds` and the recalls.
    pub fn search(&mut self, knobs: &Value) -> Result<Value> {
        self.ask(&json!({"op": "search", "knobs": knobs}))
    }

    fn ask(&mut self, command: &Value) -> Result<Value> {
        writeln!(self.stdin, "{command}").context("writing to faiss")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("faiss ended without answering {command}");
        }
        serde_json::from_str(&line).with_context(|| format!("faiss answered {line:?}"))
    }
}

impl Drop for FaissPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
