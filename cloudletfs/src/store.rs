//! Copy-on-write state of one image: a sparse data file holding modified chunks, and (with a
//! state directory) a journal that records which chunks are modified or discarded, so a
//! remount after a crash continues where the daemon stopped.
//!
//! Journal layout (`<image>.journal`):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0  | 8  | magic `b"CLDFSJ03"` |
//! | 8  | 8  | image size (LE) |
//! | 16 | 32 | base id |
//! | 48 | 32 | overlay id ([`synth::format::Overlay::id`]) |
//! | 80 | 16 | boot id of the machine that wrote the tentative bytes (zero: unknown) |
//! | 96 | one byte per chunk | `0` untouched, `3` modified, `4` discarded, `5` tentatively modified (else untouched), `6` tentatively modified (else discarded) |
//!
//! Writes only make sense on top of the VM they were made to, so a journal is refused unless
//! base, overlay and image size all match.
//!
//! # Ordering: nothing acknowledged is lost, nothing is invented
//!
//! The journal never says a chunk is modified (`3`) before that chunk's data is durable: were
//! it to, a power loss could leave a chunk served from the data file while the data file
//! holds zeros or half of it. Syncing the data before every acknowledged write costs the
//! disk's bandwidth on every first write (measured: 1 MiB writes of new chunks at ~110 MB/s
//! instead of ~450, a 4 KiB one 2 ms instead of 20 µs), so:
//!
//! 1. the first write of a chunk ([`Store::write_chunk`]) writes the whole chunk into the
//!    data file, then a *tentative* journal byte (`5`, or `6` over a discarded chunk), both
//!    into the page cache, and the write is acknowledged;
//! 2. [`Store::sync`] (the guest's flush, an unmount): `fdatasync` of the data file, then every
//!    tentative byte still describing that data becomes `3`, then `fdatasync` of the journal.
//!    Concurrent syncs share one round (group commit).
//!
//! A tentative byte is worth exactly as much as the page cache that holds its data: it is
//! trusted on a remount during the same boot (the header records the boot id, from
//! `/proc/sys/kernel/random/boot_id`), so a `kill -9` of the daemon loses no acknowledged
//! write. After a restart of the machine (a power loss, a kernel crash) it is not: the chunk
//! reads as it did before its first write (untouched, or discarded) — the guest had not
//! flushed it — and never as zeros or garbage. The fault-injection tests below cut the writes
//! at every step and check both cases. If an `fdatasync` fails, the data file can no longer be
//! trusted (Linux drops the pages it could not write): the store refuses every later sync.
//!
//! # Quota
//!
//! A mount may bound the bytes of modified chunks its stores keep ([`CowQuota`], shared by
//! the disk and memory stores): the first write of a chunk past it fails
//! ([`ServeError::QuotaExceeded`]); rewriting a modified chunk, reads, and discards (which
//! give chunks back) keep working.

use crate::chunkmap::ChunkState;
use crate::error::{MountError, ServeError};
use crate::stats::CowStats;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use synth::chunk::CHUNK_SIZE_U64;
use synth::{Digest, ImageKind};

const MAGIC: [u8; 8] = *b"CLDFSJ03";
const HEADER_LEN: u64 = 96;
const HEADER_BYTES: usize = 96;
/// Where the boot id sits in the header; the bytes before it identify the VM.
const BOOT_AT: usize = 80;

/// Journal bytes.
const UNTOUCHED: u8 = 0;
const MODIFIED: u8 = 3;
const DISCARDED: u8 = 4;
const TENTATIVE_OVER_UNTOUCHED: u8 = 5;
const TENTATIVE_OVER_DISCARDED: u8 = 6;

/// Identifies one boot of the machine: tentative journal bytes are only trusted in the boot
/// that wrote them. `None` when unknown (then they never are).
pub type BootId = Option<[u8; 16]>;

/// This boot's id, from `/proc/sys/kernel/random/boot_id` (a UUID).
pub fn boot_id() -> BootId {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    let digest = synth::chunk::parse_hex_digest(&format!("{hex:0<64}"))?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    (id != [0; 16]).then_some(id)
}

/// The VM a state directory belongs to: its writes apply to this base + overlay only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateOwner {
    /// Base id.
    pub base: Digest,
    /// Overlay id ([`synth::format::Overlay::id`]).
    pub overlay: Digest,
}

