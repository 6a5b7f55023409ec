//! Segment fetching: a priority queue where demand requests (a read waiting for a chunk) jump
//! ahead of the background filler.
//!
//! - Demand workers (`fetch_threads` of them) take only demand requests and rest jobs (see
//!   below), so a demand never waits behind a background decode.
//! - One background filler first rebuilds the overlay chunks that need no segment (zeros, base
//!   references), then walks the segments in overlay order, always taking a queued demand
//!   first. When it reaches the end (retrying transiently failed segments a few times), it
//!   stops: nothing more is fetched unless a read asks.
//! - A worker fetches, verifies and decodes a segment with [`Overlay::read_segment`], then
//!   rebuilds and verifies every chunk in it (and every self reference to them) into the cache
//!   file via [`crate::serve::Core::rebuild`]. Decoded segments are dropped right after.
//! - A reader that finds its chunk's segment not yet taken claims it ([`FetchQueue::claim`])
//!   and runs [`run_claimed`] in its own (FUSE) thread: fetch, decode, rebuild the chunks
//!   readers wait for, reply, and only then rebuild the rest of the segment
//!   ([`RestAfterReply`]). That spares the two thread hand-offs (reader → worker → reader) that
//!   made the tail of the first-read latency on a busy machine. Outside a FUSE request the
//!   rest goes to a worker as a *rest* job; workers take those before anything else, so
//!   decoded segments never wait in memory behind a slow fetch.
//!
//! [`Overlay::read_segment`]: synth::format::Overlay::read_segment

use crate::serve::{chain, Core};
use crate::stats::FetchStats;
use log::{debug, info, warn};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use synth::format::FormatError;
use synth::resolve::Resolver;
use synth::ImageKind;

/// Background passes over the segments (the later ones only retry failed fetches).
const FILLER_PASSES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegStatus {
    Idle,
    Queued,
    InFlight,
    Done,
    Corrupt,
}

/// A decoded segment whose waited-for chunks are in; the rest is still to rebuild.
type Rest = (u32, Vec<u8>);

#[derive(Debug)]
struct Sched {
    status: Vec<SegStatus>,
    failures: Vec<u32>,
    demand: VecDeque<u32>,
    /// Rests for the workers.
    rest: VecDeque<Rest>,
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

    /// Takes `segment` for the calling thread if no worker has it yet (idle or only queued):
    /// the caller must then run [`run_claimed`]. False if it is in flight, done or corrupt.
    pub fn claim(&self, segment: u32) -> bool {
        let mut s = self.lock();
        let Ok(i) = usize::try_from(segment) else {
            return false;
        };
        match s.status.get(i) {
            Some(SegStatus::Idle) => {}
            Some(SegStatus::Queued) => s.demand.retain(|&d| d != segment),
            _ => return false,
        }
        s.status[i] = SegStatus::InFlight;
        true
    }

    /// Queues the rest of a decoded, claimed segment for a worker.
    fn push_rest(&self, segment: u32, data: Vec<u8>) {
        self.lock().rest.push_back((segment, data));
        self.cv.notify_all();
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
            // Rest jobs first: they only rebuild (no fetch can stall them) and each holds a
            // decoded segment, up to 16 MiB, in memory until it is done.
            if let Some((seg, data)) = s.rest.pop_front() {
                return Some(Job::Rest { seg, data });
            }
            if let Some(seg) = s.demand.pop_front() {
                if let Some(st) = usize::try_from(seg).ok().and_then(|i| s.status.get_mut(i)) {
                    *st = SegStatus::InFlight;
                }
                return Some(Job::Fetch { seg, demand: true });
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
        drop(s);
        self.cv.notify_all();
    }
}

/// Work for a fetch worker.
enum Job {
    /// Fetch, decode and rebuild a whole segment.
    Fetch { seg: u32, demand: bool },
    /// Rebuild the rest of a segment a reader decoded (see [`run_claimed`]).
    Rest { seg: u32, data: Vec<u8> },
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Done,
    Corrupt,
    Failed,
}

/// Starts `demand_threads` demand workers and, if `background`, the background filler.
pub fn spawn_workers(
    core: &Arc<Core>,
    demand_threads: usize,
    background: bool,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for i in 0..demand_threads.max(1) {
        let core = Arc::clone(core);
        let h = std::thread::Builder::new()
            .name(format!("fetch-{i}"))
            .spawn(move || worker(&core, Role::Demand));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => warn!("starting fetch worker {i} failed: {e}"),
        }
    }
    if background {
        let core = Arc::clone(core);
        match std::thread::Builder::new()
            .name("filler".into())
            .spawn(move || {
                fill_local(&core);
                worker(&core, Role::Filler);
            }) {
            Ok(h) => handles.push(h),
            Err(e) => warn!("starting the background filler failed: {e}"),
        }
    }
    handles
}

/// Rebuilds the overlay chunks that need no segment (zeros, references to the base).
fn fill_local(core: &Core) {
    let resolver = Resolver::new(&core.meta, &core.base);
    let mut n = 0u64;
    for kind in ImageKind::ALL {
        for e in &core.meta.image(kind).chunks {
            if core.is_shut_down() {
                return;
            }
            if resolver.needed_segment(kind, e).is_none()
                && core.rebuild(kind, e, None, false).is_ok()
            {
                n += 1;
            }
        }
    }
    core.waiter.notify();
    debug!("background filler: {n} local chunks rebuilt");
}

fn worker(core: &Core, role: Role) {
    while let Some(job) = core.queue.next(role) {
        match job {
            Job::Fetch { seg, demand } => {
                if let Some(data) = fetch_segment(core, seg, demand) {
                    rebuild_wanted(core, seg, &data, demand);
                    rebuild_rest(core, seg, &data, demand);
                }
            }
            Job::Rest { seg, data } => rebuild_rest(core, seg, &data, true),
        }
    }
}

