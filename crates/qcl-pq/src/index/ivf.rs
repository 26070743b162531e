//! An inverted-file index: a coarse k-means splits the vectors into lists, product
//! quantization codes each vector's residual, and a query scans only its `nprobe` nearest lists
//! (Jégou, Douze & Schmid, 2011, §IV).

use std::collections::HashSet;

use qcl_tensor::{nearest_codes, top_k_codes, Error, Result};

use super::blocks::BlockedCodes;
use super::flat::{check_new_ids, check_unique, PqIndexConfig, SearchOptions};
use super::lut::QueryTables;
use super::scan::scan;
use super::search::{check_queries, search_all};
use super::{Metric, Neighbors, VectorIndex};
use crate::pq::check_points;
use crate::{KMeans, KMeansParams, ProductQuantizer};

/// The knobs of [`IvfPqIndex::train`].
///
/// ```
/// use qcl_pq::index::IvfPqConfig;
/// let config = IvfPqConfig { nlist: 1024, ..IvfPqConfig::new(10, 8) };
/// assert!(config.by_residual);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct IvfPqConfig {
    /// Inverted lists (coarse centroids) (default 256).
    pub nlist: usize,
    /// Lloyd iterations of the coarse k-means (default 10, as faiss).
    pub coarse_iterations: usize,
    /// Code residuals `x − c(x)` rather than the vectors themselves (default true).
    pub by_residual: bool,
    /// The product quantizer's knobs (`m`, `nbits`, metric, training).
    pub pq: PqIndexConfig,
}

impl IvfPqConfig {
    /// 256 lists, residuals coded by `m` sub-spaces of `nbits` (4 or 8) bits.
    pub fn new(m: usize, nbits: u32) -> Self {
        IvfPqConfig {
            nlist: 256,
            coarse_iterations: 10,
            by_residual: true,
            pq: PqIndexConfig::new(m, nbits),
        }
    }
}

/// One inverted list: codes and ids of the vectors assigned to one coarse centroid.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InvertedList {
    pub codes: BlockedCodes,
    pub ids: Vec<u64>,
}

/// An IVF-PQ index.
///
/// A vector `x` goes to the list of its nearest coarse centroid `c` (by the metric) and is
/// stored as the PQ codes of `x − c`. A query visits its `nprobe` nearest lists, nearest
/// first; in each it scans the codes like [`super::PqIndex`] does (SIMD bounds, exact
/// rescoring), so with `nprobe = nlist` it returns, exactly, the `k` vectors whose
/// reconstructions `c + r̂` are nearest.
///
/// ```
/// use qcl_pq::index::{IvfPqConfig, IvfPqIndex, SearchOptions, VectorIndex};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(4_000 * 16, 0.0, 1.0);
/// let config = IvfPqConfig { nlist: 16, ..IvfPqConfig::new(8, 4) };
/// let mut index = IvfPqIndex::train(&data, 16, &config)?;
/// index.add(&data)?;
/// let found = index.search_with(&data[..16], &SearchOptions { k: 5, nprobe: 4, ..Default::default() })?;
/// assert!(found.ids_of(0).contains(&0));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct IvfPqIndex {
    metric: Metric,
    by_residual: bool,
    /// `[nlist, dim]`.
    centroids: Vec<f32>,
    pq: ProductQuantizer,
    lists: Vec<InvertedList>,
    next_id: u64,
}

