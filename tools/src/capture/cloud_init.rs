//! The NoCloud cloud-init seed of `cloudlet base --cloud-init USER_DATA`.
//!
//! ```text
//!  USER_DATA ─► check_user_data (size, #cloud-config | #! script | MIME multipart)
//!  META_DATA ─► check_meta_data (size, UTF-8), or default_meta_data(user-data, name)
//!            ─► build_seed: a FAT image labelled CIDATA holding /user-data and /meta-data
//!            ─► the base's launch config (`cloud_init` + `Device::CloudInitSeed`, read-only)
//! ```
//!
//! cloud-init's NoCloud data source finds the seed by its volume label (`cidata`, either case)
//! on any block device. The image is FAT, written in pure Rust with `fatfs`, so no host tool is
//! needed; every timestamp is the FAT epoch and the volume id is taken from the contents, so the
//! same inputs always give the same bytes (and the same base id).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use synth::chunk::sha256;

/// Largest user-data accepted (cloud providers allow far less, e.g. 16 KiB on EC2; a larger
/// payload belongs in the base's disk or in `write_files` of a smaller file).
pub const MAX_USER_DATA: u64 = 1 << 20;
/// Largest meta-data accepted.
pub const MAX_META_DATA: u64 = 64 << 10;
/// The seed's volume label (FAT labels are 11 bytes, space padded).
pub const SEED_LABEL: [u8; 11] = *b"CIDATA     ";
/// Room for the FAT structures and directories beyond the two files.
const SEED_SLACK: u64 = 1 << 20;

