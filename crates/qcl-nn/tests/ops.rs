//! The custom ops against candle's reference ops: values and both gradients.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use qcl_nn::ops::{
    add_channel_bias, batch_norm_eval, batch_norm_train, conv2d, conv_transpose2d, relu,
    Conv2dParams, ConvTranspose2dParams,
};
use qcl_tensor::{Error, Seed};

fn random(seed: u64, shape: &[usize]) -> Tensor {
    Seed(seed)
        .rng()
        .normal_tensor(shape, 0.0, 1.0, &Device::Cpu)
        .unwrap()
}

/// The gradients of `Σ y·r` (a loss that weighs every output differently).
fn weighted_gradients(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    y.mul(r).unwrap().sum_all().unwrap().backward().unwrap()
}

/// The elements of `t`, flattened, as `f64`.
fn f64_values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    qcl_tensor::max_abs_diff(a, b).unwrap()
}

/// Scale for tolerances: the largest magnitude of the reference.
fn scale(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0)
}

/// Value and gradients of `Σ r ⊙ f(x, w)` for a fixed random `r`; `None` if the backward
/// pass fails (candle 0.11's own conv2d backward does for some strided geometries).
fn try_value_and_grads(
    x: &Tensor,
    w: &Tensor,
    seed: u64,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> Option<(Tensor, Tensor, Tensor)> {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = f(xv.as_tensor(), wv.as_tensor());
    let r = random(seed, y.dims());
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().ok()?;
    Some((
        y,
        grads.get(xv.as_tensor()).unwrap().clone(),
        grads.get(wv.as_tensor()).unwrap().clone(),
    ))
}

fn value_and_grads(
    x: &Tensor,
    w: &Tensor,
    seed: u64,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> (Tensor, Tensor, Tensor) {
    try_value_and_grads(x, w, seed, f).expect("backward pass")
}

/// Direct-loop reference of conv2d and its two gradients for the loss `Σ r ⊙ y`, in f64.
fn naive_conv2d(x: &Tensor, w: &Tensor, r_seed: u64, p: Conv2dParams) -> (Tensor, Tensor, Tensor) {
    let (n, ci, h, wd) = x.dims4().unwrap();
    let (co, _, kh, kw) = w.dims4().unwrap();
    let ho = (h + 2 * p.padding - p.dilation * (kh - 1) - 1) / p.stride + 1;
    let wo = (wd + 2 * p.padding - p.dilation * (kw - 1) - 1) / p.stride + 1;
    let xs = f64_values(x);
    let ws = f64_values(w);
    let r = random(r_seed, &[n, co, ho, wo]);
    let rs = f64_values(&r);
    let mut y = vec![0.0; n * co * ho * wo];
    let mut dx = vec![0.0; xs.len()];
    let mut dw = vec![0.0; ws.len()];
    for b in 0..n {
        for o in 0..co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let yi = ((b * co + o) * ho + oy) * wo + ox;
                    for c in 0..ci {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let iy =
                                    (oy * p.stride + ki * p.dilation) as isize - p.padding as isize;
                                let ix =
                                    (ox * p.stride + kj * p.dilation) as isize - p.padding as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * ci + c) * h + iy as usize) * wd + ix as usize;
                                let wi = ((o * ci + c) * kh + ki) * kw + kj;
                                y[yi] += xs[xi] * ws[wi];
                                dx[xi] += rs[yi] * ws[wi];
                                dw[wi] += rs[yi] * xs[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    let t = |v: Vec<f64>, shape: &[usize]| {
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    (t(y, &[n, co, ho, wo]), t(dx, x.dims()), t(dw, w.dims()))
}

fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
    let tol = 1e-4 * scale(reference);
    let diff = max_abs_diff(ours, reference);
    assert!(diff <= tol, "{what}: max |diff| {diff} > {tol}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_matches_candle(
        n in 1usize..4, c_in in 1usize..5, c_out in 1usize..5,
        h in 1usize..10, w in 1usize..10, kh in 1usize..4, kw in 1usize..4,
        stride in 1usize..4, padding in 0usize..3, dilation in 1usize..3, seed in 0u64..1000,
    ) {
        let p = Conv2dParams { stride, padding, dilation };
        let fits = dilation * (kh - 1) < h + 2 * padding && dilation * (kw - 1) < w + 2 * padding;
        let x = random(seed, &[n, c_in, h, w]);
        let wt = random(seed + 1, &[c_out, c_in, kh, kw]);
        if !fits {
            let err = conv2d(&x, &wt, p).unwrap_err();
            prop_assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
            return Ok(());
        }
        let ours = value_and_grads(&x, &wt, seed + 2, |x, w| conv2d(x, w, p).unwrap());
        let naive = naive_conv2d(&x, &wt, seed + 2, p);
        assert_close(&ours.0, &naive.0, "forward (direct loops)");
        assert_close(&ours.1, &naive.1, "input gradient (direct loops)");
        assert_close(&ours.2, &naive.2, "weight gradient (direct loops)");
        let candle_forward = x.conv2d(&wt, padding, stride, dilation, 1).unwrap();
        assert_close(&ours.0, &candle_forward, "forward (candle)");
        // candle's own backward, where it works: 0.11 fails (or overflows) when the strided
        // output does not end exactly at the padded input's edge.
        let exact = (h + 2 * padding - dilation * (kh - 1) - 1) % stride == 0
            && (w + 2 * padding - dilation * (kw - 1) - 1) % stride == 0;
        if !exact {
            return Ok(());
        }
        if let Some(reference) = try_value_and_grads(&x, &wt, seed + 2, |x, w| {
            x.conv2d(w, padding, stride, dilation, 1).unwrap()
        }) {
            assert_close(&ours.1, &reference.1, "input gradient (candle)");
            assert_close(&ours.2, &reference.2, "weight gradient (candle)");
        }
    }

    #[test]
    fn conv_transpose2d_matches_candle(
        n in 1usize..3, c_in in 1usize..4, c_out in 1usize..4,
        h in 1usize..7, w in 1usize..7, k in 1usize..5,
        stride in 1usize..4, padding in 0usize..2, out_pad in 0usize..2, seed in 0u64..1000,
    ) {
        let output_padding = out_pad.min(stride - 1);
        let p = ConvTranspose2dParams { stride, padding, output_padding, dilation: 1 };
        let x = random(seed, &[n, c_in, h, w]);
        let wt = random(seed + 1, &[c_in, c_out, k, k]);
        let full = (h - 1) * stride + k + output_padding;
        let full_w = (w - 1) * stride + k + output_padding;
        if full <= 2 * padding || full_w <= 2 * padding {
            prop_assert!(conv_transpose2d(&x, &wt, p).is_err());
            return Ok(());
        }
        let ours = value_and_grads(&x, &wt, seed + 2, |x, w| conv_transpose2d(x, w, p).unwrap());
        let reference = value_and_grads(&x, &wt, seed + 2, |x, w| {
            x.conv_transpose2d(w, padding, output_padding, stride, 1).unwrap()
        });
        assert_close(&ours.0, &reference.0, "forward");
        assert_close(&ours.1, &reference.1, "input gradient");
        assert_close(&ours.2, &reference.2, "weight gradient");
    }

    #[test]
    fn batch_norm_matches_the_formula(
        n in 1usize..5, c in 1usize..5, h in 1usize..6, relu_after in any::<bool>(), seed in 0u64..1000,
    ) {
        prop_assume!(n * h * h > 1);
        let eps = 1e-5;
        let x = random(seed, &[n, c, h, h]);
        let gamma = random(seed + 1, &[c]);
        let beta = random(seed + 2, &[c]);
        // The reference runs in f64, so the comparison measures our f32 error alone.
        let run = |ours: bool| {
            let dtype = if ours { DType::F32 } else { DType::F64 };
            let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
            let (xv, gv, bv) = (var(&x), var(&gamma), var(&beta));
            let y = if ours {
                batch_norm_train(xv.as_tensor(), gv.as_tensor(), bv.as_tensor(), eps, relu_after).unwrap().0
            } else {
                let axes = [0usize, 2, 3];
                let mean = xv.mean_keepdim(axes.as_slice()).unwrap();
                let centred = xv.broadcast_sub(&mean).unwrap();
                let var = centred.sqr().unwrap().mean_keepdim(axes.as_slice()).unwrap();
                let xhat = centred.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
                let y = xhat.broadcast_mul(&gv.reshape((1, c, 1, 1)).unwrap()).unwrap()
                    .broadcast_add(&bv.reshape((1, c, 1, 1)).unwrap()).unwrap();
                if relu_after { y.relu().unwrap() } else { y }
            };
            let r = random(seed + 3, y.dims()).to_dtype(dtype).unwrap();
            let grads = weighted_gradients(&y, &r);
            let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            (f32_of(&y), f32_of(grads.get(&xv).unwrap()), f32_of(grads.get(&gv).unwrap()), f32_of(grads.get(&bv).unwrap()))
        };
        let (ours, reference) = (run(true), run(false));
        assert_close(&ours.0, &reference.0, "output");
        // The input gradient subtracts terms of size |γ|/σ·|dy| that nearly cancel when a
        // channel's values are close together (always so for two elements per channel), so its
        // f32 error is relative to that size, not to the result's.
        let x64 = f64_values(&x);
        let g64: Vec<f64> = gamma.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let m = n * h * h;
        let term_size = (0..c)
            .map(|ch| {
                let v: Vec<f64> = (0..n).flat_map(|b| x64[(b * c + ch) * h * h..(b * c + ch + 1) * h * h].to_vec()).collect();
                let mean = v.iter().sum::<f64>() / m as f64;
                let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / m as f64;
                g64[ch].abs() / (var + eps).sqrt()
            })
            .fold(0.0f64, f64::max)
            * scale(&random(seed + 3, x.dims())) as f64;
        let tol = 1e-4 * (scale(&reference.1) as f64).max(term_size);
        let diff = max_abs_diff(&ours.1, &reference.1) as f64;
        prop_assert!(diff <= tol, "input gradient: max |diff| {} > {}", diff, tol);
        assert_close(&ours.2, &reference.2, "gamma gradient");
        assert_close(&ours.3, &reference.3, "beta gradient");
    }

    #[test]
    fn batch_norm_statistics_match_the_formula(n in 1usize..5, c in 1usize..4, h in 1usize..5, seed in 0u64..1000) {
        let x = random(seed, &[n, c, h, h]);
        let ones = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
        let (_, stats) = batch_norm_train(&x, &ones, &zeros, 1e-5, false).unwrap();
        let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let m = n * h * h;
        prop_assert_eq!(stats.count, m);
        for ch in 0..c {
            let vals: Vec<f64> = (0..n).flat_map(|b| {
                let start = (b * c + ch) * h * h;
                flat[start..start + h * h].iter().map(|v| *v as f64).collect::<Vec<_>>()
            }).collect();
            let mean = vals.iter().sum::<f64>() / m as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m as f64;
            // f32 data summed in f32 lanes per plane: single-precision agreement.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
            prop_assert!(close(stats.mean[ch], mean), "{} vs {}", stats.mean[ch], mean);
            prop_assert!(close(stats.variance[ch], var), "{} vs {}", stats.variance[ch], var);
            if m > 1 {
                prop_assert!(close(stats.unbiased_variance()[ch], var * m as f64 / (m as f64 - 1.0)));
            }
        }
    }
}

#[test]
fn eval_batch_norm_uses_the_given_statistics() {
    let x = random(5, &[3, 2, 2, 2]);
    let gamma = Tensor::new(&[2.0f32, 0.5], &Device::Cpu).unwrap();
    let beta = Tensor::new(&[0.1f32, -0.3], &Device::Cpu).unwrap();
    let mean = Tensor::new(&[0.2f32, -0.1], &Device::Cpu).unwrap();
    let var = Tensor::new(&[1.5f32, 0.25], &Device::Cpu).unwrap();
    let y = batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5, false).unwrap();
    let reference = x
        .broadcast_sub(&mean.reshape((1, 2, 1, 1)).unwrap())
        .unwrap()
        .broadcast_div(
            &(var.reshape((1, 2, 1, 1)).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap(),
        )
        .unwrap()
        .broadcast_mul(&gamma.reshape((1, 2, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape((1, 2, 1, 1)).unwrap())
        .unwrap();
    assert_close(&y, &reference, "eval output");
}

#[test]
fn relu_and_bias_gradients() {
    let x = Var::from_tensor(&random(9, &[2, 3, 4, 4])).unwrap();
    let b = Var::from_tensor(&random(10, &[3])).unwrap();
    let r = random(11, &[2, 3, 4, 4]);
    let y = relu(&add_channel_bias(&x, &b).unwrap()).unwrap();
    let reference = x
        .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
        .unwrap()
        .relu()
        .unwrap();
    assert_close(&y, &reference, "forward");
    let g1 = weighted_gradients(&y, &r);
    let g2 = weighted_gradients(&reference, &r);
    assert_close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), "x gradient");
    assert_close(g1.get(&b).unwrap(), g2.get(&b).unwrap(), "bias gradient");
}

#[test]
fn bad_convolution_inputs_are_typed_errors() {
    let x = random(1, &[2, 3, 5, 5]);
    let w = random(2, &[4, 3, 3, 3]);
    let p = Conv2dParams::default();
    // Wrong rank.
    let err = conv2d(&x.flatten_from(2).unwrap(), &w, p).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    // Channel mismatch.
    let err = conv2d(&x, &random(3, &[4, 2, 3, 3]), p).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    // Kernel larger than the padded input.
    let err = conv2d(&x, &random(4, &[4, 3, 7, 7]), p).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    assert!(conv2d(
        &x,
        &random(4, &[4, 3, 7, 7]),
        Conv2dParams { padding: 1, ..p }
    )
    .is_ok());
    // Zero channels.
    let empty = Tensor::zeros((2, 0, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let err = conv2d(
        &empty,
        &Tensor::zeros((4, 0, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        p,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    // Zero stride.
    let err = conv2d(&x, &w, Conv2dParams { stride: 0, ..p }).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    // Output padding not below the stride.
    let tp = ConvTranspose2dParams {
        stride: 2,
        output_padding: 2,
        ..Default::default()
    };
    let err = conv_transpose2d(&x, &random(5, &[3, 2, 3, 3]), tp).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
}

#[test]
fn input_gradient_is_skipped_for_plain_inputs_but_weights_still_learn() {
    let x = random(1, &[2, 1, 6, 6]);
    let w = Var::from_tensor(&random(2, &[3, 1, 3, 3])).unwrap();
    let y = conv2d(&x, &w, Conv2dParams::default()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    let reference = x
        .conv2d(&w, 0, 1, 1, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        grads.get(&w).unwrap(),
        reference.get(&w).unwrap(),
        "weight gradient",
    );
}

#[test]
fn f64_convolution_matches_candle_closely() {
    let x = random(7, &[3, 2, 7, 7]).to_dtype(DType::F64).unwrap();
    let w = random(8, &[4, 2, 3, 3]).to_dtype(DType::F64).unwrap();
    let p = Conv2dParams {
        stride: 2,
        padding: 1,
        dilation: 1,
    };
    let ours = conv2d(&x, &w, p).unwrap();
    let reference = x.conv2d(&w, 1, 2, 1, 1).unwrap();
    let diff = ours
        .sub(&reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-12, "{diff}");
}

#[test]
fn add_relu_matches_candle_with_both_gradients() {
    let a = Var::from_tensor(&random(21, &[2, 3, 5, 5])).unwrap();
    let b = Var::from_tensor(&random(22, &[2, 3, 5, 5])).unwrap();
    let r = random(23, &[2, 3, 5, 5]);
    let y = qcl_nn::ops::add_relu(&a, &b).unwrap();
    let reference = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
    assert_close(&y, &reference, "forward");
    let g1 = weighted_gradients(&y, &r);
    let g2 = weighted_gradients(&reference, &r);
    assert_close(g1.get(&a).unwrap(), g2.get(&a).unwrap(), "a gradient");
    assert_close(g1.get(&b).unwrap(), g2.get(&b).unwrap(), "b gradient");
    let err = qcl_nn::ops::add_relu(&a, &random(24, &[2, 3, 5, 4])).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn mse_loss_and_straight_through_match_candle() {
    let a = Var::from_tensor(&random(31, &[3, 2, 4, 4])).unwrap();
    let b = Var::from_tensor(&random(32, &[3, 2, 4, 4])).unwrap();
    let ours = qcl_nn::ops::mse_loss(&a, &b).unwrap();
    let reference = (a.as_tensor() - b.as_tensor())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    assert_close(&ours, &reference, "mse value");
    let g1 = (ours * 3.0).unwrap().backward().unwrap();
    let g2 = (reference * 3.0).unwrap().backward().unwrap();
    assert_close(g1.get(&a).unwrap(), g2.get(&a).unwrap(), "mse gradient a");
    assert_close(g1.get(&b).unwrap(), g2.get(&b).unwrap(), "mse gradient b");

    // Straight-through: forward value of q exactly, gradient of h unchanged, none for q.
    let h = Var::from_tensor(&random(33, &[2, 3, 3, 3])).unwrap();
    let q = Var::from_tensor(&random(34, &[2, 3, 3, 3])).unwrap();
    let r = random(35, &[2, 3, 3, 3]);
    let z = qcl_nn::ops::straight_through(&h, &q).unwrap();
    assert_eq!(
        z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        q.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let grads = weighted_gradients(&z, &r);
    assert_close(grads.get(&h).unwrap(), &r, "straight-through gradient");
    assert!(grads.get(&q).is_none());
    let err = qcl_nn::ops::mse_loss(&a, &h).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");

    // The fused straight-through ReLU equals the composition, value and gradient, bit for bit.
    let fused = qcl_nn::ops::straight_through_relu(&h, &q).unwrap();
    let composed = qcl_nn::ops::relu(&qcl_nn::ops::straight_through(&h, &q).unwrap()).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(values(&fused), values(&composed));
    assert!(values(&fused).contains(&0.0) && values(&fused).iter().any(|&v| v > 0.0));
    let g_fused = weighted_gradients(&fused, &r);
    let g_composed = weighted_gradients(&composed, &r);
    assert_eq!(
        values(g_fused.get(&h).unwrap()),
        values(g_composed.get(&h).unwrap())
    );
    assert!(g_fused.get(&q).is_none());
    let err = qcl_nn::ops::straight_through_relu(&h, &a).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn fused_bias_matches_a_separate_bias_for_both_convolutions() {
    let x = Var::from_tensor(&random(41, &[2, 3, 6, 6])).unwrap();
    let b = Var::from_tensor(&random(42, &[4])).unwrap();
    let w = Var::from_tensor(&random(43, &[4, 3, 3, 3])).unwrap();
    let wt = Var::from_tensor(&random(44, &[3, 4, 4, 4])).unwrap();
    let p = Conv2dParams {
        stride: 2,
        padding: 1,
        dilation: 1,
    };
    let tp = ConvTranspose2dParams {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    let cases: Vec<(Tensor, Tensor, &Var)> = vec![
        (
            qcl_nn::ops::conv2d_with_bias(&x, &w, Some(&b), p).unwrap(),
            conv2d(&x, &w, p)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap(),
            &w,
        ),
        (
            qcl_nn::ops::conv_transpose2d_with_bias(&x, &wt, Some(&b), tp).unwrap(),
            conv_transpose2d(&x, &wt, tp)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap(),
            &wt,
        ),
    ];
    for (fused, separate, weight) in cases {
        assert_close(&fused, &separate, "value");
        let r = random(45, fused.dims());
        let g1 = weighted_gradients(&fused, &r);
        let g2 = weighted_gradients(&separate, &r);
        for (t, what) in [
            (x.as_tensor(), "x"),
            (b.as_tensor(), "bias"),
            (weight.as_tensor(), "weight"),
        ] {
            assert_close(g1.get(t).unwrap(), g2.get(t).unwrap(), what);
        }
    }
    let err = qcl_nn::ops::conv2d_with_bias(&x, &w, Some(&random(46, &[3])), p).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn fused_conv_relu_matches_conv_then_relu() {
    let x = Var::from_tensor(&random(51, &[2, 3, 7, 7])).unwrap();
    let w = Var::from_tensor(&random(52, &[4, 3, 3, 3])).unwrap();
    let b = Var::from_tensor(&random(53, &[4])).unwrap();
    let p = Conv2dParams {
        stride: 1,
        padding: 1,
        dilation: 1,
    };
    for bias in [Some(b.as_tensor()), None] {
        let fused = qcl_nn::ops::conv2d_bias_relu(&x, &w, bias, p).unwrap();
        let separate = qcl_nn::ops::conv2d_with_bias(&x, &w, bias, p)
            .unwrap()
            .relu()
            .unwrap();
        assert_close(&fused, &separate, "value");
        let r = random(54, fused.dims());
        let g1 = weighted_gradients(&fused, &r);
        let g2 = weighted_gradients(&separate, &r);
        assert_close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), "x gradient");
        assert_close(g1.get(&w).unwrap(), g2.get(&w).unwrap(), "w gradient");
        if bias.is_some() {
            assert_close(g1.get(&b).unwrap(), g2.get(&b).unwrap(), "bias gradient");
        }
    }
}
