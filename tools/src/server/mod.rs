//! `cloudlet server`: accepts synthesis sessions over TCP (`docs/protocol.md`) and runs one
//! synthesized VM ([`crate::session`]) per session.
//!
//! ```text
//!  serve: accept loop ──► connection thread (session.rs): slot (max sessions) ─► handshake
//!    ─► first message
//!    StartOverlay: Head parts ─► HeadAssembler ─► registry ─► Accepted
//!                  reader thread: Segment parts ─► SegmentAssembler ─► NetSource (spill file)
//!                  resume_vm(OverlaySource::Source(NetSource)) ─► Resumed ─► FillDone
//!    StartUrl:     UrlPolicy ─► HttpSource ─► registry ─► Accepted ─► resume_vm ─► Resumed …
//!  ticker thread: Keepalive every KEEPALIVE_INTERVAL of silence, server SIGTERM
//!  end (Finish, error, timeout, vanished client, SIGTERM, close-session): stop QEMU, unmount,
//!  free the slot
//!  admin thread (admin.rs): list-session reads each live session's `Conn`; close-session
//!  ends it like any other ending and waits until its slot is free
//! ```
//!
//! A cloudletfs read of a segment not received yet blocks in [`net_source::NetSource`]
//! (bounded: the session's end, or no segment byte for the idle timeout); a demand read sends
//! `NeedSegment` once, so the client sends that segment next.

pub mod admin;
pub mod admission;
mod conn;
pub mod net_source;
mod session;

use admin::{AdminSocket, ErrorKind, SessionInfo};
use conn::Conn;
use session::connection;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use synth::protocol::{
    ProtoError, ServerIdentity, TlsAcceptor, Token, UrlPolicy, KEEPALIVE_INTERVAL,
};
use synth::registry::Registry;

/// How often waiting loops wake up.
pub(crate) const TICK: Duration = Duration::from_millis(200);
/// Longest the server waits for its sessions to clean up after SIGTERM.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// Allocations above this size are mmapped (and returned to the system when freed).
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Pins glibc's mmap and trim thresholds. By default glibc raises the mmap threshold to the
/// largest block freed (up to 32 MiB), after which every session's segment-sized buffers stay
/// in the malloc arenas once freed: measured 95 MiB of heap per session with 16 sessions, most
/// of it kept after they ended, against 4.4 MiB with the thresholds pinned (BENCHMARKS.md).
fn pin_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters (glibc takes its own lock); it is
        // given valid parameter names and values and is called before any session starts.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, MMAP_THRESHOLD) == 1
        };
        if !ok {
            log::warn!("could not pin the malloc thresholds; memory per session will be higher");
        }
    }
}

/// Serve synthesis sessions over TCP (docs/protocol.md): clients send an overlay (or a
/// URL), the server resumes the VM on one of its bases and forwards the guest ports.
///
/// Runs until SIGINT/SIGTERM, then ends every session (VMs stopped, mounts removed).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address and port to listen on. Any address but a loopback one needs --token-file (or
    /// --insecure-no-token).
    #[arg(long, default_value = "0.0.0.0:8021", value_name = "ADDR:PORT")]
    pub listen: String,
    /// Require this pre-shared token (the file's content, without surrounding whitespace).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Listen beyond loopback without a token: anyone who reaches the port can run VMs here.
    #[arg(long, conflicts_with = "token_file")]
    pub insecure_no_token: bool,
    /// Connections at once from one peer address (handshaking or in a session); further ones
    /// are closed at once.
    #[arg(long, default_value_t = admission::DEFAULT_PER_IP, value_name = "N")]
    pub max_connections_per_ip: usize,
    /// Connections at once that have not authenticated yet, all peers together; further ones
    /// are closed at once. Session slots are taken only after the token is checked.
    #[arg(long, default_value_t = admission::DEFAULT_HANDSHAKES, value_name = "N")]
    pub max_handshakes: usize,
    /// Sessions at once; further clients are refused as busy.
    #[arg(long, default_value_t = 4)]
    pub max_sessions: u32,
    /// URL prefix the server may fetch overlays from (flow 2); none by default.
    #[arg(long, value_name = "PREFIX")]
    pub allow_url_prefix: Vec<String>,
    /// Address reported to clients for the forwarded guest ports.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub public_addr: String,
    /// Announce this cloudlet on the local network (mDNS/DNS-SD, `_cloudlet._tcp`).
    #[arg(long)]
    pub advertise: bool,
    /// Instance name announced (default: "cloudlet on HOSTNAME").
    #[arg(long, value_name = "NAME", requires = "advertise")]
    pub advertise_name: Option<String>,
    /// Admin socket for list-session and close-session (default: HOME/server.sock).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// A client that sends nothing for this long, or takes longer for one frame, is cut
    /// off (at least 20).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub idle_timeout: u64,
    /// Bounds on every session.
    #[command(flatten)]
    pub limits: crate::session::LimitArgs,
}

