//! `synth::vm` against the real test guest (`tools/guest/build-guest.sh`): boot, the serial
//! shell and the guest agent, capture and resume (direct QEMU and libvirt). The argument
//! building and the shell and agent protocols without a guest are tested in `synth/tests/vm.rs`.
//! One QEMU at a time: every test here holds [`cloudlet_e2e::vm_lock`].

use cloudlet_e2e::{
    answer_once, guest, host_lan_address, http_get, parse_counter, require_qemu, sparse_copy,
    vm_lock, Guest,
};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};
use synth::base::{Device, LaunchConfig};
use synth::vm::{
    free_tcp_port, Accel, GuestNetwork, HostFwd, LaunchOptions, MemoryMode, QemuArgs, ShellError,
    Vm, VmError, VmPaths, READY_MARKER,
};

const MIB: u64 = 1 << 20;
const GUEST_RAM_MB: u64 = 256;
const GUEST_DISK_MB: u64 = 256;
const GUEST_HTTP_PORT: u16 = 8080;
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// The VM lock, or `None` (test skipped) when QEMU is missing.
fn qemu_lock() -> Option<MutexGuard<'static, ()>> {
    require_qemu().then(vm_lock)
}

/// The test guest's launch config: direct kernel boot, and a balloon with free page reporting
/// besides the default virtio disk (with discard) and network.
fn guest_config(cmdline: &str) -> LaunchConfig {
    let mut c = LaunchConfig {
        cpu: "max".into(),
        memory_mb: GUEST_RAM_MB,
        kernel: Some("vmlinuz".into()),
        initrd: Some("initrd.img".into()),
        append: Some(cmdline.into()),
        ..LaunchConfig::default()
    };
    c.devices.push(Device::VirtioBalloon {
        free_page_reporting: true,
    });
    c
}

/// `guest_config` with the guest agent's channel added at the end.
fn agent_config(cmdline: &str) -> LaunchConfig {
    let mut c = guest_config(cmdline);
    c.devices.push(Device::GuestAgent);
    c
}

fn guest_paths(guest: &Guest, disk: &Path, memory: &Path, run_dir: &Path) -> VmPaths {
    VmPaths {
        disk: disk.into(),
        memory: memory.into(),
        kernel: Some(guest.dir.join("vmlinuz")),
        initrd: Some(guest.dir.join("initrd.img")),
        cloud_init: None,
        run_dir: run_dir.into(),
    }
}

fn options(memory: MemoryMode, incoming: bool, port: u16) -> LaunchOptions {
    LaunchOptions {
        vnc: None,
        memory,
        incoming,
        hostfwd: vec![HostFwd::localhost(port, GUEST_HTTP_PORT)],
        network: GuestNetwork::Isolated,
        accel: Accel::detect().unwrap(),
    }
}

/// Boots the test guest with `config` in `tmp`, waits for its ready marker.
fn boot(tmp: &Path, config: &LaunchConfig, guest: &Guest) -> (Vm, u16) {
    let disk = tmp.join("disk.img");
    sparse_copy(&guest.dir.join("disk.img"), &disk);
    let port = free_tcp_port().unwrap();
    let paths = guest_paths(guest, &disk, &tmp.join("ram.bin"), &tmp.join("run"));
    let args = QemuArgs::new(config, &paths, &options(MemoryMode::Capture, false, port)).unwrap();
    let mut vm = Vm::spawn(&args).unwrap();
    vm.wait_ready_marker(READY_MARKER, BOOT_TIMEOUT).unwrap();
    (vm, port)
}

#[test]
fn vm_boot_serves_http_and_runs_serial_commands() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (mut vm, port) = boot(tmp.path(), &guest_config(&guest.cmdline), &guest);
    let ready = t.elapsed();
    let (count, _) = parse_counter(&http_get(port, "/cgi-bin/counter", Duration::from_secs(10)));
    let wrote = vm
        .run_serial_command("echo hello > /root/probe && cat /root/probe", CMD_TIMEOUT)
        .unwrap();
    let failed = vm.run_serial_command("exit 3", CMD_TIMEOUT).unwrap();
    vm.quit().unwrap();

    eprintln!("boot to ready: {ready:?}");
    assert_eq!(count, 1);
    assert_eq!(wrote.rc, 0);
    assert_eq!(wrote.output, "hello\n");
    assert_eq!(failed.rc, 3);
}

