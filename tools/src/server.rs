//! `cloudlet server`: accepts synthesis sessions over TCP (`docs/protocol.md`) and runs one
//! synthesized VM per session.
//!
//! ```text
//!  accept loop ──► connection thread: slot (max sessions) ─► handshake ─► first message
//!    StartOverlay: Head parts ─► HeadAssembler ─► registry ─► Accepted
//!                  reader thread: Segment parts ─► SegmentAssembler ─► NetSource (spill file)
//!                  resume_vm(OverlaySource::Source(NetSource)) ─► Resumed ─► FillDone
//!    StartUrl:     UrlPolicy ─► HttpSource ─► registry ─► Accepted ─► resume_vm ─► Resumed …
//!  ticker thread: Keepalive every KEEPALIVE_INTERVAL of silence, server SIGTERM
//!  end (Finish, error, timeout, vanished client, SIGTERM, close-session): stop QEMU, unmount,
//!  free the slot
//!  admin thread (`admin.rs`): list-session reads each live session's `Conn`; close-session
//!  ends it like any other ending and waits until its slot is free
//! ```
//!
//! A cloudletfs read of a segment not received yet blocks in [`NetSource`] (bounded: the
//! session's end, or no segment byte for the idle timeout); a demand read sends `NeedSegment`
//! once, so the client sends that segment next.

use crate::admin::{self, AdminSocket, ErrorKind, SessionInfo, SessionState};
use crate::synth_cmds::{resume_vm, Backend, ResumeOptions, RunningVm};
use crate::vm_cmds::{interrupt_flag, RunDir};
use anyhow::{Context as _, Result};
use cloudletfs::{HttpOptions, HttpSource, OverlaySource, RedirectPolicy};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};
use synth::chunk::hex;
use synth::format::Overlay;
use synth::protocol::server::{self, check_ports, reason_for, HeadAssembler, SegmentAssembler};
use synth::protocol::{
    clip_text, frame::read_frame_before, read_msg_before, ClientMsg, FillInfo, PortMapping,
    ProtoError, RefuseReason, ResumeInfo, ServerMsg, SessionStats, Timings, Token, UrlPolicy,
    FRAME_MAX, HANDSHAKE_FRAME_MAX, HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL,
};
use synth::registry::{Registry, RegistryError};
use synth::source::{check_range, ByteSource, SourceError};
use synth::vm::HostFwd;

/// Longest head (header + metadata) this server accepts, in bytes.
const MAX_HEAD_LEN: u64 = 64 + (256 << 20);
/// Connections allowed in the handshake on top of the sessions (further ones are dropped).
const MAX_PENDING: usize = 16;
/// Bound on every write to a client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often waiting loops wake up.
const TICK: Duration = Duration::from_millis(200);
/// Longest a cloudletfs read waits for a segment, whatever the progress.
const MAX_SEGMENT_WAIT: Duration = Duration::from_secs(600);
/// Longest the server waits for its sessions to clean up after SIGTERM.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
/// Name of cloudletfs's background filler thread: its reads are not demand.
const FILLER_THREAD: &str = "filler";
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

/// What `cloudlet server` is asked to do.
pub struct ServerOptions {
    /// `ADDR:PORT` to listen on.
    pub listen: String,
    /// Pre-shared token file (none: no token required).
    pub token_file: Option<PathBuf>,
    /// Sessions at once.
    pub max_sessions: u32,
    /// URL prefixes flow 2 may fetch from.
    pub allow_url_prefix: Vec<String>,
    /// Address reported to clients for the forwarded guest ports.
    pub public_addr: String,
    /// Announce the server over mDNS/DNS-SD (`--advertise`).
    pub advertise: Option<crate::discovery::AdvertiseOptions>,
    /// Unix socket `list-session` and `close-session` talk to.
    pub admin_socket: PathBuf,
    /// A client silent this long (or slower than this for one frame) is gone.
    pub idle_timeout: Duration,
}

