//! `cloudlet overlay`: customize a base VM under cloudletfs and capture the changes as an
//! overlay, from the traces alone (no rescan of the disk).

use super::{profile, CaptureError};
use crate::session::resume::{base_paths, capture_confinement, log_confined, mount_vm_with};
use crate::session::user::SessionUser;
use crate::session::{wait_agent, wait_http_ok, wait_marker, RunDir, SessionError, WaitError};
use crate::Reporter;
use cloudletfs::{OverlaySource, Trace};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use synth::base::Device;
use synth::codec::Codec;
use synth::create::{CreateOptions, CustomImages};
use synth::registry::Registry;
use synth::vm::{
    Accel, AgentError, CommandChannel, GuestNetwork, HostFwd, LaunchOptions, MemoryMode, QemuArgs,
    ShellError, Vm, VmError,
};
use synth::ImageKind;

/// Default `--segment-kib` of `cloudlet overlay`: 1 MiB segments outside the working set,
/// sized for early start rather than for the last percent of compression (`cloudlet diff`
/// keeps [`synth::create::DEFAULT_SEGMENT_SIZE`]).
pub const OVERLAY_SEGMENT_KIB: u64 = 1024;

/// Customize a base VM and capture the changes as an overlay.
///
/// The base VM resumes with its disk and memory served by cloudletfs (copy-on-write,
/// traced); after the customization (files copied and a script run over the serial console
/// or the guest agent, or by hand until Enter) the device state is saved and the overlay
/// built from the traces: disk chunks written or discarded, memory chunks written back.
/// The working set stored first, in small segments, is what the base VM touched from its
/// resume until it was ready for the first customization command (at most 1/16 of the
/// overlay's chunks), or with --profile-url what a resume of the new overlay touches until
/// its service answers.
#[derive(Debug, Clone, clap::Args)]
pub struct OverlayArgs {
    /// Base id (or unique prefix, or name).
    pub base: String,
    /// Overlay file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Commands to run in the guest, one per line (empty lines and `#` comments skipped),
    /// each in its own `sh` (a `cd` or `export` does not carry over); without it, --copy
    /// or a --ready*, customize by hand and press Enter.
    #[arg(long, value_name = "SCRIPT")]
    pub run: Option<PathBuf>,
    /// How --run reaches the guest: the shell on its serial console (any POSIX shell,
    /// logged in), the QEMU guest agent (the base needs `cloudlet base --guest-agent`), or
    /// auto: the agent if the base has its channel, else the serial console.
    #[arg(long, value_enum, default_value = "auto")]
    pub channel: Channel,
    /// Seconds each --run command and each --copy may take; a command still running then
    /// is interrupted and the run stops.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub cmd_timeout: u64,
    /// Go on after a --run command exits with a non-zero status (the failures are listed
    /// at the end); by default the first failure stops the run.
    #[arg(long)]
    pub keep_going: bool,
    /// Copy a local file into the guest before --run, through the guest agent (permissions
    /// kept): LOCAL:GUESTPATH with GUESTPATH absolute. Repeatable.
    #[arg(long, value_name = "LOCAL:GUESTPATH")]
    pub copy: Vec<CopySpec>,
    /// Capture once the guest prints this on its serial console (after --run).
    #[arg(long, value_name = "MARKER")]
    pub ready: Option<String>,
    /// Capture once the guest agent answers guest-ping (after --run).
    #[arg(long)]
    pub ready_agent: bool,
    /// Capture once this URL (reached through --hostfwd) answers HTTP 200 (after --run).
    #[arg(long, value_name = "http://HOST:PORT/PATH")]
    pub ready_http: Option<String>,
    /// Seconds allowed for each --ready* wait.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Forward a host port to the guest: tcp:[HOST]:PORT-:GUESTPORT, or PORT:GUESTPORT.
    #[arg(long)]
    pub hostfwd: Vec<HostFwd>,
    /// Let the guest open connections out while it is customized (`apt-get install`, `pip
    /// install`), as a machine on this host's LAN would (through passt, which must be
    /// installed): never to this host's loopback. Off by default: the guest only answers its
    /// forwarded ports. The overlay carries nothing of it.
    #[arg(long)]
    pub guest_outbound: bool,
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
    /// the chunks touched by then first. Without it, the working set is what the base VM
    /// touched from its resume until it was ready for the first customization command, cut
    /// to 1/16 of the overlay's chunks.
    #[arg(long, value_name = "http://HOST:PORT/PATH")]
    pub profile_url: Option<String>,
    /// With --profile-url: go on recording for this many seconds after the first answer, so
    /// that what the guest does on its own clock (timers, daemons) while an early-started VM
    /// waits for the network is in the working set too, after what the answer needed.
    #[arg(long, value_name = "SECS", default_value = "20")]
    pub profile_settle: u64,
    /// Decoded size in KiB of the segments outside the working set. Larger costs less
    /// compression; smaller makes a chunk the working set missed cheaper to fetch on demand
    /// while an early-started VM waits (a Debian guest at 10 Mbit/s: first answer 4.3x sooner
    /// than eager with 1 MiB segments, 1.6x with 16 MiB ones, for 0.7% more bytes;
    /// BENCHMARKS.md).
    #[arg(long, value_name = "KIB", default_value_t = OVERLAY_SEGMENT_KIB,
          value_parser = clap::value_parser!(u64).range(4..=262_144))]
    pub segment_kib: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How `cloudlet overlay --run` reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Channel {
    /// The guest agent if the base's launch config has its channel, else the serial console.
    Auto,
    /// The shell on the serial console.
    Serial,
    /// The QEMU guest agent (`guest-exec`).
    Agent,
}

