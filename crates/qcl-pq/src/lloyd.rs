//! One Lloyd loop for every quantizer trained by alternating an assignment and an update:
//! k-means (plain or weighted, with or without distance bounds), the entropy-constrained VQ of
//! Chou, Lookabaugh and Gray (qcl-ecvq's `ClgEcvq`) and weight PQ's activation-aware EM
//! (qcl-wpq). Each supplies its two halves through [`LloydStep`]: its distance (plain, biased
//! by code lengths, under an activation metric) lives in `assign`, its update (mean, weighted
//! mean, mean plus new lengths, projected mean) in `update`. The loop owns the iteration count,
//! the objective history, the stopping rule and the progress bar.

use indicatif::ProgressBar;
use qcl_tensor::Result;

/// The two halves of a Lloyd iteration for one kind of quantizer.
///
/// A quantizer of your own, here one-dimensional k-means with two codes:
///
/// ```
/// use qcl_pq::{run_lloyd, LloydSchedule, LloydStep, LloydStop};
///
/// struct TwoMeans { points: Vec<f32>, codes: [f32; 2], labels: Vec<usize> }
///
/// impl LloydStep for TwoMeans {
///     fn assign(&mut self) -> qcl_tensor::Result<f64> {
///         let mut total = 0.0;
///         for (x, label) in self.points.iter().zip(&mut self.labels) {
///             let d = self.codes.map(|c| (x - c).powi(2));
///             *label = usize::from(d[1] < d[0]);
///             total += f64::from(d[*label]);
///         }
///         Ok(total / self.points.len() as f64)
///     }
///     fn update(&mut self) -> qcl_tensor::Result<()> {
///         for j in 0..2 {
///             let members: Vec<f32> = self.points.iter().zip(&self.labels)
///                 .filter(|(_, &l)| l == j).map(|(&x, _)| x).collect();
///             if !members.is_empty() {
///                 self.codes[j] = members.iter().sum::<f32>() / members.len() as f32;
///             }
///         }
///         Ok(())
///     }
/// }
///
/// let mut step = TwoMeans { points: vec![0.0, 1.0, 9.0, 10.0], codes: [0.0, 1.0], labels: vec![0; 4] };
/// let schedule = LloydSchedule { max_iter: 20, stop: LloydStop::Relative { tolerance: 1e-6 } };
/// let history = run_lloyd(&mut step, &schedule, &indicatif::ProgressBar::hidden())?;
/// assert_eq!(step.codes, [0.5, 9.5]);
/// assert_eq!(history.last(), Some(&0.25));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub trait LloydStep {
    /// Assigns every point to a code under the quantizer's distance; returns the objective of
    /// this assignment with the current codes (the value the stopping rule watches).
    fn assign(&mut self) -> Result<f64>;
    /// Moves the codes (and whatever else the quantizer keeps, such as code lengths) to fit
    /// the assignment just made.
    fn update(&mut self) -> Result<()>;
}

/// When a Lloyd run stops early. `J` is the objective of an assignment, `J'` the previous one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LloydStop {
    /// Never: every iteration runs (weight PQ's EM, whose metric is drawn afresh each time,
    /// so its objective need not fall).
    Never,
    /// After an assignment with `(J' − J)/J' < tolerance` (`J' > 0`) or `J = 0`; the codes stay
    /// those that assignment used (k-means; tolerance 0 runs every iteration unless `J` rises).
    Relative {
        /// The relative decrease below which the run stops.
        tolerance: f64,
    },
    /// After an assignment with `J' − J ≤ tolerance·|J|`, then one more update, so that the
    /// codes and their lengths fit the last cells (CLG's entropy-constrained VQ).
    RelativeThenUpdate {
        /// The relative decrease at or below which the run stops.
        tolerance: f64,
    },
}

impl LloydStop {
    /// Whether an assignment of objective `objective`, after `previous`, ends the run.
    fn reached(self, previous: Option<f64>, objective: f64) -> bool {
        match self {
            LloydStop::Never => false,
            LloydStop::Relative { tolerance } => {
                objective == 0.0
                    || previous.is_some_and(|p| p > 0.0 && (p - objective) / p < tolerance)
            }
            LloydStop::RelativeThenUpdate { tolerance } => {
                previous.is_some_and(|p| p - objective <= tolerance * objective.abs())
            }
        }
    }
}

