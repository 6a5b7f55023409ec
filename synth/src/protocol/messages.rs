//! Message types of the protocol, one enum per direction.
//!
//! Both enums are encoded with bincode 2 (standard configuration) through serde, so a variant
//! is written as its index. **Compatibility rule:** variants and fields are never reordered or
//! removed within a protocol version; `ClientMsg::Hello` (index 0, `version` first),
//! `ServerMsg::HelloOk` (0), `ServerMsg::Refused` (1) and `RefuseReason::BadVersion` (0) are
//! frozen across versions so that a version mismatch is always reported intelligibly.

use serde::{Deserialize, Serialize};

/// Byte buffers as one length + bytes (bincode's fast path), not as a sequence of `u8`.
mod wire_bytes {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte buffer")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Visitor)
    }
}

/// Messages from the client to the server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message of every connection. Frozen across versions.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The pre-shared token (at most [`super::MAX_TOKEN_LEN`] bytes; empty if none).
        #[serde(with = "wire_bytes")]
        token: Vec<u8>,
    },
    /// Flow 1: the client will stream an overlay file: `Head` parts, then `Segment` parts.
    StartOverlay {
        /// Resume the VM as soon as the metadata is in, fetching segments on demand.
        early_start: bool,
        /// Guest TCP ports the client wants to reach.
        guest_ports: Vec<u16>,
        /// Length of the overlay file (must equal the header's `file_len`).
        file_len: u64,
        /// Length of header + metadata (the overlay's `data_start`).
        head_len: u64,
    },
    /// Part of the overlay's first `head_len` bytes, in order, without gaps.
    Head {
        /// Offset of `bytes` in the file.
        offset: u64,
        /// At most [`super::MAX_PART_LEN`] bytes.
        #[serde(with = "wire_bytes")]
        bytes: Vec<u8>,
    },
    /// Part of a segment's stored (compressed) bytes. The parts of one segment are sent in
    /// order and back to back: a segment, once started, is finished before another starts.
    Segment {
        /// Segment index in the metadata's segment table.
        index: u32,
        /// Offset of `bytes` inside the segment.
        offset: u64,
        /// At most [`super::MAX_PART_LEN`] bytes.
        #[serde(with = "wire_bytes")]
        bytes: Vec<u8>,
    },
    /// Flow 2: the server fetches the overlay from `url` by HTTP range requests.
    StartUrl {
        /// An http(s) URL under one of the server's allowed prefixes.
        url: String,
        /// As in `StartOverlay`.
        early_start: bool,
        /// As in `StartOverlay`.
        guest_ports: Vec<u16>,
        /// The SHA-256 of the overlay's metadata block (its header holds it) the client
        /// expects; the server refuses an overlay with another one (`MetadataDigest`).
        metadata_digest: Option<crate::chunk::Digest>,
    },
    /// Nothing to say; resets the server's idle timer.
    Keepalive,
    /// Ends the session: the server stops the VM, cleans up and answers `Closed`.
    Finish,
}

impl std::fmt::Debug for ClientMsg {
    /// Never prints the token, nor whole byte payloads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientMsg::Hello { version, token } => f
                .debug_struct("Hello")
                .field("version", version)
                .field("token_len", &token.len())
                .finish(),
            ClientMsg::StartOverlay {
                early_start,
                guest_ports,
                file_len,
                head_len,
            } => f
                .debug_struct("StartOverlay")
                .field("early_start", early_start)
                .field("guest_ports", guest_ports)
                .field("file_len", file_len)
                .field("head_len", head_len)
                .finish(),
            ClientMsg::Head { offset, bytes } => f
                .debug_struct("Head")
                .field("offset", offset)
                .field("len", &bytes.len())
                .finish(),
            ClientMsg::Segment {
                index,
                offset,
                bytes,
            } => f
                .debug_struct("Segment")
                .field("index", index)
                .field("offset", offset)
                .field("len", &bytes.len())
                .finish(),
            ClientMsg::StartUrl {
                url,
                early_start,
                guest_ports,
                metadata_digest,
            } => f
                .debug_struct("StartUrl")
                .field("url", url)
                .field("early_start", early_start)
                .field("guest_ports", guest_ports)
                .field(
                    "metadata_digest",
                    &metadata_digest.as_ref().map(super::format_sha256),
                )
                .finish(),
            ClientMsg::Keepalive => f.write_str("Keepalive"),
            ClientMsg::Finish => f.write_str("Finish"),
        }
    }
}

impl ClientMsg {
    /// Short name of the variant, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "Hello",
            ClientMsg::StartOverlay { .. } => "StartOverlay",
            ClientMsg::Head { .. } => "Head",
            ClientMsg::Segment { .. } => "Segment",
            ClientMsg::StartUrl { .. } => "StartUrl",
            ClientMsg::Keepalive => "Keepalive",
            ClientMsg::Finish => "Finish",
        }
    }
}

