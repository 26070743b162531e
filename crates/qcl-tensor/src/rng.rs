//! Seeds and seeded random streams.
//!
//! Every random choice in qcl comes from a [`Seed`]. A seed opens a [`SeededRng`] (ChaCha12)
//! and derives independent *child* seeds by index or by name, so that each worker, task, epoch
//! or layer draws from its own stream: results never depend on how many threads ran or in which
//! order work was scheduled. A generator's exact position can be saved ([`RngState`]) and
//! restored, which checkpoints need to resume bit-identically.

use candle_core::{Device, Shape, Tensor};
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::{ChaCha12Rng, ChaCha20Rng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A 64-bit seed from which all randomness of a run is derived.
///
/// ```
/// use qcl_tensor::Seed;
/// let seed = Seed::new(42);
/// // The same seed gives the same numbers; children are independent streams.
/// assert_eq!(seed.rng().permutation(5), seed.rng().permutation(5));
/// assert_ne!(seed.child(0), seed.child(1));
/// assert_eq!(seed.child_named("task-3"), Seed::new(42).child_named("task-3"));
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)] // a plain number in JSON configs and files
pub struct Seed(pub u64);

impl Seed {
    /// A seed with this value.
    pub const fn new(value: u64) -> Self {
        Seed(value)
    }

    /// The seed's value.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// The seed of child stream `index`.
    ///
    /// Derived with ChaCha20 keyed by this seed, on stream `index`: children of one parent are
    /// independent of each other and of the parent's own [`rng`](Seed::rng) stream (ChaCha12).
    pub fn child(self, index: u64) -> Seed {
        let mut derive = ChaCha20Rng::seed_from_u64(self.0);
        derive.set_stream(index);
        Seed(derive.next_u64())
    }

    /// The seed of the child named `label` (FNV-1a of the label, then [`child`](Seed::child)).
    pub fn child_named(self, label: &str) -> Seed {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in label.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.child(hash)
    }

    /// A fresh generator at the start of this seed's stream.
    pub fn rng(self) -> SeededRng {
        SeededRng {
            inner: ChaCha12Rng::seed_from_u64(self.0),
        }
    }
}

impl std::fmt::Display for Seed {
    /// The number, as it was given.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Seed {
    fn from(value: u64) -> Self {
        Seed(value)
    }
}

/// A seeded ChaCha12 generator with the draws qcl needs (shuffles, permutations, tensors).
///
/// It implements [`rand::RngCore`], so every `rand` distribution works with it too.
///
/// ```
/// use qcl_tensor::Seed;
/// let mut rng = Seed::new(7).rng();
/// let t = rng.normal_tensor((2, 3), 0.0, 1.0, &candle_core::Device::Cpu)?;
/// assert_eq!(t.dims(), &[2, 3]);
/// let mut again = Seed::new(7).rng();
/// let u = again.normal_tensor((2, 3), 0.0, 1.0, &candle_core::Device::Cpu)?;
/// assert_eq!(t.to_vec2::<f32>()?, u.to_vec2::<f32>()?);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededRng {
    inner: ChaCha12Rng,
}

impl SeededRng {
    /// The generator's exact position, to be saved in a checkpoint.
    pub fn state(&self) -> RngState {
        RngState {
            key: self.inner.get_seed(),
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos(),
        }
    }

    /// A generator at a saved position: it continues exactly where the saved one was.
    pub fn from_state(state: &RngState) -> Self {
        let mut inner = ChaCha12Rng::from_seed(state.key);
        inner.set_stream(state.stream);
        inner.set_word_pos(state.word_pos);
        SeededRng { inner }
    }

