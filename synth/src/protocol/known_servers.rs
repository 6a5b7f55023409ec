//! The known-servers file: trust on first use for `cloudlet client`, like SSH's `known_hosts`.
//!
//! One server per line, `HOST:PORT SHA256:<certificate fingerprint>`; `#` starts a comment
//! line; blank lines are ignored. The first connection to a server not in the file records the
//! certificate it presented ([`KnownServers::record`]); every later connection must present the
//! same one. The default file is `$CLOUDLET_HOME/known_servers`, else
//! `~/.cloudlet/known_servers` ([`default_path`]).
//!
//! ```text
//!  Client::connect ──► KnownServers::load ──► entry for HOST:PORT?
//!      yes ──► TLS with that fingerprint pinned (another certificate: refused, nothing sent)
//!      no  ──► TLS accepting the certificate (signatures still checked) ──► record ──► warn
//! ```
//!
//! A line that does not parse makes the whole file unusable, with its line number: a damaged
//! entry must not quietly turn into a new first use. Writes replace the file atomically
//! ([`crate::durable::write_atomic`]); two clients recording at the same moment may lose one
//! entry, which the next connection records again.

use super::fingerprint::Fingerprint;
use crate::durable::{write_atomic, DurableWriteError};
use std::path::{Path, PathBuf};

/// File name of the known-servers file in the cloudlet home.
pub const KNOWN_SERVERS_FILE: &str = "known_servers";
/// Largest known-servers file read.
pub const MAX_KNOWN_SERVERS_LEN: u64 = 1 << 20;
/// First line of a new file.
const HEADER: &str = "# cloudlet known servers: HOST:PORT SHA256:<certificate fingerprint>\n";

/// `$CLOUDLET_HOME/known_servers`, else `~/.cloudlet/known_servers`.
pub fn default_path() -> PathBuf {
    crate::registry::Registry::default_home().join(KNOWN_SERVERS_FILE)
}

/// The name a server is recorded under: the `HOST:PORT` it was reached at, lowercased.
pub fn server_key(addr: &str) -> String {
    addr.trim().to_ascii_lowercase()
}

/// Using the known-servers file failed.
#[derive(Debug, thiserror::Error)]
pub enum KnownServersError {
    /// The file exists but cannot be read.
    #[error("Reading the known-servers file {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_KNOWN_SERVERS_LEN`].
    #[error("The known-servers file {path} is larger than {MAX_KNOWN_SERVERS_LEN} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line is neither an entry, a comment nor blank.
    #[error(
        "{path} line {line}: {reason}; each line must be `HOST:PORT SHA256:<64 hex digits>` or \
         a # comment: fix or delete that line"
    )]
    BadLine {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The server name cannot be recorded (it must be `HOST:PORT` without spaces).
    #[error("{server:?} cannot be recorded: {reason}")]
    BadServer {
        /// The name.
        server: String,
        /// Why.
        reason: &'static str,
    },
    /// The folder of the file could not be created.
    #[error("Creating the folder {path} failed")]
    CreateFolder {
        /// The folder.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Writing the file failed.
    #[error("Writing the known-servers file failed")]
    Write(#[source] DurableWriteError),
}

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownServer {
    /// `HOST:PORT`, lowercase.
    pub server: String,
    /// The certificate fingerprint recorded.
    pub fingerprint: Fingerprint,
    /// Its line in the file, from 1.
    pub line: usize,
}

/// The parsed file.
#[derive(Debug, Clone)]
pub struct KnownServers {
    path: PathBuf,
    text: String,
    entries: Vec<KnownServer>,
}

/// What [`KnownServers::record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The server was new: a line was added.
    Added {
        /// Its line number.
        line: usize,
    },
    /// The same fingerprint was already there (recorded meanwhile by another client).
    AlreadyKnown {
        /// Its line number.
        line: usize,
    },
    /// Another fingerprint was recorded meanwhile: nothing was written.
    Conflict(KnownServer),
}

fn check_server(server: &str) -> Result<(), &'static str> {
    if server.is_empty() || server.len() > 512 {
        return Err("empty or longer than 512 bytes");
    }
    if server
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err("contains a space, a control character or #");
    }
    let Some((host, port)) = server.rsplit_once(':') else {
        return Err("no :PORT");
    };
    if host.is_empty() || !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return Err("not HOST:PORT with a port from 1 to 65535");
    }
    Ok(())
}

