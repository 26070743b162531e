//! How a layer's weight is cut into subvectors ("And the bit goes down", Stock et al., ICLR
//! 2020; the channel-major layout of a fork).
//!
//! A layer computes `y = x·M` with `M ∈ R^{D×O}`. `M` is cut into `m = D/d` slabs of `d`
//! consecutive rows; every column of every slab is one subvector, and subvector `j = b·O + o`
//! is column `o` of slab `b` (slab-major, also the on-disk order of the assignments).

use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

/// The shape of a layer that can be quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// A 2-D convolution with weight `[c_out, c_in, kh, kw]` (no groups).
    Conv {
        /// Output channels `O`.
        c_out: usize,
        /// Input channels.
        c_in: usize,
        /// Kernel height.
        kh: usize,
        /// Kernel width.
        kw: usize,
    },
    /// A fully connected layer with weight `[out, in]`.
    Linear {
        /// Output features `O`.
        out: usize,
        /// Input features `D`.
        inp: usize,
    },
}

impl LayerKind {
    /// The weight's shape.
    pub fn weight_shape(&self) -> Vec<usize> {
        let (o, c, kh, kw) = self.dims();
        match self {
            LayerKind::Conv { .. } => vec![o, c, kh, kw],
            LayerKind::Linear { .. } => vec![o, c],
        }
    }

    /// `(O, C_in, kh, kw)`, a linear layer being a 1×1 convolution.
    fn dims(&self) -> (usize, usize, usize, usize) {
        match *self {
            LayerKind::Conv {
                c_out,
                c_in,
                kh,
                kw,
            } => (c_out, c_in, kh, kw),
            LayerKind::Linear { out, inp } => (out, inp, 1, 1),
        }
    }
}

/// The order in which a filter is flattened into a column of `M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `(c_in, kh, kw)`, `kw` fastest: a 3×3 subvector with `d = 9` is one kernel (upstream).
    #[default]
    Spatial,
    /// `(kh, kw, c_in)`, `c_in` fastest: a subvector is `d` consecutive input channels at one
    /// spatial tap (the fork's ChangeDim). Needs `c_in % d == 0`.
    ChannelMajor,
}

/// A layer's shape, layout and block size, with the permutation between the weight and its
/// subvectors.
///
/// ```
/// use qcl_wpq::{LayerGeometry, LayerKind, Layout};
/// let kind = LayerKind::Conv { c_out: 2, c_in: 3, kh: 3, kw: 3 };
/// let g = LayerGeometry::new(kind, Layout::Spatial, 9)?;
/// assert_eq!((g.in_dim(), g.n_blocks(), g.n_subvectors()), (27, 3, 6));
/// let w: Vec<f32> = (0..54).map(|i| i as f32).collect();
/// let u = g.unroll(&w)?;
/// // Subvector 1 is filter 1's first kernel (slab 0, column 1).
/// assert_eq!(&u[9..18], &w[27..36]);
/// assert_eq!(g.roll(&u)?, w);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerGeometry {
    /// The layer's shape.
    pub kind: LayerKind,
    /// Flattening order.
    pub layout: Layout,
    /// Block size `d`.
    pub block: usize,
}

impl LayerGeometry {
    /// Checks that `block` divides the input dimension (and the input channels for
    /// [`Layout::ChannelMajor`]).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the layer's input dimension when it does not.
    pub fn new(kind: LayerKind, layout: Layout, block: usize) -> Result<Self> {
        let (o, c, kh, kw) = kind.dims();
        if o == 0 || c == 0 || kh == 0 || kw == 0 {
            return Err(Error::invalid_parameter(
                "layer",
                format!(
                    "every dimension must be positive, got {:?}",
                    kind.weight_shape()
                ),
            ));
        }
        let d_in = c * kh * kw;
        if block == 0 || !d_in.is_multiple_of(block) {
            return Err(Error::invalid_parameter(
                "block",
                format!("block size {block} does not divide the layer's input dimension {d_in}"),
            ));
        }
        if layout == Layout::ChannelMajor && !c.is_multiple_of(block) {
            return Err(Error::invalid_parameter(
                "block",
                format!("channel-major blocks need block size {block} to divide c_in = {c}"),
            ));
        }
        Ok(LayerGeometry {
            kind,
            layout,
            block,
        })
    }

