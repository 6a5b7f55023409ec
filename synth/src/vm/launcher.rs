//! cloudlet's QEMU launcher: a process that prepares itself and then becomes QEMU (`exec`).
//!
//! ```text
//!  Vm::spawn_via(&Launcher, args)
//!     └─► LAUNCHER-PROGRAM PREFIX… [--no-hugepage] [--cgroup-procs FILE]… [--user UID:GID]
//!            [--jail [--bind PATH]… [--bind-ro PATH]…] -- QEMU ARGS…
//!            (the `cloudlet` binary's hidden `qemu-launch` command, parsed into a LaunchPlan)
//!            1. joins the session's cgroups (writes its own pid to each cgroup.procs)
//!            2. [--jail] enters a mount namespace of its own whose root holds only the jail
//!            3. installs a seccomp filter: madvise(…, MADV_HUGEPAGE) returns 0 and does nothing
//!            4. [--user UID:GID] drops every privilege: no supplementary groups, gid, uid
//!            5. exec QEMU (same pid), which later installs its own `-sandbox` filter on top
//! ```
//!
//! ## The jail
//!
//! Like Firecracker's jailer, but with the paths unchanged, so QEMU's command line needs no
//! rewriting. The launcher (root) unshares its mount namespace, makes every mount private (no
//! mount event propagates either way), mounts a small tmpfs and pivots into it, then binds
//! from the old root, each at its own absolute path:
//!
//! | in the jail | how | why |
//! | --- | --- | --- |
//! | `/usr` | read-only bind | QEMU, its libraries, firmware and option ROMs (`/usr/share/qemu`) |
//! | `/bin`, `/sbin`, `/lib`, `/lib64` | the host's symlinks recreated (merged `/usr`), else read-only binds | the dynamic loader's path (`/lib64/ld-linux-x86-64.so.2`) |
//! | `/dev/{null,zero,full,random,urandom}`, `/dev/kvm` if present | binds of the nodes | what QEMU opens; nothing else of `/dev` |
//! | the QEMU binary, when outside `/usr` | read-only bind | |
//! | `--bind PATH` | read-write bind (recursive: FUSE mounts below come along) | the session's run folder (QMP, serial, agent sockets, serial log), its mounts (disk, memory, device state) |
//! | `--bind-ro PATH` | read-only bind | kernel, initrd, cloud-init seed |
//!
//! The old root is then detached and the jail's root made read-only, so QEMU can create no
//! file outside its binds. No `/proc`, `/sys`, `/etc`, `/tmp` or `/home`: QEMU 10.0 with our
//! command lines (TCG, `-kernel`/`-initrd`, user networking with port forwards,
//! memory-backend-file shared and private, virtio-blk, the guest agent's virtio-serial,
//! migration to and from a file) runs without them (measured by the e2e tests as root; the
//! Debian guest's synthesis once, too). `/proc` would show every host process's command line,
//! `/etc` the host's configuration. Not measured: KVM (`/dev/kvm` is bound when present) and
//! VNC. The run folder is bound as a folder, not socket by
//! socket, so the sockets QEMU creates there are the host's too and cloudlet connects to them
//! as before. A path not bound is simply absent: a QEMU a guest took over finds neither the
//! registry, other sessions, nor any world-readable host file beyond `/usr`.
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
    /// The arguments were not `[--no-hugepage] [--cgroup-procs FILE]… [--user UID:GID]
    /// [--jail [--bind PATH]… [--bind-ro PATH]…] -- QEMU ARGS…`.
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
    /// A step of building the jail failed (the launcher must run as root for it).
    #[error("Jail: {step} {} failed (the launcher needs root, CAP_SYS_ADMIN, for a mount namespace)", path.display())]
    Jail {
        /// What was being done.
        step: &'static str,
        /// The path it was done to.
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

/// The session's own paths in QEMU's jail, each bound at its own absolute path (see the module
/// docs for the system part every jail has).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jail {
    /// Files or folders QEMU may write (folders recursively, with the mounts below them).
    pub read_write: Vec<PathBuf>,
    /// Files or folders QEMU may only read.
    pub read_only: Vec<PathBuf>,
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
    /// whose `cgroup.procs` files are `cgroups` first, inside `jail` when given (the launcher
    /// must then run as root) and running as `user` (uid, gid) when given.
    pub fn command(
        &self,
        qemu: &Path,
        args: &[OsString],
        cgroups: &[PathBuf],
        user: Option<(u32, u32)>,
        jail: Option<&Jail>,
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
        if let Some(jail) = jail {
            cmd.arg("--jail");
            for p in &jail.read_write {
                cmd.arg("--bind").arg(p);
            }
            for p in &jail.read_only {
                cmd.arg("--bind-ro").arg(p);
            }
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
    /// The session's part of the jail QEMU runs in; `None`: no jail, the host's mounts.
    pub jail: Option<Jail>,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// QEMU's arguments.
    pub args: Vec<OsString>,
}

impl LaunchPlan {
    /// Parses `[--no-hugepage] [--cgroup-procs FILE]… [--user UID:GID] [--jail [--bind
    /// PATH]… [--bind-ro PATH]…] -- QEMU [ARGS…]` (what [`Launcher::command`] writes after its
    /// prefix). Paths to bind must be absolute.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<LaunchPlan, LauncherError> {
        let mut it = args.into_iter();
        let mut plan = LaunchPlan {
            no_hugepage: false,
            cgroup_procs: Vec::new(),
            user: None,
            jail: None,
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
                Some("--jail") => plan.jail = Some(plan.jail.take().unwrap_or_default()),
                Some(flag @ ("--bind" | "--bind-ro")) => {
                    let path = it
                        .next()
                        .map(PathBuf::from)
                        .filter(|p| p.is_absolute())
                        .ok_or_else(|| {
                            LauncherError::Usage(format!("{flag} needs an absolute path"))
                        })?;
                    let jail = plan
                        .jail
                        .as_mut()
                        .ok_or_else(|| LauncherError::Usage(format!("{flag} only after --jail")))?;
                    if flag == "--bind" {
                        jail.read_write.push(path);
                    } else {
                        jail.read_only.push(path);
                    }
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
        if let Some(jail) = &self.jail {
            if let Err(e) = enter_jail(&jail_binds(jail, &self.qemu)) {
                return e;
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

/// How one path gets into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailEntry {
    /// A bind of the host's path at the same path; recursive (mounts below come along).
    Bind {
        /// The path (absolute).
        path: PathBuf,
        /// What may be done there.
        mode: BindMode,
        /// Skipped when the host has no such path (optional system parts like `/dev/kvm`).
        optional: bool,
    },
    /// The host's symlink at `path` recreated (`/lib` → `usr/lib` on merged-/usr systems),
    /// or, where the host has a real folder there, a [`BindMode::System`] bind of it; nothing
    /// if absent.
    SystemLink(PathBuf),
}

/// What may be done in a bound path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// Read and run programs (`/usr`, the QEMU binary): read-only, no set-uid.
    System,
    /// A device node, as the host's `/dev` mount has it.
    Device,
    /// The session's files QEMU writes: no set-uid, no device nodes, no programs.
    ReadWrite,
    /// The session's files QEMU reads: read-only, no set-uid, no device nodes, no programs.
    ReadOnly,
}

/// The system part every jail holds (see the module docs).
const SYSTEM_READ_ONLY: &[&str] = &["/usr"];
const SYSTEM_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib64"];
const SYSTEM_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];
const OPTIONAL_DEVICES: &[&str] = &["/dev/kvm"];

/// Everything the jail for `jail` and the QEMU binary `qemu` holds, in the order it is made:
/// parents before what lies below them. A path inside one already bound with at least the
/// rights is left out (reachable already); one with other rights is bound again on top.
pub fn jail_binds(jail: &Jail, qemu: &Path) -> Vec<JailEntry> {
    let bind = |path: &Path, mode, optional| JailEntry::Bind {
        path: path.to_path_buf(),
        mode,
        optional,
    };
    let mut entries: Vec<JailEntry> = SYSTEM_LINKS
        .iter()
        .map(|l| JailEntry::SystemLink(PathBuf::from(l)))
        .collect();
    let mut binds: Vec<JailEntry> = Vec::new();
    binds.extend(
        SYSTEM_READ_ONLY
            .iter()
            .map(|p| bind(Path::new(p), BindMode::System, false)),
    );
    binds.extend(
        SYSTEM_DEVICES
            .iter()
            .map(|p| bind(Path::new(p), BindMode::Device, false)),
    );
    binds.extend(
        OPTIONAL_DEVICES
            .iter()
            .map(|p| bind(Path::new(p), BindMode::Device, true)),
    );
    binds.push(bind(qemu, BindMode::System, false));
    binds.extend(
        jail.read_write
            .iter()
            .map(|p| bind(p, BindMode::ReadWrite, false)),
    );
    binds.extend(
        jail.read_only
            .iter()
            .map(|p| bind(p, BindMode::ReadOnly, false)),
    );
    // Fewer components first: a folder is bound before what lies inside it.
    binds.sort_by_key(|e| match e {
        JailEntry::Bind { path, .. } => path.components().count(),
        JailEntry::SystemLink(_) => 0,
    });
    let mut kept: Vec<(PathBuf, BindMode)> = Vec::new();
    for e in binds {
        let JailEntry::Bind { path, mode, .. } = &e else {
            continue;
        };
        let covered = kept.iter().any(|(p, m)| path.starts_with(p) && m == mode);
        if covered {
            continue;
        }
        kept.push((path.clone(), *mode));
        entries.push(e);
    }
    entries
}

/// Where the jail's root is mounted before `pivot_root` (any folder every system has; it is
/// uncovered again in the old root once the jail's root moved to `/`).
const JAIL_MOUNT: &str = "/tmp";
/// Where the old root sits between `pivot_root` and its detaching, inside the jail.
const OLD_ROOT: &str = "/.old-root";

/// Enters a new mount namespace whose root holds `entries` only; this process's root and
/// working folder are then the jail's.
fn enter_jail(entries: &[JailEntry]) -> Result<(), LauncherError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let step = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| LauncherError::Jail {
            step,
            path,
            source: io::Error::from(e),
        }
    };
    let io_step = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| LauncherError::Jail { step, path, source }
    };
    let none: Option<&str> = None;
    // Sources are resolved in the host's tree, before it moves below the jail.
    let mut resolved: Vec<(&JailEntry, Option<PathBuf>)> = Vec::new();
    for e in entries {
        let source = match e {
            JailEntry::Bind { path, optional, .. } => match std::fs::canonicalize(path) {
                Ok(p) => Some(p),
                Err(_) if *optional => continue,
                Err(err) => return Err(io_step("finding", path)(err)),
            },
            JailEntry::SystemLink(_) => None,
        };
        resolved.push((e, source));
    }
    let root = Path::new("/");
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(step("unsharing the mount namespace at", root))?;
    mount(
        none,
        root,
        none,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        none,
    )
    .map_err(step("making every mount private below", root))?;
    let new_root = Path::new(JAIL_MOUNT);
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=1m,nr_inodes=4096,mode=0755"),
    )
    .map_err(step("mounting the jail's tmpfs on", new_root))?;
    let old = new_root.join(OLD_ROOT.trim_start_matches('/'));
    std::fs::create_dir(&old).map_err(io_step("creating", &old))?;
    nix::unistd::pivot_root(new_root, &old).map_err(step("pivot_root into", new_root))?;
    nix::unistd::chdir(root).map_err(step("chdir to", root))?;
    let old = Path::new(OLD_ROOT);
    let in_old = |p: &Path| old.join(p.strip_prefix("/").unwrap_or(p));

    for (entry, source) in resolved {
        match (entry, source) {
            (JailEntry::SystemLink(path), _) => {
                let host = in_old(path);
                match std::fs::symlink_metadata(&host) {
                    Ok(m) if m.file_type().is_symlink() => {
                        let target =
                            std::fs::read_link(&host).map_err(io_step("reading", &host))?;
                        std::os::unix::fs::symlink(&target, path)
                            .map_err(io_step("creating the symlink", path))?;
                    }
                    Ok(m) if m.is_dir() => {
                        bind_into(&host, path, BindMode::System, true)?;
                    }
                    _ => {}
                }
            }
            (JailEntry::Bind { path, mode, .. }, Some(source)) => {
                let is_dir = std::fs::metadata(in_old(&source))
                    .map_err(io_step("inspecting", &source))?
                    .is_dir();
                bind_into(&in_old(&source), path, *mode, is_dir)?;
            }
            (JailEntry::Bind { .. }, None) => {}
        }
    }
    umount2(old, MntFlags::MNT_DETACH).map_err(step("detaching the old root at", old))?;
    std::fs::remove_dir(old).map_err(io_step("removing", old))?;
    // The skeleton itself (folders, symlinks, mount points) becomes read-only too.
    mount(
        none,
        root,
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(step("making the jail's root read-only at", root))?;
    Ok(())
}

/// Binds `source` (a path in the old root) at `target` in the jail, creating the mount point
/// (a folder or an empty file) and its parents first, then remounts it with `mode`'s flags.
fn bind_into(
    source: &Path,
    target: &Path,
    mode: BindMode,
    is_dir: bool,
) -> Result<(), LauncherError> {
    use nix::mount::{mount, MsFlags};
    let io_step = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| LauncherError::Jail { step, path, source }
    };
    let step = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| LauncherError::Jail {
            step,
            path,
            source: io::Error::from(e),
        }
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io_step("creating", parent))?;
    }
    if std::fs::symlink_metadata(target).is_err() {
        if is_dir {
            std::fs::create_dir(target).map_err(io_step("creating", target))?;
        } else {
            std::fs::File::create(target).map_err(io_step("creating", target))?;
        }
    }
    let none: Option<&str> = None;
    mount(
        Some(source),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(step("binding", target))?;
    let flags = match mode {
        BindMode::Device => return Ok(()),
        BindMode::System => MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        BindMode::ReadWrite => MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        BindMode::ReadOnly => {
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
        }
    };
    mount(
        none,
        target,
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
        none,
    )
    .map_err(step("restricting", target))?;
    Ok(())
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
            Some(&Jail {
                read_write: vec!["/h/tmp/s-1/run".into(), "/h/tmp/s-1/mnt".into()],
                read_only: vec!["/h/bases/b/kernel".into()],
            }),
        );
        let args: Vec<OsString> = cmd.get_args().skip(1).map(OsString::from).collect();
        let plan = LaunchPlan::parse(args).unwrap();
        assert_eq!(
            plan,
            LaunchPlan {
                no_hugepage: true,
                cgroup_procs: vec!["/sys/fs/cgroup/pids/x/cgroup.procs".into()],
                user: Some((400_001, 400_002)),
                jail: Some(Jail {
                    read_write: vec!["/h/tmp/s-1/run".into(), "/h/tmp/s-1/mnt".into()],
                    read_only: vec!["/h/bases/b/kernel".into()],
                }),
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
    fn plan_without_jail_has_none_and_jail_alone_is_empty() {
        let plain = LaunchPlan::parse(os(&["--", "qemu"])).unwrap();
        assert_eq!(plain.jail, None);
        let empty = LaunchPlan::parse(os(&["--jail", "--", "qemu"])).unwrap();
        assert_eq!(empty.jail, Some(Jail::default()));
    }

    #[test]
    fn plan_bind_before_jail_relative_or_missing_is_refused() {
        for bad in [
            &["--bind", "/a", "--jail", "--", "qemu"][..],
            &["--jail", "--bind", "rel/path", "--", "qemu"],
            &["--jail", "--bind-ro", "", "--", "qemu"],
            &["--jail", "--bind-ro"],
        ] {
            assert!(LaunchPlan::parse(os(bad)).is_err(), "{bad:?}");
        }
    }

    fn bound(entries: &[JailEntry]) -> Vec<(String, BindMode)> {
        entries
            .iter()
            .filter_map(|e| match e {
                JailEntry::Bind { path, mode, .. } => Some((path.display().to_string(), *mode)),
                JailEntry::SystemLink(_) => None,
            })
            .collect()
    }

    #[test]
    fn jail_binds_system_part_and_session_paths_parents_first() {
        let jail = Jail {
            read_write: vec!["/h/tmp/s/mnt".into(), "/h/tmp/s/run".into()],
            read_only: vec!["/h/bases/b/kernel".into()],
        };
        let entries = jail_binds(&jail, Path::new("/usr/bin/qemu-system-x86_64"));
        let links: Vec<&JailEntry> = entries
            .iter()
            .filter(|e| matches!(e, JailEntry::SystemLink(_)))
            .collect();
        assert_eq!(links.len(), 4);
        let b = bound(&entries);
        // The QEMU binary lies in /usr, bound already.
        assert!(!b.iter().any(|(p, _)| p.starts_with("/usr/bin")), "{b:?}");
        assert_eq!(b[0], ("/usr".into(), BindMode::System));
        for dev in ["/dev/null", "/dev/urandom", "/dev/kvm"] {
            assert!(b.contains(&(dev.into(), BindMode::Device)), "{b:?}");
        }
        assert!(b.contains(&("/h/tmp/s/mnt".into(), BindMode::ReadWrite)));
        assert!(b.contains(&("/h/tmp/s/run".into(), BindMode::ReadWrite)));
        assert!(b.contains(&("/h/bases/b/kernel".into(), BindMode::ReadOnly)));
        assert!(!b
            .iter()
            .any(|(p, _)| p == "/etc" || p == "/proc" || p == "/h"));
    }

    #[test]
    fn jail_binds_skip_paths_inside_a_bind_of_the_same_mode_only() {
        let jail = Jail {
            read_write: vec![
                "/h/tmp/s/mnt/disk/image".into(),
                "/h/tmp/s/mnt".into(),
                "/h/tmp/s/mnt-memory/memory/image".into(),
            ],
            read_only: vec!["/h/tmp/s/mnt/kernel".into()],
        };
        let b = bound(&jail_binds(&jail, Path::new("/opt/qemu/bin/qemu")));
        let session: Vec<_> = b.iter().filter(|(p, _)| p.starts_with("/h")).collect();
        assert_eq!(
            session,
            [
                &("/h/tmp/s/mnt".to_string(), BindMode::ReadWrite),
                &("/h/tmp/s/mnt/kernel".to_string(), BindMode::ReadOnly),
                &(
                    "/h/tmp/s/mnt-memory/memory/image".to_string(),
                    BindMode::ReadWrite
                ),
            ]
        );
        // A QEMU outside /usr is bound on its own.
        assert!(b.contains(&("/opt/qemu/bin/qemu".into(), BindMode::System)));
    }

    #[test]
    fn hugepage_filter_builds_for_this_machine() {
        assert!(!hugepage_filter().unwrap().is_empty());
    }
}
