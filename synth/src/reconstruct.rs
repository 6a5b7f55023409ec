//! Rebuilding a custom VM's images from base + overlay (`cloudlet reconstruct`).
//!
//! Two parallel passes write `disk.img` and `memory.img`, sparse where chunks are zero:
//!
//! 1. ranges of 256 chunks: base bytes, zero chunks and base references, read in 1 MiB blocks;
//! 2. segments: each worker decodes one segment and writes its payload chunks, plus every chunk
//!    elsewhere in the overlay that refers to one of them.
//!
//! Every chunk the overlay describes is checked against its SHA-256 before it is written.

use crate::chunk::{chunk_count, is_zero, ImageKind, CHUNK_SIZE, CHUNK_SIZE_U64};
use crate::format::{BaseLimits, ChunkSource, Overlay};
use crate::registry::Base;
use crate::resolve::{BaseFiles, ResolveError, Resolver};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const RANGE_CHUNKS: u64 = 256;

/// Reconstruction errors.
#[derive(Debug, thiserror::Error)]
pub enum ReconstructError {
    /// A file operation failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// File.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The overlay does not fit the base, or a chunk or segment is corrupt.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
}

impl From<crate::format::FormatError> for ReconstructError {
    fn from(e: crate::format::FormatError) -> Self {
        ReconstructError::Resolve(e.into())
    }
}

/// What a reconstruction did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReconstructStats {
    /// Bytes of images written (logical size).
    pub bytes: u64,
    /// Overlay chunks rebuilt and verified.
    pub verified_chunks: u64,
    /// Segments decoded.
    pub segments: u64,
}

struct Outputs {
    disk: File,
    memory: File,
    disk_path: PathBuf,
    memory_path: PathBuf,
    disk_size: u64,
    memory_size: u64,
}

impl Outputs {
    fn get(&self, image: ImageKind) -> (&File, &Path, u64) {
        match image {
            ImageKind::Disk => (&self.disk, &self.disk_path, self.disk_size),
            ImageKind::Memory => (&self.memory, &self.memory_path, self.memory_size),
        }
    }

    /// Writes `data` (whole chunks) at chunk `chunk`, clipped to the image size.
    fn write_chunks(
        &self,
        image: ImageKind,
        chunk: u64,
        data: &[u8],
    ) -> Result<(), ReconstructError> {
        let (f, path, size) = self.get(image);
        let offset = chunk * CHUNK_SIZE_U64;
        let len =
            usize::try_from((data.len() as u64).min(size.saturating_sub(offset))).unwrap_or(0);
        f.write_all_at(&data[..len], offset)
            .map_err(|source| ReconstructError::Io {
                action: "Writing",
                path: path.into(),
                source,
            })
    }
}

/// How [`reconstruct_with`] works.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconstructOptions {
    /// Worker threads (at least one is used).
    pub threads: usize,
    /// How many bytes the overlay's disk may have beyond the base's
    /// ([`BaseLimits::max_disk_growth`]); `None`: the base's disk size.
    pub max_disk_growth: Option<u64>,
}

/// Rebuilds the custom VM described by `overlay` over `base` into `out_dir`
/// (`disk.img`, `memory.img`, `device-state`), with the default disk growth limit.
pub fn reconstruct(
    base: &Base,
    overlay: &Overlay,
    out_dir: &Path,
    threads: usize,
    progress: &AtomicU64,
) -> Result<ReconstructStats, ReconstructError> {
    let opts = ReconstructOptions {
        threads,
        max_disk_growth: None,
    };
    reconstruct_with(base, overlay, out_dir, &opts, progress)
}

