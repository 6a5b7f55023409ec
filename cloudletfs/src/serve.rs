//! Serving one image: reads, writes and discards assembled chunk by chunk, according to the
//! chunk map, from the base images ([`crate::base`]), the cache of rebuilt overlay chunks
//! ([`crate::cache`]), the copy-on-write store or zeros.
//!
//! ```text
//!  Core::read ─► per chunk state: Base ─► BaseImages (pread, mapping or O_DIRECT)
//!                                 Ready ─► ChunkCache
//!                                 Modified ─► Store (state file)
//!                                 Discarded ─► zeros
//!                                 Pending ─► await_chunk: take the chunk from its segment
//!                                   if decoded, else decode the segment in this thread
//!                                   (fetch::run_claimed) or ask the fetch workers for it
//! ```
//!
//! [`Core`] ties the pieces together and is shared (through an `Arc`) by the FUSE threads and
//! the fetch workers. It owns the mount's [`Fetcher`] and is the [`ChunkSink`] the fetch
//! workers rebuild chunks into: fetching knows the core only through that trait.

use crate::base::{BaseImages, ReadOut, MAPPED_READ_MIN};
use crate::cache::ChunkCache;
use crate::chunkmap::{ChunkMap, ChunkState};
use crate::error::{chain, MountError, ServeError};
use crate::fetch::{run_claimed, ChunkSink, Fetcher};
use crate::stats::{ChunkCounts, Counters, ImageStats, Stats};
use crate::store::{CowQuota, StateOwner, Store};
use crate::streams::Stream;
use log::{debug, error};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use synth::chunk::{chunk_count, is_zero, CHUNK_SIZE, CHUNK_SIZE_U64};
use synth::format::{ChunkEntry, Metadata, Overlay};
use synth::resolve::{ResolveError, Resolver};
use synth::ImageKind;

const LOCK_STRIPES: usize = 256;

/// One served image.
#[derive(Debug)]
pub struct Image {
    /// Which image.
    pub kind: ImageKind,
    /// Size in bytes.
    pub size: u64,
    /// Chunk states.
    pub map: ChunkMap,
    cache: ChunkCache,
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
            cache_in_memory: self.cache.in_memory(),
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

/// Everything a mounted overlay shares between FUSE threads and fetch workers.
#[derive(Debug)]
pub struct Core {
    /// Overlay metadata.
    pub meta: Arc<Metadata>,
    /// Base images.
    pub base: BaseImages,
    images: [Image; 2],
    /// The overlay, its segment queue and the waiter of readers of pending chunks.
    pub fetcher: Fetcher,
    /// Longest a request waits for a pending chunk.
    pub wait_timeout: Duration,
    shutdown: AtomicBool,
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
    /// Keep rebuilt chunks in memory (a memfd, see [`ChunkCache`]) instead of a file in
    /// `cache_dir`.
    pub cache_in_memory: bool,
    /// Longest a request waits for a pending chunk.
    pub wait_timeout: Duration,
    /// Most bytes of modified chunks (both images) kept; `None`: no limit.
    pub cow_quota: Option<u64>,
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
            let cache = ChunkCache::create(p.cache_in_memory, p.cache_dir, padded(size))?;
            let (store, restored) =
                Store::open(p.state_dir, p.cache_dir, kind, padded(size), &owner, &quota)?;
            let n = chunk_count(size);
            let img = Image {
                kind,
                size,
                map,
                cache,
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
        Ok(Core {
            meta,
            fetcher: Fetcher::new(p.overlay),
            base: p.base,
            images,
            wait_timeout: p.wait_timeout,
            shutdown: AtomicBool::new(false),
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
        self.fetcher.queue.shutdown();
        self.fetcher.waiter.notify();
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
            fetch: self.fetcher.queue.stats(),
        }
    }

    /// Chunks of both images still pending.
    pub fn pending(&self) -> u64 {
        self.images.iter().map(|i| i.map.pending()).sum()
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

    /// The overlay entry of a chunk.
    fn entry(&self, kind: ImageKind, chunk: u64) -> Result<&ChunkEntry, ServeError> {
        self.meta
            .image(kind)
            .find(chunk)
            .ok_or(ServeError::Inconsistent { image: kind, chunk })
    }

    /// The segment a pending chunk needs, if any.
    fn segment_of(&self, kind: ImageKind, chunk: u64) -> Option<u32> {
        let e = self.entry(kind, chunk).ok()?;
        self.needed_segment(kind, e)
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
            let Some(seg) = self.needed_segment(kind, entry) else {
                self.rebuild(kind, entry, None, true)?;
                continue;
            };
            let gen = self.fetcher.waiter.generation();
            if img.map.get(chunk) != ChunkState::Pending {
                continue;
            }
            // Decoded but not yet rebuilt (its rest waits, maybe held by this very thread for
            // an earlier chunk of the same request): take the chunk from it, wait for no one.
            if let Some(data) = self.fetcher.queue.decoded(seg) {
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
                    waiting = Some((Instant::now(), seg, self.fetcher.queue.failures(seg)));
                    _counted = Some(img.counters.waiting());
                    // Nobody has the segment yet: fetch and decode it in this thread.
                    if self.fetcher.queue.claim(seg, self.fetcher.claim_bytes(seg)) {
                        debug!("{} chunk {chunk}: decoding segment {seg}", kind.name());
                        run_claimed(self, seg);
                        continue;
                    }
                    debug!("{} chunk {chunk}: waiting for segment {seg}", kind.name());
                    self.fetcher.queue.demand(seg);
                }
                Some((_, s, fails)) => {
                    if self.fetcher.queue.failures(s) != fails {
                        Counters::add(&img.counters.fetch_errors, 1);
                        return Err(ServeError::Fetch { segment: s });
                    }
                    // A corrupt segment whose chunk was not marked (cannot happen) must not hang.
                    if self.fetcher.queue.is_corrupt(s) {
                        return Err(ServeError::Corrupt { image: kind, chunk });
                    }
                    self.fetcher.queue.demand(s);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                Counters::add(&img.counters.fetch_errors, 1);
                return Err(ServeError::Timeout { image: kind, chunk });
            }
            self.fetcher
                .waiter
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
                    if let Some(seg) = self.segment_of(kind, c) {
                        match own_segment {
                            None => own_segment = Some(seg),
                            Some(s) if s != seg => self.fetcher.queue.demand(seg),
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
                    .read_at(out, lo)
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
                                .read_at(&mut buf, start)
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
}

/// What the fetch workers (and a reader decoding a segment itself) see of the core.
impl ChunkSink for Core {
    fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    fn needed_segment(&self, kind: ImageKind, entry: &ChunkEntry) -> Option<u32> {
        Resolver::new(&self.meta, &self.base).needed_segment(kind, entry)
    }

    /// Rebuilds a pending chunk from `segment` (decoded) into the cache file and marks it
    /// ready; a chunk failing verification is marked failed.
    fn rebuild(
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
                .write_at(&buf, off)
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

    /// Marks a pending chunk failed (verification), counting and logging it once.
    fn fail_chunk(&self, kind: ImageKind, chunk: u64, why: &dyn std::error::Error) {
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

    fn is_shut_down(&self) -> bool {
        Core::is_shut_down(self)
    }
}
