//! `base`, `overlay`, `synthesis`, `mount`, `unmount`: real VMs on stock QEMU and the cloudletfs
//! daemon, from the command line.

use super::registry::print_base;
use super::{print_json, Context, Terminal};
use anyhow::{bail, Context as _, Result};
use cloudlet_tools::capture::{self, BaseArgs, OverlayArgs};
use cloudlet_tools::session::{self, SynthesisArgs, TimelineEvent};
use cloudlet_tools::DaemonFailed;
use std::path::PathBuf;

/// Arguments of `mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
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
}

/// Arguments of `unmount`.
#[derive(Debug, clap::Args)]
pub struct UnmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
}

pub fn base(ctx: &Context, a: &BaseArgs) -> Result<()> {
    let base = capture::make_base(&ctx.home, ctx.threads, a, &Terminal)?;
    print_base(&base, a.json)
}

pub fn overlay(ctx: &Context, a: &OverlayArgs) -> Result<()> {
    let report = capture::make_overlay(&ctx.home, ctx.threads, a, &Terminal)?;
    if a.json {
        return print_json(&report);
    }
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
    Ok(())
}

/// Prints one timeline step: a JSON line, or `SECONDS  EVENT[: DETAIL]`.
fn print_event(json: bool, e: &TimelineEvent) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    } else {
        match &e.detail {
            Some(d) => println!("{:>8.3}s  {}: {d}", e.seconds, e.event),
            None => println!("{:>8.3}s  {}", e.seconds, e.event),
        }
    }
}

pub fn synthesis(ctx: &Context, a: &SynthesisArgs) -> Result<()> {
    let stop = cloudlet_tools::interrupt_flag().context("installing signal handlers")?;
    session::synthesis(&ctx.home, a, &stop, &mut |e| print_event(a.json, &e))?;
    Ok(())
}

pub fn mount(ctx: &Context, a: &MountArgs) -> Result<()> {
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
        .arg(&a.base)
        .arg(&a.overlay)
        .arg(&a.mountpoint);
    if let Some(s) = &a.state {
        cmd.arg("--state").arg(s);
    }
    if a.foreground {
        cmd.arg("--foreground");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", daemon.display()))?;
    if !status.success() {
        // cloudletfs has said why on stderr; its exit code already means what ours do.
        bail!(DaemonFailed(status.code().unwrap_or(1)));
    }
    Ok(())
}

pub fn unmount(a: &UnmountArgs) -> Result<()> {
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&a.mountpoint)
        .status()
        .context("running fusermount3 (package fuse3)")?;
    if !status.success() {
        bail!("fusermount3 -u {} failed: {status}", a.mountpoint.display());
    }
    Ok(())
}
