//! The chunk index of a base VM: the SHA-256 of every chunk of its disk and memory, and a
//! digest → location table that finds any base chunk by content (the dedup lookup).
//!
//! Built in one parallel pass over both images; stored as one flat file that loads with a
//! single read (no per-entry parsing beyond copying digests), so even a 10 GiB base loads in
//! well under a second.
//!
//! File layout (little-endian): magic `b"CLDIDX1\n"`, disk chunk count (u64), memory chunk
//! count (u64), table length (u64), disk digests (32 bytes each), memory digests, table entries
//! (u64 digest prefix, u64 location; bit 63 of the location set for memory), SHA-256 of all the
//! preceding bytes.

use crate::chunk::{chunk_count, read_padded, sha256, Digest, ImageKind, CHUNK_SIZE};
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"CLDIDX1\n";
const MEMORY_BIT: u64 = 1 << 63;
/// Bytes each worker reads at a time while hashing.
const READ_BLOCK: usize = 4 << 20;

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading an image or the index file failed.
    #[error("Reading {path} failed")]
    Io {
        /// File.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The stored index is damaged.
    #[error("Index file {path} is corrupt: {reason}")]
    Corrupt {
        /// File.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Digests of every chunk of a base's disk and memory, with a content lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    disk: Vec<Digest>,
    memory: Vec<Digest>,
    /// (first 8 bytes of digest, location), sorted; zero chunks and repeats left out.
    table: Vec<(u64, u64)>,
}

fn key(d: &Digest) -> u64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&d[..8]);
    u64::from_le_bytes(k)
}

/// Hashes every chunk of `path` with `threads` workers, adding each chunk's bytes to
/// `progress` as it goes.
pub fn hash_chunks(
    path: &Path,
    threads: usize,
    progress: &AtomicU64,
) -> Result<Vec<Digest>, IndexError> {
    let file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    let count = usize::try_from(chunk_count(size)).map_err(|_| IndexError::Corrupt {
        path: path.display().to_string(),
        reason: "image too large for this machine",
    })?;
    let mut digests = vec![[0u8; 32]; count];
    let threads = threads.max(1);
    // Workers take interleaved blocks so that reads stay roughly sequential on the device.
    let per_block = READ_BLOCK / CHUNK_SIZE;
    let blocks: Vec<&mut [Digest]> = digests.chunks_mut(per_block).collect();
    let mut lanes: Vec<Vec<(usize, &mut [Digest])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, b) in blocks.into_iter().enumerate() {
        lanes[i % threads].push((i, b));
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                let file = &file;
                s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; READ_BLOCK];
                    for (block, out) in lane {
                        let offset = (block * READ_BLOCK) as u64;
                        let len = out.len() * CHUNK_SIZE;
                        read_padded(file, size, offset, &mut buf[..len])?;
                        for (d, c) in out.iter_mut().zip(buf[..len].chunks_exact(CHUNK_SIZE)) {
                            *d = sha256(c);
                        }
                        progress.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("worker panicked")))
        })
    })
    .map_err(io_err(path))?;
    Ok(digests)
}

impl ChunkIndex {
    /// Builds the index of a base from its image files.
    pub fn build(
        disk: &Path,
        memory: &Path,
        threads: usize,
        progress: &AtomicU64,
    ) -> Result<Self, IndexError> {
        let start = std::time::Instant::now();
        let disk = hash_chunks(disk, threads, progress)?;
        let memory = hash_chunks(memory, threads, progress)?;
        let hashed = start.elapsed();
        let index = Self::from_digests(disk, memory);
        log::info!(
            "indexed {} chunks: hashing {:.2}s, lookup table {:.2}s",
            index.disk.len() + index.memory.len(),
            hashed.as_secs_f64(),
            (start.elapsed() - hashed).as_secs_f64()
        );
        Ok(index)
    }

