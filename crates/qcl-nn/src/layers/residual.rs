use candle_core::Tensor;
use qcl_tensor::Result;

use super::{BatchNorm2d, BatchNormConfig, Conv2d, Conv2dConfig, Module, ModuleT};
use crate::ops::add_relu;
use crate::ops::basic_block::{basic_block_train, BasicBlockParams, BlockConv, BlockNorm};
use crate::ops::residual_unit::{residual_unit, UnitConv};
use crate::ParamPath;

/// The shortcut of a [`BasicBlock`] whose shape changes.
#[derive(Debug, Clone)]
pub enum Shortcut {
    /// The input itself (same shape).
    Identity,
    /// 1×1 convolution (no bias) with the block's stride, then BatchNorm ("option B").
    Projection(Conv2d, BatchNorm2d),
}

/// The ResNet basic block: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, 3×3
/// convolutions without bias, the first with the block's stride.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::{BasicBlock, ModuleT};
/// let store = qcl_nn::ParamStore::new(0);
/// let block = BasicBlock::new(&store.root(&Device::Cpu).pp("block"), 16, 32, 2)?;
/// let y = block.forward_t(&Tensor::randn(0f32, 1.0, (2, 16, 8, 8), &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), &[2, 32, 4, 4]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: Shortcut,
}

impl BasicBlock {
    /// A block from `c_in` to `c_out` channels; a projection shortcut is used when the stride
    /// is not 1 or the width changes. Parameters: `conv1`, `bn1`, `conv2`, `bn2`,
    /// `shortcut.0` (conv), `shortcut.1` (BatchNorm).
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for zero channels or stride.
    pub fn new(path: &ParamPath, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let conv3 = |s: usize| Conv2dConfig {
            stride: s,
            padding: 1,
            dilation: 1,
            bias: false,
        };
        let bn = BatchNormConfig::default();
        let shortcut = if stride != 1 || c_in != c_out {
            let p = path.pp("shortcut");
            Shortcut::Projection(
                Conv2d::new(
                    &p.pp(0),
                    c_in,
                    c_out,
                    1,
                    Conv2dConfig {
                        stride,
                        padding: 0,
                        dilation: 1,
                        bias: false,
                    },
                )?,
                BatchNorm2d::new(&p.pp(1), c_out, bn)?,
            )
        } else {
            Shortcut::Identity
        };
        Ok(Self {
            conv1: Conv2d::new(&path.pp("conv1"), c_in, c_out, 3, conv3(stride))?,
            bn1: BatchNorm2d::new(&path.pp("bn1"), c_out, bn)?,
            conv2: Conv2d::new(&path.pp("conv2"), c_out, c_out, 3, conv3(1))?,
            bn2: BatchNorm2d::new(&path.pp("bn2"), c_out, bn)?,
            shortcut,
        })
    }
}

impl BasicBlock {
    /// The parameters as the fused training node takes them, if every convolution is
    /// bias-free (as [`BasicBlock::new`] builds them).
    fn fused_params(&self) -> Option<BasicBlockParams<'_>> {
        fn part<'a>(conv: &'a Conv2d, bn: &'a BatchNorm2d) -> Option<BlockConv<'a>> {
            conv.bias().is_none().then(|| BlockConv {
                weight: conv.weight(),
                params: conv.config().op_params(),
                norm: BlockNorm {
                    gamma: bn.weight(),
                    beta: bn.bias(),
                    eps: bn.config().eps,
                },
            })
        }
        Some(BasicBlockParams {
            conv1: part(&self.conv1, &self.bn1)?,
            conv2: part(&self.conv2, &self.bn2)?,
            shortcut: match &self.shortcut {
                Shortcut::Identity => None,
                Shortcut::Projection(conv, bn) => Some(part(conv, bn)?),
            },
        })
    }

    /// The block as separate ops (evaluation, other devices, and the reference in tests).
    fn forward_separate_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let h = self.bn2.forward_t(&self.conv2.forward(&h)?, train)?;
        let s = match &self.shortcut {
            Shortcut::Identity => x.clone(),
            Shortcut::Projection(conv, bn) => bn.forward_t(&conv.forward(x)?, train)?,
        };
        add_relu(&h, &s)
    }
}

impl ModuleT for BasicBlock {
    /// In training mode on the CPU the block is one fused autograd node (same values and
    /// gradients as the separate ops, without candle's per-edge gradient bookkeeping).
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.apply(x, train)?)
    }
}

impl BasicBlock {
    fn apply(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            if let Some(params) = self.fused_params() {
                if let Some((y, stats)) = basic_block_train(x, &params)? {
                    self.bn1.update_running(&stats[0])?;
                    self.bn2.update_running(&stats[1])?;
                    if let Shortcut::Projection(_, bn) = &self.shortcut {
                        bn.update_running(&stats[2])?;
                    }
                    return Ok(y);
                }
            }
        }
        self.forward_separate_t(x, train)
    }
}

