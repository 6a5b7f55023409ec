//! Trace streams (`chunks_accessed`, `chunks_modified`, `chunks_discarded`).
//!
//! A stream is a *set* of chunks plus a bounded log of recent additions:
//!
//! - a bitmap with one bit per chunk (fixed size),
//! - a ring of the last [`RING_CAPACITY`] additions, each with a sequence number.
//!
//! A reader's [`Cursor`] first scans the bitmap (every chunk already in the set), then follows
//! the ring from the sequence number it started at. A reader that falls behind the ring simply
//! rescans the bitmap; its own bitmap of chunks already emitted keeps every chunk on exactly
//! one line. Memory is bounded by the image size, whatever the readers do.
//!
//! A read with nothing new to say is *parked* (its reply kept, no FUSE thread blocked) and
//! answered by the next addition.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Additions kept for readers following the stream.
pub const RING_CAPACITY: usize = 4096;

#[derive(Debug)]
struct Log {
    ring: VecDeque<u64>,
    /// Sequence number of `ring[0]`.
    first_seq: u64,
    capacity: usize,
}

impl Log {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.ring.len() as u64
    }
}

/// Where a reader is.
#[derive(Debug)]
enum Phase {
    /// Scanning the bitmap from this chunk; then following the ring from `then`.
    Scan { pos: u64, then: u64 },
    /// Following the ring from this sequence number.
    Tail { seq: u64 },
}

/// One open stream file.
#[derive(Debug)]
pub struct Cursor {
    emitted: Vec<u64>,
    phase: Phase,
    pending: Vec<u8>,
}

/// A reply waiting for the stream to grow: `Some(bytes)` or `None` (give up, interrupted).
pub type ParkedReply = Box<dyn FnOnce(Option<Vec<u8>>) + Send>;

struct Parked {
    cursor: Arc<Mutex<Cursor>>,
    max: usize,
    owner: u64,
    pid: u32,
    reply: ParkedReply,
}

/// A set of chunks with a bounded log of additions.
pub struct Stream {
    bits: Vec<AtomicU64>,
    chunks: u64,
    count: AtomicU64,
    log: Mutex<Log>,
    parked: Mutex<Vec<Parked>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("chunks", &self.chunks)
            .field("count", &self.count)
            .finish()
    }
}

fn bit(chunk: u64) -> Option<(usize, u64)> {
    usize::try_from(chunk / 64)
        .ok()
        .map(|w| (w, 1u64 << (chunk % 64)))
}

impl Stream {
    /// An empty stream over `chunks` chunks.
    pub fn new(chunks: u64) -> Self {
        Self::with_capacity(chunks, RING_CAPACITY)
    }

    /// An empty stream whose ring keeps `capacity` additions.
    pub fn with_capacity(chunks: u64, capacity: usize) -> Self {
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(0);
        Stream {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            chunks,
            count: AtomicU64::new(0),
            log: Mutex::new(Log {
                ring: VecDeque::new(),
                first_seq: 0,
                capacity: capacity.max(1),
            }),
            parked: Mutex::new(Vec::new()),
        }
    }

    /// Chunks in the set.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether `chunk` is in the set.
    pub fn contains(&self, chunk: u64) -> bool {
        bit(chunk)
            .and_then(|(w, m)| self.bits.get(w).map(|b| b.load(Ordering::Acquire) & m != 0))
            .unwrap_or(false)
    }

    /// Adds `chunk`; wakes parked readers if it is new. Returns whether it was new.
    pub fn add(&self, chunk: u64) -> bool {
        let Some((w, m)) = bit(chunk) else {
            return false;
        };
        let Some(word) = self.bits.get(w) else {
            return false;
        };
        if word.load(Ordering::Relaxed) & m != 0 || word.fetch_or(m, Ordering::AcqRel) & m != 0 {
            return false;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut log) = self.log.lock() {
            log.ring.push_back(chunk);
            if log.ring.len() > log.capacity {
                log.ring.pop_front();
                log.first_seq += 1;
            }
        }
        self.wake();
        true
    }

    /// Every chunk in the set, ascending.
    pub fn members(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.bits.iter().enumerate() {
            let mut v = word.load(Ordering::Acquire);
            while v != 0 {
                let b = u64::from(v.trailing_zeros());
                out.push(w as u64 * 64 + b);
                v &= v - 1;
            }
        }
        out
    }

    /// A cursor that will list the whole set, then follow additions.
    pub fn cursor(&self) -> Cursor {
        let then = self.log.lock().map(|l| l.next_seq()).unwrap_or(0);
        Cursor {
            emitted: vec![0; self.bits.len()],
            phase: Phase::Scan { pos: 0, then },
            pending: Vec::new(),
        }
    }

    fn emit(c: &mut Cursor, chunk: u64) {
        if let Some((w, m)) = bit(chunk) {
            if let Some(e) = c.emitted.get_mut(w) {
                if *e & m == 0 {
                    *e |= m;
                    c.pending.extend_from_slice(format!("{chunk}\n").as_bytes());
                }
            }
        }
    }

