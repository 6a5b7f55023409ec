//! QEMU command lines, built only from a base's [`LaunchConfig`] plus runtime paths.
//!
//! The same config must give the same machine on the capture side and the resume side, or the
//! device state will not load; so everything except the RAM backend options and
//! `-incoming defer` comes from the config alone, in a fixed order:
//!
//! ```text
//!   -accel A -machine M,memory-backend=mem -cpu C -smp N -m SIZE
//!   -object memory-backend-file,id=mem,size=SIZE,mem-path=RAM,<mode options>
//!   -nodefaults -no-user-config -display none -no-reboot [-kernel K] [-initrd I] [-append ..]
//!   per device, in config order: -drive/-netdev + -device (guest-agent: -chardev socket
//!     RUN/qga.sock + -device virtio-serial-pci + -device virtserialport; cloud-init-seed:
//!     -drive readonly=on + -device virtio-blk-pci)
//!   -chardev socket (serial, logged to RUN/serial.log) -serial chardev:ser0
//!   -chardev socket (QMP, RUN/qmp.sock) -mon chardev=qmp0,mode=control  [-incoming defer]
//! ```
//!
//! Arguments are handed to QEMU as a `Vec<OsString>`, never through a shell. Paths embedded in
//! QEMU's comma-separated option syntax (`mem-path=`, `file=`, `path=`, `logfile=`) are escaped
//! by doubling every comma, which QEMU reads back as one literal comma; all paths are made
//! absolute first, so a `:` can never be taken for a block protocol prefix. Free-form config
//! strings (`machine`, `cpu`) are limited to characters that cannot start another option.

use super::passt::GuestNetwork;
use crate::base::{Device, LaunchConfig};
use log::{debug, info};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Environment variable naming the QEMU binary.
pub const QEMU_ENV: &str = "CLOUDLET_QEMU";
/// Environment variable forcing the accelerator (`tcg` or `kvm`).
pub const ACCEL_ENV: &str = "CLOUDLET_ACCEL";
/// QEMU binary looked up on `PATH` when [`QEMU_ENV`] is unset.
pub const QEMU_DEFAULT: &str = "qemu-system-x86_64";

/// Id of the RAM backend object; must match on both sides of a save/resume.
const MEMORY_ID: &str = "mem";
/// Chardev id of the guest agent's socket.
const AGENT_CHARDEV: &str = "qga0";
/// Id of the virtio-serial controller carrying the guest agent's port.
const AGENT_SERIAL_ID: &str = "vserial0";
/// Port number of the guest agent on its controller (libvirt's `port='1'`: the first
/// port that is not a console).
const AGENT_PORT: u32 = 1;
/// Drive id of the cloud-init seed.
const SEED_DRIVE: &str = "seed0";
/// Longest Unix socket path (`sizeof(sun_path) - 1` on Linux).
const MAX_SOCKET_PATH: usize = 107;
const MIB: u64 = 1 << 20;

/// Errors while building a QEMU command line.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A launch config field cannot be turned into QEMU arguments.
    #[error("Launch config field {field} is invalid: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The config and the runtime paths disagree (e.g. a kernel named but no path given).
    #[error("Launch config and runtime paths disagree: {0}")]
    PathMismatch(String),
    /// A file QEMU needs could not be inspected.
    #[error("Checking the {what} {path} failed")]
    Inspect {
        /// Which file (`disk`, `memory image`, ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A path is not a regular file.
    #[error("The {what} {path} is not a regular file")]
    NotAFile {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// The memory image size differs from the configured RAM size.
    #[error(
        "Memory image {path} is {actual} bytes but memory_mb asks for {expected} bytes; \
         QEMU needs them equal"
    )]
    MemorySize {
        /// The memory image.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// `memory_mb` in bytes.
        expected: u64,
    },
    /// A socket path is too long for a Unix socket address.
    #[error(
        "Socket path {path} is {len} bytes, Unix sockets allow at most {MAX_SOCKET_PATH}; \
         use a shorter run directory"
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// A host port forward is invalid.
    #[error("Port forward {0} is invalid: {1}")]
    HostFwd(HostFwd, &'static str),
    /// Turning a relative path into an absolute one failed.
    #[error("Resolving the path {0} failed")]
    Absolute(PathBuf, #[source] io::Error),
    /// [`ACCEL_ENV`] holds something other than `tcg` or `kvm`.
    #[error("{ACCEL_ENV} must be tcg or kvm, not {0:?}")]
    AccelEnv(String),
    /// A path or argument cannot be written into libvirt's XML (it is not UTF-8).
    #[error("The {what} {value} is not valid UTF-8, which libvirt's XML needs")]
    NonUtf8 {
        /// What it is.
        what: &'static str,
        /// It, lossily decoded.
        value: String,
    },
    /// No QEMU binary was found.
    #[error(
        "QEMU not found ({0}); install qemu-system-x86 (10.0 or newer) or set {QEMU_ENV} \
         to a qemu-system-x86_64 binary"
    )]
    QemuNotFound(String),
}

/// Where the files of one VM live at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// Raw disk image (attached by the config's `virtio-blk` device).
    pub disk: PathBuf,
    /// Guest RAM file (`memory-backend-file` `mem-path`).
    pub memory: PathBuf,
    /// Kernel, if the config names one.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk, if the config names one.
    pub initrd: Option<PathBuf>,
    /// The cloud-init seed image, if the config names one (`cloud_init`).
    pub cloud_init: Option<PathBuf>,
    /// Folder for the QMP and serial sockets, the serial log and QEMU's own output.
    pub run_dir: PathBuf,
}

