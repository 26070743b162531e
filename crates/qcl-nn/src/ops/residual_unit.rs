//! The residual unit of VQ-VAE-style autoencoders as one autograd node:
//! `y = relu(x + conv_b(relu(conv_a(x) + b_a)) + b_b)`, both convolutions with a bias.
//!
//! As separate ops the unit is three nodes (see [`super::fused`] for why that costs); as one
//! node it runs the same kernels in the same order, so its output and gradients equal the
//! separate ops' bit for bit.

use std::ops::Range;

use candle_core::{Layout, Shape, Tensor};
use qcl_tensor::Result;

use super::conv::{conv_geometry, following_geometry, Conv2dParams};
use super::conv_kernels::{conv_forward, conv_input_grad, conv_weight_grad, ConvGeometry};
use super::cpu::{add_in_place, supported_dtype, BinaryKernel, Float, UnaryKernel};
use super::elementwise::{add_bias_in_place, AddRelu, ChannelSum, ReluGrad};
use super::fused::{flatten_parameters, fused_custom_op, FusedNode, Kept};

/// One convolution of the unit: weight `[c_out, c_in, kh, kw]`, bias `[c_out]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnitConv<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub params: Conv2dParams,
}

/// `relu(x + second(relu(first(x))))` as one node, or `None` where it does not apply (off the
/// CPU, dtypes other than `f32`/`f64`, mixed dtypes, or shapes that do not chain back to `x`'s;
/// the caller then runs the separate ops, which report any shape error).
pub(crate) fn residual_unit(
    x: &Tensor,
    first: UnitConv<'_>,
    second: UnitConv<'_>,
) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let fits = |c: &UnitConv<'_>| {
        [c.weight, c.bias]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype)
            && c.weight.rank() == 4
            && c.bias.dims() == [c.weight.dim(0).unwrap_or(0)]
    };
    if !x.device().is_cpu()
        || !supported_dtype(dtype)
        || x.rank() != 4
        || x.dim(0)? == 0
        || !fits(&first)
        || !fits(&second)
    {
        return Ok(None);
    }
    let g1 = conv_geometry(x, first.weight, first.params)?;
    let Some(g2) = following_geometry(&g1, second.weight, second.params)? else {
        return Ok(None);
    };
    if [g2.n, g2.c_out, g2.h_out, g2.w_out] != x.dims() {
        return Ok(None);
    }
    let (flat, ranges) =
        flatten_parameters(&[first.weight, first.bias, second.weight, second.bias])?;
    let op = ResidualUnitOp {
        first: g1,
        second: g2,
        ranges,
        saved: Kept::default(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&flat, op)?))
}

/// The fused node over `(x, [w_a, b_a, w_b, b_b])`.
struct ResidualUnitOp {
    first: ConvGeometry,
    second: ConvGeometry,
    ranges: Vec<Range<usize>>,
    /// The first convolution's rectified output, `Vec<f32>` or `Vec<f64>`.
    saved: Kept,
}

impl ResidualUnitOp {
    fn param<'a, T>(&self, flat: &'a [T], i: usize) -> &'a [T] {
        &flat[self.ranges[i].clone()]
    }
}

impl FusedNode for ResidualUnitOp {
    const NAME: &'static str = "qcl-residual-unit";

    /// The first convolution's rectified output.
    type Intermediates<T: Float> = Vec<T>;

    /// The gradients given the first convolution's rectified output `a`.
    fn backward<T: Float>(
        &self,
        a: &Vec<T>,
        (x, flat): (&[T], &[T]),
        (y, dy): (&[T], &[T]),
        want_dx: bool,
    ) -> (Option<Vec<T>>, Vec<T>) {
        let (g1, g2) = (&self.first, &self.second);
        let dims1 = [g1.n, g1.c_out, g1.h_out, g1.w_out];
        let dims2 = [g2.n, g2.c_out, g2.h_out, g2.w_out];
        // The gradient at the sum, shared by the skip and the second convolution.
        let g = ReluGrad.run(dy, y, &[]);
        let db2 = ChannelSum.run(&g, &dims2);
        let da = conv_input_grad(g2, &g, self.param(flat, 2));
        let dw2 = conv_weight_grad(g2, a, &g);
        let ga = ReluGrad.run(&da, a, &[]);
        drop(da);
        let db1 = ChannelSum.run(&ga, &dims1);
        let dw1 = conv_weight_grad(g1, x, &ga);
        let dx = want_dx.then(|| {
            let mut dx = conv_input_grad(g1, &ga, self.param(flat, 0));
            add_in_place(&mut dx, &g);
            dx
        });
        let mut dflat = Vec::with_capacity(flat.len());
        for part in [dw1, db1, dw2, db2] {
            dflat.extend(part);
        }
        (dx, dflat)
    }

    fn output_shape(&self, x: &Layout) -> Shape {
        x.shape().clone()
    }

    fn forward<T: Float>(&self, x: &[T], flat: &[T]) -> Vec<T> {
        let (g1, g2) = (&self.first, &self.second);
        let mut a = conv_forward(g1, x, self.param(flat, 0));
        add_bias_in_place(&mut a, self.param(flat, 1), g1.hw_out(), true);
        let mut r = conv_forward(g2, &a, self.param(flat, 2));
        add_bias_in_place(&mut r, self.param(flat, 3), g2.hw_out(), false);
        let y = AddRelu.run(x, &r, &[]);
        self.saved.store(a);
        y
    }

    fn kept(&self) -> &Kept {
        &self.saved
    }
}

fused_custom_op!(ResidualUnitOp);
