//! `cloudlet server` against clients that misbehave, and its admin socket, with the real
//! binaries, real sockets and the real test guest:
//!
//! * two clients that send one byte a second — one in the handshake, one in its first `Head`
//!   frame after authenticating — are cut off by the server's deadlines (`Refused{Timeout}`)
//!   while a well-behaved client is served (VM resumed, page answered through the mapped port);
//! * `list-session` shows the live sessions (state, base, QEMU pid, ports); `close-session`
//!   ends one and returns only once its VM is gone, its mount removed and its run folder
//!   deleted; an unknown id exits with code 4;
//! * a throttled client that resumed its VM early vanishes (SIGKILL) in the middle of its
//!   segments: the server stops the VM, unmounts, removes its temporary files, frees the slot,
//!   and serves the next client.

use crate::server::{
    client, file_len, lines, mapped_port, start_server_with, throttled_early_client, tmp,
    wait_event, Proc, Server,
};
use cloudlet_e2e::{cloudlet, http_get, open_overlay, require_fuse, require_qemu, Scratch};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use synth::protocol::{
    encode_msg, read_msg, ClientMsg, RefuseReason, ServerMsg, TimeoutStream, FRAME_MAX,
    PROTOCOL_VERSION,
};

/// The server's idle timeout in this test: a frame must complete within it.
const IDLE_TIMEOUT_S: &str = "30";
/// Bytes a slow client trickles at most (the server must cut it off before).
const TRICKLE_MAX: usize = 150;

/// `cloudlet list-session --json` of the server running on `h`'s registry.
pub(crate) fn sessions(h: &Scratch) -> Vec<serde_json::Value> {
    let out = h.ok(&["list-session", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("list-session --json: {e}: {out}"))
}

/// Waits until the server lists no session (every slot free), up to `timeout`.
pub(crate) fn wait_no_sessions(h: &Scratch, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let v = sessions(h);
        if v.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "sessions still live: {v:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts, right now, that no QEMU process runs and no mount and no run folder is left
/// under `h`'s registry.
pub(crate) fn assert_clean(h: &Scratch) {
    let tmp = tmp(h);
    let ps = std::process::Command::new("pgrep")
        .args(["-af", &tmp])
        .output()
        .unwrap();
    let procs = String::from_utf8_lossy(&ps.stdout);
    assert!(procs.is_empty(), "QEMU left running: {procs}");
    let mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&tmp))
        .map(str::to_owned)
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let dirs: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "run folders left: {dirs:?}");
}

fn frame(msg: &ClientMsg) -> Vec<u8> {
    encode_msg(msg, FRAME_MAX).unwrap()
}

/// A client that sends `fast` at once, then `slow` one byte a second (at most
/// [`TRICKLE_MAX`]), until the server answers `Refused`/`Error` or closes. Returns the
/// messages it got and how many slow bytes it sent.
fn slowloris(server: &Server, fast: Vec<u8>, slow: Vec<u8>) -> JoinHandle<(Vec<ServerMsg>, usize)> {
    // Over TLS, each slow byte is a record of its own.
    let s = Arc::new(crate::server::tls_connect(server));
    std::thread::spawn(move || {
        (&*s).write_all(&fast).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let r = Arc::clone(&s);
            r.set_timeout(Some(Duration::from_secs(TRICKLE_MAX as u64 + 60)))
                .unwrap();
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Ok(m) = read_msg::<ServerMsg>(&mut &*r, FRAME_MAX) {
                    let last = matches!(m, ServerMsg::Refused { .. } | ServerMsg::Error { .. });
                    got.push(m);
                    if last {
                        break;
                    }
                }
                done.store(true, Ordering::SeqCst);
                got
            })
        };
        let mut sent = 0;
        for b in slow.iter().take(TRICKLE_MAX) {
            if done.load(Ordering::SeqCst) || (&*s).write_all(&[*b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        (reader.join().unwrap(), sent)
    })
}

/// Exit code, stdout and stderr of `cloudlet close-session ID`.
fn close_session(h: &Scratch, id: u64) -> (i32, String, String) {
    cloudlet(&h.home(), &["close-session", &id.to_string()])
}

/// The one listed session with QEMU running.
fn vm_session(list: &[serde_json::Value]) -> &serde_json::Value {
    let with_vm: Vec<_> = list.iter().filter(|s| s["qemu_pid"].is_u64()).collect();
    assert_eq!(with_vm.len(), 1, "{list:?}");
    with_vm[0]
}

/// Starts an early-start client for guest port 8080 and checks that the customized page
/// answers through the port it reports; returns the client and that port.
fn served_client(h: &Scratch, server: &Server, token: &str, overlay: &str) -> (Proc, u16) {
    let args = [
        "--overlay",
        overlay,
        "--early-start",
        "--port",
        "8080",
        "--json",
    ];
    let mut c = client(h, server, token, &args);
    let rx = lines(c.child());
    let port = mapped_port(&wait_event(&rx, "resumed", Duration::from_secs(180)));
    let body = http_get(port, "/custom.txt", Duration::from_secs(120));
    assert_eq!(body.trim(), "overlay-made-42");
    (c, port)
}

fn start(h: &Scratch, token: &str) -> Server {
    start_server_with(
        h,
        &[
            "--token-file",
            token,
            "--max-sessions",
            "3",
            "--idle-timeout",
            IDLE_TIMEOUT_S,
        ],
    )
}

