//! The `cloudlet` subcommands and their output.

use crate::progress;
use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use synth::base::LaunchConfig;
use synth::chunk::{hex, ImageKind};
use synth::codec::Codec;
use synth::create::{CreateOptions, CustomImages};
use synth::format::{ClassCounts, FormatError, Overlay};
use synth::registry::{AddBase, Registry, RegistryError};
use synth::source::FileSource;

/// Settings shared by every command.
pub struct Context {
    /// Registry folder.
    pub home: PathBuf,
    /// Worker threads.
    pub threads: usize,
}

impl Context {
    fn registry(&self) -> Result<Registry> {
        Registry::open(&self.home)
            .with_context(|| format!("opening registry {}", self.home.display()))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a disk image on QEMU, wait until it is ready, capture it and register it as a base.
    ///
    /// Guest RAM lives in a shared memory file, so the capture is that file plus the device
    /// state (saved with x-ignore-shared). The disk is copied first; DISK is not modified.
    Base {
        /// Raw disk image to boot.
        disk: PathBuf,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mb: u64,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// QEMU machine type.
        #[arg(long, default_value = "q35")]
        machine: String,
        /// QEMU CPU model.
        #[arg(long, default_value = "max")]
        cpu: String,
        /// Kernel to boot directly (stored in the base).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initial ramdisk (stored in the base).
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, requires = "kernel")]
        append: Option<String>,
        /// Capture once the guest prints this on its serial console (else: wait for Enter).
        #[arg(long, value_name = "MARKER")]
        ready: Option<String>,
        /// How long to wait for --ready, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Show the guest on a VNC display (e.g. 127.0.0.1:1) to prepare it by hand.
        #[arg(long, value_name = "HOST:DISPLAY")]
        vnc: Option<String>,
        /// Add a virtio-balloon with free page reporting (freed guest pages leave the memory
        /// image while the base boots).
        #[arg(long)]
        balloon: bool,
        /// Name of the base.
        #[arg(long)]
        name: Option<String>,
        /// Print the base record as JSON.
        #[arg(long)]
        json: bool,
        /// Further QEMU arguments, recorded in the base's launch config.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Customize a base VM and capture the changes as an overlay.
    ///
    /// The base VM resumes with its disk and memory served by cloudletfs (copy-on-write,
    /// traced); after the customization (a script typed on the serial console, or by hand
    /// until Enter) the device state is saved and the overlay built from the traces: disk
    /// chunks written or discarded, memory chunks written back, stored in first-touch order.
    Overlay {
        /// Base id (or unique prefix, or name).
        base: String,
        /// Overlay file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Commands to run on the guest's serial console, one per line (needs the guest's
        /// command loop, as in tools/guest); without it, customize by hand and press Enter.
        #[arg(long, value_name = "SCRIPT")]
        run: Option<PathBuf>,
        /// Capture once the guest prints this on its serial console.
        #[arg(long, value_name = "MARKER")]
        ready: Option<String>,
        /// Seconds allowed for each command and for --ready.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Forward a host port to the guest: tcp:[HOST]:PORT-:GUESTPORT, or PORT:GUESTPORT.
        #[arg(long)]
        hostfwd: Vec<String>,
        /// Show the guest on a VNC display (e.g. 127.0.0.1:1).
        #[arg(long, value_name = "HOST:DISPLAY")]
        vnc: Option<String>,
        /// Segment codec.
        #[arg(long, default_value = "xz")]
        codec: Codec,
        /// Compression level (default: 9 for xz, 19 for zstd).
        #[arg(long)]
        level: Option<u32>,
        /// Hash-compare the whole memory image instead of trusting the memory trace.
        #[arg(long)]
        full_memory_scan: bool,
        /// Also copy the captured disk, memory and device state into this folder.
        #[arg(long, value_name = "DIR")]
        keep_capture: Option<PathBuf>,
        /// Profile the working set: resume the new overlay as a synthesis would, wait for
        /// a 200 from this URL (reached through --hostfwd), and write the overlay again with
        /// the chunks touched by then first. Without it, the working set is what the
        /// customization touched.
        #[arg(long, value_name = "http://HOST:PORT/PATH")]
        profile_url: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Synthesize a VM: mount base + overlay with cloudletfs and resume it on QEMU.
    ///
    /// Runs until SIGINT/SIGTERM, then stops the VM and unmounts.
    Synthesis {
        /// Base id (or unique prefix, or name).
        base: String,
        /// Overlay file or http(s):// URL.
        overlay: String,
        /// Resume as soon as the metadata is in; chunks arrive on demand and in background.
        #[arg(long)]
        early_start: bool,
        /// Forward a host port to the guest: tcp:[HOST]:PORT-:GUESTPORT, or PORT:GUESTPORT.
        #[arg(long)]
        hostfwd: Vec<String>,
        /// Stop by itself after this many seconds.
        #[arg(long)]
        exit_after: Option<u64>,
        /// Print the timeline as JSON lines.
        #[arg(long)]
        json: bool,
        /// What runs the VM: QEMU directly, or a transient libvirt domain (needs a cloudlet
        /// built with `--features libvirt` and a running libvirtd).
        #[arg(long, value_enum, default_value = "qemu")]
        backend: BackendArg,
        /// libvirt connection URI (with --backend libvirt).
        #[arg(long, default_value = synth::vm::DEFAULT_LIBVIRT_URI)]
        libvirt_uri: String,
    },
    /// Mount base + overlay as files (disk/image, memory/image, device-state, stats, traces).
    ///
    /// Runs the cloudletfs daemon; see `cloudletfs --help` for its options.
    Mount {
        /// Base id (or unique prefix, or name).
        base: String,
        /// Overlay file or http(s):// URL.
        overlay: String,
        /// Empty folder to mount on.
        mountpoint: PathBuf,
        /// Keep modified and discarded chunks here, so a remount continues where it stopped.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Stay in the foreground (else the daemon detaches once mounted).
        #[arg(long)]
        foreground: bool,
    },
    /// Unmount a cloudletfs mount.
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Register a base VM: disk image, memory image, device state and launch config.
    #[command(name = "add-base")]
    AddBase {
        /// Raw disk image.
        #[arg(long)]
        disk: PathBuf,
        /// Flat memory image (guest RAM).
        #[arg(long)]
        memory: PathBuf,
        /// Device state (QEMU migration stream without RAM).
        #[arg(long)]
        device_state: Option<PathBuf>,
        /// Launch config (JSON; see README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Name (default: the disk file's name).
        #[arg(long)]
        name: Option<String>,
        /// Leave the disk and memory images where they are instead of copying them.
        #[arg(long)]
        link: bool,
        /// Print the base record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List registered base VMs.
    #[command(name = "list-base")]
    ListBase {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a base VM.
    #[command(name = "del-base")]
    DelBase {
        /// Base id (or unique prefix, or name).
        id: String,
    },
    /// Write a base VM as one portable package file.
    #[command(name = "export-base")]
    ExportBase {
        /// Base id (or unique prefix, or name).
        id: String,
        /// Package file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Import a package written by export-base, verifying every hash.
    #[command(name = "import-base")]
    ImportBase {
        /// Package file.
        package: PathBuf,
        /// Print the base record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a VM overlay: the chunks of a custom VM that differ from its base.
    Diff {
        /// Base id (or unique prefix, or name).
        base: String,
        /// Custom disk image.
        #[arg(long)]
        disk: PathBuf,
        /// Custom memory image.
        #[arg(long)]
        memory: PathBuf,
        /// Custom device state.
        #[arg(long)]
        device_state: Option<PathBuf>,
        /// Overlay file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Only examine these disk chunks (one chunk number per line, e.g. a cloudletfs trace).
        #[arg(long, value_name = "FILE")]
        disk_chunks: Option<PathBuf>,
        /// Only examine these memory chunks (one chunk number per line).
        #[arg(long, value_name = "FILE")]
        memory_chunks: Option<PathBuf>,
        /// Store these chunks first ("disk N" / "memory N" per line): the working set.
        #[arg(long, value_name = "FILE")]
        order: Option<PathBuf>,
        /// Segment codec.
        #[arg(long, default_value = "xz")]
        codec: Codec,
        /// Compression level (default: 9 for xz, 19 for zstd).
        #[arg(long)]
        level: Option<u32>,
        /// Decoded segment size in KiB (segments outside the working set).
        #[arg(long, default_value_t = (synth::create::DEFAULT_SEGMENT_SIZE >> 10) as u64)]
        segment_kib: u64,
        /// Decoded size in KiB of the segments holding the chunks listed by --order.
        #[arg(long, default_value_t = (synth::create::DEFAULT_FIRST_SEGMENT_SIZE >> 10) as u64)]
        first_segment_kib: u64,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Describe an overlay: sizes, chunk classes, segments, codec.
    #[command(name = "info-overlay")]
    InfoOverlay {
        /// Overlay file.
        overlay: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check an overlay completely: structure, every segment, and (with --base) every chunk.
    Verify {
        /// Overlay file.
        overlay: PathBuf,
        /// Also rebuild every chunk against this base and check its SHA-256.
        #[arg(long)]
        base: Option<String>,
        /// Print the report (with segment decode timings) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the custom VM's disk.img, memory.img and device-state from base + overlay.
    Reconstruct {
        /// Base id (or unique prefix, or name).
        base: String,
        /// Overlay file.
        overlay: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve synthesis sessions over TCP (docs/protocol.md): clients send an overlay (or a
    /// URL), the server resumes the VM on one of its bases and forwards the guest ports.
    ///
    /// Runs until SIGINT/SIGTERM, then ends every session (VMs stopped, mounts removed).
    Server {
        /// Address and port to listen on.
        #[arg(long, default_value = "0.0.0.0:8021", value_name = "ADDR:PORT")]
        listen: String,
        /// Require this pre-shared token (the file's content, without surrounding whitespace).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Sessions at once; further clients are refused as busy.
        #[arg(long, default_value_t = 4)]
        max_sessions: u32,
        /// URL prefix the server may fetch overlays from (flow 2); none by default.
        #[arg(long, value_name = "PREFIX")]
        allow_url_prefix: Vec<String>,
        /// Address reported to clients for the forwarded guest ports.
        #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
        public_addr: String,
        /// Announce this cloudlet on the local network (mDNS/DNS-SD, `_cloudlet._tcp`).
        #[arg(long)]
        advertise: bool,
        /// Instance name announced (default: "cloudlet on HOSTNAME").
        #[arg(long, value_name = "NAME", requires = "advertise")]
        advertise_name: Option<String>,
        /// Admin socket for list-session and close-session (default: HOME/server.sock).
        #[arg(long, value_name = "PATH")]
        admin_socket: Option<PathBuf>,
        /// A client that sends nothing for this long, or takes longer for one frame, is cut
        /// off (at least 20).
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        idle_timeout: u64,
    },
    /// List the sessions of the `cloudlet server` running on this machine (admin socket).
    ListSession {
        /// The server's admin socket (default: HOME/server.sock).
        #[arg(long, value_name = "PATH")]
        admin_socket: Option<PathBuf>,
        /// Print the sessions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End one session of the running `cloudlet server`: its VM is stopped, its mount removed,
    /// its slot freed; returns once that is done. Exit code 4 if there is no such session.
    CloseSession {
        /// Session id (from list-session).
        id: u64,
        /// The server's admin socket (default: HOME/server.sock).
        #[arg(long, value_name = "PATH")]
        admin_socket: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Synthesize a VM on a `cloudlet server`: send an overlay (or a URL for the server to
    /// fetch), print where the guest ports are reachable, keep the session until Ctrl-C.
    Client {
        /// Server as HOST or HOST:PORT (default port 8021), or `auto`: the first cloudlet
        /// discovered on the local network.
        #[arg(long, required_unless_present = "discover")]
        server: Option<String>,
        /// Overlay file to send.
        #[arg(
            long,
            conflicts_with = "url",
            required_unless_present_any = ["url", "discover"]
        )]
        overlay: Option<PathBuf>,
        /// http(s):// URL the server fetches the overlay from.
        #[arg(long)]
        url: Option<String>,
        /// Resume as soon as the metadata is in; segments follow on demand.
        #[arg(long)]
        early_start: bool,
        /// Guest TCP port to reach (repeatable).
        #[arg(long = "port", value_name = "GUESTPORT")]
        ports: Vec<u16>,
        /// Pre-shared token file.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Throttle the overlay upload to this many bytes per second.
        #[arg(long, value_name = "BYTES_PER_SEC")]
        rate_limit: Option<u64>,
        /// End the session right after the fill instead of holding it until Ctrl-C.
        #[arg(long)]
        finish: bool,
        /// List the cloudlets announced on the local network (mDNS/DNS-SD) and exit.
        #[arg(long, conflicts_with_all = ["server", "overlay", "url"])]
        discover: bool,
        /// How long --discover (and --server auto) listens for announcements.
        #[arg(long, value_name = "SECS", default_value = "3",
              value_parser = crate::discovery::parse_secs)]
        timeout: std::time::Duration,
        /// Print events as JSON lines (--discover: the list as a JSON array).
        #[arg(long)]
        json: bool,
    },
}

/// Maps an error to the process exit code.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(DaemonFailed(code)) = e.downcast_ref::<DaemonFailed>() {
        return u8::try_from(*code).unwrap_or(1);
    }
    let invalid = e.chain().any(|c| {
        c.downcast_ref::<FormatError>().is_some()
            || matches!(
                c.downcast_ref::<RegistryError>(),
                Some(RegistryError::BadPackage { .. })
            )
            || matches!(
                c.downcast_ref::<synth::resolve::ResolveError>(),
                Some(synth::resolve::ResolveError::Format(_))
            )
            || matches!(
                c.downcast_ref::<synth::reconstruct::ReconstructError>(),
                Some(synth::reconstruct::ReconstructError::Resolve(
                    synth::resolve::ResolveError::Format(_)
                ))
            )
    });
    let unavailable = e.chain().any(|c| {
        c.downcast_ref::<crate::synth_cmds::LibvirtNotBuilt>()
            .is_some()
    });
    if invalid {
        crate::EXIT_INVALID
    } else if unavailable {
        // An option this build cannot honour: a usage error, like clap's own.
        2
    } else if e
        .chain()
        .any(|c| c.downcast_ref::<crate::admin::NotFound>().is_some())
    {
        crate::EXIT_NOT_FOUND
    } else {
        1
    }
}

/// `cloudlet mount`: the `cloudletfs` daemon failed and has already told the user why on
/// stderr; `cloudlet` exits with its exit code and adds nothing.
#[derive(Debug, thiserror::Error)]
#[error("cloudletfs exited with code {0}")]
pub struct DaemonFailed(pub i32);

/// `--backend` of `cloudlet synthesis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// QEMU started and driven directly.
    Qemu,
    /// A transient libvirt domain.
    Libvirt,
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a base's id, or its whole record with `--json`.
fn print_base(base: &synth::registry::Base, json: bool) -> Result<()> {
    if json {
        print_json(&base.record)
    } else {
        println!("{}", base.record.id);
        Ok(())
    }
}

fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len())
}

/// Opens and validates an overlay file.
pub fn open_overlay(p: &Path) -> Result<Overlay> {
    let src = FileSource::open(p).with_context(|| format!("opening overlay {}", p.display()))?;
    Overlay::open(Arc::new(src)).with_context(|| format!("overlay {} refused", p.display()))
}

/// Reads a chunk list: one chunk number per line; blank lines and `#` comments ignored.
fn read_chunk_list(p: &Path) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        out.push(line.parse().with_context(|| {
            format!("{}:{}: {line:?} is not a chunk number", p.display(), i + 1)
        })?);
    }
    Ok(out)
}

/// Reads an order list: `disk N` or `memory N` per line.
fn read_order(p: &Path) -> Result<Vec<(ImageKind, u64)>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            anyhow::anyhow!(
                "{}:{}: expected \"disk N\" or \"memory N\"",
                p.display(),
                i + 1
            )
        };
        let (kind, n) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let image = match kind {
            "disk" => ImageKind::Disk,
            "memory" => ImageKind::Memory,
            _ => return Err(bad()),
        };
        out.push((image, n.trim().parse().map_err(|_| bad())?));
    }
    Ok(out)
}

