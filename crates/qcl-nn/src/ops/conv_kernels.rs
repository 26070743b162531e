//! im2col/col2im + GEMM convolution kernels on contiguous NCHW host buffers.
//!
//! (Over 600 lines: the geometry, im2col/col2im with the padded-rows shortcut, the GEMM helpers
//! and the three products, each with its explicit path and its dispatch to the implicit-GEMM
//! kernels, are one unit over one geometry and one set of buffers.)
//!
//! One geometry ([`ConvGeometry`]) serves all three products of a 2-D convolution
//! `y = conv(x, w)` with `x: [n, c_in, h_in, w_in]`, `w: [c_out, c_in, kh, kw]`:
//!
//! - forward: `y_b = W · col(x_b)` with `W` the `c_out × (c_in·kh·kw)` weight matrix;
//! - input gradient: `dx_b = col2im(Wᵀ · dy_b)`;
//! - weight gradient: `dW = Σ_b dy_b · col(x_b)ᵀ`.
//!
//! The transposed convolution is the same three products with forward and input gradient
//! swapped. Work is split into one contiguous chunk of images per thread; each thread runs
//! single-threaded GEMMs and keeps one image's column buffer, and the weight gradient is summed
//! over chunks in a fixed order, so results do not depend on scheduling.

use std::mem::MaybeUninit;

use super::cpu::{assume_init, chunk_count, for_each_chunk_mut, map_chunks, uninit_vec, Float};

/// Shape of one 2-D convolution (groups = 1), in the forward direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub n: usize,
    pub c_in: usize,
    pub h_in: usize,
    pub w_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub h_out: usize,
    pub w_out: usize,
}

impl ConvGeometry {
    /// The convolution of `n` images of `c_in × h_in × w_in` with `c_out` kernels of
    /// `kh × kw` (stride, padding, dilation as given), whose output height is
    /// `h_out = ⌊(h_in + 2p − d(kh−1) − 1)/s⌋ + 1` (likewise `w_out`). `None` if the kernel
    /// spans more than the padded input or the stride or dilation is 0.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        c_in: usize,
        (h_in, w_in): (usize, usize),
        c_out: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Option<Self> {
        if stride == 0 || dilation == 0 || kh == 0 || kw == 0 {
            return None;
        }
        let span_h = dilation * (kh - 1) + 1;
        let span_w = dilation * (kw - 1) + 1;
        let (ph, pw) = (h_in + 2 * padding, w_in + 2 * padding);
        if span_h > ph || span_w > pw {
            return None;
        }
        Some(Self {
            n,
            c_in,
            h_in,
            w_in,
            c_out,
            kh,
            kw,
            stride,
            padding,
            dilation,
            h_out: (ph - span_h) / stride + 1,
            w_out: (pw - span_w) / stride + 1,
        })
    }

