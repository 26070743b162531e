use candle_core::Tensor;
use qcl_tensor::{Error, Result};

use crate::layers::{Conv2d, Conv2dConfig, Linear, Module};
use crate::ops::{max_pool2d, relu};
use crate::ParamPath;

/// The small CNN classifier AQM's experiment uses on a CPU budget (docs/methods/aqm.md): `conv3×3 c→32, ReLU, maxpool 2,
/// conv3×3 32→64, ReLU, maxpool 2, linear → 128, ReLU, linear 128 → classes` (same padding).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::Module;
/// let store = qcl_nn::ParamStore::new(0);
/// let net = qcl_nn::models::SmallCnn::new(&store.root(&Device::Cpu), 1, 28, 10)?;
/// assert_eq!(net.forward(&Tensor::zeros((3, 1, 28, 28), candle_core::DType::F32, &Device::Cpu)?)?.dims(), &[3, 10]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SmallCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    in_channels: usize,
    size: usize,
}

impl SmallCnn {
    /// For square `size × size` inputs with `in_channels` channels (size ≥ 4).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a size below 4 or zero channels/classes.
    pub fn new(
        path: &ParamPath,
        in_channels: usize,
        size: usize,
        num_classes: usize,
    ) -> Result<Self> {
        if size < 4 {
            return Err(Error::invalid_parameter(
                "size",
                format!("need at least 4, got {size}"),
            ));
        }
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let pooled = size / 4;
        Ok(Self {
            conv1: Conv2d::new(&path.pp("conv1"), in_channels, 32, 3, same)?,
            conv2: Conv2d::new(&path.pp("conv2"), 32, 64, 3, same)?,
            fc1: Linear::new(&path.pp("fc1"), 64 * pooled * pooled, 128, true)?,
            fc2: Linear::new(&path.pp("fc2"), 128, num_classes, true)?,
            in_channels,
            size,
        })
    }
}

impl Module for SmallCnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.apply(x)?)
    }
}

impl SmallCnn {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims()[1..] != [self.in_channels, self.size, self.size] {
            return Err(Error::ShapeMismatch {
                context: "small CNN input".into(),
                expected: format!("[n, {}, {}, {}]", self.in_channels, self.size, self.size),
                actual: x.dims().to_vec(),
            });
        }
        let h = max_pool2d(&self.conv1.forward_relu(x)?, 2, 2)?;
        let h = max_pool2d(&self.conv2.forward_relu(&h)?, 2, 2)?;
        let h = relu(&self.fc1.forward(&h.flatten_from(1)?)?)?;
        Ok(self.fc2.forward(&h)?)
    }
}
