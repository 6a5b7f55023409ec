//! Counters behind `disk/stats` and `memory/stats`, and their JSON snapshot.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs) of the wait-time histogram buckets; the last bucket is open.
pub const WAIT_BUCKETS_US: [u64; 7] = [100, 1_000, 5_000, 20_000, 100_000, 1_000_000, 10_000_000];

/// Live counters of one image.
#[derive(Debug, Default)]
pub struct Counters {
    /// Chunks rebuilt because a read or write needed them.
    pub fetched_on_demand: AtomicU64,
    /// Chunks rebuilt by the background filler.
    pub filled_in_background: AtomicU64,
    /// Bytes read through the image file.
    pub bytes_read: AtomicU64,
    /// Bytes written through the image file.
    pub bytes_written: AtomicU64,
    /// Chunks that failed their SHA-256 check (or whose segment is corrupt).
    pub verification_failures: AtomicU64,
    /// Requests that failed because a fetch failed or timed out.
    pub fetch_errors: AtomicU64,
    /// Waits for pending chunks, by [`WAIT_BUCKETS_US`].
    pub waits: [AtomicU64; WAIT_BUCKETS_US.len() + 1],
    /// Requests waiting for a pending chunk now.
    pub waiting_now: AtomicU64,
}

impl Counters {
    /// Records a wait for a pending chunk.
    pub fn record_wait(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = WAIT_BUCKETS_US
            .iter()
            .position(|&b| us < b)
            .unwrap_or(WAIT_BUCKETS_US.len());
        if let Some(w) = self.waits.get(i) {
            w.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request in `waiting_now` until the guard drops.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        self.waiting_now.fetch_add(1, Ordering::Relaxed);
        Waiting(&self.waiting_now)
    }
}

/// A request counted in [`Counters::waiting_now`].
#[derive(Debug)]
pub(crate) struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One histogram bucket.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Bucket {
    /// Upper bound in µs (`None`: open-ended).
    pub below_us: Option<u64>,
    /// Waits in the bucket.
    pub count: u64,
}

/// Chunk counts of one image.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChunkCounts {
    /// All chunks of the image.
    pub total: u64,
    /// Chunks served from the base image.
    pub from_base: u64,
    /// Chunks the overlay describes.
    pub in_overlay: u64,
    /// Overlay chunks not yet rebuilt.
    pub pending: u64,
    /// Overlay chunks rebuilt on demand.
    pub fetched_on_demand: u64,
    /// Overlay chunks rebuilt by the background filler.
    pub filled_in_background: u64,
    /// Chunks ever written.
    pub modified: u64,
    /// Chunks ever discarded.
    pub discarded: u64,
    /// Chunks ever read or written.
    pub accessed: u64,
}

/// A snapshot of one image's counters (the JSON of `<image>/stats`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ImageStats {
    /// `disk` or `memory`.
    pub image: String,
    /// Image size in bytes.
    pub size: u64,
    /// Chunk counts.
    pub chunks: ChunkCounts,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Waits for pending chunks.
    pub wait_histogram: Vec<Bucket>,
    /// Requests waiting for a pending chunk at the time of the snapshot.
    pub waiting_now: u64,
    /// Verification failures.
    pub verification_failures: u64,
    /// Requests failed by fetch errors or timeouts.
    pub fetch_errors: u64,
    /// Whether rebuilt overlay chunks are kept in memory (else in a file on disk).
    pub cache_in_memory: bool,
    /// The mount's copy-on-write data (both images together) and its quota.
    pub cow: CowStats,
}

/// The copy-on-write data a mount keeps: modified chunks of both images, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CowStats {
    /// The mount's quota (`null`: none).
    pub quota_bytes: Option<u64>,
    /// Bytes of modified chunks kept now.
    pub used_bytes: u64,
}

/// Overlay-wide fetch counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FetchStats {
    /// Segments in the overlay.
    pub segments: u64,
    /// Segments fetched and decoded.
    pub segments_done: u64,
    /// Segments found corrupt.
    pub segments_corrupt: u64,
    /// Compressed bytes fetched.
    pub bytes_fetched: u64,
    /// Failed fetch attempts (retried later).
    pub fetch_failures: u64,
    /// Whether the background filler has finished.
    pub filler_done: bool,
}

/// A snapshot of everything.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// The disk image.
    pub disk: ImageStats,
    /// The memory image.
    pub memory: ImageStats,
    /// Fetching.
    pub fetch: FetchStats,
}

impl Counters {
    /// The histogram as buckets.
    pub fn histogram(&self) -> Vec<Bucket> {
        self.waits
            .iter()
            .enumerate()
            .map(|(i, c)| Bucket {
                below_us: WAIT_BUCKETS_US.get(i).copied(),
                count: c.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_wait_long_wait_lands_in_open_bucket() {
        let c = Counters::default();
        c.record_wait(Duration::from_secs(100));
        c.record_wait(Duration::from_micros(50));
        let h = c.histogram();
        assert_eq!(h[0].count, 1);
        assert_eq!(h.last().map(|b| (b.below_us, b.count)), Some((None, 1)));
    }

    #[test]
    fn waiting_now_counts_live_guards() {
        let c = Counters::default();
        let a = c.waiting();
        {
            let _b = c.waiting();
            assert_eq!(c.waiting_now.load(Ordering::Relaxed), 2);
        }
        drop(a);
        assert_eq!(c.waiting_now.load(Ordering::Relaxed), 0);
    }
}
