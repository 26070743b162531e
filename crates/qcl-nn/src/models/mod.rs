//! Models built from [`crate::layers`]: ResNets (ResNet-20 and GEM's reduced ResNet-18 for any
//! input size and channel count), the small CNN classifier of AQM's experiment, and the AQM-style
//! VQ autoencoder used as a training benchmark.

mod resnet;
mod small_cnn;
mod vq_autoencoder;

pub use resnet::{ResNet, ResNetConfig};
pub use small_cnn::SmallCnn;
pub use vq_autoencoder::{VqAutoencoder, VqAutoencoderOutput};
