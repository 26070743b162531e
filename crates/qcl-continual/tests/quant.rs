//! Unit tests of the quantizers: exact values, ties, the standardisation's Jacobian, errors.

use candle_core::{Device, Module, Tensor, Var};
use qcl_continual::{round_to_bits, ActivationQuantizer, WeightQuantMode, WeightQuantizer};
use qcl_nn::layers::{Conv2d, Conv2dConfig};
use qcl_nn::ParamStore;
use qcl_tensor::Error;

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn vals(x: &Tensor) -> Vec<f32> {
    x.to_vec1::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
    }
}

/// Deterministic pseudo-random values in [−1, 1).
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn ties_round_half_to_even() {
    // m = 15: 0.5·15 = 7.5 → 8, 1.5·15 = 22.5 → 22, −0.5·15 → −8; exact f32 products.
    let q = vals(&round_to_bits(&t(&[0.5, 1.5, -0.5, -1.5]), 4).unwrap());
    assert_close(
        &q,
        &[8.0 / 15.0, 22.0 / 15.0, -8.0 / 15.0, -22.0 / 15.0],
        1e-7,
    );
    // m = 255: 127.5 → 128, 382.5 → 382.
    let q = vals(&round_to_bits(&t(&[0.5, 1.5]), 8).unwrap());
    assert_close(&q, &[128.0 / 255.0, 382.0 / 255.0], 1e-7);
    // m = 3: 1.5 → 2, 4.5 → 4.
    let q = vals(&round_to_bits(&t(&[0.5, 1.5]), 2).unwrap());
    assert_close(&q, &[2.0 / 3.0, 4.0 / 3.0], 1e-7);
}

#[test]
fn rounding_passes_gradient_straight_through() {
    let u = Var::new(&[0.1f32, 0.7, -2.3], &Device::Cpu).unwrap();
    let q = round_to_bits(u.as_tensor(), 3).unwrap();
    let g = (q * t(&[1.0, 2.0, 3.0]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(vals(g.get(u.as_tensor()).unwrap()), vec![1.0, 2.0, 3.0]);
}

#[test]
fn activation_known_values() {
    let y = ActivationQuantizer::new(2)
        .unwrap()
        .forward(&t(&[-1.0, 0.0, 0.1, 0.2, 0.5, 0.9, 1.0, 5.0]))
        .unwrap();
    // m = 3; 0.5·3 = 1.5 is a tie and goes to 2.
    assert_close(
        &vals(&y),
        &[0.0, 0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0, 1.0],
        1e-7,
    );
    let y = ActivationQuantizer::new(1)
        .unwrap()
        .forward(&t(&[-1.0, 0.0, 0.3, 2.0]))
        .unwrap();
    assert_eq!(vals(&y), vec![0.0, 0.0, 1.0, 1.0]);
}

#[test]
fn activation_gradient_passes_at_inclusive_boundaries() {
    let x = Var::new(&[0.0f32, 1.0, -1e-3, 1.001], &Device::Cpu).unwrap();
    let y = ActivationQuantizer::new(4)
        .unwrap()
        .forward(x.as_tensor())
        .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        vals(g.get(x.as_tensor()).unwrap()),
        vec![1.0, 1.0, 0.0, 0.0]
    );
}

/// The faithful gradient is `Jᵀ·r` with the exact Jacobian of `Ŵ = (W − μ)/s·σ0`:
/// `g = σ0/s · (r − mean(r) − Ŵ·⟨Ŵ, r⟩ / (σ0²·(N − 1)))`.
#[test]
fn faithful_gradient_is_the_standardisation_jacobian() {
    for seed in 0..5 {
        let n = 37;
        let w = pseudo(n, seed);
        let r = pseudo(n, seed + 100);
        for sigma0 in [0.5, 0.125] {
            let q = WeightQuantizer {
                sigma0,
                ..WeightQuantizer::new(4).unwrap()
            };
            let var = Var::new(w.as_slice(), &Device::Cpu).unwrap();
            let loss = (q.quantize(var.as_tensor()).unwrap() * t(&r))
                .unwrap()
                .sum_all()
                .unwrap();
            let g = vals(loss.backward().unwrap().get(var.as_tensor()).unwrap());

            let nf = n as f64;
            let mean = w.iter().map(|&x| x as f64).sum::<f64>() / nf;
            let s = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (nf - 1.0)).sqrt();
            let hat: Vec<f64> = w.iter().map(|&x| (x as f64 - mean) / s * sigma0).collect();
            let rm = r.iter().map(|&x| x as f64).sum::<f64>() / nf;
            let hr: f64 = hat.iter().zip(&r).map(|(h, &x)| h * x as f64).sum();
            for j in 0..n {
                let want =
                    sigma0 / s * (r[j] as f64 - rm - hat[j] * hr / (sigma0 * sigma0 * (nf - 1.0)));
                assert!(
                    (g[j] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "seed {seed}, σ0 {sigma0}, element {j}: {} vs {want}",
                    g[j]
                );
            }
        }
    }
}

#[test]
fn strict_gradient_is_blocked_where_clamped() {
    // One outlier: its Ŵ is far above 1, so its own STE path is blocked, but it still gets
    // gradient through the mean and std of the other elements.
    let w = [0.0f32, 0.1, -0.1, 0.05, -0.05, 0.02, 10.0];
    let q = WeightQuantizer {
        mode: WeightQuantMode::Strict,
        ..WeightQuantizer::new(4).unwrap()
    };
    let hat = vals(&q.standardize(&t(&w)).unwrap());
    assert!(hat[6] > 1.0);
    let y = q.quantize(&t(&w)).unwrap();
    assert_eq!(vals(&y)[6], 1.0);
    let var = Var::new(&w, &Device::Cpu).unwrap();
    let y = q.quantize(var.as_tensor()).unwrap();
    // Loss that only looks at the clamped element: zero gradient everywhere.
    let mask = t(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    let g = (y * mask).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(vals(g.get(var.as_tensor()).unwrap())
        .iter()
        .all(|&x| x == 0.0));
}

#[test]
fn faithful_is_unclamped_and_has_more_than_2k_levels() {
    // 4096 roughly Gaussian weights: Ŵ reaches beyond ±1, so a 4-bit faithful tensor carries
    // more than 16 levels (docs/methods/lifequant.md § Paper versus code), while strict stays
    // within 16.
    let u1 = pseudo(4096, 7);
    let u2 = pseudo(4096, 8);
    let w: Vec<f32> = u1
        .iter()
        .zip(&u2)
        .map(|(&a, &b)| {
            let a = (a as f64 + 1.0) / 2.0 * 0.999 + 0.0005;
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::PI * b as f64).cos()) as f32
        })
        .collect();
    let count = |mode| {
        let q = WeightQuantizer {
            mode,
            ..WeightQuantizer::new(4).unwrap()
        };
        let mut v = vals(&q.quantize(&t(&w)).unwrap());
        v.sort_by(f32::total_cmp);
        v.dedup();
        v.len()
    };
    assert!(count(WeightQuantMode::Faithful) > 16);
    assert!(count(WeightQuantMode::Strict) <= 16);
}

