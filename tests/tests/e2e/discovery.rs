//! Discovery end to end: the real `cloudlet server --advertise` is found by the real
//! `cloudlet client --discover` (port, addresses and every TXT field checked), `--server auto`
//! connects to it, and after SIGTERM its goodbye removes it from a search under way.
//!
//! Everything runs in a private network namespace whose only interface is loopback with
//! multicast on ([`require_netns`]), so no mDNS packet leaves this machine and no other
//! cloudlet on the network can answer.

use cloudlet_e2e::{random_image, require_netns, workspace_bin, Netns, Rng, Scratch};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Port the advertised server listens on (the namespace is private, so it is free).
const PORT: u16 = 18021;
const NAME: &str = "test cloudlet";

/// `cloudlet --home HOME ARGS` inside the namespace.
fn cloudlet(ns: &Netns, h: &Scratch, args: &[&str]) -> Command {
    let mut c = ns.command(workspace_bin("cloudlet"));
    c.arg("--home").arg(h.home()).args(args);
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("run cloudlet");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// `cloudlet client --discover --json` for `secs` seconds: the list it printed.
fn discover(ns: &Netns, h: &Scratch, secs: &str) -> (Vec<serde_json::Value>, String) {
    let (code, out, err) = run(&mut cloudlet(
        ns,
        h,
        &["client", "--discover", "--timeout", secs, "--json"],
    ));
    assert_eq!(code, 0, "discover failed:\n{err}");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (list, err)
}

/// Waits until `path` contains `text` (the server's log), at most `timeout`.
fn wait_for_log(path: &str, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `sig` to `child` (still running).
fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} failed");
}

#[test]
fn discovery_advertised_server_found_auto_connects_gone_after_sigterm() {
    let Some(ns) = require_netns() else {
        return;
    };
    let h = Scratch::new();
    let mut rng = Rng::new(5);
    std::fs::write(h.p("disk.img"), random_image(&mut rng, 64 << 10)).unwrap();
    std::fs::write(h.p("memory.img"), random_image(&mut rng, 64 << 10)).unwrap();
    let base = h.ok(&[
        "add-base",
        "--disk",
        &h.p("disk.img"),
        "--memory",
        &h.p("memory.img"),
        "--name",
        "web-base",
    ]);
    let base = base.trim();
    let token = h.p("token");
    std::fs::write(&token, "s3cret\n").unwrap();

    // Nothing announced yet: an empty list is no error, and stderr says so.
    let (list, err) = discover(&ns, &h, "2");
    assert!(list.is_empty(), "{list:?}");
    assert!(err.contains("no cloudlets found"), "{err}");

    let log = h.p("server.log");
    let mut server = KillOnDrop(
        cloudlet(&ns, &h, &["server", "--listen"])
            .arg(format!("0.0.0.0:{PORT}"))
            .args(["--max-sessions", "3", "--token-file", &token])
            .args(["--advertise", "--advertise-name", NAME])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_log(&log, "advertising", Duration::from_secs(30));

    // Found, with the listen port, a loopback address and every TXT field.
    let (list, err) = discover(&ns, &h, "5");
    assert_eq!(list.len(), 1, "{list:?}\n{err}");
    let c = &list[0];
    assert_eq!(c["name"], NAME, "{c}");
    assert_eq!(c["port"], PORT, "{c}");
    assert_eq!(c["addresses"][0], "127.0.0.1", "{c}");
    assert_eq!(
        c["protocol_version"],
        synth::protocol::PROTOCOL_VERSION,
        "{c}"
    );
    assert_eq!(c["max_sessions"], 3, "{c}");
    assert_eq!(c["token_required"], true, "{c}");
    assert_eq!(c["base_count"], 1, "{c}");
    assert_eq!(c["bases"][0]["id_prefix"], base[..16], "{c}");
    assert_eq!(c["bases"][0]["name"], "web-base", "{c}");
    // The certificate fingerprint the server printed at start is announced.
    let printed = std::fs::read_to_string(&log).unwrap();
    let fingerprint = printed
        .lines()
        .find_map(|l| l.strip_prefix("TLS certificate "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fingerprint printed: {printed}"));
    assert_eq!(c["fingerprint"], fingerprint, "{c}");

    // `--server auto` connects to it (the tiny golden overlay's base is not there, so the
    // server refuses it once connected).
    let overlay = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/tiny.overlay");
    let (code, _, err) = run(cloudlet(
        &ns,
        &h,
        &["client", "--server", "auto", "--overlay", overlay],
    )
    .args(["--token-file", &token, "--finish", "--timeout", "5"]));
    assert_ne!(code, 0, "{err}");
    let at = format!("127.0.0.1:{PORT}");
    assert!(
        err.contains(&format!("discovered \"{NAME}\" at {at}")),
        "{err}"
    );
    assert!(err.contains(&format!("connected to {at}")), "{err}");
    assert!(err.contains("is not registered on this server"), "{err}");
    // First contact, checked against the announcement, recorded loudly.
    assert!(
        err.contains("NEW SERVER") && err.contains("mDNS announcement"),
        "{err}"
    );
    let known = std::fs::read_to_string(h.home().join("known_servers")).unwrap();
    assert!(known.contains(&format!("{at} {fingerprint}")), "{known}");

    // A search under way sees the server's goodbye when it stops: the server is gone from
    // the final list long before its records would have expired.
    let mut watcher = cloudlet(
        &ns,
        &h,
        &["client", "--discover", "--timeout", "20", "--json"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut progress = BufReader::new(watcher.stderr.take().unwrap()).lines();
    let found = progress
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("found"));
    assert_eq!(found.as_deref(), Some("found \"test cloudlet\""));
    signal(&server.0, "TERM");
    let status = server.0.wait().unwrap();
    assert!(status.success(), "server failed: {status}");
    wait_for_log(&log, "unregistered", Duration::ZERO);
    let rest: Vec<String> = progress.map_while(Result::ok).collect();
    let out = watcher.wait_with_output().unwrap();
    assert!(out.status.success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l == "gone \"test cloudlet\""),
        "{rest:?}"
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.is_empty(), "{list:?}");
}

#[test]
fn discovery_bad_arguments_refused_exit_2() {
    // Refused while parsing arguments, before any socket is opened.
    let h = Scratch::new();
    for args in [
        &["client", "--discover", "--timeout", "0"][..],
        &["client", "--discover", "--timeout", "forever"],
        &["client", "--discover", "--server", "127.0.0.1"],
        &["server", "--advertise-name", "lonely"],
    ] {
        let (code, _, err) = cloudlet_e2e::cloudlet(&h.home(), args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
}

/// A child SIGKILLed on drop unless it was waited for (the test failed before stopping it).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
