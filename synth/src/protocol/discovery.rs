//! Finding cloudlets on the local network with mDNS / DNS-SD (RFC 6762, RFC 6763).
//!
//! A server announces itself with an [`Advertiser`]: one instance of [`SERVICE_TYPE`] with its
//! TCP port and a TXT record built from an [`Announcement`] (protocol version, session limit,
//! whether a token is needed, its TLS certificate's fingerprint, the bases it holds). A client calls [`discover`] (or
//! [`discover_with`] to follow the search) and gets one [`Cloudlet`] per instance that answered
//! within the time given and did not say goodbye before it ended.
//!
//! ```text
//!  cloudlet server --advertise                  cloudlet client --discover
//!    Advertiser::start ── probe, announce ──►     discover(timeout)
//!      PTR _cloudlet._tcp.local. → instance  ◄──── query PTR (repeated)
//!      SRV instance → host.local. : port     ────► ServiceResolved → Cloudlet::from_txt
//!      TXT txtvers=1 proto=3 fp=SHA256:… …         (ServiceRemoved drops it again)
//!      A/AAAA host.local.
//!    Advertiser::stop ── goodbye (TTL 0) ───►
//! ```
//!
//! The TXT keys are listed in `docs/protocol.md` ("Discovery"). Everything heard on the network
//! is untrusted: a TXT value that does not parse is left out (`None`), never an error, and the
//! number of cloudlets and advertised bases kept is bounded. The fingerprint (`fp`) lets
//! `--server auto` check that the host that answers the TLS handshake is the one that
//! announced itself; it cannot tell a genuine announcement from a forged one (see
//! [`super::client::ServerTrust`]: a known-servers entry comes first).

use super::fingerprint::Fingerprint;
pub use super::local_host_label;
use super::{cut, PROTOCOL_VERSION};
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo, UnregisterStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// The DNS-SD service type a cloudlet is announced under.
pub const SERVICE_TYPE: &str = "_cloudlet._tcp.local.";
/// Version of the TXT record layout (`txtvers`).
pub const TXT_VERSION: u32 = 1;
/// Most bases listed in one announcement (`base1` … `base8`); `bases` gives the full count.
pub const MAX_ADVERTISED_BASES: usize = 8;
/// Hex digits of a base id an announcement carries (a unique prefix in practice).
pub const BASE_ID_PREFIX_LEN: usize = 16;
/// Longest base name an announcement carries, in bytes (longer names are cut).
pub const MAX_BASE_NAME_LEN: usize = 64;
/// Longest instance name, in bytes (RFC 6763 section 4.1.1).
pub const MAX_INSTANCE_NAME_LEN: usize = 63;
/// Most cloudlets [`discover`] keeps, whatever the network says.
pub const MAX_CLOUDLETS: usize = 256;
/// Most addresses kept per cloudlet.
pub const MAX_ADDRESSES: usize = 16;
/// Longest wait for the daemon to confirm an unregistration (goodbye sent) or its shutdown.
const DAEMON_REPLY_WAIT: Duration = Duration::from_secs(3);

