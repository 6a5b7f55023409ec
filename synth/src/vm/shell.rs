//! Commands over a serial console with any POSIX shell: bash, dash, busybox `sh`.
//!
//! A real guest's console runs an interactive shell that echoes what is typed, prints a prompt
//! (bash with readline's escapes, e.g. bracketed paste `ESC[?2004h`), redraws long lines and
//! knows nothing of cloudlet. So cloudlet frames every command itself and recognises its start,
//! end and exit status whatever else the console shows:
//!
//! ```text
//!   Shell::new(transport)
//!     └─ sync (first run): wait until the console is quiet, Ctrl-U, then a framed `:` until the
//!        shell answers (Ctrl-C before each retry): the shell is at a prompt
//!   Shell::run(CMD, timeout, on_output)
//!     ├─ type one framed line (below); a line longer than the shell takes is first written
//!     │  to a guest file in short framed `printf` lines, then run from there
//!     ├─ skip the echo and prompt up to BEGIN
//!     ├─ stream the output (terminal escapes and CRs removed) to on_output until END <rc>
//!     └─ timeout: Ctrl-C (then Ctrl-\), resync ─► ShellError::Timeout with the output so far
//! ```
//!
//! The framed line, with `TAG` = a per-session random nonce and the command's sequence
//! number (`3f9c0a1b2c4d5e6f:7`):
//!
//! ```text
//!    printf '\036CLT%s:B\036\n' TAG;(eval 'CMD')</dev/null;printf '\036CLT%s:E%s\036\n' TAG "$?"
//! ```
//!
//! * The markers hold the byte `0x1e` (ASCII record separator), which only `printf` in the
//!   guest produces: the typed line holds the four characters `\036` instead, so its echo,
//!   however redrawn, never contains a marker. The nonce and sequence number make a late
//!   marker of an interrupted or earlier command, or one from another session, not match.
//! * `CMD` is a single-quoted string handed to `eval` in a subshell: quotes, `#`, `;` or a
//!   syntax error in it cannot break the frame, `exit` ends only the subshell, and `cd` or
//!   `export` do not carry over to the next command (as with `sh -c`). Commands that are not
//!   printable ASCII (tabs, line breaks, UTF-8: readline would take a tab for completion) are
//!   typed as `printf` octal escapes and decoded in the guest.
//! * stdin is `/dev/null`, so a command that reads stdin gets end-of-file instead of eating
//!   the lines typed after it. stdout and stderr both go to the console.
//! * The leading space keeps the line out of bash's history (`HISTCONTROL=ignorespace`).
//!
//! The shell is reached through a [`Transport`] (bytes out, bytes in), so the same code drives
//! QEMU's serial socket ([`super::serial::SerialPort`]) and, in tests, real shells on a pty.

use log::{debug, info, warn};
use std::fmt::Write as _;
use std::io;
use std::time::{Duration, Instant};

/// Control characters typed at the shell.
const CTRL_C: u8 = 0x03;
const CTRL_U: u8 = 0x15;
const CTRL_BACKSLASH: u8 = 0x1c;
/// The byte that opens and closes every marker.
const MARK: u8 = 0x1e;
/// How much console output is remembered to show when no shell answers.
const SEEN_KEPT: usize = 2048;

/// What [`Transport::receive`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// This many bytes were appended.
    Bytes(usize),
    /// Nothing arrived within the timeout.
    TimedOut,
    /// The other side closed; nothing more will arrive.
    Closed,
}

/// A console: bytes typed at the guest, bytes the guest printed.
pub trait Transport {
    /// Sends `bytes` to the guest.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Appends what the guest printed to `out`, waiting at most `timeout` for the first byte.
    fn receive(&mut self, out: &mut Vec<u8>, timeout: Duration) -> io::Result<Received>;
}

/// Settings of a [`Shell`]; [`ShellOptions::default`] suits a guest under TCG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShellOptions {
    /// How long the first sync may wait for a shell to answer.
    pub sync_timeout: Duration,
    /// The console counts as quiet after this long without output (before the first sync).
    pub quiet: Duration,
    /// Longest wait for the console to become quiet; the sync goes ahead afterwards.
    pub quiet_max: Duration,
    /// After a timeout: how long the shell gets to answer after each interrupt.
    pub recover_timeout: Duration,
    /// Longest line typed at once, newline included. busybox `sh` takes at most 1023
    /// characters per line and the tty's canonical mode 4095; longer commands go through a
    /// guest file.
    pub max_line: usize,
    /// Output bytes kept per command (the end of it); the callback still sees everything.
    pub max_output: usize,
}

