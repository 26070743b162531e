//! The `k` best candidates of one query, and the answers of a batch of queries.

use std::collections::BinaryHeap;

use super::Metric;

/// Id reported where fewer than `k` vectors were found (e.g. an inverted-file search whose
/// probed lists hold fewer than `k` vectors).
pub const MISSING_ID: u64 = u64::MAX;

/// The answer to a batch of queries: row-major `[nq, k]` ids and scores, best first.
///
/// Scores are the metric's own ([`Metric`]): ascending squared distances for L2, descending
/// similarities for inner product and cosine. Ties go to the lower id. Slots without a
/// neighbour hold [`MISSING_ID`] and the worst score (`+∞` for L2, `−∞` otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    /// Neighbours per query.
    pub k: usize,
    /// Ids, `[nq, k]`.
    pub ids: Vec<u64>,
    /// Scores, `[nq, k]`.
    pub scores: Vec<f32>,
}

impl Neighbors {
    /// Number of queries answered.
    pub fn nq(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }

    /// Ids found for query `q`, best first.
    pub fn ids_of(&self, q: usize) -> &[u64] {
        &self.ids[q * self.k..(q + 1) * self.k]
    }

    /// Scores of query `q`, best first.
    pub fn scores_of(&self, q: usize) -> &[f32] {
        &self.scores[q * self.k..(q + 1) * self.k]
    }

    /// `nq` empty answers, filled by [`fill`](Self::fill).
    pub(crate) fn empty(nq: usize, k: usize, metric: Metric) -> Self {
        Neighbors {
            k,
            ids: vec![MISSING_ID; nq * k],
            scores: vec![metric.missing_score(); nq * k],
        }
    }
}

/// A candidate: internal (minimised) value, then id, ordered by both.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate(f32, u64);

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The `k` smallest `(value, id)` pairs seen so far (a bounded max-heap).
#[derive(Debug, Clone)]
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Candidate>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK {
            k,
            // Grown on demand past a few pages: k may be far more than the vectors offered.
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
        }
    }

    /// Empties the heap for the next query.
    pub(crate) fn clear(&mut self) {
        self.heap.clear();
    }

    /// The value a candidate must not exceed to enter: the worst kept value once `k` are
    /// kept, `+∞` before.
    pub(crate) fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::INFINITY
        } else {
            self.heap.peek().map_or(f32::INFINITY, |c| c.0)
        }
    }

    /// Offers a candidate; returns whether it was kept.
    pub(crate) fn push(&mut self, value: f32, id: u64) -> bool {
        let candidate = Candidate(value, id);
        if self.heap.len() < self.k {
            self.heap.push(candidate);
            return true;
        }
        match self.heap.peek() {
            Some(worst) if candidate < *worst => {
                self.heap.pop();
                self.heap.push(candidate);
                true
            }
            _ => false,
        }
    }

    /// Writes the kept candidates best first into `ids` / `scores` (length `k`), as `metric`
    /// reports them; slots beyond the kept count stay as they are.
    pub(crate) fn write(&self, metric: Metric, ids: &mut [u64], scores: &mut [f32]) {
        let mut sorted: Vec<Candidate> = self.heap.iter().copied().collect();
        sorted.sort_unstable();
        for ((id, score), c) in ids.iter_mut().zip(scores.iter_mut()).zip(sorted) {
            *id = c.1;
            *score = metric.score(c.0);
        }
    }

    /// The kept `(value, id)` pairs, best first.
    #[cfg(test)]
    pub(crate) fn sorted(&self) -> Vec<(f32, u64)> {
        let mut sorted: Vec<Candidate> = self.heap.iter().copied().collect();
        sorted.sort_unstable();
        sorted.into_iter().map(|c| (c.0, c.1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The heap keeps exactly the k smallest (value, id) pairs, in order.
        #[test]
        fn keeps_the_k_smallest(values in prop::collection::vec(0u8..20, 1..200), k in 1usize..12) {
            let mut top = TopK::new(k);
            for (id, &v) in values.iter().enumerate() {
                top.push(f32::from(v), id as u64);
            }
            let mut all: Vec<(f32, u64)> =
                values.iter().enumerate().map(|(i, &v)| (f32::from(v), i as u64)).collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all.truncate(k);
            prop_assert_eq!(top.sorted(), all);
        }
    }

    #[test]
    fn threshold_is_infinite_until_full_then_the_worst_kept() {
        let mut top = TopK::new(2);
        top.push(3.0, 0);
        assert_eq!(top.threshold(), f32::INFINITY);
        top.push(1.0, 1);
        assert_eq!(top.threshold(), 3.0);
        assert!(!top.push(3.0, 7), "a tie with a higher id stays out");
        assert!(top.push(2.0, 9));
        assert_eq!(top.sorted(), vec![(1.0, 1), (2.0, 9)]);
    }
}
