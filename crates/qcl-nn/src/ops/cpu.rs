//! Shared pieces of the CPU kernels: the element trait, storage access and work splitting.

use candle_core::{CpuStorage, DType, Layout, Shape, Storage, WithDType};

/// The float types the CPU kernels support (`f32`, `f64`).
pub(crate) trait Float:
    WithDType
    + Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64_(v: f64) -> Self;
    fn to_f64_(self) -> f64;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64_(v: f64) -> Self {
        v as f32
    }
    fn to_f64_(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64_(v: f64) -> Self {
        v
    }
    fn to_f64_(self) -> f64 {
        self
    }
}

/// Whether the custom CPU kernels handle `dtype` (others fall back to candle's ops).
pub(crate) fn supported_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

/// The contiguous data of a tensor's storage. Callers make inputs contiguous first, so a
/// strided layout here is an internal error, reported rather than silently mis-read.
pub(crate) fn slice<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the kernel needs a contiguous tensor"),
    }
}

/// A host kernel over one contiguous operand of any supported float type.
pub(crate) trait UnaryKernel {
    /// The result for operand `x` of shape `dims`.
    fn run<T: Float>(&self, x: &[T], dims: &[usize]) -> Vec<T>;

    /// Shape of the result (default: the operand's).
    fn output_shape(&self, l: &Layout) -> Shape {
        l.shape().clone()
    }
}

/// A host kernel over two contiguous operands of the same float type.
pub(crate) trait BinaryKernel {
    /// The result for operands `a` (of shape `dims`) and `b`.
    fn run<T: Float>(&self, a: &[T], b: &[T], dims: &[usize]) -> Vec<T>;

    /// Shape of the result (default: the first operand's).
    fn output_shape(&self, l1: &Layout, _l2: &Layout) -> Shape {
        l1.shape().clone()
    }
}

/// A host kernel over three contiguous operands of the same float type.
pub(crate) trait TernaryKernel {
    /// The result for operands `a` (of shape `dims`), `b` and `c`.
    fn run<T: Float>(&self, a: &[T], b: &[T], c: &[T], dims: &[usize]) -> Vec<T>;

    /// Shape of the result (default: the first operand's).
    fn output_shape(&self, l1: &Layout, _l2: &Layout, _l3: &Layout) -> Shape {
        l1.shape().clone()
    }
}

/// The `cpu_fwd` of a candle `CustomOp1/2/3` whose host work is its `Unary/Binary/TernaryKernel`
/// (dtype dispatch in `run_*`, result shape from `output_shape`), written once for every op.
macro_rules! kernel_cpu_fwd {
    (unary) => {
        $crate::ops::cpu::kernel_cpu_fwd!(UnaryKernel, run_unary, (s1, l1));
    };
    (binary) => {
        $crate::ops::cpu::kernel_cpu_fwd!(BinaryKernel, run_binary, (s1, l1), (s2, l2));
    };
    (ternary) => {
        $crate::ops::cpu::kernel_cpu_fwd!(TernaryKernel, run_ternary, (s1, l1), (s2, l2), (s3, l3));
    };
    ($kernel:ident, $run:ident, $(($s:ident, $l:ident)),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let out = $crate::ops::cpu::$run(self, self.name(), $(($s, $l)),+)?;
            Ok((out, $crate::ops::cpu::$kernel::output_shape(self, $($l),+)))
        }
    };
}
pub(crate) use kernel_cpu_fwd;

/// Runs `kernel` on `f32` or `f64` storage: the one place custom ops dispatch on dtype.
pub(crate) fn run_unary(
    kernel: &impl UnaryKernel,
    name: &str,
    (s, l): (&CpuStorage, &Layout),
) -> candle_core::Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(_) => {
            f32::to_cpu_storage_owned(kernel.run(slice::<f32>(s, l, name)?, l.dims()))
        }
        CpuStorage::F64(_) => {
            f64::to_cpu_storage_owned(kernel.run(slice::<f64>(s, l, name)?, l.dims()))
        }
        _ => candle_core::bail!("{name}: only f32 and f64 are supported"),
    })
}