impl Default for ShellOptions {
    fn default() -> Self {
        ShellOptions {
            sync_timeout: Duration::from_secs(60),
            quiet: Duration::from_millis(300),
            quiet_max: Duration::from_secs(5),
            recover_timeout: Duration::from_secs(10),
            max_line: 900,
            max_output: 1 << 20,
        }
    }
}

/// What a command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit status of the command in the guest (128 + N when killed by signal N).
    pub rc: i32,
    /// What it printed (stdout and stderr as the console showed them), terminal escapes and
    /// carriage returns removed; only the last [`ShellOptions::max_output`] bytes.
    pub output: String,
}

impl CommandOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.rc == 0
    }
}

/// Errors of running a command over the console.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// Typing at the console failed.
    #[error("Writing to the console failed")]
    Send(#[source] io::Error),
    /// Reading the console failed.
    #[error("Reading the console failed")]
    Receive(#[source] io::Error),
    /// The console went away (QEMU exited?).
    #[error("The console closed while {step}; it last showed:\n{}", tail(.output))]
    Closed {
        /// What was going on.
        step: String,
        /// Output of the command so far, or what the console showed.
        output: String,
    },
    /// No shell answered a framed `:` in time.
    #[error(
        "No shell answered on the console within {waited:?} (is it at a shell prompt, \
         logged in?); it last showed:\n{}", tail(.seen)
    )]
    NoShell {
        /// How long it was tried.
        waited: Duration,
        /// The end of what the console showed, cleaned.
        seen: String,
    },
    /// The command did not finish in time; it was interrupted.
    #[error(
        "Command {command:?} did not finish within {timeout:?}; {}; output so far:\n{}",
        if *.recovered { "interrupted, the shell answers again" }
        else { "interrupted, but the shell did not answer again" },
        tail(.output)
    )]
    Timeout {
        /// The command.
        command: String,
        /// The time allowed.
        timeout: Duration,
        /// What it printed until then.
        output: String,
        /// Whether the shell was back at a prompt after the interrupt.
        recovered: bool,
    },
    /// The command was interrupted because the caller asked to stop ([`Shell::set_cancel`]).
    #[error(
        "Command {command:?} was interrupted on request; {}",
        if *.recovered { "the shell answers again" } else { "the shell did not answer again" }
    )]
    Cancelled {
        /// The command.
        command: String,
        /// What it printed until then.
        output: String,
        /// Whether the shell was back at a prompt after the interrupt.
        recovered: bool,
    },
    /// A NUL byte cannot be passed through a shell.
    #[error("Command contains a NUL byte, which no shell can take: {0:?}")]
    NulByte(String),
    /// Writing a long command to a guest file failed.
    #[error("Writing a long command to {file} in the guest failed (exit status {rc}): {}", tail(.output))]
    Transfer {
        /// The guest file.
        file: String,
        /// Exit status of the failed `printf`.
        rc: i32,
        /// What it printed.
        output: String,
    },
}

/// The last `max` bytes of `s` (at a character boundary, trailing whitespace dropped), marked
/// `[…]` where cut: a command's output in an error message.
pub fn output_tail(s: &str, max: usize) -> String {
    let s = s.trim_end();
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[…]{}", &s[start..])
}

/// The last lines of `s`, for this module's error messages.
fn tail(s: &str) -> String {
    output_tail(s, 2000)
}

/// How a framed line ended, short of a result.
enum FrameError {
    TimedOut { output: String },
    Cancelled { output: String },
    Closed { output: String },
    Io(ShellError),
}

/// How often a running command checks its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(200);

/// An interactive POSIX shell on a console, driven with framed commands.
#[derive(Debug)]
pub struct Shell<T: Transport> {
    transport: T,
    options: ShellOptions,
    nonce: String,
    seq: u64,
    synced: bool,
    /// Bytes received and not yet looked at.
    pending: Vec<u8>,
    /// When set (a signal handler's flag), a running command is interrupted as at a timeout.
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The end of what the console showed outside commands, cleaned (for [`ShellError::NoShell`]).
    seen: Vec<u8>,
}

