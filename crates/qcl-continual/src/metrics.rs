//! The accuracy matrix of a continual-learning run and the metrics computed from it.
//!
//! `a[i][j]` is the test accuracy on task `j` after training on tasks `0..=i`, a fraction in
//! `[0, 1]`; T is the number of tasks. Entries may be missing (a run that evaluates only the
//! tasks seen so far fills the lower triangle `j ≤ i`); each metric names the entries it needs
//! and returns an error when one is missing.
//!
//! | metric | formula | source |
//! |---|---|---|
//! | [average accuracy](AccuracyMatrix::average_accuracy) | `ACC = 1/T Σ_j a[T−1][j]` | Lopez-Paz & Ranzato 2017; LifeQuant |
//! | [average incremental accuracy](AccuracyMatrix::average_incremental_accuracy) | `1/T Σ_i (1/(i+1) Σ_{j≤i} a[i][j])` | Rebuffi et al. 2017 |
//! | [backward transfer](AccuracyMatrix::backward_transfer) | `BWT = 1/(T−1) Σ_{j<T−1} (a[T−1][j] − a[j][j])` | Lopez-Paz & Ranzato 2017 |
//! | [forward transfer](AccuracyMatrix::forward_transfer) | `FWT = 1/(T−1) Σ_{j≥1} (a[j−1][j] − b_j)` | Lopez-Paz & Ranzato 2017 |
//! | [forgetting](AccuracyMatrix::forgetting) | `FGT = 1/(T−1) Σ_{j<T−1} (max_{l∈[j,T−2]} a[l][j] − a[T−1][j])` | Chaudhry et al. 2018; LifeQuant |
//!
//! `b_j` is the accuracy on task `j` of the randomly initialised model. Since the maximum in
//! the forgetting includes `l = j`, `FGT ≥ −BWT` always, with equality when no task's accuracy
//! ever rose above its value right after it was learned. Forgetting is not clamped: a task
//! whose final accuracy beats every earlier one contributes a negative term, as in the
//! original definition. LifeQuant's ACC and FGT are these two (docs/methods/lifequant.md
//! § Metrics).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

/// The accuracy matrix `a[i][j]`: accuracy on task `j` after training task `i` (see the
/// [module documentation](self) for the metrics).
///
/// Serialised as `{"accuracy": [[a00, a01, …], …]}` with `null` for a missing entry; reading
/// one back validates it.
///
/// ```
/// use qcl_continual::AccuracyMatrix;
/// // Lower triangle: row i holds the accuracies on tasks 0..=i after training task i.
/// let a = AccuracyMatrix::from_lower_triangle(vec![
///     vec![0.9],
///     vec![0.6, 0.8],
///     vec![0.5, 0.7, 0.9],
/// ])?;
/// assert!((a.average_accuracy()? - 0.7).abs() < 1e-12);
/// assert!((a.backward_transfer()? - (-0.25)).abs() < 1e-12); // ((0.5−0.9) + (0.7−0.8)) / 2
/// assert!((a.forgetting()? - 0.25).abs() < 1e-12);
/// let json = a.to_json();
/// assert_eq!(AccuracyMatrix::from_json(&json)?, a);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MatrixJson", into = "MatrixJson")]
pub struct AccuracyMatrix {
    rows: Vec<Vec<Option<f64>>>,
}

/// The serialised form, checked by `TryFrom` on the way in.
#[derive(Serialize, Deserialize)]
struct MatrixJson {
    accuracy: Vec<Vec<Option<f64>>>,
}

impl TryFrom<MatrixJson> for AccuracyMatrix {
    type Error = Error;

    fn try_from(json: MatrixJson) -> Result<Self> {
        AccuracyMatrix::from_rows(json.accuracy)
    }
}

impl From<AccuracyMatrix> for MatrixJson {
    fn from(matrix: AccuracyMatrix) -> Self {
        MatrixJson {
            accuracy: matrix.rows,
        }
    }
}