/// How guest RAM maps the memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMode {
    /// `share=on`: guest RAM *is* the file; after a save it holds RAM page for page.
    /// The file may be missing or empty (QEMU creates and sizes it), or exactly the RAM size.
    Capture,
    /// `share=off,readonly=on,rom=off`: the file is opened read-only and mapped privately;
    /// pages are read on first touch and guest writes stay in QEMU's memory. The file must
    /// exist with exactly the RAM size.
    Resume,
}

/// A TCP port forward from the host into the guest (QEMU user networking `hostfwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFwd {
    /// Host address to listen on.
    pub host_addr: Ipv4Addr,
    /// Host port (not 0: QEMU would pick one and not say which).
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl HostFwd {
    /// A forward from `127.0.0.1:host_port` to the guest's `guest_port`.
    pub fn localhost(host_port: u16, guest_port: u16) -> HostFwd {
        HostFwd {
            host_addr: Ipv4Addr::LOCALHOST,
            host_port,
            guest_port,
        }
    }
}

/// A `--hostfwd` value that is not `tcp:[HOST]:PORT-:GUESTPORT` or `PORT:GUESTPORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected tcp:[HOST]:PORT-:GUESTPORT or PORT:GUESTPORT")]
pub struct BadHostFwd(pub String);

impl std::str::FromStr for HostFwd {
    type Err = BadHostFwd;

    /// Parses QEMU's `tcp:[HOST]:PORT-:GUESTPORT` (an empty host is 127.0.0.1) or the short
    /// `PORT:GUESTPORT` (on 127.0.0.1).
    fn from_str(s: &str) -> Result<HostFwd, BadHostFwd> {
        let bad = || BadHostFwd(s.to_owned());
        let (host, hport, gport) = if let Some(rest) = s.strip_prefix("tcp:") {
            let (h, g) = rest.split_once("-:").ok_or_else(bad)?;
            let (addr, port) = h.rsplit_once(':').ok_or_else(bad)?;
            let addr = if addr.is_empty() { "127.0.0.1" } else { addr };
            (addr, port, g)
        } else {
            let (h, g) = s.split_once(':').ok_or_else(bad)?;
            ("127.0.0.1", h, g)
        };
        Ok(HostFwd {
            host_addr: host.parse().map_err(|_| bad())?,
            host_port: hport.parse().map_err(|_| bad())?,
            guest_port: gport.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for HostFwd {
    /// The `hostfwd=` value: `tcp:ADDR:PORT-:GUESTPORT`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tcp:{}:{}-:{}",
            self.host_addr, self.host_port, self.guest_port
        )
    }
}

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation (works everywhere, slow).
    Tcg,
    /// Hardware virtualisation.
    Kvm,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    /// Picks the accelerator: [`ACCEL_ENV`] if set; else TCG when `/dev/kvm` is backed by
    /// `kvm_pvm` on a CPU without vmx/svm (it cannot run ordinary guests); else KVM when
    /// `/dev/kvm` opens read-write; else TCG. No probe boot is made.
    pub fn detect() -> Result<Accel, LaunchError> {
        let env = std::env::var(ACCEL_ENV).ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (accel, why) = decide_accel(
            env.as_deref(),
            Path::new("/sys/module/kvm_pvm").exists(),
            &cpuinfo,
            || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok()
            },
        )?;
        info!("Accelerator {}: {why}", accel.as_str());
        Ok(accel)
    }
}

/// The detection rule, apart from the system it inspects.
pub(crate) fn decide_accel(
    env: Option<&str>,
    kvm_pvm: bool,
    cpuinfo: &str,
    dev_kvm_rw: impl FnOnce() -> bool,
) -> Result<(Accel, &'static str), LaunchError> {
    match env.map(str::trim) {
        Some("tcg") => return Ok((Accel::Tcg, "forced by CLOUDLET_ACCEL")),
        Some("kvm") => return Ok((Accel::Kvm, "forced by CLOUDLET_ACCEL")),
        Some("") | None => {}
        Some(other) => return Err(LaunchError::AccelEnv(other.to_owned())),
    }
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|f| f == "vmx" || f == "svm");
    if kvm_pvm && !hw_virt {
        return Ok((
            Accel::Tcg,
            "/dev/kvm is kvm_pvm on a CPU without vmx/svm, which cannot run this guest",
        ));
    }
    if dev_kvm_rw() {
        Ok((Accel::Kvm, "/dev/kvm opens read-write"))
    } else {
        Ok((Accel::Tcg, "/dev/kvm is missing or not writable"))
    }
}

/// The QEMU binary: [`QEMU_ENV`] if set, else [`QEMU_DEFAULT`] found on `PATH`.
pub fn qemu_binary() -> Result<PathBuf, LaunchError> {
    find_binary(QEMU_ENV, QEMU_DEFAULT).map_err(LaunchError::QemuNotFound)
}

/// The program the environment variable `env` names (it must be a file), else `name` found on
/// `PATH`; `Err` says why not, for the caller's "not found" error.
pub(crate) fn find_binary(env: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{env}={} is not a file", p.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no {name} on PATH"))
}

/// Escapes a value for QEMU's `key=value,key=value` syntax: every `,` becomes `,,`.
pub fn escape_option_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// QEMU's seccomp filter, on every QEMU started from a [`QemuArgs`]: besides QEMU's default
/// deny list, no obsolete system calls, no set*uid/set*gid, no fork/exec, no scheduler or
/// CPU-affinity changes. A guest that escapes into QEMU's process through a device-model bug
/// cannot start programs or raise its privileges from there.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Runtime choices that are not part of the launch config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOptions {
    /// How guest RAM maps the memory image.
    pub memory: MemoryMode,
    /// Start with `-incoming defer` (to resume from saved device state).
    pub incoming: bool,
    /// Port forwards on the first `virtio-net` device.
    pub hostfwd: Vec<HostFwd>,
    /// How the first `virtio-net` device reaches networks (isolated unless the operator opts
    /// in; with passt, `hostfwd` must be passt's own, since QEMU then forwards nothing).
    pub network: GuestNetwork,
    /// Accelerator.
    pub accel: Accel,
    /// Show the guest's display on a VNC server at this address (e.g. `127.0.0.1:1`) instead
    /// of running headless; for interactive customization.
    pub vnc: Option<String>,
}

