//! `cloudlet server --advertise` and `cloudlet client --discover` / `--server auto`: the
//! command-line side of `synth::protocol::discovery` (the announcement built from the
//! registry, the listing printed as text or JSON).

use anyhow::{Context as _, Result};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;
use synth::protocol::discovery::{
    self, local_host_label, AdvertisedBase, Advertiser, Announcement, Cloudlet, DiscoveryEvent,
    MAX_INSTANCE_NAME_LEN,
};
use synth::registry::Registry;

/// How `cloudlet server` announces itself.
pub struct AdvertiseOptions {
    /// Instance name (default `cloudlet on HOST`).
    pub name: Option<String>,
}

/// Starts announcing the server listening on `local` (with its registry at `home`), if asked.
/// The announcement lists the bases present now; it ends when the result is dropped.
pub fn advertise(
    opts: Option<&AdvertiseOptions>,
    home: &Path,
    local: SocketAddr,
    max_sessions: u32,
    token_required: bool,
) -> Result<Option<Advertiser>> {
    let Some(opts) = opts else {
        return Ok(None);
    };
    let bases = Registry::open(home)?
        .list()?
        .iter()
        .map(|b| AdvertisedBase::new(&b.record.id, &b.record.name))
        .collect();
    let name = opts.name.clone().unwrap_or_else(|| {
        let mut n = format!("cloudlet on {}", local_host_label());
        n.truncate(MAX_INSTANCE_NAME_LEN);
        n
    });
    let ann = Announcement {
        max_sessions,
        token_required,
        bases,
    };
    let addr = Some(local.ip()).filter(|ip| !ip.is_unspecified());
    let adv = Advertiser::start(&name, addr, local.port(), &ann).context("--advertise")?;
    eprintln!("advertising {:?} as {}", name, discovery::SERVICE_TYPE);
    Ok(Some(adv))
}

/// Longest `--timeout` accepted.
const MAX_TIMEOUT_SECS: f64 = 3600.0;

/// Parses `--timeout SECS` (fractions allowed, more than 0, at most an hour).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(secs > 0.0 && secs <= MAX_TIMEOUT_SECS) {
        return Err(format!(
            "must be more than 0 and at most {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One line per cloudlet and one per listed base.
fn describe(c: &Cloudlet) -> String {
    let addrs: Vec<String> = c
        .addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, c.port).to_string())
        .collect();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let mut s = format!(
        "{}  {}  ({})\n  protocol {}, {} sessions, token {}, {} bases",
        c.name,
        if addrs.is_empty() {
            format!("port {}", c.port)
        } else {
            addrs.join(" ")
        },
        c.host,
        opt(c.protocol_version.map(|v| v.to_string())),
        opt(c.max_sessions.map(|v| v.to_string())),
        opt(c
            .token_required
            .map(|t| if t { "required" } else { "not required" }.into())),
        opt(c.base_count.map(|v| v.to_string())),
    );
    for b in &c.bases {
        s.push_str(&format!("\n  base {} {}", b.id_prefix, b.name));
    }
    s
}

/// `cloudlet client --discover`: lists the cloudlets that answer within `timeout` (progress
/// on stderr, the list on stdout). Finding none is not an error.
pub fn discover(timeout: Duration, json: bool) -> Result<()> {
    eprintln!(
        "looking for {} for {:.1}s",
        discovery::SERVICE_TYPE,
        timeout.as_secs_f64()
    );
    let list = discovery::discover_with(timeout, |e| {
        match e {
            DiscoveryEvent::Found(c) => eprintln!("found {:?}", c.name),
            DiscoveryEvent::Gone(name) => eprintln!("gone {name:?}"),
        }
        ControlFlow::Continue(())
    })?;
    if list.is_empty() {
        eprintln!("no cloudlets found");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for c in &list {
            println!("{}", describe(c));
        }
    }
    Ok(())
}

/// `--server auto`: the address of the first cloudlet found that speaks our protocol.
pub fn auto_server(timeout: Duration) -> Result<String> {
    let mut chosen = None;
    discovery::discover_with(timeout, |e| match e {
        DiscoveryEvent::Found(c) if c.compatible() => match c.socket_addr() {
            Some(addr) => {
                chosen = Some((c.name.clone(), addr));
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    })?;
    let (name, addr) = chosen.with_context(|| {
        format!(
            "--server auto: no cloudlet found within {:.1}s",
            timeout.as_secs_f64()
        )
    })?;
    eprintln!("discovered {name:?} at {addr}");
    Ok(addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_secs_fractions_ok_zero_nan_and_huge_refused() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("3"), Ok(Duration::from_secs(3)));
        for bad in ["0", "-1", "NaN", "inf", "1e30", "soon"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn describe_unknown_fields_shown_as_question_marks() {
        let c = Cloudlet {
            name: "edge".into(),
            host: "edge.local.".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            port: 8021,
            protocol_version: Some(1),
            max_sessions: None,
            token_required: Some(true),
            base_count: Some(1),
            bases: vec![AdvertisedBase::new("abcdef0123456789ff", "web")],
        };
        assert_eq!(
            describe(&c),
            "edge  10.0.0.2:8021  (edge.local.)\n  protocol 1, ? sessions, token required, \
             1 bases\n  base abcdef0123456789 web"
        );
    }
}