/// Errors of advertising or discovering, each naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon (its sockets on port 5353) could not be started.
    #[error("Cannot start the mDNS responder")]
    StartDaemon(#[source] mdns_sd::Error),
    /// The instance name is not usable.
    #[error("Bad instance name {name:?}: {reason}")]
    InstanceName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The service record could not be built or registered.
    #[error("Cannot register {name:?} with the mDNS responder")]
    Register {
        /// The instance name.
        name: String,
        /// The daemon's reason.
        #[source]
        source: mdns_sd::Error,
    },
    /// Browsing for cloudlets could not start.
    #[error("Cannot browse for {SERVICE_TYPE}")]
    Browse(#[source] mdns_sd::Error),
    /// Unregistering (sending the goodbye) failed.
    #[error("Cannot unregister {name:?}")]
    Unregister {
        /// The full service name.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// A base as an announcement lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedBase {
    /// The first [`BASE_ID_PREFIX_LEN`] hex digits of the base id (fewer if the id is shorter).
    pub id_prefix: String,
    /// The base's name (may be empty), cut to [`MAX_BASE_NAME_LEN`] bytes.
    pub name: String,
}

impl AdvertisedBase {
    /// The entry for base `id` named `name`.
    pub fn new(id: &str, name: &str) -> Self {
        AdvertisedBase {
            id_prefix: id.chars().take(BASE_ID_PREFIX_LEN).collect(),
            name: cut(name, MAX_BASE_NAME_LEN).to_string(),
        }
    }

    /// Parses a `baseN` TXT value (`ID_PREFIX NAME`); `None` unless the prefix is 4 to 64
    /// lowercase hex digits.
    fn parse(value: &str) -> Option<Self> {
        let (id, name) = value.split_once(' ').unwrap_or((value, ""));
        let hex = id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex || !(4..=64).contains(&id.len()) {
            return None;
        }
        Some(AdvertisedBase::new(id, name))
    }
}

/// What a server says about itself in its TXT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Sessions the server runs at once.
    pub max_sessions: u32,
    /// Whether the server requires a pre-shared token.
    pub token_required: bool,
    /// The fingerprint of the server's TLS certificate.
    pub fingerprint: Fingerprint,
    /// Every base the server holds; the first [`MAX_ADVERTISED_BASES`] are listed.
    pub bases: Vec<AdvertisedBase>,
}

impl Announcement {
    /// The TXT record: `(key, value)` pairs, every pair under 255 bytes.
    pub fn to_txt(&self) -> Vec<(String, String)> {
        let mut txt = vec![
            ("txtvers".to_string(), TXT_VERSION.to_string()),
            ("proto".to_string(), PROTOCOL_VERSION.to_string()),
            ("sessions".to_string(), self.max_sessions.to_string()),
            (
                "token".to_string(),
                if self.token_required { "1" } else { "0" }.to_string(),
            ),
            ("fp".to_string(), self.fingerprint.to_string()),
            ("bases".to_string(), self.bases.len().to_string()),
        ];
        for (i, b) in self.bases.iter().take(MAX_ADVERTISED_BASES).enumerate() {
            let b = AdvertisedBase::new(&b.id_prefix, &b.name);
            let value = if b.name.is_empty() {
                b.id_prefix
            } else {
                format!("{} {}", b.id_prefix, b.name)
            };
            txt.push((format!("base{}", i + 1), value));
        }
        txt
    }
}

/// A cloudlet found on the network. Fields from the TXT record are `None` when the record
/// lacks them or they do not parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cloudlet {
    /// Instance name (e.g. `cloudlet on edge1`).
    pub name: String,
    /// Host name from the SRV record (e.g. `edge1.local.`).
    pub host: String,
    /// Addresses of the host, IPv4 first.
    pub addresses: Vec<IpAddr>,
    /// TCP port of the synthesis protocol.
    pub port: u16,
    /// The server's [`PROTOCOL_VERSION`].
    pub protocol_version: Option<u32>,
    /// Sessions the server runs at once.
    pub max_sessions: Option<u32>,
    /// Whether the server requires a token.
    pub token_required: Option<bool>,
    /// The fingerprint of the server's TLS certificate, as announced (unauthenticated).
    pub fingerprint: Option<Fingerprint>,
    /// How many bases the server holds.
    pub base_count: Option<u64>,
    /// The bases it lists (at most [`MAX_ADVERTISED_BASES`]).
    pub bases: Vec<AdvertisedBase>,
}

