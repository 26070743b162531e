//! Implicit-GEMM kernels for convolutions in `f32` on x86-64 with AVX-512: stride 1 directly,
//! larger strides through a polyphase split of the input.
//!
//! (Over 600 lines only with its tests: the group layout with its padding and polyphase split
//! and the forward and weight-gradient micro-kernels that read it are about 560 lines; about 210
//! lines are tests against the GEMM path.)
//!
//! In the group layout ([`GroupLayout`]) row `r = (c, ki, kj)` of the column matrix of a group
//! of images is the contiguous slice `buffer[off_r .. off_r + len]` of one zero-padded buffer.
//! So both GEMMs of a stride-1 convolution can read that buffer directly, with no column matrix
//! and no GEMM packing copy:
//!
//! - forward: `wide[co][j] = Σ_r W[co][r] · buffer[off_r + j]`, an outer-product micro-kernel
//!   over 48 pixels × 8 output channels (24 accumulator registers);
//! - weight gradient: `dW[co][r] += Σ_j dy_wide[co][j] · buffer[off_r + j]`, a dot-product
//!   micro-kernel over 3 taps × 8 output channels, reduced across lanes once per group.
//!
//! This removes the im2col and packing copies, which at ResNet-20's 16-channel 28×28 layers
//! cost as much as the arithmetic: there the forward of a batch of 128 went from 4.0–4.5 ms to
//! about 3.0 ms on 2 cores, while the micro-kernels run at the core's FMA peak (about 110
//! GFLOP/s per core measured on this project's AVX-512 machines). Sums run in a fixed order,
//! so results are deterministic; they differ from the GEMM path only by rounding.

use std::arch::x86_64::{
    __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
    _mm512_reduce_add_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};
use std::mem::MaybeUninit;

use super::conv_kernels::ConvGeometry;

/// Pixels per forward micro-tile: three 16-lane vectors.
const TILE_PIXELS: usize = 48;
/// Output channels per micro-tile (forward and weight gradient).
const TILE_CHANNELS: usize = 8;
/// Taps (column-matrix rows) per weight-gradient micro-tile.
const TILE_TAPS: usize = 3;
/// Lanes of one vector.
const LANES: usize = 16;
/// Output-grid pixels a group of images aims for: long enough that tile rounding and the
/// weight gradient's cross-lane reductions are a small share of the work, short enough that a
/// group's padded images stay in a core's L2 cache.
const GROUP_PIXELS: usize = 1024;

/// Whether the implicit kernels run on this CPU.
pub(crate) fn available() -> bool {
    super::cpu::has_avx512()
}

/// A group of images of a convolution laid out so that every column-matrix row is one
/// contiguous slice.
///
/// **Stride 1.** Each channel plane stacks the group's images, row stride `width = w_in +
/// pad_cols`, with `gap` zero rows above every image and below the last: the zero columns at
/// the end of a row serve as the right padding of that row and the left padding of the next,
/// and the zero rows as the bottom padding of one image and the top padding of the next.
/// Output `(b, oy, ox)` then sits at grid position `j = (b·slot + oy)·width + ox`, and tap
/// `r = (c, ki, kj)` reads `buffer[offsets[r] + j]`. Grid positions outside the images'
/// outputs are computed and discarded.
///
/// **Stride `s ≥ 2` (polyphase).** Every input channel is split into `s²` phase planes of the
/// zero-padded image, `x_{a,b}[i, j] = x_pad[s·i + a, s·j + b]`, each stacked like a stride-1
/// plane (row stride `⌈(w_in + 2p)/s⌉`, no gap: the padding is inside the phases). Tap
/// `(c, ki, kj)` of output `(oy, ox)` reads `x_pad[s·oy + ki, s·ox + kj] = x_{ki mod s, kj mod
/// s}[oy + ⌊ki/s⌋, ox + ⌊kj/s⌋]`: again one fixed offset per tap, so the same kernels compute
/// a strided convolution as a stride-1 one over the phases, without reading a zero tap.
#[derive(Debug, Clone)]
pub(crate) struct GroupLayout {
    /// Images per group.
    pub images: usize,
    /// Row stride of a plane.
    width: usize,
    /// Rows per image.
    slot: usize,
    /// Zero rows between images (and above the first); 0 for phase planes.
    gap: usize,
    /// Elements per plane: `(gap + images·slot)·width`.
    plane: usize,
    /// Zeros before the first plane, read by the left taps of the first row.
    lead: usize,
    /// The convolution's stride: the phases per row and column of an input channel.
    stride: usize,
    /// `offsets[r]` for every column-matrix row `r = (c·kh + ki)·kw + kj`.
    pub offsets: Vec<usize>,
    /// Elements of one group's buffer, with room after the last plane for the widest tile.
    pub buffer_len: usize,
}

