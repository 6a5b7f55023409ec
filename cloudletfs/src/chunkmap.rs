//! The chunk map: the one place that knows each chunk's state.
//!
//! One atomic byte per chunk. Transitions out of [`ChunkState::Pending`] are compare-and-swap,
//! so the background filler (`Pending → Ready`) can never overwrite a chunk a writer made
//! [`ChunkState::Modified`] or [`ChunkState::Discarded`]. Readers that need a pending chunk wait
//! on a [`Waiter`], which every transition out of `Pending` notifies.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// State of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkState {
    /// Not in the overlay: the base chunk at the same offset (zeros past the base's end).
    Base = 0,
    /// In the overlay, not yet rebuilt.
    Pending = 1,
    /// Rebuilt, verified and in the cache file.
    Ready = 2,
    /// Written: in the copy-on-write state file.
    Modified = 3,
    /// Discarded (TRIM): reads as zeros.
    Discarded = 4,
    /// Failed verification: reads give EIO.
    Failed = 5,
}

impl ChunkState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => ChunkState::Base,
            1 => ChunkState::Pending,
            2 => ChunkState::Ready,
            3 => ChunkState::Modified,
            4 => ChunkState::Discarded,
            _ => ChunkState::Failed,
        }
    }
}

/// Per-image chunk states.
#[derive(Debug)]
pub struct ChunkMap {
    states: Vec<AtomicU8>,
    pending: AtomicU64,
}

impl ChunkMap {
    /// A map of `count` chunks, all [`ChunkState::Base`].
    pub fn new(count: u64) -> Self {
        let n = usize::try_from(count).unwrap_or(0);
        ChunkMap {
            states: (0..n).map(|_| AtomicU8::new(0)).collect(),
            pending: AtomicU64::new(0),
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    /// Whether the map has no chunks.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    fn slot(&self, chunk: u64) -> Option<&AtomicU8> {
        usize::try_from(chunk).ok().and_then(|i| self.states.get(i))
    }

    /// State of `chunk` (chunks past the end read as [`ChunkState::Discarded`]).
    pub fn get(&self, chunk: u64) -> ChunkState {
        self.slot(chunk).map_or(ChunkState::Discarded, |s| {
            ChunkState::from_u8(s.load(Ordering::Acquire))
        })
    }

    /// Sets the initial state of `chunk` (before serving starts).
    pub fn init(&self, chunk: u64, state: ChunkState) {
        if let Some(s) = self.slot(chunk) {
            let old = ChunkState::from_u8(s.swap(state as u8, Ordering::AcqRel));
            self.count_pending(old, state);
        }
    }

    fn count_pending(&self, old: ChunkState, new: ChunkState) {
        if old == ChunkState::Pending && new != ChunkState::Pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        } else if old != ChunkState::Pending && new == ChunkState::Pending {
            self.pending.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Moves `chunk` from `from` to `to` if it is still in `from`.
    pub fn transition(&self, chunk: u64, from: ChunkState, to: ChunkState) -> bool {
        let Some(s) = self.slot(chunk) else {
            return false;
        };
        let ok = s
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            self.count_pending(from, to);
        }
        ok
    }

    /// Forces `chunk` into `to` (writers and discards, under the chunk's write lock); returns
    /// the previous state.
    pub fn set(&self, chunk: u64, to: ChunkState) -> ChunkState {
        let Some(s) = self.slot(chunk) else {
            return ChunkState::Discarded;
        };
        let old = ChunkState::from_u8(s.swap(to as u8, Ordering::AcqRel));
        self.count_pending(old, to);
        old
    }

    /// Chunks still pending.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }
}

/// Wakes readers waiting for chunks to leave [`ChunkState::Pending`].
#[derive(Debug, Default)]
pub struct Waiter {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl Waiter {
    /// The current generation, to pass to [`Waiter::wait`].
    pub fn generation(&self) -> u64 {
        self.generation.lock().map(|g| *g).unwrap_or(0)
    }

    /// Wakes every waiter.
    pub fn notify(&self) {
        if let Ok(mut g) = self.generation.lock() {
            *g = g.wrapping_add(1);
        }
        self.cv.notify_all();
    }

    /// Waits until the generation moves past `seen` or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let Ok(g) = self.generation.lock() else {
            return;
        };
        let _ = self.cv.wait_timeout_while(g, timeout, |g| *g == seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_from_wrong_state_is_refused() {
        let m = ChunkMap::new(4);
        m.init(1, ChunkState::Pending);
        m.set(1, ChunkState::Modified);
        assert!(!m.transition(1, ChunkState::Pending, ChunkState::Ready));
        assert_eq!(m.get(1), ChunkState::Modified);
        assert_eq!(m.pending(), 0);
    }

    #[test]
    fn pending_count_follows_transitions() {
        let m = ChunkMap::new(4);
        m.init(0, ChunkState::Pending);
        m.init(2, ChunkState::Pending);
        assert_eq!(m.pending(), 2);
        assert!(m.transition(0, ChunkState::Pending, ChunkState::Ready));
        assert_eq!(m.pending(), 1);
    }
}
