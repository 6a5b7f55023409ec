//! `cloudlet overlay` (customize a base VM under cloudletfs and capture an overlay from the
//! traces) and `cloudlet synthesis` (mount base + overlay and resume the VM, early or eager).

use crate::vm_cmds::{interrupt_flag, wait_enter, wait_marker, Interrupted, RunDir};
use anyhow::{bail, Context as _, Result};
use cloudletfs::{mount, MountOptions, Mounted, OverlaySource, Trace};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use synth::create::{CreateOptions, CustomImages};
use synth::registry::{Base, Registry};
use synth::vm::{Accel, HostFwd, LaunchOptions, MemoryMode, QemuArgs, Timings, Vm, VmPaths};
use synth::ImageKind;

/// Chunks of the working set recorded for segment ordering, at most.
const MAX_ORDER: usize = 1 << 20;

/// Parses `tcp:[HOST]:PORT-:GUESTPORT` (QEMU's hostfwd syntax) or `PORT:GUESTPORT`.
pub fn parse_hostfwd(s: &str) -> Result<HostFwd> {
    let bad = || {
        anyhow::anyhow!("--hostfwd {s:?}: expected tcp:[HOST]:PORT-:GUESTPORT or PORT:GUESTPORT")
    };
    let (host, hport, gport) = if let Some(rest) = s.strip_prefix("tcp:") {
        let (h, g) = rest.split_once("-:").ok_or_else(bad)?;
        let (addr, port) = h.rsplit_once(':').ok_or_else(bad)?;
        let addr = if addr.is_empty() { "127.0.0.1" } else { addr };
        (addr.to_string(), port, g)
    } else {
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        ("127.0.0.1".to_string(), h, g)
    };
    Ok(HostFwd {
        host_addr: host.parse().map_err(|_| bad())?,
        host_port: hport.parse().map_err(|_| bad())?,
        guest_port: gport.parse().map_err(|_| bad())?,
    })
}

/// Parses every `--hostfwd` value.
pub fn parse_hostfwds(values: &[String]) -> Result<Vec<HostFwd>> {
    values.iter().map(|h| parse_hostfwd(h)).collect()
}

fn base_paths(base: &Base, disk: PathBuf, memory: PathBuf, run_dir: PathBuf) -> VmPaths {
    VmPaths {
        disk,
        memory,
        kernel: base.kernel_path(),
        initrd: base.initrd_path(),
        run_dir,
    }
}

fn mount_vm(base: &Base, overlay: OverlaySource, run: &RunDir, fill: bool) -> Result<Mounted> {
    let mnt = run.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let mut opts = MountOptions::new(base.clone(), overlay, &mnt);
    opts.state_dir = Some(run.join("state"));
    opts.cache_dir = Some(run.0.clone());
    opts.background_fill = fill;
    mount(opts).context("mounting cloudletfs")
}

/// Flushes the page cache of an image on the mount so every guest write has reached cloudletfs.
fn flush(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("flushing {}", path.display()))
}

/// What `cloudlet overlay` is asked to do.
pub struct OverlayRequest {
    pub base: String,
    pub output: PathBuf,
    pub script: Option<PathBuf>,
    pub ready: Option<String>,
    pub timeout: Duration,
    pub hostfwd: Vec<HostFwd>,
    pub vnc: Option<String>,
    pub create: CreateOptions,
    pub full_memory_scan: bool,
    pub keep_capture: Option<PathBuf>,
    /// Profile the working set: resume the new overlay and wait for a 200 from this URL.
    pub profile_url: Option<String>,
}

/// What `cloudlet overlay` did.
#[derive(Debug, Serialize)]
pub struct OverlayReport {
    pub overlay: PathBuf,
    pub overlay_bytes: u64,
    pub disk_candidates: u64,
    pub disk_discarded: u64,
    pub memory_candidates: u64,
    /// Chunks (disk and memory, base ones included) touched while customizing.
    pub customization_accessed_chunks: u64,
    /// Chunks stored first, in first-touch order, as the working set.
    pub working_set_chunks: u64,
    /// Where the working set comes from: "profile" (`--profile-url`) or "customization".
    pub working_set_from: &'static str,
    /// With `--profile-url`: seconds from resuming the overlay to the first 200.
    pub profile_first_response_seconds: Option<f64>,
    pub resume_seconds: f64,
    pub capture_seconds: f64,
    pub diff_seconds: f64,
    pub stats: synth::create::CreateStats,
}

