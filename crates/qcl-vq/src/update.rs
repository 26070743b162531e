//! The host-side state updates of a quantizer: assignment histograms, the EMA step and
//! dead-code revival, on plain `f32` slices (see [`CodebookUpdate`](crate::CodebookUpdate)).

use qcl_tensor::{Result, Seed};

/// Per codebook and code, the number of vectors assigned, `[N·K]`.
pub(crate) fn histogram(codes: &[Vec<u32>], k: usize) -> Vec<u64> {
    let mut hist = vec![0u64; codes.len() * k];
    for (n, idx) in codes.iter().enumerate() {
        let h = &mut hist[n * k..(n + 1) * k];
        for &i in idx {
            h[i as usize] += 1;
        }
    }
    hist
}

/// One EMA step of one codebook (see [`CodebookUpdate::Ema`]), computed in `f64` and stored
/// in `f32`; `E = w / c` from the stored values, so the identity holds exactly.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ema_update(
    points: &[f32],
    codes: &[u32],
    hist: &[u64],
    decay: f64,
    eps: f64,
    counts: &mut [f32],
    sums: &mut [f32],
    codebook: &mut [f32],
) {
    let k = counts.len();
    let d = sums.len() / k;
    let mut assigned = vec![0f64; k * d];
    for (v, &i) in points.chunks_exact(d).zip(codes) {
        for (s, &x) in assigned[i as usize * d..(i as usize + 1) * d]
            .iter_mut()
            .zip(v)
        {
            *s += f64::from(x);
        }
    }
    let mut c: Vec<f64> = counts
        .iter()
        .zip(hist)
        .map(|(&c, &h)| decay * f64::from(c) + (1.0 - decay) * h as f64)
        .collect();
    let total: f64 = c.iter().sum();
    let scale = total / (total + k as f64 * eps);
    for (stored, c) in counts.iter_mut().zip(&mut c) {
        *c = (*c + eps) * scale;
        *stored = *c as f32;
    }
    for (code, &count) in counts.iter().enumerate() {
        let range = code * d..(code + 1) * d;
        for ((w, e), &s) in sums[range.clone()]
            .iter_mut()
            .zip(&mut codebook[range.clone()])
            .zip(&assigned[range])
        {
            *w = (decay * f64::from(*w) + (1.0 - decay) * s) as f32;
            *e = *w / count;
        }
    }
}

/// Gives every code of one codebook whose count is below `threshold` a distinct vector of
/// the batch (drawn from `seed`; with more dead codes than vectors, the rest are drawn with
/// replacement) and the count `threshold` (in EMA mode `w = v·c` and `E = w / c`).
/// Returns how many codes were revived.
pub(crate) fn revive(
    points: &[f32],
    d: usize,
    threshold: f32,
    seed: Seed,
    counts: &mut [f32],
    mut sums: Option<&mut [f32]>,
    codebook: &mut [f32],
) -> Result<usize> {
    let dead: Vec<usize> = (0..counts.len())
        .filter(|&k| counts[k] < threshold)
        .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let m = points.len() / d;
    let mut rng = seed.rng();
    let mut rows = rng.sample_indices(m, dead.len().min(m))?;
    while rows.len() < dead.len() {
        rows.push(rng.below(m)?);
    }
    for (&code, &row) in dead.iter().zip(&rows) {
        let v = &points[row * d..(row + 1) * d];
        let e = &mut codebook[code * d..(code + 1) * d];
        counts[code] = threshold;
        match sums.as_deref_mut() {
            Some(w) => {
                let w = &mut w[code * d..(code + 1) * d];
                for ((w, e), &x) in w.iter_mut().zip(e.iter_mut()).zip(v) {
                    *w = x * threshold;
                    *e = *w / threshold;
                }
            }
            None => e.copy_from_slice(v),
        }
    }
    Ok(dead.len())
}
