//! Resuming a VM from base + overlay: the run folder, the cloudletfs mount, the VM on one of
//! the backends (QEMU directly, or a libvirt domain), and its orderly end.

use super::cgroup::{CgroupLimits, SessionCgroup};
use super::launch::spawn_qemu;
use super::user::{SessionUser, UidRange};
use super::{RunDir, SessionError, WaitError};
use cloudletfs::{mount, MountOptions, Mounted, OverlaySource};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use synth::registry::Base;
use synth::vm::{
    Accel, GuestNetwork, HostFwd, LaunchOptions, MemoryMode, Passt, PasstOptions, QemuArgs,
    Timings, Vm, VmPaths,
};
use synth::ImageKind;

/// Which VM manager runs a synthesized VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// QEMU started and driven directly (the default).
    Qemu,
    /// A transient libvirt domain on the libvirt daemon at `uri`.
    Libvirt {
        /// Connection URI, e.g. `qemu:///system`.
        uri: String,
    },
}

/// `--backend` of `cloudlet synthesis`: the kind, without its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// QEMU started and driven directly.
    Qemu,
    /// A transient libvirt domain.
    Libvirt,
}

/// `--backend libvirt` on a build without the `libvirt` feature.
#[derive(Debug, thiserror::Error)]
#[error(
    "This cloudlet was built without libvirt support; rebuild it with \
     `cargo build --release --features libvirt` (needs libvirt-dev), or use --backend qemu"
)]
pub struct LibvirtNotBuilt;

impl Backend {
    /// The backend of `kind`, connecting to `libvirt_uri` for libvirt.
    pub fn new(kind: BackendKind, libvirt_uri: &str) -> Backend {
        match kind {
            BackendKind::Qemu => Backend::Qemu,
            BackendKind::Libvirt => Backend::Libvirt {
                uri: libvirt_uri.to_owned(),
            },
        }
    }

    /// Fails when this build cannot run the backend.
    pub fn check(&self) -> Result<(), LibvirtNotBuilt> {
        match self {
            Backend::Qemu => Ok(()),
            Backend::Libvirt { .. } if cfg!(feature = "libvirt") => Ok(()),
            Backend::Libvirt { .. } => Err(LibvirtNotBuilt),
        }
    }

    /// `qemu` or `libvirt`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Libvirt { .. } => "libvirt",
        }
    }
}

/// A resumed VM on one of the backends; dropping it stops the VM.
#[derive(Debug)]
pub enum ResumedVm {
    /// A QEMU process of ours.
    Qemu(Vm),
    /// A libvirt domain (destroyed on drop).
    #[cfg(feature = "libvirt")]
    Libvirt(synth::vm::libvirt::LibvirtVm),
}

impl ResumedVm {
    /// "QEMU pid N" or "libvirt domain NAME", for logs.
    pub fn describe(&self) -> String {
        match self {
            ResumedVm::Qemu(vm) => format!("QEMU pid {}", vm.pid()),
            #[cfg(feature = "libvirt")]
            ResumedVm::Libvirt(vm) => format!("libvirt domain {}", vm.name()),
        }
    }

    /// QEMU's pid when this process started it.
    pub fn pid(&self) -> Option<u32> {
        match self {
            ResumedVm::Qemu(vm) => Some(vm.pid()),
            #[cfg(feature = "libvirt")]
            ResumedVm::Libvirt(_) => None,
        }
    }

    /// Step durations (for libvirt, `qmp_connected` is the domain start).
    pub fn timings(&self) -> Timings {
        match self {
            ResumedVm::Qemu(vm) => vm.timings(),
            #[cfg(feature = "libvirt")]
            ResumedVm::Libvirt(vm) => vm.timings(),
        }
    }
}

/// A synthesized VM: QEMU running over a cloudletfs mount of base + overlay. Dropping it stops
/// QEMU, then unmounts, then removes the run folder (fields drop in declaration order).
pub struct RunningVm {
    /// The VM (QEMU process or libvirt domain).
    pub vm: ResumedVm,
    /// The QEMU's cgroup (removed once QEMU is gone), when it has one.
    pub cgroup: Option<SessionCgroup>,
    /// passt, the guest's outbound network, with `--guest-outbound` (stopped after QEMU).
    pub passt: Option<Passt>,
    /// The uid QEMU runs as (free again once QEMU is gone), when it has one of its own.
    pub user: Option<SessionUser>,
    /// QEMU runs in a mount namespace holding only its session's files (the launcher's jail).
    pub jailed: bool,
    /// The cloudletfs mount serving its disk and memory.
    pub mounted: Mounted,
    /// The guest's serial console log.
    pub serial_log: PathBuf,
    /// Scratch folder of this VM (mount point, state, QEMU sockets).
    pub run: RunDir,
}

