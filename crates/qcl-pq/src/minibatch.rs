//! Mini-batch k-means (Sculley, 2010) for data that arrives in batches.

use qcl_tensor::{nearest_codes, Error, Result, Seed};

use crate::kmeans::{kmeans_plus_plus, validate_data};

/// k-means updated one batch at a time: each point moves its nearest centroid towards itself
/// by `w / (total weight the centroid has seen)`, in batch order.
///
/// ```
/// use qcl_pq::MiniBatchKMeans;
/// use qcl_tensor::Seed;
/// let mut rng = Seed::new(1).rng();
/// let first = rng.normal_vec(100 * 2, 0.0, 1.0);
/// let mut model = MiniBatchKMeans::from_first_batch(&first, 2, 4, Seed::new(2))?;
/// for _ in 0..10 {
///     let batch = rng.normal_vec(100 * 2, 0.0, 1.0);
///     model.partial_fit(&batch, None)?;
/// }
/// assert_eq!(model.centroids().len(), 8);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MiniBatchKMeans {
    centroids: Vec<f32>,
    counts: Vec<f64>,
    dim: usize,
}

impl MiniBatchKMeans {
    /// Starts from given centroids (`[k, dim]`).
    ///
    /// # Errors
    /// [`Error::EmptyInput`], [`Error::ShapeMismatch`], [`Error::NonFinite`],
    /// [`Error::InvalidParameter`] for `dim = 0`.
    pub fn new(centroids: Vec<f32>, dim: usize) -> Result<Self> {
        let k = validate_data(&centroids, dim, None)?;
        Ok(MiniBatchKMeans {
            centroids,
            counts: vec![0.0; k],
            dim,
        })
    }

    /// Starts from `k` points of the first batch chosen by greedy k-means++ with `seed`
    /// (distinct whenever the batch's points are).
    ///
    /// # Errors
    /// As [`new`](MiniBatchKMeans::new), and [`Error::InvalidParameter`] if `k` is 0 or larger
    /// than the batch.
    pub fn from_first_batch(batch: &[f32], dim: usize, k: usize, seed: Seed) -> Result<Self> {
        let n = validate_data(batch, dim, None)?;
        if k == 0 || k > n {
            return Err(Error::invalid_parameter(
                "k",
                format!("must be in 1..={n}, got {k}"),
            ));
        }
        let centroids = kmeans_plus_plus(batch, dim, None, k, &mut seed.rng())?;
        Self::new(centroids, dim)
    }

    /// The centroids, `[k, dim]`.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Dimension of the points.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Total weight each centroid has absorbed.
    pub fn counts(&self) -> &[f64] {
        &self.counts
    }

    /// Updates the centroids with one batch; returns the batch's mean squared distance to the
    /// centroids *before* the update.
    ///
    /// # Errors
    /// As [`KMeans::fit`](crate::KMeans::fit) for bad points or weights.
    pub fn partial_fit(&mut self, batch: &[f32], weights: Option<&[f32]>) -> Result<f64> {
        let n = validate_data(batch, self.dim, weights)?;
        let found = nearest_codes(batch, &self.centroids, self.dim, None)?;
        let d = self.dim;
        for (i, &c) in found.indices.iter().enumerate() {
            let w = weights.map_or(1.0, |w| f64::from(w[i]));
            if w == 0.0 {
                continue;
            }
            let c = c as usize;
            self.counts[c] += w;
            let rate = (w / self.counts[c]) as f32;
            for (centroid, &x) in self.centroids[c * d..(c + 1) * d]
                .iter_mut()
                .zip(&batch[i * d..(i + 1) * d])
            {
                *centroid += rate * (x - *centroid);
            }
        }
        Ok(found.distances.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64)
    }
}
