//! `cloudlet`: manage base VMs, create overlays and synthesize VMs.
//!
//! This binary is the only place with `anyhow`: it parses arguments, calls the libraries
//! (`synth`, `cloudletfs`), prints results (text or `--json`) and maps failures to exit codes.

mod admin;
mod client_cmd;
mod commands;
mod discovery;
mod progress;
mod server;
mod synth_cmds;
mod vm_cmds;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code: input was refused as invalid, corrupt or not matching (an overlay, a package).
pub const EXIT_INVALID: u8 = 3;
/// Exit code: the thing named does not exist (a session, for close-session).
pub const EXIT_NOT_FOUND: u8 = 4;

/// VM synthesis for cloudlets: base VMs, VM overlays, reconstruction.
#[derive(Debug, Parser)]
#[command(name = "cloudlet", version, about, long_about = None)]
struct Cli {
    /// Registry folder (default: $CLOUDLET_HOME, else ~/.cloudlet).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Worker threads (default: the number of CPUs).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    // fuser logs every request it does not implement (poll, getxattr) and replies to requests
    // the kernel already dropped; none of that is the user's business unless RUST_LOG asks.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,fuser=off"))
        .init();
    let cli = Cli::parse();
    let ctx = commands::Context {
        home: cli
            .home
            .unwrap_or_else(synth::registry::Registry::default_home),
        threads: cli
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    };
    match commands::run(&ctx, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<commands::DaemonFailed>().is_none() {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(commands::exit_code(&e))
        }
    }
}

// Keep `Subcommand` in scope for the derive in `commands`.
#[allow(unused_imports)]
use Subcommand as _;
