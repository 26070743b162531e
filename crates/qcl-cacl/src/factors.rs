//! SVD-factored layers: `W = N·diag(|s|)·C` with per-task component ranges
//! (docs/methods/cacl.md § Factored layers, § Pruning by energy, § Growth).
//!
//! (Over 600 lines: `SvdFactors` with its frozen prefix, trainable slots, per-task slicing,
//! end-of-task prune, freeze and growth, and save/load is one unit, and the layers that wrap it,
//! `SvdConv2d`, `SvdLinear` and `ForTask`, are thin; about 200 lines are doc comments.)
//!
//! Components are stored as `[frozen prefix of earlier tasks | trainable slots of this
//! task]`. The frozen prefix is plain tensors, so no optimizer can move it; only the
//! trainable slots are `Var`s. Task `s` is evaluated with exactly its first `k_s` components,
//! sliced (never zero-padded) so its outputs stay bit-identical whatever is added later.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use qcl_nn::ops::{conv2d, Conv2dParams};
use qcl_tensor::{Error, Result, SafetensorsFile, Seed};

use crate::rank::{check_rank, energy_prune, free_slots, Growth};
use crate::regularizers::abs_with_sign_gradient;

/// The frozen prefix: components of finished tasks.
#[derive(Debug, Clone)]
struct Frozen {
    n: Tensor,
    s: Tensor,
    c: Tensor,
    /// `N·diag|s|·C` of the whole prefix, cached for the training forward.
    weight: Tensor,
}

/// The trainable slots of the current task.
#[derive(Debug, Clone)]
struct Slots {
    n: Var,
    s: Var,
    c: Var,
}

/// What [`SvdFactors::finish_task`] did to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRankUpdate {
    /// Components added by the task (`chann_used`).
    pub added: usize,
    /// Components in use after the task, `k_t`.
    pub used: usize,
    /// Fresh slots for the next task.
    pub free: usize,
    /// Capacity for the next task, `used + free`.
    pub capacity: usize,
}

/// The factors of one `n_out × d` weight matrix with per-task component ranges.
///
/// ```
/// use candle_core::Device;
/// use qcl_cacl::{Growth, SvdFactors};
/// let mut f = SvdFactors::new(8, 12, 5, qcl_tensor::Seed::new(1), &Device::Cpu)?;
/// assert_eq!((f.capacity(), f.used(), f.r0()), (5, 0, 4));
/// assert_eq!(f.training_weight()?.dims(), &[8, 12]);
/// let update = f.finish_task(1e-3, Growth::MeanCapped)?;
/// assert_eq!(f.task_ranks(), &[update.used]);
/// assert_eq!(f.task_weight(0)?.dims(), &[8, 12]);
/// assert!(f.task_weight(1).is_err()); // task 1 was never trained
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SvdFactors {
    n_out: usize,
    d: usize,
    r0: usize,
    seed: Seed,
    frozen: Option<Frozen>,
    slots: Option<Slots>,
    /// `k_t` for every finished task.
    task_ranks: Vec<usize>,
    device: Device,
}

fn shape_error(context: &str, expected: String, actual: &[usize]) -> Error {
    Error::ShapeMismatch {
        context: context.into(),
        expected,
        actual: actual.to_vec(),
    }
}

/// `N·diag(|s|)·C` for `N [n, r]`, `s [r]`, `C [r, d]`.
fn assemble(n: &Tensor, s: &Tensor, c: &Tensor) -> Result<Tensor> {
    let scale = abs_with_sign_gradient(s)?;
    Ok(n.broadcast_mul(&scale.unsqueeze(0)?)?.matmul(c)?)
}

impl SvdFactors {
    /// Fresh factors of capacity `capacity` for an `n_out × d` matrix, initialised as the
    /// reference does: `N` Kaiming-normal with `std = √(2/capacity)`, `C` with `√(2/d)`,
    /// `s ~ N(0, 1)`, all drawn from `seed`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero dimension or a capacity of 0.
    pub fn new(
        n_out: usize,
        d: usize,
        capacity: usize,
        seed: Seed,
        device: &Device,
    ) -> Result<Self> {
        let r0 = crate::rank::initial_rank(n_out, d).unwrap_or(1);
        if n_out == 0 || d == 0 {
            return Err(Error::invalid_parameter(
                "rank",
                format!("a factored layer needs n_out, d > 0, got {n_out}×{d}"),
            ));
        }
        check_rank(capacity, "the capacity")?;
        let mut factors = SvdFactors {
            n_out,
            d,
            r0,
            seed,
            frozen: None,
            slots: None,
            task_ranks: Vec::new(),
            device: device.clone(),
        };
        factors.slots = Some(factors.fresh_slots(capacity, seed.child_named("task0"))?);
        Ok(factors)
    }

