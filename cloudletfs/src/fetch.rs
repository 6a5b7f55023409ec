//! Segment fetching: a priority queue where demand requests (a read waiting for a chunk) jump
//! ahead of the background filler.
//!
//! ```text
//!  reader of a pending chunk (serve) ─► FetchQueue::claim ─► run_claimed in the reader's thread
//!                                    └► FetchQueue::demand ─► demand workers (or the filler)
//!  background filler ─► its own walk over the segments, demands and rests first
//!  fetch_segment: Overlay::read_segment_with(priority) ─► publish ─► rebuild_rest
//!                 ─► ChunkSink::rebuild per chunk (cache, Ready) ─► FetchQueue::finish
//! ```
//!
//! - Demand workers (`fetch_threads` of them) take only demand requests, so a demand never
//!   waits behind a background decode.
//! - One background filler first rebuilds the overlay chunks that need no segment (zeros, base
//!   references), then walks the segments in overlay order, always taking a queued demand
//!   first. When it reaches the end (retrying transiently failed segments a few times), it
//!   stops: nothing more is fetched unless a read asks.
//! - A worker fetches, verifies and decodes a segment with [`Overlay::read_segment_with`] and
//!   *publishes* it ([`FetchQueue::decoded`]) until all its chunks (and every self reference to
//!   them) are rebuilt and verified into the cache by [`ChunkSink::rebuild`]:
//!   the filler rebuilds them all at once, a demand worker hands them on as a reader does
//!   (below).
//! - A reader waiting for a chunk of a published segment takes the chunk from it (verified
//!   against the digest the decoded segment carries after its payloads, see `synth::format`)
//!   straight into its reply, and writes nothing: the cache write, which in a cache file on
//!   ext4 can queue behind the idle worker's writes to the same file, stays off the reply's
//!   path.
//! - A reader that finds its chunk's segment not yet taken claims it ([`FetchQueue::claim`])
//!   and runs `run_claimed` in its own (FUSE or waiter) thread: fetch, decode, publish,
//!   reply, and only then hand the rebuilding of the segment on (`RestAfterReply`). That
//!   spares the two thread hand-offs (reader → worker → reader) that made the tail of the
//!   first-read latency on a busy machine. At most [`MAX_CLAIMED`] readers do so at once,
//!   holding at most [`MAX_CLAIMED_BYTES`] of compressed and decoded segments together until
//!   their rests are handed on; the others leave their segment to the demand workers.
//! - The *rest* of a segment decoded on demand is rebuilt by one rest worker under
//!   `SCHED_IDLE`, so that it never takes a CPU from a reader (a nice 19 thread still keeps its
//!   CPU for a whole time slice, ~3 ms here, when a reader wakes), or by the background filler,
//!   which takes a waiting rest before its next own segment. Published rests are bounded
//!   ([`MAX_QUEUED_REST_BYTES`]); past that, the thread that decoded the segment rebuilds its
//!   rest itself.
//! - Each segment read tells the byte source who waits for it ([`Priority`]): a demand
//!   request or a reader's claimed segment is read as [`Priority::Demand`], whichever thread
//!   runs it (the reader itself, a demand worker, or the filler taking a queued demand); the
//!   filler's own walk as [`Priority::Background`]. The rest worker reads no segment: it only
//!   rebuilds decoded ones.
//!
//! Fetching knows the serving core only through [`ChunkSink`] (rebuild a chunk, fail a
//! chunk, the segment a chunk needs, shutdown) and owns what it shares with it in
//! [`Fetcher`]: the overlay, the queue and the waiter that wakes readers of pending chunks.
//!
//! [`Overlay::read_segment_with`]: synth::format::Overlay::read_segment_with

use crate::chunkmap::Waiter;
use crate::error::{chain, ServeError};
use crate::stats::FetchStats;
use log::{debug, info, warn};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use synth::format::{ChunkEntry, ChunkSource, FormatError, Metadata, Overlay};
use synth::source::Priority;
use synth::ImageKind;

