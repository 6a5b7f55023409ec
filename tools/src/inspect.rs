//! The overlay engine's commands that need no VM: open and describe an overlay
//! (`info-overlay`), check it completely with decode timings (`verify`), and read the chunk and
//! order lists `diff` takes (cloudletfs traces, working sets).

use crate::session::RunDir;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use synth::chunk::{hex, ImageKind};
use synth::format::{ClassCounts, FormatError, Metadata, Overlay};
use synth::registry::Base;
use synth::source::FileSource;

/// Errors of inspecting overlays and reading lists.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A file could not be opened or read.
    #[error("Reading {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The overlay is invalid or corrupt.
    #[error("Overlay {path} refused")]
    Refused {
        /// The overlay.
        path: PathBuf,
        /// Why.
        #[source]
        source: FormatError,
    },
    /// Rebuilding the overlay's chunks against the base failed.
    #[error("Overlay {path} refused")]
    Reconstruct {
        /// The overlay.
        path: PathBuf,
        /// Why.
        #[source]
        source: synth::reconstruct::ReconstructError,
    },
    /// A line of a chunk or order list is malformed.
    #[error("{path}:{line}: {what}")]
    BadLine {
        /// The list.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A scratch folder could not be made.
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
}

/// Opens and validates an overlay file.
pub fn open_overlay(p: &Path) -> Result<Overlay, InspectError> {
    let src = FileSource::open(p).map_err(|source| InspectError::Read {
        path: p.to_owned(),
        source,
    })?;
    Overlay::open(Arc::new(src)).map_err(|source| InspectError::Refused {
        path: p.to_owned(),
        source,
    })
}

/// Reads a file's text.
fn read_text(p: &Path) -> Result<String, InspectError> {
    std::fs::read_to_string(p).map_err(|source| InspectError::Read {
        path: p.to_owned(),
        source,
    })
}

/// The meaningful lines of a list: `#` comments and blank lines dropped, with line numbers.
fn list_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let line = line.split('#').next().unwrap_or("").trim();
        (!line.is_empty()).then_some((i + 1, line))
    })
}

/// Reads a chunk list: one chunk number per line; blank lines and `#` comments ignored.
pub fn read_chunk_list(p: &Path) -> Result<Vec<u64>, InspectError> {
    let text = read_text(p)?;
    list_lines(&text)
        .map(|(n, line)| {
            line.parse().map_err(|_| InspectError::BadLine {
                path: p.to_owned(),
                line: n,
                what: format!("{line:?} is not a chunk number"),
            })
        })
        .collect()
}

/// Reads an order list: `disk N` or `memory N` per line.
pub fn read_order(p: &Path) -> Result<Vec<(ImageKind, u64)>, InspectError> {
    let text = read_text(p)?;
    list_lines(&text)
        .map(|(n, line)| {
            let bad = || InspectError::BadLine {
                path: p.to_owned(),
                line: n,
                what: "expected \"disk N\" or \"memory N\"".into(),
            };
            let (kind, num) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let image = match kind {
                "disk" => ImageKind::Disk,
                "memory" => ImageKind::Memory,
                _ => return Err(bad()),
            };
            Ok((image, num.trim().parse().map_err(|_| bad())?))
        })
        .collect()
}

/// One image of an overlay, as `info-overlay` shows it.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    /// Image size in bytes.
    pub size: u64,
    /// Chunks the overlay changes.
    pub changed_chunks: u64,
    /// Of which, per class.
    pub classes: ClassCounts,
}

/// What `info-overlay` shows.
#[derive(Debug, Serialize)]
pub struct OverlayInfo {
    /// File size in bytes.
    pub file_size: u64,
    /// Metadata size in bytes.
    pub metadata_size: u64,
    /// The base it applies to.
    pub base_id: String,
    /// The metadata digest (`SHA256:<hex>`) that pins every chunk and segment: what `cloudlet
    /// client --overlay-digest` takes.
    pub metadata_digest: String,
    /// Segment codec.
    pub codec: &'static str,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Device state size in bytes.
    pub device_state_size: u64,
    /// The disk image.
    pub disk: ImageInfo,
    /// The memory image.
    pub memory: ImageInfo,
    /// Segments.
    pub segments: usize,
    /// Their compressed bytes.
    pub segment_bytes: u64,
    /// Their decoded bytes.
    pub segment_raw_bytes: u64,
}