/// The file operations a store makes: a real [`File`] in use; a test wraps one to cut its
/// writes at any step (`tests::Faulty`).
pub(crate) trait StoreFile: std::fmt::Debug + Send + Sync {
    /// `pread` of exactly `buf.len()` bytes.
    fn pread(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// `pwrite` of all of `buf`.
    fn pwrite(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// `fdatasync`.
    fn datasync(&self) -> std::io::Result<()>;
    /// Frees the storage of `len` bytes at `offset` (they read as zeros).
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

impl StoreFile for File {
    fn pread(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn datasync(&self) -> std::io::Result<()> {
        self.sync_data()
    }

    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let overflow = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "range overflows");
        let off = libc::off_t::try_from(offset).map_err(|_| overflow())?;
        let len = libc::off_t::try_from(len).map_err(|_| overflow())?;
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// A mount's limit on copy-on-write data: the bytes of modified chunks its stores keep, both
/// images together. Shared by the mount's stores.
#[derive(Debug, Default)]
pub struct CowQuota {
    /// Most bytes; `None`: no limit.
    limit: Option<u64>,
    /// Modified chunks kept now.
    chunks: AtomicU64,
}

impl CowQuota {
    /// A quota of `limit` bytes (`None`: unlimited), nothing used yet.
    pub fn new(limit: Option<u64>) -> Self {
        CowQuota {
            limit,
            chunks: AtomicU64::new(0),
        }
    }

    /// Takes one chunk if it fits.
    fn reserve(&self) -> bool {
        let most = self.limit.map_or(u64::MAX, |l| l / CHUNK_SIZE_U64);
        self.chunks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(1).filter(|&m| m <= most)
            })
            .is_ok()
    }

    /// Gives one chunk back.
    fn release(&self) {
        let _ = self
            .chunks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Counts chunks found modified in a state directory (kept even past the limit).
    fn add(&self, n: u64) {
        self.chunks.fetch_add(n, Ordering::AcqRel);
    }

    /// The limit and what is used now.
    pub fn stats(&self) -> CowStats {
        CowStats {
            quota_bytes: self.limit,
            used_bytes: self
                .chunks
                .load(Ordering::Acquire)
                .saturating_mul(CHUNK_SIZE_U64),
        }
    }
}

/// The journal's bookkeeping of tentative bytes and syncs.
#[derive(Debug, Default)]
struct Tentative {
    /// Chunks whose journal byte is tentative, with the number of the write that made it so.
    chunks: HashMap<u64, u64>,
    /// Tentative bytes ever written.
    written: u64,
    /// A sync is running (others wait for it instead of syncing too).
    running: bool,
    /// An `fdatasync` or journal write failed: nothing is made durable any more.
    failed: bool,
}

/// The journal file and its tentative bytes.
#[derive(Debug)]
struct Journal {
    file: Box<dyn StoreFile>,
    tentative: Mutex<Tentative>,
    done: Condvar,
}

fn journal_pos(chunk: u64) -> std::io::Result<u64> {
    chunk.checked_add(HEADER_LEN).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk number overflows")
    })
}

impl Journal {
    fn lock(&self) -> MutexGuard<'_, Tentative> {
        self.tentative.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `byte` for each of `chunks` (ascending), one `pwrite` per run of consecutive
    /// chunks.
    fn write_runs(&self, chunks: &[u64], byte: u8) -> std::io::Result<()> {
        let mut i = 0;
        while i < chunks.len() {
            let mut j = i + 1;
            while j < chunks.len() && chunks[j - 1].checked_add(1) == Some(chunks[j]) {
                j += 1;
            }
            self.file
                .pwrite(&vec![byte; j - i], journal_pos(chunks[i])?)?;
            i = j;
        }
        Ok(())
    }
}

/// The copy-on-write store of one image.
#[derive(Debug)]
pub struct Store {
    image: ImageKind,
    data: Box<dyn StoreFile>,
    journal: Option<Journal>,
    quota: Arc<CowQuota>,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What the journal's bytes say, as a remount restores them.
struct Restored {
    /// Modified or discarded chunks.
    states: Vec<(u64, ChunkState)>,
    /// Of the modified ones, those whose byte is tentative (trusted: same boot).
    tentative: Vec<u64>,
    /// Tentative bytes of another boot, and what they go back to.
    reverted: Vec<(u64, u8)>,
}

/// Reads the journal's chunk bytes; tentative ones count as modified only in `same_boot`.
fn restore(bytes: &[u8], same_boot: bool) -> Restored {
    let mut r = Restored {
        states: Vec::new(),
        tentative: Vec::new(),
        reverted: Vec::new(),
    };
    for (i, &b) in bytes.iter().enumerate() {
        let chunk = i as u64;
        let state = match b {
            MODIFIED => ChunkState::Modified,
            DISCARDED => ChunkState::Discarded,
            TENTATIVE_OVER_UNTOUCHED | TENTATIVE_OVER_DISCARDED if same_boot => {
                r.tentative.push(chunk);
                ChunkState::Modified
            }
            TENTATIVE_OVER_UNTOUCHED => {
                r.reverted.push((chunk, UNTOUCHED));
                continue;
            }
            TENTATIVE_OVER_DISCARDED => {
                r.reverted.push((chunk, DISCARDED));
                ChunkState::Discarded
            }
            _ => continue,
        };
        r.states.push((chunk, state));
    }
    r
}

impl Store {
    /// Opens the store of `image`: persistent under `state_dir`, else an unlinked temporary
    /// file in `tmp`. Returns the store and the chunks the journal records as modified or
    /// discarded (modified ones counted in `quota`).
    pub fn open(
        state_dir: Option<&Path>,
        tmp: &Path,
        image: ImageKind,
        size: u64,
        owner: &StateOwner,
        quota: &Arc<CowQuota>,
    ) -> Result<(Store, Vec<(u64, ChunkState)>), MountError> {
        Self::open_in_boot(state_dir, tmp, image, size, owner, quota, boot_id())
    }