/// State shared by the accept loop and every connection.
struct Server {
    home: PathBuf,
    token: Option<Token>,
    policy: UrlPolicy,
    max_sessions: u32,
    public_addr: String,
    /// Host address QEMU's port forwards listen on.
    fwd_addr: Ipv4Addr,
    sessions: Mutex<HashSet<u64>>,
    /// Authenticated sessions, for the admin socket (removed with their slot).
    live: Mutex<HashMap<u64, Weak<Conn>>>,
    /// A client silent this long (or slower than this for one frame) is gone.
    idle_timeout: Duration,
    connections: AtomicUsize,
    next_id: AtomicU64,
    shutdown: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Frees a connection (and its session slot, if it has one) when dropped.
struct ConnGuard {
    srv: Arc<Server>,
    slot: Option<u64>,
}

impl ConnGuard {
    /// Frees the session slot (the session is cleaned up; its last message may still follow).
    fn release(&mut self) {
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
pub fn serve(home: &Path, opts: ServerOptions) -> Result<()> {
    let shutdown = interrupt_flag()?;
    let token = opts
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()?;
    let policy = UrlPolicy::new(opts.allow_url_prefix)
        .map_err(|r| anyhow::anyhow!("--allow-url-prefix: {r}"))?;
    Registry::open(home).with_context(|| format!("opening registry {}", home.display()))?;
    pin_malloc_thresholds();
    if opts.max_sessions == 0 {
        anyhow::bail!("--max-sessions must be at least 1");
    }
    if opts.idle_timeout < 2 * KEEPALIVE_INTERVAL {
        anyhow::bail!(
            "--idle-timeout must be at least {} s (twice the keepalive interval)",
            (2 * KEEPALIVE_INTERVAL).as_secs()
        );
    }
    let listener =
        TcpListener::bind(&opts.listen).with_context(|| format!("listening on {}", opts.listen))?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let fwd_addr = match local.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let srv = Arc::new(Server {
        home: home.to_path_buf(),
        token,
        policy,
        max_sessions: opts.max_sessions,
        public_addr: opts.public_addr,
        fwd_addr,
        sessions: Mutex::new(HashSet::new()),
        live: Mutex::new(HashMap::new()),
        idle_timeout: opts.idle_timeout,
        connections: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        shutdown: Arc::clone(&shutdown),
    });
    let admin = AdminSocket::bind(&opts.admin_socket)?;
    admin.serve(
        Arc::clone(&srv) as Arc<dyn admin::Sessions>,
        Arc::clone(&shutdown),
    )?;
    log::info!("admin socket {}", admin.path().display());
    log::info!(
        "listening on {local} (token {}, at most {} sessions)",
        if srv.token.is_some() {
            "required"
        } else {
            "not required"
        },
        srv.max_sessions
    );
    eprintln!("cloudlet server listening on {local}");
    let advert = crate::discovery::advertise(
        opts.advertise.as_ref(),
        home,
        local,
        srv.max_sessions,
        srv.token.is_some(),
    )?;
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
        anyhow::bail!("{left} sessions did not end within {SHUTDOWN_WAIT:?}");
    }
    Ok(())
}

fn accept(srv: &Arc<Server>, stream: TcpStream, peer: SocketAddr) {
    let limit = usize::try_from(srv.max_sessions)
        .unwrap_or(usize::MAX)
        .saturating_add(MAX_PENDING);
    if srv.connections.fetch_add(1, Ordering::SeqCst) >= limit {
        srv.connections.fetch_sub(1, Ordering::SeqCst);
        log::warn!("{peer}: too many connections, dropped");
        return;
    }
    let id = srv.next_id.fetch_add(1, Ordering::SeqCst);
    let guard = ConnGuard {
        srv: Arc::clone(srv),
        slot: None,
    };
    let spawned = std::thread::Builder::new()
        .name(format!("session-{id}"))
        .spawn(move || connection(guard, stream, peer, id));
    if let Err(e) = spawned {
        log::warn!("{peer}: starting a session thread failed: {e}");
    }
}

/// How a session ended.
#[derive(Debug, Clone)]
enum End {
    /// The client sent `Finish`: answer `Closed`.
    Finish,
    /// The client is gone (or cannot be written to): nothing to send.
    Gone(String),
    /// The session failed: send `Refused` (before `Accepted`) or `Error` (after).
    Fail(RefuseReason),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Finish => f.write_str("finished by the client"),
            End::Gone(why) => write!(f, "client gone: {why}"),
            End::Fail(reason) => write!(f, "failed: {reason}"),
        }
    }
}

impl From<RefuseReason> for End {
    fn from(r: RefuseReason) -> Self {
        End::Fail(r)
    }
}

/// A read or decode failure of a client frame, as an end.
fn end_for(e: &ProtoError) -> End {
    match e {
        ProtoError::Closed => End::Gone("the client disconnected".into()),
        _ => match reason_for(e) {
            Some(r) => End::Fail(r),
            None => End::Gone(format!("{e}")),
        },
    }
}

/// One authenticated connection: the write half, the end reason, counters.
struct Conn {
    id: u64,
    srv: Arc<Server>,
    writer: Mutex<TcpStream>,
    last_sent: Mutex<Instant>,
    /// Set once the session is ending; everything waiting gives up.
    stop: AtomicBool,
    end: Mutex<Option<End>>,
    accepted: AtomicBool,
    t0: Instant,
    timings: Mutex<Timings>,
    bytes_received: AtomicU64,
    demand_requests: AtomicU64,
    peer: SocketAddr,
    started: SystemTime,
    /// What the admin socket reports beyond the counters.
    view: Mutex<View>,
}

/// A session's state, base and VM, as `list-session` shows them.
struct View {
    state: SessionState,
    base_id: Option<String>,
    ports: Vec<PortMapping>,
    qemu_pid: Option<u32>,
}

impl Conn {
    fn new(id: u64, srv: Arc<Server>, writer: TcpStream, peer: SocketAddr) -> Conn {
        Conn {
            id,
            srv,
            writer: Mutex::new(writer),
            last_sent: Mutex::new(Instant::now()),
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            accepted: AtomicBool::new(false),
            t0: Instant::now(),
            timings: Mutex::new(Timings::default()),
            bytes_received: AtomicU64::new(0),
            demand_requests: AtomicU64::new(0),
            peer,
            started: SystemTime::now(),
            view: Mutex::new(View {
                state: SessionState::Authenticated,
                base_id: None,
                ports: Vec::new(),
                qemu_pid: None,
            }),
        }
    }

