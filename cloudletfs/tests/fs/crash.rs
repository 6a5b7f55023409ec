//! `kill -9` of the daemon removes the mount; a remount with the same state keeps the writes.
//! A mount that ends never takes the next mount at the same place with it.

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
    let s = small_setup(9);
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
    let s = small_setup(10);
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

fn small_setup(seed: u64) -> Setup {
    Setup::new(
        seed,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    )
}

fn fusermount3(args: &str, mnt: &Path) {
    let st = Command::new("fusermount3")
        .arg(args)
        .arg(mnt)
        .status()
        .expect("fusermount3");
    assert!(st.success(), "fusermount3 {args} {}: {st}", mnt.display());
}

/// The first chunk of the disk image at `mnt` equals the reconstruction's.
fn serves_disk(s: &Setup, mnt: &Path) {
    let got = pread(&open_direct(&mnt.join("disk/image"), false), 0, 4096).expect("read");
    assert_eq!(got, s.disk[..4096]);
}

/// Mounts twice at one place, with `outside` (an unmount of the first mount from outside,
/// returning a file to keep open meanwhile) in between, ends the first mount, and checks that
/// the second still serves.
fn next_mount_survives(seed: u64, outside: impl FnOnce(&Path, &Mounted) -> Option<File>) {
    let s = small_setup(seed);
    let mnt = tempfile::tempdir().expect("mnt");
    let mnt_path = mnt.path().canonicalize().expect("canon");
    let mount_here =
        || mount(s.options(OverlaySource::Path(s.overlay.clone()), &mnt_path)).expect("mount");
    let first = mount_here();
    let open = outside(&mnt_path, &first);
    let second = mount_here();
    first.unmount().expect("unmount of the first mount");
    drop(open);
    assert!(is_mounted(&mnt_path), "the second mount was taken down");
    serves_disk(&s, &mnt_path);
    second.unmount().expect("unmount");
    assert!(!is_mounted(&mnt_path));
}

/// `fusermount3 -u`, then a new mount at once: the first mount, ending, must leave the new
/// one alone. (It unmounted the path again, which took the new mount half of the time.)
#[test]
fn mount_unmounted_from_outside_leaves_the_next_mount_alone() {
    if !fuse_ok() {
        return;
    }
    next_mount_survives(11, |mnt, first| {
        fusermount3("-u", mnt);
        wait_for("the first session to end", || !first.is_alive());
        None
    });
}

/// A lazy unmount from outside keeps the first session alive while a file is open; a new
/// mount at the same place is then on top, and ending the first mount must not detach it.
#[test]
fn mount_detached_from_outside_with_a_file_open_leaves_the_next_mount_alone() {
    if !fuse_ok() {
        return;
    }
    next_mount_survives(12, |mnt, first| {
        let open = open_direct(&mnt.join("disk/image"), false);
        fusermount3("-uz", mnt);
        assert!(first.is_alive(), "an open file keeps the detached session");
        Some(open)
    });
}

/// The same through the daemon, as a user runs it: `fusermount3 -u` of one daemon's mount
/// and a new daemon on the same mount point before the first has noticed (it is stopped
/// meanwhile, so that it notices last, every time).
#[test]
fn daemon_unmounted_from_outside_leaves_the_next_daemon_mounted() {
    if !fuse_ok() {
        return;
    }
    let s = small_setup(13);
    let mnt = tempfile::tempdir().expect("mnt");
    let mnt_path = mnt.path().canonicalize().expect("canon");
    let mut first = Daemon::start(&s, &mnt_path, None);
    let signal = |sig: &str, d: &Daemon| {
        let st = Command::new("kill")
            .arg(sig)
            .arg(d.0.id().to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "kill {sig}");
    };
    signal("-STOP", &first);
    fusermount3("-u", &mnt_path);
    let second = Daemon::start(&s, &mnt_path, None);
    signal("-CONT", &first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.0.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "the first daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_mounted(&mnt_path),
        "the second daemon's mount was taken down"
    );
    serves_disk(&s, &mnt_path);
    drop(second);
    wait_for("auto-unmount", || !is_mounted(&mnt_path));
}