impl KnownServers {
    /// Reads the file at `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, KnownServersError> {
        use std::io::Read;
        let read_err = |source| KnownServersError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Self::parse(path, String::new())
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_KNOWN_SERVERS_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_KNOWN_SERVERS_LEN {
            return Err(KnownServersError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| KnownServersError::BadLine {
            path: path.to_path_buf(),
            line: 1 + e
                .as_bytes()
                .get(..e.utf8_error().valid_up_to())
                .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()),
            reason: "not UTF-8 text".into(),
        })?;
        Self::parse(path, text)
    }

    /// Parses `text` as the content of the file at `path` (named in errors).
    pub fn parse(path: &Path, text: String) -> Result<Self, KnownServersError> {
        let mut entries: Vec<KnownServer> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |reason: String| KnownServersError::BadLine {
                path: path.to_path_buf(),
                line,
                reason,
            };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = l.split_whitespace().collect();
            let [server, fp] = fields[..] else {
                return Err(bad(format!("{} fields, not 2", fields.len())));
            };
            let server = server_key(server);
            check_server(&server).map_err(|r| bad(format!("server {server:?}: {r}")))?;
            let fingerprint: Fingerprint = fp.parse().map_err(|e| bad(format!("{e}")))?;
            if let Some(prev) = entries.iter().find(|e| e.server == server) {
                if prev.fingerprint != fingerprint {
                    return Err(bad(format!(
                        "{server} is already on line {} with another fingerprint",
                        prev.line
                    )));
                }
                continue;
            }
            entries.push(KnownServer {
                server,
                fingerprint,
                line,
            });
        }
        Ok(KnownServers {
            path: path.to_path_buf(),
            text,
            entries,
        })
    }

    /// The file this list was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry for `server` (`HOST:PORT`, any case).
    pub fn get(&self, server: &str) -> Option<&KnownServer> {
        let key = server_key(server);
        self.entries.iter().find(|e| e.server == key)
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> &[KnownServer] {
        &self.entries
    }

    /// Records `server` → `fingerprint` in the file at `path` (created, with its folder, if
    /// missing), unless the file already has an entry for `server`. Reads the file again first,
    /// so an entry another client wrote meanwhile is honoured.
    pub fn record(
        path: &Path,
        server: &str,
        fingerprint: Fingerprint,
    ) -> Result<Recorded, KnownServersError> {
        let key = server_key(server);
        check_server(&key).map_err(|reason| KnownServersError::BadServer {
            server: key.clone(),
            reason,
        })?;
        let list = Self::load(path)?;
        if let Some(e) = list.get(&key) {
            return Ok(if e.fingerprint == fingerprint {
                Recorded::AlreadyKnown { line: e.line }
            } else {
                Recorded::Conflict(e.clone())
            });
        }
        let mut text = if list.text.is_empty() {
            HEADER.to_string()
        } else {
            list.text
        };
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{key} {fingerprint}\n"));
        let line = text.lines().count();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| KnownServersError::CreateFolder {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        write_atomic(path, text.as_bytes(), 0o600).map_err(KnownServersError::Write)?;
        Ok(Recorded::Added { line })
    }

    /// Removes the entry of `server` from the file at `path` (for a server whose certificate
    /// was replaced on purpose). Returns whether there was one.
    pub fn forget(path: &Path, server: &str) -> Result<bool, KnownServersError> {
        let list = Self::load(path)?;
        let Some(line) = list.get(server).map(|e| e.line) else {
            return Ok(false);
        };
        let key = server_key(server);
        let text: String = list
            .text
            .lines()
            .enumerate()
            .filter(|(i, l)| {
                // The recorded line, and any repeat of it further down.
                let mine = l.split_whitespace().next().map(server_key) == Some(key.clone());
                !(i + 1 == line || mine && !l.trim_start().starts_with('#'))
            })
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        write_atomic(path, text.as_bytes(), 0o600).map_err(KnownServersError::Write)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes([b; 32])
    }

    #[test]
    fn known_servers_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let k = KnownServers::load(&dir.path().join("none")).unwrap();
        assert!(k.entries().is_empty());
    }

    #[test]
    fn known_servers_record_then_load_finds_entry_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/known_servers");
        assert_eq!(
            KnownServers::record(&p, "Edge.Local:8021", fp(1)).unwrap(),
            Recorded::Added { line: 2 }
        );
        assert_eq!(
            KnownServers::record(&p, "[::1]:9", fp(2)).unwrap(),
            Recorded::Added { line: 3 }
        );
        let k = KnownServers::load(&p).unwrap();
        let e = k.get("EDGE.local:8021").unwrap();
        assert_eq!((e.fingerprint, e.line), (fp(1), 2));
        assert_eq!(k.get("[::1]:9").unwrap().fingerprint, fp(2));
        assert_eq!(
            KnownServers::record(&p, "edge.local:8021", fp(1)).unwrap(),
            Recorded::AlreadyKnown { line: 2 }
        );
        assert!(matches!(
            KnownServers::record(&p, "edge.local:8021", fp(3)).unwrap(),
            Recorded::Conflict(KnownServer { line: 2, .. })
        ));
        assert_eq!(
            KnownServers::load(&p)
                .unwrap()
                .get("edge.local:8021")
                .unwrap()
                .fingerprint,
            fp(1)
        );
    }

    #[test]
    fn known_servers_garbage_line_refused_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_servers");
        let good = format!("a:1 {}\n", fp(1));
        for (garbage, why) in [
            ("what is this", "3 fields"),
            ("b:2 SHA256:1234", "not a SHA-256 digest"),
            ("b SHA256:", "server \"b\""),
            ("b:0 x", "server \"b:0\""),
            (&format!("a:1 {}", fp(2)) as &str, "already on line 2"),
        ] {
            std::fs::write(&p, format!("# comment\n{good}\n{garbage}\n")).unwrap();
            let e = KnownServers::load(&p).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, KnownServersError::BadLine { line: 4, .. }),
                "{garbage}: {msg}"
            );
            assert!(
                msg.contains(why) && msg.contains("line 4"),
                "{garbage}: {msg}"
            );
            assert!(msg.contains("fix or delete that line"), "{msg}");
        }
    }

    #[test]
    fn known_servers_binary_or_huge_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_servers");
        std::fs::write(&p, b"a:1 x\n\xff\xfe\n").unwrap();
        assert!(matches!(
            KnownServers::load(&p),
            Err(KnownServersError::BadLine { line: 2, .. })
        ));
        std::fs::write(
            &p,
            vec![b'#'; usize::try_from(MAX_KNOWN_SERVERS_LEN + 1).unwrap()],
        )
        .unwrap();
        assert!(matches!(
            KnownServers::load(&p),
            Err(KnownServersError::TooLarge { .. })
        ));
    }

    #[test]
    fn known_servers_forget_removes_only_that_server() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_servers");
        KnownServers::record(&p, "a:1", fp(1)).unwrap();
        KnownServers::record(&p, "b:2", fp(2)).unwrap();
        assert!(KnownServers::forget(&p, "A:1").unwrap());
        assert!(!KnownServers::forget(&p, "a:1").unwrap());
        let k = KnownServers::load(&p).unwrap();
        assert!(k.get("a:1").is_none());
        assert_eq!(k.get("b:2").unwrap().fingerprint, fp(2));
    }

    #[test]
    fn known_servers_record_bad_server_name_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_servers");
        for bad in ["", "host", "host:port", "a b:1", "#x:1"] {
            assert!(
                matches!(
                    KnownServers::record(&p, bad, fp(1)),
                    Err(KnownServersError::BadServer { .. })
                ),
                "{bad}"
            );
        }
        assert!(!p.exists());
    }
}
