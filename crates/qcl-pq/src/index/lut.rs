//! A query's distance tables, exact (`f32`) and quantized to bytes for the SIMD scan.
//!
//! The scan adds byte tables in `u16`, which is fast but approximate; it is used only to
//! *bound* the exact distance. Each entry `t` of sub-space `j` is stored as
//! `q = min(255, ⌊(t − min_j) / Δ⌋)` with one step `Δ` for all sub-spaces, so `min_j + Δ·q ≤ t`,
//! and for a vector whose byte sum is `s`, its exact distance is at least `Σ_j min_j + Δ·s` (up
//! to `f32` rounding, covered by a margin). `Δ` is chosen once the answer holds `k` candidates:
//! `254·Δ` is then the room between the smallest possible value `Σ_j min_j` and the current
//! `k`-th best, so one saturated entry alone rules a vector out and the bound's looseness,
//! at most `m·Δ`, is a small share of that room; it is chosen again whenever the room has
//! halved. A vector whose bound exceeds the current `k`-th best cannot
//! enter the answer and is skipped; every other vector is rescored exactly with the `f32`
//! table, so the answer equals an exact scan's.

/// Exact and quantized tables of one query, `m` sub-spaces of `ksub` entries.
#[derive(Debug, Clone)]
pub(crate) struct QueryTables {
    /// `f32 [m, ksub]`: entry `(j, c)` is the internal distance from sub-vector `j` of the
    /// query to centroid `c` of codebook `j`.
    exact: Vec<f32>,
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
    /// The rounding part of `margin`.
    rounding: f64,
    /// `min_j` of every row; empty when the exact table changed since.
    row_min: Vec<f32>,
    /// The widest row's range.
    widest: f64,
    /// Whether `bytes` match `exact`.
    quantized: bool,
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
            rounding: 0.0,
            row_min: Vec::with_capacity(m),
            widest: 0.0,
            quantized: false,
        }
    }

    /// The exact table.
    pub(crate) fn exact(&self) -> &[f32] {
        &self.exact
    }

    /// The exact table, to fill; the bytes are stale until [`quantize`](Self::quantize).
    pub(crate) fn exact_mut(&mut self) -> &mut [f32] {
        self.quantized = false;
        self.row_min.clear();
        &mut self.exact
    }

    /// Whether the bytes should be (re)quantized for `threshold`: they are stale, or the room
    /// they were quantized for (module docs) has more than halved since, so finer steps would
    /// rule out many more vectors. Requantizing costs `m · ksub` steps.
    pub(crate) fn needs_quantizing(&self, threshold: f32, offset: f32) -> bool {
        if !self.quantized {
            return true;
        }
        let room = f64::from(threshold) - f64::from(offset) - self.bias;
        let finest = self.finest_step(offset);
        room.is_finite() && room > 0.0 && (room / 254.0).max(finest) * 2.0 < self.step
    }

    /// The smallest useful step: below it, rounding margins exceed a step.
    fn finest_step(&self, offset: f32) -> f64 {
        2.0 * (self.rounding + offset_rounding(self.m, offset))
    }

    /// Quantizes the exact table into bytes for a scan whose `k`-th best is `threshold` for
    /// values starting from `offset` (see the module docs); an infinite threshold spreads the
    /// widest sub-space over the 256 steps instead.
    pub(crate) fn quantize(&mut self, threshold: f32, offset: f32) {
        if self.row_min.is_empty() {
            self.measure_rows();
        }
        let (m, ksub) = (self.m, self.ksub);
        let room = f64::from(threshold) - f64::from(offset) - self.bias;
        let step = if room.is_finite() && room > 0.0 {
            // A saturated entry (255 steps) then exceeds the room by itself, margins included.
            (room / 254.0).max(self.finest_step(offset))
        } else if self.widest > 0.0 {
            self.widest / 255.0
        } else {
            1.0
        };
        // Multiplying by a reciprocal shrunk by 1e-5 never rounds a quotient up past the true
        // one (f32 errors here are below 1e-6 relative): each byte stays a floor or one less,
        // a valid if slightly weaker bound.
        let shrunk_reciprocal = ((1.0 - 1e-5) / step) as f32;
        for ((row, bytes), &lo) in self
            .exact
            .chunks_exact(ksub)
            .zip(self.bytes.chunks_exact_mut(ksub))
            .zip(&self.row_min)
        {
            for (&t, byte) in row.iter().zip(bytes) {
                // `as` saturates: the product is at least 0 and at most 255.
                *byte = ((t - lo) * shrunk_reciprocal).min(255.0) as u8;
            }
        }
        self.step = step;
        self.margin = self.rounding + 1e-6 * step * m as f64;
        self.quantized = true;
    }

    /// The row minima, `Σ_j min_j`, the widest row and the rounding margin of the exact table.
    fn measure_rows(&mut self) {
        let (mut bias, mut widest, mut magnitude) = (0f64, 0f64, 0f64);
        self.row_min.clear();
        for row in self.exact.chunks_exact(self.ksub) {
            let (lo, hi) = row
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &t| {
                    (lo.min(t), hi.max(t))
                });
            self.row_min.push(lo);
            bias += f64::from(lo);
            widest = widest.max(f64::from(hi) - f64::from(lo));
            magnitude += f64::from(lo.abs().max(hi.abs()));
        }
        self.bias = bias;
        self.widest = widest;
        // An exact scan adds m f32 terms: its result is within m·ε·Σ|t| of the real sum; the
        // bound itself is computed in f64. Twice that is safe.
        self.rounding = 2.0 * (self.m as f64 + 2.0) * f64::from(f32::EPSILON) * magnitude;
    }

    /// The largest byte sum a vector may have and still reach `threshold` (an exact internal
    /// value) when its value starts from `offset` (see [`exact_value`](Self::exact_value)):
    /// `None` if no vector can, `u16::MAX` if every vector may.
    pub(crate) fn byte_threshold(&self, threshold: f32, offset: f32) -> Option<u16> {
        if threshold == f32::INFINITY {
            return Some(u16::MAX);
        }
        let margin = self.margin_at(offset);
        let limit = (f64::from(threshold) - f64::from(offset) + margin - self.bias) / self.step;
        if limit < 0.0 {
            None
        } else {
            Some(limit.floor().min(f64::from(u16::MAX)) as u16)
        }
    }

    /// The rounding margin of values starting from `offset`.
    fn margin_at(&self, offset: f32) -> f64 {
        self.margin + offset_rounding(self.m, offset)
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

/// What starting the sum of `m` terms from `offset` adds to its rounding error, doubled.
fn offset_rounding(m: usize, offset: f32) -> f64 {
    2.0 * (m as f64 + 2.0) * f64::from(f32::EPSILON) * f64::from(offset).abs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The bound from the byte sum never exceeds the exact f32 value; every vector whose
        /// exact value is at most the threshold passes the byte threshold; and a vector more
        /// than `(m + 1)` steps above it does not (the bound is tight), for bytes quantized
        /// for the whole table or for a threshold.
        #[test]
        fn byte_sums_bound_the_exact_value_tightly(
            m in 1usize..24,
            seed in any::<u64>(),
            scale in prop::sample::select(vec![1e-3f32, 1.0, 1e3]),
            shift in -5.0f32..5.0,
            offset in prop::sample::select(vec![0.0f32, -3.0, 40.0]),
            for_threshold in any::<bool>(),
        ) {
            let ksub = 16;
            let mut rng = qcl_tensor::Seed::new(seed).rng();
            let mut tables = QueryTables::new(m, ksub);
            for t in tables.exact_mut().iter_mut() {
                *t = (rng.normal_vec(1, 0.0, 1.0)[0] + shift) * scale;
            }
            let vectors: Vec<Vec<u8>> = (0..60u64)
                .map(|v| (0..m).map(|j| ((v * 7 + j as u64 * 13 + v * v) % 16) as u8).collect())
                .collect();
            let exact: Vec<f32> =
                vectors.iter().map(|c| tables.exact_value(offset, c.iter().copied())).collect();
            let mut sorted = exact.clone();
            sorted.sort_by(f32::total_cmp);
            let threshold = sorted[sorted.len() / 4];
            tables.quantize(if for_threshold { threshold } else { f32::INFINITY }, offset);
            let limit = tables.byte_threshold(threshold, offset);
            for (codes, &value) in vectors.iter().zip(&exact) {
                let sum: u16 = codes.iter().enumerate()
                    .map(|(j, &c)| u16::from(tables.bytes[j * ksub + c as usize])).sum();
                prop_assert!(tables.lower_bound(sum) + f64::from(offset) <= f64::from(value) + tables.margin_at(offset));
                let passes = limit.is_some_and(|limit| sum <= limit);
                if value <= threshold {
                    prop_assert!(passes, "a vector at or below the threshold must be rescored");
                }
                let loose = (m as f64 + 1.0) * tables.step + 2.0 * tables.margin_at(offset);
                if f64::from(value) > f64::from(threshold) + loose {
                    prop_assert!(!passes, "{} passes, threshold {}, step {}", value, threshold, tables.step);
                }
            }
        }
    }

    #[test]
    fn a_threshold_below_every_vector_admits_none() {
        let mut tables = QueryTables::new(1, 2);
        tables.exact_mut().copy_from_slice(&[5.0, 7.0]);
        tables.quantize(f32::INFINITY, 0.0);
        assert_eq!(tables.byte_threshold(1.0, 0.0), None);
        assert_eq!(tables.byte_threshold(f32::INFINITY, 0.0), Some(u16::MAX));
        // 7 sits exactly 255 steps above 5; the shrunk reciprocal floors it one lower.
        assert_eq!(tables.bytes, vec![0, 254]);
    }
}
