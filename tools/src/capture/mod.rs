//! Capture: turning running VMs into the registry's bases and into overlays.
//!
//! ```text
//!  base:     disk ─► copy (raw) or convert (qcow2) into a run folder (+ a cloud-init seed
//!            image from --cloud-init, attached read-only) ─► QEMU (guest RAM in a shared file) ─► ready
//!            (serial marker and/or the guest agent answering, or the user) ─► device state saved ─► Registry::add
//!  overlay:  base ─► empty overlay ─► cloudletfs mount (copy-on-write, traced) ─► QEMU resumed
//!            with shared RAM ─► customization (--copy files through the guest agent, then
//!            --run script lines, each over the serial console's shell or the guest agent,
//!            output streamed to the Reporter; or by hand) ─► ready (marker, agent, HTTP)
//!            ─► device state saved, pages flushed ─► traces (disk written/discarded, memory
//!            written, first-touch order) ─► synth::create::create_overlay
//!  profile:  new overlay ─► session::resume_vm (early start) ─► first HTTP 200 ─► the chunks
//!            touched by then, in order ─► the overlay written again with them first
//! ```

pub mod base;
pub mod cloud_init;
pub mod image;
pub mod overlay;
pub mod profile;

pub use base::{make_base, BaseArgs};
pub use overlay::{make_overlay, Channel, CopySpec, FailedCommand, OverlayArgs, OverlayReport};

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
    /// The disk image given to `cloudlet base` cannot be made a base's disk.
    #[error("{path} cannot be a base's disk: {why}")]
    DiskImage {
        /// The image.
        path: PathBuf,
        /// Why, and what to do.
        why: String,
    },
    /// The `--cloud-init` inputs were refused, or the seed could not be written.
    #[error(transparent)]
    CloudInit(#[from] cloud_init::CloudInitError),
    /// `qemu-img` failed on an image.
    #[error("{what} {path} with qemu-img failed: {detail}")]
    QemuImg {
        /// What was being done.
        what: &'static str,
        /// The image.
        path: PathBuf,
        /// What qemu-img said.
        detail: String,
    },
    /// A customization command exited with a non-zero status in the guest.
    #[error(
        "Customization command {line:?} failed in the guest (exit status {rc}); its output:\n{}",
        tail(.output)
    )]
    CommandFailed {
        /// The command.
        line: String,
        /// Its exit status.
        rc: i32,
        /// What it printed.
        output: String,
    },
    /// A customization command did not finish within `--cmd-timeout`; it was interrupted.
    #[error("Customization command {line:?} did not finish within {timeout:?}")]
    CommandTimedOut {
        /// The command.
        line: String,
        /// The time allowed.
        timeout: std::time::Duration,
        /// The channel's report (interrupted or killed, output so far).
        #[source]
        source: Box<synth::vm::VmError>,
    },
    /// Running a customization command failed for another reason than its own (no shell
    /// answered, the agent or QEMU went away).
    #[error("Running customization command {line:?} over the {channel} failed")]
    CommandChannel {
        /// The command.
        line: String,
        /// "serial console" or "guest agent".
        channel: &'static str,
        /// What failed.
        #[source]
        source: Box<synth::vm::VmError>,
    },
    /// The guest agent was asked for (`--copy`, `--channel agent`, `--ready-agent`) but the
    /// base's launch config has no guest-agent device.
    #[error(
        "{what} needs the guest agent, but base {base}'s launch config has no guest-agent \
         device (make the base with `cloudlet base --guest-agent` from a guest that runs \
         qemu-guest-agent)"
    )]
    NoAgent {
        /// The option that needs it.
        what: &'static str,
        /// The base.
        base: String,
    },
    /// Copying a file into the guest failed.
    #[error("Copying {local} to {guest} in the guest failed")]
    Copy {
        /// The local file.
        local: PathBuf,
        /// The guest path.
        guest: String,
        /// What failed.
        #[source]
        source: Box<synth::vm::VmError>,
    },
    /// Building the overlay failed.
    #[error(transparent)]
    Create(#[from] synth::create::CreateError),
    /// Opening the registry, registering the base or reading its index failed.
    #[error(transparent)]
    Registry(#[from] synth::registry::RegistryError),
    /// A `--ready-http` that is not a plain `http://` URL.
    #[error("--ready-http {0:?}: expected http://HOST:PORT/PATH")]
    ReadyUrl(String),
    /// A `--profile-url` that is not a plain `http://` URL.
    #[error("--profile-url {0:?}: expected http://HOST:PORT/PATH")]
    ProfileUrl(String),
}

/// The end of a command's output, for error messages.
fn tail(s: &str) -> String {
    synth::vm::output_tail(s, 4000)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{exit_code, EXIT_ERROR, EXIT_GUEST_COMMAND};
    use std::time::Duration;

    fn vm_timeout() -> synth::vm::VmError {
        synth::vm::VmError::Timeout {
            what: "x".into(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn exit_code_failed_command_is_guest_command() {
        let e = CaptureError::CommandFailed {
            line: "false".into(),
            rc: 1,
            output: String::new(),
        };
        assert_eq!(exit_code(&e), EXIT_GUEST_COMMAND);
    }

    #[test]
    fn exit_code_timed_out_command_is_guest_command() {
        let e = CaptureError::CommandTimedOut {
            line: "sleep 1000".into(),
            timeout: Duration::from_secs(5),
            source: Box::new(vm_timeout()),
        };
        assert_eq!(exit_code(&e), EXIT_GUEST_COMMAND);
    }

    #[test]
    fn exit_code_refused_user_data_is_invalid() {
        let e = CaptureError::CloudInit(cloud_init::CloudInitError::Invalid {
            what: "user-data",
            path: "u.yaml".into(),
            why: "no header".into(),
        });
        assert_eq!(exit_code(&e), crate::EXIT_INVALID);
    }

    #[test]
    fn exit_code_channel_failure_is_plain_error() {
        let e = CaptureError::CommandChannel {
            line: "true".into(),
            channel: "serial console",
            source: Box::new(vm_timeout()),
        };
        assert_eq!(exit_code(&e), EXIT_ERROR);
    }

    #[test]
    fn command_failed_message_names_command_status_and_output_tail() {
        let e = CaptureError::CommandFailed {
            line: "make".into(),
            rc: 2,
            output: format!("{}\nlast line\n", "x".repeat(10_000)),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("Customization command \"make\" failed in the guest (exit status 2)"),
            "{msg}"
        );
        assert!(msg.ends_with("last line"), "{msg}");
        assert!(msg.len() < 5000, "{}", msg.len());
    }
}
