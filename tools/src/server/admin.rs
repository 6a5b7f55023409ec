//! The admin socket of `cloudlet server`: a local unix socket (mode 0600, default
//! `$CLOUDLET_HOME/server.sock`) on which `cloudlet list-session` and `cloudlet close-session`
//! talk to a running server.
//!
//! One connection carries one request and one response, each a single line of JSON
//! (`docs/protocol.md`, "Admin socket"):
//!
//! ```text
//!  client                                   server (AdminSocket thread, one thread per request)
//!    {"op":"list"}            ───────────►  Sessions::list
//!                             ◄───────────  {"sessions":[{"id":3,"peer":"…","state":"running",…}]}
//!    {"op":"close","id":3}    ───────────►  Sessions::close: ends the session, waits for its cleanup
//!                             ◄───────────  {"closed":{"id":3}}
//!                             ◄───────────  {"error":{"kind":"not_found","message":"…"}}
//! ```
//!
//! A request is at most [`MAX_REQUEST_LEN`] bytes and must arrive within
//! [`REQUEST_TIMEOUT`]; at most [`MAX_ADMIN_CONNECTIONS`] requests are handled at once.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use synth::protocol::PortMapping;

/// Longest request line the server reads, in bytes (newline included).
pub const MAX_REQUEST_LEN: u64 = 4096;
/// Longest response line a client reads, in bytes.
const MAX_RESPONSE_LEN: u64 = 64 << 20;
/// Requests handled at once; further connections are closed unanswered.
const MAX_ADMIN_CONNECTIONS: usize = 8;
/// Time a request has to arrive, and a response to be written.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for an answer (a close waits for the session's cleanup).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the accept loop checks for the server's shutdown.
const TICK: Duration = Duration::from_millis(50);

/// The socket's file name under the registry folder, unless `--admin-socket` says otherwise.
pub const DEFAULT_NAME: &str = "server.sock";

/// The admin socket path: `explicit`, else `home/server.sock`.
pub fn socket_path(home: &Path, explicit: Option<PathBuf>) -> PathBuf {
    explicit.unwrap_or_else(|| home.join(DEFAULT_NAME))
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every live session.
    List,
    /// End session `id` and wait until it is cleaned up.
    Close {
        /// Session id (as in `list`).
        id: u64,
    },
}

/// What the server answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Answer to `list`.
    Sessions(Vec<SessionInfo>),
    /// Answer to `close`: the session is gone (VM stopped, unmounted, slot free).
    Closed {
        /// The session.
        id: u64,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// Why, for people.
        message: String,
    },
}

/// Kinds of admin failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No live session has that id.
    NotFound,
    /// The request is malformed or too long.
    Invalid,
    /// The session did not finish its cleanup in time.
    Timeout,
}

/// Where a session stands (the protocol's states, `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// `HelloOk` sent; waiting for `StartOverlay` or `StartUrl`.
    Authenticated,
    /// Receiving (or fetching) header and metadata.
    Metadata,
    /// `Accepted` sent; segments arriving (the VM runs already with early start).
    Filling,
    /// Every segment is in; the VM runs.
    Running,
    /// The session is ending: VM being stopped, mount removed.
    Ending,
}

impl SessionState {
    /// The state's name, as `list-session` prints it.
    pub fn name(self) -> &'static str {
        match self {
            SessionState::Authenticated => "authenticated",
            SessionState::Metadata => "metadata",
            SessionState::Filling => "filling",
            SessionState::Running => "running",
            SessionState::Ending => "ending",
        }
    }
}