/// The fetching side of a mount: the overlay its segments are read from, their queue, and
/// the waiter that wakes readers of pending chunks when a segment arrives.
#[derive(Debug)]
pub struct Fetcher {
    /// The overlay reader.
    pub overlay: Overlay,
    /// Segment scheduling.
    pub queue: FetchQueue,
    /// Wakes readers waiting for pending chunks.
    pub waiter: Waiter,
    /// Self references by target payload chunk: `(image, chunk)` → referring chunks.
    referrers: HashMap<(ImageKind, u64), Vec<(ImageKind, u64)>>,
}

impl Fetcher {
    /// The fetching side of a mount of `overlay`: every segment still to fetch.
    pub fn new(overlay: Overlay) -> Self {
        let meta = overlay.metadata();
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
        Fetcher {
            queue: FetchQueue::new(meta.segments.len()),
            overlay,
            waiter: Waiter::default(),
            referrers,
        }
    }

    fn meta(&self) -> &Metadata {
        self.overlay.metadata()
    }

    /// The bytes a claim of segment `seg` holds at most: its compressed and decoded lengths
    /// (both are alive while it decodes).
    pub fn claim_bytes(&self, seg: u32) -> u64 {
        usize::try_from(seg)
            .ok()
            .and_then(|i| self.meta().segments.get(i))
            .map_or(u64::MAX, |e| e.length.saturating_add(e.raw_length))
    }

    /// The chunks that refer to `chunk` of `kind` (a payload chunk) by self reference.
    fn referrers(&self, kind: ImageKind, chunk: u64) -> &[(ImageKind, u64)] {
        self.referrers
            .get(&(kind, chunk))
            .map_or(&[], |v| v.as_slice())
    }
}

/// What fetching needs of the images it fills: the serving core implements it, and fetching
/// knows the core by this trait alone.
pub trait ChunkSink: Send + Sync {
    /// The mount's fetching side.
    fn fetcher(&self) -> &Fetcher;
    /// The segment a chunk needs decoded, if any (zeros and base references need none).
    fn needed_segment(&self, kind: ImageKind, entry: &ChunkEntry) -> Option<u32>;
    /// Rebuilds a pending chunk from `segment` (decoded) into the cache and marks it ready,
    /// counted as fetched on demand or filled in the background; a chunk failing verification
    /// is marked failed. A chunk no longer pending is left alone.
    fn rebuild(
        &self,
        kind: ImageKind,
        entry: &ChunkEntry,
        segment: Option<&[u8]>,
        demand: bool,
    ) -> Result<(), ServeError>;
    /// Marks a pending chunk failed (its segment is corrupt), counting and logging it once.
    fn fail_chunk(&self, kind: ImageKind, chunk: u64, why: &dyn std::error::Error);
    /// Whether the mount is shutting down.
    fn is_shut_down(&self) -> bool;
}

/// Background passes over the segments (the later ones only retry failed fetches).
const FILLER_PASSES: u32 = 3;

/// Decoded bytes that may wait for the rest worker; past this, a segment's rest is rebuilt by
/// the thread that decoded it. One segment may always wait, whatever its size.
pub const MAX_QUEUED_REST_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegStatus {
    Idle,
    Queued,
    InFlight,
    Done,
    Corrupt,
}

/// Segments that readers fetch and decode themselves at once ([`FetchQueue::claim`]); past
/// that, a reader leaves its segment to the demand workers. This bounds the segments in
/// flight however many requests wait (the FUSE threads and the waiter threads,
/// [`crate::waiters`], can be dozens); [`MAX_CLAIMED_BYTES`] bounds their bytes.
pub const MAX_CLAIMED: usize = 8;

/// Bytes that the segments claimed by readers may hold at once (compressed plus decoded, from
/// the claim until the rest is handed on, after the reply included): a segment that does
/// not fit is left to the demand workers. With the default 16 MiB segments of
/// `cloudlet diff` that is two or three claims at once; with the 256 KiB working-set
/// segments, all [`MAX_CLAIMED`].
pub const MAX_CLAIMED_BYTES: u64 = 64 << 20;

/// A decoded segment, published, whose chunks are still to rebuild into the cache file.
type Rest = (u32, Arc<Vec<u8>>);

