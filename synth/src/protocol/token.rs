//! The pre-shared token and its constant-time comparison.
//!
//! Both the expected and the offered token are hashed with SHA-256 first, so the comparison
//! always runs over 32 bytes whatever their lengths, and the difference is folded with XOR
//! without an early exit: neither the length nor the first differing byte leaks through timing.

use super::{ProtoError, MAX_TOKEN_LEN};
use crate::chunk::sha256;
use std::io::Read;
use std::path::Path;

/// A pre-shared token. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

impl Token {
    /// A token of 1 to [`MAX_TOKEN_LEN`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, ProtoError> {
        if bytes.is_empty() || bytes.len() > MAX_TOKEN_LEN {
            return Err(ProtoError::TokenLength(bytes.len()));
        }
        Ok(Token(bytes))
    }

    /// Reads a token file: its content with surrounding ASCII whitespace (a trailing newline)
    /// removed. Reads at most [`MAX_TOKEN_LEN`] + 1 bytes, so a huge file is refused cheaply.
    pub fn from_file(path: &Path) -> Result<Self, ProtoError> {
        let err = |source| ProtoError::TokenFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(err)?;
        let mut buf = Vec::new();
        file.take(MAX_TOKEN_LEN as u64 + 64)
            .read_to_end(&mut buf)
            .map_err(err)?;
        Token::new(buf.trim_ascii().to_vec())
    }

    /// The token bytes (to send in `Hello`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `offered` equals this token, in time independent of where they differ and of
    /// `offered`'s length.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let a = sha256(&self.0);
        let b = sha256(offered);
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_equal_bytes_match() {
        let t = Token::new(b"secret".to_vec()).unwrap();
        assert!(t.matches(b"secret"));
    }

    #[test]
    fn token_other_bytes_do_not_match() {
        let t = Token::new(b"secret".to_vec()).unwrap();
        assert!(!t.matches(b"secreT"));
        assert!(!t.matches(b"secret "));
        assert!(!t.matches(b""));
    }

    #[test]
    fn token_empty_or_oversize_refused() {
        assert!(Token::new(Vec::new()).is_err());
        assert!(Token::new(vec![b'a'; MAX_TOKEN_LEN + 1]).is_err());
    }

    #[test]
    fn token_debug_hides_bytes() {
        let t = Token::new(b"hunter2".to_vec()).unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