impl Cloudlet {
    /// Builds a cloudlet from resolved records: `get(key)` returns a TXT value as text.
    fn from_records<'a>(
        name: String,
        host: String,
        mut addresses: Vec<IpAddr>,
        port: u16,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Self {
        addresses.sort_by_key(|a| (a.is_ipv6(), *a));
        addresses.dedup();
        addresses.truncate(MAX_ADDRESSES);
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<u64>().ok());
        let small = |k: &str| num(k).and_then(|v| u32::try_from(v).ok());
        let bases = (1..=MAX_ADVERTISED_BASES)
            .filter_map(|i| get(&format!("base{i}")).and_then(AdvertisedBase::parse))
            .collect();
        Cloudlet {
            name,
            host,
            addresses,
            port,
            protocol_version: small("proto"),
            max_sessions: small("sessions"),
            token_required: match get("token") {
                Some("1") => Some(true),
                Some("0") => Some(false),
                _ => None,
            },
            fingerprint: get("fp").and_then(|v| v.parse().ok()),
            base_count: num("bases"),
            bases,
        }
    }

    /// Whether this cloudlet speaks our [`PROTOCOL_VERSION`] and announces the fingerprint
    /// `--server auto` checks its certificate against.
    pub fn compatible(&self) -> bool {
        self.protocol_version == Some(PROTOCOL_VERSION) && self.fingerprint.is_some()
    }

    /// The address to connect to: the first IPv4 address, else the first IPv6 one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addresses
            .first()
            .map(|ip| SocketAddr::new(*ip, self.port))
    }
}

/// The instance name in a full service name (`NAME._cloudlet._tcp.local.`), unescaped.
fn instance_name(fullname: &str) -> String {
    let escaped = fullname
        .strip_suffix(SERVICE_TYPE)
        .and_then(|n| n.strip_suffix('.'))
        .unwrap_or(fullname);
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn start_daemon() -> Result<ServiceDaemon, DiscoveryError> {
    ServiceDaemon::new().map_err(DiscoveryError::StartDaemon)
}

/// Stops a daemon and waits (bounded) for its thread to confirm.
fn shutdown(daemon: &ServiceDaemon) {
    match daemon.shutdown() {
        Ok(rx) => {
            let _ = rx.recv_timeout(DAEMON_REPLY_WAIT);
        }
        Err(e) => log::debug!("mDNS daemon shutdown: {e}"),
    }
}

/// A registered cloudlet instance; unregistered (goodbye sent) by [`Advertiser::stop`] or on
/// drop.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
    stopped: bool,
}

impl Advertiser {
    /// Registers instance `name` on `port`. With `addr` the host record carries that address
    /// only (a server listening on one address); without it, every address of every interface
    /// the announcement goes out on, kept up to date.
    pub fn start(
        name: &str,
        addr: Option<IpAddr>,
        port: u16,
        announcement: &Announcement,
    ) -> Result<Self, DiscoveryError> {
        let bad = |reason| DiscoveryError::InstanceName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("empty"));
        }
        if name.len() > MAX_INSTANCE_NAME_LEN {
            return Err(bad("longer than 63 bytes"));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("contains control characters"));
        }
        let host = format!("{}.local.", local_host_label());
        let txt = announcement.to_txt();
        let props: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (&**k, &**v)).collect();
        let register = |source| DiscoveryError::Register {
            name: name.to_string(),
            source,
        };
        let info = match addr {
            Some(ip) => ServiceInfo::new(SERVICE_TYPE, name, &host, ip, port, &props[..]),
            None => ServiceInfo::new(SERVICE_TYPE, name, &host, "", port, &props[..])
                .map(ServiceInfo::enable_addr_auto),
        }
        .map_err(register)?;
        let fullname = info.get_fullname().to_string();
        let daemon = start_daemon()?;
        if let Err(e) = daemon.register(info) {
            shutdown(&daemon);
            return Err(register(e));
        }
        log::info!("advertising {fullname} on port {port} (host {host})");
        Ok(Advertiser {
            daemon,
            fullname,
            stopped: false,
        })
    }

    /// The full service name (`NAME._cloudlet._tcp.local.`).
    pub fn fullname(&self) -> &str {
        &self.fullname
    }

    /// Unregisters the instance (the goodbye announcement goes out) and stops the daemon.
    pub fn stop(mut self) -> Result<(), DiscoveryError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), DiscoveryError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let err = |reason: String| DiscoveryError::Unregister {
            name: self.fullname.clone(),
            reason,
        };
        let result = match self.daemon.unregister(&self.fullname) {
            Ok(rx) => match rx.recv_timeout(DAEMON_REPLY_WAIT) {
                Ok(UnregisterStatus::OK) => Ok(()),
                Ok(UnregisterStatus::NotFound) => Err(err("not registered".into())),
                Err(e) => Err(err(format!("no answer from the daemon: {e}"))),
            },
            Err(e) => Err(err(e.to_string())),
        };
        shutdown(&self.daemon);
        if result.is_ok() {
            log::info!("unregistered {}", self.fullname);
        }
        result
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            log::warn!("{e}");
        }
    }
}

