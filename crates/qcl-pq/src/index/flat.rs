//! A flat index: every vector's product-quantization codes, scanned for each query.

use std::collections::HashSet;

use qcl_tensor::{Error, Result, Seed};

use super::blocks::BlockedCodes;
use super::lut::QueryTables;
use super::scan::{scan, Scan};
use super::search::{check_queries, search_all};
use super::tables::TableMaker;
use super::{Metric, Neighbors, VectorIndex};
use crate::pq::check_points;
use crate::{KMeansConfig, ProductQuantizer, ProductQuantizerConfig};

/// The knobs of [`PqIndex::train`].
///
/// ```
/// use qcl_pq::index::{Metric, PqIndexConfig};
/// let config = PqIndexConfig { metric: Metric::Cosine, ..PqIndexConfig::new(16, 4) };
/// assert_eq!(config.train_iterations, 25);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PqIndexConfig {
    /// Sub-spaces (codes per vector); must divide the dimension.
    pub m: usize,
    /// Bits per code: 8 (256 centroids per sub-space) or 4 (16, scanned fastest).
    pub nbits: u32,
    /// What "nearest" means (default [`Metric::L2`]).
    pub metric: Metric,
    /// Lloyd iterations per sub-space (default 25, as faiss).
    pub train_iterations: usize,
    /// Train on at most `2^nbits ·` this many vectors per sub-space (default `Some(256)`).
    pub max_points_per_centroid: Option<usize>,
    /// Seed of the codebooks' k-means (default 1234).
    pub seed: Seed,
}

impl PqIndexConfig {
    /// `m` sub-spaces of `nbits`-bit codes; everything else at its default.
    pub fn new(m: usize, nbits: u32) -> Self {
        let kmeans = KMeansConfig::new(1);
        PqIndexConfig {
            m,
            nbits,
            metric: Metric::L2,
            train_iterations: kmeans.max_iter,
            max_points_per_centroid: kmeans.max_points_per_centroid,
            seed: kmeans.seed,
        }
    }

    pub(crate) fn quantizer_params(&self) -> ProductQuantizerConfig {
        ProductQuantizerConfig {
            max_iter: self.train_iterations,
            max_points_per_centroid: self.max_points_per_centroid,
            seed: self.seed,
            ..ProductQuantizerConfig::new(self.m, self.nbits)
        }
    }
}

impl Default for PqIndexConfig {
    /// 8 sub-spaces of 8-bit codes.
    fn default() -> Self {
        Self::new(8, 8)
    }
}

/// Options of one search.
///
/// ```
/// use qcl_pq::index::{Scan, SearchConfig};
/// let options = SearchConfig { k: 100, ..SearchConfig::default() };
/// assert_eq!((options.nprobe, options.scan), (1, Scan::default()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchConfig {
    /// Neighbours per query (default 10).
    pub k: usize,
    /// Inverted lists visited per query (default 1; flat indexes ignore it).
    pub nprobe: usize,
    /// How codes are scanned (default: bounded by the fastest kernel of this CPU).
    pub scan: Scan,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            k: 10,
            nprobe: 1,
            scan: Scan::default(),
        }
    }
}

/// A flat product-quantization index: vectors stored as codes with 64-bit ids, searched by
/// asymmetric distance (ADC) against every code.
///
/// The scan bounds each vector's distance with byte tables added 64 vectors at a time by SIMD
/// and rescores exactly only the vectors that can still enter the answer, so it returns
/// exactly what a plain scan of every code returns ([`Scan::Exact`]), ties to the lower id.
///
/// ```
/// use qcl_pq::index::{PqIndex, PqIndexConfig, VectorIndex};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(2_000 * 16, 0.0, 1.0);
/// let mut index = PqIndex::train(&data, 16, &PqIndexConfig::new(8, 4))?;
/// let ids = index.add(&data)?;
/// assert_eq!(ids, 0..2_000);
/// let found = index.search(&data[..16], 5)?;
/// assert_eq!(found.ids_of(0).len(), 5);
/// assert!(found.scores_of(0).windows(2).all(|w| w[0] <= w[1]));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PqIndex {
    metric: Metric,
    pq: ProductQuantizer,
    maker: TableMaker,
    codes: BlockedCodes,
    ids: Vec<u64>,
    next_id: u64,
}

impl PqIndex {
    /// Trains the codebooks on `data` (row-major `[n, dim]`); the index starts empty.
    ///
    /// # Errors
    /// As [`ProductQuantizer::train`], and [`Error::InvalidParameter`] for `nbits` other than
    /// 4 or 8 or a zero row under [`Metric::Cosine`].
    pub fn train(data: &[f32], dim: usize, config: &PqIndexConfig) -> Result<Self> {
        BlockedCodes::new(config.m, config.nbits)?;
        check_points("data", data, dim)?;
        let data = config.metric.prepare(data, dim)?;
        let pq = ProductQuantizer::train(&data, dim, &config.quantizer_params())?;
        Self::from_quantizer(pq, config.metric)
    }

    /// An empty index over an already trained quantizer.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless the quantizer has 4- or 8-bit codes.
    pub fn from_quantizer(pq: ProductQuantizer, metric: Metric) -> Result<Self> {
        let codes = BlockedCodes::new(pq.m(), pq.nbits())?;
        Ok(PqIndex {
            metric,
            maker: TableMaker::new(&pq),
            pq,
            codes,
            ids: Vec::new(),
            next_id: 0,
        })
    }

