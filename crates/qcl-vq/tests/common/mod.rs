//! Helpers shared by the quantizer's test files.

use candle_core::{DType, Tensor};

/// The values of `t` (of any float dtype), flattened, as `f32`.
pub fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
