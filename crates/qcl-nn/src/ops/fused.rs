//! The plumbing shared by fused nodes over `(x, flat parameters)`: dtype dispatch, host
//! access to the tensors in the backward pass, and the gradient tensors.
//!
//! Fusing a sub-network into one node matters on the CPU because candle's backward pass gives
//! every edge between two nodes a fresh zero tensor and an addition (`zeros_like` + `add`, on
//! the calling thread while the worker threads wait) before the gradient moves on; at the
//! sizes of this workspace's models that was a seventh of a training step. A fused node keeps
//! its intermediate tensors to itself, so the only edges left are its input and one flat
//! vector of its parameters (whose pieces are small).

use candle_core::{DType, Layout, Shape, Tensor};

use super::cpu::{host, BinaryKernel, Float};

/// What a fused node's forward pass keeps for its backward pass: one value whose type depends
/// on the dtype (`Vec<f32>` or `Vec<f64>` parts), so it is stored type-erased.
#[derive(Default)]
pub(crate) struct Kept(std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>);

impl Kept {
    /// Replaces the kept value.
    pub fn store<V: std::any::Any + Send>(&self, value: V) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(value));
    }

    /// `f` of the kept value.
    ///
    /// # Errors
    /// When no forward pass kept a value of type `V` (i.e. of this dtype).
    pub fn with<V: std::any::Any, R>(
        &self,
        name: &str,
        f: impl FnOnce(&V) -> R,
    ) -> candle_core::Result<R> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match kept.as_ref().and_then(|v| v.downcast_ref::<V>()) {
            Some(v) => Ok(f(v)),
            None => candle_core::bail!("{name}: backward without a forward pass of this dtype"),
        }
    }
}

/// A sub-network over an input `x` and the concatenation `flat` of its parameters.
pub(crate) trait FusedNode {
    /// The node's name in errors.
    const NAME: &'static str;

    /// What the forward pass keeps for the backward pass, for elements of type `T`.
    type Intermediates<T: Float>: std::any::Any + Send;

    /// The shape of the output for an input of layout `x`.
    fn output_shape(&self, x: &Layout) -> Shape;

    /// The output, keeping its [`FusedNode::Intermediates`] in [`FusedNode::kept`].
    fn forward<T: Float>(&self, x: &[T], flat: &[T]) -> Vec<T>;

    /// Where the forward pass keeps its intermediates.
    fn kept(&self) -> &Kept;

    /// `(∂L/∂x if wanted, ∂L/∂flat)` from what the forward pass kept, the inputs, the output
    /// `y` and its gradient `dy`.
    fn backward<T: Float>(
        &self,
        kept: &Self::Intermediates<T>,
        inputs: (&[T], &[T]),
        output: (&[T], &[T]),
        want_dx: bool,
    ) -> (Option<Vec<T>>, Vec<T>);
}

/// A fused node's forward pass is a host kernel over `(x, flat)`, so its `cpu_fwd` is the one
/// of every other custom op ([`kernel_cpu_fwd`](super::cpu::kernel_cpu_fwd)).
impl<N: FusedNode> BinaryKernel for N {
    fn run<T: Float>(&self, x: &[T], flat: &[T], _dims: &[usize]) -> Vec<T> {
        self.forward(x, flat)
    }

    fn output_shape(&self, x: &Layout, _flat: &Layout) -> Shape {
        FusedNode::output_shape(self, x)
    }
}

/// Implements candle's `CustomOp2` for a [`FusedNode`] over `(x, flat)`.
macro_rules! fused_custom_op {
    ($node:ty) => {
        impl candle_core::CustomOp2 for $node {
            fn name(&self) -> &'static str {
                <Self as $crate::ops::fused::FusedNode>::NAME
            }

            $crate::ops::cpu::kernel_cpu_fwd!(binary);

            fn bwd(
                &self,
                x: &candle_core::Tensor,
                flat: &candle_core::Tensor,
                res: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)>
            {
                $crate::ops::fused::backward(self, (x, flat), (res, grad))
            }
        }
    };
}
pub(crate) use fused_custom_op;

/// The `bwd` of a [`FusedNode`]: gradients for `x` (if it tracks) and `flat`.
pub(crate) fn backward<N: FusedNode>(
    node: &N,
    (x, flat): (&Tensor, &Tensor),
    (res, grad): (&Tensor, &Tensor),
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    match x.dtype() {
        DType::F32 => typed::<N, f32>(node, (x, flat), (res, &grad)),
        DType::F64 => typed::<N, f64>(node, (x, flat), (res, &grad)),
        other => candle_core::bail!("{}: unsupported dtype {other:?}", N::NAME),
    }
}

fn typed<N: FusedNode, T: Float>(
    node: &N,
    (x, flat): (&Tensor, &Tensor),
    (res, grad): (&Tensor, &Tensor),
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (x_storage, x_layout) = x.storage_and_layout();
    let (flat_storage, flat_layout) = flat.storage_and_layout();
    let (y_storage, y_layout) = res.storage_and_layout();
    let (dy_storage, dy_layout) = grad.storage_and_layout();
    let inputs = (
        host::<T>(&x_storage, x_layout)?,
        host::<T>(&flat_storage, flat_layout)?,
    );
    let output = (
        host::<T>(&y_storage, y_layout)?,
        host::<T>(&dy_storage, dy_layout)?,
    );
    let (dx, dflat) = node.kept().with(N::NAME, |kept: &N::Intermediates<T>| {
        node.backward(kept, inputs, output, x.track_op())
    })?;
    let dx = dx
        .map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
        .transpose()?;
    let dflat = if flat.track_op() {
        Some(Tensor::from_vec(dflat, flat.shape(), flat.device())?)
    } else {
        None
    };
    Ok((dx, dflat))
}

/// The concatenation of `parts` (each flattened), and the range each one takes in it.
pub(crate) fn flatten_parameters(
    parts: &[&Tensor],
) -> qcl_tensor::Result<(Tensor, Vec<std::ops::Range<usize>>)> {
    let mut ranges = Vec::with_capacity(parts.len());
    let mut end = 0;
    for t in parts {
        ranges.push(end..end + t.elem_count());
        end += t.elem_count();
    }
    let flat = parts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((Tensor::cat(&flat, 0)?, ranges))
}
