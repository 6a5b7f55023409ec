//! The real `cloudlet` binary, command by command.

use cloudlet_e2e::{cloudlet, mutate, random_image, Mutations, Rng};
use std::path::Path;

struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    fn new() -> Self {
        Cli {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn home(&self) -> std::path::PathBuf {
        self.dir.path().join("home")
    }
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = cloudlet(&self.home(), args);
        assert_eq!(code, 0, "cloudlet {args:?} failed: {err}");
        out
    }
    fn fails(&self, args: &[&str]) -> (i32, String) {
        let (code, _, err) = cloudlet(&self.home(), args);
        assert_ne!(code, 0, "cloudlet {args:?} should fail");
        (code, err)
    }
    /// Writes base and custom images; registers the base; returns its id.
    fn setup(&self) -> String {
        let mut rng = Rng::new(77);
        let bd = random_image(&mut rng, 200 << 10);
        let bm = random_image(&mut rng, 100 << 10);
        let (mut cd, mut cm) = (bd.clone(), bm.clone());
        let muts = Mutations {
            new: 10,
            zero: 3,
            from_base: 5,
            repeated: 4,
        };
        mutate(&mut rng, &bd, &bm, &mut cd, &mut cm, muts);
        for (n, d) in [("bd", &bd), ("bm", &bm), ("cd", &cd), ("cm", &cm)] {
            std::fs::write(self.p(n), d).unwrap();
        }
        std::fs::write(self.p("ds"), b"device state bytes").unwrap();
        let out = self.ok(&[
            "add-base",
            "--disk",
            &self.p("bd"),
            "--memory",
            &self.p("bm"),
            "--name",
            "tiny",
        ]);
        out.trim().to_string()
    }
    /// `cloudlet diff` of the custom images against base `id`, into `ov`.
    fn overlay(&self, id: &str) {
        self.ok(&[
            "diff",
            id,
            "--disk",
            &self.p("cd"),
            "--memory",
            &self.p("cm"),
            "-o",
            &self.p("ov"),
        ]);
    }
    /// Registers a second, unrelated base; returns its id.
    fn other_base(&self) -> String {
        let mut rng = Rng::new(5);
        std::fs::write(self.p("od"), random_image(&mut rng, 8192)).unwrap();
        let out = self.ok(&[
            "add-base",
            "--disk",
            &self.p("od"),
            "--memory",
            &self.p("od"),
            "--link",
        ]);
        out.trim().to_string()
    }
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(Path::new(p)).unwrap()
}

#[test]
fn cli_diff_reconstruct_round_trip_is_byte_identical() {
    let cli = Cli::new();
    let id = cli.setup();
    assert_eq!(id.len(), 64);
    cli.ok(&[
        "diff",
        &id,
        "--disk",
        &cli.p("cd"),
        "--memory",
        &cli.p("cm"),
        "--device-state",
        &cli.p("ds"),
        "-o",
        &cli.p("ov"),
        "--segment-kib",
        "8",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["info-overlay", &cli.p("ov"), "--json"])).unwrap();
    assert_eq!(info["base_id"], id.as_str());
    assert_eq!(info["codec"], "xz");
    assert!(info["segments"].as_u64().unwrap() >= 2);
    cli.ok(&["verify", &cli.p("ov"), "--base", "tiny"]);
    cli.ok(&["reconstruct", &id[..8], &cli.p("ov"), "-o", &cli.p("out")]);
    assert!(read(&cli.p("out/disk.img")) == read(&cli.p("cd")));
    assert!(read(&cli.p("out/memory.img")) == read(&cli.p("cm")));
    assert_eq!(read(&cli.p("out/device-state")), b"device state bytes");
}