#[derive(Debug)]
struct Sched {
    status: Vec<SegStatus>,
    failures: Vec<u32>,
    demand: VecDeque<u32>,
    /// Rests for the rest worker.
    rest: VecDeque<Rest>,
    /// Decoded bytes in `rest`.
    rest_bytes: u64,
    /// Decoded segments not yet done, for readers to rebuild their chunk from.
    decoded: HashMap<u32, Arc<Vec<u8>>>,
    /// Segments claimed by readers and not yet run ([`MAX_CLAIMED`]).
    claimed: usize,
    /// Bytes the claimed segments hold ([`MAX_CLAIMED_BYTES`]).
    claimed_bytes: u64,
    next_bg: usize,
    passes: u32,
    shutdown: bool,
    stats: FetchStats,
}

/// The segment queue.
#[derive(Debug)]
pub struct FetchQueue {
    sched: Mutex<Sched>,
    cv: Condvar,
    filled: Condvar,
}

/// What a worker is allowed to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Demand,
    Filler,
    Rest,
}

impl FetchQueue {
    /// A queue over `segments` segments.
    pub fn new(segments: usize) -> Self {
        FetchQueue {
            sched: Mutex::new(Sched {
                status: vec![SegStatus::Idle; segments],
                failures: vec![0; segments],
                demand: VecDeque::new(),
                rest: VecDeque::new(),
                rest_bytes: 0,
                decoded: HashMap::new(),
                claimed: 0,
                claimed_bytes: 0,
                next_bg: 0,
                passes: 0,
                shutdown: false,
                stats: FetchStats {
                    segments: segments as u64,
                    ..Default::default()
                },
            }),
            cv: Condvar::new(),
            filled: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sched> {
        match self.sched.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Asks for `segment` at top priority (no-op if queued, in flight, done or corrupt).
    pub fn demand(&self, segment: u32) {
        let mut s = self.lock();
        let Ok(i) = usize::try_from(segment) else {
            return;
        };
        if s.status.get(i) == Some(&SegStatus::Idle) {
            s.status[i] = SegStatus::Queued;
            s.demand.push_back(segment);
            drop(s);
            self.cv.notify_all();
        }
    }

    /// Takes `segment`, which holds at most `bytes` while claimed (`claim_bytes`), for the
    /// calling thread if no worker has it yet (idle or only queued): the caller must then run
    /// `run_claimed`. False if it is in flight, done or corrupt, or if [`MAX_CLAIMED`]
    /// segments are claimed already, or if `bytes` more would take the claims past
    /// [`MAX_CLAIMED_BYTES`].
    pub fn claim(&self, segment: u32, bytes: u64) -> bool {
        let mut s = self.lock();
        let Ok(i) = usize::try_from(segment) else {
            return false;
        };
        if s.claimed >= MAX_CLAIMED || s.claimed_bytes.saturating_add(bytes) > MAX_CLAIMED_BYTES {
            return false;
        }
        match s.status.get(i) {
            Some(SegStatus::Idle) => {}
            Some(SegStatus::Queued) => s.demand.retain(|&d| d != segment),
            _ => return false,
        }
        s.status[i] = SegStatus::InFlight;
        s.claimed += 1;
        s.claimed_bytes += bytes;
        true
    }

    /// Gives back the bytes of a claim whose segment the thread no longer holds.
    fn release_claimed(&self, bytes: u64) {
        let mut s = self.lock();
        s.claimed_bytes = s.claimed_bytes.saturating_sub(bytes);
    }

    /// Ends a claim ([`run_claimed`] has run).
    fn unclaim(&self) {
        let mut s = self.lock();
        s.claimed = s.claimed.saturating_sub(1);
    }

    /// Queues the rest of a decoded segment for the rest worker; gives it back if too many
    /// decoded bytes already wait.
    fn push_rest(&self, segment: u32, data: Arc<Vec<u8>>) -> Result<(), Arc<Vec<u8>>> {
        let mut s = self.lock();
        let len = data.len() as u64;
        if !s.rest.is_empty() && s.rest_bytes.saturating_add(len) > MAX_QUEUED_REST_BYTES {
            return Err(data);
        }
        s.rest_bytes = s.rest_bytes.saturating_add(len);
        s.rest.push_back((segment, data));
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// Makes a decoded segment available to readers until it is done.
    fn publish(&self, segment: u32, data: &Arc<Vec<u8>>) {
        self.lock().decoded.insert(segment, Arc::clone(data));
    }

    /// The decoded bytes of `segment` if it is decoded but not yet done: whoever needs one of
    /// its chunks can rebuild it from them.
    pub fn decoded(&self, segment: u32) -> Option<Arc<Vec<u8>>> {
        self.lock().decoded.get(&segment).cloned()
    }

    /// Failed fetch attempts of `segment` so far.
    pub fn failures(&self, segment: u32) -> u32 {
        let s = self.lock();
        usize::try_from(segment)
            .ok()
            .and_then(|i| s.failures.get(i).copied())
            .unwrap_or(0)
    }

    /// Whether `segment` was found corrupt.
    pub fn is_corrupt(&self, segment: u32) -> bool {
        let s = self.lock();
        usize::try_from(segment).ok().and_then(|i| s.status.get(i)) == Some(&SegStatus::Corrupt)
    }

    /// Stops the workers.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.cv.notify_all();
        self.filled.notify_all();
    }

    /// A snapshot of the fetch counters.
    pub fn stats(&self) -> FetchStats {
        self.lock().stats.clone()
    }

    /// Waits until the background filler has finished, or `timeout` passes; returns whether
    /// it finished.
    pub fn wait_filled(&self, timeout: Option<std::time::Duration>) -> bool {
        let g = self.lock();
        let done = |s: &mut Sched| !s.stats.filler_done && !s.shutdown;
        match timeout {
            Some(t) => match self.filled.wait_timeout_while(g, t, done) {
                Ok((g, _)) => g.stats.filler_done,
                Err(_) => false,
            },
            None => self
                .filled
                .wait_while(g, done)
                .map(|g| g.stats.filler_done)
                .unwrap_or(false),
        }
    }

    /// Next job for a worker, blocking; `None` on shutdown.
    fn next(&self, role: Role) -> Option<Job> {
        let mut s = self.lock();
        loop {
            if s.shutdown {
                return None;
            }
            if role != Role::Rest {
                if let Some(seg) = s.demand.pop_front() {
                    if let Some(st) = usize::try_from(seg).ok().and_then(|i| s.status.get_mut(i)) {
                        *st = SegStatus::InFlight;
                    }
                    return Some(Job::Fetch { seg, demand: true });
                }
            }
            // The rest worker's only work. The filler takes rests before its own segments: a
            // rest only rebuilds, and holds a decoded segment in memory until it is done.
            if role != Role::Demand {
                if let Some((seg, data)) = s.rest.pop_front() {
                    s.rest_bytes = s.rest_bytes.saturating_sub(data.len() as u64);
                    return Some(Job::Rest { seg, data });
                }
            }
            if role == Role::Filler && !s.stats.filler_done {
                let n = s.status.len();
                while s.next_bg < n && s.status[s.next_bg] != SegStatus::Idle {
                    s.next_bg += 1;
                }
                if s.next_bg < n {
                    let i = s.next_bg;
                    s.status[i] = SegStatus::InFlight;
                    s.next_bg += 1;
                    if let Ok(seg) = u32::try_from(i) {
                        return Some(Job::Fetch { seg, demand: false });
                    }
                    continue;
                }
                s.passes += 1;
                let retry = s.status.contains(&SegStatus::Idle);
                if retry && s.passes < FILLER_PASSES {
                    s.next_bg = 0;
                    continue;
                }
                if s.status.iter().all(|&st| st != SegStatus::InFlight) {
                    s.stats.filler_done = true;
                    info!(
                        "background filler finished ({} segments done)",
                        s.stats.segments_done
                    );
                    self.filled.notify_all();
                }
            }
            s = match self.cv.wait(s) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    fn finish(&self, segment: u32, outcome: Outcome, bytes: u64) {
        let mut s = self.lock();
        let Ok(i) = usize::try_from(segment) else {
            return;
        };
        let status = match outcome {
            Outcome::Done => {
                s.stats.segments_done += 1;
                s.stats.bytes_fetched += bytes;
                SegStatus::Done
            }
            Outcome::Corrupt => {
                s.stats.segments_corrupt += 1;
                SegStatus::Corrupt
            }
            Outcome::Failed => {
                s.stats.fetch_failures += 1;
                if let Some(f) = s.failures.get_mut(i) {
                    *f += 1;
                }
                SegStatus::Idle
            }
        };
        if let Some(st) = s.status.get_mut(i) {
            *st = status;
        }
        s.decoded.remove(&segment);
        drop(s);
        self.cv.notify_all();
    }
}

/// Work for a fetch worker.
enum Job {
    /// Fetch, decode and rebuild a whole segment.
    Fetch { seg: u32, demand: bool },
    /// Rebuild the rest of a segment decoded on demand.
    Rest { seg: u32, data: Arc<Vec<u8>> },
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Done,
    Corrupt,
    Failed,
}

/// Starts `demand_threads` demand workers, the rest worker and, if `background`, the
/// background filler.
pub fn spawn_workers<S: ChunkSink + 'static>(
    core: &Arc<S>,
    demand_threads: usize,
    background: bool,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for i in 0..demand_threads.max(1) {
        let core = Arc::clone(core);
        let h = std::thread::Builder::new()
            .name(format!("fetch-{i}"))
            .spawn(move || worker(&*core, Role::Demand));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => warn!("starting fetch worker {i} failed: {e}"),
        }
    }
    let rest = Arc::clone(core);
    match std::thread::Builder::new()
        .name("fetch-rest".into())
        .spawn(move || {
            lowest_priority();
            worker(&*rest, Role::Rest);
        }) {
        Ok(h) => handles.push(h),
        Err(e) => warn!("starting the rest worker failed: {e}"),
    }
    if background {
        let core = Arc::clone(core);
        match std::thread::Builder::new()
            .name("filler".into())
            .spawn(move || {
                fill_local(&*core);
                worker(&*core, Role::Filler);
            }) {
            Ok(h) => handles.push(h),
            Err(e) => warn!("starting the background filler failed: {e}"),
        }
    }
    handles
}

/// Rebuilds the overlay chunks that need no segment (zeros, references to the base).
fn fill_local(core: &impl ChunkSink) {
    let meta = core.fetcher().meta();
    let mut n = 0u64;
    for kind in ImageKind::ALL {
        for e in &meta.image(kind).chunks {
            if core.is_shut_down() {
                return;
            }
            if core.needed_segment(kind, e).is_none() && core.rebuild(kind, e, None, false).is_ok()
            {
                n += 1;
            }
        }
    }
    core.fetcher().waiter.notify();
    debug!("background filler: {n} local chunks rebuilt");
}

/// Puts the calling thread under `SCHED_IDLE`: it runs only on a CPU nothing else wants, and
/// any other thread waking up takes the CPU from it at once.
fn lowest_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 names the calling
    // thread. Moving oneself to SCHED_IDLE needs no privilege.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        debug!(
            "lowering the rest worker's priority failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn worker(core: &impl ChunkSink, role: Role) {
    while let Some(job) = core.fetcher().queue.next(role) {
        match job {
            Job::Fetch { seg, demand } => {
                if let Some(data) = fetch_segment(core, seg, demand) {
                    if demand {
                        hand_off_rest(core, seg, data);
                    } else {
                        rebuild_rest(core, seg, &data, false);
                    }
                }
            }
            Job::Rest { seg, data } => rebuild_rest(core, seg, &data, true),
        }
    }
}

/// Gives the rest of a segment decoded on demand to the rest worker, or rebuilds it now if
/// too much already waits.
fn hand_off_rest(core: &impl ChunkSink, seg: u32, data: Arc<Vec<u8>>) {
    if let Err(data) = core.fetcher().queue.push_rest(seg, data) {
        rebuild_rest(core, seg, &data, true);
    }
}

/// Runs a segment the calling reader claimed with [`FetchQueue::claim`]: fetches, decodes and
/// publishes it, and hands its rebuilding on: once the reply is sent if a [`RestAfterReply`]
/// is alive, at once otherwise.
pub(crate) fn run_claimed(core: &impl ChunkSink, seg: u32) {
    struct Unclaim<'a>(&'a FetchQueue);
    impl Drop for Unclaim<'_> {
        fn drop(&mut self) {
            self.0.unclaim();
        }
    }
    let f = core.fetcher();
    let _unclaim = Unclaim(&f.queue);
    let bytes = f.claim_bytes(seg);
    let Some(data) = fetch_segment(core, seg, true) else {
        f.queue.release_claimed(bytes);
        return;
    };
    let kept = DEFERRED_REST.with(|d| match &mut *d.borrow_mut() {
        Some(rests) => {
            rests.push((seg, data));
            None
        }
        None => Some(data),
    });
    if let Some(data) = kept {
        hand_off_rest(core, seg, data);
        f.queue.release_claimed(bytes);
    }
}

