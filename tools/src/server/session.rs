//! One connection of `cloudlet server`, from accept to its end: the session slot, the
//! handshake, the first message, then one of the two flows (an overlay streamed by the client,
//! or a URL the server fetches), the VM, and the last message.
//!
//! ```text
//!  connection: (admitted: admission.rs) TLS (TlsAcceptor) ─► handshake (token) ─► slot
//!              ─► run_session
//!              ─► overlay_session | url_session (reader thread and writers share one TlsConn)
//!     overlay_session: Head parts ─► accept_overlay (Accepted) ─► read_loop thread
//!                      (segments ─► NetSource) ─► run_vm
//!     url_session:     UrlPolicy ─► HttpSource ─► metadata digest ─► accept_overlay ─► run_vm
//!     run_vm: forwards ─► session::resume_vm ─► Resumed ─► watch (FillDone, QEMU, mount)
//!  end: Finish ─► Closed | failure ─► Refused (before Accepted) / Error (after) | gone
//! ```

use super::admin::SessionState;
use super::conn::{Conn, End};
use super::net_source::NetSource;
use super::{lock, ConnGuard, TICK};
use crate::session::{resume_vm_with, Backend, ResumeOptions, RunDir, RunningVm};
use cloudletfs::error::chain;
use cloudletfs::{HttpOptions, HttpSource, OverlaySource, RedirectPolicy};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synth::chunk::hex;
use synth::format::Overlay;
use synth::protocol::server::{self, check_ports, reason_for, HeadAssembler, SegmentAssembler};
use synth::protocol::{
    clip_text, read_msg_before, ClientMsg, FillInfo, PortMapping, ProtoError, RefuseReason,
    ResumeInfo, ServerMsg, SessionStats, TlsConn, FRAME_MAX, HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL,
};
use synth::registry::{Registry, RegistryError};
use synth::source::{ByteSource, SourceError};
use synth::vm::HostFwd;

/// Longest head (header + metadata) this server accepts, in bytes.
const MAX_HEAD_LEN: u64 = 64 + (256 << 20);
/// Bound on every write to a client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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

fn clip(reason: RefuseReason) -> RefuseReason {
    match reason {
        RefuseReason::Invalid(s) => RefuseReason::Invalid(clip_text(s)),
        RefuseReason::BadOverlay(s) => RefuseReason::BadOverlay(clip_text(s)),
        RefuseReason::Internal(s) => RefuseReason::Internal(clip_text(s)),
        RefuseReason::Closed(s) => RefuseReason::Closed(clip_text(s)),
        other => other,
    }
}

pub(crate) fn connection(mut guard: ConnGuard, stream: TcpStream, peer: SocketAddr, id: u64) {
    let srv = Arc::clone(&guard.srv);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        log::warn!("{peer}: socket setup failed: {e}");
        return;
    }
    // One deadline for the TLS handshake and the Hello together.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let stream = match srv.tls.accept(stream, deadline) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            log::info!("{peer}: TLS handshake failed: {e}");
            return;
        }
    };
    if let Err(e) = server::handshake(&*stream, srv.token.as_ref(), id, deadline) {
        log::info!("session {id} from {peer}: handshake failed: {e}");
        return;
    }
    guard.ticket.authenticated();
    // The slot is taken only now: connections that never authenticate cannot hold one.
    {
        let mut sessions = lock(&srv.sessions);
        if sessions.len() >= usize::try_from(srv.max_sessions).unwrap_or(usize::MAX) {
            drop(sessions);
            server::refuse(
                &mut &*stream,
                RefuseReason::Busy {
                    max_sessions: srv.max_sessions,
                },
            );
            // The client's first message may be on its way: read it so the refusal is not
            // lost to a reset.
            stream.drain_and_close(DRAIN_TIME, DRAIN_BYTES);
            log::info!("session {id} from {peer}: refused: busy");
            return;
        }
        sessions.insert(id);
        guard.slot = Some(id);
    }
    log::info!("session {id} from {peer}: authenticated");
    let conn = Arc::new(Conn::new(id, Arc::clone(&srv), Arc::clone(&stream), peer));
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
                server::refuse(&mut &*conn.tls, reason);
            }
            // Closing with unread data would reset the connection before the client has read
            // why: read and drop what it still sends (bounded).
            stream.drain_and_close(DRAIN_TIME, DRAIN_BYTES);
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

