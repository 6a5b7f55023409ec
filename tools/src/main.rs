//! `cloudlet`: manage base VMs, create overlays and synthesize VMs.
//!
//! This binary parses arguments, calls the libraries (`cloudlet_tools` for sessions, capture,
//! the server and the client; `synth` and `cloudletfs` for the rest), prints results (text or
//! `--json`) and maps failures to exit codes. It is the only place with `anyhow`.

mod cli;

use clap::{Parser, Subcommand};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;

/// VM synthesis for cloudlets: base VMs, VM overlays, reconstruction.
#[derive(Debug, Parser)]
#[command(name = "cloudlet", version, long_about = None)]
struct Cli {
    /// Registry folder (default: $CLOUDLET_HOME, else ~/.cloudlet).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Worker threads (default: the number of CPUs).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a disk image on QEMU, wait until it is ready, capture it and register it as a base.
    ///
    /// Guest RAM lives in a shared memory file, so the capture is that file plus the device
    /// state (saved with x-ignore-shared). The disk is copied first; DISK is not modified.
    Base(cloudlet_tools::capture::BaseArgs),
    /// Customize a base VM and capture the changes as an overlay.
    ///
    /// The base VM resumes with its disk and memory served by cloudletfs (copy-on-write,
    /// traced); after the customization (files copied and a script run over the serial console
    /// or the guest agent, or by hand until Enter) the device state is saved and the overlay
    /// built from the traces: disk chunks written or discarded, memory chunks written back,
    /// stored in first-touch order.
    Overlay(cloudlet_tools::capture::OverlayArgs),
    /// Synthesize a VM: mount base + overlay with cloudletfs and resume it on QEMU.
    ///
    /// Runs until SIGINT/SIGTERM, then stops the VM and unmounts.
    Synthesis(cloudlet_tools::session::SynthesisArgs),
    /// Mount base + overlay as files (disk/image, memory/image, device-state, stats, traces).
    ///
    /// Runs the cloudletfs daemon; see `cloudletfs --help` for its options.
    Mount(cli::vm::MountArgs),
    /// Unmount a cloudletfs mount.
    Unmount(cli::vm::UnmountArgs),
    /// Register a base VM: disk image, memory image, device state and launch config.
    AddBase(cli::registry::AddBaseArgs),
    /// List registered base VMs.
    ListBase(cli::registry::ListBaseArgs),
    /// Delete a base VM.
    DelBase(cli::registry::DelBaseArgs),
    /// Write a base VM as one portable package file.
    ExportBase(cli::registry::ExportBaseArgs),
    /// Import a package written by export-base, verifying every hash.
    ImportBase(cli::registry::ImportBaseArgs),
    /// Create a VM overlay: the chunks of a custom VM that differ from its base.
    Diff(cli::engine::DiffArgs),
    /// Describe an overlay: sizes, chunk classes, segments, codec.
    InfoOverlay(cli::engine::InfoOverlayArgs),
    /// Check an overlay completely: structure, every segment, and (with --base) every chunk.
    Verify(cli::engine::VerifyArgs),
    /// Rebuild the custom VM's disk.img, memory.img and device-state from base + overlay.
    Reconstruct(cli::engine::ReconstructArgs),
    /// Serve synthesis sessions over TCP (docs/protocol.md): clients send an overlay (or a
    /// URL), the server resumes the VM on one of its bases and forwards the guest ports.
    ///
    /// Runs until SIGINT/SIGTERM, then ends every session (VMs stopped, mounts removed).
    Server(cloudlet_tools::server::ServerArgs),
    /// List the sessions of the `cloudlet server` running on this machine (admin socket).
    ListSession(cli::net::ListSessionArgs),
    /// End one session of the running `cloudlet server`: its VM is stopped, its mount removed,
    /// its slot freed; returns once that is done. Exit code 4 if there is no such session.
    CloseSession(cli::net::CloseSessionArgs),
    /// Synthesize a VM on a `cloudlet server`: send an overlay (or a URL for the server to
    /// fetch), print where the guest ports are reachable, keep the session until Ctrl-C.
    Client(cloudlet_tools::client::ClientArgs),
}

fn main() -> ExitCode {
    // `cloudlet qemu-launch …` is this binary run again by the library as QEMU's launcher
    // (`synth::vm::launcher`): not a user command, no logging set up, no clap (QEMU's own
    // arguments follow `--`). It becomes QEMU or fails with exit code 1.
    let mut argv = std::env::args_os().skip(1);
    if argv.next().as_deref() == Some(OsStr::new(cloudlet_tools::session::launch::LAUNCH_COMMAND)) {
        let err = match synth::vm::launcher::LaunchPlan::parse(argv) {
            Ok(plan) => plan.exec(),
            Err(e) => e,
        };
        eprintln!("cloudlet qemu-launch: {}", cloudletfs::error::chain(&err));
        return ExitCode::FAILURE;
    }
    // fuser logs every request it does not implement (poll, getxattr) and replies to requests
    // the kernel already dropped; none of that is the user's business unless RUST_LOG asks.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,fuser=off"))
        .init();
    let args = Cli::parse();
    if let Some(launcher) = cloudlet_tools::session::launch::cli_launcher() {
        cloudlet_tools::session::launch::use_launcher(launcher);
    }
    let ctx = cli::Context {
        home: args
            .home
            .unwrap_or_else(synth::registry::Registry::default_home),
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    };
    let result = match args.command {
        Command::Base(a) => cli::vm::base(&ctx, &a),
        Command::Overlay(a) => cli::vm::overlay(&ctx, &a),
        Command::Synthesis(a) => cli::vm::synthesis(&ctx, &a),
        Command::Mount(a) => cli::vm::mount(&ctx, &a),
        Command::Unmount(a) => cli::vm::unmount(&a),
        Command::AddBase(a) => cli::registry::add_base(&ctx, &a),
        Command::ListBase(a) => cli::registry::list_base(&ctx, &a),
        Command::DelBase(a) => cli::registry::del_base(&ctx, &a),
        Command::ExportBase(a) => cli::registry::export_base(&ctx, &a),
        Command::ImportBase(a) => cli::registry::import_base(&ctx, &a),
        Command::Diff(a) => cli::engine::diff(&ctx, &a),
        Command::InfoOverlay(a) => cli::engine::info_overlay(&a),
        Command::Verify(a) => cli::engine::verify(&ctx, &a),
        Command::Reconstruct(a) => cli::engine::reconstruct(&ctx, &a),
        Command::Server(a) => cli::net::server(&ctx, &a),
        Command::ListSession(a) => cli::net::list_session(&ctx, &a),
        Command::CloseSession(a) => cli::net::close_session(&ctx, &a),
        Command::Client(a) => cli::net::client(&ctx, &a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !cloudletfs::cli::already_reported(e.as_ref()) {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(cloudlet_tools::exit_code(e.as_ref()))
        }
    }
}
