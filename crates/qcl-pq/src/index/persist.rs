//! Any index in one safetensors file: [`AnyIndex`].
//!
//! Layout (`format` = [`INDEX_FORMAT`]): metadata `kind` names the layers outermost first,
//! joined by `+` (`refine+ivf-pq`, `pq`, …), with `dim`, `metric`, `m`, `nbits`, `next_id`
//! and each layer's knobs; tensors, each under its layer's name:
//! - `pq.codebooks` `f32 [m, ksub, dsub]`;
//! - `lists.sizes` `i64 [nlist]`, `lists.codes` `u8` (every list's blocked codes, list after
//!   list), `lists.ids` `i64 [n]` (a flat index is one list);
//! - `ivf.centroids` `f32 [nlist, dim]`;
//! - `refine.vectors` `f32 [n, dim]`, `refine.ids` `i64 [n]`;
//! - `rotation.matrix` `f32 [dim, dim]` (an `opq` layer).
//!
//! The file carries the content checksum every qcl file carries; a damaged, truncated or
//! foreign file is a typed error.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{write_safetensors, Error, Result, SafetensorsFile, TensorSpec};

use super::blocks::BlockedCodes;
use super::flat::SearchConfig;
use super::ivf::InvertedList;
use super::opq::Rotation;
use super::{IvfPqIndex, Metric, Neighbors, PqIndex, Refine, Rotated, VectorIndex};
use crate::ProductQuantizer;

/// Value of the `format` metadata key of a saved index.
pub const INDEX_FORMAT: &str = "qcl-index/1";

/// Any index qcl builds, as one value: what `qcl index` loads and saves.
///
/// ```
/// use qcl_pq::index::{AnyIndex, PqIndex, PqIndexConfig, Refine, VectorIndex};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(1_000 * 8, 0.0, 1.0);
/// let pq = PqIndex::train(&data, 8, &PqIndexConfig::new(4, 4))?;
/// let mut index = AnyIndex::Refine(Box::new(Refine::new(AnyIndex::Pq(pq), 4)?));
/// index.add(&data)?;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("index.safetensors");
/// index.save(&path)?;
/// let loaded = AnyIndex::load(&path)?;
/// assert_eq!(loaded.kind(), "refine+pq");
/// assert_eq!(loaded.search(&data[..8], 3)?, index.search(&data[..8], 3)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum AnyIndex {
    /// A flat PQ index.
    Pq(PqIndex),
    /// An IVF-PQ index.
    IvfPq(IvfPqIndex),
    /// Another index re-ranked with exact vectors.
    Refine(Box<Refine<AnyIndex>>),
    /// Another index behind a learned rotation.
    Rotated(Box<Rotated<AnyIndex>>),
}

impl AnyIndex {
    /// The layers, outermost first, joined by `+`: e.g. `refine+ivf-pq`.
    pub fn kind(&self) -> String {
        match self {
            AnyIndex::Pq(_) => "pq".into(),
            AnyIndex::IvfPq(_) => "ivf-pq".into(),
            AnyIndex::Refine(r) => format!("refine+{}", r.inner().kind()),
            AnyIndex::Rotated(r) => format!("opq+{}", r.inner().kind()),
        }
    }

    /// The product quantizer at the core.
    pub fn quantizer(&self) -> &ProductQuantizer {
        match self {
            AnyIndex::Pq(i) => i.quantizer(),
            AnyIndex::IvfPq(i) => i.quantizer(),
            AnyIndex::Refine(r) => r.inner().quantizer(),
            AnyIndex::Rotated(r) => r.inner().quantizer(),
        }
    }

    /// Bytes of codes, ids and lists, plus exact vectors when re-ranking.
    pub fn memory_bytes(&self) -> usize {
        match self {
            AnyIndex::Pq(i) => i.memory_bytes(),
            AnyIndex::IvfPq(i) => i.memory_bytes(),
            AnyIndex::Refine(r) => {
                r.inner().memory_bytes() + r.vectors().0.len() * 4 + r.vectors().1.len() * 8
            }
            AnyIndex::Rotated(r) => r.inner().memory_bytes() + r.rotation().matrix().len() * 4,
        }
    }

