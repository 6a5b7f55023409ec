//! `cloudlet base`: boot a disk image on QEMU with guest RAM in a shared file, wait until the
//! guest is ready (a serial marker, the guest agent answering, an HTTP 200, or the user), save
//! the device state and register disk + memory + device state + launch config as a base.
//! With `--cloud-init`, a NoCloud seed ([`super::cloud_init`]) is attached read-only and
//! registered with the base.

use super::CaptureError;
use crate::session::resume::{capture_confinement, log_confined};
use crate::session::user::SessionUser;
use crate::session::{wait_agent, wait_http_ok, wait_marker, RunDir, SessionError};
use crate::Reporter;
use std::path::{Path, PathBuf};
use std::time::Duration;
use synth::base::{Device, LaunchConfig};
use synth::registry::{AddBase, Base, Registry};
use synth::vm::{Accel, GuestNetwork, HostFwd, LaunchOptions, MemoryMode, QemuArgs, VmPaths};

/// Boot a disk image on QEMU, wait until it is ready, capture it and register it as a base.
///
/// Guest RAM lives in a shared memory file, so the capture is that file plus the device
/// state (saved with x-ignore-shared). The disk is copied first; DISK is not modified.
#[derive(Debug, Clone, clap::Args)]
pub struct BaseArgs {
    /// Disk image to boot: raw, or qcow2 (converted to raw; one with a backing file is
    /// refused). DISK itself is not modified.
    pub disk: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mb: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// QEMU machine type.
    #[arg(long, default_value = "q35")]
    pub machine: String,
    /// QEMU CPU model.
    #[arg(long, default_value = "max")]
    pub cpu: String,
    /// Kernel to boot directly (stored in the base).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (stored in the base).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, requires = "kernel")]
    pub append: Option<String>,
    /// Capture once the guest prints this on its serial console (without any --ready*:
    /// wait for Enter).
    #[arg(long, value_name = "MARKER")]
    pub ready: Option<String>,
    /// Capture once the guest agent answers guest-ping (after --ready, if both are given).
    #[arg(long, requires = "guest_agent")]
    pub ready_agent: bool,
    /// Capture once this URL answers HTTP 200 (a guest port reached through --hostfwd; after
    /// --ready and --ready-agent).
    #[arg(long, value_name = "http://HOST:PORT/PATH")]
    pub ready_http: Option<String>,
    /// Forward a host port to the guest while it boots (for --ready-http; not recorded in
    /// the base): tcp:[HOST]:PORT-:GUESTPORT, or PORT:GUESTPORT.
    #[arg(long)]
    pub hostfwd: Vec<HostFwd>,
    /// How long to wait for each --ready*, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Show the guest on a VNC display (e.g. 127.0.0.1:1) to prepare it by hand.
    #[arg(long, value_name = "HOST:DISPLAY")]
    pub vnc: Option<String>,
    /// Add a virtio-balloon with free page reporting (freed guest pages leave the memory
    /// image while the base boots).
    #[arg(long)]
    pub balloon: bool,
    /// Give the guest the QEMU guest agent's virtio-serial channel (org.qemu.guest_agent.0),
    /// recorded in the launch config: `cloudlet overlay` then runs commands and copies files
    /// through the agent if the guest runs qemu-guest-agent.
    #[arg(long)]
    pub guest_agent: bool,
    /// Attach a NoCloud cloud-init seed made from this user-data (a file starting with
    /// #cloud-config, a #! script or MIME multipart; at most 1 MiB): a FAT image labelled
    /// CIDATA, stored in the base and attached read-only to every VM of the base, so that a
    /// cloud image gets its login, SSH key or guest agent on first boot.
    #[arg(long, value_name = "USER_DATA")]
    pub cloud_init: Option<PathBuf>,
    /// The seed's meta-data (YAML, at most 64 KiB); default: an instance-id from the
    /// user-data's hash and local-hostname from --name.
    #[arg(long, value_name = "FILE", requires = "cloud_init")]
    pub cloud_init_meta_data: Option<PathBuf>,
    /// Name of the base.
    #[arg(long)]
    pub name: Option<String>,
    /// Print the base record as JSON.
    #[arg(long)]
    pub json: bool,
    /// Further QEMU arguments, recorded in the base's launch config.
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// Boots `args.disk` headless, waits until it is ready, captures memory and device state, and
/// registers the result as a base.
pub fn make_base(
    home: &Path,
    threads: usize,
    args: &BaseArgs,
    reporter: &dyn Reporter,
) -> Result<Base, CaptureError> {
    if let Some(url) = &args.ready_http {
        if !url.starts_with("http://") {
            return Err(CaptureError::ReadyUrl(url.clone()));
        }
    }
    let name = args.name.clone().or_else(|| {
        args.disk
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
    });
    // The inputs are checked before anything is copied or booted.
    let cloud_init = match &args.cloud_init {
        Some(path) => {
            let user = super::cloud_init::read_user_data(path)?;
            let meta = match &args.cloud_init_meta_data {
                Some(m) => super::cloud_init::read_meta_data(m)?,
                None => super::cloud_init::default_meta_data(&user, name.as_deref().unwrap_or("")),
            };
            Some((user, meta))
        }
        None => None,
    };
    let stop = cloudletfs::cli::interrupt_flag().map_err(SessionError::Signals)?;
    let registry = Registry::open(home)?;
    let run = RunDir::new(home, "base")?;
    let disk = run.join("disk.img");
    reporter.note(&format!("importing {} …", args.disk.display()));
    let format = super::image::import_disk(&args.disk, &disk)?;
    if format == super::image::DiskFormat::Qcow2 {
        reporter.note("converted the qcow2 image to raw");
    }
    let memory = run.join("memory.img");
    let mut devices = vec![Device::VirtioBlk { discard: true }, Device::VirtioNet];
    if args.balloon {
        devices.push(Device::VirtioBalloon {
            free_page_reporting: true,
        });
    }
    if args.guest_agent {
        devices.push(Device::GuestAgent);
    }
    let seed = match &cloud_init {
        Some((user, meta)) => {
            let seed = run.join("cloud-init-seed.img");
            super::cloud_init::build_seed(user, meta, &seed)?;
            reporter.note("attaching the cloud-init seed (NoCloud, label CIDATA)");
            devices.push(Device::CloudInitSeed);
            Some(seed)
        }
        None => None,
    };
    let config = LaunchConfig {
        machine: args.machine.clone(),
        cpu: args.cpu.clone(),
        memory_mb: args.memory_mb,
        vcpus: args.vcpus,
        devices,
        kernel: args.kernel.as_ref().map(|p| p.display().to_string()),
        initrd: args.initrd.as_ref().map(|p| p.display().to_string()),
        append: args.append.clone(),
        cloud_init: seed.as_ref().map(|p| p.display().to_string()),
        extra_args: args.extra.clone(),
    };
    // Confined as a session is: a uid of its own, in whose jail it runs, and a cgroup, when
    // cloudlet runs as root. QEMU writes the disk, creates the memory image and the device
    // state in the run folder: the uid gets it (and the disk) until the capture is done. The
    // kernel and initrd are read from copies there (the originals may be root's alone, as
    // /boot/vmlinuz-* often is); the base records the originals.
    let (user, cgroup) = capture_confinement(&run, config.memory_mb, config.vcpus)?;
    let owner = user.as_ref().map(SessionUser::ids);
    let (mut kernel, mut initrd) = (args.kernel.clone(), args.initrd.clone());
    let ours = match owner {
        Some(ids) => {
            for (file, name) in [(&mut kernel, "kernel"), (&mut initrd, "initrd")] {
                if let Some(original) = file.take() {
                    let copy = run.join(name);
                    std::fs::copy(&original, &copy).map_err(|source| CaptureError::Io {
                        what: "Copying",
                        path: original.clone(),
                        source,
                    })?;
                    give(&[&copy], Some(ids))?;
                    *file = Some(copy);
                }
            }
            let ours = own_ids(run.path())?;
            give(&[run.path(), &disk], Some(ids))?;
            give(
                &seed.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
                Some(ids),
            )?;
            Some(ours)
        }
        None => None,
    };
    let paths = VmPaths {
        disk: disk.clone(),
        memory: memory.clone(),
        kernel,
        initrd,
        cloud_init: seed,
        run_dir: run.join("run"),
    };
    let options = LaunchOptions {
        memory: MemoryMode::Capture,
        incoming: false,
        hostfwd: args.hostfwd.clone(),
        network: GuestNetwork::Isolated,
        accel: Accel::detect()?,
        vnc: args.vnc.clone(),
    };
    let qemu = QemuArgs::new(&config, &paths, &options)?;
    let spawned =
        crate::session::launch::spawn_qemu(&qemu, cgroup.as_ref(), owner, &[run.path().into()])?;
    // Declared before the VM, so it is removed after QEMU is gone, on every path.
    let _cgroup = log_confined(
        spawned.vm.pid(),
        owner,
        spawned.jailed,
        cgroup,
        spawned.in_cgroup,
    );
    let mut vm = spawned.vm;
    reporter.note(&format!(
        "booting (serial console log: {})",
        qemu.serial_log().display()
    ));
    let timeout = Duration::from_secs(args.timeout);
    if let Some(marker) = &args.ready {
        let t = wait_marker(&mut vm, marker, timeout, &stop)?;
        reporter.note(&format!(
            "guest printed {marker:?} after {:.1}s",
            t.as_secs_f64()
        ));
    }
    if args.ready_agent {
        let t = wait_agent(&mut vm, timeout, &stop)?;
        reporter.note(&format!(
            "guest agent answered after {:.1}s",
            t.as_secs_f64()
        ));
    }
    if let Some(url) = &args.ready_http {
        wait_http_ok(url, timeout, &stop)?;
        reporter.note(&format!("{url} answered 200"));
    }
    if args.ready.is_none() && !args.ready_agent && args.ready_http.is_none() {
        let how = match &args.vnc {
            Some(addr) => format!("on VNC display {addr}"),
            None => format!("(serial console log: {})", qemu.serial_log().display()),
        };
        reporter.wait_for_user(
            &format!("Prepare the guest {how}, then press Enter to capture it."),
            &stop,
        )?;
    }
    let ds = run.join("device-state");
    let t = vm.save_device_state(&ds)?;
    vm.quit()?;
    // What goes into the registry is cloudlet's again, not a uid the next session may get.
    give(&[run.path(), &disk, &memory, &ds], ours)?;
    give(
        &paths
            .cloud_init
            .iter()
            .map(PathBuf::as_path)
            .collect::<Vec<_>>(),
        ours,
    )?;
    reporter.note(&format!(
        "captured device state in {:.0} ms",
        t.as_secs_f64() * 1e3
    ));
    let add = AddBase {
        disk,
        memory,
        device_state: Some(ds),
        config: Some(config),
        name,
        link: false,
        adopt: true,
        threads,
    };
    let total = std::fs::metadata(&add.disk).map(|m| m.len()).unwrap_or(0) + (args.memory_mb << 20);
    let progress = reporter.progress("indexing", total);
    Ok(registry.add(&add, progress.counter())?)
}

/// The uid and gid of `path` (the run folder, made by this process: cloudlet's own ids).
fn own_ids(path: &Path) -> Result<(u32, u32), SessionError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| SessionError::Chown {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((m.uid(), m.gid()))
}

/// Gives each of `paths` to `ids` (uid, gid); nothing when `None`.
fn give(paths: &[&Path], ids: Option<(u32, u32)>) -> Result<(), SessionError> {
    let Some((uid, gid)) = ids else {
        return Ok(());
    };
    for path in paths {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| {
            SessionError::Chown {
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}
