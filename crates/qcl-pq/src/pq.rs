//! Product quantization (Jégou, Douze & Schmid, 2011), laid out as faiss's `ProductQuantizer`.
//!
//! A vector of `dim` components is cut into `m` contiguous sub-vectors of `dsub = dim / m`
//! components; each sub-space has its own k-means codebook of `ksub = 2^nbits` centroids, and a
//! vector is stored as the `m` indices of its nearest sub-centroids ([`PackedCodes`]). Search
//! compares a raw query with the codes by *asymmetric distance computation* (ADC): one table of
//! query-to-sub-centroid distances per query, then `m` table look-ups per database vector.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{
    check_finite_slice, nearest_codes, squared_distance, write_safetensors, Error, Fingerprint,
    Nearest, Result, SafetensorsFile, Seed, TensorSpec,
};
use rayon::prelude::*;

use crate::packing::code_size;
pub use crate::packing::PackedCodes;
use crate::{KMeans, KMeansConfig, KMeansInit};

/// Value of the `format` metadata key of a saved product quantizer.
pub const PQ_FORMAT: &str = "qcl-pq/1";

/// Value of the `format` metadata key of a codes file of any quantizer ([`crate::save_codes`]).
pub const CODES_FORMAT: &str = "qcl-pq-codes/1";

/// The knobs of [`ProductQuantizer::train`]; the k-means ones apply to every sub-space.
///
/// ```
/// use qcl_pq::ProductQuantizerConfig;
/// let config = ProductQuantizerConfig { max_iter: 10, ..ProductQuantizerConfig::new(8, 8) };
/// assert_eq!(config.max_points_per_centroid, Some(256));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ProductQuantizerConfig {
    /// Number of sub-spaces; must divide the dimension.
    pub m: usize,
    /// Bits per code, in `1..=16`: each sub-space gets `2^nbits` centroids.
    pub nbits: u32,
    /// Lloyd iterations per sub-space (default 25, as faiss).
    pub max_iter: usize,
    /// k-means initialisation (default [`KMeansInit::Random`]).
    pub init: KMeansInit,
    /// Train each sub-space on at most `2^nbits · max_points_per_centroid` vectors (default
    /// `Some(256)`, as faiss); `None` uses every vector.
    pub max_points_per_centroid: Option<usize>,
    /// Seed; sub-space `j` trains with `seed.child(j)` (default 1234).
    pub seed: Seed,
}

impl ProductQuantizerConfig {
    /// `m` sub-spaces of `nbits`-bit codes; the k-means knobs default as in
    /// [`KMeansConfig::new`].
    pub fn new(m: usize, nbits: u32) -> Self {
        let kmeans = KMeansConfig::new(1);
        ProductQuantizerConfig {
            m,
            nbits,
            max_iter: kmeans.max_iter,
            init: kmeans.init,
            max_points_per_centroid: kmeans.max_points_per_centroid,
            seed: kmeans.seed,
        }
    }

    /// The k-means parameters of sub-space `j`.
    fn kmeans(&self, ksub: usize, j: usize) -> KMeansConfig {
        KMeansConfig {
            max_iter: self.max_iter,
            init: self.init,
            max_points_per_centroid: self.max_points_per_centroid,
            seed: self.seed.child(j as u64),
            ..KMeansConfig::new(ksub)
        }
    }
}