/// Why a cloud-init input or seed was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    /// Reading an input file failed.
    #[error("Reading the cloud-init {what} {path} failed")]
    Read {
        /// `user-data` or `meta-data`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An input is not what cloud-init accepts.
    #[error("The cloud-init {what} {path} is refused: {why}")]
    Invalid {
        /// `user-data` or `meta-data`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why, and what to do.
        why: String,
    },
    /// Writing the FAT image failed.
    #[error("Writing the cloud-init seed image {path} failed")]
    Write {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads `path` if it is a regular file of at most `max` bytes.
fn read_bounded(what: &'static str, path: &Path, max: u64) -> Result<Vec<u8>, CloudInitError> {
    let read = |source| CloudInitError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() {
        return Err(invalid(what, path, "it is not a regular file".into()));
    }
    if meta.len() > max {
        return Err(invalid(
            what,
            path,
            format!("it is {} bytes, at most {max} are accepted", meta.len()),
        ));
    }
    let mut data = std::fs::read(path).map_err(read)?;
    // The file may have grown since: never hold more than the bound.
    if u64::try_from(data.len()).unwrap_or(u64::MAX) > max {
        data.clear();
        return Err(invalid(what, path, format!("it grew past {max} bytes")));
    }
    Ok(data)
}

fn invalid(what: &'static str, path: &Path, why: String) -> CloudInitError {
    CloudInitError::Invalid {
        what,
        path: path.to_owned(),
        why,
    }
}

/// Reads and checks a user-data file: at most [`MAX_USER_DATA`] bytes, starting with
/// `#cloud-config` (cloud-config YAML), `#!` (a script run once on first boot) or a MIME
/// multipart header (what `cloud-init devel make-mime` writes).
pub fn read_user_data(path: &Path) -> Result<Vec<u8>, CloudInitError> {
    const WHAT: &str = "user-data";
    let data = read_bounded(WHAT, path, MAX_USER_DATA)?;
    check_user_data(&data).map_err(|why| invalid(WHAT, path, why))?;
    Ok(data)
}

/// The format check of [`read_user_data`]; `Err` says why and what to do.
pub fn check_user_data(data: &[u8]) -> Result<(), String> {
    if data.is_empty() {
        return Err("it is empty; start it with #cloud-config".into());
    }
    if data.starts_with(b"#cloud-config") {
        let first = data.split(|&b| b == b'\n').next().unwrap_or_default();
        let rest = &first[b"#cloud-config".len()..];
        if !rest.iter().all(|b| b.is_ascii_whitespace()) {
            return Err("its first line must be exactly #cloud-config".into());
        }
        return std::str::from_utf8(data)
            .map(|_| ())
            .map_err(|_| "cloud-config must be UTF-8 text".into());
    }
    if data.starts_with(b"#!") {
        return Ok(());
    }
    if is_mime_multipart(data) {
        return Ok(());
    }
    Err(
        "it must start with #cloud-config (cloud-config YAML), #! (a script) or a MIME \
         multipart header (Content-Type: multipart/…, as `cloud-init devel make-mime` \
         writes)"
            .into(),
    )
}

/// Whether the header block (up to the first empty line) has `Content-Type: multipart/…`.
fn is_mime_multipart(data: &[u8]) -> bool {
    data.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
        .take(64)
        .any(|l| {
            let lower = l.to_ascii_lowercase();
            lower
                .strip_prefix(b"content-type:")
                .is_some_and(|v| v.trim_ascii_start().starts_with(b"multipart/"))
        })
}

/// Reads and checks a meta-data file: at most [`MAX_META_DATA`] bytes of UTF-8 (YAML for
/// cloud-init, e.g. `instance-id: …` and `local-hostname: …`).
pub fn read_meta_data(path: &Path) -> Result<Vec<u8>, CloudInitError> {
    const WHAT: &str = "meta-data";
    let data = read_bounded(WHAT, path, MAX_META_DATA)?;
    if std::str::from_utf8(&data).is_err() {
        return Err(invalid(WHAT, path, "it must be UTF-8 text (YAML)".into()));
    }
    Ok(data)
}

/// The meta-data used without `--cloud-init-meta-data`: an instance id taken from the
/// user-data (the same user-data is the same instance, so a reboot does not run first-boot
/// modules again) and `local-hostname` from the base's name, cut to a valid host name.
pub fn default_meta_data(user_data: &[u8], name: &str) -> Vec<u8> {
    let digest = sha256(user_data);
    let id = synth::chunk::hex(&digest[..8]);
    let host = synth::protocol::host_label(name);
    format!("instance-id: cloudlet-{id}\nlocal-hostname: {host}\n").into_bytes()
}

/// The seed image's bytes: a FAT file system labelled `CIDATA` with `user-data` and
/// `meta-data` in its root. Deterministic: the same inputs give the same bytes.
pub fn seed_image(user_data: &[u8], meta_data: &[u8]) -> std::io::Result<Vec<u8>> {
    let payload = u64::try_from(user_data.len().saturating_add(meta_data.len()))
        .unwrap_or(u64::MAX)
        .saturating_mul(2);
    let size = payload
        .saturating_add(SEED_SLACK)
        .div_ceil(64 << 10)
        .saturating_mul(64 << 10);
    let size = usize::try_from(size).map_err(std::io::Error::other)?;
    let (u, m) = (sha256(user_data), sha256(meta_data));
    let volume_id = u32::from_le_bytes([u[0] ^ m[0], u[1] ^ m[1], u[2] ^ m[2], u[3] ^ m[3]]);
    let mut image = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut image,
        fatfs::FormatVolumeOptions::new()
            .volume_label(SEED_LABEL)
            .volume_id(volume_id),
    )?;
    image.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut image, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, data) in [("user-data", user_data), ("meta-data", meta_data)] {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(data)?;
                f.flush()?;
            }
        }
        fs.unmount()?;
    }
    Ok(image.into_inner())
}

