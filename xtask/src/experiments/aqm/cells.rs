//! A job's runs over seeds as one table cell: per-seed values, their mean, standard deviation
//! and standard error, and the raw-versus-decoded diagnostics of AQM runs.

use qcl_aqm::online::Method;
use qcl_aqm::Reencoded;
use serde::Serialize;

use super::{Arm, Job, SeedRun};

/// Mean, sample standard deviation (n − 1) and standard error (std / √n) of `n` values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one value).
    pub std: f64,
    /// Standard error, `std / √n`.
    pub se: f64,
    /// Values.
    pub n: usize,
}

impl Stats {
    /// The statistics of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let (mean, std) = crate::experiments::mean_std(values);
        Some(Stats {
            mean,
            std,
            se: std / (values.len() as f64).sqrt(),
            n: values.len(),
        })
    }

    /// `mean ± std (SE se)` in percent with one decimal.
    pub fn percent(&self) -> String {
        format!(
            "{:.1} ± {:.1} (SE {:.1})",
            100.0 * self.mean,
            100.0 * self.std,
            100.0 * self.se
        )
    }
}

/// `max_{l ≤ T−2} R[l][j] − R[T−1][j]` for task `j` (None without a final row or an earlier one).
pub fn task_forgetting(matrix: &[Vec<Option<f64>>], j: usize) -> Option<f64> {
    let (last, earlier) = matrix.split_last()?;
    let best = earlier
        .iter()
        .filter_map(|row| row.get(j).copied().flatten())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))?;
    Some(best - last.get(j).copied().flatten()?)
}

/// Mean of the entries `row[range]` that are all present (None if one is missing or none).
fn mean_of(row: &[Option<f64>], range: std::ops::Range<usize>) -> Option<f64> {
    let v: Option<Vec<f64>> = row.get(range)?.iter().copied().collect();
    let v = v?;
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One job's runs over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The job.
    pub job: Job,
    /// Method name (AQM with its arm).
    pub method: String,
    /// Classifier name.
    pub classifier: String,
    /// Budget name.
    pub budget: String,
    /// Bytes per parameter.
    pub param_bytes: u64,
    /// Streamed images per task.
    pub streamed_per_task: usize,
    /// Streamed images over the whole stream.
    pub streamed: usize,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Final accuracy per seed.
    pub final_accuracy: Vec<f64>,
    /// Mean forgetting per seed (None for iid-online).
    pub forgetting: Vec<Option<f64>>,
    /// Forgetting of task 0 per seed.
    pub task0_forgetting: Vec<Option<f64>>,
    /// Stored samples at the end per seed.
    pub stored_at_end: Vec<usize>,
    /// Stream samples per second per seed (timing).
    pub samples_per_second: Vec<f64>,
    /// Freeze step per seed (AQM).
    pub freeze_step: Vec<Option<u64>>,
    /// K' per seed (AQM).
    pub trimmed_codes: Vec<Option<usize>>,
    /// Drift MSE of all stored codes at the end, per seed (AQM).
    pub final_drift: Vec<Option<f64>>,
    /// Largest drift MSE measured over the stream, per seed (AQM).
    pub max_drift: Vec<Option<f64>>,
    /// Accuracy matrix per seed.
    pub accuracy: Vec<Vec<Vec<Option<f64>>>>,
    /// AQM: accuracy on raw test images after each task, per seed.
    pub raw_test_accuracy: Vec<Vec<Vec<Option<f64>>>>,
    /// AQM: accuracy on test images through the frozen module after each task, per seed.
    pub decoded_test_accuracy: Vec<Vec<Vec<Option<f64>>>>,
    /// Mean share of decoded images among replay images, per seed and task.
    pub decoded_replay_share: Vec<Vec<Option<f64>>>,
    /// Re-encoding totals per seed.
    pub reencoded: Vec<Reencoded>,
    /// Incoming samples admitted per seed (adaptive memories).
    pub admitted: Vec<Option<u64>>,
    /// Statistics of the final accuracy.
    pub final_accuracy_stats: Option<Stats>,
    /// Statistics of the forgetting.
    pub forgetting_stats: Option<Stats>,
    /// Statistics of the forgetting of task 0.
    pub task0_forgetting_stats: Option<Stats>,
}