    /// The product quantizer.
    pub fn quantizer(&self) -> &ProductQuantizer {
        &self.pq
    }

    /// Ids, in storage order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The codes, in storage order.
    pub fn codes(&self) -> &BlockedCodes {
        &self.codes
    }

    /// Bytes of codes (with the last block's padding) and ids; the codebooks come on top.
    pub fn memory_bytes(&self) -> usize {
        self.codes.memory_bytes() + self.ids.len() * std::mem::size_of::<u64>()
    }

    /// Fills the exact and byte tables of one (prepared) query.
    fn fill_tables(&self, query: &[f32], tables: &mut QueryTables) {
        if self.metric == Metric::L2 {
            self.maker.l2(query, tables.exact_mut());
        } else {
            self.maker.negated_inner_product(query, tables.exact_mut());
        }
    }

    /// Makes [`VectorIndex::next_id`] at least `next_id` (a loaded index continues its ids).
    pub(crate) fn raise_next_id(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id);
    }

    pub(crate) fn from_parts(
        metric: Metric,
        pq: ProductQuantizer,
        codes: BlockedCodes,
        ids: Vec<u64>,
    ) -> Result<Self> {
        if codes.n() != ids.len() || codes.m() != pq.m() || codes.nbits() != pq.nbits() {
            return Err(Error::invalid_parameter(
                "codes",
                "codes, ids and quantizer do not agree",
            ));
        }
        check_unique(&ids)?;
        let next_id = ids.iter().max().map_or(0, |&id| id + 1);
        Ok(PqIndex {
            metric,
            maker: TableMaker::new(&pq),
            pq,
            codes,
            ids,
            next_id,
        })
    }
}

impl VectorIndex for PqIndex {
    fn dim(&self) -> usize {
        self.pq.dim()
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn next_id(&self) -> u64 {
        self.next_id
    }

    fn add_with_ids(&mut self, data: &[f32], ids: &[u64]) -> Result<()> {
        let (n, data) = new_rows(self.metric, data, self.dim(), ids, &self.ids)?;
        let packed = self.pq.encode(&data)?;
        let mut row = vec![0u8; self.pq.m()];
        for i in 0..n {
            for (j, code) in row.iter_mut().enumerate() {
                *code = packed.get(i, j) as u8;
            }
            self.codes.push(&row);
        }
        self.ids.extend_from_slice(ids);
        self.next_id = self.next_id.max(ids.iter().max().map_or(0, |&id| id + 1));
        Ok(())
    }

    fn remove(&mut self, ids: &[u64]) -> usize {
        let doomed: HashSet<u64> = ids.iter().copied().collect();
        let mut removed = 0;
        let mut i = 0;
        while i < self.ids.len() {
            if doomed.contains(&self.ids[i]) {
                self.codes.swap_remove(i);
                self.ids.swap_remove(i);
                removed += 1;
            } else {
                i += 1;
            }
        }
        removed
    }

    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors> {
        let dim = self.dim();
        check_queries(queries, dim, options.k)?;
        let queries = self.metric.prepare(queries, dim)?;
        let (m, ksub) = (self.pq.m(), self.pq.ksub());
        Ok(search_all(
            &queries,
            dim,
            options.k,
            self.metric,
            || QueryTables::new(m, ksub),
            |_, query, tables, top| {
                self.fill_tables(query, tables);
                scan(&self.codes, &self.ids, tables, 0.0, options.scan, top);
            },
        ))
    }
}

/// Checks that stored ids (read from a file) are distinct and none is [`super::MISSING_ID`].
pub(crate) fn check_unique(ids: &[u64]) -> Result<()> {
    let mut seen = HashSet::with_capacity(ids.len());
    match ids
        .iter()
        .find(|&&id| id == super::MISSING_ID || !seen.insert(id))
    {
        Some(id) => Err(Error::invalid_parameter(
            "ids",
            format!("id {id} is stored twice or is the reserved u64::MAX"),
        )),
        None => Ok(()),
    }
}

/// Rows about to be added under `ids`, checked (whole finite rows, ids new and one per row) and
/// prepared for `metric`; returns their count and the prepared rows.
pub(crate) fn new_rows<'a>(
    metric: Metric,
    data: &'a [f32],
    dim: usize,
    ids: &[u64],
    present: &[u64],
) -> Result<(usize, std::borrow::Cow<'a, [f32]>)> {
    let n = check_points("data", data, dim)?;
    check_new_ids(ids, n, present)?;
    Ok((n, metric.prepare(data, dim)?))
}

/// Checks ids about to be added: one per row, no repeats, none already present, none missing.
pub(crate) fn check_new_ids(ids: &[u64], rows: usize, present: &[u64]) -> Result<()> {
    if ids.len() != rows {
        return Err(Error::invalid_parameter(
            "ids",
            format!("{} ids for {rows} rows", ids.len()),
        ));
    }
    let mut fresh = HashSet::with_capacity(ids.len());
    for &id in ids {
        if id == super::MISSING_ID {
            return Err(Error::invalid_parameter(
                "ids",
                "u64::MAX is reserved for missing neighbours",
            ));
        }
        if !fresh.insert(id) {
            return Err(Error::invalid_parameter(
                "ids",
                format!("id {id} is given twice"),
            ));
        }
    }
    if let Some(id) = present.iter().find(|id| fresh.contains(id)) {
        return Err(Error::invalid_parameter(
            "ids",
            format!("id {id} is already in the index"),
        ));
    }
    Ok(())
}