    /// What `qcl index info` shows: kind, shape, knobs and sizes, as text pairs.
    pub fn describe(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let pq = self.quantizer();
        out.insert("kind".into(), self.kind());
        out.insert("dim".into(), self.dim().to_string());
        out.insert("metric".into(), self.metric().to_string());
        out.insert("vectors".into(), self.len().to_string());
        out.insert("m".into(), pq.m().to_string());
        out.insert("nbits".into(), pq.nbits().to_string());
        out.insert("code_bytes_per_vector".into(), pq.code_size().to_string());
        out.insert("memory_bytes".into(), self.memory_bytes().to_string());
        self.visit(&mut |layer| match layer {
            AnyIndex::IvfPq(i) => {
                out.insert("nlist".into(), i.nlist().to_string());
                out.insert("by_residual".into(), i.by_residual().to_string());
                out.insert(
                    "precomputed_tables".into(),
                    i.precomputed_tables().to_string(),
                );
            }
            AnyIndex::Refine(r) => {
                out.insert("k_factor".into(), r.k_factor().to_string());
            }
            AnyIndex::Rotated(_) => {
                out.insert("rotation".into(), "opq".into());
            }
            AnyIndex::Pq(_) => {}
        });
        out
    }

    /// Writes the index to `path` (atomically, with a checksum).
    ///
    /// # Errors
    /// [`Error::Io`] on write failure; [`Error::InvalidParameter`] if `path` is not a regular
    /// file's.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let pq = self.quantizer();
        let mut metadata = BTreeMap::from([
            ("format".to_string(), INDEX_FORMAT.to_string()),
            ("kind".to_string(), self.kind()),
            ("dim".to_string(), self.dim().to_string()),
            ("metric".to_string(), self.metric().name().to_string()),
            ("m".to_string(), pq.m().to_string()),
            ("nbits".to_string(), pq.nbits().to_string()),
            ("next_id".to_string(), self.next_id().to_string()),
        ]);
        let cpu = &Device::Cpu;
        tensors.push((
            "pq.codebooks".into(),
            Tensor::from_vec(pq.codebooks().to_vec(), (pq.m(), pq.ksub(), pq.dsub()), cpu)?,
        ));
        let mut failure = None;
        self.visit(&mut |layer| {
            let result = save_layer(layer, &mut tensors, &mut metadata);
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_safetensors(path, &named, &metadata)
    }

    /// Reads an index written by [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::BadFile`] for a damaged (checksum),
    /// truncated or foreign file, an unknown kind or inconsistent metadata;
    /// [`Error::MissingTensor`], [`Error::DTypeMismatch`], [`Error::ShapeMismatch`],
    /// [`Error::NonFinite`] for bad tensors.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(INDEX_FORMAT, "a qcl vector index")?;
        let bad = |reason: String| Error::bad_file(path, reason);
        let kind: String = file.metadata_value("kind")?;
        let metric: Metric = file
            .metadata_value::<String>("metric")?
            .parse()
            .map_err(|e| bad(format!("metadata `metric`: {e}")))?;
        let layers: Vec<&str> = kind.split('+').collect();
        let (core, wrappers) = layers.split_last().expect("split yields one part");
        let pq = read_quantizer(&file).map_err(|e| bad(format!("the quantizer: {e}")))?;
        let lists = read_lists(&file, &pq)?;
        let mut index = match *core {
            "pq" => {
                let [list] = <[InvertedList; 1]>::try_from(lists)
                    .map_err(|_| bad("a flat index holds exactly one list".into()))?;
                AnyIndex::Pq(PqIndex::from_parts(metric, pq, list.codes, list.ids)?)
            }
            "ivf-pq" => {
                let by_residual: bool = file.metadata_value("by_residual")?;
                let precomputed: bool = file.metadata_value("precomputed_tables")?;
                let spec = TensorSpec::new()
                    .dtype(DType::F32)
                    .shape(&[Some(lists.len()), Some(pq.dim())])
                    .finite();
                let centroids = file.read("ivf.centroids", &spec, &Device::Cpu)?;
                let centroids = centroids.flatten_all()?.to_vec1::<f32>()?;
                AnyIndex::IvfPq(IvfPqIndex::from_parts(
                    metric,
                    by_residual,
                    precomputed,
                    centroids,
                    pq,
                    lists,
                )?)
            }
            other => return Err(bad(format!("unknown index kind {other:?} in `{kind}`"))),
        };
        for &wrapper in wrappers.iter().rev() {
            index = match wrapper {
                "refine" if !matches!(index, AnyIndex::Refine(_)) => {
                    let k_factor: usize = file.metadata_value("k_factor")?;
                    let (vectors, ids) = read_rows(&file, "refine", index.dim())?;
                    AnyIndex::Refine(Box::new(Refine::from_parts(index, k_factor, vectors, ids)?))
                }
                "opq" if !matches!(index, AnyIndex::Rotated(_)) => {
                    let dim = index.dim();
                    let spec = TensorSpec::new()
                        .dtype(DType::F32)
                        .shape(&[Some(dim), Some(dim)])
                        .finite();
                    let matrix = file.read("rotation.matrix", &spec, &Device::Cpu)?;
                    let rotation = Rotation::from_matrix(dim, matrix.flatten_all()?.to_vec1()?)
                        .map_err(|e| bad(format!("`rotation.matrix`: {e}")))?;
                    AnyIndex::Rotated(Box::new(Rotated::from_parts(rotation, index)?))
                }
                other => return Err(bad(format!("unexpected layer {other:?} in `{kind}`"))),
            };
        }
        let next_id: u64 = file.metadata_value("next_id")?;
        index.raise_next_id(next_id);
        Ok(index)
    }

