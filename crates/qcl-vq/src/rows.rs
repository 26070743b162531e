//! [`VectorQuantizer`] as a qcl-pq [`Quantizer`] on row-major `[n, C]` slices: N codes of
//! `⌈log2 K⌉` bits per vector (one per codebook), in one [`PackedCodes`] buffer, so that a
//! trained VQ layer can be stored, evaluated or indexed like any other quantizer.

use candle_core::Tensor;
use qcl_pq::{check_codes, index_bits, PackedCodes, Quantizer};
use qcl_tensor::{Error, Result};

use crate::VectorQuantizer;

impl VectorQuantizer {
    /// `data` (row-major `[n, C]`) as an `(n, C)` tensor on this quantizer's device.
    fn rows_tensor(&self, data: &[f32]) -> Result<Tensor> {
        let dim = self.config().dim;
        if data.is_empty() || !data.len().is_multiple_of(dim) {
            return Err(Error::ShapeMismatch {
                context: "data".into(),
                expected: format!("[n ≥ 1, {dim}]"),
                actual: vec![data.len()],
            });
        }
        Ok(Tensor::from_slice(
            data,
            (data.len() / dim, dim),
            self.device(),
        )?)
    }
}

impl Quantizer for VectorQuantizer {
    fn dim(&self) -> usize {
        self.config().dim
    }
    fn codes_per_vector(&self) -> usize {
        self.config().codebooks
    }
    fn bits_per_code(&self) -> u32 {
        index_bits(self.config().codes)
    }
    fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        let indices = VectorQuantizer::encode(self, &self.rows_tensor(data)?)?;
        let flat: Vec<u32> = indices.flatten_all()?.to_vec1()?;
        PackedCodes::pack(&flat, self.codes_per_vector(), self.bits_per_code())
    }
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        check_codes(self, codes)?;
        let indices = Tensor::from_vec(codes.unpack(), (codes.n(), codes.m()), self.device())?;
        Ok(VectorQuantizer::decode(self, &indices)?
            .flatten_all()?
            .to_vec1()?)
    }
    /// As [`VectorQuantizer::fingerprint`]; a codebook that cannot be read gives a
    /// fingerprint that matches no quantizer.
    fn fingerprint(&self) -> String {
        VectorQuantizer::fingerprint(self).unwrap_or_else(|e| format!("unreadable codebook: {e}"))
    }
}
