//! Mounting: [`mount`] opens the overlay (local file or URL), checks it against the base, builds
//! the [`Core`], starts the fetch workers and the FUSE session, and returns a [`Mounted`]
//! handle that unmounts on drop.
//!
//! # Memory per mount
//!
//! Besides the cache of rebuilt chunks (a memfd only within the process-wide budget, else a
//! file) and the copy-on-write data (files, bounded by [`MountOptions::cow_quota`]), a mount
//! holds, with `R` its overlay's largest decoded segment and `L` its compressed length
//! (`R` ≤ 256 MiB and `L` ≤ `R + R/128 + 4 KiB` by validation; `cloudlet diff` makes 16 MiB):
//!
//! - segments decoded by readers themselves: at most
//!   [`MAX_CLAIMED_BYTES`](crate::fetch::MAX_CLAIMED_BYTES) (64 MiB), compressed and decoded,
//!   until handed on;
//! - one segment (`L + R`) per demand worker (`fetch_threads`, 2) and for the filler;
//! - the rest worker's segment (`R`) and its queue (16 MiB, or one segment if larger);
//! - the metadata: decoded at most [`metadata_decode_limit`] bytes while opening (at most
//!   256 times its stored size past 64 MiB, never 1 GiB), then parsed, one entry per changed
//!   chunk of images whose sizes the base bounds.
//!
//! With the defaults that is 64 MiB + 3 (`L + R`) + `R` + max(16 MiB, `R`) of segments: about
//! 193 MiB for 16 MiB segments, 2.1 GiB at most for a hostile overlay of 256 MiB ones.
//!
//! [`metadata_decode_limit`]: synth::format::metadata_decode_limit

use crate::base::BaseImages;
use crate::cache::{available_memory, CacheReservation};
use crate::error::MountError;
use crate::fetch::spawn_workers;
use crate::fs::{spawn_reaper, CloudletFs};
use crate::http::{HttpOptions, HttpSource};
use crate::serve::{Core, CoreParts};
use crate::stats::Stats;
use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use log::info;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use synth::chunk::CHUNK_SIZE_U64;
use synth::format::{BaseLimits, Overlay};
use synth::registry::Base;
use synth::source::{ByteSource, FileSource};
use synth::ImageKind;

/// Where the overlay comes from.
#[derive(Clone)]
pub enum OverlaySource {
    /// A local overlay file.
    Path(PathBuf),
    /// An `http://` or `https://` URL, read with Range requests.
    Url(String),
    /// Any byte source (tests use slow or failing sources).
    Source(Arc<dyn ByteSource>),
}

impl std::fmt::Debug for OverlaySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OverlaySource::Path(p) => write!(f, "Path({})", p.display()),
            OverlaySource::Url(u) => write!(f, "Url({u})"),
            OverlaySource::Source(_) => write!(f, "Source(..)"),
        }
    }
}

impl OverlaySource {
    /// A URL if `s` starts with `http://` or `https://`, else a path.
    pub fn parse(s: &str) -> Self {
        if s.starts_with("http://") || s.starts_with("https://") {
            OverlaySource::Url(s.to_string())
        } else {
            OverlaySource::Path(PathBuf::from(s))
        }
    }
}

