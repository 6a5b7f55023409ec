//! `cloudlet synthesis`: one session run until a signal, with its timeline:
//! "overlay opened" → ["overlay fetched (eager)"] → "VM resumed" → ["first answer"] →
//! "background fill done" → "VM stopped" ("first answer" and "background fill done" in
//! whichever order they happen).
//!
//! With `--ready-http URL`, a probe thread polls the guest's service from "VM resumed" on;
//! at its first HTTP 200 it snapshots the mount's counters, so "first answer" says what early
//! start had fetched by then (segments, bytes, chunks on demand and in background).

use super::{
    resume_vm_with, Backend, BackendKind, FirstAnswerProbe, LimitArgs, ResumeOptions, SessionError,
};
use cloudletfs::OverlaySource;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use synth::registry::Registry;
use synth::vm::HostFwd;

/// Synthesize a VM: mount base + overlay with cloudletfs and resume it on QEMU.
///
/// Runs until SIGINT/SIGTERM, then stops the VM and unmounts.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthesisArgs {
    /// Base id (or unique prefix, or name).
    pub base: String,
    /// Overlay file or http(s):// URL.
    pub overlay: String,
    /// Resume as soon as the metadata is in; chunks arrive on demand and in background.
    #[arg(long)]
    pub early_start: bool,
    /// Forward a host port to the guest: tcp:[HOST]:PORT-:GUESTPORT, or PORT:GUESTPORT.
    #[arg(long)]
    pub hostfwd: Vec<HostFwd>,
    /// Stop by itself after this many seconds.
    #[arg(long)]
    pub exit_after: Option<u64>,
    /// Poll this URL (reached through --hostfwd) from the resume on, and report at its first
    /// HTTP 200 what had been fetched by then ("first answer": segments, bytes, chunks on
    /// demand and in background).
    #[arg(long, value_name = "http://HOST:PORT/PATH")]
    pub ready_http: Option<String>,
    /// Print the timeline as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// What runs the VM: QEMU directly, or a transient libvirt domain (needs a cloudlet
    /// built with `--features libvirt` and a running libvirtd).
    #[arg(long, value_enum, default_value = "qemu")]
    pub backend: BackendKind,
    /// libvirt connection URI (with --backend libvirt).
    #[arg(long, default_value = synth::vm::DEFAULT_LIBVIRT_URI)]
    pub libvirt_uri: String,
    /// Bounds on the session.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// One step of the timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TimelineEvent {
    /// What happened.
    pub event: &'static str,
    /// Seconds since the synthesis started.
    pub seconds: f64,
    /// Details (ports, backend, timings, final stats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// Mounts base + overlay, resumes the VM (early: right away; eager: after every chunk is in),
/// reports the timeline to `on_event`, and runs until `stop` is set (or `exit_after`).
pub fn synthesis(
    home: &Path,
    args: &SynthesisArgs,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(TimelineEvent),
) -> Result<(), SessionError> {
    let backend = Backend::new(args.backend, &args.libvirt_uri);
    backend.check()?;
    let t0 = Instant::now();
    // `at`: when it happened, if not now (seconds since the start).
    let mut emit_at = |event: &'static str, at: Option<f64>, detail: Option<serde_json::Value>| {
        on_event(TimelineEvent {
            event,
            seconds: at.unwrap_or_else(|| t0.elapsed().as_secs_f64()),
            detail,
        });
    };
    let base = Registry::open(home)?.get(&args.base)?;
    let ports: Vec<String> = args
        .hostfwd
        .iter()
        .map(|h| format!("{}:{} -> guest {}", h.host_addr, h.host_port, h.guest_port))
        .collect();
    // The mount checks the overlay against the base (memory size, disk growth) before the
    // FUSE mount and QEMU: a refused overlay leaves nothing behind (exit code 3).
    let running = resume_vm_with(
        home,
        &base,
        OverlaySource::parse(&args.overlay),
        &ResumeOptions {
            early_start: args.early_start,
            hostfwd: &args.hostfwd,
            backend: &backend,
        },
        &args.limits,
        stop,
        &mut |e: &str| match e {
            "overlay opened" => emit_at("overlay opened", None, None),
            "overlay fetched (eager)" => emit_at("overlay fetched (eager)", None, None),
            _ => {}
        },
    )?;
    let timings = running.vm.timings();
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    emit_at(
        "VM resumed",
        None,
        Some(serde_json::json!({
            "ports": ports,
            "backend": backend.name(),
            "vm": running.vm.describe(),
            // Start of QEMU (or of the libvirt domain) to the guest running.
            "start_to_running_seconds": secs(timings.spawn_to_running),
            // Loading the device state, to `cont`.
            "device_state_seconds": secs(timings.resume),
        })),
    );
    log::info!("serial console log: {}", running.serial_log.display());
    let (answer_tx, answer_rx) = mpsc::channel();
    let probe = args.ready_http.as_ref().map(|url| {
        let stats = running.mounted.stats_reader();
        FirstAnswerProbe::start(url.clone(), t0, move |url, at| {
            let _ = answer_tx.send((at.as_secs_f64(), first_answer_detail(&url, &stats())));
        })
    });
    let mut filled = !args.early_start;
    let deadline = args
        .exit_after
        .map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if !filled
            && running
                .mounted
                .wait_filled(Some(Duration::from_millis(200)))
        {
            filled = true;
            emit_at("background fill done", None, None);
        } else if filled {
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Ok((at, detail)) = answer_rx.try_recv() {
            emit_at("first answer", Some(at), Some(detail));
        }
        if !running.mounted.is_alive() {
            return Err(SessionError::MountGone);
        }
    }
    drop(probe);
    let stats = running.stop()?;
    emit_at(
        "VM stopped",
        None,
        Some(serde_json::to_value(&stats).unwrap_or_default()),
    );
    Ok(())
}

/// The "first answer" event's details: what the mount had fetched when `url` first answered.
fn first_answer_detail(url: &str, stats: &cloudletfs::Stats) -> serde_json::Value {
    let f = &stats.fetch;
    let (d, m) = (&stats.disk.chunks, &stats.memory.chunks);
    serde_json::json!({
        "url": url,
        "segments_fetched": f.segments_done,
        "segments_total": f.segments,
        "bytes_fetched": f.bytes_fetched,
        "chunks_on_demand": d.fetched_on_demand + m.fetched_on_demand,
        "chunks_in_background": d.filled_in_background + m.filled_in_background,
        "chunks_pending": d.pending + m.pending,
    })
}