/// A complete, validated QEMU command line (without the binary) and the files it uses.
#[derive(Debug, Clone)]
pub struct QemuArgs {
    args: Vec<OsString>,
    run_dir: PathBuf,
    qmp_socket: PathBuf,
    serial_socket: PathBuf,
    serial_log: PathBuf,
    qemu_log: PathBuf,
    agent_socket: Option<PathBuf>,
    incoming: bool,
    jail: super::launcher::Jail,
}

impl QemuArgs {
    /// Builds the command line for `config` with `paths`, checking that the config is usable,
    /// that the memory image has exactly `memory_mb` MiB (see [`MemoryMode`]) and that the
    /// disk, kernel and initrd are files.
    pub fn new(
        config: &LaunchConfig,
        paths: &VmPaths,
        options: &LaunchOptions,
    ) -> Result<QemuArgs, LaunchError> {
        let checked = Checked::new(config)?;
        let mb = config.memory_mb;

        let run_dir = absolute(&paths.run_dir)?;
        let qmp_socket = socket_path(run_dir.join("qmp.sock"))?;
        let serial_socket = socket_path(run_dir.join("serial.sock"))?;
        let serial_log = run_dir.join("serial.log");
        let qemu_log = run_dir.join("qemu.log");
        let agent_socket = agent_socket(config, &run_dir)?;

        let mut a = Args::default();
        a.push("-accel").push(options.accel.as_str());
        a.push("-machine")
            .push(format!("{},memory-backend={MEMORY_ID}", checked.machine));
        a.push("-cpu").push(checked.cpu);
        a.push("-smp").push(config.vcpus.to_string());
        a.push("-m").push(format!("{mb}M"));
        push_memory_object(&mut a, config, paths, options.memory, checked.memory_bytes)?;
        a.push("-nodefaults").push("-no-user-config");
        a.push("-sandbox").push(SANDBOX);
        match &options.vnc {
            Some(addr) => {
                // HOST:DISPLAY only: no commas, so no further VNC options can ride along.
                let ok = !addr.is_empty()
                    && addr.contains(':')
                    && addr
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".:[]-".contains(c));
                if !ok {
                    return Err(config_error(
                        "vnc",
                        "expects HOST:DISPLAY, e.g. 127.0.0.1:1",
                    ));
                }
                a.push("-vga").push("std").push("-vnc").push(addr);
            }
            None => {
                a.push("-display").push("none");
            }
        }
        a.push("-no-reboot");

        let boot = Boot::new(config, paths)?;
        if let Some(k) = boot.kernel {
            a.push("-kernel").push(k);
        }
        if let Some(i) = boot.initrd {
            a.push("-initrd").push(i);
        }
        if let Some(append) = boot.append {
            // -append is taken verbatim, no option parsing.
            a.push("-append").push(append);
        }

        add_devices(
            &mut a,
            &config.devices,
            paths,
            &options.hostfwd,
            &options.network,
            agent_socket.as_deref(),
            Placement::Implicit,
        )?;
        // The operator's own arguments, recorded in the base when it was made. Overlays carry
        // no launch config, so nothing a user sends can add to this list.
        for extra in &config.extra_args {
            a.push(extra);
        }
        push_serial(&mut a, &serial_socket, &serial_log);
        a.push("-chardev").push_opts(&[
            "socket,id=qmp0,path=".into(),
            escape_option_value(qmp_socket.as_os_str()),
            ",server=on,wait=off".into(),
        ]);
        a.push("-mon").push("chardev=qmp0,mode=control");
        if options.incoming {
            a.push("-incoming").push("defer");
        }
        debug!("QEMU arguments: {:?}", a.0);
        let jail = jail_paths(config, paths, &run_dir, options.memory)?;
        Ok(QemuArgs {
            args: a.0,
            run_dir,
            qmp_socket,
            serial_socket,
            serial_log,
            qemu_log,
            agent_socket,
            incoming: options.incoming,
            jail,
        })
    }

    /// Every file QEMU opens by path for this command line, for its jail: read-write the run
    /// folder, the disk image and the memory image (its folder in capture mode, where QEMU may
    /// create it); read-only the kernel, initrd and cloud-init seed. A caller adds what it
    /// hands QEMU later (the folder of a device state to load or save).
    pub fn jail(&self) -> &super::launcher::Jail {
        &self.jail
    }

    /// The arguments (without the binary).
    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    /// The run folder (absolute).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// The serial console socket.
    pub fn serial_socket(&self) -> &Path {
        &self.serial_socket
    }

    /// Everything the guest wrote to its serial console.
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// QEMU's own stdout and stderr.
    pub fn qemu_log(&self) -> &Path {
        &self.qemu_log
    }

    /// The guest agent's socket, when the config has the `guest-agent` device.
    pub fn agent_socket(&self) -> Option<&Path> {
        self.agent_socket.as_deref()
    }

    /// Whether QEMU starts with `-incoming defer`.
    pub fn incoming(&self) -> bool {
        self.incoming
    }
}

/// The disk of a libvirt domain: the image and the PCI slot a direct QEMU would give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The raw image (absolute).
    pub path: PathBuf,
    /// Pass guest TRIM to the image.
    pub discard: bool,
    /// PCI slot on `pcie.0`.
    pub slot: usize,
}

/// The guest agent channel of a libvirt domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainAgent {
    /// The Unix socket QEMU listens on (absolute).
    pub socket: PathBuf,
    /// PCI slot of its virtio-serial controller on `pcie.0`.
    pub slot: usize,
}

