//! The base registry under `$CLOUDLET_HOME` (default `~/.cloudlet`).
//!
//! ```text
//! $CLOUDLET_HOME/bases/<id>/base.json     BaseRecord
//!                           index.bin     ChunkIndex
//!                           disk.img      (absent when added with --link)
//!                           memory.img    (absent when added with --link)
//!                           device-state
//!                           kernel, initrd, cloud-init-seed.img (optional)
//! ```
//!
//! A base is assembled in a hidden staging folder (`bases/.staging-PID-N`) and renamed into
//! place only once complete, so a failed add or import leaves nothing behind. Every file in
//! the staging folder is synced, then the folder, and after the rename the `bases` folder
//! ([`crate::durable`]): after a crash, power loss included, a base is either listed whole or
//! not at all. Removal renames the base to a hidden `.trash-PID-N-ID` folder first, for the
//! same reason. Hidden folders of processes that are gone (a crash) are swept on the next add
//! or import.
//!
//! A package's launch config may carry `extra_args`, which go verbatim on every QEMU command
//! line (a monitor on the network, a host file…): [`Registry::import`] refuses such a package
//! unless the caller trusts it ([`ImportOptions::trust_extra_args`]). Packages (`export`/`import`) are one file:
//! magic `b"CLDBASE1"`, a u64 manifest length, a JSON manifest listing entries by *kind* (never
//! by path), then the entries' bytes in manifest order. Import verifies every entry's size and
//! SHA-256, rebuilds the index and checks that the recomputed id equals the manifest's.

use crate::base::{BaseRecord, IdParts, LaunchConfig};
use crate::chunk::{hex, sha256, Digest};
use crate::index::{ChunkIndex, IndexError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

const PACKAGE_MAGIC: &[u8; 8] = b"CLDBASE1";
const MAX_MANIFEST_LEN: u64 = 1 << 20;
const MAX_ENTRY_SIZE: u64 = 16 << 40;
/// The largest cloud-init seed image a package may carry: a seed holds a few small text
/// files (`cloud-init-seed` in `cloudlet_tools` makes them far smaller).
pub const MAX_CLOUD_INIT_SEED: u64 = 64 << 20;

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file operation failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// File.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Building or loading the index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// No base matches.
    #[error("No base matches {0:?} (see `cloudlet list-base`)")]
    NotFound(String),
    /// Several bases match.
    #[error("{0:?} matches several bases; give more of the id")]
    Ambiguous(String),
    /// A launch config is unusable.
    #[error("Invalid launch config: {0}")]
    Config(String),
    /// A package is malformed or does not verify.
    #[error("Base package {path} is invalid: {reason}")]
    BadPackage {
        /// Package file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A package passes raw arguments to QEMU and the caller did not trust them.
    #[error(
        "Base package {path} passes raw arguments to QEMU: {args:?}; import it only if you \
         trust them"
    )]
    UntrustedExtraArgs {
        /// Package file.
        path: PathBuf,
        /// The arguments its launch config would add to every QEMU command line.
        args: Vec<String>,
    },
    /// A stored record is unreadable.
    #[error("Base record {path} is unreadable: {reason}")]
    BadRecord {
        /// Record file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RegistryError + 'a {
    move |source| RegistryError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The registry folder.
#[derive(Debug, Clone)]
pub struct Registry {
    home: PathBuf,
}

/// A registered base, ready to be used.
#[derive(Debug, Clone)]
pub struct Base {
    /// Its record.
    pub record: BaseRecord,
    /// Its folder.
    pub dir: PathBuf,
}

impl Base {
    /// Parsed base id.
    pub fn id(&self) -> Digest {
        crate::chunk::parse_hex_digest(&self.record.id).unwrap_or([0; 32])
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// Path of the disk image.
    pub fn disk_path(&self) -> PathBuf {
        self.resolve(&self.record.disk_path)
    }

    /// Path of the memory image.
    pub fn memory_path(&self) -> PathBuf {
        self.resolve(&self.record.memory_path)
    }

    /// Path of the device state.
    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join("device-state")
    }

    /// Path of the kernel, if the base has one.
    pub fn kernel_path(&self) -> Option<PathBuf> {
        self.record.config.kernel.as_ref().map(|k| self.dir.join(k))
    }

    /// Path of the initrd, if the base has one.
    pub fn initrd_path(&self) -> Option<PathBuf> {
        self.record.config.initrd.as_ref().map(|k| self.dir.join(k))
    }

    /// Path of the cloud-init seed image, if the base has one.
    pub fn cloud_init_path(&self) -> Option<PathBuf> {
        self.record
            .config
            .cloud_init
            .as_ref()
            .map(|k| self.dir.join(k))
    }

    /// What an overlay on this base is checked against
    /// ([`Overlay::check_base`](crate::format::Overlay::check_base)), from the record's image
    /// sizes, with the operator's disk growth limit (`None`: the base's disk size).
    pub fn limits(&self, max_disk_growth: Option<u64>) -> crate::format::BaseLimits {
        crate::format::BaseLimits {
            id: self.id(),
            disk_size: self.record.disk_size,
            memory_size: self.record.memory_size,
            max_disk_growth,
        }
    }

    /// Loads the chunk index.
    pub fn index(&self) -> Result<ChunkIndex, RegistryError> {
        Ok(ChunkIndex::load(&self.dir.join("index.bin"))?)
    }
}

/// How [`Registry::import_with`] treats a package.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// Accept a launch config with `extra_args` (raw QEMU arguments). Off by default: a
    /// package from elsewhere must not choose QEMU arguments unless the operator says so.
    pub trust_extra_args: bool,
}