impl AccuracyMatrix {
    /// A `num_tasks × num_tasks` matrix with every entry missing, to be filled with
    /// [`set`](Self::set) during a run.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no task.
    pub fn new(num_tasks: usize) -> Result<Self> {
        if num_tasks == 0 {
            return Err(Error::EmptyInput("accuracy matrix of no task".into()));
        }
        Ok(AccuracyMatrix {
            rows: vec![vec![None; num_tasks]; num_tasks],
        })
    }

    /// A matrix from its rows; `None` marks a missing entry.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for no row; [`Error::ShapeMismatch`] unless the rows form a square;
    /// [`Error::NonFinite`] for a NaN or infinity; [`Error::InvalidParameter`] for an accuracy
    /// outside `[0, 1]`.
    pub fn from_rows(rows: Vec<Vec<Option<f64>>>) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::EmptyInput("accuracy matrix of no task".into()));
        }
        let t = rows.len();
        for (i, row) in rows.iter().enumerate() {
            if row.len() != t {
                return Err(Error::ShapeMismatch {
                    context: format!("row {i} of the accuracy matrix"),
                    expected: format!("[{t}]"),
                    actual: vec![row.len()],
                });
            }
            for (j, value) in row.iter().enumerate() {
                if let Some(value) = *value {
                    check_accuracy(i, j, value, t)?;
                }
            }
        }
        Ok(AccuracyMatrix { rows })
    }

    /// A complete matrix (every entry present) from its rows.
    ///
    /// # Errors
    /// As [`from_rows`](Self::from_rows).
    pub fn from_full(rows: Vec<Vec<f64>>) -> Result<Self> {
        Self::from_rows(
            rows.into_iter()
                .map(|row| row.into_iter().map(Some).collect())
                .collect(),
        )
    }

    /// A matrix whose row `i` holds `a[i][0..=i]` (the entries above the diagonal missing), as
    /// a run produces that evaluates only the tasks seen so far.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless row `i` has `i + 1` entries; otherwise as
    /// [`from_rows`](Self::from_rows).
    pub fn from_lower_triangle(rows: Vec<Vec<f64>>) -> Result<Self> {
        let t = rows.len();
        let mut full = Vec::with_capacity(t);
        for (i, row) in rows.into_iter().enumerate() {
            if row.len() != i + 1 {
                return Err(Error::ShapeMismatch {
                    context: format!("row {i} of the lower-triangular accuracy matrix"),
                    expected: format!("[{}]", i + 1),
                    actual: vec![row.len()],
                });
            }
            let mut padded: Vec<Option<f64>> = row.into_iter().map(Some).collect();
            padded.resize(t, None);
            full.push(padded);
        }
        Self::from_rows(full)
    }

    /// Records the accuracy on task `task` after training task `after_task`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task index out of range or an accuracy outside
    /// `[0, 1]`; [`Error::NonFinite`] for a NaN or infinity.
    pub fn set(&mut self, after_task: usize, task: usize, accuracy: f64) -> Result<()> {
        let t = self.num_tasks();
        if after_task >= t || task >= t {
            return Err(Error::invalid_parameter(
                "task",
                format!("entry a[{after_task}][{task}] is outside a {t}-task matrix"),
            ));
        }
        check_accuracy(after_task, task, accuracy, t)?;
        self.rows[after_task][task] = Some(accuracy);
        Ok(())
    }

    /// The accuracy on task `task` after training task `after_task`, if recorded.
    pub fn get(&self, after_task: usize, task: usize) -> Option<f64> {
        self.rows.get(after_task)?.get(task).copied().flatten()
    }

    /// Number of tasks T.
    pub fn num_tasks(&self) -> usize {
        self.rows.len()
    }

    /// The rows, `None` for a missing entry.
    pub fn rows(&self) -> &[Vec<Option<f64>>] {
        &self.rows
    }

    /// Average accuracy after the last task, `ACC = 1/T Σ_j a[T−1][j]` (Lopez-Paz & Ranzato
    /// 2017; LifeQuant's ACC is the same, docs/methods/lifequant.md § Metrics).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if an entry of the last row is missing.
    pub fn average_accuracy(&self) -> Result<f64> {
        self.average_accuracy_after(self.num_tasks() - 1)
    }

    /// Average accuracy over the tasks seen after training task `i`,
    /// `1/(i+1) Σ_{j≤i} a[i][j]`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `i ≥ T` or a missing entry.
    pub fn average_accuracy_after(&self, i: usize) -> Result<f64> {
        if i >= self.num_tasks() {
            return Err(Error::invalid_parameter(
                "after_task",
                format!("task {i} is outside a {}-task matrix", self.num_tasks()),
            ));
        }
        let sum = (0..=i)
            .map(|j| self.need(i, j, "average accuracy"))
            .sum::<Result<f64>>()?;
        Ok(sum / (i + 1) as f64)
    }

    /// Average incremental accuracy (Rebuffi et al. 2017), the mean over `i` of
    /// [`average_accuracy_after(i)`](Self::average_accuracy_after):
    /// `1/T Σ_i 1/(i+1) Σ_{j≤i} a[i][j]`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if an entry of the lower triangle is missing.
    pub fn average_incremental_accuracy(&self) -> Result<f64> {
        let t = self.num_tasks();
        let sum = (0..t)
            .map(|i| self.average_accuracy_after(i))
            .sum::<Result<f64>>()?;
        Ok(sum / t as f64)
    }

    /// Backward transfer (Lopez-Paz & Ranzato 2017),
    /// `BWT = 1/(T−1) Σ_{j<T−1} (a[T−1][j] − a[j][j])`: negative when learning later tasks
    /// lowered the accuracy on earlier ones.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for fewer than two tasks or a missing diagonal or last-row
    /// entry.
    pub fn backward_transfer(&self) -> Result<f64> {
        let t = self.at_least_two_tasks("backward transfer")?;
        let sum = (0..t - 1)
            .map(|j| Ok(self.need(t - 1, j, "BWT")? - self.need(j, j, "BWT")?))
            .sum::<Result<f64>>()?;
        Ok(sum / (t - 1) as f64)
    }

    /// Per-task forgetting (Chaudhry et al. 2018) after the last task, for `j < T−1`:
    /// `f_j = max_{l∈[j,T−2]} a[l][j] − a[T−1][j]`, the drop from the best accuracy task `j`
    /// had once learned. The maximum runs from `l = j` as in LifeQuant's FGT
    /// (docs/methods/lifequant.md § Metrics; before task `j` is learned its accuracy measures
    /// nothing learned).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for fewer than two tasks or a missing lower-triangle entry.
    pub fn forgetting_per_task(&self) -> Result<Vec<f64>> {
        let t = self.at_least_two_tasks("forgetting")?;
        (0..t - 1)
            .map(|j| {
                let best = (j..t - 1)
                    .map(|l| self.need(l, j, "forgetting"))
                    .try_fold(f64::NEG_INFINITY, |m, a| a.map(|a| m.max(a)))?;
                Ok(best - self.need(t - 1, j, "forgetting")?)
            })
            .collect()
    }

    /// Average forgetting `FGT = 1/(T−1) Σ_{j<T−1} f_j` (see
    /// [`forgetting_per_task`](Self::forgetting_per_task)); LifeQuant's FGT
    /// (docs/methods/lifequant.md § Metrics).
    ///
    /// # Errors
    /// As [`forgetting_per_task`](Self::forgetting_per_task).
    pub fn forgetting(&self) -> Result<f64> {
        let per_task = self.forgetting_per_task()?;
        Ok(per_task.iter().sum::<f64>() / per_task.len() as f64)
    }

    /// Forward transfer (Lopez-Paz & Ranzato 2017),
    /// `FWT = 1/(T−1) Σ_{j=1}^{T−1} (a[j−1][j] − b_j)`, where `random_init[j] = b_j` is the
    /// accuracy on task `j` of the model at random initialisation (`b_0` is not used).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for fewer than two tasks or a missing entry `a[j−1][j]`
    /// (the run must evaluate each task before training on it);
    /// [`Error::ShapeMismatch`] unless `random_init` has T entries; [`Error::NonFinite`] or
    /// [`Error::InvalidParameter`] for a reference accuracy that is not in `[0, 1]`.
    pub fn forward_transfer(&self, random_init: &[f64]) -> Result<f64> {
        let t = self.at_least_two_tasks("forward transfer")?;
        if random_init.len() != t {
            return Err(Error::ShapeMismatch {
                context: "reference accuracies b_j of the random model".into(),
                expected: format!("[{t}]"),
                actual: vec![random_init.len()],
            });
        }
        for (j, &b) in random_init.iter().enumerate() {
            check_value(&format!("b[{j}]"), b)?;
        }
        let sum = (1..t)
            .map(|j| Ok(self.need(j - 1, j, "FWT")? - random_init[j]))
            .sum::<Result<f64>>()?;
        Ok(sum / (t - 1) as f64)
    }

    /// Every metric the matrix supports: the accuracies always, BWT and forgetting from two
    /// tasks on, FWT when `random_init` is given.
    ///
    /// # Errors
    /// As the individual metrics (a missing lower-triangle entry; for FWT, a missing entry
    /// above the diagonal or bad reference accuracies).
    pub fn summary(&self, random_init: Option<&[f64]>) -> Result<MetricsSummary> {
        let two = self.num_tasks() >= 2;
        Ok(MetricsSummary {
            num_tasks: self.num_tasks(),
            average_accuracy: self.average_accuracy()?,
            average_incremental_accuracy: self.average_incremental_accuracy()?,
            backward_transfer: two.then(|| self.backward_transfer()).transpose()?,
            forgetting: two.then(|| self.forgetting()).transpose()?,
            forgetting_per_task: two.then(|| self.forgetting_per_task()).transpose()?,
            forward_transfer: match random_init {
                Some(b) if two => Some(self.forward_transfer(b)?),
                _ => None,
            },
        })
    }

    /// The matrix as JSON (`{"accuracy": [[…], …]}`, `null` for a missing entry).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("finite floats and options serialise")
    }

    /// Parses and validates [`to_json`](Self::to_json)'s output.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for text that is not such a JSON object, or a matrix that
    /// [`from_rows`](Self::from_rows) refuses.
    pub fn from_json(text: &str) -> Result<Self> {
        let json: MatrixJson = serde_json::from_str(text).map_err(|e| {
            Error::invalid_parameter("accuracy matrix JSON", format!("cannot parse: {e}"))
        })?;
        AccuracyMatrix::try_from(json)
    }

    /// Writes [`to_json`](Self::to_json) to `path` atomically.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save_json(&self, path: impl AsRef<Path>) -> Result<()> {
        qcl_tensor::write_atomic(path, self.to_json().as_bytes())
    }

    /// Draws the matrix as a heatmap PNG (rows: after training task i, top to bottom; columns:
    /// task evaluated; white = 0 to dark blue = 1, each cell labelled with its accuracy in
    /// percent, missing entries grey). Drawn to a temporary file next to `path`, then renamed.
    ///
    /// # Errors
    /// [`Error::Io`] if drawing or writing fails.
    pub fn save_heatmap_png(&self, path: impl AsRef<Path>, title: &str) -> Result<()> {
        let path = path.as_ref();
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::invalid_parameter("path", "names no file"))?
            .to_string_lossy();
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        // The extension must stay `.png`: plotters picks the encoder from it.
        let temp = path.with_file_name(format!(".{file_name}.tmp.png"));
        let drawn = self.draw_heatmap(&temp, title);
        let result = drawn
            .map_err(|e| Error::io(path, std::io::Error::other(e)))
            .and_then(|()| std::fs::rename(&temp, path).map_err(|e| Error::io(path, e)));
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    fn draw_heatmap(&self, file: &Path, title: &str) -> std::result::Result<(), String> {
        let t = self.num_tasks();
        let cell = 60u32;
        let size = (160 + cell * t as u32, 140 + cell * t as u32);
        let root = BitMapBackend::new(file, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        // Rows are drawn top to bottom, so y cell `t−1−i` holds row `i`. Asking for 2t+1 ticks
        // on the `0..t` axes gives ticks every 0.5; only the cell centres are labelled.
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t as f64, 0.0..t as f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(2 * t + 1)
            .y_labels(2 * t + 1)
            .x_label_formatter(&|v| tick_label(*v, None))
            .y_label_formatter(&|v| tick_label(*v, Some(t)))
            .x_desc("task evaluated")
            .y_desc("after training task")
            .draw()
            .map_err(|e| e.to_string())?;
        for i in 0..t {
            for j in 0..t {
                let y = (t - 1 - i) as f64;
                let x = j as f64;
                let value = self.rows[i][j];
                let fill = match value {
                    Some(a) => blend(a),
                    None => RGBColor(220, 220, 220),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        fill.filled(),
                    )))
                    .map_err(|e| e.to_string())?;
                if let Some(a) = value {
                    let colour = if a > 0.6 { WHITE } else { BLACK };
                    let style = ("sans-serif", 14)
                        .into_font()
                        .color(&colour)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    chart
                        .draw_series(std::iter::once(Text::new(
                            format!("{:.1}", 100.0 * a),
                            (x + 0.5, y + 0.5),
                            style,
                        )))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        root.present().map_err(|e| e.to_string())
    }

    fn need(&self, i: usize, j: usize, metric: &str) -> Result<f64> {
        self.rows[i][j].ok_or_else(|| {
            Error::invalid_parameter(
                "accuracy_matrix",
                format!("entry a[{i}][{j}] is missing, and {metric} needs it"),
            )
        })
    }

    fn at_least_two_tasks(&self, metric: &str) -> Result<usize> {
        let t = self.num_tasks();
        if t < 2 {
            return Err(Error::invalid_parameter(
                "accuracy_matrix",
                format!("{metric} needs at least two tasks, the matrix has {t}"),
            ));
        }
        Ok(t)
    }
}

/// The metrics of one accuracy matrix, for JSON output (see [`AccuracyMatrix::summary`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSummary {
    /// Number of tasks T.
    pub num_tasks: usize,
    /// `ACC`, average accuracy after the last task.
    pub average_accuracy: f64,
    /// Average incremental accuracy.
    pub average_incremental_accuracy: f64,
    /// `BWT` (`None` for a single task).
    pub backward_transfer: Option<f64>,
    /// `FGT` (`None` for a single task).
    pub forgetting: Option<f64>,
    /// `f_j` for `j < T−1` (`None` for a single task).
    pub forgetting_per_task: Option<Vec<f64>>,
    /// `FWT` (`None` without reference accuracies or for a single task).
    pub forward_transfer: Option<f64>,
}

