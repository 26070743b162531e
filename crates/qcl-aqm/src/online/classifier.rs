//! The classifier of the online loop (docs/methods/aqm.md § The online loop, § Classifier):
//! the small CNN of the Fashion-MNIST experiment or the reference code's reduced ResNet-18.

use candle_core::{Device, Tensor};
use qcl_data::Dataset;
use qcl_nn::layers::{Module, ModuleT};
use qcl_nn::models::{ResNet, ResNetConfig, SmallCnn};
use qcl_nn::ParamStore;
use qcl_tensor::{Error, Result};
use serde::{Deserialize, Serialize};

use super::through_frozen_stack;
use crate::stack::QStack;

/// The classifier trained online beside the modules (docs/methods/aqm.md § Classifier).
///
/// ```
/// use qcl_aqm::online::{Classifier, Method, OnlineConfig};
/// let mut config = OnlineConfig::fashion_mnist(Method::Aqm, 392_000);
/// assert_eq!(config.classifier, Classifier::SmallCnn); // the default, as before the option
/// config.classifier = Classifier::reference();
/// let json = serde_json::to_string(&config.classifier)?;
/// assert_eq!(json, r#"{"reduced-resnet18":{"nf":20}}"#);
/// assert_eq!(config.classifier.name(), "reduced ResNet-18 (nf 20)");
/// assert_eq!(config.classifier.tag(), "resnet18-nf20");
/// assert!(config.classifier.validate().is_ok());
/// assert!(Classifier::ReducedResNet18 { nf: 0 }.validate().is_err());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Classifier {
    /// `conv3×3 c→32, ReLU, maxpool 2, conv3×3 32→64, ReLU, maxpool 2, linear → 128, ReLU,
    /// linear 128 → classes` (qcl-nn's `SmallCnn`; square images).
    #[default]
    SmallCnn,
    /// GEM's reduced ResNet-18 with BatchNorm (the reference code's classifier): stem `nf`,
    /// four stages of two basic blocks of widths `nf·(1, 2, 4, 8)`, global average pooling
    /// (at 28×28 the last stage is 4×4, so it equals the reference's average pool of 4).
    /// BatchNorm uses batch statistics in classifier steps and running ones in evaluation.
    #[serde(rename = "reduced-resnet18")]
    ReducedResNet18 {
        /// Stem width (20 in the reference code); 1 to [`Classifier::MAX_NF`].
        nf: usize,
    },
}

impl Classifier {
    /// The largest accepted ResNet stem width.
    pub const MAX_NF: usize = 256;

    /// The reference code's classifier: the reduced ResNet-18 with `nf` 20.
    pub fn reference() -> Self {
        Classifier::ReducedResNet18 { nf: 20 }
    }

    /// The name used in results.
    pub fn name(self) -> String {
        match self {
            Classifier::SmallCnn => "small CNN".into(),
            Classifier::ReducedResNet18 { nf } => format!("reduced ResNet-18 (nf {nf})"),
        }
    }

    /// A short tag for file and piece names (`small-cnn`, `resnet18-nf20`).
    pub fn tag(self) -> String {
        match self {
            Classifier::SmallCnn => "small-cnn".into(),
            Classifier::ReducedResNet18 { nf } => format!("resnet18-nf{nf}"),
        }
    }

    /// Checks the setting.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a ResNet width of 0 or above [`Classifier::MAX_NF`].
    pub fn validate(self) -> Result<()> {
        match self {
            Classifier::ReducedResNet18 { nf } if nf == 0 || nf > Self::MAX_NF => {
                Err(Error::invalid_parameter(
                    "classifier.nf",
                    format!("must be in 1..={}, got {nf}", Self::MAX_NF),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A built classifier.
pub(super) enum Net {
    Small(SmallCnn),
    ResNet(Box<ResNet>),
}

impl Net {
    /// `kind` for `[C, H, W]` images and `num_classes` classes, parameters from `store`.
    pub(super) fn new(
        kind: Classifier,
        store: &ParamStore,
        shape: [usize; 3],
        num_classes: usize,
        device: &Device,
    ) -> Result<Self> {
        kind.validate()?;
        let root = store.root(device);
        Ok(match kind {
            Classifier::SmallCnn => {
                Net::Small(SmallCnn::new(&root, shape[0], shape[1], num_classes)?)
            }
            Classifier::ReducedResNet18 { nf } => Net::ResNet(Box::new(ResNet::new(
                &root,
                &ResNetConfig::reduced_resnet18(shape[0], num_classes, nf),
            )?)),
        })
    }

    /// Logits of `x`; `train` selects batch statistics (and updates the running ones) in
    /// BatchNorm layers.
    pub(super) fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match self {
            Net::Small(net) => net.forward(x)?,
            Net::ResNet(net) => net.forward_t(x, train)?,
        })
    }
}

/// Test accuracy of `net` (evaluation mode) on `data`; with a stack, on the images passed
/// through it ([`through_frozen_stack`]).
pub(super) fn accuracy(
    net: &Net,
    data: &Dataset,
    mut stack: Option<&mut QStack>,
    device: &Device,
) -> Result<f64> {
    let mut correct = 0usize;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(500) {
        let (x, y) = data.tensors_at(chunk, qcl_data::Normalization::Symmetric, device)?;
        let x = match stack.as_deref_mut() {
            Some(stack) => through_frozen_stack(stack, &x)?,
            None => x,
        };
        let pred: Vec<u32> = net.logits(&x, false)?.argmax(1)?.to_vec1()?;
        let y: Vec<u32> = y.to_vec1()?;
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}
