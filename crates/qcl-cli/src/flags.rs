//! Parsers of numeric flags with their ranges: a value outside is a usage error (exit status
//! 2, kind `usage` under `--json`) before any work, never a panic, an abort on allocation or
//! a loop that does not end.

use clap::builder::{RangedU64ValueParser, TypedValueParser, ValueParser};

/// A count in `min..=max`, as `usize`.
pub fn count(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(min..=max)
}

/// A `u64` in `min..=max`.
pub fn amount(min: u64, max: u64) -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::<u64>::new().range(min..=max)
}

/// A `u32` in `min..=max`.
pub fn small(min: u64, max: u64) -> RangedU64ValueParser<u32> {
    RangedU64ValueParser::<u32>::new().range(min..=max)
}

/// A finite number above zero and at most `max`.
pub fn positive(max: f64) -> ValueParser {
    ValueParser::new(
        clap::builder::StringValueParser::new().try_map(move |text| {
            let value: f64 = text
                .parse()
                .map_err(|_| format!("`{text}` is not a number"))?;
            if value.is_finite() && value > 0.0 && value <= max {
                Ok(value)
            } else {
                Err(format!("{value} is not in (0, {max}]"))
            }
        }),
    )
}

/// Largest number of points, samples or rows a flag may ask for (2^28).
pub const MAX_SAMPLES: u64 = 1 << 28;
/// Largest number of steps or iterations a flag may ask for.
pub const MAX_STEPS: u64 = 1_000_000;
/// Largest number of codes or centroids a flag may ask for (2^24).
pub const MAX_CODES: u64 = 1 << 24;
