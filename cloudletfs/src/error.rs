//! Error types. Serving errors become errno values in exactly one place: `fs::errno`.

use std::path::PathBuf;
use synth::ImageKind;

/// Why a request on an image could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The chunk failed its SHA-256 check (or its segment is corrupt): never served.
    #[error("The {image} chunk {chunk} failed verification")]
    Corrupt {
        /// Image.
        image: ImageKind,
        /// Chunk number.
        chunk: u64,
    },
    /// Fetching the segment a chunk needs failed (network, timeout).
    #[error("Fetching segment {segment} failed")]
    Fetch {
        /// Segment index.
        segment: u32,
    },
    /// No answer within the configured time.
    #[error("Timed out waiting for the {image} chunk {chunk}")]
    Timeout {
        /// Image.
        image: ImageKind,
        /// Chunk number.
        chunk: u64,
    },
    /// A local file operation failed.
    #[error("{action} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The overlay's metadata contradicts itself (validated overlays never do).
    #[error("The {image} chunk {chunk} has no overlay entry")]
    Inconsistent {
        /// Image.
        image: ImageKind,
        /// Chunk number.
        chunk: u64,
    },
    /// The request lies outside the file.
    #[error("Offset {0} lies outside the image")]
    OutOfRange(u64),
    /// The first write of a chunk would take the mount's copy-on-write data past its quota.
    #[error(
        "Writing the {image} chunk {chunk} would take the copy-on-write data past its quota \
         of {quota} bytes"
    )]
    QuotaExceeded {
        /// Image.
        image: ImageKind,
        /// Chunk number.
        chunk: u64,
        /// The mount's quota in bytes.
        quota: u64,
    },
    /// The filesystem is shutting down.
    #[error("The filesystem is shutting down")]
    Shutdown,
    /// The operation is not supported (e.g. a fallocate mode).
    #[error("Unsupported operation")]
    Unsupported,
}

impl ServeError {
    pub(crate) fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> ServeError {
        move |source| ServeError::Io { action, source }
    }
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `/dev/fuse` is missing or cannot be used.
    #[error("FUSE is unavailable: {0} (is the fuse module loaded and /dev/fuse accessible?)")]
    FuseUnavailable(String),
    /// Opening or validating the overlay failed.
    #[error("Opening the overlay failed")]
    Overlay(#[from] synth::format::FormatError),
    /// Connecting to the overlay's HTTP server failed.
    #[error("Opening the overlay URL failed")]
    Http(#[from] crate::http::HttpError),
    /// A file operation failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// File.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The state directory belongs to another VM.
    #[error("State directory {0} was made for another base, overlay or image size")]
    StateMismatch(PathBuf),
    /// Something is mounted at the mount point already (a second mount would hide it).
    #[error("{0} is already a mount point; unmount it first")]
    AlreadyMounted(PathBuf),
    /// Mounting failed.
    #[error("Mounting on {path} failed")]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Unmounting failed.
    #[error("Unmounting {path} failed")]
    Unmount {
        /// Mount point.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
