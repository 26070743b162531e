//! Scanning blocked codes for one query: bound by byte tables, rescore exactly.

use super::blocks::{BlockedCodes, BLOCK};
use super::kernels::{block_mask_le_with, block_sums_with, Kernel};
use super::lut::QueryTables;
use super::topk::TopK;

/// How a scan scores the vectors. Both give the same answer, bit for bit.
///
/// ```
/// use qcl_pq::index::{Kernel, Scan};
/// assert_eq!(Scan::default(), Scan::Bounded(Kernel::detect()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Every vector scored with the exact `f32` table, one look-up at a time: the reference.
    Exact,
    /// Byte tables added by a SIMD kernel bound every vector's distance; only vectors that may
    /// enter the top `k` are rescored with the exact table.
    Bounded(Kernel),
}

impl Default for Scan {
    fn default() -> Self {
        Scan::Bounded(Kernel::detect())
    }
}

/// Lists of 8-bit codes shorter than this are scanned exactly even when a bounded scan is asked.
const SHORT_8BIT_LIST: usize = 1024;

/// Offers every vector of `codes` (ids `ids`) to `top`, its value starting from `offset`.
///
/// Both methods give `top` the same candidates with the same exact values.
pub(crate) fn scan(
    codes: &BlockedCodes,
    ids: &[u64],
    tables: &mut QueryTables,
    offset: f32,
    method: Scan,
    top: &mut TopK,
) {
    debug_assert_eq!(ids.len(), codes.n());
    // Quantizing 8-bit tables costs about as much as scoring a thousand vectors exactly: short
    // lists (an inverted file's, typically) are cheaper to score exactly. Measured on
    // Fashion-MNIST and GloVe with 58 and 380 vectors per list; 4-bit tables are 16 times
    // smaller and pay off at once. Either way the answer is the same.
    let short = codes.nbits() == 8 && codes.n() < SHORT_8BIT_LIST;
    match method {
        // Byte sums of more than 257 sub-spaces could overflow u16.
        Scan::Bounded(kernel) if !short && codes.m() * 255 <= usize::from(u16::MAX) => {
            scan_bounded(codes, ids, tables, offset, kernel, top)
        }
        _ => scan_exact(codes, ids, tables, offset, top),
    }
}

fn scan_exact(
    codes: &BlockedCodes,
    ids: &[u64],
    tables: &QueryTables,
    offset: f32,
    top: &mut TopK,
) {
    let mut values = [0f32; BLOCK];
    for (b, block_ids) in ids.chunks(BLOCK).enumerate() {
        exact_block(codes, b, tables, offset, &mut values);
        for (&value, &id) in values.iter().zip(block_ids) {
            top.push(value, id);
        }
    }
}

fn scan_bounded(
    codes: &BlockedCodes,
    ids: &[u64],
    tables: &mut QueryTables,
    offset: f32,
    kernel: Kernel,
    top: &mut TopK,
) {
    let (m, nbits) = (codes.m(), codes.nbits());
    let mut blocks = ids.chunks(BLOCK).enumerate();
    // Exact until the answer holds k candidates: the bytes are quantized for its threshold.
    let mut values = [0f32; BLOCK];
    while top.threshold() == f32::INFINITY {
        let Some((b, block_ids)) = blocks.next() else {
            return;
        };
        exact_block(codes, b, tables, offset, &mut values);
        for (&value, &id) in values.iter().zip(block_ids) {
            top.push(value, id);
        }
    }
    let mut sums = [0u16; BLOCK];
    let mut limit = 0;
    // The threshold the tables were last checked against (NaN: never): it moves only when a
    // vector enters the answer, and checking costs divisions, so blocks in between skip it.
    let mut checked = f32::NAN;
    for (b, block_ids) in blocks {
        let threshold = top.threshold();
        if threshold != checked {
            checked = threshold;
            if tables.needs_quantizing(threshold, offset) {
                tables.quantize(threshold, offset);
            }
            // Thresholds only fall: once no byte sum can pass, no later vector can either.
            let Some(new_limit) = tables.byte_threshold(threshold, offset) else {
                return;
            };
            limit = new_limit;
        }
        block_sums_with(kernel, codes.block(b), m, nbits, &tables.bytes, &mut sums);
        let lanes = block_ids.len();
        let present = if lanes == BLOCK {
            u64::MAX
        } else {
            (1u64 << lanes) - 1
        };
        let mut mask = block_mask_le_with(kernel, &sums, limit) & present;
        while mask != 0 {
            let lane = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let i = b * BLOCK + lane;
            let value = tables.exact_value(offset, (0..m).map(|j| codes.get(i, j)));
            if top.push(value, block_ids[lane]) {
                match tables.byte_threshold(top.threshold(), offset) {
                    Some(new_limit) if new_limit < limit => {
                        limit = new_limit;
                        mask &= block_mask_le_with(kernel, &sums, limit);
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        }
    }
}

/// Exact values of the vectors of block `b` (padding lanes included), each added in sub-space
/// order like [`QueryTables::exact_value`].
fn exact_block(
    codes: &BlockedCodes,
    b: usize,
    tables: &QueryTables,
    offset: f32,
    out: &mut [f32; BLOCK],
) {
    out.fill(offset);
    let block = codes.block(b);
    if codes.nbits() == 8 {
        for (run, table) in block
            .chunks_exact(BLOCK)
            .zip(tables.exact().chunks_exact(256))
        {
            for (value, &code) in out.iter_mut().zip(run) {
                *value += table[code as usize];
            }
        }
    } else {
        let m = codes.m();
        for (p, run) in block.chunks_exact(BLOCK).enumerate() {
            let low = &tables.exact()[2 * p * 16..(2 * p + 1) * 16];
            for (value, &byte) in out.iter_mut().zip(run) {
                *value += low[(byte & 0x0f) as usize];
            }
            if 2 * p + 1 < m {
                let high = &tables.exact()[(2 * p + 1) * 16..(2 * p + 2) * 16];
                for (value, &byte) in out.iter_mut().zip(run) {
                    *value += high[(byte >> 4) as usize];
                }
            }
        }
    }
}