impl GroupLayout {
    /// The layout of `g`, or `None` for shapes the GEMM path serves better: pointwise
    /// convolutions (no column matrix to avoid; the GEMM beats copying into a layout), and
    /// strided ones that are dilated or have a kernel smaller than the stride (whose phases
    /// would be copied and never read).
    pub fn new(g: &ConvGeometry) -> Option<Self> {
        if g.is_pointwise() || g.n == 0 {
            return None;
        }
        if g.stride == 1 {
            Some(Self::stride_one(g))
        } else if g.dilation == 1 && g.kh >= g.stride && g.kw >= g.stride {
            Some(Self::phases(g))
        } else {
            None
        }
    }

    fn stride_one(g: &ConvGeometry) -> Self {
        let p = g.padding;
        // Enough zero columns for the left and right overhang (`p` each side), and a grid
        // at least as wide as the output.
        let pad_cols = p.max(g.w_out.saturating_sub(g.w_in));
        let gap = p.max(g.h_out.saturating_sub(g.h_in));
        let width = g.w_in + pad_cols;
        let slot = g.h_in + gap;
        let images = GROUP_PIXELS.div_ceil(slot * width).clamp(1, g.n);
        let plane = (gap + images * slot) * width;
        let lead = pad_cols;
        let mut offsets = Vec::with_capacity(g.k_dim());
        for c in 0..g.c_in {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    // Output row `R = b·slot + oy` reads plane row `R + gap − p + ki·d`.
                    offsets.push(
                        lead + c * plane + (gap - p + ki * g.dilation) * width + kj * g.dilation
                            - p,
                    );
                }
            }
        }
        // The last tap ends at `lead + (c_in−1)·plane + (gap − p + (kh−1)d)·width + (kw−1)d
        // − p + len`, within `lead + c_in·plane + (kw−1)d` since `h_out ≤ h_in + 2p − (kh−1)d`.
        let buffer_len = lead + g.c_in * plane + g.dilation * (g.kw - 1) + TILE_PIXELS;
        Self {
            images,
            width,
            slot,
            gap,
            plane,
            lead,
            stride: 1,
            offsets,
            buffer_len,
        }
    }

    fn phases(g: &ConvGeometry) -> Self {
        let s = g.stride;
        let width = (g.w_in + 2 * g.padding).div_ceil(s);
        let slot = (g.h_in + 2 * g.padding).div_ceil(s);
        let images = GROUP_PIXELS.div_ceil(slot * width).clamp(1, g.n);
        let plane = images * slot * width;
        let mut offsets = Vec::with_capacity(g.k_dim());
        for c in 0..g.c_in {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let phase = (c * s + ki % s) * s + kj % s;
                    offsets.push(phase * plane + (ki / s) * width + kj / s);
                }
            }
        }
        // A valid output reads phase row `oy + ⌊ki/s⌋ < slot` and column `ox + ⌊kj/s⌋ <
        // width` (the padded image holds `s·oy + ki`), so the last tap of the last image ends
        // inside the last plane plus `⌊(kw−1)/s⌋` and the tile rounding.
        let buffer_len = g.c_in * s * s * plane + (g.kw - 1) / s + TILE_PIXELS;
        Self {
            images,
            width,
            slot,
            gap: 0,
            plane,
            lead: 0,
            stride: s,
            offsets,
            buffer_len,
        }
    }

    /// The share of the output grid that is real output: `h_out·w_out / (slot·width)`. The
    /// rest (padding rows and columns) is computed and discarded.
    pub fn grid_efficiency(&self, g: &ConvGeometry) -> f64 {
        (g.h_out * g.w_out) as f64 / (self.slot * self.width) as f64
    }

    /// Output-grid positions of a group of `count` images.
    fn len(&self, g: &ConvGeometry, count: usize) -> usize {
        ((count - 1) * self.slot + g.h_out) * self.width
    }

    /// Grid position of output row `oy` of image `b` of the group.
    fn row_start(&self, b: usize, oy: usize) -> usize {
        (b * self.slot + oy) * self.width
    }

    /// Copies `count` consecutive images (`x`, each `c_in × h_in × w_in`) into the group
    /// buffer (split into phases for a strided layout), whose zero rows, columns, lead and
    /// tail are never written.
    fn pad(&self, g: &ConvGeometry, x: &[f32], buffer: &mut [f32]) {
        if self.stride > 1 {
            self.split_phases(g, x, buffer);
            return;
        }
        let image_in = g.c_in * g.hw_in();
        for (b, image) in x.chunks_exact(image_in).enumerate() {
            for (c, src_plane) in image.chunks_exact(g.hw_in()).enumerate() {
                let plane_start =
                    self.lead + c * self.plane + (self.gap + b * self.slot) * self.width;
                let rows = RowCopy {
                    rows: g.h_in,
                    width: g.w_in,
                    src_stride: g.w_in,
                    dst_stride: self.width,
                };
                rows.copy(src_plane, &mut buffer[plane_start..]);
            }
        }
    }

    /// The strided layout's copy: input row `y` of channel `c` goes to row `(y + p) / s` of
    /// the phases `((y + p) mod s, ·)`, its columns `x` to column `(x + p) / s` of phase
    /// `(·, (x + p) mod s)`. Phase positions over the zero padding are never written.
    fn split_phases(&self, g: &ConvGeometry, x: &[f32], buffer: &mut [f32]) {
        let (s, p) = (self.stride, g.padding);
        // For each column phase: the first phase column holding an input column, that input
        // column, and how many it holds.
        let columns: Vec<(usize, usize, usize)> = (0..s)
            .map(|phase| {
                let first = p.saturating_sub(phase).div_ceil(s);
                let source = (s * first + phase) - p;
                let count = g.w_in.saturating_sub(source).div_ceil(s);
                (first, source, count)
            })
            .collect();
        let image_in = g.c_in * g.hw_in();
        for (b, image) in x.chunks_exact(image_in).enumerate() {
            for (c, src_plane) in image.chunks_exact(g.hw_in()).enumerate() {
                for (y, src_row) in src_plane.chunks_exact(g.w_in).enumerate() {
                    let (row_phase, i) = ((y + p) % s, (y + p) / s);
                    for (col_phase, &(first, source, count)) in columns.iter().enumerate() {
                        if count == 0 {
                            continue;
                        }
                        let phase = (c * s + row_phase) * s + col_phase;
                        let start = phase * self.plane + (b * self.slot + i) * self.width + first;
                        let dst = &mut buffer[start..start + count];
                        for (d, v) in dst.iter_mut().zip(src_row[source..].iter().step_by(s)) {
                            *d = *v;
                        }
                    }
                }
            }
        }
    }
}

