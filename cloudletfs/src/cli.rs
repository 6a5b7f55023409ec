//! What the two programs share at their edge: the `cloudletfs` daemon and the `cloudlet` tool
//! (which starts the daemon for `cloudlet mount`) exit with the same codes, stop on the same
//! signals, and relay a failed daemon the same way.
//!
//! | code | meaning |
//! |------|---------|
//! | [`EXIT_OK`] | done |
//! | [`EXIT_ERROR`] | failed (the message says why) |
//! | [`EXIT_USAGE`] | bad arguments, or an option this build cannot honour |
//! | [`EXIT_INVALID`] | input refused as invalid, corrupt or made for another base |
//! | [`EXIT_NOT_FOUND`] | the thing named does not exist (a server session) |
//! | [`EXIT_GUEST_COMMAND`] | a customization command in the guest failed or timed out |

use crate::MountError;
use std::error::Error;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use synth::format::FormatError;
use synth::reconstruct::ReconstructError;
use synth::registry::RegistryError;
use synth::resolve::ResolveError;

/// Exit code: done.
pub const EXIT_OK: u8 = 0;
/// Exit code: failed.
pub const EXIT_ERROR: u8 = 1;
/// Exit code: bad arguments (clap's own code), or an option this build cannot honour.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: input refused as invalid, corrupt or made for something else (an overlay, a
/// package, a `--state` folder).
pub const EXIT_INVALID: u8 = 3;
/// Exit code: the thing named does not exist (a session, for `close-session`).
pub const EXIT_NOT_FOUND: u8 = 4;
/// Exit code: a customization command (`cloudlet overlay --run`) exited with a non-zero
/// status or did not finish within its timeout.
pub const EXIT_GUEST_COMMAND: u8 = 5;

/// A child daemon failed and has already told the user why on stderr: the parent exits with
/// the child's code and prints nothing more.
#[derive(Debug, thiserror::Error)]
#[error("The cloudletfs daemon exited with code {0}")]
pub struct DaemonFailed(pub i32);

/// A flag set by SIGINT or SIGTERM. Long waits poll it and give up cleanly, so that drops run
/// (QEMU is stopped, FUSE unmounted, temporary files removed) instead of the process dying
/// in the middle of a step.
pub fn interrupt_flag() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// Whether `e`, or any error in its source chain, refuses input as invalid, corrupt or made
/// for another base.
pub fn input_refused(e: &(dyn Error + 'static)) -> bool {
    chain(e).any(|c| {
        c.downcast_ref::<FormatError>().is_some()
            || matches!(
                c.downcast_ref::<MountError>(),
                Some(MountError::StateMismatch(_))
            )
            || matches!(
                c.downcast_ref::<RegistryError>(),
                Some(RegistryError::BadPackage { .. } | RegistryError::UntrustedExtraArgs { .. })
            )
            || matches!(
                c.downcast_ref::<ResolveError>(),
                Some(ResolveError::Format(_))
            )
            || matches!(
                c.downcast_ref::<ReconstructError>(),
                Some(ReconstructError::Resolve(ResolveError::Format(_)))
            )
    })
}

/// The exit code for a failure: the failed daemon's own code, [`EXIT_INVALID`] for refused
/// input, else [`EXIT_ERROR`].
pub fn exit_code(e: &(dyn Error + 'static)) -> u8 {
    if let Some(DaemonFailed(code)) = chain(e).find_map(|c| c.downcast_ref::<DaemonFailed>()) {
        return u8::try_from(*code).unwrap_or(EXIT_ERROR);
    }
    if input_refused(e) {
        EXIT_INVALID
    } else {
        EXIT_ERROR
    }
}

/// Whether the failure is a [`DaemonFailed`], whose message the user has seen already.
pub fn already_reported(e: &(dyn Error + 'static)) -> bool {
    chain(e).any(|c| c.downcast_ref::<DaemonFailed>().is_some())
}

/// `e` and its sources, outermost first.
fn chain<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(e), |&c| c.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Opening the overlay failed")]
    struct Outer(#[source] FormatError);

    #[test]
    fn exit_code_format_error_deep_in_the_chain_is_invalid() {
        let e = Outer(FormatError::BadMagic);
        assert_eq!(exit_code(&e), EXIT_INVALID);
    }

    #[test]
    fn exit_code_untrusted_extra_args_is_invalid() {
        let e = RegistryError::UntrustedExtraArgs {
            path: "base.pkg".into(),
            args: vec!["-monitor".into(), "tcp:0.0.0.0:4444,server".into()],
        };
        assert_eq!(exit_code(&e), EXIT_INVALID);
    }

    #[test]
    fn exit_code_daemon_failed_passes_its_code_through() {
        assert_eq!(exit_code(&DaemonFailed(3)), 3);
        assert_eq!(exit_code(&DaemonFailed(-1)), EXIT_ERROR);
        assert!(already_reported(&DaemonFailed(1)));
    }

    #[test]
    fn exit_code_other_errors_are_plain_failures() {
        let e = std::io::Error::other("disk on fire");
        assert_eq!(exit_code(&e), EXIT_ERROR);
        assert!(!already_reported(&e));
    }
}
