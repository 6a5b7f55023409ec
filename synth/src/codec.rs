//! Segment codecs: xz (smallest; the original's choice) and zstd (fast).
//!
//! Every segment is compressed on its own so that a reader can decode any one of them. Decoding
//! is bounded: the caller states the exact decoded size recorded in the metadata, and a segment
//! that decodes to more or less is an error, whatever its own headers claim.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::sync::{Mutex, PoisonError};

/// Compression codec of an overlay's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// LZMA2 in an xz container (liblzma).
    Xz,
    /// Zstandard.
    Zstd,
}

impl Codec {
    /// Number recorded in the overlay header for metadata compressed with this codec.
    pub fn header_id(self) -> u32 {
        match self {
            Codec::Xz => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec with header number `id`, if any.
    pub fn from_header_id(id: u32) -> Option<Self> {
        match id {
            1 => Some(Codec::Xz),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Default compression level of the codec.
    pub fn default_level(self) -> u32 {
        match self {
            Codec::Xz => 9,
            Codec::Zstd => 19,
        }
    }

    /// Highest level the codec accepts.
    pub fn max_level(self) -> u32 {
        match self {
            Codec::Xz => 9,
            Codec::Zstd => 22,
        }
    }

    /// Name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Xz => "xz",
            Codec::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xz" => Ok(Codec::Xz),
            "zstd" => Ok(Codec::Zstd),
            other => Err(format!("unknown codec {other:?} (expected xz or zstd)")),
        }
    }
}

/// Codec errors.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The encoder failed.
    #[error("Compression with {codec} failed")]
    Compress {
        /// The codec.
        codec: &'static str,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The compressed bytes are malformed.
    #[error("Decompression with {codec} failed")]
    Decompress {
        /// The codec.
        codec: &'static str,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The decoded size differs from the one recorded.
    #[error("Segment decodes to {actual} bytes or more, expected {expected}")]
    Size {
        /// Size recorded in the metadata.
        expected: u64,
        /// Size found (capped at expected + 1).
        actual: u64,
    },
    /// Level out of range.
    #[error("Compression level {level} is out of range for {codec} (max {max})")]
    Level {
        /// The codec.
        codec: &'static str,
        /// The level asked for.
        level: u32,
        /// The highest level.
        max: u32,
    },
}

/// Memory the xz decoder may use; our encoder needs far less (dictionary ≤ segment size).
const XZ_DECODE_MEMLIMIT: u64 = 256 << 20;

/// Level from which xz also tries the x86 branch filter (BCJ) on every segment and keeps the
/// smaller result: guest memory and disks hold much x86 code, where BCJ saves a few percent.
/// The filter chain is recorded in the xz stream, so readers need nothing to know about it.
pub const XZ_TRY_X86_FROM_LEVEL: u32 = 9;

/// Segments up to this size are compressed both with and without BCJ, and the smaller kept.
/// A larger one is compressed once, with the filter that wins on a sample of it: the second
/// full compression doubled the time of an xz -9 overlay.
const XZ_X86_FULL_TRIAL_MAX: usize = 2 << 20;
/// The sample that decides BCJ for a larger segment: this many slices spread evenly over it.
const XZ_X86_SAMPLE_SLICES: usize = 8;
/// The length of each slice of that sample.
const XZ_X86_SAMPLE_SLICE: usize = 128 << 10;

fn xz_compress(level: u32, data: &[u8], x86: bool) -> Result<Vec<u8>, CodecError> {
    use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
    let err = |e: liblzma::stream::Error| CodecError::Compress {
        codec: "xz",
        source: std::io::Error::other(e),
    };
    let mut opts = LzmaOptions::new_preset(level).map_err(err)?;
    // A dictionary larger than the input buys nothing and costs memory on both sides.
    let dict = u32::try_from(data.len().next_power_of_two())
        .unwrap_or(u32::MAX)
        .clamp(4096, 64 << 20);
    opts.dict_size(dict);
    let mut filters = Filters::new();
    if x86 {
        filters.x86();
    }
    filters.lzma2(&opts);
    let stream = Stream::new_stream_encoder(&filters, Check::None).map_err(err)?;
    let mut out = Vec::with_capacity(data.len() / 2);
    let mut enc = liblzma::read::XzEncoder::new_stream(data, stream);
    enc.read_to_end(&mut out)
        .map_err(|source| CodecError::Compress {
            codec: "xz",
            source,
        })?;
    Ok(out)
}

/// [`XZ_X86_SAMPLE_SLICES`] slices of `data`, spread evenly from its start to its end, one
/// after the other (`data` is longer than all of them together).
fn xz_x86_sample(data: &[u8]) -> Vec<u8> {
    let last = data.len().saturating_sub(XZ_X86_SAMPLE_SLICE);
    let mut sample = Vec::with_capacity(XZ_X86_SAMPLE_SLICES * XZ_X86_SAMPLE_SLICE);
    for i in 0..XZ_X86_SAMPLE_SLICES {
        let start = last / (XZ_X86_SAMPLE_SLICES - 1) * i;
        sample.extend_from_slice(data.get(start..start + XZ_X86_SAMPLE_SLICE).unwrap_or(&[]));
    }
    sample
}

/// Compresses one segment (or the metadata) as one independently decodable stream.
pub fn compress(codec: Codec, level: u32, data: &[u8]) -> Result<Vec<u8>, CodecError> {
    if level > codec.max_level() {
        return Err(CodecError::Level {
            codec: codec.name(),
            level,
            max: codec.max_level(),
        });
    }
    match codec {
        Codec::Xz => {
            if level < XZ_TRY_X86_FROM_LEVEL {
                return xz_compress(level, data, false);
            }
            if data.len() > XZ_X86_FULL_TRIAL_MAX {
                let sample = xz_x86_sample(data);
                let x86 = xz_compress(level, &sample, true)?.len()
                    < xz_compress(level, &sample, false)?.len();
                return xz_compress(level, data, x86);
            }
            let plain = xz_compress(level, data, false)?;
            let x86 = xz_compress(level, data, true)?;
            Ok(if x86.len() < plain.len() { x86 } else { plain })
        }
        Codec::Zstd => {
            let level = i32::try_from(level).unwrap_or(19);
            zstd::bulk::compress(data, level).map_err(|source| CodecError::Compress {
                codec: "zstd",
                source,
            })
        }
    }
}

/// Decompresses one segment that must decode to exactly `expected` bytes.
///
/// zstd decodes in one pass into a buffer of exactly `expected` bytes, with a pooled decoder
/// context: a server decodes many small segments, and a fresh streaming decoder (window
/// buffers, copies through them) costs about as much as decoding 256 KiB.
pub fn decompress(codec: Codec, data: &[u8], expected: u64) -> Result<Vec<u8>, CodecError> {
    let out = match codec {
        Codec::Zstd => zstd_decompress_exact(data, expected)?,
        // The exact size is known and validated: one allocation, no regrowth.
        Codec::Xz => decode_stream(codec, data, expected, expected)?,
    };
    if out.len() as u64 != expected {
        return Err(CodecError::Size {
            expected,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

/// zstd decoder contexts not in use. A context is ~100 KiB to make; FUSE threads are many,
/// short-lived (one set per mount) and served round-robin, so a context per thread would be
/// made again and again on the first-read path. The pool holds at most as many as ever
/// decoded at once.
static ZSTD_DCTX_POOL: Mutex<Vec<zstd::bulk::Decompressor<'static>>> = Mutex::new(Vec::new());

/// One-pass zstd decoding of a frame that must decode to exactly `expected` bytes. The output
/// buffer is the bound: a frame that decodes to more fails inside zstd, never writes past it.
fn zstd_decompress_exact(data: &[u8], expected: u64) -> Result<Vec<u8>, CodecError> {
    let err = |source| CodecError::Decompress {
        codec: "zstd",
        source,
    };
    let cap = usize::try_from(expected).map_err(|_| CodecError::Size {
        expected,
        actual: 0,
    })?;
    // A frame that declares more than `expected` bytes is the wrong size, which says more
    // than zstd's "destination buffer is too small" would.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(data) {
        if declared > expected {
            return Err(CodecError::Size {
                expected,
                actual: declared,
            });
        }
    }
    let pooled = ZSTD_DCTX_POOL
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    let mut dctx = match pooled {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new().map_err(err)?,
    };
    let mut out = Vec::with_capacity(cap);
    let r = dctx.decompress_to_buffer(data, &mut out);
    ZSTD_DCTX_POOL
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(dctx);
    r.map_err(err)?;
    Ok(out)
}

/// Runs `codec`'s decoder once on a tiny stream, so that the first real decode does not pay
/// for faulting the decoder's code in or making its context (a server calls this at start,
/// before the first request).
pub fn warm_up(codec: Codec) -> Result<(), CodecError> {
    let sample = [0x5au8; 4096];
    let packed = compress(codec, 1, &sample)?;
    decompress(codec, &packed, sample.len() as u64).map(|_| ())
}

/// Decompresses a stream that may decode to at most `max` bytes; more is an error
/// ([`CodecError::Size`]), found while decoding: the output grows as the stream decodes, from
/// twice the input's size, so a stream that inflates far is stopped one byte past `max`
/// and never makes `max` bytes be allocated up front.
pub fn decompress_at_most(codec: Codec, data: &[u8], max: u64) -> Result<Vec<u8>, CodecError> {
    let initial = max.min((data.len() as u64).saturating_mul(2));
    decode_stream(codec, data, max, initial)
}

/// Decodes a stream into a buffer of `initial` bytes' capacity (grown as needed), stopping
/// with [`CodecError::Size`] one byte past `max`.
fn decode_stream(codec: Codec, data: &[u8], max: u64, initial: u64) -> Result<Vec<u8>, CodecError> {
    let cap = usize::try_from(initial.min(max)).map_err(|_| CodecError::Size {
        expected: max,
        actual: 0,
    })?;
    let out = match codec {
        Codec::Xz => {
            use liblzma::stream::Stream;
            let stream = Stream::new_stream_decoder(XZ_DECODE_MEMLIMIT, 0).map_err(|e| {
                CodecError::Decompress {
                    codec: "xz",
                    source: std::io::Error::other(e),
                }
            })?;
            let mut out = Vec::with_capacity(cap);
            let dec = liblzma::read::XzDecoder::new_stream(data, stream);
            dec.take(max.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|source| CodecError::Decompress {
                    codec: "xz",
                    source,
                })?;
            out
        }
        Codec::Zstd => {
            let err = |source| CodecError::Decompress {
                codec: "zstd",
                source,
            };
            let mut out = Vec::with_capacity(cap);
            let dec = zstd::stream::read::Decoder::with_buffer(data).map_err(err)?;
            // Reading one byte past the limit makes an oversized frame a size error.
            dec.take(max.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(err)?;
            out
        }
    };
    if out.len() as u64 > max {
        return Err(CodecError::Size {
            expected: max,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .map(|i| (i % 251).to_le_bytes()[0] ^ (i / 1000).to_le_bytes()[0])
            .collect()
    }

    #[test]
    fn xz_round_trips() {
        let d = sample();
        let c = compress(Codec::Xz, 6, &d).unwrap();
        assert!(c.len() < d.len());
        assert_eq!(decompress(Codec::Xz, &c, d.len() as u64).unwrap(), d);
    }

    /// Bytes shaped like x86 code for BCJ: a `call rel32` every 16 bytes to one of a few
    /// functions, so the relative operands all differ while the absolute targets repeat.
    fn calls(len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        for (n, pos) in (0..len.saturating_sub(16)).step_by(16).enumerate() {
            let target = [0x1000u32, 0x2345, 0x7777, 0xabcd][n % 4];
            // x86's rel32 wraps: the operand is the target minus the next instruction's address.
            let rel = target.wrapping_sub(u32::try_from(pos + 5).unwrap());
            d[pos] = 0xe8;
            d[pos + 1..pos + 5].copy_from_slice(&rel.to_le_bytes());
            d[pos + 5..pos + 16].copy_from_slice(b"\x48\x89\xc7\x31\xc0\x90\x90\x90\x90\x90\x90");
        }
        d
    }

    /// Whether an xz stream's first block was written with the x86 filter (BCJ): the block
    /// header after the 12-byte stream header lists its filters, x86 (id 0x04) first.
    fn uses_x86(xz: &[u8]) -> bool {
        xz.get(13).is_some_and(|flags| flags & 3 == 1) && xz.get(14) == Some(&0x04)
    }

    #[test]
    fn xz_keeps_bcj_where_it_pays_small_and_large_segments() {
        for len in [1 << 20, 6 << 20] {
            let code = calls(len);
            let c = compress(Codec::Xz, 9, &code).unwrap();
            assert!(uses_x86(&c), "{len} bytes of calls without BCJ");
            assert_eq!(decompress(Codec::Xz, &c, len as u64).unwrap(), code);
            assert!(c.len() < xz_compress(9, &code, false).unwrap().len());
            let text: Vec<u8> = b"no calls in here, only text. ".repeat(len / 29 + 1)[..len].into();
            let c = compress(Codec::Xz, 9, &text).unwrap();
            assert!(!uses_x86(&c), "{len} bytes of text with BCJ");
            assert_eq!(decompress(Codec::Xz, &c, len as u64).unwrap(), text);
        }
        // Below the BCJ level, never.
        assert!(!uses_x86(&compress(Codec::Xz, 6, &calls(1 << 20)).unwrap()));
    }

    #[test]
    fn zstd_round_trips() {
        let d = sample();
        let c = compress(Codec::Zstd, 3, &d).unwrap();
        assert_eq!(decompress(Codec::Zstd, &c, d.len() as u64).unwrap(), d);
    }

    #[test]
    fn decompress_wrong_expected_size_is_refused() {
        let d = sample();
        for codec in [Codec::Xz, Codec::Zstd] {
            let c = compress(codec, 1, &d).unwrap();
            assert!(matches!(
                decompress(codec, &c, d.len() as u64 - 1),
                Err(CodecError::Size { .. }) | Err(CodecError::Decompress { .. })
            ));
            assert!(matches!(
                decompress(codec, &c, d.len() as u64 + 1),
                Err(CodecError::Size { .. })
            ));
        }
    }

    #[test]
    fn warm_up_then_pooled_context_survives_errors() {
        for codec in [Codec::Xz, Codec::Zstd] {
            warm_up(codec).unwrap();
        }
        let d = sample();
        let c = compress(Codec::Zstd, 3, &d).unwrap();
        // Garbage and an oversized frame fail; the context they used goes back to the pool
        // and decodes the next segment right.
        for _ in 0..3 {
            assert!(decompress(Codec::Zstd, b"garbage garbage garbage", 100).is_err());
            assert!(decompress(Codec::Zstd, &c, d.len() as u64 - 1).is_err());
            assert_eq!(decompress(Codec::Zstd, &c, d.len() as u64).unwrap(), d);
        }
    }

    #[test]
    fn decompress_garbage_is_refused() {
        for codec in [Codec::Xz, Codec::Zstd] {
            assert!(decompress(codec, b"not a compressed stream at all", 10).is_err());
        }
    }

    #[test]
    fn compress_is_deterministic() {
        let d = sample();
        assert_eq!(
            compress(Codec::Xz, 9, &d).unwrap(),
            compress(Codec::Xz, 9, &d).unwrap()
        );
    }
}
