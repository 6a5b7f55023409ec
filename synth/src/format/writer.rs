//! Writes an overlay file: segments are appended to a scratch file while they are produced, the
//! metadata is written in front of them once it is complete.

use super::{bincode_config, Metadata, SegmentEntry, HEADER_LEN, MAGIC, VERSION};
use crate::chunk::{sha256, ImageKind};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Errors while writing an overlay.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Creating, writing or renaming a file failed.
    #[error("Writing {path} failed")]
    Io {
        /// File being written.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Encoding the metadata failed.
    #[error("Encoding the overlay metadata failed: {0}")]
    Encode(String),
    /// More segments than the format can number.
    #[error("Too many segments")]
    TooManySegments,
    /// A chunk entry whose digest is not where the format keeps it: a zero chunk or base
    /// reference needs one in the head, a payload or self reference has its digest in the
    /// payload's segment.
    #[error(
        "The {image} chunk {chunk} has a digest where the format keeps none, or lacks one it needs"
    )]
    MisplacedDigest {
        /// Image.
        image: ImageKind,
        /// Chunk.
        chunk: u64,
    },
}

/// Builds an overlay file at a path; nothing appears at that path until [`finish`] succeeds.
///
/// [`finish`]: OverlayWriter::finish
#[derive(Debug)]
pub struct OverlayWriter {
    path: PathBuf,
    scratch_path: PathBuf,
    scratch: BufWriter<File>,
    segments: Vec<SegmentEntry>,
    offset: u64,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

impl OverlayWriter {
    /// Starts an overlay that will be written to `path`.
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        let scratch_path = sibling(path, ".segments.tmp");
        let file = File::create(&scratch_path).map_err(|source| WriteError::Io {
            path: scratch_path.clone(),
            source,
        })?;
        Ok(OverlayWriter {
            path: path.to_path_buf(),
            scratch_path,
            scratch: BufWriter::with_capacity(1 << 20, file),
            segments: Vec::new(),
            offset: 0,
        })
    }

    fn io(&self, source: std::io::Error) -> WriteError {
        WriteError::Io {
            path: self.scratch_path.clone(),
            source,
        }
    }

    /// Appends a compressed segment holding `chunks` (in payload order) and decoding to
    /// `raw_length` bytes: their payloads, then their digests (see the module doc); returns its
    /// index.
    pub fn append_segment(
        &mut self,
        compressed: &[u8],
        raw_length: u64,
        chunks: Vec<(ImageKind, u64)>,
    ) -> Result<u32, WriteError> {
        let index = u32::try_from(self.segments.len()).map_err(|_| WriteError::TooManySegments)?;
        self.scratch.write_all(compressed).map_err(|e| self.io(e))?;
        let length = compressed.len() as u64;
        self.segments.push(SegmentEntry {
            offset: self.offset,
            length,
            raw_length,
            digest: sha256(compressed),
            chunks,
        });
        self.offset += length;
        Ok(index)
    }

    /// Writes header, `meta` (whose segment table is replaced by the appended segments) and the
    /// segments to the final path. Returns the file length.
    pub fn finish(mut self, mut meta: Metadata) -> Result<u64, WriteError> {
        self.scratch.flush().map_err(|e| self.io(e))?;
        meta.segments = std::mem::take(&mut self.segments);
        let head = encode_head(&meta, self.offset)?;
        let file_len = head.len() as u64 + self.offset;
        let tmp_path = sibling(&self.path, ".tmp");
        let io = |source| WriteError::Io {
            path: tmp_path.clone(),
            source,
        };
        let mut out = File::create(&tmp_path).map_err(io)?;
        out.write_all(&head).map_err(io)?;
        let mut scratch = OpenOptions::new()
            .read(true)
            .open(&self.scratch_path)
            .map_err(|e| self.io(e))?;
        scratch.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
        std::io::copy(&mut scratch, &mut out).map_err(io)?;
        drop(out);
        crate::durable::persist(&tmp_path, &self.path).map_err(|source| WriteError::Io {
            path: self.path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&self.scratch_path);
        Ok(file_len)
    }
}

impl Drop for OverlayWriter {
    fn drop(&mut self) {
        // Whether finished or abandoned, the scratch file is not wanted any more.
        let _ = std::fs::remove_file(&self.scratch_path);
    }
}

/// Encodes the header and metadata of an overlay whose segment area is `segments_len` bytes:
/// the bytes that precede the segments in the file.
pub fn encode_head(meta: &Metadata, segments_len: u64) -> Result<Vec<u8>, WriteError> {
    let wire =
        super::wire::WireMetadata::encode(meta).map_err(|m| WriteError::MisplacedDigest {
            image: m.image,
            chunk: m.chunk,
        })?;
    let raw = bincode::serde::encode_to_vec(wire, bincode_config())
        .map_err(|e| WriteError::Encode(e.to_string()))?;
    let codec = meta.codec;
    let bytes = crate::codec::compress(codec, codec.default_level(), &raw)
        .map_err(|e| WriteError::Encode(format!("{e:#}")))?;
    let meta_len = bytes.len() as u64;
    let file_len = HEADER_LEN + meta_len + segments_len;
    let mut head = Vec::with_capacity(bytes.len() + 64);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&codec.header_id().to_le_bytes());
    head.extend_from_slice(&meta_len.to_le_bytes());
    head.extend_from_slice(&file_len.to_le_bytes());
    head.extend_from_slice(&sha256(&bytes));
    debug_assert_eq!(head.len() as u64, HEADER_LEN);
    head.extend_from_slice(&bytes);
    Ok(head)
}
