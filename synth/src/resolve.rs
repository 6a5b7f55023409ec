//! Rebuilding single chunks: the one place that knows how each [`ChunkSource`] turns into
//! bytes. Used by `reconstruct` for whole images and by cloudletfs for one chunk at a time.

use crate::chunk::{read_padded, sha256, ImageKind, CHUNK_SIZE, CHUNK_SIZE_U64};
use crate::format::{segment_chunk, ChunkEntry, ChunkSource, FormatError, Metadata};
use std::fs::File;
use std::path::Path;

/// Reads chunks of the base images.
pub trait BaseReader: Send + Sync {
    /// Fills `out` (one chunk) with chunk `chunk` of the base `image`, zero-padded.
    fn read_chunk(&self, image: ImageKind, chunk: u64, out: &mut [u8]) -> std::io::Result<()>;
}

/// Base images read with `pread`.
#[derive(Debug)]
pub struct BaseFiles {
    disk: File,
    disk_size: u64,
    memory: File,
    memory_size: u64,
}

impl BaseFiles {
    /// Opens the two base images.
    pub fn open(disk: &Path, memory: &Path) -> std::io::Result<Self> {
        let disk = File::open(disk)?;
        let memory = File::open(memory)?;
        Ok(BaseFiles {
            disk_size: disk.metadata()?.len(),
            memory_size: memory.metadata()?.len(),
            disk,
            memory,
        })
    }

    /// Size of a base image.
    pub fn size(&self, image: ImageKind) -> u64 {
        match image {
            ImageKind::Disk => self.disk_size,
            ImageKind::Memory => self.memory_size,
        }
    }

    /// Reads `buf.len()` bytes of a base image at `offset`, zero-padded past its end.
    pub fn read_at(&self, image: ImageKind, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (f, size) = match image {
            ImageKind::Disk => (&self.disk, self.disk_size),
            ImageKind::Memory => (&self.memory, self.memory_size),
        };
        read_padded(f, size, offset, buf)
    }
}

impl BaseReader for BaseFiles {
    fn read_chunk(&self, image: ImageKind, chunk: u64, out: &mut [u8]) -> std::io::Result<()> {
        let offset = chunk.checked_mul(CHUNK_SIZE_U64).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk number overflows")
        })?;
        self.read_at(image, offset, out)
    }
}

/// Errors while rebuilding a chunk.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Reading the base failed.
    #[error("Reading base {image} chunk {chunk} failed")]
    Base {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The overlay is inconsistent or the chunk is corrupt.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The caller did not pass the decoded segment the chunk needs.
    #[error("Segment {0} is needed but was not supplied")]
    MissingSegment(u32),
}

/// Rebuilds chunks of one overlay over one base.
pub struct Resolver<'a> {
    meta: &'a Metadata,
    base: &'a dyn BaseReader,
}

impl<'a> Resolver<'a> {
    /// A resolver for `meta` over `base`.
    pub fn new(meta: &'a Metadata, base: &'a dyn BaseReader) -> Self {
        Resolver { meta, base }
    }

    /// The payload entry behind `entry` (itself, or the target of a self reference), with the
    /// image that entry belongs to.
    fn payload_of(
        &self,
        image: ImageKind,
        entry: &'a ChunkEntry,
    ) -> Option<(ImageKind, &'a ChunkEntry)> {
        match entry.source {
            ChunkSource::Payload { .. } => Some((image, entry)),
            ChunkSource::SelfRef { image: ti, chunk } => {
                self.meta.image(ti).find(chunk).map(|t| (ti, t))
            }
            _ => None,
        }
    }

    /// The segment a chunk needs decoded, if any.
    pub fn needed_segment(&self, image: ImageKind, entry: &ChunkEntry) -> Option<u32> {
        match self.payload_of(image, entry).map(|(_, e)| e.source) {
            Some(ChunkSource::Payload { segment, .. }) => Some(segment),
            _ => None,
        }
    }

    fn base_chunk(&self, image: ImageKind, chunk: u64, out: &mut [u8]) -> Result<(), ResolveError> {
        self.base
            .read_chunk(image, chunk, out)
            .map_err(|source| ResolveError::Base {
                image,
                chunk,
                source,
            })
    }

    /// Rebuilds the chunk described by `entry` of `image` into `out` (one chunk) and checks
    /// its SHA-256: the head's for a chunk rebuilt without a segment, else the one the payload's
    /// segment holds for it. `segment` is the decoded segment from [`needed_segment`], if any,
    /// as [`Overlay`] read it (its SHA-256 and length checked).
    ///
    /// [`Overlay`]: crate::format::Overlay
    /// [`needed_segment`]: Self::needed_segment
    pub fn resolve(
        &self,
        image: ImageKind,
        entry: &ChunkEntry,
        segment: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<(), ResolveError> {
        let digest = match entry.source {
            ChunkSource::Zero => {
                out.fill(0);
                entry.digest
            }
            ChunkSource::BaseDisk(n) => {
                self.base_chunk(ImageKind::Disk, n, out)?;
                entry.digest
            }
            ChunkSource::BaseMemory(n) => {
                self.base_chunk(ImageKind::Memory, n, out)?;
                entry.digest
            }
            ChunkSource::Payload { .. } | ChunkSource::SelfRef { .. } => {
                let (pimage, pentry) =
                    self.payload_of(image, entry)
                        .ok_or(FormatError::BadSelfRef {
                            image,
                            chunk: entry.chunk,
                            target_image: image,
                            target: entry.chunk,
                        })?;
                let ChunkSource::Payload {
                    segment: sidx,
                    offset,
                    xor,
                } = pentry.source
                else {
                    return Err(FormatError::BadPayload {
                        image,
                        chunk: entry.chunk,
                    }
                    .into());
                };
                let data = segment.ok_or(ResolveError::MissingSegment(sidx))?;
                let bad_payload = FormatError::BadPayload {
                    image: pimage,
                    chunk: pentry.chunk,
                };
                let chunks = self
                    .meta
                    .segments
                    .get(sidx as usize)
                    .map(|s| s.chunks.len())
                    .ok_or_else(|| FormatError::BadSegment {
                        segment: sidx as usize,
                        reason: "no such segment".into(),
                    })?;
                let (bytes, digest) =
                    segment_chunk(data, chunks, offset as usize / CHUNK_SIZE).ok_or(bad_payload)?;
                if xor {
                    self.base_chunk(pimage, pentry.chunk, out)?;
                    crate::chunk::xor_into(out, bytes);
                } else {
                    out.copy_from_slice(bytes);
                }
                Some(digest)
            }
        };
        // A validated overlay has a digest for every chunk; one without is refused all the same.
        if digest != Some(sha256(out)) {
            return Err(FormatError::ChunkDigest {
                image,
                chunk: entry.chunk,
            }
            .into());
        }
        Ok(())
    }
}
