//! Serving one image: reads, writes and discards assembled chunk by chunk from the base file,
//! the cache of rebuilt overlay chunks, the copy-on-write store or zeros, according to the
//! chunk map.
//!
//! The cache is an unlinked file: in memory (`memory_file`) when `mount` finds that every
//! overlay chunk fits in its memory budget, else on disk in the cache folder. In memory, a
//! chunk costs several times less to write, and no disk writeback or journal runs behind the
//! readers (measured in `BENCHMARKS.md`).
//!
//! [`Core`] ties the pieces together and is shared (through an `Arc`) by the FUSE threads and
//! the fetch workers.

use crate::chunkmap::{ChunkMap, ChunkState, Waiter};
use crate::error::{MountError, ServeError};
use crate::fetch::FetchQueue;
use crate::stats::{ChunkCounts, Counters, ImageStats, Stats};
use crate::store::{CowQuota, StateOwner, Store};
use crate::streams::Stream;
use log::{debug, error, warn};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use synth::chunk::{chunk_count, is_zero, CHUNK_SIZE, CHUNK_SIZE_U64};
use synth::format::{ChunkEntry, ChunkSource, FormatError, Metadata, Overlay};
use synth::resolve::{BaseReader, ResolveError, Resolver};
use synth::ImageKind;

const LOCK_STRIPES: usize = 256;

/// The base images: read with `pread` into the caller's buffer, or, for a large read of base
/// chunks only, replied straight from a read-only mapping when the page cache holds them, and
/// read from the disk with `O_DIRECT` into the caller's buffer when it does not.
///
/// A small read (QEMU's random 4 KiB reads) costs less as a `pread` into a warm buffer than as
/// a reply from the mapping: that one made the kernel fault the base pages into the daemon, with
/// fault-around, and unmap them again later to bound the RSS. A large read (sequential
/// readahead, up to 1 MiB a request) costs less from the mapping: the kernel copies the base pages into
/// the reply once, where a `pread` first copies them into the buffer. Both were measured side
/// by side (`BENCHMARKS.md`, cloudletfs, "Run G"). A large read of pages the page cache does
/// not hold would fill the base's page cache only for the reply to copy it into the FUSE
/// file's own: read with `O_DIRECT`, the disk fills the warm buffer instead, and a cold GiB
/// costs the machine less than half the CPU time (run K).
#[derive(Debug)]
pub struct BaseImages {
    disk: BaseFile,
    memory: BaseFile,
}

/// One base image file, its length at mount, and its mapping.
#[derive(Debug)]
struct BaseFile {
    file: File,
    len: u64,
    /// `None` for an empty file (which cannot be mapped).
    map: Option<Mmap>,
    /// Bytes replied from the mapping since its pages were last released.
    mapped_since_release: AtomicU64,
    /// The same file opened with `O_DIRECT`, for large reads of pages the page cache does not
    /// hold; `None` where the file system refuses the flag.
    direct: Option<File>,
    /// Cleared when the file system refuses an `O_DIRECT` read (then the mapping serves).
    direct_ok: AtomicBool,
}

impl BaseFile {
    fn open(path: &Path) -> Result<Self, MountError> {
        let io = |action| {
            move |source| MountError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let file = File::open(path).map_err(io("Opening"))?;
        let len = file.metadata().map_err(io("Reading"))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: base images are immutable files of the registry: nothing writes or
            // truncates them while they are registered, so the mapping stays valid and its
            // bytes do not change.
            Some(unsafe { Mmap::map(&file) }.map_err(io("Mapping"))?)
        };
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| debug!("{}: no O_DIRECT reads: {e}", path.display()))
            .ok();
        Ok(BaseFile {
            file,
            len,
            map,
            mapped_since_release: AtomicU64::new(0),
            direct_ok: AtomicBool::new(true),
            direct,
        })
    }
}

/// The smallest read of base chunks only that is replied from the mapping.
pub const MAPPED_READ_MIN: u64 = 128 << 10;

/// Bytes replied from a base mapping between two releases of its pages.
pub const RELEASE_EVERY: u64 = 8 << 20;

/// The alignment of an `O_DIRECT` read of a base image (offset, length and buffer): a page,
/// which every block device's logical block size divides.
pub const DIRECT_ALIGN: usize = 4096;