/// Rebuilds the custom VM described by `overlay` over `base` into `out_dir`
/// (`disk.img`, `memory.img`, `device-state`), once the overlay passed
/// [`Overlay::check_base`] against the base's image files.
pub fn reconstruct_with(
    base: &Base,
    overlay: &Overlay,
    out_dir: &Path,
    opts: &ReconstructOptions,
    progress: &AtomicU64,
) -> Result<ReconstructStats, ReconstructError> {
    let threads = opts.threads;
    let meta = overlay.metadata();
    let base_files = BaseFiles::open(&base.disk_path(), &base.memory_path()).map_err(|source| {
        ReconstructError::Io {
            action: "Opening base of",
            path: base.dir.clone(),
            source,
        }
    })?;
    overlay.check_base(&BaseLimits {
        id: base.id(),
        disk_size: base_files.size(ImageKind::Disk),
        memory_size: base_files.size(ImageKind::Memory),
        max_disk_growth: opts.max_disk_growth,
    })?;
    std::fs::create_dir_all(out_dir).map_err(|source| ReconstructError::Io {
        action: "Creating",
        path: out_dir.into(),
        source,
    })?;
    let create = |name: &str, size: u64| -> Result<(File, PathBuf), ReconstructError> {
        let path = out_dir.join(name);
        let io = |source| ReconstructError::Io {
            action: "Creating",
            path: path.clone(),
            source,
        };
        let f = File::create(&path).map_err(io)?;
        f.set_len(size).map_err(io)?;
        Ok((f, path))
    };
    let (disk, disk_path) = create("disk.img", meta.disk.size)?;
    let (memory, memory_path) = create("memory.img", meta.memory.size)?;
    let ds_path = out_dir.join("device-state");
    std::fs::write(&ds_path, &meta.device_state).map_err(|source| ReconstructError::Io {
        action: "Writing",
        path: ds_path.clone(),
        source,
    })?;
    let out = Outputs {
        disk,
        memory,
        disk_path,
        memory_path,
        disk_size: meta.disk.size,
        memory_size: meta.memory.size,
    };
    let resolver = Resolver::new(meta, &base_files);
    let threads = threads.max(1);
    let verified = AtomicU64::new(0);

    // Pass 1: everything that needs no segment.
    let ranges: Vec<(ImageKind, u64)> = ImageKind::ALL
        .iter()
        .flat_map(|&img| {
            let n = chunk_count(meta.image(img).size);
            (0..n.div_ceil(RANGE_CHUNKS)).map(move |r| (img, r * RANGE_CHUNKS))
        })
        .collect();
    run_parallel(threads, ranges.len(), |i| -> Result<(), ReconstructError> {
        let (image, first) = ranges[i];
        let map = meta.image(image);
        let n = RANGE_CHUNKS.min(chunk_count(map.size) - first);
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0) * CHUNK_SIZE];
        base_files
            .read_at(image, first * CHUNK_SIZE_U64, &mut buf)
            .map_err(|source| ReconstructError::Io {
                action: "Reading base of",
                path: base.dir.clone(),
                source,
            })?;
        let start = map.chunks.partition_point(|e| e.chunk < first);
        for e in map.chunks[start..]
            .iter()
            .take_while(|e| e.chunk < first + n)
        {
            if matches!(
                e.source,
                ChunkSource::Payload { .. } | ChunkSource::SelfRef { .. }
            ) {
                continue;
            }
            let pos = usize::try_from(e.chunk - first).unwrap_or(0) * CHUNK_SIZE;
            resolver.resolve(image, e, None, &mut buf[pos..pos + CHUNK_SIZE])?;
            verified.fetch_add(1, Ordering::Relaxed);
        }
        for (j, c) in buf.chunks_exact(CHUNK_SIZE).enumerate() {
            if !is_zero(c) {
                out.write_chunks(image, first + j as u64, c)?;
            }
        }
        progress.fetch_add(n * CHUNK_SIZE_U64, Ordering::Relaxed);
        Ok(())
    })?;

    // Pass 2: segments, and the self references into each.
    let mut referrers: HashMap<(ImageKind, u64), Vec<(ImageKind, usize)>> = HashMap::new();
    for image in ImageKind::ALL {
        for (i, e) in meta.image(image).chunks.iter().enumerate() {
            if let ChunkSource::SelfRef { image: ti, chunk } = e.source {
                referrers.entry((ti, chunk)).or_default().push((image, i));
            }
        }
    }
    let decoded = AtomicU64::new(0);
    run_parallel(
        threads,
        meta.segments.len(),
        |si| -> Result<(), ReconstructError> {
            let data = overlay.read_segment(si)?;
            decoded.fetch_add(1, Ordering::Relaxed);
            let mut chunk_buf = vec![0u8; CHUNK_SIZE];
            for &(image, chunk) in &meta.segments[si].chunks {
                let targets = std::iter::once(meta.image(image).find(chunk).map(|e| (image, e)))
                    .chain(
                        referrers
                            .get(&(image, chunk))
                            .into_iter()
                            .flatten()
                            .map(|&(ri, idx)| meta.image(ri).chunks.get(idx).map(|e| (ri, e))),
                    )
                    .flatten();
                for (img, e) in targets {
                    resolver.resolve(img, e, Some(&data), &mut chunk_buf)?;
                    out.write_chunks(img, e.chunk, &chunk_buf)?;
                    verified.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        },
    )?;
    for (f, p) in [(&out.disk, &out.disk_path), (&out.memory, &out.memory_path)] {
        f.sync_all().map_err(|source| ReconstructError::Io {
            action: "Syncing",
            path: p.clone(),
            source,
        })?;
    }
    Ok(ReconstructStats {
        bytes: meta.disk.size + meta.memory.size,
        verified_chunks: verified.into_inner(),
        segments: decoded.into_inner(),
    })
}

/// Runs `job(0..n)` on `threads` workers; returns the first error.
pub(crate) fn run_parallel<E: Send>(
    threads: usize,
    n: usize,
    job: impl Fn(usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(n).max(1) {
            s.spawn(|| loop {
                if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                if let Err(e) = job(i) {
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    match first_error.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}
