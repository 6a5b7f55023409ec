//! cloudlet's QEMU launcher: a process that prepares itself and then becomes QEMU (`exec`).
//!
//! ```text
//!  Vm::spawn_via(&Launcher, args)
//!     └─► LAUNCHER-PROGRAM PREFIX… [--no-hugepage] [--cgroup-procs FILE]… -- QEMU ARGS…
//!            (the `cloudlet` binary's hidden `qemu-launch` command, parsed into a LaunchPlan)
//!            1. joins the session's cgroups (writes its own pid to each cgroup.procs)
//!            2. installs a seccomp filter: madvise(…, MADV_HUGEPAGE) returns 0 and does nothing
//!            3. [--user UID:GID] drops every privilege: no supplementary groups, gid, uid
//!            4. exec QEMU (same pid), which later installs its own `-sandbox` filter on top
//! ```
//!
//! Why the hugepage filter: QEMU advises guest RAM `MADV_HUGEPAGE`. For a RAM mapping of a
//! file (a resumed VM maps `memory/image` of cloudletfs), the kernel then reads 2 to 4 MiB
//! around every page fault whatever the file's readahead is, so a guest that touches a few
//! pages of a 2 MiB region pulls the whole region through cloudletfs (and, with early start,
//! through the network). Without the advice, a fault reads the file's own read-around
//! window, which cloudletfs sizes for page faults. The advice only ever asks for a
//! performance hint, so QEMU is told it succeeded. Filters stack: QEMU's `-sandbox`, installed
//! later, cannot undo this one, and its `ERRNO`/`KILL` actions still win over ours for the
//! calls it denies.
//!
//! Joining the cgroup before `exec` puts everything QEMU allocates, from its first
//! instruction, under the session's limits. Dropping to the session's own uid and gid here,
//! before `exec`, is what QEMU's own `-run-with user=` cannot do under `-sandbox
//! elevateprivileges=deny`: QEMU drops them after installing its filter, which then kills it
//! for calling `setuid`.
//!
//! The launcher is cloudlet's own binary run again (`std::env::current_exe`), so it needs no
//! separate install step; a library user without it can still spawn QEMU directly
//! ([`Vm::spawn`](super::Vm::spawn)).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of the launcher before it becomes QEMU.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// The arguments were not `[--no-hugepage] [--cgroup-procs FILE]… [--user UID:GID] --
    /// QEMU ARGS…`.
    #[error("Bad launcher arguments: {0}")]
    Usage(String),
    /// This machine's architecture has no seccomp filter support in seccompiler.
    #[error("No seccomp filter for architecture {0}")]
    Arch(String),
    /// Building or installing the seccomp filter failed.
    #[error("Installing the seccomp filter failed: {0}")]
    Seccomp(String),
    /// Joining a cgroup failed.
    #[error("Joining the cgroup through {path} failed")]
    Cgroup {
        /// The `cgroup.procs` file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `exec` of QEMU failed.
    #[error("Starting {binary} failed")]
    Exec {
        /// The QEMU binary.
        binary: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How [`Vm::spawn_via`](super::Vm::spawn_via) starts QEMU through a launcher: `program`
/// with `prefix` (e.g. `["qemu-launch"]`), then the plan's flags, `--`, QEMU and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launcher {
    /// The launcher program (cloudlet's own binary).
    pub program: PathBuf,
    /// Arguments before the plan's (the subcommand).
    pub prefix: Vec<OsString>,
    /// Turn QEMU's `MADV_HUGEPAGE` into a no-op (see the module docs).
    pub no_hugepage: bool,
}

impl Launcher {
    /// The command that runs `qemu` with `args` through this launcher, joining the cgroups
    /// whose `cgroup.procs` files are `cgroups` first and running as `user` (uid, gid) when
    /// given.
    pub fn command(
        &self,
        qemu: &Path,
        args: &[OsString],
        cgroups: &[PathBuf],
        user: Option<(u32, u32)>,
    ) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix);
        if self.no_hugepage {
            cmd.arg("--no-hugepage");
        }
        for procs in cgroups {
            cmd.arg("--cgroup-procs").arg(procs);
        }
        if let Some((uid, gid)) = user {
            cmd.arg("--user").arg(format!("{uid}:{gid}"));
        }
        cmd.arg("--").arg(qemu).args(args);
        cmd
    }
}

/// What the launcher does, parsed from its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Install the `MADV_HUGEPAGE` filter.
    pub no_hugepage: bool,
    /// `cgroup.procs` files to write this process's pid to.
    pub cgroup_procs: Vec<PathBuf>,
    /// The uid and gid QEMU runs as (supplementary groups dropped); `None`: unchanged.
    pub user: Option<(u32, u32)>,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// QEMU's arguments.
    pub args: Vec<OsString>,
}

