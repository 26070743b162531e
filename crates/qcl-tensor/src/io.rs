//! Validated safetensors I/O and atomic file writes.
//!
//! (Over 600 lines: the one writer and the validated reader share their file rules; a third is
//! tests.)
//!
//! Reading refuses truncated and foreign files with [`Error::BadFile`] and checks each tensor
//! against a [`TensorSpec`]. Writing goes to a temporary file in the same directory (unnamed,
//! Linux's `O_TMPFILE`, until it is complete, where the file system offers it), is synced,
//! then renamed over the target, so a crash or a full disk never leaves a half-written file
//! under the final name and never destroys the previous version. The writer refuses a target
//! that exists and is not a regular file (a directory, FIFO, socket or device), writes through
//! a symbolic link to the file it points to (the link stays), keeps the replaced file's
//! permissions, and removes the temporaries that killed writes to the same target left behind.
//! [`check_output`] also refuses a target that is one of a command's inputs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

use crate::integrity::{read_safetensors_bytes, serialize_safetensors, verify_checksum};
use crate::{Error, Result, TensorSpec};

/// Writes `bytes` to `path` atomically: temporary file in the same directory, fsync, rename.
///
/// Missing parent directories are created.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("out.json");
/// qcl_tensor::write_atomic(&path, b"{}")?;
/// assert_eq!(std::fs::read(&path)?, b"{}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Io`] naming the file; the target is then untouched and no temporary is left.
/// [`Error::InvalidParameter`] for a target that exists and is not a regular file, or a
/// dangling symbolic link.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill` writing into the temporary file.
///
/// # Errors
/// [`Error::Io`] naming the file if `fill` or any file operation fails.
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    fill: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (path, previous) = resolve_target(path.as_ref())?;
    let path = path.as_path();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| {
            Error::invalid_parameter("path", format!("{} names no file", path.display()))
        })?
        .to_string_lossy();
    sweep_stale_temporaries(&parent, &file_name);
    let temp = parent.join(format!(
        ".{file_name}.{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        // Unnamed until complete where the system allows it, so that a killed write leaves
        // nothing behind; else named, and swept by a later write to the same target.
        let (file, unnamed) = match unnamed_temporary(&parent) {
            Some(file) => (file, true),
            None => (fs::File::create(&temp)?, false),
        };
        let mut writer = std::io::BufWriter::new(file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        if let Some(previous) = &previous {
            file.set_permissions(previous.permissions())?;
        }
        file.sync_all()?;
        if unnamed {
            name_temporary(file, &temp)?;
        }
        fs::rename(&temp, path)?;
        // The rename itself reaches the disk with the directory (best effort: not every
        // system can sync a directory).
        let _ = fs::File::open(&parent).and_then(|d| d.sync_all());
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = fs::remove_file(&temp);
        Error::io(path, e)
    })
}

/// An unnamed file in `dir` (Linux's `O_TMPFILE`), or `None` where the system or the file
/// system does not offer one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn unnamed_temporary(dir: &Path) -> Option<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o666)
        .open(dir)
        .ok()
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn unnamed_temporary(_dir: &Path) -> Option<fs::File> {
    None
}

/// Gives the complete unnamed file the name `temp` (a hard link through `/proc/self/fd`), or,
/// where linking is not allowed, copies it there.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn name_temporary(mut file: fs::File, temp: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let source = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let target = std::ffi::CString::new(temp.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    } == 0;
    if !linked {
        let mut copy = fs::File::create(temp)?;
        copy.set_permissions(file.metadata()?.permissions())?;
        file.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut file, &mut copy)?;
        copy.sync_all()?;
    }
    Ok(())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn name_temporary(_file: fs::File, _temp: &Path) -> std::io::Result<()> {
    unreachable!("no unnamed temporaries here")
}