    /// Factors initialised from a dense `n_out × d` weight by a thin SVD (faer, in f64):
    /// `N = U[:, :rank]`, `s = S[:rank]`, `C = V[:, :rank]ᵀ`. With `rank = min(n_out, d)`
    /// the factored weight reproduces `weight` up to rounding. The components are trainable
    /// (the first task's slots).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let w = Tensor::new(&[[3f32, 0.0, 1.0], [0.0, 2.0, 0.0]], &Device::Cpu)?;
    /// let f = qcl_cacl::SvdFactors::from_dense(&w, 2, qcl_tensor::Seed::new(0))?;
    /// let back = f.training_weight()?;
    /// let err = (back - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(err < 1e-5);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `weight` is a matrix; [`Error::InvalidParameter`] for a
    /// rank of 0 or above `min(n_out, d)`; [`Error::NonFinite`] if the SVD fails.
    pub fn from_dense(weight: &Tensor, rank: usize, seed: Seed) -> Result<Self> {
        let (n_out, d) = match weight.dims() {
            &[a, b] => (a, b),
            other => {
                return Err(shape_error(
                    "from_dense",
                    "a matrix [n_out, d]".into(),
                    other,
                ))
            }
        };
        check_rank(rank, "the requested rank")?;
        if rank > n_out.min(d) {
            return Err(Error::invalid_parameter(
                "rank",
                format!(
                    "rank {rank} exceeds min(n_out, d) = {} of a {n_out}×{d} weight",
                    n_out.min(d)
                ),
            ));
        }
        let values = weight.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let m = faer::Mat::<f64>::from_fn(n_out, d, |i, j| values[i][j]);
        let svd = m.thin_svd().map_err(|e| Error::NonFinite {
            context: format!("SVD of the dense weight ({e:?})"),
            index: 0,
            value: f64::NAN,
        })?;
        let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
        let device = weight.device();
        let n: Vec<f32> = (0..n_out)
            .flat_map(|i| (0..rank).map(move |j| u[(i, j)] as f32))
            .collect();
        let sv: Vec<f32> = (0..rank).map(|j| s[j] as f32).collect();
        let c: Vec<f32> = (0..rank)
            .flat_map(|j| (0..d).map(move |k| v[(k, j)] as f32))
            .collect();
        let slots = Slots {
            n: Var::from_tensor(&Tensor::from_vec(n, (n_out, rank), device)?)?,
            s: Var::from_tensor(&Tensor::from_vec(sv, rank, device)?)?,
            c: Var::from_tensor(&Tensor::from_vec(c, (rank, d), device)?)?,
        };
        Ok(SvdFactors {
            n_out,
            d,
            r0: crate::rank::initial_rank(n_out, d).unwrap_or(1),
            seed,
            frozen: None,
            slots: Some(slots),
            task_ranks: Vec::new(),
            device: device.clone(),
        })
    }

