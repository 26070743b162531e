//! Restarts of a Lloyd-type design: keep the run whose last objective is lowest.

/// The best of several runs of an iterative design (k-means' `n_init`, CLG-ECVQ's restarts):
/// the run whose final objective is lowest, the earliest on a tie. A run without one (`None`,
/// an empty history) or with NaN counts as `+∞`: kept only when nothing better comes.
///
/// ```
/// use qcl_pq::BestRun;
/// let mut best = BestRun::new();
/// best.offer(Some(3.0), "first");
/// best.offer(Some(2.0), "second");
/// best.offer(Some(2.0), "tie: the earlier run stays");
/// assert_eq!(best.into_best(), Some("second"));
/// ```
#[derive(Debug, Clone)]
pub struct BestRun<T> {
    best: Option<(f64, T)>,
}

impl<T> Default for BestRun<T> {
    fn default() -> Self {
        BestRun { best: None }
    }
}

impl<T> BestRun<T> {
    /// No run yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers a run with its final objective (the last of its history); keeps it if that is
    /// strictly lower than the best so far (or it is the first).
    pub fn offer(&mut self, final_objective: Option<f64>, run: T) {
        let last = final_objective
            .filter(|v| !v.is_nan())
            .unwrap_or(f64::INFINITY);
        if self.best.as_ref().is_none_or(|(best, _)| last < *best) {
            self.best = Some((last, run));
        }
    }

    /// The kept run, if any was offered.
    pub fn into_best(self) -> Option<T> {
        self.best.map(|(_, run)| run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_run_is_kept_even_without_a_history_and_nan_never_wins() {
        let mut best = BestRun::new();
        best.offer(None, 0);
        best.offer(Some(f64::NAN), 1);
        assert_eq!(best.clone().into_best(), Some(0));
        best.offer(Some(1.0), 2);
        best.offer(Some(1.0), 3);
        assert_eq!(best.clone().into_best(), Some(2));
        // A NaN first run is replaced by any finite one.
        let mut nan_first = BestRun::new();
        nan_first.offer(Some(f64::NAN), 0);
        nan_first.offer(Some(7.0), 1);
        assert_eq!(nan_first.into_best(), Some(1));
        assert_eq!(BestRun::<u8>::new().into_best(), None);
    }
}
