//! What "nearest" means: squared L2 distance, inner product or cosine similarity.

use std::borrow::Cow;

use qcl_tensor::{Error, Result};

/// How an index compares a query with a database vector.
///
/// Internally every index *minimises* a value: the squared distance for [`Metric::L2`], the
/// negated inner product for the other two. Reported scores are the metric's own: distances
/// ascending for L2, similarities descending for inner product and cosine (as faiss reports
/// them).
///
/// ```
/// use qcl_pq::index::Metric;
/// assert_eq!("cosine".parse::<Metric>()?, Metric::Cosine);
/// assert!(Metric::InnerProduct.higher_is_better());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Metric {
    /// Squared Euclidean distance `‖q − x‖²`; smaller is nearer.
    #[default]
    L2,
    /// Inner product `⟨q, x⟩`; larger is nearer.
    InnerProduct,
    /// Cosine similarity: vectors are scaled to unit length when added and queried, then
    /// compared by inner product; larger is nearer.
    Cosine,
}

impl Metric {
    /// The name used in files and on the command line: `l2`, `ip` or `cosine`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::L2 => "l2",
            Metric::InnerProduct => "ip",
            Metric::Cosine => "cosine",
        }
    }

    /// Whether larger scores are nearer (inner product and cosine).
    pub fn higher_is_better(self) -> bool {
        self != Metric::L2
    }

    /// The value a search minimises between a prepared query and a stored vector: the squared
    /// distance, or the negated inner product (cosine rows are unit length by then).
    pub(crate) fn internal(self, query: &[f32], vector: &[f32]) -> f32 {
        match self {
            Metric::L2 => qcl_tensor::squared_distance(query, vector),
            _ => -query.iter().zip(vector).map(|(a, b)| a * b).sum::<f32>(),
        }
    }

    /// The score reported for an internal (minimised) value.
    pub(crate) fn score(self, internal: f32) -> f32 {
        if self.higher_is_better() {
            -internal
        } else {
            internal
        }
    }

    /// The score of "no neighbour": the worst possible one.
    pub(crate) fn missing_score(self) -> f32 {
        self.score(f32::INFINITY)
    }

    /// `rows` as the index stores and compares them: unit rows for cosine, as given otherwise.
    ///
    /// ```
    /// use qcl_pq::index::Metric;
    /// let unit = Metric::Cosine.prepare(&[3.0, 4.0], 2)?;
    /// assert_eq!(&unit[..], &[0.6, 0.8]);
    /// assert_eq!(&Metric::L2.prepare(&[3.0, 4.0], 2)?[..], &[3.0, 4.0]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero row under cosine (it has no direction).
    pub fn prepare<'a>(self, rows: &'a [f32], dim: usize) -> Result<Cow<'a, [f32]>> {
        if self != Metric::Cosine {
            return Ok(Cow::Borrowed(rows));
        }
        let mut unit = rows.to_vec();
        for (i, row) in unit.chunks_exact_mut(dim).enumerate() {
            let norm = row
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm == 0.0 {
                return Err(Error::invalid_parameter(
                    "vectors",
                    format!("row {i} is zero: cosine similarity needs a direction"),
                ));
            }
            row.iter_mut()
                .for_each(|v| *v = (f64::from(*v) / norm) as f32);
        }
        Ok(Cow::Owned(unit))
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Metric {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "l2" => Ok(Metric::L2),
            "ip" | "inner_product" => Ok(Metric::InnerProduct),
            "cosine" => Ok(Metric::Cosine),
            other => Err(Error::invalid_parameter(
                "metric",
                format!("unknown metric {other:?}; expected l2, ip or cosine"),
            )),
        }
    }
}