/// Refuses an output `target` that exists and is not a regular file, or that is the same file
/// (same device and inode, through any link) as one of `inputs`; commands call it before they
/// start, so that `--out` naming an input fails at once and leaves the input untouched.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let input = dir.path().join("in.safetensors");
/// std::fs::write(&input, b"data")?;
/// assert!(qcl_tensor::check_output(&input, &[input.as_path()]).is_err());
/// assert!(qcl_tensor::check_output(dir.path(), &[]).is_err()); // a directory
/// qcl_tensor::check_output(&dir.path().join("new.safetensors"), &[input.as_path()])?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] (`out`) naming the target and the reason.
pub fn check_output(target: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(meta) = fs::metadata(target) else {
        return Ok(()); // nothing there yet (or a dangling link, which the writer refuses)
    };
    refuse_special_file(target, &meta)?;
    for input in inputs {
        if fs::metadata(input).is_ok_and(|m| same_file(&m, &meta)) {
            return Err(Error::invalid_parameter(
                "out",
                format!(
                    "{} is also an input of this command ({}): refusing to overwrite it",
                    target.display(),
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses an existing target that is not a regular file.
fn refuse_special_file(target: &Path, meta: &fs::Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    Err(Error::invalid_parameter(
        "out",
        format!(
            "{} exists and is not a regular file (a directory, FIFO, socket or device): \
             refusing to replace it",
            target.display()
        ),
    ))
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.len() == b.len() && a.modified().ok() == b.modified().ok()
}

/// The file a write to `path` should replace (`path` itself, or the file a symbolic link points
/// to) and its metadata if it exists; refuses existing non-regular files and dangling links.
fn resolve_target(path: &Path) -> Result<(PathBuf, Option<fs::Metadata>)> {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let target = if is_link {
        fs::canonicalize(path).map_err(|e| {
            Error::invalid_parameter(
                "out",
                format!("{} is a symbolic link to nothing ({e})", path.display()),
            )
        })?
    } else {
        path.to_path_buf()
    };
    let existing = fs::metadata(&target).ok();
    if let Some(meta) = &existing {
        refuse_special_file(&target, meta)?;
    }
    Ok((target, existing))
}

/// Removes `.NAME.<pid>-<n>.tmp` files of `file_name` in `dir` whose process is gone (killed
/// writes); temporaries of live processes stay.
fn sweep_stale_temporaries(dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some(pid) = rest
            .split_once('-')
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this id runs (Linux: `/proc/<pid>`; elsewhere assumed alive, so
/// nothing is swept).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Writes named tensors and string metadata to a safetensors file, atomically, with the content
/// checksum of [`CHECKSUM_KEY`](crate::CHECKSUM_KEY) (a `checksum` entry of `metadata`, such as one copied from a
/// file read before, is replaced by the true one). The header's keys are sorted, so the same
/// tensors and metadata always give the same bytes.
///
/// ```
/// use std::collections::BTreeMap;
/// use candle_core::{Device, Tensor};
/// use qcl_tensor::{write_safetensors, SafetensorsFile};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("w.safetensors");
/// let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let meta = BTreeMap::from([("note".to_string(), "demo".to_string())]);
/// write_safetensors(&path, &[("w", &w)], &meta)?;
/// let file = SafetensorsFile::open(&path)?;
/// assert_eq!(file.names(), ["w"]);
/// assert_eq!(file.metadata()["note"], "demo");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a repeated or empty name, [`Error::Io`] on write failure.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    // Contiguous host copies, because safetensors stores dense row-major bytes.
    let host: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((*name, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let raw: Vec<_> = host
        .iter()
        .map(|(name, t)| (*name, View::dtype(t), t.dims(), View::data(t)))
        .collect();
    let bytes = serialize_safetensors(
        raw.iter()
            .map(|(name, dtype, shape, data)| (*name, *dtype, *shape, &data[..])),
        metadata,
    )?;
    drop(raw);
    drop(host);
    write_atomic(path, &bytes)
}

/// Dtype and shape of a stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
}

/// A safetensors file read into memory and checked to be complete and well formed.
///
/// ```
/// use qcl_tensor::SafetensorsFile;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("not.safetensors");
/// std::fs::write(&path, b"GIF89a, a foreign file")?;
/// assert!(matches!(SafetensorsFile::open(&path), Err(qcl_tensor::Error::BadFile { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Vec<u8>,
    names: Vec<String>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read, [`Error::BadFile`] if it is truncated, foreign, or
    /// holds a dtype qcl does not support.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_safetensors_bytes(path)?;
        Self::from_bytes(path, bytes)
    }

    /// Validates bytes that came from `path` (used only in messages).
    ///
    /// # Errors
    /// As [`open`](SafetensorsFile::open).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.into();
        let (names, metadata) = {
            let parsed = SafeTensors::deserialize(&bytes).map_err(|e| {
                Error::bad_file(&path, format!("not a complete safetensors file ({e})"))
            })?;
            let mut names: Vec<String> = parsed.names().into_iter().map(str::to_string).collect();
            names.sort();
            for name in &names {
                let view = parsed
                    .tensor(name)
                    .map_err(|e| Error::bad_file(&path, e.to_string()))?;
                candle_dtype(view.dtype()).ok_or_else(|| {
                    Error::bad_file(
                        &path,
                        format!(
                            "tensor `{name}` has dtype {:?}, which qcl does not read",
                            view.dtype()
                        ),
                    )
                })?;
            }
            let (_, header) = SafeTensors::read_metadata(&bytes)
                .map_err(|e| Error::bad_file(&path, e.to_string()))?;
            let metadata: BTreeMap<String, String> = header
                .metadata()
                .clone()
                .map(|m| m.into_iter().collect())
                .unwrap_or_default();
            verify_checksum(&path, &parsed, &metadata)?;
            (names, metadata)
        };
        Ok(SafetensorsFile {
            path,
            bytes,
            names,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Names of the stored tensors, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether a tensor of this name is stored.
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_ok()
    }

    /// The string metadata of the header (`__metadata__`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Checks that the `format` metadata is `expected`; `what` names the kind of file in the
    /// error (e.g. "a k-means model").
    ///
    /// # Errors
    /// [`Error::BadFile`] naming the file when `format` is missing or different.
    pub fn require_format(&self, expected: &str, what: &str) -> Result<()> {
        match self.metadata.get("format") {
            Some(found) if found == expected => Ok(()),
            Some(found) => Err(Error::bad_file(
                &self.path,
                format!("not {what}: format `{found}`, expected `{expected}`"),
            )),
            None => Err(Error::bad_file(
                &self.path,
                format!("not {what} (no `format` = {expected} metadata)"),
            )),
        }
    }

    /// The metadata value `key` parsed as a `T` (a number, usually).
    ///
    /// # Errors
    /// [`Error::BadFile`] naming the file and the key when it is missing or does not parse.
    pub fn metadata_value<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        self.metadata
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Error::bad_file(
                    &self.path,
                    format!("metadata `{key}` is missing or not a valid value"),
                )
            })
    }

    /// Dtype and shape of tensor `name`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] listing the names the file holds.
    pub fn info(&self, name: &str) -> Result<TensorInfo> {
        let parsed = self.parsed();
        let view = self.view(&parsed, name)?;
        Ok(TensorInfo {
            dtype: candle_dtype(view.dtype()).expect("dtypes checked at open"),
            shape: view.shape().to_vec(),
        })
    }

    /// Loads tensor `name` on `device` without further checks.
    ///
    /// # Errors
    /// [`Error::MissingTensor`].
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let parsed = self.parsed();
        let view = self.view(&parsed, name)?;
        let dtype = candle_dtype(view.dtype()).expect("dtypes checked at open");
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        Ok(tensor.to_device(device)?)
    }

    /// Loads tensor `name` and checks it against `spec`; errors name the file and the tensor.
    ///
    /// # Errors
    /// [`Error::MissingTensor`], [`Error::DTypeMismatch`], [`Error::ShapeMismatch`],
    /// [`Error::NonFinite`].
    pub fn read(&self, name: &str, spec: &TensorSpec, device: &Device) -> Result<Tensor> {
        let tensor = self.tensor(name, &Device::Cpu)?;
        spec.check(&format!("`{name}` of {}", self.path.display()), &tensor)?;
        Ok(tensor.to_device(device)?)
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated at open")
    }

    fn view<'a>(
        &self,
        parsed: &'a SafeTensors<'a>,
        name: &str,
    ) -> Result<safetensors::tensor::TensorView<'a>> {
        parsed.tensor(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
            available: self.names.clone(),
        })
    }
}

