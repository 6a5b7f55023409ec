//! The server's TLS identity: a self-signed certificate and its private key, made on the first
//! start and kept in the registry folder, so the [`Fingerprint`] clients pin stays the same
//! across restarts.
//!
//! ```text
//!  ServerIdentity::load_or_create(home)
//!    both files present ──► read PEM ──► key matches certificate? ──► identity (created: false)
//!    no certificate     ──► ECDSA P-256 key + self-signed certificate (rcgen)
//!                           ──► key file (0600), then certificate, each written atomically
//!                           ──► identity (created: true)
//!    certificate without key ──► refused: a new identity would silently break every pin
//! ```
//!
//! | file                  | content                                   | mode |
//! |-----------------------|-------------------------------------------|------|
//! | `HOME/tls-key.pem`    | PKCS#8 private key (`PRIVATE KEY`)         | 0600 |
//! | `HOME/tls-cert.pem`   | the certificate (`CERTIFICATE`)            | 0644 |
//!
//! Nothing checks the certificate's names or validity dates: clients trust it by fingerprint
//! only (see [`super::tls`]). The key is written before the certificate, so a certificate on
//! disk always has its key durably beside it.

use super::fingerprint::Fingerprint;
use crate::durable::{write_atomic, DurableWriteError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// File name of the certificate in the registry folder.
pub const CERT_FILE: &str = "tls-cert.pem";
/// File name of the private key in the registry folder.
pub const KEY_FILE: &str = "tls-key.pem";
/// Largest certificate or key file read.
const MAX_PEM_LEN: u64 = 64 << 10;

/// Loading or making the server's identity failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The registry folder could not be created.
    #[error("Creating the folder {path} failed")]
    CreateFolder {
        /// The folder.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Generating the key or the certificate failed.
    #[error("Generating the TLS certificate failed")]
    Generate(#[source] rcgen::Error),
    /// Writing the key or the certificate failed.
    #[error("Storing the TLS identity failed")]
    Write(#[source] DurableWriteError),
    /// Reading the key or the certificate failed.
    #[error("Reading {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold what it should.
    #[error("{path} is not a PEM {what}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The certificate is there but its key is not.
    #[error(
        "The TLS certificate {cert} exists but its key {key} does not: restore the key, or delete \
         the certificate to make a new identity (clients that pinned the old one will refuse \
         this server until they forget it)"
    )]
    MissingKey {
        /// The certificate file.
        cert: PathBuf,
        /// The missing key file.
        key: PathBuf,
    },
    /// The key does not belong to the certificate, or is not usable.
    #[error("The TLS key {key} does not fit the certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
}

/// The server's certificate and key, and where they are kept.
pub struct ServerIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
    created: bool,
    cert_path: Option<PathBuf>,
}

impl std::fmt::Debug for ServerIdentity {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("created", &self.created)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

impl ServerIdentity {
    /// A new identity in memory only (tests, or a server that wants a fresh one each start).
    pub fn generate() -> Result<Self, IdentityError> {
        let (cert_pem, key_pem) = generate_pem()?;
        let cert = parse_cert(Path::new("(generated)"), cert_pem.as_bytes())?;
        let key = parse_key(Path::new("(generated)"), key_pem.as_bytes())?;
        Ok(ServerIdentity {
            fingerprint: Fingerprint::of_certificate(&cert),
            cert,
            key,
            created: true,
            cert_path: None,
        })
    }

    /// The identity kept in `home` ([`CERT_FILE`], [`KEY_FILE`]), made and stored there first
    /// if there is none.
    pub fn load_or_create(home: &Path) -> Result<Self, IdentityError> {
        std::fs::create_dir_all(home).map_err(|source| IdentityError::CreateFolder {
            path: home.to_path_buf(),
            source,
        })?;
        let cert_path = home.join(CERT_FILE);
        let key_path = home.join(KEY_FILE);
        if !cert_path.exists() {
            // A key without a certificate is a start that died between the two writes: no
            // client can have pinned it, so a new pair replaces it.
            let (cert_pem, key_pem) = generate_pem()?;
            write_atomic(&key_path, key_pem.as_bytes(), 0o600).map_err(IdentityError::Write)?;
            write_atomic(&cert_path, cert_pem.as_bytes(), 0o644).map_err(IdentityError::Write)?;
            let mut id = Self::load(&cert_path, &key_path)?;
            id.created = true;
            log::info!(
                "new TLS identity {} in {}",
                id.fingerprint,
                cert_path.display()
            );
            return Ok(id);
        }
        if !key_path.exists() {
            return Err(IdentityError::MissingKey {
                cert: cert_path,
                key: key_path,
            });
        }
        Self::load(&cert_path, &key_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let cert = parse_cert(cert_path, &read_small(cert_path)?)?;
        let key_bytes = read_small(key_path)?;
        if let Ok(meta) = std::fs::metadata(key_path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                log::warn!(
                    "TLS key {} has mode {mode:04o}: other users may read it (chmod 600 it)",
                    key_path.display()
                );
            }
        }
        let key = parse_key(key_path, &key_bytes)?;
        rustls::sign::CertifiedKey::from_der(
            vec![cert.clone()],
            key.clone_key(),
            &crypto_provider(),
        )
        .map_err(|source| IdentityError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        })?;
        Ok(ServerIdentity {
            fingerprint: Fingerprint::of_certificate(&cert),
            cert,
            key,
            created: false,
            cert_path: Some(cert_path.to_path_buf()),
        })
    }