/// What happens during a [`discover_with`] search.
#[derive(Debug)]
pub enum DiscoveryEvent<'a> {
    /// A cloudlet answered (again, if its records changed).
    Found(&'a Cloudlet),
    /// A cloudlet said goodbye (or its records expired).
    Gone(&'a str),
}

/// Browses for cloudlets for `timeout`; the ones present at the end, sorted by name.
pub fn discover(timeout: Duration) -> Result<Vec<Cloudlet>, DiscoveryError> {
    discover_with(timeout, |_| ControlFlow::Continue(()))
}

/// [`discover`], telling `on_event` about every cloudlet found or gone as it happens; the
/// search ends early when `on_event` returns [`ControlFlow::Break`].
pub fn discover_with(
    timeout: Duration,
    mut on_event: impl FnMut(&DiscoveryEvent<'_>) -> ControlFlow<()>,
) -> Result<Vec<Cloudlet>, DiscoveryError> {
    let daemon = start_daemon()?;
    let rx = match daemon.browse(SERVICE_TYPE) {
        Ok(rx) => rx,
        Err(e) => {
            shutdown(&daemon);
            return Err(DiscoveryError::Browse(e));
        }
    };
    let mut found: BTreeMap<String, Cloudlet> = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let event = match rx.recv_timeout(left) {
            Ok(event) => event,
            Err(mdns_sd::RecvTimeoutError::Timeout) => break,
            Err(mdns_sd::RecvTimeoutError::Disconnected) => break,
        };
        match event {
            ServiceEvent::ServiceResolved(svc) => {
                if !found.contains_key(&svc.fullname) && found.len() >= MAX_CLOUDLETS {
                    log::debug!("ignoring {}: {MAX_CLOUDLETS} cloudlets kept", svc.fullname);
                    continue;
                }
                let props = &svc.txt_properties;
                let cloudlet = Cloudlet::from_records(
                    instance_name(&svc.fullname),
                    svc.host.clone(),
                    svc.addresses.iter().map(|a| a.to_ip_addr()).collect(),
                    svc.port,
                    |k| props.get_property_val_str(k),
                );
                if found.get(&svc.fullname) != Some(&cloudlet) {
                    let flow = on_event(&DiscoveryEvent::Found(&cloudlet));
                    found.insert(svc.fullname.clone(), cloudlet);
                    if flow.is_break() {
                        break;
                    }
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(c) = found.remove(&fullname) {
                    if on_event(&DiscoveryEvent::Gone(&c.name)).is_break() {
                        break;
                    }
                }
            }
            other => log::debug!("mDNS: {other:?}"),
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    shutdown(&daemon);
    let mut list: Vec<Cloudlet> = found.into_values().collect();
    list.sort_by(|a, b| (&a.name, &a.host).cmp(&(&b.name, &b.host)));
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(txt: &[(&str, &str)]) -> Cloudlet {
        Cloudlet::from_records("c".into(), "h.local.".into(), vec![], 8021, |k| {
            txt.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
        })
    }

    fn owned(txt: &[(String, String)]) -> Vec<(&str, &str)> {
        txt.iter().map(|(k, v)| (&**k, &**v)).collect()
    }

    #[test]
    fn announcement_txt_round_trips_through_parser() {
        let ann = Announcement {
            max_sessions: 3,
            token_required: true,
            fingerprint: Fingerprint::from_bytes([9; 32]),
            bases: vec![
                AdvertisedBase::new(&"ab12".repeat(16), "web server"),
                AdvertisedBase::new(&"cd34".repeat(16), ""),
            ],
        };
        let c = parse(&owned(&ann.to_txt()));
        assert_eq!(c.protocol_version, Some(PROTOCOL_VERSION));
        assert!(c.compatible());
        assert_eq!(c.max_sessions, Some(3));
        assert_eq!(c.token_required, Some(true));
        assert_eq!(c.fingerprint, Some(Fingerprint::from_bytes([9; 32])));
        assert_eq!(c.base_count, Some(2));
        assert_eq!(
            c.bases,
            vec![
                AdvertisedBase {
                    id_prefix: "ab12ab12ab12ab12".into(),
                    name: "web server".into()
                },
                AdvertisedBase {
                    id_prefix: "cd34cd34cd34cd34".into(),
                    name: String::new()
                },
            ]
        );
    }

    #[test]
    fn announcement_many_bases_lists_eight_counts_all() {
        let ann = Announcement {
            max_sessions: 1,
            token_required: false,
            fingerprint: Fingerprint::from_bytes([0xff; 32]),
            bases: (0..20)
                .map(|i| AdvertisedBase::new(&format!("{i:064x}"), &"n".repeat(300)))
                .collect(),
        };
        let txt = ann.to_txt();
        assert!(txt.iter().all(|(k, v)| k.len() + 1 + v.len() <= 255));
        let c = parse(&owned(&txt));
        assert_eq!(c.base_count, Some(20));
        assert_eq!(c.bases.len(), MAX_ADVERTISED_BASES);
        assert_eq!(c.bases[0].name.len(), MAX_BASE_NAME_LEN);
        assert_eq!(c.token_required, Some(false));
    }

    #[test]
    fn cloudlet_garbage_txt_fields_none() {
        let c = parse(&[
            ("proto", "one"),
            ("sessions", "99999999999"),
            ("token", "yes"),
            ("bases", "-1"),
            ("fp", "SHA256:beef"),
            ("base1", "XYZ not hex"),
            ("base2", "ab"),
            ("base3", "abcd ok"),
        ]);
        assert_eq!(c.protocol_version, None);
        assert!(!c.compatible());
        assert_eq!(c.max_sessions, None);
        assert_eq!(c.token_required, None);
        assert_eq!(c.fingerprint, None);
        assert_eq!(c.base_count, None);
        assert_eq!(c.bases, vec![AdvertisedBase::new("abcd", "ok")]);
    }

    #[test]
    fn cloudlet_without_fingerprint_not_compatible() {
        let proto = PROTOCOL_VERSION.to_string();
        let fp = Fingerprint::from_bytes([1; 32]).to_string();
        assert!(parse(&[("proto", &proto), ("fp", &fp)]).compatible());
        assert!(!parse(&[("proto", &proto)]).compatible());
        assert!(!parse(&[("proto", "2"), ("fp", &fp)]).compatible());
    }

    #[test]
    fn cloudlet_addresses_ipv4_first_deduplicated() {
        let v6: IpAddr = "::1".parse().unwrap();
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let c = Cloudlet::from_records("c".into(), "h".into(), vec![v6, v4, v6], 9, |_| None);
        assert_eq!(c.addresses, vec![v4, v6]);
        assert_eq!(c.socket_addr(), Some(SocketAddr::new(v4, 9)));
    }

    #[test]
    fn instance_name_escaped_dots_unescaped() {
        assert_eq!(
            instance_name(r"edge\.1 \\ x._cloudlet._tcp.local."),
            r"edge.1 \ x"
        );
        assert_eq!(instance_name("odd.name"), "odd.name");
    }

    #[test]
    fn cut_multibyte_name_stays_on_char_boundary() {
        assert_eq!(cut("ééé", 3), "é");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn advertiser_long_name_refused() {
        let ann = Announcement {
            max_sessions: 1,
            token_required: false,
            fingerprint: Fingerprint::from_bytes([0; 32]),
            bases: vec![],
        };
        let e = Advertiser::start(&"x".repeat(64), None, 8021, &ann).err();
        assert!(
            matches!(e, Some(DiscoveryError::InstanceName { .. })),
            "{e:?}"
        );
    }
}
