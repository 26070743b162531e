//! Outlier columns, the guarded codebook fine-tune, calibration files and staged calibration:
//! their invariants on random data, and the failure they exist to prevent (one massive input
//! feature dominating a layer's output error).

use candle_core::{Device, Module, Tensor};
use indicatif::ProgressBar;
use proptest::prelude::*;
use qcl_tensor::{Error, Seed};
use qcl_wpq::{
    compress_checkpoint, compress_checkpoint_staged, quantize_pq, Calibration, Checkpoint,
    CompressedCheckpoint, Evidence, FinetuneGuard, LayerStats, Method, Objective, OutlierColumns,
    Pattern, Plan, PqConfig, Rule, ScalarConfig, GUARD_STEPS,
};

/// `quantize_pq` of a `[rows, cols]` weight with recorded input statistics.
fn pq_with_stats(
    w: &[f32],
    shape: [usize; 2],
    config: &PqConfig,
    stats: &LayerStats,
    seed: u64,
) -> qcl_tensor::Result<qcl_wpq::PqOutcome> {
    quantize_pq(w, &shape, config, Evidence::Stats(stats), Seed::new(seed))
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Seed::new(seed)
        .rng()
        .normal_tensor(shape, 0.0, 1.0, &Device::Cpu)
        .unwrap()
}

/// `rows` inputs of width `width` whose feature `massive` is `scale` times larger than the
/// others, as massive activations are in a transformer's residual stream.
fn massive_inputs(rows: usize, width: usize, massive: usize, scale: f32, seed: u64) -> Tensor {
    let x = randn(&[rows, width], seed);
    let mut mask = vec![1f32; width];
    mask[massive] = scale;
    let mask = Tensor::new(mask.as_slice(), &Device::Cpu).unwrap();
    x.broadcast_mul(&mask).unwrap()
}

