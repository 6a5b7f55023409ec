//! The VM overlay file format: bytes on disk, and nothing that moves them.
//!
//! # Layout
//!
//! All integers are little-endian. Metadata comes first so that one range read (header, then
//! `metadata_len` bytes) tells a reader everything; every segment is then addressable by byte
//! range, which is how cloudletfs fetches them over HTTP.
//!
//! | offset            | size           | field                                                   |
//! |-------------------|----------------|---------------------------------------------------------|
//! | 0                 | 8              | magic `b"CLDOVL\r\n"`                                   |
//! | 8                 | 4              | format version (`2`)                                    |
//! | 12                | 4              | metadata codec: 0 none, 1 xz, 2 zstd                    |
//! | 16                | 8              | `metadata_len`: stored (compressed) metadata length     |
//! | 24                | 8              | `file_len`: total length of the overlay file            |
//! | 32                | 32             | SHA-256 of the stored metadata bytes                    |
//! | 64                | `metadata_len` | [`Metadata`], compact form (see `wire.rs`), bincode 2, compressed |
//! | 64+`metadata_len` | …              | segment area: segments back to back, in table order     |
//!
//! [`Metadata`] (the *head*: what must arrive before a VM can resume) holds the base id, image
//! sizes, chunk size, codec, the device-state blob, one [`ImageMap`] per image (every chunk that
//! differs from the base, sorted by chunk number) and the segment table (each segment's range,
//! SHA-256 and chunk list). The SHA-256 of a reconstructed chunk is in the head only for chunks
//! rebuilt without a segment (zero chunks and references into the base); a payload chunk's
//! digest travels in its segment, and a self reference's is that of the payload chunk it refers
//! to (the two chunks are equal).
//!
//! A segment decodes (after decompression) to:
//!
//! | offset            | size           | field                                                   |
//! |-------------------|----------------|---------------------------------------------------------|
//! | 0                 | 4096 × n       | the payloads of its n chunks, in the order of its chunk list (raw, or XOR'd against the base chunk at the same offset) |
//! | 4096 × n          | 32 × n         | the SHA-256 of each of those chunks once reconstructed, in the same order |
//!
//! so its decoded length is n × 4128 ([`segment_raw_len`]), and the segment's SHA-256 in the
//! head, checked on every segment read, covers the chunk digests too: nothing is served
//! unverified. A [`ChunkSource::Payload`] names its segment and its payload's offset inside the
//! decoded segment; [`segment_chunk`] finds a payload and its digest.
//!
//! Metadata is compressed with the overlay's codec (default level) as one stream: what it holds
//! (chunk numbers, sources, segment lists) compresses well; what does not compress, the
//! per-chunk digests of the payloads, is left to the segments (version 2; version 1 held every
//! chunk's digest in the head, and is refused).
//!
//! Readers ([`Overlay::open`]) validate everything before any chunk is served: magic, version,
//! metadata codec, lengths, the metadata digest, the decoded metadata's size against its stored
//! size (checked while decoding: [`metadata_decode_limit`]), chunk numbers inside their image,
//! payload positions inside their segment, segment ranges inside the file (and no longer than
//! their decoded size can compress to), decoded segment sizes that match their chunk lists
//! (payloads and digests), a digest in the head for exactly the chunks that are rebuilt without
//! a segment, self references that point at a payload chunk (so
//! references resolve in one step and cannot form cycles). [`Overlay::check_base`] then checks
//! the overlay against its base ([`BaseLimits`]): the base id, the memory size (the base's
//! exactly), the disk size (at most the base's plus the operator's allowed growth) and every
//! reference into the base.
//! Segment digests (and decoded lengths) are checked on every segment read, chunk digests on
//! every chunk served.

mod reader;
mod wire;
mod writer;

pub use reader::{validate, BaseLimits, FormatError, Overlay};
pub use writer::{encode_head, OverlayWriter, WriteError};

use crate::chunk::{Digest, ImageKind, CHUNK_SIZE, CHUNK_SIZE_U64};
use crate::codec::Codec;
use serde::{Deserialize, Serialize};

/// Magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"CLDOVL\r\n";
/// The format version this code writes and reads. Version 1 (every chunk's digest in the head)
/// is refused.
pub const VERSION: u32 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: u64 = 64;
/// Largest metadata a reader accepts (a fully changed 16 GiB VM needs about 200 MiB).
pub const MAX_METADATA_LEN: u64 = 1 << 30;
/// Largest payload (chunks × 4096) a segment may hold.
pub const MAX_SEGMENT_PAYLOAD_LEN: u64 = 256 << 20;
/// Largest decoded segment a reader accepts: [`MAX_SEGMENT_PAYLOAD_LEN`] of payloads and their
/// digests.
pub const MAX_SEGMENT_RAW_LEN: u64 = MAX_SEGMENT_PAYLOAD_LEN / CHUNK_SIZE_U64 * SEGMENT_ENTRY_LEN;
/// Length of a chunk digest in a segment's digest trailer.
pub const DIGEST_LEN: usize = 32;
/// Decoded bytes a segment spends on each of its chunks: the payload and its digest.
pub const SEGMENT_ENTRY_LEN: u64 = CHUNK_SIZE_U64 + DIGEST_LEN as u64;
/// Largest image a reader accepts (16 TiB); an overlay is then bound to its base's sizes
/// ([`Overlay::check_base`]).
pub const MAX_IMAGE_SIZE: u64 = 16 << 40;
/// Largest device-state blob a reader accepts.
pub const MAX_DEVICE_STATE_LEN: u64 = 256 << 20;
/// Largest decoded metadata a reader accepts, however well it compresses.
pub const MAX_METADATA_DECODED_LEN: u64 = 1 << 30;
/// Largest ratio of decoded to stored metadata a reader accepts past
/// [`METADATA_DECODED_FLOOR`] (see [`metadata_decode_limit`]). Measured (2026-12-03): 0.9 to
/// 1.8 for overlays of changed, copied and repeated chunks (the golden overlay, the test
/// overlays, 8000 mixed changes); about 100 for an overlay whose every memory chunk was zeroed
/// (zero entries share their digest). Only a long run of identical entries (a contiguous
/// zeroed region) compresses further, thousands of times, like a bomb; the floor covers it.
pub const MAX_METADATA_RATIO: u64 = 256;
/// Decoded metadata a reader accepts whatever its stored length: 64 MiB, the metadata of a
/// contiguous zeroed region of about 8 GiB (34 bytes an entry), which compresses as well as
/// zeros do. A bomb costs a reader at most this much before it is refused.
pub const METADATA_DECODED_FLOOR: u64 = 64 << 20;

/// The most bytes a reader lets metadata of `stored` compressed bytes decode to: at most
/// [`MAX_METADATA_RATIO`] times as many (and never less than [`METADATA_DECODED_FLOOR`]),
/// and never more than [`MAX_METADATA_DECODED_LEN`]. A decompression bomb (a few KiB of
/// stream that inflates to gigabytes) is stopped while decoding, one byte past this.
pub fn metadata_decode_limit(stored: u64) -> u64 {
    stored
        .saturating_mul(MAX_METADATA_RATIO)
        .clamp(METADATA_DECODED_FLOOR, MAX_METADATA_DECODED_LEN)
}

/// The longest a segment of `raw` decoded bytes can be once compressed: incompressible bytes
/// grow a little in either codec (zstd's bound is `raw + raw/256 + 64`; xz stores them in
/// 64 KiB LZMA2 chunks with 3 bytes of header each, plus about 60 bytes of stream framing).
/// A segment table entry longer than this is refused: it would make a reader fetch and hold
/// bytes no real segment has.
pub fn segment_length_bound(raw: u64) -> u64 {
    raw.saturating_add(raw / 128).saturating_add(4096)
}

/// Decoded length of a segment of `chunks` chunks (payloads, then their digests); `None` if it
/// overflows.
pub fn segment_raw_len(chunks: u64) -> Option<u64> {
    chunks.checked_mul(SEGMENT_ENTRY_LEN)
}