/// How long a Lloyd run goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LloydSchedule {
    /// Assignments at most.
    pub max_iter: usize,
    /// The early stop.
    pub stop: LloydStop,
}

/// Runs `step` until `schedule` stops it: at most `max_iter` assignments, each followed by an
/// update unless it ended the run (see [`LloydStop`]). Ticks `progress` once per assignment.
/// Returns the objective of every assignment.
///
/// # Errors
/// The first error of the step.
pub fn run_lloyd(
    step: &mut impl LloydStep,
    schedule: &LloydSchedule,
    progress: &ProgressBar,
) -> Result<Vec<f64>> {
    let mut history: Vec<f64> = Vec::with_capacity(schedule.max_iter.min(1 << 12));
    for _ in 0..schedule.max_iter {
        let objective = step.assign()?;
        progress.inc(1);
        let stop = schedule.stop.reached(history.last().copied(), objective);
        history.push(objective);
        let update = !stop || matches!(schedule.stop, LloydStop::RelativeThenUpdate { .. });
        if update {
            step.update()?;
        }
        if stop {
            break;
        }
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A step that replays given objectives and counts its calls.
    struct Replay {
        objectives: Vec<f64>,
        assigns: usize,
        updates: usize,
    }

    impl LloydStep for Replay {
        fn assign(&mut self) -> Result<f64> {
            self.assigns += 1;
            Ok(self.objectives[self.assigns - 1])
        }
        fn update(&mut self) -> Result<()> {
            self.updates += 1;
            Ok(())
        }
    }

    fn replay(objectives: &[f64], max_iter: usize, stop: LloydStop) -> (Vec<f64>, usize) {
        let mut step = Replay {
            objectives: objectives.to_vec(),
            assigns: 0,
            updates: 0,
        };
        let schedule = LloydSchedule { max_iter, stop };
        let history = run_lloyd(&mut step, &schedule, &ProgressBar::hidden()).unwrap();
        assert_eq!(history.len(), step.assigns);
        (history, step.updates)
    }

    #[test]
    fn each_rule_stops_where_it_says() {
        let j = [10.0, 5.0, 4.99, 4.0, 3.0];
        // (5 − 4.99)/5 = 0.002 < 0.01: stop at the third assignment, no update after it.
        let stop = LloydStop::Relative { tolerance: 0.01 };
        assert_eq!(replay(&j, 5, stop), (j[..3].to_vec(), 2));
        // The same decrease, then one more update.
        let stop = LloydStop::RelativeThenUpdate { tolerance: 0.01 };
        assert_eq!(replay(&j, 5, stop), (j[..3].to_vec(), 3));
        // Never: every iteration, each followed by its update.
        assert_eq!(replay(&j, 5, LloydStop::Never), (j.to_vec(), 5));
        // A zero objective ends a relative run at once.
        let zero = [3.0, 0.0, 0.0];
        let stop = LloydStop::Relative { tolerance: 0.0 };
        assert_eq!(replay(&zero, 3, stop), (zero[..2].to_vec(), 1));
        // No iterations: nothing is called.
        assert_eq!(replay(&j, 0, stop), (vec![], 0));
    }

    proptest! {
        /// With a tolerance of zero a falling objective never stops the run; any rule runs at
        /// most `max_iter` assignments and updates at most once per assignment.
        #[test]
        fn falling_objectives_run_to_the_end(
            start in 1.0f64..1e6, steps in proptest::collection::vec(0.5f64..0.999, 1..30),
        ) {
            let mut j = vec![start];
            for s in &steps {
                j.push(j.last().unwrap() * s);
            }
            let n = j.len();
            for stop in [LloydStop::Never, LloydStop::Relative { tolerance: 0.0 }] {
                let (history, updates) = replay(&j, n, stop);
                prop_assert_eq!(history, j.clone());
                prop_assert_eq!(updates, n);
            }
            let (history, updates) = replay(&j, n, LloydStop::RelativeThenUpdate { tolerance: 1.0 });
            prop_assert_eq!(history.len(), 2);
            prop_assert_eq!(updates, 2);
        }
    }
}