/// A launch config split for a libvirt domain (rendered by [`super::domain`]): what the
/// domain XML can say, and the QEMU arguments it cannot, which go into `qemu:commandline`.
#[derive(Debug, Clone)]
pub struct DomainLaunch {
    /// Machine type (q35 family).
    pub machine: String,
    /// Guest RAM in MiB.
    pub memory_mb: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Accelerator (domain type `qemu` or `kvm`).
    pub accel: Accel,
    /// Kernel (absolute), if any.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (absolute), if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// The disk, if the config has one.
    pub disk: Option<DomainDisk>,
    /// The guest agent channel, if the config has one.
    pub agent: Option<DomainAgent>,
    /// Arguments appended to libvirt's own command line.
    pub qemu_args: Vec<OsString>,
    /// Run folder (absolute).
    pub run_dir: PathBuf,
    /// Serial console socket.
    pub serial_socket: PathBuf,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// Whether QEMU waits for device state (`-incoming defer`).
    pub incoming: bool,
    /// The uid and gid libvirt runs QEMU as (a static DAC label); `None`: this process's own.
    pub dac_label: Option<(u32, u32)>,
}

impl DomainLaunch {
    /// Splits `config` for a libvirt domain, with the same checks as [`QemuArgs::new`].
    ///
    /// Only q35 machines are supported: the devices must land at the PCI addresses a direct
    /// QEMU gives them (see `Placement::Q35Slots`), and VNC is not offered.
    pub fn new(
        config: &LaunchConfig,
        paths: &VmPaths,
        options: &LaunchOptions,
    ) -> Result<DomainLaunch, LaunchError> {
        let checked = Checked::new(config)?;
        if !(checked.machine == "q35" || checked.machine.starts_with("pc-q35-")) {
            return Err(config_error(
                "machine",
                "the libvirt backend supports q35 machines only",
            ));
        }
        if options.vnc.is_some() {
            return Err(config_error("vnc", "not offered by the libvirt backend"));
        }
        let run_dir = absolute(&paths.run_dir)?;
        let serial_socket = socket_path(run_dir.join("serial.sock"))?;
        let serial_log = run_dir.join("serial.log");
        let agent_socket = agent_socket(config, &run_dir)?;

        let mut a = Args::default();
        // libvirt already passes -machine with its own RAM backend (`pc.ram`); a second
        // -machine overrides just that property, so guest RAM is ours, under the id the
        // device state was saved with.
        a.push("-machine")
            .push(format!("memory-backend={MEMORY_ID}"));
        push_memory_object(&mut a, config, paths, options.memory, checked.memory_bytes)?;
        // The last -cpu wins over the one libvirt passes.
        a.push("-cpu").push(checked.cpu);
        add_devices(
            &mut a,
            &config.devices,
            paths,
            &options.hostfwd,
            &options.network,
            agent_socket.as_deref(),
            Placement::Q35Slots,
        )?;
        for extra in &config.extra_args {
            a.push(extra);
        }
        push_serial(&mut a, &serial_socket, &serial_log);
        if options.incoming {
            a.push("-incoming").push("defer");
        }

        let disk = match config
            .devices
            .iter()
            .enumerate()
            .find_map(|(i, d)| match d {
                Device::VirtioBlk { discard } => Some((i, *discard)),
                _ => None,
            }) {
            Some((index, discard)) => Some(DomainDisk {
                path: existing_file("disk", &paths.disk)?,
                discard,
                slot: q35_slot(index)?,
            }),
            None => None,
        };
        let agent = match agent_socket {
            Some(socket) => {
                let index = config
                    .devices
                    .iter()
                    .position(|d| matches!(d, Device::GuestAgent))
                    .ok_or_else(|| mismatch("an agent socket without a guest-agent device"))?;
                Some(DomainAgent {
                    socket,
                    slot: q35_slot(index)?,
                })
            }
            None => None,
        };
        let boot = Boot::new(config, paths)?;
        debug!("libvirt domain QEMU arguments: {:?}", a.0);
        Ok(DomainLaunch {
            machine: checked.machine.to_owned(),
            memory_mb: config.memory_mb,
            vcpus: config.vcpus,
            accel: options.accel,
            kernel: boot.kernel,
            initrd: boot.initrd,
            append: boot.append.map(str::to_owned),
            disk,
            agent,
            qemu_args: a.0,
            run_dir,
            serial_socket,
            serial_log,
            incoming: options.incoming,
            dac_label: None,
        })
    }
}

/// Argument list under construction.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, s: impl Into<OsString>) -> &mut Self {
        self.0.push(s.into());
        self
    }

    fn push_opts(&mut self, parts: &[OsString]) -> &mut Self {
        let mut s = OsString::new();
        for p in parts {
            s.push(p);
        }
        self.0.push(s);
        self
    }
}

/// The config fields every command line needs, checked.
struct Checked<'a> {
    machine: &'a str,
    cpu: &'a str,
    memory_bytes: u64,
}