    /// [`Store::open`] as if this were boot `boot` (tests change it to simulate a restart).
    fn open_in_boot(
        state_dir: Option<&Path>,
        tmp: &Path,
        image: ImageKind,
        size: u64,
        owner: &StateOwner,
        quota: &Arc<CowQuota>,
        boot: BootId,
    ) -> Result<(Store, Vec<(u64, ChunkState)>), MountError> {
        let Some(dir) = state_dir else {
            let data = tempfile::tempfile_in(tmp).map_err(io("Creating a state file in", tmp))?;
            data.set_len(size)
                .map_err(io("Sizing a state file in", tmp))?;
            return Ok((
                Store::with_files(image, Box::new(data), None, Vec::new(), quota),
                Vec::new(),
            ));
        };
        std::fs::create_dir_all(dir).map_err(io("Creating", dir))?;
        let data_path = dir.join(format!("{}.state", image.name()));
        let journal_path = dir.join(format!("{}.journal", image.name()));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let data = open(&data_path).map_err(io("Opening", &data_path))?;
        let journal = open(&journal_path).map_err(io("Opening", &journal_path))?;
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(&MAGIC);
        header[8..16].copy_from_slice(&size.to_le_bytes());
        header[16..48].copy_from_slice(&owner.base);
        header[48..80].copy_from_slice(&owner.overlay);
        header[BOOT_AT..].copy_from_slice(&boot.unwrap_or_default());
        let jlen = journal
            .metadata()
            .map_err(io("Reading", &journal_path))?
            .len();
        let jio = |action| io(action, &journal_path);
        let mut restored = restore(&[], true);
        if jlen == 0 {
            journal.write_all_at(&header, 0).map_err(jio("Writing"))?;
            journal.sync_all().map_err(jio("Syncing"))?;
            synth::durable::sync_dir(dir).map_err(io("Syncing", dir))?;
        } else {
            let mut have = [0u8; HEADER_BYTES];
            journal
                .read_exact_at(&mut have, 0)
                .map_err(jio("Reading"))?;
            if have[..BOOT_AT] != header[..BOOT_AT] {
                return Err(MountError::StateMismatch(dir.to_path_buf()));
            }
            let same_boot = boot.is_some() && have[BOOT_AT..] == header[BOOT_AT..];
            let mut bytes = vec![0u8; usize::try_from(jlen - HEADER_LEN).unwrap_or(0)];
            journal
                .read_exact_at(&mut bytes, HEADER_LEN)
                .map_err(jio("Reading"))?;
            restored = restore(&bytes, same_boot);
            if !same_boot {
                // Another boot's tentative bytes go back to what they replaced, durably,
                // before this boot's id makes tentative bytes trusted again.
                for &(chunk, byte) in &restored.reverted {
                    let pos = journal_pos(chunk).map_err(jio("Writing"))?;
                    journal.write_all_at(&[byte], pos).map_err(jio("Writing"))?;
                }
                journal.sync_data().map_err(jio("Syncing"))?;
                journal
                    .write_all_at(&header[BOOT_AT..], BOOT_AT as u64)
                    .map_err(jio("Writing"))?;
                journal.sync_data().map_err(jio("Syncing"))?;
            }
        }
        data.set_len(size).map_err(io("Sizing", &data_path))?;
        quota.add(
            restored
                .states
                .iter()
                .filter(|&&(_, s)| s == ChunkState::Modified)
                .count() as u64,
        );
        let store = Store::with_files(
            image,
            Box::new(data),
            Some(Box::new(journal)),
            restored.tentative,
            quota,
        );
        Ok((store, restored.states))
    }

