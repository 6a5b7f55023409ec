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

/// Without `--profile-url`, the working set holds at most one in this many of the overlay's
/// candidate chunks. Working-set chunks go into small segments, which compress worse than the
/// large ones (BENCHMARKS.md: +7% at 1 MiB against 16 MiB with xz, more at 256 KiB), so a
/// share of 1/16 keeps what ordering costs within a few percent of the overlay's size
/// whatever the resume touched.
pub(crate) const RESUME_SHARE: usize = 16;

/// The working set without a profile: the chunks the base VM touched from its resume until it
/// was ready for the first customization command (`resume_order`, first touch first) that the
/// overlay may store (`disk` / `memory`: the candidate chunks, sorted; `None` = every chunk of
/// that image, as with `--full-memory-scan`), in order, cut to `1/RESUME_SHARE` of the
/// candidates. A resume of the overlay starts the same way, so these are the first chunks a
/// synthesis asks for; chunks the customization alone touched come later, in the large
/// segments.
pub(crate) fn resume_working_set(
    resume_order: &[(ImageKind, u64)],
    disk: &[u64],
    memory: Option<&[u64]>,
    memory_chunks: u64,
) -> Vec<(ImageKind, u64)> {
    let memory_count = memory.map_or(memory_chunks, |m| m.len() as u64);
    let candidates = (disk.len() as u64).saturating_add(memory_count);
    let cap = usize::try_from(candidates / RESUME_SHARE as u64).unwrap_or(usize::MAX);
    resume_order
        .iter()
        .copied()
        .filter(|&(image, chunk)| match image {
            ImageKind::Disk => disk.binary_search(&chunk).is_ok(),
            ImageKind::Memory => {
                memory.map_or(chunk < memory_chunks, |m| m.binary_search(&chunk).is_ok())
            }
        })
        .take(cap)
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use ImageKind::{Disk, Memory};

    #[test]
    fn resume_working_set_keeps_only_candidates_in_first_touch_order() {
        let order = [
            (Memory, 40),
            (Disk, 7),
            (Memory, 3),
            (Disk, 1),
            (Memory, 99),
        ];
        // 128 + 33 candidates: up to 10 may be ordered.
        let disk: Vec<u64> = (0..128).collect();
        let memory: Vec<u64> = (0..32).chain([40]).collect();
        let ws = resume_working_set(&order, &disk, Some(&memory), 1024);
        assert_eq!(ws, [(Memory, 40), (Disk, 7), (Memory, 3), (Disk, 1)]);
    }

    #[test]
    fn resume_working_set_is_cut_to_a_share_of_the_candidates() {
        let order: Vec<_> = (0..1000).map(|c| (Memory, c)).collect();
        let memory: Vec<u64> = (0..1000).collect();
        let disk: Vec<u64> = (0..600).collect();
        let ws = resume_working_set(&order, &disk, Some(&memory), 4096);
        assert_eq!(ws.len(), 1600 / RESUME_SHARE);
        assert_eq!(ws[..3], [(Memory, 0), (Memory, 1), (Memory, 2)]);
    }

    #[test]
    fn resume_working_set_full_memory_scan_counts_every_memory_chunk() {
        let order = [(Memory, 5), (Memory, 70), (Disk, 2)];
        let ws = resume_working_set(&order, &[], None, 64);
        assert_eq!(ws, [(Memory, 5)]);
    }

    #[test]
    fn resume_working_set_few_candidates_orders_nothing() {
        let order = [(Disk, 1), (Disk, 2)];
        let ws = resume_working_set(&order, &[1, 2], Some(&[]), 64);
        assert!(ws.is_empty());
    }
}
