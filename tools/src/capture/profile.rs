//! Profiling an overlay's working set (`cloudlet overlay --profile-url`): resume the new overlay
//! as a synthesis would, wait for the guest's service to answer, and record what the VM touched
//! until then, in order.

use super::CaptureError;
use crate::session::{resume_vm, wait_http_ok, Backend, ResumeOptions};
use cloudletfs::OverlaySource;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use synth::registry::Base;
use synth::vm::HostFwd;
use synth::ImageKind;

/// Chunks of the working set recorded for segment ordering, at most.
pub(crate) const MAX_ORDER: usize = 1 << 20;

/// Resumes the VM from `overlay` as a synthesis does (early start), waits for the first HTTP
/// 200 from `url`, and returns the chunks the VM read or wrote until then in the order it first
/// touched them (what a synthesis asks for first), and the seconds that took. Readahead is in
/// the trace as it will be in a synthesis, since both read through the same cloudletfs.
pub fn working_set(
    home: &Path,
    base: &Base,
    overlay: &Path,
    hostfwd: &[HostFwd],
    url: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<(Vec<(ImageKind, u64)>, f64), CaptureError> {
    let start = Instant::now();
    let running = resume_vm(
        home,
        base,
        OverlaySource::Path(overlay.to_path_buf()),
        &ResumeOptions {
            early_start: true,
            hostfwd,
            // The overlay is profiled the way `cloudlet overlay` runs VMs: on QEMU directly.
            backend: &Backend::Qemu,
        },
        stop,
        &mut |_| {},
    )?;
    wait_http_ok(url, timeout.saturating_sub(start.elapsed()), stop)?;
    let secs = start.elapsed().as_secs_f64();
    let order = running.mounted.access_order(MAX_ORDER);
    running.stop()?;
    Ok((order, secs))
}
