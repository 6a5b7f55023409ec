//! `cloudletfs`: the daemon serving a synthesized VM's images over FUSE.
//!
//! Without `--foreground` it starts itself again in the foreground, detached, and returns once
//! the mount is up (or prints why it failed).

use anyhow::{bail, Context};
use clap::Parser;
use cloudletfs::{mount, MountOptions, OverlaySource};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy().to_string();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&want.as_str()) && l.contains("cloudletfs")
    })
}

fn spawn_background(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("Finding the cloudletfs executable")?;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    argv.push("--foreground".into());
    let stderr = match &args.log {
        Some(p) => Stdio::from(
            std::fs::File::create(p).with_context(|| format!("Creating {}", p.display()))?,
        ),
        None => Stdio::null(),
    };
    let mut child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("Starting the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("cloudletfs exited with {status} before mounting (see --log)");
        }
        if is_mounted(&args.mountpoint) {
            println!("{}", child.id());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("cloudletfs did not mount within 60 s")
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
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("Installing signal handlers")?;
    }
    let mounted = mount(opts).context("Mounting")?;
    while !stop.load(Ordering::Relaxed) && mounted.is_alive() {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("stopping");
    mounted.unmount().context("Unmounting")?;
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,fuser=off"))
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("cloudletfs: {e:#}");
        std::process::exit(1);
    }
}
