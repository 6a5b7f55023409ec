//! Input a cloudlet must refuse before it runs anything, through the real `cloudlet` binary:
//!
//! * an overlay whose memory image is not its base's size: `cloudlet synthesis` exits with
//!   code 3 before the FUSE mount and QEMU, leaving no mount and no run folder; `cloudlet
//!   server` refuses it before `Accepted` (`BadOverlay`), and the client exits with code 3;
//! * a disk grown past `--max-disk-growth-mib` is refused the same way;
//! * a base package whose launch config passes raw QEMU arguments: `import-base` refuses it
//!   (code 3, the arguments shown) unless `--trust-extra-args`, which warns loudly; `list-base`
//!   shows them.

use crate::server::{client_output, start_server_with};
use cloudlet_e2e::{cloudlet, require_fuse, Fixture, Rng};
use std::path::Path;
use synth::format::Metadata;

/// A base (in the fixture's registry, `home/`) and a valid overlay of it
/// (`format_errors::valid`), written to a file.
pub(crate) fn base_and_overlay() -> (Fixture, std::path::PathBuf) {
    let (fx, bytes) = crate::format_errors::valid();
    let p = fx.path("valid.overlay");
    std::fs::write(&p, bytes).unwrap();
    (fx, p)
}

/// Writes a copy of `overlay` whose metadata `f` changed (with a correct metadata digest, so
/// only the check against the base can refuse it) to `out`.
pub(crate) fn rewrite(overlay: &Path, out: &Path, f: impl FnOnce(&mut Metadata)) {
    let bytes = std::fs::read(overlay).unwrap();
    std::fs::write(out, crate::format_errors::with_meta(&bytes, f)).unwrap();
}

/// Cloudletfs mounts and folders left under `home/tmp`.
fn leftovers(home: &Path) -> (Vec<String>, Vec<String>) {
    let tmp = home.join("tmp").display().to_string();
    let mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&tmp))
        .map(str::to_owned)
        .collect();
    let dirs = std::fs::read_dir(&tmp)
        .map(|d| d.map(|e| e.unwrap().path().display().to_string()).collect())
        .unwrap_or_default();
    (mounts, dirs)
}

#[test]
fn synthesis_memory_size_other_than_base_refused_with_code_3_nothing_left() {
    if !require_fuse() {
        return;
    }
    let (fx, valid) = base_and_overlay();
    let bad = fx.path("bigger-memory.overlay");
    rewrite(&valid, &bad, |m| m.memory.size += 4096);
    let home = fx.dir.path().join("home");

    let (code, _, err) = cloudlet(
        &home,
        &["synthesis", &fx.base.record.id, bad.to_str().unwrap()],
    );

    assert_eq!(code, 3, "{err}");
    let base = fx.base.record.memory_size;
    assert!(
        err.contains("memory image")
            && err.contains(&(base + 4096).to_string())
            && err.contains(&base.to_string()),
        "{err}"
    );
    let (mounts, dirs) = leftovers(&home);
    assert!(mounts.is_empty(), "{mounts:?}");
    assert!(dirs.is_empty(), "{dirs:?}");
}

#[test]
fn synthesis_disk_past_max_disk_growth_refused_with_code_3() {
    if !require_fuse() {
        return;
    }
    let (fx, valid) = base_and_overlay();
    let grown = fx.path("grown-disk.overlay");
    // 2 MiB past a 128 KiB base disk: past the default growth (the base's size) and past a
    // 1 MiB limit.
    let disk = fx.base.record.disk_size;
    rewrite(&valid, &grown, |m| m.disk.size = disk + (2 << 20));
    let home = fx.dir.path().join("home");
    let id = fx.base.record.id.clone();
    let run = |extra: &[&str]| {
        let mut args = vec!["synthesis", &id, grown.to_str().unwrap()];
        args.extend_from_slice(extra);
        cloudlet(&home, &args)
    };

    let (default_code, _, default_err) = run(&[]);
    let (limited_code, _, limited_err) = run(&["--max-disk-growth-mib", "1"]);

    assert_eq!(default_code, 3, "{default_err}");
    assert!(default_err.contains("more than the"), "{default_err}");
    assert_eq!(limited_code, 3, "{limited_err}");
    let limit = disk + (1 << 20);
    assert!(limited_err.contains(&limit.to_string()), "{limited_err}");
    let (mounts, dirs) = leftovers(&home);
    assert!(mounts.is_empty() && dirs.is_empty(), "{mounts:?} {dirs:?}");
}

