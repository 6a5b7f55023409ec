//! How this process starts QEMU: through cloudlet's launcher when the binary set one
//! ([`use_launcher`]), else directly.
//!
//! ```text
//!  spawn_qemu(args, cgroup, user, jail_extra)
//!     launcher set:  cloudlet qemu-launch --no-hugepage --cgroup-procs … [--user U:G
//!                      --jail --bind … --bind-ro …] -- qemu …
//!                    (joins the cgroup, enters the jail, installs the MADV_HUGEPAGE filter,
//!                    drops to the user, execs QEMU)
//!     no launcher:   qemu …, then moved into the cgroup by pid
//! ```
//!
//! The jail (a mount namespace holding `/usr`, a few `/dev` nodes and the session's own paths,
//! see [`synth::vm::launcher`]) comes with the uid: whenever QEMU gets a uid of its own, which
//! takes cloudlet running as root, which is also what a mount namespace takes.
//!
//! The `cloudlet` binary registers itself at start ([`use_launcher`] with
//! [`cli_launcher`]); a program that embeds this library without cloudlet's binary gets
//! QEMU started directly, with its guest RAM faults read 2 to 4 MiB around (see
//! [`synth::vm::launcher`]).

use super::cgroup::SessionCgroup;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use synth::vm::launcher::{Jail, Launcher};
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

/// A started QEMU and what of its confinement applied.
pub(crate) struct Spawned {
    /// The VM.
    pub vm: Vm,
    /// It joined the cgroup it was given.
    pub in_cgroup: bool,
    /// It runs in a jail (mount namespace) of its own.
    pub jailed: bool,
}

/// Starts QEMU with `args`, in `cgroup` when given, as `user` (uid, gid) when given: through
/// the launcher if one is set (it joins the cgroup, and with a user enters a jail holding
/// [`QemuArgs::jail`] plus `jail_extra` (read-write: what QEMU opens later, e.g. the mount
/// whose `device-state` it loads) and drops to the user before it becomes QEMU), else
/// directly and moved into the cgroup right after start (where that fails, QEMU runs
/// unconfined and `in_cgroup` is false). A `user` needs the launcher.
pub(crate) fn spawn_qemu(
    args: &QemuArgs,
    cgroup: Option<&SessionCgroup>,
    user: Option<(u32, u32)>,
    jail_extra: &[PathBuf],
) -> Result<Spawned, VmError> {
    match LAUNCHER.get() {
        Some(launcher) => {
            let procs: Vec<PathBuf> = cgroup
                .map(|cg| cg.dirs().iter().map(|d| d.join("cgroup.procs")).collect())
                .unwrap_or_default();
            let jail = user.map(|_| {
                let mut jail: Jail = args.jail().clone();
                jail.read_write.extend(jail_extra.iter().cloned());
                jail
            });
            let vm = Vm::spawn_via(launcher, args, &procs, user, jail.as_ref())?;
            Ok(Spawned {
                vm,
                in_cgroup: cgroup.is_some(),
                jailed: jail.is_some(),
            })
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
            Ok(Spawned {
                vm,
                in_cgroup: joined,
                jailed: false,
            })
        }
    }
}
