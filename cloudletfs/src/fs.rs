//! The FUSE front: the file tree, request dispatch and the one place where errors become
//! errno values ([`errno`]).
//!
//! ```text
//! /
//! ├── device-state            read-only
//! ├── disk/
//! │   ├── image               read-write, page cache (keep_cache)
//! │   ├── stats               JSON snapshot taken at open, direct_io
//! │   └── streams/
//! │       ├── chunks_accessed     one chunk number per line, blocking, direct_io
//! │       ├── chunks_modified
//! │       └── chunks_discarded
//! └── memory/                 (same as disk/)
//! ```

use crate::base::ReadOut;
use crate::error::{chain, ServeError};
use crate::fetch::RestAfterReply;
use crate::serve::Core;
use crate::streams::{Cursor, Stream};
use crate::waiters::Waiters;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use synth::ImageKind;

const TTL: Duration = Duration::from_secs(1);
/// The mount's readahead window (one FUSE request still carries at most 1 MiB, so a window
/// is up to four requests in flight). 4 MiB rather than 1 MiB keeps more `O_DIRECT` base
/// reads in flight for a disk that needs them (`BENCHMARKS.md`, runs K and L). It is also
/// what a page fault on a mapping of a file of this mount reads around the faulting page,
/// which is why guest RAM is mapped from a second mount with [`MEMORY_READAHEAD`]
/// ([`MountOptions::memory_mountpoint`](crate::MountOptions::memory_mountpoint)).
pub const MAX_READAHEAD: u32 = 4 << 20;

/// The readahead window of the memory mount: what a page fault of QEMU's guest RAM mapping
/// reads around the faulting page (the kernel centres the window on it). A few pages: a
/// guest's first touches are scattered, and every extra page is fetched, perhaps over a slow
/// network, before the fault is answered. (The window only applies when QEMU does not ask for
/// huge pages: see `synth::vm::launcher`.)
pub const MEMORY_READAHEAD: u32 = 16 << 10;

/// Readahead (background) requests the kernel may have in flight at once.
pub const MAX_BACKGROUND: u16 = 256;

/// The single mapping from serving errors to errno values.
pub fn errno(e: &ServeError) -> Errno {
    match e {
        ServeError::Corrupt { .. }
        | ServeError::Fetch { .. }
        | ServeError::Io { .. }
        | ServeError::Inconsistent { .. }
        | ServeError::Shutdown => Errno::EIO,
        ServeError::Timeout { .. } => Errno::EIO,
        // Not ENOSPC: QEMU's default `werror=enospc` pauses the whole VM on ENOSPC and
        // reports only other errors to the guest; EIO reaches the guest's virtio-blk driver as
        // an I/O error on that request, and the VM keeps running.
        ServeError::QuotaExceeded { .. } => Errno::EIO,
        ServeError::OutOfRange(_) => Errno::from_i32(libc::ENOSPC),
        ServeError::Unsupported => Errno::from_i32(libc::EOPNOTSUPP),
    }
}

/// Which stream a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Accessed,
    Modified,
    Discarded,
}

/// A node of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Root,
    Dir(ImageKind),
    Streams(ImageKind),
    Image(ImageKind),
    Stats(ImageKind),
    Stream(ImageKind, StreamKind),
    DeviceState,
}

const ROOT: u64 = 1;

