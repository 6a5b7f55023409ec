//! TLS on the synthesis port (rustls, TLS 1.3 only, `ring` provider): the server's
//! [`TlsAcceptor`], the client's [`connect`], and [`TlsConn`], the stream both ends speak the
//! protocol's frames over.
//!
//! ```text
//!  server: TcpListener::accept ─► TlsAcceptor::accept(sock, deadline) ─► TlsConn
//!            first byte not a TLS handshake record: a client of protocol 1 or 2 speaking in
//!            clear; its Hello is answered in clear with Refused{BadVersion}, then closed
//!  client: TcpStream::connect ─► connect(sock, pin, deadline) ─► TlsConn
//!            PinVerifier: certificate SHA-256 must equal the pin (no WebPKI, no names);
//!            handshake signatures checked with the provider's algorithms
//!
//!  TlsConn (shared by a reader thread and any number of writers, `&TlsConn: Read + Write`)
//!    read:  rx lock ─► plaintext left? ─► socket read (no TLS lock held while blocked)
//!           ─► TLS lock: read_tls + process_new_packets, plaintext moved out ─► unlock
//!    write: tx lock ─► TLS lock: encrypt ≤ 64 KiB ─► unlock ─► socket write ─► … (one
//!           write call is sent whole before another writer's starts)
//! ```
//!
//! A reader blocked on the socket holds only the read side's lock, so a writer (the server's
//! `NeedSegment` while its reader waits for segment bytes) is never held up by it. The TLS state
//! lock is only taken for in-memory work. Read timeouts ([`TimeoutStream::set_timeout`]) bound
//! each read call as a whole, however the peer trickles its bytes; write timeouts are the
//! socket's (`TlsConn::socket().set_write_timeout`).
//!
//! The protocol's own framing detects a truncated stream, so a TCP close without TLS
//! `close_notify` reads as an end of stream, like a clean close.

use super::fingerprint::Fingerprint;
use super::frame::{read_frame_before, TimeoutStream};
use super::identity::ServerIdentity;
use super::messages::{ClientMsg, RefuseReason};
use super::{ProtoError, HANDSHAKE_FRAME_MAX, PROTOCOL_VERSION};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, Connection, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// Bytes read from the socket at a time: one full TLS record and its overhead.
const RAW_READ: usize = 16 * 1024 + 512;
/// First bytes of a handshake kept to explain a peer that does not speak TLS.
const FIRST_BYTES: usize = 16;
/// Content type of a TLS handshake record: the first byte a TLS client sends.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

pub use super::identity::crypto_provider;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What the client expects the server's certificate to be, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The fingerprint the certificate must have.
    pub fingerprint: Fingerprint,
    /// Where that expectation comes from (it shapes the error message).
    pub source: PinSource,
}

/// Where a pinned fingerprint comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// Given by the user (`--server-fingerprint`).
    Explicit,
    /// Recorded in the known-servers file on an earlier connection.
    KnownServers {
        /// The file.
        file: PathBuf,
        /// The entry's line, from 1.
        line: usize,
        /// The entry's `HOST:PORT`.
        server: String,
    },
    /// Announced by the server's mDNS TXT record (`--server auto`, no known-servers entry).
    Advertised,
}

impl PinSource {
    /// The message of a certificate that does not match.
    pub(crate) fn explain(&self, expected: &Fingerprint, got: &Fingerprint) -> String {
        match self {
            PinSource::Explicit => format!(
                "The server's certificate {got} is not the pinned {expected} \
                 (--server-fingerprint); refused before sending anything"
            ),
            PinSource::Advertised => format!(
                "The server's certificate {got} is not the {expected} its mDNS announcement \
                 gave: another host may have answered; refused before sending anything"
            ),
            PinSource::KnownServers { file, line, server } => format!(
                "The certificate of {server} has changed: {} line {line} has {expected}, the \
                 server presented {got}. Someone may be intercepting the connection; nothing \
                 was sent. If the server's certificate was replaced on purpose, delete line \
                 {line} of {} and connect again",
                file.display(),
                file.display()
            ),
        }
    }
}