    /// Factors from explicit trainable components `N [n_out, r]`, `s [r]`, `C [r, d]` (no
    /// task finished yet); `seed` draws the slots of later tasks.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let n = Tensor::new(&[[1f32], [2.0]], &Device::Cpu)?;
    /// let s = Tensor::new(&[-3f32], &Device::Cpu)?;
    /// let c = Tensor::new(&[[1f32, 1.0, 0.0]], &Device::Cpu)?;
    /// let f = qcl_cacl::SvdFactors::from_parts(&n, &s, &c, qcl_tensor::Seed::new(0))?;
    /// assert_eq!(f.training_weight()?.to_vec2::<f32>()?, [[3.0, 3.0, 0.0], [6.0, 6.0, 0.0]]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for inconsistent shapes; [`Error::InvalidParameter`] for a
    /// rank of 0.
    pub fn from_parts(n: &Tensor, s: &Tensor, c: &Tensor, seed: Seed) -> Result<Self> {
        let r = s
            .dims1()
            .map_err(|_| shape_error("from_parts s", "[r]".into(), s.dims()))?;
        check_rank(r, "the number of components")?;
        let (n_out, d) = match (n.dims(), c.dims()) {
            (&[a, rn], &[rc, b]) if rn == r && rc == r => (a, b),
            _ => {
                return Err(shape_error(
                    "from_parts",
                    format!("N [n_out, {r}] and C [{r}, d]"),
                    &[n.dims(), c.dims()].concat(),
                ))
            }
        };
        Ok(SvdFactors {
            n_out,
            d,
            r0: crate::rank::initial_rank(n_out, d).unwrap_or(1),
            seed,
            frozen: None,
            slots: Some(Slots {
                n: Var::from_tensor(&n.to_dtype(DType::F32)?)?,
                s: Var::from_tensor(&s.to_dtype(DType::F32)?)?,
                c: Var::from_tensor(&c.to_dtype(DType::F32)?)?,
            }),
            task_ranks: Vec::new(),
            device: n.device().clone(),
        })
    }

    fn fresh_slots(&self, count: usize, seed: Seed) -> Result<Slots> {
        let mut rng = seed.rng();
        let n_std = (2.0 / count as f32).sqrt();
        let c_std = (2.0 / self.d as f32).sqrt();
        let n = rng.normal_tensor((self.n_out, count), 0.0, n_std, &self.device)?;
        let c = rng.normal_tensor((count, self.d), 0.0, c_std, &self.device)?;
        let s = rng.normal_tensor(count, 0.0, 1.0, &self.device)?;
        Ok(Slots {
            n: Var::from_tensor(&n)?,
            s: Var::from_tensor(&s)?,
            c: Var::from_tensor(&c)?,
        })
    }

    /// Rows of the weight matrix (output channels).
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// Columns of the weight matrix (`c_in·k²` for a convolution).
    pub fn d(&self) -> usize {
        self.d
    }

    /// The initial capacity `r0` of this shape (see [`crate::initial_rank`]).
    pub fn r0(&self) -> usize {
        self.r0
    }