impl RunningVm {
    /// How the VM's QEMU is confined, for logs and `list-session`: "uid 400000, mount
    /// namespace, seccomp, cgroup v1: memory 1024 MiB, 512 tasks, CPU 200%", or "cloudlet's
    /// uid, seccomp, no cgroup"; libvirt's own for its domains.
    pub fn confinement(&self) -> String {
        let who = who(self.user.as_ref().map(SessionUser::ids), self.jailed);
        let net = if self.passt.is_some() {
            "guest network: outbound (passt, host loopback unmapped)"
        } else {
            "guest network: isolated"
        };
        match (&self.vm, &self.cgroup) {
            (ResumedVm::Qemu(_), Some(cg)) => {
                format!("{who}, seccomp, {}, {net}", cg.describe())
            }
            (ResumedVm::Qemu(_), None) => format!("{who}, seccomp, no cgroup, {net}"),
            #[cfg(feature = "libvirt")]
            (ResumedVm::Libvirt(_), _) => format!("libvirt's, {net}"),
        }
    }

    /// Stops QEMU and unmounts; returns the final cloudletfs stats.
    pub fn stop(self) -> Result<cloudletfs::Stats, SessionError> {
        let RunningVm {
            vm,
            cgroup,
            passt,
            user,
            mounted,
            run,
            ..
        } = self;
        drop(vm);
        drop(passt);
        drop(cgroup);
        drop(user);
        let stats = mounted.stats();
        mounted.unmount().map_err(SessionError::Unmount)?;
        drop(run);
        Ok(stats)
    }
}

/// What an operator bounds per session: how far an overlay's disk may grow past its base's, and
/// how much copy-on-write data the guest may write (`--max-disk-growth-mib`,
/// `--cow-quota-mib` of `cloudlet synthesis` and `cloudlet server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct LimitArgs {
    /// How far an overlay's disk may grow past its base's disk, in MiB [default: the base's
    /// disk size]; a larger overlay is refused (exit code 3). Its memory must always be the
    /// base's size.
    #[arg(long, value_name = "MIB")]
    pub max_disk_growth_mib: Option<u64>,
    /// Most MiB of modified chunks (disk and memory together) a session keeps; a guest write
    /// past it gets an I/O error [default: no limit].
    #[arg(long, value_name = "MIB")]
    pub cow_quota_mib: Option<u64>,
    /// Most MiB of memory each VM's QEMU may use, through a cgroup of its own (RAM and the
    /// page cache it faults in) [default: twice the guest's RAM plus 512].
    #[arg(long, value_name = "MIB")]
    pub qemu_memory_limit_mib: Option<u64>,
    /// Most tasks (threads) each VM's QEMU may have, through its cgroup.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QEMU_PIDS)]
    pub qemu_pids_limit: u64,
    /// Most CPU time each VM's QEMU may use through its cgroup, in percent of one CPU
    /// [default: 100 per vCPU plus 100 for QEMU's own threads].
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub qemu_cpu_percent: Option<u64>,
    /// Run QEMU without a cgroup of its own (no memory, task or CPU limit).
    #[arg(long)]
    pub no_cgroup: bool,
    /// The uids (each also the gid) a session's QEMU runs as, one per live session, when
    /// cloudlet runs as root: no accounts needed, just numbers no one else uses.
    #[arg(long, value_name = "START-END", default_value = super::user::DEFAULT_UIDS,
          value_parser = super::user::parse_uid_range)]
    pub qemu_uids: UidRange,
    /// INSECURE: run QEMU as root (cloudlet's own user) rather than as a uid of its own; a
    /// guest that takes QEMU over then holds root's file access.
    #[arg(long)]
    pub qemu_as_root: bool,
    /// Let guests open connections out, as a machine on this host's LAN would (through passt,
    /// which must be installed): never to this host's loopback. Off by default: a guest only
    /// answers its forwarded ports.
    #[arg(long)]
    pub guest_outbound: bool,
}

