//! A ResNet basic block in training mode as one autograd node:
//! `y = relu(bn₂(conv₂(relu(bn₁(conv₁(x))))) + s)`, with `s = x` or `s = bn_s(conv_s(x))`.
//!
//! Built from separate ops the block is seven autograd nodes (see [`super::fused`] for why
//! that costs). As one node it runs the same kernels in the same order, so its output and
//! gradients equal the separate ops' bit for bit.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{Layout, Shape, Tensor};
use qcl_tensor::Result;

use super::batch_norm::{self, BatchStats, Saved};
use super::conv::{conv_geometry, following_geometry, Conv2dParams};
use super::conv_kernels::{conv_forward, conv_input_grad, conv_weight_grad, ConvGeometry};
use super::cpu::{add_in_place, supported_dtype, BinaryKernel, Float};
use super::elementwise::{AddRelu, ReluGrad};
use super::fused::{flatten_parameters, fused_custom_op, FusedNode, Kept};

/// One BatchNorm of a block: `γ`, `β` (both `[c_out]`) and `ε`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockNorm<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f64,
}

/// One bias-free convolution of a block and its BatchNorm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockConv<'a> {
    pub weight: &'a Tensor,
    pub params: Conv2dParams,
    pub norm: BlockNorm<'a>,
}

/// The parameters of a basic block; `shortcut` is `None` for the identity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BasicBlockParams<'a> {
    pub conv1: BlockConv<'a>,
    pub conv2: BlockConv<'a>,
    pub shortcut: Option<BlockConv<'a>>,
}

impl BasicBlockParams<'_> {
    fn convs(&self) -> impl Iterator<Item = &BlockConv<'_>> {
        [Some(&self.conv1), Some(&self.conv2), self.shortcut.as_ref()]
            .into_iter()
            .flatten()
    }
}

/// The training-mode forward of a basic block as one node, with the batch statistics of its
/// BatchNorms (`bn₁`, `bn₂`, then the shortcut's), or `None` where the fused node does not
/// apply (off the CPU, dtypes other than `f32`/`f64`, mixed dtypes, or shapes that do not chain;
/// the caller then runs the separate ops, which report any shape error).
pub(crate) fn basic_block_train(
    x: &Tensor,
    p: &BasicBlockParams<'_>,
) -> Result<Option<(Tensor, Vec<BatchStats>)>> {
    let dtype = x.dtype();
    let same_kind = |t: &Tensor| t.device().is_cpu() && t.dtype() == dtype;
    if !x.device().is_cpu()
        || !supported_dtype(dtype)
        || x.rank() != 4
        || x.dim(0)? == 0
        || !p.convs().all(|c| {
            same_kind(c.weight)
                && same_kind(c.norm.gamma)
                && same_kind(c.norm.beta)
                && c.weight.rank() == 4
                && c.norm.gamma.dims() == [c.weight.dim(0).unwrap_or(0)]
                && c.norm.beta.dims() == c.norm.gamma.dims()
        })
    {
        return Ok(None);
    }
    let parts: Vec<&Tensor> = p
        .convs()
        .flat_map(|c| [c.weight, c.norm.gamma, c.norm.beta])
        .collect();
    let (flat, ranges) = flatten_parameters(&parts)?;
    let Some(op) = BasicBlockOp::new(x, p, ranges)? else {
        return Ok(None);
    };
    let stats = op.stats.clone();
    let y = x.contiguous()?.apply_op2(&flat, op)?;
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    if stats.len() != 2 + usize::from(p.shortcut.is_some()) {
        return Err(qcl_tensor::Error::invalid_parameter(
            "basic block",
            "the fused forward pass left no batch statistics",
        ));
    }
    Ok(Some((y, stats)))
}

/// The pre-normalisation outputs of the convolutions, the first ReLU's output, and the
/// statistics of each BatchNorm (`bn₁`, `bn₂`, shortcut).
struct Intermediates<T> {
    z1: Vec<T>,
    a1: Vec<T>,
    z2: Vec<T>,
    zs: Vec<T>,
    norms: Vec<Saved>,
}

/// The fused node over `(x, flat parameters)`.
struct BasicBlockOp {
    conv1: ConvGeometry,
    conv2: ConvGeometry,
    shortcut: Option<ConvGeometry>,
    /// ε of `bn₁`, `bn₂` and the shortcut's BatchNorm.
    eps: [f64; 3],
    /// Ranges in the flat parameter vector: `w₁, γ₁, β₁, w₂, γ₂, β₂[, w_s, γ_s, β_s]`.
    ranges: Vec<Range<usize>>,
    saved: Kept,
    /// The batch statistics of the last forward pass (`bn₁`, `bn₂`, shortcut), for the
    /// running estimates.
    stats: Arc<Mutex<Vec<BatchStats>>>,
}

impl BasicBlockOp {
    /// The node for `x` and `p`, or `None` if the shapes do not chain.
    fn new(
        x: &Tensor,
        p: &BasicBlockParams<'_>,
        ranges: Vec<Range<usize>>,
    ) -> Result<Option<Self>> {
        let conv1 = conv_geometry(x, p.conv1.weight, p.conv1.params)?;
        let Some(conv2) = following_geometry(&conv1, p.conv2.weight, p.conv2.params)? else {
            return Ok(None);
        };
        if conv2.c_out != conv1.c_out {
            return Ok(None);
        }
        let out = [conv2.n, conv2.c_out, conv2.h_out, conv2.w_out];
        let shortcut = match &p.shortcut {
            Some(s) => {
                let g = conv_geometry(x, s.weight, s.params)?;
                if [g.n, g.c_out, g.h_out, g.w_out] != out {
                    return Ok(None);
                }
                Some(g)
            }
            None if x.dims() == out => None,
            None => return Ok(None),
        };
        Ok(Some(Self {
            conv1,
            conv2,
            shortcut,
            eps: [
                p.conv1.norm.eps,
                p.conv2.norm.eps,
                p.shortcut.map_or(0.0, |s| s.norm.eps),
            ],
            ranges,
            saved: Kept::default(),
            stats: Arc::default(),
        }))
    }