/// Messages from the server to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The handshake succeeded. Frozen across versions.
    HelloOk {
        /// [`super::PROTOCOL_VERSION`] of the server.
        server_version: u32,
        /// Id of this session (for `cloudlet list-session` / `close-session`).
        session_id: u64,
    },
    /// The session is refused before it started; the server closes the connection. Frozen.
    Refused {
        /// Why.
        reason: RefuseReason,
    },
    /// The metadata validated and the base is known; the server is preparing the VM.
    Accepted {
        /// Hex id of the overlay's base.
        base_id: String,
        /// Number of segments in the overlay.
        segments: u32,
        /// Length of the overlay file.
        file_len: u64,
    },
    /// The VM needs segment `index` now: send it before any other not yet started.
    NeedSegment {
        /// Segment index.
        index: u32,
    },
    /// The VM runs.
    Resumed(ResumeInfo),
    /// Every segment is in; the VM no longer depends on the client.
    FillDone(FillInfo),
    /// The session failed after it started; the server closes the connection.
    Error {
        /// Why.
        reason: RefuseReason,
    },
    /// Nothing to say; resets the client's idle timer.
    Keepalive,
    /// Answer to `Finish`: the session is cleaned up; the server closes the connection.
    Closed,
}

impl ServerMsg {
    /// Short name of the variant, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ServerMsg::HelloOk { .. } => "HelloOk",
            ServerMsg::Refused { .. } => "Refused",
            ServerMsg::Accepted { .. } => "Accepted",
            ServerMsg::NeedSegment { .. } => "NeedSegment",
            ServerMsg::Resumed(_) => "Resumed",
            ServerMsg::FillDone(_) => "FillDone",
            ServerMsg::Error { .. } => "Error",
            ServerMsg::Keepalive => "Keepalive",
            ServerMsg::Closed => "Closed",
        }
    }
}

/// Why a session was refused or ended with an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RefuseReason {
    /// Protocol versions differ. Frozen at index 0.
    #[error("protocol version {client} is not supported (server speaks version {server})")]
    BadVersion {
        /// Version of the server.
        server: u32,
        /// Version the client sent.
        client: u32,
    },
    /// Missing or wrong token.
    #[error("authentication failed (missing or wrong token)")]
    BadToken,
    /// The server runs its maximum number of sessions.
    #[error("server busy ({max_sessions} sessions running)")]
    Busy {
        /// The server's `--max-sessions`.
        max_sessions: u32,
    },
    /// The overlay's base is not in the server's registry.
    #[error("base {base_id} is not registered on this server")]
    UnknownBase {
        /// Hex id of the base.
        base_id: String,
    },
    /// The URL (or a redirect) is not under an allowed prefix, or not acceptable at all.
    #[error("URL {url} is not allowed: {why}")]
    UrlNotAllowed {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The overlay does not validate.
    #[error("invalid overlay: {0}")]
    BadOverlay(String),
    /// The peer broke the protocol (bad frame, unexpected message, bad field).
    #[error("protocol violation: {0}")]
    Invalid(String),
    /// The peer was silent too long or too slow.
    #[error("timed out")]
    Timeout,
    /// The operator closed the session.
    #[error("closed by the operator: {0}")]
    Closed(String),
    /// The server failed (VM start, FUSE mount, fetch).
    #[error("server error: {0}")]
    Internal(String),
    /// The overlay fetched from the URL is not the one the client expected: its metadata
    /// digest differs from `StartUrl`'s.
    #[error(
        "the overlay at the URL has metadata digest {got}, not the {expected} the client \
         expected (the file was replaced, or someone in between swapped it)"
    )]
    MetadataDigest {
        /// The digest the client sent, as `SHA256:<hex>`.
        expected: String,
        /// The fetched overlay's, as `SHA256:<hex>`.
        got: String,
    },
}

/// Where a guest port is reachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port inside the guest.
    pub guest: u16,
    /// Host address the client connects to (the server's configured address).
    pub host_addr: String,
    /// Host port forwarded to `guest`.
    pub host_port: u16,
}

/// Milliseconds since the server sent `HelloOk`; `None` until the event happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Metadata received and validated.
    pub metadata_ms: Option<u64>,
    /// VM resumed.
    pub resumed_ms: Option<u64>,
    /// Every segment in.
    pub fill_done_ms: Option<u64>,
}

/// Counters of a session, as the server sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStats {
    /// Overlay bytes received (or fetched).
    pub bytes_received: u64,
    /// Segments received.
    pub segments_received: u32,
    /// Segments in the overlay.
    pub segments_total: u32,
    /// `NeedSegment` requests sent (or on-demand range fetches).
    pub demand_requests: u64,
    /// Further server-specific counters as a JSON object (at most [`super::MAX_TEXT_LEN`]).
    pub detail_json: String,
}

/// Payload of `Resumed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeInfo {
    /// One mapping per guest port asked for.
    pub ports: Vec<PortMapping>,
    /// Timings so far.
    pub timings: Timings,
}

/// Payload of `FillDone`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillInfo {
    /// Timings so far.
    pub timings: Timings,
    /// Counters.
    pub stats: SessionStats,
}