/// Errors of starting or stopping the server (a session's failure is its client's business
/// and the log's, not the server's).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Installing the SIGINT/SIGTERM handlers failed.
    #[error("Installing the signal handlers failed")]
    Signals(#[source] std::io::Error),
    /// The token file could not be read.
    #[error("Reading the token file failed")]
    Token(#[source] ProtoError),
    /// An `--allow-url-prefix` is not a usable prefix.
    #[error("--allow-url-prefix: {0}")]
    UrlPrefix(String),
    /// The registry could not be opened.
    #[error("Opening the registry {path} failed")]
    Registry {
        /// The registry folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: synth::registry::RegistryError,
    },
    /// An option is out of range.
    #[error("{0}")]
    Option(String),
    /// Binding the listening socket failed.
    #[error("Listening on {addr} failed")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The admin socket could not be set up.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// Starting the mDNS announcement failed.
    #[error("--advertise failed")]
    Advertise(#[source] crate::discovery::FindError),
    /// A non-loopback address without a token, and no `--insecure-no-token`.
    #[error(
        "Listening on {0} (not a loopback address) needs --token-file: anyone who reaches the \
         port could run VMs on this machine. Give a token, listen on 127.0.0.1, or pass \
         --insecure-no-token if the network is yours alone"
    )]
    TokenRequired(SocketAddr),
    /// Sessions were still cleaning up when the server gave up waiting.
    #[error("{0} sessions did not end within {SHUTDOWN_WAIT:?}")]
    SessionsLeft(usize),
    /// The server's TLS identity could not be loaded or created.
    #[error("TLS identity in {}", path.display())]
    Identity {
        /// The server's home.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<synth::protocol::identity::IdentityError>,
    },
    /// The TLS configuration could not be built.
    #[error("Setting up TLS failed")]
    Tls(#[source] synth::protocol::ProtoError),
}

/// State shared by the accept loop and every connection.
pub(crate) struct Server {
    pub(crate) home: PathBuf,
    /// TLS with the server's identity.
    pub(crate) tls: TlsAcceptor,
    pub(crate) token: Option<Token>,
    pub(crate) policy: UrlPolicy,
    pub(crate) max_sessions: u32,
    /// Bounds on every session (disk growth over the base, copy-on-write quota).
    pub(crate) limits: crate::session::LimitArgs,
    pub(crate) public_addr: String,
    /// Host address QEMU's port forwards listen on.
    pub(crate) fwd_addr: Ipv4Addr,
    pub(crate) sessions: Mutex<HashSet<u64>>,
    /// Authenticated sessions, for the admin socket (removed with their slot).
    pub(crate) live: Mutex<HashMap<u64, Weak<Conn>>>,
    /// A client silent this long (or slower than this for one frame) is gone.
    pub(crate) idle_timeout: Duration,
    pub(crate) connections: AtomicUsize,
    /// Per-address and handshake limits.
    pub(crate) admission: Arc<admission::Admission>,
    pub(crate) next_id: AtomicU64,
    pub(crate) shutdown: Arc<AtomicBool>,
}

/// Locks `m`, taking over the data of a thread that panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Frees a connection (its session slot, if it has one, and its admission) when dropped.
pub(crate) struct ConnGuard {
    pub(crate) srv: Arc<Server>,
    pub(crate) slot: Option<u64>,
    pub(crate) ticket: admission::Ticket,
}

impl ConnGuard {
    /// Frees the session slot (the session is cleaned up; its last message may still follow).
    pub(crate) fn release(&mut self) {
        if let Some(id) = self.slot.take() {
            lock(&self.srv.live).remove(&id);
            lock(&self.srv.sessions).remove(&id);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.release();
        self.srv.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl admin::Sessions for Server {
    fn list(&self) -> Vec<SessionInfo> {
        let conns: Vec<Arc<Conn>> = lock(&self.live)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let mut v: Vec<SessionInfo> = conns.iter().map(|c| c.info()).collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Ends the session like any other ending and waits until its slot is freed, which
    /// happens after its VM is stopped, its mount removed and its run folder deleted.
    fn close(&self, id: u64) -> Result<(), (ErrorKind, String)> {
        let conn = lock(&self.live).get(&id).and_then(Weak::upgrade);
        let Some(conn) = conn else {
            return Err((ErrorKind::NotFound, format!("no live session {id}")));
        };
        conn.close_by_operator();
        drop(conn);
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while lock(&self.live).contains_key(&id) {
            if Instant::now() > deadline {
                return Err((
                    ErrorKind::Timeout,
                    format!("session {id} did not end within {SHUTDOWN_WAIT:?}"),
                ));
            }
            std::thread::sleep(TICK / 4);
        }
        log::info!("session {id}: closed by the operator");
        Ok(())
    }
}

/// Runs the server until SIGINT/SIGTERM; then ends every session and waits for the cleanup.
/// `reporter` hears where it listens and what it announces.
pub fn serve(
    home: &Path,
    opts: &ServerArgs,
    reporter: &dyn crate::Reporter,
) -> Result<(), ServerError> {
    let shutdown = cloudletfs::cli::interrupt_flag().map_err(ServerError::Signals)?;
    let token = opts
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()
        .map_err(ServerError::Token)?;
    let policy = UrlPolicy::new(opts.allow_url_prefix.clone())
        .map_err(|r| ServerError::UrlPrefix(r.to_string()))?;
    Registry::open(home).map_err(|source| ServerError::Registry {
        path: home.to_path_buf(),
        source,
    })?;
    pin_malloc_thresholds();
    if opts.max_sessions == 0 {
        return Err(ServerError::Option(
            "--max-sessions must be at least 1".into(),
        ));
    }
    let idle_timeout = Duration::from_secs(opts.idle_timeout);
    if idle_timeout < 2 * KEEPALIVE_INTERVAL {
        return Err(ServerError::Option(format!(
            "--idle-timeout must be at least {} s (twice the keepalive interval)",
            (2 * KEEPALIVE_INTERVAL).as_secs()
        )));
    }
    let identity =
        ServerIdentity::load_or_create(home).map_err(|source| ServerError::Identity {
            path: home.to_path_buf(),
            source: Box::new(source),
        })?;
    let tls = TlsAcceptor::new(&identity).map_err(ServerError::Tls)?;
    let listen_err = |source| ServerError::Listen {
        addr: opts.listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&opts.listen).map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    if !local.ip().is_loopback() && token.is_none() {
        if !opts.insecure_no_token {
            return Err(ServerError::TokenRequired(local));
        }
        log::warn!(
            "INSECURE: listening on {local} without a token (--insecure-no-token): anyone who \
             reaches this port can run VMs on this machine"
        );
        reporter.note(&format!(
            "WARNING: listening on {local} WITHOUT A TOKEN (--insecure-no-token): anyone who \
             reaches this port can run VMs on this machine"
        ));
    }
    if opts.max_connections_per_ip == 0 || opts.max_handshakes == 0 {
        return Err(ServerError::Option(
            "--max-connections-per-ip and --max-handshakes must be at least 1".into(),
        ));
    }
    listener.set_nonblocking(true).map_err(listen_err)?;
    let fwd_addr = match local.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let srv = Arc::new(Server {
        home: home.to_path_buf(),
        tls,
        token,
        policy,
        max_sessions: opts.max_sessions,
        limits: opts.limits,
        public_addr: opts.public_addr.clone(),
        fwd_addr,
        sessions: Mutex::new(HashSet::new()),
        live: Mutex::new(HashMap::new()),
        idle_timeout,
        connections: AtomicUsize::new(0),
        admission: admission::Admission::new(opts.max_connections_per_ip, opts.max_handshakes),
        next_id: AtomicU64::new(1),
        shutdown: Arc::clone(&shutdown),
    });
    let admin_path = admin::socket_path(home, opts.admin_socket.clone());
    let admin = AdminSocket::bind(&admin_path)?;
    admin.serve(
        Arc::clone(&srv) as Arc<dyn admin::Sessions>,
        Arc::clone(&shutdown),
    )?;
    log::info!("admin socket {}", admin.path().display());
    log::info!(
        "listening on {local} (token {}, at most {} sessions, {} connections per address, {} \
         handshakes)",
        if srv.token.is_some() {
            "required"
        } else {
            "not required"
        },
        srv.max_sessions,
        opts.max_connections_per_ip,
        opts.max_handshakes
    );
    reporter.note(&format!("cloudlet server listening on {local}"));
    reporter.note(&format!(
        "TLS certificate {} ({}{})",
        identity.fingerprint(),
        if identity.created() { "new, " } else { "" },
        identity
            .cert_path()
            .map_or_else(String::new, |p| p.display().to_string())
    ));
    let advert = if opts.advertise {
        let adv = crate::discovery::advertise(
            opts.advertise_name.as_deref(),
            home,
            local,
            srv.max_sessions,
            srv.token.is_some(),
            identity.fingerprint(),
        )
        .map_err(ServerError::Advertise)?;
        reporter.note(&format!("advertising {}", adv.fullname()));
        Some(adv)
    } else {
        None
    };
    while !shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => accept(&srv, stream, peer),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(TICK / 4),
            Err(e) => {
                log::warn!("accept failed: {e}");
                std::thread::sleep(TICK);
            }
        }
    }
    drop(listener);
    drop(advert); // Goodbye first: no new client should pick a server that is going away.
    log::info!("shutting down: ending every session");
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    while srv.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(TICK / 4);
    }
    let left = srv.connections.load(Ordering::SeqCst);
    if left > 0 {
        return Err(ServerError::SessionsLeft(left));
    }
    Ok(())
}

/// Admits a connection (per-address and handshake limits) and starts its thread; a connection
/// not admitted is closed at once, before anything is read from it.
fn accept(srv: &Arc<Server>, stream: TcpStream, peer: SocketAddr) {
    let ticket = match srv.admission.admit(peer.ip()) {
        Ok(t) => t,
        Err(why) => {
            log::warn!("{peer}: {why}: closed");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    srv.connections.fetch_add(1, Ordering::SeqCst);
    let id = srv.next_id.fetch_add(1, Ordering::SeqCst);
    let guard = ConnGuard {
        srv: Arc::clone(srv),
        slot: None,
        ticket,
    };
    let spawned = std::thread::Builder::new()
        .name(format!("session-{id}"))
        .spawn(move || connection(guard, stream, peer, id));
    if let Err(e) = spawned {
        log::warn!("{peer}: starting a session thread failed: {e}");
    }
}