    /// Calls `f` on every layer, outermost first.
    fn visit(&self, f: &mut impl FnMut(&AnyIndex)) {
        f(self);
        match self {
            AnyIndex::Refine(r) => r.inner().visit(f),
            AnyIndex::Rotated(r) => r.inner().visit(f),
            AnyIndex::Pq(_) | AnyIndex::IvfPq(_) => {}
        }
    }

    fn raise_next_id(&mut self, next_id: u64) {
        match self {
            AnyIndex::Pq(i) => i.raise_next_id(next_id),
            AnyIndex::IvfPq(i) => i.raise_next_id(next_id),
            AnyIndex::Refine(r) => r.inner_mut().raise_next_id(next_id),
            AnyIndex::Rotated(r) => r.inner_mut().raise_next_id(next_id),
        }
    }

    fn as_dyn(&self) -> &dyn VectorIndex {
        match self {
            AnyIndex::Pq(i) => i,
            AnyIndex::IvfPq(i) => i,
            AnyIndex::Refine(r) => r.as_ref(),
            AnyIndex::Rotated(r) => r.as_ref(),
        }
    }

    fn as_dyn_mut(&mut self) -> &mut dyn VectorIndex {
        match self {
            AnyIndex::Pq(i) => i,
            AnyIndex::IvfPq(i) => i,
            AnyIndex::Refine(r) => r.as_mut(),
            AnyIndex::Rotated(r) => r.as_mut(),
        }
    }
}

impl VectorIndex for AnyIndex {
    fn dim(&self) -> usize {
        self.as_dyn().dim()
    }

    fn metric(&self) -> Metric {
        self.as_dyn().metric()
    }

    fn len(&self) -> usize {
        self.as_dyn().len()
    }

    fn next_id(&self) -> u64 {
        self.as_dyn().next_id()
    }

    fn add_with_ids(&mut self, data: &[f32], ids: &[u64]) -> Result<()> {
        self.as_dyn_mut().add_with_ids(data, ids)
    }

    fn remove(&mut self, ids: &[u64]) -> usize {
        self.as_dyn_mut().remove(ids)
    }

    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors> {
        self.as_dyn().search_with(queries, options)
    }
}

/// Adds one layer's own tensors and metadata (the quantizer is written once, by the caller).
fn save_layer(
    layer: &AnyIndex,
    tensors: &mut Vec<(String, Tensor)>,
    metadata: &mut BTreeMap<String, String>,
) -> Result<()> {
    let cpu = &Device::Cpu;
    match layer {
        AnyIndex::Pq(i) => push_lists(tensors, [(i.codes(), i.ids())].into_iter()),
        AnyIndex::IvfPq(i) => {
            metadata.insert("nlist".into(), i.nlist().to_string());
            metadata.insert("by_residual".into(), i.by_residual().to_string());
            metadata.insert(
                "precomputed_tables".into(),
                i.precomputed_tables().to_string(),
            );
            let centroids = Tensor::from_vec(i.centroids().to_vec(), (i.nlist(), i.dim()), cpu)?;
            tensors.push(("ivf.centroids".into(), centroids));
            push_lists(tensors, (0..i.nlist()).map(|l| i.list(l)))
        }
        AnyIndex::Rotated(r) => {
            let dim = r.dim();
            let matrix = Tensor::from_vec(r.rotation().matrix().to_vec(), (dim, dim), cpu)?;
            tensors.push(("rotation.matrix".into(), matrix));
            Ok(())
        }
        AnyIndex::Refine(r) => {
            metadata.insert("k_factor".into(), r.k_factor().to_string());
            let (vectors, ids) = r.vectors();
            let dim = r.dim();
            tensors.push((
                "refine.vectors".into(),
                Tensor::from_vec(vectors.to_vec(), (ids.len(), dim), cpu)?,
            ));
            tensors.push(("refine.ids".into(), ids_tensor(ids)?));
            Ok(())
        }
    }
}

