//! Reads and validates an overlay from any [`ByteSource`].

use super::{
    bincode_config, metadata_decode_limit, segment_length_bound, segment_raw_len, ChunkSource,
    ImageMap, Metadata, HEADER_LEN, MAGIC, MAX_DEVICE_STATE_LEN, MAX_IMAGE_SIZE, MAX_METADATA_LEN,
    MAX_SEGMENT_RAW_LEN, VERSION,
};
use crate::chunk::{chunk_count, hex, sha256, Digest, ImageKind, CHUNK_SIZE};
use crate::codec::{self, Codec, CodecError};
use crate::source::{ByteSource, Priority, SourceError};
use std::sync::Arc;

/// [`MAX_METADATA_LEN`] as bincode's limit parameter.
const METADATA_LIMIT: usize = 1 << 30;
const _: () = assert!(METADATA_LIMIT as u64 == MAX_METADATA_LEN);

/// Why an overlay was refused. Every variant names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading from the source failed.
    #[error("Reading the overlay failed")]
    Source(#[from] SourceError),
    /// The file is shorter than its header says.
    #[error("Overlay is truncated: {needed} bytes needed, {size} present")]
    Truncated {
        /// Bytes the header requires.
        needed: u64,
        /// Bytes present.
        size: u64,
    },
    /// The file is longer than its header says.
    #[error("Overlay has {extra} trailing bytes after the length its header records")]
    TrailingBytes {
        /// Bytes past the recorded end.
        extra: u64,
    },
    /// Not an overlay.
    #[error("Not a cloudlet overlay (bad magic)")]
    BadMagic,
    /// A version this code cannot read (version 1 kept every chunk's digest in the head).
    #[error(
        "Overlay format {0}, this cloudlet reads {VERSION}: re-create it with `cloudlet overlay` \
         or `cloudlet diff`"
    )]
    UnsupportedVersion(u32),
    /// Unknown metadata codec.
    #[error("Unknown overlay metadata codec {0}")]
    BadMetadataCodec(u32),
    /// Metadata length out of bounds.
    #[error("Overlay metadata length {0} exceeds the limit")]
    MetadataTooLarge(u64),
    /// Metadata digest mismatch.
    #[error("Overlay metadata is corrupt (SHA-256 mismatch)")]
    MetadataDigest,
    /// Compressed metadata that inflates past what any real overlay's metadata does (see
    /// [`metadata_decode_limit`](super::metadata_decode_limit)): a decompression bomb.
    #[error(
        "Overlay metadata inflates past {limit} bytes from {stored} stored bytes (a real \
         overlay's metadata never does)"
    )]
    MetadataInflates {
        /// Stored (compressed) metadata length.
        stored: u64,
        /// Most decoded bytes allowed for that stored length.
        limit: u64,
    },
    /// Metadata does not decode.
    #[error("Overlay metadata does not decode: {0}")]
    DecodeMetadata(String),
    /// Bytes left over after the metadata.
    #[error("Overlay metadata has {0} undecoded trailing bytes")]
    MetadataTrailing(usize),
    /// Unsupported chunk size.
    #[error("Unsupported chunk size {0} (expected 4096)")]
    ChunkSize(u32),
    /// Device state too large.
    #[error("Device state of {0} bytes exceeds the limit")]
    DeviceStateTooLarge(u64),
    /// Image too large.
    #[error("The {image} image size {size} exceeds the limit")]
    ImageTooLarge {
        /// Image.
        image: ImageKind,
        /// Size recorded.
        size: u64,
    },
    /// Chunk entries not sorted or repeated.
    #[error("The {image} chunk map is not sorted at chunk {chunk}")]
    UnsortedChunks {
        /// Image.
        image: ImageKind,
        /// First chunk out of order.
        chunk: u64,
    },
    /// Chunk number past the image end.
    #[error("The {image} chunk {chunk} lies outside the image ({count} chunks)")]
    ChunkOutOfRange {
        /// Image.
        image: ImageKind,
        /// Chunk number.
        chunk: u64,
        /// Chunks in the image.
        count: u64,
    },
    /// Segment table entry inconsistent with the file.
    #[error("Segment {segment} is invalid: {reason}")]
    BadSegment {
        /// Segment index.
        segment: usize,
        /// What is wrong.
        reason: String,
    },
    /// Payload reference that does not match the segment table.
    #[error("The {image} chunk {chunk} points at a payload its segment does not hold")]
    BadPayload {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
    },
    /// A chunk whose digest is not where the format keeps it: in the head for a zero chunk or a
    /// base reference, in the payload's segment for a payload or a self reference.
    #[error(
        "The {image} chunk {chunk} has a digest in the head where its segment holds it, or \
         none where the head must hold it"
    )]
    MisplacedDigest {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
    },
    /// Self reference that does not resolve to a payload chunk.
    #[error("The {image} chunk {chunk} refers to {target_image} chunk {target}, which is not a payload chunk of this overlay")]
    BadSelfRef {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
        /// Image referred to.
        target_image: ImageKind,
        /// Chunk referred to.
        target: u64,
    },
    /// The overlay's memory image is not the size of its base's: guest RAM cannot change size.
    #[error(
        "Overlay memory image is {overlay} bytes, but its base's is {base} bytes (guest RAM \
         cannot change size)"
    )]
    MemorySizeMismatch {
        /// Memory size recorded in the overlay.
        overlay: u64,
        /// Memory size of the base.
        base: u64,
    },
    /// The overlay's disk image grows past the operator's limit over its base's disk.
    #[error(
        "Overlay disk image is {overlay} bytes, more than the {limit} bytes allowed over a base \
         disk of {base} bytes"
    )]
    DiskTooLarge {
        /// Disk size recorded in the overlay.
        overlay: u64,
        /// Disk size of the base.
        base: u64,
        /// Largest disk allowed (the base's disk plus the allowed growth).
        limit: u64,
    },
    /// Overlay made for another base.
    #[error("Overlay was made for base {expected}, not {actual}")]
    WrongBase {
        /// Base id recorded in the overlay.
        expected: String,
        /// Base id offered.
        actual: String,
    },
    /// Reference past the end of a base image.
    #[error(
        "The {image} chunk {chunk} refers to base {target_image} chunk {target}, past its end"
    )]
    BaseRefOutOfRange {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
        /// Base image referred to.
        target_image: ImageKind,
        /// Chunk referred to.
        target: u64,
    },
    /// A segment's bytes do not match their digest.
    #[error("Segment {segment} is corrupt (SHA-256 mismatch)")]
    SegmentDigest {
        /// Segment index.
        segment: usize,
    },
    /// A segment decodes to another length than its chunks' payloads and digests.
    #[error(
        "Segment {segment} decodes to {actual} bytes, not the {expected} of its chunks' payloads \
         and digests"
    )]
    SegmentLength {
        /// Segment index.
        segment: usize,
        /// Payloads and digests of its chunk list.
        expected: u64,
        /// Decoded length found: a shorter length, or past the expected one, one byte more
        /// (decoding stops there) or what a zstd frame declares.
        actual: u64,
    },
    /// A segment does not decompress.
    #[error("Segment {segment} does not decompress")]
    DecompressSegment {
        /// Segment index.
        segment: usize,
        /// What failed.
        #[source]
        source: CodecError,
    },
    /// A reconstructed chunk does not match its digest.
    #[error("The {image} chunk {chunk} does not match its SHA-256")]
    ChunkDigest {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
    },
}

