//! SIMD kernels for [`block_sums`], chosen at run time.
//!
//! Every kernel computes the sums of [`block_sums_scalar`] exactly, for one block of
//! [`BLOCK`] vectors in the layout of [`blocks`](super::blocks):
//! - 4-bit codes: one 16-byte table per sub-space fits a register, so a byte shuffle
//!   (`pshufb`, `vqtbl1q_u8`) looks up 16, 32 or 64 codes at once (Quicker ADC).
//! - 8-bit codes: a 256-byte table takes four 64-byte registers; AVX-512 VBMI looks up two
//!   128-entry halves with `vpermt2b` and picks per byte by bit 7 of the code. NEON looks up
//!   the four 64-entry quarters with `tbl`/`tbx`. Other kernels use the scalar loop.
//!
//! Looked-up bytes are summed in `u16` lanes. The x86 kernels use faiss's trick: a register
//! of 64 bytes read as 32 `u16` lanes holds `r[2k] + 256·r[2k+1]` in lane `k`, so summing those
//! lanes as they are, and separately the odd bytes (`lane >> 8`), gives both sums with two
//! additions and one shift per look-up; the even sums are recovered at the end by subtracting
//! `256·odd` (exact modulo 2^16, and the even sums fit in 16 bits).

use std::sync::OnceLock;

use super::blocks::{block_sums_scalar, BLOCK};

/// A way of computing [`block_sums`]. Every kernel gives the same sums; they differ in the
/// CPU features they need ([`available`](Self::available)) and in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The portable loop, [`block_sums_scalar`]; available everywhere.
    Scalar,
    /// x86-64 AVX2: 4-bit codes by `pshufb` on 256-bit registers; 8-bit codes by the scalar loop.
    Avx2,
    /// x86-64 AVX-512 BW: 4-bit codes by `pshufb` on 512-bit registers; 8-bit by the scalar loop.
    Avx512Bw,
    /// x86-64 AVX-512 VBMI: 8-bit codes by `vpermt2b` on the whole 256-byte table; 4-bit as
    /// [`Avx512Bw`](Self::Avx512Bw).
    Avx512Vbmi,
    /// aarch64 NEON: 4-bit codes by `tbl` on one table register, 8-bit by `tbl`/`tbx` on four
    /// quarters of the table.
    Neon,
}

impl Kernel {
    /// Every kernel, slowest first.
    const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::Avx512Bw,
        Kernel::Avx512Vbmi,
        Kernel::Neon,
    ];

    /// The fastest kernel this CPU runs, detected once.
    pub fn detect() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            *Self::available()
                .last()
                .expect("Scalar is always available")
        })
    }

    /// Every kernel this CPU runs, slowest first ([`Scalar`](Self::Scalar) always).
    pub fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// Whether this CPU has the features the kernel needs (detected once).
    pub fn is_available(self) -> bool {
        static AVAILABLE: OnceLock<[bool; 5]> = OnceLock::new();
        let available = AVAILABLE.get_or_init(|| Self::ALL.map(Kernel::detect_features));
        available[Self::ALL.iter().position(|&k| k == self).unwrap_or(0)]
    }

    fn detect_features(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("bmi2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bw => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vbmi => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vbmi")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            _ => false,
        }
    }

    /// Short name, for reports and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Bw => "avx512bw",
            Kernel::Avx512Vbmi => "avx512vbmi",
            Kernel::Neon => "neon",
        }
    }
}

/// `out[i] = Σ_j lut[j·ksub + c_ij]` for the vectors of one block with the fastest kernel
/// ([`Kernel::detect`]); the sums of [`block_sums_scalar`], exactly.
///
/// # Panics
/// If `nbits` is not 4 or 8, `block` is not `runs · BLOCK` bytes (`runs` = `m` for 8-bit codes,
/// `⌈m / 2⌉` for 4-bit) or `lut` is shorter than `m · 2^nbits` bytes.
pub fn block_sums(block: &[u8], m: usize, nbits: u32, lut: &[u8], out: &mut [u16; BLOCK]) {
    let checked = check_shapes(block, m, nbits, lut);
    // SAFETY: `detect` only returns an available kernel.
    unsafe { run(Kernel::detect(), checked, out) }
}