/// A strided copy of `rows` rows of `width` elements.
///
/// The rows here are a few dozen elements long, too short for a `memcpy` call per row to pay
/// off, so the copy is a loop of vector moves with a masked last vector.
#[derive(Debug, Clone, Copy)]
struct RowCopy {
    rows: usize,
    width: usize,
    src_stride: usize,
    dst_stride: usize,
}

impl RowCopy {
    /// Elements a buffer of row stride `stride` must hold.
    fn extent(&self, stride: usize) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * stride + self.width
        }
    }

    fn copy(&self, src: &[f32], dst: &mut [f32]) {
        assert!(src.len() >= self.extent(self.src_stride));
        assert!(dst.len() >= self.extent(self.dst_stride));
        assert!(available(), "the implicit convolution needs AVX-512");
        // SAFETY: AVX-512 is available and both extents are in bounds (asserted above).
        unsafe { self.copy_raw(src.as_ptr(), dst.as_mut_ptr()) }
    }

    fn copy_uninit(&self, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        assert!(src.len() >= self.extent(self.src_stride));
        assert!(dst.len() >= self.extent(self.dst_stride));
        assert!(available(), "the implicit convolution needs AVX-512");
        // SAFETY: as in `copy`; writing initialised `f32`s through the cast pointer is sound.
        unsafe { self.copy_raw(src.as_ptr(), dst.as_mut_ptr().cast::<f32>()) }
    }

    /// # Safety
    /// AVX-512F must be available; `src` and `dst` must be valid for [`Self::extent`] of
    /// their strides.
    #[target_feature(enable = "avx512f")]
    unsafe fn copy_raw(&self, src: *const f32, dst: *mut f32) {
        let full = self.width / LANES;
        let mask = ((1u32 << (self.width % LANES)) - 1) as u16;
        for r in 0..self.rows {
            // SAFETY: every access is within row `r`'s `width` elements (masked lanes are not
            // touched), in bounds by the caller's contract.
            unsafe {
                let (s, d) = (src.add(r * self.src_stride), dst.add(r * self.dst_stride));
                for v in 0..full {
                    _mm512_storeu_ps(d.add(v * LANES), _mm512_loadu_ps(s.add(v * LANES)));
                }
                if mask != 0 {
                    let tail = _mm512_maskz_loadu_ps(mask, s.add(full * LANES));
                    _mm512_mask_storeu_ps(d.add(full * LANES), mask, tail);
                }
            }
        }
    }
}