/// One live session, as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id (the one the client got in `HelloOk`).
    pub id: u64,
    /// Client address.
    pub peer: String,
    /// Where the session stands.
    pub state: SessionState,
    /// Base of the overlay, once the metadata is accepted.
    pub base_id: Option<String>,
    /// When the session was authenticated, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Seconds since then.
    pub age_s: u64,
    /// Overlay bytes received from the client (or fetched from the URL).
    pub bytes_received: u64,
    /// Segments the server asked the client for on demand.
    pub demand_requests: u64,
    /// Guest ports and where they are reachable, once the VM runs.
    pub ports: Vec<PortMapping>,
    /// Pid of the session's QEMU, once it runs.
    pub qemu_pid: Option<u32>,
    /// How its QEMU is confined ("uid 400000, seccomp, cgroup v1: memory 1024 MiB, 512 tasks, CPU 200%"), once it
    /// runs.
    #[serde(default)]
    pub confinement: Option<String>,
}

/// What the server's session table offers the admin socket.
pub trait Sessions: Send + Sync {
    /// Every live session, by id.
    fn list(&self) -> Vec<SessionInfo>;
    /// Ends session `id` the way every session ends (VM stopped, mount removed, run folder
    /// deleted, slot freed) and returns once that is done.
    fn close(&self, id: u64) -> Result<(), (ErrorKind, String)>;
}

/// Errors of the admin socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A live server answers on the socket already.
    #[error("Another cloudlet server answers on {0} (use --admin-socket)")]
    InUse(PathBuf),
    /// A file operation on the socket or its folder failed.
    #[error("{what} {path} failed")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No server listens on the socket.
    #[error(
        "Connecting to the server's admin socket {path} failed (is `cloudlet server` running?)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("Talking to the server's admin socket failed")]
    Exchange(#[source] std::io::Error),
    /// The server closed the connection without answering.
    #[error("The server closed the admin connection without an answer")]
    NoAnswer,
    /// The answer is not what the protocol says.
    #[error("Decoding the admin response failed")]
    Decode(#[source] serde_json::Error),
    /// The answer does not fit the request.
    #[error("Unexpected answer to {0}")]
    Unexpected(&'static str),
    /// No live session has this id (exit code [`crate::EXIT_NOT_FOUND`]).
    #[error("{0}")]
    NotFound(String),
    /// The server refused the request.
    #[error("The server refused ({kind:?}): {message}")]
    Refused {
        /// What kind of failure.
        kind: ErrorKind,
        /// Why.
        message: String,
    },
}

/// A bound admin socket; removes its file when dropped (if the file is still this socket).
pub struct AdminSocket {
    path: PathBuf,
    listener: UnixListener,
    /// `(device, inode)` of the socket file, so a newer server's socket is never removed.
    file_id: (u64, u64),
}

impl AdminSocket {
    /// Binds `path` with mode 0600. A stale socket (no server answers on it) is removed; a live
    /// one, or a file that is not a socket, is an error.
    pub fn bind(path: &Path) -> Result<AdminSocket, AdminError> {
        use std::os::unix::fs::FileTypeExt;
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| AdminError::Io { what, path, source }
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(AdminError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(AdminError::InUse(path.to_path_buf()));
            }
            log::info!("removing stale admin socket {}", path.display());
            std::fs::remove_file(path).map_err(io("Removing the stale socket", path))?;
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(io("Creating", parent))?;
        // Bind inside a private folder (0700, unpredictable name), restrict the socket, then
        // move it into place: nobody else can connect before the mode is 0600.
        let private = tempfile::Builder::new()
            .prefix(".admin-socket-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(io("Creating a private folder in", parent))?;
        let tmp = private.path().join("s");
        let listener = UnixListener::bind(&tmp).map_err(io("Binding the admin socket", path))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io("Setting the mode of", path))?;
        std::fs::rename(&tmp, path).map_err(io("Moving the admin socket to", path))?;
        let meta = std::fs::symlink_metadata(path).map_err(io("Inspecting", path))?;
        Ok(AdminSocket {
            path: path.to_path_buf(),
            listener,
            file_id: (meta.dev(), meta.ino()),
        })
    }

    /// Serves requests on a background thread until `shutdown` is set.
    pub fn serve(
        &self,
        sessions: Arc<dyn Sessions>,
        shutdown: Arc<AtomicBool>,
    ) -> Result<(), AdminError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| AdminError::Io { what, path, source }
        };
        let listener = self.listener.try_clone().map_err(io("Cloning"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("Setting non-blocking mode on"))?;
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(&listener, &sessions, &shutdown))
            .map_err(io("Starting the thread serving"))?;
        Ok(())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(listener: &UnixListener, sessions: &Arc<dyn Sessions>, shutdown: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    while !shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_ADMIN_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("admin socket: too many requests at once, one dropped");
                    continue;
                }
                let sessions = Arc::clone(sessions);
                let done = Arc::clone(&active);
                let spawned = std::thread::Builder::new()
                    .name("admin-request".into())
                    .spawn(move || {
                        handle(stream, &*sessions);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("admin socket: starting a request thread failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(e) => {
                log::warn!("admin socket: accept failed: {e}");
                std::thread::sleep(TICK);
            }
        }
    }
}

/// Reads one request line of at most [`MAX_REQUEST_LEN`] bytes.
fn read_request(stream: &UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    BufReader::new(stream.take(MAX_REQUEST_LEN + 1))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the request failed: {e}"))?;
    if line.len() as u64 > MAX_REQUEST_LEN {
        return Err(format!("request longer than {MAX_REQUEST_LEN} bytes"));
    }
    serde_json::from_slice(line.trim_ascii()).map_err(|e| format!("bad request: {e}"))
}

fn handle(stream: UnixStream, sessions: &dyn Sessions) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)));
    if let Err(e) = setup {
        log::warn!("admin socket: setup failed: {e}");
        return;
    }
    let response = match read_request(&stream) {
        Ok(Request::List) => Response::Sessions(sessions.list()),
        Ok(Request::Close { id }) => {
            log::info!("admin socket: closing session {id}");
            match sessions.close(id) {
                Ok(()) => Response::Closed { id },
                Err((kind, message)) => Response::Error { kind, message },
            }
        }
        Err(message) => Response::Error {
            kind: ErrorKind::Invalid,
            message,
        },
    };
    let mut line = match serde_json::to_vec(&response) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("admin socket: encoding the response failed: {e}");
            return;
        }
    };
    line.push(b'\n');
    let mut s = &stream;
    if let Err(e) = s.write_all(&line) {
        log::debug!("admin socket: writing the response failed: {e}");
    }
}

