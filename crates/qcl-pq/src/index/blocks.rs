//! Codes laid out for scanning: blocks of [`BLOCK`] vectors, sub-space by sub-space.
//!
//! A flat [`PackedCodes`](crate::PackedCodes) buffer keeps one vector's codes together, which
//! suits decoding but makes a scan read `m` scattered bytes per vector. Here the codes of
//! [`BLOCK`] consecutive vectors are stored together, one run per sub-space, so one SIMD
//! register holds the code of sub-space `j` for every vector of the block and a table look-up
//! serves them all at once (André, Kermarrec & Le Scouarnec, "Quicker ADC", 2019).
//!
//! Layout of block `b` (vectors `b·BLOCK .. (b+1)·BLOCK`, missing vectors of the last block
//! padded with code 0):
//! - 8-bit codes: `m` runs of `BLOCK` bytes; byte `i` of run `j` is the code of vector `i` in
//!   sub-space `j`.
//! - 4-bit codes: `⌈m / 2⌉` runs of `BLOCK` bytes; byte `i` of run `p` holds the code of vector
//!   `i` in sub-space `2p` in its low nibble and sub-space `2p + 1` in its high nibble (0 when
//!   `m` is odd and `2p + 1 = m`).

use qcl_tensor::{Error, Result};

use crate::PackedCodes;

/// Vectors per block.
pub const BLOCK: usize = 64;

/// Codes of `n` vectors in the block layout of the module docs; 4 or 8 bits per code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedCodes {
    bytes: Vec<u8>,
    n: usize,
    m: usize,
    nbits: u32,
}

impl BlockedCodes {
    /// No vectors yet, `m` codes of `nbits` (4 or 8) bits each.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `m = 0` or `nbits` other than 4 or 8.
    pub fn new(m: usize, nbits: u32) -> Result<Self> {
        if m == 0 {
            return Err(Error::invalid_parameter("m", "need at least one sub-space"));
        }
        if nbits != 4 && nbits != 8 {
            return Err(Error::invalid_parameter(
                "nbits",
                format!("scanning needs 4- or 8-bit codes, got {nbits}"),
            ));
        }
        Ok(BlockedCodes {
            bytes: Vec::new(),
            n: 0,
            m,
            nbits,
        })
    }

    /// The codes of `packed`, rearranged.
    ///
    /// # Errors
    /// As [`new`](Self::new) for the codes' `m` and `nbits`.
    pub fn from_packed(packed: &PackedCodes) -> Result<Self> {
        let mut blocked = Self::new(packed.m(), packed.nbits())?;
        let mut row = vec![0u8; packed.m()];
        for i in 0..packed.n() {
            for (j, code) in row.iter_mut().enumerate() {
                *code = packed.get(i, j) as u8;
            }
            blocked.push(&row);
        }
        Ok(blocked)
    }

    /// Codes of `n` vectors from their raw block bytes ([`bytes`](Self::bytes)), as read from
    /// a file.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::ShapeMismatch`] if `bytes` is not exactly the blocks
    /// of `n` vectors; [`Error::InvalidParameter`] if a padding slot is not zero.
    pub fn from_bytes(bytes: Vec<u8>, n: usize, m: usize, nbits: u32) -> Result<Self> {
        let mut blocked = Self::new(m, nbits)?;
        let expected = n.div_ceil(BLOCK) * blocked.runs() * BLOCK;
        if bytes.len() != expected {
            return Err(Error::ShapeMismatch {
                context: format!("blocked codes of {n} vectors, m = {m}, {nbits}-bit"),
                expected: format!("[{expected}] bytes"),
                actual: vec![bytes.len()],
            });
        }
        blocked.bytes = bytes;
        blocked.n = n;
        let last = blocked.n_blocks() * BLOCK;
        let padded_lane = (n..last).find(|&i| (0..m).any(|j| blocked.get(i, j) != 0));
        let odd_nibble = nbits == 4
            && m % 2 == 1
            && (0..n).any(|i| blocked.bytes[blocked.position(i, m - 1).0] >> 4 != 0);
        if padded_lane.is_some() || odd_nibble {
            return Err(Error::invalid_parameter(
                "codes",
                "a padding slot of the blocked codes is not zero",
            ));
        }
        Ok(blocked)
    }

    /// The raw block bytes, padding included (the layout of the module docs).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Vectors held.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Codes per vector.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Bits per code (4 or 8).
    pub fn nbits(&self) -> u32 {
        self.nbits
    }

    /// Runs (rows of [`BLOCK`] bytes) per block: `m` for 8-bit codes, `⌈m / 2⌉` for 4-bit.
    pub fn runs(&self) -> usize {
        if self.nbits == 8 {
            self.m
        } else {
            self.m.div_ceil(2)
        }
    }

