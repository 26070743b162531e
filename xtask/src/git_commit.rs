// `git_commit`, shared by `build.rs` (which records the commit the program is built from) and
// the tests of `reproduce.rs` (through `include!`, so there is one definition).

/// `git rev-parse HEAD` of the repository at `root`, with `-dirty` appended when a tracked file
/// differs from it (untracked files do not count, as for `git describe --dirty`, nor do the
/// results under `docs/results/`, which are the output, not the code: one experiment's results
/// written before the next starts leave the commit clean); `unknown` without git or outside a
/// repository.
fn git_commit(root: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]).filter(|h| !h.is_empty()) else {
        return "unknown".into();
    };
    match git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)docs/results",
    ]) {
        Some(changes) if changes.is_empty() => head,
        _ => format!("{head}-dirty"),
    }
}