impl<'a> Checked<'a> {
    fn new(config: &'a LaunchConfig) -> Result<Checked<'a>, LaunchError> {
        let machine = checked_word("machine", &config.machine, false)?;
        let cpu = checked_word("cpu", &config.cpu, true)?;
        if config.vcpus == 0 {
            return Err(config_error("vcpus", "must be at least 1"));
        }
        let seed_device = config
            .devices
            .iter()
            .any(|d| matches!(d, Device::CloudInitSeed));
        if config.cloud_init.is_some() != seed_device {
            return Err(config_error(
                "cloud_init",
                "names a seed image exactly when the devices have cloud-init-seed",
            ));
        }
        let memory_bytes = config
            .memory_mb
            .checked_mul(MIB)
            .filter(|&b| b > 0)
            .ok_or_else(|| config_error("memory_mb", "must be between 1 and 2^44"))?;
        Ok(Checked {
            machine,
            cpu,
            memory_bytes,
        })
    }
}

/// `-object memory-backend-file` over the memory image, after checking its size.
fn push_memory_object(
    a: &mut Args,
    config: &LaunchConfig,
    paths: &VmPaths,
    mode: MemoryMode,
    memory_bytes: u64,
) -> Result<(), LaunchError> {
    let memory = absolute(&paths.memory)?;
    check_memory_image(&memory, memory_bytes, mode)?;
    let mode = match mode {
        MemoryMode::Capture => "share=on",
        MemoryMode::Resume => "share=off,readonly=on,rom=off",
    };
    let mb = config.memory_mb;
    a.push("-object").push_opts(&[
        format!("memory-backend-file,id={MEMORY_ID},size={mb}M,mem-path=").into(),
        escape_option_value(memory.as_os_str()),
        format!(",{mode}").into(),
    ]);
    Ok(())
}

/// What [`QemuArgs::jail`] returns for `config` with `paths`.
fn jail_paths(
    config: &LaunchConfig,
    paths: &VmPaths,
    run_dir: &Path,
    memory: MemoryMode,
) -> Result<super::launcher::Jail, LaunchError> {
    let mut jail = super::launcher::Jail::default();
    jail.read_write.push(run_dir.to_path_buf());
    if config
        .devices
        .iter()
        .any(|d| matches!(d, Device::VirtioBlk { .. }))
    {
        jail.read_write.push(absolute(&paths.disk)?);
    }
    let memory_image = absolute(&paths.memory)?;
    match (memory, memory_image.parent()) {
        (MemoryMode::Capture, Some(dir)) if !memory_image.is_file() => {
            jail.read_write.push(dir.to_path_buf());
        }
        _ => jail.read_write.push(memory_image),
    }
    let boot = Boot::new(config, paths)?;
    jail.read_only.extend(boot.kernel);
    jail.read_only.extend(boot.initrd);
    jail.read_only
        .extend(cloud_init_seed(&config.devices, paths)?);
    Ok(jail)
}

/// The serial console: a socket (for commands) whose output is also logged to a file.
fn push_serial(a: &mut Args, socket: &Path, log: &Path) {
    a.push("-chardev").push_opts(&[
        "socket,id=ser0,path=".into(),
        escape_option_value(socket.as_os_str()),
        ",server=on,wait=off,logfile=".into(),
        escape_option_value(log.as_os_str()),
    ]);
    a.push("-serial").push("chardev:ser0");
}

/// Kernel, initrd and command line, checked against each other and the runtime paths.
struct Boot<'a> {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<&'a str>,
}

impl<'a> Boot<'a> {
    fn new(config: &'a LaunchConfig, paths: &VmPaths) -> Result<Boot<'a>, LaunchError> {
        let kernel = match (&config.kernel, &paths.kernel) {
            (Some(_), Some(k)) => Some(existing_file("kernel", k)?),
            (None, None) => None,
            (Some(_), None) => return Err(mismatch("the config names a kernel, no path given")),
            (None, Some(_)) => return Err(mismatch("a kernel path given, the config has none")),
        };
        let initrd = match (&config.initrd, &paths.initrd) {
            (Some(_), Some(i)) => Some(existing_file("initrd", i)?),
            (None, None) => None,
            (Some(_), None) => return Err(mismatch("the config names an initrd, no path given")),
            (None, Some(_)) => return Err(mismatch("an initrd path given, the config has none")),
        };
        if config.append.is_some() && config.kernel.is_none() {
            return Err(config_error("append", "needs a kernel"));
        }
        Ok(Boot {
            kernel,
            initrd,
            append: config.append.as_deref(),
        })
    }
}

/// Where [`add_devices`] puts the devices on the PCI bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// QEMU picks each slot (the next free one, in command-line order).
    Implicit,
    /// Every device gets, explicitly, the slot QEMU would have picked for it on a q35
    /// machine started by [`QemuArgs`] (slot 1 onwards on `pcie.0`, in config order), and
    /// the disk and the guest agent channel are left out: the libvirt domain XML attaches
    /// them at their slots. Device state
    /// saved by a direct QEMU then loads into the libvirt one, because the same devices sit
    /// at the same PCI addresses.
    Q35Slots,
}

/// First PCI slot QEMU hands out on a q35 machine with `-nodefaults` (0 is the host bridge).
const Q35_FIRST_SLOT: usize = 1;
/// Last usable PCI slot on q35's `pcie.0` (0x1f is the ICH9 LPC/SATA/SMBus function block).
const Q35_LAST_SLOT: usize = 0x1e;

/// The `,bus=…,addr=…` suffix of the device at `index` in the config.
fn slot_opts(placement: Placement, index: usize) -> Result<String, LaunchError> {
    match placement {
        Placement::Implicit => Ok(String::new()),
        Placement::Q35Slots => {
            let slot = q35_slot(index)?;
            Ok(format!(",bus=pcie.0,addr={slot:#x}"))
        }
    }
}

/// The PCI slot of the device at `index` in the config on a q35 machine.
fn q35_slot(index: usize) -> Result<usize, LaunchError> {
    index
        .checked_add(Q35_FIRST_SLOT)
        .filter(|&s| s <= Q35_LAST_SLOT)
        .ok_or_else(|| config_error("devices", "more devices than free PCI slots"))
}

