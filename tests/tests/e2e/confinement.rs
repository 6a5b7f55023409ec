//! Every VM the tools start is confined: a real `cloudlet synthesis` of the test guest (TCG)
//! runs its QEMU under the seccomp filter (`Seccomp: 2` in `/proc/PID/status`) and in a
//! cgroup of its own with the memory and task limits asked for, the customized service still
//! answers, and the cgroup is gone once the synthesis ends. Run as root (as CI does), QEMU runs
//! as a uid and gid of its own with no supplementary groups, and the session's files are that
//! uid's alone; and in a mount namespace of its own (the launcher's jail) whose root holds
//! `/usr`, a few `/dev` nodes and that session's files only: no registry, `/home`, `/etc`,
//! `/proc`. QEMU started through cloudlet's
//! launcher: its guest RAM mapping of `memory/image` comes from the memory mount (readahead
//! sized for page faults) and has no huge-page advice, so faults read a few KiB around.

use cloudlet_e2e::{http_get, require_fuse, require_qemu, workspace_bin, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The cgroup folders `pid` is in for memory, pids and cpu, with the file holding each limit:
/// one folder for cgroup v2, the three hierarchies' folders for v1.
fn cgroup_dirs(pid: u32) -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let root = Path::new("/sys/fs/cgroup");
    let path_of = |ctrl: &str| {
        text.lines()
            .find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                let hit = if ctrl.is_empty() {
                    ctrls.is_empty()
                } else {
                    ctrls.split(',').any(|c| c == ctrl)
                };
                hit.then(|| path.trim_start_matches('/').to_owned())
            })
            .unwrap_or_else(|| panic!("no {ctrl:?} line in {text}"))
    };
    if root.join("cgroup.controllers").exists() {
        let d = root.join(path_of(""));
        vec![
            ("memory.max".into(), d.clone()),
            ("pids.max".into(), d.clone()),
            ("cpu.max".into(), d),
        ]
    } else {
        vec![
            (
                "memory.limit_in_bytes".into(),
                root.join("memory").join(path_of("memory")),
            ),
            ("pids.max".into(), root.join("pids").join(path_of("pids"))),
            (
                "cpu.cfs_quota_us".into(),
                root.join("cpu").join(path_of("cpu")),
            ),
        ]
    }
}

/// The guest RAM mapping of `pid` (the one of a `memory/image`): its path and its `VmFlags`.
fn ram_mapping(pid: u32) -> (PathBuf, Vec<String>) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut current: Option<PathBuf> = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(path) = current.take() {
                return (path, flags.split_whitespace().map(String::from).collect());
            }
        } else if fields.len() >= 6 && fields[0].contains('-') {
            current =
                Some(PathBuf::from(fields[5..].join(" "))).filter(|p| p.ends_with("memory/image"));
        }
    }
    panic!("no memory/image mapping in /proc/{pid}/smaps");
}