thread_local! {
    /// Rests of the segments this thread decoded for the request it serves (see
    /// [`RestAfterReply`]); `None` outside such a request.
    static DEFERRED_REST: RefCell<Option<Vec<Rest>>> = const { RefCell::new(None) };
}

/// Held by a FUSE handler for the length of one request: the rest of every segment the thread
/// decodes meanwhile ([`run_claimed`]) is handed on when the guard drops, after the reply has
/// gone out.
///
/// Handing it on before woke the rest worker while the reply was still to be sent; on a small
/// machine the woken worker could take the reader's CPU, and the reply then waited for most
/// of the rest (~0.7 ms for a 256 KiB segment).
pub(crate) struct RestAfterReply<'a, S: ChunkSink> {
    core: &'a S,
    outer: bool,
}

impl<'a, S: ChunkSink> RestAfterReply<'a, S> {
    /// Starts keeping rests for `core` (nested guards leave it to the outermost one).
    pub(crate) fn new(core: &'a S) -> Self {
        let outer = DEFERRED_REST.with(|d| {
            let mut d = d.borrow_mut();
            let outer = d.is_none();
            if outer {
                *d = Some(Vec::new());
            }
            outer
        });
        RestAfterReply { core, outer }
    }
}

impl<S: ChunkSink> Drop for RestAfterReply<'_, S> {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let rests = DEFERRED_REST
            .with(|d| d.borrow_mut().take())
            .unwrap_or_default();
        for (seg, data) in rests {
            hand_off_rest(self.core, seg, data);
            // Held since its claim (`run_claimed`).
            let f = self.core.fetcher();
            f.queue.release_claimed(f.claim_bytes(seg));
        }
    }
}