/// [`run_unary`] for two operands of the same dtype.
pub(crate) fn run_binary(
    kernel: &impl BinaryKernel,
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::to_cpu_storage_owned(kernel.run(
            slice::<f32>(s1, l1, name)?,
            slice(s2, l2, name)?,
            l1.dims(),
        )),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::to_cpu_storage_owned(kernel.run(
            slice::<f64>(s1, l1, name)?,
            slice(s2, l2, name)?,
            l1.dims(),
        )),
        _ => candle_core::bail!("{name}: only matching f32 or f64 operands are supported"),
    })
}

/// [`run_unary`] for three operands of the same dtype.
pub(crate) fn run_ternary(
    kernel: &impl TernaryKernel,
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2, s3) {
        (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
            f32::to_cpu_storage_owned(kernel.run(
                slice::<f32>(s1, l1, name)?,
                slice(s2, l2, name)?,
                slice(s3, l3, name)?,
                l1.dims(),
            ))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
            f64::to_cpu_storage_owned(kernel.run(
                slice::<f64>(s1, l1, name)?,
                slice(s2, l2, name)?,
                slice(s3, l3, name)?,
                l1.dims(),
            ))
        }
        _ => candle_core::bail!("{name}: only matching f32 or f64 operands are supported"),
    })
}

/// The contiguous host data of a tensor's storage.
pub(crate) fn host<'a, T: Float>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    match storage {
        Storage::Cpu(cpu) => slice::<T>(cpu, layout, "a fused op's backward"),
        _ => candle_core::bail!("a fused op's backward needs CPU storage"),
    }
}

/// `acc += v`, in parallel pieces.
pub(crate) fn add_in_place<T: Float>(acc: &mut [T], v: &[T]) {
    const PIECE: usize = 1 << 15;
    use rayon::prelude::*;
    acc.par_chunks_mut(PIECE)
        .zip(v.par_chunks(PIECE))
        .for_each(|(a, b)| add_assign_slice(a, b));
}

/// How many contiguous chunks to split `items` into: one per rayon thread, so that each core
/// gets one large piece of work (fine-grained parallel loops cost more than they gain here).
pub(crate) fn chunk_count(items: usize) -> usize {
    rayon::current_num_threads().clamp(1, items.max(1))
}

/// The `[start, end)` range of chunk `index` when `items` are split into `chunks` near-equal
/// contiguous chunks.
pub(crate) fn chunk_range(items: usize, chunks: usize, index: usize) -> (usize, usize) {
    let base = items / chunks;
    let extra = items % chunks;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    (start, start + len)
}

/// `f(start, end)` for each of `chunks` chunks of `items`, in parallel; results in chunk order.
pub(crate) fn map_chunks<R, F>(items: usize, chunks: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize, usize) -> R + Sync,
{
    use rayon::prelude::*;
    (0..chunks)
        .into_par_iter()
        .map(|c| {
            let (start, end) = chunk_range(items, chunks, c);
            f(start, end)
        })
        .collect()
}

