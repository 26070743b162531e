use candle_core::Tensor;
use qcl_tensor::{Error, Result};

use super::Module;
use crate::{Init, ParamPath};

/// Fully connected layer `y = x Wᵀ + b` with `W [out, in]`, initialised as PyTorch does
/// (`U(±1/√in)` for both).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_nn::layers::{Linear, Module};
/// let store = qcl_nn::ParamStore::new(0);
/// let fc = Linear::new(&store.root(&Device::Cpu).pp("fc"), 64, 10, true)?;
/// assert_eq!(fc.forward(&Tensor::zeros((5, 64), DType::F32, &Device::Cpu)?)?.dims(), &[5, 10]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from `in_features` to `out_features`, parameters `weight` (and `bias`).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero features or a name clash in the store.
    pub fn new(
        path: &ParamPath,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        if in_features == 0 || out_features == 0 {
            return Err(Error::invalid_parameter(
                "linear",
                format!("features must be positive, got {in_features}→{out_features}"),
            ));
        }
        let init = Init::KaimingUniform {
            fan_in: in_features,
        };
        let weight = path.param("weight", (out_features, in_features), init)?;
        let bias = if bias {
            Some(path.param("bias", out_features, init)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Linear {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (out_f, in_f) = self.weight.dims2()?;
        if x.rank() != 2 || x.dim(1)? != in_f {
            return Err(Error::ShapeMismatch {
                context: "linear input".into(),
                expected: format!("[batch, {in_f}]"),
                actual: x.dims().to_vec(),
            });
        }
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.reshape((1, out_f))?)?),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.apply(x)?)
    }
}