/// Whether the page cache holds every page of `mapped`, a page-aligned slice of a base
/// mapping. `true` when the kernel cannot tell (then the mapping serves, as it always may).
fn in_page_cache(mapped: &[u8]) -> bool {
    let mut vec = vec![0u8; mapped.len().div_ceil(DIRECT_ALIGN)];
    // SAFETY: `mapped` lies inside a live mapping of the base file and starts on a page (the
    // caller checks), and `vec` has one byte per page of it, which is all mincore writes.
    let r = unsafe {
        libc::mincore(
            mapped.as_ptr() as *mut libc::c_void,
            mapped.len(),
            vec.as_mut_ptr(),
        )
    };
    r != 0 || vec.iter().all(|p| p & 1 == 1)
}

impl BaseImages {
    /// Opens and maps the two base images.
    pub fn open(disk: &Path, memory: &Path) -> Result<Self, MountError> {
        Ok(BaseImages {
            disk: BaseFile::open(disk)?,
            memory: BaseFile::open(memory)?,
        })
    }

    fn file(&self, image: ImageKind) -> &BaseFile {
        match image {
            ImageKind::Disk => &self.disk,
            ImageKind::Memory => &self.memory,
        }
    }

    /// The length in bytes of a base image.
    pub fn len(&self, image: ImageKind) -> u64 {
        self.file(image).len
    }

    /// Copies base bytes at `offset` into `out`, zeros past the base's end.
    pub fn copy(&self, image: ImageKind, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let f = self.file(image);
        let n = usize::try_from(f.len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(out.len());
        let (data, past_end) = out.split_at_mut(n);
        f.file.read_exact_at(data, offset)?;
        past_end.fill(0);
        Ok(())
    }

    /// Reads the base bytes `offset..offset + n` from the disk with `O_DIRECT` into `buf`,
    /// grown as needed, at an aligned place; returns that place. The read is padded to
    /// [`DIRECT_ALIGN`] (the kernel splits an `O_DIRECT` read of a FUSE file at the pages of
    /// the reader's buffer, so a request's length need not be aligned). `Ok(None)` when this
    /// file or this offset cannot be read that way (then the mapping serves); a refusal of the
    /// file system on a first read turns `O_DIRECT` off for the file.
    fn read_direct(
        &self,
        image: ImageKind,
        offset: u64,
        n: usize,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Option<Range<usize>>> {
        let f = self.file(image);
        let Some(direct) = f
            .direct
            .as_ref()
            .filter(|_| f.direct_ok.load(Ordering::Relaxed))
        else {
            return Ok(None);
        };
        if !offset.is_multiple_of(DIRECT_ALIGN as u64) {
            return Ok(None);
        }
        let padded = n.next_multiple_of(DIRECT_ALIGN);
        if buf.len() < padded + DIRECT_ALIGN {
            buf.resize(padded + DIRECT_ALIGN, 0);
        }
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN {
            return Ok(None);
        }
        let mut done = 0;
        while done < n {
            let into = &mut buf[start + done..start + padded];
            match direct.read_at(into, offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(got) => done += got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if done == 0 {
                        f.direct_ok.store(false, Ordering::Relaxed);
                        warn!(
                            "the base {} refuses O_DIRECT reads ({e}); reading it through \
                             the page cache",
                            image.name()
                        );
                    }
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(start..start + n))
    }

    /// A large read of base bytes `offset..end`: the mapped bytes when the page cache holds
    /// them all, else the bytes read with `O_DIRECT` into `buf` (see [`BaseImages`]). `None`
    /// when the range is not all inside the base.
    fn read_large<'a>(
        &'a self,
        image: ImageKind,
        offset: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Option<ReadOut<'a>>> {
        let Some(mapped) = self.mapped(image, offset, end) else {
            return Ok(None);
        };
        if offset.is_multiple_of(DIRECT_ALIGN as u64) && !in_page_cache(mapped) {
            if let Some(at) = self.read_direct(image, offset, mapped.len(), buf)? {
                return Ok(Some(ReadOut::Buffer(at)));
            }
        }
        Ok(Some(ReadOut::Mapped(mapped)))
    }

    /// The mapped base bytes `offset..end`, if they are all inside the base.
    fn mapped(&self, image: ImageKind, offset: u64, end: u64) -> Option<&[u8]> {
        let m = self.file(image).map.as_deref()?;
        m.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
    }

    /// Accounts `len` bytes of a base image as replied from its mapping; every
    /// [`RELEASE_EVERY`] bytes, drops the daemon's page mappings of the whole image so that
    /// serving a large base does not grow the daemon's RSS. The pages stay in the page cache and
    /// are mapped again on the next access. One call per 8 MiB rather than one per read keeps
    /// the cost (a TLB shootdown across the FUSE threads) off the read path.
    pub fn release(&self, image: ImageKind, len: usize) {
        let f = self.file(image);
        let Some(m) = &f.map else { return };
        let before = f
            .mapped_since_release
            .fetch_add(len as u64, Ordering::Relaxed);
        if before.saturating_add(len as u64) < RELEASE_EVERY {
            return;
        }
        f.mapped_since_release.store(0, Ordering::Relaxed);
        // SAFETY: the mapping is of an immutable, read-only file (see `BaseFile::open`).
        // MADV_DONTNEED on a shared file mapping only drops page-table entries: any slice into
        // it, here or in another thread, reads the same bytes again from the page cache on its
        // next access, so no live reference observes a change.
        let r = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        if let Err(e) = r {
            debug!("madvise(DONTNEED) on the base mapping failed: {e}");
        }
    }
}

impl BaseReader for BaseImages {
    fn read_chunk(&self, image: ImageKind, chunk: u64, out: &mut [u8]) -> std::io::Result<()> {
        let offset = chunk.checked_mul(CHUNK_SIZE_U64).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk number overflows")
        })?;
        self.copy(image, offset, out)
    }
}