thread_local! {
    /// Each FUSE thread's read buffer, kept between reads up to [`READ_BUF_KEEP`] bytes.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest read buffer a FUSE thread keeps: the largest read the kernel sends with its
/// default `fs.fuse.max_pages_limit` (256 pages), plus the page that aligns an `O_DIRECT` read
/// of the base in it. A larger one (the limit raised) is freed after its read, so the buffers
/// of the 8 threads never hold much more than 8 MiB. Waiter threads ([`crate::waiters`]) free
/// theirs after every request.
const READ_BUF_KEEP: usize = (1 << 20) + crate::base::DIRECT_ALIGN;

fn base_ino(k: ImageKind) -> u64 {
    match k {
        ImageKind::Disk => 10,
        ImageKind::Memory => 20,
    }
}

impl Node {
    fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::DeviceState => 2,
            Node::Dir(k) => base_ino(k),
            Node::Image(k) => base_ino(k) + 1,
            Node::Stats(k) => base_ino(k) + 2,
            Node::Streams(k) => base_ino(k) + 3,
            Node::Stream(k, StreamKind::Accessed) => base_ino(k) + 4,
            Node::Stream(k, StreamKind::Modified) => base_ino(k) + 5,
            Node::Stream(k, StreamKind::Discarded) => base_ino(k) + 6,
        }
    }

    fn from_ino(ino: u64) -> Option<Node> {
        if ino == ROOT {
            return Some(Node::Root);
        }
        if ino == 2 {
            return Some(Node::DeviceState);
        }
        let (k, rel) = match ino {
            10..=16 => (ImageKind::Disk, ino - 10),
            20..=26 => (ImageKind::Memory, ino - 20),
            _ => return None,
        };
        Some(match rel {
            0 => Node::Dir(k),
            1 => Node::Image(k),
            2 => Node::Stats(k),
            3 => Node::Streams(k),
            4 => Node::Stream(k, StreamKind::Accessed),
            5 => Node::Stream(k, StreamKind::Modified),
            _ => Node::Stream(k, StreamKind::Discarded),
        })
    }

    fn children(self) -> Vec<(&'static str, Node)> {
        match self {
            Node::Root => vec![
                ("disk", Node::Dir(ImageKind::Disk)),
                ("memory", Node::Dir(ImageKind::Memory)),
                ("device-state", Node::DeviceState),
            ],
            Node::Dir(k) => vec![
                ("image", Node::Image(k)),
                ("stats", Node::Stats(k)),
                ("streams", Node::Streams(k)),
            ],
            Node::Streams(k) => vec![
                ("chunks_accessed", Node::Stream(k, StreamKind::Accessed)),
                ("chunks_modified", Node::Stream(k, StreamKind::Modified)),
                ("chunks_discarded", Node::Stream(k, StreamKind::Discarded)),
            ],
            _ => Vec::new(),
        }
    }

    fn parent(self) -> Node {
        match self {
            Node::Streams(k) => Node::Dir(k),
            _ => Node::Root,
        }
    }

    fn is_dir(self) -> bool {
        matches!(self, Node::Root | Node::Dir(_) | Node::Streams(_))
    }
}

/// What an open file handle holds.
enum Handle {
    Image,
    Bytes(Arc<Vec<u8>>),
    Stream(Arc<Mutex<Cursor>>),
}

/// The filesystem.
pub struct CloudletFs {
    core: Arc<Core>,
    waiters: Arc<Waiters>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    started: SystemTime,
    /// The readahead window asked for at `init`.
    readahead: u32,
}

impl std::fmt::Debug for CloudletFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudletFs").finish_non_exhaustive()
    }
}

