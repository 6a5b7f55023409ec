//! Integration tests of cloudletfs on real FUSE mounts. One binary, topic modules, shared
//! helpers here. Without `/dev/fuse` the tests skip (and fail under `CI=true`).

// Test fixtures are a few MiB on 64-bit hosts: offset casts cannot truncate here.
#![allow(missing_docs, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod busy;
mod corrupt;
mod crash;
mod http;
mod priority;
mod read;
mod streams;
mod write;

use cloudlet_e2e::{mutate, Fixture, Mutations, Rng};
use cloudletfs::{mount, MountOptions, Mounted, OverlaySource};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use synth::codec::Codec;
use synth::create::CreateOptions;
use synth::source::{ByteSource, FileSource, Priority, SourceError};

/// Whether FUSE can be used; panics under `CI=true` when it cannot.
pub fn fuse_ok() -> bool {
    cloudlet_e2e::require_fuse()
}

/// A base, a custom VM derived from it, its overlay, and the reference reconstruction.
pub struct Setup {
    pub fx: Fixture,
    pub overlay: PathBuf,
    pub disk: Vec<u8>,
    pub memory: Vec<u8>,
    pub device_state: Vec<u8>,
}

/// Sizes and codec of a [`Setup`].
#[derive(Clone, Copy)]
pub struct Shape {
    pub disk: usize,
    pub memory: usize,
    pub codec: Codec,
    pub segment: usize,
    pub changes: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            disk: 4 << 20,
            memory: 2 << 20,
            codec: Codec::Zstd,
            segment: 64 << 10,
            changes: 200,
        }
    }
}

impl Setup {
    pub fn new(seed: u64, shape: Shape) -> Setup {
        let fx = Fixture::seeded(seed, shape.disk, shape.memory);
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
        let mut disk = fx.base_disk.clone();
        let mut memory = fx.base_memory.clone();
        // Make the custom disk a little larger than the base: chunks past the base's end.
        disk.extend(std::iter::repeat_n(0u8, 3 * 4096 + 512));
        let n = shape.changes;
        let m = Mutations {
            new: n,
            zero: n / 4,
            from_base: n / 4,
            repeated: n / 4,
        };
        mutate(
            &mut rng,
            &fx.base_disk,
            &fx.base_memory,
            &mut disk,
            &mut memory,
            m,
        );
        let mut custom = fx.write_custom(&disk, &memory);
        let ds = fx.path("custom-device-state");
        let mut device_state = vec![0u8; 10_000];
        rng.fill(&mut device_state);
        std::fs::write(&ds, &device_state).expect("write device state");
        custom.device_state = Some(ds);
        let overlay = fx.path("overlay.cld");
        let opts = CreateOptions {
            codec: shape.codec,
            level: 3,
            segment_size: shape.segment,
            ..Default::default()
        };
        fx.diff(&custom, &overlay, &opts);
        // The reference: `cloudlet reconstruct`.
        let out = fx.path("reconstructed");
        let ov = cloudlet_e2e::open_overlay(&overlay).expect("open overlay");
        synth::reconstruct::reconstruct(&fx.base, &ov, &out, 2, &Default::default())
            .expect("reconstruct");
        let disk = std::fs::read(out.join("disk.img")).expect("read disk.img");
        let memory = std::fs::read(out.join("memory.img")).expect("read memory.img");
        let device_state = std::fs::read(out.join("device-state")).expect("read device-state");
        Setup {
            fx,
            overlay,
            disk,
            memory,
            device_state,
        }
    }

    pub fn options(&self, overlay: OverlaySource, mnt: &Path) -> MountOptions {
        let mut o = MountOptions::new(self.fx.base.clone(), overlay, mnt);
        o.cache_dir = Some(self.fx.dir.path().to_path_buf());
        o.wait_timeout = Duration::from_secs(60);
        o
    }

    pub fn overlay_meta(&self) -> synth::format::Overlay {
        cloudlet_e2e::open_overlay(&self.overlay).expect("open overlay")
    }
}

