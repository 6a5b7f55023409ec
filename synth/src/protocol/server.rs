//! Server-side building blocks; the session logic (registry, cloudletfs, QEMU) sits on top.
//!
//! ```text
//!  accept ──► TlsAcceptor::accept (TLS 1.3, deadline) ──► TlsConn
//!         ──► handshake (Hello, 64 KiB limit, deadline) ──► HelloOk / Refused
//!               │
//!  StartOverlay ──► check_ports, HeadAssembler::new (bounds before allocation)
//!  Head parts  ──► HeadAssembler::push … finish ──► format::Overlay (+ HeadSource)
//!  Segment parts ──► SegmentAssembler::push ──► (index, verified bytes) when a segment completes
//!  StartUrl    ──► UrlPolicy, fetch header + metadata ──► check_metadata_digest ──► Accepted
//! ```
//!
//! The functions that talk take any stream `S` with `&S: Read + Write` — a [`super::TlsConn`]
//! in the server, shared between its reader thread and its writers.
//!
//! Everything here refuses with a [`RefuseReason`], which the session sends to the client as
//! `Refused` (before `Accepted`) or `Error` (after).

use super::fingerprint::format_sha256;
use super::frame::{decode_msg, read_frame_before, write_msg, TimeoutStream};
use super::messages::{ClientMsg, RefuseReason, ServerMsg};
use super::token::Token;
use super::{
    clip_text, ProtoError, FRAME_MAX, HANDSHAKE_FRAME_MAX, MAX_GUEST_PORTS, MAX_PART_LEN,
    MAX_SEGMENT_WIRE_LEN, PROTOCOL_VERSION,
};
use crate::chunk::{sha256, Digest};
use crate::format::{Metadata, Overlay, HEADER_LEN, MAX_METADATA_LEN};
use crate::source::{check_range, ByteSource, SourceError};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

/// Sends one message to the client (post-handshake limit).
pub fn send(stream: &mut impl Write, msg: &ServerMsg) -> Result<(), ProtoError> {
    write_msg(stream, msg, FRAME_MAX)
}

/// Sends `Refused{reason}` as best it can (the peer may be gone) and returns the error to
/// propagate.
pub fn refuse(stream: &mut impl Write, reason: RefuseReason) -> ProtoError {
    let reason = clip_reason(reason);
    if let Err(e) = write_msg(
        stream,
        &ServerMsg::Refused {
            reason: reason.clone(),
        },
        HANDSHAKE_FRAME_MAX,
    ) {
        log::debug!("Could not send the refusal: {e:#}");
    }
    ProtoError::Refused(reason)
}

fn clip_reason(reason: RefuseReason) -> RefuseReason {
    match reason {
        RefuseReason::Invalid(s) => RefuseReason::Invalid(clip_text(s)),
        RefuseReason::BadOverlay(s) => RefuseReason::BadOverlay(clip_text(s)),
        RefuseReason::Internal(s) => RefuseReason::Internal(clip_text(s)),
        RefuseReason::Closed(s) => RefuseReason::Closed(clip_text(s)),
        RefuseReason::UrlNotAllowed { url, why } => RefuseReason::UrlNotAllowed {
            url: clip_text(url),
            why: clip_text(why),
        },
        other => other,
    }
}

/// The reason to send a peer whose frame failed to read or decode, if it can still hear it.
pub fn reason_for(e: &ProtoError) -> Option<RefuseReason> {
    match e {
        ProtoError::Timeout { .. } => Some(RefuseReason::Timeout),
        ProtoError::FrameTooLarge { .. }
        | ProtoError::EmptyFrame
        | ProtoError::Decode(_)
        | ProtoError::TrailingBytes(_)
        | ProtoError::Unexpected { .. } => Some(RefuseReason::Invalid(format!("{e}"))),
        ProtoError::Refused(r) => Some(r.clone()),
        _ => None,
    }
}

/// Runs the server side of the handshake on a fresh connection: reads `Hello` with the
/// 64 KiB limit, complete by `deadline`; checks the version, then the token (when the server
/// has one, in constant time); answers `HelloOk{session_id}` or `Refused`. On failure the
/// error is the refusal ([`ProtoError::Refused`]) for a bad version, token or first message,
/// and the read or decode error itself otherwise (a `Refused` was still sent if possible).
pub fn handshake<S>(
    stream: &S,
    token: Option<&Token>,
    session_id: u64,
    deadline: Instant,
) -> Result<(), ProtoError>
where
    S: TimeoutStream,
    for<'a> &'a S: Read + Write,
{
    let stream = &mut &*stream;
    let payload = match read_frame_before(*stream, HANDSHAKE_FRAME_MAX, deadline) {
        Ok(p) => p,
        Err(e) => {
            return Err(match reason_for(&e) {
                Some(r) => {
                    refuse(stream, r);
                    e
                }
                None => e,
            })
        }
    };
    // `Hello` is variant 0 with `version` first in every protocol version: read that prefix
    // alone so a client of another version gets `BadVersion`, not a decode error.
    if let Ok((tag, version)) = decode_prefix(&payload) {
        if tag == 0 && version != PROTOCOL_VERSION {
            return Err(refuse(
                stream,
                RefuseReason::BadVersion {
                    server: PROTOCOL_VERSION,
                    client: version,
                },
            ));
        }
    }
    let msg = match decode_msg::<ClientMsg>(&payload, HANDSHAKE_FRAME_MAX) {
        Ok(m) => m,
        Err(e) => {
            refuse(stream, RefuseReason::Invalid(format!("{e}")));
            return Err(e);
        }
    };
    let ClientMsg::Hello {
        version: _,
        token: offered,
    } = msg
    else {
        return Err(refuse(
            stream,
            RefuseReason::Invalid(format!("expected Hello, got {}", msg.name())),
        ));
    };
    if let Some(t) = token {
        if !t.matches(&offered) {
            return Err(refuse(stream, RefuseReason::BadToken));
        }
    }
    write_msg(
        stream,
        &ServerMsg::HelloOk {
            server_version: PROTOCOL_VERSION,
            session_id,
        },
        HANDSHAKE_FRAME_MAX,
    )
}

