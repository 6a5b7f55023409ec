//! The stock Debian bookworm guest (`tools/guest/build-debian.sh`, built and cached on first
//! use) on real QEMU through `synth::vm`: it boots with direct kernel boot and with its own
//! bootloader, reaches root's autologin prompt on the serial console, and answers commands
//! typed there. Commands are framed ad hoc: `echo BEGIN$((6*7)); CMD; echo END$((6*7)) rc=$?`
//! prints `BEGIN42` … `END42 rc=N`, which the echo of the typed line never contains.
//! The cached image is never written: every boot here runs with QEMU's `-snapshot`.
//! One QEMU at a time: every test here holds `VM_LOCK`.

use cloudlet_e2e::{debian_guest, require_qemu, DebianGuest};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use synth::base::{Device, LaunchConfig};
use synth::vm::{Accel, LaunchOptions, MemoryMode, QemuArgs, Vm, VmPaths};

static VM_LOCK: Mutex<()> = Mutex::new(());

/// From QEMU's start to root's prompt: systemd under TCG on a loaded 2-core machine took up
/// to about 3 minutes; this leaves room.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// How the guest is booted.
enum Boot {
    /// `-kernel`/`-initrd`/`-append` with the guest's own kernel, initrd and command line.
    DirectKernel,
    /// The disk alone: SeaBIOS, then GRUB from the disk's MBR.
    OwnBootloader,
}

/// A booted guest: QEMU and the folder with its memory file and sockets.
struct Booted {
    vm: Vm,
    _dir: tempfile::TempDir,
}

/// The disk's size and modification time, to show the cached image was not written.
fn stamp(disk: &Path) -> (u64, SystemTime) {
    let m = std::fs::metadata(disk).unwrap();
    (m.len(), m.modified().unwrap())
}

/// Boots `guest` with `extra` QEMU arguments (after `-snapshot`) and waits for root's prompt.
fn boot(guest: &DebianGuest, how: Boot, extra: &[String]) -> Booted {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd, append) = match how {
        Boot::DirectKernel => (
            Some(guest.kernel()),
            Some(guest.initrd()),
            Some(guest.cmdline.clone()),
        ),
        Boot::OwnBootloader => (None, None, None),
    };
    let name = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let mut extra_args = vec!["-snapshot".to_owned()];
    extra_args.extend_from_slice(extra);
    let config = LaunchConfig {
        memory_mb: guest.memory_mb,
        devices: vec![Device::VirtioBlk { discard: true }, Device::VirtioNet],
        kernel: name(&kernel),
        initrd: name(&initrd),
        append,
        extra_args,
        ..LaunchConfig::default()
    };
    let paths = VmPaths {
        disk: guest.disk(),
        memory: dir.path().join("memory.img"),
        kernel,
        initrd,
        run_dir: dir.path().join("run"),
    };
    let options = LaunchOptions {
        memory: MemoryMode::Capture,
        incoming: false,
        hostfwd: Vec::new(),
        accel: Accel::detect().unwrap(),
        vnc: None,
    };
    let mut vm = Vm::spawn(&QemuArgs::new(&config, &paths, &options).unwrap()).unwrap();
    let took = vm
        .wait_ready_marker(&guest.ready_prompt, BOOT_TIMEOUT)
        .unwrap();
    eprintln!("root prompt {took:?} after spawn");
    Booted { vm, _dir: dir }
}