impl<T: Transport> Shell<T> {
    /// A shell on `transport` with default options; nothing is sent until the first command.
    pub fn new(transport: T) -> Shell<T> {
        Shell::with_options(transport, ShellOptions::default())
    }

    /// A shell on `transport` with `options`.
    pub fn with_options(transport: T, options: ShellOptions) -> Shell<T> {
        Shell {
            transport,
            options,
            nonce: nonce(),
            seq: 0,
            synced: false,
            pending: Vec::new(),
            seen: Vec::new(),
            cancel: None,
        }
    }

    /// Interrupts a running command (Ctrl-C, as at a timeout) once `flag` is set, e.g. by a
    /// SIGINT/SIGTERM handler, and reports it as [`ShellError::Cancelled`].
    pub fn set_cancel(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.cancel = Some(flag);
    }

    /// The options in use.
    pub fn options(&self) -> &ShellOptions {
        &self.options
    }

    /// Changes the options.
    pub fn set_options(&mut self, options: ShellOptions) {
        self.options = options;
    }

    /// The transport, e.g. to type something unframed. The next command syncs again first.
    pub fn transport_mut(&mut self) -> &mut T {
        self.synced = false;
        &mut self.transport
    }

    /// Whether the last sync or command found the shell at a prompt.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Brings the shell to a known state: waits until the console is quiet (at most
    /// [`ShellOptions::quiet_max`]), clears a half-typed line, then types a framed `:` until
    /// one is answered (Ctrl-C before each retry), within [`ShellOptions::sync_timeout`].
    pub fn sync(&mut self) -> Result<(), ShellError> {
        let start = Instant::now();
        let deadline = start + self.options.sync_timeout;
        self.wait_quiet(deadline)?;
        let mut interrupt = CTRL_U;
        let mut attempt = Duration::from_secs(2);
        loop {
            self.send(&[interrupt])?;
            let attempt_deadline = deadline.min(Instant::now() + attempt);
            match self.frame(":", attempt_deadline, false, &mut |_| {}) {
                Ok(_) => {
                    self.synced = true;
                    info!("Console shell answered after {:?}", start.elapsed());
                    return Ok(());
                }
                Err(FrameError::TimedOut { .. } | FrameError::Cancelled { .. })
                    if Instant::now() < deadline =>
                {
                    debug!("No answer from the console shell yet; interrupting and retrying");
                    interrupt = CTRL_C;
                    attempt = (attempt * 2).min(Duration::from_secs(8));
                }
                Err(FrameError::TimedOut { .. } | FrameError::Cancelled { .. }) => {
                    return Err(ShellError::NoShell {
                        waited: start.elapsed(),
                        seen: self.seen_text(),
                    })
                }
                Err(FrameError::Closed { .. }) => {
                    return Err(ShellError::Closed {
                        step: "waiting for a shell prompt".into(),
                        output: self.seen_text(),
                    })
                }
                Err(FrameError::Io(e)) => return Err(e),
            }
        }
    }

    /// Runs `command` in the guest's shell (in a subshell, stdin from `/dev/null`) and waits
    /// at most `timeout` for it; its output goes to `on_output` as it arrives. Syncs first if
    /// needed. A command that exits non-zero is `Ok` with that `rc`; one that runs out of time
    /// is interrupted and reported as [`ShellError::Timeout`].
    pub fn run(
        &mut self,
        command: &str,
        timeout: Duration,
        on_output: &mut dyn FnMut(&[u8]),
    ) -> Result<CommandOutput, ShellError> {
        if command.contains('\0') {
            return Err(ShellError::NulByte(command.to_owned()));
        }
        if !self.synced {
            self.sync()?;
        }
        let deadline = Instant::now() + timeout;
        debug!("Console command: {command:?}");
        let framed = self
            .code_for(command, deadline)
            .and_then(|code| self.frame(&code, deadline, true, on_output));
        match framed {
            Ok((rc, output)) => {
                debug!("Console command {command:?} exited with {rc}");
                Ok(CommandOutput { rc, output })
            }
            Err(FrameError::TimedOut { output }) => {
                warn!("Console command {command:?} timed out after {timeout:?}; interrupting");
                let recovered = self.recover()?;
                Err(ShellError::Timeout {
                    command: command.to_owned(),
                    timeout,
                    output,
                    recovered,
                })
            }
            Err(FrameError::Cancelled { output }) => {
                warn!("Console command {command:?} cancelled; interrupting");
                let recovered = self.recover()?;
                Err(ShellError::Cancelled {
                    command: command.to_owned(),
                    output,
                    recovered,
                })
            }
            Err(FrameError::Closed { output }) => Err(ShellError::Closed {
                step: format!("running {command:?}"),
                output,
            }),
            Err(FrameError::Io(e)) => Err(e),
        }
    }