/// Everything a mount needs.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The base VM (from the registry).
    pub base: Base,
    /// The overlay.
    pub overlay: OverlaySource,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Persistent copy-on-write state (survives a crash); `None`: state lives in unlinked
    /// temporary files.
    pub state_dir: Option<PathBuf>,
    /// Folder for the (unlinked) cache files of rebuilt chunks when they are not kept in
    /// memory (see `cache_memory`); default: the system temp dir.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of rebuilt overlay chunks that this process's mounts keep in memory, all
    /// together: a mount whose overlay chunks do not fit in what is left caches them in files
    /// in `cache_dir` instead. `None`: a quarter of the memory available at mount time
    /// ([`available_memory`]) plus what the process's memory caches already hold; `Some(0)`:
    /// always files.
    pub cache_memory: Option<u64>,
    /// Demand fetch workers.
    pub fetch_threads: usize,
    /// FUSE worker threads (at least 4). At most half of them wait for the network
    /// themselves; past that, reads and writes of pending chunks wait in waiter threads
    /// ([`crate::waiters`]).
    pub fuse_threads: usize,
    /// Whether the background filler fetches the whole overlay.
    pub background_fill: bool,
    /// HTTP timeouts and retries.
    pub http: HttpOptions,
    /// Longest a read waits for a pending chunk before EIO.
    pub wait_timeout: Duration,
    /// `allow_other` (so e.g. libvirt's qemu user can open the images).
    pub allow_other: bool,
    /// Unmount automatically when the process dies (needs `fusermount3`).
    pub auto_unmount: bool,
    /// How many bytes the overlay's disk may have beyond the base's disk
    /// ([`BaseLimits::max_disk_growth`]); `None`: as many as the base's disk has. The memory
    /// image must always be the base's size.
    pub max_disk_growth: Option<u64>,
    /// Most bytes of modified chunks (disk and memory together) the mount keeps in its state
    /// files; the first write of a chunk past it fails with EIO. `None`: no limit.
    pub cow_quota: Option<u64>,
    /// A second mount point serving the same files through a FUSE connection of its own,
    /// whose readahead window is `memory_readahead`: a VM maps its RAM from `memory/image`
    /// there ([`Mounted::image_path`]), so a page fault reads a few KiB around it, while the
    /// disk keeps the first mount's sequential window ([`MAX_READAHEAD`]). The kernel sizes
    /// the read-around of a fault by the file's connection, not by the file. `None`: one
    /// mount.
    ///
    /// [`MAX_READAHEAD`]: crate::fs::MAX_READAHEAD
    pub memory_mountpoint: Option<PathBuf>,
    /// The memory mount's readahead window in bytes ([`MEMORY_READAHEAD`] by default).
    ///
    /// [`MEMORY_READAHEAD`]: crate::fs::MEMORY_READAHEAD
    pub memory_readahead: u32,
    /// The uid and gid the files are owned by (the user a VM's QEMU runs as); `None`: the
    /// mounting process's. The modes stay owner-only.
    pub owner: Option<(u32, u32)>,
}

impl MountOptions {
    /// Options with defaults: 2 demand fetchers, 8 FUSE threads, background fill on,
    /// `allow_other` and auto-unmount on, the disk at most twice the base's, no quota.
    pub fn new(base: Base, overlay: OverlaySource, mountpoint: impl Into<PathBuf>) -> Self {
        MountOptions {
            base,
            overlay,
            mountpoint: mountpoint.into(),
            state_dir: None,
            cache_dir: None,
            cache_memory: None,
            fetch_threads: 2,
            fuse_threads: 8,
            background_fill: true,
            http: HttpOptions::default(),
            wait_timeout: Duration::from_secs(120),
            allow_other: true,
            auto_unmount: true,
            max_disk_growth: None,
            cow_quota: None,
            memory_mountpoint: None,
            memory_readahead: crate::fs::MEMORY_READAHEAD,
            owner: None,
        }
    }
}

/// One of the traces cloudletfs keeps per image (also readable as `*/streams/chunks_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trace {
    /// Chunks read or written.
    Accessed,
    /// Chunks written.
    Modified,
    /// Chunks discarded (punched).
    Discarded,
}

/// A mounted cloudletfs (one or two FUSE connections over one serving core); unmounts on
/// drop.
pub struct Mounted {
    /// The main mount first, then the memory mount if there is one.
    fuse: Vec<FuseMount>,
    core: Arc<Core>,
    workers: Vec<JoinHandle<()>>,
    /// This mount's share of the memory budget for caches, if its cache is in memory.
    _cache: Option<CacheReservation>,
}

/// One FUSE connection of a [`Mounted`] and where it is mounted.
struct FuseMount {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    /// Which mount at `mountpoint` is this one: see [`FuseMount::still_mounted_here`].
    identity: Option<MountIdentity>,
    /// See [`fuse_device_released_first`].
    _fuse_device: Option<OwnedFd>,
}

/// How to recognise this mount in `/proc/self/mountinfo`: the mount point as the kernel
/// spells it (absolute, symlinks resolved) and the device number of the FUSE connection.
#[derive(Debug)]
struct MountIdentity {
    path: Vec<u8>,
    dev: (u32, u32),
}