    /// Uniform `f32` in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.inner.random::<f32>()
    }

    /// Uniform integer in `0..n`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `n == 0`.
    pub fn below(&mut self, n: usize) -> Result<usize> {
        if n == 0 {
            return Err(Error::invalid_parameter(
                "n",
                "cannot draw from an empty range 0..0",
            ));
        }
        Ok(self.inner.random_range(0..n))
    }

    /// Fisher-Yates shuffle of `items` in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.inner.random_range(0..=i);
            items.swap(i, j);
        }
    }

    /// A uniformly random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        self.shuffle(&mut order);
        order
    }

    /// `k` distinct indices drawn uniformly from `0..n`, in the order drawn.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `k > n`.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Result<Vec<usize>> {
        if k > n {
            return Err(Error::invalid_parameter(
                "k",
                format!("cannot draw {k} distinct indices from {n}"),
            ));
        }
        // Partial Fisher-Yates. A few draws from many indices keep only the positions they
        // displaced (O(k) memory instead of O(n): drawing 65,536 rows of 1.2 M holds about
        // 3 MB of map and result, not 9.6 MB); the same draws give the same indices either way.
        if k.saturating_mul(8) >= n {
            let mut order: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.inner.random_range(i..n);
                order.swap(i, j);
            }
            order.truncate(k);
            return Ok(order);
        }
        let mut displaced: std::collections::HashMap<usize, usize> =
            std::collections::HashMap::with_capacity(k);
        let mut drawn = Vec::with_capacity(k);
        for i in 0..k {
            let j = self.inner.random_range(i..n);
            // Position `i` is never read again: only `j` needs to remember what it holds now.
            let at_i = displaced.remove(&i).unwrap_or(i);
            let at_j = if j == i {
                at_i
            } else {
                displaced.insert(j, at_i).unwrap_or(j)
            };
            drawn.push(at_j);
        }
        Ok(drawn)
    }

    /// `len` draws from N(mean, std²).
    pub fn normal_vec(&mut self, len: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut self.inner);
                mean + std * z
            })
            .collect()
    }

    /// `len` draws from U[low, high).
    pub fn uniform_vec(&mut self, len: usize, low: f32, high: f32) -> Vec<f32> {
        (0..len)
            .map(|_| low + (high - low) * self.inner.random::<f32>())
            .collect()
    }

    /// An `f32` tensor of draws from N(mean, std²), generated on the host so that it is the
    /// same on every device.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite `std`.
    pub fn normal_tensor(
        &mut self,
        shape: impl Into<Shape>,
        mean: f32,
        std: f32,
        device: &Device,
    ) -> Result<Tensor> {
        if !(std.is_finite() && std >= 0.0 && mean.is_finite()) {
            return Err(Error::invalid_parameter(
                "std",
                format!("need finite mean and std >= 0, got mean {mean}, std {std}"),
            ));
        }
        let shape = shape.into();
        let values = self.normal_vec(shape.elem_count(), mean, std);
        Ok(Tensor::from_vec(values, shape, device)?)
    }

    /// An `f32` tensor of draws from U[low, high), generated on the host.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `low <= high`, both finite.
    pub fn uniform_tensor(
        &mut self,
        shape: impl Into<Shape>,
        low: f32,
        high: f32,
        device: &Device,
    ) -> Result<Tensor> {
        if !(low.is_finite() && high.is_finite() && low <= high) {
            return Err(Error::invalid_parameter(
                "low/high",
                format!("need finite low <= high, got [{low}, {high})"),
            ));
        }
        let shape = shape.into();
        let values = self.uniform_vec(shape.elem_count(), low, high);
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest)
    }
}

/// The exact position of a [`SeededRng`]: key, stream and word position.
///
/// ```
/// use qcl_tensor::{RngState, Seed, SeededRng};
/// let mut rng = Seed::new(1).rng();
/// rng.uniform();
/// let saved = RngState::from_bytes(&rng.state().to_bytes())?;
/// let mut resumed = SeededRng::from_state(&saved);
/// assert_eq!(rng.uniform(), resumed.uniform());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngState {
    /// The 256-bit ChaCha key.
    pub key: [u8; 32],
    /// The ChaCha stream.
    pub stream: u64,
    /// The position in the stream, in 32-bit words.
    pub word_pos: u128,
}

impl RngState {
    /// Length of [`to_bytes`](RngState::to_bytes)' output.
    pub const BYTES: usize = 32 + 8 + 16;