    /// The shell code that runs `command`: `(eval 'CMD')`, with CMD typed literally, as
    /// `printf` escapes, or (too long for one line) written to a guest file first.
    fn code_for(&mut self, command: &str, deadline: Instant) -> Result<String, FrameError> {
        let literal = command.bytes().all(|b| (b' '..=b'~').contains(&b));
        let inline = if literal {
            format!("(eval {})", single_quote(command))
        } else {
            format!(
                "(eval \"$(printf '{}')\")",
                printf_escape(command.as_bytes())
            )
        };
        if self.line_len(&inline) <= self.options.max_line {
            return Ok(inline);
        }
        self.transfer(command, deadline)
    }

    /// Writes `command` to a guest file in framed `printf` lines that fit
    /// [`ShellOptions::max_line`]; returns the code that runs it and removes the file.
    fn transfer(&mut self, command: &str, deadline: Instant) -> Result<String, FrameError> {
        let file = format!(
            "${{TMPDIR:-/tmp}}/.cloudlet-{}-{}",
            self.nonce,
            self.seq + 1
        );
        let shown = format!("/tmp/.cloudlet-{}-{}", self.nonce, self.seq + 1);
        // The longest wrapper around a chunk, plus room for the sequence number to grow.
        let wrapper = self.line_len(&chunk_code("", ">>", &file)) + 4;
        let budget = self.options.max_line.saturating_sub(wrapper).max(16);
        let encoded: Vec<String> = command
            .as_bytes()
            .iter()
            .map(|&b| printf_escape(&[b]))
            .collect();
        let mut first = true;
        let mut pieces = encoded.iter().peekable();
        debug!(
            "Console command is long ({} bytes); writing it to {shown}",
            command.len()
        );
        while pieces.peek().is_some() {
            let mut chunk = String::new();
            while let Some(p) = pieces.next_if(|p| chunk.len() + p.len() <= budget) {
                chunk.push_str(p);
            }
            let redirect = if first { ">" } else { ">>" };
            first = false;
            let code = chunk_code(&chunk, redirect, &file);
            let (rc, output) = self.frame(&code, deadline, true, &mut |_| {})?;
            if rc != 0 {
                return Err(FrameError::Io(ShellError::Transfer {
                    file: shown,
                    rc,
                    output,
                }));
            }
        }
        Ok(format!("(eval \"$(cat \"{file}\";rm -f \"{file}\")\")"))
    }

    /// Length of the framed line running `code`, newline included.
    fn line_len(&self, code: &str) -> usize {
        frame_line(&self.tag(self.seq + 1), code).len()
    }

    fn tag(&self, seq: u64) -> String {
        format!("{}:{seq}", self.nonce)
    }