/// The payload at position `pos` of a decoded segment of `chunks` chunks, and the SHA-256 the
/// chunk must have once reconstructed; `None` if `decoded` is not that long or `pos` is past
/// the end. `decoded` must have been read through [`Overlay`], which checks the segment's
/// SHA-256 and decoded length.
pub fn segment_chunk(decoded: &[u8], chunks: usize, pos: usize) -> Option<(&[u8], Digest)> {
    if pos >= chunks {
        return None;
    }
    let payload_start = pos.checked_mul(CHUNK_SIZE)?;
    let payload = decoded.get(payload_start..payload_start.checked_add(CHUNK_SIZE)?)?;
    let digest_start = chunks
        .checked_mul(CHUNK_SIZE)?
        .checked_add(pos.checked_mul(DIGEST_LEN)?)?;
    let digest = decoded.get(digest_start..digest_start.checked_add(DIGEST_LEN)?)?;
    Some((payload, Digest::try_from(digest).ok()?))
}

/// How a chunk of the custom VM is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkSource {
    /// All zeros.
    Zero,
    /// Equal to chunk N of the base disk.
    BaseDisk(u64),
    /// Equal to chunk N of the base memory.
    BaseMemory(u64),
    /// Equal to a payload chunk of this overlay (disk or memory).
    SelfRef {
        /// Image of the referenced chunk.
        image: ImageKind,
        /// Chunk number of the referenced chunk.
        chunk: u64,
    },
    /// Stored in a segment.
    Payload {
        /// Segment index.
        segment: u32,
        /// Byte offset inside the decoded segment (a multiple of the chunk size).
        offset: u32,
        /// Whether the payload is XOR'd with the base chunk at the same offset.
        xor: bool,
    },
}

/// One chunk that differs from the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Chunk number inside the image.
    pub chunk: u64,
    /// Where its bytes come from.
    pub source: ChunkSource,
    /// SHA-256 of the reconstructed (zero-padded) chunk, for a chunk rebuilt without a segment
    /// (zero, base reference); `None` for a payload chunk or a self reference, whose digest is
    /// in the payload's segment (see the module doc).
    pub digest: Option<Digest>,
}

/// The changed chunks of one image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMap {
    /// Size of the custom image in bytes.
    pub size: u64,
    /// Changed chunks, sorted by chunk number, no duplicates.
    pub chunks: Vec<ChunkEntry>,
}

impl ImageMap {
    /// Finds the entry of chunk `chunk`.
    pub fn find(&self, chunk: u64) -> Option<&ChunkEntry> {
        self.chunks
            .binary_search_by_key(&chunk, |e| e.chunk)
            .ok()
            .map(|i| &self.chunks[i])
    }
}

/// One independently decompressible segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Byte offset from the start of the segment area (`64 + metadata_len`).
    pub offset: u64,
    /// Compressed length.
    pub length: u64,
    /// Decoded length: [`segment_raw_len`] of its chunk count (payloads, then digests).
    pub raw_length: u64,
    /// SHA-256 of the compressed bytes.
    pub digest: Digest,
    /// Chunks stored inside, in payload order.
    pub chunks: Vec<(ImageKind, u64)>,
}

/// Everything about an overlay except the segment bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Id of the base VM this overlay applies to.
    pub base_id: Digest,
    /// Chunk size (always 4096).
    pub chunk_size: u32,
    /// Segment codec.
    pub codec: Codec,
    /// Device state of the custom VM (a QEMU migration stream without RAM), or empty.
    pub device_state: Vec<u8>,
    /// Changed disk chunks.
    pub disk: ImageMap,
    /// Changed memory chunks.
    pub memory: ImageMap,
    /// Segment table, in file order.
    pub segments: Vec<SegmentEntry>,
}

impl Metadata {
    /// The map of one image.
    pub fn image(&self, kind: ImageKind) -> &ImageMap {
        match kind {
            ImageKind::Disk => &self.disk,
            ImageKind::Memory => &self.memory,
        }
    }
}

/// Counts of chunks per class, for `info-overlay`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    /// All-zero chunks.
    pub zero: u64,
    /// References to the base disk.
    pub base_disk: u64,
    /// References to the base memory.
    pub base_memory: u64,
    /// References to another chunk of the overlay.
    pub self_ref: u64,
    /// Payloads XOR'd against the base.
    pub xor: u64,
    /// Raw payloads.
    pub raw: u64,
}

