//! The points one k-means run trains on: every row of the caller's data, or a sorted subset of
//! its rows, read in place.
//!
//! A subsample is not copied out: on Fashion-MNIST (70,000 × 784, k = 256) the default subsample
//! is 65,536 rows, and a copy would double the memory of the run. The steps that need rows in
//! one slice (the nearest-code kernel, the distance bounds) take them a block at a time,
//! gathered into one reused buffer of about [`BLOCK_BYTES`]; every per-point computation
//! is the same whichever block a point falls in, so results do not depend on the blocks.

use std::sync::Mutex;

use rayon::prelude::*;

use qcl_tensor::Result;

/// Bytes of one gathered block of rows (at least [`BLOCK_MIN_ROWS`] rows).
pub(crate) const BLOCK_BYTES: usize = 8 << 20;
/// Rows of a block at least: enough tiles of the kernel for every thread.
const BLOCK_MIN_ROWS: usize = 4096;

/// Rows `[n, dim]` of a k-means run.
pub(crate) struct Points<'a> {
    data: &'a [f32],
    dim: usize,
    /// The rows used, ascending; `None`: all of them.
    subset: Option<Vec<usize>>,
    /// Rows per gathered block.
    block_rows: usize,
    /// The reused gather buffer of a subset.
    block: Mutex<Vec<f32>>,
}

impl<'a> Points<'a> {
    /// Every row of `data`.
    pub(crate) fn all(data: &'a [f32], dim: usize) -> Self {
        Points {
            data,
            dim,
            subset: None,
            block_rows: (BLOCK_BYTES / (4 * dim)).max(BLOCK_MIN_ROWS),
            block: Mutex::new(Vec::new()),
        }
    }

    /// The rows `rows` (ascending) of `data`.
    pub(crate) fn subset(data: &'a [f32], dim: usize, rows: Vec<usize>) -> Self {
        debug_assert!(rows.windows(2).all(|w| w[0] < w[1]));
        Points {
            data,
            dim,
            subset: Some(rows),
            block_rows: (BLOCK_BYTES / (4 * dim)).max(BLOCK_MIN_ROWS),
            block: Mutex::new(Vec::new()),
        }
    }

    /// The same points in blocks of `rows` rows (tests: many blocks on small data).
    #[cfg(test)]
    pub(crate) fn with_block_rows(mut self, rows: usize) -> Self {
        self.block_rows = rows.max(1);
        self
    }

    /// Number of points.
    pub(crate) fn len(&self) -> usize {
        self.subset
            .as_ref()
            .map_or(self.data.len() / self.dim, Vec::len)
    }

    /// Values per point.
    pub(crate) fn dim(&self) -> usize {
        self.dim
    }

    /// Point `i`.
    pub(crate) fn row(&self, i: usize) -> &[f32] {
        let r = self.subset.as_ref().map_or(i, |rows| rows[i]);
        &self.data[r * self.dim..(r + 1) * self.dim]
    }

    /// The points in one slice when they are one already (no subset).
    pub(crate) fn contiguous(&self) -> Option<&'a [f32]> {
        self.subset.is_none().then_some(self.data)
    }

    /// The points as one owned slice (a copy for a subset): for k-means++ seeding only.
    pub(crate) fn to_contiguous(&self) -> std::borrow::Cow<'a, [f32]> {
        match self.contiguous() {
            Some(all) => std::borrow::Cow::Borrowed(all),
            None => (0..self.len())
                .flat_map(|i| self.row(i).iter().copied())
                .collect(),
        }
    }

    /// Calls `work(first, rows)` for consecutive blocks of points, `rows` holding points
    /// `first..first + rows.len() / dim`: all points at once without a subset, gathered blocks
    /// of about [`BLOCK_BYTES`] with one.
    pub(crate) fn for_each_block(
        &self,
        mut work: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let Some(rows) = &self.subset else {
            return work(0, self.data);
        };
        let d = self.dim;
        // Blocks are gathered by one caller at a time; a poisoned lock only held a buffer.
        let mut block = self.block.lock().unwrap_or_else(|e| e.into_inner());
        for (b, chunk) in rows.chunks(self.block_rows).enumerate() {
            // Gathered by all threads: a serial copy would leave the others idle.
            block.resize(chunk.len() * d, 0.0);
            block
                .par_chunks_mut(d)
                .zip(chunk.par_iter())
                .for_each(|(to, &r)| to.copy_from_slice(&self.data[r * d..(r + 1) * d]));
            work(b * self.block_rows, &block)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn blocks_hold_the_subset_rows_in_order(n in 1usize..300, dim in 1usize..5, keep in 0.0f64..1.0) {
            let data: Vec<f32> = (0..n * dim).map(|v| v as f32).collect();
            let rows: Vec<usize> = (0..n).filter(|&i| (i as f64 * 0.618).fract() < keep).collect();
            let points = Points::subset(&data, dim, rows.clone()).with_block_rows(1 + n % 7);
            prop_assert_eq!(points.len(), rows.len());
            let mut seen = Vec::new();
            points.for_each_block(|first, block| {
                assert_eq!(first, seen.len() / dim);
                seen.extend_from_slice(block);
                Ok(())
            }).unwrap();
            let expected: Vec<f32> = rows.iter().flat_map(|&r| data[r * dim..(r + 1) * dim].to_vec()).collect();
            prop_assert_eq!(&seen, &expected);
            for (i, &r) in rows.iter().enumerate() {
                prop_assert_eq!(points.row(i), &data[r * dim..(r + 1) * dim]);
            }
            prop_assert_eq!(&*points.to_contiguous(), &expected[..]);
        }
    }

    #[test]
    fn all_rows_are_one_block() {
        let data = [1.0, 2.0, 3.0, 4.0];
        let points = Points::all(&data, 2);
        let mut calls = 0;
        points
            .for_each_block(|first, block| {
                assert_eq!((first, block), (0, &data[..]));
                calls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(
            (calls, points.len(), points.row(1)),
            (1, 2, &[3.0, 4.0][..])
        );
    }
}