    /// The geometry of a weight of `shape`: `[rows, cols]` is a linear layer (`rows` outputs,
    /// `cols` inputs; an embedding table is one too, a row per token), `[c_out, c_in, kh, kw]`
    /// a convolution.
    ///
    /// ```
    /// use qcl_wpq::{LayerGeometry, LayerKind, Layout};
    /// let g = LayerGeometry::from_shape(&[384, 1536], Layout::Spatial, 4)?;
    /// assert_eq!(g.kind, LayerKind::Linear { out: 384, inp: 1536 });
    /// assert!(LayerGeometry::from_shape(&[384], Layout::Spatial, 4).is_err());
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a rank other than 2 or 4; as [`LayerGeometry::new`].
    pub fn from_shape(shape: &[usize], layout: Layout, block: usize) -> Result<Self> {
        let kind = match *shape {
            [out, inp] => LayerKind::Linear { out, inp },
            [c_out, c_in, kh, kw] => LayerKind::Conv {
                c_out,
                c_in,
                kh,
                kw,
            },
            _ => {
                return Err(Error::ShapeMismatch {
                    context: "weight".into(),
                    expected: "a 2-D [rows, cols] or 4-D [c_out, c_in, kh, kw] weight".into(),
                    actual: shape.to_vec(),
                })
            }
        };
        LayerGeometry::new(kind, layout, block)
    }

    /// `order[n]` = patch position of the `n`-th input of a filter in its natural row-major
    /// order `(c_in, kh, kw)` (the identity for [`Layout::Spatial`]).
    pub fn patch_order(&self) -> Vec<usize> {
        let (_, c_n, kh, kw) = self.kind.dims();
        let mut order = Vec::with_capacity(self.in_dim());
        for c in 0..c_n {
            for y in 0..kh {
                for x in 0..kw {
                    order.push(self.patch_position(c, y, x));
                }
            }
        }
        order
    }

    /// The weight as the matrix `[O, D]` whose row `o` holds output `o`'s weights in patch
    /// order, so that subvector `(b, o)` is `matrix[o, b·d .. (b+1)·d]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a weight of the wrong size.
    pub fn to_matrix(&self, weight: &[f32]) -> Result<Vec<f32>> {
        self.reorder_rows("weight", weight, |dst, src, n, r| dst[r] = src[n])
    }

    /// The inverse of [`LayerGeometry::to_matrix`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for the wrong number of values.
    pub fn from_matrix(&self, matrix: &[f32]) -> Result<Vec<f32>> {
        self.reorder_rows("matrix", matrix, |dst, src, n, r| dst[n] = src[r])
    }

    /// `values` (checked as `what`) reordered row by row: `move_value(dst, src, n, r)` moves one
    /// value of a row between the `n`-th place of the natural order and patch position `r`.
    fn reorder_rows(
        &self,
        what: &str,
        values: &[f32],
        move_value: impl Fn(&mut [f32], &[f32], usize, usize),
    ) -> Result<Vec<f32>> {
        self.check_len(what, values.len())?;
        let d_in = self.in_dim();
        let order = self.patch_order();
        let mut out = vec![0f32; values.len()];
        for (src, dst) in values.chunks_exact(d_in).zip(out.chunks_exact_mut(d_in)) {
            for (n, &r) in order.iter().enumerate() {
                move_value(dst, src, n, r);
            }
        }
        Ok(out)
    }

    /// `D`, the length of one input patch.
    pub fn in_dim(&self) -> usize {
        let (_, c, kh, kw) = self.kind.dims();
        c * kh * kw
    }

    /// `O`, the number of outputs.
    pub fn out_dim(&self) -> usize {
        self.kind.dims().0
    }

    /// `m = D/d`, the number of slabs.
    pub fn n_blocks(&self) -> usize {
        self.in_dim() / self.block
    }

    /// `n_sv = m·O`.
    pub fn n_subvectors(&self) -> usize {
        self.n_blocks() * self.out_dim()
    }

