//! Real VMs end to end (TCG): `cloudlet base` captures the test guest, `cloudlet overlay`
//! customizes it under cloudletfs and captures an overlay from the traces, and
//! `cloudlet synthesis --early-start` resumes it; the customized service answers over HTTP.
//! One QEMU at a time: every test here holds `cloudlet_e2e::vm_lock`.

use cloudlet_e2e::{
    http_get, libvirt_domain_exists, parse_counter, require_fuse, require_libvirt, require_qemu,
    try_http_get, vm_lock, workspace_bin, Scratch, LIBVIRT_URI,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes a page the HTTP service serves, bumps the counter, and syncs.
const CUSTOMIZE: &str = "\
echo overlay-made-$((6*7)) > /srv/www/custom.txt
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
sync
";

/// The same, plus a 2 MiB file written, deleted and trimmed.
const CUSTOMIZE_AND_TRIM: &str = "\
echo overlay-made-$((6*7)) > /srv/www/custom.txt
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
dd if=/dev/urandom of=/big.bin bs=4096 count=512
sync
rm /big.bin
sync
fstrim /
";

/// `cloudlet overlay` with a customization script; returns the JSON report.
fn overlay(h: &Scratch, base: &str, script: &str, out: &str, extra: &[&str]) -> serde_json::Value {
    let s = h.p(&format!("{out}.sh"));
    std::fs::write(&s, script).unwrap();
    let o = h.p(out);
    let mut args = vec!["overlay", base, "-o", &o, "--run", &s, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&h.ok(&args)).unwrap()
}

fn info(home: &Scratch, overlay: &str) -> serde_json::Value {
    serde_json::from_str(&home.ok(&["info-overlay", &home.p(overlay), "--json"])).unwrap()
}

/// A `cloudlet synthesis` process, stopped with SIGTERM on drop.
struct Synthesis(Option<Child>);

fn terminate(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

impl Synthesis {
    fn start(
        home: &Scratch,
        base: &str,
        overlay: &str,
        port: u16,
        early: bool,
        extra: &[&str],
    ) -> Self {
        let fwd = format!("tcp:127.0.0.1:{port}-:8080");
        let mut cmd = Command::new(workspace_bin("cloudlet"));
        cmd.env("CLOUDLET_HOME", home.home())
            .args([
                "synthesis",
                base,
                &home.p(overlay),
                "--hostfwd",
                &fwd,
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if early {
            cmd.arg("--early-start");
        }
        cmd.args(extra);
        Synthesis(Some(cmd.spawn().unwrap()))
    }

    /// Sends SIGTERM, waits, checks the exit status; returns what it printed.
    fn stop(mut self) -> String {
        use std::io::Read;
        let mut child = self.0.take().unwrap();
        terminate(&child);
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "cloudlet synthesis failed ({status}):\n{out}"
        );
        out
    }
}

impl Drop for Synthesis {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            terminate(&child);
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    synth::vm::free_tcp_port().unwrap()
}

/// `cloudlet synthesis --early-start EXTRA` of `vm.overlay`: the customized page answers
/// within `first_timeout`, the guest's counter continues from the customization (two requests
/// made there), synthesis's own `--ready-http` probe reports the first answer after the
/// resume with what was fetched by then, and after SIGTERM the port is closed. Returns what
/// synthesis printed.
fn synthesize_customized(
    h: &Scratch,
    base: &str,
    extra: &[&str],
    first_timeout: Duration,
) -> String {
    let port = free_port();
    let start = Instant::now();
    let url = format!("http://127.0.0.1:{port}/custom.txt");
    let mut args = vec!["--ready-http", &url];
    args.extend_from_slice(extra);
    let syn = Synthesis::start(h, base, "vm.overlay", port, true, &args);
    let body = http_get(port, "/custom.txt", first_timeout);
    eprintln!("first response after {:?}", start.elapsed());
    assert_eq!(body.trim(), "overlay-made-42");
    let (count, _) = parse_counter(&http_get(port, "/cgi-bin/counter", Duration::from_secs(20)));
    assert!(count >= 3, "counter restarted: {count}");
    let out = syn.stop();
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = |name: &str| {
        events
            .iter()
            .find(|e| e["event"] == name)
            .unwrap_or_else(|| panic!("no {name:?} in {out}"))
    };
    let (resumed, first) = (at("VM resumed"), at("first answer"));
    assert!(
        first["seconds"].as_f64() >= resumed["seconds"].as_f64(),
        "{out}"
    );
    let d = &first["detail"];
    assert_eq!(d["url"], url.as_str(), "{out}");
    assert!(
        d["segments_fetched"].as_u64() <= d["segments_total"].as_u64(),
        "{out}"
    );
    assert!(d["segments_total"].as_u64() > Some(0), "{out}");
    assert!(
        d["chunks_on_demand"].is_u64() && d["chunks_pending"].is_u64(),
        "{out}"
    );
    assert!(
        try_http_get(port, "/custom.txt").is_err(),
        "VM still running after SIGTERM"
    );
    out
}

#[test]
fn synthesis_early_start_serves_customized_guest() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    // The working set is profiled: the overlay is resumed once and written again with what
    // the VM touched up to its first answer stored first.
    let fwd = free_port();
    let report = overlay(
        &h,
        &base,
        CUSTOMIZE,
        "vm.overlay",
        &[
            "--hostfwd",
            &format!("tcp:127.0.0.1:{fwd}-:8080"),
            "--profile-url",
            &format!("http://127.0.0.1:{fwd}/custom.txt"),
        ],
    );
    assert_eq!(report["working_set_from"], "profile", "{report}");
    let ws = report["working_set_chunks"].as_u64().unwrap();
    assert!(ws > 0, "{report}");
    assert!(
        report["profile_first_response_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    synthesize_customized(&h, &base, &[], Duration::from_secs(60));
}

#[test]
fn synthesis_libvirt_early_start_serves_customized_guest() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    if !require_libvirt(&h.home()) {
        return;
    }
    let base = h.guest_base(256);
    overlay(&h, &base, CUSTOMIZE, "vm.overlay", &[]);
    // Generous: libvirt re-probes QEMU on every start where /dev/kvm is root-only.
    let out = synthesize_customized(
        &h,
        &base,
        &["--backend", "libvirt", "--libvirt-uri", LIBVIRT_URI],
        Duration::from_secs(180),
    );
    let resumed: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "VM resumed")
        .unwrap_or_else(|| panic!("no VM resumed event in {out}"));
    assert_eq!(resumed["detail"]["backend"], "libvirt", "{out}");
    let vm = resumed["detail"]["vm"].as_str().unwrap();
    let domain = vm.strip_prefix("libvirt domain ").unwrap();
    assert!(
        !libvirt_domain_exists(domain),
        "domain {domain} left behind after SIGTERM"
    );
}

#[test]
fn overlay_without_profile_orders_only_the_resume_within_its_share() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    let report = overlay(&h, &base, CUSTOMIZE, "vm.overlay", &[]);
    assert_eq!(report["working_set_from"], "resume", "{report}");
    let n = |k: &str| report[k].as_u64().unwrap();
    let examined = report["stats"]["examined_chunks"].as_u64().unwrap();
    // The resume ends before the customization starts, so it touched fewer chunks; what is
    // ordered is among them and within the 1/16 share of the overlay's chunks.
    assert!(n("resume_accessed_chunks") > 0, "{report}");
    assert!(
        n("resume_accessed_chunks") < n("customization_accessed_chunks"),
        "{report}"
    );
    assert!(n("working_set_chunks") > 0, "{report}");
    assert!(n("working_set_chunks") <= examined / 16, "{report}");
    synthesize_customized(&h, &base, &[], Duration::from_secs(60));
}

#[test]
fn mount_after_fill_equals_reconstruct() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    overlay(&h, &base, CUSTOMIZE, "vm.overlay", &[]);
    h.ok(&[
        "reconstruct",
        &base,
        &h.p("vm.overlay"),
        "-o",
        &h.p("rebuilt"),
    ]);
    let mnt = h.p("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    h.ok(&["mount", &base, &h.p("vm.overlay"), &mnt]);
    let guard = Unmount(PathBuf::from(&mnt));
    for (served, rebuilt) in [
        ("disk/image", "disk.img"),
        ("memory/image", "memory.img"),
        ("device-state", "device-state"),
    ] {
        let a = std::fs::read(Path::new(&mnt).join(served)).unwrap();
        let b = std::fs::read(Path::new(&h.p("rebuilt")).join(rebuilt)).unwrap();
        assert!(a == b, "{served} differs from reconstruct");
    }
    drop(guard);
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
    }
}