    /// Up to `max` bytes of new lines, without blocking (empty if there is nothing new).
    pub fn read_now(&self, c: &mut Cursor, max: usize) -> Vec<u8> {
        while c.pending.len() < max {
            match c.phase {
                Phase::Scan { pos, then } => {
                    let mut p = pos;
                    while p < self.chunks && c.pending.len() < max {
                        if self.contains(p) {
                            Self::emit(c, p);
                        }
                        p += 1;
                    }
                    c.phase = if p >= self.chunks {
                        Phase::Tail { seq: then }
                    } else {
                        Phase::Scan { pos: p, then }
                    };
                    if p < self.chunks {
                        break;
                    }
                }
                Phase::Tail { seq } => {
                    let Ok(log) = self.log.lock() else { break };
                    if seq < log.first_seq {
                        // Fell behind the ring: rescan the set.
                        c.phase = Phase::Scan {
                            pos: 0,
                            then: log.next_seq(),
                        };
                        continue;
                    }
                    let next = log.next_seq();
                    if seq == next {
                        break;
                    }
                    let start = usize::try_from(seq - log.first_seq).unwrap_or(usize::MAX);
                    let mut s = seq;
                    for &chunk in log.ring.iter().skip(start) {
                        if c.pending.len() >= max {
                            break;
                        }
                        Self::emit(c, chunk);
                        s += 1;
                    }
                    c.phase = Phase::Tail { seq: s };
                }
            }
        }
        // Hand out whole lines only.
        let cut = if c.pending.len() <= max {
            c.pending.len()
        } else {
            c.pending[..max]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
        };
        c.pending.drain(..cut).collect()
    }

    /// Answers `reply` now if there is something to read, else parks it until there is.
    pub fn read_or_park(
        &self,
        cursor: Arc<Mutex<Cursor>>,
        max: usize,
        owner: u64,
        pid: u32,
        reply: ParkedReply,
    ) {
        let Ok(mut parked) = self.parked.lock() else {
            return reply(None);
        };
        let data = match cursor.lock() {
            Ok(mut c) => self.read_now(&mut c, max),
            Err(_) => return reply(None),
        };
        log::debug!("stream read by pid {pid}: {} bytes now", data.len());
        if data.is_empty() {
            parked.push(Parked {
                cursor,
                max,
                owner,
                pid,
                reply,
            });
        } else {
            drop(parked);
            reply(Some(data));
        }
    }

    fn wake(&self) {
        let Ok(mut parked) = self.parked.lock() else {
            return;
        };
        if parked.is_empty() {
            return;
        }
        let mut keep = Vec::new();
        for p in parked.drain(..) {
            let data = match p.cursor.lock() {
                Ok(mut c) => self.read_now(&mut c, p.max),
                Err(_) => Vec::new(),
            };
            log::debug!("stream wake for pid {}: {} bytes", p.pid, data.len());
            if data.is_empty() {
                keep.push(p);
            } else {
                (p.reply)(Some(data));
            }
        }
        *parked = keep;
    }

    /// Gives up the parked reads of `owner` (a file handle being released).
    pub fn cancel(&self, owner: u64) {
        self.drop_parked(|p| p.owner == owner);
    }

    /// Gives up the parked reads whose process `dead` says is gone or being killed.
    pub fn reap(&self, dead: &dyn Fn(u32) -> bool) {
        self.drop_parked(|p| dead(p.pid));
    }

    /// Gives up every parked read (unmount).
    pub fn close_all(&self) {
        self.drop_parked(|_| true);
    }

    fn drop_parked(&self, pred: impl Fn(&Parked) -> bool) {
        let gone: Vec<Parked> = match self.parked.lock() {
            Ok(mut parked) => {
                let (gone, keep) = parked.drain(..).partition(|p| pred(p));
                *parked = keep;
                gone
            }
            Err(_) => Vec::new(),
        };
        for p in gone {
            (p.reply)(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &[u8]) -> Vec<u64> {
        String::from_utf8_lossy(b)
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    #[test]
    fn cursor_opened_late_lists_set_then_new_chunks_once() {
        let s = Stream::new(1000);
        s.add(5);
        s.add(900);
        let mut c = s.cursor();
        s.add(7);
        s.add(5);
        let mut got = lines(&s.read_now(&mut c, 1 << 16));
        s.add(1);
        got.extend(lines(&s.read_now(&mut c, 1 << 16)));
        got.sort_unstable();
        assert_eq!(got, vec![1, 5, 7, 900]);
    }

    #[test]
    fn reader_behind_ring_rescans_without_duplicates() {
        let s = Stream::with_capacity(10_000, 4);
        let mut c = s.cursor();
        assert!(s.read_now(&mut c, 100).is_empty());
        for i in 0..100 {
            s.add(i * 3);
        }
        let mut got = Vec::new();
        loop {
            let b = s.read_now(&mut c, 64);
            if b.is_empty() {
                break;
            }
            got.extend(lines(&b));
        }
        assert_eq!(got, (0..100).map(|i| i * 3).collect::<Vec<u64>>());
    }

    #[test]
    fn parked_read_answered_by_next_addition() {
        let s = Stream::new(100);
        let c = Arc::new(Mutex::new(s.cursor()));
        let (tx, rx) = std::sync::mpsc::channel();
        s.read_or_park(c, 4096, 1, 0, Box::new(move |d| tx.send(d).unwrap_or(())));
        assert!(rx.try_recv().is_err());
        s.add(42);
        assert_eq!(rx.recv().unwrap(), Some(b"42\n".to_vec()));
    }
}