/// The residual unit of VQ-VAE-style autoencoders: `relu(x + second(relu(first(x))))`, where
/// `second` must map `first`'s output back to `x`'s shape (typically a 3×3 then a 1×1
/// convolution). The caller passes `x` already rectified where the architecture has a ReLU
/// before the unit.
///
/// On the CPU, with biases on both convolutions, the unit is one autograd node (the same
/// values and gradients as the separate ops, without candle's per-edge gradient bookkeeping);
/// otherwise it is the separate ops.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qcl_nn::layers::{residual_relu, Conv2d, Conv2dConfig};
/// let store = qcl_nn::ParamStore::new(0);
/// let root = store.root(&Device::Cpu);
/// let first = Conv2d::new(&root.pp("r1"), 8, 8, 3, Conv2dConfig { padding: 1, ..Default::default() })?;
/// let second = Conv2d::new(&root.pp("r2"), 8, 8, 1, Conv2dConfig::default())?;
/// let x = Tensor::rand(0f32, 1.0, (2, 8, 7, 7), &Device::Cpu)?;
/// let y = residual_relu(&x, &first, &second)?;
/// assert_eq!(y.dims(), x.dims());
/// assert!(y.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| *v >= 0.0));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As the convolutions' and [`add_relu`]'s: shapes that do not chain back to `x`'s.
pub fn residual_relu(x: &Tensor, first: &Conv2d, second: &Conv2d) -> Result<Tensor> {
    if let (Some(b1), Some(b2)) = (first.bias(), second.bias()) {
        fn unit<'a>(conv: &'a Conv2d, bias: &'a Tensor) -> UnitConv<'a> {
            UnitConv {
                weight: conv.weight(),
                bias,
                params: conv.config().op_params(),
            }
        }
        if let Some(y) = residual_unit(x, unit(first, b1), unit(second, b2))? {
            return Ok(y);
        }
    }
    residual_relu_separate(x, first, second)
}