/// Default of `--qemu-pids-limit`: QEMU under TCG runs a thread per vCPU, a main loop, RCU and
/// up to 64 I/O workers.
pub const DEFAULT_QEMU_PIDS: u64 = 512;

impl Default for LimitArgs {
    fn default() -> Self {
        LimitArgs {
            max_disk_growth_mib: None,
            cow_quota_mib: None,
            qemu_memory_limit_mib: None,
            qemu_pids_limit: DEFAULT_QEMU_PIDS,
            qemu_cpu_percent: None,
            no_cgroup: false,
            qemu_uids: UidRange::default(),
            qemu_as_root: false,
            guest_outbound: false,
        }
    }
}

impl LimitArgs {
    /// The cgroup limits for a VM of `guest_mb` MiB of RAM and `vcpus` vCPUs; `None` with
    /// `--no-cgroup`.
    pub fn cgroup(&self, guest_mb: u64, vcpus: u32) -> Option<CgroupLimits> {
        if self.no_cgroup {
            return None;
        }
        let mib = self
            .qemu_memory_limit_mib
            .unwrap_or_else(|| guest_mb.saturating_mul(2).saturating_add(512));
        Some(CgroupLimits {
            memory_bytes: mib.saturating_mul(1 << 20),
            pids: self.qemu_pids_limit,
            cpu_percent: self
                .qemu_cpu_percent
                .unwrap_or_else(|| (u64::from(vcpus) + 1).saturating_mul(100)),
        })
    }

    /// The session's own uid for QEMU: allocated when this process is root and
    /// `--qemu-as-root` was not given (which is warned about); `None` otherwise.
    pub fn qemu_user(&self) -> Result<Option<SessionUser>, SessionError> {
        if !super::user::is_root() {
            return Ok(None);
        }
        if self.qemu_as_root {
            log::warn!(
                "INSECURE: QEMU runs as root (--qemu-as-root): a guest that takes QEMU over \
                 can read and write every file root can"
            );
            return Ok(None);
        }
        Ok(Some(SessionUser::allocate(&self.qemu_uids)?))
    }

    /// `--max-disk-growth-mib` in bytes.
    pub fn max_disk_growth(&self) -> Option<u64> {
        self.max_disk_growth_mib.map(|m| m.saturating_mul(1 << 20))
    }

    /// `--cow-quota-mib` in bytes.
    pub fn cow_quota(&self) -> Option<u64> {
        self.cow_quota_mib.map(|m| m.saturating_mul(1 << 20))
    }
}

/// How [`resume_vm`] runs the VM.
pub struct ResumeOptions<'a> {
    /// Resume before every chunk is in.
    pub early_start: bool,
    /// Host ports forwarded into the guest.
    pub hostfwd: &'a [HostFwd],
    /// What runs the VM.
    pub backend: &'a Backend,
}

/// The runtime paths of a VM of `base` with its images at `disk` and `memory`.
pub(crate) fn base_paths(base: &Base, disk: PathBuf, memory: PathBuf, run_dir: PathBuf) -> VmPaths {
    VmPaths {
        disk,
        memory,
        kernel: base.kernel_path(),
        initrd: base.initrd_path(),
        cloud_init: base.cloud_init_path(),
        run_dir,
    }
}

/// Mounts `overlay` over `base` at `run/mnt` (and again at `run/mnt-memory`, where guest RAM
/// is mapped from: see [`MountOptions::memory_mountpoint`]), with its state and cache in
/// `run`. The mount
/// checks the overlay against the base before serving anything
/// ([`synth::format::Overlay::check_base`]: memory the base's size, disk within `limits`'
/// growth) and bounds its copy-on-write data by `limits`' quota.
pub(crate) fn mount_vm_with(
    base: &Base,
    overlay: OverlaySource,
    run: &RunDir,
    fill: bool,
    limits: &LimitArgs,
    owner: Option<(u32, u32)>,
) -> Result<Mounted, SessionError> {
    let (mnt, memory_mnt) = (run.join("mnt"), run.join("mnt-memory"));
    for dir in [&mnt, &memory_mnt] {
        std::fs::create_dir_all(dir).map_err(|source| SessionError::RunDir {
            path: dir.clone(),
            source,
        })?;
    }
    let mut opts = MountOptions::new(base.clone(), overlay, &mnt);
    // Guest RAM is mapped from a second mount with a readahead sized for page faults.
    opts.memory_mountpoint = Some(memory_mnt);
    opts.owner = owner;
    opts.state_dir = Some(run.join("state"));
    opts.cache_dir = Some(run.path().to_path_buf());
    opts.background_fill = fill;
    opts.max_disk_growth = limits.max_disk_growth();
    opts.cow_quota = limits.cow_quota();
    mount(opts).map_err(SessionError::Mount)
}