/// The device (`major`, `minor`) of the topmost mount at `path` in a mountinfo text (see
/// `proc_pid_mountinfo(5)`; the mount point field escapes space, tab, newline and backslash
/// as octal).
fn mountinfo_dev_at(mountinfo: &str, path: &[u8]) -> Option<(u32, u32)> {
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        let (major, minor) = dev.split_once(':')?;
        (unescape_mountinfo(point) == path)
            .then(|| Some((major.parse().ok()?, minor.parse().ok()?)))
            .flatten()
    })
}

/// The device number (`major`, `minor`) of the topmost file system mounted exactly at `path`
/// (not merely on a folder below a mount), or `None` if `path` is not a mount point (or
/// cannot be resolved, or `/proc/self/mountinfo` is unreadable).
pub fn mounted_at(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::ffi::OsStrExt;
    let canonical = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo_dev_at(&mountinfo, canonical.as_os_str().as_bytes())
}

/// Undoes mountinfo's `\ooo` escapes.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// A duplicate of the session's `/dev/fuse` descriptor numbered above every descriptor open
/// now, so that if the process dies the FUSE connection is gone before fusermount3 learns of
/// it.
///
/// With `auto_unmount`, fusermount3 waits for its socket to the daemon to close, then opens
/// the mount point and unmounts only if that fails with ENOTCONN (connection gone). A dying
/// process releases its files last descriptor first, and the socket's number is above the
/// `/dev/fuse` descriptor fuser received: fusermount3 could open the mount point while the
/// connection still lived, get ECONNABORTED when it ended, and leave the dead mount behind
/// (the `kill -9` test, about 1 run in 15 with other mounts busy). This duplicate keeps the
/// device file open until after the socket is released; with one device file for all FUSE
/// threads (no `clone_fd`), that is the whole connection. `None` (logged) if it cannot be
/// made: auto-unmount is then as racy as before.
fn fuse_device_released_first(session: &impl AsFd) -> Option<OwnedFd> {
    let highest = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .max()
        .unwrap_or(2);
    // SAFETY: F_DUPFD_CLOEXEC reads no memory; the descriptor is valid (borrowed from the
    // session) and the call returns a new descriptor or -1.
    let fd = unsafe {
        libc::fcntl(
            session.as_fd().as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            highest.saturating_add(1),
        )
    };
    if fd < 0 {
        log::warn!(
            "cannot duplicate the FUSE descriptor above {highest}: {}; auto-unmount after a \
             crash may leave the mount behind",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: `fd` was just returned by fcntl and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let points: Vec<&Path> = self.fuse.iter().map(|m| m.mountpoint.as_path()).collect();
        f.debug_struct("Mounted")
            .field("mountpoints", &points)
            .finish_non_exhaustive()
    }
}

fn open_source(src: &OverlaySource, http: &HttpOptions) -> Result<Arc<dyn ByteSource>, MountError> {
    Ok(match src {
        OverlaySource::Path(p) => {
            Arc::new(FileSource::open(p).map_err(|source| MountError::Io {
                action: "Opening",
                path: p.clone(),
                source,
            })?)
        }
        OverlaySource::Url(u) => Arc::new(HttpSource::open(u, http.clone())?),
        OverlaySource::Source(s) => Arc::clone(s),
    })
}

/// Mounts the VM described by `opts`.
pub fn mount(opts: MountOptions) -> Result<Mounted, MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::FuseUnavailable(
            "/dev/fuse does not exist".into(),
        ));
    }
    if mounted_at(&opts.mountpoint).is_some() {
        return Err(MountError::AlreadyMounted(opts.mountpoint.clone()));
    }
    let source = open_source(&opts.overlay, &opts.http)?;
    let overlay = Overlay::open(source)?;
    let base = BaseImages::open(&opts.base.disk_path(), &opts.base.memory_path())?;
    overlay.check_base(&BaseLimits {
        id: opts.base.id(),
        disk_size: base.len(ImageKind::Disk),
        memory_size: base.len(ImageKind::Memory),
        max_disk_growth: opts.max_disk_growth,
    })?;
    let tmp = opts.cache_dir.clone().unwrap_or_else(std::env::temp_dir);
    // Every overlay chunk may end up in the cache (zeros excepted); that bound decides.
    let cache_bytes = ImageKind::ALL
        .iter()
        .map(|&k| overlay.metadata().image(k).chunks.len() as u64 * CHUNK_SIZE_U64)
        .sum::<u64>();
    // The budget covers every memory cache of this process (a server mounts many overlays).
    let cache_limit = opts.cache_memory.unwrap_or_else(|| {
        available_memory()
            .unwrap_or(0)
            .saturating_add(CacheReservation::held())
            / 4
    });
    let reservation = CacheReservation::take(cache_bytes, cache_limit);
    let cache_in_memory = reservation.is_some();
    info!(
        "rebuilt chunks (up to {} MiB) are cached {}",
        cache_bytes >> 20,
        if cache_in_memory {
            "in memory".to_string()
        } else {
            format!(
                "in {} (memory budget {} MiB, {} MiB of it already taken)",
                tmp.display(),
                cache_limit >> 20,
                CacheReservation::held() >> 20
            )
        }
    );
    let core = Arc::new(Core::new(CoreParts {
        overlay,
        base,
        base_id: opts.base.id(),
        state_dir: opts.state_dir.as_deref(),
        cache_dir: &tmp,
        cache_in_memory,
        wait_timeout: opts.wait_timeout,
        cow_quota: opts.cow_quota,
    })?);
    // The first demand read should not also pay for the decoder's first use.
    if let Err(e) = synth::codec::warm_up(core.meta.codec) {
        log::debug!("warming up the decoder failed: {e}");
    }
    let fuse_threads = opts.fuse_threads.max(4);
    let mut workers = spawn_workers(&core, opts.fetch_threads, opts.background_fill);
    workers.extend(spawn_reaper(&core));
    let mut points = vec![(opts.mountpoint.clone(), crate::fs::MAX_READAHEAD)];
    if let Some(memory) = &opts.memory_mountpoint {
        points.push((memory.clone(), opts.memory_readahead));
    }
    let mut fuse = Vec::with_capacity(points.len());
    for (point, readahead) in points {
        match FuseMount::start(&core, &point, &opts, fuse_threads, readahead) {
            Ok(m) => fuse.push(m),
            Err(e) => {
                for mut m in fuse {
                    if let Err(e) = m.stop() {
                        log::warn!("{}", crate::error::chain(&e));
                    }
                }
                core.shutdown();
                for w in workers {
                    let _ = w.join();
                }
                return Err(e);
            }
        }
    }
    info!(
        "mounted {} (disk {} B, memory {} B, {} segments) on {}",
        opts.base.record.id,
        core.image(ImageKind::Disk).size,
        core.image(ImageKind::Memory).size,
        core.meta.segments.len(),
        opts.mountpoint.display()
    );
    Ok(Mounted {
        fuse,
        core,
        workers,
        _cache: reservation,
    })
}