/// One served image.
#[derive(Debug)]
pub struct Image {
    /// Which image.
    pub kind: ImageKind,
    /// Size in bytes.
    pub size: u64,
    /// Chunk states.
    pub map: ChunkMap,
    cache: File,
    cache_in_memory: bool,
    /// Copy-on-write store.
    pub store: Store,
    /// Counters.
    pub counters: Counters,
    /// Chunks read or written.
    pub accessed: Stream,
    /// Chunks written.
    pub modified: Stream,
    /// Chunks discarded.
    pub discarded: Stream,
    locks: Vec<Mutex<()>>,
    in_overlay: u64,
}

impl Image {
    fn lock(&self, chunk: u64) -> MutexGuard<'_, ()> {
        let i = usize::try_from(chunk % LOCK_STRIPES as u64).unwrap_or(0);
        match self.locks[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn chunks(&self) -> u64 {
        self.map.len()
    }

    /// A snapshot of this image's counters.
    pub fn stats(&self) -> ImageStats {
        let c = &self.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        ImageStats {
            image: self.kind.name().to_string(),
            size: self.size,
            chunks: ChunkCounts {
                total: self.chunks(),
                from_base: self.chunks() - self.in_overlay,
                in_overlay: self.in_overlay,
                pending: self.map.pending(),
                fetched_on_demand: ld(&c.fetched_on_demand),
                filled_in_background: ld(&c.filled_in_background),
                modified: self.modified.count(),
                discarded: self.discarded.count(),
                accessed: self.accessed.count(),
            },
            bytes_read: ld(&c.bytes_read),
            bytes_written: ld(&c.bytes_written),
            wait_histogram: c.histogram(),
            waiting_now: ld(&c.waiting_now),
            verification_failures: ld(&c.verification_failures),
            fetch_errors: ld(&c.fetch_errors),
            cache_in_memory: self.cache_in_memory,
            cow: self.store.cow_stats(),
        }
    }
}

/// How [`Core::await_chunk`] got a pending chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaited {
    /// It is no longer pending: read it by its state.
    Ready,
    /// Rebuilt from its decoded segment into the caller's buffer; it may still be pending.
    Served,
}

/// Where the bytes of a read are.
#[derive(Debug)]
pub enum ReadOut<'a> {
    /// In the base mapping (a large read of base chunks only); account them with
    /// [`BaseImages::release`] once replied.
    Mapped(&'a [u8]),
    /// These bytes of the caller's buffer.
    Buffer(Range<usize>),
}

/// Everything a mounted overlay shares between FUSE threads and fetch workers.
#[derive(Debug)]
pub struct Core {
    /// Overlay metadata.
    pub meta: Arc<Metadata>,
    /// The overlay reader.
    pub overlay: Overlay,
    /// Base images.
    pub base: BaseImages,
    images: [Image; 2],
    /// Segment scheduling.
    pub queue: FetchQueue,
    /// Wakes readers waiting for pending chunks.
    pub waiter: Waiter,
    /// Longest a request waits for a pending chunk.
    pub wait_timeout: Duration,
    shutdown: AtomicBool,
    /// Self references by target payload chunk: `(image, chunk)` → referring chunks.
    pub referrers: HashMap<(ImageKind, u64), Vec<(ImageKind, u64)>>,
    /// Chunks of both images in the order they were first read or written (the working set
    /// a new overlay stores first), up to [`FIRST_TOUCH_MAX`] entries.
    first_touch: Mutex<Vec<(ImageKind, u64)>>,
}