/// [`block_sums`] with a given kernel, for tests and benchmarks; pass kernels from
/// [`Kernel::available`].
///
/// # Panics
/// If `kernel` is not available on this CPU (running it would be undefined behaviour), and
/// as [`block_sums`].
#[inline]
pub fn block_sums_with(
    kernel: Kernel,
    block: &[u8],
    m: usize,
    nbits: u32,
    lut: &[u8],
    out: &mut [u16; BLOCK],
) {
    assert!(
        kernel.is_available(),
        "kernel {} is not available on this CPU",
        kernel.name()
    );
    let checked = check_shapes(block, m, nbits, lut);
    // SAFETY: the kernel is available.
    unsafe { run(kernel, checked, out) }
}

/// [`block_mask_le`] with `kernel`'s instructions (the same mask).
///
/// # Panics
/// If `kernel` is not available on this CPU.
#[inline]
pub fn block_mask_le_with(kernel: Kernel, sums: &[u16; BLOCK], threshold: u16) -> u64 {
    assert!(
        kernel.is_available(),
        "kernel {} is not available on this CPU",
        kernel.name()
    );
    // SAFETY: the kernel's CPU features are available (checked above).
    unsafe {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bw | Kernel::Avx512Vbmi => x86::mask_le_avx512(sums, threshold),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::mask_le_avx2(sums, threshold),
            _ => block_mask_le(sums, threshold),
        }
    }
}

/// Bit `i` set iff `sums[i] <= threshold`.
pub fn block_mask_le(sums: &[u16; BLOCK], threshold: u16) -> u64 {
    sums.iter()
        .enumerate()
        .fold(0, |mask, (i, &s)| mask | (u64::from(s <= threshold) << i))
}

/// A block of `m` codes of `nbits` bits and its look-up table, made only by [`check_shapes`]:
/// their sizes are the bounds the kernels' unchecked loads rely on.
#[derive(Clone, Copy)]
struct CheckedBlock<'a> {
    block: &'a [u8],
    m: usize,
    nbits: u32,
    lut: &'a [u8],
}

/// Checks the bounds the kernels' unchecked loads rely on.
#[inline]
fn check_shapes<'a>(block: &'a [u8], m: usize, nbits: u32, lut: &'a [u8]) -> CheckedBlock<'a> {
    assert!(
        nbits == 4 || nbits == 8,
        "codes of {nbits} bits: need 4 or 8"
    );
    let runs = if nbits == 8 { m } else { m.div_ceil(2) };
    assert_eq!(block.len(), runs * BLOCK, "block of {m} sub-spaces");
    assert!(lut.len() >= m << nbits, "lut of {m} sub-spaces");
    CheckedBlock {
        block,
        m,
        nbits,
        lut,
    }
}

