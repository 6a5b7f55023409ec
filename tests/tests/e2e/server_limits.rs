//! `cloudlet server`'s admission, with real sockets from 127.0.0.1 and the real binaries:
//!
//! * a server on a non-loopback address without a token does not start, unless
//!   `--insecure-no-token`, which it warns about;
//! * past `--max-connections-per-ip` raw TCP connections from one address, the next one is
//!   closed at once (the server logs it for that very peer) and a well-behaved client from the
//!   same address is turned away too; once the raw connections close, the client is served;
//! * past `--max-handshakes` unauthenticated connections, the next one is closed at once;
//! * unauthenticated connections do not hold session slots: with one slot and three of them
//!   open, an authenticated client still gets its session.
//!
//! "Served" here means the session got as far as the overlay check: the client sends an
//! overlay whose memory size differs from its base's and is refused with exit code 3, which
//! only happens after the handshake, the token and a session slot. No QEMU is needed.

use crate::refusals::{base_and_overlay, rewrite};
use crate::server::{client_output, start_server_with, Server};
use cloudlet_e2e::{workspace_bin, Fixture, Scratch};
use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A server on the fixture's registry with a token and `args`; the refused overlay's path and
/// the token file.
fn setup(args: &[&str]) -> (Fixture, Scratch, Server, String, String) {
    let (fx, valid) = base_and_overlay();
    let bad = fx.path("bigger-memory.overlay");
    rewrite(&valid, &bad, |m| m.memory.size += 4096);
    let h = Scratch::new();
    std::os::unix::fs::symlink(fx.dir.path().join("home"), h.home()).unwrap();
    let token = h.p("token");
    std::fs::write(&token, "admission-token\n").unwrap();
    let server = start_server_with(&h, &[&["--token-file", token.as_str()], args].concat());
    let bad = bad.display().to_string();
    (fx, h, server, bad, token)
}

/// Raw TCP connections to the server that send nothing (they wait in the TLS handshake).
fn hold(server: &Server, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect()
}

/// Connections that complete the TLS handshake, then send nothing (they wait for `Hello`).
fn hold_tls(server: &Server, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            crate::server::tls_connect(server)
                .socket()
                .try_clone()
                .unwrap()
        })
        .collect()
}

/// Whether the server still holds `s` open: reads what is there (TLS records the server sent,
/// unused here) until no more is available (open) or the stream ends (closed).
fn still_open(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 4096];
    let open = loop {
        match s.read(&mut b) {
            Ok(0) => break false,
            Ok(_) => {}
            Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
        }
    };
    s.set_nonblocking(false).unwrap();
    open
}

/// Opens one more raw connection and reads from it until the server closes it; returns its
/// local address. The read is bounded far beyond the server's handshake timeout; the caller
/// checks the server's log to tell "closed at once" from "timed out".
fn one_too_many(server: &Server) -> String {
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut b = [0u8; 64];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server sent bytes to a connection it should have closed"
    );
    s.local_addr().unwrap().to_string()
}

/// Runs `check` with the connections `open` makes held; retries (at most 3 times) when the
/// server closed any of them before `check` ended (its handshake timeout passed on a slow
/// machine), since the check then proved nothing.
fn with_held<T>(open: impl Fn() -> Vec<TcpStream>, check: impl Fn() -> T) -> T {
    for _ in 0..3 {
        let held = open();
        let out = check();
        if held.iter().all(still_open) {
            return out;
        }
        eprintln!("a held connection timed out during the check; trying again");
    }
    panic!("held connections never outlived the check");
}

/// Runs the well-behaved client until it is served (exit code 3, see the module doc), up to
/// 60 s: the server frees a closed connection's admission once its thread sees the close.
fn served_eventually(server: &Server, token: &str, bad: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, err) = client_output(server, token, &["--overlay", bad]);
        if code == 3 {
            assert!(err.contains("invalid overlay"), "{err}");
            return;
        }
        assert!(Instant::now() < deadline, "never served: {code} {err}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn server_non_loopback_without_token_refused_insecure_flag_warns() {
    let h = Scratch::new();
    let port = synth::vm::free_tcp_port().unwrap().to_string();
    let listen = format!("0.0.0.0:{port}");

    let out = Command::new(workspace_bin("cloudlet"))
        .arg("--home")
        .arg(h.home())
        .args(["server", "--listen", &listen])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs --token-file"), "{err}");

    let log = h.p("insecure.log");
    let mut child = Command::new(workspace_bin("cloudlet"))
        .arg("--home")
        .arg(h.home())
        .args(["server", "--listen", &listen, "--insecure-no-token"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("listening on") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains(&format!("listening on {listen}")), "{text}");
    assert!(text.contains("WITHOUT A TOKEN"), "{text}");
}

#[test]
fn server_per_ip_limit_closes_the_next_connection_at_once_and_turns_clients_away() {
    let (_fx, _h, server, bad, token) = setup(&["--max-connections-per-ip", "3"]);

    let (extra, (code, err)) = with_held(
        || hold(&server, 3),
        || {
            (
                one_too_many(&server),
                client_output(&server, &token, &["--overlay", &bad]),
            )
        },
    );

    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains(&format!(
            "{extra}: too many connections from this address (3"
        )),
        "{log}"
    );
    assert!(
        code != 0 && code != 3,
        "served past the limit: {code} {err}"
    );
    served_eventually(&server, &token, &bad);
}

#[test]
fn server_handshake_pool_full_closes_the_next_connection_at_once() {
    let (_fx, _h, server, bad, token) = setup(&["--max-handshakes", "2"]);

    let extra = with_held(|| hold(&server, 2), || one_too_many(&server));

    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains(&format!(
            "{extra}: too many connections in the handshake (2"
        )),
        "{log}"
    );
    served_eventually(&server, &token, &bad);
}

#[test]
fn server_unauthenticated_connections_hold_no_session_slot() {
    let (_fx, _h, server, bad, token) = setup(&["--max-sessions", "1"]);

    // Past TLS, waiting for their Hello: where the server used to take a slot.
    let (code, err) = with_held(
        || hold_tls(&server, 3),
        || client_output(&server, &token, &["--overlay", &bad]),
    );

    assert_eq!(code, 3, "not served while others handshake: {err}");
    assert!(err.contains("invalid overlay"), "{err}");
}
