//! `cloudlet overlay --run/--copy` on the fast busybox test guest, through the real binary:
//! a failing command stops the run with its command, exit status and output (exit code 5), a
//! hung command ends at `--cmd-timeout`, `--copy` without an agent channel is refused before
//! the VM starts, and with `base --guest-agent` the script runs through the agent, copied
//! files arrive and `--keep-going` lists the failures in the report. `cloudlet base
//! --ready-http` captures once the guest's service answers through `--hostfwd`, and fails
//! when it never does.
//! `cloudlet base` takes a qcow2 image (converted to raw) and refuses one with a backing file.
//! One QEMU at a time: every test here holds `cloudlet_e2e::vm_lock`.

use cloudlet_e2e::{cloudlet, guest, require_fuse, require_qemu, vm_lock, Scratch};
use std::time::Instant;

/// `cloudlet_tools::EXIT_GUEST_COMMAND`.
const EXIT_GUEST_COMMAND: i32 = 5;

/// Writes `script` as `name` in the scratch folder; its path.
fn script(h: &Scratch, name: &str, script: &str) -> String {
    let p = h.p(name);
    std::fs::write(&p, script).unwrap();
    p
}

#[test]
fn overlay_failing_command_stops_run_with_command_status_and_output() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    let s = script(
        &h,
        "fail.sh",
        "echo first-$((6*7))\necho about-to-fail; exit 7\ntouch /never-run\n",
    );
    let out = h.p("never.overlay");

    let (code, _, err) = cloudlet(
        &h.home(),
        &[
            "overlay",
            &base,
            "-o",
            &out,
            "--run",
            &s,
            "--channel",
            "serial",
        ],
    );

    assert_eq!(code, EXIT_GUEST_COMMAND, "{err}");
    // Streamed while it ran, then named in the error with its status and output.
    assert!(err.contains("first-42"), "{err}");
    assert!(
        err.contains("\"echo about-to-fail; exit 7\" failed in the guest (exit status 7)"),
        "{err}"
    );
    assert!(err.contains("about-to-fail\n"), "{err}");
    assert!(!err.contains("touch /never-run"), "the run went on:\n{err}");
    assert!(!std::path::Path::new(&out).exists());
}

#[test]
fn overlay_serial_command_is_interrupted_by_sigint_not_left_to_its_timeout() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    let s = script(&h, "hang.sh", "sleep 1000\necho after\n");

    let mut child = Command::new(cloudlet_e2e::workspace_bin("cloudlet"))
        .env("CLOUDLET_HOME", h.home())
        .args(["overlay", &base, "-o", &h.p("x.overlay"), "--run", &s])
        .args(["--channel", "serial", "--cmd-timeout", "900"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err.push_str(&line);
        err.push('\n');
        if line.contains("guest$ sleep 1000") {
            break;
        }
    }
    // The command is typed; give the shell a moment to start it, then Ctrl-C.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    for line in lines {
        err.push_str(&line.unwrap());
        err.push('\n');
    }
    let status = child.wait().unwrap();

    assert!(!status.success(), "{err}");
    assert!(err.contains("Interrupted"), "{err}");
    assert!(!err.contains("did not finish within"), "{err}");
    assert!(
        !err.contains("guest$ echo after"),
        "the run went on:\n{err}"
    );
    assert!(!std::path::Path::new(&h.p("x.overlay")).exists(), "{err}");
}

#[test]
fn overlay_hung_command_ends_at_cmd_timeout_with_error() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    let s = script(&h, "hang.sh", "echo before\nsleep 1000\necho after\n");

    let start = Instant::now();
    let (code, _, err) = cloudlet(
        &h.home(),
        &[
            "overlay",
            &base,
            "-o",
            &h.p("x.overlay"),
            "--run",
            &s,
            "--cmd-timeout",
            "5",
        ],
    );
    eprintln!(
        "overlay with a hung command ended after {:?}",
        start.elapsed()
    );

    assert_eq!(code, EXIT_GUEST_COMMAND, "{err}");
    assert!(
        err.contains("Customization command \"sleep 1000\" did not finish within 5s"),
        "{err}"
    );
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        !err.contains("guest$ echo after"),
        "the run went on:\n{err}"
    );
}

#[test]
fn overlay_copy_without_agent_channel_is_refused_before_the_vm_starts() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    let file = script(&h, "f.txt", "x\n");

    let (code, _, err) = cloudlet(
        &h.home(),
        &[
            "overlay",
            &base,
            "-o",
            &h.p("x.overlay"),
            "--copy",
            &format!("{file}:/root/f.txt"),
        ],
    );

    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--copy needs the guest agent"), "{err}");
    assert!(err.contains("cloudlet base --guest-agent"), "{err}");
    assert!(!err.contains("base VM resumed"), "the VM started:\n{err}");
}

