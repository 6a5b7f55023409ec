//! The wire protocol over real loopback TCP and real TLS: the TLS handshake and certificate
//! pinning (explicit, trust on first use, announced), handshake, hostile peers, the client's
//! on-demand scheduling against a small in-test server built from the real server-side pieces,
//! and the URL policy.

// Fixture sizes are small; truncating casts cannot happen here.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use synth::chunk::CHUNK_SIZE;
use synth::codec::Codec;
use synth::create::{create_overlay, CreateOptions, CustomImages};
use synth::protocol::client::metadata_digest_of;
use synth::protocol::server::{self, HeadAssembler, SegmentAssembler};
use synth::protocol::{
    encode_msg, read_msg, read_msg_before, tls, write_msg, Client, ClientEvent, ClientMsg,
    ClientOptions, FillInfo, Fingerprint, KnownServers, Pin, PinSource, PortMapping, ProtoError,
    RefuseReason, ResumeInfo, ServerIdentity, ServerMsg, ServerTrust, SessionRequest, TlsAcceptor,
    TlsConn, Token, TrustOutcome, UrlPolicy, FRAME_MAX, HANDSHAKE_FRAME_MAX, PROTOCOL_VERSION,
};
use synth::registry::{AddBase, Registry};

const TOKEN: &[u8] = b"correct horse battery staple";

fn token() -> Token {
    Token::new(TOKEN.to_vec()).unwrap()
}

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// The in-test server's TLS identity, made once per run (ECDSA key generation is cheap, but
/// one identity keeps the pins simple).
fn identity() -> &'static ServerIdentity {
    static ID: OnceLock<ServerIdentity> = OnceLock::new();
    ID.get_or_init(|| ServerIdentity::generate().unwrap())
}

/// A second, unrelated identity: "another server" at the same address.
fn other_identity() -> &'static ServerIdentity {
    static ID: OnceLock<ServerIdentity> = OnceLock::new();
    ID.get_or_init(|| ServerIdentity::generate().unwrap())
}

fn acceptor() -> TlsAcceptor {
    TlsAcceptor::new(identity()).unwrap()
}

/// Client options that pin the in-test server's certificate.
fn pinned() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        trust: ServerTrust::pinned(identity().fingerprint()),
        ..ClientOptions::default()
    }
}

fn connect(addr: &str, token: &[u8]) -> Result<Client, ProtoError> {
    Client::connect_with(addr, token, pinned())
}

/// Accepts `n` TCP connections on a fresh loopback port and runs `f` on each, in order, in
/// one thread.
fn serve_tcp<R, F>(n: usize, mut f: F) -> (String, JoinHandle<Vec<R>>)
where
    R: Send + 'static,
    F: FnMut(TcpStream) -> R + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (s, _) = listener.accept().unwrap();
                s.set_nodelay(true).unwrap();
                f(s)
            })
            .collect()
    });
    (addr, h)
}

/// Accepts one connection, runs the server side of the TLS handshake with [`identity`], and
/// runs `f` on the TLS stream in a thread.
fn serve_one<R, F>(f: F) -> (String, JoinHandle<R>)
where
    R: Send + 'static,
    F: FnOnce(TlsConn) -> R + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        f(acceptor().accept(s, secs(5)).unwrap())
    });
    (addr, h)
}

/// Server side of a session that only waits for `Finish` and answers `Closed`.
fn handshake_then_close(mut s: TlsConn) -> Result<(), ProtoError> {
    server::handshake(&s, Some(&token()), 42, secs(5))?;
    let msg: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
    assert_eq!(msg, ClientMsg::Finish);
    server::send(&mut s, &ServerMsg::Closed)
}

/// Server side of a session's end: reads `Keepalive`s until `Finish`, answers `Closed`.
fn closed_on_finish(s: &mut TlsConn) -> Result<(), ProtoError> {
    loop {
        match read_msg_before(&*s, FRAME_MAX, secs(5))? {
            ClientMsg::Finish => break,
            ClientMsg::Keepalive => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    server::send(s, &ServerMsg::Closed)
}

/// A TLS connection to the in-test server that speaks raw bytes (a hostile or odd client).
fn raw_connect(addr: &str) -> TlsConn {
    let pin = Pin {
        fingerprint: identity().fingerprint(),
        source: PinSource::Explicit,
    };
    let s = tls::connect(TcpStream::connect(addr).unwrap(), Some(pin), secs(5)).unwrap();
    use synth::protocol::TimeoutStream;
    s.set_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_reply(s: &mut TlsConn) -> ServerMsg {
    read_msg(s, HANDSHAKE_FRAME_MAX).unwrap()
}

#[test]
fn handshake_valid_token_succeeds() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut c = connect(&addr, TOKEN).unwrap();
    assert_eq!(c.session_id(), 42);
    assert_eq!(c.server_fingerprint(), identity().fingerprint());
    assert_eq!(c.trust(), &TrustOutcome::Pinned);
    c.finish().unwrap();
    h.join().unwrap().unwrap();
}

#[test]
fn handshake_wrong_token_refused() {
    let (addr, h) = serve_one(handshake_then_close);
    let e = connect(&addr, b"wrong").unwrap_err();
    assert!(
        matches!(e, ProtoError::Refused(RefuseReason::BadToken)),
        "{e:?}"
    );
    let se = h.join().unwrap().unwrap_err();
    assert!(matches!(se, ProtoError::Refused(RefuseReason::BadToken)));
}

#[test]
fn handshake_missing_token_refused() {
    let (addr, h) = serve_one(handshake_then_close);
    let e = connect(&addr, b"").unwrap_err();
    assert!(
        matches!(e, ProtoError::Refused(RefuseReason::BadToken)),
        "{e:?}"
    );
    assert!(h.join().unwrap().is_err());
}

#[test]
fn handshake_other_version_refused_with_both_versions() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    let hello = ClientMsg::Hello {
        version: 99,
        token: TOKEN.to_vec(),
    };
    write_msg(&mut s, &hello, HANDSHAKE_FRAME_MAX).unwrap();
    let reply = read_reply(&mut s);
    assert_eq!(
        reply,
        ServerMsg::Refused {
            reason: RefuseReason::BadVersion {
                server: PROTOCOL_VERSION,
                client: 99
            }
        }
    );
    assert!(h.join().unwrap().is_err());
}

#[test]
fn handshake_future_hello_layout_still_gets_bad_version() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    // Variant 0, the next version (a one-byte varint), then fields this version does not know.
    let future = PROTOCOL_VERSION + 1;
    let payload = [0u8, u8::try_from(future).unwrap(), 0xde, 0xad, 0xbe, 0xef];
    s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&payload).unwrap();
    let reply = read_reply(&mut s);
    assert!(matches!(
        reply,
        ServerMsg::Refused {
            reason: RefuseReason::BadVersion { client, .. }
        } if client == future
    ));
    assert!(h.join().unwrap().is_err());
}