fn add_devices(
    a: &mut Args,
    devices: &[Device],
    paths: &VmPaths,
    hostfwd: &[HostFwd],
    network: &GuestNetwork,
    agent_socket: Option<&Path>,
    placement: Placement,
) -> Result<(), LaunchError> {
    let blk_count = devices
        .iter()
        .filter(|d| matches!(d, Device::VirtioBlk { .. }))
        .count();
    if blk_count > 1 {
        return Err(config_error(
            "devices",
            "more than one virtio-blk device, but a VM has one disk image",
        ));
    }
    if !hostfwd.is_empty() && !devices.iter().any(|d| matches!(d, Device::VirtioNet)) {
        return Err(mismatch(
            "port forwards given, the config has no virtio-net",
        ));
    }
    for fwd in hostfwd {
        if fwd.host_port == 0 || fwd.guest_port == 0 {
            return Err(LaunchError::HostFwd(*fwd, "ports must not be 0"));
        }
    }
    let seed = cloud_init_seed(devices, paths)?;
    let (mut nets, mut balloons) = (0u32, 0u32);
    for (index, dev) in devices.iter().enumerate() {
        let at = slot_opts(placement, index)?;
        match dev {
            Device::VirtioBlk { .. } if placement == Placement::Q35Slots => {}
            Device::VirtioBlk { discard } => {
                let disk = existing_file("disk", &paths.disk)?;
                let discard = if *discard { "unmap" } else { "ignore" };
                a.push("-drive").push_opts(&[
                    "file=".into(),
                    escape_option_value(disk.as_os_str()),
                    format!(",format=raw,if=none,id=disk0,discard={discard},cache=writeback")
                        .into(),
                ]);
                a.push("-device").push("virtio-blk-pci,drive=disk0");
            }
            Device::VirtioNet => {
                match network {
                    // The operator let the guest out (`--guest-outbound`): passt, which
                    // forwards the ports itself (see `passt`).
                    GuestNetwork::Passt(socket) if nets == 0 => {
                        a.push("-netdev").push_opts(&[
                            format!("stream,id=net{nets},server=off,addr.type=unix,addr.path=")
                                .into(),
                            escape_option_value(socket.as_os_str()),
                        ]);
                        // A VM captured on user networking carries slirp's state ("slirp"
                        // section, instance 0), which QEMU refuses to load without a slirp
                        // instance: an unattached, restricted one takes it and carries
                        // nothing.
                        a.push("-netdev")
                            .push(format!("user,id=slirp-state{nets},restrict=on"));
                    }
                    _ => {
                        // restrict=on: the guest opens no connection out, so it reaches
                        // neither the host's loopback (10.0.2.2), other sessions' forwarded
                        // ports, the LAN nor beyond; it only answers the forwarded ports.
                        let mut netdev = format!("user,id=net{nets},restrict=on");
                        if nets == 0 {
                            for fwd in hostfwd {
                                netdev.push_str(&format!(",hostfwd={fwd}"));
                            }
                        }
                        a.push("-netdev").push(netdev);
                    }
                }
                a.push("-device")
                    .push(format!("virtio-net-pci,netdev=net{nets}{at}"));
                nets += 1;
            }
            Device::VirtioBalloon {
                free_page_reporting,
            } => {
                let fpr = if *free_page_reporting { "on" } else { "off" };
                a.push("-device").push(format!(
                    "virtio-balloon-pci,id=balloon{balloons},free-page-reporting={fpr}{at}"
                ));
                balloons += 1;
            }
            Device::CloudInitSeed => {
                // Checked by `cloud_init_seed`: there is exactly one, and its file exists.
                let seed = seed
                    .as_deref()
                    .ok_or_else(|| mismatch("a cloud-init-seed device without its image"))?;
                // The same arguments for libvirt (through qemu:commandline, at the slot a
                // direct QEMU gives it): read-only, so nothing the guest does changes it.
                a.push("-drive").push_opts(&[
                    "file=".into(),
                    escape_option_value(seed.as_os_str()),
                    format!(",format=raw,if=none,id={SEED_DRIVE},readonly=on").into(),
                ]);
                a.push("-device")
                    .push(format!("virtio-blk-pci,drive={SEED_DRIVE}{at}"));
            }
            Device::GuestAgent if placement == Placement::Q35Slots => {}
            Device::GuestAgent => {
                let socket = agent_socket
                    .ok_or_else(|| mismatch("a guest-agent device without its socket path"))?;
                a.push("-chardev").push_opts(&[
                    format!("socket,id={AGENT_CHARDEV},path=").into(),
                    escape_option_value(socket.as_os_str()),
                    ",server=on,wait=off".into(),
                ]);
                a.push("-device")
                    .push(format!("virtio-serial-pci,id={AGENT_SERIAL_ID}{at}"));
                a.push("-device").push(format!(
                    "virtserialport,bus={AGENT_SERIAL_ID}.0,nr={AGENT_PORT},\
                     chardev={AGENT_CHARDEV},name={}",
                    super::qga::AGENT_CHANNEL
                ));
            }
        }
    }
    Ok(())
}

/// The cloud-init seed image (absolute) when the config has the `cloud-init-seed` device:
/// at most one, and only with its image given in `paths` (the config's `cloud_init`).
fn cloud_init_seed(devices: &[Device], paths: &VmPaths) -> Result<Option<PathBuf>, LaunchError> {
    let count = devices
        .iter()
        .filter(|d| matches!(d, Device::CloudInitSeed))
        .count();
    match (count, &paths.cloud_init) {
        (0, None) => Ok(None),
        (1, Some(p)) => existing_file("cloud-init seed", p).map(Some),
        (0, Some(_)) => Err(mismatch(
            "a cloud-init seed given, the config has no cloud-init-seed device",
        )),
        (1, None) => Err(mismatch(
            "the config has a cloud-init-seed device, no seed image given",
        )),
        _ => Err(config_error(
            "devices",
            "more than one cloud-init-seed device, but a base has one seed",
        )),
    }
}

