//! One authenticated connection's shared state: what the session thread, its reader thread,
//! the ticker, the network byte source and the admin socket all see of it (the TLS stream
//! they write to, how it ended, counters, what `list-session` shows).

use super::admin::{SessionInfo, SessionState};
use super::{lock, Server};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use synth::protocol::server;
use synth::protocol::{PortMapping, RefuseReason, ServerMsg, Timings, TlsConn};

/// How a session ended.
#[derive(Debug, Clone)]
pub(crate) enum End {
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

/// One authenticated connection: the write half, the end reason, counters.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) srv: Arc<Server>,
    /// The client's TLS stream, shared with the reader thread.
    pub(crate) tls: Arc<TlsConn>,
    pub(crate) last_sent: Mutex<Instant>,
    /// Set once the session is ending; everything waiting gives up.
    pub(crate) stop: AtomicBool,
    pub(crate) end: Mutex<Option<End>>,
    pub(crate) accepted: AtomicBool,
    pub(crate) t0: Instant,
    pub(crate) timings: Mutex<Timings>,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) demand_requests: AtomicU64,
    pub(crate) peer: SocketAddr,
    pub(crate) started: SystemTime,
    /// What the admin socket reports beyond the counters.
    pub(crate) view: Mutex<View>,
}

/// A session's state, base and VM, as `list-session` shows them.
pub(crate) struct View {
    pub(crate) state: SessionState,
    pub(crate) base_id: Option<String>,
    pub(crate) ports: Vec<PortMapping>,
    pub(crate) qemu_pid: Option<u32>,
    pub(crate) confinement: Option<String>,
}

impl Conn {
    pub(crate) fn new(id: u64, srv: Arc<Server>, tls: Arc<TlsConn>, peer: SocketAddr) -> Conn {
        Conn {
            id,
            srv,
            tls,
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
                confinement: None,
            }),
        }
    }

    pub(crate) fn set_state(&self, state: SessionState) {
        lock(&self.view).state = state;
    }

    /// The session as the admin socket reports it.
    pub(crate) fn info(&self) -> SessionInfo {
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
            confinement: v.confinement.clone(),
        }
    }

    /// Ends the session on the operator's word: recorded as the end, and the client's socket
    /// is shut for reading so that a read waiting for its next frame returns at once.
    pub(crate) fn close_by_operator(&self) {
        self.finish(End::Fail(RefuseReason::Closed(
            "cloudlet close-session".into(),
        )));
        let _ = self.tls.shutdown(Shutdown::Read);
    }

    /// Sends one message; a failed write ends the session (the client is gone).
    pub(crate) fn send(&self, msg: &ServerMsg) -> bool {
        let r = server::send(&mut &*self.tls, msg);
        *lock(&self.last_sent) = Instant::now();
        match r {
            Ok(()) => true,
            Err(e) => {
                self.finish(End::Gone(format!("writing {} failed: {e}", msg.name())));
                false
            }
        }
    }

    /// Records why the session ends (the first reason wins) and stops everything.
    pub(crate) fn finish(&self, end: End) {
        let mut e = lock(&self.end);
        if e.is_none() {
            log::debug!("session {}: ending: {end:?}", self.id);
            *e = Some(end);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn ms(&self) -> Option<u64> {
        Some(u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn timings(&self) -> Timings {
        *lock(&self.timings)
    }
}
