//! The cloudlet's orchestration, as a library: what the `cloudlet` binary runs, and what an
//! embedder or a test can run without it.
//!
//! A **session** is one VM on this machine: a private run folder, a cloudletfs mount of base +
//! overlay (disk and memory served lazily, copy-on-write, traced), and a QEMU resumed over that
//! mount, with its forwarded guest ports. Every flow builds on it:
//!
//! ```text
//!  capture (once per app)                       synthesis (every time a user arrives)
//!  ──────────────────────                       ─────────────────────────────────────
//!  capture::base:    boot a disk on QEMU,       session::synthesis: base + overlay (file or
//!    wait until ready, save device state          URL) ─► session::resume ─► timeline,
//!    ─► registry (synth::registry)                until a signal
//!  capture::overlay: session::resume of the     server: clients stream an overlay over TCP
//!    base with an empty overlay ─► customize     (or name a URL) ─► server::session (state
//!    (script / by hand) ─► device state +         machine) ─► server::net_source (segments
//!    cloudletfs traces ─► synth::create           on demand) ─► session::resume
//!  capture::profile: resume the new overlay,    client: the other end (synth::protocol)
//!    wait for the first HTTP 200, reorder by    discovery: mDNS announcement and lookup
//!    what the VM touched first
//! ```
//!
//! Long work reports through a [`Reporter`] (the CLI draws progress bars and prints notes;
//! [`Quiet`] says nothing). Errors are one enum per flow (`thiserror`); the binary maps them to
//! exit codes with [`exit_code`].

pub mod capture;
pub mod client;
pub mod discovery;
pub mod inspect;
pub mod server;
pub mod session;

use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicU64};
use synth::protocol::{ProtoError, RefuseReason};

pub use cloudletfs::cli::{
    interrupt_flag, DaemonFailed, EXIT_ERROR, EXIT_GUEST_COMMAND, EXIT_INVALID, EXIT_NOT_FOUND,
    EXIT_OK, EXIT_USAGE,
};

/// How long work tells whoever runs it how it is going.
pub trait Reporter: Sync {
    /// A step worth telling the user ("booting", "guest ready after 3.1 s").
    fn note(&self, text: &str);

    /// Starts showing the progress of work of `total` bytes labelled `label`; the work counts
    /// the bytes it has done into [`Progress::counter`]; the display ends when it is dropped.
    fn progress(&self, label: &str, total: u64) -> Box<dyn Progress>;

    /// Output of a command running in a guest (`cloudlet overlay --run`), as it arrives:
    /// raw bytes, not split at lines.
    fn guest_output(&self, bytes: &[u8]) {
        log::debug!("guest: {}", String::from_utf8_lossy(bytes));
    }

    /// Waits until the user says to go on (Enter on a terminal), giving up when `stop` is set;
    /// `prompt` says what to do first. Without a user this fails at once.
    fn wait_for_user(&self, prompt: &str, stop: &AtomicBool) -> Result<(), session::WaitError> {
        let _ = (prompt, stop);
        Err(session::WaitError::NoUser)
    }
}

/// A [`Reporter`] that says nothing and has no user to wait for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Reporter for Quiet {
    fn note(&self, text: &str) {
        log::info!("{text}");
    }

    fn progress(&self, _label: &str, _total: u64) -> Box<dyn Progress> {
        Box::new(Counter::default())
    }
}

/// The progress of one piece of long work, shown until dropped.
pub trait Progress {
    /// Where the work counts the bytes it has done.
    fn counter(&self) -> &AtomicU64;
}

/// A [`Progress`] shown nowhere.
#[derive(Debug, Default)]
pub struct Counter(pub AtomicU64);

impl Progress for Counter {
    fn counter(&self) -> &AtomicU64 {
        &self.0
    }
}

