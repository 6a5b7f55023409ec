//! Framing: a `u32` little-endian payload length, then a bincode 2 payload.
//!
//! The length is checked against the caller's limit before a single byte of payload is read or
//! allocated, so a hostile 4 GiB length costs four bytes of reading. Partial reads are
//! completed; an end of stream between frames is [`ProtoError::Closed`], inside one
//! [`ProtoError::Truncated`]; a timed-out read is [`ProtoError::Timeout`]. Decoding is bounded by
//! the same limit, so no field can claim more memory than the frame holds.
//!
//! Read timeouts are the caller's: set them on the socket, or use [`read_msg_before`], which
//! bounds a whole frame by a deadline so that a peer trickling one byte a second is cut off.

use super::{ProtoError, FRAME_MAX, HANDSHAKE_FRAME_MAX};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

/// Where a read stands when it fails: decides between `Closed`, `Truncated` and the kind of
/// `Timeout`.
struct Progress {
    /// Bytes of the frame read before this buffer.
    before: u64,
    /// Bytes the frame has in all (prefix included), when known.
    expected: u64,
}

fn fill(r: &mut impl Read, buf: &mut [u8], p: &Progress) -> Result<(), ProtoError> {
    let mut filled = 0usize;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                let got = p.before + filled as u64;
                return Err(if got == 0 {
                    ProtoError::Closed
                } else {
                    ProtoError::Truncated {
                        expected: p.expected,
                        got,
                    }
                });
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ProtoError::Timeout {
                    mid_frame: p.before + filled as u64 > 0,
                });
            }
            Err(e) => return Err(ProtoError::Read(e)),
        }
    }
    Ok(())
}

/// Reads one frame's payload, refusing lengths of zero or above `limit` before reading them.
pub fn read_frame(r: &mut impl Read, limit: u32) -> Result<Vec<u8>, ProtoError> {
    let mut prefix = [0u8; 4];
    fill(
        r,
        &mut prefix,
        &Progress {
            before: 0,
            expected: 4,
        },
    )?;
    let len = u32::from_le_bytes(prefix);
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if len > limit {
        return Err(ProtoError::FrameTooLarge {
            len: u64::from(len),
            limit,
        });
    }
    let n = usize::try_from(len).map_err(|_| ProtoError::FrameTooLarge {
        len: u64::from(len),
        limit,
    })?;
    let mut payload = vec![0u8; n];
    fill(
        r,
        &mut payload,
        &Progress {
            before: 4,
            expected: 4 + u64::from(len),
        },
    )?;
    Ok(payload)
}

fn decode_limited<T: DeserializeOwned, const N: usize>(payload: &[u8]) -> Result<T, ProtoError> {
    let config = bincode::config::standard().with_limit::<N>();
    let (msg, used): (T, usize) = bincode::serde::decode_from_slice(payload, config)
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(ProtoError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

const HANDSHAKE_LIMIT: usize = 64 << 10;
const FRAME_LIMIT: usize = 16 << 20;
const _: () = assert!(HANDSHAKE_LIMIT as u64 == HANDSHAKE_FRAME_MAX as u64);
const _: () = assert!(FRAME_LIMIT as u64 == FRAME_MAX as u64);

/// Decodes one payload. No field may claim more memory than `limit` (rounded up to
/// [`HANDSHAKE_FRAME_MAX`] or [`FRAME_MAX`]) and the whole payload must be used.
pub fn decode_msg<T: DeserializeOwned>(payload: &[u8], limit: u32) -> Result<T, ProtoError> {
    if payload.len() as u64 > u64::from(limit.min(FRAME_MAX)) {
        return Err(ProtoError::FrameTooLarge {
            len: payload.len() as u64,
            limit: limit.min(FRAME_MAX),
        });
    }
    if limit <= HANDSHAKE_FRAME_MAX {
        decode_limited::<T, HANDSHAKE_LIMIT>(payload)
    } else {
        decode_limited::<T, FRAME_LIMIT>(payload)
    }
}

/// Encodes one message as a whole frame (prefix + payload), refusing payloads above `limit`.
pub fn encode_msg<T: Serialize>(msg: &T, limit: u32) -> Result<Vec<u8>, ProtoError> {
    let config = bincode::config::standard();
    let payload = bincode::serde::encode_to_vec(msg, config)
        .map_err(|e| ProtoError::Encode(e.to_string()))?;
    let too_large = || ProtoError::FrameTooLarge {
        len: payload.len() as u64,
        limit,
    };
    let len = u32::try_from(payload.len()).map_err(|_| too_large())?;
    if len > limit || len == 0 {
        return Err(too_large());
    }
    let mut frame = Vec::with_capacity(payload.len() + 4);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads and decodes one message of at most `limit` payload bytes.
pub fn read_msg<T: DeserializeOwned>(r: &mut impl Read, limit: u32) -> Result<T, ProtoError> {
    let payload = read_frame(r, limit)?;
    decode_msg(&payload, limit)
}

/// Encodes and writes one message as a single write (call `set_nodelay` on TCP sockets).
pub fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T, limit: u32) -> Result<(), ProtoError> {
    let frame = encode_msg(msg, limit)?;
    w.write_all(&frame).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ProtoError::Timeout { mid_frame: true },
        _ => ProtoError::Write(e),
    })?;
    w.flush().map_err(ProtoError::Write)
}