    /// Components frozen by finished tasks, `k_{t-1}`.
    pub fn used(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.s.dim(0).unwrap_or(0))
    }

    /// Trainable slots of the current task.
    pub fn free(&self) -> usize {
        self.slots.as_ref().map_or(0, |s| s.s.dim(0).unwrap_or(0))
    }

    /// Current capacity `R = used + free`.
    pub fn capacity(&self) -> usize {
        self.used() + self.free()
    }

    /// `k_t` of every finished task, in order (non-decreasing).
    pub fn task_ranks(&self) -> &[usize] {
        &self.task_ranks
    }

    /// The trainable variables `(name, var)` of the current task, named `{prefix}.n`,
    /// `{prefix}.s`, `{prefix}.c`; empty when the layer has no free slot.
    pub fn trainable_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        match &self.slots {
            None => Vec::new(),
            Some(s) => vec![
                (format!("{prefix}.n"), s.n.clone()),
                (format!("{prefix}.s"), s.s.clone()),
                (format!("{prefix}.c"), s.c.clone()),
            ],
        }
    }

    /// All `R` components `(N [n_out, R], s [R], C [R, d])`, frozen then trainable (the
    /// regularizers cover both, docs/methods/cacl.md § Objective).
    ///
    /// # Errors
    /// A candle error from the concatenation.
    pub fn all_components(&self) -> Result<(Tensor, Tensor, Tensor)> {
        match (&self.frozen, &self.slots) {
            (Some(f), Some(s)) => Ok((
                Tensor::cat(&[&f.n, s.n.as_tensor()], 1)?,
                Tensor::cat(&[&f.s, s.s.as_tensor()], 0)?,
                Tensor::cat(&[&f.c, s.c.as_tensor()], 0)?,
            )),
            (Some(f), None) => Ok((f.n.clone(), f.s.clone(), f.c.clone())),
            (None, Some(s)) => Ok((
                s.n.as_tensor().clone(),
                s.s.as_tensor().clone(),
                s.c.as_tensor().clone(),
            )),
            (None, None) => Err(Error::EmptyInput(
                "a factored layer with no component".into(),
            )),
        }
    }

    /// The weight with every component (the training forward): the cached frozen part plus
    /// `N_new·diag|s_new|·C_new`, on the autograd graph of the trainable slots.
    ///
    /// # Errors
    /// A candle error from the arithmetic.
    pub fn training_weight(&self) -> Result<Tensor> {
        let new = match &self.slots {
            Some(s) => Some(assemble(s.n.as_tensor(), s.s.as_tensor(), s.c.as_tensor())?),
            None => None,
        };
        match (&self.frozen, new) {
            (Some(f), Some(w)) => Ok((&f.weight + w)?),
            (Some(f), None) => Ok(f.weight.clone()),
            (None, Some(w)) => Ok(w),
            (None, None) => Ok(Tensor::zeros(
                (self.n_out, self.d),
                DType::F32,
                &self.device,
            )?),
        }
    }

    /// The number of components task `task` uses, `k_task`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task never trained.
    pub fn task_rank(&self, task: usize) -> Result<usize> {
        self.task_ranks.get(task).copied().ok_or_else(|| {
            Error::invalid_parameter(
                "task",
                format!(
                    "task {task} was never trained; the layer knows tasks 0..{}",
                    self.task_ranks.len()
                ),
            )
        })
    }

    /// The weight of finished task `task`: its first `k_task` components only, sliced and
    /// made contiguous so the product is computed identically after any later task.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task never trained.
    pub fn task_weight(&self, task: usize) -> Result<Tensor> {
        let k = self.task_rank(task)?;
        match &self.frozen {
            Some(f) if k > 0 => {
                let n = f.n.narrow(1, 0, k)?.contiguous()?;
                let s = f.s.narrow(0, 0, k)?.contiguous()?;
                let c = f.c.narrow(0, 0, k)?.contiguous()?;
                assemble(&n, &s, &c)
            }
            _ => Ok(Tensor::zeros(
                (self.n_out, self.d),
                DType::F32,
                &self.device,
            )?),
        }
    }

    /// Ends the current task (docs/methods/cacl.md § Pruning by energy, § Growth): prunes its
    /// new components by energy threshold `epsilon`, freezes the kept ones in their original
    /// order behind the old prefix, and re-initialises `free` fresh slots chosen by `growth`
    /// (pruned weights are discarded).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for ε outside (0, 1); [`Error::NonFinite`] for a diverged
    /// singular value.
    pub fn finish_task(&mut self, epsilon: f64, growth: Growth) -> Result<TaskRankUpdate> {
        crate::rank::check_threshold(epsilon)?;
        let previous = self.used();
        let capacity = self.capacity();
        let mut added = 0;
        if let Some(slots) = self.slots.take() {
            let s_values = slots.s.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let kept = energy_prune(&s_values, epsilon)?;
            added = kept.len();
            if added > 0 {
                let index = Tensor::from_vec(
                    kept.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    added,
                    &self.device,
                )?;
                let n = slots.n.as_tensor().detach().index_select(&index, 1)?;
                let s = slots.s.as_tensor().detach().index_select(&index, 0)?;
                let c = slots.c.as_tensor().detach().index_select(&index, 0)?;
                let (n, s, c) = match self.frozen.take() {
                    Some(f) => (
                        Tensor::cat(&[&f.n, &n], 1)?,
                        Tensor::cat(&[&f.s, &s], 0)?,
                        Tensor::cat(&[&f.c, &c], 0)?,
                    ),
                    None => (n, s, c),
                };
                let weight = assemble(&n, &s, &c)?;
                self.frozen = Some(Frozen { n, s, c, weight });
            }
        }
        let used = previous + added;
        let free = free_slots(growth, capacity, used, &self.task_ranks, self.r0);
        self.task_ranks.push(used);
        let task = self.task_ranks.len() as u64;
        self.slots = if free > 0 {
            Some(self.fresh_slots(free, self.seed.child_named("task").child(task))?)
        } else {
            None
        };
        Ok(TaskRankUpdate {
            added,
            used,
            free,
            capacity: used + free,
        })
    }

    /// The tensors of this layer for a checkpoint, named `{prefix}.frozen_{n,s,c}` and
    /// `{prefix}.slots_{n,s,c}` (each present only when non-empty).
    ///
    /// # Errors
    /// None in practice (cloning tensors).
    pub fn named_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(f) = &self.frozen {
            out.push((format!("{prefix}.frozen_n"), f.n.clone()));
            out.push((format!("{prefix}.frozen_s"), f.s.clone()));
            out.push((format!("{prefix}.frozen_c"), f.c.clone()));
        }
        if let Some(s) = &self.slots {
            out.push((format!("{prefix}.slots_n"), s.n.as_tensor().clone()));
            out.push((format!("{prefix}.slots_s"), s.s.as_tensor().clone()));
            out.push((format!("{prefix}.slots_c"), s.c.as_tensor().clone()));
        }
        out
    }

    /// Restores this layer from a checkpoint written with [`named_tensors`](Self::named_tensors)
    /// and the task ranks `task_ranks` stored beside it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the ranks do not match the stored components or the
    /// layer's shape (`n_out`, `d`), or are not non-decreasing; [`Error::MissingTensor`] /
    /// [`Error::BadFile`] from the file.
    pub fn load_from(
        &mut self,
        file: &SafetensorsFile,
        prefix: &str,
        task_ranks: &[usize],
    ) -> Result<()> {
        let mismatch = |reason: String| {
            Error::invalid_parameter("checkpoint ranks", format!("layer `{prefix}`: {reason}"))
        };
        if task_ranks.windows(2).any(|w| w[0] > w[1]) {
            return Err(mismatch(format!("task ranks {task_ranks:?} decrease")));
        }
        let used = task_ranks.last().copied().unwrap_or(0);
        let read = |name: &str| -> Result<Option<Tensor>> {
            let full = format!("{prefix}.{name}");
            if file.contains(&full) {
                Ok(Some(
                    file.tensor(&full, &self.device)?.to_dtype(DType::F32)?,
                ))
            } else {
                Ok(None)
            }
        };
        let frozen = match (read("frozen_n")?, read("frozen_s")?, read("frozen_c")?) {
            (Some(n), Some(s), Some(c)) => Some((n, s, c)),
            (None, None, None) => None,
            _ => return Err(mismatch("incomplete frozen factors".into())),
        };
        let slots = match (read("slots_n")?, read("slots_s")?, read("slots_c")?) {
            (Some(n), Some(s), Some(c)) => Some((n, s, c)),
            (None, None, None) => None,
            _ => return Err(mismatch("incomplete trainable slots".into())),
        };
        let check = |(n, s, c): &(Tensor, Tensor, Tensor), what: &str| -> Result<usize> {
            let r = s
                .dims1()
                .map_err(|_| mismatch(format!("{what} s is not a vector")))?;
            if n.dims() != [self.n_out, r] || c.dims() != [r, self.d] {
                return Err(mismatch(format!(
                    "{what} factors {:?}/{r}/{:?} do not fit a {}×{} layer",
                    n.dims(),
                    c.dims(),
                    self.n_out,
                    self.d
                )));
            }
            Ok(r)
        };
        let frozen_rank = match &frozen {
            Some(f) => check(f, "frozen")?,
            None => 0,
        };
        if frozen_rank != used {
            return Err(mismatch(format!(
                "the ranks say {used} components are frozen, the checkpoint holds {frozen_rank}"
            )));
        }
        if let Some(s) = &slots {
            check(s, "trainable")?;
        }
        self.frozen = match frozen {
            Some((n, s, c)) if frozen_rank > 0 => {
                let weight = assemble(&n, &s, &c)?;
                Some(Frozen { n, s, c, weight })
            }
            _ => None,
        };
        self.slots = match slots {
            Some((n, s, c)) => Some(Slots {
                n: Var::from_tensor(&n)?,
                s: Var::from_tensor(&s)?,
                c: Var::from_tensor(&c)?,
            }),
            None => None,
        };
        self.task_ranks = task_ranks.to_vec();
        Ok(())
    }
}