    /// `[n, c_out, h_out, w_out]`, the shape of the block's output (and of every BatchNorm).
    fn out_dims(&self) -> [usize; 4] {
        let g = &self.conv2;
        [g.n, g.c_out, g.h_out, g.w_out]
    }

    /// The parameter tensor `i` of the flat vector.
    fn param<'a, T>(&self, flat: &'a [T], i: usize) -> &'a [T] {
        &flat[self.ranges[i].clone()]
    }
}

impl FusedNode for BasicBlockOp {
    const NAME: &'static str = "qcl-basic-block";

    type Intermediates<T: Float> = Intermediates<T>;

    fn backward<T: Float>(
        &self,
        kept: &Intermediates<T>,
        (x, flat): (&[T], &[T]),
        (y, dy): (&[T], &[T]),
        want_dx: bool,
    ) -> (Option<Vec<T>>, Vec<T>) {
        let dims = self.out_dims();
        let gamma =
            |i: usize| -> Vec<f64> { self.param(flat, i).iter().map(|v| v.to_f64_()).collect() };
        // The gradient at the sum, shared by both branches.
        let g = ReluGrad.run(dy, y, &dims);
        let (dz2, sum_g2, sum_gx2) = batch_norm::input_gradient(
            &g,
            &kept.z2,
            &g,
            &dims,
            &kept.norms[1],
            &gamma(4),
            (false, true),
        );
        let da1 = conv_input_grad(&self.conv2, &dz2, self.param(flat, 3));
        let dw2 = conv_weight_grad(&self.conv2, &kept.a1, &dz2);
        drop(dz2);
        let (dz1, sum_g1, sum_gx1) = batch_norm::input_gradient(
            &da1,
            &kept.z1,
            &kept.a1,
            &dims,
            &kept.norms[0],
            &gamma(1),
            (true, true),
        );
        drop(da1);
        let dw1 = conv_weight_grad(&self.conv1, x, &dz1);
        let mut dx = want_dx.then(|| conv_input_grad(&self.conv1, &dz1, self.param(flat, 0)));
        drop(dz1);
        let mut dflat = Vec::with_capacity(flat.len());
        let as_t = |v: Vec<f64>| v.into_iter().map(T::from_f64_);
        dflat.extend(dw1);
        dflat.extend(as_t(sum_gx1));
        dflat.extend(as_t(sum_g1));
        dflat.extend(dw2);
        dflat.extend(as_t(sum_gx2));
        dflat.extend(as_t(sum_g2));
        match &self.shortcut {
            Some(gs) => {
                let (dzs, sum_gs, sum_gxs) = batch_norm::input_gradient(
                    &g,
                    &kept.zs,
                    &g,
                    &dims,
                    &kept.norms[2],
                    &gamma(7),
                    (false, true),
                );
                dflat.extend(conv_weight_grad(gs, x, &dzs));
                dflat.extend(as_t(sum_gxs));
                dflat.extend(as_t(sum_gs));
                if let Some(dx) = &mut dx {
                    add_in_place(dx, &conv_input_grad(gs, &dzs, self.param(flat, 6)));
                }
            }
            None => {
                if let Some(dx) = &mut dx {
                    add_in_place(dx, &g);
                }
            }
        }
        (dx, dflat)
    }

    fn output_shape(&self, _x: &Layout) -> Shape {
        Shape::from(self.out_dims().to_vec())
    }

    fn forward<T: Float>(&self, x: &[T], flat: &[T]) -> Vec<T> {
        let dims = self.out_dims();
        let z1 = conv_forward(&self.conv1, x, self.param(flat, 0));
        let bn1 = Saved::of_batch(&z1, &dims, self.eps[0]);
        let a1 = bn1.normalise(&z1, &dims, self.param(flat, 1), self.param(flat, 2), true);
        let z2 = conv_forward(&self.conv2, &a1, self.param(flat, 3));
        let bn2 = Saved::of_batch(&z2, &dims, self.eps[1]);
        let h = bn2.normalise(&z2, &dims, self.param(flat, 4), self.param(flat, 5), false);
        let mut norms = vec![bn1, bn2];
        let (y, zs) = match &self.shortcut {
            Some(g) => {
                let zs = conv_forward(g, x, self.param(flat, 6));
                let bn = Saved::of_batch(&zs, &dims, self.eps[2]);
                let s = bn.normalise(&zs, &dims, self.param(flat, 7), self.param(flat, 8), false);
                norms.push(bn);
                (AddRelu.run(&h, &s, &dims), zs)
            }
            None => (AddRelu.run(&h, x, &dims), Vec::new()),
        };
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) =
            norms.iter().map(Saved::batch_stats).collect();
        self.saved.store(Intermediates {
            z1,
            a1,
            z2,
            zs,
            norms,
        });
        y
    }

    fn kept(&self) -> &Kept {
        &self.saved
    }
}

fused_custom_op!(BasicBlockOp);
