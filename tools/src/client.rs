//! `cloudlet client`: one session on a `cloudlet server`, on top of `synth::protocol::client`:
//! connect and authenticate, send the overlay (or a URL for the server to fetch), then hold the
//! session until stopped (or finish right after the fill).
//!
//! ```text
//!  connect (token) ─► send_overlay_file | send_url ─► events: Accepted, Progress, Demand,
//!  Resumed (ports), FillDone ─► finish | hold until the stop flag ─► Outcome
//!                                  └─► (--ready-http-path) probe thread: GET the first
//!                                      forwarded port until 200 ─► FirstAnswer
//! ```
//!
//! The probe reports what the client had sent when the guest's service first answered: with
//! early start, the head and the segments the VM needed (plus what the stream sent meanwhile).

use crate::session::FirstAnswerProbe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use synth::protocol::known_servers::KNOWN_SERVERS_FILE;
use synth::protocol::{
    Client, ClientEvent, ClientOptions, Fingerprint, Outcome, PortMapping, ProtoError, ServerTrust,
    SessionRequest, Token, TransferStats, TrustOutcome, DEFAULT_PORT,
};

/// Synthesize a VM on a `cloudlet server`: send an overlay (or a URL for the server to
/// fetch), print where the guest ports are reachable, keep the session until Ctrl-C.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Server as HOST or HOST:PORT (default port 8021), or `auto`: the first cloudlet
    /// discovered on the local network.
    #[arg(long, required_unless_present = "discover")]
    pub server: Option<String>,
    /// Overlay file to send.
    #[arg(
        long,
        conflicts_with = "url",
        required_unless_present_any = ["url", "discover"]
    )]
    pub overlay: Option<PathBuf>,
    /// http(s):// URL the server fetches the overlay from.
    #[arg(long)]
    pub url: Option<String>,
    /// Resume as soon as the metadata is in; segments follow on demand.
    #[arg(long)]
    pub early_start: bool,
    /// Guest TCP port to reach (repeatable).
    #[arg(long = "port", value_name = "GUESTPORT")]
    pub ports: Vec<u16>,
    /// Pre-shared token file.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Throttle the overlay upload to this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub rate_limit: Option<u64>,
    /// End the session right after the fill instead of holding it until Ctrl-C.
    #[arg(long)]
    pub finish: bool,
    /// Accept only the server certificate with this fingerprint (`SHA256:<hex>`, as
    /// `cloudlet server` prints it); the known-servers file is then not used.
    #[arg(long, value_name = "FP")]
    pub server_fingerprint: Option<Fingerprint>,
    /// Known-servers file: the first connection to a server records its certificate, later
    /// ones must present the same (default: HOME/known_servers).
    #[arg(long, value_name = "FILE")]
    pub known_servers: Option<PathBuf>,
    /// The overlay's metadata digest (`SHA256:<hex>`, as `cloudlet info-overlay` prints it): the
    /// server refuses an overlay at --url with another one.
    #[arg(long, value_name = "DIGEST", value_parser = parse_digest)]
    pub overlay_digest: Option<synth::Digest>,
    /// List the cloudlets announced on the local network (mDNS/DNS-SD) and exit.
    #[arg(long, conflicts_with_all = ["server", "overlay", "url"])]
    pub discover: bool,
    /// How long --discover (and --server auto) listens for announcements.
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_secs)]
    pub timeout: Duration,
    /// Print events as JSON lines (--discover: the list as a JSON array).
    #[arg(long)]
    pub json: bool,
    /// Once the VM resumed, poll http://SERVER:PORT/PATH (PORT: where the first --port is
    /// forwarded) and report at its first HTTP 200 how long it took and what had been sent by
    /// then ("first_answer": bytes, segments, on-demand requests).
    #[arg(long, value_name = "/PATH", requires = "ports")]
    pub ready_http_path: Option<String>,
}

/// What had happened when the guest's service first answered (`--ready-http-path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstAnswer {
    /// The URL that answered.
    pub url: String,
    /// Since [`run`] began.
    pub elapsed: Duration,
    /// The client's counters at that moment (as of the last part sent).
    pub transfer: TransferStats,
}

/// Errors of a client session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Neither or both of `--overlay` and `--url`.
    #[error("Give exactly one of --overlay and --url")]
    WhatToSend,
    /// The token file could not be read.
    #[error("Reading the token file failed")]
    Token(#[source] Box<ProtoError>),
    /// Connecting or authenticating failed.
    #[error("Connecting to {addr} failed")]
    Connect {
        /// The server's address.
        addr: String,
        /// The error.
        #[source]
        source: Box<ProtoError>,
    },
    /// The session failed.
    #[error(transparent)]
    Session(Box<ProtoError>),
}

impl From<ProtoError> for ClientError {
    fn from(e: ProtoError) -> Self {
        ClientError::Session(Box::new(e))
    }
}

/// How often the stop flag is checked.
const TICK: Duration = Duration::from_millis(100);

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

/// Parses `--overlay-digest`.
fn parse_digest(s: &str) -> Result<synth::Digest, String> {
    synth::protocol::parse_sha256(s).map_err(|e| e.to_string())
}

/// Longest `--timeout` accepted.
const MAX_TIMEOUT_SECS: f64 = 3600.0;