    /// Rows of the column matrix: `c_in·kh·kw`.
    pub fn k_dim(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    pub fn hw_in(&self) -> usize {
        self.h_in * self.w_in
    }
    pub fn hw_out(&self) -> usize {
        self.h_out * self.w_out
    }
    pub fn input_len(&self) -> usize {
        self.n * self.c_in * self.hw_in()
    }
    pub fn output_len(&self) -> usize {
        self.n * self.c_out * self.hw_out()
    }
    /// For a stride-1 square-kernel convolution whose padding is at most `d(k−1)`, the input
    /// gradient is itself a convolution: `dx = conv(dy, rot180(W)ᵀ)` with padding
    /// `d(k−1) − p`. Returns that convolution's geometry and weights `[c_in, c_out, k, k]`.
    fn input_grad_as_convolution<T: Float>(&self, w: &[T]) -> Option<(ConvGeometry, Vec<T>)> {
        let span = self.dilation * (self.kh - 1);
        if self.stride != 1 || self.kh != self.kw || self.padding > span || self.is_pointwise() {
            return None;
        }
        let (k, kk) = (self.kh, self.kh * self.kw);
        let mut rotated = vec![T::ZERO; w.len()];
        for co in 0..self.c_out {
            for ci in 0..self.c_in {
                let src = &w[(co * self.c_in + ci) * kk..(co * self.c_in + ci + 1) * kk];
                let dst =
                    &mut rotated[(ci * self.c_out + co) * kk..(ci * self.c_out + co + 1) * kk];
                for i in 0..k {
                    for j in 0..k {
                        dst[(k - 1 - i) * k + (k - 1 - j)] = src[i * k + j];
                    }
                }
            }
        }
        let geometry = ConvGeometry {
            n: self.n,
            c_in: self.c_out,
            h_in: self.h_out,
            w_in: self.w_out,
            c_out: self.c_in,
            kh: k,
            kw: k,
            stride: 1,
            padding: span - self.padding,
            dilation: self.dilation,
            h_out: self.h_in,
            w_out: self.w_in,
        };
        Some((geometry, rotated))
    }

    /// A 1×1, stride-1, unpadded convolution: the column matrix is the image itself.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Calls `visit(row, y, x)` for every kernel tap `(ki, kj)` of input channel `c`, in the
    /// order of the column matrix: `row` is the tap's row of it, `y` and `x` its two axes.
    #[inline(always)]
    fn for_each_tap(&self, c: usize, mut visit: impl FnMut(usize, TapAxis, TapAxis)) {
        for ki in 0..self.kh {
            let off_y = (ki * self.dilation) as isize - self.padding as isize;
            let (y_lo, y_hi) = self.valid_range(off_y, self.h_in, self.h_out);
            for kj in 0..self.kw {
                let off_x = (kj * self.dilation) as isize - self.padding as isize;
                let (x_lo, x_hi) = self.valid_range(off_x, self.w_in, self.w_out);
                let row = (c * self.kh + ki) * self.kw + kj;
                visit(row, (off_y, y_lo, y_hi), (off_x, x_lo, x_hi));
            }
        }
    }

    /// Valid output columns `[lo, hi)` for kernel offset `off` (input column = `o·s + off`).
    fn valid_range(&self, off: isize, len_in: usize, len_out: usize) -> (usize, usize) {
        let s = self.stride as isize;
        let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
        let last = len_in as isize - 1 - off;
        let hi = if last < 0 { 0 } else { last / s + 1 };
        let lo = (lo as usize).min(len_out);
        let hi = (hi as usize).clamp(lo, len_out);
        (lo, hi)
    }
}

/// One axis of a kernel tap: the offset `off` of its input index (`o·s + off` for output
/// index `o`) and the outputs `[lo, hi)` whose input lies inside the image.
type TapAxis = (isize, usize, usize);

/// Fill `col` (`k_dim × hw_out`, row-major) with the patches of one image `x` (`c_in × hw_in`).
pub(crate) fn im2col<T: Float>(g: &ConvGeometry, x: &[T], col: &mut [T]) {
    let (hw_in, hw_out, s) = (g.hw_in(), g.hw_out(), g.stride);
    for c in 0..g.c_in {
        let plane = &x[c * hw_in..(c + 1) * hw_in];
        g.for_each_tap(c, |row_index, (off_y, y_lo, y_hi), (off_x, x_lo, x_hi)| {
            let row = &mut col[row_index * hw_out..(row_index + 1) * hw_out];
            row[..y_lo * g.w_out].fill(T::ZERO);
            row[y_hi * g.w_out..].fill(T::ZERO);
            for oy in y_lo..y_hi {
                let iy = (oy * s) as isize + off_y;
                let src = &plane[iy as usize * g.w_in..(iy as usize + 1) * g.w_in];
                let dst = &mut row[oy * g.w_out..(oy + 1) * g.w_out];
                dst[..x_lo].fill(T::ZERO);
                dst[x_hi..].fill(T::ZERO);
                if x_lo == x_hi {
                    // No tap of this kernel column lands inside the image.
                    continue;
                }
                let ix0 = (x_lo * s) as isize + off_x;
                if s == 1 {
                    // A plain loop: rows are a few dozen elements, too short for memcpy's
                    // call to pay off.
                    let src = &src[ix0 as usize..ix0 as usize + (x_hi - x_lo)];
                    for (d, v) in dst[x_lo..x_hi].iter_mut().zip(src) {
                        *d = *v;
                    }
                } else {
                    for (k, d) in dst[x_lo..x_hi].iter_mut().enumerate() {
                        *d = src[ix0 as usize + k * s];
                    }
                }
            }
        });
    }
}

/// Add the columns `col` (`k_dim × hw_out`) back onto the image gradient `dx` (`c_in × hw_in`),
/// the adjoint of [`im2col`].
pub(crate) fn col2im<T: Float>(g: &ConvGeometry, col: &[T], dx: &mut [T]) {
    let (hw_in, hw_out, s) = (g.hw_in(), g.hw_out(), g.stride);
    for c in 0..g.c_in {
        let plane = &mut dx[c * hw_in..(c + 1) * hw_in];
        g.for_each_tap(c, |row_index, (off_y, y_lo, y_hi), (off_x, x_lo, x_hi)| {
            let row = &col[row_index * hw_out..(row_index + 1) * hw_out];
            if x_lo == x_hi {
                // No tap of this kernel column lands inside the image.
                return;
            }
            for oy in y_lo..y_hi {
                let iy = (oy * s) as isize + off_y;
                let dst = &mut plane[iy as usize * g.w_in..(iy as usize + 1) * g.w_in];
                let src = &row[oy * g.w_out + x_lo..oy * g.w_out + x_hi];
                let ix0 = ((x_lo * s) as isize + off_x) as usize;
                if s == 1 {
                    for (d, v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                        *d += *v;
                    }
                } else {
                    for (k, v) in src.iter().enumerate() {
                        dst[ix0 + k * s] += *v;
                    }
                }
            }
        });
    }
}

/// [`matmul`] into memory that may be uninitialised (`accumulate` must be false): every
/// element of the `m × n` destination is written.
#[allow(clippy::too_many_arguments)]
fn matmul_into_uninit<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<T>],
    dst_strides: (usize, usize),
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                dst[i * dst_strides.0 + j * dst_strides.1].write(T::ZERO);
            }
        }
        return;
    }
    // SAFETY: with `accumulate = false` the GEMM only writes the destination, so viewing the
    // (possibly uninitialised) buffer through a raw pointer is sound; bounds are checked inside.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<T>(), dst.len()) };
    matmul(
        m,
        n,
        k,
        dst,
        dst_strides,
        false,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        threads,
    );
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)` with explicit (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    let last = |rows: usize, cols: usize, (rs, cs): (usize, usize)| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    // The bounds the raw-pointer call below relies on.
    assert!(dst.len() >= last(m, n, dst_strides));
    assert!(lhs.len() >= last(m, k, lhs_strides));
    assert!(rhs.len() >= last(k, n, rhs_strides));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_strides.0 + j * dst_strides.1] = T::ZERO;
                }
            }
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every (i, j) access of the three matrices in bounds, and
    // `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm::<T>(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A thread's column-matrix buffer (`k_dim × hw_out`), empty for pointwise convolutions, whose
/// column matrix is the image itself.
fn column_buffer<T: Float>(g: &ConvGeometry) -> Vec<T> {
    if g.is_pointwise() {
        Vec::new()
    } else {
        vec![T::ZERO; g.k_dim() * g.hw_out()]
    }
}

/// The column matrix of image `x_b`: `x_b` itself for a pointwise convolution, else im2col
/// into `col` (from [`column_buffer`]).
fn columns<'a, T: Float>(g: &ConvGeometry, x_b: &'a [T], col: &'a mut [T]) -> &'a [T] {
    if g.is_pointwise() {
        x_b
    } else {
        im2col(g, x_b, col);
        col
    }
}

/// Threads to give each GEMM: all of them when there are fewer images than threads.
fn gemm_threads(chunks: usize) -> usize {
    if chunks == 1 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// The "padded rows" layout of a stride-1 convolution.
///
/// With the image zero-padded to `hp × wp` and flattened, output pixel `(oy, ox)` of tap
/// `(ki, kj)` reads element `(oy + ki·d)·wp + ox + kj·d`. Computing the output on a
/// `h_out × wp` grid (the last `wp − w_out` columns of every row are discarded) turns every
/// row of the column matrix into one contiguous slice of the padded image: `k_dim` long copies
/// instead of `k_dim · h_out` short ones.
#[derive(Debug, Clone, Copy)]
struct PaddedRows {
    /// Padded width.
    wp: usize,
    /// Elements per padded channel plane.
    plane: usize,
    /// Columns of the column matrix: `h_out · wp`.
    len: usize,
    /// Zeros after the last plane, so that the last taps' slices stay in bounds.
    tail: usize,
}

impl PaddedRows {
    fn new(g: &ConvGeometry) -> Option<Self> {
        if g.stride != 1 || g.is_pointwise() {
            return None;
        }
        let wp = g.w_in + 2 * g.padding;
        let hp = g.h_in + 2 * g.padding;
        Some(Self {
            wp,
            plane: hp * wp,
            len: g.h_out * wp,
            tail: g.dilation * (g.kw - 1),
        })
    }

    fn padded_len(&self, channels: usize) -> usize {
        channels * self.plane + self.tail
    }

    /// Copies one image (`c_in × h_in × w_in`) into the zeroed interior of `padded`.
    fn pad<T: Float>(&self, g: &ConvGeometry, x: &[T], padded: &mut [T]) {
        let p = g.padding;
        for c in 0..g.c_in {
            let src_plane = &x[c * g.hw_in()..(c + 1) * g.hw_in()];
            let dst_plane = &mut padded[c * self.plane..(c + 1) * self.plane];
            for (iy, src) in src_plane.chunks_exact(g.w_in).enumerate() {
                let start = (iy + p) * self.wp + p;
                for (d, v) in dst_plane[start..start + g.w_in].iter_mut().zip(src) {
                    *d = *v;
                }
            }
        }
    }

    /// Fills `col` (`k_dim × len`) from a padded image.
    fn im2col<T: Float>(&self, g: &ConvGeometry, padded: &[T], col: &mut [T]) {
        let mut rows = col.chunks_exact_mut(self.len);
        for c in 0..g.c_in {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let start = c * self.plane + ki * g.dilation * self.wp + kj * g.dilation;
                    if let Some(row) = rows.next() {
                        row.copy_from_slice(&padded[start..start + self.len]);
                    }
                }
            }
        }
    }
}

