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
//! | 8                 | 4              | format version (`1`)                                    |
//! | 12                | 4              | metadata codec: 0 none, 1 xz, 2 zstd                    |
//! | 16                | 8              | `metadata_len`: stored (compressed) metadata length     |
//! | 24                | 8              | `file_len`: total length of the overlay file            |
//! | 32                | 32             | SHA-256 of the stored metadata bytes                    |
//! | 64                | `metadata_len` | [`Metadata`], compact form (see `wire.rs`), bincode 2, compressed |
//! | 64+`metadata_len` | …              | segment area: segments back to back, in table order     |
//!
//! [`Metadata`] holds the base id, image sizes, chunk size, codec, the device-state blob, one
//! [`ImageMap`] per image (every chunk that differs from the base, sorted by chunk number, with
//! the SHA-256 of the reconstructed chunk) and the segment table. A segment is the compressed
//! concatenation of chunk payloads (4 KiB each, raw or XOR'd against the base chunk at the same
//! offset); a [`ChunkSource::Payload`] names its segment and its offset inside the decoded
//! segment.
//!
//! Metadata is compressed with the overlay's codec (default level) as one stream: what it holds
//! besides digests (chunk numbers, sources, segment lists) compresses well.
//!
//! Readers ([`Overlay::open`]) validate everything before any chunk is served: magic, version,
//! metadata codec, lengths, the metadata digest, the decoded metadata's size against its stored
//! size (checked while decoding: [`metadata_decode_limit`]), chunk numbers inside their image,
//! payload positions inside their segment, segment ranges inside the file (and no longer than
//! their decoded size can compress to), self references that point at a payload chunk (so
//! references resolve in one step and cannot form cycles). [`Overlay::check_base`] then checks
//! the overlay against its base ([`BaseLimits`]): the base id, the memory size (the base's
//! exactly), the disk size (at most the base's plus the operator's allowed growth) and every
//! reference into the base.
//! Segment digests are checked on every segment read, chunk digests on every chunk served.

mod reader;
mod wire;
mod writer;

pub use reader::{validate, BaseLimits, FormatError, Overlay};
pub use writer::{encode_head, OverlayWriter, WriteError};

use crate::chunk::{Digest, ImageKind};
use crate::codec::Codec;
use serde::{Deserialize, Serialize};

/// Magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"CLDOVL\r\n";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: u64 = 64;
/// Largest metadata a reader accepts (a fully changed 16 GiB VM needs about 200 MiB).
pub const MAX_METADATA_LEN: u64 = 1 << 30;
/// Largest decoded segment a reader accepts.
pub const MAX_SEGMENT_RAW_LEN: u64 = 256 << 20;
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
    /// SHA-256 of the reconstructed (zero-padded) chunk.
    pub digest: Digest,
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
    /// Decoded length (a multiple of the chunk size).
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
    /// Chunk size (always 4096 in version 1).
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
