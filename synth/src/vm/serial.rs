//! The guest's serial console: QEMU's serial socket and log, as seen from the host.
//!
//! QEMU writes everything the guest prints both to `RUN/serial.log` and to the serial socket.
//! A [`SerialPort`] connects to the socket and reads it on a thread of its own, always: a
//! socket nobody reads fills up, and then the guest's console writes stall. What it read
//! waits in a bounded buffer for [`super::shell::Shell`], which types commands through the
//! same port ([`Transport`]). Readiness markers are looked for in the log, which holds the
//! console output from the start.
//!
//! cloudlet's test guest prints [`READY_MARKER`] once its services answer; then its console is
//! a plain interactive busybox `sh`, driven like any other guest's shell.

use super::shell::{Received, Transport};
use log::debug;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Printed by the test guest when its HTTP service answers and its console shell starts.
pub const READY_MARKER: &str = "CLOUDLET-GUEST-READY";

/// Console output kept for the shell while nobody asks for it; older bytes are dropped.
const MAX_BUFFERED: usize = 4 << 20;
/// How long one write to the console may block (the guest reads its UART slowly, not never).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads `path` from byte `offset` to its end; a missing file reads as empty.
pub(crate) fn read_from(path: &Path, offset: u64) -> io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// Whether `haystack` contains `needle`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// What the reader thread hands over.
#[derive(Debug, Default)]
struct Incoming {
    buf: Vec<u8>,
    /// Bytes dropped because nobody took them in time.
    dropped: u64,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    incoming: Mutex<Incoming>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Incoming> {
        self.incoming.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A serial console socket, read continuously on a thread of its own.
#[derive(Debug)]
pub struct SerialPort {
    stream: UnixStream,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl SerialPort {
    /// Connects to the console socket at `path`.
    pub fn connect(path: &Path) -> io::Result<SerialPort> {
        SerialPort::new(UnixStream::connect(path)?)
    }

    /// Takes over a connected console socket and starts reading it.
    pub fn new(stream: UnixStream) -> io::Result<SerialPort> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let shared = Arc::new(Shared::default());
        let reader = {
            let stream = stream.try_clone()?;
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("serial-reader".into())
                .spawn(move || read_loop(stream, &shared))?
        };
        Ok(SerialPort {
            stream,
            shared,
            reader: Some(reader),
        })
    }

    /// Bytes dropped so far because they waited too long (more than 4 MiB unread).
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

impl Transport for SerialPort {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    fn receive(&mut self, out: &mut Vec<u8>, timeout: Duration) -> io::Result<Received> {
        let deadline = Instant::now() + timeout;
        let mut incoming = self.shared.lock();
        loop {
            if !incoming.buf.is_empty() {
                let n = incoming.buf.len();
                out.append(&mut incoming.buf);
                return Ok(Received::Bytes(n));
            }
            if incoming.closed {
                return Ok(Received::Closed);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(Received::TimedOut);
            }
            incoming = self
                .shared
                .arrived
                .wait_timeout(incoming, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for SerialPort {
    fn drop(&mut self) {
        // Ends the reader's read.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Reads the console until it closes, handing bytes to [`SerialPort::receive`].
fn read_loop(mut stream: UnixStream, shared: &Shared) {
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("Serial console read failed: {e}");
                break;
            }
        };
        let mut incoming = shared.lock();
        incoming.buf.extend_from_slice(&chunk[..n]);
        let excess = incoming.buf.len().saturating_sub(MAX_BUFFERED);
        if excess > 0 {
            incoming.buf.drain(..excess);
            incoming.dropped = incoming
                .dropped
                .saturating_add(u64::try_from(excess).unwrap_or(u64::MAX));
        }
        drop(incoming);
        shared.arrived.notify_all();
    }
    shared.lock().closed = true;
    shared.arrived.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_marker_across_text_is_found() {
        assert!(contains(
            b"boot...\r\nCLOUDLET-GUEST-READY\r\n",
            b"CLOUDLET-GUEST-READY"
        ));
        assert!(!contains(b"CLOUDLET-GUEST-REA", b"CLOUDLET-GUEST-READY"));
    }

    #[test]
    fn serial_port_receive_gets_bytes_then_closed() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut port = SerialPort::new(a).unwrap();
        b.write_all(b"hello").unwrap();
        let mut out = Vec::new();
        let first = port.receive(&mut out, Duration::from_secs(5)).unwrap();
        drop(b);
        let mut rest = Vec::new();
        let mut last = Received::TimedOut;
        while last != Received::Closed {
            last = port.receive(&mut rest, Duration::from_secs(5)).unwrap();
        }
        assert_eq!(first, Received::Bytes(5));
        assert_eq!(out, b"hello");
        assert!(rest.is_empty());
    }

    #[test]
    fn serial_port_receive_nothing_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut port = SerialPort::new(a).unwrap();
        let mut out = Vec::new();
        let got = port.receive(&mut out, Duration::from_millis(50)).unwrap();
        assert_eq!(got, Received::TimedOut);
    }

    #[test]
    fn serial_port_send_reaches_the_other_side() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut port = SerialPort::new(a).unwrap();
        port.send(b"ls\n").unwrap();
        let mut got = [0u8; 3];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ls\n");
    }
}