impl IvfPqIndex {
    /// Trains the coarse centroids and the residual quantizer on `data`; the index starts
    /// empty.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `nlist` outside `1..=n`, `nbits` other than 4 or 8, or a
    /// bad product-quantizer shape; as [`KMeans::fit`] and [`ProductQuantizer::train`].
    pub fn train(data: &[f32], dim: usize, config: &IvfPqConfig) -> Result<Self> {
        let n = check_points("data", data, dim)?;
        BlockedCodes::new(config.pq.m, config.pq.nbits)?;
        if config.nlist == 0 || config.nlist > n {
            return Err(Error::invalid_parameter(
                "nlist",
                format!(
                    "must be in 1..={n} (the training vectors), got {}",
                    config.nlist
                ),
            ));
        }
        let metric = config.pq.metric;
        let data = metric.prepare(data, dim)?;
        let coarse = KMeans::fit(
            &data,
            dim,
            None,
            &KMeansParams {
                max_iter: config.coarse_iterations,
                seed: config.pq.seed.child(1 << 32),
                ..KMeansParams::new(config.nlist)
            },
        )?;
        let mut index = IvfPqIndex {
            metric,
            by_residual: config.by_residual,
            lists: Vec::new(),
            centroids: coarse.centroids,
            pq: ProductQuantizer::from_codebooks(dim, 1, 1, vec![0.0; 2 * dim])?,
            next_id: 0,
        };
        let residuals = index.residuals(&data, &index.assign(&data)?);
        index.pq = ProductQuantizer::train(&residuals, dim, &config.pq.quantizer_params())?;
        let empty = BlockedCodes::new(config.pq.m, config.pq.nbits)?;
        index.lists = vec![
            InvertedList {
                codes: empty,
                ids: Vec::new()
            };
            config.nlist
        ];
        Ok(index)
    }

    /// Number of inverted lists.
    pub fn nlist(&self) -> usize {
        self.lists.len()
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Whether residuals are coded.
    pub fn by_residual(&self) -> bool {
        self.by_residual
    }

    /// The coarse centroids, `[nlist, dim]`.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// The residual quantizer.
    pub fn quantizer(&self) -> &ProductQuantizer {
        &self.pq
    }

    /// Codes and ids of list `l`.
    pub fn list(&self, l: usize) -> (&BlockedCodes, &[u64]) {
        (&self.lists[l].codes, &self.lists[l].ids)
    }

    /// Bytes of codes (with each list's last-block padding) and ids; centroids and codebooks
    /// come on top.
    pub fn memory_bytes(&self) -> usize {
        self.lists
            .iter()
            .map(|l| l.codes.memory_bytes() + l.ids.len() * std::mem::size_of::<u64>())
            .sum()
    }

    /// Makes [`VectorIndex::next_id`] at least `next_id` (a loaded index continues its ids).
    pub(crate) fn raise_next_id(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id);
    }

    pub(crate) fn from_parts(
        metric: Metric,
        by_residual: bool,
        centroids: Vec<f32>,
        pq: ProductQuantizer,
        lists: Vec<InvertedList>,
    ) -> Result<Self> {
        let agree = centroids.len() == lists.len() * pq.dim()
            && !lists.is_empty()
            && lists.iter().all(|l| {
                l.codes.n() == l.ids.len() && l.codes.m() == pq.m() && l.codes.nbits() == pq.nbits()
            });
        if !agree {
            return Err(Error::invalid_parameter(
                "lists",
                "centroids, lists and quantizer do not agree",
            ));
        }
        let all: Vec<u64> = lists.iter().flat_map(|l| l.ids.iter().copied()).collect();
        check_unique(&all)?;
        let next_id = all.iter().max().map_or(0, |&id| id + 1);
        Ok(IvfPqIndex {
            metric,
            by_residual,
            centroids,
            pq,
            lists,
            next_id,
        })
    }

    /// The list of every row of (prepared) `data`.
    fn assign(&self, data: &[f32]) -> Result<Vec<u32>> {
        let found = nearest_codes(
            data,
            &self.centroids,
            self.dim(),
            self.coarse_bias().as_deref(),
        )?;
        Ok(found.indices)
    }

    /// For inner product, `argmax ⟨x, c⟩ = argmin ‖x − c‖² − ‖c‖²`: the kernel's bias.
    fn coarse_bias(&self) -> Option<Vec<f32>> {
        (self.metric != Metric::L2).then(|| {
            self.centroids
                .chunks_exact(self.dim())
                .map(|c| -dot(c, c))
                .collect()
        })
    }

