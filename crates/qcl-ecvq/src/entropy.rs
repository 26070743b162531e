//! Entropy coding of code indices: range asymmetric numeral systems (rANS, Duda 2013) with
//! integer frequency tables.
//!
//! A [`FrequencyTable`] holds integer frequencies `f_k ≥ 1` summing to `2^P`; symbol `k` then
//! costs `P − log₂ f_k` bits. Coding uses only integer arithmetic on the table, so a stream
//! decodes bit-exactly on any machine that has the same table (the table, not the floating
//! point probabilities it was made from, is what has to travel with a model). The coder keeps
//! a 64-bit state in `[2^31, 2^63)` and moves 32-bit words in and out of it (the layout of
//! Giesen's `rans64`); the encoder runs over the symbols backwards so that the decoder reads
//! forwards.
//!
//! ```
//! use qcl_ecvq::entropy::{decode, encode, FrequencyTable};
//! let table = FrequencyTable::from_probabilities(&[0.7, 0.2, 0.1], 16)?;
//! let symbols = [0, 0, 1, 0, 2, 0, 0, 1];
//! let stream = encode(&symbols, &table)?;
//! assert_eq!(decode(&stream, &table)?, symbols);
//! // Bytes round-trip too, and a damaged stream is refused.
//! let bytes = stream.to_bytes();
//! let back = qcl_ecvq::entropy::RansStream::from_bytes(&bytes)?;
//! assert_eq!(decode(&back, &table)?, symbols);
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use qcl_tensor::{Error, Result};

/// Precision `P` (total frequency `2^P`) used when none is given.
pub const DEFAULT_PRECISION_BITS: u32 = 24;
/// Largest supported precision.
pub const MAX_PRECISION_BITS: u32 = 31;

/// Lower end of the coder's normalised state interval `[L, L·2^32)`.
const STATE_LOW: u64 = 1 << 31;
/// Magic bytes and version of [`RansStream::to_bytes`].
const STREAM_MAGIC: &[u8; 4] = b"QRNS";
const STREAM_VERSION: u8 = 1;
/// Header: magic, version, precision, 2 reserved bytes, symbol count (u64), table
/// fingerprint (u64), payload checksum (u64).
const HEADER_BYTES: usize = 4 + 1 + 1 + 2 + 8 + 8 + 8;

/// Integer symbol frequencies `f_k ≥ 1` with `Σ f_k = 2^P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrequencyTable {
    precision_bits: u32,
    frequencies: Vec<u32>,
    /// `cumulative[k] = Σ_{j<k} f_j`, length `K + 1`.
    cumulative: Vec<u32>,
}

/// A candidate ±1 change of one frequency, ordered by its effect on the expected code length.
#[derive(Debug, PartialEq)]
struct Adjustment {
    /// `p_k / (f_k ± 1/2)`: first-order change of the expected length (in units of `1/ln 2`)
    /// per unit of frequency. Rational arithmetic only, so every machine picks the same.
    score: f64,
    symbol: usize,
}

impl Eq for Adjustment {}

impl Ord for Adjustment {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap on score; among equal scores the lowest symbol first.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.symbol.cmp(&self.symbol))
    }
}