/// A `--copy LOCAL:GUESTPATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// The local file.
    pub local: PathBuf,
    /// Where it goes in the guest (absolute).
    pub guest: String,
}

impl std::str::FromStr for CopySpec {
    type Err = String;

    /// Splits at the first `:/` (the guest path is absolute; the local one may hold `:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.find(":/") {
            Some(i) if i > 0 => Ok(CopySpec {
                local: PathBuf::from(&s[..i]),
                guest: s[i + 1..].to_owned(),
            }),
            _ => Err(format!(
                "expected LOCAL:GUESTPATH with an absolute GUESTPATH, got {s:?}"
            )),
        }
    }
}

/// A `--run` command that exited with a non-zero status (with `--keep-going`).
#[derive(Debug, Clone, Serialize)]
pub struct FailedCommand {
    /// The command.
    pub line: String,
    /// Its exit status.
    pub rc: i32,
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
    /// The channel `--run` used ("serial" or "agent"), if there was a script.
    pub channel: Option<&'static str>,
    /// `--run` commands run.
    pub commands_run: u64,
    /// Those that exited with a non-zero status (only with `--keep-going`; otherwise the
    /// first one is an error).
    pub commands_failed: Vec<FailedCommand>,
    /// Files copied into the guest with `--copy`.
    pub files_copied: u64,
    /// Chunks (disk and memory, base ones included) touched while customizing.
    pub customization_accessed_chunks: u64,
    /// Chunks (disk and memory, base ones included) touched from the resume until the guest
    /// was ready for the first customization command.
    pub resume_accessed_chunks: u64,
    /// Chunks stored first, in first-touch order, as the working set.
    pub working_set_chunks: u64,
    /// Where the working set comes from: "profile" (`--profile-url`: a resume of the new
    /// overlay until its service answered) or "resume" (the base VM's resume until it was
    /// ready for the first customization command, cut to 1/16 of the overlay's chunks).
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
/// customize it (`--copy` files first, then `--run` commands one by one, each ended by its
/// exit status or `--cmd-timeout`), captures the device state and builds the overlay from
/// the traces.
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
    if let Some(url) = &args.ready_http {
        if !url.starts_with("http://") {
            return Err(CaptureError::ReadyUrl(url.clone()));
        }
    }
    let timeout = Duration::from_secs(args.timeout);
    let cmd_timeout = Duration::from_secs(args.cmd_timeout);
    let stop = cloudletfs::cli::interrupt_flag().map_err(SessionError::Signals)?;
    let registry = Registry::open(home)?;
    let base = registry.get(&args.base)?;
    // Everything that can be refused is refused before the VM starts.
    let has_agent = base
        .record
        .config
        .devices
        .iter()
        .any(|d| matches!(d, Device::GuestAgent));
    let no_agent = |what| CaptureError::NoAgent {
        what,
        base: args.base.clone(),
    };
    if !has_agent {
        if !args.copy.is_empty() {
            return Err(no_agent("--copy"));
        }
        if args.ready_agent {
            return Err(no_agent("--ready-agent"));
        }
        if args.run.is_some() && args.channel == Channel::Agent {
            return Err(no_agent("--channel agent"));
        }
    }
    let channel = args.run.as_ref().map(|_| match args.channel {
        Channel::Serial => CommandChannel::Serial,
        Channel::Agent => CommandChannel::Agent,
        Channel::Auto if has_agent => CommandChannel::Agent,
        Channel::Auto => CommandChannel::Serial,
    });
    let commands = args.run.as_deref().map(read_script).transpose()?;
    let run = RunDir::new(home, "overlay")?;
    let empty = run.join("base.overlay");
    synth::create::empty_overlay(&base, &empty)?;
    // Confined as a session is: a uid of its own (owning the mount's files and `run/`, in
    // whose jail it runs) and a cgroup, when cloudlet runs as root.
    let config = &base.record.config;
    let (user, cgroup) = capture_confinement(&run, config.memory_mb, config.vcpus)?;
    let owner = user.as_ref().map(SessionUser::ids);
    let limits = crate::session::LimitArgs::default();
    let mounted = mount_vm_with(
        &base,
        OverlaySource::Path(empty),
        &run,
        false,
        &limits,
        owner,
    )?;
    let mnt = mounted.mountpoint().to_path_buf();
    let (disk, memory) = (
        mounted.image_path(ImageKind::Disk),
        mounted.image_path(ImageKind::Memory),
    );
    // Declared before the VM, so it stops after QEMU is gone.
    let passt = if args.guest_outbound {
        Some(crate::session::resume::start_passt(
            &run,
            owner,
            &args.hostfwd,
        )?)
    } else {
        None
    };
    let qemu = QemuArgs::new(
        &base.record.config,
        &base_paths(&base, disk.clone(), memory.clone(), run.join("run")),
        &LaunchOptions {
            // Shared: guest RAM writes reach cloudletfs (and its trace) through writeback.
            memory: MemoryMode::Capture,
            incoming: true,
            hostfwd: args.hostfwd.clone(),
            network: passt.as_ref().map_or(GuestNetwork::Isolated, |p| {
                GuestNetwork::Passt(p.socket().into())
            }),
            accel: Accel::detect()?,
            vnc: args.vnc.clone(),
        },
    )?;
    let start = Instant::now();
    // The jail holds the mounts: disk and device state under `mnt`, guest RAM under
    // `mnt-memory`.
    let mounts = [mnt.clone(), run.join("mnt-memory")];
    let spawned = crate::session::launch::spawn_qemu(&qemu, cgroup.as_ref(), owner, &mounts)?;
    // Declared before the VM, so it is removed after QEMU is gone, on every path.
    let _cgroup = log_confined(
        spawned.vm.pid(),
        owner,
        spawned.jailed,
        cgroup,
        spawned.in_cgroup,
    );
    let mut vm = spawned.vm;
    // Ctrl-C or SIGTERM interrupts a serial command at once, not at its --cmd-timeout.
    vm.serial_shell().set_cancel(std::sync::Arc::clone(&stop));
    vm.resume_from(&mnt.join("device-state"))?;
    let resume_seconds = start.elapsed().as_secs_f64();
    reporter.note(&format!(
        "base VM resumed in {resume_seconds:.2}s (serial log: {})",
        qemu.serial_log().display()
    ));
    // What a resume needs: the chunks touched until the guest is ready for the first
    // customization command (its agent answering, when the customization goes through it).
    let uses_agent = !args.copy.is_empty() || channel == Some(CommandChannel::Agent);
    if uses_agent {
        wait_agent(&mut vm, timeout, &stop)?;
    }
    let resume_order = mounted.access_order(profile::MAX_ORDER);
    let mut customized = Customized::default();
    for c in &args.copy {
        if stop.load(Ordering::Relaxed) {
            return Err(WaitError::Interrupted.into());
        }
        let bytes = copy_file(&mut vm, c, cmd_timeout)?;
        reporter.note(&format!(
            "copied {} to {} in the guest ({bytes} bytes)",
            c.local.display(),
            c.guest
        ));
        customized.files_copied += 1;
    }
    if let (Some(commands), Some(channel)) = (&commands, channel) {
        run_commands(
            &mut vm,
            commands,
            channel,
            args,
            &stop,
            reporter,
            &mut customized,
        )?;
    }
    if let Some(marker) = &args.ready {
        wait_marker(&mut vm, marker, timeout, &stop)?;
    }
    if args.ready_agent {
        wait_agent(&mut vm, timeout, &stop)?;
    }
    if let Some(url) = &args.ready_http {
        wait_http_ok(url, timeout, &stop)?;
    }
    let by_hand = args.run.is_none()
        && args.copy.is_empty()
        && args.ready.is_none()
        && !args.ready_agent
        && args.ready_http.is_none();
    if by_hand {
        reporter.wait_for_user(
            "Customize the VM, then press Enter to capture the overlay.",
            &stop,
        )?;
    }
    let capture_start = Instant::now();
    // In `run/`, which QEMU's uid owns and its jail holds.
    let ds = run.join("run").join("device-state");
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
    let order = mounted.access_order(profile::MAX_ORDER);
    disk_chunks.sort_unstable();
    disk_chunks.dedup();
    let memory_chunks = memory_chunks.map(|mut m| {
        m.sort_unstable();
        m.dedup();
        m
    });
    let mut opts = create_options(args, threads);
    opts.order = profile::resume_working_set(
        &resume_order,
        &disk_chunks,
        memory_chunks.as_deref(),
        synth::chunk::chunk_count(base.record.memory_size),
    );
    opts.disk_chunks = Some(disk_chunks.clone());
    opts.memory_chunks = memory_chunks.clone();
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
            &profile::Answer {
                url,
                timeout,
                settle: Duration::from_secs(args.profile_settle),
            },
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
        channel: channel.map(channel_name),
        commands_run: customized.commands_run,
        commands_failed: customized.failed,
        files_copied: customized.files_copied,
        disk_candidates: disk_chunks.len() as u64,
        disk_discarded: disk_discarded.len() as u64,
        memory_candidates: memory_chunks.map_or(base.record.memory_size / 4096, |m| m.len() as u64),
        customization_accessed_chunks: order.len() as u64,
        resume_accessed_chunks: resume_order.len() as u64,
        working_set_chunks: opts.order.len() as u64,
        working_set_from: if profiled.is_some() {
            "profile"
        } else {
            "resume"
        },
        profile_first_response_seconds: profiled,
        resume_seconds,
        capture_seconds,
        diff_seconds,
        stats,
    })
}

