//! `kill -9` of the daemon removes the mount; a remount with the same state keeps the writes.

use crate::*;
use std::process::{Command, Stdio};
use std::time::Instant;

fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `cloudletfs` daemon run in the foreground; killed (SIGKILL) when dropped.
struct Daemon(std::process::Child);

impl Daemon {
    /// Starts the daemon on `mnt` and waits until it has mounted.
    fn start(s: &Setup, mnt: &Path, state: Option<&Path>) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudletfs"));
        cmd.arg(&s.fx.base.record.id)
            .arg(&s.overlay)
            .arg(mnt)
            .arg("--home")
            .arg(s.fx.path("home"))
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(state) = state {
            cmd.arg("--state").arg(state);
        }
        let mut child = cmd.spawn().expect("start cloudletfs");
        wait_for("the mount", || {
            is_mounted(mnt) || child.try_wait().ok().flatten().is_some()
        });
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "daemon exited"
        );
        Daemon(child)
    }

    fn kill9(&mut self) {
        self.0.kill().expect("kill -9");
        self.0.wait().expect("wait");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill9_daemon_unmounts_and_state_survives() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        9,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let mnt = tempfile::tempdir().expect("mnt");
    let mnt_path = mnt.path().canonicalize().expect("canon");
    let state = s.fx.path("state");
    let mut child = Daemon::start(&s, &mnt_path, Some(&state));
    let mut want = s.disk.clone();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt_path.join("disk/image"))
            .expect("open");
        // No fsync: the daemon has the write once write(2) returns; only a machine crash loses it.
        f.write_all_at(b"survives kill -9", 12345).expect("write");
        want[12345..12345 + 16].copy_from_slice(b"survives kill -9");
        f.write_all_at(&[9u8; 8192], 8 * 4096).expect("write");
        want[8 * 4096..10 * 4096].fill(9);
    }
    child.kill9();
    wait_for("auto-unmount", || !is_mounted(&mnt_path));
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.state_dir = Some(state.clone())
    });
    assert_eq!(first_diff(&read_all(&g.path("disk/image")), &want), None);
}

/// fusermount3 unmounts after the daemon dies only if it then finds the connection gone. A
/// dying daemon used to close its socket to fusermount3 before its `/dev/fuse` descriptor, and
/// with the CPUs busy fusermount3 often looked in between and left the dead mount behind (a
/// third of the time with three spinning threads on two CPUs). Twenty kills with one spinning
/// thread more than there are CPUs: every mount must go.
#[test]
fn kill9_under_cpu_load_always_unmounts() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        10,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..=cpus)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut left = Vec::new();
    for round in 0..20 {
        let mnt = tempfile::tempdir().expect("mnt");
        let mnt_path = mnt.path().canonicalize().expect("canon");
        let mut d = Daemon::start(&s, &mnt_path, None);
        pread(&open_direct(&mnt_path.join("disk/image"), false), 0, 4096).expect("read");
        d.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&mnt_path) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_mounted(&mnt_path) {
            left.push(round);
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&mnt_path)
                .status();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in spinners {
        t.join().expect("spinner");
    }
    assert!(
        left.is_empty(),
        "kills that left the mount behind: {left:?}"
    );
}