    /// What clients pin: the SHA-256 of the certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Whether this start made the identity (the server should say so: clients that knew a
    /// previous one will refuse it).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The certificate file, for an identity kept on disk.
    pub fn cert_path(&self) -> Option<&Path> {
        self.cert_path.as_deref()
    }

    /// The certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The crypto provider of every TLS connection here and of the identity's key check: rustls's
/// `ring` one, the crypto ureq already uses, so there is a single crypto stack in the program.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A fresh ECDSA P-256 key and a self-signed certificate for it, both as PEM.
fn generate_pem() -> Result<(String, String), IdentityError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(IdentityError::Generate)?;
    let host = super::local_host_label();
    let mut params =
        rcgen::CertificateParams::new(vec![host.clone()]).map_err(IdentityError::Generate)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("cloudlet server on {host}"),
    );
    let cert = params.self_signed(&key).map_err(IdentityError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn read_small(path: &Path) -> Result<Vec<u8>, IdentityError> {
    use std::io::Read;
    let err = |source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_PEM_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_PEM_LEN {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_PEM_LEN} bytes"),
        )));
    }
    Ok(buf)
}

fn parse_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, IdentityError> {
    CertificateDer::from_pem_slice(pem).map_err(|e| IdentityError::Parse {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    })
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, IdentityError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| IdentityError::Parse {
        path: path.to_path_buf(),
        what: "private key",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_created_then_reloaded_same_fingerprint() {
        let home = tempfile::tempdir().unwrap();
        let first = ServerIdentity::load_or_create(home.path()).unwrap();
        let again = ServerIdentity::load_or_create(home.path()).unwrap();
        assert!(first.created());
        assert!(!again.created());
        assert_eq!(again.fingerprint(), first.fingerprint());
        assert_eq!(
            Fingerprint::of_certificate(
                &std::fs::read_to_string(home.path().join(CERT_FILE))
                    .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
                    .unwrap()
            ),
            first.fingerprint()
        );
        assert_eq!(again.cert_path(), Some(&*home.path().join(CERT_FILE)));
    }

    #[test]
    fn identity_key_file_mode_0600_and_no_temporary_files_left() {
        let home = tempfile::tempdir().unwrap();
        ServerIdentity::load_or_create(home.path()).unwrap();
        let mode = std::fs::metadata(home.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut names: Vec<String> = std::fs::read_dir(home.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![CERT_FILE, KEY_FILE]);
    }

    #[test]
    fn identity_two_homes_differ() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fa = ServerIdentity::load_or_create(a.path())
            .unwrap()
            .fingerprint();
        let fb = ServerIdentity::load_or_create(b.path())
            .unwrap()
            .fingerprint();
        assert_ne!(fa, fb);
    }

    #[test]
    fn identity_certificate_without_key_refused_not_replaced() {
        let home = tempfile::tempdir().unwrap();
        let fp = ServerIdentity::load_or_create(home.path())
            .unwrap()
            .fingerprint();
        std::fs::remove_file(home.path().join(KEY_FILE)).unwrap();
        let e = ServerIdentity::load_or_create(home.path()).unwrap_err();
        assert!(matches!(e, IdentityError::MissingKey { .. }), "{e}");
        assert!(e.to_string().contains("restore the key"), "{e}");
        let cert = std::fs::read(home.path().join(CERT_FILE)).unwrap();
        assert_eq!(
            Fingerprint::of_certificate(&CertificateDer::from_pem_slice(&cert).unwrap()),
            fp
        );
    }

    #[test]
    fn identity_key_without_certificate_replaced_by_new_pair() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join(KEY_FILE), b"left by a start that died").unwrap();
        let id = ServerIdentity::load_or_create(home.path()).unwrap();
        assert!(id.created());
        assert_eq!(
            ServerIdentity::load_or_create(home.path())
                .unwrap()
                .fingerprint(),
            id.fingerprint()
        );
    }

    #[test]
    fn identity_key_of_another_certificate_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        ServerIdentity::load_or_create(a.path()).unwrap();
        ServerIdentity::load_or_create(b.path()).unwrap();
        std::fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let e = ServerIdentity::load_or_create(a.path()).unwrap_err();
        assert!(matches!(e, IdentityError::KeyMismatch { .. }), "{e}");
    }

    #[test]
    fn identity_garbage_certificate_refused() {
        let home = tempfile::tempdir().unwrap();
        ServerIdentity::load_or_create(home.path()).unwrap();
        std::fs::write(home.path().join(CERT_FILE), b"not pem").unwrap();
        let e = ServerIdentity::load_or_create(home.path()).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::Parse {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
    }
}