impl FuseMount {
    /// Starts a FUSE session serving `core` at `mountpoint` with a readahead window of
    /// `readahead` bytes.
    fn start(
        core: &Arc<Core>,
        mountpoint: &Path,
        opts: &MountOptions,
        fuse_threads: usize,
        readahead: u32,
    ) -> Result<FuseMount, MountError> {
        if mounted_at(mountpoint).is_some() {
            return Err(MountError::AlreadyMounted(mountpoint.to_path_buf()));
        }
        let mut mount_options = vec![
            MountOption::FSName("cloudletfs".into()),
            MountOption::Subtype("cloudletfs".into()),
            // The kernel checks the files' owner-only modes for every caller.
            MountOption::DefaultPermissions,
        ];
        if opts.auto_unmount {
            mount_options.push(MountOption::AutoUnmount);
        }
        let mut config = Config::default();
        config.mount_options = mount_options;
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(fuse_threads);
        // One `/dev/fuse` file for all the FUSE threads, not one clone each: see
        // `fuse_device_released_first`.
        config.clone_fd = false;
        // Resolved before mounting: afterwards the last component would be this mount's root.
        let canonical = std::fs::canonicalize(mountpoint).ok();
        let mut fs = CloudletFs::new(Arc::clone(core), fuse_threads).with_readahead(readahead);
        if let Some((uid, gid)) = opts.owner {
            fs = fs.with_owner(uid, gid);
        }
        let started = fuser::Session::new(fs, mountpoint, &config).and_then(|s| {
            let device = fuse_device_released_first(&s);
            Ok((s.spawn()?, device))
        });
        let (session, fuse_device) = started.map_err(|source| match source.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => {
                MountError::FuseUnavailable(source.to_string())
            }
            _ => MountError::Mount {
                path: mountpoint.to_path_buf(),
                source,
            },
        })?;
        let dev = mount_dev(mountpoint);
        if let Some(dev) = dev {
            set_readahead(dev, readahead);
        }
        let identity = canonical.zip(dev).map(|(path, dev)| MountIdentity {
            path: path.into_os_string().into_encoded_bytes(),
            dev,
        });
        Ok(FuseMount {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            identity,
            _fuse_device: fuse_device,
        })
    }

    /// Whether the FUSE session is still running (false after an external `umount`).
    fn is_alive(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
    }

    /// Whether the mount at the mount point is still this one, so that unmounting the path
    /// detaches this mount and nothing else.
    ///
    /// Once the FUSE session has ended, someone unmounted this mount, and the path may
    /// already hold the next one (a remount right after `fusermount3 -u` lost its new mount
    /// half of the time when this was not checked). The one exception, a connection aborted
    /// through `/sys/fs/fuse/connections` while still mounted, leaves a dead mount for
    /// whoever aborted it to unmount: it cannot be told apart from a new mount that got the
    /// freed device number. While the session lives, this mount's
    /// device number is not reused, so the topmost mount at the path is this one exactly
    /// when it has that device number (it differs after an outside lazy unmount and a new
    /// mount there). Without the identity (mountinfo unreadable), a live session is trusted.
    fn still_mounted_here(&self) -> bool {
        if !self.is_alive() {
            log::debug!(
                "{}: the FUSE session has ended; already unmounted",
                self.mountpoint.display()
            );
            return false;
        }
        let Some(id) = &self.identity else {
            return true;
        };
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return true;
        };
        let here = mountinfo_dev_at(&mountinfo, &id.path);
        if here != Some(id.dev) {
            log::warn!(
                "{} no longer holds this cloudletfs mount (unmounted from outside); leaving \
                 the mount point alone",
                self.mountpoint.display()
            );
        }
        here == Some(id.dev)
    }

    /// Detaches the mount (if it is still this one) and joins its session if it ends
    /// promptly.
    fn stop(&mut self) -> Result<(), MountError> {
        // fuser's own unmount relies on fusermount3's auto-unmount helper, which was seen to
        // exit without unmounting; detach the mount ourselves. Files still open keep working
        // until closed (lazy unmount), so the session is joined only if it ends promptly.
        let r = if self.still_mounted_here() {
            lazy_unmount(&self.mountpoint).map_err(|source| MountError::Unmount {
                path: self.mountpoint.clone(),
                source,
            })
        } else {
            Ok(())
        };
        if let Some(s) = self.session.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !s.guard.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if s.guard.is_finished() {
                if let Err(e) = s.join() {
                    log::warn!(
                        "FUSE session of {} ended with: {e}",
                        self.mountpoint.display()
                    );
                }
            } else {
                log::warn!(
                    "{}: files are still open; the FUSE session ends when they are closed",
                    self.mountpoint.display()
                );
            }
        }
        if r.is_ok() {
            info!("unmounted {}", self.mountpoint.display());
        }
        r
    }
}