pub(crate) fn decode_prefix(payload: &[u8]) -> Result<(u32, u32), ProtoError> {
    let config = bincode::config::standard().with_limit::<64>();
    let ((tag, version), _): ((u32, u32), usize) =
        bincode::serde::decode_from_slice(payload, config)
            .map_err(|e| ProtoError::Decode(e.to_string()))?;
    Ok((tag, version))
}

/// Checks the overlay a URL session fetched against the metadata digest its `StartUrl`
/// carried (`None`: the client gave none, nothing to check). Call it on the header and metadata
/// as soon as they are fetched, before `Accepted`.
pub fn check_metadata_digest(
    overlay: &Overlay,
    expected: Option<&Digest>,
) -> Result<(), RefuseReason> {
    match expected {
        Some(want) if *want != overlay.id() => Err(RefuseReason::MetadataDigest {
            expected: format_sha256(want),
            got: format_sha256(&overlay.id()),
        }),
        _ => Ok(()),
    }
}

/// Checks the guest ports of a start request: at most [`MAX_GUEST_PORTS`], none zero, no
/// repeats.
pub fn check_ports(ports: &[u16]) -> Result<(), RefuseReason> {
    if ports.len() > MAX_GUEST_PORTS {
        return Err(RefuseReason::Invalid(format!(
            "{} guest ports asked for (at most {MAX_GUEST_PORTS})",
            ports.len()
        )));
    }
    for (i, p) in ports.iter().enumerate() {
        if *p == 0 || ports[..i].contains(p) {
            return Err(RefuseReason::Invalid(format!(
                "guest port {p} is zero or repeated"
            )));
        }
    }
    Ok(())
}

/// The header and metadata bytes received so far, as a [`ByteSource`] of the whole file's
/// size: reads inside the head succeed, reads of segment bytes fail (they are not here).
#[derive(Debug)]
pub struct HeadSource {
    head: Vec<u8>,
    file_len: u64,
}

impl HeadSource {
    /// The header and metadata bytes, verbatim.
    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

impl ByteSource for HeadSource {
    fn size(&self) -> u64 {
        self.file_len
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let n = check_range(offset, len, self.head.len() as u64).map_err(|_| {
            SourceError::Remote(format!(
                "Range {offset}+{len} lies past the received head ({} bytes)",
                self.head.len()
            ))
        })?;
        let start = usize::try_from(offset).map_err(|_| SourceError::OutOfRange {
            offset,
            len,
            size: self.file_len,
        })?;
        Ok(self.head[start..start + n].to_vec())
    }
}

/// Collects the `Head` parts of flow 1 and validates them as an overlay.
#[derive(Debug)]
pub struct HeadAssembler {
    head: Vec<u8>,
    head_len: u64,
    file_len: u64,
}

impl HeadAssembler {
    /// Checks the lengths announced by `StartOverlay` against the format's limits and the
    /// server's own `max_head_len`. Allocates nothing yet: the buffer grows as parts arrive.
    pub fn new(file_len: u64, head_len: u64, max_head_len: u64) -> Result<Self, RefuseReason> {
        let max = max_head_len.min(HEADER_LEN + MAX_METADATA_LEN);
        if head_len < HEADER_LEN || head_len > max {
            return Err(RefuseReason::Invalid(format!(
                "head length {head_len} is outside {HEADER_LEN}..={max}"
            )));
        }
        if file_len < head_len {
            return Err(RefuseReason::Invalid(format!(
                "file length {file_len} is shorter than the head ({head_len})"
            )));
        }
        Ok(HeadAssembler {
            head: Vec::new(),
            head_len,
            file_len,
        })
    }

    /// Adds one part; returns whether the head is complete.
    pub fn push(&mut self, offset: u64, bytes: &[u8]) -> Result<bool, RefuseReason> {
        let have = self.head.len() as u64;
        if offset != have {
            return Err(RefuseReason::Invalid(format!(
                "head part at offset {offset}, expected {have}"
            )));
        }
        if bytes.is_empty() || bytes.len() > MAX_PART_LEN {
            return Err(RefuseReason::Invalid(format!(
                "head part of {} bytes",
                bytes.len()
            )));
        }
        if have + bytes.len() as u64 > self.head_len {
            return Err(RefuseReason::Invalid(
                "head parts exceed the head length".into(),
            ));
        }
        self.head.extend_from_slice(bytes);
        Ok(self.head.len() as u64 == self.head_len)
    }