/// The readahead (KiB) of the file system that holds `path`.
fn readahead_kib(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00));
    std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn synthesis_qemu_in_seccomp_and_own_cgroup_with_limits_removed_after() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let h = Scratch::new();
    let base = h.guest_base(64);
    let script = h.p("customize.sh");
    std::fs::write(
        &script,
        "echo confined-$((6*7)) > /srv/www/custom.txt\nsync\n",
    )
    .unwrap();
    let overlay = h.p("vm.overlay");
    h.ok(&["overlay", &base, "-o", &overlay, "--run", &script, "--json"]);
    let port = synth::vm::free_tcp_port().unwrap();

    let mut child = Command::new(workspace_bin("cloudlet"))
        .env("CLOUDLET_HOME", h.home())
        .env("RUST_LOG", "info")
        .args(["synthesis", &base, &overlay, "--early-start", "--json"])
        .args(["--hostfwd", &format!("tcp:127.0.0.1:{port}-:8080")])
        .args(["--qemu-memory-limit-mib", "700", "--qemu-pids-limit", "300"])
        .args(["--qemu-cpu-percent", "150"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(h.p("synthesis.log")).unwrap())
        .spawn()
        .unwrap();
    // Read on (until the end) so that synthesis's later lines never meet a closed pipe.
    let rx = crate::server::lines(&mut child);
    let resumed = crate::server::wait_event(&rx, "VM resumed", Duration::from_secs(180));
    let pid: u32 = resumed["detail"]["vm"]
        .as_str()
        .and_then(|s| s.strip_prefix("QEMU pid "))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{resumed}"));
    let body = http_get(port, "/custom.txt", Duration::from_secs(180));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let memory_image_owner = {
        use std::os::unix::fs::MetadataExt;
        let (path, _) = ram_mapping(pid);
        let m = std::fs::metadata(&path).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o777)
    };
    let dirs = cgroup_dirs(pid);
    let (ram_path, ram_flags) = ram_mapping(pid);
    let memory_mount = ram_path.parent().unwrap().parent().unwrap().to_path_buf();
    let disk_mount = memory_mount.with_file_name("mnt");
    let (memory_ra, disk_ra) = (readahead_kib(&ram_path), readahead_kib(&disk_mount));
    let limits: Vec<String> = dirs
        .iter()
        .map(|(file, d)| std::fs::read_to_string(d.join(file)).unwrap())
        .collect();
    // What QEMU sees as `/`, read while it runs (its root, seen from the host).
    let mount_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let (qemu_ns, host_ns) = (mount_ns(&pid.to_string()), mount_ns("self"));
    let jail_root = PathBuf::from(format!("/proc/{pid}/root"));
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let in_jail = |p: &Path| jail_root.join(p.strip_prefix("/").unwrap());
    let jail_top = listing(&jail_root);
    let jail_dev = listing(&jail_root.join("dev"));
    let home = h.home();
    let registry_seen = listing(&in_jail(&home));
    let base_dir = home.join("bases").join(&base);
    let base_files_seen = listing(&in_jail(&base_dir));
    let run_folder = memory_mount.parent().unwrap().to_path_buf();
    let run_folder_seen = listing(&in_jail(&run_folder));
    let jail_sees_ram = in_jail(&ram_path).exists();
    let jail_sees_shadow = in_jail(Path::new("/etc/shadow")).exists();
    let jail_sees_home = in_jail(Path::new("/home")).exists();
    let jail_sees_proc = in_jail(Path::new("/proc/self")).exists();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let ended = child.wait().unwrap();

    assert_eq!(body.trim(), "confined-42");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "{status}"
    );
    for (_, d) in &dirs {
        let name = d.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("cloudlet-synthesis-"), "{}", d.display());
    }
    // The launcher's filter turned QEMU's MADV_HUGEPAGE into a no-op: no `hg` flag.
    assert!(!ram_flags.iter().any(|f| f == "hg"), "{ram_flags:?}");
    assert!(
        ram_path.starts_with(&memory_mount),
        "{}",
        ram_path.display()
    );
    assert_eq!(memory_mount.file_name().unwrap(), "mnt-memory");
    assert_eq!((memory_ra, disk_ra), (16, 4096));
    assert_eq!(limits[0].trim(), (700u64 << 20).to_string());
    let ids = |field: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"))
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid() == 0
    };
    if root {
        // Real, effective, saved and file-system ids: all the session's own, none root.
        let uid = ids("Uid:");
        assert_eq!(uid.len(), 4, "{status}");
        assert!(uid.iter().all(|&u| u == uid[0] && u >= 400_000), "{status}");
        assert_eq!(ids("Gid:"), uid, "{status}");
        assert!(ids("Groups:").is_empty(), "{status}");
        assert_eq!(memory_image_owner, (uid[0], uid[0], 0o600));
        let log = std::fs::read_to_string(h.p("synthesis.log")).unwrap();
        assert!(
            log.contains(&format!("uid {}, mount namespace", uid[0])),
            "{log}"
        );
        // The jail: a mount namespace of its own whose root holds the system part and the
        // session's own paths only.
        assert_ne!(qemu_ns, host_ns);
        // The system part the host has, and the top folder of the session's paths.
        let mut expected: Vec<String> = ["bin", "dev", "lib", "lib64", "sbin", "usr"]
            .into_iter()
            .filter(|n| Path::new("/").join(n).exists())
            .map(String::from)
            .collect();
        let top = home
            .components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        expected.push(top.into_owned());
        expected.sort();
        expected.dedup();
        assert_eq!(jail_top, expected);
        for dev in &jail_dev {
            assert!(
                ["null", "zero", "full", "random", "urandom", "kvm"].contains(&dev.as_str()),
                "{jail_dev:?}"
            );
        }
        // The registry is there only as the paths to this session's run folder and to its
        // base's kernel and initrd: none of its images, no other base.
        assert_eq!(registry_seen, ["bases", "tmp"]);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base_dir.join("base.json")).unwrap()).unwrap();
        let mut boot_files: Vec<String> = ["kernel", "initrd"]
            .iter()
            .map(|k| record["config"][k].as_str().unwrap().to_string())
            .collect();
        boot_files.sort();
        assert_eq!(base_files_seen, boot_files);
        assert_eq!(run_folder_seen, ["mnt", "mnt-memory", "run"]);
        assert!(jail_sees_ram);
        assert!(!jail_sees_shadow && !jail_sees_proc);
        assert!(!jail_sees_home || home.starts_with("/home"));
    }
    assert_eq!(limits[1].trim(), "300");
    // 150% of one CPU: 150 ms per 100 ms period (v2 writes "QUOTA PERIOD").
    assert_eq!(
        limits[2].split_whitespace().next(),
        Some("150000"),
        "{limits:?}"
    );
    let log = std::fs::read_to_string(h.p("synthesis.log")).unwrap();
    assert!(ended.success(), "{ended}: {log}");
    for (_, d) in &dirs {
        assert!(!d.exists(), "cgroup left behind: {}", d.display());
    }
    assert!(log.contains("memory 700 MiB, 300 tasks, CPU 150%"), "{log}");
}