#[derive(Serialize)]
struct BaseRow<'a> {
    id: &'a str,
    name: &'a str,
    disk_size: u64,
    memory_size: u64,
    path: String,
}

#[derive(Serialize)]
struct ImageInfo {
    size: u64,
    changed_chunks: u64,
    classes: ClassCounts,
}

#[derive(Serialize)]
struct OverlayInfo {
    file_size: u64,
    metadata_size: u64,
    base_id: String,
    codec: &'static str,
    chunk_size: u32,
    device_state_size: u64,
    disk: ImageInfo,
    memory: ImageInfo,
    segments: usize,
    segment_bytes: u64,
    segment_raw_bytes: u64,
}

fn overlay_info(path: &Path, ov: &Overlay) -> OverlayInfo {
    let m = ov.metadata();
    let image = |k: ImageKind| {
        let map = m.image(k);
        ImageInfo {
            size: map.size,
            changed_chunks: map.chunks.len() as u64,
            classes: ClassCounts::of(map),
        }
    };
    let _ = path;
    OverlayInfo {
        file_size: ov.file_len(),
        metadata_size: ov.metadata_len(),
        base_id: hex(&m.base_id),
        codec: m.codec.name(),
        chunk_size: m.chunk_size,
        device_state_size: m.device_state.len() as u64,
        disk: image(ImageKind::Disk),
        memory: image(ImageKind::Memory),
        segments: m.segments.len(),
        segment_bytes: m.segments.iter().map(|s| s.length).sum(),
        segment_raw_bytes: m.segments.iter().map(|s| s.raw_length).sum(),
    }
}

