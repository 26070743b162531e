//! The parts of the `qcl` command that other tools reuse: the METHOD syntax of
//! `qcl wpq compress-checkpoint --rule PATTERN=METHOD` and the checkpoint hash that ties a
//! calibration file or a compressed checkpoint to the model it was made from.

pub mod method_spec;

use std::io::Read as _;
use std::path::Path;

use qcl_tensor::{Error, Result};
use sha2::{Digest, Sha256};

/// Metadata key of compressed checkpoints and calibration files: the SHA-256 of the checkpoint
/// they were made from, so that a file is not used with another model.
pub const CHECKPOINT_SHA256_KEY: &str = "qcl.checkpoint.sha256";

/// Lowercase hex SHA-256 of the file at `path`, read in blocks.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("x");
/// std::fs::write(&path, b"abc")?;
/// assert_eq!(qcl_cli::sha256_file(&path)?,
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