/// Resumes the base VM under cloudletfs (copy-on-write, traced), lets a script or the user
/// customize it, captures the device state and builds the overlay from the traces.
pub fn make_overlay(home: &Path, threads: usize, req: OverlayRequest) -> Result<OverlayReport> {
    let stop = interrupt_flag()?;
    let registry = Registry::open(home)?;
    let base = registry.get(&req.base)?;
    let run = RunDir::new(home, "overlay")?;
    let empty = run.join("base.overlay");
    synth::create::empty_overlay(&base, &empty)?;
    let mounted = mount_vm(&base, OverlaySource::Path(empty), &run, false)?;
    let mnt = mounted.mountpoint().to_path_buf();
    let (disk, memory) = (mnt.join("disk/image"), mnt.join("memory/image"));
    let args = QemuArgs::new(
        &base.record.config,
        &base_paths(&base, disk.clone(), memory.clone(), run.join("run")),
        &LaunchOptions {
            // Shared: guest RAM writes reach cloudletfs (and its trace) through writeback.
            memory: MemoryMode::Capture,
            incoming: true,
            hostfwd: req.hostfwd.clone(),
            accel: Accel::detect()?,
            vnc: req.vnc.clone(),
        },
    )?;
    let start = Instant::now();
    let mut vm = Vm::spawn(&args)?;
    vm.resume_from(&mnt.join("device-state"))?;
    let resume_seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "base VM resumed in {resume_seconds:.2}s (serial log: {})",
        args.serial_log().display()
    );
    if let Some(script) = &req.script {
        let text = std::fs::read_to_string(script)
            .with_context(|| format!("reading {}", script.display()))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if stop.load(Ordering::Relaxed) {
                bail!(Interrupted);
            }
            eprintln!("guest$ {line}");
            let out = vm.run_serial_command(line, req.timeout)?;
            if out.rc != 0 {
                bail!(
                    "customization command {line:?} failed in the guest (exit status {}): {}",
                    out.rc,
                    out.output.trim()
                );
            }
        }
    }
    match &req.ready {
        Some(marker) => {
            wait_marker(&mut vm, marker, req.timeout, &stop)?;
        }
        None if req.script.is_none() => {
            wait_enter(
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
    if let Some(dir) = &req.keep_capture {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (src, name) in [
            (&disk, "disk.img"),
            (&memory, "memory.img"),
            (&ds, "device-state"),
        ] {
            std::fs::copy(src, dir.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }

    let disk_modified = mounted.trace(ImageKind::Disk, Trace::Modified);
    let disk_discarded = mounted.trace(ImageKind::Disk, Trace::Discarded);
    let mut disk_chunks = disk_modified;
    disk_chunks.extend(&disk_discarded);
    let memory_chunks = if req.full_memory_scan {
        None
    } else {
        let mut m = mounted.trace(ImageKind::Memory, Trace::Modified);
        m.extend(mounted.trace(ImageKind::Memory, Trace::Discarded));
        Some(m)
    };
    let order = mounted.access_order(MAX_ORDER);
    let mut opts = req.create;
    opts.threads = threads;
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
    let stats = synth::create::create_overlay(
        &base,
        &index,
        &custom,
        &req.output,
        &opts,
        &Default::default(),
    )?;
    let mut diff_seconds = diff_start.elapsed().as_secs_f64();
    let mut stats = stats;
    let mut profile = None;
    if let Some(url) = &req.profile_url {
        eprintln!("profiling the working set: resuming the overlay until {url} answers 200");
        let (ws, secs) = profile_working_set(
            home,
            &base,
            &req.output,
            &req.hostfwd,
            url,
            req.timeout,
            &stop,
        )?;
        eprintln!(
            "first response after {secs:.2}s; {} chunks touched; writing the overlay again",
            ws.len()
        );
        opts.order = ws;
        let again = Instant::now();
        let tmp = req.output.with_extension("profiled.tmp");
        stats = synth::create::create_overlay(
            &base,
            &index,
            &custom,
            &tmp,
            &opts,
            &Default::default(),
        )?;
        std::fs::rename(&tmp, &req.output)
            .with_context(|| format!("replacing {}", req.output.display()))?;
        diff_seconds += again.elapsed().as_secs_f64();
        profile = Some(secs);
    }
    drop(custom);
    mounted.unmount().context("unmounting cloudletfs")?;
    Ok(OverlayReport {
        overlay: req.output,
        overlay_bytes: stats.overlay_bytes,
        disk_candidates: disk_chunks.len() as u64,
        disk_discarded: disk_discarded.len() as u64,
        memory_candidates: memory_chunks.map_or(base.record.memory_size / 4096, |m| m.len() as u64),
        customization_accessed_chunks: order.len() as u64,
        working_set_chunks: opts.order.len() as u64,
        working_set_from: if profile.is_some() {
            "profile"
        } else {
            "customization"
        },
        profile_first_response_seconds: profile,
        resume_seconds,
        capture_seconds,
        diff_seconds,
        stats,
    })
}

/// Which VM manager runs a synthesized VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// QEMU started and driven directly (the default).
    Qemu,
    /// A transient libvirt domain on the libvirt daemon at `uri`.
    Libvirt {
        /// Connection URI, e.g. `qemu:///system`.
        uri: String,
    },
}

/// `--backend libvirt` on a `cloudlet` built without the `libvirt` feature.
#[derive(Debug, thiserror::Error)]
#[error(
    "this cloudlet was built without libvirt support; rebuild it with \
     `cargo build --release --features libvirt` (needs libvirt-dev), or use --backend qemu"
)]
pub struct LibvirtNotBuilt;

impl Backend {
    /// Fails when this build cannot run the backend.
    pub fn check(&self) -> Result<()> {
        match self {
            Backend::Qemu => Ok(()),
            Backend::Libvirt { .. } if cfg!(feature = "libvirt") => Ok(()),
            Backend::Libvirt { .. } => Err(LibvirtNotBuilt.into()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Libvirt { .. } => "libvirt",
        }
    }
}

/// A resumed VM on one of the backends; dropping it stops the VM.
#[derive(Debug)]
pub enum ResumedVm {
    /// A QEMU process of ours.
    Qemu(Vm),
    /// A libvirt domain (destroyed on drop).
    #[cfg(feature = "libvirt")]
    Libvirt(synth::vm::libvirt::LibvirtVm),
}

impl ResumedVm {
    /// "QEMU pid N" or "libvirt domain NAME", for logs.
    pub fn describe(&self) -> String {
        match self {
            ResumedVm::Qemu(vm) => format!("QEMU pid {}", vm.pid()),
            #[cfg(feature = "libvirt")]
            ResumedVm::Libvirt(vm) => format!("libvirt domain {}", vm.name()),
        }
    }

    /// QEMU's pid when this process started it.
    pub fn pid(&self) -> Option<u32> {
        match self {
            ResumedVm::Qemu(vm) => Some(vm.pid()),
            #[cfg(feature = "libvirt")]
            ResumedVm::Libvirt(_) => None,
        }
    }

    /// Step durations (for libvirt, `qmp_connected` is the domain start).
    pub fn timings(&self) -> Timings {
        match self {
            ResumedVm::Qemu(vm) => vm.timings(),
            #[cfg(feature = "libvirt")]
            ResumedVm::Libvirt(vm) => vm.timings(),
        }
    }
}

/// What `cloudlet synthesis` is asked to do.
pub struct SynthesisRequest {
    pub base: String,
    pub overlay: String,
    pub early_start: bool,
    pub hostfwd: Vec<HostFwd>,
    pub json: bool,
    pub exit_after: Option<Duration>,
    pub backend: Backend,
}

/// One line of the synthesis timeline.
#[derive(Debug, Serialize)]
struct Event<'a> {
    event: &'a str,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<serde_json::Value>,
}

fn emit(json: bool, t0: Instant, event: &str, detail: Option<serde_json::Value>) {
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        let line = serde_json::to_string(&Event {
            event,
            seconds,
            detail,
        })
        .unwrap_or_default();
        println!("{line}");
    } else {
        match detail {
            Some(d) => println!("{seconds:>8.3}s  {event}: {d}"),
            None => println!("{seconds:>8.3}s  {event}"),
        }
    }
}

