//! A client of the QEMU guest agent (`qemu-ga`) over its channel's Unix socket.
//!
//! The launch config's `guest-agent` device gives the guest a virtio-serial port named
//! [`AGENT_CHANNEL`], which QEMU bridges to `RUN/qga.sock`; a guest running `qemu-guest-agent`
//! answers JSON commands on it, one per line:
//!
//! ```text
//!   Agent::connect(qga.sock)
//!     └─ sync: 0xFF (resets the agent's parser) + guest-sync-delimited {id}; skip everything
//!        up to the reply 0xFF {"return": id} (stale replies, parse errors, an agent still
//!        starting: retried until the timeout)
//!   requests: {"execute": CMD, "arguments": {...}, "id": "NONCE-N"} ─► the reply with that id
//!     ├─ ping           guest-ping
//!     ├─ exec           guest-exec (capture-output) ─► guest-exec-status polled until exited
//!     │                 (exit code or signal, stdout and stderr base64-decoded); on timeout the
//!     │                 process tree is killed and the output so far reported
//!     └─ copy_to_guest  guest-file-open PATH.cloudlet-NONCE "w" ─► guest-file-write in 48 KiB
//!                       base64 chunks ─► guest-file-close ─► exec: chmod MODE, mv -f to PATH
//! ```
//!
//! Every reply is hostile input: a line is at most [`MAX_REPLY`] bytes, replies are checked for
//! the shape each command promises, and decoded sizes are bounded by that. A request that
//! times out, or a reply that cannot be read, makes the next request resync first.

use super::shell::nonce;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use log::{debug, info, warn};
use serde_json::{json, Map, Value};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the guest agent's virtio-serial port.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";
/// Longest reply line accepted: two 16 MiB outputs of `guest-exec-status` (qemu-ga's own
/// limit), base64-encoded, and the JSON around them.
pub const MAX_REPLY: usize = 48 << 20;
/// Bytes sent per `guest-file-write`.
const FILE_CHUNK: usize = 48 << 10;
/// Longest pause between `guest-exec-status` polls.
const MAX_POLL: Duration = Duration::from_millis(250);
/// Time given to killing a timed-out process and collecting its output.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Kills a process and its descendants: stop it, recurse into its children, kill it.
const KILL_TREE: &str = "k() { kill -STOP \"$1\" 2>/dev/null; \
    for c in $(cat /proc/\"$1\"/task/*/children 2>/dev/null); do k \"$c\"; done; \
    kill -KILL \"$1\" 2>/dev/null; }; k \"$1\"";