fn candle_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I64 => DType::I64,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_writer_refuses_special_files_and_follows_links() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        // A directory and a FIFO are refused and left alone.
        assert!(matches!(
            write_atomic(dir.path(), b"x"),
            Err(Error::InvalidParameter { .. })
        ));
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            assert!(matches!(
                write_atomic(&fifo, b"x"),
                Err(Error::InvalidParameter { .. })
            ));
            assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        }
        // Permissions of a replaced file are kept.
        let file = dir.path().join("kept.bin");
        fs::write(&file, b"old").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&file, b"new").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // A link stays a link; the file it points to gets the bytes.
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        write_atomic(&link, b"through").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&file).unwrap(), b"through");
        // A dangling link is refused.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
        assert!(write_atomic(&dangling, b"x").is_err());
        // An input named as the output is refused, through a link too.
        assert!(check_output(&link, &[file.as_path()]).is_err());
        assert!(check_output(&dir.path().join("fresh"), &[file.as_path()]).is_ok());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn temporaries_of_killed_writes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        // A pid that cannot exist (above the kernel's limit) and our own, live one.
        let dead = dir.path().join(".out.bin.4194305-0.tmp");
        let live = dir
            .path()
            .join(format!(".out.bin.{}-99.tmp", std::process::id()));
        let other = dir.path().join(".other.bin.4194305-0.tmp");
        for p in [&dead, &live, &other] {
            fs::write(p, b"partial").unwrap();
        }
        write_atomic(dir.path().join("out.bin"), b"done").unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(
            other.exists(),
            "only the target's own temporaries are swept"
        );
    }

    #[test]
    fn same_tensors_and_metadata_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[7u32, 8, 9], &Device::Cpu).unwrap();
        let meta: BTreeMap<String, String> = (0..12)
            .map(|i| (format!("key{i}"), format!("value \"{i}\"")))
            .collect();
        let files: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let path = dir.path().join(format!("{i}.safetensors"));
                write_safetensors(&path, &[("w", &w), ("b", &b)], &meta).unwrap();
                std::fs::read(&path).unwrap()
            })
            .collect();
        assert!(files.windows(2).all(|f| f[0] == f[1]));
        let file = SafetensorsFile::open(dir.path().join("0.safetensors")).unwrap();
        let mut read = file.metadata().clone();
        assert!(read.remove(crate::CHECKSUM_KEY).is_some());
        assert_eq!(read, meta);
        let back = file.tensor("w", &Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_eq!(
            file.tensor("b", &Device::Cpu)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            [7, 8, 9]
        );
    }

    fn sample_file(dir: &Path) -> Result<PathBuf> {
        let path = dir.join("s.safetensors");
        let a = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?;
        let b = Tensor::new(&[7u8, 8, 9], &Device::Cpu)?;
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &[("a", &a), ("b", &b)], &meta)?;
        Ok(path)
    }

    #[test]
    fn round_trip_with_metadata_and_infos() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let file = SafetensorsFile::open(sample_file(dir.path())?)?;
        assert_eq!(file.names(), ["a", "b"]);
        assert_eq!(file.metadata().get("k").map(String::as_str), Some("v"));
        assert_eq!(
            file.info("a")?,
            TensorInfo {
                dtype: DType::F32,
                shape: vec![2, 3]
            }
        );
        let a = file.read(
            "a",
            &TensorSpec::new()
                .dtype(DType::F32)
                .shape(&[Some(2), None])
                .finite(),
            &Device::Cpu,
        )?;
        assert_eq!(
            a.to_vec2::<f32>()?,
            vec![vec![1., 2., 3.], vec![4., 5., 6.]]
        );
        assert_eq!(
            file.tensor("b", &Device::Cpu)?.to_vec1::<u8>()?,
            vec![7, 8, 9]
        );
        Ok(())
    }

    #[test]
    fn truncated_file_is_a_bad_file_at_every_cut() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let bytes = fs::read(sample_file(dir.path())?).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = SafetensorsFile::from_bytes("cut", bytes[..cut].to_vec()).unwrap_err();
            assert!(matches!(err, Error::BadFile { .. }), "cut {cut}: {err}");
        }
        Ok(())
    }

    #[test]
    fn foreign_file_is_a_bad_file() {
        let err = SafetensorsFile::from_bytes("x.png", b"\x89PNG\r\n\x1a\n0000000000".to_vec())
            .unwrap_err();
        assert!(err.to_string().contains("x.png"), "{err}");
    }

    #[test]
    fn format_and_metadata_values_are_checked() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let file = SafetensorsFile::open(sample_file(dir.path())?)?;
        // `sample_file` writes `k = v` and no `format`.
        let err = file.require_format("qcl-x/1", "an x file").unwrap_err();
        assert!(err.to_string().contains("not an x file"), "{err}");
        assert!(matches!(
            file.metadata_value::<u32>("k"),
            Err(Error::BadFile { .. })
        ));
        assert!(matches!(
            file.metadata_value::<u32>("absent"),
            Err(Error::BadFile { .. })
        ));
        assert_eq!(file.metadata_value::<String>("k")?, "v");
        let path = dir.path().join("f.safetensors");
        let t = Tensor::new(&[1u8], &Device::Cpu)?;
        let meta = BTreeMap::from([
            ("format".to_string(), "qcl-x/1".to_string()),
            ("n".to_string(), "42".to_string()),
        ]);
        write_safetensors(&path, &[("t", &t)], &meta)?;
        let file = SafetensorsFile::open(&path)?;
        file.require_format("qcl-x/1", "an x file")?;
        assert!(file.require_format("qcl-x/2", "an x file").is_err());
        assert_eq!(file.metadata_value::<usize>("n")?, 42);
        Ok(())
    }

    #[test]
    fn missing_name_lists_what_is_there() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let file = SafetensorsFile::open(sample_file(dir.path())?)?;
        match file.tensor("c", &Device::Cpu) {
            Err(Error::MissingTensor {
                name, available, ..
            }) => {
                assert_eq!(name, "c");
                assert_eq!(available, vec!["a".to_string(), "b".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    }

    #[test]
    fn nan_tensor_fails_a_finite_spec() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.safetensors");
        let t = Tensor::new(&[0f32, f32::NAN], &Device::Cpu)?;
        write_safetensors(&path, &[("t", &t)], &BTreeMap::new())?;
        let file = SafetensorsFile::open(&path)?;
        let err = file
            .read("t", &TensorSpec::new().finite(), &Device::Cpu)
            .unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 1, .. }), "{err}");
        // Without the finiteness requirement it loads.
        file.tensor("t", &Device::Cpu)?;
        Ok(())
    }

    #[test]
    fn duplicate_names_are_refused_and_nothing_is_written() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.safetensors");
        let t = Tensor::new(&[1f32], &Device::Cpu)?;
        assert!(write_safetensors(&path, &[("t", &t), ("t", &t)], &BTreeMap::new()).is_err());
        assert!(!path.exists());
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn any_shape_and_dtype_round_trips(
            dims in proptest::collection::vec(1usize..5, 0..4),
            dtype_index in 0usize..5,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let dtype = [DType::F32, DType::F64, DType::F16, DType::U8, DType::U32][dtype_index];
            let t = crate::Seed(seed)
                .rng()
                .uniform_tensor(dims.as_slice(), 0.0, 200.0, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.safetensors");
            write_safetensors(&path, &[("t", &t)], &BTreeMap::new()).unwrap();
            let back = SafetensorsFile::open(&path).unwrap().tensor("t", &Device::Cpu).unwrap();
            proptest::prop_assert_eq!(back.dtype(), dtype);
            proptest::prop_assert_eq!(back.dims(), t.dims());
            let a = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            let b = back.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            proptest::prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.txt");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("keep.txt"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