/// A synthesized VM: QEMU running over a cloudletfs mount of base + overlay. Dropping it stops
/// QEMU, then unmounts, then removes the run folder (fields drop in declaration order).
pub struct RunningVm {
    /// The VM (QEMU process or libvirt domain).
    pub vm: ResumedVm,
    /// The cloudletfs mount serving its disk and memory.
    pub mounted: Mounted,
    /// The guest's serial console log.
    pub serial_log: PathBuf,
    /// Scratch folder of this VM (mount point, state, QEMU sockets).
    pub run: RunDir,
}

impl RunningVm {
    /// Stops QEMU and unmounts; returns the final cloudletfs stats.
    pub fn stop(self) -> Result<cloudletfs::Stats> {
        let RunningVm {
            vm, mounted, run, ..
        } = self;
        drop(vm);
        let stats = mounted.stats();
        mounted.unmount().context("unmounting cloudletfs")?;
        drop(run);
        Ok(stats)
    }
}

/// How [`resume_vm`] runs the VM.
pub struct ResumeOptions<'a> {
    /// Resume before every chunk is in.
    pub early_start: bool,
    /// Host ports forwarded into the guest.
    pub hostfwd: &'a [HostFwd],
    /// What runs the VM.
    pub backend: &'a Backend,
}

/// Mounts `overlay` over `base` and resumes the VM: early (right away) or eager (once every
/// chunk is in). `on_event` hears "overlay opened", "overlay fetched (eager)", "VM resumed".
/// A set `stop` flag abandons the eager wait.
pub fn resume_vm(
    home: &Path,
    base: &Base,
    overlay: OverlaySource,
    how: &ResumeOptions<'_>,
    stop: &std::sync::atomic::AtomicBool,
    on_event: &mut dyn FnMut(&str),
) -> Result<RunningVm> {
    let ResumeOptions {
        early_start,
        hostfwd,
        backend,
    } = *how;
    backend.check()?;
    let run = RunDir::new(home, "synthesis")?;
    let mounted = mount_vm(base, overlay, &run, true)?;
    on_event("overlay opened");
    if !early_start {
        while !mounted.wait_filled(Some(Duration::from_millis(250))) {
            if stop.load(Ordering::Relaxed) {
                bail!(Interrupted);
            }
        }
        on_event("overlay fetched (eager)");
    }
    let mnt = mounted.mountpoint().to_path_buf();
    let paths = base_paths(
        base,
        mnt.join("disk/image"),
        mnt.join("memory/image"),
        run.join("run"),
    );
    let options = LaunchOptions {
        memory: MemoryMode::Resume,
        incoming: true,
        hostfwd: hostfwd.to_vec(),
        accel: Accel::detect()?,
        vnc: None,
    };
    let device_state = mnt.join("device-state");
    let (vm, serial_log) = match backend {
        Backend::Qemu => {
            let args = QemuArgs::new(&base.record.config, &paths, &options)?;
            let mut vm = Vm::spawn(&args)?;
            vm.resume_from(&device_state)?;
            (ResumedVm::Qemu(vm), args.serial_log().to_path_buf())
        }
        Backend::Libvirt { uri } => {
            let name = format!(
                "cloudlet-{}",
                run.0.file_name().unwrap_or_default().to_string_lossy()
            );
            resume_libvirt(uri, &name, base, &paths, &options, &device_state)?
        }
    };
    on_event("VM resumed");
    Ok(RunningVm {
        vm,
        mounted,
        serial_log,
        run,
    })
}

