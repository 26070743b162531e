//! Where the uniform 4-bit baseline's points go: the same teacher quantized with each choice of
//! [`UniformConfig`] changed one at a time, one layer at a time, and (with the fork's variants)
//! the BatchNorm teacher, so the results can say what costs the accuracy.

use anyhow::Result;
use qcl_data::SplitDataset;
use qcl_wpq::{
    evaluate, uniform_quantize_with, Model, UniformClip, UniformConfig, UniformLevels, UniformRange,
};
use serde::Serialize;

/// One uniform 4-bit configuration and its test accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct SchemeRow {
    /// What the row changes against the baseline.
    pub label: String,
    /// The configuration.
    pub config: UniformConfig,
    /// Test accuracy, %.
    pub accuracy: f64,
}

/// One layer quantized alone.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    /// The layer.
    pub layer: String,
    /// Test accuracy with only this layer at 4 bits (baseline scheme), %.
    pub accuracy: f64,
    /// Mean over output channels of `max |w| / std(w)`: how far the largest weight sits from
    /// the bulk, which sets how coarse a max-scaled grid is for the bulk.
    pub max_over_std: f64,
}

/// The diagnosis.
#[derive(Debug, Clone, Serialize)]
pub struct UniformDiagnosis {
    /// The teacher's test accuracy, %.
    pub teacher: f64,
    /// Whole-model 4-bit configurations; the first is the baseline of the runs table.
    pub schemes: Vec<SchemeRow>,
    /// Each quantized layer alone, baseline scheme.
    pub layers: Vec<LayerRow>,
    /// The BatchNorm teacher's accuracy and its baseline 4-bit accuracy, %.
    pub bn_teacher: Option<(f64, f64)>,
}

/// The configurations of the diagnosis, baseline first.
fn schemes() -> Vec<(&'static str, UniformConfig)> {
    let base = UniformConfig::default();
    vec![
        (
            "baseline: per channel, 2^b even levels, s = max",
            base.clone(),
        ),
        (
            "zero-centred levels (2^b − 1, zero included)",
            UniformConfig {
                levels: UniformLevels::ZeroCentred,
                ..base.clone()
            },
        ),
        (
            "MSE-optimal clipping of s",
            UniformConfig {
                clip: UniformClip::MseOptimal,
                ..base.clone()
            },
        ),
        (
            "zero-centred levels + MSE-optimal clipping",
            UniformConfig {
                levels: UniformLevels::ZeroCentred,
                clip: UniformClip::MseOptimal,
                ..base.clone()
            },
        ),
        (
            "one range per tensor",
            UniformConfig {
                range: UniformRange::PerTensor,
                ..base
            },
        ),
    ]
}

/// Mean over output channels of `max |w| / std(w)` of `layer`'s weight.
fn max_over_std(model: &Model, layer: &str) -> Result<f64> {
    let w = model.var(&format!("{layer}.weight"))?.as_tensor();
    let rows = w.dims()[0];
    let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let per = values.len() / rows;
    let ratios: Vec<f64> = values
        .chunks_exact(per)
        .map(|c| {
            let n = c.len() as f64;
            let mean = c.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = c
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let max = c.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
            if var > 0.0 {
                max / var.sqrt()
            } else {
                0.0
            }
        })
        .collect();
    Ok(ratios.iter().sum::<f64>() / ratios.len().max(1) as f64)
}

/// Measures the diagnosis on the first `limit` test images; `teacher_acc` is the teacher's
/// accuracy on them, already measured by the experiment.
pub fn diagnose(
    (teacher, teacher_acc): (&Model, f64),
    bn_teacher: Option<&Model>,
    data: &SplitDataset,
    limit: Option<usize>,
) -> Result<UniformDiagnosis> {
    let accuracy = |model: &Model, config: &UniformConfig| -> Result<f64> {
        Ok(evaluate(
            &uniform_quantize_with(model, config)?,
            &data.test,
            limit,
        )?)
    };
    let mut rows = Vec::new();
    for (label, config) in schemes() {
        let accuracy = accuracy(teacher, &config)?;
        rows.push(SchemeRow {
            label: label.into(),
            config,
            accuracy,
        });
    }
    let mut layers = Vec::new();
    for layer in teacher.arch().layers().into_iter().filter(|l| l.quantized) {
        let config = UniformConfig {
            only_layer: Some(layer.name.into()),
            ..UniformConfig::default()
        };
        layers.push(LayerRow {
            layer: layer.name.into(),
            accuracy: accuracy(teacher, &config)?,
            max_over_std: max_over_std(teacher, layer.name)?,
        });
    }
    let bn_teacher = match bn_teacher {
        Some(bn) => Some((
            evaluate(bn, &data.test, limit)?,
            accuracy(bn, &UniformConfig::default())?,
        )),
        None => None,
    };
    Ok(UniformDiagnosis {
        teacher: teacher_acc,
        schemes: rows,
        layers,
        bn_teacher,
    })
}

impl UniformDiagnosis {
    /// The Markdown section: both tables and what they show.
    pub fn markdown(&self) -> String {
        let t = self.teacher;
        let base = self.schemes[0].accuracy;
        let mut schemes = String::from(
            "| 4-bit configuration | test acc % | Δ vs teacher | Δ vs baseline |\n|---|---|---|---|\n",
        );
        for s in &self.schemes {
            schemes.push_str(&format!(
                "| {} | {:.2} | {:+.2} | {:+.2} |\n",
                s.label,
                s.accuracy,
                s.accuracy - t,
                s.accuracy - base
            ));
        }
        let mut layers = String::from(
            "| layer quantized alone (baseline scheme) | test acc % | Δ vs teacher | mean max|w|/std(w) per channel |\n|---|---|---|---|\n",
        );
        for l in &self.layers {
            layers.push_str(&format!(
                "| {} | {:.2} | {:+.2} | {:.2} |\n",
                l.layer,
                l.accuracy,
                l.accuracy - t,
                l.max_over_std
            ));
        }
        // Single changes only: the rows that differ from the baseline in one choice.
        let base_config = &self.schemes[0].config;
        let changes = |c: &UniformConfig| {
            usize::from(c.levels != base_config.levels)
                + usize::from(c.range != base_config.range)
                + usize::from(c.clip != base_config.clip)
        };
        let best = self.schemes[1..]
            .iter()
            .filter(|s| changes(&s.config) == 1)
            .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
            .expect("single-change schemes");
        let worst = self
            .layers
            .iter()
            .min_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
            .expect("quantized layers");
        let single: f64 = self.layers.iter().map(|l| t - l.accuracy).sum();
        let bn = self.bn_teacher.map_or(String::new(), |(teacher, q)| {
            format!(
                " The BatchNorm teacher ({teacher:.2} %) loses {:.2} points under the baseline \
                 4-bit scheme (weights quantized before BN, not folded into it).",
                teacher - q
            )
        });
        format!(
            "The baseline loses {:.2} points. Its single-layer losses add up to {single:.2} \
             points; the largest is {} ({:+.2}, mean max|w|/std {:.2}). The best single change \
             of the scheme is \"{}\": {:.2} %, {:+.2} points against the baseline.{bn}\n\n\
             {schemes}\n{layers}",
            t - base,
            worst.layer,
            worst.accuracy - t,
            worst.max_over_std,
            best.label,
            best.accuracy,
            best.accuracy - base,
        )
    }
}
