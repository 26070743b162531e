//! Re-ranking: an index's top candidates rescored with the exact vectors.

use std::collections::HashMap;

use qcl_tensor::{Error, Result};

use super::flat::SearchConfig;
use super::search::{check_queries, search_all};
use super::{Metric, Neighbors, VectorIndex};

/// An index whose answers are re-ranked with the exact vectors: it asks the inner index for
/// `k · k_factor` candidates and returns the `k` nearest of them by exact distance (or
/// similarity), as faiss's `IndexRefineFlat` does. The exact vectors are kept in memory,
/// `4 · dim` bytes each.
///
/// ```
/// use qcl_pq::index::{PqIndex, PqIndexConfig, Refine, VectorIndex};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(2_000 * 16, 0.0, 1.0);
/// let inner = PqIndex::train(&data, 16, &PqIndexConfig::new(4, 4))?;
/// let mut index = Refine::new(inner, 8)?;
/// index.add(&data)?;
/// let found = index.search(&data[16..32], 1)?;
/// assert_eq!(found.ids, vec![1]); // exact re-ranking finds the vector itself
/// assert_eq!(found.scores, vec![0.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Refine<I> {
    inner: I,
    k_factor: usize,
    /// Prepared rows (unit rows under cosine), in the order added.
    vectors: Vec<f32>,
    ids: Vec<u64>,
    row_of: HashMap<u64, usize>,
}

impl<I: VectorIndex> Refine<I> {
    /// Wraps an empty `inner` index; add vectors through the wrapper so both hold them.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `k_factor = 0` or an `inner` index that already holds
    /// vectors (their exact values are not known).
    pub fn new(inner: I, k_factor: usize) -> Result<Self> {
        if k_factor == 0 {
            return Err(Error::invalid_parameter("k_factor", "must be at least 1"));
        }
        if inner.len() != 0 {
            return Err(Error::invalid_parameter(
                "inner",
                "wrap an empty index, then add vectors through the wrapper",
            ));
        }
        Ok(Refine {
            inner,
            k_factor,
            vectors: Vec::new(),
            ids: Vec::new(),
            row_of: HashMap::new(),
        })
    }

    /// Candidates asked of the inner index per neighbour returned.
    pub fn k_factor(&self) -> usize {
        self.k_factor
    }

    /// Sets [`k_factor`](Self::k_factor).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for 0.
    pub fn set_k_factor(&mut self, k_factor: usize) -> Result<()> {
        if k_factor == 0 {
            return Err(Error::invalid_parameter("k_factor", "must be at least 1"));
        }
        self.k_factor = k_factor;
        Ok(())
    }

    /// The inner index.
    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// The inner index, to change (e.g. its search knobs); vectors must still be added and
    /// removed through the wrapper.
    pub(crate) fn inner_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// The exact (prepared) vectors and their ids, in the order added.
    pub fn vectors(&self) -> (&[f32], &[u64]) {
        (&self.vectors, &self.ids)
    }

    pub(crate) fn from_parts(
        inner: I,
        k_factor: usize,
        vectors: Vec<f32>,
        ids: Vec<u64>,
    ) -> Result<Self> {
        let dim = inner.dim();
        if vectors.len() != ids.len() * dim || inner.len() != ids.len() || k_factor == 0 {
            return Err(Error::invalid_parameter(
                "vectors",
                "exact vectors and index do not agree",
            ));
        }
        let row_of: HashMap<u64, usize> =
            ids.iter().enumerate().map(|(row, &id)| (id, row)).collect();
        if row_of.len() != ids.len() {
            return Err(Error::invalid_parameter("vectors", "an id is stored twice"));
        }
        Ok(Refine {
            inner,
            k_factor,
            vectors,
            ids,
            row_of,
        })
    }

    fn exact_value(&self, query: &[f32], row: usize) -> f32 {
        let dim = self.inner.dim();
        let vector = &self.vectors[row * dim..(row + 1) * dim];
        self.inner.metric().internal(query, vector)
    }
}

impl<I: VectorIndex> VectorIndex for Refine<I> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn metric(&self) -> Metric {
        self.inner.metric()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn add_with_ids(&mut self, data: &[f32], ids: &[u64]) -> Result<()> {
        self.inner.add_with_ids(data, ids)?;
        let prepared = self.metric().prepare(data, self.dim())?;
        for &id in ids {
            self.row_of.insert(id, self.ids.len());
            self.ids.push(id);
        }
        self.vectors.extend_from_slice(&prepared);
        Ok(())
    }

    fn remove(&mut self, ids: &[u64]) -> usize {
        let dim = self.dim();
        for id in ids {
            if let Some(row) = self.row_of.remove(id) {
                let last = self.ids.len() - 1;
                if row != last {
                    self.vectors
                        .copy_within(last * dim..(last + 1) * dim, row * dim);
                    self.ids[row] = self.ids[last];
                    self.row_of.insert(self.ids[row], row);
                }
                self.ids.pop();
                self.vectors.truncate(last * dim);
            }
        }
        self.inner.remove(ids)
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id()
    }

    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors> {
        let (dim, metric, k) = (self.dim(), self.metric(), options.k);
        check_queries(queries, dim, k)?;
        // More candidates than the index holds would only be empty slots.
        let wide = SearchConfig {
            k: k.saturating_mul(self.k_factor).min(self.len().max(k)),
            ..*options
        };
        let candidates = self.inner.search_with(queries, &wide)?;
        let prepared = metric.prepare(queries, dim)?;
        let found = search_all(
            &prepared,
            dim,
            k,
            metric,
            || (),
            |q, query, _, top| {
                for &id in candidates.ids_of(q) {
                    // Every id of the inner index has its row (the two are added and removed
                    // together); MISSING_ID has none.
                    if let Some(&row) = self.row_of.get(&id) {
                        top.push(self.exact_value(query, row), id);
                    }
                }
            },
        );
        Ok(found)
    }
}