    /// Builds the lookup table over already computed digests.
    pub fn from_digests(disk: Vec<Digest>, memory: Vec<Digest>) -> Self {
        let zero = sha256(&[0u8; CHUNK_SIZE]);
        let mut table: Vec<(u64, u64)> = disk
            .iter()
            .enumerate()
            .map(|(i, d)| (d, i as u64))
            .chain(
                memory
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d, i as u64 | MEMORY_BIT)),
            )
            .filter(|(d, _)| **d != zero)
            .map(|(d, loc)| (key(d), loc))
            .collect();
        table.sort_unstable();
        let mut index = ChunkIndex {
            disk,
            memory,
            table: Vec::new(),
        };
        // Keep the first location of each distinct digest.
        let mut kept: Vec<(u64, u64)> = Vec::with_capacity(table.len());
        let mut run_start = 0;
        for (k, loc) in table {
            if kept.last().is_none_or(|&(pk, _)| pk != k) {
                run_start = kept.len();
            }
            let d = index.digest_at(loc);
            if !kept[run_start..]
                .iter()
                .any(|&(_, l)| index.digest_at(l) == d)
            {
                kept.push((k, loc));
            }
        }
        index.table = kept;
        index
    }

    fn digest_at(&self, loc: u64) -> &Digest {
        let chunk = (loc & !MEMORY_BIT) as usize;
        if loc & MEMORY_BIT != 0 {
            &self.memory[chunk]
        } else {
            &self.disk[chunk]
        }
    }

    /// Where a chunk with digest `d` lies in the base, if anywhere (zero chunks excluded).
    pub fn lookup(&self, d: &Digest) -> Option<(ImageKind, u64)> {
        let k = key(d);
        let start = self.table.partition_point(|&(tk, _)| tk < k);
        self.table[start..]
            .iter()
            .take_while(|&&(tk, _)| tk == k)
            .find(|&&(_, loc)| self.digest_at(loc) == d)
            .map(|&(_, loc)| {
                let chunk = loc & !MEMORY_BIT;
                if loc & MEMORY_BIT != 0 {
                    (ImageKind::Memory, chunk)
                } else {
                    (ImageKind::Disk, chunk)
                }
            })
    }

    /// Digests of one image.
    pub fn digests(&self, image: ImageKind) -> &[Digest] {
        match image {
            ImageKind::Disk => &self.disk,
            ImageKind::Memory => &self.memory,
        }
    }

    /// Number of chunks of one image.
    pub fn chunks(&self, image: ImageKind) -> u64 {
        self.digests(image).len() as u64
    }

    /// Number of distinct non-zero chunks in the lookup table.
    pub fn distinct(&self) -> usize {
        self.table.len()
    }

    /// SHA-256 over all chunk digests: identifies the content of both images.
    pub fn content_digest(&self) -> Digest {
        let mut h = Sha256::new();
        h.update((self.disk.len() as u64).to_le_bytes());
        h.update((self.memory.len() as u64).to_le_bytes());
        for d in self.disk.iter().chain(&self.memory) {
            h.update(d);
        }
        h.finalize().into()
    }

    /// Writes the index to `path`, atomically and durably ([`crate::durable::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), IndexError> {
        let mut out = Vec::with_capacity(
            32 + 32 * (self.disk.len() + self.memory.len()) + 16 * self.table.len() + 32,
        );
        out.extend_from_slice(MAGIC);
        for n in [self.disk.len(), self.memory.len(), self.table.len()] {
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
        for d in self.disk.iter().chain(&self.memory) {
            out.extend_from_slice(d);
        }
        for &(k, loc) in &self.table {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&loc.to_le_bytes());
        }
        let digest = sha256(&out);
        out.extend_from_slice(&digest);
        crate::durable::write_atomic(path, &out, 0o644).map_err(|e| io_err(path)(e.source))
    }

    /// Loads and verifies an index written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self, IndexError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let corrupt = |reason| IndexError::Corrupt {
            path: path.display().to_string(),
            reason,
        };
        if bytes.len() < 64 || &bytes[..8] != MAGIC {
            return Err(corrupt("bad magic or too short"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if sha256(body) != digest {
            return Err(corrupt("checksum mismatch"));
        }
        let num = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[8 + 8 * i..16 + 8 * i]);
            usize::try_from(u64::from_le_bytes(a)).map_err(|_| corrupt("count too large"))
        };
        let (nd, nm, nt) = (num(0)?, num(1)?, num(2)?);
        let expected = nd
            .checked_add(nm)
            .and_then(|n| n.checked_mul(32))
            .and_then(|n| n.checked_add(nt.checked_mul(16)?))
            .and_then(|n| n.checked_add(32));
        if expected != Some(body.len()) {
            return Err(corrupt("length does not match counts"));
        }
        let digests: Vec<Digest> = body[32..32 + 32 * (nd + nm)]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let table: Vec<(u64, u64)> = body[32 + 32 * (nd + nm)..]
            .chunks_exact(16)
            .map(|c| {
                let mut k = [0u8; 8];
                let mut l = [0u8; 8];
                k.copy_from_slice(&c[..8]);
                l.copy_from_slice(&c[8..]);
                (u64::from_le_bytes(k), u64::from_le_bytes(l))
            })
            .collect();
        let mut disk = digests;
        let memory = disk.split_off(nd);
        let in_range = |&(_, loc): &(u64, u64)| {
            let c = loc & !MEMORY_BIT;
            if loc & MEMORY_BIT != 0 {
                c < nm as u64
            } else {
                c < nd as u64
            }
        };
        if !table.iter().all(in_range) || !table.windows(2).all(|w| w[0] <= w[1]) {
            return Err(corrupt("lookup table out of range or unsorted"));
        }
        Ok(ChunkIndex {
            disk,
            memory,
            table,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(b: u8) -> Vec<u8> {
        vec![b; CHUNK_SIZE]
    }

    #[test]
    fn lookup_finds_first_location_and_skips_zero() {
        let disk = vec![sha256(&chunk(0)), sha256(&chunk(1)), sha256(&chunk(2))];
        let memory = vec![sha256(&chunk(2)), sha256(&chunk(3))];
        let idx = ChunkIndex::from_digests(disk, memory);
        assert_eq!(idx.lookup(&sha256(&chunk(0))), None);
        assert_eq!(idx.lookup(&sha256(&chunk(2))), Some((ImageKind::Disk, 2)));
        assert_eq!(idx.lookup(&sha256(&chunk(3))), Some((ImageKind::Memory, 1)));
        assert_eq!(idx.lookup(&sha256(&chunk(9))), None);
        assert_eq!(idx.distinct(), 3);
    }

    #[test]
    fn save_load_round_trips_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index");
        let idx = ChunkIndex::from_digests(vec![sha256(&chunk(1))], vec![sha256(&chunk(2))]);
        idx.save(&p).unwrap();
        assert_eq!(ChunkIndex::load(&p).unwrap(), idx);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(matches!(
            ChunkIndex::load(&p),
            Err(IndexError::Corrupt { .. })
        ));
    }

    #[test]
    fn hash_chunks_pads_last_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![5u8; CHUNK_SIZE + 10]).unwrap();
        let d = hash_chunks(&p, 2, &AtomicU64::new(0)).unwrap();
        let mut last = vec![0u8; CHUNK_SIZE];
        last[..10].fill(5);
        assert_eq!(d, vec![sha256(&chunk(5)), sha256(&last)]);
    }
}
