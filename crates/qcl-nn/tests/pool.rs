//! Max pooling: forward equal to candle's, the gradient of PyTorch (all of it to the first
//! maximum of each window), and typed errors.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use qcl_nn::ops::max_pool2d;
use qcl_tensor::Error;

/// Brute force: `(y, dx)` for `L = Σ y ⊙ dy` with the first maximum of each window (row-major)
/// taking the whole gradient.
fn reference(
    x: &[f32],
    dy: &[f32],
    (planes, h, w): (usize, usize, usize),
    k: usize,
    s: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (ho, wo) = ((h - k) / s + 1, (w - k) / s + 1);
    let mut y = vec![0.0; planes * ho * wo];
    let mut dx = vec![0.0; x.len()];
    for p in 0..planes {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best = None::<(usize, f32)>;
                for ky in 0..k {
                    for kx in 0..k {
                        let i = p * h * w + (oy * s + ky) * w + ox * s + kx;
                        if best.is_none_or(|(_, m)| x[i] > m) {
                            best = Some((i, x[i]));
                        }
                    }
                }
                let (i, m) = best.unwrap();
                let o = p * ho * wo + oy * wo + ox;
                y[o] = m;
                dx[i] += dy[o];
            }
        }
    }
    (y, dx)
}

fn grid() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, Vec<f32>, Vec<f32>)> {
    (1usize..3, 1usize..4, 1usize..4, 1usize..4).prop_flat_map(|(n, c, k, s)| {
        (k..k + 7, k..k + 7).prop_flat_map(move |(h, w)| {
            let len = n * c * h * w;
            let out = n * c * ((h - k) / s + 1) * ((w - k) / s + 1);
            (
                Just(n),
                Just(c),
                Just(h),
                Just(w),
                Just(k),
                Just(s),
                // Small integers make ties common.
                prop::collection::vec((-3i32..4).prop_map(|v| v as f32), len),
                prop::collection::vec(-2.0f32..2.0, out),
            )
        })
    })
}

proptest! {
    #[test]
    fn forward_and_gradient_match_the_definition((n, c, h, w, k, s, x, dy) in grid()) {
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (n, c, h, w), &dev).unwrap()).unwrap();
        let y = max_pool2d(xv.as_tensor(), k, s).unwrap();
        // Forward: candle's own op gives the same values.
        let candle_y = xv.as_tensor().max_pool2d_with_stride(k, s).unwrap();
        prop_assert_eq!(y.dims(), candle_y.dims());
        let got_y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        prop_assert_eq!(&got_y, &candle_y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let dy_t = Tensor::from_vec(dy.clone(), y.dims(), &dev).unwrap();
        let grads = (y * dy_t).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (want_y, want_dx) = reference(&x, &dy, (n * c, h, w), k, s);
        prop_assert_eq!(got_y, want_y);
        for (a, b) in dx.iter().zip(&want_dx) {
            prop_assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{:?} vs {:?}", dx, want_dx);
        }
        // With windows that do not overlap, the gradient is only moved, never lost.
        if s >= k {
            let (sum_dx, sum_dy) = (dx.iter().sum::<f32>(), dy.iter().sum::<f32>());
            prop_assert!((sum_dx - sum_dy).abs() <= 1e-4 * (1.0 + sum_dy.abs()));
        }
    }
}

#[test]
fn a_single_maximum_gets_the_whole_gradient() {
    // candle 0.11's own backward gives 0.25 here.
    let x = Var::new(
        &[[[[1.0f32, 2.0, 3.0, 9.0], [4.0, 0.0, 5.0, 6.0]]]],
        &Device::Cpu,
    )
    .unwrap();
    let y = max_pool2d(x.as_tensor(), 2, 2).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![4.0, 9.0]
    );
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dx = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(dx, vec![0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn nan_propagates_and_f64_works() {
    let x = Tensor::new(&[[[[1.0f64, f64::NAN], [4.0, 0.0]]]], &Device::Cpu).unwrap();
    let y = max_pool2d(&x, 2, 2).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    assert!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0].is_nan());
}

#[test]
fn bad_pooling_is_a_typed_error() {
    let x = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        max_pool2d(&x, 0, 1),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        max_pool2d(&x, 2, 0),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        max_pool2d(&x, 4, 4),
        Err(Error::ShapeMismatch { .. })
    ));
    let flat = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        max_pool2d(&flat, 2, 2),
        Err(Error::ShapeMismatch { .. })
    ));
}
