//! `cloudlet overlay`: customize a base VM under cloudletfs and capture the changes as an
//! overlay, from the traces alone (no rescan of the disk).

use super::{profile, CaptureError};
use crate::session::resume::{base_paths, mount_vm};
use crate::session::{wait_marker, RunDir, SessionError, WaitError};
use crate::Reporter;
use cloudletfs::{OverlaySource, Trace};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use synth::codec::Codec;
use synth::create::{CreateOptions, CustomImages};
use synth::registry::Registry;
use synth::vm::{Accel, HostFwd, LaunchOptions, MemoryMode, QemuArgs, Vm};
use synth::ImageKind;

/// Chunks of the working set recorded for segment ordering, at most.
pub(crate) const MAX_ORDER: usize = 1 << 20;

/// Customize a base VM and capture the changes as an overlay.
///
/// The base VM resumes with its disk and memory served by cloudletfs (copy-on-write,
/// traced); after the customization (a script typed on the serial console, or by hand
/// until Enter) the device state is saved and the overlay built from the traces: disk
/// chunks written or discarded, memory chunks written back, stored in first-touch order.
#[derive(Debug, Clone, clap::Args)]
pub struct OverlayArgs {
    /// Base id (or unique prefix, or name).
    pub base: String,
    /// Overlay file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Commands to run on the guest's serial console, one per line (needs the guest's
    /// command loop, as in tools/guest); without it, customize by hand and press Enter.
    #[arg(long, value_name = "SCRIPT")]
    pub run: Option<PathBuf>,
    /// Capture once the guest prints this on its serial console.
    #[arg(long, value_name = "MARKER")]
    pub ready: Option<String>,
    /// Seconds allowed for each command and for --ready.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Forward a host port to the guest: tcp:[HOST]:PORT-:GUESTPORT, or PORT:GUESTPORT.
    #[arg(long)]
    pub hostfwd: Vec<HostFwd>,
    /// Show the guest on a VNC display (e.g. 127.0.0.1:1).
    #[arg(long, value_name = "HOST:DISPLAY")]
    pub vnc: Option<String>,
    /// Segment codec.
    #[arg(long, default_value = "xz")]
    pub codec: Codec,
    /// Compression level (default: 9 for xz, 19 for zstd).
    #[arg(long)]
    pub level: Option<u32>,
    /// Hash-compare the whole memory image instead of trusting the memory trace.
    #[arg(long)]
    pub full_memory_scan: bool,
    /// Also copy the captured disk, memory and device state into this folder.
    #[arg(long, value_name = "DIR")]
    pub keep_capture: Option<PathBuf>,
    /// Profile the working set: resume the new overlay as a synthesis would, wait for
    /// a 200 from this URL (reached through --hostfwd), and write the overlay again with
    /// the chunks touched by then first. Without it, the working set is what the
    /// customization touched.
    #[arg(long, value_name = "http://HOST:PORT/PATH")]
    pub profile_url: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `cloudlet overlay` did.
#[derive(Debug, Serialize)]
pub struct OverlayReport {
    /// The overlay written.
    pub overlay: PathBuf,
    /// Its size in bytes.
    pub overlay_bytes: u64,
    /// Disk chunks examined (written or discarded by the guest).
    pub disk_candidates: u64,
    /// Of which discarded.
    pub disk_discarded: u64,
    /// Memory chunks examined.
    pub memory_candidates: u64,
    /// Chunks (disk and memory, base ones included) touched while customizing.
    pub customization_accessed_chunks: u64,
    /// Chunks stored first, in first-touch order, as the working set.
    pub working_set_chunks: u64,
    /// Where the working set comes from: "profile" (`--profile-url`) or "customization".
    pub working_set_from: &'static str,
    /// With `--profile-url`: seconds from resuming the overlay to the first 200.
    pub profile_first_response_seconds: Option<f64>,
    /// Seconds to resume the base VM.
    pub resume_seconds: f64,
    /// Seconds to save the device state and flush the images.
    pub capture_seconds: f64,
    /// Seconds to build the overlay (twice with `--profile-url`).
    pub diff_seconds: f64,
    /// What the overlay builder reported.
    pub stats: synth::create::CreateStats,
}

/// Flushes the page cache of an image on the mount so every guest write has reached cloudletfs.
fn flush(path: &Path) -> Result<(), CaptureError> {
    let err = |source| CaptureError::Io {
        what: "Flushing",
        path: path.to_owned(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?
        .sync_all()
        .map_err(err)
}

/// Resumes the base VM under cloudletfs (copy-on-write, traced), lets a script or the user
/// customize it, captures the device state and builds the overlay from the traces.
pub fn make_overlay(
    home: &Path,
    threads: usize,
    args: &OverlayArgs,
    reporter: &dyn Reporter,
) -> Result<OverlayReport, CaptureError> {
    if let Some(url) = &args.profile_url {
        if !url.starts_with("http://") {
            return Err(CaptureError::ProfileUrl(url.clone()));
        }
    }
    let timeout = Duration::from_secs(args.timeout);
    let stop = cloudletfs::cli::interrupt_flag().map_err(SessionError::Signals)?;
    let registry = Registry::open(home)?;
    let base = registry.get(&args.base)?;
    let run = RunDir::new(home, "overlay")?;
    let empty = run.join("base.overlay");
    synth::create::empty_overlay(&base, &empty)?;
    let mounted = mount_vm(&base, OverlaySource::Path(empty), &run, false)?;
    let mnt = mounted.mountpoint().to_path_buf();
    let (disk, memory) = (mnt.join("disk/image"), mnt.join("memory/image"));
    let qemu = QemuArgs::new(
        &base.record.config,
        &base_paths(&base, disk.clone(), memory.clone(), run.join("run")),
        &LaunchOptions {
            // Shared: guest RAM writes reach cloudletfs (and its trace) through writeback.
            memory: MemoryMode::Capture,
            incoming: true,
            hostfwd: args.hostfwd.clone(),
            accel: Accel::detect()?,
            vnc: args.vnc.clone(),
        },
    )?;
    let start = Instant::now();
    let mut vm = Vm::spawn(&qemu)?;
    vm.resume_from(&mnt.join("device-state"))?;
    let resume_seconds = start.elapsed().as_secs_f64();
    reporter.note(&format!(
        "base VM resumed in {resume_seconds:.2}s (serial log: {})",
        qemu.serial_log().display()
    ));
    if let Some(script) = &args.run {
        let text = std::fs::read_to_string(script).map_err(|source| CaptureError::Io {
            what: "Reading",
            path: script.clone(),
            source,
        })?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if stop.load(Ordering::Relaxed) {
                return Err(WaitError::Interrupted.into());
            }
            reporter.note(&format!("guest$ {line}"));
            let out = vm.run_serial_command(line, timeout)?;
            if out.rc != 0 {
                return Err(CaptureError::CommandFailed {
                    line: line.to_owned(),
                    rc: out.rc,
                    output: out.output.trim().to_owned(),
                });
            }
        }
    }
    match &args.ready {
        Some(marker) => {
            wait_marker(&mut vm, marker, timeout, &stop)?;
        }
        None if args.run.is_none() => {
            reporter.wait_for_user(
                "Customize the VM, then press Enter to capture the overlay.",
                &stop,
            )?;
        }
        None => {}
    }
    let capture_start = Instant::now();
    let ds = run.join("device-state");
    vm.save_device_state(&ds)?;
    vm.quit()?;
    flush(&memory)?;
    flush(&disk)?;
    let capture_seconds = capture_start.elapsed().as_secs_f64();
    if let Some(dir) = &args.keep_capture {
        std::fs::create_dir_all(dir).map_err(|source| CaptureError::Io {
            what: "Creating",
            path: dir.clone(),
            source,
        })?;
        for (src, name) in [
            (&disk, "disk.img"),
            (&memory, "memory.img"),
            (&ds, "device-state"),
        ] {
            std::fs::copy(src, dir.join(name)).map_err(|source| CaptureError::Io {
                what: "Copying",
                path: src.clone(),
                source,
            })?;
        }
    }

    let disk_modified = mounted.trace(ImageKind::Disk, Trace::Modified);
    let disk_discarded = mounted.trace(ImageKind::Disk, Trace::Discarded);
    let mut disk_chunks = disk_modified;
    disk_chunks.extend(&disk_discarded);
    let memory_chunks = if args.full_memory_scan {
        None
    } else {
        let mut m = mounted.trace(ImageKind::Memory, Trace::Modified);
        m.extend(mounted.trace(ImageKind::Memory, Trace::Discarded));
        Some(m)
    };
    let order = mounted.access_order(MAX_ORDER);
    let mut opts = create_options(args, threads);
    opts.disk_chunks = Some(disk_chunks.clone());
    opts.memory_chunks = memory_chunks.clone();
    opts.order = order.clone();
    let index = base.index()?;
    let custom = CustomImages {
        disk,
        memory,
        device_state: Some(ds),
    };
    let diff_start = Instant::now();
    let mut stats = synth::create::create_overlay(
        &base,
        &index,
        &custom,
        &args.output,
        &opts,
        &Default::default(),
    )?;
    let mut diff_seconds = diff_start.elapsed().as_secs_f64();
    let mut profiled = None;
    if let Some(url) = &args.profile_url {
        reporter.note(&format!(
            "profiling the working set: resuming the overlay until {url} answers 200"
        ));
        let (ws, secs) = profile::working_set(
            home,
            &base,
            &args.output,
            &args.hostfwd,
            url,
            timeout,
            &stop,
        )?;
        reporter.note(&format!(
            "first response after {secs:.2}s; {} chunks touched; writing the overlay again",
            ws.len()
        ));
        opts.order = ws;
        let again = Instant::now();
        let tmp = args.output.with_extension("profiled.tmp");
        stats = synth::create::create_overlay(
            &base,
            &index,
            &custom,
            &tmp,
            &opts,
            &Default::default(),
        )?;
        std::fs::rename(&tmp, &args.output).map_err(|source| CaptureError::Io {
            what: "Replacing",
            path: args.output.clone(),
            source,
        })?;
        diff_seconds += again.elapsed().as_secs_f64();
        profiled = Some(secs);
    }
    drop(custom);
    mounted.unmount().map_err(SessionError::Unmount)?;
    Ok(OverlayReport {
        overlay: args.output.clone(),
        overlay_bytes: stats.overlay_bytes,
        disk_candidates: disk_chunks.len() as u64,
        disk_discarded: disk_discarded.len() as u64,
        memory_candidates: memory_chunks.map_or(base.record.memory_size / 4096, |m| m.len() as u64),
        customization_accessed_chunks: order.len() as u64,
        working_set_chunks: opts.order.len() as u64,
        working_set_from: if profiled.is_some() {
            "profile"
        } else {
            "customization"
        },
        profile_first_response_seconds: profiled,
        resume_seconds,
        capture_seconds,
        diff_seconds,
        stats,
    })
}

/// The overlay builder's options from the command line (the chunk lists come from traces).
fn create_options(args: &OverlayArgs, threads: usize) -> CreateOptions {
    CreateOptions {
        codec: args.codec,
        level: args.level.unwrap_or(args.codec.default_level()),
        threads,
        ..CreateOptions::default()
    }
}