/// What `verify` found, with segment decode timings (one thread).
#[derive(Serialize)]
struct VerifyReport {
    segments: usize,
    verified_chunks: Option<u64>,
    decode_ms_p50: f64,
    decode_ms_p99: f64,
    decode_ms_total: f64,
    decode_mb_per_s: f64,
}

impl VerifyReport {
    fn new(
        segments: usize,
        verified_chunks: Option<u64>,
        mut decode_ms: Vec<f64>,
        meta: &synth::format::Metadata,
    ) -> Self {
        decode_ms.sort_by(f64::total_cmp);
        // Nearest-rank percentile: index ceil(p * n) - 1, in integer arithmetic.
        let pct = |per_mille: usize| {
            let i = (decode_ms.len() * per_mille)
                .div_ceil(1000)
                .saturating_sub(1);
            decode_ms.get(i).copied().unwrap_or(0.0)
        };
        let total: f64 = decode_ms.iter().sum();
        let raw: u64 = meta.segments.iter().map(|s| s.raw_length).sum();
        VerifyReport {
            segments,
            verified_chunks,
            decode_ms_p50: pct(500),
            decode_ms_p99: pct(990),
            decode_ms_total: total,
            decode_mb_per_s: if total > 0.0 {
                raw as f64 / 1e3 / total
            } else {
                0.0
            },
        }
    }
}

