//! Chunks: the 4 KiB unit every other module counts in.
//!
//! Every image is treated as a sequence of `CHUNK_SIZE` chunks; the last chunk of an image whose
//! size is not a multiple of the chunk size is zero-padded, and digests are taken over the
//! padded chunk. Reads past the end of a base image see zeros, so a custom image larger than its
//! base needs no special case.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Size of a chunk in bytes: one x86 page.
pub const CHUNK_SIZE: usize = 4096;
/// [`CHUNK_SIZE`] as a `u64`, for offset arithmetic.
pub const CHUNK_SIZE_U64: u64 = 4096;
/// [`CHUNK_SIZE`] as a `u32`, as the overlay metadata records it.
pub const CHUNK_SIZE_U32: u32 = 4096;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// The digest of an all-zero chunk.
pub const ZERO_CHUNK_DIGEST: Digest = [
    0xad, 0x7f, 0xac, 0xb2, 0x58, 0x6f, 0xc6, 0xe9, 0x66, 0xc0, 0x04, 0xd7, 0xd1, 0xd1, 0x6b, 0x02,
    0x4f, 0x58, 0x05, 0xff, 0x7c, 0xb4, 0x7c, 0x7a, 0x85, 0xda, 0xbd, 0x8b, 0x48, 0x89, 0x2c, 0xa7,
];

/// Which image of a VM a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    /// The raw disk image.
    Disk,
    /// The flat guest memory image.
    Memory,
}

impl ImageKind {
    /// Both kinds, in the order overlays list them.
    pub const ALL: [ImageKind; 2] = [ImageKind::Disk, ImageKind::Memory];

    /// Lower-case name, as used in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Disk => "disk",
            ImageKind::Memory => "memory",
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SHA-256 of a byte slice.
pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// Whether every byte is zero (word-at-a-time).
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Number of chunks needed to hold `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE_U64)
}

/// Hex form of a digest.
pub fn hex(d: &[u8]) -> String {
    use std::fmt::Write;
    d.iter()
        .fold(String::with_capacity(d.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses a 64-character hex digest.
pub fn parse_hex_digest(s: &str) -> Option<Digest> {
    // `from_str_radix` alone would take a `+` sign: only hex digits are a digest.
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// XORs `other` into `dst` (same length).
pub fn xor_into(dst: &mut [u8], other: &[u8]) {
    for (d, o) in dst.iter_mut().zip(other) {
        *d ^= o;
    }
}

/// Fills `buf` with the bytes of `file` (of `file_size` bytes) at `offset`; bytes past the end
/// of the file read as zeros, as the chunk model requires.
pub fn read_padded(
    file: &std::fs::File,
    file_size: u64,
    offset: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let avail = file_size.saturating_sub(offset);
    let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(buf.len());
    file.read_exact_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunk_digest_matches_sha256_of_zeros() {
        assert_eq!(sha256(&[0u8; CHUNK_SIZE]), ZERO_CHUNK_DIGEST);
    }

    #[test]
    fn read_padded_past_end_reads_zeros() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 10]).unwrap();
        let mut buf = [1u8; 16];
        read_padded(&f, 10, 4, &mut buf).unwrap();
        assert_eq!(&buf[..6], &[7u8; 6]);
        assert_eq!(&buf[6..], &[0u8; 10]);
    }

    #[test]
    fn is_zero_detects_last_byte() {
        let mut c = vec![0u8; 4097];
        assert!(is_zero(&c));
        c[4096] = 1;
        assert!(!is_zero(&c));
    }

    #[test]
    fn hex_round_trips() {
        let d = sha256(b"x");
        assert_eq!(parse_hex_digest(&hex(&d)), Some(d));
        assert_eq!(parse_hex_digest("zz"), None);
    }
}