#[test]
fn handshake_4gib_length_refused_without_reading_it() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let started = Instant::now();
    let reply = read_reply(&mut s);
    assert!(matches!(
        reply,
        ServerMsg::Refused {
            reason: RefuseReason::Invalid(_)
        }
    ));
    let se = h.join().unwrap().unwrap_err();
    assert!(
        matches!(se, ProtoError::FrameTooLarge { len, limit } if len == u64::from(u32::MAX) && limit == HANDSHAKE_FRAME_MAX),
        "{se:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn handshake_large_but_valid_hello_over_limit_refused() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    let frame = encode_msg(
        &ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            token: vec![b'x'; 100 << 10],
        },
        FRAME_MAX,
    )
    .unwrap();
    s.write_all(&frame[..4]).unwrap();
    let reply = read_reply(&mut s);
    assert!(matches!(reply, ServerMsg::Refused { .. }));
    assert!(matches!(
        h.join().unwrap(),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn handshake_garbage_refused_with_decode_error() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    s.write_all(&10u32.to_le_bytes()).unwrap();
    s.write_all(&[0xff; 10]).unwrap();
    let reply = read_reply(&mut s);
    assert!(matches!(
        reply,
        ServerMsg::Refused {
            reason: RefuseReason::Invalid(_)
        }
    ));
    assert!(matches!(h.join().unwrap(), Err(ProtoError::Decode(_))));
}

#[test]
fn handshake_first_message_not_hello_refused() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    write_msg(&mut s, &ClientMsg::Finish, HANDSHAKE_FRAME_MAX).unwrap();
    let reply = read_reply(&mut s);
    assert!(matches!(
        reply,
        ServerMsg::Refused {
            reason: RefuseReason::Invalid(ref why)
        } if why.contains("Hello")
    ));
    assert!(h.join().unwrap().is_err());
}

#[test]
fn handshake_eof_mid_frame_reports_truncated() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut s = raw_connect(&addr);
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::Truncated {
                expected: 104,
                got: 14
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("mid-frame"));
}

