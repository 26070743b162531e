//! im2col/col2im + GEMM convolution kernels on contiguous NCHW host buffers.
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

use super::cpu::{chunk_count, for_each_chunk, for_each_chunk_mut, Float};

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
    /// A 1×1, stride-1, unpadded convolution: the column matrix is the image itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
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

/// Fill `col` (`k_dim × hw_out`, row-major) with the patches of one image `x` (`c_in × hw_in`).
pub(crate) fn im2col<T: Float>(g: &ConvGeometry, x: &[T], col: &mut [T]) {
    let (hw_in, hw_out, s) = (g.hw_in(), g.hw_out(), g.stride);
    for c in 0..g.c_in {
        let plane = &x[c * hw_in..(c + 1) * hw_in];
        for ki in 0..g.kh {
            let off_y = (ki * g.dilation) as isize - g.padding as isize;
            let (y_lo, y_hi) = g.valid_range(off_y, g.h_in, g.h_out);
            for kj in 0..g.kw {
                let off_x = (kj * g.dilation) as isize - g.padding as isize;
                let (x_lo, x_hi) = g.valid_range(off_x, g.w_in, g.w_out);
                let row_index = (c * g.kh + ki) * g.kw + kj;
                let row = &mut col[row_index * hw_out..(row_index + 1) * hw_out];
                row[..y_lo * g.w_out].fill(T::ZERO);
                row[y_hi * g.w_out..].fill(T::ZERO);
                for oy in y_lo..y_hi {
                    let iy = (oy * s) as isize + off_y;
                    let src = &plane[iy as usize * g.w_in..(iy as usize + 1) * g.w_in];
                    let dst = &mut row[oy * g.w_out..(oy + 1) * g.w_out];
                    dst[..x_lo].fill(T::ZERO);
                    dst[x_hi..].fill(T::ZERO);
                    let ix0 = (x_lo * s) as isize + off_x;
                    if s == 1 {
                        dst[x_lo..x_hi]
                            .copy_from_slice(&src[ix0 as usize..ix0 as usize + (x_hi - x_lo)]);
                    } else {
                        for (k, d) in dst[x_lo..x_hi].iter_mut().enumerate() {
                            *d = src[ix0 as usize + k * s];
                        }
                    }
                }
            }
        }
    }
}

/// Add the columns `col` (`k_dim × hw_out`) back onto the image gradient `dx` (`c_in × hw_in`),
/// the adjoint of [`im2col`].
pub(crate) fn col2im<T: Float>(g: &ConvGeometry, col: &[T], dx: &mut [T]) {
    let (hw_in, hw_out, s) = (g.hw_in(), g.hw_out(), g.stride);
    for c in 0..g.c_in {
        let plane = &mut dx[c * hw_in..(c + 1) * hw_in];
        for ki in 0..g.kh {
            let off_y = (ki * g.dilation) as isize - g.padding as isize;
            let (y_lo, y_hi) = g.valid_range(off_y, g.h_in, g.h_out);
            for kj in 0..g.kw {
                let off_x = (kj * g.dilation) as isize - g.padding as isize;
                let (x_lo, x_hi) = g.valid_range(off_x, g.w_in, g.w_out);
                let row_index = (c * g.kh + ki) * g.kw + kj;
                let row = &col[row_index * hw_out..(row_index + 1) * hw_out];
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
            }
        }
    }
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

/// Threads to give each GEMM: all of them when there are fewer images than threads.
fn gemm_threads(chunks: usize) -> usize {
    if chunks == 1 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// `y = conv(x, w)`: `x` is `n × c_in × h_in × w_in`, `w` is `c_out × k_dim`; returns
/// `n × c_out × h_out × w_out`.
pub(crate) fn conv_forward<T: Float>(g: &ConvGeometry, x: &[T], w: &[T]) -> Vec<T> {
    let (k_dim, hw_in, hw_out) = (g.k_dim(), g.hw_in(), g.hw_out());
    let mut y = vec![T::ZERO; g.output_len()];
    let chunks = chunk_count(g.n);
    let threads = gemm_threads(chunks);
    let image_out = g.c_out * hw_out;
    for_each_chunk_mut(&mut y, image_out, chunks, |first, out| {
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::ZERO; k_dim * hw_out]
        };
        for (i, y_b) in out.chunks_mut(image_out).enumerate() {
            let b = first + i;
            let x_b = &x[b * g.c_in * hw_in..(b + 1) * g.c_in * hw_in];
            let col_b: &[T] = if g.is_pointwise() {
                x_b
            } else {
                im2col(g, x_b, &mut col);
                &col
            };
            // Computed as Y_bᵀ = colᵀ · Wᵀ (hw_out × c_out): the long pixel axis becomes the
            // GEMM's row axis, which its micro-kernels tile best; strides write NCHW directly.
            matmul(
                hw_out,
                g.c_out,
                k_dim,
                y_b,
                (1, hw_out),
                false,
                col_b,
                (1, hw_out),
                w,
                (1, k_dim),
                threads,
            );
        }
    });
    y
}

