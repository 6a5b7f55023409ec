//! Bench-only probe for `bench/uring-probe.sh`: a read-only FUSE file system with one file,
//! `image`, whose reads are `pread`s of a backing file, served over FUSE-over-io_uring
//! (Linux 6.14+, `/sys/module/fuse/parameters/enable_uring`) by fractal-fuse, which runs one
//! ring and one worker thread pinned to each CPU. cloudletfs's base-only reads do the same
//! work per request over the classic `/dev/fuse` transport, so the two compare transports.
//!
//! Usage: `uring-probe BACKING MOUNTPOINT` (runs in the foreground until unmounted).

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use fractal_fuse::abi::FUSE_ROOT_ID;
use fractal_fuse::{
    FileAttr, FileHandleId, FileType, Filesystem, FsResult, InodeId, MountOptions, ReplyAttr,
    ReplyEntry, ReplyOpen, Request, Session, Timestamp, ENOENT,
};

const IMAGE: u64 = 2;
const TTL: Duration = Duration::from_secs(60);

struct Probe {
    backing: File,
    size: u64,
}

fn attr(ino: u64, size: u64) -> FileAttr {
    let mode = if ino == FUSE_ROOT_ID {
        FileType::Directory.to_mode() | 0o755
    } else {
        FileType::RegularFile.to_mode() | 0o444
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: Timestamp::new(0, 0),
        mtime: Timestamp::new(0, 0),
        ctime: Timestamp::new(0, 0),
        mode,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
    }
}

impl Filesystem for Probe {
    async fn lookup(&self, _req: Request, parent: InodeId, name: &OsStr) -> FsResult<ReplyEntry> {
        if parent.0 == FUSE_ROOT_ID && name == "image" {
            Ok(ReplyEntry {
                ttl: TTL,
                attr: attr(IMAGE, self.size),
                generation: 0,
            })
        } else {
            Err(ENOENT)
        }
    }

    async fn getattr(
        &self,
        _req: Request,
        inode: InodeId,
        _fh: Option<FileHandleId>,
        _flags: u32,
    ) -> FsResult<ReplyAttr> {
        match inode.0 {
            FUSE_ROOT_ID => Ok(ReplyAttr {
                ttl: TTL,
                attr: attr(FUSE_ROOT_ID, 0),
            }),
            IMAGE => Ok(ReplyAttr {
                ttl: TTL,
                attr: attr(IMAGE, self.size),
            }),
            _ => Err(ENOENT),
        }
    }

    async fn open(&self, _req: Request, inode: InodeId, _flags: u32) -> FsResult<ReplyOpen> {
        if inode.0 != IMAGE {
            return Err(ENOENT);
        }
        Ok(ReplyOpen {
            fh: FileHandleId(0),
            flags: 0,
            backing_id: 0,
        })
    }

    async fn read(
        &self,
        _req: Request,
        inode: InodeId,
        _fh: FileHandleId,
        offset: u64,
        buf: &mut [u8],
    ) -> FsResult<usize> {
        if inode.0 != IMAGE {
            return Err(ENOENT);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.backing.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => return Err(libc::EIO),
            }
        }
        Ok(done)
    }

    async fn access(&self, _req: Request, _inode: InodeId, _mask: u32) -> FsResult<()> {
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(backing), Some(mountpoint)) = (args.next(), args.next()) else {
        eprintln!("usage: uring-probe BACKING MOUNTPOINT");
        std::process::exit(2);
    };
    let backing = File::open(backing)?;
    let size = backing.metadata()?.len();
    let opts = MountOptions::new().fs_name("uring-probe").read_only(true);
    Session::new(PathBuf::from(mountpoint), opts)?.run(Probe { backing, size })
}
