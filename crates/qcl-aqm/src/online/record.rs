//! What a run records besides training (docs/methods/aqm.md § Diagnostics): the accuracy
//! matrix, and for AQM the accuracies on raw and on decoded test images after every task and
//! the share of decoded images among the replay images of each classifier step.

use candle_core::Device;
use qcl_continual::AccuracyMatrix;
use qcl_data::Dataset;
use qcl_tensor::Result;

use super::classifier::{accuracy, Net};
use super::{ClassifierInput, Method, OnlineConfig, Replay, ReplayBatch};

/// What a task end is evaluated with.
pub(super) struct TaskEnd<'a> {
    net: &'a Net,
    replay: &'a mut Replay,
    tests: &'a [Dataset],
    device: &'a Device,
}

impl<'a> TaskEnd<'a> {
    pub(super) fn new(
        net: &'a Net,
        replay: &'a mut Replay,
        tests: &'a [Dataset],
        device: &'a Device,
    ) -> Self {
        TaskEnd {
            net,
            replay,
            tests,
            device,
        }
    }
}

/// The records of one run, filled as it goes.
pub(super) struct Records {
    /// The method's accuracy matrix (raw test images, or decoded ones for a decoded-input run
    /// once the modules froze).
    pub(super) matrix: AccuracyMatrix,
    raw: Vec<Vec<Option<f64>>>,
    decoded: Vec<Vec<Option<f64>>>,
    share_sum: Vec<f64>,
    share_steps: Vec<usize>,
    aqm: bool,
    decoded_input: bool,
}

/// The records at the end of a run.
pub(super) struct Recorded {
    pub(super) accuracy: Vec<Vec<Option<f64>>>,
    pub(super) raw_test_accuracy: Vec<Vec<Option<f64>>>,
    pub(super) decoded_test_accuracy: Vec<Vec<Option<f64>>>,
    pub(super) accuracy_on_reconstructions: Option<Vec<f64>>,
    pub(super) decoded_replay_share: Vec<Option<f64>>,
}

impl Records {
    pub(super) fn new(num_tasks: usize, config: &OnlineConfig) -> Result<Self> {
        let aqm = config.method == Method::Aqm;
        let square = || vec![vec![None; num_tasks]; num_tasks];
        Ok(Records {
            matrix: AccuracyMatrix::new(num_tasks)?,
            raw: if aqm { square() } else { Vec::new() },
            decoded: if aqm { square() } else { Vec::new() },
            share_sum: vec![0.0; num_tasks],
            share_steps: vec![0; num_tasks],
            aqm,
            decoded_input: aqm && config.classifier_input == ClassifierInput::Decoded,
        })
    }

    /// Counts the decoded share of one classifier step's replay batch of `task`.
    pub(super) fn replay(&mut self, task: usize, batch: Option<&ReplayBatch>) {
        if let Some(b) = batch {
            let rows = b.y.dims().first().copied().unwrap_or(0);
            if rows > 0 && task < self.share_sum.len() {
                self.share_sum[task] += b.decoded as f64 / rows as f64;
                self.share_steps[task] += 1;
            }
        }
    }

    /// Evaluates after task `row` on the test sets of tasks `0..=row`: raw test images for
    /// every method, and for AQM also test images through the frozen modules once all froze.
    pub(super) fn task_end(&mut self, at: TaskEnd<'_>, row: usize) -> Result<()> {
        for (j, test) in at.tests.iter().enumerate().take(row + 1) {
            let value = match &mut *at.replay {
                Replay::Adaptive(_, Some(stack)) if self.aqm => {
                    let raw = accuracy(at.net, test, None, at.device)?;
                    let decoded = if stack.all_frozen() {
                        Some(accuracy(at.net, test, Some(stack), at.device)?)
                    } else {
                        None
                    };
                    self.raw[row][j] = Some(raw);
                    self.decoded[row][j] = decoded;
                    match decoded {
                        Some(d) if self.decoded_input => d,
                        _ => raw,
                    }
                }
                _ => accuracy(at.net, test, None, at.device)?,
            };
            self.matrix.set(row, j, value)?;
        }
        Ok(())
    }

    pub(super) fn finish(self) -> Recorded {
        // The last row on decoded images, when every task has one: the final classifier on
        // test images through the frozen modules.
        let accuracy_on_reconstructions = self
            .decoded
            .last()
            .and_then(|row| row.iter().copied().collect::<Option<Vec<f64>>>());
        Recorded {
            accuracy: self.matrix.rows().to_vec(),
            raw_test_accuracy: self.raw,
            decoded_test_accuracy: self.decoded,
            accuracy_on_reconstructions,
            decoded_replay_share: self
                .share_sum
                .iter()
                .zip(&self.share_steps)
                .map(|(&s, &n)| (n > 0).then(|| s / n as f64))
                .collect(),
        }
    }
}