/// Per-thread buffers of the padded-rows path.
struct PaddedScratch<T> {
    padded: Vec<T>,
    col: Vec<T>,
    /// `c_out × len` output (forward) or output gradient (weight gradient) on the padded grid.
    wide: Vec<T>,
}

impl<T: Float> PaddedScratch<T> {
    fn new(g: &ConvGeometry, rows: &PaddedRows) -> Self {
        Self {
            // Zeroed once: `pad` rewrites only the interior, so borders and tail stay zero.
            padded: vec![T::ZERO; rows.padded_len(g.c_in)],
            col: vec![T::ZERO; g.k_dim() * rows.len],
            // Zeroed once: the discarded columns stay zero, which the weight gradient needs.
            wide: vec![T::ZERO; g.c_out * rows.len],
        }
    }
}

/// `y = conv(x, w)`: `x` is `n × c_in × h_in × w_in`, `w` is `c_out × k_dim`; returns
/// `n × c_out × h_out × w_out`.
pub(crate) fn conv_forward<T: Float>(g: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = implicit::forward(g, x, w) {
        return y;
    }
    conv_forward_explicit(g, x, w)
}

/// [`conv_forward`] by im2col and GEMM, on every CPU and dtype.
pub(crate) fn conv_forward_explicit<T: Float>(g: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    let (k_dim, hw_in, hw_out) = (g.k_dim(), g.hw_in(), g.hw_out());
    let mut y = uninit_vec::<T>(g.output_len());
    let chunks = chunk_count(g.n);
    let threads = gemm_threads(chunks);
    let image_out = g.c_out * hw_out;
    if let Some(rows) = PaddedRows::new(g) {
        for_each_chunk_mut(&mut y, image_out, chunks, |first, out| {
            let mut scratch = PaddedScratch::new(g, &rows);
            for (i, y_b) in out.chunks_mut(image_out).enumerate() {
                let b = first + i;
                rows.pad(
                    g,
                    &x[b * g.c_in * hw_in..(b + 1) * g.c_in * hw_in],
                    &mut scratch.padded,
                );
                rows.im2col(g, &scratch.padded, &mut scratch.col);
                // Y_wideᵀ = colᵀ · Wᵀ (len × c_out), stored as c_out × len.
                matmul(
                    rows.len,
                    g.c_out,
                    k_dim,
                    &mut scratch.wide,
                    (1, rows.len),
                    false,
                    &scratch.col,
                    (1, rows.len),
                    w,
                    (1, k_dim),
                    threads,
                );
                // Keep the first w_out of every wp columns.
                for (dst, src) in y_b
                    .chunks_exact_mut(g.w_out)
                    .zip(scratch.wide.chunks_exact(rows.wp))
                {
                    for (d, v) in dst.iter_mut().zip(src) {
                        d.write(*v);
                    }
                }
            }
        });
        // SAFETY: `y_b` has c_out·h_out rows of w_out, each written by the copy above.
        return unsafe { assume_init(y) };
    }
    for_each_chunk_mut(&mut y, image_out, chunks, |first, out| {
        let mut col = column_buffer(g);
        for (i, y_b) in out.chunks_mut(image_out).enumerate() {
            let b = first + i;
            let x_b = &x[b * g.c_in * hw_in..(b + 1) * g.c_in * hw_in];
            let col_b = columns(g, x_b, &mut col);
            // Computed as Y_bᵀ = colᵀ · Wᵀ (hw_out × c_out): the long pixel axis becomes the
            // GEMM's row axis, which its micro-kernels tile best; strides write NCHW directly.
            matmul_into_uninit(
                hw_out,
                g.c_out,
                k_dim,
                y_b,
                (1, hw_out),
                col_b,
                (1, hw_out),
                w,
                (1, k_dim),
                threads,
            );
        }
    });
    // SAFETY: every image's `c_out × hw_out` block was written by its GEMM.
    unsafe { assume_init(y) }
}