#[test]
fn handshake_one_byte_per_300ms_client_times_out() {
    let (addr, h) = serve_one(|s| {
        let started = Instant::now();
        let r = server::handshake(
            &s,
            Some(&token()),
            1,
            Instant::now() + Duration::from_secs(1),
        );
        (r, started.elapsed())
    });
    let s = raw_connect(&addr);
    let writer = std::thread::spawn(move || {
        let mut s = s;
        // Each byte goes out as its own TLS record: the deadline must hold across records.
        let frame = encode_msg(
            &ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                token: TOKEN.to_vec(),
            },
            HANDSHAKE_FRAME_MAX,
        )
        .unwrap();
        for b in frame {
            if s.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let (r, took) = h.join().unwrap();
    assert!(
        matches!(r, Err(ProtoError::Timeout { mid_frame: true })),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    writer.join().unwrap();
}

#[test]
fn server_hostile_clients_do_not_block_a_good_one() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let served = Arc::new(Mutex::new(Vec::new()));
    let served2 = Arc::clone(&served);
    let acceptor = std::thread::spawn(move || {
        for (i, conn) in listener.incoming().take(7).enumerate() {
            let Ok(s) = conn else { continue };
            let served = Arc::clone(&served2);
            std::thread::spawn(move || {
                let ok = acceptor().accept(s, secs(3)).is_ok_and(|mut s| {
                    server::handshake(&s, Some(&token()), i as u64, secs(3)).is_ok()
                        && read_msg_before::<ClientMsg, _>(&s, FRAME_MAX, secs(3)).is_ok()
                        && server::send(&mut s, &ServerMsg::Closed).is_ok()
                });
                served.lock().unwrap().push((i, ok));
            });
        }
    });
    // Hostile in clear: silent, a lone TLS record byte, HTTP; inside TLS: silent, oversize,
    // wrong token. All still open or refused.
    let silent_tcp = TcpStream::connect(&addr).unwrap();
    let mut half_tls = TcpStream::connect(&addr).unwrap();
    half_tls.write_all(&[0x16]).unwrap();
    let mut http = TcpStream::connect(&addr).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let silent = raw_connect(&addr);
    let mut oversize = raw_connect(&addr);
    oversize.write_all(&(1u32 << 31).to_le_bytes()).unwrap();
    let wrong = connect(&addr, b"nope");
    assert!(wrong.is_err());
    let started = Instant::now();
    let mut good = connect(&addr, TOKEN).unwrap();
    good.finish().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    drop((silent, silent_tcp));
    acceptor.join().unwrap();
    let deadline = secs(10);
    while served.lock().unwrap().len() < 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let served = served.lock().unwrap();
    assert_eq!(served.len(), 7);
    assert_eq!(served.iter().filter(|(_, ok)| *ok).count(), 1);
}

// ---- TLS and server pinning ----------------------------------------------------------------

/// What an in-test server saw of one connection: the TLS handshake's result, and whether a
/// `Hello` with the right token came after it (and was answered `HelloOk`).
type Seen1 = (Result<(), ProtoError>, bool);

/// Server side that runs the TLS handshake with `acc`, then the protocol's handshake.
fn accept_then_hello(acc: &TlsAcceptor, s: TcpStream) -> Seen1 {
    match acc.accept(s, secs(5)) {
        Err(e) => (Err(e), false),
        Ok(c) => (
            Ok(()),
            server::handshake(&c, Some(&token()), 1, secs(5)).is_ok(),
        ),
    }
}

/// Trust on first use with `file`, checked against an announced `fingerprint`.
fn announced(file: &Path, fingerprint: Fingerprint) -> ClientOptions {
    ClientOptions {
        trust: ServerTrust {
            advertised: Some(fingerprint),
            ..ServerTrust::known_servers(file.to_path_buf())
        },
        ..pinned()
    }
}

fn known_servers_opts(file: &Path) -> ClientOptions {
    ClientOptions {
        trust: ServerTrust::known_servers(file.to_path_buf()),
        ..pinned()
    }
}

#[test]
fn tls_client_pinned_to_other_fingerprint_refused_before_hello() {
    let (addr, h) = serve_tcp(1, |s| accept_then_hello(&acceptor(), s));
    let opts = ClientOptions {
        trust: ServerTrust::pinned(other_identity().fingerprint()),
        ..pinned()
    };
    let e = Client::connect_with(&addr, TOKEN, opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            ProtoError::FingerprintMismatch { expected, got, pin: PinSource::Explicit }
                if *expected == other_identity().fingerprint() && *got == identity().fingerprint()
        ),
        "{e:?}"
    );
    assert!(msg.contains(&identity().fingerprint().to_string()), "{msg}");
    assert!(
        msg.contains(&other_identity().fingerprint().to_string()),
        "{msg}"
    );
    // The server's TLS handshake failed on the client's alert: it never had a stream to read
    // a Hello (or anything else) from.
    let (accepted, saw_hello) = h.join().unwrap().pop().unwrap();
    assert!(
        matches!(
            accepted,
            Err(ProtoError::TlsHandshake(rustls::Error::AlertReceived(
                rustls::AlertDescription::AccessDenied
            )))
        ),
        "{accepted:?}"
    );
    assert!(!saw_hello);
}

/// Presents the in-test server's certificate but signs the handshake with another key: what a
/// man in the middle who copied the (public) certificate can do.
#[derive(Debug)]
struct Replayed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Replayed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

#[test]
fn tls_server_replaying_pinned_certificate_without_its_key_refused() {
    let (addr, h) = serve_tcp(1, |mut s| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        let certified =
            rustls::sign::CertifiedKey::new(vec![identity().certificate().clone()], signer);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            synth::protocol::tls::crypto_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Replayed(Arc::new(certified))));
        let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut result = Ok(());
        while conn.is_handshaking() && result.is_ok() {
            result = conn.complete_io(&mut s).map(|_| ());
        }
        result
    });
    let e = connect(&addr, TOKEN).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::TlsHandshake(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature
            ))
        ),
        "{e:?}"
    );
    assert!(h.join().unwrap().pop().unwrap().is_err());
}

#[test]
fn tls_first_contact_recorded_then_known_then_changed_certificate_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("home/known_servers");
    let mut n = 0;
    let (addr, h) = serve_tcp(3, move |s| {
        n += 1;
        // The third connection meets another server at the same address.
        let acc = TlsAcceptor::new(if n == 3 { other_identity() } else { identity() }).unwrap();
        accept_then_hello(&acc, s)
    });
    let first = Client::connect_with(&addr, TOKEN, known_servers_opts(&file));
    let first = first.unwrap();
    assert_eq!(
        first.trust(),
        &TrustOutcome::FirstUse {
            file: file.clone(),
            advertised: false
        }
    );
    let entry = KnownServers::load(&file)
        .unwrap()
        .get(&addr)
        .cloned()
        .unwrap();
    assert_eq!(entry.fingerprint, identity().fingerprint());
    drop(first);
    let second = Client::connect_with(&addr, TOKEN, known_servers_opts(&file)).unwrap();
    assert_eq!(
        second.trust(),
        &TrustOutcome::Known {
            file: file.clone(),
            line: entry.line
        }
    );
    drop(second);
    let e = Client::connect_with(&addr, TOKEN, known_servers_opts(&file)).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, ProtoError::FingerprintMismatch { pin: PinSource::KnownServers { line, .. }, .. } if *line == entry.line),
        "{e:?}"
    );
    assert!(
        msg.contains(&format!("delete line {} of {}", entry.line, file.display())),
        "{msg}"
    );
    assert!(
        msg.contains(&other_identity().fingerprint().to_string()),
        "{msg}"
    );
    let seen = h.join().unwrap();
    assert!(matches!(seen[0], (Ok(()), true)));
    assert!(matches!(seen[1], (Ok(()), true)));
    assert!(
        matches!(seen[2], (Err(ProtoError::TlsHandshake(_)), false)),
        "{:?}",
        seen[2]
    );
    // The stale entry is left for the user to remove.
    let after = KnownServers::load(&file).unwrap();
    assert_eq!(
        after.get(&addr).unwrap().fingerprint,
        identity().fingerprint()
    );
}

