//! The cache of rebuilt overlay chunks: where a chunk goes once it is fetched, decoded and
//! verified, and where later reads of it find it.
//!
//! ```text
//!  mount ─► CacheReservation::take(every overlay chunk of the mount, budget)
//!             fits ─────► ChunkCache in memory: an unlinked memfd per image
//!             does not ─► ChunkCache in a file: an unlinked file per image in the cache folder
//!  rebuilt chunk (verified) ─► ChunkCache::write_chunk ─► chunk state Ready
//!  read of a Ready chunk ────► ChunkCache::read_at
//! ```
//!
//! In memory, a chunk costs several times less to write, and no disk writeback or journal runs
//! behind the readers (measured in `BENCHMARKS.md`). The budget is process-wide: a server
//! mounts many overlays, and all their memory caches together stay within it; a mount's
//! share is given back when it ends.

use crate::error::MountError;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// One image's rebuilt chunks, at their offsets in the image: an unlinked file in memory or
/// on disk, sparse where nothing was written (zero chunks are never written).
#[derive(Debug)]
pub struct ChunkCache {
    file: File,
    in_memory: bool,
}

impl ChunkCache {
    /// A cache of `len` bytes: in memory, or else an unlinked file in `dir`.
    pub fn create(in_memory: bool, dir: &Path, len: u64) -> Result<Self, MountError> {
        let (file, at) = if in_memory {
            (memory_file(), Path::new("memory"))
        } else {
            (tempfile::tempfile_in(dir), dir)
        };
        let io = |action| {
            move |source| MountError::Io {
                action,
                path: at.to_path_buf(),
                source,
            }
        };
        let file = file.map_err(io("Creating a cache file in"))?;
        file.set_len(len).map_err(io("Sizing a cache file in"))?;
        Ok(ChunkCache { file, in_memory })
    }

    /// Whether the cache is in memory.
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Reads `out.len()` cached bytes at `offset`.
    pub fn read_at(&self, out: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    /// Writes a rebuilt chunk's bytes at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
}

/// Bytes reserved by this process's memory caches of rebuilt chunks (see [`CacheReservation`]).
static MEMORY_CACHES: AtomicU64 = AtomicU64::new(0);

/// A mount's share of the process-wide memory budget for caches of rebuilt chunks, given
/// back when the mount ends.
#[derive(Debug)]
pub(crate) struct CacheReservation(u64);

impl CacheReservation {
    /// Reserves `bytes` if all of the process's memory caches, these included, stay within
    /// `limit`.
    pub(crate) fn take(bytes: u64, limit: u64) -> Option<Self> {
        MEMORY_CACHES
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes).filter(|&total| total <= limit)
            })
            .ok()
            .map(|_| CacheReservation(bytes))
    }

    /// Bytes reserved by the process's memory caches now.
    pub(crate) fn held() -> u64 {
        MEMORY_CACHES.load(Ordering::SeqCst)
    }
}

impl Drop for CacheReservation {
    fn drop(&mut self) {
        MEMORY_CACHES.fetch_sub(self.0, Ordering::SeqCst);
    }
}

/// Bytes of memory this process could still use: the system's `MemAvailable`, or less if the
/// process's cgroup (v2) has a lower limit. `None` if `/proc/meminfo` cannot be read.
pub fn available_memory() -> Option<u64> {
    let system = mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_headroom(&c, Path::new("/sys/fs/cgroup")));
    Some(cgroup.map_or(system, |c| c.min(system)))
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `memory.max - memory.current` of the cgroup v2 named in a `/proc/self/cgroup` text, under
/// the cgroup root `root`; `None` without a limit (or without cgroup v2).
fn cgroup_headroom(self_cgroup: &str, root: &Path) -> Option<u64> {
    let path = self_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_reads_kib_as_bytes() {
        let m = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(m), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn cgroup_headroom_is_max_minus_current_and_none_without_a_limit() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a/b");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("memory.max"), "1000000\n").expect("write");
        std::fs::write(dir.join("memory.current"), "250000\n").expect("write");
        assert_eq!(cgroup_headroom("0::/a/b\n", root.path()), Some(750_000));
        std::fs::write(dir.join("memory.max"), "max\n").expect("write");
        assert_eq!(cgroup_headroom("0::/a/b\n", root.path()), None);
        // cgroup v1 only: no "0::" line.
        assert_eq!(cgroup_headroom("4:memory:/a/b\n", root.path()), None);
    }

    #[test]
    fn memory_caches_share_one_budget_and_give_it_back() {
        // Other tests of this binary may hold reservations meanwhile: budget on top of theirs.
        let base = CacheReservation::held();
        let a = CacheReservation::take(600, base + 1000).expect("first fits");
        assert!(
            CacheReservation::take(600, base + 1000).is_none(),
            "budget is shared"
        );
        let b = CacheReservation::take(400, base + 1000).expect("the rest fits");
        drop(a);
        let c = CacheReservation::take(600, base + 1000).expect("given back on drop");
        drop((b, c));
        assert_eq!(CacheReservation::held(), base);
        // A request that would overflow the count is refused, not wrapped.
        let d = CacheReservation::take(1, base + 1).expect("fits");
        assert!(CacheReservation::take(u64::MAX, u64::MAX).is_none());
        drop(d);
    }

    #[test]
    fn available_memory_is_known_here() {
        assert!(available_memory().is_some_and(|m| m > 0));
    }
}
