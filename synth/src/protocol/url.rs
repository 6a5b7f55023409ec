//! Which URLs the server may fetch overlays from.
//!
//! The operator lists allowed prefixes (`--allow-url-prefix`); none means no URL is allowed.
//! A URL is checked, and so is every redirect, by [`UrlPolicy::check`]:
//!
//! 1. It is parsed strictly: ASCII only, no control characters, spaces or backslashes, at most
//!    [`MAX_URL_LEN`] bytes, scheme `http` or `https`, no userinfo (`@`), no fragment, a host of
//!    letters, digits, `-` and `.` (or a bracketed IPv6 literal), an optional numeric port.
//! 2. Its path has no `.` or `..` segments, literal or percent-encoded, and no encoded `/`, `\`
//!    or NUL, so the server it is sent to cannot normalise it out from under the prefix.
//! 3. Scheme, host (lowercased) and port (defaulted: 80 or 443) equal the prefix's exactly,
//!    and the path (with query) starts with the prefix's path on a segment boundary: the prefix
//!    `http://a/b` allows `http://a/b`, `http://a/b/x` and `http://a/b?q`, not `http://a/bc`.

use super::messages::RefuseReason;
use super::MAX_URL_LEN;

/// A URL split into the parts the policy compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedUrl {
    https: bool,
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    path: String,
}

fn parse(url: &str) -> Result<ParsedUrl, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("longer than {MAX_URL_LEN} bytes"));
    }
    if let Some(c) = url
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control() || *c == ' ')
    {
        return Err(format!("contains the character {c:?}"));
    }
    if url.contains('\\') {
        return Err("contains a backslash".into());
    }
    if url.contains('#') {
        return Err("contains a fragment".into());
    }
    let (scheme, rest) = url.split_once("://").ok_or("has no scheme")?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(format!("scheme {scheme:?} is not http or https")),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return Err("contains userinfo".into());
    }
    let (host, port) = split_host_port(authority)?;
    let port = match port {
        None => {
            if https {
                443
            } else {
                80
            }
        }
        Some(p) => Some(p)
            .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("port {p:?} is invalid"))?,
    };
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    check_path(&path)?;
    Ok(ParsedUrl {
        https,
        host,
        port,
        path,
    })
}

fn split_host_port(authority: &str) -> Result<(String, Option<&str>), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (inner, after) = v6.split_once(']').ok_or("has an unclosed IPv6 literal")?;
        if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err("has an invalid IPv6 literal".into());
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("has junk after the IPv6 literal")?,
            ),
        };
        (format!("[{}]", inner.to_ascii_lowercase()), port)
    } else {
        let (h, p) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !h.starts_with('.')
            && !h.ends_with('.')
            && !h.contains("..");
        if !ok {
            return Err(format!("host {h:?} is invalid"));
        }
        (h.to_ascii_lowercase(), p)
    };
    Ok((host, port))
}

fn check_path(path: &str) -> Result<(), String> {
    let lower = path.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%00"] {
        if lower.contains(bad) {
            return Err(format!("path contains the encoded character {bad}"));
        }
    }
    let only_path = lower.split('?').next().unwrap_or("");
    for seg in only_path.split('/') {
        let decoded = seg.replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err("path contains a dot segment".into());
        }
    }
    Ok(())
}

/// The operator's list of URL prefixes the server may fetch from.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    /// The prefixes as given.
    pub allowed_prefixes: Vec<String>,
    parsed: Vec<ParsedUrl>,
}

impl UrlPolicy {
    /// A policy allowing URLs under `prefixes`; each prefix must itself be a valid URL.
    pub fn new(prefixes: Vec<String>) -> Result<Self, RefuseReason> {
        let parsed = prefixes
            .iter()
            .map(|p| {
                parse(p).map_err(|why| RefuseReason::UrlNotAllowed {
                    url: p.clone(),
                    why: format!("invalid prefix: {why}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UrlPolicy {
            allowed_prefixes: prefixes,
            parsed,
        })
    }

    /// Accepts `url` only if it is well formed and under an allowed prefix.
    pub fn check(&self, url: &str) -> Result<(), RefuseReason> {
        let refuse = |why: String| RefuseReason::UrlNotAllowed {
            url: super::clip_text(url.chars().take(512).collect()),
            why,
        };
        let u = parse(url).map_err(refuse)?;
        if self.parsed.is_empty() {
            return Err(refuse("the server allows no URL".into()));
        }
        if self.parsed.iter().any(|p| under(&u, p)) {
            Ok(())
        } else {
            Err(refuse("not under an allowed prefix".into()))
        }
    }

    /// Resolves a redirect's `Location` against the URL that answered it, then checks the
    /// result. Returns the absolute URL to follow.
    pub fn check_redirect(&self, current: &str, location: &str) -> Result<String, RefuseReason> {
        let target =
            resolve_redirect(current, location).map_err(|why| RefuseReason::UrlNotAllowed {
                url: super::clip_text(location.chars().take(512).collect()),
                why,
            })?;
        self.check(&target)?;
        Ok(target)
    }
}

/// Resolves a redirect's `Location` against the URL that answered it (absolute,
/// scheme-relative, absolute-path or relative-path forms) into an absolute URL that passes the
/// strict parse of this module. Refuses other schemes and a move from https to http. This is
/// the whole check where no operator policy applies (a user mounting a URL of their choice);
/// [`UrlPolicy::check_redirect`] adds the prefix check.
pub fn resolve_redirect(current: &str, location: &str) -> Result<String, String> {
    let cur = parse(current)?;
    let scheme = if cur.https { "https" } else { "http" };
    let lower = location.to_ascii_lowercase();
    let target = if lower.starts_with("http://") || lower.starts_with("https://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{}:{}{location}", cur.host, cur.port)
    } else if location.contains(':') {
        return Err("redirect to another scheme".into());
    } else {
        let path = cur.path.split('?').next().unwrap_or("/");
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{scheme}://{}:{}{dir}{location}", cur.host, cur.port)
    };
    let t = parse(&target)?;
    if cur.https && !t.https {
        return Err("redirect from https to http".into());
    }
    Ok(target)
}

fn under(u: &ParsedUrl, p: &ParsedUrl) -> bool {
    if u.https != p.https || u.host != p.host || u.port != p.port {
        return false;
    }
    match u.path.strip_prefix(&p.path) {
        None => false,
        Some(rest) => {
            p.path.ends_with('/')
                || p.path.ends_with('?')
                || rest.is_empty()
                || rest.starts_with('/')
                || rest.starts_with('?')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_redirect_relative_forms_resolved() {
        let cur = "http://h:8080/a/b.cld?x=1";
        assert_eq!(
            resolve_redirect(cur, "c.cld").unwrap(),
            "http://h:8080/a/c.cld"
        );
        assert_eq!(
            resolve_redirect(cur, "/z.cld").unwrap(),
            "http://h:8080/z.cld"
        );
        assert_eq!(
            resolve_redirect(cur, "//g/y.cld").unwrap(),
            "http://g/y.cld"
        );
    }

    #[test]
    fn resolve_redirect_downgrade_or_other_scheme_refused() {
        assert!(resolve_redirect("https://h/a", "http://h/a").is_err());
        assert!(resolve_redirect("http://h/a", "file:///etc/passwd").is_err());
        assert!(resolve_redirect("http://h/a", "http://u@h/a").is_err());
    }

    #[test]
    fn url_parse_default_port_filled() {
        let u = parse("HTTP://Example.COM/a").unwrap();
        assert_eq!(u.host, "example.com");
        assert_eq!(u.port, 80);
        assert_eq!(parse("https://h").unwrap().path, "/");
    }
}