#[test]
fn tls_garbage_known_servers_file_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known_servers");
    std::fs::write(&file, "# mine\nedge:8021 SHA256:nothex\n").unwrap();
    // Nobody listens: the file is refused before any connection is tried.
    let e = Client::connect_with("127.0.0.1:1", TOKEN, known_servers_opts(&file)).unwrap_err();
    let msg = format!("{:#}", anyhow_chain(&e));
    assert!(
        matches!(
            e,
            ProtoError::KnownServers(synth::protocol::known_servers::KnownServersError::BadLine {
                line: 2,
                ..
            })
        ),
        "{e:?}"
    );
    assert!(
        msg.contains("line 2") && msg.contains("fix or delete"),
        "{msg}"
    );
}

/// The error and its sources, one per line.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!("\n{c}"));
        cur = c.source();
    }
    s
}

#[test]
fn tls_advertised_fingerprint_checked_when_file_has_no_entry() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known_servers");
    let (addr, h) = serve_tcp(2, |s| accept_then_hello(&acceptor(), s));
    let forged = announced(&file, other_identity().fingerprint());
    let e = Client::connect_with(&addr, TOKEN, forged).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::FingerprintMismatch {
                pin: PinSource::Advertised,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!file.exists(), "nothing recorded for a refused server");
    let genuine = announced(&file, identity().fingerprint());
    let c = Client::connect_with(&addr, TOKEN, genuine).unwrap();
    assert_eq!(
        c.trust(),
        &TrustOutcome::FirstUse {
            file: file.clone(),
            advertised: true
        }
    );
    drop(c);
    let seen = h.join().unwrap();
    assert!(matches!(seen[0], (Err(_), false)));
    assert!(matches!(seen[1], (Ok(()), true)));
}

#[test]
fn tls_known_entry_wins_over_advertised_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("known_servers");
    let (addr, h) = serve_tcp(1, |s| accept_then_hello(&acceptor(), s));
    KnownServers::record(&file, &addr, identity().fingerprint()).unwrap();
    let opts = announced(&file, other_identity().fingerprint());
    let c = Client::connect_with(&addr, TOKEN, opts).unwrap();
    assert!(
        matches!(c.trust(), TrustOutcome::Known { .. }),
        "{:?}",
        c.trust()
    );
    drop(c);
    assert!(matches!(h.join().unwrap()[0], (Ok(()), true)));
}

#[test]
fn tls_client_without_pin_or_known_servers_refused() {
    let opts = ClientOptions {
        trust: ServerTrust::default(),
        ..pinned()
    };
    let e = Client::connect_with("127.0.0.1:1", TOKEN, opts).unwrap_err();
    assert!(matches!(e, ProtoError::NoTrust), "{e:?}");
}

#[test]
fn tls_plaintext_old_client_gets_bad_version_in_clear() {
    let (addr, h) = serve_tcp(1, |s| acceptor().accept(s, secs(5)).err());
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = ClientMsg::Hello {
        version: 2,
        token: TOKEN.to_vec(),
    };
    write_msg(&mut s, &hello, HANDSHAKE_FRAME_MAX).unwrap();
    let reply: ServerMsg = read_msg(&mut s, HANDSHAKE_FRAME_MAX).unwrap();
    let bad_version = RefuseReason::BadVersion {
        server: PROTOCOL_VERSION,
        client: 2,
    };
    assert_eq!(
        reply,
        ServerMsg::Refused {
            reason: bad_version.clone()
        }
    );
    let e = h.join().unwrap().pop().unwrap();
    assert!(
        matches!(&e, Some(ProtoError::Refused(r)) if *r == bad_version),
        "{e:?}"
    );
}

#[test]
fn tls_client_against_plaintext_server_reports_not_tls() {
    // A server of protocol 2: reads a frame length in clear, refuses it in clear.
    let (addr, h) = serve_tcp(1, |s| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut len = [0u8; 4];
        (&s).read_exact(&mut len).unwrap();
        server::refuse(&mut &s, RefuseReason::Invalid("frame too large".into()));
    });
    let e = connect(&addr, TOKEN).unwrap_err();
    assert!(matches!(e, ProtoError::NotTls { .. }), "{e:?}");
    assert!(e.to_string().contains("version 2 or older"), "{e}");
    h.join().unwrap();
}

#[test]
fn tls_accept_lone_record_byte_times_out() {
    let (addr, h) = serve_tcp(1, |s| {
        acceptor()
            .accept(s, Instant::now() + Duration::from_secs(1))
            .err()
    });
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0x16, 0x03]).unwrap();
    let e = h.join().unwrap().pop().unwrap();
    assert!(matches!(e, Some(ProtoError::Timeout { .. })), "{e:?}");
}

#[test]
fn tls_conn_writer_not_blocked_by_waiting_reader() {
    let (addr, h) = serve_one(|s| -> Result<ClientMsg, ProtoError> {
        let s = Arc::new(s);
        let (tx, rx) = std::sync::mpsc::channel();
        // The reader reads the client's Keepalive, then waits for a frame the client sends
        // only after it got three from us.
        let reader = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || loop {
                let m = read_msg_before::<ClientMsg, _>(&*s, FRAME_MAX, secs(10));
                if !matches!(m, Ok(ClientMsg::Keepalive)) {
                    return m;
                }
                tx.send(()).unwrap();
            })
        };
        rx.recv().unwrap();
        // Let the reader get back into its (blocking) read; the writes must pass it.
        std::thread::sleep(Duration::from_millis(200));
        for index in 0..3 {
            server::send(&mut &*s, &ServerMsg::NeedSegment { index })?;
        }
        reader.join().unwrap()
    });
    let mut c = raw_connect(&addr);
    write_msg(&mut c, &ClientMsg::Keepalive, FRAME_MAX).unwrap();
    for index in 0..3 {
        assert_eq!(
            read_msg::<ServerMsg>(&mut c, FRAME_MAX).unwrap(),
            ServerMsg::NeedSegment { index }
        );
    }
    write_msg(&mut c, &ClientMsg::Finish, FRAME_MAX).unwrap();
    assert_eq!(h.join().unwrap().unwrap(), ClientMsg::Finish);
}

