//! Records the commit the program is built from as `QCL_BUILD_COMMIT`, so that a result names
//! the code that made it even when the workspace moves on during a long run.

include!("src/git_commit.rs");

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest)
        .parent()
        .expect("xtask lives in the workspace");
    // A commit moves HEAD, a branch ref or the index; a code change touches a source file.
    for watched in [
        ".git/HEAD",
        ".git/index",
        ".git/refs/heads",
        ".git/packed-refs",
        "Cargo.toml",
        "Cargo.lock",
        "crates",
        "xtask/src",
        "xtask/build.rs",
        "xtask/Cargo.toml",
        "xtask/peers",
        "fixtures",
    ] {
        let path = root.join(watched);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rustc-env=QCL_BUILD_COMMIT={}", git_commit(root));
}
