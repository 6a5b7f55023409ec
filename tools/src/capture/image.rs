//! The disk image a base starts from: a raw image is copied; a qcow2 image (what cloud images
//! and most tools hand out) is converted to raw with `qemu-img`, since a base's disk is a raw
//! file that cloudletfs serves chunk by chunk.
//!
//! ```text
//!  IMAGE ─► qemu-img info (format, backing file, encryption)
//!           raw ─► copy            qcow2, self-contained ─► qemu-img convert -f qcow2 -O raw
//!           anything else, a backing file or encryption ─► refused, saying what to do
//! ```
//!
//! A qcow2 image with a backing file or an external data file is refused rather than
//! flattened: those file names are data inside the image, and following them would read
//! whatever host file they name into the base. The format given to `qemu-img convert` is the one `info` found, never probed again.

use super::CaptureError;
use std::path::Path;
use std::process::Command;

/// Image formats `cloudlet base` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw image: copied as it is.
    Raw,
    /// A self-contained qcow2 image: converted to raw.
    Qcow2,
}

/// What `qemu-img info --output=json` says of an image (the fields used here).
#[derive(Debug, serde::Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(default)]
    encrypted: bool,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

/// `format-specific` of `qemu-img info`: for qcow2, its `data-file` if any.
#[derive(Debug, serde::Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Debug, serde::Deserialize)]
struct FormatData {
    #[serde(rename = "data-file")]
    data_file: Option<String>,
}

/// Runs `qemu-img` with `args`; its stdout, or what it said on failure.
fn qemu_img(
    args: &[&std::ffi::OsStr],
    path: &Path,
    what: &'static str,
) -> Result<Vec<u8>, CaptureError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| CaptureError::Io {
            what: "Running qemu-img (install qemu-utils) on",
            path: path.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(CaptureError::QemuImg {
            what,
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// The format of the image at `path`, refusing what a base cannot be made from.
pub fn disk_format(path: &Path) -> Result<DiskFormat, CaptureError> {
    let json = qemu_img(
        &[
            "info".as_ref(),
            "--output=json".as_ref(),
            "--".as_ref(),
            path.as_os_str(),
        ],
        path,
        "Reading the format of",
    )?;
    let info: Info = serde_json::from_slice(&json).map_err(|e| CaptureError::QemuImg {
        what: "Reading the format of",
        path: path.to_path_buf(),
        detail: format!("unexpected qemu-img output: {e}"),
    })?;
    let refuse = |why: String| CaptureError::DiskImage {
        path: path.to_path_buf(),
        why,
    };
    if let Some(backing) = info.backing_filename {
        return Err(refuse(format!(
            "it has a backing file ({backing}); flatten it first: qemu-img convert -O raw IMAGE \
             flat.img"
        )));
    }
    let data_file = info
        .format_specific
        .and_then(|f| f.data)
        .and_then(|d| d.data_file);
    if let Some(file) = data_file {
        return Err(refuse(format!(
            "its data lives in an external file ({file}); flatten it first: qemu-img convert \
             -O raw IMAGE flat.img"
        )));
    }
    if info.encrypted {
        return Err(refuse("it is encrypted".into()));
    }
    match info.format.as_str() {
        "raw" => Ok(DiskFormat::Raw),
        "qcow2" => Ok(DiskFormat::Qcow2),
        other => Err(refuse(format!(
            "it is a {other} image; cloudlet base takes raw or qcow2 (convert it: qemu-img \
             convert -O raw IMAGE disk.img)"
        ))),
    }
}

/// Puts the disk image `src` at `dst` as a raw image: a copy, or a qcow2 conversion.
pub fn import_disk(src: &Path, dst: &Path) -> Result<DiskFormat, CaptureError> {
    let format = disk_format(src)?;
    match format {
        DiskFormat::Raw => {
            std::fs::copy(src, dst).map_err(|source| CaptureError::Io {
                what: "Copying",
                path: src.to_path_buf(),
                source,
            })?;
        }
        DiskFormat::Qcow2 => {
            qemu_img(
                &[
                    "convert".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-O".as_ref(),
                    "raw".as_ref(),
                    "--".as_ref(),
                    src.as_os_str(),
                    dst.as_os_str(),
                ],
                src,
                "Converting to raw",
            )?;
        }
    }
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `qemu-img` runs here; `false` skips a test, except under `CI=true`.
    fn qemu_img_ok() -> bool {
        let ok = Command::new("qemu-img").arg("--version").output().is_ok();
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is required when CI=true"
            );
            eprintln!("skipping: qemu-img not found");
        }
        ok
    }

    fn run(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A 4 MiB raw image with a pattern in its first and last MiB (the rest a hole).
    fn raw_image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut bytes = vec![0u8; 4 << 20];
        for (i, b) in bytes.iter_mut().enumerate().take(1 << 20) {
            *b = u8::try_from(i % 251).unwrap();
        }
        let n = bytes.len();
        bytes[n - 4096..].fill(0x5a);
        let p = dir.join("disk.raw");
        std::fs::write(&p, &bytes).unwrap();
        (p, bytes)
    }

    #[test]
    fn import_raw_is_copied_as_it_is() {
        if !qemu_img_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (raw, bytes) = raw_image(dir.path());
        let out = dir.path().join("out.img");

        let format = import_disk(&raw, &out).unwrap();

        assert_eq!(format, DiskFormat::Raw);
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
    }

    #[test]
    fn import_qcow2_is_converted_to_the_same_raw_bytes() {
        if !qemu_img_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (raw, bytes) = raw_image(dir.path());
        let q = dir.path().join("disk.qcow2");
        run(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        let out = dir.path().join("out.img");

        let format = import_disk(&q, &out).unwrap();

        assert_eq!(format, DiskFormat::Qcow2);
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
    }

    #[test]
    fn import_qcow2_with_backing_file_is_refused_and_writes_nothing() {
        if !qemu_img_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = raw_image(dir.path());
        let q = dir.path().join("overlay.qcow2");
        let backing = raw.to_str().unwrap();
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "raw",
            q.to_str().unwrap(),
        ]);
        let out = dir.path().join("out.img");

        let err = import_disk(&q, &out).unwrap_err();

        assert!(matches!(err, CaptureError::DiskImage { .. }), "{err:?}");
        assert!(err.to_string().contains("backing file"), "{err}");
        assert!(err.to_string().contains(backing), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn import_qcow2_with_external_data_file_is_refused() {
        if !qemu_img_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("split.qcow2");
        let data = dir.path().join("split.data");
        let opts = format!("data_file={}", data.display());
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            q.to_str().unwrap(),
            "4M",
        ]);
        let out = dir.path().join("out.img");

        let err = import_disk(&q, &out).unwrap_err();

        assert!(err.to_string().contains("external file"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn import_other_format_is_refused_naming_it() {
        if !qemu_img_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("disk.vmdk");
        run(&["create", "-q", "-f", "vmdk", v.to_str().unwrap(), "4M"]);

        let err = import_disk(&v, &dir.path().join("out.img")).unwrap_err();

        assert!(err.to_string().contains("vmdk image"), "{err}");
    }
}