/// Most first touches recorded (4 MiB of memory).
pub const FIRST_TOUCH_MAX: usize = 1 << 18;

/// What [`Core::new`] needs.
#[derive(Debug)]
pub struct CoreParts<'a> {
    /// Validated overlay (checked against the base).
    pub overlay: Overlay,
    /// Mapped base images.
    pub base: BaseImages,
    /// Base id (the state journal is keyed to it and to the overlay's id).
    pub base_id: synth::Digest,
    /// Persistent state directory.
    pub state_dir: Option<&'a Path>,
    /// Folder for unlinked cache and scratch files.
    pub cache_dir: &'a Path,
    /// Keep rebuilt chunks in memory (`memory_file`) instead of a file in `cache_dir`.
    pub cache_in_memory: bool,
    /// Longest a request waits for a pending chunk.
    pub wait_timeout: Duration,
    /// Most bytes of modified chunks (both images) kept; `None`: no limit.
    pub cow_quota: Option<u64>,
}

/// The name of the memfds holding rebuilt chunks (`/proc/PID/fd` shows `/memfd:` + it).
pub const MEMORY_CACHE_NAME: &std::ffi::CStr = c"cloudletfs-cache";

/// An unlinked file in memory (a memfd): pages the kernel may swap out, but never writes
/// back to a disk. Rebuilt chunks are written there one 4 KiB chunk at a time, which costs
/// several times less than in a file on ext4 and holds no lock a reader may queue behind.
fn memory_file() -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string that outlives the call; MFD_CLOEXEC is a
    // valid flag. memfd_create only returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(MEMORY_CACHE_NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

/// The part of chunks `first..end_chunk` inside a request for bytes `offset..end` of an image:
/// where it starts in the image, and where it lies in the request's buffer.
fn span(
    offset: u64,
    end: u64,
    first: u64,
    end_chunk: u64,
) -> Result<(u64, std::ops::Range<usize>), ServeError> {
    let lo = offset.max(first * CHUNK_SIZE_U64);
    let hi = end.min(end_chunk * CHUNK_SIZE_U64);
    let at = |x: u64| usize::try_from(x - offset).map_err(|_| ServeError::OutOfRange(offset));
    Ok((lo, at(lo)?..at(hi)?))
}

fn padded(size: u64) -> u64 {
    chunk_count(size) * CHUNK_SIZE_U64
}

impl Core {
    /// Builds the chunk maps (restoring persistent state) and the cache files.
    pub fn new(p: CoreParts<'_>) -> Result<Core, MountError> {
        let meta = p.overlay.metadata_arc();
        let owner = StateOwner {
            base: p.base_id,
            overlay: p.overlay.id(),
        };
        let quota = Arc::new(CowQuota::new(p.cow_quota));
        let make = |kind: ImageKind| -> Result<Image, MountError> {
            let map_meta = meta.image(kind);
            let size = map_meta.size;
            let map = ChunkMap::new(chunk_count(size));
            for e in &map_meta.chunks {
                map.init(e.chunk, ChunkState::Pending);
            }
            let (cache, at) = if p.cache_in_memory {
                (memory_file(), Path::new("memory"))
            } else {
                (tempfile::tempfile_in(p.cache_dir), p.cache_dir)
            };
            let io = |action| {
                move |source| MountError::Io {
                    action,
                    path: at.to_path_buf(),
                    source,
                }
            };
            let cache = cache.map_err(io("Creating a cache file in"))?;
            cache
                .set_len(padded(size))
                .map_err(io("Sizing a cache file in"))?;
            let (store, restored) =
                Store::open(p.state_dir, p.cache_dir, kind, padded(size), &owner, &quota)?;
            let n = chunk_count(size);
            let img = Image {
                kind,
                size,
                map,
                cache,
                cache_in_memory: p.cache_in_memory,
                store,
                counters: Counters::default(),
                accessed: Stream::new(n),
                modified: Stream::new(n),
                discarded: Stream::new(n),
                locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
                in_overlay: map_meta.chunks.len() as u64,
            };
            for (chunk, state) in restored {
                if chunk < n {
                    img.map.set(chunk, state);
                    let _ = match state {
                        ChunkState::Discarded => img.discarded.add(chunk),
                        _ => img.modified.add(chunk),
                    };
                }
            }
            if p.state_dir.is_some() {
                log::info!(
                    "{}: {} chunks restored from state",
                    kind.name(),
                    img.modified.count() + img.discarded.count()
                );
            }
            Ok(img)
        };
        let images = [make(ImageKind::Disk)?, make(ImageKind::Memory)?];
        let mut referrers: HashMap<(ImageKind, u64), Vec<(ImageKind, u64)>> = HashMap::new();
        for kind in ImageKind::ALL {
            for e in &meta.image(kind).chunks {
                if let ChunkSource::SelfRef { image, chunk } = e.source {
                    referrers
                        .entry((image, chunk))
                        .or_default()
                        .push((kind, e.chunk));
                }
            }
        }
        Ok(Core {
            queue: FetchQueue::new(meta.segments.len()),
            meta,
            overlay: p.overlay,
            base: p.base,
            images,
            waiter: Waiter::default(),
            wait_timeout: p.wait_timeout,
            shutdown: AtomicBool::new(false),
            referrers,
            first_touch: Mutex::new(Vec::new()),
        })
    }