/// `RUN/qga.sock` when the config has the `guest-agent` device (at most one).
fn agent_socket(config: &LaunchConfig, run_dir: &Path) -> Result<Option<PathBuf>, LaunchError> {
    match config
        .devices
        .iter()
        .filter(|d| matches!(d, Device::GuestAgent))
        .count()
    {
        0 => Ok(None),
        1 => socket_path(run_dir.join("qga.sock")).map(Some),
        _ => Err(config_error(
            "devices",
            "more than one guest-agent device, but a guest has one agent",
        )),
    }
}

fn config_error(field: &'static str, reason: &str) -> LaunchError {
    LaunchError::Config {
        field,
        reason: reason.to_owned(),
    }
}

fn mismatch(what: &str) -> LaunchError {
    LaunchError::PathMismatch(what.to_owned())
}

/// Checks a free-form config word: ASCII letters, digits, `-_.`, and with `features` also
/// `+=,` (CPU feature lists such as `max,-la57`).
fn checked_word<'a>(
    field: &'static str,
    value: &'a str,
    features: bool,
) -> Result<&'a str, LaunchError> {
    let ok = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(c, '-' | '_' | '.')
            || (features && matches!(c, '+' | '=' | ','))
    };
    if value.is_empty() {
        return Err(config_error(field, "is empty"));
    }
    match value.chars().find(|&c| !ok(c)) {
        None => Ok(value),
        Some(c) => Err(LaunchError::Config {
            field,
            reason: format!("{value:?} contains {c:?}"),
        }),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, LaunchError> {
    std::path::absolute(path).map_err(|e| LaunchError::Absolute(path.to_owned(), e))
}

fn socket_path(path: PathBuf) -> Result<PathBuf, LaunchError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(LaunchError::SocketPathTooLong { path, len });
    }
    Ok(path)
}