    /// A store over open files (the journal's header already checked or written), with the
    /// chunks whose journal byte is tentative.
    pub(crate) fn with_files(
        image: ImageKind,
        data: Box<dyn StoreFile>,
        journal: Option<Box<dyn StoreFile>>,
        tentative: Vec<u64>,
        quota: &Arc<CowQuota>,
    ) -> Store {
        Store {
            image,
            data,
            journal: journal.map(|file| Journal {
                file,
                tentative: Mutex::new(Tentative {
                    chunks: tentative.into_iter().map(|c| (c, 0)).collect(),
                    ..Tentative::default()
                }),
                done: Condvar::new(),
            }),
            quota: Arc::clone(quota),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of the state file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.data.pread(buf, offset)
    }

    /// Rewrites `buf` at `offset` of the state file, inside a chunk that is already modified.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.data.pwrite(buf, offset)
    }

    /// Makes `chunk`, in state `was` (not modified), modified: counts it against the quota,
    /// writes its whole content `data`, then its tentative journal byte (see the module docs).
    /// The caller holds the chunk's lock and marks it modified in its chunk map once this
    /// returns.
    pub fn write_chunk(&self, chunk: u64, data: &[u8], was: ChunkState) -> Result<(), ServeError> {
        let offset = chunk
            .checked_mul(CHUNK_SIZE_U64)
            .ok_or(ServeError::OutOfRange(u64::MAX))?;
        if !self.quota.reserve() {
            return Err(ServeError::QuotaExceeded {
                image: self.image,
                chunk,
                quota: self.quota.limit.unwrap_or(0),
            });
        }
        let byte = if was == ChunkState::Discarded {
            TENTATIVE_OVER_DISCARDED
        } else {
            TENTATIVE_OVER_UNTOUCHED
        };
        let r = self.data.pwrite(data, offset).and_then(|()| {
            let Some(j) = &self.journal else {
                return Ok(());
            };
            let mut t = j.lock();
            j.file.pwrite(&[byte], journal_pos(chunk)?)?;
            t.written += 1;
            let n = t.written;
            t.chunks.insert(chunk, n);
            Ok(())
        });
        r.map_err(|source| {
            self.quota.release();
            ServeError::Io {
                action: "Writing the state",
                source,
            }
        })
    }

    /// Records that `chunk`, in state `was` until now, is discarded: gives its storage back
    /// to the quota if it was modified, and writes its journal byte (a discard needs no data,
    /// so it is never tentative).
    pub fn discard(&self, chunk: u64, was: ChunkState) -> std::io::Result<()> {
        if was == ChunkState::Modified {
            self.quota.release();
        }
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let mut t = j.lock();
        j.file.pwrite(&[DISCARDED], journal_pos(chunk)?)?;
        t.chunks.remove(&chunk);
        Ok(())
    }

