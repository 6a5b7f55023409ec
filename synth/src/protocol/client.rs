//! The client library behind `cloudlet client`, usable by any program that drives a server.
//!
//! ```text
//!  Client::connect ── TCP ── TLS (certificate checked: ServerTrust) ── Hello ──► HelloOk
//!        └── reader thread ──ServerMsg──► channel ──┐
//!                                                   ▼
//!  send_overlay: StartOverlay, Head parts, then per segment: demand queue first
//!                (NeedSegment jumps the queue), else the next in file order; between two
//!                parts of a segment, a segment asked for meanwhile is sent whole
//!  hold: keepalives until stop or the server ends; finish: Finish ─► Closed
//! ```
//!
//! One thread writes (the caller's), one reads (spawned at connect), both on one shared
//! [`TlsConn`], so a `NeedSegment` is seen between any two parts even while the writer is busy.
//! Stop a running call from another thread (a Ctrl-C handler) with a [`StopHandle`].
//!
//! The server's certificate is checked before anything is sent ([`ServerTrust`]): against the
//! fingerprint the caller pinned; else against the known-servers file's entry for the address;
//! else against the fingerprint a discovery announcement gave, or not at all (a first contact),
//! and then recorded in the known-servers file ([`TrustOutcome::FirstUse`]).

use super::fingerprint::{format_sha256, Fingerprint};
use super::frame::{read_msg, read_msg_before, write_msg, TimeoutStream};
use super::known_servers::{self, KnownServers, Recorded};
use super::messages::{ClientMsg, FillInfo, PortMapping, ResumeInfo, ServerMsg, Timings};
use super::tls::{self, Pin, PinSource, TlsConn};
use super::{
    ProtoError, DEFAULT_PART_LEN, FRAME_MAX, HANDSHAKE_FRAME_MAX, IDLE_TIMEOUT, KEEPALIVE_INTERVAL,
    MAX_PART_LEN, PROTOCOL_VERSION,
};
use crate::chunk::Digest;
use crate::format::Overlay;
use crate::source::{ByteSource, FileSource};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often waiting loops wake up to check the stop flag.
const TICK: Duration = Duration::from_millis(50);
/// Server messages buffered between the reader thread and the writer loop.
const CHANNEL_DEPTH: usize = 256;

/// Options of a client connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on connecting, on the handshake, and on every write.
    pub timeout: Duration,
    /// The server is gone if it says nothing (not even `Keepalive`) for this long.
    pub idle_timeout: Duration,
    /// Bytes per `Head`/`Segment` part (clamped to 4 KiB..=[`MAX_PART_LEN`]).
    pub part_len: usize,
    /// Throttle on head and segment bytes sent (token bucket), for tests and benchmarks.
    pub rate_limit_bytes_per_sec: Option<u64>,
    /// How the server's certificate is checked.
    pub trust: ServerTrust,
}

impl Default for ClientOptions {
    /// Trust on first use with the default known-servers file
    /// ([`known_servers::default_path`]), like SSH.
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            idle_timeout: IDLE_TIMEOUT,
            part_len: DEFAULT_PART_LEN,
            rate_limit_bytes_per_sec: None,
            trust: ServerTrust::known_servers(known_servers::default_path()),
        }
    }
}

/// How the client decides that the server's certificate is the right one. The first of these
/// that applies is used:
///
/// 1. `pinned`: only that fingerprint (`--server-fingerprint`); the known-servers file is
///    neither read nor written.
/// 2. The known-servers file's entry for the address connected to: only that fingerprint.
/// 3. `advertised` (the server's mDNS announcement, `--server auto`): only that fingerprint,
///    then recorded in the known-servers file.
/// 4. Any certificate (the server still proves it holds its key), recorded in the
///    known-servers file: trust on first use.
///
/// Without `pinned` and without `known_servers`, connecting fails ([`ProtoError::NoTrust`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTrust {
    /// The one fingerprint accepted.
    pub pinned: Option<Fingerprint>,
    /// The known-servers file (trust on first use).
    pub known_servers: Option<PathBuf>,
    /// The fingerprint a discovery announcement gave, for a server the file does not know.
    pub advertised: Option<Fingerprint>,
}