// ---- Flow 1 against an in-test server ------------------------------------------------------

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn image(&mut self, size: usize) -> Vec<u8> {
        let mut v = vec![0u8; size];
        for c in v.chunks_mut(8) {
            c.copy_from_slice(&self.next_u64().to_le_bytes()[..c.len()]);
        }
        v
    }
}

/// Builds a real overlay with one changed (random) chunk per segment: `segments` segments.
fn build_overlay(dir: &Path, segments: usize) -> PathBuf {
    build_overlay_with(dir, segments, 1)
}

/// Builds a real overlay of `segments` segments of `per_segment` changed (random) chunks each.
fn build_overlay_with(dir: &Path, segments: usize, per_segment: usize) -> PathBuf {
    let mut rng = Rng(7);
    let changed = segments * per_segment;
    let chunks = changed + 8;
    let base_disk = rng.image(chunks * CHUNK_SIZE);
    let base_memory = rng.image(8 * CHUNK_SIZE);
    let (d, m) = (dir.join("base-disk"), dir.join("base-memory"));
    std::fs::write(&d, &base_disk).unwrap();
    std::fs::write(&m, &base_memory).unwrap();
    let registry = Registry::open(&dir.join("home")).unwrap();
    let req = AddBase {
        disk: d,
        memory: m,
        threads: 2,
        ..Default::default()
    };
    let base = registry.add(&req, &Default::default()).unwrap();
    let mut disk = base_disk.clone();
    disk[..changed * CHUNK_SIZE].copy_from_slice(&rng.image(changed * CHUNK_SIZE));
    let custom = CustomImages {
        disk: dir.join("custom-disk"),
        memory: dir.join("custom-memory"),
        device_state: None,
    };
    std::fs::write(&custom.disk, &disk).unwrap();
    std::fs::write(&custom.memory, &base_memory).unwrap();
    let out = dir.join("overlay.cldovl");
    let opts = CreateOptions {
        codec: Codec::Zstd,
        level: 1,
        segment_size: per_segment * CHUNK_SIZE,
        ..Default::default()
    };
    let index = base.index().unwrap();
    let stats = create_overlay(&base, &index, &custom, &out, &opts, &Default::default()).unwrap();
    assert_eq!(stats.segments, segments as u64);
    out
}

/// What the in-test server saw.
#[derive(Debug, Default)]
struct Seen {
    order: Vec<u32>,
    demanded: Option<u32>,
    demanded_after: usize,
}

/// Flow 1, server side: head, then segments; asks for the last segment as soon as the first
/// one arrived; resumes after the head; reports `FillDone` when complete.
fn overlay_server(s: TlsConn) -> Result<Seen, ProtoError> {
    overlay_server_asking(s, false)
}

/// [`overlay_server`], asking for the last segment as soon as the first *part* of a segment
/// arrived (`on_first_part`) rather than the first whole segment.
fn overlay_server_asking(mut s: TlsConn, on_first_part: bool) -> Result<Seen, ProtoError> {
    server::handshake(&s, Some(&token()), 7, secs(5))?;
    let msg: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
    let ClientMsg::StartOverlay {
        early_start,
        guest_ports,
        file_len,
        head_len,
    } = msg
    else {
        panic!("expected StartOverlay, got {msg:?}");
    };
    assert!(early_start);
    server::check_ports(&guest_ports).unwrap();
    let mut head = HeadAssembler::new(file_len, head_len, u64::MAX).unwrap();
    loop {
        let ClientMsg::Head { offset, bytes } = read_msg_before(&s, FRAME_MAX, secs(5))? else {
            panic!("expected Head");
        };
        if head.push(offset, &bytes).unwrap() {
            break;
        }
    }
    let (overlay, _src) = head.finish().unwrap();
    let n = overlay.metadata().segments.len() as u32;
    server::send(
        &mut s,
        &ServerMsg::Accepted {
            base_id: synth::chunk::hex(&overlay.metadata().base_id),
            segments: n,
            file_len,
        },
    )?;
    server::send(
        &mut s,
        &ServerMsg::Resumed(ResumeInfo {
            ports: guest_ports
                .iter()
                .map(|&g| PortMapping {
                    guest: g,
                    host_addr: "127.0.0.1".into(),
                    host_port: 40000 + g,
                })
                .collect(),
            timings: Default::default(),
        }),
    )?;
    let mut segs = SegmentAssembler::new(overlay.metadata_arc());
    let mut seen = Seen::default();
    while !segs.is_complete() {
        match read_msg_before(&s, FRAME_MAX, secs(10))? {
            ClientMsg::Segment {
                index,
                offset,
                bytes,
            } => {
                let done = segs.push(index, offset, &bytes).unwrap();
                if let Some((i, _)) = &done {
                    seen.order.push(*i);
                }
                if (done.is_some() || on_first_part) && seen.demanded.is_none() {
                    seen.demanded = Some(n - 1);
                    seen.demanded_after = seen.order.len();
                    server::send(&mut s, &ServerMsg::NeedSegment { index: n - 1 })?;
                }
            }
            ClientMsg::Keepalive => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    server::send(&mut s, &ServerMsg::FillDone(FillInfo::default()))?;
    closed_on_finish(&mut s)?;
    Ok(seen)
}

#[test]
fn overlay_demand_for_last_segment_jumps_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 40);
    let (addr, h) = serve_one(overlay_server);
    let opts = ClientOptions {
        rate_limit_bytes_per_sec: Some(256 << 10),
        ..pinned()
    };
    let mut c = Client::connect_with(&addr, TOKEN, opts).unwrap();
    let mut events = Vec::new();
    let req = SessionRequest {
        early_start: true,
        guest_ports: vec![22, 80],
        metadata_digest: Some(metadata_digest_of(&path).unwrap()),
    };
    let out = c
        .send_overlay_file(&path, &req, &mut |e| {
            if !matches!(e, ClientEvent::Progress(_)) {
                events.push(e.clone());
            }
        })
        .unwrap();
    c.finish().unwrap();
    let seen = h.join().unwrap().unwrap();
    assert_eq!(seen.order.len(), 40);
    let pos = seen.order.iter().position(|&i| i == 39).unwrap();
    // Asked for after `demanded_after` segments; the client may have one or two in flight.
    assert!(
        pos <= seen.demanded_after + 2,
        "segment 39 arrived at position {pos}, asked for after {}",
        seen.demanded_after
    );
    assert_eq!(out.transfer.demand_requests, 1);
    assert_eq!(out.transfer.segments_sent, 40);
    assert_eq!(out.ports().len(), 2);
    assert!(out.fill_done.is_some());
    assert!(events.contains(&ClientEvent::Demand { index: 39 }));
    assert!(matches!(
        events[0],
        ClientEvent::Accepted { segments: 40, .. }
    ));
}