/// Errors of talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent socket did not accept a connection in time.
    #[error("Connecting to the guest agent socket {path} failed (gave up after {waited:?})")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long it was retried.
        waited: Duration,
        /// The last error.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the socket failed.
    #[error("Guest agent socket I/O failed during {command}")]
    Io {
        /// The command under way.
        command: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The agent did not answer a sync in time.
    #[error(
        "The guest agent did not answer within {waited:?}; is qemu-guest-agent installed and \
         running in the guest?"
    )]
    NotAnswering {
        /// How long it was tried.
        waited: Duration,
    },
    /// No reply to a request in time.
    #[error("No reply from the guest agent to {command} within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The socket closed (QEMU exited?).
    #[error("The guest agent socket closed during {command}")]
    Closed {
        /// The command.
        command: String,
    },
    /// A reply line was longer than [`MAX_REPLY`].
    #[error("The guest agent sent a reply to {command} longer than {MAX_REPLY} bytes")]
    ReplyTooLong {
        /// The command.
        command: String,
    },
    /// A reply was not JSON.
    #[error("The guest agent sent a reply to {command} that is not JSON: {line:?}")]
    BadJson {
        /// The command.
        command: String,
        /// The line, shortened.
        line: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A reply had an unexpected shape.
    #[error("Unexpected guest agent reply to {command}: {reply}")]
    BadReply {
        /// The command.
        command: String,
        /// The reply, shortened.
        reply: String,
    },
    /// The agent answered with an error.
    #[error("Guest agent command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The error class (e.g. `GenericError`).
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// A command run with `guest-exec` did not exit in time; it was killed.
    #[error("{command:?} did not exit within {timeout:?} and was killed; {}", output_note(.output))]
    ExecTimeout {
        /// The program and its arguments.
        command: String,
        /// The time allowed.
        timeout: Duration,
        /// What it printed until killed, if that could be collected.
        output: Option<ExecOutput>,
    },
    /// A local file to copy could not be read.
    #[error("Reading {path} failed")]
    LocalFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A guest path cannot be used.
    #[error("Guest path {path:?} is not usable: {reason}")]
    GuestPath {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// Setting the mode of or renaming a copied file in the guest failed.
    #[error("Finishing the copy to {path} in the guest failed (exit status {rc}): {stderr}")]
    Finish {
        /// The destination.
        path: String,
        /// Exit status of `chmod && mv`.
        rc: i32,
        /// What it printed on stderr.
        stderr: String,
    },
}

fn output_note(output: &Option<ExecOutput>) -> String {
    match output {
        Some(o) => format!(
            "output so far:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        None => "its output could not be collected".into(),
    }
}

/// How a process run by `guest-exec` ended and what it printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Its stdout (at most 16 MiB, the agent's limit).
    pub stdout: Vec<u8>,
    /// Its stderr (at most 16 MiB).
    pub stderr: Vec<u8>,
    /// The agent cut stdout short.
    pub stdout_truncated: bool,
    /// The agent cut stderr short.
    pub stderr_truncated: bool,
}

impl ExecOutput {
    /// Exit status in shell terms: the exit code, or 128 + the signal, or -1 if neither.
    pub fn rc(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128_i32.saturating_add(s),
            (None, None) => -1,
        }
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// A connection to the guest agent.
#[derive(Debug)]
pub struct Agent {
    stream: UnixStream,
    /// Bytes read but not yet split into lines.
    buf: Vec<u8>,
    nonce: String,
    next_id: u64,
    synced: bool,
}

impl Agent {
    /// Connects to the agent socket at `path`, retrying until `timeout` (QEMU creates it a
    /// little after it starts). Does not sync yet.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Agent, AgentError> {
        Agent::connect_with(path, timeout, &mut || true)
    }

    /// Like [`Agent::connect`], but gives up early when `keep_trying` returns false (used to
    /// stop once the QEMU process has exited).
    pub fn connect_with(
        path: &Path,
        timeout: Duration,
        keep_trying: &mut dyn FnMut() -> bool,
    ) -> Result<Agent, AgentError> {
        let start = Instant::now();
        let stream = super::connect_unix(path, start + timeout, keep_trying).map_err(|source| {
            AgentError::Connect {
                path: path.to_owned(),
                waited: start.elapsed(),
                source,
            }
        })?;
        debug!("Guest agent socket {} connected", path.display());
        Ok(Agent::new(stream))
    }

    /// An agent client over a connected socket.
    pub fn new(stream: UnixStream) -> Agent {
        Agent {
            stream,
            buf: Vec::new(),
            nonce: nonce(),
            next_id: 1,
            synced: false,
        }
    }

    /// Whether the stream is known to be in step with the agent.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Brings the stream in step with the agent (`guest-sync-delimited`), retrying until
    /// `timeout`: an agent that is still starting answers a later attempt.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        const CMD: &str = "guest-sync-delimited";
        let start = Instant::now();
        let deadline = start + timeout;
        let mut attempt = Duration::from_millis(500);
        loop {
            // Below 2^31: JSON integers every agent version reads back the same.
            let id = u64::from_str_radix(&nonce()[..8], 16).unwrap_or(1) & 0x7fff_ffff;
            let mut msg = vec![0xff];
            msg.extend_from_slice(
                json!({ "execute": CMD, "arguments": { "id": id } })
                    .to_string()
                    .as_bytes(),
            );
            msg.push(b'\n');
            self.write(CMD, &msg, deadline)?;
            let attempt_deadline = deadline.min(Instant::now() + attempt);
            loop {
                let line = match self.read_line(CMD, attempt_deadline) {
                    Ok(l) => l,
                    Err(AgentError::Timeout { .. }) => break,
                    // A junk line before our reply: skip it.
                    Err(AgentError::ReplyTooLong { .. }) => continue,
                    Err(e) => return Err(e),
                };
                // The reply follows the last 0xFF; anything before it is stale.
                let after = match line.iter().rposition(|&b| b == 0xff) {
                    Some(p) => &line[p + 1..],
                    None => continue,
                };
                let answered = serde_json::from_slice::<Value>(after)
                    .ok()
                    .and_then(|v| v.get("return").and_then(Value::as_u64))
                    == Some(id);
                if answered {
                    self.synced = true;
                    debug!("Guest agent in sync after {:?}", start.elapsed());
                    return Ok(());
                }
                debug!("Guest agent sync: skipping {}", shorten_bytes(&line));
            }
            if Instant::now() >= deadline {
                return Err(AgentError::NotAnswering {
                    waited: start.elapsed(),
                });
            }
            attempt = (attempt * 2).min(Duration::from_secs(4));
        }
    }

    /// Runs agent command `command` with `arguments` (`Value::Null` for none) and returns its
    /// `return` value; syncs first if needed.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = Instant::now() + timeout;
        if !self.synced {
            self.sync(timeout)?;
        }
        let r = self.request(command, arguments, deadline, timeout);
        if matches!(
            r,
            Err(AgentError::Timeout { .. }
                | AgentError::Io { .. }
                | AgentError::ReplyTooLong { .. }
                | AgentError::BadJson { .. })
        ) {
            self.synced = false;
        }
        r
    }

    /// `guest-ping`: whether the agent answers.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let ret = self.execute("guest-ping", Value::Null, timeout)?;
        expect_object("guest-ping", &ret).map(drop)
    }

    /// Runs `path` with `args` in the guest (`guest-exec`, stdin empty, output captured) and
    /// waits at most `timeout` for it to exit. A non-zero exit is `Ok`; a timeout kills the
    /// process and its descendants and is [`AgentError::ExecTimeout`].
    pub fn exec(
        &mut self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let deadline = Instant::now() + timeout;
        let shown = std::iter::once(path)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        debug!("Guest agent exec: {shown}");
        let ret = self.execute(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
            timeout,
        )?;
        let pid = expect_object("guest-exec", &ret)?
            .get("pid")
            .and_then(Value::as_i64)
            .filter(|&p| p > 0)
            .ok_or_else(|| bad_reply("guest-exec", &ret))?;
        let mut pause = Duration::from_millis(10);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                warn!("{shown:?} (guest pid {pid}) timed out after {timeout:?}; killing it");
                let output = self.kill_and_collect(pid);
                return Err(AgentError::ExecTimeout {
                    command: shown,
                    timeout,
                    output,
                });
            }
            match self.exec_status(pid, remaining) {
                Ok(Some(out)) => {
                    debug!("Guest agent exec {shown:?} ended: rc {}", out.rc());
                    return Ok(out);
                }
                Ok(None) => {}
                // Out of time while asking: the loop's top kills it.
                Err(AgentError::Timeout { .. }) if Instant::now() >= deadline => continue,
                Err(e) => return Err(e),
            }
            std::thread::sleep(pause.min(remaining));
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Runs `command` with `/bin/sh -c` in the guest; see [`Agent::exec`].
    pub fn exec_shell(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        self.exec("/bin/sh", &["-c", command], timeout)
    }

    /// One `guest-exec-status`: `None` while the process runs.
    pub fn exec_status(
        &mut self,
        pid: i64,
        timeout: Duration,
    ) -> Result<Option<ExecOutput>, AgentError> {
        const CMD: &str = "guest-exec-status";
        let ret = self.execute(CMD, json!({ "pid": pid }), timeout)?;
        let o = expect_object(CMD, &ret)?;
        let exited = o
            .get("exited")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad_reply(CMD, &ret))?;
        if !exited {
            return Ok(None);
        }
        let int = |k: &str| -> Result<Option<i32>, AgentError> {
            match o.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .and_then(|i| i32::try_from(i).ok())
                    .map(Some)
                    .ok_or_else(|| bad_reply(CMD, &ret)),
            }
        };
        let data = |k: &str| -> Result<Vec<u8>, AgentError> {
            match o.get(k) {
                None => Ok(Vec::new()),
                Some(Value::String(s)) => BASE64
                    .decode(s.as_bytes())
                    .map_err(|_| bad_reply(CMD, &ret)),
                Some(_) => Err(bad_reply(CMD, &ret)),
            }
        };
        let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
        Ok(Some(ExecOutput {
            exit_code: int("exitcode")?,
            signal: int("signal")?,
            stdout: data("out-data")?,
            stderr: data("err-data")?,
            stdout_truncated: flag("out-truncated"),
            stderr_truncated: flag("err-truncated"),
        }))
    }

    /// Kills guest process `pid` and its descendants, then collects its status (which also
    /// lets the agent forget it). Best effort: `None` if that did not work out in time.
    fn kill_and_collect(&mut self, pid: i64) -> Option<ExecOutput> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        let pid_arg = pid.to_string();
        let killed = self.execute(
            "guest-exec",
            json!({ "path": "/bin/sh", "arg": ["-c", KILL_TREE, "sh", pid_arg] }),
            KILL_TIMEOUT,
        );
        if let Err(e) = killed {
            warn!("Killing guest pid {pid} failed: {e}");
            return None;
        }
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return None;
            }
            match self.exec_status(pid, remaining) {
                Ok(Some(out)) => return Some(out),
                Ok(None) => std::thread::sleep(Duration::from_millis(50).min(remaining)),
                Err(e) => {
                    warn!("Collecting killed guest pid {pid} failed: {e}");
                    return None;
                }
            }
        }
    }

    /// Copies the local file `local` to `guest_path` (absolute) with permissions `mode`
    /// (e.g. `0o644`); see [`Agent::copy_to_guest`].
    pub fn copy_file(
        &mut self,
        local: &Path,
        guest_path: &str,
        mode: u32,
        timeout: Duration,
    ) -> Result<u64, AgentError> {
        let local_err = |source| AgentError::LocalFile {
            path: local.to_owned(),
            source,
        };
        let mut f = std::fs::File::open(local).map_err(local_err)?;
        self.copy_to_guest(&mut f, guest_path, mode, timeout)
            .map_err(|e| match e {
                AgentError::LocalFile { source, .. } => local_err(source),
                e => e,
            })
    }

    /// Writes everything `data` yields to `guest_path` (absolute) in the guest, with
    /// permissions `mode`, within `timeout`; returns the bytes written. The data goes to a
    /// temporary file next to `guest_path`, which is renamed over it at the end, so a failed
    /// copy leaves no partial file behind (when the agent can still be reached).
    pub fn copy_to_guest(
        &mut self,
        data: &mut dyn Read,
        guest_path: &str,
        mode: u32,
        timeout: Duration,
    ) -> Result<u64, AgentError> {
        check_guest_path(guest_path)?;
        if mode > 0o7777 {
            return Err(AgentError::GuestPath {
                path: guest_path.to_owned(),
                reason: "the mode is larger than 07777",
            });
        }
        let deadline = Instant::now() + timeout;
        let tmp = format!("{guest_path}.cloudlet-{}", self.nonce);
        let ret = self.execute(
            "guest-file-open",
            json!({ "path": tmp, "mode": "w" }),
            timeout,
        )?;
        let handle = ret
            .as_i64()
            .ok_or_else(|| bad_reply("guest-file-open", &ret))?;
        let written = self.write_handle(handle, data, deadline);
        let closed = self.execute(
            "guest-file-close",
            json!({ "handle": handle }),
            remaining_or(deadline, KILL_TIMEOUT),
        );
        let finished = written.and_then(|n| {
            closed?;
            let octal = format!("{mode:o}");
            let out = self.exec(
                "/bin/sh",
                &[
                    "-c",
                    "chmod \"$1\" \"$2\" && mv -f \"$2\" \"$3\"",
                    "sh",
                    &octal,
                    &tmp,
                    guest_path,
                ],
                remaining_or(deadline, Duration::ZERO),
            )?;
            if !out.success() {
                return Err(AgentError::Finish {
                    path: guest_path.to_owned(),
                    rc: out.rc(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            Ok(n)
        });
        match finished {
            Ok(n) => {
                info!("Copied {n} bytes to {guest_path} in the guest");
                Ok(n)
            }
            Err(e) => {
                let cleanup = self.exec("/bin/rm", &["-f", &tmp], KILL_TIMEOUT);
                if let Err(c) = cleanup {
                    debug!("Removing {tmp} in the guest failed too: {c}");
                }
                Err(e)
            }
        }
    }

    /// Sends `data` to the open guest file `handle` in [`FILE_CHUNK`] pieces.
    fn write_handle(
        &mut self,
        handle: i64,
        data: &mut dyn Read,
        deadline: Instant,
    ) -> Result<u64, AgentError> {
        const CMD: &str = "guest-file-write";
        let mut chunk = vec![0u8; FILE_CHUNK];
        let mut total = 0u64;
        loop {
            let n = read_full(data, &mut chunk).map_err(|source| AgentError::LocalFile {
                path: PathBuf::new(),
                source,
            })?;
            if n == 0 {
                return Ok(total);
            }
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(AgentError::Timeout {
                        command: CMD.into(),
                        timeout: Duration::ZERO,
                    });
                }
                let ret = self.execute(
                    CMD,
                    json!({ "handle": handle, "buf-b64": BASE64.encode(rest) }),
                    remaining,
                )?;
                let count = expect_object(CMD, &ret)?
                    .get("count")
                    .and_then(Value::as_u64)
                    .and_then(|c| usize::try_from(c).ok())
                    .filter(|&c| c > 0 && c <= rest.len())
                    .ok_or_else(|| bad_reply(CMD, &ret))?;
                rest = &rest[count..];
                total = total.saturating_add(u64::try_from(count).unwrap_or(u64::MAX));
            }
        }
    }

    /// Sends one request and returns the `return` value of the reply with its id.
    fn request(
        &mut self,
        command: &str,
        arguments: Value,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let id = format!("{}-{}", self.nonce, self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        debug!("Guest agent > {}", super::qmp::shorten(&msg.to_string()));
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.write(command, &line, deadline)?;
        loop {
            let line = self.read_line(command, deadline).map_err(|e| match e {
                AgentError::Timeout { command, .. } => AgentError::Timeout { command, timeout },
                e => e,
            })?;
            // A 0xFF from an earlier sync may precede a line.
            let start = line.iter().rposition(|&b| b == 0xff).map_or(0, |p| p + 1);
            let text = &line[start..];
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply: Value =
                serde_json::from_slice(text).map_err(|source| AgentError::BadJson {
                    command: command.to_owned(),
                    line: shorten_bytes(text),
                    source,
                })?;
            if reply.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                // A late reply to an earlier request, or to the parser reset of a sync.
                debug!("Guest agent: skipping {}", shorten_bytes(text));
                continue;
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .map_or_else(|| "(none)".to_owned(), super::qmp::shorten)
                };
                return Err(AgentError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return match reply.get("return") {
                Some(ret) => Ok(ret.clone()),
                None => Err(bad_reply(command, &reply)),
            };
        }
    }

    fn write(&mut self, command: &str, bytes: &[u8], deadline: Instant) -> Result<(), AgentError> {
        let io_err = |source| AgentError::Io {
            command: command.to_owned(),
            source,
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.stream
            .set_write_timeout(Some(remaining))
            .map_err(io_err)?;
        match self.stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) if is_timeout(&e) => {
                self.synced = false;
                Err(AgentError::Timeout {
                    command: command.to_owned(),
                    timeout: remaining,
                })
            }
            Err(e) if super::qmp::is_disconnect(&e) => Err(AgentError::Closed {
                command: command.to_owned(),
            }),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Reads one line (without its `\n`), waiting at most until `deadline`.
    fn read_line(&mut self, command: &str, deadline: Instant) -> Result<Vec<u8>, AgentError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                return Ok(line);
            }
            scanned = self.buf.len();
            if self.buf.len() > MAX_REPLY {
                // Drop the junk up to the next line end, so that a resync can work.
                self.skip_to_newline(deadline);
                return Err(AgentError::ReplyTooLong {
                    command: command.to_owned(),
                });
            }
            self.fill(command, deadline)?;
        }
    }

    /// Discards input up to and including the next `\n` (or until `deadline`).
    fn skip_to_newline(&mut self, deadline: Instant) {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                self.buf.drain(..=pos);
                return;
            }
            self.buf.clear();
            if self.fill("skipping a long reply", deadline).is_err() {
                return;
            }
        }
    }

    /// Reads what arrives into `buf`, waiting at most until `deadline`.
    fn fill(&mut self, command: &str, deadline: Instant) -> Result<(), AgentError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(AgentError::Timeout {
                command: command.to_owned(),
                timeout: Duration::ZERO,
            });
        }
        let io_err = |source| AgentError::Io {
            command: command.to_owned(),
            source,
        };
        self.stream
            .set_read_timeout(Some(remaining))
            .map_err(io_err)?;
        let mut chunk = [0u8; 64 << 10];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(AgentError::Closed {
                command: command.to_owned(),
            }),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if super::qmp::is_disconnect(&e) => Err(AgentError::Closed {
                command: command.to_owned(),
            }),
            Err(e) => Err(io_err(e)),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Time left until `deadline`, but at least `floor`.
