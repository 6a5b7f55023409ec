//! The overlay as a session's client sends it: a [`ByteSource`] over a spill file in the
//! session's run folder. The head (header + metadata) is there from the start; each segment
//! once it has arrived and been verified. A read of a segment not in yet blocks until it
//! arrives, the session ends, or the client stalls; a demand read asks the client for it once
//! (`NeedSegment`), a background read only waits.

use super::conn::Conn;
use super::{lock, TICK};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use synth::format::Overlay;
use synth::protocol::{ServerMsg, SessionStats};
use synth::source::{check_range, read_file_range, ByteSource, Priority, SourceError};

/// Longest a cloudletfs read waits for a segment, whatever the progress.
const MAX_SEGMENT_WAIT: Duration = Duration::from_secs(600);

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
pub struct NetSource {
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
    pub(crate) fn new(
        conn: Arc<Conn>,
        overlay: &Overlay,
        head: &[u8],
        spill: &Path,
    ) -> std::io::Result<Self> {
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
    pub(crate) fn receiving(&self, index: u32) {
        let mut s = lock(&self.state);
        s.receiving = Some(index);
        s.last_progress = Instant::now();
    }

    /// Segment `index` is complete and verified: store it and wake its readers.
    pub(crate) fn insert(&self, index: u32, data: &[u8]) -> std::io::Result<()> {
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

    pub(crate) fn complete(&self) -> bool {
        let s = lock(&self.state);
        s.count == s.ready.len()
    }

    pub(crate) fn stats(&self) -> SessionStats {
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

    /// Waits until every segment of `needed` is in. A demand read asks the client once for
    /// each missing segment it does not already send; a background read only waits.
    fn wait_for(&self, needed: &[u32], priority: Priority) -> Result<(), SourceError> {
        let demand = priority == Priority::Demand;
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
        self.read_range_with(offset, len, Priority::Demand)
    }

    fn read_range_with(
        &self,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Vec<u8>, SourceError> {
        check_range(offset, len, self.file_len)?;
        let end = offset + len;
        if end > self.head_len {
            let first = self.segments.partition_point(|s| s.0 + s.1 <= offset);
            let needed: Vec<u32> = self.segments[first..]
                .iter()
                .take_while(|s| s.0 < end)
                .filter(|s| s.1 > 0)
                .map(|s| s.2)
                .collect();
            self.wait_for(&needed, priority)?;
        }
        read_file_range(&self.file, offset, len, self.file_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::conn::End;
    use crate::server::Server;
    use std::collections::{HashMap, HashSet};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    use synth::protocol::{read_msg, ProtoError, UrlPolicy, FRAME_MAX};
    use synth::protocol::{
        tls, Pin, PinSource, ServerIdentity, TimeoutStream, TlsAcceptor, TlsConn,
    };

    const TINY: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/golden/tiny.overlay"
    ));

    /// A `NetSource` over the golden overlay, with the client's end of its connection.
    fn fixture(name: &str) -> (Arc<NetSource>, Overlay, TlsConn, PathBuf) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let identity = ServerIdentity::generate().unwrap();
        let acceptor = TlsAcceptor::new(&identity).unwrap();
        let pin = Pin {
            fingerprint: identity.fingerprint(),
            source: PinSource::Explicit,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            tls::connect(TcpStream::connect(addr).unwrap(), Some(pin), deadline).unwrap()
        });
        let (server_end, _) = listener.accept().unwrap();
        let server_end = Arc::new(acceptor.accept(server_end, deadline).unwrap());
        let client = client.join().unwrap();
        let srv = Arc::new(Server {
            home: std::env::temp_dir(),
            tls: acceptor,
            token: None,
            policy: UrlPolicy::default(),
            max_sessions: 1,
            limits: crate::session::LimitArgs::default(),
            public_addr: "127.0.0.1".into(),
            fwd_addr: Ipv4Addr::LOCALHOST,
            sessions: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            idle_timeout: synth::protocol::IDLE_TIMEOUT,
            connections: AtomicUsize::new(0),
            admission: crate::server::admission::Admission::new(1, 1),
            next_id: AtomicU64::new(1),
            shutdown: Arc::new(AtomicBool::new(false)),
        });
        let peer = server_end.socket().peer_addr().unwrap();
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
    fn net_source_background_read_does_not_ask() {
        let (net, overlay, mut client, spill) = fixture("filler");
        let (off, len) = segment_range(&overlay, 0);
        let reader = {
            let net = Arc::clone(&net);
            std::thread::spawn(move || net.read_range_with(off, len, Priority::Background))
        };
        client
            .set_timeout(Some(Duration::from_millis(500)))
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
}