/// A trained product quantizer: `m` codebooks of `2^nbits` centroids of `dim / m` components.
///
/// ```
/// use qcl_pq::{ProductQuantizer, ProductQuantizerConfig};
/// use qcl_tensor::{squared_distance, Seed};
/// let data = Seed::new(0).rng().normal_vec(1_000 * 8, 0.0, 1.0);
/// let pq = ProductQuantizer::train(&data, 8, &ProductQuantizerConfig::new(4, 4))?;
/// let codes = pq.encode(&data)?;
/// assert_eq!(codes.code_size(), 2); // 4 codes of 4 bits
/// let decoded = pq.decode(&codes)?;
/// let error = squared_distance(&data[..8], &decoded[..8]);
/// // A database vector's own code minimises the asymmetric distance to it, so searching with
/// // vector 0 finds a vector with the same code, at its reconstruction error.
/// let found = pq.search(&data[..8], &codes, 3)?;
/// let best = found.indices[0] as usize;
/// assert!((0..4).all(|j| codes.get(best, j) == codes.get(0, j)));
/// assert!((found.distances[0] - error).abs() <= 1e-5 * error);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ProductQuantizer {
    dim: usize,
    m: usize,
    nbits: u32,
    /// Row-major `[m, ksub, dsub]`.
    codebooks: Vec<f32>,
}

impl ProductQuantizer {
    /// Trains one k-means codebook per sub-space on `data` (row-major `[n, dim]`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `dim = 0`, `m = 0`, `dim` not divisible by `m`, `nbits`
    /// outside `1..=16`, fewer than `2^nbits` vectors, or bad k-means knobs;
    /// [`Error::EmptyInput`] for no vectors; [`Error::ShapeMismatch`] if `data` is not whole
    /// rows; [`Error::NonFinite`].
    pub fn train(data: &[f32], dim: usize, config: &ProductQuantizerConfig) -> Result<Self> {
        let (dsub, ksub) = geometry(dim, config.m, config.nbits)?;
        let n = check_points("data", data, dim)?;
        if ksub > n {
            return Err(Error::invalid_parameter(
                "nbits",
                format!(
                    "2^{} = {ksub} centroids per sub-space need at least as many training vectors, got {n}",
                    config.nbits
                ),
            ));
        }
        // Sub-spaces are independent (each has its own child seed), so training them in
        // parallel gives the same codebooks as training them in turn.
        let codebooks: Vec<Vec<f32>> = (0..config.m)
            .into_par_iter()
            .map(|j| {
                let sub = subspace(data, dim, j, dsub);
                KMeans::fit(&sub, dsub, None, &config.kmeans(ksub, j)).map(|km| km.centroids)
            })
            .collect::<Result<_>>()?;
        Ok(ProductQuantizer {
            dim,
            m: config.m,
            nbits: config.nbits,
            codebooks: codebooks.concat(),
        })
    }

    /// A quantizer with the given codebooks (row-major `[m, 2^nbits, dim / m]`).
    ///
    /// ```
    /// use qcl_pq::ProductQuantizer;
    /// // dim 2, two 1-D sub-spaces, 1 bit: centroids {0, 10} and {-1, 1}.
    /// let pq = ProductQuantizer::from_codebooks(2, 2, 1, vec![0.0, 10.0, -1.0, 1.0])?;
    /// let codes = pq.encode(&[9.0, -3.0])?;
    /// assert_eq!(codes.unpack(), vec![1, 0]);
    /// assert_eq!(pq.decode(&codes)?, vec![10.0, -1.0]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad `dim`, `m` or `nbits` (as [`train`](Self::train));
    /// [`Error::ShapeMismatch`] for codebooks of the wrong length; [`Error::NonFinite`].
    pub fn from_codebooks(dim: usize, m: usize, nbits: u32, codebooks: Vec<f32>) -> Result<Self> {
        let (dsub, ksub) = geometry(dim, m, nbits)?;
        if codebooks.len() != m * ksub * dsub {
            return Err(Error::ShapeMismatch {
                context: "codebooks".into(),
                expected: format!("[{m}, {ksub}, {dsub}]"),
                actual: vec![codebooks.len()],
            });
        }
        check_finite_slice("codebooks", &codebooks)?;
        Ok(ProductQuantizer {
            dim,
            m,
            nbits,
            codebooks,
        })
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of sub-spaces.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Bits per code.
    pub fn nbits(&self) -> u32 {
        self.nbits
    }

    /// Components per sub-space, `dim / m`.
    pub fn dsub(&self) -> usize {
        self.dim / self.m
    }

    /// Centroids per sub-space, `2^nbits`.
    pub fn ksub(&self) -> usize {
        1 << self.nbits
    }

    /// Bytes of one encoded vector, `⌈m · nbits / 8⌉`.
    pub fn code_size(&self) -> usize {
        (self.m * self.nbits as usize).div_ceil(8)
    }

    /// All codebooks, row-major `[m, ksub, dsub]`.
    pub fn codebooks(&self) -> &[f32] {
        &self.codebooks
    }

    /// The codebook of sub-space `j`, row-major `[ksub, dsub]`.
    ///
    /// # Panics
    /// If `j >= m`.
    pub fn codebook(&self, j: usize) -> &[f32] {
        let size = self.ksub() * self.dsub();
        &self.codebooks[j * size..(j + 1) * size]
    }

    /// The codes of `data` (row-major `[n, dim]`): in each sub-space, the nearest centroid
    /// (exact, ties to the lowest index, by [`nearest_codes`]).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no vectors, [`Error::ShapeMismatch`] if `data` is not whole
    /// rows of `dim`, [`Error::NonFinite`].
    pub fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        let n = check_points("data", data, self.dim)?;
        let (m, dsub) = (self.m, self.dsub());
        let mut codes = vec![0u32; n * m];
        for j in 0..m {
            let sub = subspace(data, self.dim, j, dsub);
            let found = nearest_codes(&sub, self.codebook(j), dsub, None)?;
            for (row, &code) in codes.chunks_exact_mut(m).zip(&found.indices) {
                row[j] = code;
            }
        }
        PackedCodes::pack(&codes, m, self.nbits)
    }

