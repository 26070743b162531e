//! Device choice from a string.
//!
//! `cpu` is the default everywhere. `cuda`, `cuda:N`, `metal` and `metal:N` need the crate's
//! `cuda` or `metal` feature (forwarded to candle); asking for a backend this build lacks is an
//! [`Error::DeviceUnavailable`] that says which feature to enable, never a panic.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// A device named by the user, before it is opened.
///
/// ```
/// use qcl_tensor::DeviceSpec;
/// let spec: DeviceSpec = "cuda:1".parse()?;
/// assert_eq!(spec, DeviceSpec::Cuda(1));
/// assert_eq!(spec.to_string(), "cuda:1");
/// assert!(DeviceSpec::Cpu.open()?.is_cpu());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The host CPU (the default).
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
    /// The Metal device with this ordinal.
    Metal(usize),
}

impl DeviceSpec {
    /// Opens the device.
    ///
    /// # Errors
    /// [`Error::DeviceUnavailable`] when the backend was not compiled in or the device cannot
    /// be opened.
    pub fn open(&self) -> Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal, self),
            DeviceSpec::Metal(ordinal) => open_metal(ordinal, self),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, spec: &DeviceSpec) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::DeviceUnavailable {
        requested: spec.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize, spec: &DeviceSpec) -> Result<Device> {
    Err(Error::DeviceUnavailable {
        requested: spec.to_string(),
        reason: "this build has no CUDA support; rebuild with `--features cuda`".into(),
    })
}

#[cfg(feature = "metal")]
fn open_metal(ordinal: usize, spec: &DeviceSpec) -> Result<Device> {
    Device::new_metal(ordinal).map_err(|e| Error::DeviceUnavailable {
        requested: spec.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal(_ordinal: usize, spec: &DeviceSpec) -> Result<Device> {
    Err(Error::DeviceUnavailable {
        requested: spec.to_string(),
        reason: "this build has no Metal support; rebuild with `--features metal`".into(),
    })
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// Parses `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` (case-insensitive, surrounding
    /// spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match text.split_once(':') {
            Some((kind, ordinal)) => {
                let ordinal = ordinal
                    .parse::<usize>()
                    .map_err(|_| Error::DeviceUnavailable {
                        requested: s.to_string(),
                        reason: format!(
                            "`{ordinal}` is not a device ordinal (expected e.g. `cuda:0`)"
                        ),
                    })?;
                (kind.to_string(), Some(ordinal))
            }
            None => (text.clone(), None),
        };
        match (kind.as_str(), ordinal) {
            ("cpu", None) | ("cpu", Some(0)) => Ok(DeviceSpec::Cpu),
            ("cuda", ordinal) => Ok(DeviceSpec::Cuda(ordinal.unwrap_or(0))),
            ("metal", ordinal) => Ok(DeviceSpec::Metal(ordinal.unwrap_or(0))),
            _ => Err(Error::DeviceUnavailable {
                requested: s.to_string(),
                reason: "unknown device; expected `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`"
                    .into(),
            }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

/// Opens the device named by `name` (see [`DeviceSpec`]'s `FromStr`).
///
/// ```
/// let device = qcl_tensor::device("cpu")?;
/// assert!(device.is_cpu());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
pub fn device(name: &str) -> Result<Device> {
    name.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CPU ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert_eq!(
            "metal:1".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Metal(1)
        );
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(2), DeviceSpec::Metal(0)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn refuses_unknown_names_and_bad_ordinals() {
        for bad in ["tpu", "cuda:x", "cpu:1", "", "cuda:-1"] {
            match bad.parse::<DeviceSpec>() {
                Err(Error::DeviceUnavailable { requested, .. }) => assert_eq!(requested, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = device("cuda:1").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cuda:1") && text.contains("--features cuda"),
            "{text}"
        );
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_feature_is_a_clear_error() {
        let err = device("metal").unwrap_err();
        assert!(err.to_string().contains("--features metal"), "{err}");
    }
}