impl PartialOrd for Adjustment {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FrequencyTable {
    /// Quantises probabilities (any positive weights; they are normalised) to frequencies
    /// summing to `2^precision_bits`: `f_k = max(1, round(p_k·2^P))`, then the surplus or
    /// deficit is settled one unit at a time where it changes the expected code length
    /// `Σ p_k (P − log₂ f_k)` least (to first order, `p_k/(f_k ± ½)`).
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no symbols; [`Error::InvalidParameter`] for a precision
    /// outside `1..=31`, more symbols than `2^P`, or a probability that is zero, negative or
    /// not finite (a symbol of probability zero cannot be coded).
    pub fn from_probabilities(probabilities: &[f64], precision_bits: u32) -> Result<Self> {
        check_precision(precision_bits, probabilities.len())?;
        for (k, &p) in probabilities.iter().enumerate() {
            if !(p.is_finite() && p > 0.0) {
                return Err(Error::invalid_parameter(
                    "probabilities",
                    format!(
                        "symbol {k} has probability {p}; every symbol needs a finite probability > 0 to be codable"
                    ),
                ));
            }
        }
        let sum: f64 = probabilities.iter().sum();
        let total = 1u64 << precision_bits;
        let p: Vec<f64> = probabilities.iter().map(|&q| q / sum).collect();
        let mut freq: Vec<u64> = p
            .iter()
            .map(|&q| ((q * total as f64).round() as u64).clamp(1, total))
            .collect();
        let assigned: u64 = freq.iter().sum();
        if assigned < total {
            // Add where one more unit shortens the expected length most.
            let mut heap: BinaryHeap<Adjustment> = (0..p.len())
                .map(|k| Adjustment {
                    score: p[k] / (freq[k] as f64 + 0.5),
                    symbol: k,
                })
                .collect();
            for _ in 0..total - assigned {
                let best = heap.pop().expect("at least one symbol");
                let k = best.symbol;
                freq[k] += 1;
                heap.push(Adjustment {
                    score: p[k] / (freq[k] as f64 + 0.5),
                    symbol: k,
                });
            }
        } else if assigned > total {
            // Remove where one unit less lengthens it least (never below 1).
            let mut heap: BinaryHeap<Adjustment> = (0..p.len())
                .filter(|&k| freq[k] > 1)
                .map(|k| Adjustment {
                    score: -p[k] / (freq[k] as f64 - 0.5),
                    symbol: k,
                })
                .collect();
            for _ in 0..assigned - total {
                // Σ f > 2^P ≥ K guarantees a symbol with f > 1.
                let best = heap.pop().expect("a symbol above the minimum");
                let k = best.symbol;
                freq[k] -= 1;
                if freq[k] > 1 {
                    heap.push(Adjustment {
                        score: -p[k] / (freq[k] as f64 - 0.5),
                        symbol: k,
                    });
                }
            }
        }
        let frequencies = freq.into_iter().map(|f| f as u32).collect();
        Self::from_frequencies(frequencies, precision_bits)
    }

    /// A table from integer frequencies, as stored next to a model.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless every frequency is ≥ 1 and they sum to
    /// `2^precision_bits` (with a precision in `1..=31`); [`Error::EmptyInput`] for none.
    pub fn from_frequencies(frequencies: Vec<u32>, precision_bits: u32) -> Result<Self> {
        check_precision(precision_bits, frequencies.len())?;
        if let Some(k) = frequencies.iter().position(|&f| f == 0) {
            return Err(Error::invalid_parameter(
                "frequencies",
                format!("symbol {k} has frequency 0"),
            ));
        }
        let sum: u64 = frequencies.iter().map(|&f| u64::from(f)).sum();
        if sum != 1u64 << precision_bits {
            return Err(Error::invalid_parameter(
                "frequencies",
                format!("sum to {sum}, not 2^{precision_bits}"),
            ));
        }
        let mut cumulative = Vec::with_capacity(frequencies.len() + 1);
        let mut acc = 0u32;
        cumulative.push(0);
        for &f in &frequencies {
            // Cannot overflow: the sum is at most 2^31.
            acc += f;
            cumulative.push(acc);
        }
        Ok(FrequencyTable {
            precision_bits,
            frequencies,
            cumulative,
        })
    }

    /// Number of symbols `K`.
    pub fn len(&self) -> usize {
        self.frequencies.len()
    }

    /// Always false: a table has at least one symbol.
    pub fn is_empty(&self) -> bool {
        self.frequencies.is_empty()
    }

    /// The precision `P`.
    pub fn precision_bits(&self) -> u32 {
        self.precision_bits
    }

    /// The frequencies `f_k`.
    pub fn frequencies(&self) -> &[u32] {
        &self.frequencies
    }

