//! BaLL: hand-computed values, gradients against closed forms and finite differences, errors.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use qcl_continual::ball::cross_entropy;
use qcl_continual::{BallLoss, BallMode, ClassHistogram, ClassStatistics};
use qcl_data::{Dataset, ImageShape};
use qcl_tensor::Error;

const MODES: [BallMode; 3] = [
    BallMode::PaperLinearPrior,
    BallMode::CodeAdditive,
    BallMode::CodeMultiplicative,
];

fn logits() -> Tensor {
    Tensor::new(&[[1.0f64, 0.0, -1.0], [0.5, 0.5, 2.0]], &Device::Cpu).unwrap()
}

fn labels() -> Tensor {
    Tensor::new(&[1u32, 0], &Device::Cpu).unwrap()
}

fn stats() -> ClassStatistics {
    ClassStatistics::from_counts(&[3, 1, 0], 3).unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn statistics_by_hand() {
    let s = stats();
    assert_eq!(s.num_classes(), 3);
    assert_eq!(s.counts(), &[3.0, 1.0, 0.0]);
    assert_eq!(s.total(), 4.0);
    assert_eq!(s.num_present(), 2);
    assert_eq!(s.priors(), vec![0.75, 0.25, 0.0]);
    assert_eq!(s.weights(), &[0.4, 2.0 / 3.0, 1.0]);
    assert_eq!(s.linear_prior_factors(), &[0.5, -0.5, -1.0]);
    assert_eq!(
        s.coefficients(BallMode::PaperLinearPrior),
        &[0.5, -0.5, -1.0]
    );
    assert_eq!(s.coefficients(BallMode::CodeAdditive), s.weights());
    assert_eq!(s.coefficients(BallMode::CodeMultiplicative), s.weights());
    assert_eq!(BallMode::default(), BallMode::PaperLinearPrior);
    assert_eq!(BallLoss::default().mode, BallMode::PaperLinearPrior);
}

#[test]
fn adjusted_logits_by_hand() {
    // z + σ ⊙ a with a = (0.5, −0.5, −1), z + σ ⊙ w, and w ⊙ z, computed in f64 by hand.
    let expected = [
        (
            BallMode::PaperLinearPrior,
            [
                [1.332620477887411, -0.12236423552739882, -1.0900305731703805],
                [0.5771403864909431, 0.4228596135090569, 1.3085615459637725],
            ],
        ),
        (
            BallMode::CodeAdditive,
            [
                [1.2660963823099287, 0.16315231403653174, -0.9099694268296196],
                [0.5617123091927545, 0.6028538486545908, 2.6914384540362275],
            ],
        ),
        (
            BallMode::CodeMultiplicative,
            [[0.4, 0.0, -1.0], [0.2, 1.0 / 3.0, 2.0]],
        ),
    ];
    for (mode, rows) in expected {
        let got = BallLoss::new(mode)
            .adjusted_logits(&logits(), &stats())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (g, e) in got.iter().flatten().zip(rows.iter().flatten()) {
            assert!(close(*g, *e, 1e-14), "{mode:?}: {g} vs {e}");
        }
    }
}

#[test]
fn loss_by_hand() {
    let expected = [
        (BallMode::PaperLinearPrior, 1.552062769345556),
        (BallMode::CodeAdditive, 1.909177280138733),
        (BallMode::CodeMultiplicative, 1.5769551042485155),
    ];
    for (mode, value) in expected {
        let loss = BallLoss::new(mode)
            .loss(&logits(), &labels(), &stats())
            .unwrap();
        assert_eq!(loss.dims(), &[] as &[usize]);
        let loss = loss.to_scalar::<f64>().unwrap();
        assert!(close(loss, value, 1e-14), "{mode:?}: {loss} vs {value}");
    }
    let ce = cross_entropy(&logits(), &labels()).unwrap();
    assert!(close(
        ce.to_scalar::<f64>().unwrap(),
        1.6382935499228477,
        1e-14
    ));
}

#[test]
fn f32_logits_and_other_label_dtypes() {
    let z32 = logits().to_dtype(DType::F32).unwrap();
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let y = labels().to_dtype(dtype).unwrap();
        let loss = BallLoss::new(BallMode::CodeAdditive)
            .loss(&z32, &y, &stats())
            .unwrap();
        assert_eq!(loss.dtype(), DType::F32);
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(close(loss, 1.909177280138733, 1e-6), "{loss}");
    }
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// dL/dz in closed form: with g' = (softmax(z') − onehot(y)) / B,
/// additive (z' = z + a ⊙ σ): dL/dz_j = g'_j·(1 + a_j σ_j) − σ_j Σ_c a_c σ_c g'_c;
/// multiplicative (z' = a ⊙ z): dL/dz_j = a_j g'_j.
fn closed_form_gradient(mode: BallMode, z: &[Vec<f64>], y: &[usize], a: &[f64]) -> Vec<Vec<f64>> {
    let b = z.len() as f64;
    z.iter()
        .zip(y)
        .map(|(row, &label)| {
            let sigma = softmax(row);
            let adjusted: Vec<f64> = match mode {
                BallMode::CodeMultiplicative => row.iter().zip(a).map(|(z, a)| a * z).collect(),
                _ => (0..row.len()).map(|c| row[c] + a[c] * sigma[c]).collect(),
            };
            let mut g = softmax(&adjusted);
            g[label] -= 1.0;
            g.iter_mut().for_each(|v| *v /= b);
            match mode {
                BallMode::CodeMultiplicative => g.iter().zip(a).map(|(g, a)| a * g).collect(),
                _ => {
                    let inner: f64 = (0..row.len()).map(|c| a[c] * sigma[c] * g[c]).sum();
                    (0..row.len())
                        .map(|j| g[j] * (1.0 + a[j] * sigma[j]) - sigma[j] * inner)
                        .collect()
                }
            }
        })
        .collect()
}

#[test]
fn gradients_match_closed_form_and_finite_differences() {
    let rows = vec![
        vec![1.0, 0.0, -1.0, 0.3],
        vec![0.5, 0.5, 2.0, -0.7],
        vec![-2.0, 1.5, 0.1, 0.0],
    ];
    let y = [1usize, 0, 3];
    let labels = Tensor::new(&[1u32, 0, 3], &Device::Cpu).unwrap();
    let stats = ClassStatistics::from_counts(&[7, 2, 0, 1], 4).unwrap();
    for mode in MODES {
        let ball = BallLoss::new(mode);
        let var = Var::new(rows.clone(), &Device::Cpu).unwrap();
        let loss = ball.loss(&var, &labels, &stats).unwrap();
        let grad = loss.backward().unwrap();
        let grad = grad.get(&var).unwrap().to_vec2::<f64>().unwrap();
        let expected = closed_form_gradient(mode, &rows, &y, stats.coefficients(mode));
        let h = 1e-6;
        for i in 0..rows.len() {
            for j in 0..rows[0].len() {
                assert!(
                    close(grad[i][j], expected[i][j], 1e-12),
                    "{mode:?} [{i}][{j}]: autograd {} vs closed form {}",
                    grad[i][j],
                    expected[i][j]
                );
                let at = |delta: f64| {
                    let mut r = rows.clone();
                    r[i][j] += delta;
                    let z = Tensor::new(r, &Device::Cpu).unwrap();
                    ball.loss(&z, &labels, &stats)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (grad[i][j] - fd).abs() < 1e-7,
                    "{mode:?} [{i}][{j}]: autograd {} vs finite difference {fd}",
                    grad[i][j]
                );
            }
        }
    }
}

#[test]
fn multiplicative_with_unit_weights_has_the_cross_entropy_gradient() {
    let var = Var::new(&[[0.2f64, -1.0, 3.0], [1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
    let loss = BallLoss::new(BallMode::CodeMultiplicative)
        .loss_with_coefficients(&var, &y, &[1.0; 3])
        .unwrap();
    let ce = cross_entropy(&var, &y).unwrap();
    assert_eq!(gradient(&loss, &var), gradient(&ce, &var));
}

/// The gradient of a scalar `loss` with respect to the matrix `var`, by autograd.
fn gradient(loss: &Tensor, var: &Var) -> Vec<Vec<f64>> {
    loss.backward()
        .unwrap()
        .get(var)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

#[test]
fn bad_input_is_a_typed_error() {
    let ball = BallLoss::default();
    let z = logits();
    let y = labels();
    let s = stats();
    let cpu = Device::Cpu;
    // logits with another number of classes than the statistics
    let z4 = Tensor::zeros((2, 4), DType::F64, &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z4, &y, &s),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ball.adjusted_logits(&z4, &s),
        Err(Error::ShapeMismatch { .. })
    ));
    // logits not rank 2
    let z1 = Tensor::zeros(3, DType::F64, &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z1, &y, &s),
        Err(Error::ShapeMismatch { .. })
    ));
    // labels of another length, or not rank 1
    let y3 = Tensor::new(&[0u32, 1, 2], &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z, &y3, &s),
        Err(Error::ShapeMismatch { .. })
    ));
    let y2 = Tensor::new(&[[0u32], [1]], &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z, &y2, &s),
        Err(Error::ShapeMismatch { .. })
    ));
    // label ≥ C, negative label
    let big = Tensor::new(&[0u32, 3], &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z, &big, &s),
        Err(Error::InvalidParameter { .. })
    ));
    let negative = Tensor::new(&[0i64, -1], &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z, &negative, &s),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        cross_entropy(&z, &big),
        Err(Error::InvalidParameter { .. })
    ));
    // empty batch
    let z0 = Tensor::zeros((0, 3), DType::F64, &cpu).unwrap();
    let y0 = Tensor::zeros(0, DType::U32, &cpu).unwrap();
    assert!(matches!(ball.loss(&z0, &y0, &s), Err(Error::EmptyInput(_))));
    // dtypes: float labels, integer logits
    let yf = Tensor::new(&[0f32, 1.0], &cpu).unwrap();
    assert!(matches!(
        ball.loss(&z, &yf, &s),
        Err(Error::DTypeMismatch { .. })
    ));
    let zi = Tensor::zeros((2, 3), DType::U32, &cpu).unwrap();
    assert!(matches!(
        ball.loss(&zi, &y, &s),
        Err(Error::DTypeMismatch { .. })
    ));
    // coefficients of the wrong length
    assert!(matches!(
        ball.loss_with_coefficients(&z, &y, &[1.0; 2]),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn bad_counts_are_typed_errors() {
    assert!(matches!(
        ClassStatistics::from_counts(&[], 0),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        ClassStatistics::from_counts(&[1, 2], 3),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ClassStatistics::from_counts(&[0, 0, 0], 3),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        ClassStatistics::from_histogram(&[1.0, -0.5], 2),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        ClassStatistics::from_histogram(&[1.0, f64::NAN], 2),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        ClassStatistics::from_histogram(&[f64::INFINITY, 1.0], 2),
        Err(Error::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        ClassStatistics::from_histogram(&[f64::MAX, f64::MAX], 2),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        ClassHistogram::new(0),
        Err(Error::InvalidParameter { .. })
    ));
    let mut h = ClassHistogram::new(3).unwrap();
    h.add_labels(&[0, 1]).unwrap();
    assert!(matches!(
        h.add_labels(&[2, 3]),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        h.add_class_counts(&BTreeMap::from([(1, 4), (5, 1)])),
        Err(Error::InvalidParameter { .. })
    ));
    // a refused input leaves the counts as they were
    assert_eq!(h.counts(), &[1, 1, 0]);
    assert!(matches!(
        ClassHistogram::new(2).unwrap().statistics(),
        Err(Error::EmptyInput(_))
    ));
}

fn dataset(labels: Vec<u32>, num_classes: usize) -> Dataset {
    let shape = ImageShape {
        channels: 1,
        height: 1,
        width: 1,
    };
    let images = vec![0; labels.len()];
    let names = (0..num_classes).map(|c| c.to_string()).collect();
    Dataset::new("toy", shape, images, labels, names).unwrap()
}

#[test]
fn statistics_of_a_task_count_current_data_and_replay() {
    // D_t holds classes 2..5, the replay of earlier tasks classes 0..3.
    let current = dataset(vec![2, 2, 3, 4, 4, 4], 6);
    let r0 = dataset(vec![0, 1], 6);
    let r1 = dataset(vec![1, 2], 6);
    let stats = ClassStatistics::for_task(&current, [&r0, &r1], 6).unwrap();
    assert_eq!(stats.counts(), &[1.0, 2.0, 3.0, 1.0, 3.0, 0.0]);
    assert_eq!((stats.total(), stats.num_present()), (10.0, 5));
    // the same through the histogram, with the replay given as a buffer's class counts
    let mut h = ClassHistogram::new(6).unwrap();
    h.add_dataset(&current)
        .unwrap()
        .add_class_counts(&BTreeMap::from([(0, 1), (1, 2), (2, 1)]))
        .unwrap();
    assert_eq!(h.statistics().unwrap(), stats);
    // absent class 5 keeps w = 1; the replay-only class 0 gets a larger w than class 2
    assert_eq!(stats.weights()[5], 1.0);
    assert!(stats.weights()[0] > stats.weights()[2]);
}