impl Cell {
    /// The cell of `job` from its runs.
    pub fn new(job: &Job, runs: &[SeedRun]) -> Self {
        let results: Vec<&qcl_aqm::RunResult> = runs.iter().map(|r| &r.result).collect();
        let tasks = results.first().map_or(0, |r| r.accuracy.len()).max(1);
        let final_accuracy: Vec<f64> = results.iter().map(|r| r.final_accuracy).collect();
        let forgetting: Vec<Option<f64>> = results.iter().map(|r| r.forgetting).collect();
        let task0_forgetting: Vec<Option<f64>> = results
            .iter()
            .map(|r| {
                (job.method != Method::IidOnline)
                    .then(|| task_forgetting(&r.accuracy, 0))
                    .flatten()
            })
            .collect();
        let flat = |v: &[Option<f64>]| -> Vec<f64> { v.iter().flatten().copied().collect() };
        Cell {
            job: *job,
            method: job.name().into(),
            classifier: job.classifier.name(),
            budget: job.budget_name().into(),
            param_bytes: job.param_bytes,
            streamed_per_task: results.first().map_or(0, |r| r.samples_streamed / tasks),
            streamed: results.first().map_or(0, |r| r.samples_streamed),
            seeds: runs.iter().map(|r| r.seed).collect(),
            final_accuracy_stats: Stats::of(&final_accuracy),
            forgetting_stats: Stats::of(&flat(&forgetting)),
            task0_forgetting_stats: Stats::of(&flat(&task0_forgetting)),
            final_accuracy,
            forgetting,
            task0_forgetting,
            stored_at_end: results.iter().map(|r| r.stored_at_end).collect(),
            samples_per_second: results.iter().map(|r| r.samples_per_second).collect(),
            freeze_step: results
                .iter()
                .map(|r| r.freeze_steps.first().copied().flatten())
                .collect(),
            trimmed_codes: results
                .iter()
                .map(|r| r.trimmed_codes.first().copied().flatten())
                .collect(),
            final_drift: results
                .iter()
                .map(|r| r.drift.last().and_then(|d| d.all))
                .collect(),
            max_drift: results
                .iter()
                .map(|r| r.drift.iter().filter_map(|d| d.all).reduce(f64::max))
                .collect(),
            accuracy: results.iter().map(|r| r.accuracy.clone()).collect(),
            raw_test_accuracy: results
                .iter()
                .map(|r| r.raw_test_accuracy.clone())
                .collect(),
            decoded_test_accuracy: results
                .iter()
                .map(|r| r.decoded_test_accuracy.clone())
                .collect(),
            decoded_replay_share: results
                .iter()
                .map(|r| r.decoded_replay_share.clone())
                .collect(),
            reencoded: results.iter().map(|r| r.reencoded).collect(),
            admitted: results.iter().map(|r| r.admitted).collect(),
        }
    }

    /// Whether this is an AQM cell of `arm`.
    pub fn is_aqm(&self, arm: Arm) -> bool {
        self.job.method == Method::Aqm && self.job.arm == arm
    }

    /// Mean stored samples at the end over seeds.
    pub fn mean_stored(&self) -> f64 {
        self.stored_at_end.iter().sum::<usize>() as f64 / self.stored_at_end.len().max(1) as f64
    }

    /// The raw-versus-decoded rows over task ends (AQM cells with those matrices).
    pub fn gap_rows(&self) -> Vec<GapRow> {
        let tasks = self.raw_test_accuracy.first().map_or(0, Vec::len);
        (0..tasks).map(|i| self.gap_row(i)).collect()
    }