/// [`resume_vm_with`] with the default limits.
pub fn resume_vm(
    home: &Path,
    base: &Base,
    overlay: OverlaySource,
    how: &ResumeOptions<'_>,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(&str),
) -> Result<RunningVm, SessionError> {
    resume_vm_with(
        home,
        base,
        overlay,
        how,
        &LimitArgs::default(),
        stop,
        on_event,
    )
}

/// Mounts `overlay` over `base` (bounded by `limits`) and resumes the VM: early (right away)
/// or eager (once every chunk is in). `on_event` hears "overlay opened", "overlay fetched
/// (eager)", "VM resumed". A set `stop` flag abandons the eager wait.
pub fn resume_vm_with(
    home: &Path,
    base: &Base,
    overlay: OverlaySource,
    how: &ResumeOptions<'_>,
    limits: &LimitArgs,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(&str),
) -> Result<RunningVm, SessionError> {
    let ResumeOptions {
        early_start,
        hostfwd,
        backend,
    } = *how;
    backend.check()?;
    let run = RunDir::new(home, "synthesis")?;
    // QEMU runs as a uid of its own: the direct backend's launcher drops to it, libvirt gets
    // it as the domain's static DAC label.
    let user = limits.qemu_user()?;
    let owner = user.as_ref().map(SessionUser::ids);
    let mounted = mount_vm_with(base, overlay, &run, true, limits, owner)?;
    on_event("overlay opened");
    if !early_start {
        while !mounted.wait_filled(Some(Duration::from_millis(250))) {
            if stop.load(Ordering::Relaxed) {
                return Err(WaitError::Interrupted.into());
            }
        }
        on_event("overlay fetched (eager)");
    }
    let mnt = mounted.mountpoint().to_path_buf();
    let paths = base_paths(
        base,
        mounted.image_path(ImageKind::Disk),
        mounted.image_path(ImageKind::Memory),
        run.join("run"),
    );
    if let Some(ids) = owner {
        give_run_dir(&run, ids)?;
    }
    let passt = if limits.guest_outbound {
        Some(start_passt(&run, owner, hostfwd)?)
    } else {
        None
    };
    let options = LaunchOptions {
        memory: MemoryMode::Resume,
        incoming: true,
        hostfwd: hostfwd.to_vec(),
        network: passt.as_ref().map_or(GuestNetwork::Isolated, |p| {
            GuestNetwork::Passt(p.socket().into())
        }),
        accel: Accel::detect()?,
        vnc: None,
    };
    let device_state = mnt.join("device-state");
    let mut cgroup = None;
    let mut jailed = false;
    let (vm, serial_log) = match backend {
        Backend::Qemu => {
            let args = QemuArgs::new(&base.record.config, &paths, &options)?;
            let config = &base.record.config;
            let cg = confine(&run, limits.cgroup(config.memory_mb, config.vcpus));
            // The mounts: disk and device state under `mnt`, guest RAM under `mnt-memory`.
            let mounts = [mnt.clone(), run.join("mnt-memory")];
            let spawned = spawn_qemu(&args, cg.as_ref(), owner, &mounts)?;
            let mut vm = spawned.vm;
            jailed = spawned.jailed;
            cgroup = log_confined(vm.pid(), owner, jailed, cg, spawned.in_cgroup);
            vm.resume_from(&device_state)?;
            (ResumedVm::Qemu(vm), args.serial_log().to_path_buf())
        }
        Backend::Libvirt { uri } => {
            let name = format!("cloudlet-{}", run.name());
            let label = match owner {
                Some(ids) => Some(libvirt_label(ids)?),
                None => None,
            };
            let paths = match owner {
                Some(ids) => libvirt_paths(&run, paths, ids)?,
                None => paths,
            };
            let resumed = resume_libvirt(uri, &name, base, &paths, &options, &device_state, label)?;
            log::info!(
                "libvirt domain {name} confined: {}, libvirt's seccomp, cgroup and mount namespace",
                who(label, false)
            );
            resumed
        }
    };
    on_event("VM resumed");
    Ok(RunningVm {
        vm,
        cgroup,
        passt,
        user,
        jailed,
        mounted,
        serial_log,
        run,
    })
}