/// A convolution whose weight is `N·diag(|s|)·C` reshaped to `(n_out, c_in, k, k)` and
/// applied as **one** convolution with qcl-nn's fast op
/// (docs/methods/cacl.md § Factored layers). No bias. As a candle `Module` it runs every
/// component ([`SvdConv2d::forward_train`]); [`SvdConv2d::for_task`] gives a finished task's
/// `Module`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let conv = qcl_cacl::SvdConv2d::new(1, 4, 3, Default::default(), qcl_tensor::Seed::new(0), &Device::Cpu)?;
/// assert_eq!(conv.factors().r0(), 2); // ⌊4·9/13⌋
/// let x = Tensor::zeros((2, 1, 6, 6), DType::F32, &Device::Cpu)?;
/// assert_eq!(conv.forward_train(&x)?.dims(), &[2, 4, 4, 4]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SvdConv2d {
    factors: SvdFactors,
    c_in: usize,
    kernel: usize,
    params: Conv2dParams,
}

impl SvdConv2d {
    /// A factored `c_in → c_out` convolution with a `kernel × kernel` window at its initial
    /// capacity `r0`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero sizes or an initial rank of 0.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        params: Conv2dParams,
        seed: Seed,
        device: &Device,
    ) -> Result<Self> {
        let d = c_in * kernel * kernel;
        let r0 = crate::rank::initial_rank(c_out, d)?;
        Ok(SvdConv2d {
            factors: SvdFactors::new(c_out, d, r0, seed, device)?,
            c_in,
            kernel,
            params,
        })
    }

    /// A factored convolution initialised from a dense weight `(c_out, c_in, k, k)` by SVD,
    /// keeping `rank` components (see [`SvdFactors::from_dense`]).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a weight that is not 4-D with a square kernel; as
    /// [`SvdFactors::from_dense`].
    pub fn from_dense(
        weight: &Tensor,
        rank: usize,
        params: Conv2dParams,
        seed: Seed,
    ) -> Result<Self> {
        let (c_out, c_in, kh, kw) = match weight.dims() {
            &[a, b, h, w] if h == w => (a, b, h, w),
            other => {
                return Err(shape_error(
                    "SvdConv2d::from_dense",
                    "a conv weight [c_out, c_in, k, k]".into(),
                    other,
                ))
            }
        };
        let matrix = weight.reshape((c_out, c_in * kh * kw))?;
        Ok(SvdConv2d {
            factors: SvdFactors::from_dense(&matrix, rank, seed)?,
            c_in,
            kernel: kh,
            params,
        })
    }

    /// The factors.
    pub fn factors(&self) -> &SvdFactors {
        &self.factors
    }

    /// The factors, mutable (to finish a task or load a checkpoint).
    pub fn factors_mut(&mut self) -> &mut SvdFactors {
        &mut self.factors
    }

    fn conv_with(&self, x: &Tensor, matrix: &Tensor) -> Result<Tensor> {
        let w = matrix.reshape((self.factors.n_out, self.c_in, self.kernel, self.kernel))?;
        conv2d(x, &w, self.params)
    }

    /// Convolution with every component (training the current task).
    ///
    /// # Errors
    /// As [`qcl_nn::ops::conv2d`].
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.conv_with(x, &self.factors.training_weight()?)
    }

    /// Convolution of finished task `task` with its first `k_task` components.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task never trained; as [`qcl_nn::ops::conv2d`].
    pub fn forward_task(&self, x: &Tensor, task: usize) -> Result<Tensor> {
        self.conv_with(x, &self.factors.task_weight(task)?)
    }

    /// The layer fixed to finished task `task`, a candle `Module` ([`ForTask`]).
    pub fn for_task(&self, task: usize) -> ForTask<'_, Self> {
        ForTask::new(self, task)
    }
}

