//! CentroidSGD: momentum SGD of shared centroids ("And the bit goes down", Stock et al.,
//! ICLR 2020).

use candle_core::{Device, Tensor, Var};
use qcl_tensor::{Error, Result};

/// CentroidSGD in centroid space: the gradient of the codebook (sum over members,
/// from autograd through the gather) is divided by the member counts (`mean_grad`), then
/// torch-SGD momentum with weight decay updates the centroids. Without counts it is plain
/// momentum SGD (used for the fused biases).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use qcl_wpq::CentroidSgd;
/// let c = Var::from_tensor(&Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &Device::Cpu)?)?;
/// let mut opt = CentroidSgd::new(Some(&[2, 1]), 0.1, 0.0, 0.0)?;
/// opt.step(&c, &Tensor::new(&[[2f32, 2.0], [1.0, 1.0]], &Device::Cpu)?)?;
/// assert_eq!(c.as_tensor().to_vec2::<f32>()?, vec![vec![0.9, 0.9], vec![1.9, 1.9]]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug)]
pub struct CentroidSgd {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    scale: Option<Tensor>,
    buffer: Option<Tensor>,
}

impl CentroidSgd {
    /// `counts`: members per centroid (row of the codebook), or `None` for plain SGD.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a centroid without members or a negative rate.
    pub fn new(
        counts: Option<&[usize]>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        if !(lr >= 0.0 && momentum >= 0.0 && weight_decay >= 0.0) {
            return Err(Error::invalid_parameter("lr", "rates must be >= 0"));
        }
        let scale = match counts {
            Some(c) => {
                if let Some(i) = c.iter().position(|&n| n == 0) {
                    return Err(Error::invalid_parameter(
                        "centroids",
                        format!("centroid {i} has no members (EM guarantees none)"),
                    ));
                }
                let inv: Vec<f32> = c.iter().map(|&n| 1.0 / n as f32).collect();
                Some(Tensor::from_vec(inv, (c.len(), 1), &Device::Cpu)?)
            }
            None => None,
        };
        Ok(CentroidSgd {
            lr,
            momentum,
            weight_decay,
            scale,
            buffer: None,
        })
    }

    /// Changes the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// One update of `param` with its gradient `grad` (same shape).
    ///
    /// # Errors
    /// A candle error for mismatched shapes.
    pub fn step(&mut self, param: &Var, grad: &Tensor) -> Result<()> {
        let mut g = match &self.scale {
            Some(s) => grad.broadcast_mul(s)?,
            None => grad.clone(),
        };
        let w = param.as_tensor();
        if self.weight_decay != 0.0 {
            g = (g + (w * self.weight_decay)?)?;
        }
        let buf = match &self.buffer {
            Some(b) if self.momentum != 0.0 => ((b * self.momentum)? + g)?,
            _ => g,
        };
        param.set(&(w - (&buf * self.lr)?)?)?;
        self.buffer = Some(buf);
        Ok(())
    }
}
