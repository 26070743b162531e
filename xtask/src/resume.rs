//! Finished pieces of a long experiment, kept on disk so that a `--full` run stopped part-way
//! (a closed laptop, a killed job) starts again where it stopped instead of from nothing.
//!
//! A piece is stored under `data/resume/<experiment>/<mode>/<commit>/<settings>/<key>` (the
//! context's [`resume_dir`](Context::resume_dir); delete it to start over), where
//! `<settings>` is a hash of the settings that shape the piece. Pieces are kept only at a clean
//! commit: the commit names the code that made them, so a piece is never reused by other code,
//! and a resumed run's results are the bytes an uninterrupted run would have written (the JSON
//! round trip of `f64` is exact). A piece that cannot be read back is computed again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use qcl_tensor::{write_atomic, write_safetensors, SafetensorsFile};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::reproduce::Context;

/// Where the pieces of one experiment go, and how many were reused.
#[derive(Debug, Clone)]
pub struct Resume {
    dir: Option<PathBuf>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    reused: AtomicUsize,
    computed: AtomicUsize,
}

impl Resume {
    /// The store of `experiment` under `ctx`'s resume directory, or one that keeps nothing
    /// without that directory or when the commit is unknown or has uncommitted changes (the
    /// pieces could not name their code).
    pub fn new(ctx: &Context, experiment: &str) -> Self {
        Resume {
            dir: ctx
                .resume_dir
                .as_ref()
                .filter(|_| ctx.at_clean_commit())
                .map(|root| {
                    root.join(experiment)
                        .join(ctx.mode.name())
                        .join(&ctx.commit)
                }),
            counts: Arc::default(),
        }
    }

    /// The store for pieces shaped by `settings` (hashed into the path); counts are shared
    /// with `self`.
    pub fn scope(&self, settings: &impl Serialize) -> Result<Self> {
        let json = serde_json::to_vec(settings).context("hashing the settings")?;
        let hash: String = Sha256::digest(&json)
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Resume {
            dir: self.dir.as_ref().map(|d| d.join(hash)),
            counts: Arc::clone(&self.counts),
        })
    }

    /// The piece `key`: read back when an earlier start stored it, else `compute`d and stored.
    pub fn json<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        compute: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        Ok(self
            .with_tensors(key, || Ok((compute()?, BTreeMap::new())))?
            .0)
    }

    /// As [`Resume::json`] for a piece that also holds named tensors (stored as safetensors;
    /// the JSON is written last, so it marks the piece complete).
    pub fn with_tensors<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        compute: impl FnOnce() -> Result<(T, BTreeMap<String, Tensor>)>,
    ) -> Result<(T, BTreeMap<String, Tensor>)> {
        let Some(dir) = &self.dir else {
            self.counts.computed.fetch_add(1, Ordering::Relaxed);
            return compute();
        };
        let (json, tensors) = (
            dir.join(format!("{key}.json")),
            dir.join(format!("{key}.safetensors")),
        );
        if let Some(found) = read_piece(&json, &tensors) {
            self.counts.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(found);
        }
        let (value, named) = compute()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !named.is_empty() {
            let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
            write_safetensors(&tensors, &refs, &BTreeMap::new())?;
        }
        write_atomic(&json, &serde_json::to_vec(&value)?)?;
        self.counts.computed.fetch_add(1, Ordering::Relaxed);
        Ok((value, named))
    }

    /// Pieces read back from an earlier start.
    pub fn reused(&self) -> usize {
        self.counts.reused.load(Ordering::Relaxed)
    }

    /// Pieces computed by this start.
    pub fn computed(&self) -> usize {
        self.counts.computed.load(Ordering::Relaxed)
    }

    /// One sentence for the results when pieces were reused, else `None`.
    pub fn note(&self) -> Option<String> {
        let reused = self.reused();
        (reused > 0).then(|| {
            format!(
                "This run resumed an earlier start of the same build: {reused} of {} pieces \
                 (each one training run) were read back from it, with the seconds that start \
                 measured; the total seconds above are this start's.",
                reused + self.computed()
            )
        })
    }
}

