//! A small QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is line-delimited JSON: QEMU greets, the client answers with `qmp_capabilities`, then
//! sends `{"execute": ..., "arguments": ..., "id": N}` and reads lines until the reply carrying
//! the same `id` arrives. Lines in between are asynchronous events (`{"event": ...}`); they are
//! kept in a small bounded list for inspection and otherwise skipped. An `{"error": ...}` reply
//! becomes [`QmpError::Command`] with QEMU's error class and description.
//!
//! Only the commands cloudlet needs have helpers (`stop`, `cont`, `quit`, `query-status`,
//! migration capabilities and [`Qmp::wait_migration`]); anything else goes through
//! [`Qmp::execute`].

use log::debug;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How many asynchronous events are kept; older ones are dropped.
pub const EVENT_HISTORY: usize = 64;

/// Longest QMP line accepted; a reply longer than this means something is badly wrong.
const MAX_LINE: usize = 16 << 20;

/// Pause between `query-migrate` polls.
const MIGRATION_POLL: Duration = Duration::from_millis(10);

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection before the deadline.
    #[error("Connecting to the QMP socket {path} failed (gave up after {waited:?})")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// How long connecting was retried.
        waited: Duration,
        /// The last connect error.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the socket failed.
    #[error("QMP socket I/O failed")]
    Io(#[from] io::Error),
    /// No complete reply arrived in time.
    #[error("No QMP reply to {command} within {timeout:?}")]
    Timeout {
        /// The command waited for (`greeting` for the greeting).
        command: String,
        /// The read timeout.
        timeout: Duration,
    },
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection while waiting for {command}")]
    Closed {
        /// The command waited for.
        command: String,
    },
    /// A line was not valid JSON.
    #[error("QEMU sent a line that is not JSON: {line:?}")]
    BadJson {
        /// The line, shortened.
        line: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A line was longer than the client accepts.
    #[error("QEMU sent a QMP line longer than 16 MiB")]
    LineTooLong,
    /// The first message was not a QMP greeting.
    #[error("Expected a QMP greeting, got {0}")]
    Greeting(String),
    /// QEMU answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command sent.
        command: String,
        /// QEMU's error class (e.g. `GenericError`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A reply had an unexpected shape.
    #[error("Unexpected QMP reply to {command}: {reply}")]
    BadReply {
        /// The command sent.
        command: String,
        /// The reply, shortened.
        reply: String,
    },
    /// A migration ended in `failed` or `cancelled`.
    #[error("Migration {status}: {desc}")]
    MigrationFailed {
        /// Final status.
        status: String,
        /// QEMU's `error-desc`, or a placeholder when it gave none.
        desc: String,
    },
    /// A migration did not complete in time.
    #[error("Migration not completed within {timeout:?} (last status {status})")]
    MigrationTimeout {
        /// The time allowed.
        timeout: Duration,
        /// The last status seen.
        status: String,
    },
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    /// Bytes read but not yet split into lines.
    buf: Vec<u8>,
    timeout: Duration,
    next_id: u64,
    events: VecDeque<Value>,
    greeting: Value,
}

impl Qmp {
    /// Connects to `path`, retrying until `connect_deadline` (QEMU creates the socket a little
    /// after it starts), reads the greeting and negotiates capabilities. `timeout` bounds
    /// every later wait for a reply.
    pub fn connect(
        path: &Path,
        connect_deadline: Instant,
        timeout: Duration,
    ) -> Result<Qmp, QmpError> {
        Self::connect_with(path, connect_deadline, timeout, || true)
    }

    /// Like [`Qmp::connect`], but gives up early when `keep_trying` returns false (used to stop
    /// retrying once the QEMU process has exited).
    pub fn connect_with(
        path: &Path,
        connect_deadline: Instant,
        timeout: Duration,
        mut keep_trying: impl FnMut() -> bool,
    ) -> Result<Qmp, QmpError> {
        let stream = connect_retry(path, connect_deadline, &mut keep_trying)?;
        let mut qmp = Qmp {
            stream,
            buf: Vec::new(),
            timeout,
            next_id: 1,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        let greeting = qmp.read_message("greeting", Instant::now() + timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(shorten(&greeting.to_string())));
        }
        debug!("QMP greeting on {}: {greeting}", path.display());
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (holds its version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Changes the reply timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The asynchronous events seen so far (at most [`EVENT_HISTORY`], oldest first).
    pub fn events(&self) -> impl Iterator<Item = &Value> {
        self.events.iter()
    }

    /// Runs `command` with `args` (`Value::Null` for none) and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        debug!("QMP > {msg}");
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream.set_write_timeout(Some(self.timeout))?;
        self.stream.write_all(&line)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reply = self.read_message(command, deadline)?;
            if reply.get("event").is_some() {
                debug!("QMP event {reply}");
                if self.events.len() == EVENT_HISTORY {
                    self.events.pop_front();
                }
                self.events.push_back(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // A late reply to an earlier command that timed out.
                debug!("QMP skipping reply for another id: {reply}");
                continue;
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("(none)")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return match reply.get("return") {
                Some(ret) => {
                    debug!("QMP < {ret}");
                    Ok(ret.clone())
                }
                None => Err(QmpError::BadReply {
                    command: command.to_owned(),
                    reply: shorten(&reply.to_string()),
                }),
            };
        }
    }

    /// Turns a migration capability on or off.
    pub fn migrate_set_capability(&mut self, name: &str, state: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": name, "state": state }] }),
        )
        .map(drop)
    }

    /// Polls `query-migrate` until the migration completes, fails or `timeout` passes.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", Value::Null)?;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_owned();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let desc = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU gave no reason")
                        .to_owned();
                    return Err(QmpError::MigrationFailed { status, desc });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QmpError::MigrationTimeout { timeout, status });
            }
            std::thread::sleep(MIGRATION_POLL);
        }
    }

    /// Pauses the guest.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", Value::Null).map(drop)
    }

    /// Resumes the guest.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", Value::Null).map(drop)
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let ret = self.execute("query-status", Value::Null)?;
        ret.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::BadReply {
                command: "query-status".into(),
                reply: shorten(&ret.to_string()),
            })
    }

    /// Asks QEMU to exit. QEMU may close the socket before its reply arrives; that counts as
    /// success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", Value::Null) {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(QmpError::Io(e)) if is_disconnect(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads one JSON message, waiting at most until `deadline`.
    fn read_message(&mut self, command: &str, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|source| QmpError::BadJson {
                    line: shorten(text),
                    source,
                });
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::LineTooLong);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QmpError::Timeout {
                    command: command.to_owned(),
                    timeout: self.timeout,
                });
            }
            self.stream.set_read_timeout(Some(remaining))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        command: command.to_owned(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if is_disconnect(&e) => {
                    return Err(QmpError::Closed {
                        command: command.to_owned(),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn connect_retry(
    path: &Path,
    deadline: Instant,
    keep_trying: &mut impl FnMut() -> bool,
) -> Result<UnixStream, QmpError> {
    let start = Instant::now();
    let stream =
        super::connect_unix(path, deadline, keep_trying).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            waited: start.elapsed(),
            source,
        })?;
    debug!(
        "QMP connected to {} after {:?}",
        path.display(),
        start.elapsed()
    );
    Ok(stream)
}

pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

/// Shortens text for an error message.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 300;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, then answers each command with the scripted lines for it
    /// (`{id}` is replaced with the request id).
    fn fake_qemu(dir: &Path, script: Vec<Vec<&'static str>>) -> PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            for replies in std::iter::once(vec![r#"{"return": {}, "id": {id}}"#]).chain(script) {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let req: Value = serde_json::from_str(&line).unwrap();
                let id = req["id"].to_string();
                for reply in replies {
                    s.write_all(reply.replace("{id}", &id).as_bytes()).unwrap();
                    s.write_all(b"\n").unwrap();
                }
            }
            // Keep the connection open until the client goes away.
            let mut sink = String::new();
            let _ = r.read_line(&mut sink);
        });
        path
    }

    fn connect(path: &Path) -> Qmp {
        Qmp::connect(
            path,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .unwrap()
    }

    #[test]
    fn execute_error_reply_returns_class_and_desc() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(
            dir.path(),
            vec![vec![
                r#"{"error": {"class": "GenericError", "desc": "No such thing"}, "id": {id}}"#,
            ]],
        );
        let mut qmp = connect(&path);
        let err = qmp.execute("frobnicate", Value::Null).unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { class, desc, .. }
                if class == "GenericError" && desc == "No such thing"),
            "{err:?}"
        );
    }

    #[test]
    fn execute_events_before_reply_are_skipped_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(
            dir.path(),
            vec![vec![
                r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                r#"{"return": {"status": "paused", "running": false}, "id": {id}}"#,
            ]],
        );
        let mut qmp = connect(&path);
        let status = qmp.query_status().unwrap();
        assert_eq!(status, "paused");
        assert_eq!(qmp.events().count(), 1);
    }

    #[test]
    fn wait_migration_failed_status_returns_error_desc() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(
            dir.path(),
            vec![
                vec![r#"{"return": {"status": "active"}, "id": {id}}"#],
                vec![r#"{"return": {"status": "failed", "error-desc": "disk full"}, "id": {id}}"#],
            ],
        );
        let mut qmp = connect(&path);
        let err = qmp.wait_migration(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&err, QmpError::MigrationFailed { desc, .. } if desc == "disk full"),
            "{err:?}"
        );
    }

    #[test]
    fn execute_no_reply_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(dir.path(), vec![vec![]]);
        let mut qmp = connect(&path);
        qmp.set_timeout(Duration::from_millis(200));
        let err = qmp.execute("stop", Value::Null).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn connect_missing_socket_fails_after_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qmp::connect(
            &dir.path().join("none.sock"),
            Instant::now() + Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    }
}