#[test]
fn server_memory_size_other_than_base_refused_before_accepted_client_code_3() {
    let (fx, valid) = base_and_overlay();
    let bad = fx.path("bigger-memory.overlay");
    rewrite(&valid, &bad, |m| m.memory.size += 4096);
    let h = cloudlet_e2e::Scratch {
        dir: tempfile::tempdir().unwrap(),
    };
    // The server's registry is the fixture's.
    std::os::unix::fs::symlink(fx.dir.path().join("home"), h.home()).unwrap();
    let token = h.p("token");
    std::fs::write(&token, "limits-token\n").unwrap();
    let server = start_server_with(&h, &["--token-file", &token]);

    let (code, err) = client_output(&server, &token, &["--overlay", bad.to_str().unwrap()]);

    assert_eq!(code, 3, "{err}");
    assert!(err.contains("invalid overlay"), "{err}");
    assert!(err.contains("memory image"), "{err}");
    assert!(
        !err.contains("accepted"),
        "refused only after Accepted: {err}"
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("overlay refused"), "{log}");
    assert!(!log.contains("accepted overlay"), "{log}");
}

/// A launch config with raw QEMU arguments, as a package exported from `home`.
fn package_with_extra_args(dir: &Path, home: &Path, args: &[&str]) -> String {
    let mut rng = Rng::new(41);
    let disk = dir.join("d.img");
    let memory = dir.join("m.img");
    std::fs::write(&disk, cloudlet_e2e::random_image(&mut rng, 64 << 10)).unwrap();
    std::fs::write(&memory, cloudlet_e2e::random_image(&mut rng, 32 << 10)).unwrap();
    let config = dir.join("launch.json");
    std::fs::write(
        &config,
        serde_json::json!({ "extra_args": args }).to_string(),
    )
    .unwrap();
    let p = |x: &Path| x.display().to_string();
    let (code, out, err) = cloudlet(
        home,
        &[
            "add-base",
            "--disk",
            &p(&disk),
            "--memory",
            &p(&memory),
            "--config",
            &p(&config),
            "--name",
            "with-args",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let pkg = dir.join("base.pkg");
    let (code, _, err) = cloudlet(home, &["export-base", out.trim(), "-o", &p(&pkg)]);
    assert_eq!(code, 0, "{err}");
    p(&pkg)
}

#[test]
fn import_base_raw_qemu_args_refused_without_trust_accepted_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-monitor", "tcp:0.0.0.0:4444,server,nowait"];
    let pkg = package_with_extra_args(dir.path(), &dir.path().join("src"), &args);
    let home = dir.path().join("dst");

    let (refused, _, refused_err) = cloudlet(&home, &["import-base", &pkg]);
    let (_, listed_before, _) = cloudlet(&home, &["list-base", "--json"]);
    let (trusted, out, trusted_err) = cloudlet(&home, &["import-base", &pkg, "--trust-extra-args"]);
    let (_, listed, _) = cloudlet(&home, &["list-base", "--json"]);
    let (_, table, _) = cloudlet(&home, &["list-base"]);

    assert_eq!(refused, 3, "{refused_err}");
    assert!(
        refused_err.contains("raw arguments to QEMU") && refused_err.contains("tcp:0.0.0.0:4444"),
        "{refused_err}"
    );
    let before: Vec<serde_json::Value> = serde_json::from_str(&listed_before).unwrap();
    assert!(before.is_empty(), "imported anyway: {before:?}");
    assert_eq!(trusted, 0, "{trusted_err}");
    assert!(
        trusted_err.contains("WARNING") && trusted_err.contains("tcp:0.0.0.0:4444"),
        "{trusted_err}"
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], out.trim());
    assert_eq!(rows[0]["raw_qemu_args"], serde_json::json!(args));
    assert!(table.contains("-monitor"), "{table}");
}
