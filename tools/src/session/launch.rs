//! How this process starts QEMU: through cloudlet's launcher when the binary set one
//! ([`use_launcher`]), else directly.
//!
//! ```text
//!  spawn_qemu(args, cgroup)
//!     launcher set:  cloudlet qemu-launch --no-hugepage --cgroup-procs … -- qemu …
//!                    (joins the cgroup, installs the MADV_HUGEPAGE filter, execs QEMU)
//!     no launcher:   qemu …, then moved into the cgroup by pid
//! ```
//!
//! The `cloudlet` binary registers itself at start ([`use_launcher`] with
//! [`cli_launcher`]); a program that embeds this library without cloudlet's binary gets
//! QEMU started directly, with its guest RAM faults read 2 to 4 MiB around (see
//! [`synth::vm::launcher`]).

use super::cgroup::SessionCgroup;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use synth::vm::launcher::Launcher;
use synth::vm::{QemuArgs, Vm, VmError};

/// The subcommand of the `cloudlet` binary that is the launcher (hidden from `--help`).
pub const LAUNCH_COMMAND: &str = "qemu-launch";

static LAUNCHER: OnceLock<Launcher> = OnceLock::new();

/// Starts every later QEMU of this process through `launcher`. The first call wins.
pub fn use_launcher(launcher: Launcher) {
    if LAUNCHER.set(launcher).is_err() {
        log::debug!("a QEMU launcher was already set; keeping it");
    }
}

/// Set to `keep` to let QEMU advise huge pages on guest RAM as it does by itself: for
/// measuring what the filter costs or saves (`bench/net-bench.sh -G`), not for use.
pub const HUGEPAGE_ENV: &str = "CLOUDLET_QEMU_HUGEPAGE";

/// The launcher that is the running `cloudlet` binary itself (`LAUNCH_COMMAND`), with the
/// hugepage filter on (unless [`HUGEPAGE_ENV`] is `keep`); `None` if this process cannot
/// name its own binary.
pub fn cli_launcher() -> Option<Launcher> {
    let program = std::env::current_exe().ok()?;
    let keep = std::env::var(HUGEPAGE_ENV).is_ok_and(|v| v == "keep");
    if keep {
        log::warn!("{HUGEPAGE_ENV}=keep: QEMU advises huge pages on guest RAM (faults read 2 MiB)");
    }
    Some(Launcher {
        program,
        prefix: vec![OsString::from(LAUNCH_COMMAND)],
        no_hugepage: !keep,
    })
}

/// Starts QEMU with `args`, in `cgroup` when given, as `user` (uid, gid) when given: through
/// the launcher if one is set (it joins the cgroup and drops to the user before it becomes
/// QEMU), else directly and moved into the cgroup right after start (where that fails, QEMU
/// runs unconfined and the returned flag is false). A `user` needs the launcher.
pub(crate) fn spawn_qemu(
    args: &QemuArgs,
    cgroup: Option<&SessionCgroup>,
    user: Option<(u32, u32)>,
) -> Result<(Vm, bool), VmError> {
    match LAUNCHER.get() {
        Some(launcher) => {
            let procs: Vec<PathBuf> = cgroup
                .map(|cg| cg.dirs().iter().map(|d| d.join("cgroup.procs")).collect())
                .unwrap_or_default();
            let vm = Vm::spawn_via(launcher, args, &procs, user)?;
            Ok((vm, cgroup.is_some()))
        }
        None => {
            if let Some((uid, _)) = user {
                log::warn!(
                    "no QEMU launcher in this program: QEMU runs as cloudlet's uid, not {uid}"
                );
            }
            let vm = Vm::spawn(args)?;
            let joined = match cgroup {
                Some(cg) => match cg.add(vm.pid()) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("QEMU pid {} runs without a cgroup: {e}", vm.pid());
                        false
                    }
                },
                None => false,
            };
            Ok((vm, joined))
        }
    }
}