    fn set_state(&self, state: SessionState) {
        lock(&self.view).state = state;
    }

    /// The session as the admin socket reports it.
    fn info(&self) -> SessionInfo {
        let v = lock(&self.view);
        let started_unix = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        SessionInfo {
            id: self.id,
            peer: self.peer.to_string(),
            state: if self.stopped() {
                SessionState::Ending
            } else {
                v.state
            },
            base_id: v.base_id.clone(),
            started_unix,
            age_s: self.t0.elapsed().as_secs(),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            demand_requests: self.demand_requests.load(Ordering::Relaxed),
            ports: v.ports.clone(),
            qemu_pid: v.qemu_pid,
        }
    }

    /// Ends the session on the operator's word: recorded as the end, and the client's socket
    /// is shut for reading so that a read waiting for its next frame returns at once.
    fn close_by_operator(&self) {
        self.finish(End::Fail(RefuseReason::Closed(
            "cloudlet close-session".into(),
        )));
        let _ = lock(&self.writer).shutdown(Shutdown::Read);
    }

    /// Sends one message; a failed write ends the session (the client is gone).
    fn send(&self, msg: &ServerMsg) -> bool {
        let mut w = lock(&self.writer);
        let r = server::send(&mut *w, msg);
        *lock(&self.last_sent) = Instant::now();
        drop(w);
        match r {
            Ok(()) => true,
            Err(e) => {
                self.finish(End::Gone(format!("writing {} failed: {e}", msg.name())));
                false
            }
        }
    }