/// A fully connected layer `y = x·Wᵀ` with `W = N·diag(|s|)·C` (`[out, in]`), no bias. As a
/// candle `Module` it runs every component; [`SvdLinear::for_task`] gives a finished task's.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let fc = qcl_cacl::SvdLinear::new(16, 8, qcl_tensor::Seed::new(0), &Device::Cpu)?;
/// assert_eq!(fc.factors().capacity(), 5); // ⌊8·16/24⌋
/// let x = Tensor::ones((3, 16), DType::F32, &Device::Cpu)?;
/// assert_eq!(fc.forward_train(&x)?.dims(), &[3, 8]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SvdLinear {
    factors: SvdFactors,
}

impl SvdLinear {
    /// A factored `in_features → out_features` layer at its initial capacity `r0`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for zero sizes or an initial rank of 0.
    pub fn new(
        in_features: usize,
        out_features: usize,
        seed: Seed,
        device: &Device,
    ) -> Result<Self> {
        let r0 = crate::rank::initial_rank(out_features, in_features)?;
        Ok(SvdLinear {
            factors: SvdFactors::new(out_features, in_features, r0, seed, device)?,
        })
    }

    /// A factored layer initialised from a dense weight `[out, in]` by SVD.
    ///
    /// # Errors
    /// As [`SvdFactors::from_dense`].
    pub fn from_dense(weight: &Tensor, rank: usize, seed: Seed) -> Result<Self> {
        Ok(SvdLinear {
            factors: SvdFactors::from_dense(weight, rank, seed)?,
        })
    }

