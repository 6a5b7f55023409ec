//! `cloudletfs`: the daemon serving a synthesized VM's images over FUSE.
//!
//! Without `--foreground` it starts itself again in the foreground, detached, and returns once
//! the mount is up (or prints why it failed, as the detached daemon said it on its stderr, and
//! exits with its exit code).
//!
//! Exit codes, as `cloudlet`'s: `0` ok, `1` error, `2` bad arguments, `3` input refused as
//! invalid, corrupt or made for another base (the overlay, or a `--state` folder).

use anyhow::{bail, Context};
use clap::Parser;
use cloudletfs::cli::{self, DaemonFailed};
use cloudletfs::{mount, mounted_at, MountError, MountOptions, OverlaySource};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use synth::registry::Registry;

/// Serve a VM synthesized from BASE + OVERLAY as lazy files under MOUNTPOINT.
#[derive(Debug, Parser)]
#[command(name = "cloudletfs", version)]
struct Args {
    /// Base VM: an id (prefix) or name in the registry.
    base: String,
    /// Overlay: a local path or an http(s):// URL.
    overlay: String,
    /// Where to mount.
    mountpoint: PathBuf,
    /// Registry home (default: $CLOUDLET_HOME or ~/.cloudlet).
    #[arg(long)]
    home: Option<PathBuf>,
    /// Keep modified/discarded state here so a remount continues.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Folder for the cache of rebuilt chunks when it does not stay in memory.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Keep rebuilt chunks in memory when the overlay's chunks fit in this many MiB, else in
    /// --cache-dir; 0: always on disk [default: a quarter of the available memory].
    #[arg(long, value_name = "MIB")]
    cache_memory_mib: Option<u64>,
    /// How far the overlay's disk may grow past the base's disk, in MiB [default: the base's
    /// disk size]; a larger overlay is refused (exit code 3).
    #[arg(long, value_name = "MIB")]
    max_disk_growth_mib: Option<u64>,
    /// Most MiB of modified chunks (disk and memory together) kept; a guest write past it
    /// gets an I/O error [default: no limit].
    #[arg(long, value_name = "MIB")]
    cow_quota_mib: Option<u64>,
    /// Stay in the foreground.
    #[arg(long)]
    foreground: bool,
    /// Do not fetch the whole overlay in the background (only on demand).
    #[arg(long)]
    no_background: bool,
    /// Demand fetch workers.
    #[arg(long, default_value_t = 2)]
    fetch_threads: usize,
    /// Longest wait for a pending chunk, in seconds.
    #[arg(long, default_value_t = 120)]
    wait_timeout: u64,
    /// Log file when running in the background.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Set by the starting process on the daemon it detaches: stderr is a pipe that process
    /// reads only until the mount is up.
    #[arg(long, hide = true)]
    detached: bool,
}

/// How much of a detached daemon's early stderr is kept to relay.
const RELAY_MAX: u64 = 64 << 10;
/// How long the starting process waits for the detached daemon to mount: longer than the
/// daemon's own bound on reaching an overlay URL (60 s of retries, plus one 20 s attempt).
const MOUNT_WAIT: Duration = Duration::from_secs(120);

/// Starts the daemon detached (own process group, so the terminal's signals do not reach it)
/// and waits until it has mounted or ended. Without `--log`, its stderr is a pipe read here
/// until then, so that why it failed reaches the user; once mounted it stops writing there.
fn spawn_background(args: &Args) -> anyhow::Result<()> {
    // Refused here too, or that mount would pass for the daemon's own.
    if mounted_at(&args.mountpoint).is_some() {
        bail!(MountError::AlreadyMounted(args.mountpoint.clone()));
    }
    let exe = std::env::current_exe().context("Finding the cloudletfs executable")?;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    argv.push("--foreground".into());
    let stderr = match &args.log {
        Some(p) => Stdio::from(
            std::fs::File::create(p).with_context(|| format!("Creating {}", p.display()))?,
        ),
        None => {
            argv.push("--detached".into());
            Stdio::piped()
        }
    };
    let mut child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .context("Starting the daemon")?;
    let said = child.stderr.take().map(|pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.take(RELAY_MAX).read_to_string(&mut text);
            text
        })
    });
    // Once the daemon is gone its end of the pipe is closed, so the reader has ended too.
    let relay = |said: Option<std::thread::JoinHandle<String>>| {
        if let Some(text) = said.and_then(|t| t.join().ok()) {
            eprint!("{text}");
        }
    };
    let deadline = Instant::now() + MOUNT_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if mounted_at(&args.mountpoint).is_some() {
            println!("{}", child.id());
            return Ok(());
        }
        if Instant::now() >= deadline {
            // Failing must mean that nothing mounts later behind the user's back.
            let _ = child.kill();
            let _ = child.wait();
            relay(said);
            bail!(
                "the cloudletfs daemon did not mount within {} s; stopped it",
                MOUNT_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    relay(said);
    bail!(DaemonFailed(status.code().unwrap_or(1)))
}

/// Points stderr at /dev/null: a detached daemon's stderr is a pipe that nobody reads once
/// the mount is up.
fn quiet_stderr() -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("Opening /dev/null")?;
    // SAFETY: dup2 on two file descriptors this process owns; `null` stays open for the call,
    // and fd 2 then refers to /dev/null (Rust's stderr is unbuffered, so nothing is lost).
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 2) } < 0 {
        return Err(std::io::Error::last_os_error()).context("Redirecting stderr");
    }
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    if !args.foreground {
        return spawn_background(&args);
    }
    let home = args.home.clone().unwrap_or_else(Registry::default_home);
    let registry = Registry::open(&home)
        .with_context(|| format!("Opening the registry {}", home.display()))?;
    let base = registry
        .get(&args.base)
        .with_context(|| format!("Finding base {}", args.base))?;
    let mut opts = MountOptions::new(base, OverlaySource::parse(&args.overlay), &args.mountpoint);
    opts.state_dir = args.state.clone();
    opts.cache_dir = args.cache_dir.clone();
    opts.cache_memory = args.cache_memory_mib.map(|m| m.saturating_mul(1 << 20));
    opts.background_fill = !args.no_background;
    opts.fetch_threads = args.fetch_threads;
    opts.wait_timeout = Duration::from_secs(args.wait_timeout);
    opts.max_disk_growth = args.max_disk_growth_mib.map(|m| m.saturating_mul(1 << 20));
    opts.cow_quota = args.cow_quota_mib.map(|m| m.saturating_mul(1 << 20));
    let stop = cli::interrupt_flag().context("Installing signal handlers")?;
    let mounted = mount(opts).context("Mounting")?;
    if args.detached {
        quiet_stderr()?;
    }
    while !stop.load(Ordering::Relaxed) && mounted.is_alive() {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("stopping");
    mounted.unmount().context("Unmounting")?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,fuser=off"))
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if !cli::already_reported(e.as_ref()) {
                eprintln!("cloudletfs: {e:#}");
            }
            std::process::ExitCode::from(cli::exit_code(e.as_ref()))
        }
    }
}