#[test]
fn vm_guest_reaches_its_forwarded_port_but_not_the_host_loopback() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    // A service on the host's loopback only: what another session's forwarded port, the
    // server's admin side or any local daemon looks like from a guest.
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    host_service.set_nonblocking(true).unwrap();
    let (mut vm, port) = boot(tmp.path(), &guest_config(&guest.cmdline), &guest);

    let from_guest = vm
        .run_serial_command(
            &format!("timeout 5 wget -q -O - http://10.0.2.2:{host_port}/"),
            CMD_TIMEOUT,
        )
        .unwrap();
    let forwarded = http_get(port, "/cgi-bin/counter", Duration::from_secs(10));
    vm.quit().unwrap();

    assert_ne!(
        from_guest.rc, 0,
        "the guest reached the host: {from_guest:?}"
    );
    let reached = host_service.accept();
    assert!(
        matches!(&reached, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host service saw a connection from the guest: {reached:?}"
    );
    assert!(forwarded.contains("count="), "{forwarded}");
}

#[test]
fn vm_outbound_through_passt_reaches_the_lan_but_not_the_host_loopback() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    // passt never stays root: it binds its socket as `nobody`, in a folder of nobody's.
    let net_dir = tmp.path().join("net");
    std::fs::create_dir(&net_dir).unwrap();
    std::os::unix::fs::chown(&net_dir, Some(65534), Some(65534)).unwrap();
    let (lo, lan) = (
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::net::TcpListener::bind("0.0.0.0:0").unwrap(),
    );
    let (lo_port, lan_port) = (
        lo.local_addr().unwrap().port(),
        lan.local_addr().unwrap().port(),
    );
    lo.set_nonblocking(true).unwrap();
    let lan_answered = answer_once(lan);
    let lan_addr = host_lan_address();
    let port = free_tcp_port().unwrap();
    let fwd = [HostFwd::localhost(port, GUEST_HTTP_PORT)];
    let passt = synth::vm::Passt::start(&synth::vm::PasstOptions {
        socket: &net_dir.join("passt.sock"),
        hostfwd: &fwd,
        runas: Some((65534, 65534)),
        log: &tmp.path().join("passt.log"),
    })
    .unwrap();
    let disk = tmp.path().join("disk.img");
    sparse_copy(&guest.dir.join("disk.img"), &disk);
    let paths = guest_paths(
        &guest,
        &disk,
        &tmp.path().join("ram.bin"),
        &tmp.path().join("run"),
    );
    let options = LaunchOptions {
        network: GuestNetwork::Passt(passt.socket().into()),
        ..options(MemoryMode::Capture, false, port)
    };
    let args = QemuArgs::new(&guest_config(&guest.cmdline), &paths, &options).unwrap();
    let mut vm = Vm::spawn(&args).unwrap();
    vm.wait_ready_marker(READY_MARKER, BOOT_TIMEOUT).unwrap();

    let to_loopback = vm
        .run_serial_command(
            &format!("timeout 5 wget -q -O - http://10.0.2.2:{lo_port}/"),
            CMD_TIMEOUT,
        )
        .unwrap();
    let to_lan = vm
        .run_serial_command(
            &format!("timeout 10 wget -q -O - http://{lan_addr}:{lan_port}/"),
            CMD_TIMEOUT,
        )
        .unwrap();
    let forwarded = http_get(port, "/cgi-bin/counter", Duration::from_secs(10));
    vm.quit().unwrap();
    drop(passt);

    assert_eq!(to_lan.rc, 0, "the guest did not get out: {to_lan:?}");
    assert_eq!(to_lan.output, "lan-ok");
    assert!(lan_answered.join().unwrap());
    assert_ne!(
        to_loopback.rc, 0,
        "the guest reached 10.0.2.2: {to_loopback:?}"
    );
    let reached = lo.accept();
    assert!(
        matches!(&reached, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's loopback service saw a connection from the guest: {reached:?}"
    );
    assert!(forwarded.contains("count="), "{forwarded}");
}

