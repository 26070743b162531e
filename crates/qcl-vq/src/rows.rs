//! [`VectorQuantizer`] as a qcl-pq [`Quantizer`] on row-major `[n, C]` slices: N codes of
//! `⌈log2 K⌉` bits per vector (one per codebook), in one [`PackedCodes`] buffer, so that a
//! trained VQ layer can be stored, evaluated or indexed like any other quantizer. A
//! [`ResidualVq`] stores its stages' codes one after the other: stage 0's N codes, then
//! stage 1's, each with the widest stage's bits.

use candle_core::Tensor;
use qcl_pq::{check_codes, index_bits, PackedCodes, Quantizer};
use qcl_tensor::{Error, Fingerprint, Result};

use crate::{ResidualVq, VectorQuantizer};

impl VectorQuantizer {
    /// `data` (row-major `[n, C]`) as an `(n, C)` tensor on this quantizer's device.
    fn rows_tensor(&self, data: &[f32]) -> Result<Tensor> {
        let dim = self.config().dim;
        if data.is_empty() {
            return Err(Error::EmptyInput("no vectors to encode".into()));
        }
        if !data.len().is_multiple_of(dim) {
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
    /// As [`VectorQuantizer::fingerprint`]; a codebook that cannot be read gives a text that
    /// is not a fingerprint (so it matches no readable quantizer's).
    fn fingerprint(&self) -> String {
        VectorQuantizer::fingerprint(self).unwrap_or_else(|e| format!("unreadable codebook: {e}"))
    }
}

impl Quantizer for ResidualVq {
    fn dim(&self) -> usize {
        self.stages()[0].config().dim
    }
    fn codes_per_vector(&self) -> usize {
        self.stages().iter().map(|s| s.config().codebooks).sum()
    }
    fn bits_per_code(&self) -> u32 {
        self.stages()
            .iter()
            .map(Quantizer::bits_per_code)
            .max()
            .unwrap_or(1)
    }
    fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        let rows = self.stages()[0].rows_tensor(data)?;
        let indices = Tensor::cat(&ResidualVq::encode(self, &rows)?, 1)?;
        let flat: Vec<u32> = indices.flatten_all()?.to_vec1()?;
        PackedCodes::pack(&flat, self.codes_per_vector(), self.bits_per_code())
    }
    /// The sum of every stage's decoding: the full-depth reconstruction.
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        check_codes(self, codes)?;
        let device = self.stages()[0].device();
        let all = Tensor::from_vec(codes.unpack(), (codes.n(), codes.m()), device)?;
        let mut start = 0;
        let mut per_stage = Vec::with_capacity(self.depth());
        for stage in self.stages() {
            let width = stage.config().codebooks;
            per_stage.push(all.narrow(1, start, width)?);
            start += width;
        }
        Ok(ResidualVq::decode(self, &per_stage)?
            .flatten_all()?
            .to_vec1()?)
    }
    /// Every stage's fingerprint, in order.
    fn fingerprint(&self) -> String {
        self.stages()
            .iter()
            .fold(Fingerprint::new("qcl-residual-vq/1"), |f, stage| {
                f.text(&Quantizer::fingerprint(stage))
            })
            .finish()
    }
}