    /// Records why the session ends (the first reason wins) and stops everything.
    fn finish(&self, end: End) {
        let mut e = lock(&self.end);
        if e.is_none() {
            log::debug!("session {}: ending: {end:?}", self.id);
            *e = Some(end);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn ms(&self) -> Option<u64> {
        Some(u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn timings(&self) -> Timings {
        *lock(&self.timings)
    }
}

fn clip(reason: RefuseReason) -> RefuseReason {
    match reason {
        RefuseReason::Invalid(s) => RefuseReason::Invalid(clip_text(s)),
        RefuseReason::BadOverlay(s) => RefuseReason::BadOverlay(clip_text(s)),
        RefuseReason::Internal(s) => RefuseReason::Internal(clip_text(s)),
        RefuseReason::Closed(s) => RefuseReason::Closed(clip_text(s)),
        other => other,
    }
}

fn connection(mut guard: ConnGuard, mut stream: TcpStream, peer: SocketAddr, id: u64) {
    let srv = Arc::clone(&guard.srv);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        log::warn!("{peer}: socket setup failed: {e}");
        return;
    }
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    {
        let mut sessions = lock(&srv.sessions);
        if sessions.len() >= usize::try_from(srv.max_sessions).unwrap_or(usize::MAX) {
            drop(sessions);
            // Read the Hello first, so the refusal is not lost to a reset.
            let _ = read_frame_before(&stream, HANDSHAKE_FRAME_MAX, deadline);
            server::refuse(
                &mut stream,
                RefuseReason::Busy {
                    max_sessions: srv.max_sessions,
                },
            );
            log::info!("{peer}: refused: busy");
            return;
        }
        sessions.insert(id);
        guard.slot = Some(id);
    }
    if let Err(e) = server::handshake(&mut stream, srv.token.as_ref(), id, deadline) {
        log::info!("session {id} from {peer}: handshake failed: {e}");
        return;
    }
    log::info!("session {id} from {peer}: authenticated");
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log::warn!("session {id}: cloning the socket failed: {e}");
            return;
        }
    };
    let conn = Arc::new(Conn::new(id, Arc::clone(&srv), writer, peer));
    lock(&srv.live).insert(id, Arc::downgrade(&conn));
    let ticker = {
        let conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name(format!("session-{id}-tick"))
            .spawn(move || tick(&conn))
    };
    let end = run_session(&conn, &stream).unwrap_or_else(|| {
        lock(&conn.end)
            .clone()
            .unwrap_or_else(|| End::Gone("unknown".into()))
    });
    conn.finish(end.clone());
    // Whatever came first is the end of record. The VM is stopped and unmounted by now.
    let end = lock(&conn.end).clone().unwrap_or(end);
    guard.release();
    // No keepalive may follow the last message.
    if let Ok(t) = ticker {
        let _ = t.join();
    }
    match &end {
        End::Finish => {
            conn.send(&ServerMsg::Closed);
        }
        End::Fail(reason) => {
            let reason = clip(reason.clone());
            if conn.accepted.load(Ordering::SeqCst) {
                conn.send(&ServerMsg::Error { reason });
            } else {
                server::refuse(&mut *lock(&conn.writer), reason);
            }
            drain(&stream);
        }
        End::Gone(_) => {}
    }
    let _ = stream.shutdown(Shutdown::Both);
    log::info!(
        "session {id} from {peer}: ended ({end}); {} bytes received, {} segments asked on demand",
        conn.bytes_received.load(Ordering::Relaxed),
        conn.demand_requests.load(Ordering::Relaxed)
    );
}

/// After a refusal: closes the write half, then reads and drops what the client still sends
/// (bounded in time and bytes), so that closing with unread data does not reset the connection
/// before the client has read why.
fn drain(stream: &TcpStream) {
    use std::io::Read;
    const DRAIN_TIME: Duration = Duration::from_secs(2);
    const DRAIN_BYTES: u64 = 64 << 20;
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + DRAIN_TIME;
    let mut buf = [0u8; 64 << 10];
    let mut total = 0u64;
    let mut s = stream;
    while total < DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
}

/// Sends `Keepalive` whenever the session has said nothing for [`KEEPALIVE_INTERVAL`]; turns
/// the server's SIGTERM into the session's end.
fn tick(conn: &Conn) {
    while !conn.stopped() {
        if conn.srv.shutdown.load(Ordering::Relaxed) {
            conn.finish(End::Fail(RefuseReason::Closed(
                "the server is shutting down".into(),
            )));
            break;
        }
        if lock(&conn.last_sent).elapsed() >= KEEPALIVE_INTERVAL {
            conn.send(&ServerMsg::Keepalive);
        }
        std::thread::sleep(TICK);
    }
}

fn read_client(conn: &Conn, stream: &TcpStream) -> Result<ClientMsg, ProtoError> {
    read_msg_before(stream, FRAME_MAX, Instant::now() + conn.srv.idle_timeout)
}

fn unexpected(msg: &ClientMsg, state: &str) -> End {
    End::Fail(RefuseReason::Invalid(format!(
        "unexpected {} in state {state}",
        msg.name()
    )))
}

/// Runs a session to its end. Returns the end, or `None` when it was recorded on `conn`.
fn run_session(conn: &Arc<Conn>, stream: &TcpStream) -> Option<End> {
    let first = loop {
        match read_client(conn, stream) {
            Ok(ClientMsg::Keepalive) => {}
            Ok(m) => break m,
            Err(e) => return Some(end_for(&e)),
        }
    };
    match first {
        ClientMsg::StartOverlay {
            early_start,
            guest_ports,
            file_len,
            head_len,
        } => {
            log::info!(
                "session {}: overlay of {file_len} bytes, early start {early_start}, ports {guest_ports:?}",
                conn.id
            );
            conn.set_state(SessionState::Metadata);
            let req = Start {
                early_start,
                guest_ports,
            };
            overlay_session(conn, stream, &req, file_len, head_len).err()
        }
        ClientMsg::StartUrl {
            url,
            early_start,
            guest_ports,
        } => {
            log::info!(
                "session {}: URL {url}, early start {early_start}, ports {guest_ports:?}",
                conn.id
            );
            conn.set_state(SessionState::Metadata);
            let req = Start {
                early_start,
                guest_ports,
            };
            url_session(conn, stream, &req, &url).err()
        }
        ClientMsg::Finish => Some(End::Finish),
        other => Some(unexpected(&other, "Authenticated")),
    }
}

/// What both flows ask for.
struct Start {
    early_start: bool,
    guest_ports: Vec<u16>,
}

fn internal(what: &str, e: impl std::fmt::Display) -> End {
    End::Fail(RefuseReason::Internal(format!("{what}: {e}")))
}

/// Looks the overlay's base up in the registry and sends `Accepted`.
fn accept_overlay(conn: &Conn, overlay: &Overlay) -> Result<synth::registry::Base, End> {
    let base_id = hex(&overlay.metadata().base_id);
    let registry = Registry::open(&conn.srv.home).map_err(|e| internal("registry", e))?;
    let base = match registry.get(&base_id) {
        Ok(b) if b.record.id == base_id => b,
        Ok(_) | Err(RegistryError::NotFound(_)) | Err(RegistryError::Ambiguous(_)) => {
            return Err(End::Fail(RefuseReason::UnknownBase { base_id }))
        }
        Err(e) => return Err(internal("registry", e)),
    };
    lock(&conn.timings).metadata_ms = conn.ms();
    let segments = u32::try_from(overlay.metadata().segments.len())
        .map_err(|_| End::Fail(RefuseReason::BadOverlay("too many segments".into())))?;
    conn.accepted.store(true, Ordering::SeqCst);
    {
        let mut v = lock(&conn.view);
        v.state = SessionState::Filling;
        v.base_id = Some(base_id.clone());
    }
    log::info!(
        "session {}: accepted overlay of base {base_id} ({segments} segments)",
        conn.id
    );
    if !conn.send(&ServerMsg::Accepted {
        base_id,
        segments,
        file_len: overlay.file_len(),
    }) {
        return Err(End::Gone("client gone".into()));
    }
    Ok(base)
}

/// Maps each guest port to a free host port.
fn forwards(conn: &Conn, ports: &[u16]) -> Result<(Vec<HostFwd>, Vec<PortMapping>), End> {
    let mut fwds = Vec::with_capacity(ports.len());
    let mut maps = Vec::with_capacity(ports.len());
    for &guest in ports {
        let host_port = synth::vm::free_tcp_port().map_err(|e| internal("free port", e))?;
        fwds.push(HostFwd {
            host_addr: conn.srv.fwd_addr,
            host_port,
            guest_port: guest,
        });
        maps.push(PortMapping {
            guest,
            host_addr: conn.srv.public_addr.clone(),
            host_port,
        });
    }
    Ok((fwds, maps))
}

/// Resumes the VM over `source`, sends `Resumed`, then watches the session until it ends,
/// sending `FillDone` once `filled()` says so. Stops the VM before returning.
fn run_vm(
    conn: &Conn,
    base: &synth::registry::Base,
    source: Arc<dyn ByteSource>,
    req: &Start,
    filled: &dyn Fn(&RunningVm) -> bool,
    stats: &dyn Fn(&RunningVm) -> SessionStats,
) -> End {
    if conn.stopped() {
        return End::Gone("ended before the VM started".into());
    }
    let (fwds, maps) = match forwards(conn, &req.guest_ports) {
        Ok(f) => f,
        Err(e) => return e,
    };
    let id = conn.id;
    let running = resume_vm(
        &conn.srv.home,
        base,
        OverlaySource::Source(source),
        &ResumeOptions {
            early_start: req.early_start,
            hostfwd: &fwds,
            // The server runs its sessions on QEMU directly.
            backend: &Backend::Qemu,
        },
        &conn.stop,
        &mut |e: &str| log::info!("session {id}: {e}"),
    );
    let running = match running {
        Ok(r) => r,
        Err(e) if conn.stopped() => {
            log::info!("session {id}: resume abandoned: {e:#}");
            return End::Gone("ended while resuming".into());
        }
        Err(e) => return internal("resuming the VM", format!("{e:#}")),
    };
    lock(&conn.timings).resumed_ms = conn.ms();
    let vm = running.vm.describe();
    let pid = running.vm.pid();
    {
        let mut v = lock(&conn.view);
        v.qemu_pid = pid;
        v.ports.clone_from(&maps);
    }
    log::info!(
        "session {id}: VM resumed ({vm}, ports {:?})",
        maps.iter()
            .map(|m| format!("{}->{}", m.guest, m.host_port))
            .collect::<Vec<_>>()
    );
    conn.send(&ServerMsg::Resumed(ResumeInfo {
        ports: maps,
        timings: conn.timings(),
    }));
    let mut fill_sent = false;
    let end = loop {
        if conn.stopped() {
            break None;
        }
        if !fill_sent && filled(&running) {
            fill_sent = true;
            lock(&conn.timings).fill_done_ms = conn.ms();
            conn.set_state(SessionState::Running);
            log::info!("session {id}: fill done");
            conn.send(&ServerMsg::FillDone(FillInfo {
                timings: conn.timings(),
                stats: stats(&running),
            }));
        }
        if pid.is_some_and(|p| !qemu_alive(p)) {
            break Some(internal("the VM exited", "see the server log"));
        }
        if !running.mounted.is_alive() {
            break Some(internal("cloudletfs went away", "see the server log"));
        }
        std::thread::sleep(TICK);
    };
    if let Some(e) = &end {
        conn.finish(e.clone());
    }
    match running.stop() {
        Ok(s) => log::info!(
            "session {id}: VM stopped, cloudletfs unmounted ({})",
            serde_json::to_string(&s).unwrap_or_default()
        ),
        Err(e) => log::warn!("session {id}: stopping the VM: {e:#}"),
    }
    end.unwrap_or_else(|| End::Gone("recorded".into()))
}

/// Whether process `pid` runs (not gone, not a zombie).
fn qemu_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Flow 1: head, `Accepted`, segments from the client into a [`NetSource`], the VM.
fn overlay_session(
    conn: &Arc<Conn>,
    stream: &TcpStream,
    req: &Start,
    file_len: u64,
    head_len: u64,
) -> Result<(), End> {
    check_ports(&req.guest_ports)?;
    let mut asm = HeadAssembler::new(file_len, head_len, MAX_HEAD_LEN)?;
    loop {
        match read_client(conn, stream) {
            Ok(ClientMsg::Head { offset, bytes }) => {
                conn.bytes_received
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if asm.push(offset, &bytes)? {
                    break;
                }
            }
            Ok(ClientMsg::Keepalive) => {}
            Ok(ClientMsg::Finish) => return Err(End::Finish),
            Ok(other) => return Err(unexpected(&other, "Receiving metadata")),
            Err(e) => return Err(end_for(&e)),
        }
    }
    let (overlay, head) = asm.finish()?;
    if overlay.file_len() != file_len {
        return Err(End::Fail(RefuseReason::Invalid(format!(
            "file length {file_len} differs from the header's {}",
            overlay.file_len()
        ))));
    }
    let base = accept_overlay(conn, &overlay)?;
    let run = RunDir::new(&conn.srv.home, &format!("server-session-{}", conn.id))
        .map_err(|e| internal("run folder", format!("{e:#}")))?;
    let net = Arc::new(
        NetSource::new(
            Arc::clone(conn),
            &overlay,
            head.head(),
            &run.join("overlay"),
        )
        .map_err(|e| internal("spill file", e))?,
    );
    let reader = {
        let conn = Arc::clone(conn);
        let net = Arc::clone(&net);
        let stream = stream
            .try_clone()
            .map_err(|e| internal("cloning the socket", e))?;
        let asm = SegmentAssembler::new(overlay.metadata_arc());
        std::thread::Builder::new()
            .name(format!("session-{}-rx", conn.id))
            .spawn(move || read_loop(&conn, &stream, Some((asm, &*net))))
            .map_err(|e| internal("reader thread", e))?
    };
    let net_filled = Arc::clone(&net);
    let net_stats = Arc::clone(&net);
    let end = run_vm(
        conn,
        &base,
        net,
        req,
        &move |_| net_filled.complete(),
        &move |_| net_stats.stats(),
    );
    conn.finish(end);
    // Unblocks the reader (if it still waits for a frame), then reaps it.
    let _ = stream.shutdown(Shutdown::Read);
    let _ = reader.join();
    drop(run);
    Err(lock(&conn.end)
        .clone()
        .unwrap_or(End::Gone("unknown".into())))
}

/// Flow 2: the server fetches the overlay by HTTP range requests.
fn url_session(conn: &Arc<Conn>, stream: &TcpStream, req: &Start, url: &str) -> Result<(), End> {
    check_ports(&req.guest_ports)?;
    conn.srv.policy.check(url)?;
    // From here the client only sends Keepalive or Finish.
    let reader = {
        let conn = Arc::clone(conn);
        let stream = stream
            .try_clone()
            .map_err(|e| internal("cloning the socket", e))?;
        std::thread::Builder::new()
            .name(format!("session-{}-rx", conn.id))
            .spawn(move || read_loop(&conn, &stream, None))
            .map_err(|e| internal("reader thread", e))?
    };
    let result = url_vm(conn, req, url);
    if let Err(e) = result {
        conn.finish(e);
    }
    let _ = stream.shutdown(Shutdown::Read);
    let _ = reader.join();
    Err(lock(&conn.end)
        .clone()
        .unwrap_or(End::Gone("unknown".into())))
}

fn url_vm(conn: &Arc<Conn>, req: &Start, url: &str) -> Result<(), End> {
    // Every redirect must stay under the operator's prefixes, like the URL itself.
    let policy = conn.srv.policy.clone();
    let opts = HttpOptions {
        redirects: RedirectPolicy::new(move |cur, loc| {
            policy.check_redirect(cur, loc).map_err(|r| r.to_string())
        }),
        ..HttpOptions::default()
    };
    let http = HttpSource::open(url, opts).map_err(|e| internal("fetching the overlay", e))?;
    if conn.stopped() {
        return Err(End::Gone("ended while probing the URL".into()));
    }
    let src: Arc<dyn ByteSource> = Arc::new(Counting {
        inner: http,
        conn: Arc::clone(conn),
    });
    let overlay = Overlay::open(Arc::clone(&src))
        .map_err(|e| End::Fail(RefuseReason::BadOverlay(format!("{e:#}"))))?;
    let base = accept_overlay(conn, &overlay)?;
    let segments_total = u32::try_from(overlay.metadata().segments.len()).unwrap_or(u32::MAX);
    let c = Arc::clone(conn);
    let end = run_vm(
        conn,
        &base,
        src,
        req,
        &|r: &RunningVm| r.mounted.wait_filled(Some(Duration::ZERO)),
        &move |r: &RunningVm| {
            let s = r.mounted.stats();
            let fetch = serde_json::to_value(&s)
                .ok()
                .and_then(|v| v.get("fetch").cloned())
                .unwrap_or_default();
            SessionStats {
                bytes_received: c.bytes_received.load(Ordering::Relaxed),
                segments_received: fetch["segments_done"]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
                segments_total,
                demand_requests: 0,
                detail_json: clip_text(
                    serde_json::json!({ "session": c.id, "flow": "url", "fetch": fetch })
                        .to_string(),
                ),
            }
        },
    );
    Err(end)
}

/// An HTTP source that counts the bytes fetched.
struct Counting {
    inner: HttpSource,
    conn: Arc<Conn>,
}

impl ByteSource for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let v = self.inner.read_range(offset, len)?;
        self.conn
            .bytes_received
            .fetch_add(v.len() as u64, Ordering::Relaxed);
        Ok(v)
    }
}