/// Runs a segment the calling reader claimed with [`FetchQueue::claim`]: fetches and decodes
/// it, rebuilds the chunks readers wait for (the caller's among them, registered with
/// `want` before the claim), and leaves the rest of the segment for later: to this thread
/// once its reply is sent if a [`RestAfterReply`] is alive, to a worker otherwise.
pub(crate) fn run_claimed(core: &Core, seg: u32) {
    if let Some(data) = fetch_segment(core, seg, true) {
        rebuild_wanted(core, seg, &data, true);
        let kept = DEFERRED_REST.with(|d| match &mut *d.borrow_mut() {
            Some(rests) => {
                rests.push((seg, data));
                None
            }
            None => Some(data),
        });
        if let Some(data) = kept {
            core.queue.push_rest(seg, data);
        }
    }
}

thread_local! {
    /// Rests of the segments this thread decoded for the request it serves (see
    /// [`RestAfterReply`]); `None` outside such a request.
    static DEFERRED_REST: RefCell<Option<Vec<Rest>>> = const { RefCell::new(None) };
}

/// Held by a FUSE handler for the length of one request: the rest of every segment the thread
/// decodes meanwhile ([`run_claimed`]) is rebuilt by this same thread when the guard drops,
/// after the reply has gone out.
///
/// Handing the rest to a worker instead woke that worker while the reply was still to be
/// sent. On a small machine the woken worker often took the reader's CPU, and the reply then
/// waited for most of the rest (~0.7 ms for a 256 KiB segment): the bulk of the first-read
/// tail. Readers of the rest's chunks wait on the segment exactly as they would for a worker.
pub(crate) struct RestAfterReply<'a> {
    core: &'a Core,
    outer: bool,
}

impl<'a> RestAfterReply<'a> {
    /// Starts keeping rests for `core` (nested guards leave it to the outermost one).
    pub(crate) fn new(core: &'a Core) -> Self {
        let outer = DEFERRED_REST.with(|d| {
            let mut d = d.borrow_mut();
            d.is_none() && d.replace(Vec::new()).is_none()
        });
        RestAfterReply { core, outer }
    }
}

/// Rebuilds the rests this thread holds now; returns whether it held any. A thread must call
/// this before it waits for a segment: the chunk it waits for may be in a rest it holds.
pub(crate) fn finish_held_rests(core: &Core) -> bool {
    let rests = DEFERRED_REST.with(|d| d.borrow_mut().as_mut().map(std::mem::take));
    let rests = rests.unwrap_or_default();
    let held = !rests.is_empty();
    for (seg, data) in rests {
        rebuild_rest(core, seg, &data, true);
    }
    held
}

impl Drop for RestAfterReply<'_> {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let rests = DEFERRED_REST
            .with(|d| d.borrow_mut().take())
            .unwrap_or_default();
        for (seg, data) in rests {
            rebuild_rest(self.core, seg, &data, true);
        }
    }
}

/// Fetches, verifies and decodes a segment; on failure marks it failed or corrupt (finishing
/// it) and returns `None`.
fn fetch_segment(core: &Core, seg: u32, demand: bool) -> Option<Vec<u8>> {
    let i = usize::try_from(seg).ok()?;
    let entry = core.meta.segments.get(i)?;
    debug!(
        "fetching segment {seg} ({} bytes, {})",
        entry.length,
        if demand { "demand" } else { "background" }
    );
    let outcome = match core.overlay.read_segment(i) {
        Ok(data) => return Some(data),
        Err(e @ FormatError::Source(_)) => {
            warn!("fetching segment {seg} failed: {}", chain(&e));
            Outcome::Failed
        }
        Err(e) => {
            log::error!("segment {seg} is corrupt: {}", chain(&e));
            core.fail_segment(i, &e);
            Outcome::Corrupt
        }
    };
    core.queue.finish(seg, outcome, entry.length);
    core.waiter.notify();
    None
}

/// Rebuilds the chunks readers are blocked on first (self references resolve through the
/// same payload, so the decoded segment serves them too) and wakes the readers.
fn rebuild_wanted(core: &Core, seg: u32, data: &[u8], demand: bool) {
    for (kind, chunk) in core.take_wanted(seg) {
        if let Some(e) = core.meta.image(kind).find(chunk) {
            if let Err(err) = core.rebuild(kind, e, Some(data), demand) {
                debug!("segment {seg}: {} chunk {chunk}: {err}", kind.name());
            }
        }
    }
    core.waiter.notify();
}

/// Rebuilds every chunk of a decoded segment (and every self reference to them) that is still
/// pending, then marks the segment done.
fn rebuild_rest(core: &Core, seg: u32, data: &[u8], demand: bool) {
    let Some(entry) = usize::try_from(seg)
        .ok()
        .and_then(|i| core.meta.segments.get(i))
    else {
        return;
    };
    for &(kind, chunk) in &entry.chunks {
        let targets = std::iter::once((kind, chunk)).chain(
            core.referrers
                .get(&(kind, chunk))
                .into_iter()
                .flatten()
                .copied(),
        );
        for (k, c) in targets {
            if let Some(e) = core.meta.image(k).find(c) {
                if let Err(err) = core.rebuild(k, e, Some(data), demand) {
                    debug!("segment {seg}: {} chunk {c}: {err}", k.name());
                }
                // A reader waits on one chunk: let it go as soon as that one is in.
                if demand {
                    core.waiter.notify();
                }
            }
        }
    }
    core.queue.finish(seg, Outcome::Done, entry.length);
    core.waiter.notify();
}
