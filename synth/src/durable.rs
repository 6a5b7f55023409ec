//! Durable small-file writes: a file either keeps its old content or has the new one, whatever
//! the moment the machine loses power.
//!
//! ```text
//!  write_atomic(path, bytes, mode)
//!    .NAME.tmp-PID-N (create_new, mode) ── write ── fsync ──► rename onto NAME ── fsync folder
//! ```
//!
//! The temporary file is created with its final mode, so a private key is never readable by
//! anyone else, not even for a moment; it is removed if any step before the rename fails.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    static N: AtomicU64 = AtomicU64::new(0);
    let err = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DurableWriteError { step, path, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
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
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(err("Syncing folder", &dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
