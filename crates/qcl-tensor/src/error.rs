//! The one error type of the workspace.
//!
//! Every qcl crate returns [`Result<T>`](Result). Each variant names the problem and carries
//! what a user needs to fix it (both shapes, the index of the bad value, the file and why it was
//! refused), so that bad input never becomes a panic deep inside a kernel.

use std::path::PathBuf;

use candle_core::DType;

/// `Result` with qcl's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in qcl.
#[derive(Debug, thiserror::Error)]
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
    Candle(#[from] candle_core::Error),
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