/// # Safety
/// `kernel` is available.
#[inline]
unsafe fn run(kernel: Kernel, checked: CheckedBlock<'_>, out: &mut [u16; BLOCK]) {
    let CheckedBlock {
        block,
        m,
        nbits,
        lut,
    } = checked;
    // SAFETY: the caller guarantees the kernel's CPU features; `check_shapes` checked the shapes.
    unsafe {
        match (kernel, nbits) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, 4) => x86::sums4_avx2(block, m, lut, out),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Bw | Kernel::Avx512Vbmi, 4) => x86::sums4_avx512(block, m, lut, out),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vbmi, 8) => x86::sums8_vbmi(block, m, lut, out),
            #[cfg(target_arch = "aarch64")]
            (Kernel::Neon, 4) => neon::sums4(block, m, lut, out),
            #[cfg(target_arch = "aarch64")]
            (Kernel::Neon, 8) => neon::sums8(block, m, lut, out),
            _ => block_sums_scalar(block, m, nbits, lut, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// Bit `i` set iff `sums[i] <= threshold`, by unsigned 16-bit compares into mask registers.
    ///
    /// # Safety
    /// AVX-512 F and BW are available.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn mask_le_avx512(sums: &[u16; BLOCK], threshold: u16) -> u64 {
        let limit = _mm512_set1_epi16(threshold as i16);
        // SAFETY: `sums` holds 64 u16, two unaligned 64-byte loads.
        let (low, high) = unsafe {
            (
                _mm512_loadu_si512(sums.as_ptr().cast()),
                _mm512_loadu_si512(sums.as_ptr().add(32).cast()),
            )
        };
        let low = _mm512_cmple_epu16_mask(low, limit) as u64;
        let high = _mm512_cmple_epu16_mask(high, limit) as u64;
        low | (high << 32)
    }

    /// Bit `i` set iff `sums[i] <= threshold`: `max(s, t) = t` per lane, then one bit of each
    /// lane's two movemask bits.
    ///
    /// # Safety
    /// AVX2 and BMI2 are available (every AVX2 CPU qcl detects has BMI2: checked in
    /// `Kernel::is_available`).
    #[target_feature(enable = "avx2,bmi2")]
    pub(super) unsafe fn mask_le_avx2(sums: &[u16; BLOCK], threshold: u16) -> u64 {
        let limit = _mm256_set1_epi16(threshold as i16);
        let mut mask = 0u64;
        for quarter in 0..4 {
            // SAFETY: 16 u16 at 16·quarter are within the 64 of `sums`.
            let s = unsafe { _mm256_loadu_si256(sums.as_ptr().add(16 * quarter).cast()) };
            let le = _mm256_cmpeq_epi16(_mm256_max_epu16(s, limit), limit);
            let bits = _pext_u32(_mm256_movemask_epi8(le) as u32, 0x5555_5555);
            mask |= u64::from(bits) << (16 * quarter);
        }
        mask
    }

    /// 4-bit codes, two 32-byte halves of the block per run.
    ///
    /// # Safety
    /// AVX2 is available, `block` holds `⌈m / 2⌉` runs and `lut` at least `16·m` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sums4_avx2(block: &[u8], m: usize, lut: &[u8], out: &mut [u16; BLOCK]) {
        let nibble = _mm256_set1_epi8(0x0f);
        // [half]: mixed u16 sums (faiss's trick, module docs) and sums of the odd bytes.
        let mut mixed = [_mm256_setzero_si256(); 2];
        let mut odd = [_mm256_setzero_si256(); 2];
        for (run, tables) in block.chunks_exact(BLOCK).zip(lut[..16 * m].chunks(32)) {
            // `pshufb` looks up within 128-bit lanes: the table goes in both.
            let (low_table, high_table) = tables.split_at(16);
            let low_table = _mm256_broadcastsi128_si256(load_table(low_table));
            // The high nibbles of the last run are no code when m is odd.
            let high_table = (!high_table.is_empty())
                .then(|| _mm256_broadcastsi128_si256(load_table(high_table)));
            for half in 0..2 {
                // SAFETY: a run is 64 bytes; this reads bytes 32·half .. 32·half + 32.
                let codes = unsafe { _mm256_loadu_si256(run[32 * half..].as_ptr().cast()) };
                let (mixed, odd) = (&mut mixed[half], &mut odd[half]);
                let r = _mm256_shuffle_epi8(low_table, _mm256_and_si256(codes, nibble));
                add256(mixed, odd, r);
                if let Some(table) = high_table {
                    let high = _mm256_and_si256(_mm256_srli_epi16::<4>(codes), nibble);
                    add256(mixed, odd, _mm256_shuffle_epi8(table, high));
                }
            }
        }
        for half in 0..2 {
            let even = _mm256_sub_epi16(mixed[half], _mm256_slli_epi16::<8>(odd[half]));
            // Interleaving works within 128-bit lanes: lane L of `first` holds vectors
            // 16L .. 16L + 7 of the half and lane L of `second` vectors 16L + 8 .. 16L + 15.
            let first = _mm256_unpacklo_epi16(even, odd[half]);
            let second = _mm256_unpackhi_epi16(even, odd[half]);
            let dst = out[32 * half..].as_mut_ptr().cast::<__m256i>();
            // SAFETY: `out` has 64 lanes; these write lanes 32·half .. 32·half + 32.
            unsafe {
                _mm256_storeu_si256(dst, _mm256_permute2x128_si256::<0x20>(first, second));
                _mm256_storeu_si256(dst.add(1), _mm256_permute2x128_si256::<0x31>(first, second));
            }
        }
    }

    /// A 16-byte table as a register.
    #[inline]
    fn load_table(table: &[u8]) -> __m128i {
        let table: &[u8; 16] = table.try_into().expect("16-byte table");
        // SAFETY: reads the 16 bytes of `table`; SSE2 is part of x86-64.
        unsafe { _mm_loadu_si128(table.as_ptr().cast()) }
    }

    /// Adds the 32 bytes of `r` to the sums of one half-block (faiss's trick, module docs).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn add256(mixed: &mut __m256i, odd: &mut __m256i, r: __m256i) {
        *mixed = _mm256_add_epi16(*mixed, r);
        *odd = _mm256_add_epi16(*odd, _mm256_srli_epi16::<8>(r));
    }

    /// 4-bit codes, one 64-byte run per register.
    ///
    /// # Safety
    /// AVX-512 F and BW are available, `block` holds `⌈m / 2⌉` runs and `lut` at least
    /// `16·m` bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn sums4_avx512(block: &[u8], m: usize, lut: &[u8], out: &mut [u16; BLOCK]) {
        let nibble = _mm512_set1_epi8(0x0f);
        let mut acc = Acc512::new();
        for (run, tables) in block.chunks_exact(BLOCK).zip(lut[..16 * m].chunks(32)) {
            // SAFETY: a run is 64 bytes.
            let codes = unsafe { _mm512_loadu_si512(run.as_ptr().cast()) };
            // `pshufb` looks up within 128-bit lanes: the table goes in all four.
            let (low_table, high_table) = tables.split_at(16);
            let table = _mm512_broadcast_i32x4(load_table(low_table));
            acc.add(_mm512_shuffle_epi8(table, _mm512_and_si512(codes, nibble)));
            // The high nibbles of the last run are no code when m is odd.
            if !high_table.is_empty() {
                let table = _mm512_broadcast_i32x4(load_table(high_table));
                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(codes), nibble);
                acc.add(_mm512_shuffle_epi8(table, high));
            }
        }
        acc.store(out);
    }

    /// 8-bit codes: the 256-byte table of a sub-space in four registers.
    ///
    /// # Safety
    /// AVX-512 F, BW and VBMI are available, `block` holds `m` runs and `lut` at least
    /// `256·m` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn sums8_vbmi(block: &[u8], m: usize, lut: &[u8], out: &mut [u16; BLOCK]) {
        let mut acc = Acc512::new();
        for (run, table) in block
            .chunks_exact(BLOCK)
            .zip(lut[..256 * m].chunks_exact(256))
        {
            // SAFETY: a run is 64 bytes, a table 256 = 4·64 bytes.
            let (codes, t) = unsafe {
                let t = table.as_ptr().cast::<__m512i>();
                let t = [0, 1, 2, 3].map(|q| _mm512_loadu_si512(t.add(q)));
                (_mm512_loadu_si512(run.as_ptr().cast()), t)
            };
            // `vpermt2b` uses the low 7 bits of each code: entries 0..128 from t[0..2] and
            // 128..256 from t[2..4]; bit 7 of the code picks between the two.
            let low = _mm512_permutex2var_epi8(t[0], codes, t[1]);
            let high = _mm512_permutex2var_epi8(t[2], codes, t[3]);
            acc.add(_mm512_mask_blend_epi8(
                _mm512_movepi8_mask(codes),
                low,
                high,
            ));
        }
        acc.store(out);
    }

    /// `u16` sums of 64 looked-up bytes per step (faiss's trick, module docs).
    struct Acc512 {
        /// Lane k: Σ r[2k] + 256·r[2k+1], modulo 2^16.
        mixed: __m512i,
        /// Lane k: Σ r[2k+1].
        odd: __m512i,
    }

    impl Acc512 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn new() -> Self {
            Acc512 {
                mixed: _mm512_setzero_si512(),
                odd: _mm512_setzero_si512(),
            }
        }

        /// Adds the 64 bytes of `r` to the sums of vectors 0..64.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn add(&mut self, r: __m512i) {
            self.mixed = _mm512_add_epi16(self.mixed, r);
            self.odd = _mm512_add_epi16(self.odd, _mm512_srli_epi16::<8>(r));
        }

        /// Writes the sums of vectors 0..64 to `out` in order.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn store(self, out: &mut [u16; BLOCK]) {
            let even = _mm512_sub_epi16(self.mixed, _mm512_slli_epi16::<8>(self.odd));
            // Interleaving works within 128-bit lanes: lane L of `a` holds vectors
            // 16L .. 16L + 7, lane L of `b` vectors 16L + 8 .. 16L + 15 (each lane 2 × i64).
            let a = _mm512_unpacklo_epi16(even, self.odd);
            let b = _mm512_unpackhi_epi16(even, self.odd);
            let lanes_01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
            let lanes_23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
            let dst = out.as_mut_ptr().cast::<__m512i>();
            // SAFETY: `out` has 64 lanes of 2 bytes, two 64-byte registers.
            unsafe {
                _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(a, lanes_01, b));
                _mm512_storeu_si512(dst.add(1), _mm512_permutex2var_epi64(a, lanes_23, b));
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::BLOCK;

    /// Adds 16 looked-up bytes to the sums of vectors 16q .. 16q + 16 (`acc[2q]`, `acc[2q+1]`).
    /// NEON widens in order, so no shuffling is needed.
    #[inline]
    #[target_feature(enable = "neon")]
    fn add(acc: &mut [uint16x8_t; 8], q: usize, r: uint8x16_t) {
        acc[2 * q] = vaddw_u8(acc[2 * q], vget_low_u8(r));
        acc[2 * q + 1] = vaddw_high_u8(acc[2 * q + 1], r);
    }

    /// A 16-byte table as a register.
    #[inline]
    #[target_feature(enable = "neon")]
    fn load_table(table: &[u8]) -> uint8x16_t {
        let table: &[u8; 16] = table.try_into().expect("16-byte table");
        // SAFETY: reads the 16 bytes of `table`.
        unsafe { vld1q_u8(table.as_ptr()) }
    }

    /// Writes the sums of vectors 0..64 to `out` in order.
    #[inline]
    #[target_feature(enable = "neon")]
    fn store(acc: &[uint16x8_t; 8], out: &mut [u16; BLOCK]) {
        for (k, &sums) in acc.iter().enumerate() {
            // SAFETY: `out` has 64 = 8·8 lanes.
            unsafe { vst1q_u16(out[8 * k..].as_mut_ptr(), sums) };
        }
    }

    /// 4-bit codes: `tbl` on one 16-byte table register.
    ///
    /// # Safety
    /// NEON is available, `block` holds `⌈m / 2⌉` runs and `lut` at least `16·m` bytes.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn sums4(block: &[u8], m: usize, lut: &[u8], out: &mut [u16; BLOCK]) {
        let nibble = vdupq_n_u8(0x0f);
        let mut acc = [vdupq_n_u16(0); 8];
        for (run, tables) in block.chunks_exact(BLOCK).zip(lut[..16 * m].chunks(32)) {
            let (low_table, high_table) = tables.split_at(16);
            let low_table = load_table(low_table);
            // The high nibbles of the last run are no code when m is odd.
            let high_table = (!high_table.is_empty()).then(|| load_table(high_table));
            for q in 0..4 {
                // SAFETY: a run is 64 bytes; this reads bytes 16q .. 16q + 16.
                let codes = unsafe { vld1q_u8(run[16 * q..].as_ptr()) };
                add(&mut acc, q, vqtbl1q_u8(low_table, vandq_u8(codes, nibble)));
                if let Some(table) = high_table {
                    add(&mut acc, q, vqtbl1q_u8(table, vshrq_n_u8::<4>(codes)));
                }
            }
        }
        store(&acc, out);
    }

    /// 8-bit codes: the 256-byte table in four quarters of four registers.
    ///
    /// # Safety
    /// NEON is available, `block` holds `m` runs and `lut` at least `256·m` bytes.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn sums8(block: &[u8], m: usize, lut: &[u8], out: &mut [u16; BLOCK]) {
        let mut acc = [vdupq_n_u16(0); 8];
        for (run, table) in block
            .chunks_exact(BLOCK)
            .zip(lut[..256 * m].chunks_exact(256))
        {
            // SAFETY: a table is 256 = 4·64 bytes.
            let t =
                [0, 1, 2, 3].map(|quarter| unsafe { vld1q_u8_x4(table[64 * quarter..].as_ptr()) });
            for q in 0..4 {
                // SAFETY: a run is 64 bytes; this reads bytes 16q .. 16q + 16.
                let codes = unsafe { vld1q_u8(run[16 * q..].as_ptr()) };
                // `tbl` gives 0 and `tbx` keeps the byte for indices ≥ 64: XOR-ing the code
                // with 64·quarter brings exactly the codes of that quarter to 0..64.
                let mut r = vqtbl4q_u8(t[0], codes);
                r = vqtbx4q_u8(r, t[1], veorq_u8(codes, vdupq_n_u8(0x40)));
                r = vqtbx4q_u8(r, t[2], veorq_u8(codes, vdupq_n_u8(0x80)));
                r = vqtbx4q_u8(r, t[3], veorq_u8(codes, vdupq_n_u8(0xc0)));
                add(&mut acc, q, r);
            }
        }
        store(&acc, out);
    }
}

#[cfg(test)]
#[path = "kernels_tests.rs"]
mod tests;