fn existing_file(what: &'static str, path: &Path) -> Result<PathBuf, LaunchError> {
    let path = absolute(path)?;
    let meta = std::fs::metadata(&path).map_err(|source| LaunchError::Inspect {
        what,
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(LaunchError::NotAFile { what, path });
    }
    Ok(path)
}

fn check_memory_image(path: &Path, expected: u64, mode: MemoryMode) -> Result<(), LaunchError> {
    const WHAT: &str = "memory image";
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound && mode == MemoryMode::Capture => {
            return Ok(());
        }
        Err(source) => {
            return Err(LaunchError::Inspect {
                what: WHAT,
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(LaunchError::NotAFile {
            what: WHAT,
            path: path.to_owned(),
        });
    }
    let actual = meta.len();
    let empty_ok = mode == MemoryMode::Capture && actual == 0;
    if actual != expected && !empty_ok {
        return Err(LaunchError::MemorySize {
            path: path.to_owned(),
            actual,
            expected,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn qemu_args_every_vm_runs_under_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let memory = dir.path().join("memory.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::fs::File::create(&memory)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let config = LaunchConfig {
            memory_mb: 16,
            ..LaunchConfig::default()
        };
        let paths = VmPaths {
            disk,
            memory,
            kernel: None,
            initrd: None,
            cloud_init: None,
            run_dir: dir.path().join("run"),
        };
        for (memory, incoming) in [(MemoryMode::Capture, false), (MemoryMode::Resume, true)] {
            let options = LaunchOptions {
                memory,
                incoming,
                hostfwd: Vec::new(),
                network: GuestNetwork::Isolated,
                accel: Accel::Tcg,
                vnc: None,
            };
            let args = QemuArgs::new(&config, &paths, &options).unwrap();
            let a: Vec<&std::ffi::OsStr> = args.args().iter().map(|a| a.as_os_str()).collect();
            let at = a
                .iter()
                .position(|x| *x == "-sandbox")
                .expect("no -sandbox");
            assert_eq!(a[at + 1], SANDBOX);
            assert_eq!(a.iter().filter(|x| **x == "-sandbox").count(), 1);
        }
    }

    /// A config with a seed and the runtime paths for it (files in `dir`).
    fn seeded(dir: &Path) -> (LaunchConfig, VmPaths) {
        let (disk, memory, seed) = (
            dir.join("disk.img"),
            dir.join("memory.img"),
            dir.join("seed,1.img"),
        );
        std::fs::write(&disk, vec![0; 4096]).unwrap();
        std::fs::write(&seed, vec![0; 4096]).unwrap();
        std::fs::File::create(&memory)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let config = LaunchConfig {
            memory_mb: 16,
            devices: vec![
                Device::VirtioBlk { discard: true },
                Device::VirtioNet,
                Device::CloudInitSeed,
            ],
            cloud_init: Some("cloud-init-seed.img".into()),
            ..LaunchConfig::default()
        };
        let paths = VmPaths {
            disk,
            memory,
            kernel: None,
            initrd: None,
            cloud_init: Some(seed),
            run_dir: dir.join("run"),
        };
        (config, paths)
    }

    fn resume_options() -> LaunchOptions {
        LaunchOptions {
            memory: MemoryMode::Resume,
            incoming: true,
            hostfwd: Vec::new(),
            network: GuestNetwork::Isolated,
            accel: Accel::Tcg,
            vnc: None,
        }
    }

    #[test]
    fn qemu_args_cloud_init_seed_is_a_read_only_virtio_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (config, paths) = seeded(dir.path());

        let args = QemuArgs::new(&config, &paths, &resume_options()).unwrap();

        let a: Vec<String> = args
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let drive = format!(
            "file={},format=raw,if=none,id=seed0,readonly=on",
            dir.path().join("seed,,1.img").display()
        );
        assert!(a.contains(&drive), "{a:?}");
        assert!(
            a.contains(&"virtio-blk-pci,drive=seed0".to_owned()),
            "{a:?}"
        );
    }

    #[test]
    fn qemu_args_network_is_restricted_unless_passt_is_given_then_qemu_forwards_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (config, paths) = seeded(dir.path());
        let strings = |o: &LaunchOptions| -> Vec<String> {
            QemuArgs::new(&config, &paths, o)
                .unwrap()
                .args()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let mut options = resume_options();
        options.hostfwd = vec![HostFwd::localhost(8080, 80)];

        let isolated = strings(&options);
        options.network = GuestNetwork::Passt(dir.path().join("run,x/passt.sock"));
        let passt = strings(&options);

        assert!(
            isolated.contains(&"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80".into()),
            "{isolated:?}"
        );
        let stream = format!(
            "stream,id=net0,server=off,addr.type=unix,addr.path={}",
            dir.path().join("run,,x/passt.sock").display()
        );
        assert!(passt.contains(&stream), "{passt:?}");
        assert!(!passt.iter().any(|a| a.contains("hostfwd")), "{passt:?}");
        // slirp's saved state (of a VM captured on user networking) has a restricted,
        // unattached instance to load into.
        assert!(
            passt.contains(&"user,id=slirp-state0,restrict=on".into()),
            "{passt:?}"
        );
    }

    #[test]
    fn qemu_args_jail_holds_run_folder_images_rw_and_seed_ro() {
        let dir = tempfile::tempdir().unwrap();
        let (config, paths) = seeded(dir.path());

        let args = QemuArgs::new(&config, &paths, &resume_options()).unwrap();

        let jail = args.jail();
        assert_eq!(
            jail.read_write,
            [
                dir.path().join("run"),
                paths.disk.clone(),
                paths.memory.clone()
            ]
        );
        assert_eq!(jail.read_only, [dir.path().join("seed,1.img")]);
    }

    #[test]
    fn qemu_args_jail_in_capture_mode_without_memory_image_holds_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut paths) = seeded(dir.path());
        paths.memory = dir.path().join("new").join("memory.img");
        let options = LaunchOptions {
            memory: MemoryMode::Capture,
            incoming: false,
            ..resume_options()
        };

        let args = QemuArgs::new(&config, &paths, &options).unwrap();

        assert_eq!(args.jail().read_write[2], dir.path().join("new"));
    }

    #[test]
    fn domain_launch_cloud_init_seed_keeps_its_direct_qemu_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (config, paths) = seeded(dir.path());

        let l = DomainLaunch::new(&config, &paths, &resume_options()).unwrap();

        let a: Vec<String> = l
            .qemu_args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            a.contains(&"virtio-blk-pci,drive=seed0,bus=pcie.0,addr=0x3".to_owned()),
            "{a:?}"
        );
    }

    #[test]
    fn qemu_args_seed_device_without_its_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (config, mut paths) = seeded(dir.path());
        paths.cloud_init = None;

        let err = QemuArgs::new(&config, &paths, &resume_options()).unwrap_err();

        assert!(matches!(err, LaunchError::PathMismatch(_)), "{err}");
    }

    #[test]
    fn qemu_args_seed_file_without_its_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, paths) = seeded(dir.path());
        config.devices.pop();

        let err = QemuArgs::new(&config, &paths, &resume_options()).unwrap_err();

        assert!(
            matches!(
                err,
                LaunchError::Config {
                    field: "cloud_init",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn hostfwd_from_str_qemu_and_short_forms() {
        let h: HostFwd = "tcp:127.0.0.1:8080-:80".parse().unwrap();
        assert_eq!(
            (h.host_addr.to_string(), h.host_port, h.guest_port),
            ("127.0.0.1".into(), 8080, 80)
        );
        let h: HostFwd = "tcp::9000-:22".parse().unwrap();
        assert_eq!(
            (h.host_addr.to_string(), h.host_port, h.guest_port),
            ("127.0.0.1".into(), 9000, 22)
        );
        let h: HostFwd = "8081:8080".parse().unwrap();
        assert_eq!((h.host_port, h.guest_port), (8081, 8080));
    }

    #[test]
    fn hostfwd_from_str_garbage_is_refused() {
        for bad in [
            "",
            "tcp:1.2.3.4:80",
            "udp:1:2-:3",
            "80",
            "a:b",
            "tcp:host:80-:22",
            "70000:80",
        ] {
            assert!(bad.parse::<HostFwd>().is_err(), "{bad}");
        }
    }
    use super::*;

    const PVM_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor\n";
    const VMX_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme vmx pse\n";

    #[test]
    fn decide_accel_pvm_without_vmx_picks_tcg() {
        let (accel, _) = decide_accel(None, true, PVM_CPUINFO, || true).unwrap();
        assert_eq!(accel, Accel::Tcg);
    }

    #[test]
    fn decide_accel_pvm_with_vmx_and_writable_kvm_picks_kvm() {
        let (accel, _) = decide_accel(None, true, VMX_CPUINFO, || true).unwrap();
        assert_eq!(accel, Accel::Kvm);
    }

    #[test]
    fn decide_accel_unwritable_dev_kvm_picks_tcg() {
        let (accel, _) = decide_accel(None, false, VMX_CPUINFO, || false).unwrap();
        assert_eq!(accel, Accel::Tcg);
    }

    #[test]
    fn decide_accel_env_override_wins() {
        let (accel, _) = decide_accel(Some("kvm"), true, PVM_CPUINFO, || false).unwrap();
        assert_eq!(accel, Accel::Kvm);
    }

    #[test]
    fn decide_accel_bad_env_is_refused() {
        let err = decide_accel(Some("hvf"), false, "", || true).unwrap_err();
        assert!(matches!(err, LaunchError::AccelEnv(v) if v == "hvf"));
    }

    #[test]
    fn checked_word_machine_with_comma_is_refused() {
        let err = checked_word("machine", "q35,accel=kvm", false).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::Config {
                field: "machine",
                ..
            }
        ));
    }

    #[test]
    fn checked_word_cpu_features_are_accepted() {
        assert_eq!(checked_word("cpu", "max,-la57", true).unwrap(), "max,-la57");
    }
}