impl CloudletFs {
    /// A filesystem serving `core` from `fuse_threads` FUSE threads.
    pub fn new(core: Arc<Core>, fuse_threads: usize) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        CloudletFs {
            core,
            waiters: Waiters::new(fuse_threads),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid,
            gid,
            started: SystemTime::now(),
            readahead: MAX_READAHEAD,
        }
    }

    /// The same with every file and folder shown as owned by `uid`:`gid` (default: the
    /// mounting process's), e.g. the unprivileged user a VM's QEMU runs as; with
    /// `default_permissions` and the owner-only modes, only that user (and root) may open
    /// them.
    pub fn with_owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// The same with a readahead window of `bytes` (default [`MAX_READAHEAD`]).
    pub fn with_readahead(mut self, bytes: u32) -> Self {
        self.readahead = bytes;
        self
    }

    /// Runs `job` (which replies) here, or, when `len` bytes at `offset` of image `k` may
    /// wait for the network, through the waiters. (A write, whose data is borrowed, does the
    /// same by hand.)
    fn run_image(
        &self,
        k: ImageKind,
        offset: u64,
        len: u64,
        job: impl FnOnce(&Core) + Send + 'static,
    ) {
        if self.core.may_wait(k, offset, len) {
            let core = Arc::clone(&self.core);
            self.waiters.run(move || job(&core));
        } else {
            job(&self.core);
        }
    }

    fn stream(&self, k: ImageKind, s: StreamKind) -> &Stream {
        let img = self.core.image(k);
        match s {
            StreamKind::Accessed => &img.accessed,
            StreamKind::Modified => &img.modified,
            StreamKind::Discarded => &img.discarded,
        }
    }

    fn attr(&self, node: Node) -> FileAttr {
        // Owner only: a guest's memory and disk, and the traces of what it touched, are
        // that session's alone. The kernel enforces the modes (`default_permissions`), also
        // under `allow_other`.
        let (kind, perm, size) = match node {
            Node::Root | Node::Dir(_) | Node::Streams(_) => (FileType::Directory, 0o700, 0),
            Node::Image(k) => (FileType::RegularFile, 0o600, self.core.image(k).size),
            Node::DeviceState => (
                FileType::RegularFile,
                0o400,
                self.core.meta.device_state.len() as u64,
            ),
            Node::Stats(_) | Node::Stream(..) => (FileType::RegularFile, 0o400, 0),
        };
        FileAttr {
            ino: INodeNo(node.ino()),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if node.is_dir() { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.handles.lock() {
            m.insert(fh, h);
        }
        fh
    }

    fn stats_json(&self, k: ImageKind) -> Vec<u8> {
        let mut s = self.core.image(k).stats();
        s.image = k.name().to_string();
        let fetch = self.core.fetcher.queue.stats();
        let v = serde_json::json!({ "image": s, "fetch": fetch });
        let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// Whether process `pid` is gone or being killed (so its parked read can be dropped).
fn process_dying(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let pending = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let mask = pending("SigPnd:") | pending("ShdPnd:");
    let kill = 1u64 << (libc::SIGKILL - 1);
    status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains('Z'))
        || mask & kill != 0
}

/// Periodically drops parked stream reads of killed processes (FUSE interrupts are not
/// delivered by fuser 0.18, and a killed reader would otherwise hang until the next event).
pub fn spawn_reaper(core: &Arc<Core>) -> Option<std::thread::JoinHandle<()>> {
    let core = Arc::clone(core);
    std::thread::Builder::new()
        .name("stream-reaper".into())
        .spawn(move || {
            while !core.is_shut_down() {
                std::thread::sleep(Duration::from_millis(200));
                for k in ImageKind::ALL {
                    let img = core.image(k);
                    for s in [&img.accessed, &img.modified, &img.discarded] {
                        s.reap(&process_dying);
                    }
                }
            }
        })
        .ok()
}

impl fuser::Filesystem for CloudletFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(self.readahead) {
            let _ = config.set_max_readahead(max);
        }
        // Readahead requests waiting for the network must not hold back the others in the
        // kernel's queue (12 in flight by default): as many as a guest's I/O can have.
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        info!("cloudletfs session started");
        Ok(())
    }

    fn destroy(&mut self) {
        info!("cloudletfs session ended");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = Node::from_ino(parent.0).and_then(|p| {
            p.children()
                .into_iter()
                .find(|(n, _)| OsStr::new(n) == name)
                .map(|(_, c)| c)
        });
        match found {
            Some(n) => reply.entry(&TTL, &self.attr(n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match Node::from_ino(ino.0) {
            Some(n) => reply.attr(&TTL, &self.attr(n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(n) = Node::from_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let attr = self.attr(n);
        match size {
            Some(s) if s != attr.size => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(n) = Node::from_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let direct = FopenFlags::FOPEN_DIRECT_IO;
        match n {
            Node::Image(_) => {
                let fh = self.add_handle(Handle::Image);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            _ if writing => reply.error(Errno::EACCES),
            Node::DeviceState => {
                let fh = self.add_handle(Handle::Image);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Node::Stats(k) => {
                let fh = self.add_handle(Handle::Bytes(Arc::new(self.stats_json(k))));
                reply.opened(FileHandle(fh), direct);
            }
            Node::Stream(k, s) => {
                let cursor = Arc::new(Mutex::new(self.stream(k, s).cursor()));
                let fh = self.add_handle(Handle::Stream(cursor));
                reply.opened(
                    FileHandle(fh),
                    direct | FopenFlags::FOPEN_NONSEEKABLE | FopenFlags::FOPEN_STREAM,
                );
            }
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        debug!("read ino {} offset {offset} size {size}", ino.0);
        let Some(n) = Node::from_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match n {
            Node::Image(k) => self.run_image(k, offset, u64::from(size), move |core| {
                read_image(core, k, offset, size, reply)
            }),
            Node::DeviceState => {
                let ds = &self.core.meta.device_state;
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(ds.len());
                let end = start.saturating_add(size as usize).min(ds.len());
                reply.data(&ds[start..end]);
            }
            Node::Stats(_) => {
                let bytes = match self.handles.lock().ok().and_then(|m| match m.get(&fh.0) {
                    Some(Handle::Bytes(b)) => Some(Arc::clone(b)),
                    _ => None,
                }) {
                    Some(b) => b,
                    None => return reply.error(Errno::EBADF),
                };
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Node::Stream(k, s) => {
                let cursor = match self.handles.lock().ok().and_then(|m| match m.get(&fh.0) {
                    Some(Handle::Stream(c)) => Some(Arc::clone(c)),
                    _ => None,
                }) {
                    Some(c) => c,
                    None => return reply.error(Errno::EBADF),
                };
                if self.core.is_shut_down() {
                    return reply.data(&[]);
                }
                self.stream(k, s).read_or_park(
                    cursor,
                    size as usize,
                    fh.0,
                    req.pid(),
                    Box::new(move |d| match d {
                        Some(d) => reply.data(&d),
                        None => reply.error(Errno::EINTR),
                    }),
                );
            }
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        debug!("write ino {} offset {offset} size {}", ino.0, data.len());
        let Some(Node::Image(k)) = Node::from_ino(ino.0) else {
            return reply.error(Errno::EACCES);
        };
        if self.core.may_wait(k, offset, data.len() as u64) {
            let (core, data) = (Arc::clone(&self.core), data.to_vec());
            self.waiters
                .run(move || write_image(&core, k, offset, &data, reply));
        } else {
            write_image(&self.core, k, offset, data, reply);
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(Node::Stream(k, s)) = Node::from_ino(ino.0) {
            self.stream(k, s).cancel(fh.0);
        }
        if let Ok(mut m) = self.handles.lock() {
            m.remove(&fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = match Node::from_ino(ino.0) {
            Some(Node::Image(k)) => self.core.sync(k),
            _ => Ok(()),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = Node::from_ino(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if !n.is_dir() {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![(".", n), ("..", n.parent())];
        entries.extend(n.children());
        for (i, (name, c)) in entries
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            let kind = if c.is_dir() {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(c.ino()), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        debug!(
            "fallocate ino {} offset {offset} length {length} mode {mode:#x}",
            ino.0
        );
        let Some(Node::Image(k)) = Node::from_ino(ino.0) else {
            return reply.error(Errno::EACCES);
        };
        let zeroing = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & zeroing != 0 {
            // Partial chunks at the ends are written: they may have to arrive first.
            self.run_image(k, offset, length, move |core| {
                match core.discard(k, offset, length) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno(&e)),
                }
            });
        } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Space is always "allocated"; the size never changes.
            reply.ok();
        } else {
            reply.error(errno(&ServeError::Unsupported));
        }
    }
}

/// Serves a read of an image into the calling thread's buffer (a FUSE or a waiter thread).
fn read_image(core: &Core, k: ImageKind, offset: u64, size: u32, reply: ReplyData) {
    // Dropped last: a segment decoded for this read is finished after the reply.
    let _rest = RestAfterReply::new(core);
    // The thread's own buffer: a read neither allocates nor zeroes memory.
    READ_BUF.with_borrow_mut(|buf| {
        match core.read(k, offset, u64::from(size), buf) {
            Ok(ReadOut::Buffer(at)) => reply.data(&buf[at]),
            Ok(ReadOut::Mapped(b)) => {
                reply.data(b);
                // Replied: the daemon need not keep those base pages mapped.
                core.base.release(k, b.len());
            }
            Err(e) => {
                warn!(
                    "read of {} at {offset}+{size} failed: {}",
                    k.name(),
                    chain(&e)
                );
                reply.error(errno(&e));
            }
        }
        if buf.len() > READ_BUF_KEEP || crate::waiters::in_waiter() {
            *buf = Vec::new();
        }
    });
}

/// Serves a write to an image (in a FUSE or a waiter thread).
fn write_image(core: &Core, k: ImageKind, offset: u64, data: &[u8], reply: ReplyWrite) {
    let _rest = RestAfterReply::new(core);
    match core.write(k, offset, data) {
        Ok(n) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
        Err(e) => {
            warn!(
                "write of {} at {offset}+{} failed: {}",
                k.name(),
                data.len(),
                chain(&e)
            );
            reply.error(errno(&e));
        }
    }
}
