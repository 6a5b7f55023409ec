//! Run folders: one private scratch folder per VM or capture, under the registry (same file
//! system, so captured files can be moved into a base), removed when dropped.

use super::SessionError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Keeps run folders after use when set (for debugging a failed run).
pub const KEEP_ENV: &str = "CLOUDLET_KEEP_RUN_DIR";

/// A scratch folder `$HOME/tmp/<what>-XXXXXX` (mode 0700, unpredictable name), removed on
/// drop unless [`KEEP_ENV`] is set.
#[derive(Debug)]
pub struct RunDir(tempfile::TempDir);

impl RunDir {
    /// Creates a new run folder for `what` (e.g. `synthesis`).
    pub fn new(home: &Path, what: &str) -> Result<Self, SessionError> {
        let parent = home.join("tmp");
        let err = |source| SessionError::RunDir {
            path: parent.clone(),
            source,
        };
        std::fs::create_dir_all(&parent).map_err(err)?;
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("{what}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(err)?;
        if std::env::var_os(KEEP_ENV).is_some() {
            dir.disable_cleanup(true);
        }
        Ok(RunDir(dir))
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.path().join(p)
    }

    /// The folder's own name (unique among the live run folders).
    pub fn name(&self) -> String {
        self.0
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_private_distinct_and_removed_on_drop() {
        let home = tempfile::tempdir().unwrap();
        let a = RunDir::new(home.path(), "synthesis").unwrap();
        let b = RunDir::new(home.path(), "synthesis").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.name().starts_with("synthesis-"), "{}", a.name());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
        assert!(b.path().exists());
    }
}
