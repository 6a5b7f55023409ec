//! `cloudlet server` and `cloudlet client` end to end with the real test guest: an overlay sent
//! over TCP resumes on the server and its customized page answers through the reported port;
//! a throttled upload shows the VM answering before the fill ends, with segments asked on
//! demand; hostile clients (wrong token, URL outside the allowed prefixes, a 4 GiB frame, one
//! client too many) are refused without harming the server; and no QEMU process or cloudletfs
//! mount outlives a session.
//!
//! Everything runs in one test so that a single base and overlay serve every check and at
//! most one QEMU of this module runs at a time.

use cloudlet_e2e::{http_get, require_fuse, require_qemu, workspace_bin, Scratch};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};
use synth::protocol::{RefuseReason, ServerMsg, HANDSHAKE_FRAME_MAX};

/// Writes a page the HTTP service serves, then 4 MiB of random data (so that segments, not
/// the metadata, make up most of the overlay and a throttled upload takes a while), and syncs.
const CUSTOMIZE: &str = "\
echo overlay-made-$((6*7)) > /srv/www/custom.txt
wget -qO- http://127.0.0.1:8080/cgi-bin/counter
dd if=/dev/urandom of=/srv/bulk.bin bs=4096 count=1024
sync
";

/// `cloudlet overlay` of `base` customized by [`CUSTOMIZE`]; returns the overlay's path.
pub(crate) fn overlay(h: &Scratch, base: &str) -> String {
    let script = h.p("customize.sh");
    std::fs::write(&script, CUSTOMIZE).unwrap();
    let out = h.p("vm.overlay");
    h.ok(&["overlay", base, "-o", &out, "--run", &script, "--json"]);
    out
}

/// The folder every session's run folder (mount point, QEMU sockets) lives in.
pub(crate) fn tmp(h: &Scratch) -> String {
    h.home().join("tmp").display().to_string()
}

/// A child process killed (SIGTERM) on drop.
pub(crate) struct Proc(Option<Child>);

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

impl Proc {
    pub(crate) fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    /// Sends `sig` and waits at most `timeout` for the exit; returns whether it succeeded.
    pub(crate) fn stop(mut self, sig: &str, timeout: Duration) -> bool {
        let mut child = self.0.take().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        signal(&child, sig);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Never signal a reaped child: its pid may belong to another process by now.
            if matches!(child.try_wait(), Ok(None)) {
                signal(&child, "TERM");
                let _ = child.wait();
            }
        }
    }
}

/// Lines a child prints on stdout, as they arrive.
pub(crate) fn lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next JSON line whose `event` is `event`, or `None` if the client ended or `timeout`
/// passed first.
pub(crate) fn next_event(
    rx: &Receiver<String>,
    event: &str,
    timeout: Duration,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        if v["event"] == event {
            return Some(v);
        }
    }
}

/// The next JSON line whose `event` is `event`, within `timeout`.
pub(crate) fn wait_event(
    rx: &Receiver<String>,
    event: &str,
    timeout: Duration,
) -> serde_json::Value {
    next_event(rx, event, timeout)
        .unwrap_or_else(|| panic!("no {event:?} event within {timeout:?}"))
}

/// A threaded HTTP/1.1 server of one file with Range support, on a free loopback port; it
/// serves the file under any path.
fn range_server(data: Vec<u8>) -> u16 {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let data = std::sync::Arc::new(data);
    std::thread::spawn(move || {
        for mut c in listener.incoming().map_while(Result::ok) {
            let data = std::sync::Arc::clone(&data);
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut range = None;
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 && line.trim_end() != "" {
                    let l = line.trim_end().to_ascii_lowercase();
                    if let Some((a, b)) = l
                        .strip_prefix("range: bytes=")
                        .and_then(|v| v.split_once('-'))
                    {
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    }
                    line.clear();
                }
                let (a, b) = range.unwrap_or((0, data.len() - 1));
                let b = b.min(data.len() - 1);
                let _ = write!(
                    c,
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    data.len(),
                    b + 1 - a
                );
                let _ = c.write_all(&data[a..=b]);
            });
        }
    });
    port
}

pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) addr: String,
    pub(crate) log: PathBuf,
    /// The fingerprint of its TLS certificate, as it printed it at start.
    pub(crate) fingerprint: String,
}

