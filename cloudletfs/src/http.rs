//! [`HttpSource`]: an overlay served by any static HTTP server or object store, read with
//! HTTP Range requests.
//!
//! Every range read is retried with exponential backoff when a connection drops or a body
//! comes back short, but never past [`HttpOptions::total_timeout`]: a server that stops
//! answering makes the read fail (EIO upstream) instead of hanging.
//!
//! Redirects are followed here, not by the HTTP library, so that every hop is vetted by the
//! [`RedirectPolicy`] (the synthesis server's `--allow-url-prefix` list, or by default any
//! well-formed http(s) URL without a downgrade from https), at most [`MAX_REDIRECTS`] hops.
//! A permanent redirect (301, 308) is remembered; a temporary one is followed again each time.

use log::{debug, warn};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use synth::source::{check_range, ByteSource, SourceError};

/// Most redirects one request follows.
pub const MAX_REDIRECTS: u32 = 5;

type RedirectFn = dyn Fn(&str, &str) -> Result<String, String> + Send + Sync;

/// Decides where a redirect may lead: given the URL that answered and its `Location`, the
/// absolute URL to follow, or why not.
#[derive(Clone)]
pub struct RedirectPolicy(Arc<RedirectFn>);

impl RedirectPolicy {
    /// A policy from a function `(current URL, Location) → URL to follow`.
    pub fn new(f: impl Fn(&str, &str) -> Result<String, String> + Send + Sync + 'static) -> Self {
        RedirectPolicy(Arc::new(f))
    }

    /// Any well-formed http(s) target, never from https down to http
    /// ([`synth::protocol::url::resolve_redirect`]).
    pub fn any_http() -> Self {
        RedirectPolicy::new(synth::protocol::url::resolve_redirect)
    }

    /// Follows no redirect at all.
    pub fn none() -> Self {
        RedirectPolicy::new(|_, _| Err("redirects are not followed".into()))
    }
}

impl std::fmt::Debug for RedirectPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedirectPolicy")
    }
}

/// Timeouts and retries of HTTP reads.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Longest one request may take (connect, headers and body).
    pub attempt_timeout: Duration,
    /// Longest one range read may take, retries included.
    pub total_timeout: Duration,
    /// First backoff between attempts (doubles, capped at 2 s).
    pub backoff: Duration,
    /// Where redirects may lead.
    pub redirects: RedirectPolicy,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            attempt_timeout: Duration::from_secs(20),
            total_timeout: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
            redirects: RedirectPolicy::any_http(),
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
    /// The URL as given (for messages).
    url: String,
    /// Where requests go: the URL as given, or the target of a permanent redirect.
    target: Mutex<String>,
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
            .max_redirects(0)
            .build();
        let mut s = HttpSource {
            agent: config.new_agent(),
            url: url.to_string(),
            target: Mutex::new(url.to_string()),
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

    fn target(&self) -> String {
        match self.target.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// One GET with a Range header, following vetted redirects.
    fn get(&self, range: &str) -> Attempt<ureq::http::Response<ureq::Body>> {
        let mut url = self.target();
        let mut permanent = true;
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .agent
                .get(&url)
                .header("Range", range)
                .call()
                .map_err(|e| (true, e.to_string()))?;
            let status = resp.status().as_u16();
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                if permanent && url != self.target() {
                    if let Ok(mut t) = self.target.lock() {
                        *t = url;
                    }
                }
                return Ok(resp);
            }
            permanent &= matches!(status, 301 | 308);
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or((false, format!("HTTP {status} redirect without a Location")))?;
            let next = (self.opts.redirects.0)(&url, location)
                .map_err(|why| (false, format!("redirect to {location:?} refused: {why}")))?;
            debug!("HTTP {status}: {url} redirects to {next}");
            url = next;
        }
        Err((false, format!("more than {MAX_REDIRECTS} redirects")))
    }

    fn probe(&self) -> Attempt<u64> {
        let mut resp = self.get("bytes=0-0")?;
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
        let mut resp = self.get(&format!("bytes={offset}-{last}"))?;
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

/// Demand and background reads are the same Range request: a static server sends what it
/// is asked, in the order asked, so [`ByteSource::read_range_with`] keeps its default.
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
