//! Bounded waits that give up cleanly on SIGINT/SIGTERM: for a marker on a VM's serial
//! console, for the guest agent to answer, and for an HTTP 200 from a guest's service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use synth::vm::{Vm, VmError};

/// How often a wait checks its stop flag.
const TICK: Duration = Duration::from_millis(250);
/// Bound on one attempt of [`wait_agent`] (connect, sync and ping).
const AGENT_ATTEMPT: Duration = Duration::from_secs(2);
/// Bound on one HTTP attempt of [`wait_http_ok`].
const HTTP_ATTEMPT: Duration = Duration::from_secs(10);

/// Why a wait ended without what it waited for.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// SIGINT or SIGTERM arrived.
    #[error("Interrupted")]
    Interrupted,
    /// The VM failed (or exited) while waiting for a marker.
    #[error("Waiting for {marker:?} on the serial console failed")]
    Marker {
        /// The marker.
        marker: String,
        /// What happened.
        #[source]
        source: Box<VmError>,
    },
    /// The guest agent did not answer (or the VM failed) in time.
    #[error("Waiting for the guest agent to answer guest-ping failed")]
    Agent(#[source] Box<VmError>),
    /// The URL did not answer 200 in time.
    #[error("{url}: no HTTP 200 within {timeout:?} (last: {last})")]
    NoHttpOk {
        /// The URL.
        url: String,
        /// The time allowed.
        timeout: Duration,
        /// The last answer or error.
        last: String,
    },
    /// Nobody can be asked to go on (no terminal).
    #[error("Standard input is closed; use --ready MARKER for unattended runs")]
    NoUser,
}

/// Waits for `marker` on the VM's serial console, up to `timeout`; returns the time since the
/// VM started.
pub fn wait_marker(
    vm: &mut Vm,
    marker: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Duration, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        match vm.wait_ready_marker(marker, TICK) {
            Ok(t) => return Ok(t),
            Err(VmError::Timeout { .. }) if Instant::now() < deadline => {
                if stop.load(Ordering::Relaxed) {
                    return Err(WaitError::Interrupted);
                }
            }
            Err(source) => {
                return Err(WaitError::Marker {
                    marker: marker.to_owned(),
                    source: Box::new(source),
                })
            }
        }
    }
}

/// Waits until the guest agent answers `guest-ping`, up to `timeout`; returns the time since
/// the VM started. Tries in short rounds, so that `stop` is heeded: an agent still starting
/// in the guest answers a later round.
pub fn wait_agent(
    vm: &mut Vm,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Duration, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let round = AGENT_ATTEMPT.min(deadline.saturating_duration_since(Instant::now()));
        match vm.wait_agent(round) {
            Ok(t) => return Ok(t),
            // A missing channel or a dead QEMU does not get better with time.
            Err(e @ (VmError::NoAgentChannel | VmError::Exited { .. })) => {
                return Err(WaitError::Agent(Box::new(e)))
            }
            Err(e) if Instant::now() >= deadline => return Err(WaitError::Agent(Box::new(e))),
            Err(e) => {
                log::debug!("guest agent not answering yet: {e}");
                if stop.load(Ordering::Relaxed) {
                    return Err(WaitError::Interrupted);
                }
            }
        }
    }
}

/// Polls `url` until it answers 200, `timeout` passes or `stop` is set.
pub fn wait_http_ok(url: &str, timeout: Duration, stop: &AtomicBool) -> Result<(), WaitError> {
    let deadline = Instant::now() + timeout;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_ATTEMPT))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return Err(WaitError::Interrupted);
        }
        match agent.get(url).call() {
            Ok(r) if r.status() == 200 => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(WaitError::NoHttpOk {
        url: url.to_owned(),
        timeout,
        last,
    })
}

/// How long a [`FirstAnswerProbe`] polls before it gives up (and logs a warning).
pub const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(1800);

/// A thread that polls a guest service's URL until its first HTTP 200, for the "first answer"
/// events of `synthesis --ready-http` and `client --ready-http-path`. It reports once, from its
/// own thread, with the time since the session started. Dropping the probe stops and joins it.
pub struct FirstAnswerProbe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FirstAnswerProbe {
    /// Starts polling `url`; on its first 200, calls `on_answer(url, since.elapsed())`.
    pub fn start(
        url: String,
        since: Instant,
        on_answer: impl FnOnce(String, Duration) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread =
            std::thread::spawn(
                move || match wait_http_ok(&url, FIRST_ANSWER_TIMEOUT, &flag) {
                    Ok(()) => on_answer(url, since.elapsed()),
                    Err(WaitError::Interrupted) => {}
                    Err(e) => log::warn!("no first answer: {e}"),
                },
            );
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FirstAnswerProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A one-shot HTTP server answering `status` to every request, on a thread.
    fn serve(status: u16) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
        });
        url
    }

    #[test]
    fn wait_http_ok_real_server_200_returns() {
        let url = serve(200);
        wait_http_ok(&url, Duration::from_secs(20), &AtomicBool::new(false)).unwrap();
    }

    #[test]
    fn wait_http_ok_404_times_out_with_last_status() {
        let url = serve(404);
        let e =
            wait_http_ok(&url, Duration::from_millis(500), &AtomicBool::new(false)).unwrap_err();
        assert!(e.to_string().contains("HTTP 404"), "{e}");
    }

    #[test]
    fn first_answer_probe_reports_once_and_drop_stops_a_silent_one() {
        let (tx, rx) = std::sync::mpsc::channel();
        let url = serve(200);
        let probe = FirstAnswerProbe::start(url.clone(), Instant::now(), move |u, at| {
            let _ = tx.send((u, at));
        });
        let (u, _) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(u, url);
        drop(probe);
        // Nothing listens on port 9: dropping must stop the probe, not wait 30 minutes.
        let silent =
            FirstAnswerProbe::start("http://127.0.0.1:9/".into(), Instant::now(), |_, _| {
                panic!("no answer expected")
            });
        let t = Instant::now();
        drop(silent);
        assert!(t.elapsed() < FIRST_ANSWER_TIMEOUT);
    }

    #[test]
    fn wait_http_ok_stop_flag_interrupts() {
        let e = wait_http_ok(
            "http://127.0.0.1:9/",
            Duration::from_secs(60),
            &AtomicBool::new(true),
        )
        .unwrap_err();
        assert!(matches!(e, WaitError::Interrupted), "{e}");
    }
}
