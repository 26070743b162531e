//! The recorded inputs of one layer of FMNet, sampled as im2col patches in the layer's layout
//! (the paper's row samples of the E-step metric) and its exact output error.

use candle_core::{DType, Tensor};
use qcl_nn::ops::{conv2d, Conv2dParams};
use qcl_tensor::{Error, Result, SeededRng};

use crate::em::PatchSampler;
use crate::layout::{LayerGeometry, LayerKind};

/// The recorded inputs of one layer (`[N, C, H, W]` for a convolution, `[N, in]` for a linear
/// layer), sampled as im2col patches in the layer's layout.
#[derive(Debug, Clone)]
pub struct LayerInputs {
    geometry: LayerGeometry,
    padding: usize,
    dims: Vec<usize>,
    data: Vec<f32>,
    tensor: Tensor,
}

impl LayerInputs {
    /// Wraps recorded inputs.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `inputs` does not fit the layer.
    pub fn new(geometry: LayerGeometry, padding: usize, inputs: &Tensor) -> Result<Self> {
        let dims = inputs.dims().to_vec();
        let ok = match geometry.kind {
            LayerKind::Conv { c_in, .. } => dims.len() == 4 && dims[1] == c_in,
            LayerKind::Linear { inp, .. } => dims.len() == 2 && dims[1] == inp,
        };
        if !ok || dims[0] == 0 {
            return Err(Error::ShapeMismatch {
                context: "layer inputs".into(),
                expected: format!("{:?} inputs", geometry.kind),
                actual: dims,
            });
        }
        let tensor = inputs.to_dtype(DType::F32)?.contiguous()?;
        let data = tensor.flatten_all()?.to_vec1()?;
        Ok(LayerInputs {
            geometry,
            padding,
            dims,
            data,
            tensor,
        })
    }

    /// The recorded inputs (f32).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// `‖X(M − M̂)‖² / ‖XM‖²` on the recorded inputs: the layer's relative output error.
    ///
    /// # Errors
    /// A candle error for weights of the wrong shape.
    pub fn output_error(&self, reference: &Tensor, quantized: &Tensor) -> Result<f64> {
        let apply = |w: &Tensor| -> Result<Tensor> {
            match self.geometry.kind {
                LayerKind::Conv { .. } => conv2d(
                    &self.tensor,
                    w,
                    Conv2dParams {
                        padding: self.padding,
                        ..Default::default()
                    },
                ),
                LayerKind::Linear { .. } => Ok(self.tensor.matmul(&w.t()?)?),
            }
        };
        let y = apply(reference)?;
        let y_hat = apply(quantized)?;
        let err = (&y - &y_hat)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let norm = y.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok(f64::from(err) / f64::from(norm).max(f64::MIN_POSITIVE))
    }
}

impl LayerInputs {
    /// Output positions per recorded input (`H_out·W_out`, 1 for a linear layer).
    fn positions(&self) -> (usize, usize) {
        match self.geometry.kind {
            LayerKind::Linear { .. } => (1, 1),
            LayerKind::Conv { kh, kw, .. } => {
                let p = self.padding;
                (self.dims[2] + 2 * p + 1 - kh, self.dims[3] + 2 * p + 1 - kw)
            }
        }
    }

    /// Writes the patch of input `i` at output position `(oy, ox)` (zero padding included).
    fn fill_patch(&self, i: usize, oy: usize, ox: usize, patch: &mut [f32]) {
        patch.fill(0.0);
        match self.geometry.kind {
            LayerKind::Linear { inp, .. } => {
                let row = &self.data[i * inp..(i + 1) * inp];
                for (c, v) in row.iter().enumerate() {
                    patch[self.geometry.patch_position(c, 0, 0)] = *v;
                }
            }
            LayerKind::Conv { c_in, kh, kw, .. } => {
                let (h, w) = (self.dims[2], self.dims[3]);
                let p = self.padding as isize;
                for c in 0..c_in {
                    let plane = &self.data[(i * c_in + c) * h * w..(i * c_in + c + 1) * h * w];
                    for y in 0..kh {
                        let iy = (oy + y) as isize - p;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for x in 0..kw {
                            let ix = (ox + x) as isize - p;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            patch[self.geometry.patch_position(c, y, x)] =
                                plane[iy as usize * w + ix as usize];
                        }
                    }
                }
            }
        }
    }

    /// Every patch (im2col), `[N·H_out·W_out, D]` row-major, rows ordered `(n, oy, ox)`, each
    /// in the layer's layout, so that `conv(x, W) = im2col(x)·M`.
    pub fn im2col(&self) -> Vec<f32> {
        let d_in = self.geometry.in_dim();
        let (h_out, w_out) = self.positions();
        let mut out = vec![0f32; self.dims[0] * h_out * w_out * d_in];
        for (r, patch) in out.chunks_exact_mut(d_in).enumerate() {
            let (i, pos) = (r / (h_out * w_out), r % (h_out * w_out));
            self.fill_patch(i, pos / w_out, pos % w_out, patch);
        }
        out
    }
}

impl PatchSampler for LayerInputs {
    fn patch_len(&self) -> usize {
        self.geometry.in_dim()
    }

    fn sample(&self, rows: usize, rng: &mut SeededRng) -> Result<Vec<f32>> {
        let d_in = self.geometry.in_dim();
        let (h_out, w_out) = self.positions();
        let mut out = vec![0f32; rows * d_in];
        for patch in out.chunks_exact_mut(d_in) {
            let i = rng.below(self.dims[0])?;
            let oy = rng.below(h_out)?;
            let ox = rng.below(w_out)?;
            self.fill_patch(i, oy, ox, patch);
        }
        Ok(out)
    }
}