#[test]
fn overlay_memory_trace_matches_full_scan() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    // The same captured VM, overlaid twice: memory candidates from the trace, and from a
    // full hash compare of the whole memory image. Both must rebuild the same memory.
    let traced = overlay(
        &h,
        &base,
        CUSTOMIZE,
        "traced.overlay",
        &["--keep-capture", &h.p("capture")],
    );
    let _ = traced;
    h.ok(&[
        "diff",
        &base,
        "--disk",
        &h.p("capture/disk.img"),
        "--memory",
        &h.p("capture/memory.img"),
        "--device-state",
        &h.p("capture/device-state"),
        "-o",
        &h.p("full.overlay"),
    ]);
    h.ok(&[
        "reconstruct",
        &base,
        &h.p("traced.overlay"),
        "-o",
        &h.p("a"),
    ]);
    h.ok(&["reconstruct", &base, &h.p("full.overlay"), "-o", &h.p("b")]);
    for f in ["disk.img", "memory.img"] {
        let a = std::fs::read(Path::new(&h.p("a")).join(f)).unwrap();
        let b = std::fs::read(Path::new(&h.p("b")).join(f)).unwrap();
        assert!(a == b, "{f}: the trace missed changed chunks");
    }
    let (t, f) = (info(&h, "traced.overlay"), info(&h, "full.overlay"));
    assert_eq!(t["memory"]["changed_chunks"], f["memory"]["changed_chunks"]);
    assert_eq!(t["disk"]["changed_chunks"], f["disk"]["changed_chunks"]);
}