/// Runs one command.
pub fn run(ctx: &Context, cmd: Command) -> Result<()> {
    match cmd {
        Command::AddBase {
            disk,
            memory,
            device_state,
            config,
            name,
            link,
            json,
        } => {
            let config = match config {
                Some(p) => {
                    let text =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    Some(
                        serde_json::from_slice::<LaunchConfig>(&text)
                            .with_context(|| format!("launch config {} is invalid", p.display()))?,
                    )
                }
                None => None,
            };
            let reg = ctx.registry()?;
            let total = file_size(&disk)? + file_size(&memory)?;
            let req = AddBase {
                disk,
                memory,
                device_state,
                config,
                name,
                link,
                adopt: false,
                threads: ctx.threads,
            };
            let base = progress::run("indexing", total, |p| reg.add(&req, p))?;
            print_base(&base, json)?;
        }
        Command::Base {
            disk,
            memory_mb,
            vcpus,
            machine,
            cpu,
            kernel,
            initrd,
            append,
            ready,
            timeout,
            vnc,
            balloon,
            name,
            json,
            extra,
        } => {
            let req = crate::vm_cmds::BaseRequest {
                disk,
                memory_mb,
                vcpus,
                machine,
                cpu,
                kernel,
                initrd,
                append,
                ready,
                timeout: std::time::Duration::from_secs(timeout),
                vnc,
                balloon,
                name,
                extra_args: extra,
            };
            let base = crate::vm_cmds::make_base(&ctx.home, ctx.threads, req)?;
            print_base(&base, json)?;
        }
        Command::Overlay {
            base,
            output,
            run,
            ready,
            timeout,
            hostfwd,
            vnc,
            codec,
            level,
            full_memory_scan,
            keep_capture,
            profile_url,
            json,
        } => {
            let req = crate::synth_cmds::OverlayRequest {
                base,
                output,
                script: run,
                ready,
                timeout: std::time::Duration::from_secs(timeout),
                hostfwd: crate::synth_cmds::parse_hostfwds(&hostfwd)?,
                vnc,
                create: CreateOptions {
                    codec,
                    level: level.unwrap_or(codec.default_level()),
                    ..CreateOptions::default()
                },
                full_memory_scan,
                keep_capture,
                profile_url,
            };
            let report = crate::synth_cmds::make_overlay(&ctx.home, ctx.threads, req)?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "wrote {} ({} bytes): {} disk chunks traced ({} discarded), {} memory chunks, working set {} chunks (from the {}); resume {:.2}s, capture {:.2}s, diff {:.2}s",
                    report.overlay.display(),
                    report.overlay_bytes,
                    report.disk_candidates,
                    report.disk_discarded,
                    report.memory_candidates,
                    report.working_set_chunks,
                    report.working_set_from,
                    report.resume_seconds,
                    report.capture_seconds,
                    report.diff_seconds
                );
            }
        }
        Command::Server {
            listen,
            token_file,
            max_sessions,
            allow_url_prefix,
            public_addr,
            advertise,
            advertise_name,
            admin_socket,
            idle_timeout,
        } => {
            let opts = crate::server::ServerOptions {
                listen,
                token_file,
                max_sessions,
                allow_url_prefix,
                public_addr,
                advertise: advertise.then_some(crate::discovery::AdvertiseOptions {
                    name: advertise_name,
                }),
                admin_socket: crate::admin::socket_path(&ctx.home, admin_socket),
                idle_timeout: std::time::Duration::from_secs(idle_timeout),
            };
            crate::server::serve(&ctx.home, opts)?;
        }
        Command::ListSession { admin_socket, json } => {
            crate::admin::list_sessions(&crate::admin::socket_path(&ctx.home, admin_socket), json)?;
        }
        Command::CloseSession {
            id,
            admin_socket,
            json,
        } => {
            crate::admin::close_session(
                &crate::admin::socket_path(&ctx.home, admin_socket),
                id,
                json,
            )?;
        }
        Command::Client {
            server,
            overlay,
            url,
            early_start,
            ports,
            token_file,
            rate_limit,
            finish,
            discover,
            timeout,
            json,
        } => {
            if discover {
                return crate::discovery::discover(timeout, json);
            }
            let server = match server.as_deref() {
                Some("auto") => crate::discovery::auto_server(timeout)?,
                Some(s) => s.to_string(),
                None => bail!("give --server or --discover"),
            };
            crate::client_cmd::client(crate::client_cmd::ClientRequest {
                server,
                overlay,
                url,
                early_start,
                ports,
                token_file,
                rate_limit,
                finish,
                json,
            })?;
        }
        Command::Synthesis {
            base,
            overlay,
            early_start,
            hostfwd,
            exit_after,
            json,
            backend,
            libvirt_uri,
        } => {
            let backend = match backend {
                BackendArg::Qemu => crate::synth_cmds::Backend::Qemu,
                BackendArg::Libvirt => crate::synth_cmds::Backend::Libvirt { uri: libvirt_uri },
            };
            let req = crate::synth_cmds::SynthesisRequest {
                backend,
                base,
                overlay,
                early_start,
                hostfwd: crate::synth_cmds::parse_hostfwds(&hostfwd)?,
                json,
                exit_after: exit_after.map(std::time::Duration::from_secs),
            };
            crate::synth_cmds::synthesis(&ctx.home, req)?;
        }
        Command::Mount {
            base,
            overlay,
            mountpoint,
            state,
            foreground,
        } => {
            let exe = std::env::current_exe().context("locating the cloudlet binary")?;
            let daemon = exe.with_file_name("cloudletfs");
            let daemon = if daemon.exists() {
                daemon
            } else {
                PathBuf::from("cloudletfs")
            };
            let mut cmd = std::process::Command::new(&daemon);
            cmd.arg("--home")
                .arg(&ctx.home)
                .arg(&base)
                .arg(&overlay)
                .arg(&mountpoint);
            if let Some(s) = state {
                cmd.arg("--state").arg(s);
            }
            if foreground {
                cmd.arg("--foreground");
            }
            let status = cmd
                .status()
                .with_context(|| format!("running {}", daemon.display()))?;
            if !status.success() {
                // cloudletfs has said why on stderr; its exit code already means what ours do.
                bail!(DaemonFailed(status.code().unwrap_or(1)));
            }
        }
        Command::Unmount { mountpoint } => {
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&mountpoint)
                .status()
                .context("running fusermount3 (package fuse3)")?;
            if !status.success() {
                bail!("fusermount3 -u {} failed: {status}", mountpoint.display());
            }
        }
        Command::ListBase { json } => {
            let reg = ctx.registry()?;
            let bases = reg.list()?;
            let rows: Vec<BaseRow> = bases
                .iter()
                .map(|b| BaseRow {
                    id: &b.record.id,
                    name: &b.record.name,
                    disk_size: b.record.disk_size,
                    memory_size: b.record.memory_size,
                    path: b.dir.display().to_string(),
                })
                .collect();
            if json {
                print_json(&rows)?;
            } else if rows.is_empty() {
                eprintln!("no base VMs in {}", reg.home().display());
            } else {
                println!(
                    "{:<16} {:<20} {:>12} {:>12}",
                    "ID", "NAME", "DISK", "MEMORY"
                );
                for r in rows {
                    println!(
                        "{:<16} {:<20} {:>12} {:>12}",
                        &r.id[..16],
                        r.name,
                        r.disk_size,
                        r.memory_size
                    );
                }
            }
        }
        Command::DelBase { id } => {
            let base = ctx.registry()?.remove(&id)?;
            println!("deleted {} ({})", base.record.id, base.record.name);
        }
        Command::ExportBase { id, output } => {
            let len = ctx.registry()?.export(&id, &output)?;
            println!("wrote {} ({len} bytes)", output.display());
        }
        Command::ImportBase { package, json } => {
            let reg = ctx.registry()?;
            let total = file_size(&package)?;
            let base = progress::run("verifying", total, |p| reg.import(&package, p))?;
            print_base(&base, json)?;
        }
        Command::Diff {
            base,
            disk,
            memory,
            device_state,
            output,
            disk_chunks,
            memory_chunks,
            order,
            codec,
            level,
            segment_kib,
            first_segment_kib,
            json,
        } => {
            let reg = ctx.registry()?;
            let base = reg.get(&base)?;
            let load_start = std::time::Instant::now();
            let index = base.index()?;
            let index_load_seconds = load_start.elapsed().as_secs_f64();
            let opts = CreateOptions {
                codec,
                level: level.unwrap_or(codec.default_level()),
                segment_size: usize::try_from(segment_kib.saturating_mul(1024))
                    .context("segment size too large")?,
                first_segment_size: usize::try_from(first_segment_kib.saturating_mul(1024))
                    .context("segment size too large")?,
                threads: ctx.threads,
                disk_chunks: disk_chunks.as_deref().map(read_chunk_list).transpose()?,
                memory_chunks: memory_chunks.as_deref().map(read_chunk_list).transpose()?,
                order: order
                    .as_deref()
                    .map(read_order)
                    .transpose()?
                    .unwrap_or_default(),
            };
            let total = match (&opts.disk_chunks, &opts.memory_chunks) {
                (Some(d), Some(m)) => (d.len() + m.len()) as u64 * 4096,
                _ => file_size(&disk)? + file_size(&memory)?,
            };
            let custom = CustomImages {
                disk,
                memory,
                device_state,
            };
            let start = std::time::Instant::now();
            let stats = progress::run("diffing", total, |p| {
                synth::create::create_overlay(&base, &index, &custom, &output, &opts, p)
            })?;
            let secs = start.elapsed().as_secs_f64();
            if json {
                #[derive(Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    stats: &'a synth::create::CreateStats,
                    seconds: f64,
                    index_load_seconds: f64,
                }
                print_json(&Out {
                    stats: &stats,
                    seconds: secs,
                    index_load_seconds,
                })?;
            } else {
                println!(
                    "wrote {} ({} bytes, {} segments); examined {} chunks in {secs:.2}s",
                    output.display(),
                    stats.overlay_bytes,
                    stats.segments,
                    stats.examined_chunks
                );
            }
        }
        Command::InfoOverlay { overlay, json } => {
            let ov = open_overlay(&overlay)?;
            let info = overlay_info(&overlay, &ov);
            if json {
                print_json(&info)?;
            } else {
                println!("overlay      {}", overlay.display());
                println!(
                    "file size    {} bytes (metadata {})",
                    info.file_size, info.metadata_size
                );
                println!("base         {}", info.base_id);
                println!("codec        {}", info.codec);
                println!(
                    "segments     {} ({} bytes compressed, {} decoded)",
                    info.segments, info.segment_bytes, info.segment_raw_bytes
                );
                println!("device state {} bytes", info.device_state_size);
                for (name, i) in [("disk", &info.disk), ("memory", &info.memory)] {
                    let c = &i.classes;
                    println!(
                        "{name:<6} size {} changed {}: zero {} base-disk {} base-memory {} self {} xor {} raw {}",
                        i.size, i.changed_chunks, c.zero, c.base_disk, c.base_memory, c.self_ref, c.xor, c.raw
                    );
                }
            }
        }
        Command::Verify {
            overlay,
            base,
            json,
        } => {
            let ov = open_overlay(&overlay)?;
            let refused = || format!("overlay {} refused", overlay.display());
            let n = ov.metadata().segments.len();
            let mut decode_ms = Vec::with_capacity(n);
            for i in 0..n {
                let compressed = ov.read_segment_compressed(i).with_context(refused)?;
                let start = std::time::Instant::now();
                ov.decode_segment(i, &compressed).with_context(refused)?;
                decode_ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
            let verified_chunks = match base {
                Some(key) => {
                    let base = ctx.registry()?.get(&key)?;
                    let dir = tempfile_dir(&ctx.home)?;
                    let total = ov.metadata().disk.size + ov.metadata().memory.size;
                    let r = progress::run("verifying", total, |p| {
                        synth::reconstruct::reconstruct(&base, &ov, &dir, ctx.threads, p)
                    });
                    let _ = std::fs::remove_dir_all(&dir);
                    Some(r.with_context(refused)?.verified_chunks)
                }
                None => None,
            };
            let report = VerifyReport::new(n, verified_chunks, decode_ms, ov.metadata());
            if json {
                print_json(&report)?;
            } else {
                match verified_chunks {
                    Some(c) => {
                        println!("ok: {n} segments decoded, {c} chunks verified against the base")
                    }
                    None => println!("ok: structure and {n} segments verified"),
                }
                println!(
                    "segment decode: p50 {:.2} ms, p99 {:.2} ms, {:.0} MB/s decoded",
                    report.decode_ms_p50, report.decode_ms_p99, report.decode_mb_per_s
                );
            }
        }
        Command::Reconstruct {
            base,
            overlay,
            output,
            json,
        } => {
            let base = ctx.registry()?.get(&base)?;
            let ov = open_overlay(&overlay)?;
            let total = ov.metadata().disk.size + ov.metadata().memory.size;
            let start = std::time::Instant::now();
            let stats = progress::run("rebuilding", total, |p| {
                synth::reconstruct::reconstruct(&base, &ov, &output, ctx.threads, p)
            })
            .with_context(|| format!("reconstructing from {}", overlay.display()))?;
            let secs = start.elapsed().as_secs_f64();
            if json {
                #[derive(Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    stats: &'a synth::reconstruct::ReconstructStats,
                    seconds: f64,
                }
                print_json(&Out {
                    stats: &stats,
                    seconds: secs,
                })?;
            } else {
                println!(
                    "wrote {}/{{disk.img,memory.img,device-state}}: {} bytes, {} chunks verified, {secs:.2}s",
                    output.display(),
                    stats.bytes,
                    stats.verified_chunks
                );
            }
        }
    }
    Ok(())
}

/// A fresh scratch folder inside the registry (same filesystem, cleaned by the caller).
fn tempfile_dir(home: &Path) -> Result<PathBuf> {
    let dir = home
        .join("tmp")
        .join(format!("verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    Ok(dir)
}