    /// Frees the storage of `count` chunks from `chunk` on.
    pub fn punch(&self, chunk: u64, count: u64) -> std::io::Result<()> {
        let (Some(off), Some(len)) = (
            chunk.checked_mul(CHUNK_SIZE_U64),
            count.checked_mul(CHUNK_SIZE_U64),
        ) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "range overflows",
            ));
        };
        self.data.punch(off, len)
    }

    /// Makes everything written so far durable: `fdatasync` of the data file, then every
    /// tentative journal byte written before that becomes `3` (modified), then `fdatasync` of
    /// the journal. Concurrent callers share one round; a caller whose bytes a running round
    /// did not cover waits for it and runs another.
    pub fn sync(&self) -> std::io::Result<()> {
        let Some(j) = &self.journal else {
            return self.data.datasync();
        };
        let mut t = j.lock();
        let target = t.written;
        loop {
            if t.failed {
                return Err(std::io::Error::other(
                    "an earlier sync of the state failed; the state is no longer trusted",
                ));
            }
            if t.running {
                t = j.done.wait(t).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            t.running = true;
            let snapshot: Vec<(u64, u64)> = t.chunks.iter().map(|(&c, &n)| (c, n)).collect();
            drop(t);
            let synced = self.data.datasync();
            t = j.lock();
            let r = synced.and_then(|()| {
                // Only bytes not rewritten since the snapshot: a chunk discarded and written
                // again meanwhile has data the sync may not hold.
                let mut durable: Vec<u64> = snapshot
                    .into_iter()
                    .filter(|(c, n)| t.chunks.get(c) == Some(n))
                    .map(|(c, _)| c)
                    .collect();
                durable.sort_unstable();
                j.write_runs(&durable, MODIFIED)?;
                for c in &durable {
                    t.chunks.remove(c);
                }
                j.file.datasync()
            });
            t.running = false;
            if r.is_err() {
                t.failed = true;
            }
            j.done.notify_all();
            r?;
            if t.chunks.values().all(|&n| n > target) {
                return Ok(());
            }
        }
    }

    /// The mount's copy-on-write limit and usage.
    pub fn cow_stats(&self) -> CowStats {
        self.quota.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_A: BootId = Some([0xa; 16]);
    const BOOT_B: BootId = Some([0xb; 16]);

    fn owner(base: u8, overlay: u8) -> StateOwner {
        StateOwner {
            base: [base; 32],
            overlay: [overlay; 32],
        }
    }

    fn unlimited() -> Arc<CowQuota> {
        Arc::new(CowQuota::new(None))
    }

    type Opened = Result<(Store, Vec<(u64, ChunkState)>), MountError>;

    fn open_in(dir: &Path, size: u64, who: &StateOwner, boot: BootId) -> Opened {
        Store::open_in_boot(
            Some(dir),
            dir,
            ImageKind::Disk,
            size,
            who,
            &unlimited(),
            boot,
        )
    }

    /// Makes a state folder for base 1 + overlay 1, then opens it again as `other`.
    fn reopen_as(other: StateOwner) -> Opened {
        let dir = tempfile::tempdir().unwrap();
        open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        open_in(dir.path(), 1 << 20, &other, BOOT_A)
    }

    #[test]
    fn boot_id_is_known_here() {
        assert!(boot_id().is_some());
        assert_eq!(boot_id(), boot_id());
    }

    #[test]
    fn journal_synced_chunks_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (s, r) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        assert!(r.is_empty());
        s.write_chunk(3, &[1; 4096], ChunkState::Base).unwrap();
        s.discard(7, ChunkState::Base).unwrap();
        s.sync().unwrap();
        drop(s);
        let (s, r) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_B).unwrap();
        assert_eq!(
            r,
            vec![(3, ChunkState::Modified), (7, ChunkState::Discarded)]
        );
        let mut got = [0u8; 4096];
        s.read_at(&mut got, 3 * 4096).unwrap();
        assert_eq!(got, [1; 4096]);
    }

    #[test]
    fn journal_unsynced_chunks_survive_the_daemon_but_not_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        s.discard(2, ChunkState::Base).unwrap();
        s.sync().unwrap();
        s.write_chunk(2, &[1; 4096], ChunkState::Discarded).unwrap();
        s.write_chunk(3, &[2; 4096], ChunkState::Base).unwrap();
        drop(s);
        // The daemon died; the machine did not: the page cache holds the data.
        let (s, r) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        assert_eq!(
            r,
            vec![(2, ChunkState::Modified), (3, ChunkState::Modified)]
        );
        drop(s);
        // The machine restarted: unflushed first writes go back to what they replaced.
        let (_, r) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_B).unwrap();
        assert_eq!(r, vec![(2, ChunkState::Discarded)]);
        // And stay there in the next boot, even back in boot A.
        let (_, r) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        assert_eq!(r, vec![(2, ChunkState::Discarded)]);
    }

    #[test]
    fn journal_tentative_chunks_of_an_unknown_boot_are_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open_in(dir.path(), 1 << 20, &owner(1, 1), None).unwrap();
        s.write_chunk(3, &[1; 4096], ChunkState::Base).unwrap();
        drop(s);
        let (_, r) = open_in(dir.path(), 1 << 20, &owner(1, 1), None).unwrap();
        assert!(r.is_empty());
    }

    #[test]
    fn journal_of_other_base_is_refused() {
        assert!(matches!(
            reopen_as(owner(2, 1)),
            Err(MountError::StateMismatch(_))
        ));
    }

    #[test]
    fn journal_of_other_overlay_is_refused() {
        assert!(matches!(
            reopen_as(owner(1, 2)),
            Err(MountError::StateMismatch(_))
        ));
    }

    #[test]
    fn journal_of_other_image_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        assert!(matches!(
            open_in(dir.path(), 2 << 20, &owner(1, 1), BOOT_A),
            Err(MountError::StateMismatch(_))
        ));
    }

    #[test]
    fn quota_refuses_new_chunks_past_it_and_discard_gives_back() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Arc::new(CowQuota::new(Some(2 * 4096 + 100)));
        let (s, _) = Store::open(
            None,
            dir.path(),
            ImageKind::Disk,
            1 << 20,
            &owner(1, 1),
            &quota,
        )
        .unwrap();
        s.write_chunk(0, &[1; 4096], ChunkState::Base).unwrap();
        s.write_chunk(1, &[2; 4096], ChunkState::Base).unwrap();
        assert!(matches!(
            s.write_chunk(2, &[3; 4096], ChunkState::Base),
            Err(ServeError::QuotaExceeded { chunk: 2, .. })
        ));
        assert_eq!(quota.stats().used_bytes, 2 * 4096);
        s.discard(1, ChunkState::Modified).unwrap();
        s.write_chunk(2, &[3; 4096], ChunkState::Base).unwrap();
        assert_eq!(quota.stats().used_bytes, 2 * 4096);
        assert_eq!(quota.stats().quota_bytes, Some(2 * 4096 + 100));
    }

    #[test]
    fn quota_counts_chunks_restored_from_state() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = open_in(dir.path(), 1 << 20, &owner(1, 1), BOOT_A).unwrap();
        s.write_chunk(5, &[1; 4096], ChunkState::Base).unwrap();
        s.sync().unwrap();
        drop(s);
        let quota = Arc::new(CowQuota::new(Some(4096)));
        let (s, _) = Store::open_in_boot(
            Some(dir.path()),
            dir.path(),
            ImageKind::Disk,
            1 << 20,
            &owner(1, 1),
            &quota,
            BOOT_A,
        )
        .unwrap();
        assert_eq!(quota.stats().used_bytes, 4096);
        assert!(s.write_chunk(6, &[2; 4096], ChunkState::Base).is_err());
    }

    // ---- Crashes at every step of a write (fault injection) ----

    /// How to undo one change a file got after its last `fdatasync`.
    #[derive(Debug)]
    struct Undo {
        file: usize,
        offset: u64,
        old: Vec<u8>,
    }

    /// The machine both files of a store live on: it counts their writes and syncs, dies at
    /// step `crash_at`, and remembers what the disk may not have received yet.
    #[derive(Debug, Default)]
    struct Machine {
        steps: usize,
        crash_at: Option<usize>,
        dead: bool,
        unsynced: Vec<Undo>,
    }

    /// A real file on a [`Machine`]: every write and sync is a step; the step the machine dies
    /// at, and every one after, fails without touching the file.
    #[derive(Debug)]
    struct Faulty {
        id: usize,
        file: File,
        machine: Arc<Mutex<Machine>>,
    }

    impl Faulty {
        fn step(&self) -> std::io::Result<MutexGuard<'_, Machine>> {
            let mut m = self.machine.lock().unwrap();
            if m.dead || m.crash_at == Some(m.steps) {
                m.dead = true;
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            m.steps += 1;
            Ok(m)
        }

        /// Records the bytes at `offset..offset + len` before a change.
        fn remember(&self, m: &mut Machine, offset: u64, len: usize) {
            let mut old = vec![0u8; len];
            let n = self.file.read_at(&mut old, offset).unwrap_or(0);
            old[n..].fill(0);
            m.unsynced.push(Undo {
                file: self.id,
                offset,
                old,
            });
        }
    }

    impl StoreFile for Faulty {
        fn pread(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }

        fn pwrite(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut m = self.step()?;
            self.remember(&mut m, offset, buf.len());
            self.file.write_all_at(buf, offset)
        }

        fn datasync(&self) -> std::io::Result<()> {
            let mut m = self.step()?;
            self.file.sync_data()?;
            m.unsynced.retain(|u| u.file != self.id);
            Ok(())
        }

        fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
            let mut m = self.step()?;
            self.remember(&mut m, offset, usize::try_from(len).unwrap());
            self.file.punch(offset, len)
        }
    }

    /// What the guest does, the way `Core` turns it into store calls.
    #[derive(Debug, Clone, Copy)]
    enum Op {
        /// One write request of whole chunks: (chunk, fill byte) each.
        Write(&'static [(u64, u8)]),
        /// TRIM of one whole chunk.
        Discard(u64),
        /// The guest's flush.
        Sync,
    }

    /// What a chunk reads as when the journal does not say otherwise (the base or overlay).
    const OLD: u8 = 0xbb;
    const CHUNKS: usize = 4;
    const SIZE: u64 = CHUNKS as u64 * 4096;

    const SCENARIO: &[Op] = &[
        Op::Write(&[(0, 1), (1, 2)]),
        Op::Write(&[(0, 3), (2, 4)]),
        Op::Sync,
        Op::Write(&[(3, 5), (1, 6)]),
        Op::Discard(2),
        Op::Write(&[(2, 7)]),
        Op::Sync,
        Op::Write(&[(0, 8), (3, 9)]),
        Op::Discard(0),
        Op::Write(&[(0, 10)]),
    ];

    /// Each chunk's values, in order, and two places in them.
    struct History {
        values: Vec<Vec<u8>>,
        /// The value made durable by the last flush that succeeded.
        durable: Vec<usize>,
        /// The value of the last write or discard that was acknowledged.
        acked: Vec<usize>,
    }

    /// Runs `ops` on `store` as `Core` does, until the first failure (the machine died).
    fn run(store: &Store, ops: &[Op]) -> History {
        let mut state = [ChunkState::Base; CHUNKS];
        let mut h = History {
            values: vec![vec![OLD]; CHUNKS],
            durable: vec![0; CHUNKS],
            acked: vec![0; CHUNKS],
        };
        for op in ops {
            let r = (|| -> Result<(), ServeError> {
                match *op {
                    Op::Write(chunks) => {
                        for &(c, fill) in chunks {
                            let i = usize::try_from(c).unwrap();
                            h.values[i].push(fill);
                            let data = [fill; 4096];
                            if state[i] == ChunkState::Modified {
                                store
                                    .write_at(&data, c * CHUNK_SIZE_U64)
                                    .map_err(ServeError::io("write"))?;
                            } else {
                                store.write_chunk(c, &data, state[i])?;
                                state[i] = ChunkState::Modified;
                            }
                        }
                    }
                    Op::Discard(c) => {
                        let i = usize::try_from(c).unwrap();
                        h.values[i].push(0);
                        let was = std::mem::replace(&mut state[i], ChunkState::Discarded);
                        store.discard(c, was).map_err(ServeError::io("discard"))?;
                        store.punch(c, 1).map_err(ServeError::io("punch"))?;
                    }
                    Op::Sync => {
                        store.sync().map_err(ServeError::io("sync"))?;
                        for (d, v) in h.durable.iter_mut().zip(&h.values) {
                            *d = v.len() - 1;
                        }
                    }
                }
                Ok(())
            })();
            if r.is_err() {
                break;
            }
            for (a, v) in h.acked.iter_mut().zip(&h.values) {
                *a = v.len() - 1;
            }
        }
        h
    }

    /// A store over the state folder `dir` whose files live on `machine`.
    fn faulty_store(dir: &Path, machine: &Arc<Mutex<Machine>>) -> Store {
        let file = |name: &str, id| -> Box<dyn StoreFile> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(name))
                .unwrap();
            Box::new(Faulty {
                id,
                file: f,
                machine: Arc::clone(machine),
            })
        };
        Store::with_files(
            ImageKind::Disk,
            file("disk.state", 0),
            Some(file("disk.journal", 1)),
            Vec::new(),
            &unlimited(),
        )
    }

    /// Every way the unsynced changes can have reached the disk: a set of lost changes, where
    /// a change that overwrote bytes of a lost change is lost too (a page holds its latest
    /// content or an older one, never an older write on top of a newer one).
    fn loss_sets(unsynced: &[Undo]) -> Vec<Vec<bool>> {
        let overlaps = |a: &Undo, b: &Undo| {
            a.file == b.file
                && a.offset < b.offset + b.old.len() as u64
                && b.offset < a.offset + a.old.len() as u64
        };
        let n = unsynced.len();
        assert!(n <= 14, "{n} unsynced changes: too many sets to try");
        (0u32..1 << n)
            .map(|bits| (0..n).map(|i| bits & (1 << i) != 0).collect::<Vec<bool>>())
            .filter(|lost| {
                (0..n).all(|i| {
                    !lost[i] || (i + 1..n).all(|j| lost[j] || !overlaps(&unsynced[i], &unsynced[j]))
                })
            })
            .collect()
    }

    /// Opens the state folder in `boot` and checks that every chunk reads as one of its
    /// values from `history[from[chunk]..]`.
    fn check(dir: &Path, boot: BootId, history: &History, from: &[usize], what: &str) {
        let (store, restored) = open_in(dir, SIZE, &owner(1, 1), boot).unwrap();
        for (i, values) in history.values.iter().enumerate() {
            let c = i as u64;
            let state = restored
                .iter()
                .find(|&&(r, _)| r == c)
                .map_or(ChunkState::Base, |&(_, s)| s);
            let mut got = vec![0u8; 4096];
            match state {
                ChunkState::Modified => store.read_at(&mut got, c * 4096).unwrap(),
                ChunkState::Discarded => {}
                _ => got.fill(OLD),
            }
            let allowed = &values[from[i]..];
            assert!(
                got.iter().all(|&b| b == got[0]) && allowed.contains(&got[0]),
                "{what}: chunk {c} reads {:?}… as {state:?}; allowed {allowed:?}",
                &got[..8]
            );
        }
    }

    /// Runs the scenario on a fresh state folder (made in boot A) with the machine dying at
    /// step `crash_at`; returns the folder, the history and what was not synced.
    fn crash(crash_at: Option<usize>) -> (tempfile::TempDir, History, Vec<Undo>, usize) {
        let dir = tempfile::tempdir().unwrap();
        drop(open_in(dir.path(), SIZE, &owner(1, 1), BOOT_A).unwrap());
        let machine = Arc::new(Mutex::new(Machine {
            crash_at,
            ..Machine::default()
        }));
        let history = run(&faulty_store(dir.path(), &machine), SCENARIO);
        let mut m = machine.lock().unwrap();
        let unsynced = std::mem::take(&mut m.unsynced);
        (dir, history, unsynced, m.steps)
    }

    /// Steps of the whole scenario, counted on a machine that never dies.
    fn scenario_steps() -> usize {
        let (_dir, _, _, steps) = crash(None);
        assert!(steps > 15, "{steps} steps");
        steps
    }

    #[test]
    fn power_loss_at_every_step_leaves_each_chunk_old_or_new() {
        let total = scenario_steps();
        let mut tried = 0;
        for crash_at in 0..=total {
            let (dir, history, unsynced, _) = crash(Some(crash_at));
            let paths = [
                dir.path().join("disk.state"),
                dir.path().join("disk.journal"),
            ];
            let at_crash: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
            for lost in loss_sets(&unsynced) {
                // Power loss: the files as the crash left them, minus the lost changes; then
                // the machine boots again.
                for (p, bytes) in paths.iter().zip(&at_crash) {
                    std::fs::write(p, bytes).unwrap();
                }
                for (u, _) in unsynced.iter().zip(&lost).rev().filter(|(_, &l)| l) {
                    let f = OpenOptions::new().write(true).open(&paths[u.file]).unwrap();
                    f.write_all_at(&u.old, u.offset).unwrap();
                }
                let what = format!("power loss at step {crash_at}/{total}, lost {lost:?}");
                check(dir.path(), BOOT_B, &history, &history.durable, &what);
                tried += 1;
            }
        }
        assert!(tried > total, "{tried} power losses tried");
    }

    #[test]
    fn daemon_killed_at_every_step_loses_no_acknowledged_write() {
        let total = scenario_steps();
        for crash_at in 0..=total {
            // The process dies at the step; the machine, its page cache, lives on.
            let (dir, history, _, _) = crash(Some(crash_at));
            let what = format!("daemon killed at step {crash_at}/{total}");
            check(dir.path(), BOOT_A, &history, &history.acked, &what);
        }
    }
}
