//! [`Ecvq`] as a [`Quantizer`]: one fixed-length code of `⌈log2 K⌉` bits per vector, the
//! shape every qcl quantizer shares. The variable-length form, near the entropy, is
//! [`Ecvq::compress`].

use qcl_pq::{check_codes, index_bits, FitQuantizer, PackedCodes, Quantizer};
use qcl_tensor::{Error, Fingerprint, Result};

use crate::{ClgConfig, ClgEcvq, Ecvq, ECVQ_FORMAT};

impl Quantizer for Ecvq {
    fn dim(&self) -> usize {
        Ecvq::dim(self)
    }
    fn codes_per_vector(&self) -> usize {
        1
    }
    fn bits_per_code(&self) -> u32 {
        index_bits(self.len())
    }
    /// The entropy-constrained codes `argmin_k r_k + λ·d(x, c_k)`, not the nearest codes.
    fn encode(&self, data: &[f32]) -> Result<PackedCodes> {
        if data.is_empty() {
            return Err(Error::EmptyInput("no points".into()));
        }
        PackedCodes::pack(&Ecvq::encode(self, data)?, 1, self.bits_per_code())
    }
    fn decode(&self, codes: &PackedCodes) -> Result<Vec<f32>> {
        check_codes(self, codes)?;
        Ecvq::decode(self, &codes.unpack())
    }
    /// K, the dimension, λ, the distortion and every code and length.
    fn fingerprint(&self) -> String {
        let print = Fingerprint::new(ECVQ_FORMAT)
            .number(self.len() as u64)
            .number(Ecvq::dim(self) as u64)
            .number(self.lambda().to_bits())
            .text(self.distortion().name())
            .floats(self.codebook());
        self.rates_bits()
            .iter()
            .fold(print, |f, r| f.number(r.to_bits()))
            .finish()
    }
}

/// Trained by [`ClgEcvq::fit`], the classic design algorithm.
impl FitQuantizer for Ecvq {
    type Config = ClgConfig;
    fn fit(data: &[f32], dim: usize, config: &ClgConfig) -> Result<Self> {
        Ok(ClgEcvq::fit(data, dim, config)?.quantizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Distortion;

    #[test]
    fn packed_codes_round_trip_through_the_entropy_constrained_encoder() {
        let q = Ecvq::new(
            1,
            vec![0.0, 1.0, 5.0],
            vec![0.5, 7.0, 2.0],
            4.0,
            Distortion::Sse,
        )
        .unwrap();
        let data = [0.9, 3.0, 4.9];
        let codes = Quantizer::encode(&q, &data).unwrap();
        assert_eq!((codes.m(), codes.nbits()), (1, 2));
        assert_eq!(codes.unpack(), Ecvq::encode(&q, &data).unwrap());
        let decoded = Quantizer::decode(&q, &codes).unwrap();
        assert_eq!(decoded, Ecvq::decode(&q, &codes.unpack()).unwrap());
        assert!(Quantizer::encode(&q, &[]).is_err());
        assert!(Quantizer::decode(&q, &PackedCodes::pack(&[3], 1, 2).unwrap()).is_err());
        let other = Ecvq::new(
            1,
            vec![0.0, 1.0, 5.0],
            vec![0.5, 7.0, 2.5],
            4.0,
            Distortion::Sse,
        )
        .unwrap();
        assert_ne!(q.fingerprint(), other.fingerprint());
    }
}