    /// The ideal cost of symbol `k` under this table, `P − log₂ f_k` bits (infinite for an
    /// unknown symbol).
    pub fn code_length_bits(&self, symbol: usize) -> f64 {
        match self.frequencies.get(symbol) {
            Some(&f) => f64::from(self.precision_bits) - f64::from(f).log2(),
            None => f64::INFINITY,
        }
    }

    /// A 64-bit FNV-1a fingerprint of precision and frequencies, stored in each stream so that
    /// decoding with another table is detected.
    pub fn fingerprint(&self) -> u64 {
        let mut hash = Fnv1a::new();
        hash.eat(&self.precision_bits.to_le_bytes());
        hash.eat(&(self.frequencies.len() as u64).to_le_bytes());
        for f in &self.frequencies {
            hash.eat(&f.to_le_bytes());
        }
        hash.0
    }

    /// The symbol whose slot range `[c_k, c_k + f_k)` holds `slot`.
    fn symbol_of_slot(&self, slot: u32) -> usize {
        // Largest k with cumulative[k] ≤ slot; frequencies ≥ 1 make it unique.
        self.cumulative.partition_point(|&c| c <= slot) - 1
    }
}

/// 64-bit FNV-1a. Each byte step `h ↦ (h ⊕ b)·prime` is a bijection of `h`, so changing any
/// single byte always changes the hash.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Checksum of the coded words: rANS has no redundancy of its own (a damaged low-order word
/// can decode to another valid symbol sequence), so damage is caught by this instead.
fn words_checksum(words: &[u32]) -> u64 {
    let mut hash = Fnv1a::new();
    for w in words {
        hash.eat(&w.to_le_bytes());
    }
    hash.0
}

fn check_precision(precision_bits: u32, symbols: usize) -> Result<()> {
    if symbols == 0 {
        return Err(Error::EmptyInput("a frequency table needs symbols".into()));
    }
    if !(1..=MAX_PRECISION_BITS).contains(&precision_bits) {
        return Err(Error::invalid_parameter(
            "precision_bits",
            format!("{precision_bits} is outside 1..={MAX_PRECISION_BITS}"),
        ));
    }
    if symbols as u64 > 1u64 << precision_bits {
        return Err(Error::invalid_parameter(
            "precision_bits",
            format!("{symbols} symbols need a precision of at least log2({symbols}) bits, got {precision_bits}"),
        ));
    }
    Ok(())
}

/// An rANS-coded symbol stream with what the decoder needs to check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RansStream {
    /// Number of symbols coded.
    pub symbols: u64,
    /// Precision of the table it was coded with.
    pub precision_bits: u32,
    /// [`FrequencyTable::fingerprint`] of that table.
    pub table_fingerprint: u64,
    /// FNV-1a checksum of the words, checked before decoding.
    pub checksum: u64,
    /// The coded words, in decoding order (the first two hold the final encoder state).
    pub words: Vec<u32>,
}

impl RansStream {
    /// Size of [`to_bytes`](RansStream::to_bytes) in bits (header included).
    pub fn len_bits(&self) -> u64 {
        (HEADER_BYTES as u64 + 4 * self.words.len() as u64) * 8
    }

    /// Size of the coded words alone, in bits.
    pub fn payload_bits(&self) -> u64 {
        32 * self.words.len() as u64
    }