/// What `add-base` is given.
#[derive(Debug, Clone, Default)]
pub struct AddBase {
    /// Disk image.
    pub disk: PathBuf,
    /// Memory image.
    pub memory: PathBuf,
    /// Device state, if any.
    pub device_state: Option<PathBuf>,
    /// Launch config; kernel/initrd in it are paths to copy in.
    pub config: Option<LaunchConfig>,
    /// Name; defaults to the disk file's stem.
    pub name: Option<String>,
    /// Leave the disk and memory images in place instead of copying them.
    pub link: bool,
    /// Move the disk, memory and device-state files into the registry instead of copying them
    /// (they must be on the registry's filesystem); for files made just for this base.
    pub adopt: bool,
    /// Hashing threads.
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum EntryKind {
    Disk,
    Memory,
    DeviceState,
    Kernel,
    Initrd,
    CloudInitSeed,
}

impl EntryKind {
    /// The only file name an entry of this kind is ever written to.
    fn file_name(self) -> &'static str {
        match self {
            EntryKind::Disk => "disk.img",
            EntryKind::Memory => "memory.img",
            EntryKind::DeviceState => "device-state",
            EntryKind::Kernel => "kernel",
            EntryKind::Initrd => "initrd",
            EntryKind::CloudInitSeed => "cloud-init-seed.img",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageEntry {
    kind: EntryKind,
    size: u64,
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    id: String,
    name: String,
    config: LaunchConfig,
    entries: Vec<PackageEntry>,
}

/// Copies `src` to `dst`, hashing as it goes; returns (size, SHA-256).
fn copy_hashing(src: &Path, dst: &Path) -> Result<(u64, Digest), RegistryError> {
    let mut input = File::open(src).map_err(io("Opening", src))?;
    let mut out = File::create(dst).map_err(io("Creating", dst))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io("Reading", src))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io("Writing", dst))?;
        total += n as u64;
    }
    out.sync_all().map_err(io("Syncing", dst))?;
    Ok((total, h.finalize().into()))
}

/// Moves (`adopt`) or copies `src` to `dst`, and syncs `dst`. `std::fs::copy` uses
/// copy_file_range, which shares extents where the filesystem can.
fn take_file(src: &Path, dst: &Path, adopt: bool) -> Result<(), RegistryError> {
    if adopt {
        std::fs::rename(src, dst).map_err(io("Moving", src))?;
    } else {
        std::fs::copy(src, dst).map_err(io("Copying", src))?;
    }
    sync_file(dst)
}

/// Makes the content of the file at `path` durable.
fn sync_file(path: &Path) -> Result<(), RegistryError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("Syncing", path))
}

/// Whether a hidden registry folder (`.staging-PID-…`, `.trash-PID-…`) belongs to a process
/// that is gone: left behind by a crash.
fn is_stale(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(".staging-")
        .or_else(|| name.strip_prefix(".trash-"))
    else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
}

