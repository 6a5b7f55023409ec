//! `server`, `list-session`, `close-session`, `client`: synthesis over the network.

use super::{Context, Terminal};
use anyhow::{Context as _, Result};
use cloudlet_tools::client::{self, ClientArgs};
use cloudlet_tools::server::{self, admin, ServerArgs};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use synth::protocol::discovery::{self, Cloudlet, DiscoveryEvent};
use synth::protocol::{ClientEvent, TrustOutcome};

/// Arguments of `list-session`.
#[derive(Debug, clap::Args)]
pub struct ListSessionArgs {
    /// The server's admin socket (default: HOME/server.sock).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Print the sessions as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `close-session`.
#[derive(Debug, clap::Args)]
pub struct CloseSessionArgs {
    /// Session id (from list-session).
    id: u64,
    /// The server's admin socket (default: HOME/server.sock).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn server(ctx: &Context, a: &ServerArgs) -> Result<()> {
    server::serve(&ctx.home, a, &Terminal)?;
    Ok(())
}

pub fn list_session(ctx: &Context, a: &ListSessionArgs) -> Result<()> {
    let path = admin::socket_path(&ctx.home, a.admin_socket.clone());
    let sessions = admin::list_sessions(&path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(());
    }
    if sessions.is_empty() {
        println!("no sessions");
        return Ok(());
    }
    println!(
        "{:<6} {:<22} {:<13} {:<12} {:>7} {:>12} {:>6} {:<8} {:<24} CONFINEMENT",
        "ID", "PEER", "STATE", "BASE", "AGE", "RECEIVED", "DEMAND", "QEMU", "PORTS"
    );
    for s in &sessions {
        let base: String = s
            .base_id
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(12)
            .collect();
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}->{}:{}", p.guest, p.host_addr, p.host_port))
            .collect();
        println!(
            "{:<6} {:<22} {:<13} {:<12} {:>6}s {:>12} {:>6} {:<8} {:<24} {}",
            s.id,
            s.peer,
            s.state.name(),
            base,
            s.age_s,
            s.bytes_received,
            s.demand_requests,
            s.qemu_pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(",")
            },
            s.confinement.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

pub fn close_session(ctx: &Context, a: &CloseSessionArgs) -> Result<()> {
    let path = admin::socket_path(&ctx.home, a.admin_socket.clone());
    let id = admin::close_session(&path, a.id)?;
    if a.json {
        println!("{}", json!({ "closed": id }));
    } else {
        println!("session {id} closed");
    }
    Ok(())
}

/// One line per cloudlet and one per listed base.
fn describe(c: &Cloudlet) -> String {
    let addrs: Vec<String> = c
        .addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, c.port).to_string())
        .collect();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let mut s = format!(
        "{}  {}  ({})\n  protocol {}, {} sessions, token {}, {} bases\n  certificate {}",
        c.name,
        if addrs.is_empty() {
            format!("port {}", c.port)
        } else {
            addrs.join(" ")
        },
        c.host,
        opt(c.protocol_version.map(|v| v.to_string())),
        opt(c.max_sessions.map(|v| v.to_string())),
        opt(c
            .token_required
            .map(|t| if t { "required" } else { "not required" }.into())),
        opt(c.base_count.map(|v| v.to_string())),
        opt(c.fingerprint.map(|f| f.to_string())),
    );
    for b in &c.bases {
        s.push_str(&format!("\n  base {} {}", b.id_prefix, b.name));
    }
    s
}

/// `cloudlet client --discover`: lists the cloudlets that answer within `timeout` (progress
/// on stderr, the list on stdout). Finding none is not an error.
fn discover(timeout: Duration, json: bool) -> Result<()> {
    eprintln!(
        "looking for {} for {:.1}s",
        discovery::SERVICE_TYPE,
        timeout.as_secs_f64()
    );
    let list = discovery::discover_with(timeout, |e| {
        match e {
            DiscoveryEvent::Found(c) => eprintln!("found {:?}", c.name),
            DiscoveryEvent::Gone(name) => eprintln!("gone {name:?}"),
        }
        std::ops::ControlFlow::Continue(())
    })?;
    if list.is_empty() {
        eprintln!("no cloudlets found");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for c in &list {
            println!("{}", describe(c));
        }
    }
    Ok(())
}

fn emit(json: bool, value: serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

pub fn client(ctx: &Context, a: &ClientArgs) -> Result<()> {
    if a.discover {
        return discover(a.timeout, a.json);
    }
    let (server, advertised) = match a.server.as_deref() {
        Some("auto") => {
            let c = cloudlet_tools::discovery::auto_server(a.timeout)?;
            eprintln!("discovered {:?} at {}", c.name, c.addr);
            (c.addr.to_string(), c.fingerprint)
        }
        Some(s) => (s.to_string(), None),
        None => anyhow::bail!("give --server or --discover"),
    };
    let stop = cloudlet_tools::interrupt_flag().context("installing signal handlers")?;
    let mut conn = client::connect(&server, advertised, &ctx.home, a)?;
    let session = conn.session_id();
    let addr = conn.addr.clone();
    let fingerprint = conn.server_fingerprint();
    if let TrustOutcome::FirstUse { file, advertised } = conn.trust() {
        eprintln!(
            "NEW SERVER {addr}: certificate {fingerprint} recorded in {}.\n\
             It was {}: compare it with the fingerprint `cloudlet server` printed at start.",
            file.display(),
            if *advertised {
                "checked only against the server's own mDNS announcement"
            } else {
                "not checked"
            }
        );
    }
    eprintln!("connected to {addr} ({fingerprint}), session {session}");
    let json = a.json;
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
                    let h = client::reach_host(&addr, p);
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
    let on_first_answer = Box::new(move |f: client::FirstAnswer| {
        let t = f.transfer;
        let secs = f.elapsed.as_secs_f64();
        emit(
            json,
            json!({ "event": "first_answer", "session": session, "url": f.url,
                    "seconds": secs, "bytes_sent": t.bytes_sent, "bytes_total": t.bytes_total,
                    "segments_sent": t.segments_sent, "segments_total": t.segments_total,
                    "demand_requests": t.demand_requests }),
            &format!(
                "first answer from {} after {secs:.2}s: {} of {} bytes sent, {} of {} \
                 segments, {} asked on demand",
                f.url,
                t.bytes_sent,
                t.bytes_total,
                t.segments_sent,
                t.segments_total,
                t.demand_requests
            ),
        );
    });
    let outcome = client::run(
        &mut conn,
        a,
        &stop,
        &mut on_event,
        &mut || {
            eprintln!("session {session} running; Ctrl-C ends it");
        },
        on_first_answer,
    )?;
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
