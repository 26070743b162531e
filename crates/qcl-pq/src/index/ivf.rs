//! An inverted-file index: a coarse k-means splits the vectors into lists, product
//! quantization codes each vector's residual, and a query scans only its `nprobe` nearest lists
//! (Jégou, Douze & Schmid, 2011, §IV).

use std::collections::HashSet;

use qcl_tensor::{nearest_codes, top_k_codes, Error, Result};

use super::blocks::BlockedCodes;
use super::flat::{check_new_ids, check_unique, PqIndexConfig, SearchConfig};
use super::lut::QueryTables;
use super::scan::scan;
use super::scan::Scan;
use super::search::{check_queries, search_all};
use super::tables::TableMaker;
use super::TopK;
use super::{Metric, Neighbors, VectorIndex};
use crate::pq::check_points;
use crate::{KMeans, KMeansConfig, ProductQuantizer};

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
    /// For L2 with residuals, keep `nlist · m · 2^nbits` floats of list terms so a probed
    /// list's table is `m · 2^nbits` additions instead of a table of residual distances
    /// (default true). Values differ from direct residual tables by rounding only.
    pub precomputed_tables: bool,
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
            precomputed_tables: true,
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
/// use qcl_pq::index::{IvfPqConfig, IvfPqIndex, SearchConfig, VectorIndex};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(4_000 * 16, 0.0, 1.0);
/// let config = IvfPqConfig { nlist: 16, ..IvfPqConfig::new(8, 4) };
/// let mut index = IvfPqIndex::train(&data, 16, &config)?;
/// index.add(&data)?;
/// let found = index.search_with(&data[..16], &SearchConfig { k: 5, nprobe: 4, ..Default::default() })?;
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
    maker: TableMaker,
    /// `[nlist, m, ksub]` list terms of the L2 residual tables, when precomputed.
    precomputed: Option<Vec<f32>>,
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
            &KMeansConfig {
                max_iter: config.coarse_iterations,
                seed: config.pq.seed.child(1 << 32),
                ..KMeansConfig::new(config.nlist)
            },
        )?;
        // Until the residual quantizer is trained (it needs the coarse assignment).
        let placeholder = ProductQuantizer::from_codebooks(dim, 1, 1, vec![0.0; 2 * dim])?;
        let mut index = IvfPqIndex {
            metric,
            by_residual: config.by_residual,
            lists: Vec::new(),
            centroids: coarse.centroids,
            pq: placeholder.clone(),
            maker: TableMaker::new(&placeholder),
            precomputed: None,
            next_id: 0,
        };
        let residuals = index.residuals(&data, &index.assign(&data)?);
        let pq = ProductQuantizer::train(&residuals, dim, &config.pq.quantizer_params())?;
        index.set_quantizer(pq, config.precomputed_tables);
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

    /// Installs the residual quantizer and what is derived from it.
    fn set_quantizer(&mut self, pq: ProductQuantizer, precomputed_tables: bool) {
        self.maker = TableMaker::new(&pq);
        self.precomputed = (precomputed_tables && self.by_residual && self.metric == Metric::L2)
            .then(|| precompute(&self.maker, &pq, &self.centroids));
        self.pq = pq;
    }

    /// Whether L2 residual tables are made from precomputed list terms.
    pub fn precomputed_tables(&self) -> bool {
        self.precomputed.is_some()
    }

    pub(crate) fn from_parts(
        metric: Metric,
        by_residual: bool,
        precomputed_tables: bool,
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
        let mut index = IvfPqIndex {
            metric,
            by_residual,
            centroids,
            maker: TableMaker::new(&pq),
            pq: pq.clone(),
            precomputed: None,
            lists,
            next_id,
        };
        index.set_quantizer(pq, precomputed_tables);
        Ok(index)
    }

    /// Scans the probed lists (nearest first) for one query. `coarse` holds the query's
    /// distances to the probed centroids (the start of every value with precomputed tables).
    fn answer(
        &self,
        query: &[f32],
        probed: &[u32],
        coarse: &[f32],
        method: Scan,
        scratch: &mut Scratch,
        top: &mut TopK,
    ) {
        let (dim, per_list) = (self.dim(), self.pq.m() * self.pq.ksub());
        let Scratch {
            tables,
            residual,
            query_terms,
        } = scratch;
        let residual_l2 = self.metric == Metric::L2 && self.by_residual;
        if self.precomputed.is_some() {
            // −2⟨q_j, C_jc⟩, the query's part of every list's table.
            self.maker.negated_inner_product(query, query_terms);
            query_terms.iter_mut().for_each(|v| *v *= 2.0);
        } else if !residual_l2 {
            self.fill_tables(query, tables);
        }
        for (&l, &coarse_distance) in probed.iter().zip(coarse) {
            let (l, list) = (l as usize, &self.lists[l as usize]);
            if list.ids.is_empty() {
                continue;
            }
            let centroid = &self.centroids[l * dim..(l + 1) * dim];
            let offset = match (&self.precomputed, residual_l2) {
                (Some(precomputed), _) => {
                    let list_terms = &precomputed[l * per_list..(l + 1) * per_list];
                    let exact = tables.exact_mut();
                    for ((t, &a), &b) in exact.iter_mut().zip(list_terms).zip(&*query_terms) {
                        *t = a + b;
                    }
                    coarse_distance
                }
                (None, true) => {
                    for ((r, &x), &c) in residual.iter_mut().zip(query).zip(centroid) {
                        *r = x - c;
                    }
                    self.fill_tables(residual, tables);
                    0.0
                }
                (None, false) if self.by_residual => -dot(query, centroid),
                (None, false) => 0.0,
            };
            scan(&list.codes, &list.ids, tables, offset, method, top);
        }
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
            self.maker.l2(query, tables.exact_mut());
        } else {
            self.maker.negated_inner_product(query, tables.exact_mut());
        }
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

    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors> {
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
        let nprobe = options.nprobe;
        let found = search_all(
            &queries,
            dim,
            options.k,
            self.metric,
            || Scratch {
                tables: QueryTables::new(m, ksub),
                residual: vec![0f32; dim],
                query_terms: vec![0f32; m * ksub],
            },
            |q, query, scratch, top| {
                let probed = &probes.indices[q * nprobe..(q + 1) * nprobe];
                let coarse = &probes.distances[q * nprobe..(q + 1) * nprobe];
                self.answer(query, probed, coarse, options.scan, scratch, top);
            },
        );
        Ok(found)
    }
}

