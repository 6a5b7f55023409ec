//! Reading the base images: the bytes of every chunk the overlay does not change.
//!
//! A read of the serving core asks [`BaseImages`] for base bytes in one of two ways:
//!
//! ```text
//!  small read, or a read mixing states ─► BaseImages::copy ─► pread into the thread's buffer
//!  large read of base chunks only ──────► BaseImages::read_large
//!        pages in the page cache (mincore) ─► ReadOut::Mapped: replied from the mapping,
//!                                             then BaseImages::release every 8 MiB
//!        pages not in the page cache ───────► O_DIRECT read into the thread's buffer
//! ```
//!
//! The resolver of overlay chunks (zeros, base references, XOR payloads) reads base chunks
//! through the same files ([`BaseReader`]).

use crate::error::MountError;
use log::{debug, warn};
use memmap2::Mmap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use synth::chunk::CHUNK_SIZE_U64;
use synth::resolve::BaseReader;
use synth::ImageKind;

/// The base images: read with `pread` into the caller's buffer, or, for a large read of base
/// chunks only, replied straight from a read-only mapping when the page cache holds them, and
/// read from the disk with `O_DIRECT` into the caller's buffer when it does not.
///
/// A small read (QEMU's random 4 KiB reads) costs less as a `pread` into a warm buffer than as
/// a reply from the mapping: that one made the kernel fault the base pages into the daemon, with
/// fault-around, and unmap them again later to bound the RSS. A large read (sequential
/// readahead, up to 1 MiB a request) costs less from the mapping: the kernel copies the base pages into
/// the reply once, where a `pread` first copies them into the buffer. Both were measured side
/// by side (`BENCHMARKS.md`, cloudletfs, "Run G"). A large read of pages the page cache does
/// not hold would fill the base's page cache only for the reply to copy it into the FUSE
/// file's own: read with `O_DIRECT`, the disk fills the warm buffer instead, and a cold GiB
/// costs the machine less than half the CPU time (run K).
#[derive(Debug)]
pub struct BaseImages {
    disk: BaseFile,
    memory: BaseFile,
}

/// One base image file, its length at mount, and its mapping.
#[derive(Debug)]
struct BaseFile {
    file: File,
    len: u64,
    /// `None` for an empty file (which cannot be mapped).
    map: Option<Mmap>,
    /// Bytes replied from the mapping since its pages were last released.
    mapped_since_release: AtomicU64,
    /// The same file opened with `O_DIRECT`, for large reads of pages the page cache does not
    /// hold; `None` where the file system refuses the flag.
    direct: Option<File>,
    /// Cleared when the file system refuses an `O_DIRECT` read (then the mapping serves).
    direct_ok: AtomicBool,
}

impl BaseFile {
    fn open(path: &Path) -> Result<Self, MountError> {
        let io = |action| {
            move |source| MountError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let file = File::open(path).map_err(io("Opening"))?;
        let len = file.metadata().map_err(io("Reading"))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: base images are immutable files of the registry: nothing writes or
            // truncates them while they are registered, so the mapping stays valid and its
            // bytes do not change.
            Some(unsafe { Mmap::map(&file) }.map_err(io("Mapping"))?)
        };
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| debug!("{}: no O_DIRECT reads: {e}", path.display()))
            .ok();
        Ok(BaseFile {
            file,
            len,
            map,
            mapped_since_release: AtomicU64::new(0),
            direct_ok: AtomicBool::new(true),
            direct,
        })
    }
}

/// The smallest read of base chunks only that is replied from the mapping.
pub const MAPPED_READ_MIN: u64 = 128 << 10;

/// Bytes replied from a base mapping between two releases of its pages.
pub const RELEASE_EVERY: u64 = 8 << 20;

/// The alignment of an `O_DIRECT` read of a base image (offset, length and buffer): a page,
/// which every block device's logical block size divides.
pub const DIRECT_ALIGN: usize = 4096;

/// Whether the page cache holds every page of `mapped`, a page-aligned slice of a base
/// mapping. `true` when the kernel cannot tell (then the mapping serves, as it always may).
fn in_page_cache(mapped: &[u8]) -> bool {
    let mut vec = vec![0u8; mapped.len().div_ceil(DIRECT_ALIGN)];
    // SAFETY: `mapped` lies inside a live mapping of the base file and starts on a page (the
    // caller checks), and `vec` has one byte per page of it, which is all mincore writes.
    let r = unsafe {
        libc::mincore(
            mapped.as_ptr() as *mut libc::c_void,
            mapped.len(),
            vec.as_mut_ptr(),
        )
    };
    r != 0 || vec.iter().all(|p| p & 1 == 1)
}

impl BaseImages {
    /// Opens and maps the two base images.
    pub fn open(disk: &Path, memory: &Path) -> Result<Self, MountError> {
        Ok(BaseImages {
            disk: BaseFile::open(disk)?,
            memory: BaseFile::open(memory)?,
        })
    }

    fn file(&self, image: ImageKind) -> &BaseFile {
        match image {
            ImageKind::Disk => &self.disk,
            ImageKind::Memory => &self.memory,
        }
    }