    /// Types one framed line running `code` and waits until `deadline` (or, when
    /// `cancellable`, until the cancel flag is set) for its end marker; returns the exit
    /// status and the (cleaned) output between the markers.
    fn frame(
        &mut self,
        code: &str,
        deadline: Instant,
        cancellable: bool,
        on_output: &mut dyn FnMut(&[u8]),
    ) -> Result<(i32, String), FrameError> {
        let cancel = self.cancel.clone().filter(|_| cancellable);
        self.seq += 1;
        let tag = self.tag(self.seq);
        let begin = marker(&tag, "B");
        let mut end = marker(&tag, "E");
        end.pop(); // the digits and the closing MARK follow
        self.send(frame_line(&tag, code).as_bytes())
            .map_err(FrameError::Io)?;

        let mut started = false;
        let mut cleaner = Cleaner::default();
        let mut kept = Kept::new(self.options.max_output);
        loop {
            if !started {
                if let Some(at) = find(&self.pending, &begin) {
                    self.remember_seen(at);
                    self.pending.drain(..at + begin.len());
                    started = true;
                    cleaner.skip_newline = true;
                } else {
                    // Keep what could be the start of the marker; remember the rest.
                    let keep = begin.len().saturating_sub(1);
                    let cut = self.pending.len().saturating_sub(keep);
                    self.remember_seen(cut);
                    self.pending.drain(..cut);
                }
            }
            if started {
                if let Some(at) = find(&self.pending, &end) {
                    let digits_at = at + end.len();
                    if let Some(rc) = parse_status(&self.pending[digits_at..]) {
                        let (rc, len) = rc;
                        let out = cleaner.clean(&self.pending[..at]);
                        on_output(&out);
                        kept.push(&out);
                        self.pending.drain(..digits_at + len);
                        return Ok((rc, kept.into_string()));
                    }
                    // The status is not complete yet: emit what precedes the marker.
                    let out = cleaner.clean(&self.pending[..at]);
                    on_output(&out);
                    kept.push(&out);
                    self.pending.drain(..at);
                } else {
                    // Hold back a tail that may be the start of the end marker.
                    let hold = partial_suffix(&self.pending, &end);
                    let cut = self.pending.len() - hold;
                    let out = cleaner.clean(&self.pending[..cut]);
                    if !out.is_empty() {
                        on_output(&out);
                        kept.push(&out);
                    }
                    self.pending.drain(..cut);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(FrameError::TimedOut {
                    output: kept.into_string(),
                });
            }
            let cancelled = cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
            if cancelled {
                return Err(FrameError::Cancelled {
                    output: kept.into_string(),
                });
            }
            // Short waits while a cancel flag is set up, so that it is seen promptly.
            let wait = match cancel {
                Some(_) => remaining.min(CANCEL_POLL),
                None => remaining,
            };
            match self.transport.receive(&mut self.pending, wait) {
                Ok(Received::Bytes(_) | Received::TimedOut) => {}
                Ok(Received::Closed) => {
                    let output = if started {
                        kept.into_string()
                    } else {
                        self.seen_text()
                    };
                    return Err(FrameError::Closed { output });
                }
                Err(e) => return Err(FrameError::Io(ShellError::Receive(e))),
            }
        }
    }

    /// After a timeout: Ctrl-C, Ctrl-C, Ctrl-\, each followed by a framed `:`; true when the
    /// shell answered one of them.
    fn recover(&mut self) -> Result<bool, ShellError> {
        self.synced = false;
        for interrupt in [CTRL_C, CTRL_C, CTRL_BACKSLASH] {
            self.send(&[interrupt])?;
            let deadline = Instant::now() + self.options.recover_timeout;
            match self.frame(":", deadline, false, &mut |_| {}) {
                Ok(_) => {
                    self.synced = true;
                    return Ok(true);
                }
                Err(FrameError::TimedOut { .. } | FrameError::Cancelled { .. }) => {}
                Err(FrameError::Closed { output }) => {
                    return Err(ShellError::Closed {
                        step: "interrupting a command that timed out".into(),
                        output,
                    })
                }
                Err(FrameError::Io(e)) => return Err(e),
            }
        }
        warn!("The console shell did not answer after Ctrl-C and Ctrl-\\");
        Ok(false)
    }

    /// Reads until nothing arrives for [`ShellOptions::quiet`] (at most
    /// [`ShellOptions::quiet_max`] or until `deadline`), keeping the end of it.
    fn wait_quiet(&mut self, deadline: Instant) -> Result<(), ShellError> {
        let until = deadline.min(Instant::now() + self.options.quiet_max);
        loop {
            let remaining = until.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(());
            }
            match self
                .transport
                .receive(&mut self.pending, remaining.min(self.options.quiet))
                .map_err(ShellError::Receive)?
            {
                Received::Bytes(_) => {
                    let all = self.pending.len();
                    self.remember_seen(all);
                    self.pending.clear();
                }
                Received::TimedOut => return Ok(()),
                Received::Closed => {
                    return Err(ShellError::Closed {
                        step: "waiting for the console to be quiet".into(),
                        output: self.seen_text(),
                    })
                }
            }
        }
    }

    /// Adds `pending[..upto]` (cleaned) to the remembered console text.
    fn remember_seen(&mut self, upto: usize) {
        let mut c = Cleaner::default();
        self.seen.extend_from_slice(&c.clean(&self.pending[..upto]));
        let excess = self.seen.len().saturating_sub(SEEN_KEPT);
        self.seen.drain(..excess);
    }