impl ServerTrust {
    /// Only `fingerprint`.
    pub fn pinned(fingerprint: Fingerprint) -> Self {
        ServerTrust {
            pinned: Some(fingerprint),
            ..ServerTrust::default()
        }
    }

    /// Trust on first use with the known-servers file `file`.
    pub fn known_servers(file: PathBuf) -> Self {
        ServerTrust {
            known_servers: Some(file),
            ..ServerTrust::default()
        }
    }
}

/// How the server's certificate was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustOutcome {
    /// It has the fingerprint the caller pinned.
    Pinned,
    /// It has the fingerprint the known-servers file holds for the server.
    Known {
        /// The file.
        file: PathBuf,
        /// The entry's line, from 1.
        line: usize,
    },
    /// First contact: the certificate was recorded in the known-servers file. Tell the user,
    /// loudly: only a fingerprint checked with the server's operator makes this safe.
    FirstUse {
        /// The file.
        file: PathBuf,
        /// Whether it was checked against the fingerprint of a discovery announcement.
        advertised: bool,
    },
}

/// What the certificate check of one connection will be, decided before connecting.
struct TrustPlan {
    pin: Option<Pin>,
    /// Where to record a first contact (and whether it was checked against an announcement).
    record: Option<(PathBuf, bool)>,
    outcome: Option<TrustOutcome>,
}

impl ServerTrust {
    fn plan(&self, server: &str) -> Result<TrustPlan, ProtoError> {
        if let Some(fp) = self.pinned {
            return Ok(TrustPlan {
                pin: Some(Pin {
                    fingerprint: fp,
                    source: PinSource::Explicit,
                }),
                record: None,
                outcome: Some(TrustOutcome::Pinned),
            });
        }
        let Some(file) = &self.known_servers else {
            return Err(ProtoError::NoTrust);
        };
        let list = KnownServers::load(file)?;
        if let Some(e) = list.get(server) {
            if self.advertised.is_some_and(|a| a != e.fingerprint) {
                log::warn!(
                    "{server}: the mDNS announcement gives {}, {} line {} has {}: the file wins",
                    self.advertised.map(|a| a.to_string()).unwrap_or_default(),
                    file.display(),
                    e.line,
                    e.fingerprint
                );
            }
            return Ok(TrustPlan {
                pin: Some(Pin {
                    fingerprint: e.fingerprint,
                    source: PinSource::KnownServers {
                        file: file.clone(),
                        line: e.line,
                        server: e.server.clone(),
                    },
                }),
                record: None,
                outcome: Some(TrustOutcome::Known {
                    file: file.clone(),
                    line: e.line,
                }),
            });
        }
        Ok(TrustPlan {
            pin: self.advertised.map(|fp| Pin {
                fingerprint: fp,
                source: PinSource::Advertised,
            }),
            record: Some((file.clone(), self.advertised.is_some())),
            outcome: None,
        })
    }
}

/// What the client asks of the session.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    /// Resume the VM as soon as the metadata is in.
    pub early_start: bool,
    /// Guest ports to expose.
    pub guest_ports: Vec<u16>,
    /// The overlay's metadata digest ([`Overlay::id`], see [`metadata_digest_of`]): a URL
    /// session sends it and the server refuses an overlay with another one; an overlay sent
    /// from a file must have it too.
    pub metadata_digest: Option<Digest>,
}

/// The metadata digest of the overlay file at `path` (what [`SessionRequest::metadata_digest`]
/// expects), after validating its header and metadata.
pub fn metadata_digest_of(path: &Path) -> Result<Digest, ProtoError> {
    Ok(Overlay::open(open_file(path)?)?.id())
}

/// The overlay file at `path` as a byte source.
fn open_file(path: &Path) -> Result<Arc<dyn ByteSource>, ProtoError> {
    let src = FileSource::open(path).map_err(|source| {
        ProtoError::Source(crate::source::SourceError::Io {
            offset: 0,
            len: 0,
            source,
        })
    })?;
    Ok(Arc::new(src))
}

/// Progress of a session, reported to the caller's callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server validated the metadata and knows the base.
    Accepted {
        /// Hex base id.
        base_id: String,
        /// Segments in the overlay.
        segments: u32,
    },
    /// A part was sent.
    Progress(TransferStats),
    /// The server asked for a segment out of order.
    Demand {
        /// The segment.
        index: u32,
    },
    /// The VM runs; here is how to reach it.
    Resumed(ResumeInfo),
    /// Every segment is in.
    FillDone(FillInfo),
}

