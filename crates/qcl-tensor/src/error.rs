//! The one error type of the workspace.
//!
//! Every qcl crate returns [`Result<T>`](Result). Each variant names the problem and carries
//! what a user needs to fix it (both shapes, the index of the bad value, the file and why it was
//! refused), so that bad input never becomes a panic deep inside a kernel.
//!
//! **candle interop.** A qcl error converts into a [`candle_core::Error`] (so qcl code runs
//! inside candle-nn's `Module`, `Optimizer` and `VarBuilder` traits) and back, and a qcl error
//! that travelled through candle comes back as the same typed variant:
//!
//! ```
//! use qcl_tensor::Error;
//! let typed = Error::invalid_parameter("k", "must be at least 1");
//! let through_candle: candle_core::Error = typed.into();
//! let back = Error::from(through_candle);
//! assert_eq!(back.kind(), "invalid_parameter");
//! assert!(matches!(back, Error::InvalidParameter { ref name, .. } if name == "k"));
//! ```

use std::fmt;
use std::path::PathBuf;

use candle_core::DType;

/// `Result` with qcl's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in qcl.
///
/// `Debug` prints the same text as `Display` (candle prints a wrapped error with `{:?}`, and
/// `main() -> Result<..>` does too), so the message reads the same everywhere.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor or array has a shape other than the one required.
    #[error("shape mismatch in {context}: expected {expected}, got {actual:?}")]
    ShapeMismatch {
        /// What was being checked (a tensor name, an argument).
        context: String,
        /// The required shape, `*` standing for any size (e.g. `[*, 1, 28, 28]`).
        expected: String,
        /// The shape that was found.
        actual: Vec<usize>,
    },

    /// A tensor has a dtype other than the one required.
    #[error("dtype mismatch in {context}: expected {expected:?}, got {actual:?}")]
    DTypeMismatch {
        /// What was being checked.
        context: String,
        /// The required dtype.
        expected: DType,
        /// The dtype that was found.
        actual: DType,
    },

    /// A NaN or an infinity where only finite values make sense.
    #[error("non-finite value {value} at flat index {index} in {context}")]
    NonFinite {
        /// What was being checked.
        context: String,
        /// Row-major index of the first offending element.
        index: usize,
        /// The offending value (NaN, inf or -inf).
        value: f64,
    },

    /// An input that must hold at least one element holds none.
    #[error("empty input: {0}")]
    EmptyInput(String),

    /// A parameter outside its domain (for example `k > n`, a batch size of zero).
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name as the user wrote it.
        name: String,
        /// Why the value is refused.
        reason: String,
    },

    /// A record of a data set that cannot be used (wrong length, value out of range, unknown
    /// label). Importers usually count and skip these; this variant is for callers that refuse.
    #[error("invalid record {index} in {source_name}: {reason}")]
    InvalidRecord {
        /// File or data set the record came from.
        source_name: String,
        /// Position of the record in its source.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },

    /// A file that is not what it claims to be: truncated, foreign, or of another version.
    #[error("bad file {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },

    /// An encoded stream (entropy-coded or bit-packed indices) that cannot be decoded: truncated,
    /// corrupted, or written with other parameters than those given to the decoder.
    #[error("corrupt stream {context}: {reason}")]
    CorruptStream {
        /// What was being decoded.
        context: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor name that a file does not contain.
    #[error("tensor `{name}` not found in {path}; it holds {available:?}")]
    MissingTensor {
        /// The name asked for.
        name: String,
        /// The file searched.
        path: PathBuf,
        /// The names it does hold.
        available: Vec<String>,
    },

    /// A device that cannot be used: unknown name, or a backend this build lacks.
    #[error("device `{requested}` is not available: {reason}")]
    DeviceUnavailable {
        /// The device string as given.
        requested: String,
        /// Why it cannot be used, and how to get it.
        reason: String,
    },

    /// An operating-system I/O error on a named file.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An error raised inside candle.
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A qcl error as a candle error: [`Error::Candle`] gives back the candle error it holds; every
/// other variant travels as candle's `WrappedContext` (the one wrapper candle can give back
/// typed), so that `From<candle_core::Error>` recovers it.
impl From<Error> for candle_core::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Candle(inner) => inner,
            other => {
                let context = format!("qcl error `{}`", other.kind());
                candle_core::Error::WrappedContext {
                    wrapped: Box::new(other),
                    context,
                }
            }
        }
    }
}

/// A candle error as a qcl error: a qcl error that travelled through candle (wrapped by the
/// conversion above, possibly inside backtrace layers) comes back as its own variant; any
/// other candle error becomes [`Error::Candle`], unchanged.
impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        unwrap_qcl(error).unwrap_or_else(Error::Candle)
    }
}

/// The qcl error inside `error` (under any number of `WithBacktrace` layers), or `error` as it
/// was.
fn unwrap_qcl(error: candle_core::Error) -> std::result::Result<Error, candle_core::Error> {
    match error {
        candle_core::Error::WithBacktrace { inner, backtrace } => {
            unwrap_qcl(*inner).map_err(|inner| candle_core::Error::WithBacktrace {
                inner: Box::new(inner),
                backtrace,
            })
        }
        candle_core::Error::WrappedContext { wrapped, context } => match wrapped.downcast() {
            Ok(qcl) => Ok(*qcl),
            Err(wrapped) => Err(candle_core::Error::WrappedContext { wrapped, context }),
        },
        other => Err(other),
    }
}