    /// The reconstruction of every encoded vector, row-major `[n, dim]`: the concatenation of
    /// its sub-centroids.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the codes have another `m`, [`Error::InvalidParameter`] if
    /// they have another `nbits`.
    pub fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        crate::check_codes(self, codes)?;
        let dsub = self.dsub();
        let mut out = Vec::with_capacity(codes.n() * self.dim);
        for row in codes.unpack().chunks_exact(self.m) {
            for (j, &code) in row.iter().enumerate() {
                let code = code as usize;
                out.extend_from_slice(&self.codebook(j)[code * dsub..(code + 1) * dsub]);
            }
        }
        Ok(out)
    }

    /// The `top_k` database vectors nearest to each query by asymmetric distance.
    ///
    /// For a query `q` and a database vector with codes `c`, the distance is
    /// `Σ_j ‖q_j − C_j[c_j]‖²`: each term is [`squared_distance`] from the query's sub-vector
    /// `j` to centroid `c_j` of codebook `j`, read from a per-query `[m, ksub]` table, and the
    /// terms are added in `f32` in order `j = 0, 1, …`. Returns row-major `[nq, top_k]` database
    /// indices and distances, ascending, ties to the lower database index. Queries run in
    /// parallel; the result does not depend on the number of threads.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no queries or an empty database, [`Error::ShapeMismatch`] if
    /// the queries are not whole rows of `dim` or the codes have another `m`,
    /// [`Error::InvalidParameter`] for codes of another `nbits` or `top_k` outside `1..=n`,
    /// [`Error::NonFinite`].
    pub fn search(&self, queries: &[f32], codes: &PackedCodes, top_k: usize) -> Result<Nearest> {
        check_points("queries", queries, self.dim)?;
        crate::check_codes(self, codes)?;
        let n = codes.n();
        if n == 0 {
            return Err(Error::EmptyInput("no database vectors to search".into()));
        }
        if n > u32::MAX as usize {
            return Err(Error::invalid_parameter(
                "codes",
                "more than 2^32 database vectors",
            ));
        }
        if top_k == 0 || top_k > n {
            return Err(Error::invalid_parameter(
                "top_k",
                format!("must be in 1..={n}, got {top_k}"),
            ));
        }
        // Unpacked once for all queries: scoring then reads plain integers.
        let unpacked = codes.unpack();
        let (m, ksub) = (self.m, self.ksub());
        let by_distance_then_index =
            |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        let nq = queries.len() / self.dim;
        let mut indices = vec![0u32; nq * top_k];
        let mut distances = vec![0f32; nq * top_k];
        queries
            .par_chunks_exact(self.dim)
            .zip(indices.par_chunks_exact_mut(top_k))
            .zip(distances.par_chunks_exact_mut(top_k))
            .for_each_init(
                || (vec![0f32; m * ksub], Vec::with_capacity(n)),
                |(table, scored), ((query, idx), dst)| {
                    self.distance_table(query, table);
                    scored.clear();
                    scored.extend(unpacked.chunks_exact(m).enumerate().map(|(i, row)| {
                        let mut distance = 0f32;
                        for (table_j, &code) in table.chunks_exact(ksub).zip(row) {
                            distance += table_j[code as usize];
                        }
                        (distance, i as u32)
                    }));
                    // Partition the top_k smallest to the front, then sort only those.
                    if top_k < n {
                        scored.select_nth_unstable_by(top_k - 1, by_distance_then_index);
                    }
                    scored[..top_k].sort_unstable_by(by_distance_then_index);
                    for ((i, d), &(distance, index)) in idx.iter_mut().zip(dst).zip(&*scored) {
                        *i = index;
                        *d = distance;
                    }
                },
            );
        Ok(Nearest { indices, distances })
    }

    /// Writes the codebooks (`codebooks`, `f32 [m, ksub, dsub]`) with `format`, `dim`, `m` and
    /// `nbits` as metadata.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let codebooks = Tensor::from_vec(
            self.codebooks.clone(),
            (self.m, self.ksub(), self.dsub()),
            &Device::Cpu,
        )?;
        let metadata = BTreeMap::from([
            ("format".to_string(), PQ_FORMAT.to_string()),
            ("dim".to_string(), self.dim.to_string()),
            ("m".to_string(), self.m.to_string()),
            ("nbits".to_string(), self.nbits.to_string()),
        ]);
        write_safetensors(path, &[("codebooks", &codebooks)], &metadata)
    }

    /// Reads a quantizer written by [`save`](Self::save).
    ///
    /// ```
    /// use qcl_pq::ProductQuantizer;
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("pq.safetensors");
    /// let pq = ProductQuantizer::from_codebooks(2, 1, 1, vec![0.0, 0.0, 1.0, 1.0])?;
    /// pq.save(&path)?;
    /// assert_eq!(ProductQuantizer::load(&path)?, pq);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::BadFile`] for a foreign or truncated file
    /// or missing or inconsistent metadata; [`Error::MissingTensor`]; [`Error::DTypeMismatch`],
    /// [`Error::ShapeMismatch`] (codebooks not `[m, 2^nbits, dim / m]`) or
    /// [`Error::NonFinite`] for bad codebooks.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        file.require_format(PQ_FORMAT, "a product quantizer")?;
        let dim: usize = file.metadata_value("dim")?;
        let m: usize = file.metadata_value("m")?;
        let nbits: u32 = file.metadata_value("nbits")?;
        let (dsub, ksub) = geometry(dim, m, nbits)
            .map_err(|e| Error::bad_file(path, format!("inconsistent metadata: {e}")))?;
        let spec = TensorSpec::new()
            .dtype(DType::F32)
            .shape(&[Some(m), Some(ksub), Some(dsub)])
            .finite();
        let codebooks = file.read("codebooks", &spec, &Device::Cpu)?;
        Self::from_codebooks(dim, m, nbits, codebooks.flatten_all()?.to_vec1::<f32>()?)
    }

    /// This quantizer's identity: a fingerprint of its shape and codebooks, stored with the
    /// codes it makes ([`save_codes`](Self::save_codes)) and checked when they are read back.
    ///
    /// ```
    /// use qcl_pq::ProductQuantizer;
    /// let a = ProductQuantizer::from_codebooks(2, 1, 1, vec![0.0, 0.0, 1.0, 1.0])?;
    /// let b = ProductQuantizer::from_codebooks(2, 1, 1, vec![0.0, 0.0, 1.0, 2.0])?;
    /// assert_ne!(a.fingerprint(), b.fingerprint());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn fingerprint(&self) -> String {
        Fingerprint::new(PQ_FORMAT)
            .number(self.dim as u64)
            .number(self.m as u64)
            .number(u64::from(self.nbits))
            .floats(&self.codebooks)
            .finish()
    }

    /// Writes `codes` made by this quantizer to a codes file: [`crate::save_codes`].
    ///
    /// ```
    /// use qcl_pq::ProductQuantizer;
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("codes.safetensors");
    /// let pq = ProductQuantizer::from_codebooks(2, 1, 1, vec![0.0, 0.0, 1.0, 1.0])?;
    /// let codes = pq.encode(&[0.1, 0.0, 0.9, 1.2])?;
    /// pq.save_codes(&codes, &path)?;
    /// assert_eq!(pq.load_codes(&path)?, codes);
    /// let other = ProductQuantizer::from_codebooks(2, 1, 1, vec![0.0, 0.0, 2.0, 2.0])?;
    /// assert!(other.load_codes(&path).is_err()); // made by another quantizer
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`crate::save_codes`].
    pub fn save_codes(&self, codes: &PackedCodes, path: impl AsRef<Path>) -> Result<()> {
        crate::save_codes(self, codes, path)
    }

    /// Reads a codes file and checks that this quantizer made it: [`crate::load_codes`].
    ///
    /// # Errors
    /// As [`crate::load_codes`].
    pub fn load_codes(&self, path: impl AsRef<Path>) -> Result<PackedCodes> {
        crate::load_codes(self, path)
    }

    /// Fills `table[j · ksub + c]` with the squared distance from sub-vector `j` of `query` to
    /// centroid `c` of codebook `j`. Table entries and codebook rows share one order, so entry
    /// `t` is row `t` of the flat `[m · ksub, dsub]` codebooks.
    fn distance_table(&self, query: &[f32], table: &mut [f32]) {
        let (dsub, ksub) = (self.dsub(), self.ksub());
        for (t, (slot, centroid)) in table
            .iter_mut()
            .zip(self.codebooks.chunks_exact(dsub))
            .enumerate()
        {
            let j = t / ksub;
            *slot = squared_distance(&query[j * dsub..(j + 1) * dsub], centroid);
        }
    }
}