    /// What the quantizer codes: `x − c(x)` by residual, `x` otherwise.
    fn residuals(&self, data: &[f32], lists: &[u32]) -> Vec<f32> {
        let dim = self.dim();
        let mut out = data.to_vec();
        if self.by_residual {
            for (row, &l) in out.chunks_exact_mut(dim).zip(lists) {
                let centroid = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
                row.iter_mut().zip(centroid).for_each(|(x, c)| *x -= c);
            }
        }
        out
    }

    fn fill_tables(&self, query: &[f32], tables: &mut QueryTables) {
        if self.metric == Metric::L2 {
            self.pq.distance_table(query, &mut tables.exact);
        } else {
            self.pq
                .negated_inner_product_table(query, &mut tables.exact);
        }
        tables.quantize();
    }
}

impl VectorIndex for IvfPqIndex {
    fn dim(&self) -> usize {
        self.pq.dim()
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn len(&self) -> usize {
        self.lists.iter().map(|l| l.ids.len()).sum()
    }

    fn next_id(&self) -> u64 {
        self.next_id
    }

    fn add_with_ids(&mut self, data: &[f32], ids: &[u64]) -> Result<()> {
        let n = check_points("data", data, self.dim())?;
        let present: Vec<u64> = self
            .lists
            .iter()
            .flat_map(|l| l.ids.iter().copied())
            .collect();
        check_new_ids(ids, n, &present)?;
        let data = self.metric.prepare(data, self.dim())?;
        let lists = self.assign(&data)?;
        let packed = self.pq.encode(&self.residuals(&data, &lists))?;
        let mut row = vec![0u8; self.pq.m()];
        for (i, (&list, &id)) in lists.iter().zip(ids).enumerate() {
            for (j, code) in row.iter_mut().enumerate() {
                *code = packed.get(i, j) as u8;
            }
            let list = &mut self.lists[list as usize];
            list.codes.push(&row);
            list.ids.push(id);
        }
        self.next_id = self.next_id.max(ids.iter().max().map_or(0, |&id| id + 1));
        Ok(())
    }

    fn remove(&mut self, ids: &[u64]) -> usize {
        let doomed: HashSet<u64> = ids.iter().copied().collect();
        let mut removed = 0;
        for list in &mut self.lists {
            let mut i = 0;
            while i < list.ids.len() {
                if doomed.contains(&list.ids[i]) {
                    list.codes.swap_remove(i);
                    list.ids.swap_remove(i);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
        }
        removed
    }

    fn search_with(&self, queries: &[f32], options: &SearchOptions) -> Result<Neighbors> {
        let (dim, nlist) = (self.dim(), self.nlist());
        check_queries(queries, dim, options.k)?;
        if options.nprobe == 0 || options.nprobe > nlist {
            return Err(Error::invalid_parameter(
                "nprobe",
                format!("must be in 1..={nlist}, got {}", options.nprobe),
            ));
        }
        let queries = self.metric.prepare(queries, dim)?;
        let probes = top_k_codes(
            &queries,
            &self.centroids,
            dim,
            self.coarse_bias().as_deref(),
            options.nprobe,
        )?;
        let (m, ksub) = (self.pq.m(), self.pq.ksub());
        let found = search_all(
            &queries,
            dim,
            options.k,
            self.metric,
            || (QueryTables::new(m, ksub), vec![0f32; dim]),
            |q, query, (tables, residual), top| {
                let lists = &probes.indices[q * options.nprobe..(q + 1) * options.nprobe];
                if self.metric != Metric::L2 || !self.by_residual {
                    self.fill_tables(query, tables);
                }
                for &l in lists {
                    let list = &self.lists[l as usize];
                    if list.ids.is_empty() {
                        continue;
                    }
                    let centroid = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
                    let offset = match (self.metric, self.by_residual) {
                        (Metric::L2, true) => {
                            for ((r, &x), &c) in residual.iter_mut().zip(query).zip(centroid) {
                                *r = x - c;
                            }
                            self.fill_tables(residual, tables);
                            0.0
                        }
                        (Metric::L2, false) => 0.0,
                        (_, true) => -dot(query, centroid),
                        (_, false) => 0.0,
                    };
                    scan(&list.codes, &list.ids, tables, offset, options.scan, top);
                }
            },
        );
        Ok(found)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
