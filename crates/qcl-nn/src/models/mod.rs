//! Models built from [`crate::layers`]: ResNets (ResNet-20 and GEM's reduced ResNet-18 for any
//! input size and channel count), the small CNN classifier of AQM's experiment, AQM's
//! convolutional encoder and decoder, and the VQ autoencoder built from them that serves as a
//! training benchmark.

mod conv_autoencoder;
mod resnet;
mod small_cnn;
mod vq_autoencoder;

pub use conv_autoencoder::{ConvDecoder, ConvEncoder};
pub use resnet::{ResNet, ResNetConfig};
pub use small_cnn::SmallCnn;
pub use vq_autoencoder::{VqAutoencoder, VqAutoencoderOutput};