/// A validated overlay: its metadata plus the source its segments are read from.
#[derive(Clone)]
pub struct Overlay {
    meta: Arc<Metadata>,
    source: Arc<dyn ByteSource>,
    data_start: u64,
    metadata_len: u64,
    metadata_digest: Digest,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("base_id", &hex(&self.meta.base_id))
            .field("segments", &self.meta.segments.len())
            .finish()
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Overlay {
    /// Reads the header and metadata from `source` and validates them.
    pub fn open(source: Arc<dyn ByteSource>) -> Result<Self, FormatError> {
        let size = source.size();
        if size < HEADER_LEN {
            return Err(FormatError::Truncated {
                needed: HEADER_LEN,
                size,
            });
        }
        let header = source.read_range(0, HEADER_LEN)?;
        if header[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = le_u32(&header[8..12]);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let meta_codec = match le_u32(&header[12..16]) {
            0 => None,
            id => Some(Codec::from_header_id(id).ok_or(FormatError::BadMetadataCodec(id))?),
        };
        let metadata_len = le_u64(&header[16..24]);
        let file_len = le_u64(&header[24..32]);
        if metadata_len > MAX_METADATA_LEN {
            return Err(FormatError::MetadataTooLarge(metadata_len));
        }
        let data_start = HEADER_LEN + metadata_len;
        if file_len < data_start {
            return Err(FormatError::Truncated {
                needed: data_start,
                size: file_len,
            });
        }
        if size < file_len {
            return Err(FormatError::Truncated {
                needed: file_len,
                size,
            });
        }
        if size > file_len {
            return Err(FormatError::TrailingBytes {
                extra: size - file_len,
            });
        }
        let bytes = source.read_range(HEADER_LEN, metadata_len)?;
        let metadata_digest = sha256(&bytes);
        if metadata_digest != header[32..64] {
            return Err(FormatError::MetadataDigest);
        }
        let bytes = match meta_codec {
            None => bytes,
            Some(codec) => {
                let limit = metadata_decode_limit(metadata_len);
                codec::decompress_at_most(codec, &bytes, limit).map_err(|e| match e {
                    CodecError::Size { .. } => FormatError::MetadataInflates {
                        stored: metadata_len,
                        limit,
                    },
                    e => FormatError::DecodeMetadata(format!("{e:#}")),
                })?
            }
        };
        let (wire, used): (super::wire::WireMetadata, usize) = bincode::serde::decode_from_slice(
            &bytes,
            bincode_config().with_limit::<METADATA_LIMIT>(),
        )
        .map_err(|e| FormatError::DecodeMetadata(e.to_string()))?;
        if used != bytes.len() {
            return Err(FormatError::MetadataTrailing(bytes.len() - used));
        }
        let meta = wire.decode();
        validate(&meta, file_len - data_start)?;
        Ok(Overlay {
            meta: Arc::new(meta),
            source,
            data_start,
            metadata_len,
            metadata_digest,
        })
    }

    /// The overlay's identity: the SHA-256 of its metadata block, which pins every chunk's
    /// digest (in the head, or in a segment whose SHA-256 the head holds) and so the whole
    /// reconstructed VM.
    pub fn id(&self) -> Digest {
        self.metadata_digest
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// Shared handle to the metadata.
    pub fn metadata_arc(&self) -> Arc<Metadata> {
        Arc::clone(&self.meta)
    }

    /// Length of the metadata block in bytes.
    pub fn metadata_len(&self) -> u64 {
        self.metadata_len
    }

    /// File offset where the segment area starts.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Total size of the overlay file.
    pub fn file_len(&self) -> u64 {
        self.source.size()
    }

    /// Checks that this overlay applies to `base`: the base id, the image sizes (the memory
    /// image exactly the base's, the disk at most the base's plus the allowed growth), and
    /// every reference to a base chunk inside the base. Every consumer calls this before
    /// serving a byte: `cloudletfs` mounts, `reconstruct`, the synthesis server.
    pub fn check_base(&self, base: &BaseLimits) -> Result<(), FormatError> {
        if self.meta.base_id != base.id {
            return Err(FormatError::WrongBase {
                expected: hex(&self.meta.base_id),
                actual: hex(&base.id),
            });
        }
        if self.meta.memory.size != base.memory_size {
            return Err(FormatError::MemorySizeMismatch {
                overlay: self.meta.memory.size,
                base: base.memory_size,
            });
        }
        let limit = base.max_disk_size();
        if self.meta.disk.size > limit {
            return Err(FormatError::DiskTooLarge {
                overlay: self.meta.disk.size,
                base: base.disk_size,
                limit,
            });
        }
        let (disk_chunks, memory_chunks) =
            (chunk_count(base.disk_size), chunk_count(base.memory_size));
        for image in ImageKind::ALL {
            for e in &self.meta.image(image).chunks {
                let (target_image, target, count) = match e.source {
                    ChunkSource::BaseDisk(t) => (ImageKind::Disk, t, disk_chunks),
                    ChunkSource::BaseMemory(t) => (ImageKind::Memory, t, memory_chunks),
                    _ => continue,
                };
                if target >= count {
                    return Err(FormatError::BaseRefOutOfRange {
                        image,
                        chunk: e.chunk,
                        target_image,
                        target,
                    });
                }
            }
        }
        Ok(())
    }

    /// Fetches, verifies and decodes segment `segment` for a reader that waits for it
    /// ([`Priority::Demand`]).
    pub fn read_segment(&self, segment: usize) -> Result<Vec<u8>, FormatError> {
        self.read_segment_with(segment, Priority::Demand)
    }

    /// Fetches segment `segment` from the source at `priority`, verifies and decodes it.
    pub fn read_segment_with(
        &self,
        segment: usize,
        priority: Priority,
    ) -> Result<Vec<u8>, FormatError> {
        let compressed = self.fetch_segment(segment, priority)?;
        self.decode_segment(segment, &compressed)
    }

    /// Fetches segment `segment` and verifies its digest, without decoding it
    /// ([`Priority::Demand`]).
    pub fn read_segment_compressed(&self, segment: usize) -> Result<Vec<u8>, FormatError> {
        self.fetch_segment(segment, Priority::Demand)
    }

    /// Fetches segment `segment` at `priority` and verifies its digest.
    fn fetch_segment(&self, segment: usize, priority: Priority) -> Result<Vec<u8>, FormatError> {
        let entry = self
            .meta
            .segments
            .get(segment)
            .ok_or_else(|| FormatError::BadSegment {
                segment,
                reason: "no such segment".into(),
            })?;
        let bytes =
            self.source
                .read_range_with(self.data_start + entry.offset, entry.length, priority)?;
        if sha256(&bytes) != entry.digest {
            return Err(FormatError::SegmentDigest { segment });
        }
        Ok(bytes)
    }

    /// Decodes the verified compressed bytes of segment `segment`.
    pub fn decode_segment(
        &self,
        segment: usize,
        compressed: &[u8],
    ) -> Result<Vec<u8>, FormatError> {
        let entry = self
            .meta
            .segments
            .get(segment)
            .ok_or_else(|| FormatError::BadSegment {
                segment,
                reason: "no such segment".into(),
            })?;
        codec::decompress(self.meta.codec, compressed, entry.raw_length).map_err(|source| {
            match source {
                CodecError::Size { expected, actual } => FormatError::SegmentLength {
                    segment,
                    expected,
                    actual,
                },
                source => FormatError::DecompressSegment { segment, source },
            }
        })
    }
}

/// What an overlay is checked against ([`Overlay::check_base`]): the base it is applied to,
/// and how far the operator lets a disk grow past the base's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseLimits {
    /// Base id.
    pub id: Digest,
    /// Size of the base's disk image in bytes.
    pub disk_size: u64,
    /// Size of the base's memory image in bytes.
    pub memory_size: u64,
    /// How many bytes an overlay's disk may have beyond the base's disk; `None`: as many as
    /// the base's disk has (a custom disk at most twice the base's).
    pub max_disk_growth: Option<u64>,
}

impl BaseLimits {
    /// The largest disk an overlay on this base may have.
    pub fn max_disk_size(&self) -> u64 {
        self.disk_size
            .saturating_add(self.max_disk_growth.unwrap_or(self.disk_size))
    }
}

/// Validates metadata against the size of the segment area. Exposed for fuzzing.
pub fn validate(meta: &Metadata, data_len: u64) -> Result<(), FormatError> {
    if meta.chunk_size as usize != CHUNK_SIZE {
        return Err(FormatError::ChunkSize(meta.chunk_size));
    }
    if meta.device_state.len() as u64 > MAX_DEVICE_STATE_LEN {
        return Err(FormatError::DeviceStateTooLarge(
            meta.device_state.len() as u64
        ));
    }
    let mut expected_offset = 0u64;
    for (i, s) in meta.segments.iter().enumerate() {
        let bad = |reason: &str| FormatError::BadSegment {
            segment: i,
            reason: reason.into(),
        };
        if s.offset != expected_offset {
            return Err(bad("not contiguous with the previous segment"));
        }
        if s.length == 0 {
            return Err(bad("empty"));
        }
        if s.chunks.is_empty() {
            return Err(bad("holds no chunk"));
        }
        expected_offset = s
            .offset
            .checked_add(s.length)
            .filter(|&end| end <= data_len)
            .ok_or_else(|| bad("extends past the end of the file"))?;
        if s.raw_length > MAX_SEGMENT_RAW_LEN {
            return Err(bad("decoded size exceeds the limit"));
        }
        if segment_raw_len(s.chunks.len() as u64) != Some(s.raw_length) {
            return Err(bad(
                "decoded size does not match its chunk list's payloads and digests",
            ));
        }
        if s.length > segment_length_bound(s.raw_length) {
            return Err(bad(
                "compressed size exceeds what its decoded size can compress to",
            ));
        }
    }
    if expected_offset != data_len {
        return Err(FormatError::BadSegment {
            segment: meta.segments.len(),
            reason: format!(
                "{} bytes of the file belong to no segment",
                data_len - expected_offset
            ),
        });
    }
    for image in ImageKind::ALL {
        validate_image(meta, image)?;
    }
    // Every chunk listed in a segment must be a payload entry pointing back at that place.
    for (si, s) in meta.segments.iter().enumerate() {
        for (pos, &(image, chunk)) in s.chunks.iter().enumerate() {
            let ok = matches!(
                meta.image(image).find(chunk).map(|e| e.source),
                Some(ChunkSource::Payload { segment, offset, .. })
                    if segment as usize == si && offset as usize == pos * CHUNK_SIZE
            );
            if !ok {
                return Err(FormatError::BadSegment {
                    segment: si,
                    reason: format!("lists {image} chunk {chunk}, which is not stored there"),
                });
            }
        }
    }
    Ok(())
}

fn validate_image(meta: &Metadata, image: ImageKind) -> Result<(), FormatError> {
    let map: &ImageMap = meta.image(image);
    if map.size > MAX_IMAGE_SIZE {
        return Err(FormatError::ImageTooLarge {
            image,
            size: map.size,
        });
    }
    let count = chunk_count(map.size);
    let mut prev: Option<u64> = None;
    for e in &map.chunks {
        if prev.is_some_and(|p| p >= e.chunk) {
            return Err(FormatError::UnsortedChunks {
                image,
                chunk: e.chunk,
            });
        }
        prev = Some(e.chunk);
        if e.chunk >= count {
            return Err(FormatError::ChunkOutOfRange {
                image,
                chunk: e.chunk,
                count,
            });
        }
        let rebuilt_without_segment = matches!(
            e.source,
            ChunkSource::Zero | ChunkSource::BaseDisk(_) | ChunkSource::BaseMemory(_)
        );
        if e.digest.is_some() != rebuilt_without_segment {
            return Err(FormatError::MisplacedDigest {
                image,
                chunk: e.chunk,
            });
        }
        match e.source {
            ChunkSource::Payload {
                segment, offset, ..
            } => {
                let ok = meta.segments.get(segment as usize).is_some_and(|s| {
                    (offset as usize).is_multiple_of(CHUNK_SIZE)
                        && s.chunks.get(offset as usize / CHUNK_SIZE) == Some(&(image, e.chunk))
                });
                if !ok {
                    return Err(FormatError::BadPayload {
                        image,
                        chunk: e.chunk,
                    });
                }
            }
            ChunkSource::SelfRef {
                image: target_image,
                chunk: target,
            } => {
                let ok = matches!(
                    meta.image(target_image).find(target).map(|t| t.source),
                    Some(ChunkSource::Payload { .. })
                );
                if !ok {
                    return Err(FormatError::BadSelfRef {
                        image,
                        chunk: e.chunk,
                        target_image,
                        target,
                    });
                }
            }
            ChunkSource::Zero | ChunkSource::BaseDisk(_) | ChunkSource::BaseMemory(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The golden overlay in memory, recording the priority of every read (`None`: a read
    /// without one).
    struct Recording {
        bytes: Vec<u8>,
        seen: Mutex<Vec<Option<Priority>>>,
    }

    impl ByteSource for Recording {
        fn size(&self) -> u64 {
            self.bytes.size()
        }
        fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
            self.seen.lock().unwrap().push(None);
            self.bytes.read_range(offset, len)
        }
        fn read_range_with(
            &self,
            offset: u64,
            len: u64,
            priority: Priority,
        ) -> Result<Vec<u8>, SourceError> {
            self.seen.lock().unwrap().push(Some(priority));
            self.bytes.read_range(offset, len)
        }
    }

    #[test]
    fn segment_reads_pass_their_priority_to_the_source() {
        let src = Arc::new(Recording {
            bytes: include_bytes!("../../../tests/golden/tiny.overlay").to_vec(),
            seen: Mutex::new(Vec::new()),
        });
        let ov = Overlay::open(Arc::clone(&src) as Arc<dyn ByteSource>).unwrap();
        let opened = src.seen.lock().unwrap().len();

        ov.read_segment_with(0, Priority::Background).unwrap();
        ov.read_segment(0).unwrap();
        ov.read_segment_compressed(0).unwrap();

        let seen = src.seen.lock().unwrap();
        assert_eq!(opened, 2, "header and metadata");
        assert_eq!(
            seen[opened..],
            [
                Some(Priority::Background),
                Some(Priority::Demand),
                Some(Priority::Demand)
            ]
        );
    }
}