#[test]
fn cli_list_export_import_delete_base() {
    let cli = Cli::new();
    let id = cli.setup();
    let list: serde_json::Value = serde_json::from_str(&cli.ok(&["list-base", "--json"])).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["name"], "tiny");
    cli.ok(&["export-base", &id, "-o", &cli.p("pkg")]);
    cli.ok(&["del-base", &id]);
    let list: serde_json::Value = serde_json::from_str(&cli.ok(&["list-base", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
    let imported = cli.ok(&["import-base", &cli.p("pkg")]);
    assert_eq!(imported.trim(), id);
}

#[test]
fn cli_import_tampered_package_is_refused_and_leaves_nothing() {
    let cli = Cli::new();
    let id = cli.setup();
    cli.ok(&["export-base", &id, "-o", &cli.p("pkg")]);
    cli.ok(&["del-base", &id]);
    let mut pkg = read(&cli.p("pkg"));
    let n = pkg.len();
    pkg[n - 5] ^= 1;
    std::fs::write(cli.p("bad"), &pkg).unwrap();
    let (code, err) = cli.fails(&["import-base", &cli.p("bad")]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("SHA-256"), "{err}");
    let bases: Vec<_> = std::fs::read_dir(cli.home().join("bases"))
        .unwrap()
        .collect();
    assert!(bases.is_empty(), "import left files behind");
}

#[test]
fn cli_import_package_with_path_in_names_cannot_escape() {
    let cli = Cli::new();
    let id = cli.setup();
    cli.ok(&["export-base", &id, "-o", &cli.p("pkg")]);
    cli.ok(&["del-base", &id]);
    // Swap the manifest's kind for a path: the manifest only accepts kinds.
    let pkg = read(&cli.p("pkg"));
    let text = String::from_utf8_lossy(&pkg[16..]).into_owned();
    assert!(text.contains("\"kind\":\"device-state\""));
    let tampered = String::from_utf8_lossy(&pkg).replacen(
        "\"kind\":\"device-state\"",
        "\"kind\":\"../../x\"",
        1,
    );
    std::fs::write(cli.p("bad"), tampered.as_bytes()).unwrap();
    let (code, err) = cli.fails(&["import-base", &cli.p("bad")]);
    assert_eq!(code, 3, "{err}");
    assert!(!cli.dir.path().join("x").exists());
}

#[test]
fn cli_reconstruct_with_wrong_base_is_refused() {
    let cli = Cli::new();
    let id = cli.setup();
    cli.overlay(&id);
    let other = cli.other_base();
    let (code, err) = cli.fails(&["reconstruct", &other, &cli.p("ov"), "-o", &cli.p("out")]);
    assert_eq!(code, 3);
    assert!(err.contains("was made for base"), "{err}");
}

#[test]
fn cli_corrupt_overlay_is_refused_with_exit_3() {
    let cli = Cli::new();
    let id = cli.setup();
    cli.overlay(&id);
    let mut ov = read(&cli.p("ov"));
    let n = ov.len();
    ov[n - 3] ^= 0x55;
    std::fs::write(cli.p("ov"), ov).unwrap();
    let (code, err) = cli.fails(&["verify", &cli.p("ov")]);
    assert_eq!(code, 3);
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn cli_missing_base_gives_clear_error() {
    let cli = Cli::new();
    let (code, err) = cli.fails(&["del-base", "nosuchbase"]);
    assert_eq!(code, 1);
    assert!(err.contains("No base matches"), "{err}");
}

/// Whether process `pid` has ended (gone, or a zombie not yet reaped).
fn ended(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn cli_mount_says_why_it_cannot_mount_and_exits_with_a_meaningful_code() {
    if !cloudlet_e2e::require_fuse() {
        return;
    }
    let cli = Cli::new();
    let id = cli.setup();
    cli.overlay(&id);
    let mut rng = Rng::new(9);
    std::fs::write(cli.p("junk"), random_image(&mut rng, 8192)).unwrap();
    let other = cli.other_base();
    let mnt = cli.p("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The detached daemon's own words reach the user, once, with its exit code.
    let cases: [(&str, &str, String, &str, i32, &str); 4] = [
        (
            "missing overlay",
            &id,
            cli.p("missing"),
            &mnt,
            1,
            "No such file",
        ),
        ("not an overlay", &id, cli.p("junk"), &mnt, 3, "bad magic"),
        (
            "overlay of another base",
            &other,
            cli.p("ov"),
            &mnt,
            3,
            "was made for base",
        ),
        (
            "missing mount point",
            &id,
            cli.p("ov"),
            "/nonexistent/mnt",
            1,
            "/nonexistent/mnt",
        ),
    ];
    for (what, base, overlay, at, want, says) in cases {
        let (code, err) = cli.fails(&["mount", base, &overlay, at]);
        assert_eq!(code, want, "{what}: {err}");
        assert_eq!(err.matches(says).count(), 1, "{what}: {err}");
        assert!(!err.contains("error: cloudletfs exited"), "{what}: {err}");
    }
    // Mounted: stdout is the pid of the daemon serving the mount; unmount ends it.
    let pid = cli.ok(&["mount", &id, &cli.p("ov"), &mnt]);
    let pid = pid.trim();
    assert!(pid.parse::<u32>().is_ok(), "not a pid: {pid:?}");
    // A second mount on top would hide the first and pass for mounted: refused, either way.
    for fg in [&[][..], &["--foreground"][..]] {
        let (code, err) = cli.fails(&[&["mount", &id, &cli.p("ov"), &mnt][..], fg].concat());
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("already a mount point"), "{err}");
    }
    let served = std::fs::read(Path::new(&mnt).join("disk/image"));
    cli.ok(&["unmount", &mnt]);
    assert_eq!(served.unwrap(), read(&cli.p("cd")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ended(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon {pid} still runs after unmount"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn cli_base_cloud_init_user_data_without_header_is_refused_before_booting() {
    let cli = Cli::new();
    std::fs::write(cli.p("disk.img"), vec![0u8; 4096]).unwrap();
    std::fs::write(cli.p("user-data.yaml"), "users:\n  - name: debian\n").unwrap();

    let (code, err) = cli.fails(&[
        "base",
        &cli.p("disk.img"),
        "--cloud-init",
        &cli.p("user-data.yaml"),
    ]);

    assert_eq!(code, 3, "{err}");
    assert!(err.contains("#cloud-config"), "{err}");
    assert!(bases_empty(&cli), "a base was registered after the refusal");
}

#[test]
fn cli_base_cloud_init_missing_user_data_is_refused() {
    let cli = Cli::new();
    std::fs::write(cli.p("disk.img"), vec![0u8; 4096]).unwrap();

    let (code, err) = cli.fails(&[
        "base",
        &cli.p("disk.img"),
        "--cloud-init",
        &cli.p("no-such-user-data.yaml"),
    ]);

    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no-such-user-data.yaml"), "{err}");
}

fn bases_empty(cli: &Cli) -> bool {
    std::fs::read_dir(cli.home().join("bases"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}