/// Runs `cmd` in root's shell on the serial console; returns its output and exit status.
fn shell(vm: &mut Vm, cmd: &str) -> (String, i32) {
    let log = vm.args().serial_log().to_owned();
    let start = usize::try_from(std::fs::metadata(&log).unwrap().len()).unwrap();
    vm.serial_send(&format!(
        "echo BEGIN$((6*7)); {cmd}; echo END$((6*7)) rc=$?"
    ))
    .unwrap();
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let bytes = std::fs::read(&log).unwrap();
        let text = String::from_utf8_lossy(&bytes[start.min(bytes.len())..]).replace('\r', "");
        if let Some(framed) = framed_output(&text) {
            return framed;
        }
        assert!(
            Instant::now() < deadline,
            "no END42 for {cmd:?} within {CMD_TIMEOUT:?}; the console said:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The output between `BEGIN42` and a complete `END42 rc=N` line, and N.
fn framed_output(text: &str) -> Option<(String, i32)> {
    let begin = text.find("BEGIN42\n")? + "BEGIN42\n".len();
    let end = begin + text[begin..].find("END42 rc=")?;
    let rest = &text[end + "END42 rc=".len()..];
    let line = &rest[..rest.find('\n')?];
    Some((text[begin..end].trim_end().to_owned(), line.parse().ok()?))
}

/// [`shell`], asserting that `cmd` succeeded; its output.
fn shell_ok(vm: &mut Vm, cmd: &str) -> String {
    let (out, rc) = shell(vm, cmd);
    assert_eq!(rc, 0, "{cmd:?} failed with {rc}:\n{out}");
    out
}

#[test]
fn framed_output_complete_frame_returns_output_and_status() {
    let text = "echo BEGIN$((6*7)); false; echo END$((6*7)) rc=$?\nBEGIN42\nhi\nEND42 rc=1\n";
    assert_eq!(framed_output(text), Some(("hi".to_owned(), 1)));
}

#[test]
fn framed_output_typed_line_only_is_not_a_frame() {
    assert_eq!(
        framed_output("echo BEGIN$((6*7)); true; echo END$((6*7)) rc=$?\nBEGIN42\n"),
        None
    );
    assert_eq!(framed_output("BEGIN42\nEND42 rc=0"), None);
}

#[test]
fn debian_direct_kernel_boot_reaches_prompt_with_systemd_and_agent_unit() {
    if !require_qemu() {
        return;
    }
    let Some(guest) = debian_guest() else { return };
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = stamp(&guest.disk());

    let mut b = boot(&guest, Boot::DirectKernel, &[]);

    assert_eq!(shell_ok(&mut b.vm, "cat /proc/1/comm"), "systemd");
    assert_eq!(
        shell_ok(
            &mut b.vm,
            "systemctl show -p LoadState --value qemu-guest-agent.service"
        ),
        "loaded"
    );
    // No virtio-serial port for the agent here, so it is not running (and did not hold the
    // boot up).
    let (state, _) = shell(&mut b.vm, "systemctl is-active qemu-guest-agent.service");
    assert_eq!(state, "inactive");
    // No seed attached: cloud-init disabled itself.
    assert_eq!(shell_ok(&mut b.vm, "cloud-init status"), "status: disabled");
    let addr = shell_ok(&mut b.vm, "ip -4 -o addr show scope global");
    assert!(addr.contains("inet 10.0.2.15/24"), "{addr}");
    let root = shell_ok(&mut b.vm, "findmnt -n -o SOURCE,OPTIONS /");
    let (source, options) = root.split_once(char::is_whitespace).unwrap();
    assert_eq!(source, "/dev/vda1");
    assert!(options.trim().starts_with("rw,"), "{root}");
    assert!(!options.contains("discard"), "{root}");
    shell_ok(
        &mut b.vm,
        "fstrim --version; python3 -c 'import flask, numpy'",
    );
    // A failing command is reported as such.
    let (_, rc) = shell(&mut b.vm, "false");
    assert_eq!(rc, 1);
    b.vm.quit().unwrap();
    assert_eq!(stamp(&guest.disk()), before, "the cached image was written");
}

/// A session with qemu-guest-agent over its virtio-serial port (QEMU's chardev socket).
struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Agent {
    /// Connects and synchronizes (`guest-sync` with a fresh id, sent again until the agent
    /// answers with that id), waiting until `deadline`: the agent starts when udev sees its
    /// port, and bytes sent before that may be lost or answered late.
    fn connect(sock: &Path, deadline: Instant) -> Agent {
        let writer = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < deadline, "connect {}: {e}", sock.display()),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        writer
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut agent = Agent {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        };
        let id = u64::from(std::process::id());
        let sync = format!(r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#);
        loop {
            agent.send(&sync);
            // Read until our id comes back or the line read times out; then send again.
            while let Some(reply) = agent.read_reply() {
                if reply["return"] == id {
                    return agent;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the guest agent did not answer guest-sync"
            );
        }
    }

    fn send(&mut self, request: &str) {
        self.writer.write_all(request.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }

    /// The next JSON line, or `None` when nothing came within the read timeout.
    fn read_reply(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(serde_json::from_str(&line).unwrap_or_default()),
            _ => None,
        }
    }

    /// Runs `request`; its `return` value.
    fn call(&mut self, request: &str) -> serde_json::Value {
        self.send(request);
        let reply = self
            .read_reply()
            .unwrap_or_else(|| panic!("no reply to {request}"));
        assert!(reply.get("return").is_some(), "{request}: {reply}");
        reply["return"].clone()
    }
}

#[test]
fn debian_own_bootloader_boots_and_guest_agent_answers() {
    if !require_qemu() {
        return;
    }
    let Some(guest) = debian_guest() else { return };
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("qga.sock");
    let agent = vec![
        "-device".to_owned(),
        "virtio-serial-pci".to_owned(),
        "-chardev".to_owned(),
        format!("socket,id=qga0,path={},server=on,wait=off", sock.display()),
        "-device".to_owned(),
        format!("virtserialport,chardev=qga0,name={}", guest.agent_port),
    ];

    let mut b = boot(&guest, Boot::OwnBootloader, &agent);

    // GRUB, not QEMU, loaded the kernel: it passes BOOT_IMAGE.
    let cmdline = shell_ok(&mut b.vm, "cat /proc/cmdline");
    assert!(cmdline.starts_with("BOOT_IMAGE=/vmlinuz "), "{cmdline}");
    assert!(cmdline.contains(&guest.cmdline), "{cmdline}");
    let mut agent = Agent::connect(&sock, Instant::now() + CMD_TIMEOUT);
    let host = agent.call(r#"{"execute":"guest-get-host-name"}"#);
    assert_eq!(host["host-name"], "cloudlet-debian");
    assert_eq!(
        shell_ok(&mut b.vm, "systemctl is-active qemu-guest-agent.service"),
        "active"
    );
    b.vm.quit().unwrap();
}
