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
        // (raw, decoded) per seed where both were measured (the seeds whose module had frozen
        // by the end of task i), so that raw, decoded and their gap speak of the same seeds.
        let paired = |range: std::ops::Range<usize>| -> Vec<(f64, f64)> {
            self.raw_test_accuracy
                .iter()
                .zip(&self.decoded_test_accuracy)
                .filter_map(|(raw, dec)| {
                    Some((
                        mean_of(raw.get(i)?, range.clone())?,
                        mean_of(dec.get(i)?, range.clone())?,
                    ))
                })
                .collect()
        };
        let raw = |p: &[(f64, f64)]| mean(p.iter().map(|x| x.0).collect());
        let decoded = |p: &[(f64, f64)]| mean(p.iter().map(|x| x.1).collect());
        let gap = |p: &[(f64, f64)]| mean(p.iter().map(|x| x.1 - x.0).collect());
        let (old, current) = (paired(0..i), paired(i..i + 1));
        GapRow {
            after_task: i,
            raw_old_all_seeds: mean(pick(&self.raw_test_accuracy, 0..i)),
            raw_old: raw(&old),
            decoded_old: decoded(&old),
            gap_old: gap(&old),
            raw_current: raw(&current),
            decoded_current: decoded(&current),
            gap_current: gap(&current),
            decoded_replay_share: mean(
                self.decoded_replay_share
                    .iter()
                    .filter_map(|s| s.get(i).copied().flatten())
                    .collect(),
            ),
            seeds_decoded: old.len().max(current.len()),
        }
    }

    /// Per seed, decoded minus raw accuracy on the earlier tasks' test images at the end.
    pub fn final_old_gap(&self) -> Vec<Option<f64>> {
        self.raw_test_accuracy
            .iter()
            .zip(&self.decoded_test_accuracy)
            .map(|(raw, dec)| {
                let last = raw.len().checked_sub(1)?;
                Some(mean_of(dec.get(last)?, 0..last)? - mean_of(raw.get(last)?, 0..last)?)
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

/// Raw versus decoded test accuracy after one task, mean over seeds. Every raw, decoded and gap
/// figure but `raw_old_all_seeds` is over the same seeds: those with decoded measurements
/// (whose module had frozen by then), so that `gap = decoded − raw` holds within a row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GapRow {
    /// The task just finished.
    pub after_task: usize,
    /// Accuracy on the raw test images of the earlier tasks, over every seed.
    pub raw_old_all_seeds: Option<f64>,
    /// Accuracy on the raw test images of the earlier tasks (seeds with decoded ones).
    pub raw_old: Option<f64>,
    /// The same on test images through the frozen module.
    pub decoded_old: Option<f64>,
    /// Decoded minus raw on the earlier tasks.
    pub gap_old: Option<f64>,
    /// Accuracy on the raw test images of the task just finished (seeds with decoded ones).
    pub raw_current: Option<f64>,
    /// The same through the frozen module.
    pub decoded_current: Option<f64>,
    /// Decoded minus raw on the task just finished.
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

/// Per-seed differences `a − b` of the final accuracy over the seeds both cells ran, as
/// statistics (paired by seed: the same seed streams the same images in the same order);
/// `None` when they have no seed in common.
pub fn paired_difference(a: &Cell, b: &Cell) -> Option<Stats> {
    paired_by_seed(a, b, |c, k| c.final_accuracy.get(k).copied())
}

/// Per-seed differences `value(a, seed) − value(b, seed)` over the seeds both cells ran and
/// both have a value for (`value` takes a cell and the seed's index in it), as statistics;
/// `None` when there is no such seed.
pub fn paired_by_seed(
    a: &Cell,
    b: &Cell,
    value: impl Fn(&Cell, usize) -> Option<f64>,
) -> Option<Stats> {
    let diffs: Vec<f64> = a
        .seeds
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let k = b.seeds.iter().position(|t| t == s)?;
            Some(value(a, i)? - value(b, k)?)
        })
        .collect();
    Stats::of(&diffs)
}

/// The mean accuracy on the earlier tasks after the last one, `mean_{j<T−1} R[T−1][j]`, of an
/// accuracy matrix (None without earlier tasks or with one missing).
pub fn old_task_accuracy(matrix: &[Vec<Option<f64>>]) -> Option<f64> {
    let last = matrix.len().checked_sub(1)?;
    mean_of(matrix.get(last)?, 0..last)
}

/// The two-sided 5 % critical value of Pearson's correlation over `n` pairs (`n ≥ 3`): the `r`
/// with `P(|R| ≥ r) = 0.05` for `n` independent normal pairs, from the t distribution with
/// `n − 2` degrees of freedom (`P(|R| ≥ r) = I_{1−r²}((n−2)/2, 1/2)`, solved by bisection).
/// 0.997 for 3 pairs, 0.878 for 5, 0.632 for 10.
pub fn critical_correlation(n: usize) -> Option<f64> {
    if n < 3 {
        return None;
    }
    let half_df = (n - 2) as f64 / 2.0;
    let p = |r: f64| regularized_beta(half_df, 0.5, 1.0 - r * r);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if p(mid) > 0.05 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// `ln Γ(x)` for `x ≥ 0.5` (Lanczos, g = 7, nine terms; relative error near 1e-15).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta function `I_x(a, b)` (continued fraction, modified Lentz).
fn regularized_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function (Numerical Recipes' `betacf`).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..300 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / guard(1.0 + aa * d);
        c = guard(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / guard(1.0 + aa * d);
        c = guard(1.0 + aa / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}
