//! The one codes file of every [`Quantizer`]: bit-packed [`PackedCodes`] with the shape and the
//! fingerprint of the quantizer that made them, refused by any other.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{write_safetensors, Error, Result, SafetensorsFile, TensorSpec};

use crate::quantizer::{check_codes, Quantizer};
use crate::{PackedCodes, CODES_FORMAT};

/// Writes `codes` made by `quantizer` to a codes file, atomically: tensor `codes`
/// (`u8 [n, code_size]`, the bytes of [`PackedCodes`]) with metadata `format` =
/// [`CODES_FORMAT`], `n`, `m`, `nbits`, `dim` and `quantizer` (its
/// [`fingerprint`](Quantizer::fingerprint)).
///
/// ```
/// use qcl_pq::{load_codes, save_codes, Quantizer, ScalarQuantizer};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("codes.safetensors");
/// let sq = ScalarQuantizer::from_range(4, vec![0.0, -1.0], vec![1.0, 1.0])?;
/// let codes = sq.encode(&[0.5, 0.0, 0.25, -1.0])?;
/// save_codes(&sq, &codes, &path)?;
/// assert_eq!(load_codes(&sq, &path)?, codes);
/// let other = ScalarQuantizer::from_range(4, vec![0.0, -1.0], vec![2.0, 1.0])?;
/// assert!(load_codes(&other, &path).is_err()); // made by another quantizer
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`] or [`Error::ShapeMismatch`] if `codes` do not have the
/// quantizer's shape; [`Error::Io`] on write failure.
pub fn save_codes<Q: Quantizer + ?Sized>(
    quantizer: &Q,
    codes: &PackedCodes,
    path: impl AsRef<Path>,
) -> Result<()> {
    check_codes(quantizer, codes)?;
    let tensor = Tensor::from_vec(
        codes.bytes().to_vec(),
        (codes.n(), codes.code_size()),
        &Device::Cpu,
    )?;
    let metadata = BTreeMap::from([
        ("format".to_string(), CODES_FORMAT.to_string()),
        ("n".to_string(), codes.n().to_string()),
        ("m".to_string(), codes.m().to_string()),
        ("nbits".to_string(), codes.nbits().to_string()),
        ("dim".to_string(), quantizer.dim().to_string()),
        ("quantizer".to_string(), quantizer.fingerprint()),
    ]);
    write_safetensors(path, &[("codes", &tensor)], &metadata)
}

/// Reads a codes file written by [`save_codes`] and checks that `quantizer` made it. A file
/// without a `quantizer` fingerprint (written by an older qcl) is checked by shape only, with a
/// note ([`qcl_tensor::take_notes`]).
///
/// # Errors
/// [`Error::BadFile`] for a file that is not a codes file or has inconsistent metadata;
/// [`Error::InvalidParameter`] if another quantizer made the codes (fingerprint, `m`, `nbits`
/// or `dim` differ); [`Error::DTypeMismatch`] / [`Error::ShapeMismatch`] for a `codes` tensor
/// other than `u8 [n, code_size]`.
pub fn load_codes<Q: Quantizer + ?Sized>(
    quantizer: &Q,
    path: impl AsRef<Path>,
) -> Result<PackedCodes> {
    let path = path.as_ref();
    let file = SafetensorsFile::open(path)?;
    file.require_format(CODES_FORMAT, "a codes file")?;
    let n: usize = file.metadata_value("n")?;
    let m: usize = file.metadata_value("m")?;
    let nbits: u32 = file.metadata_value("nbits")?;
    // `dim` and `quantizer` are missing from older files; a `dim` that is there must parse.
    let dim: Option<usize> = match file.metadata().get("dim") {
        Some(_) => Some(file.metadata_value("dim")?),
        None => None,
    };
    let mismatch = |what: String| {
        Error::invalid_parameter(
            "codes",
            format!(
                "{} holds codes of another quantizer ({what}); decode them with the \
                 quantizer that encoded them",
                path.display()
            ),
        )
    };
    let (own_m, own_nbits, own_dim) = (
        quantizer.codes_per_vector(),
        quantizer.bits_per_code(),
        quantizer.dim(),
    );
    if m != own_m || nbits != own_nbits || dim.is_some_and(|dim| dim != own_dim) {
        return Err(mismatch(format!(
            "m = {m}, nbits = {nbits}{}, this one has m = {own_m}, nbits = {own_nbits}, \
             dim = {own_dim}",
            dim.map_or(String::new(), |dim| format!(", dim = {dim}")),
        )));
    }
    match file.metadata().get("quantizer") {
        Some(made_by) if *made_by != quantizer.fingerprint() => {
            return Err(mismatch(format!(
                "made by {made_by}, this one is {}",
                quantizer.fingerprint()
            )))
        }
        Some(_) => {}
        None => qcl_tensor::note(format!(
            "{} does not say which quantizer made its codes (written by an older qcl): \
             checked by shape only",
            path.display()
        )),
    }
    let code_size = crate::packing::code_size(m, nbits)?;
    let spec = TensorSpec::new()
        .dtype(DType::U8)
        .shape(&[Some(n), Some(code_size)]);
    let bytes = file
        .read("codes", &spec, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    PackedCodes::from_bytes(bytes, n, m, nbits)
}