/// Weights packed for the forward micro-kernel: for each group of [`TILE_CHANNELS`] output
/// channels, `k_dim` rows of that many values (zero past `c_out`).
pub(crate) fn packed_forward_weights(g: &ConvGeometry, w: &[f32]) -> Vec<f32> {
    let (c_out, k_dim) = (g.c_out, g.k_dim());
    let groups = c_out.div_ceil(TILE_CHANNELS);
    let mut packed = vec![0.0; groups * k_dim * TILE_CHANNELS];
    for co in 0..c_out {
        let (group, lane) = (co / TILE_CHANNELS, co % TILE_CHANNELS);
        for (r, v) in w[co * k_dim..(co + 1) * k_dim].iter().enumerate() {
            packed[(group * k_dim + r) * TILE_CHANNELS + lane] = *v;
        }
    }
    packed
}

/// `y = conv(x, w)` for a stride-1 convolution, for the images `[first, first + y.len() /
/// image_out)`: `x` is the whole batch (`n × c_in × h_in × w_in`), `packed_w` comes from
/// [`packed_forward_weights`], `y` receives `c_out × h_out × w_out` per image.
///
/// The caller checks [`available`] and that `layout` is `GroupLayout::new(g)`.
pub(crate) fn forward_chunk(
    g: &ConvGeometry,
    layout: &GroupLayout,
    x: &[f32],
    packed_w: &[f32],
    first: usize,
    y: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(available(), "the implicit convolution needs AVX-512");
    assert_eq!(
        packed_w.len(),
        g.c_out.div_ceil(TILE_CHANNELS) * g.k_dim() * TILE_CHANNELS
    );
    let image_in = g.c_in * g.hw_in();
    let image_out = g.c_out * g.hw_out();
    let stride = layout.len(g, layout.images).div_ceil(TILE_PIXELS) * TILE_PIXELS;
    let mut buffer = vec![0.0f32; layout.buffer_len];
    let mut wide = vec![0.0f32; g.c_out * stride];
    for (group, y_group) in y.chunks_mut(layout.images * image_out).enumerate() {
        let count = y_group.len() / image_out;
        let b0 = first + group * layout.images;
        layout.pad(g, &x[b0 * image_in..(b0 + count) * image_in], &mut buffer);
        let tiles = layout.len(g, count).div_ceil(TILE_PIXELS) * TILE_PIXELS;
        // SAFETY: AVX-512 is available (asserted above); every tap's slice of `tiles ≤ stride`
        // elements lies in `buffer` (see `GroupLayout::new`); `wide` holds `c_out` rows of
        // `stride`; `packed_w` has the packed size (asserted above).
        unsafe {
            forward_tiles(
                &buffer,
                &layout.offsets,
                packed_w,
                g.c_out,
                (tiles, stride),
                &mut wide,
            )
        };
        let rows = RowCopy {
            rows: g.h_out,
            width: g.w_out,
            src_stride: layout.width,
            dst_stride: g.w_out,
        };
        for (b, y_b) in y_group.chunks_exact_mut(image_out).enumerate() {
            for (co, y_plane) in y_b.chunks_exact_mut(g.hw_out()).enumerate() {
                let start = co * stride + layout.row_start(b, 0);
                rows.copy_uninit(&wide[start..(co + 1) * stride], y_plane);
            }
        }
    }
}