#[test]
fn vm_serial_shell_passes_any_command_and_its_output_unchanged() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    let (mut vm, _) = boot(tmp.path(), &guest_config(&guest.cmdline), &guest);
    let t = Instant::now();
    vm.run_serial_command("true", CMD_TIMEOUT).unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    vm.run_serial_command("true", CMD_TIMEOUT).unwrap();
    let second = t.elapsed();
    let special = vm
        .run_serial_command(
            r#"echo "it's" 'a"b' '$HOME' 'back\slash' '100%' '#x' >&2; printf 'é\t€\n'"#,
            CMD_TIMEOUT,
        )
        .unwrap();
    let stdin = vm
        .run_serial_command("cat; echo after-cat", CMD_TIMEOUT)
        .unwrap();
    let long = vm
        .run_serial_command(
            &format!("x='{}'\necho ${{#x}}", "y".repeat(3000)),
            CMD_TIMEOUT,
        )
        .unwrap();
    let mut streamed = Vec::new();
    let counted = vm
        .run_serial_command_streaming("seq 1 2000 | wc -l; seq 1 3", CMD_TIMEOUT, &mut |b| {
            streamed.extend_from_slice(b)
        })
        .unwrap();
    vm.quit().unwrap();

    eprintln!("first command (with the sync) {first:?}, the next {second:?}");
    assert_eq!(
        special.output,
        "it's a\"b $HOME back\\slash 100% #x\né\t€\n"
    );
    assert_eq!(stdin.output, "after-cat\n");
    assert_eq!(long.output, "3000\n");
    assert_eq!(counted.output, "2000\n1\n2\n3\n");
    assert_eq!(streamed, counted.output.as_bytes());
}

#[test]
fn vm_serial_shell_timeout_interrupts_and_shell_answers_after() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    let (mut vm, _) = boot(tmp.path(), &guest_config(&guest.cmdline), &guest);
    let err = vm
        .run_serial_command("echo partial; sleep 600", Duration::from_secs(3))
        .unwrap_err();
    let after = vm.run_serial_command("echo alive", CMD_TIMEOUT).unwrap();
    vm.quit().unwrap();

    match err {
        VmError::Shell(ShellError::Timeout {
            output, recovered, ..
        }) => {
            assert!(recovered);
            assert_eq!(output, "partial\n");
        }
        e => panic!("expected a shell timeout, got {e:?}"),
    }
    assert_eq!(after.output, "alive\n");
}

#[test]
fn vm_guest_agent_runs_commands_and_copies_files() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    let (mut vm, _) = boot(tmp.path(), &agent_config(&guest.cmdline), &guest);
    let local = tmp.path().join("payload");
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i % 253).to_le_bytes()[0])
        .collect();
    std::fs::write(&local, &data).unwrap();

    let agent_ready = vm.wait_agent(BOOT_TIMEOUT).unwrap();
    let ran = vm
        .run_agent_command("echo out; echo err >&2; exit 4", CMD_TIMEOUT)
        .unwrap();
    let copied = vm
        .copy_to_guest(&local, "/root/payload", 0o600, CMD_TIMEOUT)
        .unwrap();
    // Checked over the other channel: the serial console's shell.
    let check = vm
        .run_serial_command(
            "stat -c %a /root/payload; md5sum < /root/payload",
            CMD_TIMEOUT,
        )
        .unwrap();
    vm.quit().unwrap();

    eprintln!("guest agent answered {agent_ready:?} after spawn");
    assert_eq!(ran.exit_code, Some(4));
    assert_eq!(ran.stdout, b"out\n");
    assert_eq!(ran.stderr, b"err\n");
    assert_eq!(copied, 100_000);
    let md5 = std::process::Command::new("md5sum")
        .stdin(File::open(&local).unwrap())
        .output()
        .unwrap();
    let md5 = String::from_utf8(md5.stdout).unwrap();
    assert_eq!(check.output, format!("600\n{md5}"));
}