/// [`residual_relu`] as separate ops.
fn residual_relu_separate(x: &Tensor, first: &Conv2d, second: &Conv2d) -> Result<Tensor> {
    add_relu(x, &second.forward(&first.forward_relu(x)?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use proptest::prelude::*;

    use super::*;
    use crate::ParamStore;

    /// Everything one training step of a block produces: output, input gradient, parameter
    /// gradients and the running statistics afterwards, as raw values.
    type Step = (Vec<f64>, Vec<f64>, Vec<(String, Vec<f64>)>, Vec<Vec<f64>>);

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The fused nodes under test.
    #[derive(Debug, Clone, Copy)]
    enum Net {
        /// A [`BasicBlock`] `(c_in, c_out, stride)`.
        Block(usize, usize, usize),
        /// A residual unit `(c, m)`: `c → m → c` (3×3 then 1×1).
        Unit(usize, usize),
    }

    /// One forward and backward pass of a fresh `net` (same seed, so same weights each call),
    /// fused or as separate ops, on `n` inputs of `size × size`, with a loss `Σ y·r` that weighs
    /// every output differently.
    fn step(net: Net, (n, size): (usize, usize), dtype: DType, fused: bool, seed: u64) -> Step {
        let store = ParamStore::new(seed);
        let root = store.root(&Device::Cpu).with_dtype(dtype);
        match net {
            Net::Block(c_in, c_out, stride) => {
                let block = BasicBlock::new(&root.pp("block"), c_in, c_out, stride).unwrap();
                // Non-trivial γ and β, so that a swapped or missing BatchNorm parameter shows.
                for (i, (name, var)) in store.trainable().into_iter().enumerate() {
                    if name.ends_with("weight") && var.rank() == 1 || name.ends_with("bias") {
                        let len = var.elem_count();
                        let v = Tensor::arange(0.0, len as f64, &Device::Cpu).unwrap();
                        let v = ((v * 0.1).unwrap() + (0.5 + 0.1 * i as f64)).unwrap();
                        var.set(&v.to_dtype(dtype).unwrap()).unwrap();
                    }
                }
                outcome(&store, &[n, c_in, size, size], dtype, seed, |x| {
                    if fused {
                        block.apply(x, true)
                    } else {
                        block.forward_separate_t(x, true)
                    }
                })
            }
            Net::Unit(c, m) => {
                let same = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                let first = Conv2d::new(&root.pp("r1"), c, m, 3, same).unwrap();
                let second = Conv2d::new(&root.pp("r2"), m, c, 1, Conv2dConfig::default()).unwrap();
                outcome(&store, &[n, c, size, size], dtype, seed, |x| {
                    if fused {
                        residual_relu(x, &first, &second)
                    } else {
                        residual_relu_separate(x, &first, &second)
                    }
                })
            }
        }
    }

    /// Runs `forward` on a seeded normal input of `x_dims` and returns its output, the input
    /// and parameter gradients of `Σ y·r` (seeded normal `r`), and the buffers afterwards.
    fn outcome(
        store: &ParamStore,
        x_dims: &[usize],
        dtype: DType,
        seed: u64,
        forward: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Step {
        let mut rng = qcl_tensor::Seed(seed).rng();
        let mut normal = |dims: &[usize]| {
            rng.normal_tensor(dims, 0.0, 1.0, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let x = Var::from_tensor(&normal(x_dims)).unwrap();
        let y = forward(x.as_tensor()).unwrap();
        let r = normal(y.dims());
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let params = store
            .trainable()
            .into_iter()
            .map(|(name, var)| {
                let g = grads
                    .get(var.as_tensor())
                    .expect("every parameter gets a gradient");
                (name, values(g))
            })
            .collect();
        let buffers = store
            .buffers()
            .into_iter()
            .map(|(_, var)| values(var.as_tensor()))
            .collect();
        (
            values(&y),
            values(grads.get(x.as_tensor()).unwrap()),
            params,
            buffers,
        )
    }

    fn assert_same_step(fused: Step, separate: Step) {
        assert_eq!(fused.0, separate.0, "output");
        assert_eq!(fused.1, separate.1, "input gradient");
        assert_eq!(fused.2.len(), separate.2.len());
        for ((name, a), (_, b)) in fused.2.iter().zip(&separate.2) {
            assert_eq!(a, b, "gradient of {name}");
        }
        assert_eq!(fused.3, separate.3, "running statistics");
    }

    fn assert_fused_equals_separate(net: Net, input: (usize, usize), dtype: DType, seed: u64) {
        assert_same_step(
            step(net, input, dtype, true, seed),
            step(net, input, dtype, false, seed),
        );
    }

    #[test]
    fn the_fused_residual_unit_equals_the_separate_ops_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            for ((c, m), input, seed) in [
                ((4, 4), (3, 6), 1),
                ((2, 5), (2, 9), 2),
                ((3, 1), (1, 4), 3),
            ] {
                assert_fused_equals_separate(Net::Unit(c, m), input, dtype, seed);
            }
        }
    }

    #[test]
    fn a_residual_unit_whose_shapes_do_not_chain_is_a_shape_error() {
        let store = ParamStore::new(6);
        let root = store.root(&Device::Cpu);
        let first = Conv2d::new(&root.pp("r1"), 3, 4, 3, Conv2dConfig::default()).unwrap();
        let second = Conv2d::new(&root.pp("r2"), 4, 3, 1, Conv2dConfig::default()).unwrap();
        // No padding: the unit's output is smaller than its input.
        let x = Tensor::zeros((1, 3, 6, 6), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            residual_relu(&x, &first, &second),
            Err(qcl_tensor::Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn the_fused_block_equals_the_separate_ops_bit_for_bit() {
        // Identity shortcut, then a projection with stride 2, in both float types.
        for dtype in [DType::F32, DType::F64] {
            assert_fused_equals_separate(Net::Block(4, 4, 1), (3, 6), dtype, 1);
            assert_fused_equals_separate(Net::Block(4, 8, 2), (2, 7), dtype, 2);
            assert_fused_equals_separate(Net::Block(3, 5, 1), (2, 5), dtype, 3);
        }
    }

    #[test]
    fn the_fused_block_is_one_node_and_gives_the_input_no_gradient_it_does_not_need() {
        let store = ParamStore::new(4);
        let block = BasicBlock::new(&store.root(&Device::Cpu).pp("b"), 2, 2, 1).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 2, 5, 5), &Device::Cpu).unwrap();
        let y = block.forward_t(&x, true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        for (name, var) in store.trainable() {
            assert!(grads.get(var.as_tensor()).is_some(), "{name}");
        }
    }

    #[test]
    fn evaluation_mode_uses_the_running_statistics() {
        let store = ParamStore::new(5);
        let block = BasicBlock::new(&store.root(&Device::Cpu).pp("b"), 2, 2, 1).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 2, 5, 5), &Device::Cpu).unwrap();
        let before = values(&block.forward_t(&x, false).unwrap());
        block.forward_t(&x, true).unwrap();
        // Training moved the running statistics, so evaluation now differs.
        assert_ne!(values(&block.forward_t(&x, false).unwrap()), before);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn fused_and_separate_blocks_agree_for_random_shapes(
            c_in in 1usize..6,
            c_out in 1usize..6,
            stride in 1usize..3,
            n in 1usize..4,
            size in 3usize..9,
            seed in 0u64..1000,
        ) {
            assert_fused_equals_separate(Net::Block(c_in, c_out, stride), (n, size), DType::F32, seed);
        }

        #[test]
        fn fused_and_separate_residual_units_agree_for_random_shapes(
            c in 1usize..6,
            m in 1usize..6,
            n in 1usize..4,
            size in 1usize..9,
            seed in 0u64..1000,
        ) {
            assert_fused_equals_separate(Net::Unit(c, m), (n, size), DType::F32, seed);
        }
    }
}
