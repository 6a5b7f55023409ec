//! `cloudlet server` under load: 16 concurrent sessions on one base (half early start, half
//! full transfer first), each a real `cloudlet client` process and a real QEMU (TCG) whose HTTP
//! service answers through its own mapped port; a 17th client is refused as busy; every
//! session ends cleanly and leaves no QEMU process, mount or run folder behind.
//!
//! Correctness, not speed: nothing here depends on how fast the guests come up.

use crate::server::{client, client_output, lines, mapped_port, start_server_with, wait_event};
use crate::server_hostile::{assert_clean, sessions, wait_no_sessions};
use cloudlet_e2e::{http_get, require_fuse, require_qemu, Scratch};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const SESSIONS: usize = 16;

/// A small customization: one page, synced.
const CUSTOMIZE: &str = "\
echo load-$((6*7)) > /srv/www/custom.txt
sync
";

#[test]
fn server_load_16_sessions_served_and_cleaned_up() {
    if !require_qemu() || !require_fuse() {
        return;
    }
    let t0 = Instant::now();
    let h = Scratch::new();
    let base = h.guest_base(256);
    let script = h.p("customize.sh");
    std::fs::write(&script, CUSTOMIZE).unwrap();
    let overlay = h.p("vm.overlay");
    h.ok(&["overlay", &base, "-o", &overlay, "--run", &script, "--json"]);
    let token = h.p("token");
    std::fs::write(&token, "load-token\n").unwrap();
    let max = SESSIONS.to_string();
    // Every client comes from 127.0.0.1: let that one address hold them all, and the 17th.
    let per_ip = (SESSIONS * 2).to_string();
    let server = start_server_with(
        &h,
        &[
            "--token-file",
            &token,
            "--max-sessions",
            &max,
            "--max-connections-per-ip",
            &per_ip,
        ],
    );
    let t_setup = t0.elapsed();

    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let mut args = vec!["--overlay", overlay.as_str(), "--port", "8080", "--json"];
            if i % 2 == 0 {
                args.push("--early-start");
            }
            let mut c = client(&h, &server, &token, &args);
            let rx = lines(c.child());
            (c, rx)
        })
        .collect();
    let ports: Vec<u16> = clients
        .iter()
        .map(|(_, rx)| mapped_port(&wait_event(rx, "resumed", Duration::from_secs(600))))
        .collect();
    let t_resumed = t0.elapsed();
    assert_eq!(
        ports.iter().collect::<HashSet<_>>().len(),
        SESSIONS,
        "{ports:?}"
    );
    for &port in &ports {
        let body = http_get(port, "/custom.txt", Duration::from_secs(300));
        assert_eq!(body.trim(), "load-42", "port {port}");
    }
    let t_answered = t0.elapsed();

    // The admin socket lists all of them, each with its own live QEMU and port.
    let listed = sessions(&h);
    assert_eq!(listed.len(), SESSIONS, "{listed:?}");
    let pids: HashSet<u64> = listed
        .iter()
        .map(|s| s["qemu_pid"].as_u64().unwrap_or_else(|| panic!("{s}")))
        .collect();
    assert_eq!(pids.len(), SESSIONS, "{listed:?}");
    for pid in &pids {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    let listed_ports: HashSet<u64> = listed
        .iter()
        .map(|s| s["ports"][0]["host_port"].as_u64().unwrap())
        .collect();
    let expected: HashSet<u64> = ports.iter().map(|&p| u64::from(p)).collect();
    assert_eq!(listed_ports, expected);

    // Every slot is taken: one more client is refused as busy.
    let (code, err) = client_output(&server, &token, &["--overlay", &overlay, "--finish"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("busy"), "{err}");

    // Each client ends its session (Finish → Closed) and exits successfully.
    for (i, (c, _)) in clients.into_iter().enumerate() {
        assert!(c.stop("INT", Duration::from_secs(120)), "client {i} failed");
    }
    wait_no_sessions(&h, Duration::from_secs(120));
    assert_clean(&h);

    let log_path = server.log.clone();
    assert!(
        server.proc.stop("TERM", Duration::from_secs(60)),
        "server did not end cleanly"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let stopped = log.matches("VM stopped, cloudletfs unmounted").count();
    assert_eq!(stopped, SESSIONS, "{log}");
    eprintln!(
        "load: setup {t_setup:?}, all {SESSIONS} resumed at {t_resumed:?}, all answered at \
         {t_answered:?}, done at {:?}",
        t0.elapsed()
    );
}
