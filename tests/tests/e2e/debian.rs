//! The stock Debian bookworm guest (`tools/guest/build-debian.sh`, built and cached on first
//! use) on real QEMU: through `synth::vm` it boots with direct kernel boot and with its own
//! bootloader, reaches root's autologin prompt on the serial console, answers commands typed
//! at its bash there (synth's framed `Shell`) and through qemu-guest-agent; through the real
//! `cloudlet` binary it goes base → overlay over the serial console → overlay over the agent
//! → synthesis, and the service installed by the customization answers from the host; a base
//! made with a cloud-init seed runs its user-data and resumes with the seed attached.
//! The cached image is never written: the `synth::vm` boots run with QEMU's `-snapshot`,
//! `cloudlet base` copies it. One QEMU at a time: every test here holds `VM_LOCK`.

use cloudlet_e2e::{
    debian_guest, http_get, require_fuse, require_qemu, try_http_get, workspace_bin, DebianGuest,
    Scratch,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use synth::base::{Device, LaunchConfig};
use synth::vm::{Accel, GuestNetwork, LaunchOptions, MemoryMode, QemuArgs, Vm, VmPaths};

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

/// Boots `guest` (with the guest agent's channel if `agent`) and waits for root's prompt.
fn boot(guest: &DebianGuest, how: Boot, agent: bool) -> Booted {
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
    let mut devices = vec![Device::VirtioBlk { discard: true }, Device::VirtioNet];
    if agent {
        devices.push(Device::GuestAgent);
    }
    let config = LaunchConfig {
        memory_mb: guest.memory_mb,
        devices,
        kernel: name(&kernel),
        initrd: name(&initrd),
        append,
        extra_args: vec!["-snapshot".to_owned()],
        ..LaunchConfig::default()
    };
    let paths = VmPaths {
        disk: guest.disk(),
        memory: dir.path().join("memory.img"),
        kernel,
        initrd,
        cloud_init: None,
        run_dir: dir.path().join("run"),
    };
    let options = LaunchOptions {
        memory: MemoryMode::Capture,
        incoming: false,
        hostfwd: Vec::new(),
        network: GuestNetwork::Isolated,
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

/// Runs `cmd` at root's bash on the serial console (synth's framed shell); its output
/// (trailing whitespace removed) and exit status.
fn shell(vm: &mut Vm, cmd: &str) -> (String, i32) {
    let out = vm.run_serial_command(cmd, CMD_TIMEOUT).unwrap();
    (out.output.trim_end().to_owned(), out.rc)
}

/// [`shell`], asserting that `cmd` succeeded; its output.
fn shell_ok(vm: &mut Vm, cmd: &str) -> String {
    let (out, rc) = shell(vm, cmd);
    assert_eq!(rc, 0, "{cmd:?} failed with {rc}:\n{out}");
    out
}

#[test]
fn debian_direct_kernel_boot_reaches_prompt_with_systemd_and_agent_unit() {
    if !require_qemu() {
        return;
    }
    let Some(guest) = debian_guest() else { return };
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = stamp(&guest.disk());

    let mut b = boot(&guest, Boot::DirectKernel, false);

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

#[test]
fn debian_own_bootloader_boots_and_guest_agent_answers() {
    if !require_qemu() {
        return;
    }
    let Some(guest) = debian_guest() else { return };
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(guest.agent_port, synth::vm::AGENT_CHANNEL);

    let mut b = boot(&guest, Boot::OwnBootloader, true);

    // GRUB, not QEMU, loaded the kernel: it passes BOOT_IMAGE.
    let cmdline = shell_ok(&mut b.vm, "cat /proc/cmdline");
    assert!(cmdline.starts_with("BOOT_IMAGE=/vmlinuz "), "{cmdline}");
    assert!(cmdline.contains(&guest.cmdline), "{cmdline}");
    b.vm.wait_agent(CMD_TIMEOUT).unwrap();
    let host =
        b.vm.agent(CMD_TIMEOUT)
            .unwrap()
            .execute("guest-get-host-name", serde_json::Value::Null, CMD_TIMEOUT)
            .unwrap();
    assert_eq!(host["host-name"], "cloudlet-debian");
    assert_eq!(
        shell_ok(&mut b.vm, "systemctl is-active qemu-guest-agent.service"),
        "active"
    );
    b.vm.quit().unwrap();
}

/// The customization typed at root's bash on the serial console: a page, a web server started
/// as a transient systemd unit, and the page fetched inside the guest once it answers.
const SERIAL_SCRIPT: &str = r#"
# Comments and empty lines are skipped.
mkdir -p /srv/www
echo serial-made-$((6*7)) > /srv/www/index.txt
systemd-run --unit=cloudlet-www python3 -m http.server 8001 --directory /srv/www
for i in $(seq 200); do python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:8001/index.txt").read().decode().strip())' 2>/dev/null && exit 0; sleep 0.3; done; exit 1
sync
"#;

/// A Flask service serving `/srv/page.txt` at `/page` on guest port 8000.
const FLASK_APP: &str = r#"from flask import Flask

app = Flask(__name__)


@app.get("/page")
def page():
    with open("/srv/page.txt") as f:
        return f.read()


app.run(host="0.0.0.0", port=8000)
"#;

const FLASK_UNIT: &str = "\
[Unit]
Description=cloudlet test page
After=network.target

[Service]
ExecStart=/usr/bin/python3 /srv/app.py

[Install]
WantedBy=multi-user.target
";

/// The customization run by the guest agent, after the files above were copied in.
const AGENT_SCRIPT: &str = "\
systemctl daemon-reload
systemctl enable --now cloudlet-web.service
systemctl is-active cloudlet-web.service
sync
";

/// A `cloudlet synthesis` process, stopped with SIGTERM (and reaped) on drop.
struct Synthesis(Child);

impl Drop for Synthesis {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

/// Runs `cloudlet ARGS`, prints how long it took; (exit code, stdout, stderr).
fn timed(h: &Scratch, what: &str, args: &[&str]) -> (i32, String, String) {
    let start = Instant::now();
    let r = cloudlet_e2e::cloudlet(&h.home(), args);
    eprintln!(
        "{what}: {:.1}s (exit {})",
        start.elapsed().as_secs_f64(),
        r.0
    );
    r
}

#[test]
fn debian_cli_base_overlay_serial_and_agent_synthesis_serves_customized_page() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let Some(guest) = debian_guest() else { return };
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let h = Scratch::new();
    let page = format!("agent-made-{}\n", std::process::id());
    let files = [
        ("serial.sh", SERIAL_SCRIPT),
        ("agent.sh", AGENT_SCRIPT),
        ("app.py", FLASK_APP),
        ("cloudlet-web.service", FLASK_UNIT),
        ("page.txt", page.as_str()),
    ];
    for (name, text) in files {
        std::fs::write(h.p(name), text).unwrap();
    }
    let memory = guest.memory_mb.to_string();
    let disk = guest.disk().display().to_string();

    // Arrange: a base booted by the image's own bootloader, captured at root's prompt once
    // the agent answers.
    let (code, base, err) = timed(
        &h,
        "cloudlet base",
        &[
            "base",
            &disk,
            "--memory-mb",
            &memory,
            "--guest-agent",
            "--ready",
            &guest.ready_prompt,
            "--ready-agent",
            "--name",
            "debian",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let base = base.trim().to_owned();
    let fast = ["--codec", "zstd", "--level", "3", "--json"];

    // Act 1: customize over the serial console.
    let (serial_out, serial_sh) = (h.p("serial.overlay"), h.p("serial.sh"));
    let mut args = vec!["overlay", &base, "-o", &serial_out, "--run", &serial_sh];
    args.extend_from_slice(&["--channel", "serial"]);
    args.extend_from_slice(&fast);
    let (code, out, err) = timed(&h, "cloudlet overlay --channel serial", &args);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["channel"], "serial", "{report}");
    assert_eq!(report["commands_run"], 5, "{report}");
    // The guest fetched its own page; the output streamed to cloudlet's stderr.
    assert!(err.contains("serial-made-42\n"), "{err}");

    // Act 2: customize the same base again, through the agent, with copied files.
    let copy = |local: &str, guest_path: &str| format!("{}:{guest_path}", h.p(local));
    let copies = [
        copy("app.py", "/srv/app.py"),
        copy("page.txt", "/srv/page.txt"),
        copy(
            "cloudlet-web.service",
            "/etc/systemd/system/cloudlet-web.service",
        ),
    ];
    let port = synth::vm::free_tcp_port().unwrap();
    let fwd = format!("tcp:127.0.0.1:{port}-:8000");
    let ready = format!("http://127.0.0.1:{port}/page");
    let (agent_out, agent_sh) = (h.p("agent.overlay"), h.p("agent.sh"));
    let mut args = vec!["overlay", &base, "-o", &agent_out, "--run", &agent_sh];
    // The working set is profiled (what a resumed VM touches until the page answers, and 2 s
    // on), as an operator would for early start.
    args.extend_from_slice(&[
        "--channel",
        "agent",
        "--hostfwd",
        &fwd,
        "--ready-http",
        &ready,
        "--profile-url",
        &ready,
        "--profile-settle",
        "2",
    ]);
    for c in &copies {
        args.extend_from_slice(&["--copy", c]);
    }
    args.extend_from_slice(&fast);
    let (code, out, err) = timed(&h, "cloudlet overlay --channel agent", &args);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["channel"], "agent", "{report}");
    assert_eq!(report["files_copied"], 3, "{report}");
    assert_eq!(report["working_set_from"], "profile", "{report}");
    assert!(err.contains("active\n"), "{err}");

    // Act 3: synthesize the agent's overlay with early start.
    let port = synth::vm::free_tcp_port().unwrap();
    let url = format!("http://127.0.0.1:{port}/page");
    let start = Instant::now();
    let mut syn = Synthesis(
        Command::new(workspace_bin("cloudlet"))
            .env("CLOUDLET_HOME", h.home())
            .args(["synthesis", &base, &agent_out, "--early-start", "--json"])
            .args(["--hostfwd", &format!("tcp:127.0.0.1:{port}-:8000")])
            .args(["--ready-http", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let rx = crate::server::lines(&mut syn.0);
    let body = http_get(port, "/page", BOOT_TIMEOUT);
    eprintln!(
        "synthesis: first answer after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let missing = try_http_get(port, "/nothing-here");
    // The first answer and the end of the fill (every chunk rebuilt and checked), in
    // whichever order they come.
    let mut events: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let has = |events: &[serde_json::Value], name: &str| events.iter().any(|e| e["event"] == name);
    while !(has(&events, "first answer") && has(&events, "background fill done")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("first answer and fill done in time");
        events.push(serde_json::from_str(&line).unwrap());
    }
    let first = events
        .iter()
        .find(|e| e["event"] == "first answer")
        .cloned()
        .unwrap();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(syn.0.id().to_string())
        .status();
    let stopped = crate::server::wait_event(&rx, "VM stopped", BOOT_TIMEOUT)["detail"].clone();
    let status = syn.0.wait().unwrap();

    // Assert: the page the test chose, served by the service the customization installed,
    // and every chunk verified: none failed, none left pending, no corrupt segment.
    assert_eq!(body, page);
    assert!(missing.is_err());
    assert!(status.success(), "{status}");
    assert_eq!(first["detail"]["url"], url.as_str(), "{first}");
    for image in ["disk", "memory"] {
        let s = &stopped[image];
        assert_eq!(s["verification_failures"], 0, "{image}: {s}");
        assert_eq!(s["fetch_errors"], 0, "{image}: {s}");
        assert_eq!(s["chunks"]["pending"], 0, "{image}: {s}");
    }
    assert_eq!(stopped["fetch"]["segments_corrupt"], 0, "{stopped}");
}

/// The user-data of the cloud-init test: a file from `write_files`, a command from `runcmd`
/// that reads it (so it ran after the file was written, in the same first boot).
const USER_DATA: &str = "\
#cloud-config
write_files:
  - path: /var/lib/cloudlet-e2e/seed.txt
    content: |
      written-by-cloud-init
runcmd:
  - [sh, -c, 'echo \"runcmd saw $(cat /var/lib/cloudlet-e2e/seed.txt)\" > /var/lib/cloudlet-e2e/runcmd.txt']
";

/// Read through the guest agent once cloud-init is done. `cloud-init status` exits 2 for
/// \"done, with recoverable errors\" (a module with nothing to work on, such as growpart
/// without its tool), which still means it ran from the seed; 1 (error) fails the run.
const CLOUD_INIT_CHECK: &str = "\
cloud-init status --wait --long || test $? -eq 2
cat /var/lib/cloudlet-e2e/runcmd.txt
hostname
";

#[test]
fn debian_cli_base_with_cloud_init_seed_runs_user_data_and_resumes_with_the_seed() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let Some(guest) = debian_guest() else { return };
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let h = Scratch::new();
    std::fs::write(h.p("user-data.yaml"), USER_DATA).unwrap();
    let meta = format!(
        "instance-id: e2e-{}\nlocal-hostname: seeded\n",
        std::process::id()
    );
    std::fs::write(h.p("meta-data.yaml"), meta).unwrap();
    std::fs::write(h.p("check.sh"), CLOUD_INIT_CHECK).unwrap();
    let memory = guest.memory_mb.to_string();
    let disk = guest.disk().display().to_string();
    let (user_data, meta_data) = (h.p("user-data.yaml"), h.p("meta-data.yaml"));

    // Arrange: a base booted with the seed attached, captured once the agent answers.
    let (code, base, err) = timed(
        &h,
        "cloudlet base --cloud-init",
        &[
            "base",
            &disk,
            "--memory-mb",
            &memory,
            "--guest-agent",
            "--ready-agent",
            "--cloud-init",
            &user_data,
            "--cloud-init-meta-data",
            &meta_data,
            "--name",
            "debian-seeded",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let base = base.trim().to_owned();
    let listed: serde_json::Value = serde_json::from_str(&h.ok(&["list-base", "--json"])).unwrap();
    let folder = PathBuf::from(listed[0]["path"].as_str().unwrap());
    assert_eq!(
        listed[0]["guest"],
        serde_json::json!(["guest-agent", "cloud-init-seed"]),
        "{listed}"
    );
    let record = std::fs::read_to_string(folder.join("base.json")).unwrap();
    assert!(record.contains(r#""cloud-init-seed""#), "{record}");
    assert!(folder.join("cloud-init-seed.img").is_file());

    // Act: resume the base (the seed must be attached again for its device state to load)
    // and ask the guest, through the agent, what cloud-init did.
    let out = h.p("check.overlay");
    let check = h.p("check.sh");
    let (code, json, err) = timed(
        &h,
        "cloudlet overlay (cloud-init check)",
        &[
            "overlay",
            &base,
            "-o",
            &out,
            "--run",
            &check,
            "--channel",
            "agent",
            "--codec",
            "zstd",
            "--level",
            "3",
            "--json",
        ],
    );

    // Assert: user-data's write_files and runcmd ran, and meta-data's host name applies.
    eprintln!("{err}");
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["commands_run"], 3, "{report}");
    assert!(err.contains("runcmd saw written-by-cloud-init\n"), "{err}");
    assert!(err.contains("seeded\n"), "{err}");
}