#[test]
fn overlay_agent_channel_copies_files_runs_script_and_keeps_going() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let (code, base, err) = guest_base_with(
        &h,
        &[
            "--guest-agent",
            "--ready",
            "CLOUDLET-GUEST-READY",
            "--ready-agent",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let base = base.trim().to_owned();
    let table = h.ok(&["list-base"]);
    assert!(
        table.contains(" GUEST ") && table.contains(" guest-agent "),
        "{table}"
    );
    let file = script(&h, "tool.sh", "#!/bin/sh\necho tool-ran-$1\n");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let s = script(
        &h,
        "agent.sh",
        "/srv/www/tool.sh 42\nstat -c %a /srv/www/tool.sh\nexit 3\necho still-running\n",
    );

    let (code, out, err) = cloudlet(
        &h.home(),
        &[
            "overlay",
            &base,
            "-o",
            &h.p("agent.overlay"),
            "--copy",
            &format!("{file}:/srv/www/tool.sh"),
            "--run",
            &s,
            "--keep-going",
            "--json",
            "--codec",
            "zstd",
        ],
    );

    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["channel"], "agent", "{report}");
    assert_eq!(report["files_copied"], 1, "{report}");
    assert_eq!(report["commands_run"], 4, "{report}");
    assert_eq!(
        report["commands_failed"],
        serde_json::json!([{ "line": "exit 3", "rc": 3 }]),
        "{report}"
    );
    assert!(err.contains("tool-ran-42\n"), "{err}");
    assert!(err.contains("750\n"), "{err}");
    assert!(err.contains("still-running\n"), "{err}");
}

/// `cloudlet base` of the busybox guest with `extra` arguments (and no `--ready` marker);
/// (exit code, stdout, stderr).
fn guest_base_with(h: &Scratch, extra: &[&str]) -> (i32, String, String) {
    let disk = guest(256).dir.join("disk.img").display().to_string();
    guest_image_base(h, &disk, extra)
}

/// `cloudlet base` of the busybox guest's kernel with `image` as its disk and `extra`
/// arguments; (exit code, stdout, stderr).
fn guest_image_base(h: &Scratch, image: &str, extra: &[&str]) -> (i32, String, String) {
    let g = guest(256);
    let d = |f: &str| g.dir.join(f).display().to_string();
    let mut args = vec![
        "base".to_owned(),
        image.to_owned(),
        "--kernel".to_owned(),
        d("vmlinuz"),
        "--initrd".to_owned(),
        d("initrd.img"),
        "--append".to_owned(),
        g.cmdline.clone(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cloudlet(&h.home(), &args)
}

#[test]
fn base_ready_http_captures_once_the_guest_service_answers() {
    if !require_qemu() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let port = synth::vm::free_tcp_port().unwrap();
    let fwd = format!("tcp:127.0.0.1:{port}-:8080");
    let url = format!("http://127.0.0.1:{port}/index.html");

    let (code, out, err) = guest_base_with(&h, &["--hostfwd", &fwd, "--ready-http", &url]);

    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("{url} answered 200")), "{err}");
    let bases: serde_json::Value = serde_json::from_str(&h.ok(&["list-base", "--json"])).unwrap();
    assert_eq!(bases.as_array().map(Vec::len), Some(1), "{bases}");
    assert!(!out.trim().is_empty());
}

#[test]
fn base_ready_http_without_answer_times_out_with_last_error() {
    if !require_qemu() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let port = synth::vm::free_tcp_port().unwrap();
    // Guest port 8081: nothing listens there.
    let fwd = format!("tcp:127.0.0.1:{port}-:8081");
    let url = format!("http://127.0.0.1:{port}/");

    let (code, _, err) = guest_base_with(
        &h,
        &["--hostfwd", &fwd, "--ready-http", &url, "--timeout", "20"],
    );

    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{url}: no HTTP 200 within 20s")),
        "{err}"
    );
    assert_eq!(h.ok(&["list-base", "--json"]).trim(), "[]");
}

#[test]
fn base_from_qcow2_image_is_converted_and_one_with_a_backing_file_refused() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let g = guest(256);
    let raw = g.dir.join("disk.img");
    let q = h.p("guest.qcow2");
    let layered = h.p("layered.qcow2");
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        &q,
    ]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &q, "-F", "qcow2", &layered,
    ]);
    let run =
        |image: &str| guest_image_base(&h, image, &["--ready", "CLOUDLET-GUEST-READY", "--json"]);

    let (refused, _, refused_err) = run(&layered);
    let (code, out, err) = run(&q);

    assert_eq!(refused, 3, "{refused_err}");
    assert!(refused_err.contains("backing file"), "{refused_err}");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("converted the qcow2 image to raw"), "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        record["disk_size"].as_u64(),
        Some(std::fs::metadata(&raw).unwrap().len()),
        "{record}"
    );
    let list = h.ok(&["list-base", "--json"]);
    let bases: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(bases.as_array().map(Vec::len), Some(1), "{list}");
}
