//! An index behind a learned rotation (OPQ): vectors and queries are rotated, then handed on.

use qcl_tensor::{Error, Result};

use super::flat::SearchConfig;
use super::opq::{train_opq, OpqConfig, Rotation};
use super::{Metric, Neighbors, VectorIndex};

/// An index whose vectors and queries are first multiplied by an orthogonal rotation `R`
/// (`y = x · R`), as faiss's `OPQMatrix` in an `IndexPreTransform`. Distances and inner
/// products are unchanged by a rotation, so the answers are in the original space; the
/// rotation only makes the sub-spaces of the inner index's product quantizer fit the data
/// better (Ge et al., "Optimized Product Quantization", 2013).
///
/// ```
/// use qcl_pq::index::{opq::OpqConfig, IvfPqConfig, IvfPqIndex, Rotated, VectorIndex};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(2_000 * 8, 0.0, 1.0);
/// let opq = OpqConfig { iterations: 3, ..OpqConfig::new(4, 4) };
/// let rotation = Rotated::<IvfPqIndex>::learn_rotation(&data, 8, &opq)?;
/// let rotated = rotation.apply(&data)?;
/// let ivf = IvfPqIndex::train(&rotated, 8, &IvfPqConfig { nlist: 8, ..IvfPqConfig::new(4, 4) })?;
/// let mut index = Rotated::new(rotation, ivf)?;
/// index.add(&data)?;
/// assert_eq!(index.len(), 2_000);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rotated<I> {
    rotation: Rotation,
    inner: I,
}

impl<I: VectorIndex> Rotated<I> {
    /// Learns an OPQ rotation on `data` (rows of `dim`), for an inner index whose product
    /// quantizer has `config.m` sub-spaces; train the inner index on `rotation.apply(data)`.
    ///
    /// # Errors
    /// As [`train_opq`].
    pub fn learn_rotation(data: &[f32], dim: usize, config: &OpqConfig) -> Result<Rotation> {
        Ok(train_opq(data, dim, config)?.0)
    }

    /// `inner` (empty, trained on rotated vectors) behind `rotation`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the dimensions differ or `inner` already holds vectors.
    pub fn new(rotation: Rotation, inner: I) -> Result<Self> {
        if rotation.dim() != inner.dim() {
            return Err(Error::invalid_parameter(
                "rotation",
                format!(
                    "rotates {} dimensions, the index has {}",
                    rotation.dim(),
                    inner.dim()
                ),
            ));
        }
        if !inner.is_empty() {
            return Err(Error::invalid_parameter(
                "inner",
                "wrap an empty index, then add vectors through the wrapper",
            ));
        }
        Ok(Rotated { rotation, inner })
    }

    /// The rotation.
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// The inner index (which holds rotated vectors).
    pub fn inner(&self) -> &I {
        &self.inner
    }

    pub(crate) fn inner_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    pub(crate) fn from_parts(rotation: Rotation, inner: I) -> Result<Self> {
        if rotation.dim() != inner.dim() {
            return Err(Error::invalid_parameter(
                "rotation",
                "rotation and index dimensions differ",
            ));
        }
        Ok(Rotated { rotation, inner })
    }

    /// `rows` prepared for the metric (unit rows for cosine), then rotated.
    fn rotate(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let prepared = self.metric().prepare(rows, self.dim())?;
        self.rotation.apply(&prepared)
    }
}

// Forwards the accessors to `inner` as `Refine` does: each public wrapper implements the trait.
impl<I: VectorIndex> VectorIndex for Rotated<I> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn metric(&self) -> Metric {
        self.inner.metric()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id()
    }

    fn add_with_ids(&mut self, data: &[f32], ids: &[u64]) -> Result<()> {
        crate::pq::check_points("data", data, self.dim())?;
        let rotated = self.rotate(data)?;
        self.inner.add_with_ids(&rotated, ids)
    }

    fn remove(&mut self, ids: &[u64]) -> usize {
        self.inner.remove(ids)
    }

    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors> {
        super::search::check_queries(queries, self.dim(), options.k)?;
        let rotated = self.rotate(queries)?;
        self.inner.search_with(&rotated, options)
    }
}