/// Logs how QEMU `pid` is confined; returns its cgroup if it joined it.
pub(crate) fn log_confined(
    pid: u32,
    owner: Option<(u32, u32)>,
    jailed: bool,
    cgroup: Option<SessionCgroup>,
    in_cgroup: bool,
) -> Option<SessionCgroup> {
    let who = who(owner, jailed);
    match cgroup.filter(|_| in_cgroup) {
        Some(cg) => {
            log::info!("QEMU pid {pid} confined: {who}, {}", cg.describe());
            Some(cg)
        }
        None => {
            log::info!("QEMU pid {pid} confined: {who}, no cgroup");
            None
        }
    }
}

/// What confines a capture's QEMU (`cloudlet base`, `cloudlet overlay`): as a session's with
/// the default limits, a uid of its own when cloudlet runs as root (so the jail too) and a
/// cgroup. The uid, when there is one, is given the run folder's `run/`.
pub(crate) fn capture_confinement(
    run: &RunDir,
    memory_mb: u64,
    vcpus: u32,
) -> Result<(Option<SessionUser>, Option<SessionCgroup>), SessionError> {
    let limits = LimitArgs::default();
    let user = limits.qemu_user()?;
    if let Some(ids) = user.as_ref().map(SessionUser::ids) {
        give_run_dir(run, ids)?;
    }
    let cgroup = confine(run, limits.cgroup(memory_mb, vcpus));
    Ok((user, cgroup))
}

/// "uid 400000, mount namespace" or "cloudlet's uid", the start of a confinement string.
fn who(user: Option<(u32, u32)>, jailed: bool) -> String {
    let uid = user.map_or("cloudlet's uid".to_string(), |(uid, _)| {
        format!("uid {uid}")
    });
    if jailed {
        format!("{uid}, mount namespace")
    } else {
        uid
    }
}

/// Gives the session's uid the run folder's `run/` (QMP, serial and agent sockets, the serial
/// log; 0700). The run folder itself stays 0700 and cloudlet's: QEMU reaches `run/` and the
/// mounts through its jail's binds, never by walking the host's path.
pub(crate) fn give_run_dir(run: &RunDir, (uid, gid): (u32, u32)) -> Result<(), SessionError> {
    use std::os::unix::fs::PermissionsExt;
    let sockets = run.join("run");
    let chown_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SessionError::Chown { path, source }
    };
    std::fs::create_dir_all(&sockets).map_err(chown_err(&sockets))?;
    std::os::unix::fs::chown(&sockets, Some(uid), Some(gid)).map_err(chown_err(&sockets))?;
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700))
        .map_err(chown_err(&sockets))
}

/// The DAC label of a libvirt domain whose QEMU runs as the session's uid: that uid, with the
/// group of libvirt's own QEMU user (`libvirt-qemu`, else `kvm`), since libvirt keeps each
/// domain's private files (master key, monitor) under its folder of that group.
fn libvirt_label((uid, gid): (u32, u32)) -> Result<(u32, u32), SessionError> {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let find = |name: &str| {
        groups.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1)?.parse::<u32>().ok())?
        })
    };
    Ok((
        uid,
        find("libvirt-qemu").or_else(|| find("kvm")).unwrap_or(gid),
    ))
}

/// Makes the run folder traversable but not listable (0711), for a process of the session's
/// uid that walks the host's path into it rather than through a jail's binds (libvirt's
/// QEMU, passt); what the folder holds stays its owners' (`run/` and the mounts are 0700).
fn open_run_dir(run: &RunDir) -> Result<(), SessionError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o711)).map_err(|source| {
        SessionError::Chown {
            path: run.path().to_path_buf(),
            source,
        }
    })
}

/// The paths of a libvirt domain whose QEMU runs as `ids`: without a jail, QEMU walks the
/// host's paths, so the run folder becomes traversable (0711, not listable: `run/` and the
/// mounts inside are the uid's, 0700), and the kernel, initrd and seed are read from copies
/// in `run/` that the uid owns (the registry's `bases/` is root's alone).
fn libvirt_paths(
    run: &RunDir,
    mut paths: VmPaths,
    ids: (u32, u32),
) -> Result<VmPaths, SessionError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SessionError::Chown { path, source }
    };
    open_run_dir(run)?;
    for (file, name) in [
        (&mut paths.kernel, "kernel"),
        (&mut paths.initrd, "initrd"),
        (&mut paths.cloud_init, "cloud-init-seed.img"),
    ] {
        if let Some(original) = file.take() {
            let copy = run.join("run").join(name);
            std::fs::copy(&original, &copy).map_err(err(&original))?;
            std::os::unix::fs::chown(&copy, Some(ids.0), Some(ids.1)).map_err(err(&copy))?;
            *file = Some(copy);
        }
    }
    Ok(paths)
}