#[test]
fn overlay_demand_sent_inside_a_large_segment_completes_first() {
    let dir = tempfile::tempdir().unwrap();
    // 4 segments of 8 random chunks: each goes out as 8 or 9 parts of 4 KiB.
    let path = build_overlay_with(dir.path(), 4, 8);
    let (addr, h) = serve_one(|s| overlay_server_asking(s, true));
    let opts = ClientOptions {
        part_len: 4096,
        rate_limit_bytes_per_sec: Some(64 << 10),
        ..pinned()
    };
    let mut c = Client::connect_with(&addr, TOKEN, opts).unwrap();
    let req = SessionRequest {
        early_start: true,
        ..SessionRequest::default()
    };
    let out = c.send_overlay_file(&path, &req, &mut |_| {}).unwrap();
    c.finish().unwrap();
    let seen = h.join().unwrap().unwrap();
    // Asked for while segment 0 was under way: segment 3 completes first, then 0, 1, 2.
    assert_eq!(seen.order, vec![3, 0, 1, 2]);
    assert_eq!(out.transfer.segments_sent, 4);
    assert_eq!(out.transfer.demand_requests, 1);
}

#[test]
fn overlay_client_vanishing_mid_stream_gives_truncated_on_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 4);
    let (addr, h) = serve_one(|s| -> Result<ClientMsg, ProtoError> {
        server::handshake(&s, Some(&token()), 1, secs(5))?;
        let start: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
        let _: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
        Ok(start)
    });
    let mut s = raw_connect(&addr);
    let hello = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        token: TOKEN.to_vec(),
    };
    write_msg(&mut s, &hello, HANDSHAKE_FRAME_MAX).unwrap();
    assert!(matches!(read_reply(&mut s), ServerMsg::HelloOk { .. }));
    let bytes = std::fs::read(&path).unwrap();
    let start = ClientMsg::StartOverlay {
        early_start: false,
        guest_ports: vec![],
        file_len: bytes.len() as u64,
        head_len: 64,
    };
    write_msg(&mut s, &start, FRAME_MAX).unwrap();
    let frame = encode_msg(
        &ClientMsg::Head {
            offset: 0,
            bytes: bytes[..64].to_vec(),
        },
        FRAME_MAX,
    )
    .unwrap();
    s.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(s);
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, ProtoError::Truncated { .. }), "{e:?}");
}

#[test]
fn overlay_refused_by_server_reason_reaches_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 2);
    let (addr, h) = serve_one(|mut s| -> Result<(), ProtoError> {
        server::handshake(&s, Some(&token()), 1, secs(5))?;
        let _: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
        let reason = RefuseReason::UnknownBase {
            base_id: "ab".repeat(32),
        };
        Err(server::refuse(&mut s, reason))
    });
    let mut c = connect(&addr, TOKEN).unwrap();
    let e = c
        .send_overlay_file(&path, &SessionRequest::default(), &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(e, ProtoError::Refused(RefuseReason::UnknownBase { .. })),
        "{e:?}"
    );
    assert!(h.join().unwrap().is_err());
}

#[test]
fn client_stop_handle_finishes_the_session() {
    let (addr, h) = serve_one(|mut s| -> Result<(), ProtoError> {
        server::handshake(&s, Some(&token()), 1, secs(5))?;
        let msg: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
        assert!(matches!(msg, ClientMsg::StartUrl { .. }));
        server::send(&mut s, &ServerMsg::Resumed(ResumeInfo::default()))?;
        closed_on_finish(&mut s)
    });
    let mut c = connect(&addr, TOKEN).unwrap();
    let stop = c.stop_handle();
    let out = c
        .send_url("http://a/o", &SessionRequest::default(), &mut |e| {
            if matches!(e, ClientEvent::Resumed(_)) {
                stop.stop();
            }
        })
        .unwrap();
    assert!(out.stopped);
    assert!(out.resumed.is_some());
    h.join().unwrap().unwrap();
    assert!(matches!(
        c.send_url("http://a/o", &SessionRequest::default(), &mut |_| {}),
        Err(ProtoError::SessionEnded)
    ));
}

#[test]
fn url_outside_prefix_refused_over_the_wire() {
    let (addr, h) = serve_one(|mut s| -> Result<(), ProtoError> {
        server::handshake(&s, Some(&token()), 1, secs(5))?;
        let policy = UrlPolicy::new(vec!["https://cdn.example.com/overlays/".into()]).unwrap();
        let ClientMsg::StartUrl { url, .. } = read_msg_before(&s, FRAME_MAX, secs(5))? else {
            panic!("expected StartUrl");
        };
        match policy.check(&url) {
            Ok(()) => Ok(()),
            Err(r) => Err(server::refuse(&mut s, r)),
        }
    });
    let mut c = connect(&addr, TOKEN).unwrap();
    let e = c
        .send_url(
            "https://cdn.example.com.evil.org/overlays/x",
            &SessionRequest::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(e, ProtoError::Refused(RefuseReason::UrlNotAllowed { .. })),
        "{e:?}"
    );
    assert!(h.join().unwrap().is_err());
}