/// Parses `--timeout SECS` (fractions allowed, more than 0, at most an hour).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(secs > 0.0 && secs <= MAX_TIMEOUT_SECS) {
        return Err(format!(
            "must be more than 0 and at most {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A connected, authenticated client.
pub struct Connected {
    client: Client,
    /// The server's address.
    pub addr: String,
}

impl Connected {
    /// The session id the server gave.
    pub fn session_id(&self) -> u64 {
        self.client.session_id()
    }

    /// The fingerprint of the certificate the server presented.
    pub fn server_fingerprint(&self) -> Fingerprint {
        self.client.server_fingerprint()
    }

    /// How the server's certificate was trusted (pinned, known, or recorded now on first use).
    pub fn trust(&self) -> &TrustOutcome {
        self.client.trust()
    }
}

/// Connects to `server` (`HOST[:PORT]`) over TLS and authenticates with the token of `args`.
/// The server's certificate must be `--server-fingerprint`'s if given; else it is checked
/// against (or, first time, recorded in) the known-servers file (default `HOME/known_servers`)
/// and against `advertised`, the fingerprint `--server auto` found in the server's announcement.
pub fn connect(
    server: &str,
    advertised: Option<Fingerprint>,
    home: &Path,
    args: &ClientArgs,
) -> Result<Connected, ClientError> {
    let token = args
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()
        .map_err(|e| ClientError::Token(Box::new(e)))?;
    let addr = server_addr(server);
    let opts = ClientOptions {
        rate_limit_bytes_per_sec: args.rate_limit,
        trust: ServerTrust {
            pinned: args.server_fingerprint,
            known_servers: Some(
                args.known_servers
                    .clone()
                    .unwrap_or_else(|| home.join(KNOWN_SERVERS_FILE)),
            ),
            advertised,
        },
        ..ClientOptions::default()
    };
    let client = Client::connect_with(
        &addr,
        token.as_ref().map_or(&[][..], |t| t.as_bytes()),
        opts,
    )
    .map_err(|source| ClientError::Connect {
        addr: addr.clone(),
        source: Box::new(source),
    })?;
    Ok(Connected { client, addr })
}

/// The host a forwarded port is reached at: the mapping's address, or the server's host when
/// the server listens on every address.
pub fn reach_host(server_addr: &str, mapping: &PortMapping) -> String {
    if mapping.host_addr == "0.0.0.0" || mapping.host_addr.is_empty() {
        server_addr
            .rsplit_once(':')
            .map_or(server_addr, |(h, _)| h)
            .to_string()
    } else {
        mapping.host_addr.clone()
    }
}

/// Runs the session: sends what `args` names, then finishes (`--finish`) or holds the session
/// until `stop` is set; `on_event` hears every event, `on_holding` once the session is held,
/// `on_first_answer` (from the probe's thread) the first HTTP 200 of `--ready-http-path`.
pub fn run(
    conn: &mut Connected,
    args: &ClientArgs,
    stop: &Arc<AtomicBool>,
    on_event: &mut dyn FnMut(&ClientEvent),
    on_holding: &mut dyn FnMut(),
    on_first_answer: Box<dyn FnOnce(FirstAnswer) + Send>,
) -> Result<Outcome, ClientError> {
    let started = Instant::now();
    let latest = Arc::new(Mutex::new(TransferStats::default()));
    let mut probe: Option<FirstAnswerProbe> = None;
    let mut report = Some(on_first_answer);
    let server = conn.addr.clone();
    let mut on_event = |e: &ClientEvent| {
        match e {
            ClientEvent::Progress(t) => {
                if let Ok(mut l) = latest.lock() {
                    *l = *t;
                }
            }
            ClientEvent::Resumed(info) => {
                let target = args.ready_http_path.as_ref().zip(info.ports.first());
                if let (Some((path, mapping)), None) = (target, &probe) {
                    let url = format!(
                        "http://{}:{}/{}",
                        reach_host(&server, mapping),
                        mapping.host_port,
                        path.trim_start_matches('/')
                    );
                    let latest = Arc::clone(&latest);
                    let report = report.take();
                    probe = Some(FirstAnswerProbe::start(
                        url,
                        started,
                        move |url, elapsed| {
                            let transfer = latest.lock().map(|l| *l).unwrap_or_default();
                            if let Some(report) = report {
                                report(FirstAnswer {
                                    url,
                                    elapsed,
                                    transfer,
                                });
                            }
                        },
                    ));
                }
            }
            _ => {}
        }
        on_event(e);
    };
    let on_event = &mut on_event;
    let client = &mut conn.client;
    // A stop (Ctrl-C, SIGTERM): the running call sends Finish and returns.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let handle = client.stop_handle();
        let done = Arc::clone(&done);
        let stop = Arc::clone(stop);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if stop.load(Ordering::Relaxed) {
                    handle.stop();
                    break;
                }
                std::thread::sleep(TICK);
            }
        })
    };
    let result = (|| -> Result<Outcome, ClientError> {
        let req = SessionRequest {
            early_start: args.early_start,
            guest_ports: args.ports.clone(),
            metadata_digest: args.overlay_digest,
        };
        let outcome = match (&args.overlay, &args.url) {
            (Some(p), None) => client.send_overlay_file(p, &req, on_event)?,
            (None, Some(u)) => client.send_url(u, &req, on_event)?,
            _ => return Err(ClientError::WhatToSend),
        };
        if outcome.stopped {
            return Ok(outcome);
        }
        if args.finish {
            client.finish()?;
            return Ok(outcome);
        }
        on_holding();
        Ok(client.hold(on_event)?)
    })();
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    drop(probe);
    result
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

    #[test]
    fn parse_secs_fractions_ok_zero_nan_and_huge_refused() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("3"), Ok(Duration::from_secs(3)));
        for bad in ["0", "-1", "NaN", "inf", "1e30", "soon"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }
}