fn push_lists<'a>(
    tensors: &mut Vec<(String, Tensor)>,
    lists: impl Iterator<Item = (&'a BlockedCodes, &'a [u64])>,
) -> Result<()> {
    let (mut sizes, mut codes, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for (list_codes, list_ids) in lists {
        sizes.push(list_ids.len() as i64);
        codes.extend_from_slice(list_codes.bytes());
        ids.extend_from_slice(list_ids);
    }
    let cpu = &Device::Cpu;
    let nlist = sizes.len();
    let n_codes = codes.len();
    tensors.push(("lists.sizes".into(), Tensor::from_vec(sizes, nlist, cpu)?));
    tensors.push(("lists.codes".into(), Tensor::from_vec(codes, n_codes, cpu)?));
    tensors.push(("lists.ids".into(), ids_tensor(&ids)?));
    Ok(())
}

/// Ids are stored as `i64` (safetensors has no `u64` in candle), bit for bit.
fn ids_tensor(ids: &[u64]) -> Result<Tensor> {
    let raw: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    Ok(Tensor::from_vec(raw, ids.len(), &Device::Cpu)?)
}

fn read_ids(file: &SafetensorsFile, name: &str, n: usize) -> Result<Vec<u64>> {
    let spec = TensorSpec::new().dtype(DType::I64).shape(&[Some(n)]);
    let raw = file.read(name, &spec, &Device::Cpu)?.to_vec1::<i64>()?;
    Ok(raw.into_iter().map(|id| id as u64).collect())
}

fn read_quantizer(file: &SafetensorsFile) -> Result<ProductQuantizer> {
    let dim: usize = file.metadata_value("dim")?;
    let m: usize = file.metadata_value("m")?;
    let nbits: u32 = file.metadata_value("nbits")?;
    if !(nbits == 4 || nbits == 8) || m == 0 || dim == 0 || !dim.is_multiple_of(m) {
        return Err(Error::invalid_parameter(
            "metadata",
            format!("dim = {dim}, m = {m}, nbits = {nbits} is not an index's shape"),
        ));
    }
    let spec = TensorSpec::new()
        .dtype(DType::F32)
        .shape(&[Some(m), Some(1 << nbits), Some(dim / m)])
        .finite();
    let codebooks = file.read("pq.codebooks", &spec, &Device::Cpu)?;
    ProductQuantizer::from_codebooks(dim, m, nbits, codebooks.flatten_all()?.to_vec1::<f32>()?)
}

fn read_lists(file: &SafetensorsFile, pq: &ProductQuantizer) -> Result<Vec<InvertedList>> {
    let bad = |reason: String| Error::bad_file(file.path(), reason);
    let sizes_spec = TensorSpec::new().dtype(DType::I64).rank(1);
    let sizes = file
        .read("lists.sizes", &sizes_spec, &Device::Cpu)?
        .to_vec1::<i64>()?;
    if sizes.iter().any(|&s| s < 0) {
        return Err(bad("a negative list size".into()));
    }
    let n: usize = sizes.iter().map(|&s| s as usize).sum();
    let ids = read_ids(file, "lists.ids", n)?;
    let codes_spec = TensorSpec::new().dtype(DType::U8).rank(1);
    let codes = file
        .read("lists.codes", &codes_spec, &Device::Cpu)?
        .to_vec1::<u8>()?;
    let per_block = BlockedCodes::new(pq.m(), pq.nbits())?.runs() * super::blocks::BLOCK;
    let (mut lists, mut at_code, mut at_id) = (Vec::with_capacity(sizes.len()), 0, 0);
    for &size in &sizes {
        let size = size as usize;
        let bytes = size.div_ceil(super::blocks::BLOCK) * per_block;
        let chunk = codes
            .get(at_code..at_code + bytes)
            .ok_or_else(|| bad("`lists.codes` is shorter than the list sizes need".into()))?;
        let list_codes = BlockedCodes::from_bytes(chunk.to_vec(), size, pq.m(), pq.nbits())
            .map_err(|e| bad(format!("`lists.codes`: {e}")))?;
        lists.push(InvertedList {
            codes: list_codes,
            ids: ids[at_id..at_id + size].to_vec(),
        });
        at_code += bytes;
        at_id += size;
    }
    if at_code != codes.len() {
        return Err(bad(
            "`lists.codes` is longer than the list sizes need".into()
        ));
    }
    Ok(lists)
}

fn read_rows(file: &SafetensorsFile, layer: &str, dim: usize) -> Result<(Vec<f32>, Vec<u64>)> {
    let spec = TensorSpec::new()
        .dtype(DType::F32)
        .shape(&[None, Some(dim)])
        .finite();
    let vectors = file.read(&format!("{layer}.vectors"), &spec, &Device::Cpu)?;
    let n = vectors.dim(0)?;
    let ids = read_ids(file, &format!("{layer}.ids"), n)?;
    Ok((vectors.flatten_all()?.to_vec1::<f32>()?, ids))
}
