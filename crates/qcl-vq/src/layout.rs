//! Where a quantizer's vectors sit in an input tensor, and the gather/scatter between that
//! layout and the per-codebook `[M, D]` rows the nearest-code kernel reads.
//!
//! Every input is viewed as `outer` blocks of `[C, inner]` values: the axes before the channel
//! axis make `outer`, those after it `inner` (`(B, C, H, W)`: `outer = B`, `inner = H·W`;
//! `[.., C]`: `inner = 1`). Vector `o·inner + p` is row `o·inner + p` of every codebook's rows,
//! so the rows come in the input's row-major order whatever the layout.

use candle_core::{DType, Tensor};
use qcl_tensor::{Error, Result};

use crate::config::ChannelAxis;

/// The shape of an input (or index tensor) and its channel axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InputLayout {
    dims: Vec<usize>,
    axis: usize,
}

impl InputLayout {
    /// The layout of `dims` whose channel axis (by `axis`) has size `channels`.
    pub(crate) fn new(
        dims: &[usize],
        axis: ChannelAxis,
        channels: usize,
        context: &str,
    ) -> Result<Self> {
        match axis.resolve(dims.len()) {
            Some(a) if dims[a] == channels => Ok(InputLayout {
                dims: dims.to_vec(),
                axis: a,
            }),
            _ => Err(Error::ShapeMismatch {
                context: context.into(),
                expected: axis.pattern(channels),
                actual: dims.to_vec(),
            }),
        }
    }

    /// Blocks before the channel axis.
    pub(crate) fn outer(&self) -> usize {
        self.dims[..self.axis].iter().product()
    }

    /// Positions after the channel axis, per block.
    pub(crate) fn inner(&self) -> usize {
        self.dims[self.axis + 1..].iter().product()
    }

    /// Vectors per codebook, `outer·inner`.
    pub(crate) fn vectors(&self) -> usize {
        self.outer() * self.inner()
    }

    /// The channel-axis coordinate of flat (row-major) position `i`: for an index tensor, the
    /// codebook of its index `i`.
    pub(crate) fn channel_of(&self, i: usize) -> usize {
        (i / self.inner()) % self.dims[self.axis]
    }

    /// The shape with `size` on the channel axis (C for values, N for indices).
    pub(crate) fn shape_with(&self, size: usize) -> Vec<usize> {
        let mut dims = self.dims.clone();
        dims[self.axis] = size;
        dims
    }
}

/// The values of a `u32` index tensor (the input's shape with N on the channel axis) and the
/// layout they are in.
pub(crate) fn index_values(
    indices: &Tensor,
    codebooks: usize,
    axis: ChannelAxis,
) -> Result<(Vec<u32>, InputLayout)> {
    if indices.dtype() != DType::U32 {
        return Err(Error::DTypeMismatch {
            context: "indices".into(),
            expected: DType::U32,
            actual: indices.dtype(),
        });
    }
    let layout = InputLayout::new(indices.dims(), axis, codebooks, "indices")?;
    let values = indices.flatten_all()?.to_vec1::<u32>()?;
    Ok((values, layout))
}

/// Channel geometry of a quantizer applied to one input layout.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub(crate) layout: InputLayout,
    pub(crate) codebooks: usize,
    pub(crate) code_dim: usize,
}

impl Geometry {
    fn channels(&self) -> usize {
        self.codebooks * self.code_dim
    }

    /// Codebook `n`'s vectors of `values` (input layout) as rows `[outer·inner, D]`.
    pub(crate) fn gather(&self, values: &[f32], n: usize, out: &mut Vec<f32>) {
        let (d_len, c, s) = (self.code_dim, self.channels(), self.layout.inner());
        out.clear();
        out.resize(self.layout.vectors() * d_len, 0.0);
        if s == 1 {
            // Channels innermost: each row is one contiguous slice.
            for (row, src) in out.chunks_exact_mut(d_len).zip(values.chunks_exact(c)) {
                row.copy_from_slice(&src[n * d_len..(n + 1) * d_len]);
            }
            return;
        }
        for b in 0..self.layout.outer() {
            let rows = &mut out[b * s * d_len..(b + 1) * s * d_len];
            for d in 0..d_len {
                let plane = &values[(b * c + n * d_len + d) * s..][..s];
                for (p, &v) in plane.iter().enumerate() {
                    rows[p * d_len + d] = v;
                }
            }
        }
    }

    /// Writes codebook `n`'s rows `book[idx[i]]` (`book` = `[K, D]`) into `out` (input layout).
    pub(crate) fn scatter(&self, book: &[f32], idx: &[u32], n: usize, out: &mut [f32]) {
        let (d_len, c, s) = (self.code_dim, self.channels(), self.layout.inner());
        if s == 1 {
            for (dst, &k) in out.chunks_exact_mut(c).zip(idx) {
                dst[n * d_len..(n + 1) * d_len]
                    .copy_from_slice(&book[k as usize * d_len..(k as usize + 1) * d_len]);
            }
            return;
        }
        for b in 0..self.layout.outer() {
            let codes = &idx[b * s..(b + 1) * s];
            for d in 0..d_len {
                let plane = &mut out[(b * c + n * d_len + d) * s..][..s];
                for (o, &k) in plane.iter_mut().zip(codes) {
                    *o = book[k as usize * d_len + d];
                }
            }
        }
    }

    /// Codebook `n`'s indices written into the index tensor's layout.
    pub(crate) fn put_indices(&self, idx: &[u32], n: usize, out: &mut [u32]) {
        let (nb, s) = (self.codebooks, self.layout.inner());
        for b in 0..self.layout.outer() {
            out[(b * nb + n) * s..][..s].copy_from_slice(&idx[b * s..(b + 1) * s]);
        }
    }

    /// Codebook `n`'s indices read from the index tensor's layout.
    pub(crate) fn take_indices(&self, all: &[u32], n: usize) -> Vec<u32> {
        let (nb, s) = (self.codebooks, self.layout.inner());
        (0..self.layout.outer())
            .flat_map(|b| all[(b * nb + n) * s..][..s].iter().copied())
            .collect()
    }
}
