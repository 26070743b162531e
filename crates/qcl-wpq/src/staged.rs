//! Staged (sequential) calibration: each group of layers is calibrated on the inputs that the
//! partially compressed model produces, as GPTQ (Frantar et al., ICLR 2023) and "And the bit
//! goes down" (Stock et al., ICLR 2020) quantize layer after layer, so that a layer's codes
//! also correct the error of the layers before it.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use indicatif::ProgressBar;
use qcl_tensor::{Error, Result};

use crate::calibration::Calibration;
use crate::checkpoint::{Checkpoint, CompressedCheckpoint};
use crate::compressor::{compress_into, Compressed};
use crate::select::{Pattern, Plan};

/// Compresses every tensor of `checkpoint` that `plan` selects, stage by stage: the tensors of
/// stage `i` are those the plan selects whose name matches `stages[i]` and no earlier stage
/// (tensors matching no stage form a last stage). Before each stage `record` is called with a
/// `VarBuilder` of the current weights (the earlier stages' tensors decompressed, every other
/// tensor as it was) and a [`Calibration`] restricted to the stage's tensors, and runs the
/// user's forward pass on those weights to record their inputs; a stage whose methods need no
/// calibration records nothing. Seeds and reports are those of [`crate::compress_checkpoint`].
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use indicatif::ProgressBar;
/// use qcl_wpq::{compress_checkpoint_staged, Checkpoint, Method, Objective, Pattern, PqConfig,
///     Plan, Rule};
/// let dev = Device::Cpu;
/// let checkpoint = Checkpoint::from_tensors([
///     ("fc1.weight", Tensor::randn(0f32, 1.0, (16, 8), &dev)?),
///     ("fc2.weight", Tensor::randn(0f32, 1.0, (4, 16), &dev)?),
/// ])?;
/// let x = Tensor::randn(0f32, 1.0, (64, 8), &dev)?;
/// let method = Method::Pq(PqConfig::new(2, 8, Objective::ErrorFeedback));
/// let plan = Plan::new(vec![Rule::new("*.weight", method)?]);
/// let stages = [Pattern::new("fc1.*")?, Pattern::new("fc2.*")?];
/// let out = compress_checkpoint_staged(&checkpoint, &plan, &stages, |vb, calib| {
///     // The user's forward pass on the current weights, tapping each layer's input.
///     let fc1 = candle_nn::linear_no_bias(8, 16, vb.pp("fc1"))?;
///     calib.record("fc1.weight", &x)?;
///     let h = fc1.forward(&x)?.relu()?;
///     calib.record("fc2.weight", &h) // fc2's input comes from the compressed fc1
/// }, &ProgressBar::hidden())?;
/// assert_eq!(out.reports.len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] for a stage that selects no tensor of the plan; as
/// [`crate::compress_checkpoint`]; whatever `record` returns. Nothing is returned unless every
/// stage succeeds.
pub fn compress_checkpoint_staged<F>(
    checkpoint: &Checkpoint,
    plan: &Plan,
    stages: &[Pattern],
    mut record: F,
    bar: &ProgressBar,
) -> Result<Compressed>
where
    F: FnMut(VarBuilder<'static>, &Calibration) -> Result<()>,
{
    let chosen = plan.select(checkpoint.names())?;
    let mut by_stage: Vec<Vec<(String, usize)>> = vec![Vec::new(); stages.len() + 1];
    for (name, rule) in chosen.iter().cloned() {
        let stage = stages
            .iter()
            .position(|p| p.matches(&name))
            .unwrap_or(stages.len());
        by_stage[stage].push((name, rule));
    }
    if let Some(i) = (0..stages.len()).find(|&i| by_stage[i].is_empty()) {
        return Err(Error::invalid_parameter(
            "stages",
            format!(
                "stage {i} (`{}`) selects no tensor the plan compresses (or only tensors of \
                 earlier stages)",
                stages[i].as_str()
            ),
        ));
    }
    bar.set_length(chosen.len() as u64);
    bar.set_position(0);
    let mut out = CompressedCheckpoint::untouched(checkpoint);
    let mut reports = Vec::with_capacity(chosen.len());
    let seed = plan.seed;
    for stage in by_stage.into_iter().filter(|s| !s.is_empty()) {
        let calibration = Calibration::new().restricted_to(stage.iter().map(|(n, _)| n.clone()));
        if stage
            .iter()
            .any(|(_, rule)| plan.rules[*rule].method.needs_calibration())
        {
            bar.set_message("recording");
            record(out.var_builder(DType::F32, &Device::Cpu)?, &calibration)?;
        }
        for (name, rule) in stage {
            bar.set_message(name.clone());
            let method = &plan.rules[rule].method;
            reports.push(compress_into(&mut out, name, method, &calibration, seed)?);
            bar.inc(1);
        }
    }
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Compressed {
        checkpoint: out,
        reports,
    })
}