/// One worker's buffers.
struct Scratch {
    tables: QueryTables,
    residual: Vec<f32>,
    /// `−2⟨q_j, C_jc⟩` with precomputed tables.
    query_terms: Vec<f32>,
}

/// `T[l, j, c] = ‖C_jc‖² + 2⟨(c_l)_j, C_jc⟩` for every list `l`: with it, the squared
/// distance from `q` to `c_l + r̂` is `‖q − c_l‖² + Σ_j (T[l, j, c_j] − 2⟨q_j, C_jc_j⟩)`, so a
/// list's table costs `m · ksub` additions instead of a table of residual distances
/// (Jégou, Douze & Schmid, 2011, §IV.C).
fn precompute(maker: &TableMaker, pq: &ProductQuantizer, centroids: &[f32]) -> Vec<f32> {
    let (m, ksub, dim) = (pq.m(), pq.ksub(), pq.dim());
    let norms: Vec<f32> = pq
        .codebooks()
        .chunks_exact(pq.dsub())
        .map(|c| {
            let mut norm = 0f32;
            for v in c {
                norm += v * v;
            }
            norm
        })
        .collect();
    let mut out = vec![0f32; centroids.len() / dim * m * ksub];
    for (centroid, terms) in centroids
        .chunks_exact(dim)
        .zip(out.chunks_exact_mut(m * ksub))
    {
        maker.negated_inner_product(centroid, terms);
        for (t, &norm) in terms.iter_mut().zip(&norms) {
            *t = norm - 2.0 * *t;
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
