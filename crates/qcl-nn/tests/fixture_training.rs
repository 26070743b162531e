//! End to end on real data: the small CNN trained by `TrainLoop` on the committed
//! Fashion-MNIST fixture (100 training and 20 test images per class) learns well above chance.

use std::path::PathBuf;

use candle_core::{DType, Device};
use qcl_data::{BatchConfig, BatchOrder, Dataset, Normalization, SplitDataset};
use qcl_nn::layers::Module;
use qcl_nn::models::SmallCnn;
use qcl_nn::train::{Step, TrainConfig, TrainLoop, TrainTask};
use qcl_nn::ParamStore;
use qcl_tensor::{Result, Seed};

mod common;

struct Classification {
    net: SmallCnn,
    data: SplitDataset,
    batches: Vec<(candle_core::Tensor, candle_core::Tensor)>,
}

const NORMALIZATION: Normalization = Normalization::UnitInterval;

fn accuracy(net: &SmallCnn, data: &Dataset) -> Result<f64> {
    let (x, y) = data.to_tensors(NORMALIZATION, &Device::Cpu)?;
    let predicted = net.forward(&x)?.argmax(1)?;
    let correct = predicted
        .eq(&y)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(correct / data.len() as f64)
}

impl TrainTask for Classification {
    fn start_epoch(&mut self, _epoch: usize, seed: Seed) -> Result<usize> {
        let options = BatchConfig {
            batch_size: 50,
            order: BatchOrder::Shuffled(seed),
            normalization: NORMALIZATION,
            drop_last: false,
        };
        self.batches = self
            .data
            .train
            .batches(options, &Device::Cpu)?
            .map(|b| b.map(|b| (b.images, b.labels)))
            .collect::<Result<_>>()?;
        Ok(self.batches.len())
    }

    fn train_step(&mut self, step: &mut Step<'_>) -> Result<f64> {
        let (x, y) = &self.batches[step.batch];
        let loss = candle_nn::loss::cross_entropy(&self.net.forward(x)?, y)?;
        step.optimizer.backward_step(&loss)?;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    fn evaluate(&mut self, _epoch: usize) -> Result<Option<f64>> {
        Ok(Some(accuracy(&self.net, &self.data.test)?))
    }
}

#[test]
fn small_cnn_learns_fashion_mnist_fixture() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist.safetensors");
    let data = SplitDataset::load(path).unwrap();
    let store = ParamStore::new(11);
    let net = SmallCnn::new(&store.root(&Device::Cpu), 1, 28, 10).unwrap();
    let chance = accuracy(&net, &data.test).unwrap();
    let mut sgd = common::momentum_sgd(&store);
    let config = TrainConfig {
        epochs: 3,
        seed: Seed(4),
        ..TrainConfig::default()
    };
    let mut task = Classification {
        net,
        data,
        batches: Vec::new(),
    };
    let report = TrainLoop::new(config, &store, &mut sgd)
        .unwrap()
        .run(&mut task)
        .unwrap();
    let accuracies: Vec<f64> = report.history.iter().map(|r| r.metric.unwrap()).collect();
    let losses: Vec<f64> = report.history.iter().map(|r| r.train_loss).collect();
    eprintln!("chance {chance:.3}, test accuracy per epoch {accuracies:?}, loss {losses:?}");
    // 10 classes: chance is about 0.1; three epochs over 1,000 images reach well above it.
    assert!(chance < 0.3, "untrained accuracy {chance}");
    assert!(
        accuracies[2] > 0.6,
        "test accuracy per epoch {accuracies:?}"
    );
    assert!(losses[2] < losses[0], "train loss per epoch {losses:?}");
}
