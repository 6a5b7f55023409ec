//! Commands that run real VMs on stock QEMU: `base` (boot and capture a base VM), and the
//! shared pieces the overlay and synthesis commands use (signals, waiting, run folders).

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synth::base::{Device, LaunchConfig};
use synth::registry::{AddBase, Registry};
use synth::vm::{Accel, LaunchOptions, MemoryMode, QemuArgs, Vm, VmError, VmPaths};

/// Set by SIGINT/SIGTERM: long waits poll it and give up cleanly, so that drops run (QEMU is
/// killed, FUSE unmounted, temporary files removed) instead of the process dying mid-step.
pub fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing signal handler")?;
    }
    Ok(flag)
}

/// Error returned when a wait was interrupted by a signal.
#[derive(Debug, thiserror::Error)]
#[error("Interrupted")]
pub struct Interrupted;

/// Waits for `marker` on the VM's serial console, up to `timeout`, giving up on a signal.
pub fn wait_marker(
    vm: &mut Vm,
    marker: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        match vm.wait_ready_marker(marker, Duration::from_millis(250)) {
            Ok(t) => return Ok(t),
            Err(VmError::Timeout { .. }) if Instant::now() < deadline => {
                if stop.load(Ordering::Relaxed) {
                    bail!(Interrupted);
                }
            }
            Err(e) => return Err(e).with_context(|| format!("waiting for {marker:?}")),
        }
    }
}

/// Waits for the user to press Enter on the terminal, giving up on a signal.
pub fn wait_enter(prompt: &str, stop: &AtomicBool) -> Result<()> {
    eprintln!("{prompt}");
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(std::io::stdin().read_line(&mut line).map(|n| n > 0));
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Ok(true)) => return Ok(()),
            Ok(_) => bail!("standard input closed; use --ready MARKER for unattended runs"),
            Err(_) if stop.load(Ordering::Relaxed) => bail!(Interrupted),
            Err(_) => {}
        }
    }
}

/// A scratch folder under the registry (same filesystem, so files can be moved into a base),
/// removed on drop.
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// Creates `$home/tmp/<what>-<pid>-<n>`.
    pub fn new(home: &Path, what: &str) -> Result<Self> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = home
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(RunDir(dir))
    }

    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("CLOUDLET_KEEP_RUN_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What `cloudlet base` is asked to do.
pub struct BaseRequest {
    pub disk: PathBuf,
    pub memory_mb: u64,
    pub vcpus: u32,
    pub machine: String,
    pub cpu: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub ready: Option<String>,
    pub timeout: Duration,
    pub vnc: Option<String>,
    pub balloon: bool,
    pub name: Option<String>,
    pub extra_args: Vec<String>,
}

/// Boots `req.disk` headless, waits until it is ready, captures memory and device state, and
/// registers the result as a base. Returns the base id.
pub fn make_base(home: &Path, threads: usize, req: BaseRequest) -> Result<synth::registry::Base> {
    let stop = interrupt_flag()?;
    let registry = Registry::open(home)?;
    let run = RunDir::new(home, "base")?;
    let disk = run.join("disk.img");
    eprintln!("copying {} …", req.disk.display());
    std::fs::copy(&req.disk, &disk).with_context(|| format!("copying {}", req.disk.display()))?;
    let memory = run.join("memory.img");
    let mut devices = vec![Device::VirtioBlk { discard: true }, Device::VirtioNet];
    if req.balloon {
        devices.push(Device::VirtioBalloon {
            free_page_reporting: true,
        });
    }
    let config = LaunchConfig {
        machine: req.machine,
        cpu: req.cpu,
        memory_mb: req.memory_mb,
        vcpus: req.vcpus,
        devices,
        kernel: req.kernel.as_ref().map(|p| p.display().to_string()),
        initrd: req.initrd.as_ref().map(|p| p.display().to_string()),
        append: req.append,
        extra_args: req.extra_args,
    };
    let paths = VmPaths {
        disk: disk.clone(),
        memory: memory.clone(),
        kernel: req.kernel.clone(),
        initrd: req.initrd.clone(),
        run_dir: run.join("run"),
    };
    let options = LaunchOptions {
        memory: MemoryMode::Capture,
        incoming: false,
        hostfwd: Vec::new(),
        accel: Accel::detect()?,
        vnc: req.vnc.clone(),
    };
    let args = QemuArgs::new(&config, &paths, &options)?;
    let mut vm = Vm::spawn(&args)?;
    eprintln!(
        "booting (serial console log: {})",
        args.serial_log().display()
    );
    match &req.ready {
        Some(marker) => {
            let t = wait_marker(&mut vm, marker, req.timeout, &stop)?;
            eprintln!("guest ready after {:.1}s", t.as_secs_f64());
        }
        None => {
            let how = match &req.vnc {
                Some(addr) => format!("on VNC display {addr}"),
                None => format!("(serial console log: {})", args.serial_log().display()),
            };
            wait_enter(
                &format!("Prepare the guest {how}, then press Enter to capture it."),
                &stop,
            )?;
        }
    }
    let ds = run.join("device-state");
    let t = vm.save_device_state(&ds)?;
    vm.quit()?;
    eprintln!("captured device state in {:.0} ms", t.as_secs_f64() * 1e3);
    let add = AddBase {
        disk,
        memory,
        device_state: Some(ds),
        config: Some(config),
        name: req.name.or_else(|| {
            req.disk
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        }),
        link: false,
        adopt: true,
        threads,
    };
    let total = std::fs::metadata(&add.disk).map(|m| m.len()).unwrap_or(0) + (req.memory_mb << 20);
    let base = crate::progress::run("indexing", total, |p| registry.add(&add, p))?;
    Ok(base)
}
