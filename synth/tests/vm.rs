//! Tests of `synth::vm`: argument building (no QEMU needed) and, against the real test guest
//! from `tools/guest/build-guest.sh`, boot, serial commands, capture and resume.
//!
//! Tests that start QEMU hold `QEMU_LOCK`, so only one QEMU runs at a time. Without a QEMU
//! binary they print a note and pass, unless `CI=true`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use synth::base::{Device, LaunchConfig};
use synth::vm::{
    free_tcp_port, qemu_binary, Accel, HostFwd, LaunchError, LaunchOptions, MemoryMode, QemuArgs,
    Vm, VmError, VmPaths, READY_MARKER,
};

const MIB: u64 = 1 << 20;
const GUEST_RAM_MB: u64 = 256;
const GUEST_HTTP_PORT: u16 = 8080;
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

static QEMU_LOCK: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------ helpers

/// The lock for tests that start QEMU, or `None` (test skipped) when QEMU is missing.
fn qemu_lock() -> Option<MutexGuard<'static, ()>> {
    if let Err(e) = qemu_binary() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "QEMU is required when CI=true: {e}"
        );
        eprintln!("skipping: {e}");
        return None;
    }
    Some(QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

struct Guest {
    dir: PathBuf,
    cmdline: String,
}

/// The built test guest; built (or fetched from its cache) by build-guest.sh if missing.
fn guest() -> Guest {
    let dir = std::env::var_os("CLOUDLET_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/cloudlet-guest")
        });
    if !dir.join("guest.json").is_file() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/guest/build-guest.sh");
        eprintln!("building the test guest with {script}");
        let status = std::process::Command::new(script)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "{script} failed: {status}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("guest.json")).unwrap()).unwrap();
    Guest {
        cmdline: json["cmdline"].as_str().unwrap().to_owned(),
        dir,
    }
}

fn guest_config(cmdline: &str) -> LaunchConfig {
    LaunchConfig {
        machine: "q35".into(),
        cpu: "max".into(),
        memory_mb: GUEST_RAM_MB,
        vcpus: 1,
        devices: vec![
            Device::VirtioBlk { discard: true },
            Device::VirtioNet,
            Device::VirtioBalloon {
                free_page_reporting: true,
            },
        ],
        kernel: Some("vmlinuz".into()),
        initrd: Some("initrd.img".into()),
        append: Some(cmdline.into()),
        extra_args: Vec::new(),
    }
}

fn guest_paths(guest: &Guest, disk: &Path, memory: &Path, run_dir: &Path) -> VmPaths {
    VmPaths {
        disk: disk.into(),
        memory: memory.into(),
        kernel: Some(guest.dir.join("vmlinuz")),
        initrd: Some(guest.dir.join("initrd.img")),
        run_dir: run_dir.into(),
    }
}

fn options(memory: MemoryMode, incoming: bool, port: u16) -> LaunchOptions {
    LaunchOptions {
        vnc: None,
        memory,
        incoming,
        hostfwd: vec![HostFwd::localhost(port, GUEST_HTTP_PORT)],
        accel: Accel::detect().unwrap(),
    }
}

/// Copies `src` to `dst`, leaving all-zero MiB blocks as holes.
fn sparse_copy(src: &Path, dst: &Path) {
    let mut input = File::open(src).unwrap();
    let mut output = File::create(dst).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            output.seek(SeekFrom::Start(pos)).unwrap();
            output.write_all(&buf[..n]).unwrap();
        }
        pos += u64::try_from(n).unwrap();
    }
    output.set_len(pos).unwrap();
}

/// GET `path` from 127.0.0.1:`port`, retried until a 200 reply or the timeout; returns the body.
fn http_get(port: u16, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match try_http_get(port, path) {
            Ok(body) => return body,
            Err(e) if Instant::now() < deadline => {
                eprintln!("GET {path}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("GET {path} on port {port} failed: {e}"),
        }
    }
}

fn try_http_get(port: u16, path: &str) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {reply:?}"))?;
    if !head.starts_with("HTTP/1.") || !head.lines().next().unwrap_or("").contains(" 200") {
        return Err(format!("not 200: {head:?}"));
    }
    Ok(body.to_owned())
}