    fn first_touched(&self, kind: ImageKind, chunk: u64) {
        if let Ok(mut v) = self.first_touch.lock() {
            if v.len() < FIRST_TOUCH_MAX {
                v.push((kind, chunk));
            }
        }
    }

    /// Chunks in first-touch order (see [`FIRST_TOUCH_MAX`]).
    pub fn first_touch_order(&self) -> Vec<(ImageKind, u64)> {
        self.first_touch
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// The image of `kind`.
    pub fn image(&self, kind: ImageKind) -> &Image {
        match kind {
            ImageKind::Disk => &self.images[0],
            ImageKind::Memory => &self.images[1],
        }
    }

    /// Stops serving: waiting requests fail, workers stop, parked stream reads end.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.queue.shutdown();
        self.waiter.notify();
        self.close_streams();
    }

    /// Ends every parked stream read.
    pub fn close_streams(&self) {
        for img in &self.images {
            for s in [&img.accessed, &img.modified, &img.discarded] {
                s.close_all();
            }
        }
    }

    /// Whether [`Core::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// A snapshot of all counters.
    pub fn stats(&self) -> Stats {
        Stats {
            disk: self.image(ImageKind::Disk).stats(),
            memory: self.image(ImageKind::Memory).stats(),
            fetch: self.queue.stats(),
        }
    }

    /// Chunks of both images still pending.
    pub fn pending(&self) -> u64 {
        self.images.iter().map(|i| i.map.pending()).sum()
    }

    /// Rebuilds a pending chunk from `segment` (decoded) into the cache file and marks it
    /// ready; a chunk failing verification is marked failed.
    pub(crate) fn rebuild(
        &self,
        kind: ImageKind,
        entry: &ChunkEntry,
        segment: Option<&[u8]>,
        demand: bool,
    ) -> Result<(), ServeError> {
        let img = self.image(kind);
        if img.map.get(entry.chunk) != ChunkState::Pending {
            return Ok(());
        }
        let mut buf = [0u8; CHUNK_SIZE];
        self.resolve(kind, entry, segment, &mut buf)?;
        if !is_zero(&buf) {
            let off = entry.chunk * CHUNK_SIZE_U64;
            img.cache
                .write_all_at(&buf, off)
                .map_err(ServeError::io("Writing the cache file"))?;
        }
        if img
            .map
            .transition(entry.chunk, ChunkState::Pending, ChunkState::Ready)
        {
            let c = if demand {
                &img.counters.fetched_on_demand
            } else {
                &img.counters.filled_in_background
            };
            Counters::add(c, 1);
        }
        Ok(())
    }

    /// Rebuilds an overlay chunk from `segment` (decoded) into `out`, verified; a chunk failing
    /// verification is marked failed.
    fn resolve(
        &self,
        kind: ImageKind,
        entry: &ChunkEntry,
        segment: Option<&[u8]>,
        out: &mut [u8; CHUNK_SIZE],
    ) -> Result<(), ServeError> {
        match Resolver::new(&self.meta, &self.base).resolve(kind, entry, segment, out) {
            Ok(()) => Ok(()),
            Err(ResolveError::Base { source, .. }) => Err(ServeError::Io {
                action: "Reading the base",
                source,
            }),
            Err(e) => {
                self.fail_chunk(kind, entry.chunk, &e);
                Err(ServeError::Corrupt {
                    image: kind,
                    chunk: entry.chunk,
                })
            }
        }
    }

    /// Marks a pending chunk failed (verification), counting and logging it once.
    pub(crate) fn fail_chunk(&self, kind: ImageKind, chunk: u64, why: &dyn std::error::Error) {
        let img = self.image(kind);
        if img
            .map
            .transition(chunk, ChunkState::Pending, ChunkState::Failed)
        {
            Counters::add(&img.counters.verification_failures, 1);
            error!(
                "{} chunk {chunk} failed verification: {}",
                kind.name(),
                chain(why)
            );
        }
    }