/// Counters of the client's side of a transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Head and segment bytes sent.
    pub bytes_sent: u64,
    /// Bytes to send in all (the overlay file's length; 0 for a URL session).
    pub bytes_total: u64,
    /// Segments sent completely.
    pub segments_sent: u32,
    /// Segments in the overlay.
    pub segments_total: u32,
    /// `NeedSegment` requests received.
    pub demand_requests: u64,
    /// Of those, requests for segments already sent (in flight when asked for).
    pub demand_already_sent: u64,
}

/// How a session call ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The `Resumed` payload, if it arrived.
    pub resumed: Option<ResumeInfo>,
    /// The `FillDone` payload, if it arrived.
    pub fill_done: Option<FillInfo>,
    /// Client-side counters.
    pub transfer: TransferStats,
    /// Whether the call ended because it was stopped (the session is then finished).
    pub stopped: bool,
}

impl Outcome {
    /// The port mappings, if the VM was resumed.
    pub fn ports(&self) -> &[PortMapping] {
        self.resumed.as_ref().map_or(&[], |r| &r.ports)
    }

    /// The latest timings the server reported.
    pub fn timings(&self) -> Timings {
        match (&self.fill_done, &self.resumed) {
            (Some(f), _) => f.timings,
            (None, Some(r)) => r.timings,
            (None, None) => Timings::default(),
        }
    }
}

/// Stops a running [`Client`] call from another thread; the call sends `Finish` and returns.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the running (or next) call to finish the session.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

type Incoming = Result<ServerMsg, ProtoError>;

/// A connected, authenticated client session.
pub struct Client {
    conn: Arc<TlsConn>,
    server_fingerprint: Fingerprint,
    trust: TrustOutcome,
    rx: Option<Receiver<Incoming>>,
    reader: Option<JoinHandle<()>>,
    session_id: u64,
    opts: ClientOptions,
    stop: StopHandle,
    ended: bool,
    last_heard: Instant,
    last_sent: Instant,
    outcome: Outcome,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.session_id)
            .field("server_fingerprint", &self.server_fingerprint)
            .field("ended", &self.ended)
            .finish()
    }
}

/// Per-call state of the segment scheduler.
struct Schedule {
    sent: Vec<bool>,
    demand: VecDeque<u32>,
    next: usize,
}

/// What sending segments carries from one to the next.
struct SendState {
    part: usize,
    throttle: Option<Throttle>,
    sched: Schedule,
}

impl Schedule {
    /// A requested segment, not sent yet and not `current` (the one being sent, which a
    /// request for is answered by going on).
    fn pick_demand(&mut self, current: u32) -> Option<u32> {
        while let Some(i) = self.demand.pop_front() {
            let sent = self.sent.get(i as usize).copied().unwrap_or(true);
            if !sent && i != current {
                return Some(i);
            }
        }
        None
    }

    fn pick(&mut self) -> Option<u32> {
        while let Some(i) = self.demand.pop_front() {
            if !self.sent[i as usize] {
                return Some(i);
            }
        }
        while self.next < self.sent.len() && self.sent[self.next] {
            self.next += 1;
        }
        (self.next < self.sent.len()).then(|| u32::try_from(self.next).ok())?
    }
}

/// Token bucket that may go into debt by one part, then waits the debt off.
struct Throttle {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Client {
    /// Connects to `addr` (`host:port`) and runs the handshake with `token` (empty: none),
    /// trusting the server on first use through the default known-servers file.
    pub fn connect(addr: &str, token: &[u8], timeout: Duration) -> Result<Client, ProtoError> {
        Self::connect_with(
            addr,
            token,
            ClientOptions {
                timeout,
                ..ClientOptions::default()
            },
        )
    }

