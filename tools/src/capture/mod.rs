//! Capture: turning running VMs into the registry's bases and into overlays.
//!
//! ```text
//!  base:     disk ─► copy into a run folder ─► QEMU (guest RAM in a shared file) ─► ready
//!            (serial marker, or the user) ─► device state saved ─► Registry::add
//!  overlay:  base ─► empty overlay ─► cloudletfs mount (copy-on-write, traced) ─► QEMU resumed
//!            with shared RAM ─► customization (script lines on the serial console, or by hand)
//!            ─► device state saved, pages flushed ─► traces (disk written/discarded, memory
//!            written, first-touch order) ─► synth::create::create_overlay
//!  profile:  new overlay ─► session::resume_vm (early start) ─► first HTTP 200 ─► the chunks
//!            touched by then, in order ─► the overlay written again with them first
//! ```

pub mod base;
pub mod overlay;
pub mod profile;

pub use base::{make_base, BaseArgs};
pub use overlay::{make_overlay, OverlayArgs, OverlayReport};

use crate::session::{SessionError, WaitError};
use std::path::PathBuf;

/// Errors of capturing a base or an overlay.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Running the VM failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Reading an input or writing an output file failed.
    #[error("{what} {path} failed")]
    Io {
        /// What was being done ("Copying", "Reading").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A customization command failed in the guest.
    #[error("Customization command {line:?} failed in the guest (exit status {rc}): {output}")]
    CommandFailed {
        /// The command.
        line: String,
        /// Its exit status.
        rc: i32,
        /// What it printed.
        output: String,
    },
    /// Building the overlay failed.
    #[error(transparent)]
    Create(#[from] synth::create::CreateError),
    /// Opening the registry, registering the base or reading its index failed.
    #[error(transparent)]
    Registry(#[from] synth::registry::RegistryError),
    /// A `--profile-url` that is not a plain `http://` URL.
    #[error("--profile-url {0:?}: expected http://HOST:PORT/PATH")]
    ProfileUrl(String),
}

impl From<synth::vm::VmError> for CaptureError {
    fn from(e: synth::vm::VmError) -> Self {
        CaptureError::Session(e.into())
    }
}

impl From<synth::vm::LaunchError> for CaptureError {
    fn from(e: synth::vm::LaunchError) -> Self {
        CaptureError::Session(e.into())
    }
}

impl From<WaitError> for CaptureError {
    fn from(e: WaitError) -> Self {
        CaptureError::Session(e.into())
    }
}