/// Accepts the certificate whose SHA-256 is the pin (or, without a pin, any certificate, for a
/// first contact), and checks the handshake's signatures with the provider's algorithms. Names,
/// dates and issuers are not looked at: the certificate is self-signed and trusted by
/// fingerprint only.
#[derive(Debug)]
struct PinVerifier {
    expected: Option<Fingerprint>,
    /// The certificate's fingerprint, as seen during the handshake.
    seen: Arc<Mutex<Option<Fingerprint>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of_certificate(end_entity);
        *lock(&self.seen) = Some(got);
        match self.expected {
            Some(want) if want != got => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server side: a TLS configuration with the server's identity.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl TlsAcceptor {
    /// TLS 1.3 with `identity`'s certificate; no client certificates, no session tickets or
    /// resumption (every connection is a full handshake).
    pub fn new(identity: &ServerIdentity) -> Result<Self, ProtoError> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ProtoError::TlsConfig)?
            .with_no_client_auth()
            .with_single_cert(vec![identity.certificate().clone()], identity.key())
            .map_err(ProtoError::TlsConfig)?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(TlsAcceptor {
            config: Arc::new(config),
            fingerprint: identity.fingerprint(),
        })
    }

    /// The fingerprint of the certificate this acceptor presents.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Runs the server side of the TLS handshake on `sock`, complete by `deadline` (a peer
    /// trickling bytes is cut off). A peer whose first byte is not a TLS handshake record is
    /// read as a plaintext frame (64 KiB limit, same deadline): a `Hello` of another protocol
    /// version is answered in clear with `Refused{BadVersion}`, anything else with
    /// `Refused{Invalid}`; the error returned says which.
    pub fn accept(&self, sock: TcpStream, deadline: Instant) -> Result<TlsConn, ProtoError> {
        let mut first = [0u8; 1];
        let peeked = loop {
            set_read_deadline(&sock, deadline)?;
            match sock.peek(&mut first) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(e, false)),
            }
        };
        if peeked == 0 {
            return Err(ProtoError::Closed);
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            return Err(refuse_plaintext(&sock, deadline));
        }
        let server = rustls::ServerConnection::new(Arc::clone(&self.config))
            .map_err(ProtoError::TlsHandshake)?;
        let mut conn = Connection::Server(server);
        let mut seen = Vec::new();
        handshake(&mut conn, &sock, deadline, &mut seen)?;
        TlsConn::new(sock, conn)
    }
}

/// Answers a peer that speaks without TLS, in clear, as a server of protocol 1 or 2 would
/// have: its `Hello` gets `Refused{BadVersion}`, anything else `Refused{Invalid}`.
fn refuse_plaintext(sock: &TcpStream, deadline: Instant) -> ProtoError {
    let mut w = sock;
    let reason = match read_frame_before(sock, HANDSHAKE_FRAME_MAX, deadline) {
        Ok(payload) => match super::server::decode_prefix(&payload) {
            Ok((0, version)) if version != PROTOCOL_VERSION => RefuseReason::BadVersion {
                server: PROTOCOL_VERSION,
                client: version,
            },
            _ => match super::frame::decode_msg::<ClientMsg>(&payload, HANDSHAKE_FRAME_MAX) {
                Ok(m) => RefuseReason::Invalid(format!(
                    "{} in clear: protocol version {PROTOCOL_VERSION} runs over TLS",
                    m.name()
                )),
                Err(e) => RefuseReason::Invalid(format!(
                    "not TLS, and not a frame of an older version either: {e}"
                )),
            },
        },
        Err(e) => match super::server::reason_for(&e) {
            Some(r) => {
                super::server::refuse(&mut w, r);
                return e;
            }
            None => return e,
        },
    };
    super::server::refuse(&mut w, reason)
}

/// The client side: the TLS handshake on a connected `sock`, complete by `deadline`. With a
/// `pin`, a certificate of another fingerprint fails the handshake before this side has sent
/// anything but its `ClientHello` ([`ProtoError::FingerprintMismatch`]); without one, any
/// certificate is accepted (a first contact: record [`TlsConn::peer_fingerprint`]). Either way
/// the server must prove it holds the certificate's key.
pub fn connect(
    sock: TcpStream,
    pin: Option<Pin>,
    deadline: Instant,
) -> Result<TlsConn, ProtoError> {
    let provider = crypto_provider();
    let seen = Arc::new(Mutex::new(None));
    let verifier = Arc::new(PinVerifier {
        expected: pin.as_ref().map(|p| p.fingerprint),
        seen: Arc::clone(&seen),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ProtoError::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // Every connection verifies the certificate in full; the name is not checked, so it is
    // not sent either.
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    let peer_ip = sock.peer_addr().map_err(ProtoError::Read)?.ip();
    let client =
        rustls::ClientConnection::new(Arc::new(config), ServerName::IpAddress(peer_ip.into()))
            .map_err(ProtoError::TlsHandshake)?;
    let mut conn = Connection::Client(client);
    let mut first = Vec::new();
    let Err(e) = handshake(&mut conn, &sock, deadline, &mut first) else {
        return TlsConn::new(sock, conn);
    };
    let rejected = matches!(
        e,
        ProtoError::TlsHandshake(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    );
    let seen = *lock(&seen);
    if let (true, Some(pin), Some(got)) = (rejected, pin, seen) {
        return Err(ProtoError::FingerprintMismatch {
            expected: pin.fingerprint,
            got,
            pin: pin.source,
        });
    }
    // A record type byte is 0x14..=0x17; anything else is not TLS at all.
    let not_tls = first.first().is_some_and(|b| !(0x14..=0x17).contains(b));
    if not_tls && matches!(e, ProtoError::TlsHandshake(_) | ProtoError::Closed) {
        log::debug!("TLS handshake failed ({e}); the server sent {first:02x?}");
        return Err(ProtoError::NotTls { first });
    }
    Err(e)
}

fn set_read_deadline(sock: &TcpStream, deadline: Instant) -> Result<(), ProtoError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ProtoError::Timeout { mid_frame: false });
    }
    sock.set_read_timeout(Some(left)).map_err(ProtoError::Read)
}

