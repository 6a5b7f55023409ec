//! Fuzzes the wire protocol decoder: the input is read as a stream of frames, with the
//! handshake limit and with the session limit, and every frame is decoded as a client and as a
//! server message. Nothing may panic or allocate past the limits; every message that decodes
//! must encode and decode back to the same message, and URLs that decode go through the URL policy.
//! Text input also goes through the fingerprint parser (the mDNS TXT `fp` value is untrusted):
//! a fingerprint that parses prints in the canonical form and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use synth::protocol::{
    decode_msg, encode_msg, read_frame, ClientMsg, Fingerprint, ServerMsg, UrlPolicy, FRAME_MAX,
    HANDSHAKE_FRAME_MAX,
};

macro_rules! roundtrip {
    ($ty:ty, $payload:expr, $limit:expr) => {{
        let msg: Option<$ty> = decode_msg($payload, $limit).ok();
        if let Some(m) = &msg {
            // bincode accepts non-minimal varints, so compare messages, not bytes.
            let frame = encode_msg(m, FRAME_MAX).expect("a decoded message encodes");
            let again: $ty = decode_msg(&frame[4..], FRAME_MAX).expect("re-encoded decodes");
            assert_eq!(&again, m, "re-encoding changed the message");
        }
        msg
    }};
}

fuzz_target!(|data: &[u8]| {
    let policy = UrlPolicy::new(vec!["http://a.example/b/".into()]).expect("valid prefix");
    for limit in [HANDSHAKE_FRAME_MAX, FRAME_MAX] {
        let mut r = Cursor::new(data);
        for _ in 0..64 {
            let Ok(payload) = read_frame(&mut r, limit) else {
                break;
            };
            assert!(payload.len() as u64 <= u64::from(limit));
            if let Some(ClientMsg::StartUrl { url, .. }) = roundtrip!(ClientMsg, &payload, limit) {
                let _ = policy.check(&url);
                let _ = policy.check_redirect("http://a.example/b/x", &url);
            }
            let _ = roundtrip!(ServerMsg, &payload, limit);
        }
    }
    // The raw input as a payload too, so the fuzzer need not learn the length prefix.
    let _ = roundtrip!(ClientMsg, data, FRAME_MAX);
    let _ = roundtrip!(ServerMsg, data, FRAME_MAX);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = policy.check(s);
        if let Ok(fp) = s.parse::<Fingerprint>() {
            let text = fp.to_string();
            assert!(text.starts_with("SHA256:") && text.len() == 71, "{text}");
            assert_eq!(text.parse::<Fingerprint>().ok(), Some(fp));
        }
    }
});
