//! A product-quantized weight: codebook(s) of `K` subvectors of length `d` and one code per
//! subvector (the representation of "And the bit goes down", Stock et al., ICLR 2020).

use candle_core::Tensor;
use qcl_tensor::{nearest_codes, Error, Result};
use serde::{Deserialize, Serialize};

use crate::layout::{index_bits, LayerGeometry, LayerKind};
use crate::metric::Metric;

/// Which subvectors share a codebook. Every codebook is stored (fp16) and counted in the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// One codebook for the whole weight (the paper's choice).
    #[default]
    Layer,
    /// One codebook per block of `d` input channels (channel-major convolutions; for a linear
    /// layer, one per column block): a fork's "Subspace" variant.
    ChannelBlock,
    /// One codebook per group of consecutive output rows; the value is the number of groups and
    /// must divide the number of rows.
    Rows(usize),
}

impl Sharing {
    /// `(number of codebooks, codebook of every subvector)` for `geometry` (slab-major order).
    ///
    /// ```
    /// use qcl_wpq::{LayerGeometry, Layout, Sharing};
    /// let g = LayerGeometry::from_shape(&[4, 8], Layout::Spatial, 4)?;
    /// // Subvector j = b·O + o: two slabs of four rows; two row groups of two rows.
    /// assert_eq!(Sharing::Rows(2).groups(&g)?, (2, vec![0, 0, 1, 1, 0, 0, 1, 1]));
    /// assert_eq!(Sharing::ChannelBlock.groups(&g)?, (2, vec![0, 0, 0, 0, 1, 1, 1, 1]));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a row-group count that is zero or does not divide the
    /// rows, or per-channel-block codebooks of a spatial-layout convolution.
    pub fn groups(self, geometry: &LayerGeometry) -> Result<(usize, Vec<usize>)> {
        let rows = geometry.out_dim();
        match self {
            Sharing::Layer => Ok(geometry.groups(false)),
            Sharing::ChannelBlock => {
                let spatial_conv = matches!(geometry.kind, LayerKind::Conv { kh, kw, .. } if kh * kw > 1)
                    && geometry.layout == crate::Layout::Spatial;
                if spatial_conv {
                    return Err(Error::invalid_parameter(
                        "sharing",
                        "codebooks per channel block need layout = channel_major for a convolution",
                    ));
                }
                Ok(geometry.groups(true))
            }
            Sharing::Rows(n) => {
                if n == 0 || !rows.is_multiple_of(n) {
                    return Err(Error::invalid_parameter(
                        "sharing",
                        format!("{n} row groups do not divide the {rows} rows"),
                    ));
                }
                let per = rows / n;
                Ok((
                    n,
                    (0..geometry.n_subvectors())
                        .map(|j| (j % rows) / per)
                        .collect(),
                ))
            }
        }
    }
}

/// A weight quantized by product quantization.
///
/// ```
/// use qcl_wpq::{LayerGeometry, Layout, PqTensor, Sharing};
/// let geometry = LayerGeometry::from_shape(&[2, 4], Layout::Spatial, 2)?;
/// // Codebook of two 2-D codewords; subvectors (slab-major): (slab 0: rows 0, 1), (slab 1: ...).
/// let t = PqTensor { geometry, k: 2, sharing: Sharing::Layer,
///     centroids: vec![1.0, 2.0, -1.0, 0.5], assignments: vec![0, 1, 1, 0] };
/// assert_eq!(t.decode()?, vec![1.0, 2.0, -1.0, 0.5, -1.0, 0.5, 1.0, 2.0]);
/// assert_eq!(t.index_bits(), 4); // four 1-bit codes
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PqTensor {
    /// Shape, layout and block size `d`.
    pub geometry: LayerGeometry,
    /// Centroids per codebook `K`.
    pub k: usize,
    /// Which subvectors share a codebook.
    pub sharing: Sharing,
    /// `[n_groups·K, d]` row-major, codebook after codebook.
    pub centroids: Vec<f32>,
    /// Index (within its codebook) of every subvector, slab-major (`j = b·O + o`).
    pub assignments: Vec<u32>,
}

impl PqTensor {
    /// Number of codebooks.
    ///
    /// # Errors
    /// As [`Sharing::groups`].
    pub fn n_groups(&self) -> Result<usize> {
        Ok(self.sharing.groups(&self.geometry)?.0)
    }

    /// Checks that sizes agree and every index is below `K`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::CorruptStream`].
    pub fn validate(&self) -> Result<()> {
        let d = self.geometry.block;
        let n_groups = self.n_groups()?;
        if self.centroids.len() != n_groups * self.k * d {
            return Err(Error::ShapeMismatch {
                context: "centroids".into(),
                expected: format!("[{}, {d}]", n_groups * self.k),
                actual: vec![self.centroids.len()],
            });
        }
        if self.assignments.len() != self.geometry.n_subvectors() {
            return Err(Error::ShapeMismatch {
                context: "assignments".into(),
                expected: format!("[{}]", self.geometry.n_subvectors()),
                actual: vec![self.assignments.len()],
            });
        }
        if let Some(i) = self.assignments.iter().position(|&a| a as usize >= self.k) {
            return Err(Error::corrupt_stream(
                "assignments",
                format!(
                    "index {} at {i} is not below K = {}",
                    self.assignments[i], self.k
                ),
            ));
        }
        Ok(())
    }