/// Describes `ov`.
pub fn overlay_info(ov: &Overlay) -> OverlayInfo {
    let m = ov.metadata();
    let image = |k: ImageKind| {
        let map = m.image(k);
        ImageInfo {
            size: map.size,
            changed_chunks: map.chunks.len() as u64,
            classes: ClassCounts::of(map),
        }
    };
    OverlayInfo {
        file_size: ov.file_len(),
        metadata_size: ov.metadata_len(),
        base_id: hex(&m.base_id),
        metadata_digest: synth::protocol::format_sha256(&ov.id()),
        codec: m.codec.name(),
        chunk_size: m.chunk_size,
        device_state_size: m.device_state.len() as u64,
        disk: image(ImageKind::Disk),
        memory: image(ImageKind::Memory),
        segments: m.segments.len(),
        segment_bytes: m.segments.iter().map(|s| s.length).sum(),
        segment_raw_bytes: m.segments.iter().map(|s| s.raw_length).sum(),
    }
}

/// What `verify` found, with segment decode timings (one thread).
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// Segments decoded.
    pub segments: usize,
    /// Chunks rebuilt and checked against the base, when a base was given.
    pub verified_chunks: Option<u64>,
    /// Median segment decode time.
    pub decode_ms_p50: f64,
    /// 99th percentile segment decode time.
    pub decode_ms_p99: f64,
    /// All segments' decode time.
    pub decode_ms_total: f64,
    /// Decoded bytes per second.
    pub decode_mb_per_s: f64,
}

impl VerifyReport {
    fn new(
        segments: usize,
        verified_chunks: Option<u64>,
        mut decode_ms: Vec<f64>,
        meta: &Metadata,
    ) -> Self {
        decode_ms.sort_by(f64::total_cmp);
        // Nearest-rank percentile: index ceil(p * n) - 1, in integer arithmetic.
        let pct = |per_mille: usize| {
            let i = (decode_ms.len() * per_mille)
                .div_ceil(1000)
                .saturating_sub(1);
            decode_ms.get(i).copied().unwrap_or(0.0)
        };
        let total: f64 = decode_ms.iter().sum();
        let raw: u64 = meta.segments.iter().map(|s| s.raw_length).sum();
        VerifyReport {
            segments,
            verified_chunks,
            decode_ms_p50: pct(500),
            decode_ms_p99: pct(990),
            decode_ms_total: total,
            decode_mb_per_s: if total > 0.0 {
                raw as f64 / 1e3 / total
            } else {
                0.0
            },
        }
    }
}

/// Checks `ov` (read from `path`) completely: decodes every segment (timed, one thread) and,
/// with `base`, rebuilds every chunk in a scratch folder under `home` and checks its SHA-256.
/// `progress` counts the bytes rebuilt.
pub fn verify(
    home: &Path,
    path: &Path,
    ov: &Overlay,
    base: Option<&Base>,
    threads: usize,
    progress: &AtomicU64,
) -> Result<VerifyReport, InspectError> {
    let refused = |source| InspectError::Refused {
        path: path.to_owned(),
        source,
    };
    let n = ov.metadata().segments.len();
    let mut decode_ms = Vec::with_capacity(n);
    for i in 0..n {
        let compressed = ov.read_segment_compressed(i).map_err(refused)?;
        let start = std::time::Instant::now();
        ov.decode_segment(i, &compressed).map_err(refused)?;
        decode_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let verified_chunks = match base {
        Some(base) => {
            let scratch = RunDir::new(home, "verify")?;
            let stats =
                synth::reconstruct::reconstruct(base, ov, scratch.path(), threads, progress)
                    .map_err(|source| InspectError::Reconstruct {
                        path: path.to_owned(),
                        source,
                    })?;
            Some(stats.verified_chunks)
        }
        None => None,
    };
    Ok(VerifyReport::new(
        n,
        verified_chunks,
        decode_ms,
        ov.metadata(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_order_kinds_comments_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("order");
        std::fs::write(&p, "# working set\ndisk 3\n\nmemory 7 # hot\n").unwrap();
        assert_eq!(
            read_order(&p).unwrap(),
            vec![(ImageKind::Disk, 3), (ImageKind::Memory, 7)]
        );
        std::fs::write(&p, "disk 1\ncpu 2\n").unwrap();
        let e = read_order(&p).unwrap_err();
        assert!(
            e.to_string()
                .ends_with(":2: expected \"disk N\" or \"memory N\""),
            "{e}"
        );
    }

    #[test]
    fn read_chunk_list_numbers_and_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chunks");
        std::fs::write(&p, "1\n 2 \n# x\n").unwrap();
        assert_eq!(read_chunk_list(&p).unwrap(), vec![1, 2]);
        std::fs::write(&p, "1\nx\n").unwrap();
        let e = read_chunk_list(&p).unwrap_err();
        assert!(
            e.to_string().contains(":2: \"x\" is not a chunk number"),
            "{e}"
        );
    }
}