/// Reads the client's frames after `Accepted`: segment parts (flow 1), `Keepalive`, `Finish`.
fn read_loop(conn: &Conn, stream: &TcpStream, mut segs: Option<(SegmentAssembler, &NetSource)>) {
    while !conn.stopped() {
        let msg = match read_client(conn, stream) {
            Ok(m) => m,
            Err(e) => {
                conn.finish(end_for(&e));
                return;
            }
        };
        match (msg, segs.as_mut()) {
            (ClientMsg::Keepalive, _) => {}
            (ClientMsg::Finish, _) => {
                conn.finish(End::Finish);
                return;
            }
            (
                ClientMsg::Segment {
                    index,
                    offset,
                    bytes,
                },
                Some((asm, net)),
            ) => {
                conn.bytes_received
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                net.receiving(index);
                match asm.push(index, offset, &bytes) {
                    Ok(None) => {}
                    Ok(Some((i, data))) => {
                        if let Err(e) = net.insert(i, &data) {
                            conn.finish(internal("spill file", e));
                            return;
                        }
                    }
                    Err(r) => {
                        conn.finish(End::Fail(r));
                        return;
                    }
                }
            }
            (other, _) => {
                conn.finish(unexpected(&other, "Filling/Running"));
                return;
            }
        }
    }
}

