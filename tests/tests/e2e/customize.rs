//! `cloudlet overlay --run/--copy` on the fast busybox test guest, through the real binary:
//! a failing command stops the run with its command, exit status and output (exit code 5), a
//! hung command ends at `--cmd-timeout`, `--copy` without an agent channel is refused before
//! the VM starts, and with `base --guest-agent` the script runs through the agent, copied
//! files arrive and `--keep-going` lists the failures in the report.
//! One QEMU at a time: every test here holds `VM_LOCK`.

use cloudlet_e2e::{cloudlet, guest, require_fuse, require_qemu, Scratch};
use std::sync::Mutex;
use std::time::Instant;

static VM_LOCK: Mutex<()> = Mutex::new(());

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
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
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
fn overlay_hung_command_ends_at_cmd_timeout_with_error() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
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
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
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
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let h = Scratch::new();
    let g = guest(256);
    let d = |f: &str| g.dir.join(f).display().to_string();
    let base = h
        .ok(&[
            "base",
            &d("disk.img"),
            "--memory-mb",
            "256",
            "--kernel",
            &d("vmlinuz"),
            "--initrd",
            &d("initrd.img"),
            "--append",
            &g.cmdline,
            "--guest-agent",
            "--ready",
            "CLOUDLET-GUEST-READY",
            "--ready-agent",
        ])
        .trim()
        .to_owned();
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