/// `count=N uptime=S boot_id=ID` → (N, ID).
fn parse_counter(body: &str) -> (u64, String) {
    let field = |name: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {body:?}"))
            .to_owned()
    };
    (field("count=").parse().unwrap(), field("boot_id="))
}

fn arg_strings(args: &QemuArgs) -> Vec<String> {
    args.args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// The value following `flag` (first occurrence).
fn arg_after(args: &[String], flag: &str) -> String {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1].clone()
}

/// A folder with a disk, an exact-size memory image and empty kernel/initrd files.
struct Fixture {
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(subdir: &str) -> (Fixture, VmPaths) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(subdir);
        std::fs::create_dir_all(&base).unwrap();
        let paths = VmPaths {
            disk: base.join("disk.img"),
            memory: base.join("ram.bin"),
            kernel: Some(base.join("vmlinuz")),
            initrd: Some(base.join("initrd.img")),
            run_dir: base.join("run"),
        };
        File::create(&paths.disk).unwrap().set_len(MIB).unwrap();
        File::create(&paths.memory)
            .unwrap()
            .set_len(GUEST_RAM_MB * MIB)
            .unwrap();
        File::create(paths.kernel.as_ref().unwrap()).unwrap();
        File::create(paths.initrd.as_ref().unwrap()).unwrap();
        (Fixture { _dir: dir }, paths)
    }
}

fn plain_options(memory: MemoryMode) -> LaunchOptions {
    LaunchOptions {
        vnc: None,
        memory,
        incoming: false,
        hostfwd: vec![],
        accel: Accel::Tcg,
    }
}

// ------------------------------------------------------------------ argument building

#[test]
fn qemu_args_path_with_comma_is_escaped() {
    let (_f, paths) = Fixture::new("a,b");
    let args = QemuArgs::new(
        &guest_config("console=ttyS0"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let a = arg_strings(&args);
    let base = paths
        .disk
        .parent()
        .unwrap()
        .to_string_lossy()
        .replace(',', ",,");
    assert_eq!(
        arg_after(&a, "-object"),
        format!("memory-backend-file,id=mem,size=256M,mem-path={base}/ram.bin,share=on")
    );
    assert_eq!(
        arg_after(&a, "-drive"),
        format!("file={base}/disk.img,format=raw,if=none,id=disk0,discard=unmap,cache=writeback")
    );
    assert_eq!(
        arg_after(&a, "-chardev"),
        format!(
            "socket,id=ser0,path={base}/run/serial.sock,server=on,wait=off,\
             logfile={base}/run/serial.log"
        )
    );
}

#[test]
fn qemu_args_unescaped_paths_are_kept_for_the_caller() {
    let (_f, paths) = Fixture::new("a,b");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    assert_eq!(args.qmp_socket(), paths.run_dir.join("qmp.sock"));
    assert_eq!(args.serial_log(), paths.run_dir.join("serial.log"));
}

#[test]
fn qemu_args_capture_and_resume_differ_only_in_memory_mode_and_incoming() {
    let (_f, paths) = Fixture::new("x");
    let config = guest_config("console=ttyS0");
    let capture =
        arg_strings(&QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap());
    let mut opts = plain_options(MemoryMode::Resume);
    opts.incoming = true;
    let resume = arg_strings(&QemuArgs::new(&config, &paths, &opts).unwrap());
    let differing: Vec<(&String, &String)> = capture
        .iter()
        .zip(&resume)
        .filter(|(c, r)| c != r)
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert!(differing[0].1.ends_with(",share=off,readonly=on,rom=off"));
    assert_eq!(&resume[capture.len()..], ["-incoming", "defer"]);
}

#[test]
fn qemu_args_hostfwd_goes_on_the_first_netdev() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.devices.push(Device::VirtioNet);
    let mut opts = plain_options(MemoryMode::Capture);
    opts.hostfwd = vec![
        HostFwd::localhost(10022, 22),
        HostFwd::localhost(18080, 8080),
    ];
    let a = arg_strings(&QemuArgs::new(&config, &paths, &opts).unwrap());
    let netdevs: Vec<&String> = a
        .iter()
        .zip(a.iter().skip(1))
        .filter(|(flag, _)| *flag == "-netdev")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        netdevs,
        [
            "user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22,hostfwd=tcp:127.0.0.1:18080-:8080",
            "user,id=net1"
        ]
    );
}