    /// The length in bytes of a base image.
    pub fn len(&self, image: ImageKind) -> u64 {
        self.file(image).len
    }

    /// Copies base bytes at `offset` into `out`, zeros past the base's end.
    pub fn copy(&self, image: ImageKind, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let f = self.file(image);
        let n = usize::try_from(f.len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(out.len());
        let (data, past_end) = out.split_at_mut(n);
        f.file.read_exact_at(data, offset)?;
        past_end.fill(0);
        Ok(())
    }

    /// Reads the base bytes `offset..offset + n` from the disk with `O_DIRECT` into `buf`,
    /// grown as needed, at an aligned place; returns that place. The read is padded to
    /// [`DIRECT_ALIGN`] (the kernel splits an `O_DIRECT` read of a FUSE file at the pages of
    /// the reader's buffer, so a request's length need not be aligned). `Ok(None)` when this
    /// file or this offset cannot be read that way (then the mapping serves); a refusal of the
    /// file system on a first read turns `O_DIRECT` off for the file.
    fn read_direct(
        &self,
        image: ImageKind,
        offset: u64,
        n: usize,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Option<Range<usize>>> {
        let f = self.file(image);
        let Some(direct) = f
            .direct
            .as_ref()
            .filter(|_| f.direct_ok.load(Ordering::Relaxed))
        else {
            return Ok(None);
        };
        if !offset.is_multiple_of(DIRECT_ALIGN as u64) {
            return Ok(None);
        }
        let padded = n.next_multiple_of(DIRECT_ALIGN);
        if buf.len() < padded + DIRECT_ALIGN {
            buf.resize(padded + DIRECT_ALIGN, 0);
        }
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN {
            return Ok(None);
        }
        let mut done = 0;
        while done < n {
            let into = &mut buf[start + done..start + padded];
            match direct.read_at(into, offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(got) => done += got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if done == 0 {
                        f.direct_ok.store(false, Ordering::Relaxed);
                        warn!(
                            "the base {} refuses O_DIRECT reads ({e}); reading it through \
                             the page cache",
                            image.name()
                        );
                    }
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(start..start + n))
    }

    /// A large read of base bytes `offset..end`: the mapped bytes when the page cache holds
    /// them all, else the bytes read with `O_DIRECT` into `buf` (see [`BaseImages`]). `None`
    /// when the range is not all inside the base.
    pub fn read_large<'a>(
        &'a self,
        image: ImageKind,
        offset: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Option<ReadOut<'a>>> {
        let Some(mapped) = self.mapped(image, offset, end) else {
            return Ok(None);
        };
        if offset.is_multiple_of(DIRECT_ALIGN as u64) && !in_page_cache(mapped) {
            if let Some(at) = self.read_direct(image, offset, mapped.len(), buf)? {
                return Ok(Some(ReadOut::Buffer(at)));
            }
        }
        Ok(Some(ReadOut::Mapped(mapped)))
    }

    /// The mapped base bytes `offset..end`, if they are all inside the base.
    fn mapped(&self, image: ImageKind, offset: u64, end: u64) -> Option<&[u8]> {
        let m = self.file(image).map.as_deref()?;
        m.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
    }

    /// Accounts `len` bytes of a base image as replied from its mapping; every
    /// [`RELEASE_EVERY`] bytes, drops the daemon's page mappings of the whole image so that
    /// serving a large base does not grow the daemon's RSS. The pages stay in the page cache and
    /// are mapped again on the next access. One call per 8 MiB rather than one per read keeps
    /// the cost (a TLB shootdown across the FUSE threads) off the read path.
    pub fn release(&self, image: ImageKind, len: usize) {
        let f = self.file(image);
        let Some(m) = &f.map else { return };
        let before = f
            .mapped_since_release
            .fetch_add(len as u64, Ordering::Relaxed);
        if before.saturating_add(len as u64) < RELEASE_EVERY {
            return;
        }
        f.mapped_since_release.store(0, Ordering::Relaxed);
        // SAFETY: the mapping is of an immutable, read-only file (see `BaseFile::open`).
        // MADV_DONTNEED on a shared file mapping only drops page-table entries: any slice into
        // it, here or in another thread, reads the same bytes again from the page cache on its
        // next access, so no live reference observes a change.
        let r = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        if let Err(e) = r {
            debug!("madvise(DONTNEED) on the base mapping failed: {e}");
        }
    }
}

impl BaseReader for BaseImages {
    fn read_chunk(&self, image: ImageKind, chunk: u64, out: &mut [u8]) -> std::io::Result<()> {
        let offset = chunk.checked_mul(CHUNK_SIZE_U64).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk number overflows")
        })?;
        self.copy(image, offset, out)
    }
}

/// Where the bytes of a read are.
#[derive(Debug)]
pub enum ReadOut<'a> {
    /// In the base mapping (a large read of base chunks only); account them with
    /// [`BaseImages::release`] once replied.
    Mapped(&'a [u8]),
    /// These bytes of the caller's buffer.
    Buffer(Range<usize>),
}
