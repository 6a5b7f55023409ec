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

/// What the profile waits for: a 200 from `url` within `timeout`, then `settle` more.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The guest's service, through a forwarded port.
    pub url: &'a str,
    /// Longest wait for the 200.
    pub timeout: Duration,
    /// How long to go on recording after it.
    pub settle: Duration,
}

/// Resumes the VM from `overlay` as a synthesis does (early start), waits for the first HTTP
/// 200 from `url` and then `settle` more, and returns the chunks the VM read or wrote until
/// then in the order it first touched them (what a synthesis asks for first), and the seconds
/// to the first answer. Readahead is in the trace as it will be in a synthesis, since both
/// read through the same cloudletfs.
///
/// Why `settle`: resumed from a local file, the guest answers within a second; early-started
/// over a slow link, its clock runs on while it waits for pages, and its timers and daemons
/// touch memory the answer itself did not need (on the Debian guest at 10 Mbit/s, 3,000
/// chunks more over 22 s, each a miss in a large segment). Recording on after the answer
/// puts those in the working set too, behind what the answer needed.
pub fn working_set(
    home: &Path,
    base: &Base,
    overlay: &Path,
    hostfwd: &[HostFwd],
    answer: &Answer<'_>,
    stop: &AtomicBool,
) -> Result<(Vec<(ImageKind, u64)>, f64), CaptureError> {
    let Answer {
        url,
        timeout,
        settle,
    } = *answer;
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
    let settled = Instant::now() + settle;
    while Instant::now() < settled && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let order = running.mounted.access_order(MAX_ORDER);
    running.stop()?;
    Ok((order, secs))
}