#[test]
fn qemu_args_hostfwd_without_netdev_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.devices = vec![Device::VirtioBlk { discard: false }];
    let mut opts = plain_options(MemoryMode::Capture);
    opts.hostfwd = vec![HostFwd::localhost(10022, 22)];
    let err = QemuArgs::new(&config, &paths, &opts).unwrap_err();
    assert!(matches!(err, LaunchError::PathMismatch(_)), "{err:?}");
}

#[test]
fn qemu_args_hostfwd_port_zero_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut opts = plain_options(MemoryMode::Capture);
    opts.hostfwd = vec![HostFwd::localhost(0, 22)];
    let err = QemuArgs::new(&guest_config("x"), &paths, &opts).unwrap_err();
    assert!(matches!(err, LaunchError::HostFwd(..)), "{err:?}");
}

#[test]
fn qemu_args_resume_memory_size_mismatch_is_refused() {
    let (_f, paths) = Fixture::new("x");
    File::create(&paths.memory)
        .unwrap()
        .set_len(GUEST_RAM_MB * MIB - 4096)
        .unwrap();
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Resume),
    )
    .unwrap_err();
    assert!(
        matches!(err, LaunchError::MemorySize { actual, expected, .. }
            if actual == GUEST_RAM_MB * MIB - 4096 && expected == GUEST_RAM_MB * MIB),
        "{err:?}"
    );
}

#[test]
fn qemu_args_capture_memory_size_mismatch_is_refused() {
    let (_f, paths) = Fixture::new("x");
    File::create(&paths.memory)
        .unwrap()
        .set_len(GUEST_RAM_MB * MIB * 2)
        .unwrap();
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap_err();
    assert!(matches!(err, LaunchError::MemorySize { .. }), "{err:?}");
}

#[test]
fn qemu_args_resume_missing_memory_image_is_refused() {
    let (_f, paths) = Fixture::new("x");
    std::fs::remove_file(&paths.memory).unwrap();
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Resume),
    )
    .unwrap_err();
    assert!(matches!(err, LaunchError::Inspect { .. }), "{err:?}");
}

#[test]
fn qemu_args_capture_missing_memory_image_is_accepted() {
    let (_f, paths) = Fixture::new("x");
    std::fs::remove_file(&paths.memory).unwrap();
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    );
    assert!(args.is_ok(), "{args:?}");
}

#[test]
fn qemu_args_long_run_dir_is_refused() {
    let (_f, mut paths) = Fixture::new("x");
    paths.run_dir = paths.run_dir.join("r".repeat(100));
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap_err();
    assert!(
        matches!(err, LaunchError::SocketPathTooLong { .. }),
        "{err:?}"
    );
}

#[test]
fn qemu_args_kernel_named_without_path_is_refused() {
    let (_f, mut paths) = Fixture::new("x");
    paths.kernel = None;
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap_err();
    assert!(matches!(err, LaunchError::PathMismatch(_)), "{err:?}");
}