/// Fetches, verifies and decodes a segment and publishes it (see [`FetchQueue::decoded`]); on
/// failure marks it failed or corrupt (finishing it) and returns `None`.
fn fetch_segment(core: &impl ChunkSink, seg: u32, demand: bool) -> Option<Arc<Vec<u8>>> {
    let f = core.fetcher();
    let i = usize::try_from(seg).ok()?;
    let entry = f.meta().segments.get(i)?;
    // A demand job reads for a request waiting on the segment, whichever thread runs it.
    let priority = if demand {
        Priority::Demand
    } else {
        Priority::Background
    };
    debug!(
        "fetching segment {seg} ({} bytes, {})",
        entry.length,
        if demand { "demand" } else { "background" }
    );
    let outcome = match f.overlay.read_segment_with(i, priority) {
        Ok(data) => {
            let data = Arc::new(data);
            f.queue.publish(seg, &data);
            // Waiting readers take their chunks from the published segment.
            f.waiter.notify();
            return Some(data);
        }
        Err(e @ FormatError::Source(_)) => {
            warn!("fetching segment {seg} failed: {}", chain(&e));
            Outcome::Failed
        }
        Err(e) => {
            log::error!("segment {seg} is corrupt: {}", chain(&e));
            fail_segment(core, i, &e);
            Outcome::Corrupt
        }
    };
    f.queue.finish(seg, outcome, entry.length);
    f.waiter.notify();
    None
}

