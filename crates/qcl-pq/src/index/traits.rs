//! The one shape of every index: add, remove, search.

use std::ops::Range;

use qcl_tensor::Result;

use super::flat::SearchConfig;
use super::{Metric, Neighbors};
use crate::pq::check_points;

/// A searchable collection of vectors with 64-bit ids: [`super::PqIndex`],
/// [`super::IvfPqIndex`], and [`super::Refine`] around either.
///
/// ```
/// use qcl_pq::index::{IvfPqConfig, IvfPqIndex, PqIndex, PqIndexConfig, VectorIndex};
/// use qcl_tensor::Seed;
/// fn nearest_id(index: &dyn VectorIndex, query: &[f32]) -> qcl_tensor::Result<u64> {
///     Ok(index.search(query, 1)?.ids[0])
/// }
/// let data = Seed::new(0).rng().normal_vec(1_000 * 8, 0.0, 1.0);
/// let mut flat = PqIndex::train(&data, 8, &PqIndexConfig::new(4, 8))?;
/// flat.add(&data)?;
/// let mut ivf = IvfPqIndex::train(&data, 8, &IvfPqConfig { nlist: 8, ..IvfPqConfig::new(4, 8) })?;
/// ivf.add(&data)?;
/// assert_eq!(nearest_id(&flat, &data[..8])?, 0);
/// assert_eq!(flat.len(), ivf.len());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub trait VectorIndex: Send + Sync {
    /// Dimension of the vectors.
    fn dim(&self) -> usize;

    /// What "nearest" means.
    fn metric(&self) -> Metric;

    /// Vectors held.
    fn len(&self) -> usize;

    /// Whether the index holds no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id [`add`](Self::add) gives the next vector: one more than the largest id ever
    /// added (0 at first).
    fn next_id(&self) -> u64;

    /// Adds `data` (rows of `dim`) under the given ids, one per row.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::ShapeMismatch`] / `NonFinite` / `EmptyInput` for bad rows;
    /// `InvalidParameter` for a repeated id, an id already present, [`super::MISSING_ID`], a
    /// count of ids other than of rows, or a zero row under cosine.
    fn add_with_ids(&mut self, data: &[f32], ids: &[u64]) -> Result<()>;

    /// Adds `data` under the next free ids, which it returns.
    ///
    /// # Errors
    /// As [`add_with_ids`](Self::add_with_ids).
    fn add(&mut self, data: &[f32]) -> Result<Range<u64>> {
        let n = check_points("data", data, self.dim())? as u64;
        let first = self.next_id();
        let ids: Vec<u64> = (first..first + n).collect();
        self.add_with_ids(data, &ids)?;
        Ok(first..first + n)
    }

    /// Removes the vectors with these ids (absent ids are ignored); returns how many went.
    fn remove(&mut self, ids: &[u64]) -> usize;

    /// The `options.k` nearest vectors of each query (rows of `dim`); slots beyond the vectors
    /// found hold [`super::MISSING_ID`]. The answer does not depend on the number of threads.
    ///
    /// # Errors
    /// `InvalidParameter` for `k = 0`, a bad `nprobe` or a zero query under cosine;
    /// `EmptyInput` / `ShapeMismatch` / `NonFinite` for bad queries.
    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors>;

    /// The `k` nearest vectors of each query with the default [`SearchConfig`].
    ///
    /// # Errors
    /// As [`search_with`](Self::search_with).
    fn search(&self, queries: &[f32], k: usize) -> Result<Neighbors> {
        self.search_with(
            queries,
            &SearchConfig {
                k,
                ..SearchConfig::default()
            },
        )
    }
}
