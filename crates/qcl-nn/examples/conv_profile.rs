//! Per-shape timing (best of 9) of the three convolution products at ResNet-20 sizes, batch 128.
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use qcl_nn::ops::{conv2d, Conv2dParams};

fn best(
    mut f: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut best = f64::INFINITY;
    for _ in 0..9 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qcl_tensor::tune_process_for_numeric_loops();
    let dev = Device::Cpu;
    // (c_in, c_out, size_in, kernel, stride, count in ResNet-20)
    let shapes = [
        (1, 16, 28, 3, 1, 1),
        (16, 16, 28, 3, 1, 6),
        (16, 32, 28, 3, 2, 1),
        (16, 32, 28, 1, 2, 1),
        (32, 32, 14, 3, 1, 5),
        (32, 64, 14, 3, 2, 1),
        (32, 64, 14, 1, 2, 1),
        (64, 64, 7, 3, 1, 5),
    ];
    let mut totals = [0.0f64; 3];
    for (ci, co, s, k, st, count) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, ci, s, s), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, ci, k, k), &dev)?)?;
        let p = Conv2dParams {
            stride: st,
            padding: k / 2,
            dilation: 1,
        };
        let y = conv2d(&x, &w, p)?;
        let (_, _, ho, wo) = y.dims4()?;
        let grad = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
        let flop = 2.0 * 128.0 * (co * ci * k * k * ho * wo) as f64;
        let fwd = best(|| {
            conv2d(x.as_tensor(), w.as_tensor(), p)?;
            Ok(())
        })?;
        // Backward through a product with a fixed gradient: `Σ y ⊙ grad`.
        let both = best(|| {
            let y = conv2d(x.as_tensor(), w.as_tensor(), p)?;
            y.mul(&grad)?.sum_all()?.backward()?;
            Ok(())
        })?;
        let only_w = best(|| {
            let y = conv2d(&x.as_tensor().detach(), w.as_tensor(), p)?;
            y.mul(&grad)?.sum_all()?.backward()?;
            Ok(())
        })?;
        let dw = only_w - fwd;
        let dx = both - only_w;
        totals[0] += fwd * count as f64;
        totals[1] += dx * count as f64;
        totals[2] += dw * count as f64;
        println!(
            "{ci:>3}->{co:<3} {s:>2}px k{k} s{st}: fwd {:6.2} ms ({:5.1} GF/s)  dx {:6.2} ms ({:5.1})  dw {:6.2} ms ({:5.1})",
            fwd * 1e3,
            flop / fwd / 1e9,
            dx * 1e3,
            flop / dx / 1e9,
            dw * 1e3,
            flop / dw / 1e9
        );
    }
    println!(
        "ResNet-20 totals (stem dx included): fwd {:.1} ms, dx {:.1} ms, dw {:.1} ms",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
    Ok(())
}