#[test]
fn overlay_trimmed_file_leaves_no_chunks() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let base = h.guest_base(256);
    overlay(&h, &base, CUSTOMIZE, "plain.overlay", &[]);
    let trimmed = overlay(&h, &base, CUSTOMIZE_AND_TRIM, "trim.overlay", &[]);
    assert!(
        trimmed["disk_discarded"].as_u64().unwrap() >= 512,
        "{trimmed}"
    );
    let (p, t) = (info(&h, "plain.overlay"), info(&h, "trim.overlay"));
    let payload = |v: &serde_json::Value| {
        let c = &v["disk"]["classes"];
        c["xor"].as_u64().unwrap() + c["raw"].as_u64().unwrap()
    };
    // 512 chunks of random data were written; none of them may survive in the overlay.
    assert!(payload(&t) < payload(&p) + 64, "plain {p}\ntrimmed {t}");
}

#[test]
fn overlay_disk_from_trace_alone_is_independent_of_disk_size() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let _lock = vm_lock();
    let h = Scratch::new();
    let small = h.guest_base(256);
    let large = h.guest_base(2048);
    let a = overlay(&h, &small, CUSTOMIZE, "small.overlay", &[]);
    let b = overlay(&h, &large, CUSTOMIZE, "large.overlay", &[]);
    let cand = |v: &serde_json::Value| v["disk_candidates"].as_u64().unwrap();
    let examined = |v: &serde_json::Value| v["stats"]["examined_chunks"].as_u64().unwrap();
    // An 8x larger disk: the capture examines only traced chunks, so about the same number.
    assert!(cand(&b) < cand(&a) * 2 + 64, "small {a}\nlarge {b}");
    assert!(examined(&b) < examined(&a) * 2 + 64, "small {a}\nlarge {b}");
    let (ia, ib) = (info(&h, "small.overlay"), info(&h, "large.overlay"));
    let changed = |v: &serde_json::Value| v["disk"]["changed_chunks"].as_i64().unwrap();
    assert!(
        (changed(&ia) - changed(&ib)).abs() < 64,
        "small {ia}\nlarge {ib}"
    );
}