fn check_value(what: &str, value: f64) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::NonFinite {
            context: what.to_string(),
            index: 0,
            value,
        });
    }
    if !(0.0..=1.0).contains(&value) {
        return Err(Error::invalid_parameter(
            what,
            format!("an accuracy is a fraction in [0, 1], got {value}"),
        ));
    }
    Ok(())
}

fn check_accuracy(i: usize, j: usize, value: f64, t: usize) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::NonFinite {
            context: "accuracy matrix".into(),
            index: i * t + j,
            value,
        });
    }
    check_value(&format!("a[{i}][{j}]"), value)
}

/// The label of a tick at a cell centre `k + 0.5`: `k`, or the row `t−1−k` counted from the
/// top when `rows` is given; other ticks stay unlabelled.
fn tick_label(position: f64, rows: Option<usize>) -> String {
    let k = position - 0.5;
    if k < -1e-9 || (k - k.round()).abs() > 1e-9 {
        return String::new();
    }
    let k = k.round() as usize;
    match rows {
        Some(t) if k < t => (t - 1 - k).to_string(),
        Some(_) => String::new(),
        None => k.to_string(),
    }
}

/// White (accuracy 0) to dark blue (accuracy 1).
fn blend(a: f64) -> RGBColor {
    let mix = |lo: f64, hi: f64| (lo + (hi - lo) * a.clamp(0.0, 1.0)).round() as u8;
    RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}