    /// The overlay entry of a chunk.
    fn entry(&self, kind: ImageKind, chunk: u64) -> Result<&ChunkEntry, ServeError> {
        self.meta
            .image(kind)
            .find(chunk)
            .ok_or(ServeError::Inconsistent { image: kind, chunk })
    }

    /// The segment a pending chunk needs, if any.
    fn needed_segment(&self, kind: ImageKind, chunk: u64) -> Option<u32> {
        let e = self.entry(kind, chunk).ok()?;
        Resolver::new(&self.meta, &self.base).needed_segment(kind, e)
    }

    /// Waits until `chunk` is no longer pending (asking for its segment at top priority).
    pub fn ensure_ready(&self, kind: ImageKind, chunk: u64) -> Result<(), ServeError> {
        self.await_chunk(kind, chunk, None).map(|_| ())
    }

    /// Waits for a pending chunk: until it is no longer pending or, given `out`, until its
    /// segment is decoded, and then rebuilds it into `out` (verified) without waiting for it
    /// to be written to the cache file. Asks for the segment at top priority, and decodes it in
    /// this thread if no one has it yet.
    fn await_chunk(
        &self,
        kind: ImageKind,
        chunk: u64,
        mut out: Option<&mut [u8; CHUNK_SIZE]>,
    ) -> Result<Awaited, ServeError> {
        let img = self.image(kind);
        let mut waiting: Option<(Instant, u32, u32)> = None;
        // Counted in the stats' `waiting_now` from the first wait to the return.
        let mut _counted = None;
        let deadline = Instant::now() + self.wait_timeout;
        let waited = |waiting: Option<(Instant, u32, u32)>| {
            if let Some((t, _, _)) = waiting {
                img.counters.record_wait(t.elapsed());
            }
        };
        loop {
            match img.map.get(chunk) {
                ChunkState::Pending => {}
                ChunkState::Failed => return Err(ServeError::Corrupt { image: kind, chunk }),
                _ => {
                    waited(waiting);
                    return Ok(Awaited::Ready);
                }
            }
            if self.is_shut_down() {
                return Err(ServeError::Shutdown);
            }
            let entry = self.entry(kind, chunk)?;
            let Some(seg) = Resolver::new(&self.meta, &self.base).needed_segment(kind, entry)
            else {
                self.rebuild(kind, entry, None, true)?;
                continue;
            };
            let gen = self.waiter.generation();
            if img.map.get(chunk) != ChunkState::Pending {
                continue;
            }
            // Decoded but not yet rebuilt (its rest waits, maybe held by this very thread for
            // an earlier chunk of the same request): take the chunk from it, wait for no one.
            if let Some(data) = self.queue.decoded(seg) {
                match out.as_deref_mut() {
                    Some(out) => {
                        self.resolve(kind, entry, Some(&data), out)?;
                        waited(waiting);
                        return Ok(Awaited::Served);
                    }
                    None => {
                        self.rebuild(kind, entry, Some(&data), true)?;
                        continue;
                    }
                }
            }
            match waiting {
                None => {
                    waiting = Some((Instant::now(), seg, self.queue.failures(seg)));
                    _counted = Some(img.counters.waiting());
                    // Nobody has the segment yet: fetch and decode it in this thread.
                    if self.queue.claim(seg, crate::fetch::claim_bytes(self, seg)) {
                        debug!("{} chunk {chunk}: decoding segment {seg}", kind.name());
                        crate::fetch::run_claimed(self, seg);
                        continue;
                    }
                    debug!("{} chunk {chunk}: waiting for segment {seg}", kind.name());
                    self.queue.demand(seg);
                }
                Some((_, s, fails)) => {
                    if self.queue.failures(s) != fails {
                        Counters::add(&img.counters.fetch_errors, 1);
                        return Err(ServeError::Fetch { segment: s });
                    }
                    // A corrupt segment whose chunk was not marked (cannot happen) must not hang.
                    if self.queue.is_corrupt(s) {
                        return Err(ServeError::Corrupt { image: kind, chunk });
                    }
                    self.queue.demand(s);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                Counters::add(&img.counters.fetch_errors, 1);
                return Err(ServeError::Timeout { image: kind, chunk });
            }
            self.waiter
                .wait(gen, (deadline - now).min(Duration::from_millis(500)));
        }
    }

    fn range(&self, img: &Image, offset: u64, len: u64) -> Option<(u64, u64, u64)> {
        let end = offset.checked_add(len)?.min(img.size);
        if offset >= end {
            return None;
        }
        Some((end, offset / CHUNK_SIZE_U64, (end - 1) / CHUNK_SIZE_U64))
    }

    /// Whether reading or writing `len` bytes at `offset` may wait for the network: some
    /// chunk in the range is still pending. (A chunk never becomes pending again, so `false`
    /// stays true.)
    pub fn may_wait(&self, kind: ImageKind, offset: u64, len: u64) -> bool {
        let img = self.image(kind);
        self.range(img, offset, len)
            .is_some_and(|(_, first, last)| {
                (first..=last).any(|c| img.map.get(c) == ChunkState::Pending)
            })
    }

    /// Reads up to `len` bytes at `offset` of an image (the image may end first): from the
    /// base mapping, or into `buf`. `buf` is only grown, never shrunk or cleared, so that a
    /// caller that keeps it across reads (one per FUSE thread) neither allocates nor zeroes
    /// memory per read.
    pub fn read(
        &self,
        kind: ImageKind,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<ReadOut<'_>, ServeError> {
        let img = self.image(kind);
        let Some((end, first, last)) = self.range(img, offset, len) else {
            return Ok(ReadOut::Buffer(0..0));
        };
        let mut all_base = true;
        // The first pending chunk's segment is decoded by this thread (`await_chunk`); the
        // segments of the others are asked of the workers now, to decode meanwhile.
        let mut own_segment = None;
        for c in first..=last {
            if img.accessed.add(c) {
                self.first_touched(img.kind, c);
            }
            match img.map.get(c) {
                ChunkState::Base => {}
                ChunkState::Pending => {
                    all_base = false;
                    if let Some(seg) = self.needed_segment(kind, c) {
                        match own_segment {
                            None => own_segment = Some(seg),
                            Some(s) if s != seg => self.queue.demand(seg),
                            Some(_) => {}
                        }
                    }
                }
                _ => all_base = false,
            }
        }
        Counters::add(&img.counters.bytes_read, end - offset);
        if all_base && end - offset >= MAPPED_READ_MIN {
            let large = self.base.read_large(kind, offset, end, buf);
            if let Some(out) = large.map_err(ServeError::io("Reading the base image"))? {
                return Ok(out);
            }
        }
        let n = usize::try_from(end - offset).map_err(|_| ServeError::OutOfRange(offset))?;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let buf = &mut buf[..n];
        let mut c = first;
        while c <= last {
            let st = img.map.get(c);
            if st == ChunkState::Pending || st == ChunkState::Failed {
                let mut chunk = [0u8; CHUNK_SIZE];
                if self.await_chunk(kind, c, Some(&mut chunk))? == Awaited::Served {
                    let (lo, to) = span(offset, end, c, c + 1)?;
                    let from = usize::try_from(lo % CHUNK_SIZE_U64).unwrap_or(0);
                    buf[to.clone()].copy_from_slice(&chunk[from..from + to.len()]);
                    c += 1;
                }
                continue;
            }
            let mut j = c + 1;
            while j <= last && img.map.get(j) == st {
                j += 1;
            }
            let (lo, to) = span(offset, end, c, j)?;
            let out = &mut buf[to];
            match st {
                ChunkState::Base => self
                    .base
                    .copy(kind, lo, out)
                    .map_err(ServeError::io("Reading the base image"))?,
                ChunkState::Ready => img
                    .cache
                    .read_exact_at(out, lo)
                    .map_err(ServeError::io("Reading the cache file"))?,
                ChunkState::Modified => img
                    .store
                    .read_at(out, lo)
                    .map_err(ServeError::io("Reading the state file"))?,
                ChunkState::Discarded => out.fill(0),
                ChunkState::Pending | ChunkState::Failed => continue,
            }
            c = j;
        }
        Ok(ReadOut::Buffer(0..n))
    }

    /// Writes `data` at `offset` (clipped to the image size); returns the bytes written.
    pub fn write(&self, kind: ImageKind, offset: u64, data: &[u8]) -> Result<u64, ServeError> {
        let img = self.image(kind);
        let Some((end, first, last)) = self.range(img, offset, data.len() as u64) else {
            return Err(ServeError::OutOfRange(offset));
        };
        for c in first..=last {
            let (lo, from) = span(offset, end, c, c + 1)?;
            self.write_chunk(img, c, lo, &data[from])?;
        }
        Counters::add(&img.counters.bytes_written, end - offset);
        Ok(end - offset)
    }

    /// Writes `part` at `lo` inside chunk `c` (copy-on-write).
    fn write_chunk(&self, img: &Image, c: u64, lo: u64, part: &[u8]) -> Result<(), ServeError> {
        let start = c * CHUNK_SIZE_U64;
        let chunk_end = img.size.min(start + CHUNK_SIZE_U64);
        let full = lo == start && lo + part.len() as u64 == chunk_end;
        loop {
            let guard = img.lock(c);
            let st = img.map.get(c);
            match st {
                ChunkState::Modified => {
                    img.store
                        .write_at(part, lo)
                        .map_err(ServeError::io("Writing the state file"))?;
                }
                ChunkState::Pending if !full => {
                    drop(guard);
                    self.ensure_ready(img.kind, c)?;
                    continue;
                }
                ChunkState::Failed if !full => {
                    return Err(ServeError::Corrupt {
                        image: img.kind,
                        chunk: c,
                    })
                }
                _ => {
                    let mut buf = vec![0u8; CHUNK_SIZE];
                    if !full {
                        match st {
                            ChunkState::Base => self
                                .base
                                .copy(img.kind, start, &mut buf)
                                .map_err(ServeError::io("Reading the base image"))?,
                            ChunkState::Ready => img
                                .cache
                                .read_exact_at(&mut buf, start)
                                .map_err(ServeError::io("Reading the cache file"))?,
                            _ => {}
                        }
                    }
                    let at = usize::try_from(lo - start).unwrap_or(0);
                    buf[at..at + part.len()].copy_from_slice(part);
                    img.store.write_chunk(c, &buf, st)?;
                    img.map.set(c, ChunkState::Modified);
                }
            }
            drop(guard);
            break;
        }
        img.modified.add(c);
        if img.accessed.add(c) {
            self.first_touched(img.kind, c);
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset`: whole chunks become discarded (zeros), partial ones
    /// are overwritten with zeros.
    pub fn discard(&self, kind: ImageKind, offset: u64, len: u64) -> Result<(), ServeError> {
        let img = self.image(kind);
        let Some((end, _, _)) = self.range(img, offset, len) else {
            return Ok(());
        };
        let first_full = offset.div_ceil(CHUNK_SIZE_U64);
        let end_full = if end == img.size {
            chunk_count(end)
        } else {
            end / CHUNK_SIZE_U64
        };
        let zeros = vec![0u8; CHUNK_SIZE];
        if first_full >= end_full {
            let n = usize::try_from(end - offset).unwrap_or(0);
            self.write(kind, offset, &zeros[..n.min(CHUNK_SIZE)])?;
            if n > CHUNK_SIZE {
                // Spans two partial chunks with no whole one between.
                let mid = first_full * CHUNK_SIZE_U64;
                self.write(kind, mid, &zeros[..usize::try_from(end - mid).unwrap_or(0)])?;
            }
            return Ok(());
        }
        let head_end = first_full * CHUNK_SIZE_U64;
        if offset < head_end {
            self.write(
                kind,
                offset,
                &zeros[..usize::try_from(head_end - offset).unwrap_or(0)],
            )?;
        }
        let tail_start = end_full * CHUNK_SIZE_U64;
        if tail_start < end {
            self.write(
                kind,
                tail_start,
                &zeros[..usize::try_from(end - tail_start).unwrap_or(0)],
            )?;
        }
        for c in first_full..end_full {
            let guard = img.lock(c);
            let was = img.map.set(c, ChunkState::Discarded);
            img.store
                .discard(c, was)
                .map_err(ServeError::io("Writing the journal"))?;
            drop(guard);
            img.discarded.add(c);
            if img.accessed.add(c) {
                self.first_touched(img.kind, c);
            }
        }
        img.store
            .punch(first_full, end_full - first_full)
            .map_err(ServeError::io("Punching the state file"))?;
        debug!("{}: discarded chunks {first_full}..{end_full}", kind.name());
        Ok(())
    }

    /// Makes the image's modified and discarded state durable.
    pub fn sync(&self, kind: ImageKind) -> Result<(), ServeError> {
        self.image(kind)
            .store
            .sync()
            .map_err(ServeError::io("Syncing the state"))
    }

    /// Chunks of a corrupt segment and those referring to them: marks them failed.
    pub(crate) fn fail_segment(&self, seg: usize, why: &FormatError) {
        let Some(s) = self.meta.segments.get(seg) else {
            return;
        };
        for &(kind, chunk) in &s.chunks {
            self.fail_chunk(kind, chunk, why);
            for &(rk, rc) in self.referrers.get(&(kind, chunk)).into_iter().flatten() {
                self.fail_chunk(rk, rc, why);
            }
        }
    }
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
