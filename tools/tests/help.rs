//! `--help` works for every command of the `cloudlet` binary.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build the
//! `cloudlet` binary before any test runs, which the end-to-end tests in `tests/` rely on.

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cloudlet"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "cloudlet {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_every_command_prints_usage() {
    let top = help(&[]);
    for cmd in [
        "base",
        "overlay",
        "synthesis",
        "mount",
        "unmount",
        "add-base",
        "list-base",
        "del-base",
        "export-base",
        "import-base",
        "diff",
        "info-overlay",
        "verify",
        "reconstruct",
        "server",
        "client",
    ] {
        assert!(top.contains(cmd), "{cmd} missing from the command list");
        assert!(help(&[cmd]).contains("Usage"), "{cmd}");
    }
}