    /// Little-endian bytes: key, stream, word position.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..32].copy_from_slice(&self.key);
        out[32..40].copy_from_slice(&self.stream.to_le_bytes());
        out[40..].copy_from_slice(&self.word_pos.to_le_bytes());
        out
    }

    /// Parses [`to_bytes`](RngState::to_bytes)' output.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless `bytes` has exactly [`RngState::BYTES`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::BYTES {
            return Err(Error::ShapeMismatch {
                context: "RNG state bytes".into(),
                expected: format!("[{}]", Self::BYTES),
                actual: vec![bytes.len()],
            });
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[..32]);
        let stream = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
        let word_pos = u128::from_le_bytes(bytes[40..].try_into().expect("16 bytes"));
        Ok(RngState {
            key,
            stream,
            word_pos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let a: Vec<u64> = (0..4).map(|_| Seed(5).rng().next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Seed(5).rng().next_u64(), Seed(6).rng().next_u64());
    }

    #[test]
    fn children_differ_from_parent_and_each_other() {
        let parent = Seed(9);
        let kids: Vec<Seed> = (0..100).map(|i| parent.child(i)).collect();
        let mut unique = kids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), kids.len());
        assert!(!kids.contains(&parent));
        assert_ne!(parent.child_named("a"), parent.child_named("b"));
    }

    #[test]
    fn below_zero_is_an_error() {
        assert!(matches!(
            Seed(0).rng().below(0),
            Err(Error::InvalidParameter { .. })
        ));
    }

    #[test]
    fn bad_distribution_parameters_are_errors() {
        let mut rng = Seed(0).rng();
        assert!(rng.normal_tensor(3, 0.0, -1.0, &Device::Cpu).is_err());
        assert!(rng.normal_tensor(3, f32::NAN, 1.0, &Device::Cpu).is_err());
        assert!(rng.uniform_tensor(3, 1.0, 0.0, &Device::Cpu).is_err());
    }

    #[test]
    fn normal_draws_have_the_right_moments() {
        let v = Seed(3).rng().normal_vec(200_000, 2.0, 0.5);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 2.0).abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
    }

    #[test]
    fn state_bytes_of_wrong_length_are_refused() {
        assert!(RngState::from_bytes(&[0u8; 10]).is_err());
    }

    proptest! {
        #[test]
        fn permutation_is_a_permutation(seed in any::<u64>(), n in 0usize..200) {
            let mut p = Seed(seed).rng().permutation(n);
            p.sort_unstable();
            prop_assert_eq!(p, (0..n).collect::<Vec<_>>());
        }

        #[test]
        fn sample_indices_equal_a_full_partial_shuffle(seed in any::<u64>(), n in 0usize..400, k in 0usize..60) {
            // The reference: the dense partial Fisher-Yates on the same stream of draws.
            let k = k.min(n);
            let mut rng = Seed(seed).rng();
            let mut order: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = rng.inner.random_range(i..n);
                order.swap(i, j);
            }
            order.truncate(k);
            prop_assert_eq!(Seed(seed).rng().sample_indices(n, k).unwrap(), order);
        }

        #[test]
        fn sample_indices_are_distinct_and_in_range(seed in any::<u64>(), n in 0usize..100, k in 0usize..100) {
            let drawn = Seed(seed).rng().sample_indices(n, k);
            if k > n {
                prop_assert!(drawn.is_err());
            } else {
                let mut drawn = drawn.unwrap();
                prop_assert_eq!(drawn.len(), k);
                prop_assert!(drawn.iter().all(|&i| i < n));
                drawn.sort_unstable();
                drawn.dedup();
                prop_assert_eq!(drawn.len(), k);
            }
        }

        #[test]
        fn saved_state_resumes_exactly(seed in any::<u64>(), skip in 0usize..300) {
            let mut rng = Seed(seed).rng();
            for _ in 0..skip { rng.next_u32(); }
            let state = RngState::from_bytes(&rng.state().to_bytes()).unwrap();
            let mut resumed = SeededRng::from_state(&state);
            let a: Vec<u32> = (0..20).map(|_| rng.next_u32()).collect();
            let b: Vec<u32> = (0..20).map(|_| resumed.next_u32()).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn uniform_stays_in_range(seed in any::<u64>(), low in -10f32..10.0, width in 0f32..10.0) {
            let v = Seed(seed).rng().uniform_vec(100, low, low + width);
            prop_assert!(v.iter().all(|&x| x >= low && (x < low + width || width == 0.0 || x <= low + width)));
        }
    }
}