    fn seen_text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ShellError> {
        self.transport.send(bytes).map_err(ShellError::Send)
    }
}

/// The code that writes `chunk` (a `printf` format) to `file` with `redirect` (`>` or `>>`).
fn chunk_code(chunk: &str, redirect: &str, file: &str) -> String {
    format!(
        "(eval {})",
        single_quote(&format!("umask 077;printf '{chunk}' {redirect}\"{file}\""))
    )
}

/// The line typed for `code` under `tag`, newline included.
fn frame_line(tag: &str, code: &str) -> String {
    format!(
        " printf '\\036CLT%s:B\\036\\n' {tag};{code}</dev/null;\
         printf '\\036CLT%s:E%s\\036\\n' {tag} \"$?\"\n"
    )
}

/// The bytes of a marker as the guest's `printf` assembles them: `RS CLT<tag>:<kind> RS`.
fn marker(tag: &str, kind: &str) -> Vec<u8> {
    let mut m = vec![MARK];
    m.extend_from_slice(format!("CLT{tag}:{kind}").as_bytes());
    m.push(MARK);
    m
}

/// The exit status at the start of `rest` (`123` + MARK): the value and the bytes it used;
/// `None` while incomplete. Malformed digits count as status 255 (never expected).
fn parse_status(rest: &[u8]) -> Option<(i32, usize)> {
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let after = *rest.get(digits)?;
    let rc = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|d| d.parse().ok())
        .filter(|_| after == MARK)
        .unwrap_or(255);
    // The marker's own line end stays for the cleaner to drop as a leading newline.
    Some((rc, digits + 1))
}

/// Position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `data` that is a proper prefix of `marker`.
fn partial_suffix(data: &[u8], marker: &[u8]) -> usize {
    let max = marker.len().saturating_sub(1).min(data.len());
    (1..=max)
        .rev()
        .find(|&n| data[data.len() - n..] == marker[..n])
        .unwrap_or(0)
}

/// `s` in single quotes for a POSIX shell (`'` becomes `'\''`).
fn single_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// `bytes` as a `printf` format that prints them: printable ASCII as is (`%` and `\`
/// doubled), everything else, and `'`, as three-digit octal escapes.
fn printf_escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'%' => out.push_str("%%"),
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\047"),
            b' '..=b'~' => out.push(char::from(b)),
            _ => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out
}

/// A per-session nonce: 16 hex digits from the kernel's random source.
pub(crate) fn nonce() -> String {
    use std::hash::BuildHasher;
    use std::io::Read;
    let mut b = [0u8; 8];
    let from_kernel = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    let v = if from_kernel {
        u64::from_le_bytes(b)
    } else {
        // RandomState is seeded from the OS once per thread; good enough for a nonce.
        std::collections::hash_map::RandomState::new().hash_one(Instant::now())
    };
    format!("{v:016x}")
}

/// Removes terminal escape sequences, carriage returns and other control characters (tab and
/// newline stay) from console output, across chunk boundaries.
#[derive(Debug, Default)]
struct Cleaner {
    state: EscState,
    /// Bytes of the current string sequence (OSC, DCS, ...), to give up on endless ones.
    string_len: usize,
    /// Drop a CR/LF right at the start (the line end of the begin marker).
    skip_newline: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EscState {
    #[default]
    Normal,
    /// After ESC.
    Esc,
    /// After ESC and an intermediate byte (`ESC ( B`): one more byte ends it.
    EscIntermediate,
    /// In a CSI sequence (`ESC [ ... final`).
    Csi,
    /// In a string sequence (OSC `ESC ]`, DCS `ESC P`, ...) until BEL or ST (`ESC \`).
    String,
    /// ESC inside a string sequence.
    StringEsc,
}

/// Longest string sequence followed before it is taken for ordinary output.
const MAX_STRING_SEQUENCE: usize = 4096;

impl Cleaner {
    fn clean(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if self.skip_newline {
                match b {
                    b'\r' => continue,
                    b'\n' => {
                        self.skip_newline = false;
                        continue;
                    }
                    _ => self.skip_newline = false,
                }
            }
            self.state = match self.state {
                EscState::Normal => match b {
                    0x1b => EscState::Esc,
                    b'\n' | b'\t' => {
                        out.push(b);
                        EscState::Normal
                    }
                    0..=0x1f | 0x7f => EscState::Normal,
                    _ => {
                        out.push(b);
                        EscState::Normal
                    }
                },
                EscState::Esc => match b {
                    b'[' => EscState::Csi,
                    b']' | b'P' | b'X' | b'^' | b'_' => {
                        self.string_len = 0;
                        EscState::String
                    }
                    0x20..=0x2f => EscState::EscIntermediate,
                    _ => EscState::Normal,
                },
                EscState::EscIntermediate => EscState::Normal,
                EscState::Csi => match b {
                    0x20..=0x3f => EscState::Csi,
                    _ => EscState::Normal,
                },
                EscState::String => {
                    self.string_len += 1;
                    match b {
                        0x07 => EscState::Normal,
                        0x1b => EscState::StringEsc,
                        _ if self.string_len > MAX_STRING_SEQUENCE => EscState::Normal,
                        _ => EscState::String,
                    }
                }
                EscState::StringEsc => match b {
                    b'\\' => EscState::Normal,
                    _ => EscState::String,
                },
            };
        }
        out
    }
}

