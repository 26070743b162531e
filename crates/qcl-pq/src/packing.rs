//! Bit-packed product-quantization codes.

use qcl_tensor::{Error, Result};

/// Largest number of bits per code: 2^16 centroids per sub-space.
pub(crate) const MAX_NBITS: u32 = 16;

/// Checks `nbits` and `m` and returns the bytes one vector's codes take, `⌈m · nbits / 8⌉`.
pub(crate) fn code_size(m: usize, nbits: u32) -> Result<usize> {
    if m == 0 {
        return Err(Error::invalid_parameter("m", "need at least one sub-space"));
    }
    if !(1..=MAX_NBITS).contains(&nbits) {
        return Err(Error::invalid_parameter(
            "nbits",
            format!("must be in 1..={MAX_NBITS}, got {nbits}"),
        ));
    }
    m.checked_mul(nbits as usize)
        .map(|bits| bits.div_ceil(8))
        .ok_or_else(|| Error::invalid_parameter("m", format!("m = {m} overflows the code size")))
}

/// The codes of `n` vectors, `m` codes of `nbits` bits each, bit-packed.
///
/// Each vector takes `code_size = ⌈m · nbits / 8⌉` bytes and starts on a byte boundary (so a
/// vector can be read or copied alone). Within a vector, code `j` occupies bits
/// `j · nbits .. (j + 1) · nbits`, least significant bit first, where bit `b` is bit `b % 8` of
/// byte `b / 8`; padding bits at the end of a vector are zero. This is faiss's layout.
///
/// ```
/// use qcl_pq::PackedCodes;
/// // Two vectors of three 3-bit codes: 9 bits, so 2 bytes per vector.
/// let packed = PackedCodes::pack(&[1, 2, 3, 7, 0, 5], 3, 3)?;
/// assert_eq!(packed.code_size(), 2);
/// assert_eq!(packed.bytes(), &[0b1101_0001, 0, 0b0100_0111, 1]);
/// assert_eq!(packed.get(1, 2), 5);
/// assert_eq!(packed.unpack(), vec![1, 2, 3, 7, 0, 5]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedCodes {
    bytes: Vec<u8>,
    n: usize,
    m: usize,
    nbits: u32,
}

impl PackedCodes {
    /// Packs `codes` (row-major `[n, m]`, each below `2^nbits`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `m = 0`, `nbits` outside `1..=16` or a code of `2^nbits`
    /// or more (naming its position); [`Error::ShapeMismatch`] if `codes` is not whole rows of
    /// `m`.
    pub fn pack(codes: &[u32], m: usize, nbits: u32) -> Result<PackedCodes> {
        let size = code_size(m, nbits)?;
        if !codes.len().is_multiple_of(m) {
            return Err(Error::ShapeMismatch {
                context: "codes".into(),
                expected: format!("[*, {m}]"),
                actual: vec![codes.len()],
            });
        }
        if let Some(i) = codes.iter().position(|&c| c >> nbits != 0) {
            return Err(Error::invalid_parameter(
                "codes",
                format!(
                    "code {} at [{}, {}] does not fit in {nbits} bits",
                    codes[i],
                    i / m,
                    i % m
                ),
            ));
        }
        let n = codes.len() / m;
        let mut bytes = vec![0u8; n * size];
        for (row, vector) in bytes.chunks_exact_mut(size).zip(codes.chunks_exact(m)) {
            for (j, &code) in vector.iter().enumerate() {
                write_code(row, j * nbits as usize, nbits, code);
            }
        }
        Ok(PackedCodes { bytes, n, m, nbits })
    }

    /// Wraps bytes in the layout described on [`PackedCodes`] (for example read from disk).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `m = 0` or `nbits` outside `1..=16`;
    /// [`Error::ShapeMismatch`] unless `bytes` holds exactly `n · code_size` bytes.
    pub fn from_bytes(bytes: Vec<u8>, n: usize, m: usize, nbits: u32) -> Result<PackedCodes> {
        let size = code_size(m, nbits)?;
        if n.checked_mul(size) != Some(bytes.len()) {
            return Err(Error::ShapeMismatch {
                context: "packed codes".into(),
                expected: format!("[{n}, {size}] bytes"),
                actual: vec![bytes.len()],
            });
        }
        Ok(PackedCodes { bytes, n, m, nbits })
    }

    /// Appends the rows of `other`, which has the same `m` and `nbits`.
    pub(crate) fn append(&mut self, other: &PackedCodes) {
        debug_assert_eq!((self.m, self.nbits), (other.m, other.nbits));
        self.bytes.extend_from_slice(&other.bytes);
        self.n += other.n;
    }

    /// Keeps the rows `i` for which `keep(i)` holds, in order.
    pub(crate) fn retain_rows(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let size = self.code_size();
        let mut kept = Vec::with_capacity(self.bytes.len());
        for (i, row) in self.bytes.chunks_exact(size).enumerate() {
            if keep(i) {
                kept.extend_from_slice(row);
            }
        }
        self.n = kept.len() / size;
        self.bytes = kept;
    }

    // These getters repeat `BlockedCodes`': two public code layouts, each with its own API.
    /// The packed bytes, `n · code_size` of them.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of vectors.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Codes per vector (sub-spaces).
    pub fn m(&self) -> usize {
        self.m
    }

    /// Bits per code.
    pub fn nbits(&self) -> u32 {
        self.nbits
    }

    /// Bytes per vector, `⌈m · nbits / 8⌉`.
    pub fn code_size(&self) -> usize {
        (self.m * self.nbits as usize).div_ceil(8)
    }

    /// Code `j` of vector `i`.
    ///
    /// # Panics
    /// If `i >= n` or `j >= m`, like slice indexing.
    pub fn get(&self, i: usize, j: usize) -> u32 {
        assert!(
            i < self.n && j < self.m,
            "code [{i}, {j}] out of range [{}, {}]",
            self.n,
            self.m
        );
        let size = self.code_size();
        read_code(
            &self.bytes[i * size..(i + 1) * size],
            j * self.nbits as usize,
            self.nbits,
        )
    }

    /// All codes, row-major `[n, m]`.
    pub fn unpack(&self) -> Vec<u32> {
        let (m, nbits) = (self.m, self.nbits);
        self.bytes
            .chunks_exact(self.code_size())
            .flat_map(|row| (0..m).map(move |j| read_code(row, j * nbits as usize, nbits)))
            .collect()
    }
}

/// ORs `code` into `row` at bit offset `bit`. With `nbits <= 16` and a shift below 8 the shifted
/// code fits in 23 bits, so a `u32` window covering at most 3 bytes suffices.
fn write_code(row: &mut [u8], bit: usize, nbits: u32, code: u32) {
    let mut window = code << (bit % 8);
    for byte in &mut row[bit / 8..(bit + nbits as usize).div_ceil(8)] {
        *byte |= window as u8;
        window >>= 8;
    }
}

/// The `nbits`-bit code at bit offset `bit` of `row` (see [`write_code`]).
fn read_code(row: &[u8], bit: usize, nbits: u32) -> u32 {
    let window = row[bit / 8..(bit + nbits as usize).div_ceil(8)]
        .iter()
        .rev()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    (window >> (bit % 8)) & ((1u32 << nbits) - 1)
}
