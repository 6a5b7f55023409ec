//! Copy-on-write state of one image: a sparse data file holding modified chunks, and (with a
//! state directory) a journal that records which chunks are modified or discarded, so a
//! remount after a crash continues where the daemon stopped.
//!
//! Journal layout (`<image>.journal`):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0  | 8  | magic `b"CLDFSJ02"` |
//! | 8  | 8  | image size (LE) |
//! | 16 | 32 | base id |
//! | 48 | 32 | overlay id ([`synth::format::Overlay::id`]) |
//! | 80 | 16 | reserved (zero) |
//! | 96 | one byte per chunk | `0` untouched, `3` modified, `4` discarded |
//!
//! Writes only make sense on top of the VM they were made to, so a journal is refused unless
//! base, overlay and image size all match. A chunk's data is written before its journal byte;
//! `fsync` syncs the data file, then the journal.

use crate::chunkmap::ChunkState;
use crate::error::MountError;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use synth::chunk::CHUNK_SIZE_U64;
use synth::{Digest, ImageKind};

const MAGIC: [u8; 8] = *b"CLDFSJ02";
const HEADER_LEN: u64 = 96;
const HEADER_BYTES: usize = 96;

/// The VM a state directory belongs to: its writes apply to this base + overlay only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateOwner {
    /// Base id.
    pub base: Digest,
    /// Overlay id ([`synth::format::Overlay::id`]).
    pub overlay: Digest,
}

/// The copy-on-write store of one image.
#[derive(Debug)]
pub struct Store {
    data: File,
    journal: Option<File>,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Opens the store of `image`: persistent under `state_dir`, else an unlinked temporary
    /// file in `tmp`. Returns the store and the chunks the journal records as modified or
    /// discarded.
    pub fn open(
        state_dir: Option<&Path>,
        tmp: &Path,
        image: ImageKind,
        size: u64,
        owner: &StateOwner,
    ) -> Result<(Store, Vec<(u64, ChunkState)>), MountError> {
        let Some(dir) = state_dir else {
            let data = tempfile::tempfile_in(tmp).map_err(io("Creating a state file in", tmp))?;
            data.set_len(size)
                .map_err(io("Sizing a state file in", tmp))?;
            return Ok((
                Store {
                    data,
                    journal: None,
                },
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
        let jlen = journal
            .metadata()
            .map_err(io("Reading", &journal_path))?
            .len();
        let mut restored = Vec::new();
        if jlen == 0 {
            journal
                .write_all_at(&header, 0)
                .map_err(io("Writing", &journal_path))?;
            journal.sync_all().map_err(io("Syncing", &journal_path))?;
        } else {
            let mut have = [0u8; HEADER_BYTES];
            journal
                .read_exact_at(&mut have, 0)
                .map_err(io("Reading", &journal_path))?;
            if have != header {
                return Err(MountError::StateMismatch(dir.to_path_buf()));
            }
            let mut bytes = vec![0u8; usize::try_from(jlen - HEADER_LEN).unwrap_or(0)];
            journal
                .read_exact_at(&mut bytes, HEADER_LEN)
                .map_err(io("Reading", &journal_path))?;
            for (i, b) in bytes.iter().enumerate() {
                let state = match b {
                    3 => ChunkState::Modified,
                    4 => ChunkState::Discarded,
                    _ => continue,
                };
                restored.push((i as u64, state));
            }
        }
        data.set_len(size).map_err(io("Sizing", &data_path))?;
        Ok((
            Store {
                data,
                journal: Some(journal),
            },
            restored,
        ))
    }

    /// Reads `buf.len()` bytes at `offset` of the state file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.data.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset` of the state file.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.data.write_all_at(buf, offset)
    }

    /// Records that `chunk` is now `state` (modified or discarded) in the journal.
    pub fn record(&self, chunk: u64, state: ChunkState) -> std::io::Result<()> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let pos = chunk.checked_add(HEADER_LEN).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk number overflows")
        })?;
        j.write_all_at(&[state as u8], pos)
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
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "range overflows",
            ));
        };
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
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

    /// Makes everything written so far durable: data first, then the journal.
    pub fn sync(&self) -> std::io::Result<()> {
        self.data.sync_data()?;
        if let Some(j) = &self.journal {
            j.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(base: u8, overlay: u8) -> StateOwner {
        StateOwner {
            base: [base; 32],
            overlay: [overlay; 32],
        }
    }

    /// Makes a state folder for base 1 + overlay 1, then opens it again as `other`.
    fn reopen_as(other: StateOwner) -> Result<(Store, Vec<(u64, ChunkState)>), MountError> {
        let dir = tempfile::tempdir().unwrap();
        let open = |who: &StateOwner| {
            Store::open(Some(dir.path()), dir.path(), ImageKind::Disk, 1 << 20, who)
        };
        open(&owner(1, 1)).unwrap();
        open(&other)
    }

    #[test]
    fn journal_reopened_returns_recorded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (s, r) = Store::open(
            Some(dir.path()),
            dir.path(),
            ImageKind::Disk,
            1 << 20,
            &owner(1, 1),
        )
        .unwrap();
        assert!(r.is_empty());
        s.record(3, ChunkState::Modified).unwrap();
        s.record(7, ChunkState::Discarded).unwrap();
        drop(s);
        let (_, r) = Store::open(
            Some(dir.path()),
            dir.path(),
            ImageKind::Disk,
            1 << 20,
            &owner(1, 1),
        )
        .unwrap();
        assert_eq!(
            r,
            vec![(3, ChunkState::Modified), (7, ChunkState::Discarded)]
        );
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
}