    /// Serialises the stream: a 32-byte header (magic `QRNS`, version, precision, symbol
    /// count, table fingerprint, checksum; little-endian) followed by the words.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * self.words.len());
        out.extend_from_slice(STREAM_MAGIC);
        out.push(STREAM_VERSION);
        out.push(self.precision_bits as u8);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.symbols.to_le_bytes());
        out.extend_from_slice(&self.table_fingerprint.to_le_bytes());
        out.extend_from_slice(&self.checksum.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Parses [`to_bytes`](RansStream::to_bytes)'s output.
    ///
    /// # Errors
    /// [`Error::CorruptStream`] for a short or foreign header, another version, or a length
    /// that is not a whole number of words.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: &str| Error::corrupt_stream("rANS stream", reason);
        if bytes.len() < HEADER_BYTES {
            return Err(corrupt(&format!(
                "{} bytes is shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..4] != STREAM_MAGIC {
            return Err(corrupt("not an rANS stream (wrong magic bytes)"));
        }
        if bytes[4] != STREAM_VERSION {
            return Err(corrupt(&format!("unsupported version {}", bytes[4])));
        }
        let precision_bits = u32::from(bytes[5]);
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let body = &bytes[HEADER_BYTES..];
        if !body.len().is_multiple_of(4) {
            return Err(corrupt(
                "truncated: the body is not a whole number of 32-bit words",
            ));
        }
        Ok(RansStream {
            symbols: u64_at(8),
            precision_bits,
            table_fingerprint: u64_at(16),
            checksum: u64_at(24),
            words: body
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
                .collect(),
        })
    }
}

/// Codes `symbols` with `table`.
///
/// # Errors
/// [`Error::InvalidParameter`] for a symbol outside the table.
pub fn encode(symbols: &[u32], table: &FrequencyTable) -> Result<RansStream> {
    let precision = table.precision_bits;
    let mut words: Vec<u32> = Vec::with_capacity(symbols.len() / 4 + 2);
    let mut state = STATE_LOW;
    for (position, &symbol) in symbols.iter().enumerate().rev() {
        let (Some(&f), Some(&start)) = (
            table.frequencies.get(symbol as usize),
            table.cumulative.get(symbol as usize),
        ) else {
            return Err(Error::invalid_parameter(
                "symbols",
                format!(
                    "symbol {symbol} at position {position} is outside a table of {} symbols",
                    table.len()
                ),
            ));
        };
        let f = u64::from(f);
        // Emit a word first if the state would leave [L, L·2^32) after coding.
        let limit = ((STATE_LOW >> precision) << 32) * f;
        if state >= limit {
            words.push(state as u32);
            state >>= 32;
        }
        state = ((state / f) << precision) + state % f + u64::from(start);
    }
    words.push(state as u32);
    words.push((state >> 32) as u32);
    words.reverse();
    Ok(RansStream {
        symbols: symbols.len() as u64,
        precision_bits: precision,
        table_fingerprint: table.fingerprint(),
        checksum: words_checksum(&words),
        words,
    })
}

/// Decodes a stream written by [`encode`] with the same table.
///
/// # Errors
/// [`Error::CorruptStream`] for a stream coded with another table, whose words fail their
/// checksum, that runs out of words, has words left over, or does not end in the encoder's
/// initial state (any of which means it was truncated or damaged).
pub fn decode(stream: &RansStream, table: &FrequencyTable) -> Result<Vec<u32>> {
    let corrupt = |reason: String| Error::corrupt_stream("rANS stream", reason);
    if stream.precision_bits != table.precision_bits
        || stream.table_fingerprint != table.fingerprint()
    {
        return Err(corrupt(
            "it was coded with another frequency table (fingerprint or precision differ)".into(),
        ));
    }
    let words = &stream.words;
    if words_checksum(words) != stream.checksum {
        return Err(corrupt(
            "the checksum of the coded words does not match (damaged or truncated)".into(),
        ));
    }
    if words.len() < 2 {
        return Err(corrupt(format!(
            "{} words cannot hold the coder state",
            words.len()
        )));
    }
    // Each symbol takes at least `P − log₂ f_max` bits out of the stream, so a count the
    // words cannot hold is damage (and must not make the decoder loop or allocate for ever).
    let f_max = table.frequencies.iter().copied().max().unwrap_or(1);
    let min_cost_bits = f64::from(table.precision_bits) - f64::from(f_max).log2();
    let capacity = if min_cost_bits > 0.0 {
        ((32 * words.len() + 64) as f64 / min_cost_bits).ceil() + 1.0
    } else {
        f64::INFINITY
    };
    let count = usize::try_from(stream.symbols)
        .ok()
        .filter(|&n| (n as f64) <= capacity)
        .ok_or_else(|| {
            corrupt(format!(
                "{} symbols cannot come out of {} words",
                stream.symbols,
                words.len()
            ))
        })?;
    let precision = table.precision_bits;
    let mask = (1u64 << precision) - 1;
    let mut state = (u64::from(words[0]) << 32) | u64::from(words[1]);
    if state < STATE_LOW {
        return Err(corrupt("the initial state is out of range".into()));
    }
    let mut next = 2;
    let mut out = Vec::with_capacity(count.min(words.len().saturating_mul(64)));
    for position in 0..count {
        let slot = (state & mask) as u32;
        let symbol = table.symbol_of_slot(slot);
        let f = u64::from(table.frequencies[symbol]);
        let start = u64::from(table.cumulative[symbol]);
        state = f * (state >> precision) + u64::from(slot) - start;
        if state < STATE_LOW {
            let Some(&w) = words.get(next) else {
                return Err(corrupt(format!(
                    "truncated: ran out of words at symbol {position} of {count}"
                )));
            };
            state = (state << 32) | u64::from(w);
            next += 1;
        }
        out.push(symbol as u32);
    }
    if next != words.len() {
        return Err(corrupt(format!(
            "{} words left over after {count} symbols",
            words.len() - next
        )));
    }
    if state != STATE_LOW {
        return Err(corrupt(
            "the final state differs from the encoder's initial state (damaged words)".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_sum_to_the_total_and_follow_the_probabilities() {
        let table = FrequencyTable::from_probabilities(&[0.5, 0.25, 0.125, 0.125], 8).unwrap();
        assert_eq!(table.frequencies(), &[128, 64, 32, 32]);
        assert_eq!(table.code_length_bits(0), 1.0);
        assert_eq!(table.code_length_bits(3), 3.0);
        // Tiny probabilities still get one slot; the big symbol pays for them.
        let table = FrequencyTable::from_probabilities(&[1.0, 1e-30, 1e-30], 4).unwrap();
        assert_eq!(table.frequencies(), &[14, 1, 1]);
    }

    #[test]
    fn zero_probabilities_and_impossible_precisions_are_refused() {
        assert!(matches!(
            FrequencyTable::from_probabilities(&[0.5, 0.0, 0.5], 16),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            FrequencyTable::from_probabilities(&[0.5, f64::NAN], 16),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            FrequencyTable::from_probabilities(&[0.25; 5], 2),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            FrequencyTable::from_probabilities(&[], 16),
            Err(Error::EmptyInput(_))
        ));
        assert!(matches!(
            FrequencyTable::from_frequencies(vec![3, 4], 3),
            Err(Error::InvalidParameter { .. })
        ));
    }

    #[test]
    fn damaged_streams_are_detected() {
        let table = FrequencyTable::from_probabilities(&[0.6, 0.3, 0.1], 12).unwrap();
        let symbols: Vec<u32> = (0..500u32).map(|i| (i * 7 + i / 3) % 3).collect();
        let stream = encode(&symbols, &table).unwrap();
        let mut truncated = stream.clone();
        truncated.words.pop();
        assert!(matches!(
            decode(&truncated, &table),
            Err(Error::CorruptStream { .. })
        ));
        let mut flipped = stream.clone();
        flipped.words[3] ^= 1 << 7;
        assert!(matches!(
            decode(&flipped, &table),
            Err(Error::CorruptStream { .. })
        ));
        let other = FrequencyTable::from_probabilities(&[0.5, 0.3, 0.2], 12).unwrap();
        assert!(matches!(
            decode(&stream, &other),
            Err(Error::CorruptStream { .. })
        ));
        let bytes = stream.to_bytes();
        assert!(matches!(
            RansStream::from_bytes(&bytes[..bytes.len() - 1]),
            Err(Error::CorruptStream { .. })
        ));
        assert!(matches!(
            RansStream::from_bytes(&bytes[..10]),
            Err(Error::CorruptStream { .. })
        ));
        assert!(matches!(
            encode(&[0, 3], &table),
            Err(Error::InvalidParameter { .. })
        ));
    }
}
