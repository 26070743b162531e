//! Shared pieces of the CPU kernels: the element trait, storage access and work splitting.

use candle_core::{CpuStorage, DType, Layout, WithDType};

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

/// Run `f(chunk_index, start, end)` for each of `chunks` chunks of `items`, in parallel.
pub(crate) fn for_each_chunk<F>(items: usize, chunks: usize, f: F)
where
    F: Fn(usize, usize, usize) + Sync,
{
    use rayon::prelude::*;
    (0..chunks).into_par_iter().for_each(|c| {
        let (start, end) = chunk_range(items, chunks, c);
        f(c, start, end)
    });
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