/// A mount that is unmounted (and its folder removed) even when the test fails.
pub struct MountGuard {
    pub mounted: Option<Mounted>,
    pub dir: tempfile::TempDir,
}

impl MountGuard {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn mounted(&self) -> &Mounted {
        self.mounted.as_ref().expect("mounted")
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = m.unmount();
        }
    }
}

/// Mounts with `configure` applied to the default options.
pub fn mount_with(
    s: &Setup,
    overlay: OverlaySource,
    configure: impl FnOnce(&mut MountOptions),
) -> MountGuard {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().expect("mount dir");
    let mut o = s.options(overlay, dir.path());
    configure(&mut o);
    let mounted = mount(o).expect("mount");
    MountGuard {
        mounted: Some(mounted),
        dir,
    }
}

/// Reads a whole file through `read(2)`.
pub fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Opens a file with `O_DIRECT` (no page cache, no readahead: exactly the bytes asked for).
pub fn open_direct(p: &Path, write: bool) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap_or_else(|e| panic!("opening {}: {e}", p.display()))
}

/// `pread` of `len` bytes.
pub fn pread(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off)?;
    Ok(b)
}

/// A byte source that sleeps before every read (a slow network).
pub struct SlowSource {
    pub inner: FileSource,
    pub delay: Duration,
}

impl ByteSource for SlowSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        self.read_range_with(offset, len, Priority::Demand)
    }
    fn read_range_with(
        &self,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Vec<u8>, SourceError> {
        std::thread::sleep(self.delay);
        self.inner.read_range_with(offset, len, priority)
    }
}

/// A slow source over `path`.
pub fn slow(path: &Path, delay: Duration) -> OverlaySource {
    OverlaySource::Source(Arc::new(SlowSource {
        inner: FileSource::open(path).expect("open overlay"),
        delay,
    }))
}

/// A switch for [`GatedSource`]: while closed, reads wait (a network that has stopped for
/// now) and are counted. Open at first, so that a mount can read the overlay's metadata.
#[derive(Default)]
pub struct Gate {
    /// (closed, reads that arrived while closed)
    state: std::sync::Mutex<(bool, usize)>,
    changed: std::sync::Condvar,
}

impl Gate {
    /// Makes later reads wait.
    pub fn close(&self) {
        self.state.lock().expect("gate").0 = true;
    }

    /// Lets every waiting and later read through.
    pub fn open(&self) {
        self.state.lock().expect("gate").0 = false;
        self.changed.notify_all();
    }

    /// Lets a read through: at once while open, else once opened (counting it as arrived).
    pub fn pass(&self) {
        let mut g = self.state.lock().expect("gate");
        if g.0 {
            g.1 += 1;
            self.changed.notify_all();
            let _open = self.changed.wait_while(g, |s| s.0).expect("gate");
        }
    }

    /// Waits until `n` reads have arrived or `timeout` passed; the number arrived.
    pub fn wait_arrived(&self, n: usize, timeout: Duration) -> usize {
        let g = self.state.lock().expect("gate");
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |s| s.1 < n)
            .expect("gate");
        g.1
    }
}

/// `inner` behind a [`Gate`].
pub struct GatedSource {
    pub inner: FileSource,
    pub gate: Arc<Gate>,
}

impl ByteSource for GatedSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        self.read_range_with(offset, len, Priority::Demand)
    }
    fn read_range_with(
        &self,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Vec<u8>, SourceError> {
        self.gate.pass();
        self.inner.read_range_with(offset, len, priority)
    }
}

/// Opens the gate when dropped, so that a failing test still lets its readers finish.
pub struct OpenOnDrop(pub Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// First byte offset where `a` and `b` differ.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Stress seeds (`CLOUDLETFS_STRESS_SEEDS`, default 8).
pub fn stress_seeds() -> u64 {
    std::env::var("CLOUDLETFS_STRESS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}
