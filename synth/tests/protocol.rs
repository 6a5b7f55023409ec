//! The wire protocol over real loopback TCP: handshake, hostile peers, the client's on-demand
//! scheduling against a small in-test server, and the URL policy.

// Fixture sizes are small; truncating casts cannot happen here.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use synth::chunk::CHUNK_SIZE;
use synth::codec::Codec;
use synth::create::{create_overlay, CreateOptions, CustomImages};
use synth::protocol::server::{self, HeadAssembler, SegmentAssembler};
use synth::protocol::{
    encode_msg, read_msg_before, write_msg, Client, ClientEvent, ClientMsg, ClientOptions,
    FillInfo, PortMapping, ProtoError, RefuseReason, ResumeInfo, ServerMsg, SessionRequest, Token,
    UrlPolicy, FRAME_MAX, HANDSHAKE_FRAME_MAX, PROTOCOL_VERSION,
};
use synth::registry::{AddBase, Registry};

const TOKEN: &[u8] = b"correct horse battery staple";

fn token() -> Token {
    Token::new(TOKEN.to_vec()).unwrap()
}

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// Accepts one connection on a fresh loopback port and runs `f` on it in a thread.
fn serve_one<R, F>(f: F) -> (String, JoinHandle<R>)
where
    R: Send + 'static,
    F: FnOnce(TcpStream) -> R + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        f(s)
    });
    (addr, h)
}

/// Server side of a session that only waits for `Finish` and answers `Closed`.
fn handshake_then_close(mut s: TcpStream) -> Result<(), ProtoError> {
    server::handshake(&mut s, Some(&token()), 42, secs(5))?;
    let msg: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
    assert_eq!(msg, ClientMsg::Finish);
    server::send(&mut s, &ServerMsg::Closed)
}

fn raw_connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_reply(s: &mut TcpStream) -> ServerMsg {
    synth::protocol::read_msg(s, HANDSHAKE_FRAME_MAX).unwrap()
}

#[test]
fn handshake_valid_token_succeeds() {
    let (addr, h) = serve_one(handshake_then_close);
    let mut c = Client::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
    assert_eq!(c.session_id(), 42);
    c.finish().unwrap();
    h.join().unwrap().unwrap();
}

#[test]
fn handshake_wrong_token_refused() {
    let (addr, h) = serve_one(handshake_then_close);
    let e = Client::connect(&addr, b"wrong", Duration::from_secs(5)).unwrap_err();
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
    let e = Client::connect(&addr, b"", Duration::from_secs(5)).unwrap_err();
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
    let (addr, h) = serve_one(|mut s| {
        let started = Instant::now();
        let r = server::handshake(
            &mut s,
            Some(&token()),
            1,
            Instant::now() + Duration::from_secs(1),
        );
        (r, started.elapsed())
    });
    let s = raw_connect(&addr);
    let writer = std::thread::spawn(move || {
        let mut s = s;
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
        for (i, conn) in listener.incoming().take(5).enumerate() {
            let Ok(s) = conn else { continue };
            let served = Arc::clone(&served2);
            std::thread::spawn(move || {
                let mut s = s;
                let ok = server::handshake(&mut s, Some(&token()), i as u64, secs(3)).is_ok()
                    && read_msg_before::<ClientMsg, _>(&s, FRAME_MAX, secs(3)).is_ok()
                    && server::send(&mut s, &ServerMsg::Closed).is_ok();
                served.lock().unwrap().push((i, ok));
            });
        }
    });
    // Hostile: silent, garbage, oversize, wrong token; all still open or refused.
    let silent = raw_connect(&addr);
    let mut garbage = raw_connect(&addr);
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut oversize = raw_connect(&addr);
    oversize.write_all(&(1u32 << 31).to_le_bytes()).unwrap();
    let wrong = Client::connect(&addr, b"nope", Duration::from_secs(5));
    assert!(wrong.is_err());
    let started = Instant::now();
    let mut good = Client::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
    good.finish().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(silent);
    acceptor.join().unwrap();
    let deadline = secs(10);
    while served.lock().unwrap().len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let served = served.lock().unwrap();
    assert_eq!(served.iter().filter(|(_, ok)| *ok).count(), 1);
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
fn overlay_server(s: TcpStream) -> Result<Seen, ProtoError> {
    overlay_server_asking(s, false)
}

/// [`overlay_server`], asking for the last segment as soon as the first *part* of a segment
/// arrived (`on_first_part`) rather than the first whole segment.
fn overlay_server_asking(mut s: TcpStream, on_first_part: bool) -> Result<Seen, ProtoError> {
    server::handshake(&mut s, Some(&token()), 7, secs(5))?;
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
    loop {
        match read_msg_before(&s, FRAME_MAX, secs(5))? {
            ClientMsg::Finish => break,
            ClientMsg::Keepalive => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    server::send(&mut s, &ServerMsg::Closed)?;
    Ok(seen)
}

#[test]
fn overlay_demand_for_last_segment_jumps_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_overlay(dir.path(), 40);
    let (addr, h) = serve_one(overlay_server);
    let opts = ClientOptions {
        rate_limit_bytes_per_sec: Some(256 << 10),
        ..Default::default()
    };
    let mut c = Client::connect_with(&addr, TOKEN, opts).unwrap();
    let mut events = Vec::new();
    let req = SessionRequest {
        early_start: true,
        guest_ports: vec![22, 80],
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
        ..Default::default()
    };
    let mut c = Client::connect_with(&addr, TOKEN, opts).unwrap();
    let req = SessionRequest {
        early_start: true,
        guest_ports: vec![],
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
    let (addr, h) = serve_one(|mut s| -> Result<ClientMsg, ProtoError> {
        server::handshake(&mut s, Some(&token()), 1, secs(5))?;
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
        server::handshake(&mut s, Some(&token()), 1, secs(5))?;
        let _: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
        let reason = RefuseReason::UnknownBase {
            base_id: "ab".repeat(32),
        };
        Err(server::refuse(&mut s, reason))
    });
    let mut c = Client::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
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
        server::handshake(&mut s, Some(&token()), 1, secs(5))?;
        let msg: ClientMsg = read_msg_before(&s, FRAME_MAX, secs(5))?;
        assert!(matches!(msg, ClientMsg::StartUrl { .. }));
        server::send(&mut s, &ServerMsg::Resumed(ResumeInfo::default()))?;
        loop {
            match read_msg_before(&s, FRAME_MAX, secs(5))? {
                ClientMsg::Finish => break,
                ClientMsg::Keepalive => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        server::send(&mut s, &ServerMsg::Closed)
    });
    let mut c = Client::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
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
        server::handshake(&mut s, Some(&token()), 1, secs(5))?;
        let policy = UrlPolicy::new(vec!["https://cdn.example.com/overlays/".into()]).unwrap();
        let ClientMsg::StartUrl { url, .. } = read_msg_before(&s, FRAME_MAX, secs(5))? else {
            panic!("expected StartUrl");
        };
        match policy.check(&url) {
            Ok(()) => Ok(()),
            Err(r) => Err(server::refuse(&mut s, r)),
        }
    });
    let mut c = Client::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
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