    /// Row of every subvector in the stacked `[n_groups·K, d]` codebook.
    ///
    /// # Errors
    /// As [`Sharing::groups`].
    pub fn global_codes(&self) -> Result<Vec<u32>> {
        let (_, groups) = self.sharing.groups(&self.geometry)?;
        Ok(self
            .assignments
            .iter()
            .zip(groups)
            .map(|(&a, g)| (g * self.k) as u32 + a)
            .collect())
    }

    /// The decoded weight, row-major in the weight's shape.
    ///
    /// # Errors
    /// As [`PqTensor::validate`].
    pub fn decode(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let d = self.geometry.block;
        let sub: Vec<f32> = self
            .global_codes()?
            .iter()
            .flat_map(|&c| {
                self.centroids[c as usize * d..(c as usize + 1) * d]
                    .iter()
                    .copied()
            })
            .collect();
        self.geometry.roll(&sub)
    }

    /// The decoded weight built from `centroids` (a `[n_groups·K, d]` tensor, e.g. a trainable
    /// var) with differentiable gathers, so autograd gives each centroid the sum of its members'
    /// gradients.
    ///
    /// # Errors
    /// A candle error for a codebook of the wrong shape.
    pub fn decode_tensor(&self, centroids: &Tensor) -> Result<Tensor> {
        let dev = centroids.device();
        let codes = Tensor::from_vec(self.global_codes()?, self.assignments.len(), dev)?;
        let sub = centroids.index_select(&codes, 0)?.flatten_all()?;
        let perm = self.geometry.permutation();
        let mut inverse = vec![0u32; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i as u32;
        }
        let inverse = Tensor::from_vec(inverse, perm.len(), dev)?;
        Ok(sub
            .index_select(&inverse, 0)?
            .reshape(self.geometry.kind.weight_shape())?)
    }

    /// Member count of every centroid (`[n_groups·K]`).
    ///
    /// # Errors
    /// As [`Sharing::groups`].
    pub fn cluster_sizes(&self) -> Result<Vec<usize>> {
        let mut counts = vec![0usize; self.n_groups()? * self.k];
        self.global_codes()?
            .iter()
            .for_each(|&c| counts[c as usize] += 1);
        Ok(counts)
    }

    /// Chooses every code again for the current centroids: subvector `j` of `sub` (the weight
    /// unrolled by [`LayerGeometry::unroll`]) gets the nearest centroid of its codebook under
    /// `metric` (`(u − c)ᵀG(u − c)` in the metric's transformed space; Euclidean for `None`).
    /// Returns how many codes changed. For fixed centroids this never raises the objective
    /// `Σ_j (u_j − c_{a_j})ᵀG(u_j − c_{a_j})`.
    ///
    /// ```
    /// use qcl_wpq::layout::{LayerGeometry, LayerKind, Layout};
    /// use qcl_wpq::pq_tensor::{PqTensor, Sharing};
    /// let kind = LayerKind::Linear { out: 2, inp: 2 };
    /// let geometry = LayerGeometry::new(kind, Layout::Spatial, 2)?;
    /// let mut t = PqTensor { geometry, k: 2, sharing: Sharing::Layer,
    ///     centroids: vec![0.0, 0.0, 1.0, 1.0], assignments: vec![0, 0] };
    /// let sub = t.geometry.unroll(&[0.9, 1.1, 0.1, -0.1])?;
    /// assert_eq!(t.reassign(&sub, None)?, 1);
    /// assert_eq!(t.decode()?, vec![1.0, 1.0, 0.0, 0.0]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `sub` does not hold one `d`-vector per code; as
    /// [`PqTensor::validate`].
    pub fn reassign(&mut self, sub: &[f32], metric: Option<&Metric>) -> Result<usize> {
        self.validate()?;
        let (k, d) = (self.k, self.geometry.block);
        if sub.len() != self.assignments.len() * d {
            return Err(Error::ShapeMismatch {
                context: "subvectors to reassign".into(),
                expected: format!("[{}, {d}]", self.assignments.len()),
                actual: vec![sub.len()],
            });
        }
        let (n_groups, groups) = self.sharing.groups(&self.geometry)?;
        let mut changed = 0;
        for g in 0..n_groups {
            let members: Vec<usize> = (0..groups.len()).filter(|&j| groups[j] == g).collect();
            let points: Vec<f32> = members
                .iter()
                .flat_map(|&j| sub[j * d..(j + 1) * d].iter().copied())
                .collect();
            let book = &self.centroids[g * k * d..(g + 1) * k * d];
            let found = match metric {
                Some(m) => nearest_codes(&m.transform(&points), &m.transform(book), d, None)?,
                None => nearest_codes(&points, book, d, None)?,
            };
            for (&j, &a) in members.iter().zip(&found.indices) {
                changed += usize::from(self.assignments[j] != a);
                self.assignments[j] = a;
            }
        }
        Ok(changed)
    }

    /// Rounds the centroids to fp16 precision (what the file stores).
    pub fn round_to_f16(&mut self) {
        round_to_f16(&mut self.centroids);
    }

    /// Bits of the stored codes: `n_sv·⌈log2 K⌉`.
    pub fn index_bits(&self) -> u64 {
        self.geometry.n_subvectors() as u64 * u64::from(index_bits(self.k))
    }

    /// Bits of the stored fp16 codebooks.
    pub fn codebook_bits(&self) -> u64 {
        16 * self.centroids.len() as u64
    }
}

/// Rounds every value to the nearest fp16 (what a file stores).
pub(crate) fn round_to_f16(values: &mut [f32]) {
    for c in values {
        *c = half::f16::from_f32(*c).to_f32();
    }
}