/// What the scripted customization did, for the report.
#[derive(Debug, Default)]
struct Customized {
    commands_run: u64,
    failed: Vec<FailedCommand>,
    files_copied: u64,
}

/// The commands of a `--run` script: its lines, trimmed, without empty lines and comments.
fn read_script(script: &Path) -> Result<Vec<String>, CaptureError> {
    let text = std::fs::read_to_string(script).map_err(|source| CaptureError::Io {
        what: "Reading",
        path: script.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// How a channel is named in notes, errors and the report.
fn channel_name(channel: CommandChannel) -> &'static str {
    match channel {
        CommandChannel::Serial => "serial",
        CommandChannel::Agent => "agent",
    }
}

/// Copies one `--copy` file into the guest through the agent, keeping its permission bits.
fn copy_file(vm: &mut Vm, c: &CopySpec, timeout: Duration) -> Result<u64, CaptureError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&c.local)
        .map_err(|source| CaptureError::Io {
            what: "Reading",
            path: c.local.clone(),
            source,
        })?
        .permissions()
        .mode()
        & 0o7777;
    vm.copy_to_guest(&c.local, &c.guest, mode, timeout)
        .map_err(|source| CaptureError::Copy {
            local: c.local.clone(),
            guest: c.guest.clone(),
            source: Box::new(source),
        })
}