    /// Validates the complete head with the same reader as a local file. The overlay's
    /// segments are read from the returned [`HeadSource`] only as far as the head goes; the
    /// session serves them from received or fetched bytes instead.
    pub fn finish(self) -> Result<(Overlay, Arc<HeadSource>), RefuseReason> {
        if self.head.len() as u64 != self.head_len {
            return Err(RefuseReason::Invalid("head incomplete".into()));
        }
        let src = Arc::new(HeadSource {
            head: self.head,
            file_len: self.file_len,
        });
        let dyn_src: Arc<dyn ByteSource> = src.clone();
        let overlay =
            Overlay::open(dyn_src).map_err(|e| RefuseReason::BadOverlay(format!("{e:#}")))?;
        if overlay.data_start() != self.head_len {
            return Err(RefuseReason::Invalid(format!(
                "head length {} differs from the overlay's metadata end {}",
                self.head_len,
                overlay.data_start()
            )));
        }
        if let Some((i, s)) = overlay
            .metadata()
            .segments
            .iter()
            .enumerate()
            .find(|(_, s)| s.length > MAX_SEGMENT_WIRE_LEN)
        {
            return Err(RefuseReason::BadOverlay(format!(
                "segment {i} of {} bytes exceeds {MAX_SEGMENT_WIRE_LEN}",
                s.length
            )));
        }
        if u32::try_from(overlay.metadata().segments.len()).is_err() {
            return Err(RefuseReason::BadOverlay("too many segments".into()));
        }
        Ok((overlay, src))
    }
}

/// Partial segments the server holds at once: one sent in file order, and one the client sent
/// on demand in between its parts.
pub const MAX_OPEN_SEGMENTS: usize = 2;

/// Reassembles `Segment` parts: each segment's parts in order, at most
/// [`MAX_OPEN_SEGMENTS`] segments in progress, each segment at most once, each checked against
/// its SHA-256 when complete.
#[derive(Debug)]
pub struct SegmentAssembler {
    meta: Arc<Metadata>,
    received: Vec<bool>,
    count: usize,
    open: Vec<(u32, Vec<u8>)>,
}

impl SegmentAssembler {
    /// An assembler for the segments of `meta`.
    pub fn new(meta: Arc<Metadata>) -> Self {
        let n = meta.segments.len();
        SegmentAssembler {
            meta,
            received: vec![false; n],
            count: 0,
            open: Vec::with_capacity(MAX_OPEN_SEGMENTS),
        }
    }

    /// Adds one part. Returns the segment's index and stored bytes when it is complete and
    /// matches its digest.
    pub fn push(
        &mut self,
        index: u32,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Option<(u32, Vec<u8>)>, RefuseReason> {
        let i = usize::try_from(index).map_err(|_| RefuseReason::Invalid("index".into()))?;
        let entry = self
            .meta
            .segments
            .get(i)
            .ok_or_else(|| RefuseReason::Invalid(format!("no segment {index}")))?;
        if self.received[i] {
            return Err(RefuseReason::Invalid(format!("segment {index} sent twice")));
        }
        if bytes.is_empty() || bytes.len() > MAX_PART_LEN {
            return Err(RefuseReason::Invalid(format!(
                "segment part of {} bytes",
                bytes.len()
            )));
        }
        let mut buf = match self.open.iter().position(|(cur, _)| *cur == index) {
            Some(at) => self.open.swap_remove(at).1,
            None if self.open.len() < MAX_OPEN_SEGMENTS => Vec::new(),
            None => {
                return Err(RefuseReason::Invalid(format!(
                    "segment {index} started while {MAX_OPEN_SEGMENTS} others are unfinished"
                )))
            }
        };
        if offset != buf.len() as u64 {
            return Err(RefuseReason::Invalid(format!(
                "segment {index} part at offset {offset}, expected {}",
                buf.len()
            )));
        }
        let end = offset + bytes.len() as u64;
        if end > entry.length {
            return Err(RefuseReason::Invalid(format!(
                "segment {index} parts exceed its length {}",
                entry.length
            )));
        }
        buf.extend_from_slice(bytes);
        if end < entry.length {
            self.open.push((index, buf));
            return Ok(None);
        }
        if sha256(&buf) != entry.digest {
            return Err(RefuseReason::BadOverlay(format!(
                "segment {index} does not match its SHA-256"
            )));
        }
        self.received[i] = true;
        self.count += 1;
        Ok(Some((index, buf)))
    }

    /// Whether segment `index` is complete.
    pub fn has(&self, index: u32) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.received.get(i).copied())
            .unwrap_or(false)
    }

    /// Segments complete so far.
    pub fn received_count(&self) -> usize {
        self.count
    }

    /// Whether every segment is complete.
    pub fn is_complete(&self) -> bool {
        self.count == self.received.len()
    }
}