/// Which segments are in, which were asked for, and when bytes last arrived.
struct SegState {
    ready: Vec<bool>,
    asked: Vec<bool>,
    count: usize,
    receiving: Option<u32>,
    last_progress: Instant,
}

/// The overlay as received so far: header and metadata from the start, each segment once it
/// arrived (kept in a spill file in the session's run folder, not in memory). Reads of
/// segments not in yet block until they arrive, the session ends, or the client stalls.
struct NetSource {
    conn: Arc<Conn>,
    file: File,
    file_len: u64,
    head_len: u64,
    /// `(start in the file, length, index)` of each segment, by start.
    segments: Vec<(u64, u64, u32)>,
    state: Mutex<SegState>,
    cv: Condvar,
}

impl NetSource {
    fn new(conn: Arc<Conn>, overlay: &Overlay, head: &[u8], spill: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(spill)?;
        file.set_len(overlay.file_len())?;
        file.write_all_at(head, 0)?;
        let data_start = overlay.data_start();
        let mut segments = Vec::with_capacity(overlay.metadata().segments.len());
        for (i, s) in overlay.metadata().segments.iter().enumerate() {
            let start = data_start.checked_add(s.offset).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "segment offset overflows")
            })?;
            let index = u32::try_from(i).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "too many segments")
            })?;
            segments.push((start, s.length, index));
        }
        segments.sort_unstable();
        let n = segments.len();
        Ok(NetSource {
            conn,
            file,
            file_len: overlay.file_len(),
            head_len: head.len() as u64,
            segments,
            state: Mutex::new(SegState {
                ready: vec![false; n],
                asked: vec![false; n],
                count: 0,
                receiving: None,
                last_progress: Instant::now(),
            }),
            cv: Condvar::new(),
        })
    }

    /// A part of segment `index` arrived.
    fn receiving(&self, index: u32) {
        let mut s = lock(&self.state);
        s.receiving = Some(index);
        s.last_progress = Instant::now();
    }

    /// Segment `index` is complete and verified: store it and wake its readers.
    fn insert(&self, index: u32, data: &[u8]) -> std::io::Result<()> {
        let start = self
            .segments
            .iter()
            .find(|s| s.2 == index)
            .map(|s| s.0)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no segment"))?;
        self.file.write_all_at(data, start)?;
        let mut s = lock(&self.state);
        if let Some(r) = usize::try_from(index).ok().and_then(|i| s.ready.get_mut(i)) {
            if !*r {
                *r = true;
                s.count += 1;
            }
        }
        s.receiving = None;
        s.last_progress = Instant::now();
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    fn complete(&self) -> bool {
        let s = lock(&self.state);
        s.count == s.ready.len()
    }

    fn stats(&self) -> SessionStats {
        let s = lock(&self.state);
        let asked = s.asked.iter().filter(|a| **a).count();
        SessionStats {
            bytes_received: self.conn.bytes_received.load(Ordering::Relaxed),
            segments_received: u32::try_from(s.count).unwrap_or(u32::MAX),
            segments_total: u32::try_from(s.ready.len()).unwrap_or(u32::MAX),
            demand_requests: self.conn.demand_requests.load(Ordering::Relaxed),
            detail_json: serde_json::json!({
                "session": self.conn.id,
                "flow": "overlay",
                "segments_asked": asked,
                "head_bytes": self.head_len,
            })
            .to_string(),
        }
    }

    /// Waits until every segment of `needed` is in. A demand read (not the background
    /// filler) asks the client once for each missing segment it does not already send.
    fn wait_for(&self, needed: &[u32]) -> Result<(), SourceError> {
        let demand = std::thread::current().name() != Some(FILLER_THREAD);
        let mut ask = Vec::new();
        let mut s = lock(&self.state);
        for &i in needed {
            let Ok(u) = usize::try_from(i) else { continue };
            let ready = s.ready.get(u).copied().unwrap_or(true);
            if demand && !ready && s.receiving != Some(i) && !s.asked[u] {
                s.asked[u] = true;
                ask.push(i);
            }
        }
        drop(s);
        for index in ask {
            log::debug!("session {}: asking for segment {index}", self.conn.id);
            self.conn.demand_requests.fetch_add(1, Ordering::Relaxed);
            self.conn.send(&ServerMsg::NeedSegment { index });
        }
        let started = Instant::now();
        let mut s = lock(&self.state);
        loop {
            let missing = needed.iter().any(|&i| {
                !usize::try_from(i)
                    .ok()
                    .and_then(|u| s.ready.get(u).copied())
                    .unwrap_or(true)
            });
            if !missing {
                return Ok(());
            }
            if self.conn.stopped() {
                return Err(SourceError::Remote("the session has ended".into()));
            }
            if s.last_progress.elapsed() > self.conn.srv.idle_timeout
                || started.elapsed() > MAX_SEGMENT_WAIT
            {
                return Err(SourceError::Remote(format!(
                    "segments {needed:?} did not arrive in time"
                )));
            }
            s = match self.cv.wait_timeout(s, TICK) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

impl ByteSource for NetSource {
    fn size(&self) -> u64 {
        self.file_len
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let n = check_range(offset, len, self.file_len)?;
        let end = offset + len;
        if end > self.head_len {
            let first = self.segments.partition_point(|s| s.0 + s.1 <= offset);
            let needed: Vec<u32> = self.segments[first..]
                .iter()
                .take_while(|s| s.0 < end)
                .filter(|s| s.1 > 0)
                .map(|s| s.2)
                .collect();
            self.wait_for(&needed)?;
        }
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| SourceError::Io {
                offset,
                len,
                source,
            })?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synth::protocol::read_msg;

    const TINY: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/golden/tiny.overlay"
    ));

    /// A `NetSource` over the golden overlay, with the client's end of its connection.
    fn fixture(name: &str) -> (Arc<NetSource>, Overlay, TcpStream, PathBuf) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_end, _) = listener.accept().unwrap();
        let srv = Arc::new(Server {
            home: std::env::temp_dir(),
            token: None,
            policy: UrlPolicy::default(),
            max_sessions: 1,
            public_addr: "127.0.0.1".into(),
            fwd_addr: Ipv4Addr::LOCALHOST,
            sessions: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            idle_timeout: synth::protocol::IDLE_TIMEOUT,
            connections: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown: Arc::new(AtomicBool::new(false)),
        });
        let peer = server_end.peer_addr().unwrap();
        let conn = Arc::new(Conn::new(1, srv, server_end, peer));
        conn.accepted.store(true, Ordering::SeqCst);
        let src: Arc<dyn ByteSource> = Arc::new(TINY.to_vec());
        let overlay = Overlay::open(src).unwrap();
        let spill =
            std::env::temp_dir().join(format!("cloudlet-netsource-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&spill);
        let head = &TINY[..usize::try_from(overlay.data_start()).unwrap()];
        let net = Arc::new(NetSource::new(conn, &overlay, head, &spill).unwrap());
        (net, overlay, client, spill)
    }

    fn segment_range(overlay: &Overlay, i: usize) -> (u64, u64) {
        let s = &overlay.metadata().segments[i];
        (overlay.data_start() + s.offset, s.length)
    }

    #[test]
    fn net_source_head_read_answers_at_once() {
        let (net, overlay, _client, spill) = fixture("head");
        let n = overlay.data_start();
        assert_eq!(
            net.read_range(0, n).unwrap(),
            &TINY[..usize::try_from(n).unwrap()]
        );
        std::fs::remove_file(spill).unwrap();
    }

    #[test]
    fn net_source_demand_read_waits_and_asks_once() {
        let (net, overlay, mut client, spill) = fixture("demand");
        let (off, len) = segment_range(&overlay, 0);
        let reader = {
            let net = Arc::clone(&net);
            std::thread::spawn(move || net.read_range(off, len))
        };
        let msg: ServerMsg = read_msg(&mut client, FRAME_MAX).unwrap();
        assert_eq!(msg, ServerMsg::NeedSegment { index: 0 });
        let bytes = overlay.read_segment_compressed(0).unwrap();
        net.insert(0, &bytes).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), bytes);
        assert_eq!(net.conn.demand_requests.load(Ordering::Relaxed), 1);
        assert!(net.complete() == (overlay.metadata().segments.len() == 1));
        std::fs::remove_file(spill).unwrap();
    }

    #[test]
    fn net_source_filler_read_does_not_ask() {
        let (net, overlay, mut client, spill) = fixture("filler");
        let (off, len) = segment_range(&overlay, 0);
        let reader = {
            let net = Arc::clone(&net);
            std::thread::Builder::new()
                .name(FILLER_THREAD.into())
                .spawn(move || net.read_range(off, len))
                .unwrap()
        };
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let r = read_msg::<ServerMsg>(&mut client, FRAME_MAX);
        assert!(matches!(r, Err(ProtoError::Timeout { .. })), "{r:?}");
        let bytes = overlay.read_segment_compressed(0).unwrap();
        net.insert(0, &bytes).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), bytes);
        std::fs::remove_file(spill).unwrap();
    }

    #[test]
    fn net_source_read_fails_when_session_ends() {
        let (net, overlay, _client, spill) = fixture("ended");
        let (off, len) = segment_range(&overlay, 0);
        let reader = {
            let net = Arc::clone(&net);
            std::thread::spawn(move || net.read_range(off, len))
        };
        std::thread::sleep(Duration::from_millis(300));
        net.conn.finish(End::Gone("test".into()));
        assert!(matches!(
            reader.join().unwrap(),
            Err(SourceError::Remote(_))
        ));
        std::fs::remove_file(spill).unwrap();
    }

    #[test]
    fn qemu_alive_own_process_yes_bogus_pid_no() {
        assert!(qemu_alive(std::process::id()));
        assert!(!qemu_alive(u32::MAX));
    }
}
