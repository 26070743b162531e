//! Helpers shared by the integration tests.

use qcl_nn::optim::{Sgd, SgdConfig};
use qcl_nn::ParamStore;

/// SGD with learning rate 0.05 and momentum 0.9 over the store's trainable parameters: what the
/// tests that train a small CNN use.
pub fn momentum_sgd(store: &ParamStore) -> Sgd {
    let config = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    Sgd::new(store.trainable(), config).unwrap()
}