/// `wide[co·stride + j] = Σ_r W[co][r] · buffer[off_r + j]` for `j < tiles`, `co < c_out`.
///
/// # Safety
/// AVX-512F must be available; `buffer[off_r + j]` must be in bounds for every `r` and
/// `j < tiles`; `tiles ≤ stride`, `tiles` a multiple of [`TILE_PIXELS`];
/// `wide.len() ≥ c_out · stride`; `packed.len() = ⌈c_out/8⌉ · offsets.len() · 8`.
#[target_feature(enable = "avx512f")]
unsafe fn forward_tiles(
    buffer: &[f32],
    offsets: &[usize],
    packed: &[f32],
    c_out: usize,
    (tiles, stride): (usize, usize),
    wide: &mut [f32],
) {
    let k_dim = offsets.len();
    debug_assert!(tiles.is_multiple_of(TILE_PIXELS) && tiles <= stride);
    debug_assert!(wide.len() >= c_out * stride);
    debug_assert!(offsets.iter().all(|&o| o + tiles <= buffer.len()));
    debug_assert_eq!(
        packed.len(),
        c_out.div_ceil(TILE_CHANNELS) * k_dim * TILE_CHANNELS
    );
    let src = buffer.as_ptr();
    for group in 0..c_out.div_ceil(TILE_CHANNELS) {
        let weights = packed[group * k_dim * TILE_CHANNELS..].as_ptr();
        let channels = (c_out - group * TILE_CHANNELS).min(TILE_CHANNELS);
        for j0 in (0..tiles).step_by(TILE_PIXELS) {
            // Three vectors of 16 pixels for each of the tile's channels: 24 registers.
            let mut acc: [[__m512; 3]; TILE_CHANNELS] = [[_mm512_setzero_ps(); 3]; TILE_CHANNELS];
            for (r, &off) in offsets.iter().enumerate() {
                // SAFETY: in bounds by the caller's contract on `offsets` and `packed`.
                unsafe {
                    let a = src.add(off + j0);
                    let a0 = _mm512_loadu_ps(a);
                    let a1 = _mm512_loadu_ps(a.add(LANES));
                    let a2 = _mm512_loadu_ps(a.add(2 * LANES));
                    let w = weights.add(r * TILE_CHANNELS);
                    for (c, sums) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*w.add(c));
                        sums[0] = _mm512_fmadd_ps(a0, b, sums[0]);
                        sums[1] = _mm512_fmadd_ps(a1, b, sums[1]);
                        sums[2] = _mm512_fmadd_ps(a2, b, sums[2]);
                    }
                }
            }
            for (c, sums) in acc.iter().enumerate().take(channels) {
                let row = (group * TILE_CHANNELS + c) * stride + j0;
                for (v, lanes) in sums.iter().enumerate() {
                    // SAFETY: `j0 + 48 ≤ tiles ≤ stride`, so the row's tile is inside `wide`.
                    unsafe { _mm512_storeu_ps(wide.as_mut_ptr().add(row + v * LANES), *lanes) };
                }
            }
        }
    }
}

/// `dW += Σ_b dy_b · col(x_b)ᵀ` over the images `[start, end)` of a stride-1 convolution;
/// `x` and `dy` are the whole batch, `dw` is `c_out × k_dim`, row-major.
///
/// The caller checks [`available`] and that `layout` is `GroupLayout::new(g)`.
pub(crate) fn weight_grad_chunk(
    g: &ConvGeometry,
    layout: &GroupLayout,
    x: &[f32],
    dy: &[f32],
    (start, end): (usize, usize),
    dw: &mut [f32],
) {
    assert!(available(), "the implicit convolution needs AVX-512");
    assert_eq!(dw.len(), g.c_out * g.k_dim());
    let image_in = g.c_in * g.hw_in();
    let image_out = g.c_out * g.hw_out();
    let stride = layout.len(g, layout.images).div_ceil(LANES) * LANES;
    // Zeroed once: only the images' pixels and outputs are rewritten, so the padding of the
    // buffer and the discarded grid positions of `wide` stay zero, as the dot products need.
    let mut buffer = vec![0.0f32; layout.buffer_len];
    let mut wide = vec![0.0f32; g.c_out * stride];
    for b0 in (start..end).step_by(layout.images) {
        let count = (end - b0).min(layout.images);
        layout.pad(g, &x[b0 * image_in..(b0 + count) * image_in], &mut buffer);
        let rows = RowCopy {
            rows: g.h_out,
            width: g.w_out,
            src_stride: g.w_out,
            dst_stride: layout.width,
        };
        for b in 0..count {
            let dy_b = &dy[(b0 + b) * image_out..(b0 + b + 1) * image_out];
            for (co, src_plane) in dy_b.chunks_exact(g.hw_out()).enumerate() {
                let start = co * stride + layout.row_start(b, 0);
                rows.copy(src_plane, &mut wide[start..(co + 1) * stride]);
            }
        }
        let len = layout.len(g, count);
        let vectors = len.div_ceil(LANES) * LANES;
        if count < layout.images {
            // The rounding past `len` may reach the slot of an image of the previous group.
            for row in wide.chunks_exact_mut(stride) {
                row[len..vectors].fill(0.0);
            }
        }
        // SAFETY: AVX-512 is available (asserted above); every tap's slice of `vectors ≤
        // stride` elements lies in `buffer` (see `GroupLayout::new`); `wide` holds `c_out`
        // rows of `stride`; `dw` is `c_out × k_dim` (asserted above).
        unsafe {
            weight_grad_tiles(
                &buffer,
                &layout.offsets,
                &wide,
                g.c_out,
                (vectors, stride),
                dw,
            )
        };
    }
}