fn read_error(e: std::io::Error, mid_frame: bool) -> ProtoError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ProtoError::Timeout { mid_frame },
        _ => ProtoError::Read(e),
    }
}

fn write_error(e: std::io::Error) -> ProtoError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ProtoError::Timeout { mid_frame: true },
        _ => ProtoError::Write(e),
    }
}

/// Sends whatever TLS records `conn` has queued.
fn send_queued(conn: &mut Connection, mut sock: &TcpStream) -> std::io::Result<()> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    sock.write_all(&out)
}

/// Drives the handshake on `sock` until it completes, by `deadline`. Keeps the first bytes
/// received in `first`. Any alert rustls wants to send on failure is sent (best effort).
fn handshake(
    conn: &mut Connection,
    sock: &TcpStream,
    deadline: Instant,
    first: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    let saved_write = sock.write_timeout().map_err(ProtoError::Write)?;
    let result = (|| {
        let mut raw = vec![0u8; RAW_READ];
        loop {
            if conn.wants_write() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ProtoError::Timeout { mid_frame: false });
                }
                sock.set_write_timeout(Some(saved_write.map_or(left, |w| w.min(left))))
                    .map_err(ProtoError::Write)?;
                send_queued(conn, sock).map_err(write_error)?;
            }
            if !conn.is_handshaking() {
                return Ok(());
            }
            set_read_deadline(sock, deadline)?;
            let n = match (&*sock).read(&mut raw) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e, !first.is_empty())),
            };
            if first.len() < FIRST_BYTES {
                let take = n.min(FIRST_BYTES - first.len());
                first.extend_from_slice(&raw[..take]);
            }
            if n == 0 {
                return Err(ProtoError::Closed);
            }
            let mut rest = &raw[..n];
            while !rest.is_empty() {
                if conn.read_tls(&mut rest).map_err(ProtoError::Read)? == 0 {
                    break;
                }
                if let Err(e) = conn.process_new_packets() {
                    // Tell the peer why (an alert), if it still listens.
                    let _ = send_queued(conn, sock);
                    return Err(ProtoError::TlsHandshake(e));
                }
            }
        }
    })();
    let _ = sock.set_write_timeout(saved_write);
    result
}

/// The read side of a [`TlsConn`]: plaintext received and not yet read.
struct Rx {
    raw: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    eof: bool,
}

/// One TLS connection, usable from several threads at once: one reader (`&TlsConn: Read`)
/// and any number of writers (`&TlsConn: Write`). See the module doc for the locking.
pub struct TlsConn {
    sock: TcpStream,
    tls: Mutex<Connection>,
    rx: Mutex<Rx>,
    tx: Mutex<()>,
    read_timeout: Mutex<Option<Duration>>,
    peer_fingerprint: Option<Fingerprint>,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("peer", &self.sock.peer_addr().ok())
            .field("peer_fingerprint", &self.peer_fingerprint)
            .finish()
    }
}