/// The exit code for a failure of any flow (see [`cloudletfs::cli`] for the codes).
pub fn exit_code(e: &(dyn Error + 'static)) -> u8 {
    let mut chain = std::iter::successors(Some(e), |&c| c.source());
    // `SessionError::LibvirtNotBuilt` is transparent: its `source()` skips the error it wraps.
    if chain.any(|c| {
        c.downcast_ref::<session::LibvirtNotBuilt>().is_some()
            || matches!(
                c.downcast_ref::<session::SessionError>(),
                Some(session::SessionError::LibvirtNotBuilt(_))
            )
    }) {
        // An option this build cannot honour: a usage error, like clap's own.
        return EXIT_USAGE;
    }
    let mut chain = std::iter::successors(Some(e), |&c| c.source());
    if chain.any(|c| {
        matches!(
            c.downcast_ref::<server::admin::AdminError>(),
            Some(server::admin::AdminError::NotFound(_))
        )
    }) {
        return EXIT_NOT_FOUND;
    }
    let mut chain = std::iter::successors(Some(e), |&c| c.source());
    if chain.any(|c| matches!(as_proto(c), Some(ProtoError::Refused(r)) if refused_as_invalid(r))) {
        return EXIT_INVALID;
    }
    // `CaptureError::CloudInit` is transparent, so it is matched itself as well as its inner
    // error (reached directly when it is not wrapped).
    let mut chain = std::iter::successors(Some(e), |&c| c.source());
    if chain.any(|c| {
        matches!(
            c.downcast_ref::<capture::CaptureError>(),
            Some(
                capture::CaptureError::DiskImage { .. }
                    | capture::CaptureError::CloudInit(
                        capture::cloud_init::CloudInitError::Invalid { .. }
                            | capture::cloud_init::CloudInitError::Read { .. }
                    )
            )
        ) || matches!(
            c.downcast_ref::<capture::cloud_init::CloudInitError>(),
            Some(
                capture::cloud_init::CloudInitError::Invalid { .. }
                    | capture::cloud_init::CloudInitError::Read { .. }
            )
        )
    }) {
        return EXIT_INVALID;
    }
    let mut chain = std::iter::successors(Some(e), |&c| c.source());
    if chain.any(|c| {
        matches!(
            c.downcast_ref::<capture::CaptureError>(),
            Some(
                capture::CaptureError::CommandFailed { .. }
                    | capture::CaptureError::CommandTimedOut { .. }
            )
        )
    }) {
        return EXIT_GUEST_COMMAND;
    }
    cloudletfs::cli::exit_code(e)
}

/// `c` as a protocol error, also where it is boxed or wrapped transparently (a transparent
/// error's `source()` skips the error it wraps).
fn as_proto<'a>(c: &'a (dyn Error + 'static)) -> Option<&'a ProtoError> {
    if let Some(p) = c.downcast_ref::<ProtoError>() {
        return Some(p);
    }
    if let Some(b) = c.downcast_ref::<Box<ProtoError>>() {
        return Some(b);
    }
    match c.downcast_ref::<client::ClientError>() {
        Some(client::ClientError::Session(b)) => Some(b),
        _ => None,
    }
}

/// Whether a server refused the client's input itself (the overlay, its base, its URL's
/// content), as opposed to the client (token, protocol) or the server's own state.
fn refused_as_invalid(r: &RefuseReason) -> bool {
    matches!(
        r,
        RefuseReason::BadOverlay(_)
            | RefuseReason::UnknownBase { .. }
            | RefuseReason::MetadataDigest { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_libvirt_not_built_inside_a_session_error_is_usage() {
        let e = session::SessionError::from(session::LibvirtNotBuilt);
        assert_eq!(exit_code(&e), EXIT_USAGE);
    }

    #[test]
    fn exit_code_server_refusing_the_overlay_is_invalid_busy_is_not() {
        let bad = ProtoError::Refused(RefuseReason::BadOverlay("memory size".into()));
        assert_eq!(exit_code(&bad), EXIT_INVALID);
        let boxed = client::ClientError::Session(Box::new(bad));
        assert_eq!(exit_code(&boxed), EXIT_INVALID);
        let busy =
            client::ClientError::Session(Box::new(ProtoError::Refused(RefuseReason::Busy {
                max_sessions: 1,
            })));
        assert_eq!(exit_code(&busy), EXIT_ERROR);
    }
}