/// Split `data` (of `items` records of `record_len` elements) into the same chunks as
/// [`chunk_range`] and run `f(start_record, chunk_slice)` on each in parallel.
pub(crate) fn for_each_chunk_mut<T: Send, F>(data: &mut [T], record_len: usize, chunks: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync,
{
    use rayon::prelude::*;
    let items = data.len().checked_div(record_len).unwrap_or(0);
    let mut pieces = Vec::with_capacity(chunks);
    let mut rest = data;
    for c in 0..chunks {
        let (start, end) = chunk_range(items, chunks, c);
        let (head, tail) = rest.split_at_mut((end - start) * record_len);
        pieces.push((start, head));
        rest = tail;
    }
    pieces
        .into_par_iter()
        .for_each(|(start, piece)| f(start, piece));
}

/// A vector of `len` uninitialised elements, for outputs that a kernel writes in full (the
/// zero-fill of `vec![0; len]` is a whole extra pass over memory).
pub(crate) fn uninit_vec<T>(len: usize) -> Vec<std::mem::MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit<T>` needs no initialisation, and the capacity is `len`.
    unsafe { v.set_len(len) };
    v
}

/// Reinterprets a fully written vector from [`uninit_vec`].
///
/// # Safety
/// Every element of `v` must have been written.
pub(crate) unsafe fn assume_init<T>(v: Vec<std::mem::MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has the layout of `T`; the caller guarantees initialisation;
    // pointer, length and capacity come from a live vector that is not dropped.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// Defines a function generic over [`Float`] whose body is compiled three times: for
/// AVX-512, for AVX2+FMA and for the build's baseline, picking the best one the CPU has at run
/// time. Release builds target baseline x86-64 (SSE2) unless told otherwise, which leaves the
/// elementwise loops of BatchNorm and ReLU scalar; these loops are memory-bound once vectorised.
macro_rules! simd_fn {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident<T: Float>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name<T: Float>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<T: Float>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::ops::cpu::has_avx512() {
                    // SAFETY: the CPU supports every feature `v4` was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::ops::cpu::has_avx2_fma() {
                    // SAFETY: the CPU supports every feature `v3` was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Whether the CPU has AVX-512F/VL (cached by the standard library).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Whether the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

simd_fn! {
    /// `out[i] = x[i]·scale + shift`, then `max(·, 0)` if `relu`.
    pub(crate) fn scale_shift<T: Float>(
        x: &[T],
        scale: T,
        shift: T,
        relu: bool,
        out: &mut [std::mem::MaybeUninit<T>],
    ) {
        if relu {
            for (d, v) in out.iter_mut().zip(x) {
                let r = *v * scale + shift;
                d.write(if r > T::ZERO { r } else { T::ZERO });
            }
        } else {
            for (d, v) in out.iter_mut().zip(x) {
                d.write(*v * scale + shift);
            }
        }
    }
}

simd_fn! {
    /// `out[i] = a·g[i] + b·(x[i] − mean) + k`, with `g = dy·[y > 0]` if `relu` else `dy`.
    /// Centring `x` before scaling keeps the BatchNorm gradient accurate when the mean is
    /// large next to the spread.
    pub(crate) fn affine_of_grad<T: Float>(
        dy: &[T],
        x: &[T],
        y: &[T],
        coefficients: (T, T, T, T),
        relu: bool,
        out: &mut [std::mem::MaybeUninit<T>],
    ) {
        let (a, b, mean, k) = coefficients;
        if relu {
            for (((d, g), x), y) in out.iter_mut().zip(dy).zip(x).zip(y) {
                let g = if *y > T::ZERO { *g } else { T::ZERO };
                d.write(a * g + b * (*x - mean) + k);
            }
        } else {
            for ((d, g), x) in out.iter_mut().zip(dy).zip(x) {
                d.write(a * *g + b * (*x - mean) + k);
            }
        }
    }
}

simd_fn! {
    /// `out[i] = max(x[i], 0)`.
    pub(crate) fn relu_slice<T: Float>(x: &[T], out: &mut [std::mem::MaybeUninit<T>]) {
        for (d, v) in out.iter_mut().zip(x) {
            d.write(if *v > T::ZERO { *v } else { T::ZERO });
        }
    }
}

simd_fn! {
    /// `out[i] = g[i]·[y[i] > 0]`.
    pub(crate) fn relu_grad_slice<T: Float>(g: &[T], y: &[T], out: &mut [std::mem::MaybeUninit<T>]) {
        for ((d, g), y) in out.iter_mut().zip(g).zip(y) {
            d.write(if *y > T::ZERO { *g } else { T::ZERO });
        }
    }
}

simd_fn! {
    /// `out[i] = max(a[i] + b[i], 0)`.
    pub(crate) fn add_relu_slice<T: Float>(a: &[T], b: &[T], out: &mut [std::mem::MaybeUninit<T>]) {
        for ((d, a), b) in out.iter_mut().zip(a).zip(b) {
            let r = *a + *b;
            d.write(if r > T::ZERO { r } else { T::ZERO });
        }
    }
}

simd_fn! {
    /// `acc[i] += v[i]`.
    pub(crate) fn add_assign_slice<T: Float>(acc: &mut [T], v: &[T]) {
        for (a, v) in acc.iter_mut().zip(v) {
            *a += *v;
        }
    }
}

simd_fn! {
    /// `y[i] = y[i] + shift`, then `max(·, 0)` if `relu`, in place.
    pub(crate) fn shift_relu_in_place<T: Float>(y: &mut [T], shift: T, relu: bool) {
        if relu {
            for v in y.iter_mut() {
                let r = *v + shift;
                *v = if r > T::ZERO { r } else { T::ZERO };
            }
        } else {
            for v in y.iter_mut() {
                *v += shift;
            }
        }
    }
}

/// Elements summed in independent lanes, so that float sums vectorise (the compiler may not
/// reorder one running sum).
pub(crate) const LANES: usize = 16;

simd_fn! {
    /// `Σ v`: lanes of `T`, totalled in `f64`.
    pub(crate) fn lane_sum<T: Float>(v: &[T]) -> f64 {
        let mut acc = [T::ZERO; LANES];
        let chunks = v.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                acc[l] += c[l];
            }
        }
        acc.iter().chain(tail).map(|a| a.to_f64_()).sum()
    }
}

simd_fn! {
    /// `Σ (v − mean)²`: lanes of `T`, totalled in `f64`.
    pub(crate) fn lane_squared_deviation<T: Float>(v: &[T], mean: T) -> f64 {
        let mut acc = [T::ZERO; LANES];
        let chunks = v.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                let d = c[l] - mean;
                acc[l] += d * d;
            }
        }
        let tail_sum: f64 = tail
            .iter()
            .map(|x| {
                let d = (*x - mean).to_f64_();
                d * d
            })
            .sum();
        acc.iter().map(|a| a.to_f64_()).sum::<f64>() + tail_sum
    }
}

/// `(Σ g, Σ g·(x − mean))`, totalled in `f64` (two vectorised passes).
pub(crate) fn lane_grad_sums<T: Float>(g: &[T], x: &[T], mean: T) -> (f64, f64) {
    (lane_sum(g), lane_centred_dot(g, x, mean))
}

simd_fn! {
    /// `Σ g·(x − mean)` over lanes of `T`, totalled in `f64`.
    pub(crate) fn lane_centred_dot<T: Float>(g: &[T], x: &[T], mean: T) -> f64 {
        let mut acc = [T::ZERO; LANES];
        let gc = g.chunks_exact(LANES);
        let xc = x.chunks_exact(LANES);
        let (g_tail, x_tail) = (gc.remainder(), xc.remainder());
        for (g, x) in gc.zip(xc) {
            for l in 0..LANES {
                acc[l] += g[l] * (x[l] - mean);
            }
        }
        let tail: f64 = g_tail
            .iter()
            .zip(x_tail)
            .map(|(g, x)| g.to_f64_() * (*x - mean).to_f64_())
            .sum();
        acc.iter().map(|a| a.to_f64_()).sum::<f64>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_items_exactly_once() {
        for items in 0..40 {
            for chunks in 1..9 {
                let mut next = 0;
                for c in 0..chunks {
                    let (s, e) = chunk_range(items, chunks, c);
                    assert_eq!(s, next);
                    assert!(e >= s);
                    next = e;
                }
                assert_eq!(next, items);
            }
        }
    }
}