/// Server side of a URL session whose "fetched" overlay is the file at `path`: checks the
/// metadata digest the client sent with the real server-side check, then answers
/// `Accepted` (and waits for `Finish`) or refuses.
fn url_server(mut s: TlsConn, path: PathBuf) -> Result<(), ProtoError> {
    server::handshake(&s, Some(&token()), 1, secs(5))?;
    let ClientMsg::StartUrl {
        metadata_digest, ..
    } = read_msg_before(&s, FRAME_MAX, secs(5))?
    else {
        panic!("expected StartUrl");
    };
    let src: Arc<dyn synth::source::ByteSource> = Arc::new(std::fs::read(&path).unwrap());
    let overlay = synth::format::Overlay::open(src).unwrap();
    if let Err(r) = server::check_metadata_digest(&overlay, metadata_digest.as_ref()) {
        return Err(server::refuse(&mut s, r));
    }
    server::send(&mut s, &ServerMsg::FillDone(FillInfo::default()))?;
    closed_on_finish(&mut s)
}

#[test]
fn url_metadata_digest_mismatch_refused_by_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 2);
    let served = path.clone();
    let (addr, h) = serve_one(move |s| url_server(s, served));
    let mut wrong = metadata_digest_of(&path).unwrap();
    wrong[0] ^= 1;
    let req = SessionRequest {
        metadata_digest: Some(wrong),
        ..SessionRequest::default()
    };
    let mut c = connect(&addr, TOKEN).unwrap();
    let e = c.send_url("http://a/o", &req, &mut |_| {}).unwrap_err();
    let ProtoError::Refused(RefuseReason::MetadataDigest { expected, got }) = &e else {
        panic!("{e:?}");
    };
    assert_eq!(*expected, synth::protocol::format_sha256(&wrong));
    assert_eq!(
        *got,
        synth::protocol::format_sha256(&metadata_digest_of(&path).unwrap())
    );
    assert!(matches!(
        h.join().unwrap(),
        Err(ProtoError::Refused(RefuseReason::MetadataDigest { .. }))
    ));
}

#[test]
fn url_metadata_digest_match_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 2);
    let served = path.clone();
    let (addr, h) = serve_one(move |s| url_server(s, served));
    let req = SessionRequest {
        metadata_digest: Some(metadata_digest_of(&path).unwrap()),
        ..SessionRequest::default()
    };
    let mut c = connect(&addr, TOKEN).unwrap();
    let out = c.send_url("http://a/o", &req, &mut |_| {}).unwrap();
    assert!(out.fill_done.is_some());
    c.finish().unwrap();
    h.join().unwrap().unwrap();
}

#[test]
fn overlay_file_with_other_metadata_digest_refused_before_sending_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 2);
    let (addr, h) = serve_one(|s| -> Result<Option<ClientMsg>, ProtoError> {
        server::handshake(&s, Some(&token()), 1, secs(5))?;
        Ok(read_msg_before::<ClientMsg, _>(&s, FRAME_MAX, secs(5)).ok())
    });
    let req = SessionRequest {
        metadata_digest: Some([0; 32]),
        ..SessionRequest::default()
    };
    let mut c = connect(&addr, TOKEN).unwrap();
    let e = c.send_overlay_file(&path, &req, &mut |_| {}).unwrap_err();
    assert!(matches!(e, ProtoError::OverlayDigest { .. }), "{e:?}");
    drop(c);
    assert_eq!(h.join().unwrap().unwrap(), None);
}

// ---- Assemblers ------------------------------------------------------------------------------

#[test]
fn head_assembler_huge_head_len_refused() {
    assert!(HeadAssembler::new(1 << 50, 1 << 50, u64::MAX).is_err());
    assert!(HeadAssembler::new(100, 10, u64::MAX).is_err());
    assert!(HeadAssembler::new(1000, 2000, u64::MAX).is_err());
    assert!(HeadAssembler::new(1 << 20, 4096, 1024).is_err());
}

#[test]
fn head_assembler_gap_or_overflow_refused() {
    let mut h = HeadAssembler::new(1000, 100, u64::MAX).unwrap();
    assert!(h.push(10, &[0; 10]).is_err());
    let mut h = HeadAssembler::new(1000, 100, u64::MAX).unwrap();
    assert!(h.push(0, &[0; 101]).is_err());
}

#[test]
fn head_assembler_garbage_head_refused_as_bad_overlay() {
    let mut h = HeadAssembler::new(1000, 100, u64::MAX).unwrap();
    assert!(h.push(0, &[7; 100]).unwrap());
    assert!(matches!(h.finish(), Err(RefuseReason::BadOverlay(_))));
}

/// The overlay at `path` and the stored bytes of each of its segments.
fn assembled(path: &Path) -> (synth::format::Overlay, Vec<Vec<u8>>) {
    let bytes = std::fs::read(path).unwrap();
    let src: Arc<dyn synth::source::ByteSource> = Arc::new(bytes.clone());
    let ov = synth::format::Overlay::open(src).unwrap();
    let segs = ov
        .metadata()
        .segments
        .iter()
        .map(|e| {
            let start = (ov.data_start() + e.offset) as usize;
            bytes[start..start + e.length as usize].to_vec()
        })
        .collect();
    (ov, segs)
}

#[test]
fn segment_assembler_demand_segment_inside_another_completes_both() {
    let dir = tempfile::tempdir().unwrap();
    let (ov, segs) = assembled(&build_overlay(dir.path(), 3));
    let seg = |i: usize| segs[i].clone();
    let mut a = SegmentAssembler::new(ov.metadata_arc());
    let (s0, s2) = (seg(0), seg(2));
    let half = s0.len() / 2;
    assert_eq!(a.push(0, 0, &s0[..half]).unwrap(), None);
    assert_eq!(a.push(2, 0, &s2).unwrap(), Some((2, s2)));
    assert_eq!(
        a.push(0, half as u64, &s0[half..]).unwrap(),
        Some((0, s0.clone()))
    );
    assert!(a.has(0) && a.has(2) && !a.has(1));
}

