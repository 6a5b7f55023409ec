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
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudletfs"))
        .arg(&s.fx.base.record.id)
        .arg(&s.overlay)
        .arg(&mnt_path)
        .arg("--home")
        .arg(s.fx.path("home"))
        .arg("--state")
        .arg(&state)
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cloudletfs");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    wait_for("the mount", || {
        is_mounted(&mnt_path) || child.try_wait().ok().flatten().is_some()
    });
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "daemon exited"
    );
    let mut child = Kill(child);
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
    child.0.kill().expect("kill -9");
    child.0.wait().expect("wait");
    wait_for("auto-unmount", || !is_mounted(&mnt_path));
    let g = mount_with(&s, OverlaySource::Path(s.overlay.clone()), |o| {
        o.state_dir = Some(state.clone())
    });
    assert_eq!(first_diff(&read_all(&g.path("disk/image")), &want), None);
}