fn hash_file(path: &Path) -> Result<Digest, RegistryError> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).map_err(io("Opening", path))?);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io("Reading", path))?;
    Ok(h.finalize().into())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// The registry at `$CLOUDLET_HOME`, or `~/.cloudlet`.
    pub fn default_home() -> PathBuf {
        if let Some(h) = std::env::var_os("CLOUDLET_HOME") {
            return PathBuf::from(h);
        }
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(".cloudlet")
    }

    /// Opens (creating if needed) the registry at `home`.
    pub fn open(home: &Path) -> Result<Self, RegistryError> {
        let bases = home.join("bases");
        std::fs::create_dir_all(&bases).map_err(io("Creating", &bases))?;
        // The bases are cloudlet's alone (0700): no QEMU reads them by path, since a
        // session's QEMU gets its kernel, initrd and seed bound into its jail. Tightened on
        // every open, so a registry made before stops being world-readable too; a registry
        // someone else owns is left as it is.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = std::fs::set_permissions(&bases, std::fs::Permissions::from_mode(0o700))
            {
                log::debug!("{} keeps its mode: {e}", bases.display());
            }
        }
        Ok(Registry {
            home: home.to_path_buf(),
        })
    }

    /// The registry's folder.
    pub fn home(&self) -> &Path {
        &self.home
    }

    fn bases_dir(&self) -> PathBuf {
        self.home.join("bases")
    }

    /// A fresh hidden folder name in `bases/`: `.PREFIX-PID-N`.
    fn hidden(&self, prefix: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bases_dir()
            .join(format!(".{prefix}-{}-{n}", std::process::id()))
    }

    /// Removes the staging and trash folders of processes that are gone.
    fn sweep(&self) {
        let dir = self.bases_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            if is_stale(&e.file_name().to_string_lossy()) {
                log::info!("removing {}, left behind by a crash", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn staging(&self) -> Result<PathBuf, RegistryError> {
        self.sweep();
        let dir = self.hidden("staging");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("Creating", &dir))?;
        Ok(dir)
    }

    /// Registers a base from image files; returns the stored base. Registering the same
    /// content again returns the existing base.
    pub fn add(&self, req: &AddBase, progress: &AtomicU64) -> Result<Base, RegistryError> {
        let staging = self.staging()?;
        let result = self.add_in(&staging, req, progress);
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    fn add_in(
        &self,
        staging: &Path,
        req: &AddBase,
        progress: &AtomicU64,
    ) -> Result<Base, RegistryError> {
        let mut config = req.config.clone().unwrap_or_default();
        let (disk_path, memory_path) = if req.link {
            let abs = |p: &Path| std::fs::canonicalize(p).map_err(io("Resolving", p));
            (abs(&req.disk)?, abs(&req.memory)?)
        } else {
            let d = staging.join(EntryKind::Disk.file_name());
            let m = staging.join(EntryKind::Memory.file_name());
            take_file(&req.disk, &d, req.adopt)?;
            take_file(&req.memory, &m, req.adopt)?;
            (d, m)
        };
        let ds_path = staging.join(EntryKind::DeviceState.file_name());
        match &req.device_state {
            Some(p) => take_file(p, &ds_path, req.adopt)?,
            None => crate::durable::write_atomic(&ds_path, b"", 0o644)
                .map_err(|e| io("Writing", &ds_path)(e.source))?,
        }
        let mut kernel = None;
        let mut initrd = None;
        let mut cloud_init = None;
        for (slot, digest, kind) in [
            (&mut config.kernel, &mut kernel, EntryKind::Kernel),
            (&mut config.initrd, &mut initrd, EntryKind::Initrd),
            (
                &mut config.cloud_init,
                &mut cloud_init,
                EntryKind::CloudInitSeed,
            ),
        ] {
            if let Some(src) = slot.take() {
                let dst = staging.join(kind.file_name());
                *digest = Some(copy_hashing(Path::new(&src), &dst)?.1);
                *slot = Some(kind.file_name().to_string());
            }
        }
        let memory_size = std::fs::metadata(&memory_path)
            .map_err(io("Reading", &memory_path))?
            .len();
        if config.memory_mb == 0 {
            config.memory_mb = memory_size >> 20;
        }
        let index = ChunkIndex::build(&disk_path, &memory_path, req.threads, progress)?;
        index.save(&staging.join("index.bin"))?;
        let ds_digest = hash_file(&ds_path)?;
        let id = IdParts {
            content: index.content_digest(),
            device_state: ds_digest,
            kernel,
            initrd,
            cloud_init,
            config: &config,
        }
        .id();
        let rel_or_abs = |p: &Path, kind: EntryKind| {
            if req.link {
                p.display().to_string()
            } else {
                kind.file_name().to_string()
            }
        };
        let record = BaseRecord {
            id: hex(&id),
            name: req.name.clone().unwrap_or_else(|| {
                req.disk
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            disk_size: std::fs::metadata(&disk_path)
                .map_err(io("Reading", &disk_path))?
                .len(),
            memory_size,
            device_state_size: std::fs::metadata(&ds_path)
                .map_err(io("Reading", &ds_path))?
                .len(),
            config,
            disk_path: rel_or_abs(&disk_path, EntryKind::Disk),
            memory_path: rel_or_abs(&memory_path, EntryKind::Memory),
            created: now(),
        };
        self.commit(staging, record)
    }

    fn commit(&self, staging: &Path, record: BaseRecord) -> Result<Base, RegistryError> {
        let dir = self.bases_dir().join(&record.id);
        if dir.join("base.json").exists() {
            log::info!("base {} is already registered", record.id);
            return self.get(&record.id);
        }
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let rec_path = staging.join("base.json");
        crate::durable::write_atomic(&rec_path, &json, 0o644)
            .map_err(|e| io("Writing", &rec_path)(e.source))?;
        // Every file in the folder is synced by now; the folder's entries, then the rename.
        crate::durable::sync_dir(staging).map_err(io("Syncing", staging))?;
        std::fs::rename(staging, &dir).map_err(io("Renaming into", &dir))?;
        let bases = self.bases_dir();
        crate::durable::sync_dir(&bases).map_err(io("Syncing", &bases))?;
        log::info!("registered base {} ({})", record.id, record.name);
        Ok(Base { record, dir })
    }

    /// All registered bases, sorted by name then id.
    pub fn list(&self) -> Result<Vec<Base>, RegistryError> {
        let dir = self.bases_dir();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("Listing", &dir))? {
            let entry = entry.map_err(io("Listing", &dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || crate::chunk::parse_hex_digest(&name).is_none() {
                continue;
            }
            out.push(self.load(&entry.path())?);
        }
        out.sort_by(|a, b| (&a.record.name, &a.record.id).cmp(&(&b.record.name, &b.record.id)));
        Ok(out)
    }

    fn load(&self, dir: &Path) -> Result<Base, RegistryError> {
        let p = dir.join("base.json");
        let bytes = std::fs::read(&p).map_err(io("Reading", &p))?;
        let record: BaseRecord =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadRecord {
                path: p.clone(),
                reason: e.to_string(),
            })?;
        Ok(Base {
            record,
            dir: dir.to_path_buf(),
        })
    }

    /// Finds a base by full id, unique id prefix (at least 4 hex digits) or exact name.
    pub fn get(&self, key: &str) -> Result<Base, RegistryError> {
        let all = self.list()?;
        let by_id: Vec<&Base> = all
            .iter()
            .filter(|b| key.len() >= 4 && b.record.id.starts_with(&key.to_ascii_lowercase()))
            .collect();
        let matches: Vec<&Base> = if by_id.is_empty() {
            all.iter().filter(|b| b.record.name == key).collect()
        } else {
            by_id
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(RegistryError::NotFound(key.into())),
            _ => Err(RegistryError::Ambiguous(key.into())),
        }
    }

    /// Removes a base: first out of the listing (renamed to a hidden folder, durably), then
    /// from the disk, so that a crash midway never leaves a half-removed base that lists.
    pub fn remove(&self, key: &str) -> Result<Base, RegistryError> {
        let base = self.get(key)?;
        let trash = self.hidden("trash");
        std::fs::rename(&base.dir, &trash).map_err(io("Removing", &base.dir))?;
        let bases = self.bases_dir();
        crate::durable::sync_dir(&bases).map_err(io("Syncing", &bases))?;
        std::fs::remove_dir_all(&trash).map_err(io("Removing", &trash))?;
        Ok(base)
    }

    /// Writes a base as one portable package file.
    pub fn export(&self, key: &str, out: &Path) -> Result<u64, RegistryError> {
        let base = self.get(key)?;
        let mut files: Vec<(EntryKind, PathBuf)> = vec![
            (EntryKind::Disk, base.disk_path()),
            (EntryKind::Memory, base.memory_path()),
            (EntryKind::DeviceState, base.device_state_path()),
        ];
        files.extend(base.kernel_path().map(|p| (EntryKind::Kernel, p)));
        files.extend(base.initrd_path().map(|p| (EntryKind::Initrd, p)));
        files.extend(
            base.cloud_init_path()
                .map(|p| (EntryKind::CloudInitSeed, p)),
        );
        let mut entries = Vec::new();
        for (kind, p) in &files {
            let size = std::fs::metadata(p).map_err(io("Reading", p))?.len();
            entries.push(PackageEntry {
                kind: *kind,
                size,
                sha256: hex(&hash_file(p)?),
            });
        }
        let manifest = Manifest {
            id: base.record.id.clone(),
            name: base.record.name.clone(),
            config: base.record.config.clone(),
            entries,
        };
        let mjson = serde_json::to_vec(&manifest).unwrap_or_default();
        let tmp = out.with_extension("partial");
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            File::create(&tmp).map_err(io("Creating", &tmp))?,
        );
        let werr = |e| RegistryError::Io {
            action: "Writing",
            path: tmp.clone(),
            source: e,
        };
        f.write_all(PACKAGE_MAGIC).map_err(werr)?;
        f.write_all(&(mjson.len() as u64).to_le_bytes())
            .map_err(werr)?;
        f.write_all(&mjson).map_err(werr)?;
        for (_, p) in &files {
            let mut input = File::open(p).map_err(io("Opening", p))?;
            std::io::copy(&mut input, &mut f).map_err(werr)?;
        }
        let f = f.into_inner().map_err(|e| werr(e.into_error()))?;
        let len = f.metadata().map_err(werr)?.len();
        drop(f);
        crate::durable::persist(&tmp, out).map_err(io("Renaming", out))?;
        Ok(len)
    }

    /// Imports a package written by [`export`](Self::export), verifying everything, with
    /// the default [`ImportOptions`]: a package whose launch config carries raw QEMU
    /// arguments is refused ([`RegistryError::UntrustedExtraArgs`]).
    pub fn import(&self, package: &Path, progress: &AtomicU64) -> Result<Base, RegistryError> {
        self.import_with(package, &ImportOptions::default(), progress)
    }

    /// Imports a package written by [`export`](Self::export), verifying everything.
    pub fn import_with(
        &self,
        package: &Path,
        opts: &ImportOptions,
        progress: &AtomicU64,
    ) -> Result<Base, RegistryError> {
        let staging = self.staging()?;
        let result = self.import_in(&staging, package, opts, progress);
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    fn import_in(
        &self,
        staging: &Path,
        package: &Path,
        opts: &ImportOptions,
        progress: &AtomicU64,
    ) -> Result<Base, RegistryError> {
        let bad = |reason: String| RegistryError::BadPackage {
            path: package.into(),
            reason,
        };
        let file = File::open(package).map_err(io("Opening", package))?;
        let total = file.metadata().map_err(io("Reading", package))?.len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut head = [0u8; 16];
        r.read_exact(&mut head)
            .map_err(|_| bad("shorter than its header".into()))?;
        if &head[..8] != PACKAGE_MAGIC {
            return Err(bad("not a cloudlet base package (bad magic)".into()));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&head[8..]);
        let mlen = u64::from_le_bytes(n);
        if mlen > MAX_MANIFEST_LEN || mlen > total.saturating_sub(16) {
            return Err(bad(format!("manifest length {mlen} is out of bounds")));
        }
        let mut mjson = vec![0u8; usize::try_from(mlen).map_err(|_| bad("manifest".into()))?];
        r.read_exact(&mut mjson)
            .map_err(|_| bad("manifest truncated".into()))?;
        let manifest: Manifest = serde_json::from_slice(&mjson)
            .map_err(|e| bad(format!("manifest does not parse: {e}")))?;
        if !manifest.config.extra_args.is_empty() && !opts.trust_extra_args {
            return Err(RegistryError::UntrustedExtraArgs {
                path: package.into(),
                args: manifest.config.extra_args.clone(),
            });
        }
        let mut seen = Vec::new();
        let mut sum = 16 + mlen;
        for e in &manifest.entries {
            if seen.contains(&e.kind) {
                return Err(bad(format!("entry {:?} appears twice", e.kind)));
            }
            seen.push(e.kind);
            if e.size > MAX_ENTRY_SIZE {
                return Err(bad(format!("entry {:?} is too large", e.kind)));
            }
            if e.kind == EntryKind::CloudInitSeed && e.size > MAX_CLOUD_INIT_SEED {
                return Err(bad(format!(
                    "the cloud-init seed is {} bytes, more than the {MAX_CLOUD_INIT_SEED} \
                     a seed may have",
                    e.size
                )));
            }
            sum = sum
                .checked_add(e.size)
                .ok_or_else(|| bad("sizes overflow".into()))?;
        }
        for required in [EntryKind::Disk, EntryKind::Memory, EntryKind::DeviceState] {
            if !seen.contains(&required) {
                return Err(bad(format!("entry {required:?} is missing")));
            }
        }
        if sum != total {
            return Err(bad(format!(
                "entries add up to {sum} bytes but the file has {total}"
            )));
        }
        let mut config = manifest.config.clone();
        for (slot, kind) in [
            (&mut config.kernel, EntryKind::Kernel),
            (&mut config.initrd, EntryKind::Initrd),
            (&mut config.cloud_init, EntryKind::CloudInitSeed),
        ] {
            if slot.is_some() != seen.contains(&kind) {
                return Err(bad(format!("config and entries disagree about {kind:?}")));
            }
            // Never trust a name from the package: the file name is fixed by its kind.
            if slot.is_some() {
                *slot = Some(kind.file_name().to_string());
            }
        }
        let seed_device = config
            .devices
            .iter()
            .any(|d| matches!(d, crate::base::Device::CloudInitSeed));
        if seed_device != config.cloud_init.is_some() {
            return Err(bad(
                "the config's cloud-init-seed device and its seed entry disagree".into(),
            ));
        }
        let mut digests = std::collections::HashMap::new();
        for e in &manifest.entries {
            let dst = staging.join(e.kind.file_name());
            let mut out = std::io::BufWriter::with_capacity(
                1 << 20,
                File::create(&dst).map_err(io("Creating", &dst))?,
            );
            let mut h = Sha256::new();
            let mut left = e.size;
            let mut buf = vec![0u8; 1 << 20];
            while left > 0 {
                let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                r.read_exact(&mut buf[..n])
                    .map_err(|_| bad(format!("{:?} truncated", e.kind)))?;
                h.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io("Writing", &dst))?;
                left -= n as u64;
            }
            out.flush().map_err(io("Writing", &dst))?;
            out.get_ref().sync_all().map_err(io("Syncing", &dst))?;
            let d: Digest = h.finalize().into();
            if hex(&d) != e.sha256 {
                return Err(bad(format!("{:?} does not match its SHA-256", e.kind)));
            }
            digests.insert(e.kind, d);
        }
        let disk = staging.join(EntryKind::Disk.file_name());
        let memory = staging.join(EntryKind::Memory.file_name());
        let index = ChunkIndex::build(&disk, &memory, 2, progress)?;
        index.save(&staging.join("index.bin"))?;
        let id = IdParts {
            content: index.content_digest(),
            device_state: digests
                .get(&EntryKind::DeviceState)
                .copied()
                .unwrap_or_else(|| sha256(b"")),
            kernel: digests.get(&EntryKind::Kernel).copied(),
            initrd: digests.get(&EntryKind::Initrd).copied(),
            cloud_init: digests.get(&EntryKind::CloudInitSeed).copied(),
            config: &config,
        }
        .id();
        if hex(&id) != manifest.id {
            return Err(bad(format!(
                "content hashes to base id {}, but the manifest claims {}",
                hex(&id),
                manifest.id
            )));
        }
        let size = |k: EntryKind| {
            manifest
                .entries
                .iter()
                .find(|e| e.kind == k)
                .map_or(0, |e| e.size)
        };
        let record = BaseRecord {
            id: manifest.id.clone(),
            name: manifest.name.clone(),
            disk_size: size(EntryKind::Disk),
            memory_size: size(EntryKind::Memory),
            device_state_size: size(EntryKind::DeviceState),
            config,
            disk_path: EntryKind::Disk.file_name().into(),
            memory_path: EntryKind::Memory.file_name().into(),
            created: now(),
        };
        self.commit(staging, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry with one small base whose launch config has `extra`, and its package.
    fn exported(extra: &[&str]) -> (tempfile::TempDir, Registry, Base, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("home")).unwrap();
        let (disk, memory) = (dir.path().join("d.img"), dir.path().join("m.img"));
        std::fs::write(&disk, vec![7u8; 3 * 4096]).unwrap();
        std::fs::write(&memory, vec![9u8; 2 * 4096]).unwrap();
        let config = LaunchConfig {
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            ..LaunchConfig::default()
        };
        let req = AddBase {
            disk,
            memory,
            config: Some(config),
            threads: 1,
            ..Default::default()
        };
        let base = reg.add(&req, &AtomicU64::new(0)).unwrap();
        let pkg = dir.path().join("base.pkg");
        reg.export(&base.record.id, &pkg).unwrap();
        (dir, reg, base, pkg)
    }

    fn hidden_entries(reg: &Registry) -> Vec<String> {
        std::fs::read_dir(reg.bases_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn open_makes_bases_private_even_in_an_older_registry() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bases = dir.path().join("bases");
        std::fs::create_dir(&bases).unwrap();
        std::fs::set_permissions(&bases, std::fs::Permissions::from_mode(0o755)).unwrap();

        Registry::open(dir.path()).unwrap();

        let mode = std::fs::metadata(&bases).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn import_package_with_extra_args_is_refused_showing_them() {
        let args = ["-monitor", "tcp:0.0.0.0:4444,server,nowait"];
        let (dir, _, _, pkg) = exported(&args);
        let other = Registry::open(&dir.path().join("other")).unwrap();
        let err = other.import(&pkg, &AtomicU64::new(0)).unwrap_err();
        assert!(
            matches!(&err, RegistryError::UntrustedExtraArgs { args: a, .. } if a == &args),
            "{err}"
        );
        assert!(err.to_string().contains("tcp:0.0.0.0:4444"), "{err}");
        assert!(other.list().unwrap().is_empty());
        assert!(hidden_entries(&other).is_empty(), "staging left behind");
    }

    #[test]
    fn import_package_with_extra_args_trusted_is_accepted() {
        let (dir, _, base, pkg) = exported(&["-nodefaults"]);
        let other = Registry::open(&dir.path().join("other")).unwrap();
        let opts = ImportOptions {
            trust_extra_args: true,
        };
        let got = other.import_with(&pkg, &opts, &AtomicU64::new(0)).unwrap();
        assert_eq!(got.record.id, base.record.id);
        assert_eq!(got.record.raw_qemu_args(), ["-nodefaults"]);
    }

    #[test]
    fn import_package_without_extra_args_needs_no_trust() {
        let (dir, _, base, pkg) = exported(&[]);
        let other = Registry::open(&dir.path().join("other")).unwrap();
        let got = other.import(&pkg, &AtomicU64::new(0)).unwrap();
        assert_eq!(got.record.id, base.record.id);
        assert!(got.record.raw_qemu_args().is_empty());
    }

    /// A registry with one small base carrying a cloud-init seed, and its package.
    fn exported_with_seed() -> (tempfile::TempDir, Base, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("home")).unwrap();
        let (disk, memory, seed) = (
            dir.path().join("d.img"),
            dir.path().join("m.img"),
            dir.path().join("my seed.img"),
        );
        std::fs::write(&disk, vec![7u8; 3 * 4096]).unwrap();
        std::fs::write(&memory, vec![9u8; 2 * 4096]).unwrap();
        std::fs::write(&seed, b"a seed image").unwrap();
        let mut config = LaunchConfig::default();
        config.devices.push(crate::base::Device::CloudInitSeed);
        config.cloud_init = Some(seed.display().to_string());
        let req = AddBase {
            disk,
            memory,
            config: Some(config),
            threads: 1,
            ..Default::default()
        };
        let base = reg.add(&req, &AtomicU64::new(0)).unwrap();
        let pkg = dir.path().join("base.pkg");
        reg.export(&base.record.id, &pkg).unwrap();
        (dir, base, pkg)
    }

    /// `pkg` with its manifest changed by `edit` (entries' bytes kept).
    fn with_manifest(pkg: &Path, edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
        let bytes = std::fs::read(pkg).unwrap();
        let mlen = usize::try_from(u64::from_le_bytes(bytes[8..16].try_into().unwrap())).unwrap();
        let mut manifest: Manifest = serde_json::from_slice(&bytes[16..16 + mlen]).unwrap();
        edit(&mut manifest);
        let mjson = serde_json::to_vec(&manifest).unwrap();
        let mut out = PACKAGE_MAGIC.to_vec();
        out.extend_from_slice(&(mjson.len() as u64).to_le_bytes());
        out.extend_from_slice(&mjson);
        out.extend_from_slice(&bytes[16 + mlen..]);
        out
    }

    #[test]
    fn import_package_with_cloud_init_seed_keeps_it_under_its_fixed_name() {
        let (dir, base, pkg) = exported_with_seed();
        let other = Registry::open(&dir.path().join("other")).unwrap();

        let got = other.import(&pkg, &AtomicU64::new(0)).unwrap();

        assert_eq!(got.record.id, base.record.id);
        assert_eq!(
            got.record.config.cloud_init.as_deref(),
            Some("cloud-init-seed.img")
        );
        let seed = got.cloud_init_path().unwrap();
        assert_eq!(seed, got.dir.join("cloud-init-seed.img"));
        assert_eq!(std::fs::read(seed).unwrap(), b"a seed image");
    }

    #[test]
    fn import_package_with_oversized_seed_is_refused() {
        let (dir, _, pkg) = exported_with_seed();
        let bad = dir.path().join("bad.pkg");
        std::fs::write(
            &bad,
            with_manifest(&pkg, |m| {
                for e in &mut m.entries {
                    if e.kind == EntryKind::CloudInitSeed {
                        e.size = MAX_CLOUD_INIT_SEED + 1;
                    }
                }
            }),
        )
        .unwrap();
        let other = Registry::open(&dir.path().join("other")).unwrap();

        let err = other.import(&bad, &AtomicU64::new(0)).unwrap_err();

        assert!(err.to_string().contains("cloud-init seed"), "{err}");
        assert!(hidden_entries(&other).is_empty(), "staging left behind");
    }

    #[test]
    fn import_package_seed_device_without_seed_entry_is_refused() {
        let (dir, _, pkg) = exported_with_seed();
        let bad = dir.path().join("bad.pkg");
        let mut seed_len = 0;
        let mut bytes = with_manifest(&pkg, |m| {
            m.config.cloud_init = None;
            seed_len = m
                .entries
                .iter()
                .find(|e| e.kind == EntryKind::CloudInitSeed)
                .unwrap()
                .size;
            m.entries.retain(|e| e.kind != EntryKind::CloudInitSeed);
        });
        // The seed is the last entry: drop its bytes too, so the sizes add up.
        bytes.truncate(bytes.len() - usize::try_from(seed_len).unwrap());
        std::fs::write(&bad, bytes).unwrap();
        let other = Registry::open(&dir.path().join("other")).unwrap();

        let err = other.import(&bad, &AtomicU64::new(0)).unwrap_err();

        assert!(err.to_string().contains("cloud-init-seed device"), "{err}");
    }

    #[test]
    fn add_with_extra_args_is_the_operators_choice_and_listed() {
        let (_dir, reg, _, _) = exported(&["-nodefaults"]);
        let listed = reg.list().unwrap();
        assert_eq!(listed[0].record.raw_qemu_args(), ["-nodefaults"]);
    }

    #[test]
    fn remove_leaves_no_folder_behind() {
        let (_dir, reg, base, _) = exported(&[]);
        reg.remove(&base.record.id).unwrap();
        assert!(reg.list().unwrap().is_empty());
        assert!(!base.dir.exists());
        assert!(hidden_entries(&reg).is_empty(), "trash left behind");
    }

    #[test]
    fn add_sweeps_folders_of_crashed_processes_only() {
        let (dir, reg, _, _) = exported(&[]);
        // u32::MAX is above any pid_max: that process is gone.
        let dead = reg.bases_dir().join(format!(".staging-{}-0", u32::MAX));
        let dead_trash = reg.bases_dir().join(format!(".trash-{}-3", u32::MAX));
        let live = reg
            .bases_dir()
            .join(format!(".staging-{}-999", std::process::id()));
        for d in [&dead, &dead_trash, &live] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
        }
        let disk = dir.path().join("d2.img");
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        let req = AddBase {
            disk,
            memory: dir.path().join("m.img"),
            threads: 1,
            ..Default::default()
        };
        reg.add(&req, &AtomicU64::new(0)).unwrap();
        assert!(!dead.exists() && !dead_trash.exists());
        assert!(live.exists(), "a live process's staging folder was swept");
        assert_eq!(reg.list().unwrap().len(), 2);
    }
}
