//! # qcl-tensor
//!
//! The shared layer of the qcl workspace on top of [candle](candle_core):
//!
//! - [`Error`] / [`Result`]: the one error type every qcl crate returns;
//! - [`DeviceSpec`] / [`device`]: device choice from a string (`cpu`, `cuda:1`, `metal`);
//! - [`Seed`] / [`SeededRng`]: seeded random streams with independent children;
//! - [`SafetensorsFile`] / [`write_safetensors`] / [`write_atomic`]: validated, checksummed
//!   reads and atomic writes; [`take_notes`]: what the readers want the user to know;
//! - [`TensorSpec`], [`check_shape`], [`check_finite`]: input validation; [`matrix_f32`]: a
//!   `[n, d]` tensor as the `f32` rows the slice kernels take;
//! - [`nearest_codes`] / [`top_k_codes`]: the exact nearest-code kernel every quantizer uses;
//!   [`ExactCodes`] and [`squared_distances_to_codes`]: the same definition for chosen
//!   points and codes, as bound-based k-means needs it.
//!
//! ```
//! use qcl_tensor::{device, Seed, TensorSpec};
//! let dev = device("cpu")?;
//! let x = Seed::new(0).rng().uniform_tensor((4, 9), -1.0, 1.0, &dev)?;
//! TensorSpec::new().shape(&[None, Some(9)]).finite().check("x", &x)?;
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

mod alloc;
mod check;
mod compare;
mod device;
mod error;
mod header;
mod integrity;
mod io;
mod nearest;
mod planar;
mod rng;
mod rows;
mod two_nearest;

pub use alloc::{on_threads, tune_allocator_for_numeric_loops, tune_process_for_numeric_loops};
pub use check::{
    check_finite, check_finite_slice, check_shape, format_shape_pattern, matrix_f32, TensorSpec,
};
pub use compare::{f32_bits, max_abs_diff};
pub use device::{device, DeviceSpec};
pub use error::{Error, Result};
pub use integrity::{
    bytes_checksum, check_stored_checksum, content_checksum, note, read_bounded,
    read_safetensors_bytes, serialize_safetensors, take_notes, verify_checksum, Fingerprint,
    CHECKSUM_KEY,
};
pub use io::{
    check_output, write_atomic, write_atomic_with, write_safetensors, SafetensorsFile, TensorInfo,
};
pub use nearest::{
    nearest_codes, nearest_codes_into, nearest_codes_into_finite, nearest_codes_with_group_bounds,
    pairwise_squared_distances, squared_distance, squared_distances_to_codes, top_k_codes, Nearest,
    DIRECT_MAX_DIM,
};
pub use planar::{nearest_codes_planar, PLANAR_MAX_CODES};
pub use rng::{RngState, Seed, SeededRng};
pub use rows::read_f32_rows;
pub use two_nearest::{ExactCodes, TwoNearest};

/// Re-export of candle-core, so that users need not align versions by hand.
pub use candle_core;