/// The pids of `parent`'s children whose command name starts with `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID …": COMM may hold spaces, so split after its ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if stat[open + 1..close].starts_with(name) && ppid == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn synthesis_guest_outbound_runs_passt_as_the_session_uid_and_serves_through_it() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let h = Scratch::new();
    let base = h.guest_base(64);
    // A LAN service of this host (answers every request) and a loopback-only one (must never
    // see the guest).
    let lan = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let lan_port = lan.local_addr().unwrap().port();
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lo_port = lo.local_addr().unwrap().port();
    lo.set_nonblocking(true).unwrap();
    std::thread::spawn(move || loop {
        let _ = cloudlet_e2e::answer_once(lan.try_clone().unwrap()).join();
    });
    // The customized guest keeps trying both, once a second: in vain while it is captured
    // (isolated), then from the resumed VM through passt.
    let script = h.p("customize.sh");
    std::fs::write(
        &script,
        format!(
            "echo out-$((6*7)) > /srv/www/custom.txt\n\
             (while true; do timeout 5 wget -q -O /srv/www/lan.txt http://{}:{lan_port}/; \
             timeout 5 wget -q -O /srv/www/lo.txt http://10.0.2.2:{lo_port}/; sleep 1; done) \
             </dev/null >/dev/null 2>&1 &\nsync\n",
            cloudlet_e2e::host_lan_address()
        ),
    )
    .unwrap();
    let overlay = h.p("vm.overlay");
    h.ok(&["overlay", &base, "-o", &overlay, "--run", &script, "--json"]);
    let port = synth::vm::free_tcp_port().unwrap();

    let mut child = Command::new(workspace_bin("cloudlet"))
        .env("CLOUDLET_HOME", h.home())
        .env("RUST_LOG", "info")
        .args(["synthesis", &base, &overlay, "--early-start", "--json"])
        .args(["--hostfwd", &format!("tcp:127.0.0.1:{port}-:8080")])
        .arg("--guest-outbound")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(h.p("synthesis.log")).unwrap())
        .spawn()
        .unwrap();
    let rx = crate::server::lines(&mut child);
    let resumed = std::panic::catch_unwind(|| {
        crate::server::wait_event(&rx, "VM resumed", Duration::from_secs(180))
    })
    .unwrap_or_else(|_| {
        let log = std::fs::read_to_string(h.p("synthesis.log")).unwrap_or_default();
        panic!("no VM resumed: {log}")
    });
    let qemu: u32 = resumed["detail"]["vm"]
        .as_str()
        .and_then(|s| s.strip_prefix("QEMU pid "))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{resumed}"));
    // The forwarded port is passt's now: the answer came through it.
    let body = http_get(port, "/custom.txt", Duration::from_secs(180));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut from_lan = String::new();
    while from_lan != "lan-ok" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        from_lan = http_get(port, "/lan.txt", Duration::from_secs(30));
    }
    let passt = children_named(child.id(), "passt");
    let uid_of = |pid: u32| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}")).unwrap().uid()
    };
    let (qemu_uid, passt_uids): (u32, Vec<u32>) =
        (uid_of(qemu), passt.iter().map(|&p| uid_of(p)).collect());
    let cmdline = passt
        .first()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap())
        .unwrap_or_default();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let ended = child.wait().unwrap();
    let log = std::fs::read_to_string(h.p("synthesis.log")).unwrap();

    assert!(ended.success(), "{ended}: {log}");
    assert_eq!(body.trim(), "out-42");
    assert_eq!(from_lan, "lan-ok", "the resumed guest did not get out");
    let reached = lo.accept();
    assert!(
        matches!(&reached, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's loopback service saw a connection from the guest: {reached:?}"
    );
    assert_eq!(passt_uids, vec![qemu_uid], "passt {passt:?}, QEMU {qemu}");
    assert!(
        cmdline.split('\0').any(|a| a == "--no-map-gw"),
        "{cmdline:?}"
    );
    assert!(log.contains("--guest-outbound"), "{log}");
    for p in passt {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "passt {p} outlived its session"
        );
    }
}