/// `dx = ∂L/∂x` from `dy = ∂L/∂y`: `col2im(Wᵀ · dy_b)` per image; returns `n × c_in × h_in × w_in`.
pub(crate) fn conv_input_grad<T: Float>(g: &ConvGeometry, dy: &[T], w: &[T]) -> Vec<T> {
    if let Some((rotated, weights)) = g.input_grad_as_convolution(w) {
        // A gather (im2col of dy) instead of a scatter-add (col2im): no zero-fill of dx, no
        // read-modify-write, and a better-shaped GEMM.
        return conv_forward(&rotated, dy, &weights);
    }
    conv_input_grad_explicit(g, dy, w)
}

/// [`conv_input_grad`] by GEMM and col2im, for every geometry, CPU and dtype.
pub(crate) fn conv_input_grad_explicit<T: Float>(g: &ConvGeometry, dy: &[T], w: &[T]) -> Vec<T> {
    let (k_dim, hw_in, hw_out) = (g.k_dim(), g.hw_in(), g.hw_out());
    let mut dx = vec![T::ZERO; g.input_len()];
    let chunks = chunk_count(g.n);
    let threads = gemm_threads(chunks);
    let image_in = g.c_in * hw_in;
    for_each_chunk_mut(&mut dx, image_in, chunks, |first, out| {
        let mut col = column_buffer(g);
        for (i, dx_b) in out.chunks_mut(image_in).enumerate() {
            let b = first + i;
            let dy_b = &dy[b * g.c_out * hw_out..(b + 1) * g.c_out * hw_out];
            let target: &mut [T] = if g.is_pointwise() { dx_b } else { &mut col };
            // Wᵀ: element (kk, co) of the transpose sits at w[co·k_dim + kk].
            matmul(
                k_dim,
                hw_out,
                g.c_out,
                target,
                (hw_out, 1),
                false,
                w,
                (1, k_dim),
                dy_b,
                (hw_out, 1),
                threads,
            );
            if !g.is_pointwise() {
                col2im(g, &col, dx_b);
            }
        }
    });
    dx
}

