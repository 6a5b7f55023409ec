//! The synthesis wire protocol between `cloudlet client` and `cloudlet server`.
//!
//! `docs/protocol.md` is the reference: every message, field, limit and state transition. This
//! module is its implementation, in layers:
//!
//! | module      | what it holds                                                                |
//! |-------------|------------------------------------------------------------------------------|
//! | [`messages`]| [`ClientMsg`], [`ServerMsg`] and their payload structs (serde, bincode 2)     |
//! | [`frame`]   | framing: `u32` little-endian length + bincode payload, bounded before reading |
//! | [`token`]   | the pre-shared [`Token`], compared in constant time                           |
//! | [`url`]     | [`UrlPolicy`]: which URLs (and redirects) the server may fetch                |
//! | [`fingerprint`]| [`Fingerprint`] and the `SHA256:<hex>` text form of digests                |
//! | [`identity`]| the server's self-signed certificate and key ([`ServerIdentity`])             |
//! | [`tls`]     | TLS 1.3: [`TlsAcceptor`], [`tls::connect`] (pinned), [`TlsConn`] (the stream)   |
//! | [`known_servers`]| trust on first use: the known-servers file ([`KnownServers`])            |
//! | [`server`]  | server-side pieces: handshake, head and segment assemblers                    |
//! | [`client`]  | [`Client`]: the library behind `cloudlet client`                             |
//! | `discovery` | mDNS/DNS-SD: `discovery::Advertiser` and `discovery::discover` (feature `discovery`, on by default) |
//!
//! The flow of an overlay session (every frame inside TLS):
//!
//! ```text
//!  client                                             server
//!    │── TCP, TLS 1.3 handshake ────────────────────────►│  certificate pinned by fingerprint
//!    │── Hello{version, token} ─────────────────────────►│  (read with a 64 KiB limit)
//!    │◄──────────────────────── HelloOk{session_id} ─────│  or Refused{reason}, then close
//!    │── StartOverlay{file_len, head_len, ports} ───────►│
//!    │── Head{offset, bytes} … (header + metadata) ─────►│  validated with format::Overlay
//!    │◄───────────────────────── Accepted{base_id} ──────│  or Refused{UnknownBase}
//!    │── Segment{index, offset, bytes} … in order ──────►│
//!    │◄──────────────────────── NeedSegment{index} ──────│  on demand: jumps the queue
//!    │◄──────────────────── Resumed{ports, timings} ─────│  (early start: before the fill ends)
//!    │◄───────────────────── FillDone{timings, stats} ───│
//!    │── Finish ────────────────────────────────────────►│
//!    │◄──────────────────────────────────── Closed ──────│
//! ```
//!
//! Every length read from the network is checked against a limit before anything is
//! allocated for it, and authentication happens before any large frame is accepted.

pub mod client;
#[cfg(feature = "discovery")]
pub mod discovery;
pub mod fingerprint;
pub mod frame;
pub mod identity;
pub mod known_servers;
pub mod messages;
pub mod server;
pub mod tls;
pub mod token;
pub mod url;

pub use client::{
    Client, ClientEvent, ClientOptions, Outcome, ServerTrust, SessionRequest, StopHandle,
    TransferStats, TrustOutcome,
};
pub use fingerprint::{format_sha256, parse_sha256, Fingerprint};
pub use frame::{
    decode_msg, encode_msg, read_frame, read_msg, read_msg_before, write_msg, TimeoutStream,
};
pub use identity::ServerIdentity;
pub use known_servers::KnownServers;
pub use messages::{
    ClientMsg, FillInfo, PortMapping, RefuseReason, ResumeInfo, ServerMsg, SessionStats, Timings,
};
pub use tls::{Pin, PinSource, TlsAcceptor, TlsConn};
pub use token::Token;
pub use url::UrlPolicy;

use std::time::Duration;