/// `dw[co·k_dim + r] += Σ_{j<vectors} buffer[off_r + j] · wide[co·stride + j]`.
///
/// # Safety
/// AVX-512F must be available; `off_r + vectors ≤ buffer.len()` for every `r`;
/// `vectors ≤ stride`, a multiple of [`LANES`]; `wide.len() ≥ c_out · stride`;
/// `dw.len() = c_out · offsets.len()`.
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_tiles(
    buffer: &[f32],
    offsets: &[usize],
    wide: &[f32],
    c_out: usize,
    (vectors, stride): (usize, usize),
    dw: &mut [f32],
) {
    let k_dim = offsets.len();
    debug_assert!(vectors.is_multiple_of(LANES) && vectors <= stride);
    debug_assert!(wide.len() >= c_out * stride);
    debug_assert!(offsets.iter().all(|&o| o + vectors <= buffer.len()));
    debug_assert_eq!(dw.len(), c_out * k_dim);
    let image = buffer.as_ptr();
    for co0 in (0..c_out).step_by(TILE_CHANNELS) {
        // Channels past `c_out` repeat the last one; their sums are not stored.
        let rows: [*const f32; TILE_CHANNELS] =
            std::array::from_fn(|c| wide[(co0 + c).min(c_out - 1) * stride..].as_ptr());
        for r0 in (0..k_dim).step_by(TILE_TAPS) {
            // Taps past `k_dim` repeat the last one; their sums are not stored.
            let taps: [usize; TILE_TAPS] =
                std::array::from_fn(|t| offsets[(r0 + t).min(k_dim - 1)]);
            let mut acc: [[__m512; TILE_CHANNELS]; TILE_TAPS] =
                [[_mm512_setzero_ps(); TILE_CHANNELS]; TILE_TAPS];
            for j in (0..vectors).step_by(LANES) {
                // SAFETY: `off_r + j + 16 ≤ buffer.len()` and `j + 16 ≤ stride`.
                unsafe {
                    let a = [
                        _mm512_loadu_ps(image.add(taps[0] + j)),
                        _mm512_loadu_ps(image.add(taps[1] + j)),
                        _mm512_loadu_ps(image.add(taps[2] + j)),
                    ];
                    for (c, row) in rows.iter().enumerate() {
                        let d = _mm512_loadu_ps(row.add(j));
                        for t in 0..TILE_TAPS {
                            acc[t][c] = _mm512_fmadd_ps(a[t], d, acc[t][c]);
                        }
                    }
                }
            }
            for (t, sums) in acc.iter().enumerate() {
                if r0 + t >= k_dim {
                    break;
                }
                for (c, lanes) in sums.iter().enumerate() {
                    if co0 + c >= c_out {
                        break;
                    }
                    dw[(co0 + c) * k_dim + r0 + t] += _mm512_reduce_add_ps(*lanes);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::conv_kernels::{
        conv_forward, conv_forward_explicit, conv_input_grad, conv_input_grad_explicit,
        conv_weight_grad, conv_weight_grad_explicit, ConvGeometry,
    };
    use super::*;

    /// Deterministic values in [−1, 1].
    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let h = (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9)
                    .rotate_left(29);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn stride_one(
        sizes: (usize, usize, usize),
        image: (usize, usize),
        kernel: (usize, usize),
        padding: usize,
        dilation: usize,
    ) -> Option<ConvGeometry> {
        strided(sizes, image, kernel, (1, padding, dilation))
    }

    fn strided(
        (n, c_in, c_out): (usize, usize, usize),
        (h_in, w_in): (usize, usize),
        (kh, kw): (usize, usize),
        (stride, padding, dilation): (usize, usize, usize),
    ) -> Option<ConvGeometry> {
        ConvGeometry::new(
            n,
            c_in,
            (h_in, w_in),
            c_out,
            (kh, kw),
            stride,
            padding,
            dilation,
        )
    }

    /// The largest difference, relative to the reference's largest magnitude.
    fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
        assert_eq!(ours.len(), reference.len());
        let scale = reference.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .zip(reference)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    fn check(g: &ConvGeometry, seed: u64) {
        let x = values(g.input_len(), seed);
        let w = values(g.c_out * g.k_dim(), seed + 1);
        let dy = values(g.output_len(), seed + 2);
        let forward = conv_forward(g, &x, &w);
        let forward_reference = conv_forward_explicit(g, &x, &w);
        let error = relative_error(&forward, &forward_reference);
        assert!(error < 1e-5, "forward {g:?}: {error}");
        let dx = conv_input_grad(g, &dy, &w);
        let error = relative_error(&dx, &conv_input_grad_explicit(g, &dy, &w));
        assert!(error < 1e-5, "input gradient {g:?}: {error}");
        // The implicit kernel itself: the dispatch sends low-efficiency grids to the GEMM.
        let layout = GroupLayout::new(g).unwrap();
        let mut dw = vec![0.0; g.c_out * g.k_dim()];
        weight_grad_chunk(g, &layout, &x, &dy, (0, g.n), &mut dw);
        let dw_reference = conv_weight_grad_explicit(g, &x, &dy);
        let error = relative_error(&dw, &dw_reference);
        assert!(error < 1e-5, "weight gradient {g:?}: {error}");
        let error = relative_error(&conv_weight_grad(g, &x, &dy), &dw_reference);
        assert!(error < 1e-5, "dispatched weight gradient {g:?}: {error}");
    }

    #[test]
    fn the_layout_reads_inside_its_buffer_and_covers_every_output() {
        let g = stride_one((70, 3, 5), (7, 9), (3, 2), 2, 2).unwrap();
        let layout = GroupLayout::new(&g).unwrap();
        // 7×9 images with 2 zero columns and rows: 11 columns, slots of 9 rows.
        assert_eq!((layout.width, layout.slot, layout.gap), (11, 9, 2));
        assert_eq!(layout.images, 1024usize.div_ceil(9 * 11));
        let len = layout.len(&g, layout.images);
        for &off in &layout.offsets {
            assert!(off + len.div_ceil(TILE_PIXELS) * TILE_PIXELS <= layout.buffer_len);
        }
        // The last output of the last image is inside the grid.
        let last = layout.row_start(layout.images - 1, g.h_out - 1) + g.w_out - 1;
        assert_eq!(last + 1 + layout.width - g.w_out, len);
    }

    #[test]
    fn strided_layouts_need_a_kernel_as_wide_as_the_stride_and_no_dilation() {
        let g = strided((2, 1, 1), (5, 5), (3, 3), (2, 1, 1)).unwrap();
        let layout = GroupLayout::new(&g).unwrap();
        // 7×7 padded images in four 4×4 phases; tap (0, 2, 1) reads phase (0, 1) one row down.
        assert_eq!((layout.width, layout.slot, layout.stride), (4, 4, 2));
        assert_eq!(layout.offsets[2 * 3 + 1], layout.plane + layout.width);
        assert!(
            GroupLayout::new(&strided((2, 1, 1), (5, 5), (1, 1), (2, 0, 1)).unwrap()).is_none()
        );
        assert!(
            GroupLayout::new(&strided((2, 1, 1), (9, 9), (3, 3), (2, 1, 2)).unwrap()).is_none()
        );
        assert!(
            GroupLayout::new(&strided((2, 1, 1), (9, 9), (3, 2), (3, 1, 1)).unwrap()).is_none()
        );
    }

    #[test]
    fn the_phase_split_places_every_pixel_and_keeps_the_padding_zero() {
        // One 5×5 image of values 1..=25, padding 1, stride 2: phases of the 7×7 padded image.
        let g = strided((1, 1, 1), (5, 5), (3, 3), (2, 1, 1)).unwrap();
        let layout = GroupLayout::new(&g).unwrap();
        let x: Vec<f32> = (1..=25).map(|v| v as f32).collect();
        let mut buffer = vec![0.0; layout.buffer_len];
        layout.pad(&g, &x, &mut buffer);
        for a in 0..2 {
            for b in 0..2 {
                for i in 0..layout.slot {
                    for j in 0..layout.width {
                        let (y, x_col) = ((2 * i + a) as isize - 1, (2 * j + b) as isize - 1);
                        let expected = if (0..5).contains(&y) && (0..5).contains(&x_col) {
                            (y * 5 + x_col + 1) as f32
                        } else {
                            0.0
                        };
                        let at = (a * 2 + b) * layout.plane + i * layout.width + j;
                        assert_eq!(buffer[at], expected, "phase ({a}, {b}) at ({i}, {j})");
                    }
                }
            }
        }
    }

    #[test]
    fn the_model_shapes_match_the_gemm_path() {
        if !available() {
            return;
        }
        // ResNet-20's three stages and the VQ autoencoder's 3×3 layers, with a batch that
        // leaves a partial last group, and one channel count that is not a multiple of 8.
        for (c_in, c_out, size) in [
            (1, 16, 28),
            (16, 16, 28),
            (32, 32, 14),
            (64, 64, 7),
            (16, 20, 14),
        ] {
            let g = stride_one((37, c_in, c_out), (size, size), (3, 3), 1, 1).unwrap();
            check(&g, size as u64);
        }
        // ResNet-20's downsampling 3×3 convolutions and the VQ autoencoder's strided 4×4
        // convolution (whose transpose is the decoder's output layer).
        for (c_in, c_out, size, kernel) in [
            (16, 32, 28, 3),
            (32, 64, 14, 3),
            (1, 16, 28, 4),
            (1, 32, 28, 4),
        ] {
            let g = strided((37, c_in, c_out), (size, size), (kernel, kernel), (2, 1, 1)).unwrap();
            check(&g, size as u64 + 1);
        }
    }

    #[test]
    fn a_partial_group_after_full_ones_reads_no_stale_gradient() {
        if !available() {
            return;
        }
        // Unpadded 3×3 images and kernels: slots of 9 grid positions with one output each.
        // A last group of one image has 3 grid positions, rounded up to 16, which reach into
        // the next slot, where the previous group left its input and gradient.
        let g = stride_one((115, 2, 3), (3, 3), (3, 3), 0, 1).unwrap();
        let layout = GroupLayout::new(&g).unwrap();
        assert_eq!((layout.width, layout.slot, layout.images), (3, 3, 114));
        let x = values(g.input_len(), 5);
        let dy = values(g.output_len(), 6);
        let mut dw = vec![0.0; g.c_out * g.k_dim()];
        weight_grad_chunk(&g, &layout, &x, &dy, (0, g.n), &mut dw);
        let error = relative_error(&dw, &conv_weight_grad_explicit(&g, &x, &dy));
        assert!(error < 1e-5, "{error}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Forward and weight gradient equal the im2col + GEMM path for any shape the layouts
        /// take: partial groups and tiles, channel counts off the tile size, padding wider than
        /// the kernel, dilation, rectangular kernels and images, strides 1 to 3.
        #[test]
        fn implicit_matches_the_gemm_path(
            n in 1usize..40, c_in in 1usize..6, c_out in 1usize..20,
            h in 1usize..12, w in 1usize..12, kh in 1usize..5, kw in 1usize..5,
            stride in 1usize..4, padding in 0usize..4, dilation in 1usize..3, seed in 0u64..1000,
        ) {
            prop_assume!(available());
            let g = strided((n, c_in, c_out), (h, w), (kh, kw), (stride, padding, dilation));
            prop_assume!(g.is_some());
            let g = g.unwrap();
            prop_assume!(GroupLayout::new(&g).is_some());
            check(&g, seed);
        }
    }
}