impl ClassCounts {
    /// Counts the classes of one image map.
    pub fn of(map: &ImageMap) -> Self {
        let mut c = ClassCounts::default();
        for e in &map.chunks {
            match e.source {
                ChunkSource::Zero => c.zero += 1,
                ChunkSource::BaseDisk(_) => c.base_disk += 1,
                ChunkSource::BaseMemory(_) => c.base_memory += 1,
                ChunkSource::SelfRef { .. } => c.self_ref += 1,
                ChunkSource::Payload { xor: true, .. } => c.xor += 1,
                ChunkSource::Payload { xor: false, .. } => c.raw += 1,
            }
        }
        c
    }

    /// Total chunks counted.
    pub fn total(&self) -> u64 {
        self.zero + self.base_disk + self.base_memory + self.self_ref + self.xor + self.raw
    }
}

/// bincode configuration used for metadata.
pub(crate) fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{sha256, xor_into, ZERO_CHUNK_DIGEST};
    use crate::resolve::{BaseReader, ResolveError, Resolver};
    use crate::source::ByteSource;
    use std::sync::Arc;

    /// Base images in memory: disk chunk i filled with `b'a' + i`, one memory chunk of `b'm'`.
    struct TestBase {
        disk: Vec<u8>,
        memory: Vec<u8>,
    }

    impl BaseReader for TestBase {
        fn read_chunk(&self, image: ImageKind, chunk: u64, out: &mut [u8]) -> std::io::Result<()> {
            let src = match image {
                ImageKind::Disk => &self.disk,
                ImageKind::Memory => &self.memory,
            };
            let start = usize::try_from(chunk).unwrap() * CHUNK_SIZE;
            out.copy_from_slice(&src[start..start + CHUNK_SIZE]);
            Ok(())
        }
    }

    /// A tiny overlay built by hand: its metadata, the decoded bytes of its one segment, the
    /// base and the custom disk it rebuilds.
    struct Tiny {
        meta: Metadata,
        decoded: Vec<u8>,
        base: TestBase,
        custom: Vec<Vec<u8>>,
    }

    /// Custom disk chunks: 0 new bytes (raw payload), 1 base chunk 1 with one byte changed
    /// (XOR payload), 2 zeros, 3 a copy of chunk 0 (self reference), 4 the base memory chunk.
    fn tiny() -> Tiny {
        let base = TestBase {
            disk: (0..5u8).flat_map(|i| [b'a' + i; CHUNK_SIZE]).collect(),
            memory: vec![b'm'; CHUNK_SIZE],
        };
        let fresh: Vec<u8> = (0..CHUNK_SIZE)
            .map(|i| (i * 7 % 251).to_le_bytes()[0])
            .collect();
        let mut changed = base.disk[CHUNK_SIZE..2 * CHUNK_SIZE].to_vec();
        changed[100] = 0;
        let custom = vec![
            fresh.clone(),
            changed.clone(),
            vec![0; CHUNK_SIZE],
            fresh.clone(),
            base.memory.clone(),
        ];
        let mut xored = changed.clone();
        xor_into(&mut xored, &base.disk[CHUNK_SIZE..2 * CHUNK_SIZE]);
        let decoded = [fresh.as_slice(), &xored, &sha256(&fresh), &sha256(&changed)].concat();
        let entry = |chunk, source, digest| ChunkEntry {
            chunk,
            source,
            digest,
        };
        let payload = |offset, xor| ChunkSource::Payload {
            segment: 0,
            offset,
            xor,
        };
        let meta = Metadata {
            base_id: [7; 32],
            chunk_size: 4096,
            codec: Codec::Zstd,
            device_state: b"device".to_vec(),
            disk: ImageMap {
                size: 5 * CHUNK_SIZE_U64,
                chunks: vec![
                    entry(0, payload(0, false), None),
                    entry(1, payload(4096, true), None),
                    entry(2, ChunkSource::Zero, Some(ZERO_CHUNK_DIGEST)),
                    entry(
                        3,
                        ChunkSource::SelfRef {
                            image: ImageKind::Disk,
                            chunk: 0,
                        },
                        None,
                    ),
                    entry(4, ChunkSource::BaseMemory(0), Some(sha256(&base.memory))),
                ],
            },
            memory: ImageMap {
                size: CHUNK_SIZE_U64,
                chunks: Vec::new(),
            },
            segments: Vec::new(),
        };
        Tiny {
            meta,
            decoded,
            base,
            custom,
        }
    }

    /// The overlay file of `meta` with one segment decoding to `decoded`; its head records
    /// `head_digest_of`'s SHA-256 (the stored segment's own, if `None`).
    fn file(meta: &Metadata, decoded: &[u8], head_digest_of: Option<&[u8]>) -> Vec<u8> {
        let stored = crate::codec::compress(Codec::Zstd, 3, decoded).unwrap();
        let chunks = meta
            .disk
            .chunks
            .iter()
            .filter(|e| matches!(e.source, ChunkSource::Payload { .. }))
            .map(|e| (ImageKind::Disk, e.chunk))
            .collect::<Vec<_>>();
        let mut meta = meta.clone();
        meta.segments = vec![SegmentEntry {
            offset: 0,
            length: stored.len() as u64,
            raw_length: segment_raw_len(chunks.len() as u64).unwrap(),
            digest: sha256(head_digest_of.unwrap_or(&stored)),
            chunks,
        }];
        let mut bytes = encode_head(&meta, stored.len() as u64).unwrap();
        bytes.extend_from_slice(&stored);
        bytes
    }

    fn open(bytes: Vec<u8>) -> Overlay {
        Overlay::open(Arc::new(bytes) as Arc<dyn ByteSource>).unwrap()
    }

    /// Rebuilds disk chunk `chunk` of `ov` from its decoded segment `decoded`.
    fn rebuild(
        ov: &Overlay,
        base: &TestBase,
        decoded: &[u8],
        chunk: u64,
    ) -> Result<Vec<u8>, ResolveError> {
        let meta = ov.metadata();
        let entry = meta.disk.find(chunk).unwrap();
        let mut out = vec![0; CHUNK_SIZE];
        Resolver::new(meta, base).resolve(ImageKind::Disk, entry, Some(decoded), &mut out)?;
        Ok(out)
    }

    #[test]
    fn segment_of_payloads_then_digests_round_trips() {
        let t = tiny();
        let ov = open(file(&t.meta, &t.decoded, None));

        let decoded = ov.read_segment(0).unwrap();

        assert_eq!(decoded.len() as u64, 2 * SEGMENT_ENTRY_LEN);
        assert_eq!(ov.metadata().disk, t.meta.disk);
        for (chunk, want) in t.custom.iter().enumerate() {
            assert_eq!(
                &rebuild(&ov, &t.base, &decoded, chunk as u64).unwrap(),
                want
            );
        }
    }

    #[test]
    fn head_holds_digests_only_of_chunks_rebuilt_without_a_segment() {
        let t = tiny();
        let digests_in_head = |payloads_carry: bool| {
            let mut meta = t.meta.clone();
            if payloads_carry {
                for e in &mut meta.disk.chunks {
                    e.digest.get_or_insert([0x55; 32]);
                }
            }
            meta
        };

        let err = encode_head(&digests_in_head(true), 0).unwrap_err();

        assert!(
            matches!(err, WriteError::MisplacedDigest { chunk: 0, .. }),
            "{err}"
        );
        assert!(encode_head(&digests_in_head(false), 0).is_ok());
    }

    #[test]
    fn validate_misplaced_digest_is_refused() {
        let t = tiny();
        let bytes = file(&t.meta, &t.decoded, None);
        let ov = open(bytes.clone());
        let data_len = bytes.len() as u64 - ov.data_start();
        let mut with_payload_digest = ov.metadata().clone();
        with_payload_digest.disk.chunks[0].digest = Some([0; 32]);
        let mut zero_without_digest = ov.metadata().clone();
        zero_without_digest.disk.chunks[2].digest = None;

        let errs = [
            validate(&with_payload_digest, data_len).unwrap_err(),
            validate(&zero_without_digest, data_len).unwrap_err(),
        ];

        assert!(
            matches!(errs[0], FormatError::MisplacedDigest { chunk: 0, .. }),
            "{}",
            errs[0]
        );
        assert!(
            matches!(errs[1], FormatError::MisplacedDigest { chunk: 2, .. }),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn segment_with_tampered_digest_trailer_is_refused_by_the_segment_sha256() {
        let t = tiny();
        let good = crate::codec::compress(Codec::Zstd, 3, &t.decoded).unwrap();
        let mut tampered = t.decoded.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let ov = open(file(&t.meta, &tampered, Some(&good)));

        let err = ov.read_segment(0).unwrap_err();

        assert!(
            matches!(err, FormatError::SegmentDigest { segment: 0 }),
            "{err}"
        );
    }

    #[test]
    fn chunk_whose_trailer_digest_differs_is_refused_with_its_self_references() {
        // A head that pins the tampered segment (another overlay id) still serves nothing
        // unverified: the payload and the self reference to it fail their digest.
        let t = tiny();
        let mut tampered = t.decoded.clone();
        tampered[2 * CHUNK_SIZE] ^= 1;
        let ov = open(file(&t.meta, &tampered, None));
        let decoded = ov.read_segment(0).unwrap();

        let errs = [0, 3].map(|c| rebuild(&ov, &t.base, &decoded, c).unwrap_err());

        for (err, chunk) in errs.iter().zip([0, 3]) {
            assert!(
                matches!(err, ResolveError::Format(FormatError::ChunkDigest { chunk: c, .. }) if *c == chunk),
                "{err}"
            );
        }
        assert_eq!(rebuild(&ov, &t.base, &decoded, 1).unwrap(), t.custom[1]);
    }

    #[test]
    fn segment_whose_trailer_length_mismatches_is_refused() {
        let t = tiny();
        let short = &t.decoded[..t.decoded.len() - DIGEST_LEN];
        let long = [t.decoded.as_slice(), &[0; DIGEST_LEN]].concat();
        let expected = 2 * SEGMENT_ENTRY_LEN;

        let errs =
            [short, &long].map(|d| open(file(&t.meta, d, None)).read_segment(0).unwrap_err());

        assert!(
            matches!(errs[0], FormatError::SegmentLength { segment: 0, expected: e, actual } if e == expected && actual == expected - 32),
            "{}",
            errs[0]
        );
        assert!(
            matches!(errs[1], FormatError::SegmentLength { segment: 0, expected: e, actual } if e == expected && actual > expected),
            "{}",
            errs[1]
        );
        assert!(
            errs[0].to_string().contains("payloads and digests"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn segment_chunk_finds_payload_and_digest_and_bounds_the_rest() {
        let t = tiny();

        let (payload, digest) = segment_chunk(&t.decoded, 2, 1).unwrap();

        assert_eq!(payload, &t.decoded[CHUNK_SIZE..2 * CHUNK_SIZE]);
        assert_eq!(digest, sha256(&t.custom[1]));
        assert!(segment_chunk(&t.decoded, 2, 2).is_none());
        assert!(segment_chunk(&t.decoded[..t.decoded.len() - 1], 2, 1).is_none());
        assert!(segment_chunk(&t.decoded, usize::MAX, 0).is_none());
    }

    #[test]
    fn open_version_1_is_refused_with_how_to_recreate() {
        let t = tiny();
        let mut bytes = file(&t.meta, &t.decoded, None);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());

        let err = Overlay::open(Arc::new(bytes) as Arc<dyn ByteSource>).unwrap_err();

        assert!(matches!(err, FormatError::UnsupportedVersion(1)), "{err}");
        assert!(
            err.to_string()
                .contains("re-create it with `cloudlet overlay`"),
            "{err}"
        );
    }

    #[test]
    fn metadata_decode_limit_is_floor_then_ratio_then_cap() {
        assert_eq!(metadata_decode_limit(0), METADATA_DECODED_FLOOR);
        assert_eq!(metadata_decode_limit(1000), METADATA_DECODED_FLOOR);
        let past_floor = METADATA_DECODED_FLOOR / MAX_METADATA_RATIO * 2;
        assert_eq!(
            metadata_decode_limit(past_floor),
            past_floor * MAX_METADATA_RATIO
        );
        assert_eq!(metadata_decode_limit(u64::MAX), MAX_METADATA_DECODED_LEN);
    }

    #[test]
    fn segment_length_bound_covers_incompressible_segments_of_both_codecs() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..(1 << 20) + 4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        for len in [4096, 64 << 10, 1 << 20] {
            for codec in [Codec::Xz, Codec::Zstd] {
                let c = crate::codec::compress(codec, 9, &noise[..len]).unwrap();
                assert!(
                    c.len() as u64 <= segment_length_bound(len as u64),
                    "{} of {len} random bytes: {}",
                    codec.name(),
                    c.len()
                );
            }
        }
    }
}
