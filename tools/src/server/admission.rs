//! Who may open a connection at all, before any byte is read: at most `--max-connections-per-ip`
//! connections from one peer address (handshaking or in a session), and at most
//! `--max-handshakes` connections not authenticated yet, all peers together.
//!
//! ```text
//!  accept ─► Admission::admit(peer ip) ─► Ticket (counts: per ip, handshaking)
//!               │ refused: closed at once, nothing read
//!  TLS + Hello + token ─► Ticket::authenticated (leaves the handshake pool) ─► session slot
//!  connection ends ─► Ticket dropped (its counts returned)
//! ```
//!
//! Session slots are taken only after the token is checked, so connections that never
//! authenticate cannot keep clients out of the sessions; they can only fill the handshake pool,
//! each for at most `HANDSHAKE_TIMEOUT`, and from one address only up to the per-address limit.

use super::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Default of `--max-connections-per-ip`.
pub const DEFAULT_PER_IP: usize = 8;
/// Default of `--max-handshakes`.
pub const DEFAULT_HANDSHAKES: usize = 32;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer address holds its maximum of connections.
    PerIp(usize),
    /// The handshake pool is full.
    Handshakes(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::PerIp(n) => write!(
                f,
                "too many connections from this address ({n}, --max-connections-per-ip)"
            ),
            Refusal::Handshakes(n) => write!(
                f,
                "too many connections in the handshake ({n}, --max-handshakes)"
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    per_ip: HashMap<IpAddr, usize>,
    handshaking: usize,
}

/// The counters behind the limits.
pub(crate) struct Admission {
    max_per_ip: usize,
    max_handshakes: usize,
    counts: Mutex<Counts>,
}

/// One admitted connection; returns its counts when dropped.
pub(crate) struct Ticket {
    adm: Arc<Admission>,
    ip: IpAddr,
    handshaking: bool,
}

impl Admission {
    /// Limits of `max_per_ip` connections per peer address and `max_handshakes` connections
    /// not authenticated yet (both at least 1).
    pub(crate) fn new(max_per_ip: usize, max_handshakes: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_per_ip: max_per_ip.max(1),
            max_handshakes: max_handshakes.max(1),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Admits a connection from `ip` into the handshake pool, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        // An IPv4 client on a dual-stack socket is the same peer as over IPv4.
        let ip = ip.to_canonical();
        let mut c = lock(&self.counts);
        let held = c.per_ip.get(&ip).copied().unwrap_or(0);
        if held >= self.max_per_ip {
            return Err(Refusal::PerIp(self.max_per_ip));
        }
        if c.handshaking >= self.max_handshakes {
            return Err(Refusal::Handshakes(self.max_handshakes));
        }
        c.per_ip.insert(ip, held + 1);
        c.handshaking += 1;
        Ok(Ticket {
            adm: Arc::clone(self),
            ip,
            handshaking: true,
        })
    }
}

impl Ticket {
    /// The connection authenticated: it leaves the handshake pool (it still counts for its
    /// address).
    pub(crate) fn authenticated(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut c = lock(&self.adm.counts);
            c.handshaking = c.handshaking.saturating_sub(1);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.authenticated();
        let mut c = lock(&self.adm.counts);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn admit_past_per_ip_limit_refused_other_address_admitted() {
        let adm = Admission::new(2, 10);
        let _a1 = adm.admit(A).unwrap();
        let _a2 = adm.admit(A).unwrap();
        assert_eq!(adm.admit(A).err(), Some(Refusal::PerIp(2)));
        assert!(adm.admit(B).is_ok());
    }

    #[test]
    fn admit_ipv4_mapped_counts_as_the_ipv4_address() {
        let adm = Admission::new(1, 10);
        let _a = adm.admit(A).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(adm.admit(mapped).err(), Some(Refusal::PerIp(1)));
    }

    #[test]
    fn admit_full_handshake_pool_refused_until_one_authenticates() {
        let adm = Admission::new(10, 2);
        let mut a = adm.admit(A).unwrap();
        let _b = adm.admit(B).unwrap();
        assert_eq!(adm.admit(B).err(), Some(Refusal::Handshakes(2)));
        a.authenticated();
        let c = adm.admit(B).unwrap();
        // Authenticated connections still count for their address.
        assert_eq!(lock(&adm.counts).per_ip[&A], 1);
        drop((a, c));
        assert!(!lock(&adm.counts).per_ip.contains_key(&A));
        assert_eq!(lock(&adm.counts).handshaking, 1);
    }
}