impl TlsConn {
    fn new(sock: TcpStream, mut conn: Connection) -> Result<Self, ProtoError> {
        let peer_fingerprint = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Fingerprint::of_certificate(c));
        // Application data that arrived with the handshake's last flight.
        let mut plain = Vec::new();
        let closed = take_plaintext(&mut conn, &mut plain).map_err(ProtoError::Read)?;
        sock.set_read_timeout(None).map_err(ProtoError::Read)?;
        Ok(TlsConn {
            sock,
            tls: Mutex::new(conn),
            rx: Mutex::new(Rx {
                raw: vec![0u8; RAW_READ],
                plain,
                pos: 0,
                eof: closed,
            }),
            tx: Mutex::new(()),
            read_timeout: Mutex::new(None),
            peer_fingerprint,
        })
    }

    /// The underlying socket (for its addresses and its write timeout). Reading or writing it
    /// directly breaks the TLS stream.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The fingerprint of the certificate the peer presented (the server's, on a client).
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.peer_fingerprint
    }

    /// Shuts the connection down. Shutting the write side (or both) first sends TLS
    /// `close_notify` if no writer is busy; shutting the read side wakes a blocked reader,
    /// which then sees the end of the stream.
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        if how != Shutdown::Read {
            lock(&self.tls).send_close_notify();
            let _ = self.flush_queued(false);
        }
        self.sock.shutdown(how)
    }

    /// After a refusal: closes the write side, then reads and drops what the peer still sends
    /// (at most `max_bytes`, for at most `wait`), so that closing with unread data does not
    /// reset the connection before the peer has read why. Needs no reader to be running.
    pub fn drain_and_close(&self, wait: Duration, max_bytes: u64) {
        let _ = self.shutdown(Shutdown::Write);
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 64 << 10];
        let mut total = 0u64;
        while total < max_bytes {
            if set_read_deadline(&self.sock, deadline).is_err() {
                break;
            }
            match (&self.sock).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// Reads plaintext; see the module doc.
    fn read_plain(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        let deadline = lock(&self.read_timeout).map(|t| Instant::now() + t);
        loop {
            if rx.pos < rx.plain.len() {
                let n = buf.len().min(rx.plain.len() - rx.pos);
                buf[..n].copy_from_slice(&rx.plain[rx.pos..rx.pos + n]);
                rx.pos += n;
                if rx.pos == rx.plain.len() {
                    rx.plain.clear();
                    rx.pos = 0;
                }
                return Ok(n);
            }
            if rx.eof {
                return Ok(0);
            }
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ErrorKind::TimedOut.into());
                    }
                    Some(left)
                }
            };
            self.sock.set_read_timeout(timeout)?;
            let Rx { raw, plain, .. } = &mut *rx;
            let n = match (&self.sock).read(raw) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut tls = lock(&self.tls);
            let fed = feed(&mut tls, &raw[..n], plain);
            let queued = tls.wants_write();
            drop(tls);
            if queued {
                // An alert, or an answer to a key update: sent unless a writer is busy (it
                // sends it then).
                let _ = self.flush_queued(false);
            }
            if fed? || n == 0 {
                rx.eof = true;
            }
        }
    }

    /// Encrypts and sends all of `buf` before another writer's data.
    fn write_plain(&self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let guard = lock(&self.tx);
        let mut off = 0;
        let mut out = Vec::new();
        while off < buf.len() {
            out.clear();
            {
                let mut tls = lock(&self.tls);
                let k = tls.writer().write(&buf[off..])?;
                off += k;
                while tls.wants_write() {
                    tls.write_tls(&mut out)?;
                }
                if k == 0 && out.is_empty() {
                    return Err(ErrorKind::WriteZero.into());
                }
            }
            (&self.sock).write_all(&out)?;
        }
        drop(guard);
        self.flush_queued(false)?;
        Ok(buf.len())
    }

    /// Sends TLS records queued outside a write (by the reader); with `block` false, leaves
    /// them to a writer that holds the write side.
    fn flush_queued(&self, block: bool) -> std::io::Result<()> {
        loop {
            let guard = if block {
                lock(&self.tx)
            } else {
                match self.tx.try_lock() {
                    Ok(g) => g,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => return Ok(()),
                }
            };
            loop {
                let mut out = Vec::new();
                {
                    let mut tls = lock(&self.tls);
                    if !tls.wants_write() {
                        break;
                    }
                    while tls.wants_write() {
                        tls.write_tls(&mut out)?;
                    }
                }
                (&self.sock).write_all(&out)?;
            }
            drop(guard);
            // Records queued while the write side was held by someone else whose own check
            // came first.
            if !lock(&self.tls).wants_write() {
                return Ok(());
            }
        }
    }
}

/// Feeds `bytes` (empty: the end of the TCP stream) to rustls and moves the plaintext out.
/// Returns whether the peer has closed.
fn feed(conn: &mut Connection, bytes: &[u8], plain: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut rest = bytes;
    if rest.is_empty() {
        conn.read_tls(&mut rest)?;
        take_plaintext(conn, plain)?;
        return Ok(true);
    }
    while !rest.is_empty() {
        if conn.read_tls(&mut rest)? == 0 {
            return Ok(true);
        }
        if take_plaintext(conn, plain)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Processes the records rustls holds and appends their plaintext to `plain`. Returns whether
/// the peer has closed (`close_notify`).
fn take_plaintext(conn: &mut Connection, plain: &mut Vec<u8>) -> std::io::Result<bool> {
    let state = conn
        .process_new_packets()
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
    let n = state.plaintext_bytes_to_read();
    if n > 0 {
        let old = plain.len();
        plain.resize(old + n, 0);
        conn.reader().read_exact(&mut plain[old..])?;
    }
    Ok(state.peer_has_closed())
}

impl Read for &TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for &TlsConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_plain(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_queued(true)
    }
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_plain(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_queued(true)
    }
}

impl TimeoutStream for TlsConn {
    /// Bounds each following read call as a whole (not each socket read inside it).
    fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "a zero read timeout",
            ));
        }
        *lock(&self.read_timeout) = timeout;
        Ok(())
    }
}