impl Mounted {
    /// The (main) mount point.
    pub fn mountpoint(&self) -> &Path {
        self.fuse
            .first()
            .map_or(Path::new(""), |m| m.mountpoint.as_path())
    }

    /// Where a VM opens `image`: `memory/image` on the memory mount when there is one
    /// ([`MountOptions::memory_mountpoint`]), else on the main mount.
    pub fn image_path(&self, image: ImageKind) -> PathBuf {
        let (point, dir) = match image {
            ImageKind::Disk => (self.mountpoint(), "disk"),
            ImageKind::Memory => (
                self.fuse
                    .get(1)
                    .map_or(self.mountpoint(), |m| m.mountpoint.as_path()),
                "memory",
            ),
        };
        point.join(dir).join("image")
    }

    /// Every chunk of `image` in the trace `trace`, ascending.
    pub fn trace(&self, image: ImageKind, trace: Trace) -> Vec<u64> {
        let img = self.core.image(image);
        match trace {
            Trace::Accessed => img.accessed.members(),
            Trace::Modified => img.modified.members(),
            Trace::Discarded => img.discarded.members(),
        }
    }

    /// Chunks of both images in the order they were first read or written, at most `limit`.
    pub fn access_order(&self, limit: usize) -> Vec<(ImageKind, u64)> {
        let mut v = self.core.first_touch_order();
        v.truncate(limit);
        v
    }