    /// [`Client::connect`] with every option. The certificate check ([`ClientOptions::trust`])
    /// happens inside the TLS handshake: a server that fails it gets nothing, not even the
    /// `Hello`. `addr` is also the name the server is known under in the known-servers file.
    pub fn connect_with(
        addr: &str,
        token: &[u8],
        opts: ClientOptions,
    ) -> Result<Client, ProtoError> {
        // Before any network traffic: a damaged known-servers file fails here.
        let server = known_servers::server_key(addr);
        let plan = opts.trust.plan(&server)?;
        let connect_err = |source| ProtoError::Connect {
            addr: addr.to_string(),
            source,
        };
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address resolved");
        let mut stream = None;
        for a in addr.to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&a, opts.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| connect_err(last))?;
        stream.set_nodelay(true).map_err(ProtoError::Write)?;
        stream
            .set_write_timeout(Some(opts.timeout))
            .map_err(ProtoError::Write)?;
        let deadline = Instant::now() + opts.timeout;
        let conn = Arc::new(tls::connect(stream, plan.pin, deadline)?);
        let Some(fingerprint) = conn.peer_fingerprint() else {
            return Err(ProtoError::TlsHandshake(
                rustls::Error::NoCertificatesPresented,
            ));
        };
        let trust = match (plan.outcome, plan.record) {
            (Some(outcome), _) => outcome,
            (None, Some((file, advertised))) => {
                record_first_use(&file, &server, fingerprint, advertised)?
            }
            (None, None) => return Err(ProtoError::NoTrust),
        };
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            token: token.to_vec(),
        };
        write_msg(&mut &*conn, &hello, HANDSHAKE_FRAME_MAX)?;
        let reply: ServerMsg = read_msg_before(&*conn, HANDSHAKE_FRAME_MAX, deadline)?;
        let session_id = match reply {
            ServerMsg::HelloOk {
                server_version,
                session_id,
            } if server_version == PROTOCOL_VERSION => session_id,
            ServerMsg::Refused { reason } => return Err(ProtoError::Refused(reason)),
            other => {
                return Err(ProtoError::Unexpected {
                    expected: "HelloOk",
                    got: format!("{other:?}"),
                })
            }
        };
        conn.set_timeout(None).map_err(ProtoError::Read)?;
        let rs = Arc::clone(&conn);
        let (tx, rx) = crossbeam_channel::bounded::<Incoming>(CHANNEL_DEPTH);
        let reader = std::thread::Builder::new()
            .name(format!("proto-rx-{session_id}"))
            .spawn(move || loop {
                let r = read_msg::<ServerMsg>(&mut &*rs, FRAME_MAX);
                let last = r.is_err();
                if tx.send(r).is_err() || last {
                    break;
                }
            })
            .map_err(|e| ProtoError::Thread("protocol reader", e))?;
        log::info!("Connected to {addr} ({fingerprint}), session {session_id}");
        let now = Instant::now();
        Ok(Client {
            conn,
            server_fingerprint: fingerprint,
            trust,
            rx: Some(rx),
            reader: Some(reader),
            session_id,
            opts,
            stop: StopHandle::default(),
            ended: false,
            last_heard: now,
            last_sent: now,
            outcome: Outcome::default(),
        })
    }

    /// The server's id of this session.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// The fingerprint of the server's certificate.
    pub fn server_fingerprint(&self) -> Fingerprint {
        self.server_fingerprint
    }

    /// How the server's certificate was accepted; on [`TrustOutcome::FirstUse`] the caller
    /// should tell the user the fingerprint it recorded.
    pub fn trust(&self) -> &TrustOutcome {
        &self.trust
    }

    /// A handle that stops the running call from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Flow 1 from a local overlay file: see [`Client::send_overlay`].
    pub fn send_overlay_file(
        &mut self,
        path: &Path,
        req: &SessionRequest,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<Outcome, ProtoError> {
        self.send_overlay(open_file(path)?, req, events)
    }

    /// Flow 1: validates the overlay in `source`, sends its header and metadata, then its
    /// segments in file order, answering `NeedSegment` requests first. Returns once the server
    /// reports `FillDone` (the session stays open: see [`Client::hold`] and
    /// [`Client::finish`]), or once stopped (the session is then finished).
    pub fn send_overlay(
        &mut self,
        source: Arc<dyn ByteSource>,
        req: &SessionRequest,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<Outcome, ProtoError> {
        self.check_open()?;
        let overlay = Overlay::open(Arc::clone(&source))?;
        if let Some(want) = req.metadata_digest.filter(|d| *d != overlay.id()) {
            return Err(ProtoError::OverlayDigest {
                expected: format_sha256(&want),
                got: format_sha256(&overlay.id()),
            });
        }
        let n = overlay.metadata().segments.len();
        let head_len = overlay.data_start();
        self.outcome.transfer.bytes_total = overlay.file_len();
        self.outcome.transfer.segments_total = u32::try_from(n).map_err(|_| {
            ProtoError::Overlay(crate::format::FormatError::BadSegment {
                segment: n,
                reason: "too many segments to send".into(),
            })
        })?;
        self.send(&ClientMsg::StartOverlay {
            early_start: req.early_start,
            guest_ports: req.guest_ports.clone(),
            file_len: overlay.file_len(),
            head_len,
        })?;
        let mut st = SendState {
            part: self.part_len(),
            throttle: self.throttle(),
            sched: Schedule {
                sent: vec![false; n],
                demand: VecDeque::new(),
                next: 0,
            },
        };
        let mut offset = 0u64;
        while offset < head_len {
            let len = (head_len - offset).min(st.part as u64);
            let bytes = source.read_range(offset, len)?;
            if self.pace(&mut st.throttle, len, &mut st.sched, events)? {
                return self.stopped();
            }
            self.send(&ClientMsg::Head { offset, bytes })?;
            offset += len;
            self.outcome.transfer.bytes_sent += len;
            events(&ClientEvent::Progress(self.outcome.transfer));
        }
        loop {
            if self.pump(Duration::ZERO, &mut st.sched, events)? {
                return self.stopped();
            }
            if self.outcome.fill_done.is_some() {
                return Ok(self.outcome.clone());
            }
            let Some(index) = st.sched.pick() else {
                // Everything sent: wait for FillDone, keeping the connection alive.
                if self.pump(TICK, &mut st.sched, events)? {
                    return self.stopped();
                }
                self.keepalive()?;
                continue;
            };
            if self.send_segment(&overlay, index, true, &mut st, events)? {
                return self.stopped();
            }
        }
    }

    /// Sends segment `index` as parts. With `preempt`, a segment the server asks for meanwhile
    /// is sent whole between two parts (the server holds two partial segments), so a demand
    /// never waits behind the rest of a large segment on a slow link. Returns `true` if
    /// stopped.
    fn send_segment(
        &mut self,
        overlay: &Overlay,
        index: u32,
        preempt: bool,
        st: &mut SendState,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<bool, ProtoError> {
        let bytes = overlay.read_segment_compressed(index as usize)?;
        let mut seg_off = 0usize;
        while seg_off < bytes.len() {
            while let Some(d) = preempt.then(|| st.sched.pick_demand(index)).flatten() {
                log::debug!("Segment {d} asked for: sent inside segment {index}");
                if self.send_segment(overlay, d, false, st, events)? {
                    return Ok(true);
                }
            }
            let end = (seg_off + st.part).min(bytes.len());
            let len = (end - seg_off) as u64;
            if self.pace(&mut st.throttle, len, &mut st.sched, events)? {
                return Ok(true);
            }
            self.send(&ClientMsg::Segment {
                index,
                offset: seg_off as u64,
                bytes: bytes[seg_off..end].to_vec(),
            })?;
            seg_off = end;
            self.outcome.transfer.bytes_sent += len;
            events(&ClientEvent::Progress(self.outcome.transfer));
        }
        if let Some(s) = st.sched.sent.get_mut(index as usize) {
            *s = true;
        }
        self.outcome.transfer.segments_sent += 1;
        log::debug!("Sent segment {index}");
        Ok(false)
    }

    /// Flow 2: asks the server to fetch the overlay from `url`. Returns once the server
    /// reports `FillDone`, or once stopped.
    pub fn send_url(
        &mut self,
        url: &str,
        req: &SessionRequest,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<Outcome, ProtoError> {
        self.check_open()?;
        self.send(&ClientMsg::StartUrl {
            url: url.to_string(),
            early_start: req.early_start,
            guest_ports: req.guest_ports.clone(),
            metadata_digest: req.metadata_digest,
        })?;
        let mut sched = Schedule {
            sent: Vec::new(),
            demand: VecDeque::new(),
            next: 0,
        };
        while self.outcome.fill_done.is_none() {
            if self.pump(TICK, &mut sched, events)? {
                return self.stopped();
            }
            self.keepalive()?;
        }
        Ok(self.outcome.clone())
    }

    /// Keeps the session alive (the VM keeps running) until stopped or until the server ends
    /// it; then finishes. Returns `Ok` when stopped, the server's reason otherwise.
    pub fn hold(&mut self, events: &mut dyn FnMut(&ClientEvent)) -> Result<Outcome, ProtoError> {
        self.check_open()?;
        let mut sched = Schedule {
            sent: Vec::new(),
            demand: VecDeque::new(),
            next: 0,
        };
        loop {
            if self.pump(TICK, &mut sched, events)? {
                return self.stopped();
            }
            self.keepalive()?;
        }
    }

    /// Ends the session: sends `Finish` and waits (at most the timeout) for `Closed`.
    /// Does nothing if the session has already ended.
    pub fn finish(&mut self) -> Result<(), ProtoError> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let sent = self.send(&ClientMsg::Finish);
        let deadline = Instant::now() + self.opts.timeout;
        let result = match sent {
            Err(e) => Err(e),
            Ok(()) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(rx) = self.rx.as_ref() else {
                    break Ok(());
                };
                match rx.recv_timeout(left) {
                    Ok(Ok(ServerMsg::Closed)) | Ok(Err(ProtoError::Closed)) => break Ok(()),
                    Ok(Ok(ServerMsg::Error { reason })) => break Err(ProtoError::Refused(reason)),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(RecvTimeoutError::Timeout) => {
                        break Err(ProtoError::Timeout { mid_frame: false })
                    }
                    Err(RecvTimeoutError::Disconnected) => break Ok(()),
                }
            },
        };
        self.shutdown();
        result
    }

    fn stopped(&mut self) -> Result<Outcome, ProtoError> {
        self.finish()?;
        self.outcome.stopped = true;
        Ok(self.outcome.clone())
    }

    fn check_open(&self) -> Result<(), ProtoError> {
        if self.ended {
            Err(ProtoError::SessionEnded)
        } else {
            Ok(())
        }
    }

    fn part_len(&self) -> usize {
        let mut part = self.opts.part_len.clamp(4096, MAX_PART_LEN);
        if let Some(rate) = self.opts.rate_limit_bytes_per_sec {
            // Small parts under a throttle, so a demand request waits at most ~1/8 s.
            let eighth = usize::try_from(rate / 8).unwrap_or(usize::MAX).max(4096);
            part = part.min(eighth);
        }
        part
    }

    fn throttle(&self) -> Option<Throttle> {
        self.opts
            .rate_limit_bytes_per_sec
            .filter(|&r| r > 0)
            .map(|r| Throttle {
                rate: r as f64,
                tokens: 0.0,
                last: Instant::now(),
            })
    }

    fn send(&mut self, msg: &ClientMsg) -> Result<(), ProtoError> {
        let r = write_msg(&mut &*self.conn, msg, FRAME_MAX);
        self.last_sent = Instant::now();
        if r.is_err() {
            // The server may have explained why it stopped reading: prefer its reason.
            if let Some(rx) = self.rx.as_ref() {
                while let Ok(m) = rx.recv_timeout(Duration::from_millis(200)) {
                    if let Ok(ServerMsg::Refused { reason } | ServerMsg::Error { reason }) = m {
                        return Err(ProtoError::Refused(reason));
                    }
                    if m.is_err() {
                        break;
                    }
                }
            }
        }
        r
    }

    fn keepalive(&mut self) -> Result<(), ProtoError> {
        if self.last_sent.elapsed() >= KEEPALIVE_INTERVAL {
            self.send(&ClientMsg::Keepalive)?;
        }
        Ok(())
    }

    /// Waits for the throttle to allow `len` bytes, handling server messages meanwhile.
    /// Returns `true` if stopped.
    fn pace(
        &mut self,
        throttle: &mut Option<Throttle>,
        len: u64,
        sched: &mut Schedule,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<bool, ProtoError> {
        let Some(t) = throttle.as_mut() else {
            return self.pump(Duration::ZERO, sched, events);
        };
        t.tokens -= len as f64;
        loop {
            let now = Instant::now();
            t.tokens = (t.tokens + now.duration_since(t.last).as_secs_f64() * t.rate).min(t.rate);
            t.last = now;
            if t.tokens >= 0.0 {
                return self.pump(Duration::ZERO, sched, events);
            }
            let wait = Duration::from_secs_f64(-t.tokens / t.rate).min(TICK);
            if self.pump(wait, sched, events)? {
                return Ok(true);
            }
        }
    }

    /// Handles every server message that arrives within `wait` (at least those already
    /// queued). Returns `true` if a stop was asked for.
    fn pump(
        &mut self,
        wait: Duration,
        sched: &mut Schedule,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<bool, ProtoError> {
        let deadline = Instant::now() + wait;
        loop {
            if self.stop.is_stopped() {
                return Ok(true);
            }
            let Some(rx) = self.rx.as_ref() else {
                return Err(ProtoError::SessionEnded);
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match rx.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    if self.last_heard.elapsed() > self.opts.idle_timeout {
                        return Err(self.fail(ProtoError::Timeout { mid_frame: false }));
                    }
                    return Ok(false);
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.fail(ProtoError::Closed)),
            };
            self.last_heard = Instant::now();
            let msg = msg.map_err(|e| self.fail(e))?;
            self.handle(msg, sched, events)?;
        }
    }

    fn handle(
        &mut self,
        msg: ServerMsg,
        sched: &mut Schedule,
        events: &mut dyn FnMut(&ClientEvent),
    ) -> Result<(), ProtoError> {
        match msg {
            ServerMsg::Accepted {
                base_id, segments, ..
            } => events(&ClientEvent::Accepted { base_id, segments }),
            ServerMsg::NeedSegment { index } => {
                let Some(&done) = sched.sent.get(index as usize) else {
                    return Err(self.fail(ProtoError::Unexpected {
                        expected: "NeedSegment for a segment of the overlay",
                        got: format!("NeedSegment {{ index: {index} }}"),
                    }));
                };
                let t = &mut self.outcome.transfer;
                t.demand_requests += 1;
                if done {
                    t.demand_already_sent += 1;
                } else if !sched.demand.contains(&index) {
                    sched.demand.push_back(index);
                }
                log::debug!("Server asks for segment {index}");
                events(&ClientEvent::Demand { index });
            }
            ServerMsg::Resumed(info) => {
                self.outcome.resumed = Some(info.clone());
                events(&ClientEvent::Resumed(info));
            }
            ServerMsg::FillDone(info) => {
                self.outcome.fill_done = Some(info.clone());
                events(&ClientEvent::FillDone(info));
            }
            ServerMsg::Keepalive => {}
            ServerMsg::Refused { reason } | ServerMsg::Error { reason } => {
                return Err(self.fail(ProtoError::Refused(reason)));
            }
            ServerMsg::Closed => return Err(self.fail(ProtoError::Closed)),
            other @ ServerMsg::HelloOk { .. } => {
                return Err(self.fail(ProtoError::Unexpected {
                    expected: "a session message",
                    got: other.name().to_string(),
                }))
            }
        }
        Ok(())
    }

    /// Marks the session ended and closes the connection; returns `e`.
    fn fail(&mut self, e: ProtoError) -> ProtoError {
        self.ended = true;
        self.shutdown();
        e
    }

    fn shutdown(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Both);
        self.rx = None;
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// Records a first contact in the known-servers file, loudly; refuses if another client
/// recorded a different certificate for the server meanwhile.
fn record_first_use(
    file: &Path,
    server: &str,
    fingerprint: Fingerprint,
    advertised: bool,
) -> Result<TrustOutcome, ProtoError> {
    match KnownServers::record(file, server, fingerprint)? {
        Recorded::Added { line } => {
            log::warn!(
                "first contact with {server}: its certificate {fingerprint} was {}recorded in {} \
                 line {line}; check it with the server's operator",
                if advertised {
                    "checked against its mDNS announcement only, and "
                } else {
                    "not checked, only "
                },
                file.display()
            );
            Ok(TrustOutcome::FirstUse {
                file: file.to_path_buf(),
                advertised,
            })
        }
        Recorded::AlreadyKnown { line } => Ok(TrustOutcome::Known {
            file: file.to_path_buf(),
            line,
        }),
        Recorded::Conflict(e) => Err(ProtoError::FingerprintMismatch {
            expected: e.fingerprint,
            got: fingerprint,
            pin: PinSource::KnownServers {
                file: file.to_path_buf(),
                line: e.line,
                server: e.server,
            },
        }),
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}