fn read_piece<T: DeserializeOwned>(
    json: &Path,
    tensors: &Path,
) -> Option<(T, BTreeMap<String, Tensor>)> {
    let value = serde_json::from_slice(&std::fs::read(json).ok()?).ok()?;
    let mut named = BTreeMap::new();
    if tensors.is_file() {
        let file = SafetensorsFile::open(tensors).ok()?;
        for name in file.names() {
            named.insert(name.clone(), file.tensor(name, &Device::Cpu).ok()?);
        }
    }
    Some((value, named))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reproduce::Mode;

    fn context(dir: &Path, commit: &str) -> Context {
        let mut ctx = Context::new(dir.into(), dir.join("out"), Mode::Quick, "test".into());
        ctx.commit = commit.into();
        ctx.resume_dir = Some(dir.join("resume"));
        ctx
    }

    use crate::reproduce::TEST_COMMIT as COMMIT;

    #[test]
    fn a_stored_piece_is_read_back_with_its_tensors_and_not_computed_again() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Resume::new(&context(dir.path(), COMMIT), "demo").scope(&[1, 2])?;
        let t = Tensor::new(&[0.1f32, -2.5, 3.25], &Device::Cpu)?;
        let first = store.with_tensors("seed0", || {
            Ok((0.1f64 + 0.2, BTreeMap::from([("w".to_string(), t.clone())])))
        })?;
        let again = Resume::new(&context(dir.path(), COMMIT), "demo").scope(&[1, 2])?;
        let second: (f64, _) = again.with_tensors("seed0", || anyhow::bail!("computed again"))?;
        assert_eq!(first.0.to_bits(), second.0.to_bits());
        assert_eq!(second.1["w"].to_vec1::<f32>()?, t.to_vec1::<f32>()?);
        assert_eq!((again.reused(), again.computed()), (1, 0));
        assert!(again.note().unwrap().contains("1 of 1 pieces"));
        // Other settings, another commit: a different store.
        let other = Resume::new(&context(dir.path(), COMMIT), "demo").scope(&[1, 3])?;
        assert_eq!(other.json("seed0", || Ok(7u32))?, 7);
        let other_commit = Resume::new(&context(dir.path(), &COMMIT.replace('0', "f")), "demo");
        assert_eq!(other_commit.json("seed0", || Ok(8u32))?, 8);
        Ok(())
    }

    #[test]
    fn nothing_is_kept_at_a_dirty_or_unknown_commit() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for commit in [format!("{COMMIT}-dirty"), "unknown".into(), String::new()] {
            let store = Resume::new(&context(dir.path(), &commit), "demo");
            assert_eq!(store.json("k", || Ok(1u8))?, 1);
            assert_eq!(store.json("k", || Ok(2u8))?, 2, "{commit}: reused");
            assert_eq!((store.reused(), store.computed()), (0, 2));
            assert!(store.note().is_none());
        }
        let mut without_dir = context(dir.path(), COMMIT);
        without_dir.resume_dir = None;
        let store = Resume::new(&without_dir, "demo");
        store.json("k", || Ok(1u8))?;
        assert_eq!(store.json("k", || Ok(2u8))?, 2);
        assert!(!dir.path().join("resume").exists());
        Ok(())
    }

    #[test]
    fn an_unreadable_piece_is_computed_again() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Resume::new(&context(dir.path(), COMMIT), "demo");
        store.json("k", || Ok(vec![1.5f64]))?;
        let path = dir
            .path()
            .join(format!("resume/demo/quick/{COMMIT}/k.json"));
        std::fs::write(&path, b"{ truncated")?;
        assert_eq!(store.json("k", || Ok(vec![2.5f64]))?, [2.5]);
        assert_eq!(store.json("k", || Ok(vec![9.0f64]))?, [2.5]);
        Ok(())
    }
}