#[test]
fn vm_without_agent_device_refuses_agent_use() {
    let Some(_lock) = qemu_lock() else { return };
    let guest = guest(GUEST_DISK_MB);
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    sparse_copy(&guest.dir.join("disk.img"), &disk);
    let paths = guest_paths(
        &guest,
        &disk,
        &tmp.path().join("ram.bin"),
        &tmp.path().join("run"),
    );
    let args = QemuArgs::new(
        &guest_config(&guest.cmdline),
        &paths,
        &options(MemoryMode::Capture, false, free_tcp_port().unwrap()),
    )
    .unwrap();
    let mut vm = Vm::spawn(&args).unwrap();
    let err = vm.wait_agent(Duration::from_secs(1)).unwrap_err();
    vm.kill().unwrap();
    assert!(matches!(err, VmError::NoAgentChannel), "{err:?}");
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
fn boot_and_capture(tmp: &Path, config: fn(&str) -> LaunchConfig) -> Captured {
    let guest = guest(GUEST_DISK_MB);
    let work = tmp.join("w,1");
    std::fs::create_dir(&work).unwrap();
    let disk = work.join("disk.img");
    sparse_copy(&guest.dir.join("disk.img"), &disk);
    let ram = work.join("ram.bin");
    let devstate = work.join("dev,state");
    let config = config(&guest.cmdline);
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

/// Arguments that resume `c` read-only from a copy of its RAM (in `run-b`).
fn resume_from_ram_copy(c: &Captured) -> QemuArgs {
    let ram_copy = c.work.join("ram-copy.bin");
    sparse_copy(&c.ram, &ram_copy);
    let paths = guest_paths(&c.guest, &c.disk, &ram_copy, &c.work.join("run-b"));
    QemuArgs::new(
        &c.config,
        &paths,
        &options(MemoryMode::Resume, true, c.port),
    )
    .unwrap()
}

#[test]
fn vm_capture_then_resume_from_ram_copy_continues_counter() {
    let Some(_lock) = qemu_lock() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let c = boot_and_capture(tmp.path(), guest_config);
    let args = resume_from_ram_copy(&c);

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
    let c = boot_and_capture(tmp.path(), guest_config);
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

#[test]
fn vm_guest_agent_answers_after_capture_and_resume() {
    let Some(_lock) = qemu_lock() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let c = boot_and_capture(tmp.path(), agent_config);
    let args = resume_from_ram_copy(&c);

    let mut vm = Vm::spawn(&args).unwrap();
    vm.resume_from(&c.devstate).unwrap();
    vm.wait_agent(BOOT_TIMEOUT).unwrap();
    let boot_id = vm
        .run_agent_command("cat /proc/sys/kernel/random/boot_id", CMD_TIMEOUT)
        .unwrap();
    vm.quit().unwrap();

    assert_eq!(String::from_utf8_lossy(&boot_id.stdout).trim(), c.boot_id);
}

/// The libvirt backend with the guest agent's channel: the device state a direct QEMU saved
/// loads into the domain (same devices at the same slots), and libvirt reaches the agent.
#[cfg(feature = "libvirt")]
mod libvirt_backend {
    use super::*;
    use synth::vm::libvirt::LibvirtVm;
    use synth::vm::DomainLaunch;

    #[test]
    fn libvirt_resume_with_guest_agent_continues_and_agent_answers() {
        let Some(_lock) = qemu_lock() else { return };
        if !cloudlet_e2e::libvirt_daemon_ready() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let c = boot_and_capture(tmp.path(), agent_config);
        let ram_copy = c.work.join("ram-copy.bin");
        sparse_copy(&c.ram, &ram_copy);
        let paths = guest_paths(&c.guest, &c.disk, &ram_copy, &c.work.join("run-lv"));
        let launch = DomainLaunch::new(
            &c.config,
            &paths,
            &options(MemoryMode::Resume, true, c.port),
        )
        .unwrap();
        let name = format!("cloudlet-vmtest-agent-{}", std::process::id());

        let mut vm = LibvirtVm::start(cloudlet_e2e::LIBVIRT_URI, &name, launch).unwrap();
        vm.resume_from(&c.devstate).unwrap();
        let (after, boot_after) = parse_counter(&http_get(
            c.port,
            "/cgi-bin/counter",
            Duration::from_secs(30),
        ));
        // libvirt connects to the agent by itself; give it the time a resumed guest needs.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let ping = loop {
            match vm.agent_command("guest-ping", serde_json::Value::Null, CMD_TIMEOUT) {
                Ok(v) => break v,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("agent not answering yet: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => panic!("the agent never answered through libvirt: {e}"),
            }
        };
        vm.destroy().unwrap();

        assert!(after > c.count, "counter went from {} to {after}", c.count);
        assert_eq!(boot_after, c.boot_id, "the guest rebooted");
        assert_eq!(ping, serde_json::json!({}));
    }
}