/// Partial weight-gradient sums: enough to keep every core busy on a small machine.
const WEIGHT_GRAD_CHUNKS: usize = 8;

/// `dW = Σ_b dy_b · col(x_b)ᵀ`; returns `c_out × k_dim`.
pub(crate) fn conv_weight_grad<T: Float>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    #[cfg(target_arch = "x86_64")]
    if let Some(dw) = implicit::weight_grad(g, x, dy) {
        return dw;
    }
    conv_weight_grad_explicit(g, x, dy)
}

/// Partial sums of the weight gradient: a fixed number (not one per thread) keeps the result
/// independent of the thread count, up to that many threads.
fn weight_grad_chunks(g: &ConvGeometry) -> usize {
    g.n.clamp(1, WEIGHT_GRAD_CHUNKS.max(rayon::current_num_threads()))
}

/// The sum of per-chunk partial weight gradients (each `len` long), added in chunk order so that
/// the result is deterministic for a thread count.
fn sum_in_chunk_order<T: Float>(partials: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut parts = partials.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![T::ZERO; len]);
    for part in parts {
        for (t, p) in total.iter_mut().zip(&part) {
            *t += *p;
        }
    }
    total
}

/// [`conv_weight_grad`] by im2col and GEMM, on every CPU and dtype.
pub(crate) fn conv_weight_grad_explicit<T: Float>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (k_dim, hw_in, hw_out) = (g.k_dim(), g.hw_in(), g.hw_out());
    let chunks = weight_grad_chunks(g);
    let threads = gemm_threads(chunk_count(g.n));
    let padded_rows = PaddedRows::new(g);
    let partials = map_chunks(g.n, chunks, |start, end| {
        let mut dw = vec![T::ZERO; g.c_out * k_dim];
        if let Some(rows) = padded_rows {
            let mut scratch = PaddedScratch::new(g, &rows);
            for b in start..end {
                rows.pad(
                    g,
                    &x[b * g.c_in * hw_in..(b + 1) * g.c_in * hw_in],
                    &mut scratch.padded,
                );
                rows.im2col(g, &scratch.padded, &mut scratch.col);
                // dy on the padded grid; the discarded columns stay zero.
                let dy_b = &dy[b * g.c_out * hw_out..(b + 1) * g.c_out * hw_out];
                for (dst, src) in scratch
                    .wide
                    .chunks_exact_mut(rows.wp)
                    .zip(dy_b.chunks_exact(g.w_out))
                {
                    dst[..g.w_out].copy_from_slice(src);
                }
                matmul(
                    k_dim,
                    g.c_out,
                    rows.len,
                    &mut dw,
                    (g.c_out, 1),
                    b > start,
                    &scratch.col,
                    (rows.len, 1),
                    &scratch.wide,
                    (1, rows.len),
                    threads,
                );
            }
            return dw;
        }
        let mut col = column_buffer(g);
        for b in start..end {
            let x_b = &x[b * g.c_in * hw_in..(b + 1) * g.c_in * hw_in];
            let dy_b = &dy[b * g.c_out * hw_out..(b + 1) * g.c_out * hw_out];
            let col_b = columns(g, x_b, &mut col);
            // dWᵀ (k_dim × c_out, row-major) += col_b · dy_bᵀ: of the layouts tried, this one
            // runs the GEMM's micro-kernels 1.2–2.5× faster at these skinny shapes.
            matmul(
                k_dim,
                g.c_out,
                hw_out,
                &mut dw,
                (g.c_out, 1),
                b > start,
                col_b,
                (hw_out, 1),
                dy_b,
                (1, hw_out),
                threads,
            );
        }
        dw
    });
    let total_t = sum_in_chunk_order(partials, g.c_out * k_dim);
    // Back from dWᵀ (k_dim × c_out) to dW (c_out × k_dim).
    let mut total = vec![T::ZERO; g.c_out * k_dim];
    for (kk, row) in total_t.chunks_exact(g.c_out).enumerate() {
        for (co, v) in row.iter().enumerate() {
            total[co * k_dim + kk] = *v;
        }
    }
    total
}

