//! `cloudlet client`: sends an overlay (or a URL) to a `cloudlet server`, prints how to reach
//! the synthesized VM, and keeps the session until Ctrl-C (or right after the fill with
//! `--finish`). Progress goes to stderr; results (text or `--json` lines) to stdout.

use crate::vm_cmds::interrupt_flag;
use anyhow::{bail, Context as _, Result};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use synth::protocol::{Client, ClientEvent, ClientOptions, SessionRequest, Token, DEFAULT_PORT};

/// What `cloudlet client` is asked to do.
pub struct ClientRequest {
    pub server: String,
    pub overlay: Option<PathBuf>,
    pub url: Option<String>,
    pub early_start: bool,
    pub ports: Vec<u16>,
    pub token_file: Option<PathBuf>,
    pub rate_limit: Option<u64>,
    pub finish: bool,
    pub json: bool,
}

/// `HOST` or `HOST:PORT` (IPv6 as `[ADDR]` or `[ADDR]:PORT`) with the default port filled in.
pub fn server_addr(s: &str) -> String {
    let has_port = if let Some(rest) = s.strip_prefix('[') {
        rest.split_once(']')
            .is_some_and(|(_, tail)| tail.starts_with(':'))
    } else {
        match s.matches(':').count() {
            0 => false,
            1 => true,
            // A bare IPv6 address.
            _ => return format!("[{s}]:{DEFAULT_PORT}"),
        }
    };
    if has_port {
        s.to_string()
    } else {
        format!("{s}:{DEFAULT_PORT}")
    }
}

fn emit(json: bool, value: serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// Runs one client session.
pub fn client(req: ClientRequest) -> Result<()> {
    let stop = interrupt_flag()?;
    let token = req
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()?;
    let addr = server_addr(&req.server);
    let opts = ClientOptions {
        rate_limit_bytes_per_sec: req.rate_limit,
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(
        &addr,
        token.as_ref().map_or(&[][..], |t| t.as_bytes()),
        opts,
    )
    .with_context(|| format!("connecting to {addr}"))?;
    let session = client.session_id();
    eprintln!("connected to {addr}, session {session}");
    // Ctrl-C / SIGTERM: the running call sends Finish and returns.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let handle = client.stop_handle();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if stop.load(Ordering::Relaxed) {
                    handle.stop();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let json = req.json;
    let host = addr
        .rsplit_once(':')
        .map_or(addr.as_str(), |(h, _)| h)
        .to_string();
    let mut last_progress = Instant::now();
    let mut on_event = |e: &ClientEvent| match e {
        ClientEvent::Accepted { base_id, segments } => {
            eprintln!("accepted: base {base_id}, {segments} segments");
        }
        ClientEvent::Progress(t) => {
            let last = t.bytes_sent == t.bytes_total;
            if last || last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                eprintln!(
                    "sent {} of {} bytes, {} of {} segments, {} asked on demand",
                    t.bytes_sent,
                    t.bytes_total,
                    t.segments_sent,
                    t.segments_total,
                    t.demand_requests
                );
            }
        }
        ClientEvent::Demand { index } => eprintln!("server asks for segment {index}"),
        ClientEvent::Resumed(info) => {
            let ports: Vec<serde_json::Value> = info
                .ports
                .iter()
                .map(|p| {
                    // An unspecified public address means "the address you reached me at".
                    let h = if p.host_addr == "0.0.0.0" || p.host_addr.is_empty() {
                        host.clone()
                    } else {
                        p.host_addr.clone()
                    };
                    json!({
                        "guest": p.guest,
                        "host": h,
                        "port": p.host_port,
                        "addr": format!("{h}:{}", p.host_port),
                    })
                })
                .collect();
            let text = std::iter::once(format!("VM resumed (session {session})"))
                .chain(ports.iter().map(|p| {
                    format!(
                        "  guest port {} -> {}",
                        p["guest"],
                        p["addr"].as_str().unwrap_or_default()
                    )
                }))
                .collect::<Vec<_>>()
                .join("\n");
            emit(
                json,
                json!({ "event": "resumed", "session": session, "ports": ports,
                        "timings": info.timings }),
                &text,
            );
        }
        ClientEvent::FillDone(info) => {
            emit(
                json,
                json!({ "event": "fill_done", "session": session, "timings": info.timings,
                        "stats": info.stats }),
                &format!(
                    "fill done: {} bytes, {} segments, {} asked on demand",
                    info.stats.bytes_received,
                    info.stats.segments_received,
                    info.stats.demand_requests
                ),
            );
        }
    };
    let result = (|| -> Result<synth::protocol::Outcome> {
        let sreq = SessionRequest {
            early_start: req.early_start,
            guest_ports: req.ports.clone(),
        };
        let outcome = match (&req.overlay, &req.url) {
            (Some(p), None) => client.send_overlay_file(p, &sreq, &mut on_event)?,
            (None, Some(u)) => client.send_url(u, &sreq, &mut on_event)?,
            _ => bail!("give exactly one of --overlay and --url"),
        };
        if outcome.stopped {
            return Ok(outcome);
        }
        if req.finish {
            client.finish()?;
            return Ok(outcome);
        }
        eprintln!("session {session} running; Ctrl-C ends it");
        Ok(client.hold(&mut on_event)?)
    })();
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let outcome = result?;
    let t = outcome.transfer;
    emit(
        json,
        json!({ "event": "closed", "session": session, "bytes_sent": t.bytes_sent,
                "segments_sent": t.segments_sent, "demand_requests": t.demand_requests,
                "demand_already_sent": t.demand_already_sent }),
        &format!(
            "session {session} closed: {} bytes sent, {} segments, {} asked on demand",
            t.bytes_sent, t.segments_sent, t.demand_requests
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addr_default_port_added_where_missing() {
        assert_eq!(server_addr("example.org"), "example.org:8021");
        assert_eq!(server_addr("10.0.0.1:9000"), "10.0.0.1:9000");
        assert_eq!(server_addr("[::1]"), "[::1]:8021");
        assert_eq!(server_addr("[::1]:9"), "[::1]:9");
        assert_eq!(server_addr("::1"), "[::1]:8021");
    }
}