    /// Blocks held, the last possibly partial.
    pub fn n_blocks(&self) -> usize {
        self.n.div_ceil(BLOCK)
    }

    /// The bytes of block `b`: `runs() · BLOCK` bytes.
    pub fn block(&self, b: usize) -> &[u8] {
        let size = self.runs() * BLOCK;
        &self.bytes[b * size..(b + 1) * size]
    }

    /// Bytes held (whole blocks, padding included).
    pub fn memory_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one vector's codes (`m` values below `2^nbits`; higher bits are ignored).
    pub fn push(&mut self, codes: &[u8]) {
        debug_assert_eq!(codes.len(), self.m);
        if self.n.is_multiple_of(BLOCK) {
            self.bytes.resize(self.bytes.len() + self.runs() * BLOCK, 0);
        }
        let i = self.n;
        self.n += 1;
        for (j, &code) in codes.iter().enumerate() {
            self.set(i, j, code);
        }
    }

    /// Code of vector `i` in sub-space `j`.
    pub fn get(&self, i: usize, j: usize) -> u8 {
        let (at, shift) = self.position(i, j);
        let mask = if self.nbits == 8 { 0xff } else { 0x0f };
        (self.bytes[at] >> shift) & mask
    }

    /// All codes of vector `i`.
    pub fn row(&self, i: usize) -> Vec<u8> {
        (0..self.m).map(|j| self.get(i, j)).collect()
    }

    /// Removes vector `i` by moving the last vector into its place (order is not kept).
    pub fn swap_remove(&mut self, i: usize) {
        let last = self.n - 1;
        if i != last {
            let row = self.row(last);
            for (j, &code) in row.iter().enumerate() {
                self.set(i, j, code);
            }
        }
        for j in 0..self.m {
            self.set(last, j, 0);
        }
        self.n = last;
        self.bytes.truncate(self.n_blocks() * self.runs() * BLOCK);
    }

    /// The codes bit-packed as [`PackedCodes`].
    pub fn to_packed(&self) -> PackedCodes {
        let codes: Vec<u32> = (0..self.n)
            .flat_map(|i| (0..self.m).map(move |j| u32::from(self.get(i, j))))
            .collect();
        PackedCodes::pack(&codes, self.m, self.nbits).expect("codes below 2^nbits")
    }

    fn set(&mut self, i: usize, j: usize, code: u8) {
        let (at, shift) = self.position(i, j);
        let mask: u8 = if self.nbits == 8 { 0xff } else { 0x0f };
        self.bytes[at] = (self.bytes[at] & !(mask << shift)) | ((code & mask) << shift);
    }

    /// Byte and bit shift of code `(i, j)`.
    fn position(&self, i: usize, j: usize) -> (usize, u32) {
        let (b, lane) = (i / BLOCK, i % BLOCK);
        let block_start = b * self.runs() * BLOCK;
        if self.nbits == 8 {
            (block_start + j * BLOCK + lane, 0)
        } else {
            (block_start + (j / 2) * BLOCK + lane, 4 * (j as u32 % 2))
        }
    }
}

/// Quantized distances of the [`BLOCK`] vectors of one block: `out[i] = Σ_j lut[j·ksub + c_ij]`
/// with `ksub = 2^nbits`, summed in `u16` (no overflow: callers keep `m · 255 ≤ 65535`).
///
/// `lut` holds `m · ksub` bytes. This is the portable reference; the SIMD kernels in
/// `kernels` give the same sums.
pub fn block_sums_scalar(block: &[u8], m: usize, nbits: u32, lut: &[u8], out: &mut [u16; BLOCK]) {
    out.fill(0);
    if nbits == 8 {
        for (j, run) in block.chunks_exact(BLOCK).enumerate() {
            let table = &lut[j * 256..(j + 1) * 256];
            for (sum, &code) in out.iter_mut().zip(run) {
                *sum += u16::from(table[code as usize]);
            }
        }
    } else {
        for (p, run) in block.chunks_exact(BLOCK).enumerate() {
            let low = &lut[2 * p * 16..(2 * p + 1) * 16];
            for (sum, &byte) in out.iter_mut().zip(run) {
                *sum += u16::from(low[(byte & 0x0f) as usize]);
            }
            if 2 * p + 1 < m {
                let high = &lut[(2 * p + 1) * 16..(2 * p + 2) * 16];
                for (sum, &byte) in out.iter_mut().zip(run) {
                    *sum += u16::from(high[(byte >> 4) as usize]);
                }
            }
        }
    }
}