    fn gap_row(&self, i: usize) -> GapRow {
        let mean = |v: Vec<f64>| Stats::of(&v).map(|s| s.mean);
        let pick = |m: &[Vec<Vec<Option<f64>>>], range: std::ops::Range<usize>| -> Vec<f64> {
            m.iter()
                .filter_map(|s| mean_of(s.get(i)?, range.clone()))
                .collect()
        };
        // decoded − raw per seed where both were measured.
        let paired = |range: std::ops::Range<usize>| -> Vec<f64> {
            self.raw_test_accuracy
                .iter()
                .zip(&self.decoded_test_accuracy)
                .filter_map(|(raw, dec)| {
                    Some(
                        mean_of(dec.get(i)?, range.clone())? - mean_of(raw.get(i)?, range.clone())?,
                    )
                })
                .collect()
        };
        let decoded_old = pick(&self.decoded_test_accuracy, 0..i);
        GapRow {
            after_task: i,
            raw_old: mean(pick(&self.raw_test_accuracy, 0..i)),
            decoded_old: mean(decoded_old.clone()),
            gap_old: mean(paired(0..i)),
            raw_current: mean(pick(&self.raw_test_accuracy, i..i + 1)),
            decoded_current: mean(pick(&self.decoded_test_accuracy, i..i + 1)),
            gap_current: mean(paired(i..i + 1)),
            decoded_replay_share: mean(
                self.decoded_replay_share
                    .iter()
                    .filter_map(|s| s.get(i).copied().flatten())
                    .collect(),
            ),
            seeds_decoded: decoded_old.len(),
        }
    }

    /// Per seed, decoded minus raw accuracy on the earlier tasks' test images at the end.
    pub fn final_old_gap(&self) -> Vec<Option<f64>> {
        self.raw_test_accuracy
            .iter()
            .zip(&self.decoded_test_accuracy)
            .map(|(raw, dec)| {
                let last = raw.len().checked_sub(1)?;
                Some(mean_of(&dec[last], 0..last)? - mean_of(&raw[last], 0..last)?)
            })
            .collect()
    }

    /// Per seed, the mean decoded share of replay over the tasks that had replay.
    pub fn mean_decoded_share(&self) -> Vec<Option<f64>> {
        self.decoded_replay_share
            .iter()
            .map(|s| Stats::of(&s.iter().flatten().copied().collect::<Vec<_>>()).map(|s| s.mean))
            .collect()
    }
}

/// Raw versus decoded test accuracy after one task, mean over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GapRow {
    /// The task just finished.
    pub after_task: usize,
    /// Accuracy on the raw test images of the earlier tasks.
    pub raw_old: Option<f64>,
    /// The same on test images through the frozen module (seeds where it froze).
    pub decoded_old: Option<f64>,
    /// Decoded minus raw on the earlier tasks, over the seeds with both.
    pub gap_old: Option<f64>,
    /// Accuracy on the raw test images of the task just finished.
    pub raw_current: Option<f64>,
    /// The same through the frozen module.
    pub decoded_current: Option<f64>,
    /// Decoded minus raw on the task just finished, over the seeds with both.
    pub gap_current: Option<f64>,
    /// Mean share of decoded images among the replay images of the task's classifier steps.
    pub decoded_replay_share: Option<f64>,
    /// Seeds with decoded measurements after this task.
    pub seeds_decoded: usize,
}

/// Pearson correlation of paired values (None for fewer than three pairs or no spread).
pub fn correlation(pairs: &[(f64, f64)]) -> Option<f64> {
    if pairs.len() < 3 {
        return None;
    }
    let n = pairs.len() as f64;
    let (mx, my) = (
        pairs.iter().map(|p| p.0).sum::<f64>() / n,
        pairs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for &(x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx).powi(2);
        syy += (y - my).powi(2);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Per-seed differences `a − b` over the seeds both cells ran, as statistics (paired by seed:
/// the same seed streams the same images in the same order).
pub fn paired_difference(a: &Cell, b: &Cell) -> Option<Stats> {
    let diffs: Vec<f64> = a
        .seeds
        .iter()
        .zip(&a.final_accuracy)
        .filter_map(|(s, &x)| {
            let k = b.seeds.iter().position(|t| t == s)?;
            Some(x - b.final_accuracy[k])
        })
        .collect();
    Stats::of(&diffs)
}
