//! A query's distance tables, exact (`f32`) and quantized to bytes for the SIMD scan.
//!
//! The scan adds byte tables in `u16`, which is fast but approximate; it is used only to
//! *bound* the exact distance. Each entry `t` of sub-space `j` is stored as
//! `q = ⌊(t − min_j) / Δ⌋` with one step `Δ` for all sub-spaces, so `min_j + Δ·q ≤ t`, and for
//! a vector whose byte sum is `s`, its exact distance is at least `Σ_j min_j + Δ·s` (up to `f32`
//! rounding, covered by a margin). A vector whose bound exceeds the current `k`-th best cannot
//! enter the answer and is skipped; every other vector is rescored exactly with the `f32`
//! table, so the answer equals an exact scan's.

/// Exact and quantized tables of one query, `m` sub-spaces of `ksub` entries.
#[derive(Debug, Clone)]
pub(crate) struct QueryTables {
    /// `f32 [m, ksub]`: entry `(j, c)` is the internal distance from sub-vector `j` of the
    /// query to centroid `c` of codebook `j`.
    pub exact: Vec<f32>,
    /// `u8 [m, ksub]`, quantized as in the module docs.
    pub bytes: Vec<u8>,
    m: usize,
    ksub: usize,
    /// `Σ_j min_j`.
    bias: f64,
    /// `Δ`.
    step: f64,
    /// Added to a threshold before comparing bounds with it, for `f32` rounding.
    margin: f64,
}

impl QueryTables {
    /// An empty pair of tables for `m` sub-spaces of `ksub` entries, filled by
    /// [`quantize`](Self::quantize).
    pub(crate) fn new(m: usize, ksub: usize) -> Self {
        QueryTables {
            exact: vec![0.0; m * ksub],
            bytes: vec![0; m * ksub],
            m,
            ksub,
            bias: 0.0,
            step: 1.0,
            margin: 0.0,
        }
    }

    /// Quantizes [`exact`](Self::exact) (already filled) into bytes.
    pub(crate) fn quantize(&mut self) {
        let (m, ksub) = (self.m, self.ksub);
        let mut bias = 0f64;
        let mut widest = 0f64;
        let mut magnitude = 0f64;
        for row in self.exact.chunks_exact(ksub) {
            let (lo, hi) = row
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &t| {
                    (lo.min(t), hi.max(t))
                });
            bias += f64::from(lo);
            widest = widest.max(f64::from(hi) - f64::from(lo));
            magnitude += f64::from(lo.abs().max(hi.abs()));
        }
        let step = if widest > 0.0 { widest / 255.0 } else { 1.0 };
        for (row, bytes) in self
            .exact
            .chunks_exact(ksub)
            .zip(self.bytes.chunks_exact_mut(ksub))
        {
            let lo = f64::from(row.iter().copied().fold(f32::INFINITY, f32::min));
            for (&t, byte) in row.iter().zip(bytes) {
                // In f64 the quotient's rounding cannot reach the next integer for these
                // magnitudes; the margin below covers what is left.
                *byte = ((f64::from(t) - lo) / step).floor().clamp(0.0, 255.0) as u8;
            }
        }
        self.bias = bias;
        self.step = step;
        // An exact scan adds m f32 terms: its result is within m·ε·Σ|t| of the real sum; the
        // bound itself is computed in f64. Twice that, plus a hair of a step, is safe.
        self.margin =
            2.0 * (m as f64 + 2.0) * f64::from(f32::EPSILON) * magnitude + 1e-6 * step * m as f64;
    }

    /// The largest byte sum a vector may have and still reach `threshold` (an exact internal
    /// value) when its value starts from `offset` (see [`exact_value`](Self::exact_value)):
    /// `None` if no vector can, `u16::MAX` if every vector may.
    pub(crate) fn byte_threshold(&self, threshold: f32, offset: f32) -> Option<u16> {
        if threshold == f32::INFINITY {
            return Some(u16::MAX);
        }
        let offset = f64::from(offset);
        let margin =
            self.margin + 2.0 * (self.m as f64 + 2.0) * f64::from(f32::EPSILON) * offset.abs();
        let limit = (f64::from(threshold) - offset + margin - self.bias) / self.step;
        if limit < 0.0 {
            None
        } else {
            Some(limit.floor().min(f64::from(u16::MAX)) as u16)
        }
    }

    /// The exact internal value of a vector with `codes`: `offset + Σ_j exact[j·ksub + c_j]`,
    /// added in `f32` in order `j = 0, 1, …` (the order of the reference scan).
    pub(crate) fn exact_value(&self, offset: f32, codes: impl Iterator<Item = u8>) -> f32 {
        let mut value = offset;
        for (row, code) in self.exact.chunks_exact(self.ksub).zip(codes) {
            value += row[code as usize];
        }
        value
    }

    /// A lower bound of the exact value of a vector whose byte sum is `sum`.
    #[cfg(test)]
    pub(crate) fn lower_bound(&self, sum: u16) -> f64 {
        self.bias + self.step * f64::from(sum) - self.margin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The bound from the byte sum never exceeds the exact f32 value, and every vector
        /// whose exact value is at most a threshold passes the byte threshold.
        #[test]
        fn byte_sums_bound_the_exact_value(
            m in 1usize..24,
            seed in any::<u64>(),
            scale in prop::sample::select(vec![1e-3f32, 1.0, 1e3]),
            offset in -5.0f32..5.0,
        ) {
            let ksub = 16;
            let mut rng = qcl_tensor::Seed::new(seed).rng();
            let mut tables = QueryTables::new(m, ksub);
            for t in tables.exact.iter_mut() {
                *t = (rng.normal_vec(1, 0.0, 1.0)[0] + offset) * scale;
            }
            tables.quantize();
            for trial in 0..50u64 {
                let codes: Vec<u8> = (0..m).map(|j| ((trial * 7 + j as u64 * 13) % 16) as u8).collect();
                let sum: u16 = codes.iter().enumerate()
                    .map(|(j, &c)| u16::from(tables.bytes[j * ksub + c as usize])).sum();
                let exact = tables.exact_value(0.0, codes.iter().copied());
                prop_assert!(tables.lower_bound(sum) <= f64::from(exact));
                let passes = tables.byte_threshold(exact, 0.0).is_some_and(|limit| sum <= limit);
                prop_assert!(passes, "a vector at the threshold must be rescored");
            }
        }
    }

    #[test]
    fn a_threshold_below_every_vector_admits_none() {
        let mut tables = QueryTables::new(1, 2);
        tables.exact.copy_from_slice(&[5.0, 7.0]);
        tables.quantize();
        assert_eq!(tables.byte_threshold(1.0, 0.0), None);
        assert_eq!(tables.byte_threshold(f32::INFINITY, 0.0), Some(u16::MAX));
        assert_eq!(tables.bytes, vec![0, 255]);
    }
}
