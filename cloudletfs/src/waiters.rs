//! Requests that may wait for the network, kept from tying up the FUSE threads.
//!
//! A read or a partial write of a pending chunk waits until the chunk's segment has arrived,
//! which over a slow network takes seconds. A FUSE thread that waits serves nothing else
//! meanwhile, and right after an early resume a guest can have dozens of such reads in
//! flight: with every FUSE thread waiting, reads of base or ready chunks, and the stats,
//! would wait for the network too. So at most half of the FUSE threads wait themselves (the
//! fastest path: no hand-over to another thread); past that, a request that may wait goes to
//! a pool of waiter threads, started on demand up to [`MAX_WAITERS`] and ended after [`IDLE`]
//! without work. Requests past that queue for a waiter, never for a FUSE thread.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most waiter threads at once. Each one that waits holds a request's buffer (at most
/// 1 MiB, the largest FUSE read here), which it frees when done.
pub const MAX_WAITERS: usize = 64;

/// A waiter without work for this long ends.
pub const IDLE: Duration = Duration::from_secs(5);

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static IN_WAITER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is a waiter thread (which keeps no buffers between requests:
/// there can be many of them, and their requests are slow anyway).
pub fn in_waiter() -> bool {
    IN_WAITER.get()
}

/// Who will take the queued jobs. Changed only together with sending a job, so that a job
/// never sits in the queue with no thread meant to take it.
#[derive(Debug, Default)]
struct Pool {
    /// Waiter threads.
    threads: usize,
    /// Threads waiting for work that no queued job is meant for yet.
    free: usize,
    /// Jobs queued while every thread was busy and no more could start: the next thread to
    /// finish takes one before it counts as free.
    owed: usize,
}

/// The pool; shared by the FUSE threads.
pub struct Waiters {
    inline_limit: usize,
    inline: AtomicUsize,
    tx: Sender<Job>,
    rx: Receiver<Job>,
    pool: Mutex<Pool>,
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("inline_limit", &self.inline_limit)
            .finish_non_exhaustive()
    }
}

/// Counts a FUSE thread running a job itself, for as long as it runs.
struct Inline<'a>(&'a AtomicUsize);

impl Drop for Inline<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Waiters {
    /// A pool for a session with `fuse_threads` FUSE threads: half of them (at least one) may
    /// wait themselves.
    pub fn new(fuse_threads: usize) -> Arc<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Waiters {
            inline_limit: (fuse_threads / 2).max(1),
            inline: AtomicUsize::new(0),
            tx,
            rx,
            pool: Mutex::new(Pool::default()),
        })
    }

    /// Runs `job`, which may wait for the network: in the calling FUSE thread while few of
    /// them wait, else in a waiter thread.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) {
        if self.inline.fetch_add(1, Ordering::AcqRel) < self.inline_limit {
            let _counted = Inline(&self.inline);
            return job();
        }
        self.inline.fetch_sub(1, Ordering::AcqRel);
        self.hand_over(Box::new(job));
    }

    fn hand_over(self: &Arc<Self>, job: Job) {
        let Ok(mut p) = self.pool.lock() else {
            // Poisoned (cannot happen: nothing panics under the lock). Run it here rather
            // than lose the reply.
            return job();
        };
        if let Err(e) = self.tx.send(job) {
            // Cannot happen: `self` holds the receiver.
            drop(p);
            return (e.into_inner())();
        }
        if p.free > 0 {
            p.free -= 1;
            return;
        }
        if p.threads >= MAX_WAITERS {
            p.owed += 1;
            return;
        }
        let me = Arc::clone(self);
        match std::thread::Builder::new()
            .name(format!("wait-{}", p.threads))
            .spawn(move || me.serve())
        {
            Ok(_) => {
                p.threads += 1;
                debug!("{} waiter threads", p.threads);
            }
            Err(e) => {
                warn!("starting a waiter thread failed: {e}");
                if p.threads == 0 {
                    // Nobody would take the job: run it here.
                    drop(p);
                    if let Ok(job) = self.rx.try_recv() {
                        job();
                    }
                } else {
                    p.owed += 1;
                }
            }
        }
    }

    /// A waiter thread's loop. A new thread is meant for the job that started it.
    fn serve(&self) {
        IN_WAITER.set(true);
        loop {
            match self.rx.recv_timeout(IDLE) {
                Ok(job) => {
                    job();
                    let Ok(mut p) = self.pool.lock() else {
                        return;
                    };
                    if p.owed > 0 {
                        p.owed -= 1;
                    } else {
                        p.free += 1;
                    }
                }
                Err(e) => {
                    let Ok(mut p) = self.pool.lock() else {
                        return;
                    };
                    // A job meant for this thread may have been sent since: take it.
                    if e == RecvTimeoutError::Timeout && (p.free == 0 || !self.rx.is_empty()) {
                        continue;
                    }
                    p.threads -= 1;
                    p.free = p.free.saturating_sub(1);
                    return;
                }
            }
        }
    }

    /// Waiter threads running now.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.pool.lock().map(|p| p.threads).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn past_the_inline_limit_jobs_run_in_waiters_and_all_finish() {
        let w = Waiters::new(4);
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let here = std::thread::current().id();
        std::thread::scope(|s| {
            // Two "FUSE threads" block inline (the limit for 4); the next jobs must not.
            for _ in 0..2 {
                let (w, g, d) = (Arc::clone(&w), gate_rx.clone(), done_tx.clone());
                s.spawn(move || {
                    w.run(move || {
                        let _ = g.recv();
                        let _ = d.send(true);
                    })
                });
            }
            while w.inline.load(Ordering::Acquire) < 2 {
                std::thread::yield_now();
            }
            for _ in 0..10 {
                let (g, d) = (gate_rx.clone(), done_tx.clone());
                // Returns at once: the job waits in a waiter thread.
                w.run(move || {
                    let _ = g.recv();
                    let _ = d.send(std::thread::current().id() != here && in_waiter());
                });
            }
            assert_eq!(w.threads(), 10);
            assert!(!in_waiter());
            drop(gate_tx);
        });
        let ran: Vec<bool> = done_rx.iter().take(12).collect();
        assert_eq!(ran.len(), 12);
        assert!(ran.iter().all(|&elsewhere| elsewhere));
        assert_eq!(w.inline.load(Ordering::Acquire), 0);
    }
}