fn start_server(h: &Scratch, token: &str, allow: &str) -> Server {
    let args = ["--token-file", token, "--max-sessions", "1"];
    start_server_with(h, &[&args[..], &["--allow-url-prefix", allow]].concat())
}

/// Starts `cloudlet server` on a free loopback port with `args`, logging to `server.log`;
/// returns once it accepts connections. Readiness is read from the server's own "listening
/// on" line, not probed with a connection: a probe would hold the server's only session slot
/// until the server saw it close, and the test's first client could be refused as busy.
pub(crate) fn start_server_with(h: &Scratch, args: &[&str]) -> Server {
    let port = synth::vm::free_tcp_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let log = PathBuf::from(h.p("server.log"));
    let child = Command::new(workspace_bin("cloudlet"))
        .env("RUST_LOG", "info")
        .arg("--home")
        .arg(h.home())
        .args(["server", "--listen", &addr])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let listening = format!("cloudlet server listening on {addr}");
    let fingerprint = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let fp = text
            .lines()
            .find_map(|l| l.strip_prefix("TLS certificate "))
            .and_then(|rest| rest.split_whitespace().next());
        if let (true, Some(fp)) = (text.contains(&listening), fp) {
            break fp.to_string();
        }
        assert!(Instant::now() < deadline, "server never listened");
        std::thread::sleep(Duration::from_millis(100));
    };
    Server {
        proc: Proc(Some(child)),
        addr,
        log,
        fingerprint,
    }
}

pub(crate) fn client(h: &Scratch, server: &Server, token: &str, args: &[&str]) -> Proc {
    let child = Command::new(workspace_bin("cloudlet"))
        .arg("--home")
        .arg(h.home())
        .args(["client", "--server", &server.addr, "--token-file", token])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc(Some(child))
}

/// A client that uploads `overlay` in about 30 s (rate-limited), resuming early with guest
/// port 8080 forwarded and JSON events on stdout; `extra` arguments are added.
pub(crate) fn throttled_early_client(
    h: &Scratch,
    server: &Server,
    token: &str,
    overlay: &str,
    extra: &[&str],
) -> Proc {
    let rate = (file_len(overlay) / 30).max(16 << 10).to_string();
    let mut args = vec![
        "--overlay",
        overlay,
        "--early-start",
        "--port",
        "8080",
        "--rate-limit",
        &rate,
        "--json",
    ];
    args.extend_from_slice(extra);
    client(h, server, token, &args)
}

/// Runs a client to its end, pinned to the server's printed fingerprint; returns (exit code,
/// stderr).
pub(crate) fn client_output(server: &Server, token: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin("cloudlet"))
        .args(["client", "--server", &server.addr, "--token-file", token])
        .args(["--server-fingerprint", &server.fingerprint])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TLS connection to `server`, pinned to its fingerprint, for sending raw bytes.
pub(crate) fn tls_connect(server: &Server) -> synth::protocol::TlsConn {
    let pin = synth::protocol::Pin {
        fingerprint: server.fingerprint.parse().unwrap(),
        source: synth::protocol::PinSource::Explicit,
    };
    let s = std::net::TcpStream::connect(&server.addr).unwrap();
    synth::protocol::tls::connect(s, Some(pin), Instant::now() + Duration::from_secs(15)).unwrap()
}

/// Sends `bytes` on a fresh TLS connection and reads the server's answer.
fn raw_hello(server: &Server, bytes: &[u8]) -> ServerMsg {
    use std::io::Write;
    use synth::protocol::TimeoutStream;
    let mut s = tls_connect(server);
    s.set_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    synth::protocol::read_msg(&mut s, HANDSHAKE_FRAME_MAX).unwrap()
}

/// The first port mapping of a `resumed` event.
pub(crate) fn mapped_port(resumed: &serde_json::Value) -> u16 {
    let p = &resumed["ports"][0];
    assert_eq!(p["guest"], 8080, "{resumed}");
    assert_eq!(p["host"], "127.0.0.1", "{resumed}");
    u16::try_from(p["port"].as_u64().unwrap()).unwrap()
}