/// Checks a quantizer's shape; returns `(dsub, ksub)`.
fn geometry(dim: usize, m: usize, nbits: u32) -> Result<(usize, usize)> {
    if dim == 0 {
        return Err(Error::invalid_parameter(
            "dim",
            "vectors need at least one dimension",
        ));
    }
    code_size(m, nbits)?; // checks m >= 1 and nbits in 1..=16
    if !dim.is_multiple_of(m) {
        return Err(Error::invalid_parameter(
            "m",
            format!("dim = {dim} is not divisible by m = {m}"),
        ));
    }
    Ok((dim / m, 1 << nbits))
}

/// Checks that `data` holds at least one whole, finite row of `dim`; returns the row count.
pub(crate) fn check_points(context: &str, data: &[f32], dim: usize) -> Result<usize> {
    if data.is_empty() {
        return Err(Error::EmptyInput(format!("no {context}")));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            context: context.into(),
            expected: format!("[*, {dim}]"),
            actual: vec![data.len()],
        });
    }
    check_finite_slice(context, data)?;
    Ok(data.len() / dim)
}

/// Sub-vectors `j` of every row of `data`, contiguous `[n, dsub]`, as the kernels need.
fn subspace(data: &[f32], dim: usize, j: usize, dsub: usize) -> Vec<f32> {
    data.chunks_exact(dim)
        .flat_map(|row| &row[j * dsub..(j + 1) * dsub])
        .copied()
        .collect()
}
