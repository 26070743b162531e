//! # qcl-pq
//!
//! k-means and product quantization on the exact nearest-code kernel of
//! [`qcl_tensor::nearest_codes`].
//!
//! - [`KMeans`] with [`KMeansConfig`] (every knob named, with faiss-like defaults): random or
//!   greedy k-means++ initialisation, Lloyd iterations with optional early stop, sample weights,
//!   empty-cluster repair, restarts, subsampling, the objective history, progress; an
//!   assignment step with Hamerly or Yinyang distance bounds ([`KMeansAlgorithm`]) that skips
//!   most distances and still returns plain Lloyd's assignments bit for bit;
//!   [`MiniBatchKMeans`] for data that arrives in batches. The same seed gives the same
//!   centroids with any number of threads.
//! - [`run_lloyd`] and [`LloydStep`]: the one Lloyd loop (assign, update, stop) that k-means,
//!   qcl-ecvq's CLG design and qcl-wpq's EM run, open to a quantizer of your own.
//! - [`ProductQuantizer`] ([`ProductQuantizerConfig`]): bit-packed [`PackedCodes`], decode, ADC search.
//! - [`ScalarQuantizer`] ([`ScalarQuantizerConfig`]): uniform scalar quantization, `bits` per
//!   dimension over a trained range.
//! - [`Quantizer`] and [`FitQuantizer`]: the one shape of every quantizer (fit, encode to
//!   [`PackedCodes`], decode, bits per vector, fingerprint), implemented by [`KMeans`],
//!   [`ProductQuantizer`], [`ScalarQuantizer`], qcl-ecvq's `Ecvq` and qcl-vq's `VectorQuantizer`
//!   and `ResidualVq`, and open to your own.
//!
//! Two faces, one kernel: the slice methods (`fit`, `assign`, `train`, `encode`, ...) take
//! row-major `f32` rows; their `*_tensor` twins (`fit_tensor`, `assign_tensor`,
//! `train_tensor`, `encode_tensor`, `search_tensor`, `centroids_tensor`, ...) take and return
//! candle tensors (`[n, d]` points of any float dtype; `u32` indices and codes, `f32` centroids
//! and distances) and give the same results bit for bit. `examples/tensor_kmeans_pq.rs` runs
//! both families on a tensor.
//!
//! ```
//! use qcl_pq::{KMeans, KMeansConfig};
//! use qcl_tensor::Seed;
//! let data = Seed::new(0).rng().normal_vec(2_000 * 9, 0.0, 0.05);
//! let model = KMeans::fit(&data, 9, None, &KMeansConfig { max_iter: 10, ..KMeansConfig::new(64) })?;
//! assert_eq!(model.centroids.len(), 64 * 9);
//! assert!(model.objective_history.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-6)));
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

mod bounds;
mod codes_file;
pub mod index;
mod kmeans;
mod lloyd;
mod minibatch;
mod packing;
mod points;
mod pq;
mod quantizer;
mod restarts;
mod scalar;
mod tensor;
pub mod workloads;

pub use bounds::KMeansAlgorithm;
pub use codes_file::{load_codes, save_codes};
pub use kmeans::{KMeans, KMeansConfig, KMeansInit, KMEANS_FORMAT, MAX_ITERATIONS, MAX_RESTARTS};
pub use lloyd::{run_lloyd, LloydSchedule, LloydStep, LloydStop};
pub use minibatch::MiniBatchKMeans;
pub use pq::{PackedCodes, ProductQuantizer, ProductQuantizerConfig, CODES_FORMAT, PQ_FORMAT};
pub use quantizer::{
    check_codes, index_bits, reconstruction_mse, rows_of, FitQuantizer, Quantizer,
};
pub use restarts::BestRun;
pub use scalar::{ScalarQuantizer, ScalarQuantizerConfig, ScalarRange, SCALAR_FORMAT};
