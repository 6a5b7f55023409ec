//! The on-disk encoding of [`Metadata`]: the same content with everything derivable left out,
//! so that the metadata of a large overlay stays small.
//!
//! - chunk numbers in an image map are stored as gaps from the previous entry;
//! - a payload entry stores its segment and XOR flag only: its offset is its position in the
//!   segment's chunk list;
//! - a segment stores its compressed length, digest and chunk list (as signed deltas): its
//!   offset follows from the lengths before it, its decoded length from the list's length.
//!
//! Decoding rebuilds the in-memory [`Metadata`], then the reader validates it as a whole.

use super::{ChunkEntry, ChunkSource, ImageMap, Metadata, SegmentEntry};
use crate::chunk::{Digest, ImageKind, CHUNK_SIZE_U64};
use crate::codec::Codec;
use serde::{Deserialize, Serialize};

/// Marks a payload whose position no segment list gave; validation refuses it.
const NO_OFFSET: u32 = u32::MAX;

#[derive(Serialize, Deserialize)]
enum WireSource {
    Zero,
    BaseDisk(u64),
    BaseMemory(u64),
    SelfRef(ImageKind, u64),
    Payload(u32, bool),
}

#[derive(Serialize, Deserialize)]
struct WireEntry {
    gap: u64,
    source: WireSource,
    digest: Digest,
}

#[derive(Serialize, Deserialize)]
struct WireImage {
    size: u64,
    chunks: Vec<WireEntry>,
}

#[derive(Serialize, Deserialize)]
struct WireSegment {
    length: u64,
    digest: Digest,
    chunks: Vec<(ImageKind, i64)>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct WireMetadata {
    base_id: Digest,
    chunk_size: u32,
    codec: Codec,
    device_state: Vec<u8>,
    disk: WireImage,
    memory: WireImage,
    segments: Vec<WireSegment>,
}

fn encode_image(map: &ImageMap) -> WireImage {
    let mut next = 0u64;
    let chunks = map
        .chunks
        .iter()
        .map(|e| {
            let gap = e.chunk.wrapping_sub(next);
            next = e.chunk.wrapping_add(1);
            let source = match e.source {
                ChunkSource::Zero => WireSource::Zero,
                ChunkSource::BaseDisk(n) => WireSource::BaseDisk(n),
                ChunkSource::BaseMemory(n) => WireSource::BaseMemory(n),
                ChunkSource::SelfRef { image, chunk } => WireSource::SelfRef(image, chunk),
                ChunkSource::Payload { segment, xor, .. } => WireSource::Payload(segment, xor),
            };
            WireEntry {
                gap,
                source,
                digest: e.digest,
            }
        })
        .collect();
    WireImage {
        size: map.size,
        chunks,
    }
}

impl WireMetadata {
    /// The compact form of `meta` (whose payload offsets must match its segment lists).
    pub(super) fn encode(meta: &Metadata) -> Self {
        let segments = meta
            .segments
            .iter()
            .map(|s| {
                let mut prev = 0u64;
                let chunks = s
                    .chunks
                    .iter()
                    .map(|&(image, c)| {
                        let delta = c.wrapping_sub(prev).cast_signed();
                        prev = c;
                        (image, delta)
                    })
                    .collect();
                WireSegment {
                    length: s.length,
                    digest: s.digest,
                    chunks,
                }
            })
            .collect();
        WireMetadata {
            base_id: meta.base_id,
            chunk_size: meta.chunk_size,
            codec: meta.codec,
            device_state: meta.device_state.clone(),
            disk: encode_image(&meta.disk),
            memory: encode_image(&meta.memory),
            segments,
        }
    }

    /// Rebuilds the in-memory metadata. Arithmetic wraps instead of failing: whatever comes
    /// out is validated afterwards, and nonsense is refused there.
    pub(super) fn decode(self) -> Metadata {
        let image = |w: WireImage| {
            let mut next = 0u64;
            let chunks = w
                .chunks
                .into_iter()
                .map(|e| {
                    let chunk = next.wrapping_add(e.gap);
                    next = chunk.wrapping_add(1);
                    let source = match e.source {
                        WireSource::Zero => ChunkSource::Zero,
                        WireSource::BaseDisk(n) => ChunkSource::BaseDisk(n),
                        WireSource::BaseMemory(n) => ChunkSource::BaseMemory(n),
                        WireSource::SelfRef(image, chunk) => ChunkSource::SelfRef { image, chunk },
                        WireSource::Payload(segment, xor) => ChunkSource::Payload {
                            segment,
                            offset: NO_OFFSET,
                            xor,
                        },
                    };
                    ChunkEntry {
                        chunk,
                        source,
                        digest: e.digest,
                    }
                })
                .collect();
            ImageMap {
                size: w.size,
                chunks,
            }
        };
        let mut meta = Metadata {
            base_id: self.base_id,
            chunk_size: self.chunk_size,
            codec: self.codec,
            device_state: self.device_state,
            disk: image(self.disk),
            memory: image(self.memory),
            segments: Vec::with_capacity(self.segments.len()),
        };
        let mut offset = 0u64;
        for (si, s) in self.segments.into_iter().enumerate() {
            let mut prev = 0u64;
            let chunks: Vec<(ImageKind, u64)> = s
                .chunks
                .into_iter()
                .map(|(image, delta)| {
                    prev = prev.wrapping_add(delta.cast_unsigned());
                    (image, prev)
                })
                .collect();
            // Give each listed payload its position; mismatches are left for validation.
            let segment = u32::try_from(si).unwrap_or(u32::MAX);
            for (pos, &(img, c)) in chunks.iter().enumerate() {
                let map = match img {
                    ImageKind::Disk => &mut meta.disk,
                    ImageKind::Memory => &mut meta.memory,
                };
                if let Ok(i) = map.chunks.binary_search_by_key(&c, |e| e.chunk) {
                    if let ChunkSource::Payload {
                        segment: s,
                        offset: o,
                        ..
                    } = &mut map.chunks[i].source
                    {
                        if *s == segment && *o == NO_OFFSET {
                            *o = u32::try_from(pos as u64 * CHUNK_SIZE_U64).unwrap_or(NO_OFFSET);
                        }
                    }
                }
            }
            let raw_length = (chunks.len() as u64).wrapping_mul(CHUNK_SIZE_U64);
            meta.segments.push(SegmentEntry {
                offset,
                length: s.length,
                raw_length,
                digest: s.digest,
                chunks,
            });
            offset = offset.wrapping_add(s.length);
        }
        meta
    }
}