/// QEMU processes and cloudletfs mounts under `tmp`, after waiting up to 20 s for them to go.
pub(crate) fn leftovers(tmp: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ps = Command::new("pgrep").args(["-af", tmp]).output().unwrap();
        let procs = String::from_utf8_lossy(&ps.stdout).into_owned();
        let mounts: String = std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .filter(|l| l.contains(tmp))
            .collect();
        if (procs.is_empty() && mounts.is_empty()) || Instant::now() > deadline {
            return (procs, mounts);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(crate) fn file_len(p: &str) -> u64 {
    std::fs::metadata(Path::new(p)).unwrap().len()
}

#[test]
fn server_sessions_resume_refuse_and_clean_up() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let h = Scratch::new();
    let base = h.guest_base(256);
    let overlay = overlay(&h, &base);
    let token = h.p("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let bad_token = h.p("bad-token");
    std::fs::write(&bad_token, "guess\n").unwrap();
    let http = range_server(std::fs::read(&overlay).unwrap());
    let allowed = format!("http://127.0.0.1:{http}/allowed/");
    let mut server = start_server(&h, &token, &allowed);

    // (c) Hostile clients are refused and leave the server serving.
    let (code, err) = client_output(&server, &bad_token, &["--overlay", &overlay, "--finish"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    let (code, err) = client_output(
        &server,
        &token,
        &[
            "--url",
            &format!("http://127.0.0.1:{http}/elsewhere/vm.overlay"),
        ],
    );
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("not allowed"), "{err}");
    let reply = raw_hello(&server, &u32::MAX.to_le_bytes());
    assert!(
        matches!(
            reply,
            ServerMsg::Refused {
                reason: RefuseReason::Invalid(_)
            }
        ),
        "{reply:?}"
    );

    // (a) Early start: the customized page answers through the reported port.
    let mut c = client(
        &h,
        &server,
        &token,
        &[
            "--overlay",
            &overlay,
            "--early-start",
            "--port",
            "8080",
            "--json",
        ],
    );
    let rx = lines(c.child());
    let resumed = wait_event(&rx, "resumed", Duration::from_secs(180));
    let port = mapped_port(&resumed);
    let running = Command::new("pgrep")
        .args(["-f", &tmp(&h)])
        .output()
        .unwrap();
    assert!(running.status.success(), "no QEMU under {}", tmp(&h));
    let body = http_get(port, "/custom.txt", Duration::from_secs(120));
    assert_eq!(body.trim(), "overlay-made-42");
    wait_event(&rx, "fill_done", Duration::from_secs(180));
    // The only session slot is taken: a second client is refused as busy.
    let (code, err) = client_output(&server, &token, &["--overlay", &overlay, "--finish"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("busy"), "{err}");
    assert!(c.stop("INT", Duration::from_secs(60)), "client failed");
    let (procs, mounts) = leftovers(&tmp(&h));
    assert!(procs.is_empty(), "QEMU left running: {procs}");
    assert!(mounts.is_empty(), "mounts left: {mounts}");

    // (b) A throttled upload (about 30 s): the VM answers before the fill ends, and the
    // server asks for segments on demand. The client's own probe reports that answer with
    // what it had sent by then.
    let started = Instant::now();
    let extra = ["--finish", "--ready-http-path", "/custom.txt"];
    let mut c = throttled_early_client(&h, &server, &token, &overlay, &extra);
    let rx = lines(c.child());
    let resumed = wait_event(&rx, "resumed", Duration::from_secs(180));
    let port = mapped_port(&resumed);
    let body = http_get(port, "/custom.txt", Duration::from_secs(180));
    let answered = started.elapsed();
    assert_eq!(body.trim(), "overlay-made-42");
    let first = wait_event(&rx, "first_answer", Duration::from_secs(180));
    let fill = wait_event(&rx, "fill_done", Duration::from_secs(300));
    let filled = started.elapsed();
    eprintln!("throttled: answered after {answered:?}, fill done after {filled:?}: {fill}");
    assert!(
        answered < filled,
        "answered {answered:?}, filled {filled:?}"
    );
    assert!(
        fill["stats"]["demand_requests"].as_u64().unwrap() > 0,
        "{fill}"
    );
    let closed = wait_event(&rx, "closed", Duration::from_secs(60));
    assert!(closed["demand_requests"].as_u64().unwrap() > 0, "{closed}");
    assert_eq!(
        first["url"],
        format!("http://127.0.0.1:{port}/custom.txt"),
        "{first}"
    );
    let sent_then = first["bytes_sent"].as_u64().unwrap();
    assert!(sent_then > 0, "{first}");
    assert!(
        sent_then < closed["bytes_sent"].as_u64().unwrap(),
        "{first} {closed}"
    );
    assert!(
        first["segments_sent"].as_u64() < first["segments_total"].as_u64(),
        "{first}"
    );
    let status = c.child().wait().unwrap();
    assert!(status.success(), "throttled client failed: {status}");
    let (procs, mounts) = leftovers(&tmp(&h));
    assert!(procs.is_empty(), "QEMU left running: {procs}");
    assert!(mounts.is_empty(), "mounts left: {mounts}");

    // (e) Flow 2: the server fetches the overlay from an allowed URL by HTTP range requests.
    let url = format!("{allowed}vm.overlay");
    let mut c = client(
        &h,
        &server,
        &token,
        &["--url", &url, "--early-start", "--port", "8080", "--json"],
    );
    let rx = lines(c.child());
    let resumed = wait_event(&rx, "resumed", Duration::from_secs(180));
    let body = http_get(
        mapped_port(&resumed),
        "/custom.txt",
        Duration::from_secs(180),
    );
    assert_eq!(body.trim(), "overlay-made-42");
    let fill = wait_event(&rx, "fill_done", Duration::from_secs(300));
    assert_eq!(
        fill["stats"]["segments_received"], fill["stats"]["segments_total"],
        "{fill}"
    );
    assert!(c.stop("INT", Duration::from_secs(60)), "URL client failed");
    let (procs, mounts) = leftovers(&tmp(&h));
    assert!(procs.is_empty(), "QEMU left running: {procs}");
    assert!(mounts.is_empty(), "mounts left: {mounts}");

    // (f) Eager start (the VM resumes once every segment is in), then the client vanishes
    // (SIGKILL) mid-session: the server cleans up all the same.
    let eager = ["--overlay", &overlay, "--port", "8080", "--json"];
    let mut c = client(&h, &server, &token, &eager);
    let rx = lines(c.child());
    let resumed = wait_event(&rx, "resumed", Duration::from_secs(180));
    let fill = wait_event(&rx, "fill_done", Duration::from_secs(60));
    assert_eq!(resumed["timings"]["fill_done_ms"], serde_json::Value::Null);
    assert!(fill["timings"]["resumed_ms"].is_u64(), "{fill}");
    let body = http_get(
        mapped_port(&resumed),
        "/custom.txt",
        Duration::from_secs(120),
    );
    assert_eq!(body.trim(), "overlay-made-42");
    let _ = c.stop("KILL", Duration::from_secs(10));
    let (procs, mounts) = leftovers(&tmp(&h));
    assert!(procs.is_empty(), "QEMU left running: {procs}");
    assert!(mounts.is_empty(), "mounts left: {mounts}");

    // The server is still up; SIGTERM ends its running session (the client is told and
    // fails) and the server itself cleanly.
    assert!(server.proc.child().try_wait().unwrap().is_none());
    let hold = [
        "--overlay",
        &overlay,
        "--early-start",
        "--port",
        "8080",
        "--json",
    ];
    // The slot of the killed client's session is freed just after its cleanup (checked above):
    // a client arriving in between is refused as busy, so try again until one is served.
    let mut c = (0..40)
        .find_map(|_| {
            let mut c = client(&h, &server, &token, &hold);
            let rx = lines(c.child());
            if next_event(&rx, "resumed", Duration::from_secs(180)).is_some() {
                return Some(c);
            }
            let _ = c.child().wait();
            std::thread::sleep(Duration::from_millis(250));
            None
        })
        .expect("no client was served after the previous session ended");
    let log_path = server.log.clone();
    assert!(
        server.proc.stop("TERM", Duration::from_secs(60)),
        "server did not end cleanly:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let status = c.child().wait().unwrap();
    assert!(!status.success(), "client survived the server's end");
    let (procs, mounts) = leftovers(&tmp(&h));
    assert!(procs.is_empty(), "QEMU left running: {procs}");
    assert!(mounts.is_empty(), "mounts left: {mounts}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("VM stopped, cloudletfs unmounted"), "{log}");
}