/// Writes the seed image for `user_data` and `meta_data` to `out` (see [`seed_image`]).
pub fn build_seed(user_data: &[u8], meta_data: &[u8], out: &Path) -> Result<(), CloudInitError> {
    let write = |source| CloudInitError::Write {
        path: out.to_owned(),
        source,
    };
    let bytes = seed_image(user_data, meta_data).map_err(write)?;
    std::fs::write(out, bytes).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_back(image: Vec<u8>, name: &str) -> Vec<u8> {
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        let mut out = Vec::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn seed_image_holds_both_files_under_their_long_names() {
        let user = b"#cloud-config\nruncmd:\n  - touch /ran\n".to_vec();
        let meta = default_meta_data(&user, "deb");

        let image = seed_image(&user, &meta).unwrap();

        assert_eq!(read_back(image.clone(), "user-data"), user);
        assert_eq!(read_back(image, "meta-data"), meta);
    }

    #[test]
    fn seed_image_is_labelled_cidata() {
        let image = seed_image(b"#!/bin/sh\ntrue\n", b"instance-id: x\n").unwrap();

        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();

        assert_eq!(fs.volume_label(), "CIDATA");
    }

    #[test]
    fn seed_image_same_inputs_same_bytes() {
        let a = seed_image(b"#cloud-config\n", b"instance-id: a\n").unwrap();
        let b = seed_image(b"#cloud-config\n", b"instance-id: a\n").unwrap();

        assert_eq!(a, b);
    }

    #[test]
    fn seed_image_largest_user_data_fits() {
        let mut user = b"#!/bin/sh\n".to_vec();
        user.resize(usize::try_from(MAX_USER_DATA).unwrap(), b'#');

        let image = seed_image(&user, b"instance-id: big\n").unwrap();

        assert_eq!(read_back(image, "user-data"), user);
    }

    #[test]
    fn default_meta_data_names_instance_and_host() {
        let meta = default_meta_data(b"#cloud-config\n", "My Debian_12!");

        let text = String::from_utf8(meta).unwrap();

        assert!(text.starts_with("instance-id: cloudlet-"), "{text}");
        assert!(text.ends_with("local-hostname: my-debian-12\n"), "{text}");
    }

    #[test]
    fn check_user_data_accepts_the_three_kinds() {
        assert!(check_user_data(b"#cloud-config\npackages: [qemu-guest-agent]\n").is_ok());
        assert!(check_user_data(b"#!/bin/sh\necho hi\n").is_ok());
        let mime = b"Content-Type: multipart/mixed; boundary=\"==X==\"\r\n\
                     MIME-Version: 1.0\r\n\r\n--==X==\r\n";
        assert!(check_user_data(mime).is_ok());
    }

    #[test]
    fn check_user_data_yaml_without_header_is_refused() {
        let err = check_user_data(b"users:\n  - name: debian\n").unwrap_err();

        assert!(err.contains("#cloud-config"), "{err}");
    }

    #[test]
    fn check_user_data_empty_is_refused() {
        assert!(check_user_data(b"").is_err());
    }

    #[test]
    fn check_user_data_header_with_trailing_words_is_refused() {
        assert!(check_user_data(b"#cloud-configuration\n").is_err());
    }

    #[test]
    fn check_user_data_non_utf8_cloud_config_is_refused() {
        assert!(check_user_data(b"#cloud-config\n\xff\xfe\n").is_err());
    }

    #[test]
    fn read_user_data_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user-data");
        let mut big = b"#cloud-config\n".to_vec();
        big.resize(usize::try_from(MAX_USER_DATA + 1).unwrap(), b'\n');
        std::fs::write(&path, big).unwrap();

        let err = read_user_data(&path).unwrap_err();

        assert!(matches!(err, CloudInitError::Invalid { .. }), "{err}");
    }

    #[test]
    fn read_user_data_missing_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();

        let err = read_user_data(&dir.path().join("nope")).unwrap_err();

        assert!(matches!(err, CloudInitError::Read { .. }), "{err}");
    }

    #[test]
    fn read_meta_data_non_utf8_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta-data");
        std::fs::write(&path, b"instance-id: \xff\n").unwrap();

        let err = read_meta_data(&path).unwrap_err();

        assert!(matches!(err, CloudInitError::Invalid { .. }), "{err}");
    }
}