impl LaunchPlan {
    /// Parses `[--no-hugepage] [--cgroup-procs FILE]… [--user UID:GID] -- QEMU [ARGS…]` (what
    /// [`Launcher::command`] writes after its prefix).
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<LaunchPlan, LauncherError> {
        let mut it = args.into_iter();
        let mut plan = LaunchPlan {
            no_hugepage: false,
            cgroup_procs: Vec::new(),
            user: None,
            qemu: PathBuf::new(),
            args: Vec::new(),
        };
        loop {
            let Some(a) = it.next() else {
                return Err(LauncherError::Usage("no `-- QEMU` at the end".into()));
            };
            match a.to_str() {
                Some("--no-hugepage") => plan.no_hugepage = true,
                Some("--cgroup-procs") => {
                    let file = it.next().ok_or_else(|| {
                        LauncherError::Usage("--cgroup-procs needs a file".into())
                    })?;
                    plan.cgroup_procs.push(PathBuf::from(file));
                }
                Some("--user") => {
                    let spec = it
                        .next()
                        .ok_or_else(|| LauncherError::Usage("--user needs UID:GID".into()))?;
                    plan.user = Some(parse_user(&spec.to_string_lossy())?);
                }
                Some("--") => break,
                _ => {
                    return Err(LauncherError::Usage(format!(
                        "unknown argument {}",
                        a.to_string_lossy()
                    )))
                }
            }
        }
        plan.qemu = it
            .next()
            .map(PathBuf::from)
            .ok_or_else(|| LauncherError::Usage("no QEMU binary after --".into()))?;
        plan.args = it.collect();
        Ok(plan)
    }

    /// Carries out the plan and becomes QEMU; returns only on failure.
    pub fn exec(&self) -> LauncherError {
        for procs in &self.cgroup_procs {
            if let Err(source) = std::fs::write(procs, std::process::id().to_string()) {
                return LauncherError::Cgroup {
                    path: procs.clone(),
                    source,
                };
            }
        }
        if self.no_hugepage {
            let filter = match hugepage_filter() {
                Ok(f) => f,
                Err(e) => return e,
            };
            if let Err(e) = seccompiler::apply_filter(&filter) {
                return LauncherError::Seccomp(e.to_string());
            }
        }
        let mut cmd = Command::new(&self.qemu);
        cmd.args(&self.args);
        if let Some((uid, gid)) = self.user {
            // std drops the supplementary groups (setgroups) when root, then setgid, setuid,
            // right before execve.
            cmd.uid(uid).gid(gid);
        }
        let source = cmd.exec();
        LauncherError::Exec {
            binary: self.qemu.clone(),
            source,
        }
    }
}

/// `UID:GID`, both numbers; root (0) is refused: dropping to it is no drop.
fn parse_user(spec: &str) -> Result<(u32, u32), LauncherError> {
    let bad = || LauncherError::Usage(format!("--user {spec:?}: expected UID:GID, not 0"));
    let (u, g) = spec.split_once(':').ok_or_else(bad)?;
    let (uid, gid) = (
        u.parse::<u32>().map_err(|_| bad())?,
        g.parse::<u32>().map_err(|_| bad())?,
    );
    if uid == 0 || gid == 0 {
        return Err(bad());
    }
    Ok((uid, gid))
}

/// The filter: `madvise` with advice `MADV_HUGEPAGE` returns 0 without doing anything; every
/// other call is allowed (QEMU's own `-sandbox` decides about those).
pub fn hugepage_filter() -> Result<BpfProgram, LauncherError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| LauncherError::Arch(std::env::consts::ARCH.to_string()))?;
    let seccomp = |e: seccompiler::BackendError| LauncherError::Seccomp(e.to_string());
    let hugepage = u64::try_from(libc::MADV_HUGEPAGE).unwrap_or(u64::MAX);
    let advice = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, hugepage)
        .map_err(seccomp)?;
    let rules = BTreeMap::from([(
        libc::SYS_madvise,
        vec![SeccompRule::new(vec![advice]).map_err(seccomp)?],
    )]);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(0), arch)
        .map_err(seccomp)?;
    BpfProgram::try_from(filter).map_err(seccomp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn plan_parses_what_the_launcher_command_writes() {
        let l = Launcher {
            program: "/usr/bin/cloudlet".into(),
            prefix: os(&["qemu-launch"]),
            no_hugepage: true,
        };
        let cmd = l.command(
            Path::new("/usr/bin/qemu-system-x86_64"),
            &os(&["-m", "256M", "--no-hugepage"]),
            &[PathBuf::from("/sys/fs/cgroup/pids/x/cgroup.procs")],
            Some((400_001, 400_002)),
        );
        let args: Vec<OsString> = cmd.get_args().skip(1).map(OsString::from).collect();
        let plan = LaunchPlan::parse(args).unwrap();
        assert_eq!(
            plan,
            LaunchPlan {
                no_hugepage: true,
                cgroup_procs: vec!["/sys/fs/cgroup/pids/x/cgroup.procs".into()],
                user: Some((400_001, 400_002)),
                qemu: "/usr/bin/qemu-system-x86_64".into(),
                args: os(&["-m", "256M", "--no-hugepage"]),
            }
        );
    }

    #[test]
    fn plan_without_qemu_or_with_unknown_flags_is_refused() {
        assert!(LaunchPlan::parse(os(&["--no-hugepage"])).is_err());
        assert!(LaunchPlan::parse(os(&["--"])).is_err());
        assert!(LaunchPlan::parse(os(&["--cgroup-procs"])).is_err());
        assert!(LaunchPlan::parse(os(&["--chroot", "/", "--", "qemu"])).is_err());
        for user in ["0:5", "5:0", "5", "a:b", "-1:5", ""] {
            assert!(
                LaunchPlan::parse(os(&["--user", user, "--", "qemu"])).is_err(),
                "{user}"
            );
        }
    }

    #[test]
    fn hugepage_filter_builds_for_this_machine() {
        assert!(!hugepage_filter().unwrap().is_empty());
    }
}