/// Marks the chunks of a corrupt segment, and those referring to them, failed.
fn fail_segment(core: &impl ChunkSink, seg: usize, why: &FormatError) {
    let f = core.fetcher();
    let Some(s) = f.meta().segments.get(seg) else {
        return;
    };
    for &(kind, chunk) in &s.chunks {
        core.fail_chunk(kind, chunk, why);
        for &(rk, rc) in f.referrers(kind, chunk) {
            core.fail_chunk(rk, rc, why);
        }
    }
}

/// Rebuilds every chunk of a decoded segment (and every self reference to them) that is still
/// pending, then marks the segment done.
fn rebuild_rest(core: &impl ChunkSink, seg: u32, data: &[u8], demand: bool) {
    let f = core.fetcher();
    let Some(entry) = usize::try_from(seg)
        .ok()
        .and_then(|i| f.meta().segments.get(i))
    else {
        return;
    };
    for &(kind, chunk) in &entry.chunks {
        let targets =
            std::iter::once((kind, chunk)).chain(f.referrers(kind, chunk).iter().copied());
        for (k, c) in targets {
            if let Some(e) = f.meta().image(k).find(c) {
                if let Err(err) = core.rebuild(k, e, Some(data), demand) {
                    debug!("segment {seg}: {} chunk {c}: {err}", k.name());
                }
                // A reader waits on one chunk: let it go as soon as that one is in.
                if demand {
                    f.waiter.notify();
                }
            }
        }
    }
    f.queue.finish(seg, Outcome::Done, entry.length);
    f.waiter.notify();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_claim_at_most_max_claimed_segments_at_once() {
        let q = FetchQueue::new(MAX_CLAIMED + 2);
        let n = u32::try_from(MAX_CLAIMED).unwrap();
        for seg in 0..n {
            assert!(q.claim(seg, 4096), "segment {seg}");
        }
        // Past the bound the reader leaves the segment to the demand workers.
        assert!(!q.claim(n, 4096));
        q.demand(n);
        q.unclaim();
        assert!(
            q.claim(n, 4096),
            "a queued segment can be claimed again once a claim ended"
        );
        assert!(!q.claim(0, 4096), "in flight");
    }

    #[test]
    fn claims_hold_at_most_max_claimed_bytes_until_released() {
        let q = FetchQueue::new(4);
        let half = MAX_CLAIMED_BYTES / 2;
        assert!(q.claim(0, half));
        assert!(q.claim(1, half));
        // Fewer than MAX_CLAIMED claims, but no bytes left: the demand workers take it.
        assert!(!q.claim(2, 1));
        // A claim that ended still holds its bytes until its rest is handed on.
        q.unclaim();
        assert!(!q.claim(2, 1));
        q.release_claimed(half);
        assert!(q.claim(2, half));
        // A segment larger than the whole budget is never claimed.
        q.release_claimed(2 * half);
        assert!(!q.claim(3, MAX_CLAIMED_BYTES + 1));
    }

    #[test]
    fn rests_wait_up_to_the_byte_bound_and_stay_published_until_done() {
        let q = FetchQueue::new(3);
        let big = usize::try_from(MAX_QUEUED_REST_BYTES).unwrap();
        // One rest may always wait, whatever its size; a second past the bound is given back.
        let (a, b) = (Arc::new(vec![1u8; big + 1]), Arc::new(vec![2u8; 4096]));
        q.publish(0, &a);
        q.publish(1, &b);
        assert!(q.push_rest(0, Arc::clone(&a)).is_ok());
        assert!(q.push_rest(1, Arc::clone(&b)).is_err());
        assert_eq!(q.decoded(1).as_deref(), Some(&*b));
        // Demand workers never take rests; the rest worker does, which frees the bytes.
        q.demand(2);
        assert!(matches!(
            q.next(Role::Demand),
            Some(Job::Fetch {
                seg: 2,
                demand: true
            })
        ));
        assert!(matches!(q.next(Role::Rest), Some(Job::Rest { seg: 0, .. })));
        assert!(q.push_rest(1, Arc::clone(&b)).is_ok());
        // A finished segment is no longer published.
        q.finish(0, Outcome::Done, 1);
        assert!(q.decoded(0).is_none());
        assert!(q.decoded(1).is_some());
    }
}