    /// Number of weights.
    pub fn n_weights(&self) -> usize {
        self.in_dim() * self.out_dim()
    }

    /// Row of `M` (position in a patch) of input channel `c` at tap `(y, x)`.
    pub fn patch_position(&self, c: usize, y: usize, x: usize) -> usize {
        let (_, c_in, kh, kw) = self.kind.dims();
        match self.layout {
            Layout::Spatial => (c * kh + y) * kw + x,
            Layout::ChannelMajor => (y * kw + x) * c_in + c,
        }
    }

    /// `perm[j·d + t]` = flat index in the weight of component `t` of subvector `j`.
    pub fn permutation(&self) -> Vec<usize> {
        let (o_n, c_n, kh, kw) = self.kind.dims();
        let d = self.block;
        let mut perm = vec![0usize; self.n_weights()];
        for o in 0..o_n {
            for c in 0..c_n {
                for y in 0..kh {
                    for x in 0..kw {
                        let r = self.patch_position(c, y, x);
                        let j = (r / d) * o_n + o;
                        perm[j * d + r % d] = ((o * c_n + c) * kh + y) * kw + x;
                    }
                }
            }
        }
        perm
    }

    /// Subvector group of every subvector: all 0 with one shared codebook; with
    /// `per_slab_codebooks` the input-channel block (Subspace variant, channel-major order).
    pub fn groups(&self, per_slab_codebooks: bool) -> (usize, Vec<usize>) {
        let n_sv = self.n_subvectors();
        if !per_slab_codebooks {
            return (1, vec![0; n_sv]);
        }
        let (o, c, _, _) = self.kind.dims();
        let per_tap = (c / self.block).max(1);
        let groups = (0..n_sv).map(|j| (j / o) % per_tap).collect();
        (per_tap, groups)
    }

    fn check_len(&self, what: &str, len: usize) -> Result<()> {
        if len != self.n_weights() {
            return Err(Error::ShapeMismatch {
                context: what.into(),
                expected: format!(
                    "{:?} ({} values)",
                    self.kind.weight_shape(),
                    self.n_weights()
                ),
                actual: vec![len],
            });
        }
        Ok(())
    }

    /// The subvectors of a row-major weight, `[n_sv, d]` row-major.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a weight of the wrong size.
    pub fn unroll(&self, weight: &[f32]) -> Result<Vec<f32>> {
        self.check_len("weight", weight.len())?;
        Ok(self.permutation().iter().map(|&p| weight[p]).collect())
    }

    /// The weight (row-major, [`LayerKind::weight_shape`]) whose subvectors are `subvectors`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for the wrong number of values.
    pub fn roll(&self, subvectors: &[f32]) -> Result<Vec<f32>> {
        self.check_len("subvectors", subvectors.len())?;
        let mut weight = vec![0f32; subvectors.len()];
        for (&p, &v) in self.permutation().iter().zip(subvectors) {
            weight[p] = v;
        }
        Ok(weight)
    }
}

/// `K_layer = min(K_flag, largest power of two strictly below n_sv/4)` (the paper's clamp), powers
/// searched in `2^0 … 2^15`.
///
/// ```
/// assert_eq!(qcl_wpq::clamp_centroids(256, 4096)?, 256);
/// assert_eq!(qcl_wpq::clamp_centroids(256, 512)?, 64);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for `k_flag == 0` or when no power of two is below `n_sv/4`
/// (fewer than 5 subvectors).
pub fn clamp_centroids(k_flag: usize, n_subvectors: usize) -> Result<usize> {
    if k_flag == 0 {
        return Err(Error::invalid_parameter("centroids", "must be at least 1"));
    }
    let bound = (0..16u32)
        .map(|p| 1usize << p)
        .filter(|&k| 4 * k < n_subvectors)
        .max()
        .ok_or_else(|| {
            Error::invalid_parameter(
                "centroids",
                format!("a layer with {n_subvectors} subvectors is too small for a codebook"),
            )
        })?;
    Ok(k_flag.min(bound))
}

/// The bits of an index into `k` codes: qcl-pq's one definition.
pub use qcl_pq::index_bits;