    /// A snapshot of all counters.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// A function taking [`Mounted::stats`] snapshots from another thread, e.g. at the moment
    /// a guest's service first answers.
    pub fn stats_reader(&self) -> impl Fn() -> Stats + Send + 'static {
        let core = Arc::clone(&self.core);
        move || core.stats()
    }

    /// Waits until the background filler has finished (`None`: no limit); returns whether
    /// every overlay chunk is now rebuilt (or failed verification).
    pub fn wait_filled(&self, timeout: Option<Duration>) -> bool {
        self.core.fetcher.queue.wait_filled(timeout) && self.core.pending() == 0
    }

    /// Whether every FUSE session is still running (false after an external `umount` of
    /// either mount).
    pub fn is_alive(&self) -> bool {
        !self.fuse.is_empty() && self.fuse.iter().all(FuseMount::is_alive)
    }

    /// Makes the modified/discarded state of both images durable.
    pub fn sync(&self) -> Result<(), crate::error::ServeError> {
        self.core.sync(ImageKind::Disk)?;
        self.core.sync(ImageKind::Memory)
    }

    /// Unmounts and stops every worker.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), MountError> {
        // Parked stream reads would keep the session busy: end them first.
        self.core.close_streams();
        let mut r = Ok(());
        // The memory mount first, the main one last.
        for mut m in self.fuse.drain(..).rev() {
            let stopped = m.stop();
            if r.is_ok() {
                r = stopped;
            } else if let Err(e) = stopped {
                log::warn!("{}", crate::error::chain(&e));
            }
        }
        self.core.shutdown();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let _ = self.core.sync(ImageKind::Disk);
        let _ = self.core.sync(ImageKind::Memory);
        r
    }
}

/// The device number (`major`, `minor`) of the file system mounted at `mountpoint`.
fn mount_dev(mountpoint: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint).ok()?.dev();
    Some((libc::major(dev), libc::minor(dev)))
}

/// Sets the bdi readahead of the mount with device `(major, minor)` to `bytes`: the kernel
/// caps the `init` value at the bdi default (128 KiB), so a larger window needs this. Needs
/// root; failure only costs speed (a smaller window is in force from `init` anyway).
fn set_readahead((major, minor): (u32, u32), bytes: u32) {
    let p = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&p, (bytes / 1024).to_string()) {
        Ok(()) => log::debug!("{p} set to {} KiB", bytes / 1024),
        Err(e) => log::debug!("setting the readahead via {p} failed: {e}"),
    }
}

/// Detaches the mount at `path` (`umount2(MNT_DETACH)`, or `fusermount3 -u -z` when not root).
fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        Some(libc::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(path)
                .status()?;
            if st.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "fusermount3 -u failed: {st}"
                )))
            }
        }
        _ => Err(e),
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.fuse.is_empty() {
            if let Err(e) = self.stop() {
                log::warn!("{}", crate::error::chain(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_dev_is_the_topmost_mount_at_the_path() {
        let m = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 60 22 0:52 / /var/tmp/mnt rw,nosuid - fuse.cloudletfs cloudletfs rw\n\
                 61 22 0:53 / /var/tmp/mnt\\040b rw - fuse.cloudletfs cloudletfs rw\n\
                 62 60 0:54 / /var/tmp/mnt rw,nosuid - fuse.cloudletfs cloudletfs rw\n";
        assert_eq!(mountinfo_dev_at(m, b"/var/tmp/mnt"), Some((0, 54)));
        assert_eq!(mountinfo_dev_at(m, b"/var/tmp/mnt b"), Some((0, 53)));
        assert_eq!(mountinfo_dev_at(m, b"/"), Some((254, 1)));
        assert_eq!(mountinfo_dev_at(m, b"/var/tmp"), None);
        assert_eq!(mountinfo_dev_at("garbage\n62 60 x / /a\n", b"/a"), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone_and_bad_ones_kept() {
        assert_eq!(
            unescape_mountinfo(r"/a\040b\011c\012d\134e"),
            b"/a b\tc\nd\\e"
        );
        assert_eq!(unescape_mountinfo(r"/x\04"), br"/x\04");
        assert_eq!(unescape_mountinfo(r"/x\999"), br"/x\999");
        assert_eq!(unescape_mountinfo(r"/x\777"), br"/x\777");
    }
}