impl Error {
    /// A stable, machine-readable name of the variant (`shape_mismatch`, `bad_file`, ...), for
    /// JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ShapeMismatch { .. } => "shape_mismatch",
            Error::DTypeMismatch { .. } => "dtype_mismatch",
            Error::NonFinite { .. } => "non_finite",
            Error::EmptyInput(_) => "empty_input",
            Error::InvalidParameter { .. } => "invalid_parameter",
            Error::InvalidRecord { .. } => "invalid_record",
            Error::BadFile { .. } => "bad_file",
            Error::CorruptStream { .. } => "corrupt_stream",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::DeviceUnavailable { .. } => "device_unavailable",
            Error::Io { .. } => "io",
            Error::Candle(_) => "candle",
        }
    }

    /// An [`Error::InvalidParameter`].
    pub fn invalid_parameter(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::BadFile`].
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::CorruptStream`].
    pub fn corrupt_stream(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::CorruptStream {
            context: context.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::backtrace::Backtrace;

    fn with_backtrace(e: candle_core::Error) -> candle_core::Error {
        candle_core::Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(Backtrace::disabled()),
        }
    }

    /// One error of every variant but `Candle` and `Io`, from the generated fields.
    fn typed(variant: usize, text: String, n: usize, value: f64) -> Error {
        match variant {
            0 => Error::ShapeMismatch {
                context: text.clone(),
                expected: format!("[{n}]"),
                actual: vec![n, n + 1],
            },
            1 => Error::DTypeMismatch {
                context: text,
                expected: DType::F32,
                actual: DType::U8,
            },
            2 => Error::NonFinite {
                context: text,
                index: n,
                value,
            },
            3 => Error::EmptyInput(text),
            4 => Error::invalid_parameter(text, format!("got {n}")),
            5 => Error::InvalidRecord {
                source_name: text,
                index: n,
                reason: "short".into(),
            },
            6 => Error::bad_file(text, "truncated"),
            7 => Error::corrupt_stream(text, "padding"),
            8 => Error::MissingTensor {
                name: text,
                path: "f.safetensors".into(),
                available: vec!["a".into()],
            },
            _ => Error::DeviceUnavailable {
                requested: text,
                reason: "no cuda".into(),
            },
        }
    }

    proptest! {
        #[test]
        fn typed_errors_round_trip_through_candle(
            variant in 0usize..10,
            text in "[a-z ]{0,12}",
            n in 0usize..1000,
            value in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
            layers in 0usize..3,
        ) {
            let original = typed(variant, text, n, value);
            let (kind, message) = (original.kind(), original.to_string());
            let mut through: candle_core::Error = original.into();
            for _ in 0..layers {
                through = with_backtrace(through);
            }
            let back = Error::from(through);
            prop_assert_eq!(back.kind(), kind);
            prop_assert_eq!(back.to_string(), message);
        }
    }

    #[test]
    fn io_errors_round_trip_with_their_source() {
        let original = Error::io("x.bin", std::io::Error::other("disk full"));
        let back = Error::from(with_backtrace(original.into()));
        match back {
            Error::Io { path, source } => {
                assert_eq!(path, PathBuf::from("x.bin"));
                assert_eq!(source.to_string(), "disk full");
            }
            other => panic!("expected an I/O error, got {other}"),
        }
    }

    #[test]
    fn plain_candle_errors_stay_candle_errors() {
        let candle = candle_core::Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu)
            .and_then(|t| t.reshape(4))
            .unwrap_err();
        let message = candle.to_string();
        let qcl = Error::from(candle);
        assert_eq!(qcl.kind(), "candle");
        assert_eq!(qcl.to_string(), message);
        // And back: the candle error itself, not a wrapper around it.
        let again: candle_core::Error = qcl.into();
        assert!(!matches!(again, candle_core::Error::WrappedContext { .. }));
        assert_eq!(again.to_string(), message);
        // Foreign wrapped errors under a backtrace layer are kept as they were.
        let foreign = with_backtrace(candle_core::Error::WrappedContext {
            wrapped: Box::new(std::io::Error::other("elsewhere")),
            context: "ctx".into(),
        });
        let qcl = Error::from(foreign);
        assert_eq!(qcl.kind(), "candle");
        assert!(qcl.to_string().contains("elsewhere"), "{qcl}");
    }

    #[test]
    fn a_qcl_error_raised_inside_a_candle_closure_comes_back_typed() {
        use candle_core::Module;
        let layer = |_: &candle_core::Tensor| -> candle_core::Result<candle_core::Tensor> {
            Err(Error::EmptyInput("nothing to quantize".into()).into())
        };
        let run = || -> Result<candle_core::Tensor> {
            let x = candle_core::Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu)?;
            Ok(layer.forward(&x)?)
        };
        match run() {
            Err(Error::EmptyInput(what)) => assert_eq!(what, "nothing to quantize"),
            other => panic!("expected the typed error back, got {other:?}"),
        }
    }

    #[test]
    fn debug_reads_like_display() {
        let e = Error::invalid_parameter("k", "must be at least 1");
        assert_eq!(format!("{e:?}"), e.to_string());
        assert_eq!(
            format!("{e:?}"),
            "invalid parameter `k`: must be at least 1"
        );
    }
}
