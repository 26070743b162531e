//! Losses shared by the methods, each once, with one argument order: what is trained first,
//! what it is compared with second.

use candle_core::{Result, Tensor, D};

/// Knowledge distillation (Hinton et al., 2015):
/// `T² · mean_batch KL(softmax(teacher/T) ‖ softmax(student/T))` over the last dimension.
/// The teacher is detached (no gradient reaches it); the `T²` factor keeps the gradient's
/// scale independent of `T`. LwF uses it on the old classes' logits (T = 2), weight PQ's
/// layer-wise distillation at T = 1.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let z = Tensor::new(&[[1.0f32, 2.0, 0.5]], &Device::Cpu)?;
/// let same = qcl_nn::loss::distillation_loss(&z, &z, 2.0)?.to_scalar::<f32>()?;
/// assert!(same.abs() < 1e-6);
/// let other = Tensor::new(&[[0.0f32, 0.0, 3.0]], &Device::Cpu)?;
/// assert!(qcl_nn::loss::distillation_loss(&other, &z, 2.0)?.to_scalar::<f32>()? > 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// A candle error for logits of different shapes.
pub fn distillation_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let log_q = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let log_p = candle_nn::ops::log_softmax(&(teacher.detach() / temperature)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?
        .sum(D::Minus1)?
        .mean_all()?;
    kl * (temperature * temperature)
}