/// The end of a command's output, at most `max` bytes.
struct Kept {
    max: usize,
    buf: Vec<u8>,
    dropped: u64,
}

impl Kept {
    fn new(max: usize) -> Kept {
        Kept {
            max,
            buf: Vec::new(),
            dropped: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        let excess = self.buf.len().saturating_sub(self.max);
        if excess > 0 {
            self.buf.drain(..excess);
            self.dropped = self
                .dropped
                .saturating_add(u64::try_from(excess).unwrap_or(u64::MAX));
        }
    }

    fn into_string(self) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        if self.dropped == 0 {
            text.into_owned()
        } else {
            format!("[… {} bytes left out …]\n{text}", self.dropped)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaner_bash_prompt_escapes_and_crs_are_removed() {
        let mut c = Cleaner::default();
        let out = c.clean(b"\x1b[?2004l\rhi\r\n\x1b]0;title\x07there\x1b(B\x1b[1;31mred\x1b[0m\n");
        assert_eq!(out, b"hi\ntherered\n");
    }

    #[test]
    fn cleaner_escape_split_across_chunks_is_removed() {
        let mut c = Cleaner::default();
        let mut out = c.clean(b"a\x1b[");
        out.extend(c.clean(b"31mb"));
        assert_eq!(out, b"ab");
    }

    #[test]
    fn cleaner_utf8_and_tabs_are_kept() {
        let mut c = Cleaner::default();
        assert_eq!(c.clean("é\tü\n".as_bytes()), "é\tü\n".as_bytes());
    }

    #[test]
    fn cleaner_endless_osc_gives_up() {
        let mut c = Cleaner::default();
        let mut data = b"\x1b]".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_STRING_SEQUENCE + 10));
        assert!(!c.clean(&data).is_empty());
    }

    #[test]
    fn partial_suffix_finds_marker_start() {
        assert_eq!(partial_suffix(b"abc\x1eCL", b"\x1eCLT1:E"), 3);
        assert_eq!(partial_suffix(b"abc", b"\x1eCLT1:E"), 0);
    }

    #[test]
    fn parse_status_incomplete_waits() {
        assert_eq!(parse_status(b"12"), None);
        assert_eq!(parse_status(b"12\x1e\r\n"), Some((12, 3)));
    }

    #[test]
    fn printf_escape_specials_become_octal() {
        assert_eq!(
            printf_escape(b"a%b\\c'd\te\n"),
            "a%%b\\\\c\\047d\\011e\\012"
        );
    }

    #[test]
    fn single_quote_quote_is_escaped() {
        assert_eq!(single_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn frame_line_echo_never_holds_a_marker() {
        let line = frame_line("00ff:1", "(eval 'x')");
        assert!(find(line.as_bytes(), &marker("00ff:1", "B")).is_none());
        assert!(!line.as_bytes().contains(&MARK));
    }

    #[test]
    fn kept_long_output_keeps_the_end() {
        let mut k = Kept::new(4);
        k.push(b"abcdef");
        assert_eq!(k.into_string(), "[… 2 bytes left out …]\ncdef");
    }
}