/// Runs the `--run` commands one by one over `channel`, streaming their output to the
/// reporter; the first non-zero exit stops the run unless `--keep-going`, a timeout always.
fn run_commands(
    vm: &mut Vm,
    commands: &[String],
    channel: CommandChannel,
    args: &OverlayArgs,
    stop: &AtomicBool,
    reporter: &dyn Reporter,
    done: &mut Customized,
) -> Result<(), CaptureError> {
    let timeout = Duration::from_secs(args.cmd_timeout);
    let name = channel_name(channel);
    reporter.note(&format!(
        "running {} commands over the {name} channel",
        commands.len()
    ));
    for line in commands {
        if stop.load(Ordering::Relaxed) {
            return Err(WaitError::Interrupted.into());
        }
        reporter.note(&format!("guest$ {line}"));
        let out = vm
            .run_command(channel, line, timeout, &mut |bytes| {
                reporter.guest_output(bytes)
            })
            .map_err(|source| command_error(line, channel, timeout, source))?;
        done.commands_run += 1;
        if out.rc != 0 {
            if !args.keep_going {
                return Err(CaptureError::CommandFailed {
                    line: line.clone(),
                    rc: out.rc,
                    output: out.output,
                });
            }
            reporter.note(&format!(
                "command {line:?} failed (exit status {}); going on (--keep-going)",
                out.rc
            ));
            done.failed.push(FailedCommand {
                line: line.clone(),
                rc: out.rc,
            });
        }
    }
    if !done.failed.is_empty() {
        reporter.note(&format!(
            "{} of {} commands failed",
            done.failed.len(),
            commands.len()
        ));
    }
    Ok(())
}

