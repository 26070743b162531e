//! What every index's search shares: checking queries, and running them in parallel.

use qcl_tensor::{Error, Result};
use rayon::prelude::*;

use super::{Metric, Neighbors, TopK};
use crate::pq::check_points;

/// Checks a batch of queries and `k`; returns the number of queries.
pub(crate) fn check_queries(queries: &[f32], dim: usize, k: usize) -> Result<usize> {
    if k == 0 {
        return Err(Error::invalid_parameter(
            "k",
            "ask for at least one neighbour",
        ));
    }
    let nq = check_points("queries", queries, dim)?;
    // The answer has nq · k slots (an id and a score each); refuse what cannot be allocated.
    let slots = nq.checked_mul(k).filter(|&s| s <= MAX_ANSWER_SLOTS);
    if slots.is_none() {
        return Err(Error::invalid_parameter(
            "k",
            format!("{nq} queries × k = {k} answer slots is more than {MAX_ANSWER_SLOTS}"),
        ));
    }
    Ok(nq)
}

/// Most answer slots (`nq · k`) one search returns: 2^28, 3 GiB of ids and scores.
pub(crate) const MAX_ANSWER_SLOTS: usize = 1 << 28;

/// Answers every query of `queries` (rows of `dim`) in parallel: `answer(q, query, scratch, top)`
/// offers candidates to `top`, which is then written out. `scratch` is one per worker, made by
/// `make_scratch`. The answer does not depend on the number of threads.
pub(crate) fn search_all<S: Send>(
    queries: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
    make_scratch: impl Fn() -> S + Sync + Send,
    answer: impl Fn(usize, &[f32], &mut S, &mut TopK) + Sync + Send,
) -> Neighbors {
    let nq = queries.len() / dim;
    let mut found = Neighbors::empty(nq, k, metric);
    queries
        .par_chunks_exact(dim)
        .enumerate()
        .zip(found.ids.par_chunks_exact_mut(k))
        .zip(found.scores.par_chunks_exact_mut(k))
        .for_each_init(
            || (make_scratch(), TopK::new(k)),
            |(scratch, top), (((q, query), ids), scores)| {
                top.clear();
                answer(q, query, scratch, top);
                top.write(metric, ids, scores);
            },
        );
    found
}