#[test]
fn base_capture_qemu_runs_as_its_own_uid_in_a_jail_and_cgroup() {
    use std::os::unix::fs::MetadataExt;
    if !require_qemu() || !require_fuse() {
        return;
    }
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: a capture's QEMU gets a uid of its own only when run as root");
        return;
    }
    let h = Scratch::new();
    let g = cloudlet_e2e::guest(64);
    let d = |f: &str| g.dir.join(f).display().to_string();
    let log_path = h.p("base.log");
    // A marker the guest never prints: the capture boots and waits until SIGTERM.
    let mut child = Command::new(workspace_bin("cloudlet"))
        .env("CLOUDLET_HOME", h.home())
        .env("RUST_LOG", "info")
        .args(["base", &d("disk.img"), "--memory-mb", "256"])
        .args(["--kernel", &d("vmlinuz"), "--initrd", &d("initrd.img")])
        .args([
            "--append",
            &g.cmdline,
            "--ready",
            "NEVER-PRINTED",
            "--timeout",
            "120",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let pid: u32 = loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        let found = log.lines().find_map(|l| {
            let rest = &l[l.find("QEMU pid ")? + "QEMU pid ".len()..];
            rest.split_once(" confined:")?.0.parse().ok()
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no QEMU started: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mount_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let (qemu_ns, host_ns) = (mount_ns(&pid.to_string()), mount_ns("self"));
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let sees_home_or_etc = root.join("etc").exists() || root.join("home").exists();
    let sees_guest_folder = root
        .join(g.dir.strip_prefix("/").unwrap())
        .join("disk.img")
        .exists();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();

    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!(uid >= 400_000, "{status}");
    assert_ne!(qemu_ns, host_ns);
    assert!(!sees_home_or_etc);
    // The disk it boots is the run folder's copy; the guest's folder is not in the jail.
    assert!(!sees_guest_folder);
    assert!(cgroup.contains("cloudlet-base-"), "{cgroup}");
    assert!(
        log.contains(&format!("uid {uid}, mount namespace")),
        "{log}"
    );
}

#[test]
fn overlay_guest_outbound_lets_the_customization_fetch_from_the_lan_not_the_loopback() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let h = Scratch::new();
    let base = h.guest_base(64);
    let lan = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let lan_port = lan.local_addr().unwrap().port();
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lo_port = lo.local_addr().unwrap().port();
    lo.set_nonblocking(true).unwrap();
    let answered = cloudlet_e2e::answer_once(lan);
    let script = h.p("customize.sh");
    std::fs::write(
        &script,
        format!(
            "timeout 10 wget -q -O /srv/www/fetched.txt http://{}:{lan_port}/\n\
             cat /srv/www/fetched.txt; echo\n\
             if timeout 5 wget -q -O - http://10.0.2.2:{lo_port}/; then echo REACHED-LOOPBACK; \
             else echo loopback-unreachable; fi\n",
            cloudlet_e2e::host_lan_address()
        ),
    )
    .unwrap();
    let overlay = h.p("vm.overlay");

    let (code, out, err) = cloudlet_e2e::cloudlet(
        &h.home(),
        &[
            "overlay",
            &base,
            "-o",
            &overlay,
            "--run",
            &script,
            "--guest-outbound",
        ],
    );
    let isolated = cloudlet_e2e::cloudlet(
        &h.home(),
        &[
            "overlay",
            &base,
            "-o",
            &h.p("isolated.overlay"),
            "--run",
            &script,
        ],
    );

    assert_eq!(code, 0, "{out}\n{err}");
    assert!(answered.join().unwrap(), "the LAN service saw no request");
    let shown = format!("{out}{err}");
    // Lines the guest printed (the echoed commands hold these words too).
    let printed = |w: &str| shown.lines().any(|l| l.trim() == w);
    assert!(printed("lan-ok"), "{shown}");
    assert!(printed("loopback-unreachable"), "{shown}");
    assert!(!printed("REACHED-LOOPBACK"), "{shown}");
    let reached = lo.accept();
    assert!(
        matches!(&reached, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host's loopback service saw a connection from the guest: {reached:?}"
    );
    // Without the option the first command (the fetch) fails and stops the customization.
    assert_eq!(isolated.0, 5, "{}\n{}", isolated.1, isolated.2);
}

#[test]
fn synthesis_libvirt_domain_qemu_runs_as_the_session_uid_without_capabilities() {
    use std::os::unix::fs::MetadataExt;
    if !require_qemu() || !require_fuse() {
        return;
    }
    let h = Scratch::new();
    if !cloudlet_e2e::require_libvirt(&h.home()) {
        return;
    }
    let _lock = cloudlet_e2e::vm_lock();
    let base = h.guest_base(64);
    let script = h.p("customize.sh");
    std::fs::write(&script, "echo lv-$((6*7)) > /srv/www/custom.txt\nsync\n").unwrap();
    let overlay = h.p("vm.overlay");
    h.ok(&["overlay", &base, "-o", &overlay, "--run", &script, "--json"]);
    let port = synth::vm::free_tcp_port().unwrap();

    let mut child = Command::new(workspace_bin("cloudlet"))
        .env("CLOUDLET_HOME", h.home())
        .env("RUST_LOG", "info")
        .args(["synthesis", &base, &overlay, "--early-start", "--json"])
        .args([
            "--backend",
            "libvirt",
            "--libvirt-uri",
            cloudlet_e2e::LIBVIRT_URI,
        ])
        .args(["--hostfwd", &format!("tcp:127.0.0.1:{port}-:8080")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(h.p("synthesis.log")).unwrap())
        .spawn()
        .unwrap();
    let rx = crate::server::lines(&mut child);
    let resumed = crate::server::wait_event(&rx, "VM resumed", Duration::from_secs(240));
    let domain = resumed["detail"]["vm"]
        .as_str()
        .and_then(|s| s.strip_prefix("libvirt domain "))
        .unwrap_or_else(|| panic!("{resumed}"))
        .to_owned();
    let body = http_get(port, "/custom.txt", Duration::from_secs(180));
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .unwrap()
        .trim()
        .to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let ended = child.wait().unwrap();
    let log = std::fs::read_to_string(h.p("synthesis.log")).unwrap();

    assert!(ended.success(), "{ended}: {log}");
    assert_eq!(body.trim(), "lv-42");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // libvirt's own confinement is on: its seccomp filter (QEMU's -sandbox).
    assert_eq!(field("Seccomp:"), ["2"], "{status}");
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        // And QEMU holds no root: the session's uid as the domain's DAC label.
        let uid = field("Uid:");
        assert!(
            uid.iter().all(|u| u.parse::<u32>().unwrap() >= 400_000),
            "{status}"
        );
        assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
        assert!(log.contains(&format!("confined: uid {}", uid[0])), "{log}");
    }
}