fn stats_of(x: &Tensor) -> LayerStats {
    let calib = Calibration::new();
    calib.record("w", x).unwrap();
    calib.stats("w").unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `Σ_t ‖(W − Ŵ)x_t‖²` for `[O, D]` weights and `[n, D]` inputs.
fn output_error(w: &[f32], approx: &[f32], x: &Tensor, cols: usize) -> f64 {
    let rows = w.len() / cols;
    let diff: Vec<f32> = w.iter().zip(approx).map(|(a, b)| a - b).collect();
    let diff = Tensor::from_vec(diff, (rows, cols), &Device::Cpu).unwrap();
    let e = x.matmul(&diff.t().unwrap()).unwrap();
    f64::from(
        e.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The chosen columns are the largest by diag(H), their count leaves a multiple of d, and
    /// a threshold rule takes exactly the columns above it (up to its cap and the rounding).
    #[test]
    fn outlier_selection_takes_the_largest_columns(
        diag in prop::collection::vec(0.0f64..1000.0, 2..40),
        s in 0usize..6,
        d in 1usize..5,
    ) {
        let n = diag.len();
        match OutlierColumns::Top(s).select(&diag, d) {
            Ok(chosen) => {
                prop_assert!(chosen.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(chosen.len() >= s.min(n));
                prop_assert!(chosen.len() < s + d);
                prop_assert_eq!((n - chosen.len()) % d, 0);
                let smallest_chosen = chosen.iter().map(|&c| diag[c]).fold(f64::MAX, f64::min);
                for c in (0..n).filter(|c| !chosen.contains(c)) {
                    prop_assert!(diag[c] <= smallest_chosen);
                }
            }
            Err(e) => {
                let invalid = matches!(e, Error::InvalidParameter { .. });
                prop_assert!(invalid, "{:?}", e);
                prop_assert!(s + d > n);
            }
        }
        let mut sorted = diag.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[n / 2];
        if let Ok(chosen) = (OutlierColumns::Threshold { ratio: 3.0, max: n }).select(&diag, 1) {
            let above: Vec<usize> = (0..n).filter(|&c| diag[c] > 3.0 * median).collect();
            prop_assert_eq!(chosen, above);
        }
    }

    /// Error feedback's stored outlier values are optimal for the quantized columns: the
    /// output error's gradient with respect to them, `2 (W − Ŵ) H[:, O]`, vanishes (up to the
    /// fp16 rounding of the stored values).
    #[test]
    fn feedback_outlier_values_are_optimal(seed in 0u64..1000, s in 1usize..3) {
        let (rows, cols) = (6, 12);
        let x = massive_inputs(200, cols, 3, 30.0, seed);
        let stats = stats_of(&x);
        let w = values(&randn(&[rows, cols], seed + 1));
        let params = PqConfig {
            outliers: OutlierColumns::Top(s),
            ..PqConfig::new(2, 4, Objective::ErrorFeedback)
        };
        let out = pq_with_stats(&w, [rows, cols], &params, &stats, seed).unwrap();
        let exact = out.outliers.clone().unwrap();
        prop_assert!(exact.columns.contains(&3));
        let rest = out.tensor.decode().unwrap();
        let approx = exact.merge(&rest, cols).unwrap();
        let LayerStats::Inputs(s) = &stats else { unreachable!() };
        for o in 0..rows {
            for &c in &exact.columns {
                let c = c as usize;
                let grad: f64 = (0..cols)
                    .map(|j| f64::from(w[o * cols + j] - approx[o * cols + j]) * s.gram[j * cols + c])
                    .sum();
                // The fp16 rounding of the stored value moves the gradient by at most
                // H_cc · |v| · 2⁻¹¹ (plus the other outliers' share).
                let tol: f64 = exact.columns.iter().map(|&k| {
                    s.gram[k as usize * cols + c].abs() * (f64::from(approx[o * cols + k as usize]).abs() + 1e-3)
                }).sum::<f64>() * 1e-3;
                prop_assert!(grad.abs() <= tol, "row {o} col {c}: gradient {grad} > {tol}");
            }
        }
    }

    /// Saving and loading a calibration keeps every statistic and sample, and the same
    /// recording gives the same bytes.
    #[test]
    fn calibration_files_round_trip(seed in 0u64..1000, sample in 0usize..5, rows in 1usize..9) {
        let record = || {
            let calib = Calibration::new().with_sample_rows(sample);
            calib.record("a.weight", &randn(&[rows, 3], seed)).unwrap();
            calib.record("a.weight", &randn(&[2, 3], seed + 1)).unwrap();
            calib.record("emb.weight", &Tensor::new(&[4u32, 1, 4], &Device::Cpu).unwrap()).unwrap();
            calib
        };
        let calib = record();
        let bytes = calib.to_bytes().unwrap();
        prop_assert_eq!(&bytes, &record().to_bytes().unwrap());
        let back = Calibration::from_bytes("mem", &bytes).unwrap();
        prop_assert_eq!(back.names(), calib.names());
        for name in calib.names() {
            prop_assert_eq!(back.stats(&name), calib.stats(&name));
        }
    }
}

#[test]
fn outlier_columns_rescue_a_layer_with_a_massive_feature() {
    let (rows, cols) = (32, 48);
    let x = massive_inputs(2000, cols, 7, 300.0, 1);
    let stats = stats_of(&x);
    let w = values(&randn(&[rows, cols], 2));
    let error = |outliers| {
        let params = PqConfig {
            outliers,
            ..PqConfig::new(2, 8, Objective::ErrorFeedback)
        };
        let out = pq_with_stats(&w, [rows, cols], &params, &stats, 3).unwrap();
        let rest = out.tensor.decode().unwrap();
        let approx = match &out.outliers {
            Some(e) => e.merge(&rest, cols).unwrap(),
            None => rest,
        };
        output_error(&w, &approx, &x, cols)
    };
    let (plain, kept) = (error(OutlierColumns::None), error(OutlierColumns::Top(1)));
    assert!(
        kept < 0.5 * plain,
        "keeping the massive column: {kept} vs {plain}"
    );
    // The threshold rule finds the same column (and rounds up to d = 2: one more).
    let params = PqConfig {
        outliers: OutlierColumns::Threshold {
            ratio: 100.0,
            max: 4,
        },
        ..PqConfig::new(2, 8, Objective::ErrorFeedback)
    };
    let out = pq_with_stats(&w, [rows, cols], &params, &stats, 3).unwrap();
    let columns = out.outliers.unwrap().columns;
    assert_eq!(columns.len(), 2);
    assert!(columns.contains(&7));
}

#[test]
fn outlier_requests_without_inputs_or_on_4d_weights_are_typed_errors() {
    let w = values(&randn(&[4, 8], 1));
    let params = PqConfig {
        outliers: OutlierColumns::Top(2),
        ..PqConfig::new(2, 4, Objective::Naive)
    };
    let e = quantize_pq(&w, &[4, 8], &params, Evidence::None, Seed::new(0)).unwrap_err();
    assert!(matches!(e, Error::EmptyInput(_)), "{e:?}");
    let conv = values(&randn(&[4, 2, 2, 2], 1));
    let calib = Calibration::new();
    let conv_input = qcl_wpq::ConvInput {
        kh: 2,
        kw: 2,
        padding: 0,
        stride: 1,
    };
    calib
        .record_conv("conv", &randn(&[3, 2, 4, 4], 2), conv_input)
        .unwrap();
    let conv_stats = calib.stats("conv").unwrap();
    let e = quantize_pq(
        &conv,
        &[4, 2, 2, 2],
        &params,
        Evidence::Stats(&conv_stats),
        Seed::new(0),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e:?}");
    let stats = stats_of(&randn(&[10, 8], 2));
    let bad = PqConfig {
        outliers: OutlierColumns::Threshold {
            ratio: f64::NAN,
            max: 2,
        },
        ..params
    };
    let e = quantize_pq(&w, &[4, 8], &bad, Evidence::Stats(&stats), Seed::new(0)).unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e:?}");
}

/// A checkpoint with outlier columns in PQ, RTN and GPTQ tensors: the file holds them, the
/// bits count them, and the reload is bit-identical.
#[test]
fn outlier_columns_are_stored_counted_and_reloaded_exactly() {
    let checkpoint = Checkpoint::from_tensors([
        ("pq.weight", randn(&[8, 16], 1)),
        ("rtn.weight", randn(&[8, 16], 2)),
        ("gptq.weight", randn(&[8, 16], 3)),
    ])
    .unwrap();
    let calib = Calibration::new();
    let x = massive_inputs(300, 16, 5, 100.0, 4);
    for name in ["pq.weight", "rtn.weight", "gptq.weight"] {
        calib.record(name, &x).unwrap();
    }
    let outliers = OutlierColumns::Top(2);
    let scalar = ScalarConfig {
        outliers,
        ..ScalarConfig::new(4, Some(7))
    };
    let plan = Plan::new(vec![
        Rule::new(
            "pq.*",
            Method::Pq(PqConfig {
                outliers,
                finetune_rounds: 1,
                ..PqConfig::new(2, 4, Objective::ErrorFeedback)
            }),
        )
        .unwrap(),
        Rule::new("rtn.*", Method::Rtn(scalar)).unwrap(),
        Rule::new("gptq.*", Method::Gptq(scalar)).unwrap(),
    ]);
    let out = compress_checkpoint(&checkpoint, &plan, &calib, &ProgressBar::hidden()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    out.checkpoint.save(&path).unwrap();
    let back = CompressedCheckpoint::load(&path).unwrap();
    assert_eq!(back, out.checkpoint);
    let bits = back.bits().unwrap();
    for name in ["pq.weight", "rtn.weight", "gptq.weight"] {
        let t = back.compressed.get(name).unwrap();
        let exact = t.outliers.as_ref().expect("outlier columns stored");
        assert!(exact.columns.contains(&5), "{name}: {:?}", exact.columns);
        assert_eq!(t.bits().outlier_bits, 16 * 8 * 2 + 32 * 2);
        assert!(t.label().ends_with("+2 fp16 cols"), "{}", t.label());
        // Decoding puts the exact values in their columns.
        let decoded = t.decode().unwrap();
        for (o, row) in decoded.chunks_exact(16).enumerate() {
            for (j, &c) in exact.columns.iter().enumerate() {
                assert_eq!(row[c as usize], exact.values[o * 2 + j].to_f32());
            }
        }
    }
    let per_tensor: u64 = ["pq.weight", "rtn.weight", "gptq.weight"]
        .iter()
        .map(|n| back.compressed.get(*n).unwrap().bits().total())
        .sum();
    assert_eq!(bits.compressed.total(), per_tensor);
}

/// The fine-tune steps are full ones without the guard and one of the guard's steps (or 0)
/// with it; the guard's own invariants are unit tests of its module.
#[test]
fn guarded_finetune_takes_only_the_documented_steps() {
    let (rows, cols) = (16, 24);
    // Massive tokens (not features): a few rows of the input are enormous.
    let mut x = values(&randn(&[600, cols], 5));
    for t in (0..600).step_by(97) {
        x[t * cols..(t + 1) * cols]
            .iter_mut()
            .for_each(|v| *v *= 400.0);
    }
    let x = Tensor::from_vec(x, (600, cols), &Device::Cpu).unwrap();
    let stats = stats_of(&x);
    let w = values(&randn(&[rows, cols], 6));
    for guard in [FinetuneGuard::Off, FinetuneGuard::HeldOut] {
        let params = PqConfig {
            guard,
            finetune_rounds: 2,
            ..PqConfig::new(2, 8, Objective::ErrorFeedback)
        };
        let out = pq_with_stats(&w, [rows, cols], &params, &stats, 1).unwrap();
        assert_eq!(out.finetune_steps.len(), 2);
        for step in &out.finetune_steps {
            match guard {
                FinetuneGuard::Off => assert_eq!(*step, 1.0),
                FinetuneGuard::HeldOut => {
                    assert!(*step == 0.0 || GUARD_STEPS.contains(step), "{step}")
                }
            }
        }
    }
    // Without a row sample the guard says what it needs.
    let calib = Calibration::new().with_sample_rows(0);
    calib.record("w", &x).unwrap();
    let stats = calib.stats("w").unwrap();
    let params = PqConfig {
        finetune_rounds: 1,
        ..PqConfig::new(2, 8, Objective::ErrorFeedback)
    };
    let e = pq_with_stats(&w, [rows, cols], &params, &stats, 1).unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e:?}");
}

#[test]
fn damaged_calibration_files_are_typed_errors() {
    let calib = Calibration::new().with_sample_rows(3);
    calib.record("a.weight", &randn(&[5, 4], 1)).unwrap();
    let bytes = calib.to_bytes().unwrap();
    for cut in [0, 7, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            Calibration::from_bytes("cut", &bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    // A checkpoint is not a calibration file.
    let checkpoint = Checkpoint::from_tensors([("a.weight", randn(&[2, 2], 1))]).unwrap();
    let out = compress_checkpoint(
        &checkpoint,
        &Plan::new(vec![]),
        &Calibration::new(),
        &ProgressBar::hidden(),
    );
    if let Ok(out) = out {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        out.checkpoint.save(&path).unwrap();
        assert!(Calibration::load(&path).is_err());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calib.safetensors");
    calib.save(&path).unwrap();
    let back = Calibration::load(&path).unwrap();
    assert_eq!(back.stats("a.weight"), calib.stats("a.weight"));
}

/// Staged calibration records each stage's inputs through the earlier stages' compressed
/// weights: fc2's recorded inputs are those of the decompressed fc1.
#[test]
fn staged_calibration_sees_the_compressed_earlier_layers() {
    let dev = Device::Cpu;
    let checkpoint = Checkpoint::from_tensors([
        ("fc1.weight", randn(&[16, 8], 1)),
        ("fc2.weight", randn(&[4, 16], 2)),
    ])
    .unwrap();
    let x = randn(&[64, 8], 3);
    let plan = Plan::new(vec![
        Rule::new("fc1.*", Method::Rtn(ScalarConfig::new(2, None))).unwrap(),
        Rule::new(
            "fc2.*",
            Method::Pq(PqConfig::new(2, 4, Objective::ErrorFeedback)),
        )
        .unwrap(),
    ]);
    let stages = [Pattern::new("fc1.*").unwrap()];
    let mut seen = Vec::new();
    let out = compress_checkpoint_staged(
        &checkpoint,
        &plan,
        &stages,
        |vb, calib| {
            let fc1 = candle_nn::linear_no_bias(8, 16, vb.pp("fc1"))?;
            let h = fc1.forward(&x)?.relu()?;
            calib.record("fc1.weight", &x)?;
            calib.record("fc2.weight", &h)?;
            seen.push(calib.names());
            Ok(())
        },
        &ProgressBar::hidden(),
    )
    .unwrap();
    // Stage 0 (RTN) records nothing; the last stage records fc2 only.
    assert_eq!(seen, vec![vec!["fc2.weight".to_string()]]);
    assert_eq!(out.reports.len(), 2);
    // fc2's H equals the one recorded through the decompressed fc1.
    let fc1 = out
        .checkpoint
        .compressed
        .get("fc1.weight")
        .unwrap()
        .decode()
        .unwrap();
    let fc1 = Tensor::from_vec(fc1, (16, 8), &dev).unwrap();
    let h = x.matmul(&fc1.t().unwrap()).unwrap().relu().unwrap();
    let direct = Calibration::new().restricted_to(["fc2.weight"]);
    direct.record("fc2.weight", &h).unwrap();
    let unstaged = compress_checkpoint(
        &checkpoint,
        &Plan::new(vec![Rule::new(
            "fc2.*",
            Method::Pq(PqConfig::new(2, 4, Objective::ErrorFeedback)),
        )
        .unwrap()]),
        &direct,
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(
        out.checkpoint.compressed.get("fc2.weight"),
        unstaged.checkpoint.compressed.get("fc2.weight")
    );
    // A stage that selects nothing is refused.
    let e = compress_checkpoint_staged(
        &checkpoint,
        &plan,
        &[Pattern::new("nothing.*").unwrap()],
        |_, _| Ok(()),
        &ProgressBar::hidden(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e:?}");
}
