//! Byte sources: where overlay bytes come from.
//!
//! An overlay is read by byte range: the header and metadata first, then whole segments. A
//! [`ByteSource`] is that seam: a local file here, an HTTP server with Range requests or a
//! network peer in `cloudletfs` and the server. Implementations are `&self` and `Send + Sync`
//! because cloudletfs reads from several threads at once. Each read says who waits for it
//! ([`Priority`]): a network source asks its peer at once for what a reader waits for, and
//! lets what the background filler fetches ahead come in the peer's own order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Errors of a byte source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The underlying read failed.
    #[error("Read of {len} bytes at offset {offset} failed")]
    Io {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The source ended before the range did.
    #[error("Range {offset}+{len} lies past the end of the source ({size} bytes)")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Size of the source.
        size: u64,
    },
    /// A remote source failed (HTTP status, connection, timeout).
    #[error("{0}")]
    Remote(String),
}

/// Who waits for a read. A source that fetches from far away may serve the two differently:
/// ask its peer for the bytes at once, or let them come in the peer's own order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Someone waits for these bytes now: a guest's read of a chunk not yet there, a
    /// command reading an overlay. What a read without a priority ([`ByteSource::read_range`])
    /// is.
    #[default]
    Demand,
    /// Nobody waits for them yet: the background filler fetching ahead of need.
    Background,
}

/// A random-access, read-only byte source.
///
/// A read carries a [`Priority`]: [`read_range_with`](ByteSource::read_range_with) passes it,
/// [`read_range`](ByteSource::read_range) is a demand read. A source that serves both
/// priorities alike implements `read_range` only; one that does not overrides
/// `read_range_with` as well, and a source that wraps another forwards `read_range_with` to
/// it, so that the priority reaches the source that uses it. A wrapper that does not forward
/// it turns background reads into demand reads: more eager, never stalled.
pub trait ByteSource: Send + Sync {
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `len` bytes at `offset`, for a reader that waits for them
    /// ([`Priority::Demand`]).
    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError>;
    /// Reads exactly `len` bytes at `offset` at `priority`. By default the priority is not
    /// used: the same as [`read_range`](ByteSource::read_range).
    fn read_range_with(
        &self,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Vec<u8>, SourceError> {
        let _ = priority;
        self.read_range(offset, len)
    }
}

/// A local file.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileSource { file, size })
    }
}

/// Checks that `offset..offset+len` lies inside `size` and that `len` fits in memory.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<usize, SourceError> {
    let out_of_range = SourceError::OutOfRange { offset, len, size };
    match offset.checked_add(len) {
        Some(end) if end <= size => usize::try_from(len).map_err(|_| out_of_range),
        _ => Err(out_of_range),
    }
}

/// Reads exactly `len` bytes at `offset` of `file`, whose readable size is `size` (checked
/// first, see [`check_range`]).
pub fn read_file_range(
    file: &File,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<Vec<u8>, SourceError> {
    let n = check_range(offset, len, size)?;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| SourceError::Io {
            offset,
            len,
            source,
        })?;
    Ok(buf)
}

impl ByteSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        read_file_range(&self.file, offset, len, self.size)
    }
}

impl ByteSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let n = check_range(offset, len, self.size())?;
        let start = usize::try_from(offset).map_err(|_| SourceError::OutOfRange {
            offset,
            len,
            size: self.size(),
        })?;
        Ok(self[start..start + n].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_source_range_past_end_is_refused() {
        let v = vec![1u8; 10];
        assert!(matches!(
            v.read_range(8, 3),
            Err(SourceError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.read_range(u64::MAX, 2),
            Err(SourceError::OutOfRange { .. })
        ));
        assert_eq!(v.read_range(8, 2).unwrap(), vec![1, 1]);
    }
}
