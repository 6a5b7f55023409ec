//! The on-disk encoding of [`Metadata`]: the same content with everything derivable left out,
//! so that the metadata of a large overlay stays small.
//!
//! - chunk numbers in an image map are stored as gaps from the previous entry;
//! - a payload entry stores its segment and XOR flag only: its offset is its position in the
//!   segment's chunk list, and its digest is in the segment (version 2);
//! - a self reference stores its target only: its digest is the target payload's;
//! - only zero entries and base references carry their chunk's digest;
//! - a segment stores its compressed length, digest and chunk list (as signed deltas): its
//!   offset follows from the lengths before it, its decoded length (payloads and digests) from
//!   the list's length.
//!
//! Decoding rebuilds the in-memory [`Metadata`], then the reader validates it as a whole.

use super::{segment_raw_len, ChunkEntry, ChunkSource, ImageMap, Metadata, SegmentEntry};
use crate::chunk::{Digest, ImageKind, CHUNK_SIZE_U64};
use crate::codec::Codec;
use serde::{Deserialize, Serialize};

/// Marks a payload whose position no segment list gave; validation refuses it.
const NO_OFFSET: u32 = u32::MAX;

#[derive(Serialize, Deserialize)]
enum WireSource {
    Zero(Digest),
    BaseDisk(u64, Digest),
    BaseMemory(u64, Digest),
    SelfRef(ImageKind, u64),
    Payload(u32, bool),
}

#[derive(Serialize, Deserialize)]
struct WireEntry {
    gap: u64,
    source: WireSource,
}

/// Metadata that has no compact form: a chunk rebuilt without a segment but without a digest,
/// or a payload or self reference with one (its digest belongs in the segment).
#[derive(Debug)]
pub(super) struct Misplaced {
    pub(super) image: ImageKind,
    pub(super) chunk: u64,
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

fn encode_image(map: &ImageMap, image: ImageKind) -> Result<WireImage, Misplaced> {
    let mut next = 0u64;
    let chunks = map
        .chunks
        .iter()
        .map(|e| {
            let gap = e.chunk.wrapping_sub(next);
            next = e.chunk.wrapping_add(1);
            let source = match (e.source, e.digest) {
                (ChunkSource::Zero, Some(d)) => WireSource::Zero(d),
                (ChunkSource::BaseDisk(n), Some(d)) => WireSource::BaseDisk(n, d),
                (ChunkSource::BaseMemory(n), Some(d)) => WireSource::BaseMemory(n, d),
                (ChunkSource::SelfRef { image, chunk }, None) => WireSource::SelfRef(image, chunk),
                (ChunkSource::Payload { segment, xor, .. }, None) => {
                    WireSource::Payload(segment, xor)
                }
                _ => {
                    return Err(Misplaced {
                        image,
                        chunk: e.chunk,
                    })
                }
            };
            Ok(WireEntry { gap, source })
        })
        .collect::<Result<_, _>>()?;
    Ok(WireImage {
        size: map.size,
        chunks,
    })
}

impl WireMetadata {
    /// The compact form of `meta` (whose payload offsets must match its segment lists, and
    /// whose chunks hold a digest exactly when they are rebuilt without a segment).
    pub(super) fn encode(meta: &Metadata) -> Result<Self, Misplaced> {
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
        Ok(WireMetadata {
            base_id: meta.base_id,
            chunk_size: meta.chunk_size,
            codec: meta.codec,
            device_state: meta.device_state.clone(),
            disk: encode_image(&meta.disk, ImageKind::Disk)?,
            memory: encode_image(&meta.memory, ImageKind::Memory)?,
            segments,
        })
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
                    let (source, digest) = match e.source {
                        WireSource::Zero(d) => (ChunkSource::Zero, Some(d)),
                        WireSource::BaseDisk(n, d) => (ChunkSource::BaseDisk(n), Some(d)),
                        WireSource::BaseMemory(n, d) => (ChunkSource::BaseMemory(n), Some(d)),
                        WireSource::SelfRef(image, chunk) => {
                            (ChunkSource::SelfRef { image, chunk }, None)
                        }
                        WireSource::Payload(segment, xor) => (
                            ChunkSource::Payload {
                                segment,
                                offset: NO_OFFSET,
                                xor,
                            },
                            None,
                        ),
                    };
                    ChunkEntry {
                        chunk,
                        source,
                        digest,
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
            // An overflowing length is left for validation to refuse.
            let raw_length = segment_raw_len(chunks.len() as u64).unwrap_or(u64::MAX);
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