/// `dx = ∂L/∂x` from `dy = ∂L/∂y`: `col2im(Wᵀ · dy_b)` per image; returns `n × c_in × h_in × w_in`.
pub(crate) fn conv_input_grad<T: Float>(g: &ConvGeometry, dy: &[T], w: &[T]) -> Vec<T> {
    let (k_dim, hw_in, hw_out) = (g.k_dim(), g.hw_in(), g.hw_out());
    let mut dx = vec![T::ZERO; g.input_len()];
    let chunks = chunk_count(g.n);
    let threads = gemm_threads(chunks);
    let image_in = g.c_in * hw_in;
    for_each_chunk_mut(&mut dx, image_in, chunks, |first, out| {
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::ZERO; k_dim * hw_out]
        };
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
    let (k_dim, hw_in, hw_out) = (g.k_dim(), g.hw_in(), g.hw_out());
    // A fixed number of partial sums (not one per thread) keeps the result independent of
    // the thread count, up to that many threads.
    let chunks =
        g.n.clamp(1, WEIGHT_GRAD_CHUNKS.max(rayon::current_num_threads()));
    let threads = gemm_threads(chunk_count(g.n));
    let partials: Vec<std::sync::Mutex<Vec<T>>> = (0..chunks)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    for_each_chunk(g.n, chunks, |c, start, end| {
        let mut dw = vec![T::ZERO; g.c_out * k_dim];
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::ZERO; k_dim * hw_out]
        };
        for b in start..end {
            let x_b = &x[b * g.c_in * hw_in..(b + 1) * g.c_in * hw_in];
            let dy_b = &dy[b * g.c_out * hw_out..(b + 1) * g.c_out * hw_out];
            let col_b: &[T] = if g.is_pointwise() {
                x_b
            } else {
                im2col(g, x_b, &mut col);
                &col
            };
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
        *partials[c].lock().unwrap_or_else(|e| e.into_inner()) = dw;
    });
    // Sum the per-chunk partial gradients in chunk order: deterministic for a thread count.
    let mut parts = partials
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()));
    let mut total_t = parts.next().unwrap_or_default();
    if total_t.is_empty() {
        total_t = vec![T::ZERO; g.c_out * k_dim];
    }
    for part in parts {
        for (t, p) in total_t.iter_mut().zip(&part) {
            *t += *p;
        }
    }
    // Back from dWᵀ (k_dim × c_out) to dW (c_out × k_dim).
    let mut total = vec![T::ZERO; g.c_out * k_dim];
    for (kk, row) in total_t.chunks_exact(g.c_out).enumerate() {
        for (co, v) in row.iter().enumerate() {
            total[co * k_dim + kk] = *v;
        }
    }
    total
}