#[test]
fn qemu_args_machine_with_options_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.machine = "q35,accel=kvm".into();
    let err = QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::Config {
                field: "machine",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn qemu_args_zero_memory_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.memory_mb = 0;
    let err = QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::Config {
                field: "memory_mb",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn escape_option_value_doubles_commas() {
    let escaped = synth::vm::escape_option_value(&OsString::from("/a,b,,c"));
    assert_eq!(escaped, OsString::from("/a,,b,,,,c"));
}

#[test]
fn vm_spawn_missing_binary_fails_with_spawn_error() {
    let (_f, paths) = Fixture::new("x");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let err = Vm::spawn_with(Path::new("/nonexistent/qemu-system-x86_64"), &args).unwrap_err();
    assert!(matches!(err, VmError::Spawn { .. }), "{err:?}");
}

// ------------------------------------------------------------------ real QEMU

#[test]
fn vm_qemu_exiting_early_reports_its_output() {
    let Some(_lock) = qemu_lock() else { return };
    // The fixture's kernel is an empty file: QEMU refuses it and exits at once.
    let (_f, paths) = Fixture::new("x");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let err = Vm::spawn(&args).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmError::Exited { .. }), "{err:?}");
    assert!(msg.contains("could not load kernel"), "{msg}");
}

#[test]
fn vm_boot_serves_http_and_runs_serial_commands() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest();
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    sparse_copy(&guest.dir.join("disk.img"), &disk);
    let port = free_tcp_port().unwrap();
    let paths = guest_paths(
        &guest,
        &disk,
        &tmp.path().join("ram.bin"),
        &tmp.path().join("run"),
    );
    let args = QemuArgs::new(
        &guest_config(&guest.cmdline),
        &paths,
        &options(MemoryMode::Capture, false, port),
    )
    .unwrap();

    let mut vm = Vm::spawn(&args).unwrap();
    let ready = vm.wait_ready_marker(READY_MARKER, BOOT_TIMEOUT).unwrap();
    let (count, _) = parse_counter(&http_get(port, "/cgi-bin/counter", Duration::from_secs(10)));
    let wrote = vm
        .run_serial_command("echo hello > /root/probe && cat /root/probe", CMD_TIMEOUT)
        .unwrap();
    let failed = vm.run_serial_command("exit 3", CMD_TIMEOUT).unwrap();
    vm.quit().unwrap();

    eprintln!("boot to ready: {ready:?}");
    assert_eq!(count, 1);
    assert_eq!(wrote.rc, 0);
    assert!(wrote.output.contains("hello"), "{:?}", wrote.output);
    assert_eq!(failed.rc, 3);
}

/// A guest booted and captured: RAM in `ram`, device state in `devstate`.
struct Captured {
    guest: Guest,
    config: LaunchConfig,
    work: PathBuf,
    disk: PathBuf,
    ram: PathBuf,
    devstate: PathBuf,
    port: u16,
    /// Counter value and boot id read just before the capture.
    count: u64,
    boot_id: String,
}

/// Boots the guest with RAM shared with `work/ram.bin`, reads the counter twice, saves the
/// device state and quits. Every path has a comma, so QEMU sees escaped option values.
fn boot_and_capture(tmp: &Path) -> Captured {
    let guest = guest();
    let work = tmp.join("w,1");
    std::fs::create_dir(&work).unwrap();
    let disk = work.join("disk.img");
    sparse_copy(&guest.dir.join("disk.img"), &disk);
    let ram = work.join("ram.bin");
    let devstate = work.join("dev,state");
    let config = guest_config(&guest.cmdline);
    let port = free_tcp_port().unwrap();
    let paths = guest_paths(&guest, &disk, &ram, &work.join("run-a"));
    let args = QemuArgs::new(&config, &paths, &options(MemoryMode::Capture, false, port)).unwrap();

    let mut vm = Vm::spawn(&args).unwrap();
    vm.wait_ready_marker(READY_MARKER, BOOT_TIMEOUT).unwrap();
    http_get(port, "/cgi-bin/counter", Duration::from_secs(10));
    let (count, boot_id) =
        parse_counter(&http_get(port, "/cgi-bin/counter", Duration::from_secs(10)));
    vm.save_device_state(&devstate).unwrap();
    let timings = vm.timings();
    vm.quit().unwrap();
    eprintln!(
        "capture: {timings:?}; device state {} bytes",
        std::fs::metadata(&devstate).unwrap().len()
    );
    Captured {
        guest,
        config,
        work,
        disk,
        ram,
        devstate,
        port,
        count,
        boot_id,
    }
}