#[test]
fn server_hostile_clients_cut_off_closed_or_cleaned_up_others_served() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let h = Scratch::new();
    let base = h.guest_base(256);
    let overlay = crate::server::overlay(&h, &base);
    let token = h.p("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let server = start(&h, &token);

    // The admin socket is the owner's only, and there is nothing to list yet.
    let sock = h.home().join("server.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", sock.display());
    assert!(sessions(&h).is_empty());
    assert_eq!(h.ok(&["list-session"]).trim(), "no sessions");

    // Two slow clients: one trickles its Hello, the other authenticates and starts an
    // overlay, then trickles its first Head frame.
    let hello = |token: &[u8]| {
        frame(&ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            token: token.to_vec(),
        })
    };
    let slow_hello = slowloris(&server, Vec::new(), hello(&[b'x'; 400]));
    let meta = open_overlay(std::path::Path::new(&overlay)).unwrap();
    let mut fast = hello(b"s3cret-token");
    fast.extend(frame(&ClientMsg::StartOverlay {
        early_start: true,
        guest_ports: vec![8080],
        file_len: meta.file_len(),
        head_len: meta.data_start(),
    }));
    let head = frame(&ClientMsg::Head {
        offset: 0,
        bytes: vec![0u8; 4096],
    });
    let slow_head = slowloris(&server, fast, head);
    // The second one is listed as receiving its metadata, nothing received.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let v = sessions(&h);
        if let Some(s) = v.iter().find(|s| s["state"] == "metadata") {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "slow client not listed: {v:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["bytes_received"], 0, "{listed}");
    assert!(listed["qemu_pid"].is_null(), "{listed}");

    // A well-behaved client is served meanwhile.
    let (mut c, port) = served_client(&h, &server, &token, &overlay);
    let listed = sessions(&h);
    let s = vm_session(&listed);
    assert_eq!(s["base_id"], base.as_str(), "{s}");
    assert_eq!(s["ports"][0]["guest"], 8080, "{s}");
    assert_eq!(s["ports"][0]["host_port"], port, "{s}");
    assert!(
        ["filling", "running"].contains(&s["state"].as_str().unwrap()),
        "{s}"
    );
    let pid = s["qemu_pid"].as_u64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // Its QEMU is confined, and list-session says how.
    let confinement = s["confinement"].as_str().unwrap_or_default();
    assert!(confinement.contains("seccomp, cgroup v"), "{s}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // As root (CI), the session's QEMU runs as its own uid, and list-session names it.
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_default()
        .to_owned();
    if std::fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        == Some(0)
    {
        assert_ne!(uid, "0", "{status}");
        assert!(
            confinement.starts_with(&format!("uid {uid}, mount namespace, seccomp, ")),
            "{s}"
        );
        let (ns, host_ns) = (
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
            std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        );
        assert_ne!(
            ns, host_ns,
            "a server session's QEMU runs in its own mount namespace"
        );
    }
    let id = s["id"].as_u64().unwrap();

    // Both slow clients were cut off before they could finish a frame.
    for (name, t) in [("hello", slow_hello), ("head", slow_head)] {
        let (got, sent) = t.join().unwrap();
        assert!(
            sent < TRICKLE_MAX,
            "{name}: never cut off ({sent} bytes sent)"
        );
        assert!(
            matches!(
                got.last(),
                Some(ServerMsg::Refused {
                    reason: RefuseReason::Timeout
                })
            ),
            "{name}: {got:?}"
        );
    }

    // close-session ends the served client's session; once it returns, everything is gone.
    let (code, out, err) = close_session(&h, id);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("session {id} closed")), "{out}");
    assert_clean(&h);
    assert!(sessions(&h).is_empty());
    let status = c.child().wait().unwrap();
    assert!(!status.success(), "client survived close-session");
    // The id is gone now: "not found" has its own exit code.
    let (code, _, err) = close_session(&h, id);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains(&format!("no live session {id}")), "{err}");

    // A throttled client (about 30 s of upload) resumes early, then vanishes mid-stream.
    let total = file_len(&overlay);
    let mut c = throttled_early_client(&h, &server, &token, &overlay, &[]);
    let rx = lines(c.child());
    wait_event(&rx, "resumed", Duration::from_secs(180));
    // Wait for some segment bytes beyond the metadata, then check the upload is unfinished.
    let deadline = Instant::now() + Duration::from_secs(30);
    let received = loop {
        let listed = sessions(&h);
        let n = vm_session(&listed)["bytes_received"].as_u64().unwrap();
        if n > meta.data_start() || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        received > meta.data_start() && received < total,
        "not mid-stream: {received} of {total} bytes"
    );
    let _ = c.stop("KILL", Duration::from_secs(10));
    wait_no_sessions(&h, Duration::from_secs(60));
    assert_clean(&h);

    // The server still serves: the next client's page answers, and it finishes cleanly.
    let (c, _) = served_client(&h, &server, &token, &overlay);
    assert!(c.stop("INT", Duration::from_secs(60)), "client failed");
    wait_no_sessions(&h, Duration::from_secs(60));
    assert_clean(&h);

    let log_path = server.log.clone();
    assert!(
        server.proc.stop("TERM", Duration::from_secs(60)),
        "server did not end cleanly"
    );
    assert!(!sock.exists(), "admin socket left behind");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("closed by the operator"), "{log}");
}