#[test]
fn affine_invariance_on_a_large_tensor() {
    let w = pseudo(20_000, 3);
    let w2: Vec<f32> = w.iter().map(|&x| 2.5 * x - 0.75).collect();
    let q = WeightQuantizer::new(4).unwrap();
    let a = vals(&q.quantize(&t(&w)).unwrap());
    let b = vals(&q.quantize(&t(&w2)).unwrap());
    let equal = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        equal as f64 >= 0.999 * w.len() as f64,
        "{equal} of {}",
        w.len()
    );
}

#[test]
fn quantized_conv_backpropagates_to_the_latent_weight() {
    let store = ParamStore::new(3);
    let conv = Conv2d::new(
        &store.root(&Device::Cpu).pp("conv"),
        2,
        3,
        3,
        Conv2dConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        },
    )
    .unwrap();
    let x = Tensor::new(pseudo(2 * 2 * 5 * 5, 11).as_slice(), &Device::Cpu)
        .unwrap()
        .reshape((2, 2, 5, 5))
        .unwrap();
    let qw = WeightQuantizer::new(4)
        .unwrap()
        .quantize(conv.weight())
        .unwrap();
    let y = conv.forward_with_weight(&x, &qw).unwrap();
    let loss = y.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(conv.weight())
        .expect("gradient reaches the latent weight");
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().any(|&v| v != 0.0));
    assert!(g.iter().sum::<f32>().abs() <= 1e-4 * g.iter().map(|v| v.abs()).sum::<f32>());
}

#[test]
fn bad_bit_widths_are_refused() {
    for bits in [0, 17, 31, 33, 64] {
        assert!(matches!(
            WeightQuantizer::new(bits),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            ActivationQuantizer::new(bits),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            round_to_bits(&t(&[0.5]), bits),
            Err(Error::InvalidParameter { .. })
        ));
        // Bypassing the constructors is caught at use.
        let q = WeightQuantizer {
            bits,
            ..WeightQuantizer::new(4).unwrap()
        };
        assert!(matches!(
            q.quantize(&t(&[0.5, 1.0])),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            ActivationQuantizer { bits }
                .forward(&t(&[0.5]))
                .map_err(Error::from),
            Err(Error::InvalidParameter { .. })
        ));
    }
    for bits in (1..=16).chain([32]) {
        assert!(WeightQuantizer::new(bits).is_ok());
    }
}

#[test]
fn bad_weights_and_sigma0_are_refused() {
    let q = WeightQuantizer::new(4).unwrap();
    assert!(matches!(
        q.quantize(&t(&[0.1, f32::NAN, 0.3])),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        q.quantize(&t(&[0.1, 0.2, f32::INFINITY])),
        Err(Error::NonFinite { index: 2, .. })
    ));
    let one_bit = WeightQuantizer::new(1).unwrap();
    assert!(matches!(
        one_bit.quantize(&t(&[f32::NAN, 0.3])),
        Err(Error::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        q.quantize(&t(&[0.3, 0.3, 0.3])),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(q.quantize(&t(&[0.3])), Err(Error::EmptyInput(_))));
    for sigma0 in [0.0, -0.5, f64::NAN, f64::INFINITY] {
        let q = WeightQuantizer {
            sigma0,
            ..WeightQuantizer::new(4).unwrap()
        };
        assert!(matches!(
            q.quantize(&t(&[0.1, 0.2])),
            Err(Error::InvalidParameter { .. })
        ));
    }
    // 1 bit on an all-zero tensor: E = 0, output 0 rather than NaN.
    let y = one_bit.quantize(&t(&[0.0, 0.0])).unwrap();
    assert_eq!(vals(&y), vec![0.0, 0.0]);
}
