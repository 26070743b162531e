//! A flat index over the codes of any [`Quantizer`]: vectors stored as that quantizer's packed
//! codes with 64-bit ids, searched exhaustively against their reconstructions.

use std::collections::HashSet;

use qcl_tensor::Result;

use super::flat::{new_rows, SearchConfig};
use super::search::{check_queries, search_all};
use super::{Metric, Neighbors, VectorIndex};
use crate::{PackedCodes, Quantizer};

/// A flat index that stores each vector as the codes of a [`Quantizer`] of your choice
/// (uniform scalar codes, k-means, PQ, ECVQ, a VQ layer or your own) and answers a query by
/// comparing it with every stored vector's reconstruction (faiss's `IndexScalarQuantizer` is
/// this index with a scalar quantizer). The memory per stored vector is the quantizer's
/// `⌈bits_per_vector / 8⌉` bytes plus its 8-byte id. A search decodes every stored vector once
/// and scans the reconstructions, so it costs one exact flat scan of `n` vectors and holds
/// `n · dim` `f32` values while it runs (decoding block by block is not done yet).
///
/// Scores are the metric's own ([`Metric`]): `‖q − x̂‖²` ascending for L2, `⟨q, x̂⟩`
/// descending for inner product, the same on unit rows for cosine; ties go to the lower id. The
/// answer does not depend on the number of threads. It is not (yet) one of the kinds an
/// [`AnyIndex`](super::AnyIndex) file holds: [`crate::save_codes`] saves its codes, and the
/// ids ([`ids`](QuantizedIndex::ids)) are yours to keep beside them.
///
/// ```
/// use qcl_pq::index::{Metric, QuantizedIndex, VectorIndex};
/// use qcl_pq::{FitQuantizer, ScalarQuantizer, ScalarQuantizerConfig};
/// use qcl_tensor::Seed;
/// let data = Seed::new(0).rng().normal_vec(1_000 * 16, 0.0, 1.0);
/// let sq = ScalarQuantizer::fit(&data, 16, &ScalarQuantizerConfig::new(8))?;
/// let mut index = QuantizedIndex::new(sq, Metric::L2);
/// index.add(&data)?;
/// assert_eq!(index.memory_bytes(), 1_000 * (16 + 8)); // 8-bit codes and an id per vector
/// assert_eq!(index.search(&data[16 * 7..16 * 8], 1)?.ids[0], 7);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct QuantizedIndex<Q> {
    quantizer: Q,
    metric: Metric,
    /// The stored vectors' codes, one row per id; `None` until the first add.
    codes: Option<PackedCodes>,
    ids: Vec<u64>,
    next_id: u64,
}

impl<Q: Quantizer> QuantizedIndex<Q> {
    /// An empty index storing codes of `quantizer`, compared by `metric`. Under
    /// [`Metric::Cosine`] vectors are scaled to unit length before they are encoded, so the
    /// quantizer should be trained on unit rows.
    pub fn new(quantizer: Q, metric: Metric) -> Self {
        QuantizedIndex {
            quantizer,
            metric,
            codes: None,
            ids: Vec::new(),
            next_id: 0,
        }
    }

    /// The quantizer whose codes are stored.
    pub fn quantizer(&self) -> &Q {
        &self.quantizer
    }

    /// The id of every stored vector, in storage order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The stored codes, one row per id of [`ids`](Self::ids); `None` before the first add.
    pub fn codes(&self) -> Option<&PackedCodes> {
        self.codes.as_ref()
    }

    /// Bytes held by codes and ids (the quantizer itself not counted).
    pub fn memory_bytes(&self) -> usize {
        self.codes.as_ref().map_or(0, |c| c.bytes().len()) + 8 * self.ids.len()
    }
}

// The accessors repeat `PqIndex`'s: each flat index implements the public trait on its own fields.
impl<Q: Quantizer + Send + Sync> VectorIndex for QuantizedIndex<Q> {
    fn dim(&self) -> usize {
        self.quantizer.dim()
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
        let packed = self.quantizer.encode(&data)?;
        crate::check_codes(&self.quantizer, &packed)?;
        if packed.n() != n {
            return Err(qcl_tensor::Error::invalid_parameter(
                "quantizer",
                format!("encoded {} rows as {} code rows", n, packed.n()),
            ));
        }
        match &mut self.codes {
            Some(codes) => codes.append(&packed),
            None => self.codes = Some(packed),
        }
        self.ids.extend_from_slice(ids);
        self.next_id = self.next_id.max(ids.iter().max().map_or(0, |&id| id + 1));
        Ok(())
    }

    fn remove(&mut self, ids: &[u64]) -> usize {
        let Some(codes) = &mut self.codes else {
            return 0;
        };
        let doomed: HashSet<u64> = ids.iter().copied().collect();
        let before = self.ids.len();
        codes.retain_rows(|i| !doomed.contains(&self.ids[i]));
        self.ids.retain(|id| !doomed.contains(id));
        before - self.ids.len()
    }

    fn search_with(&self, queries: &[f32], options: &SearchConfig) -> Result<Neighbors> {
        let dim = self.dim();
        check_queries(queries, dim, options.k)?;
        let queries = self.metric.prepare(queries, dim)?;
        let decoded = match &self.codes {
            Some(codes) if codes.n() > 0 => self.quantizer.decode(codes)?,
            _ => Vec::new(),
        };
        Ok(search_all(
            &queries,
            dim,
            options.k,
            self.metric,
            || (),
            |_, query, _, top| {
                for (vector, &id) in decoded.chunks_exact(dim).zip(&self.ids) {
                    top.push(self.metric.internal(query, vector), id);
                }
            },
        ))
    }
}
