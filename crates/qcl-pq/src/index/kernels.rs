//! SIMD kernels for [`block_sums`](super::blocks::block_sums_scalar), chosen at run time.
//! (Placeholder: the portable kernel only.)

use super::blocks::{block_sums_scalar, BLOCK};

/// A block-sum kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable code.
    Scalar,
}

impl Kernel {
    /// The best kernel this CPU runs.
    pub fn detect() -> Kernel {
        Kernel::Scalar
    }

    /// Every kernel this CPU runs.
    pub fn available() -> Vec<Kernel> {
        vec![Kernel::Scalar]
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        "scalar"
    }
}

/// Block sums with the detected kernel.
pub fn block_sums(block: &[u8], m: usize, nbits: u32, lut: &[u8], out: &mut [u16; BLOCK]) {
    block_sums_with(Kernel::detect(), block, m, nbits, lut, out)
}

/// Block sums with `kernel`.
pub fn block_sums_with(
    _kernel: Kernel,
    block: &[u8],
    m: usize,
    nbits: u32,
    lut: &[u8],
    out: &mut [u16; BLOCK],
) {
    block_sums_scalar(block, m, nbits, lut, out)
}

/// Bit `i` set iff `sums[i] <= threshold`.
pub fn block_mask_le(sums: &[u16; BLOCK], threshold: u16) -> u64 {
    sums.iter().enumerate().fold(0u64, |mask, (i, &s)| {
        mask | (u64::from(s <= threshold) << i)
    })
}