/// Version of this protocol. A server refuses a `Hello` carrying any other version. Version 3
/// runs over TLS; versions 1 and 2 spoke in clear.
pub const PROTOCOL_VERSION: u32 = 3;
/// TCP port the server listens on by default (the original elijah-provisioning's).
pub const DEFAULT_PORT: u16 = 8021;
/// Largest frame payload accepted before authentication (`Hello`, `HelloOk`, `Refused`).
pub const HANDSHAKE_FRAME_MAX: u32 = 64 << 10;
/// Largest frame payload accepted after authentication, in both directions.
pub const FRAME_MAX: u32 = 16 << 20;
/// Largest byte payload of one `Head` or `Segment` part.
pub const MAX_PART_LEN: usize = 8 << 20;
/// Part size the client uses unless told otherwise.
pub const DEFAULT_PART_LEN: usize = 1 << 20;
/// Largest token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Largest URL, in bytes.
pub const MAX_URL_LEN: usize = 4096;
/// Most guest ports one session may ask for.
pub const MAX_GUEST_PORTS: usize = 64;
/// Longest free-text reason or stats string a peer should send (longer ones are cut).
pub const MAX_TEXT_LEN: usize = 16 << 10;
/// Largest compressed segment accepted on the wire (twice the largest decoded segment).
pub const MAX_SEGMENT_WIRE_LEN: u64 = 2 * crate::format::MAX_SEGMENT_RAW_LEN;
/// Each side sends `Keepalive` when it has sent nothing else for this long, whatever it is
/// receiving.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A peer silent for this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a new connection has to complete its `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the protocol layer, on either side. Every variant names the failed step.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// No address of the server accepted a connection.
    #[error("Connecting to {addr} failed")]
    Connect {
        /// Address asked for.
        addr: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Reading from the socket failed.
    #[error("Reading a frame failed")]
    Read(#[source] std::io::Error),
    /// Writing to the socket failed.
    #[error("Writing a frame failed")]
    Write(#[source] std::io::Error),
    /// The peer said nothing before the read timeout or deadline.
    #[error("Timed out waiting for the peer{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Timeout {
        /// Whether part of a frame had been read (the stream is then out of step and unusable).
        mid_frame: bool,
    },
    /// The peer closed the connection between frames.
    #[error("The peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("Connection closed mid-frame: {got} of {expected} bytes received")]
    Truncated {
        /// Bytes of the frame (length prefix included) expected.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A frame longer than the limit in force; nothing was allocated for it.
    #[error("Frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Length announced (or encoded).
        len: u64,
        /// Limit in force.
        limit: u32,
    },
    /// A frame of length zero.
    #[error("Empty frame")]
    EmptyFrame,
    /// The payload is not a valid message.
    #[error("Message does not decode: {0}")]
    Decode(String),
    /// The payload has bytes left after the message.
    #[error("Message has {0} undecoded trailing bytes")]
    TrailingBytes(usize),
    /// A message could not be encoded.
    #[error("Message does not encode: {0}")]
    Encode(String),
    /// A message that is valid but not allowed at this point of the session.
    #[error("Unexpected message: expected {expected}, got {got}")]
    Unexpected {
        /// What the state allows.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// The peer (or this side) refused the session or ended it with an error.
    #[error("Refused: {0}")]
    Refused(RefuseReason),
    /// The overlay to send does not open.
    #[error("Opening the overlay to send failed")]
    Overlay(#[from] crate::format::FormatError),
    /// Reading the overlay to send failed.
    #[error("Reading the overlay to send failed")]
    Source(#[from] crate::source::SourceError),
    /// The token file does not read.
    #[error("Reading the token file {path} failed")]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A token that is empty or longer than [`MAX_TOKEN_LEN`].
    #[error("Token must be 1 to {MAX_TOKEN_LEN} bytes, not {0}")]
    TokenLength(usize),
    /// The client was used after its session ended.
    #[error("The session has already ended")]
    SessionEnded,
    /// A background thread could not be started.
    #[error("Starting the {0} thread failed")]
    Thread(&'static str, #[source] std::io::Error),
    /// The TLS configuration could not be built.
    #[error("Setting up TLS failed")]
    TlsConfig(#[source] rustls::Error),
    /// The TLS handshake failed (a bad record, an alert from the peer, a bad signature).
    #[error("TLS handshake failed")]
    TlsHandshake(#[source] rustls::Error),
    /// The server answered the TLS `ClientHello` with something that is not TLS.
    #[error(
        "The server did not answer with TLS (first bytes {first:02x?}): it may be a cloudlet \
         server of protocol version 2 or older, which speaks in clear"
    )]
    NotTls {
        /// The first bytes it sent.
        first: Vec<u8>,
    },
    /// The server's certificate is not the one pinned; nothing was sent to it.
    #[error("{}", .pin.explain(.expected, .got))]
    FingerprintMismatch {
        /// The pinned fingerprint.
        expected: Fingerprint,
        /// The fingerprint of the certificate the server presented.
        got: Fingerprint,
        /// Where the pin comes from.
        pin: PinSource,
    },
    /// The client has no way to check the server's certificate.
    #[error("No way to verify the server: give its fingerprint or a known-servers file")]
    NoTrust,
    /// The known-servers file could not be read or written.
    #[error("Using the known-servers file failed")]
    KnownServers(#[from] known_servers::KnownServersError),
    /// The overlay to send is not the one the caller expected.
    #[error("The overlay's metadata digest is {got}, not the expected {expected}")]
    OverlayDigest {
        /// The digest expected, as text.
        expected: String,
        /// The overlay's, as text.
        got: String,
    },
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Cuts `s` to at most [`MAX_TEXT_LEN`] bytes on a character boundary.
pub fn clip_text(mut s: String) -> String {
    if s.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// This machine's name as a DNS label (`[a-z0-9-]`, at most 63 bytes), `cloudlet` if unknown.
pub fn local_host_label() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    host_label(raw.trim().split('.').next().unwrap_or(""))
}

/// `name` as a DNS label: ASCII letters and digits lowercased, anything else `-`, at most 63
/// characters, no `-` at either end; `cloudlet` when nothing is left.
pub fn host_label(name: &str) -> String {
    let label: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "cloudlet".to_string()
    } else {
        label.to_string()
    }
}
