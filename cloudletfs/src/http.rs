//! [`HttpSource`]: an overlay served by any static HTTP server or object store, read with
//! HTTP Range requests.
//!
//! Every range read is retried with exponential backoff when a connection drops or a body
//! comes back short, but never past [`HttpOptions::total_timeout`]: a server that stops
//! answering makes the read fail (EIO upstream) instead of hanging.

use log::{debug, warn};
use std::time::{Duration, Instant};
use synth::source::{check_range, ByteSource, SourceError};

/// Timeouts and retries of HTTP reads.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Longest one request may take (connect, headers and body).
    pub attempt_timeout: Duration,
    /// Longest one range read may take, retries included.
    pub total_timeout: Duration,
    /// First backoff between attempts (doubles, capped at 2 s).
    pub backoff: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            attempt_timeout: Duration::from_secs(20),
            total_timeout: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
        }
    }
}

/// Errors opening an HTTP source.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The first range request failed.
    #[error("Probing {url} failed: {reason}")]
    Probe {
        /// URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// An overlay behind an `http(s)://` URL.
#[derive(Debug)]
pub struct HttpSource {
    agent: ureq::Agent,
    url: String,
    size: u64,
    opts: HttpOptions,
}

/// Outcome of one attempt: `Err((retryable, reason))`.
type Attempt<T> = Result<T, (bool, String)>;

impl HttpSource {
    /// Connects to `url` and learns the overlay's size with a one-byte range request.
    pub fn open(url: &str, opts: HttpOptions) -> Result<Self, HttpError> {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(opts.attempt_timeout))
            .http_status_as_error(false)
            .build();
        let mut s = HttpSource {
            agent: config.new_agent(),
            url: url.to_string(),
            size: 0,
            opts,
        };
        let size = s
            .with_retries(|| s.probe())
            .map_err(|reason| HttpError::Probe {
                url: url.to_string(),
                reason,
            })?;
        s.size = size;
        log::info!("HTTP overlay {url}: {size} bytes");
        Ok(s)
    }

    fn probe(&self) -> Attempt<u64> {
        let mut resp = self
            .agent
            .get(&self.url)
            .header("Range", "bytes=0-0")
            .call()
            .map_err(|e| (true, e.to_string()))?;
        let status = resp.status().as_u16();
        if status == 206 {
            let cr = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .ok_or((false, "206 without Content-Range".to_string()))?;
            let total = cr
                .rsplit('/')
                .next()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .ok_or((false, format!("unparsable Content-Range {cr:?}")))?;
            let _ = resp.body_mut().with_config().limit(16).read_to_vec();
            Ok(total)
        } else if status == 200 {
            Err((false, "server ignores Range requests".to_string()))
        } else {
            Err((retryable_status(status), format!("HTTP status {status}")))
        }
    }

    fn get_range(&self, offset: u64, len: u64) -> Attempt<Vec<u8>> {
        let last = offset + len - 1;
        let mut resp = self
            .agent
            .get(&self.url)
            .header("Range", format!("bytes={offset}-{last}"))
            .call()
            .map_err(|e| (true, e.to_string()))?;
        let status = resp.status().as_u16();
        if status != 206 && !(status == 200 && offset == 0 && len == self.size) {
            return Err((retryable_status(status), format!("HTTP status {status}")));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(len.saturating_add(1))
            .read_to_vec()
            .map_err(|e| (true, e.to_string()))?;
        if body.len() as u64 != len {
            return Err((true, format!("short body: {} of {len} bytes", body.len())));
        }
        Ok(body)
    }

    fn with_retries<T>(&self, mut f: impl FnMut() -> Attempt<T>) -> Result<T, String> {
        let deadline = Instant::now() + self.opts.total_timeout;
        let mut backoff = self.opts.backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match f() {
                Ok(v) => return Ok(v),
                Err((retry, reason)) => {
                    let now = Instant::now();
                    if !retry || now + backoff >= deadline {
                        return Err(format!("{reason} (after {attempt} attempts)"));
                    }
                    warn!("HTTP {}: {reason}; retrying in {backoff:?}", self.url);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

fn retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

impl ByteSource for HttpSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        debug!("HTTP GET {} bytes={offset}+{len}", self.url);
        self.with_retries(|| self.get_range(offset, len))
            .map_err(SourceError::Remote)
    }
}