/// A timeout of the command itself, or a failure of the channel.
fn command_error(
    line: &str,
    channel: CommandChannel,
    timeout: Duration,
    source: VmError,
) -> CaptureError {
    match source {
        VmError::Shell(ShellError::Cancelled { .. }) => {
            CaptureError::Session(SessionError::Wait(WaitError::Interrupted))
        }
        VmError::Shell(ShellError::Timeout { .. })
        | VmError::Agent(AgentError::ExecTimeout { .. }) => CaptureError::CommandTimedOut {
            line: line.to_owned(),
            timeout,
            source: Box::new(source),
        },
        source => CaptureError::CommandChannel {
            line: line.to_owned(),
            channel: match channel {
                CommandChannel::Serial => "serial console",
                CommandChannel::Agent => "guest agent",
            },
            source: Box::new(source),
        },
    }
}

/// The overlay builder's options from the command line (the chunk lists come from traces).
fn create_options(args: &OverlayArgs, threads: usize) -> CreateOptions {
    CreateOptions {
        codec: args.codec,
        level: args.level.unwrap_or(args.codec.default_level()),
        threads,
        // Bounded by the clap parser, so no overflow; create_overlay checks the range.
        segment_size: usize::try_from(args.segment_kib.saturating_mul(1024)).unwrap_or(usize::MAX),
        ..CreateOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_spec_splits_at_the_absolute_guest_path() {
        let c: CopySpec = "dir/a:b.txt:/srv/x:y".parse().unwrap();
        assert_eq!(c.local, PathBuf::from("dir/a:b.txt"));
        assert_eq!(c.guest, "/srv/x:y");
    }

    #[test]
    fn copy_spec_relative_guest_path_is_refused() {
        assert!("a.txt:srv/x".parse::<CopySpec>().is_err());
    }

    #[test]
    fn copy_spec_empty_local_path_is_refused() {
        assert!(":/srv/x".parse::<CopySpec>().is_err());
    }

    #[test]
    fn read_script_skips_empty_lines_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sh");
        std::fs::write(&p, "# setup\n\n  echo a  \n#x\necho 'b # not a comment'\n").unwrap();
        assert_eq!(
            read_script(&p).unwrap(),
            ["echo a", "echo 'b # not a comment'"]
        );
    }

    #[test]
    fn read_script_missing_file_names_it() {
        let e = read_script(Path::new("/nonexistent/s.sh")).unwrap_err();
        assert_eq!(e.to_string(), "Reading /nonexistent/s.sh failed");
    }
}