/// Resumes the VM from `overlay` as a synthesis does (early start), waits for the first HTTP
/// 200 from `url`, and returns the chunks the VM read or wrote until then in the order it first
/// touched them (what a synthesis asks for first), and the seconds that took. Readahead is in
/// the trace as it will be in a synthesis, since both read through the same cloudletfs.
fn profile_working_set(
    home: &Path,
    base: &Base,
    overlay: &Path,
    hostfwd: &[HostFwd],
    url: &str,
    timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<(ImageKind, u64)>, f64)> {
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
    wait_http_ok(url, start + timeout, stop)?;
    let secs = start.elapsed().as_secs_f64();
    let order = running.mounted.access_order(MAX_ORDER);
    running.stop()?;
    Ok((order, secs))
}

/// Polls `url` (plain `http://HOST:PORT/PATH`) until it answers 200, `deadline` passes or
/// `stop` is set.
fn wait_http_ok(url: &str, deadline: Instant, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--profile-url {url:?}: expected http://HOST:PORT/PATH"))?;
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            bail!(Interrupted);
        }
        let attempt = || -> std::io::Result<String> {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(c, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
            let mut head = [0u8; 64];
            let n = c.read(&mut head)?;
            Ok(String::from_utf8_lossy(&head[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string())
        };
        match attempt() {
            Ok(status) if status.split_whitespace().nth(1) == Some("200") => return Ok(()),
            Ok(status) => last = status,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("--profile-url {url}: no 200 before the timeout (last: {last})")
}

/// Starts the VM as a transient libvirt domain and loads its device state.
#[cfg(feature = "libvirt")]
fn resume_libvirt(
    uri: &str,
    name: &str,
    base: &Base,
    paths: &VmPaths,
    options: &LaunchOptions,
    device_state: &Path,
) -> Result<(ResumedVm, PathBuf)> {
    let launch = synth::vm::DomainLaunch::new(&base.record.config, paths, options)?;
    let mut vm = synth::vm::libvirt::LibvirtVm::start(uri, name, launch)?;
    vm.resume_from(device_state)?;
    let log = vm.serial_log().to_path_buf();
    Ok((ResumedVm::Libvirt(vm), log))
}

/// Without the `libvirt` feature: refused ([`Backend::check`] normally says so earlier).
#[cfg(not(feature = "libvirt"))]
fn resume_libvirt(
    _uri: &str,
    _name: &str,
    _base: &Base,
    _paths: &VmPaths,
    _options: &LaunchOptions,
    _device_state: &Path,
) -> Result<(ResumedVm, PathBuf)> {
    Err(LibvirtNotBuilt.into())
}

/// Mounts base + overlay, resumes the VM (early: right away; eager: after every chunk is
/// in), prints the timeline, and runs until SIGINT/SIGTERM (or `exit_after`).
pub fn synthesis(home: &Path, req: SynthesisRequest) -> Result<()> {
    req.backend.check()?;
    let stop = interrupt_flag()?;
    let t0 = Instant::now();
    let registry = Registry::open(home)?;
    let base = registry.get(&req.base)?;
    let ports: Vec<String> = req
        .hostfwd
        .iter()
        .map(|h| format!("{}:{} -> guest {}", h.host_addr, h.host_port, h.guest_port))
        .collect();
    let json = req.json;
    let mut on_event = |e: &str| {
        if e != "VM resumed" {
            emit(json, t0, e, None);
        }
    };
    let running = resume_vm(
        home,
        &base,
        OverlaySource::parse(&req.overlay),
        &ResumeOptions {
            early_start: req.early_start,
            hostfwd: &req.hostfwd,
            backend: &req.backend,
        },
        &stop,
        &mut on_event,
    )?;
    let timings = running.vm.timings();
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    emit(
        json,
        t0,
        "VM resumed",
        Some(serde_json::json!({
            "ports": ports,
            "backend": req.backend.name(),
            "vm": running.vm.describe(),
            // Start of QEMU (or of the libvirt domain) to the guest running.
            "start_to_running_seconds": secs(timings.spawn_to_running),
            // Loading the device state, to `cont`.
            "device_state_seconds": secs(timings.resume),
        })),
    );
    log::info!("serial console log: {}", running.serial_log.display());
    let mut filled = !req.early_start;
    let deadline = req.exit_after.map(|d| Instant::now() + d);
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
            emit(req.json, t0, "background fill done", None);
        } else if filled {
            std::thread::sleep(Duration::from_millis(200));
        }
        if !running.mounted.is_alive() {
            bail!("cloudletfs went away");
        }
    }
    let stats = running.stop()?;
    emit(
        req.json,
        t0,
        "VM stopped",
        Some(serde_json::to_value(&stats).unwrap_or_default()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_hostfwd_qemu_and_short_forms() {
        let h = parse_hostfwd("tcp:127.0.0.1:8080-:80").unwrap();
        assert_eq!(
            (h.host_addr.to_string(), h.host_port, h.guest_port),
            ("127.0.0.1".into(), 8080, 80)
        );
        let h = parse_hostfwd("tcp::9000-:22").unwrap();
        assert_eq!(
            (h.host_addr.to_string(), h.host_port, h.guest_port),
            ("127.0.0.1".into(), 9000, 22)
        );
        let h = parse_hostfwd("8081:8080").unwrap();
        assert_eq!((h.host_port, h.guest_port), (8081, 8080));
    }

    #[test]
    fn backend_check_libvirt_follows_the_build() {
        let r = Backend::Libvirt {
            uri: synth::vm::DEFAULT_LIBVIRT_URI.into(),
        }
        .check();
        assert_eq!(r.is_ok(), cfg!(feature = "libvirt"));
        if let Err(e) = r {
            assert!(e.to_string().contains("--features libvirt"), "{e}");
            assert_eq!(crate::commands::exit_code(&e), 2);
        }
        assert!(Backend::Qemu.check().is_ok());
    }

    #[test]
    fn parse_hostfwd_garbage_is_refused() {
        for bad in [
            "",
            "tcp:1.2.3.4:80",
            "udp:1:2-:3",
            "80",
            "a:b",
            "tcp:host:80-:22",
            "70000:80",
        ] {
            assert!(parse_hostfwd(bad).is_err(), "{bad}");
        }
    }
}