#[test]
fn segment_assembler_corrupt_or_interleaved_parts_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ov, segs) = assembled(&build_overlay(dir.path(), 3));
    let seg = |i: usize| segs[i].clone();
    // Corrupt bytes.
    let mut a = SegmentAssembler::new(ov.metadata_arc());
    let mut s0 = seg(0);
    s0[0] ^= 1;
    assert!(matches!(
        a.push(0, 0, &s0),
        Err(RefuseReason::BadOverlay(_))
    ));
    // A third segment while two are unfinished.
    let mut a = SegmentAssembler::new(ov.metadata_arc());
    let (s0, s1) = (seg(0), seg(1));
    assert_eq!(a.push(1, 0, &s1[..10]).unwrap(), None);
    assert_eq!(a.push(0, 0, &s0[..10]).unwrap(), None);
    assert!(a.push(2, 0, &seg(2)[..10]).is_err());
    // Whole, then twice.
    let mut a = SegmentAssembler::new(ov.metadata_arc());
    assert_eq!(a.push(2, 0, &seg(2)).unwrap().map(|x| x.0), Some(2));
    assert!(a.has(2));
    assert!(a.push(2, 0, &seg(2)).is_err());
    assert!(a.push(9, 0, &[1]).is_err());
}

#[test]
fn check_ports_zero_repeated_or_too_many_refused() {
    assert!(server::check_ports(&[22, 80]).is_ok());
    assert!(server::check_ports(&[0]).is_err());
    assert!(server::check_ports(&[22, 22]).is_err());
    let many: Vec<u16> = (1..=65).collect();
    assert!(server::check_ports(&many).is_err());
}

// ---- URL policy ------------------------------------------------------------------------------

fn policy() -> UrlPolicy {
    UrlPolicy::new(vec![
        "http://a.example/b/".into(),
        "https://cdn.example.com:8443/ov".into(),
    ])
    .unwrap()
}

#[test]
fn url_policy_without_prefixes_refuses_everything() {
    let p = UrlPolicy::new(Vec::new()).unwrap();
    assert!(p.check("http://a.example/b/x").is_err());
}

#[test]
fn url_policy_urls_under_prefixes_allowed() {
    let p = policy();
    for ok in [
        "http://a.example/b/x.cldovl",
        "HTTP://A.EXAMPLE/b/x",
        "http://a.example:80/b/sub/dir/x?sig=1",
        "https://cdn.example.com:8443/ov",
        "https://cdn.example.com:8443/ov/x",
        "https://cdn.example.com:8443/ov?x=1",
    ] {
        assert_eq!(p.check(ok), Ok(()), "{ok}");
    }
}

#[test]
fn url_policy_hostile_urls_refused() {
    let p = policy();
    for bad in [
        "http://a.example/b/../c",
        "http://a.example/b/%2e%2e/c",
        "http://a.example/b/%2E./c",
        "http://a.example/b/./x",
        "http://a.example/b/..",
        "http://a.example/b/x%2f..%2fy",
        "http://a.example/b\\..\\c",
        "http://a.example.evil.com/b/x",
        "http://a.example@evil.com/b/x",
        "http://evil.com@a.example/b/x",
        "http://a.example:81/b/x",
        "https://a.example/b/x",
        "ftp://a.example/b/x",
        "file:///etc/passwd",
        "http://a.example/bx",
        "http://a.example/b",
        "http://a.example/c/x",
        "http://a.example/b/x\n",
        "http://a.example/b/x y",
        "http://a.example/b/\u{0}x",
        "http://a.exämple/b/x",
        "http://a.example/b/x#frag",
        "http://a.example./b/x",
        "http://a.example:0/b/x",
        "http://a.example:99999/b/x",
        "http://a.example:+80/b/x",
        "http:/a.example/b/x",
        "//a.example/b/x",
        "a.example/b/x",
        "",
        "https://cdn.example.com:8443/ovx",
        "https://cdn.example.com/ov/x",
        "https://[::1]:8443/ov/x",
    ] {
        assert!(
            matches!(p.check(bad), Err(RefuseReason::UrlNotAllowed { .. })),
            "{bad:?} was allowed"
        );
    }
    let long = format!("http://a.example/b/{}", "x".repeat(5000));
    assert!(p.check(&long).is_err());
}

#[test]
fn url_policy_invalid_prefix_refused() {
    assert!(UrlPolicy::new(vec!["a.example/b/".into()]).is_err());
    assert!(UrlPolicy::new(vec!["http://u@a.example/".into()]).is_err());
}

#[test]
fn url_policy_redirects_resolved_and_checked() {
    let p = policy();
    let cur = "http://a.example/b/x";
    assert_eq!(
        p.check_redirect(cur, "/b/y").unwrap(),
        "http://a.example:80/b/y"
    );
    assert_eq!(
        p.check_redirect(cur, "y2").unwrap(),
        "http://a.example:80/b/y2"
    );
    assert!(p.check_redirect(cur, "http://a.example/b/z").is_ok());
    assert!(p.check_redirect(cur, "/c/y").is_err());
    assert!(p.check_redirect(cur, "../c").is_err());
    assert!(p.check_redirect(cur, "//evil.com/b/x").is_err());
    assert!(p.check_redirect(cur, "https://evil.com/b/x").is_err());
    assert!(p.check_redirect(cur, "javascript:alert(1)").is_err());
    assert!(p
        .check_redirect("https://cdn.example.com:8443/ov/a", "b")
        .is_ok());
}
