//! Errors a caller can branch on.
//!
//! Every fallible call returns [`anyhow::Result`], whose message carries the context chain
//! (`{e:#}` prints it on one line). Where the caller can act on the cause (fall back to the CPU
//! path without a GPU, fix a tensor, report a failed kernel), the chain holds an [`Error`]
//! with an [`ErrorKind`]; [`kind`] finds it through any number of `.context(...)` layers:
//!
//! ```
//! use dorafuse::error::{kind, Error, ErrorKind};
//! let e = anyhow::Error::new(Error::new(ErrorKind::InvalidInput, "x: dtype f16, expected bf16"))
//!     .context("forward of attn.q_proj");
//! assert_eq!(kind(&e), Some(ErrorKind::InvalidInput));
//! assert_eq!(format!("{e:#}"), "forward of attn.q_proj: x: dtype f16, expected bf16");
//! ```

use std::fmt;

/// What went wrong, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No CUDA driver (`libcuda.so` not loadable), or `cuInit` failed.
    NoDriver,
    /// The driver reports no device, or fewer than the ordinal asked for.
    NoDevice,
    /// This build has no GPU kernels (nvcc was not found at build time).
    KernelsNotCompiled,
    /// A tensor or view that does not fit the call: shape, dtype, length, alignment, another
    /// device, an output overlapping an input. The message names the tensor.
    InvalidInput,
    /// A kernel launch or a library call (cuBLAS) failed; the message names the kernel.
    Launch,
}

/// A typed error: a kind and a one-line message naming the tensor, module or kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The [`ErrorKind`] in `e`'s chain (the innermost typed cause), or `None` when no typed error
/// is in it.
pub fn kind(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<Error>())
        .last()
        .map(Error::kind)
}

/// Returns early with an [`ErrorKind::InvalidInput`] error (format arguments as `format!`).
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::Error::new(
            $crate::error::ErrorKind::InvalidInput,
            format!($($arg)*),
        )))
    };
}

/// [`invalid!`] unless `cond` holds.
macro_rules! ensure_input {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::error::invalid!($($arg)*);
        }
    };
}

pub(crate) use ensure_input;
pub(crate) use invalid;
