//! SHA-256 digests in their one text form, `SHA256:<64 lowercase hex digits>`: the fingerprint
//! of a server's TLS certificate ([`Fingerprint`]) and the overlay metadata digest a URL session
//! may carry ([`parse_sha256`], [`format_sha256`]).
//!
//! Parsing is lenient where people paste: the `SHA256:` prefix may be missing or in any case,
//! the hex digits in either case, and bytes may be separated by colons (as `openssl x509
//! -fingerprint -sha256` prints them). Printing is always the one canonical form.

use crate::chunk::{hex, parse_hex_digest, sha256, Digest};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Prefix of every digest in text form.
pub const SHA256_PREFIX: &str = "SHA256:";

/// Text that is not a SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a SHA-256 digest: expected SHA256: and 64 hex digits")]
pub struct DigestParseError {
    /// The text given (cut to 100 bytes).
    pub text: String,
}

/// `SHA256:` and the 64 lowercase hex digits of `d`.
pub fn format_sha256(d: &Digest) -> String {
    format!("{SHA256_PREFIX}{}", hex(d))
}

/// Parses a digest written as [`format_sha256`] prints it, or pasted with the variations the
/// module doc lists.
pub fn parse_sha256(text: &str) -> Result<Digest, DigestParseError> {
    let bad = || DigestParseError {
        text: super::cut(text, 100).to_string(),
    };
    let t = text.trim();
    let digits = match t.get(..SHA256_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(SHA256_PREFIX) => &t[SHA256_PREFIX.len()..],
        _ => t,
    };
    let compact: String = if digits.contains(':') {
        // Colons only between byte pairs: `ab:cd:…`.
        let pairs: Vec<&str> = digits.split(':').collect();
        if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
            return Err(bad());
        }
        pairs.concat()
    } else {
        digits.to_string()
    };
    parse_hex_digest(&compact.to_ascii_lowercase()).ok_or_else(bad)
}

/// The SHA-256 of a TLS certificate (its DER bytes): what clients pin a server by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(Digest);

impl Fingerprint {
    /// The fingerprint of the certificate whose DER encoding is `der`.
    pub fn of_certificate(der: &[u8]) -> Self {
        Fingerprint(sha256(der))
    }

    /// A fingerprint from its 32 bytes.
    pub fn from_bytes(bytes: Digest) -> Self {
        Fingerprint(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &Digest {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_sha256(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_sha256(s).map(Fingerprint)
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn fingerprint_display_parses_back_equal() {
        let fp = Fingerprint::of_certificate(b"cert");
        let text = fp.to_string();
        assert!(
            text.starts_with("SHA256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn parse_sha256_pasted_variants_accepted() {
        let want = parse_hex_digest(HEX).unwrap();
        let upper_colons = HEX
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for text in [
            format!("SHA256:{HEX}"),
            format!("sha256:{HEX}"),
            HEX.to_string(),
            format!("  SHA256:{}  ", HEX.to_ascii_uppercase()),
            upper_colons.clone(),
            format!("SHA256:{upper_colons}"),
        ] {
            assert_eq!(parse_sha256(&text), Ok(want), "{text}");
        }
    }

    #[test]
    fn parse_sha256_malformed_refused() {
        for text in [
            "",
            "SHA256:",
            &HEX[..62],
            &format!("{HEX}00"),
            &format!("SHA1:{HEX}"),
            &format!("+{}", &HEX[1..]),
            &HEX.replace('a', "g"),
            "0:0:0",
            &format!("SHA256: {HEX}x"),
        ] {
            let e = parse_sha256(text).unwrap_err();
            assert!(e.to_string().contains("SHA-256"), "{text}: {e}");
        }
    }

    #[test]
    fn fingerprint_serializes_as_its_text() {
        let fp = Fingerprint::from_bytes([7; 32]);
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{fp}\""));
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
        assert!(serde_json::from_str::<Fingerprint>("\"nope\"").is_err());
    }
}