/// Starts passt for a VM of `run` whose QEMU runs as `owner` (or as cloudlet's user): passt
/// runs as the same uid and binds its socket in the VM's own `run/` folder; when cloudlet is
/// root and QEMU has no uid of its own, passt runs as `nobody` in a folder of its own, since
/// it never stays root.
pub(crate) fn start_passt(
    run: &RunDir,
    owner: Option<(u32, u32)>,
    hostfwd: &[HostFwd],
) -> Result<Passt, SessionError> {
    let log = run.join("passt.log");
    let (dir, runas) = match owner {
        Some(ids) => (run.join("run"), Some(ids)),
        None if super::user::is_root() => {
            let dir = run.join("passt");
            let nobody = (NOBODY, NOBODY);
            let err = |source| SessionError::Chown {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(&dir).map_err(err)?;
            std::os::unix::fs::chown(&dir, Some(nobody.0), Some(nobody.1)).map_err(err)?;
            (dir, Some(nobody))
        }
        None => (run.join("run"), None),
    };
    if runas.is_some() {
        // passt binds its socket by path after dropping to `runas`.
        open_run_dir(run)?;
    }
    let socket = dir.join("passt.sock");
    log::warn!(
        "the guest may open connections out (--guest-outbound), as a machine on this host's \
         LAN would; passt's log: {}",
        log.display()
    );
    Ok(Passt::start(&PasstOptions {
        socket: &socket,
        hostfwd,
        runas,
        log: &log,
    })?)
}

/// The uid and gid of `nobody`, which passt run as root would pick itself.
const NOBODY: u32 = 65534;

/// The session's cgroup with `limits`, or `None` (with a warning) where the host has none or
/// it cannot be made: the VM then runs unbounded rather than not at all.
fn confine(run: &RunDir, limits: Option<CgroupLimits>) -> Option<SessionCgroup> {
    let limits = limits?;
    match SessionCgroup::create(&run.name(), limits) {
        Ok(cg) => Some(cg),
        Err(e) => {
            log::warn!(
                "QEMU will run without memory or task limits: {}",
                cloudletfs::error::chain(&e)
            );
            None
        }
    }
}

/// Starts the VM as a transient libvirt domain and loads its device state.
#[cfg(feature = "libvirt")]
fn resume_libvirt(
    uri: &str,
    name: &str,
    base: &Base,
    paths: &VmPaths,
    options: &LaunchOptions,
    device_state: &Path,
    label: Option<(u32, u32)>,
) -> Result<(ResumedVm, PathBuf), SessionError> {
    let mut launch = synth::vm::DomainLaunch::new(&base.record.config, paths, options)?;
    launch.dac_label = label;
    let mut vm = synth::vm::libvirt::LibvirtVm::start(uri, name, launch)?;
    vm.resume_from(device_state)?;
    let log = vm.serial_log().to_path_buf();
    Ok((ResumedVm::Libvirt(vm), log))
}

/// Without the `libvirt` feature: refused ([`Backend::check`] normally says so earlier).
#[cfg(not(feature = "libvirt"))]
fn resume_libvirt(
    _uri: &str,
    _name: &str,
    _base: &Base,
    _paths: &VmPaths,
    _options: &LaunchOptions,
    _device_state: &Path,
    _label: Option<(u32, u32)>,
) -> Result<(ResumedVm, PathBuf), SessionError> {
    Err(LibvirtNotBuilt.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_check_libvirt_follows_the_build() {
        let r = Backend::new(BackendKind::Libvirt, synth::vm::DEFAULT_LIBVIRT_URI).check();
        assert_eq!(r.is_ok(), cfg!(feature = "libvirt"));
        if let Err(e) = r {
            assert!(e.to_string().contains("--features libvirt"), "{e}");
            assert_eq!(crate::exit_code(&e), crate::EXIT_USAGE);
        }
        assert!(Backend::Qemu.check().is_ok());
    }
}