#[test]
fn vm_capture_then_resume_from_ram_copy_continues_counter() {
    let Some(_lock) = qemu_lock() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let c = boot_and_capture(tmp.path());
    let ram_copy = c.work.join("ram-copy.bin");
    sparse_copy(&c.ram, &ram_copy);
    let paths = guest_paths(&c.guest, &c.disk, &ram_copy, &c.work.join("run-b"));
    let args = QemuArgs::new(
        &c.config,
        &paths,
        &options(MemoryMode::Resume, true, c.port),
    )
    .unwrap();

    let t_spawn = Instant::now();
    let mut vm = Vm::spawn(&args).unwrap();
    let resume = vm.resume_from(&c.devstate).unwrap();
    let (after, boot_after) = parse_counter(&http_get(
        c.port,
        "/cgi-bin/counter",
        Duration::from_secs(10),
    ));
    let first_http = t_spawn.elapsed();
    let alive = vm
        .run_serial_command("cat /run/counter", CMD_TIMEOUT)
        .unwrap();
    vm.quit().unwrap();

    eprintln!("resume {resume:?}; spawn to first HTTP reply {first_http:?}");
    assert_eq!(std::fs::metadata(&c.ram).unwrap().len(), GUEST_RAM_MB * MIB);
    assert!(after > c.count, "counter went from {} to {after}", c.count);
    assert_eq!(boot_after, c.boot_id, "the guest rebooted");
    assert_eq!(alive.rc, 0);
    assert_eq!(alive.output.trim(), after.to_string());
}

#[test]
fn vm_resume_into_writable_copy_can_be_captured_again() {
    let Some(_lock) = qemu_lock() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let c = boot_and_capture(tmp.path());
    // Resume with RAM shared with a writable copy (the `cloudlet overlay` flow), change guest
    // RAM, capture again, then resume the second capture read-only.
    let ram2 = c.work.join("ram2.bin");
    sparse_copy(&c.ram, &ram2);
    let devstate2 = c.work.join("devstate2");
    let paths_b = guest_paths(&c.guest, &c.disk, &ram2, &c.work.join("run-b"));
    let args_b = QemuArgs::new(
        &c.config,
        &paths_b,
        &options(MemoryMode::Capture, true, c.port),
    )
    .unwrap();
    let mut b = Vm::spawn(&args_b).unwrap();
    b.resume_from(&c.devstate).unwrap();
    let marked = b
        .run_serial_command("echo custom > /run/marker", CMD_TIMEOUT)
        .unwrap();
    let (mid, _) = parse_counter(&http_get(
        c.port,
        "/cgi-bin/counter",
        Duration::from_secs(10),
    ));
    b.save_device_state(&devstate2).unwrap();
    b.quit().unwrap();

    let paths_c = guest_paths(&c.guest, &c.disk, &ram2, &c.work.join("run-c"));
    let args_c = QemuArgs::new(
        &c.config,
        &paths_c,
        &options(MemoryMode::Resume, true, c.port),
    )
    .unwrap();
    let mut vm = Vm::spawn(&args_c).unwrap();
    vm.resume_from(&devstate2).unwrap();
    let (after, boot_after) = parse_counter(&http_get(
        c.port,
        "/cgi-bin/counter",
        Duration::from_secs(10),
    ));
    let marker = vm
        .run_serial_command("cat /run/marker", CMD_TIMEOUT)
        .unwrap();
    vm.quit().unwrap();

    assert_eq!(marked.rc, 0);
    assert!(
        mid > c.count && after > mid,
        "{} -> {mid} -> {after}",
        c.count
    );
    assert_eq!(boot_after, c.boot_id, "the guest rebooted");
    assert_eq!(marker.output.trim(), "custom");
}