/// Longest a refused client's leftover bytes are read after the refusal.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Most leftover bytes read after a refusal.
const DRAIN_BYTES: u64 = 64 << 20;

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

fn read_client(conn: &Conn, stream: &TlsConn) -> Result<ClientMsg, ProtoError> {
    read_msg_before(stream, FRAME_MAX, Instant::now() + conn.srv.idle_timeout)
}

fn unexpected(msg: &ClientMsg, state: &str) -> End {
    End::Fail(RefuseReason::Invalid(format!(
        "unexpected {} in state {state}",
        msg.name()
    )))
}

/// Runs a session to its end. Returns the end, or `None` when it was recorded on `conn`.
fn run_session(conn: &Arc<Conn>, stream: &Arc<TlsConn>) -> Option<End> {
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
            metadata_digest,
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
            url_session(conn, stream, &req, &url, metadata_digest).err()
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

pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> End {
    End::Fail(RefuseReason::Internal(format!("{what}: {e}")))
}

/// Looks the overlay's base up in the registry, checks the overlay against it (memory the
/// base's size, disk within the operator's growth limit, base references inside the base)
/// and sends `Accepted`; a mismatch is refused as `BadOverlay` before any segment is read.
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
    if let Err(e) = overlay.check_base(&base.limits(conn.srv.limits.max_disk_growth())) {
        log::info!("session {}: overlay refused: {e}", conn.id);
        return Err(End::Fail(RefuseReason::BadOverlay(e.to_string())));
    }
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
    let running = resume_vm_with(
        &conn.srv.home,
        base,
        OverlaySource::Source(source),
        &ResumeOptions {
            early_start: req.early_start,
            hostfwd: &fwds,
            // The server runs its sessions on QEMU directly.
            backend: &Backend::Qemu,
        },
        &conn.srv.limits,
        &conn.stop,
        &mut |e: &str| log::info!("session {id}: {e}"),
    );
    let running = match running {
        Ok(r) => r,
        Err(e) if conn.stopped() => {
            log::info!("session {id}: resume abandoned: {}", chain(&e));
            return End::Gone("ended while resuming".into());
        }
        Err(e) => return internal("resuming the VM", chain(&e)),
    };
    lock(&conn.timings).resumed_ms = conn.ms();
    let vm = running.vm.describe();
    let pid = running.vm.pid();
    {
        let mut v = lock(&conn.view);
        v.qemu_pid = pid;
        v.ports.clone_from(&maps);
        v.confinement = Some(running.confinement());
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
        Err(e) => log::warn!("session {id}: stopping the VM: {}", chain(&e)),
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
    stream: &Arc<TlsConn>,
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
        .map_err(|e| internal("run folder", chain(&e)))?;
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
        let stream = Arc::clone(stream);
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
fn url_session(
    conn: &Arc<Conn>,
    stream: &Arc<TlsConn>,
    req: &Start,
    url: &str,
    metadata_digest: Option<synth::Digest>,
) -> Result<(), End> {
    check_ports(&req.guest_ports)?;
    conn.srv.policy.check(url)?;
    // From here the client only sends Keepalive or Finish.
    let reader = {
        let conn = Arc::clone(conn);
        let stream = Arc::clone(stream);
        std::thread::Builder::new()
            .name(format!("session-{}-rx", conn.id))
            .spawn(move || read_loop(&conn, &stream, None))
            .map_err(|e| internal("reader thread", e))?
    };
    let result = url_vm(conn, req, url, metadata_digest.as_ref());
    if let Err(e) = result {
        conn.finish(e);
    }
    let _ = stream.shutdown(Shutdown::Read);
    let _ = reader.join();
    Err(lock(&conn.end)
        .clone()
        .unwrap_or(End::Gone("unknown".into())))
}

fn url_vm(
    conn: &Arc<Conn>,
    req: &Start,
    url: &str,
    metadata_digest: Option<&synth::Digest>,
) -> Result<(), End> {
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
        .map_err(|e| End::Fail(RefuseReason::BadOverlay(chain(&e))))?;
    // The overlay the client meant, not one swapped on the way.
    server::check_metadata_digest(&overlay, metadata_digest)?;
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
fn read_loop(conn: &Conn, stream: &TlsConn, mut segs: Option<(SegmentAssembler, &NetSource)>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_alive_own_process_yes_bogus_pid_no() {
        assert!(qemu_alive(std::process::id()));
        assert!(!qemu_alive(u32::MAX));
    }
}