    /// The factors.
    pub fn factors(&self) -> &SvdFactors {
        &self.factors
    }

    /// The factors, mutable.
    pub fn factors_mut(&mut self) -> &mut SvdFactors {
        &mut self.factors
    }

    fn apply(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if x.rank() != 2 || x.dim(1)? != self.factors.d {
            return Err(shape_error(
                "SvdLinear input",
                format!("[batch, {}]", self.factors.d),
                x.dims(),
            ));
        }
        Ok(x.matmul(&w.t()?)?)
    }

    /// Output with every component.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for an input that is not `[batch, in]`.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, &self.factors.training_weight()?)
    }

    /// Output of finished task `task` with its first `k_task` components.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a task never trained; shape errors as above.
    pub fn forward_task(&self, x: &Tensor, task: usize) -> Result<Tensor> {
        self.apply(x, &self.factors.task_weight(task)?)
    }

    /// The layer fixed to finished task `task`, a candle `Module` ([`ForTask`]).
    pub fn for_task(&self, task: usize) -> ForTask<'_, Self> {
        ForTask::new(self, task)
    }
}

/// A view of a layer or model fixed to finished task `task`: a candle [`Module`] running the
/// task's own weights (for a layer, its first `k_task` components; for a
/// [`TaskIncrementalModel`](crate::TaskIncrementalModel), its trunk and head in evaluation
/// mode). Made by `for_task`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use qcl_cacl::SvdLinear;
/// let mut fc = SvdLinear::new(16, 8, qcl_tensor::Seed::new(0), &Device::Cpu)?;
/// fc.factors_mut().finish_task(1e-3, qcl_cacl::Growth::Fixed)?;
/// let x = Tensor::ones((3, 16), DType::F32, &Device::Cpu)?;
/// let task0 = fc.for_task(0);
/// assert_eq!(task0.forward(&x)?.to_vec2::<f32>()?, fc.forward_task(&x, 0)?.to_vec2::<f32>()?);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ForTask<'a, M> {
    model: &'a M,
    task: usize,
}

impl<'a, M> ForTask<'a, M> {
    /// `model` fixed to finished task `task`.
    pub fn new(model: &'a M, task: usize) -> Self {
        ForTask { model, task }
    }

    /// The task.
    pub fn task(&self) -> usize {
        self.task
    }

    /// The layer or model.
    pub fn model(&self) -> &'a M {
        self.model
    }
}

impl Module for SvdConv2d {
    /// [`SvdConv2d::forward_train`]: every component.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_train(x)?)
    }
}

impl Module for ForTask<'_, SvdConv2d> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.model.forward_task(x, self.task)?)
    }
}

impl Module for SvdLinear {
    /// [`SvdLinear::forward_train`]: every component.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_train(x)?)
    }
}

impl Module for ForTask<'_, SvdLinear> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.model.forward_task(x, self.task)?)
    }
}

/// Ranks metadata of several layers as JSON (`{"layer": [k_0, k_1, …]}`), for checkpoints.
pub(crate) fn ranks_json(layers: &[(String, Vec<usize>)]) -> String {
    let map: BTreeMap<&str, &Vec<usize>> = layers.iter().map(|(n, r)| (n.as_str(), r)).collect();
    serde_json::to_string(&map).unwrap_or_default()
}