/// Dispatch to the implicit-GEMM kernels of [`super::conv_implicit`]: `f32`, AVX-512, any stride
/// (see [`super::conv_implicit::GroupLayout::new`] for the shapes it declines).
#[cfg(target_arch = "x86_64")]
mod implicit {
    use std::any::TypeId;

    use super::super::conv_implicit::{self, GroupLayout};
    use super::super::cpu::{assume_init, chunk_count, for_each_chunk_mut, map_chunks, uninit_vec};
    use super::{sum_in_chunk_order, weight_grad_chunks, ConvGeometry, Float};

    /// `x` as `f32` when `T` is `f32`.
    fn as_f32<T: Float>(x: &[T]) -> Option<&[f32]> {
        (TypeId::of::<T>() == TypeId::of::<f32>())
            // SAFETY: `T` is `f32`.
            .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
    }

    /// `v` as a `Vec<T>`, called only when `T` is `f32`.
    fn from_f32<T: Float>(v: Vec<f32>) -> Vec<T> {
        assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>());
        let mut v = std::mem::ManuallyDrop::new(v);
        // SAFETY: `T` is `f32` (asserted), so pointer, length and capacity describe a valid
        // `Vec<T>`; `v` is not dropped.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
    }

    /// The layout when the implicit kernels apply to `g` with element type `T`.
    fn layout<T: Float>(g: &ConvGeometry) -> Option<GroupLayout> {
        if TypeId::of::<T>() != TypeId::of::<f32>() || !conv_implicit::available() {
            return None;
        }
        GroupLayout::new(g)
    }

    pub(super) fn forward<T: Float>(g: &ConvGeometry, x: &[T], w: &[T]) -> Option<Vec<T>> {
        let layout = layout::<T>(g)?;
        let (x, w) = (as_f32(x)?, as_f32(w)?);
        let packed = conv_implicit::packed_forward_weights(g, w);
        let mut y = uninit_vec::<f32>(g.output_len());
        let image_out = g.c_out * g.hw_out();
        for_each_chunk_mut(&mut y, image_out, chunk_count(g.n), |first, out| {
            conv_implicit::forward_chunk(g, &layout, x, &packed, first, out);
        });
        // SAFETY: `forward_chunk` writes every element of its images.
        Some(from_f32(unsafe { assume_init(y) }))
    }

    /// Output-grid share below which the GEMM computes the weight gradient faster: there the
    /// discarded positions and the per-group lane reductions cost more than the packing saves
    /// (measured on ResNet-20's downsampling layers: at 7×7 outputs, share 0.77, the implicit
    /// kernel took 15 % longer; at 14×14, share 0.87, the GEMM took 1.3–1.7× longer).
    const MIN_WEIGHT_GRAD_GRID_EFFICIENCY: f64 = 0.8;

    pub(super) fn weight_grad<T: Float>(g: &ConvGeometry, x: &[T], dy: &[T]) -> Option<Vec<T>> {
        let layout = layout::<T>(g)?;
        if layout.grid_efficiency(g) < MIN_WEIGHT_GRAD_GRID_EFFICIENCY {
            return None;
        }
        let (x, dy) = (as_f32(x)?, as_f32(dy)?);
        let partials = map_chunks(g.n, weight_grad_chunks(g), |start, end| {
            let mut dw = vec![0.0f32; g.c_out * g.k_dim()];
            conv_implicit::weight_grad_chunk(g, &layout, x, dy, (start, end), &mut dw);
            dw
        });
        Some(from_f32(sum_in_chunk_order(partials, g.c_out * g.k_dim())))
    }
}