/// A stream whose reads can be given a timeout (TCP and Unix sockets).
pub trait TimeoutStream {
    /// Sets the timeout of every following read; `None` blocks forever.
    fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl TimeoutStream for std::net::TcpStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl TimeoutStream for std::os::unix::net::UnixStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// Reads of `S` that fail with `TimedOut` once `deadline` has passed.
struct DeadlineReader<'a, S> {
    stream: &'a S,
    deadline: Instant,
}

impl<S> Read for DeadlineReader<'_, S>
where
    S: TimeoutStream,
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Reads one message that must be complete by `deadline`, however slowly its bytes arrive.
/// Leaves the stream's read timeout set to whatever remained at the last read.
pub fn read_msg_before<T, S>(stream: &S, limit: u32, deadline: Instant) -> Result<T, ProtoError>
where
    T: DeserializeOwned,
    S: TimeoutStream,
    for<'b> &'b S: Read,
{
    let payload = read_frame_before(stream, limit, deadline)?;
    decode_msg(&payload, limit)
}

/// [`read_frame`] bounded by a deadline, as in [`read_msg_before`].
pub fn read_frame_before<S>(
    stream: &S,
    limit: u32,
    deadline: Instant,
) -> Result<Vec<u8>, ProtoError>
where
    S: TimeoutStream,
    for<'b> &'b S: Read,
{
    let mut r = DeadlineReader { stream, deadline };
    read_frame(&mut r, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientMsg, ServerMsg};
    use std::io::Cursor;

    #[test]
    fn read_frame_huge_length_refused_before_reading() {
        let mut r = Cursor::new(u32::MAX.to_le_bytes().to_vec());
        let e = read_frame(&mut r, FRAME_MAX).unwrap_err();
        assert!(matches!(e, ProtoError::FrameTooLarge { len, .. } if len == u64::from(u32::MAX)));
    }

    #[test]
    fn read_frame_partial_prefix_is_truncated() {
        let mut r = Cursor::new(vec![5u8, 0]);
        let e = read_frame(&mut r, FRAME_MAX).unwrap_err();
        assert!(matches!(
            e,
            ProtoError::Truncated {
                expected: 4,
                got: 2
            }
        ));
    }

    #[test]
    fn read_frame_empty_stream_is_closed() {
        let mut r = Cursor::new(Vec::new());
        assert!(matches!(
            read_frame(&mut r, FRAME_MAX),
            Err(ProtoError::Closed)
        ));
    }

    #[test]
    fn message_roundtrip_both_directions_equal() {
        let c = ClientMsg::Segment {
            index: 7,
            offset: 9,
            bytes: vec![1, 2, 3],
        };
        let frame = encode_msg(&c, FRAME_MAX).unwrap();
        let back: ClientMsg = read_msg(&mut Cursor::new(frame), FRAME_MAX).unwrap();
        assert_eq!(back, c);
        let s = ServerMsg::NeedSegment { index: 3 };
        let frame = encode_msg(&s, FRAME_MAX).unwrap();
        let back: ServerMsg = read_msg(&mut Cursor::new(frame), FRAME_MAX).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn decode_claimed_byte_length_past_limit_refused() {
        // Variant 3 (Segment), index 0, offset 0, then a byte length of 2^40 in varint form.
        let mut payload = vec![3u8, 0, 0, 253];
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            decode_msg::<ClientMsg>(&payload, FRAME_MAX),
            Err(ProtoError::Decode(_))
        ));
    }

    #[test]
    fn encode_over_limit_refused() {
        let c = ClientMsg::Head {
            offset: 0,
            bytes: vec![0; 100],
        };
        assert!(matches!(
            encode_msg(&c, 50),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }
}