fn remaining_or(deadline: Instant, floor: Duration) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(floor)
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn check_guest_path(path: &str) -> Result<(), AgentError> {
    let reason = if !path.starts_with('/') {
        Some("it must be absolute")
    } else if path.ends_with('/') {
        Some("it names a folder")
    } else if path.contains('\0') {
        Some("it contains a NUL byte")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(AgentError::GuestPath {
            path: path.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn expect_object<'a>(command: &str, v: &'a Value) -> Result<&'a Map<String, Value>, AgentError> {
    v.as_object().ok_or_else(|| bad_reply(command, v))
}

fn bad_reply(command: &str, v: &Value) -> AgentError {
    AgentError::BadReply {
        command: command.to_owned(),
        reply: super::qmp::shorten(&v.to_string()),
    }
}

fn shorten_bytes(b: &[u8]) -> String {
    super::qmp::shorten(&String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_rc_signal_is_128_plus() {
        let o = ExecOutput {
            signal: Some(9),
            ..ExecOutput::default()
        };
        assert_eq!(o.rc(), 137);
        assert!(!o.success());
    }

    #[test]
    fn check_guest_path_relative_is_refused() {
        let err = check_guest_path("etc/motd").unwrap_err();
        assert!(matches!(err, AgentError::GuestPath { .. }), "{err:?}");
    }

    #[test]
    fn read_full_short_reader_fills_what_it_can() {
        let mut r: &[u8] = b"abc";
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 3);
    }
}
