//! Writing files so that a crash (power loss included) leaves the old state or the new one,
//! never a half-written file under the final name.
//!
//! ```text
//!  write_atomic(path, bytes, mode)
//!    .NAME.tmp-PID-N (create_new, mode) ── write ── fsync ──► rename onto NAME ── fsync folder
//! ```
//!
//! The recipe, everywhere: write to a temporary name in the same folder, `fsync` the file,
//! `rename` it over the final name, `fsync` the folder (the rename is only durable once the
//! folder is). [`write_atomic`] does all of it for bytes in memory, creating the temporary file
//! with its final mode (a private key is never readable by anyone else, not even for a
//! moment); [`persist`] does the last three steps for a file written elsewhere (a stream, a
//! copy); [`sync_dir`] is the folder step alone, for whoever renames a whole folder into place
//! (the registry's staging folders).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name next to `path` (same folder, so that a rename cannot cross file systems),
/// hidden, and unique in this process and among processes.
pub fn temp_sibling(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// The folder `path` is in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes the entries of folder `dir` (names created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes the file `tmp` durable and renames it to `path` durably (the folder of `path` is
/// synced after the rename). `tmp` must be in the same folder as `path`.
pub fn persist(tmp: &Path, path: &Path) -> std::io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    sync_dir(parent_of(path))
}

/// A step of [`write_atomic`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} {} failed", path.display())]
pub struct DurableWriteError {
    /// What was being done (`Creating`, `Writing`, `Syncing`, `Renaming onto`, `Syncing folder`).
    pub step: &'static str,
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: std::io::Error,
}

/// Replaces `path` with `bytes` atomically and durably: written to a temporary file in the same
/// folder created with `mode`, fsynced, renamed onto `path`, then the folder fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableWriteError> {
    let err = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DurableWriteError { step, path, source }
    };
    let dir = parent_of(path).to_path_buf();
    let tmp = temp_sibling(path);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err("Creating", &tmp))?;
        f.write_all(bytes).map_err(err("Writing", &tmp))?;
        f.sync_all().map_err(err("Syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(err("Renaming onto", path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(&dir).map_err(err("Syncing folder", &dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.json");
        std::fs::write(&p, b"old").unwrap();
        write_atomic(&p, b"new content", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("base.json")]);
    }

    #[test]
    fn write_atomic_failure_keeps_old_content_and_removes_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should go: the rename fails after the temporary was written.
        let p = dir.path().join("taken");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("inside"), b"old").unwrap();
        assert!(write_atomic(&p, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(p.join("inside")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn persist_moves_a_written_file_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let tmp = temp_sibling(&p);
        std::fs::write(&tmp, b"streamed").unwrap();
        persist(&tmp, &p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"streamed");
        assert!(!tmp.exists());
    }

    #[test]
    fn write_atomic_replaces_content_with_mode_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        std::fs::write(&p, b"old").unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_atomic_missing_folder_fails_naming_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/file");
        let e = write_atomic(&p, b"x", 0o644).unwrap_err();
        assert_eq!(e.step, "Creating");
        assert!(e.to_string().starts_with("Creating "), "{e}");
    }
}