/// Sends `req` to the server at `path` and returns its answer; a server-side error is an
/// error here ([`AdminError::NotFound`] for an unknown session).
pub fn request(path: &Path, req: &Request) -> Result<Response, AdminError> {
    let stream = UnixStream::connect(path).map_err(|source| AdminError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(AdminError::Exchange)?;
    let mut line = serde_json::to_vec(req).map_err(AdminError::Decode)?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(AdminError::Exchange)?;
    let mut answer = Vec::new();
    BufReader::new((&stream).take(MAX_RESPONSE_LEN))
        .read_until(b'\n', &mut answer)
        .map_err(AdminError::Exchange)?;
    if answer.is_empty() {
        return Err(AdminError::NoAnswer);
    }
    match serde_json::from_slice(answer.trim_ascii()).map_err(AdminError::Decode)? {
        Response::Error {
            kind: ErrorKind::NotFound,
            message,
        } => Err(AdminError::NotFound(message)),
        Response::Error { kind, message } => Err(AdminError::Refused { kind, message }),
        r => Ok(r),
    }
}

/// `cloudlet list-session`: the server's live sessions.
pub fn list_sessions(path: &Path) -> Result<Vec<SessionInfo>, AdminError> {
    match request(path, &Request::List)? {
        Response::Sessions(sessions) => Ok(sessions),
        _ => Err(AdminError::Unexpected("list")),
    }
}

/// `cloudlet close-session ID`: ends a session; returns its id once it is cleaned up.
pub fn close_session(path: &Path, id: u64) -> Result<u64, AdminError> {
    match request(path, &Request::Close { id })? {
        Response::Closed { id } => Ok(id),
        _ => Err(AdminError::Unexpected("close")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A session table holding fixed sessions; `close` removes one.
    struct Table(Mutex<Vec<SessionInfo>>);

    impl Sessions for Table {
        fn list(&self) -> Vec<SessionInfo> {
            self.0.lock().unwrap().clone()
        }
        fn close(&self, id: u64) -> Result<(), (ErrorKind, String)> {
            let mut v = self.0.lock().unwrap();
            let n = v.len();
            v.retain(|s| s.id != id);
            if v.len() == n {
                return Err((ErrorKind::NotFound, format!("no session {id}")));
            }
            Ok(())
        }
    }

    fn info(id: u64) -> SessionInfo {
        SessionInfo {
            id,
            peer: "127.0.0.1:5000".into(),
            state: SessionState::Running,
            base_id: Some("ab".repeat(32)),
            started_unix: 1,
            age_s: 2,
            bytes_received: 3,
            demand_requests: 4,
            ports: vec![PortMapping {
                guest: 80,
                host_addr: "127.0.0.1".into(),
                host_port: 8080,
            }],
            qemu_pid: Some(42),
            confinement: None,
        }
    }

    /// A served admin socket in a temporary folder over a table of sessions 1 and 2.
    fn served() -> (tempfile::TempDir, AdminSocket, Arc<AtomicBool>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = AdminSocket::bind(&dir.path().join("admin.sock")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let table: Arc<dyn Sessions> = Arc::new(Table(Mutex::new(vec![info(1), info(2)])));
        sock.serve(table, Arc::clone(&stop)).unwrap();
        (dir, sock, stop)
    }

    fn raw(path: &Path, bytes: &[u8]) -> Response {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = (&s).write_all(bytes);
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn admin_socket_list_then_close_removes_session() {
        let (_dir, sock, stop) = served();
        let Response::Sessions(v) = request(sock.path(), &Request::List).unwrap() else {
            panic!("not a session list");
        };
        assert_eq!(v, vec![info(1), info(2)]);
        let r = request(sock.path(), &Request::Close { id: 1 }).unwrap();
        assert!(matches!(r, Response::Closed { id: 1 }), "{r:?}");
        let Response::Sessions(v) = request(sock.path(), &Request::List).unwrap() else {
            panic!("not a session list");
        };
        assert_eq!(v, vec![info(2)]);
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn admin_socket_unknown_id_not_found_error() {
        let (_dir, sock, stop) = served();
        let e = request(sock.path(), &Request::Close { id: 99 }).unwrap_err();
        assert!(matches!(e, AdminError::NotFound(_)), "{e}");
        assert!(format!("{e}").contains("99"), "{e}");
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn admin_socket_oversize_request_refused() {
        let (_dir, sock, stop) = served();
        let long = vec![b' '; usize::try_from(MAX_REQUEST_LEN).unwrap() + 10];
        let r = raw(sock.path(), &long);
        assert!(
            matches!(r, Response::Error { kind: ErrorKind::Invalid, ref message } if message.contains("longer")),
            "{r:?}"
        );
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn admin_socket_garbage_and_unknown_op_refused() {
        let (_dir, sock, stop) = served();
        for bad in [&b"{nope\n"[..], b"{\"op\":\"reboot\"}\n", b"\n"] {
            let r = raw(sock.path(), bad);
            assert!(
                matches!(
                    r,
                    Response::Error {
                        kind: ErrorKind::Invalid,
                        ..
                    }
                ),
                "{r:?}"
            );
        }
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn admin_socket_mode_0600_stale_replaced_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket: bound once, its listener gone.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let sock = AdminSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live one is not taken over.
        let e = AdminSocket::bind(&path).err().expect("second bind refused");
        assert!(format!("{e}").contains("Another cloudlet server"), "{e}");
        drop(sock);
        assert!(!path.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn admin_socket_regular_file_in_the_way_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"data").unwrap();
        let e = AdminSocket::bind(&path).err().expect("bind refused");
        assert!(format!("{e}").contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
