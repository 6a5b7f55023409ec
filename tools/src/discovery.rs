//! The cloudlet's side of `synth::protocol::discovery`: the announcement `cloudlet server
//! --advertise` makes from the registry, and `--server auto`'s choice among the cloudlets found.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;
use synth::protocol::discovery::{
    self, local_host_label, AdvertisedBase, Advertiser, Announcement, DiscoveryError,
    DiscoveryEvent, MAX_INSTANCE_NAME_LEN,
};
use synth::protocol::Fingerprint;
use synth::registry::{Registry, RegistryError};

/// Errors of announcing a server or choosing one.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// Listing the bases to announce failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// mDNS failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// `--server auto` found nothing usable.
    #[error("--server auto: no cloudlet found within {:.1}s", .0.as_secs_f64())]
    NoneFound(Duration),
}

/// Starts announcing the server listening on `local` (with its registry at `home`) under
/// `name` (default `cloudlet on HOST`). The announcement lists the bases present now; it ends
/// when the result is dropped.
pub fn advertise(
    name: Option<&str>,
    home: &Path,
    local: SocketAddr,
    max_sessions: u32,
    token_required: bool,
    fingerprint: Fingerprint,
) -> Result<Advertiser, FindError> {
    let bases = Registry::open(home)?
        .list()?
        .iter()
        .map(|b| AdvertisedBase::new(&b.record.id, &b.record.name))
        .collect();
    let name = name.map_or_else(
        || {
            let mut n = format!("cloudlet on {}", local_host_label());
            n.truncate(MAX_INSTANCE_NAME_LEN);
            n
        },
        str::to_owned,
    );
    let ann = Announcement {
        max_sessions,
        token_required,
        fingerprint,
        bases,
    };
    let addr = Some(local.ip()).filter(|ip| !ip.is_unspecified());
    Ok(Advertiser::start(&name, addr, local.port(), &ann)?)
}

/// A cloudlet `--server auto` chose.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// Its instance name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The certificate fingerprint it announced (checked in the TLS handshake unless the
    /// known-servers file knows the address).
    pub fingerprint: Option<Fingerprint>,
}

/// `--server auto`: the first cloudlet found within `timeout` that speaks our protocol.
pub fn auto_server(timeout: Duration) -> Result<Chosen, FindError> {
    let mut chosen = None;
    discovery::discover_with(timeout, |e| match e {
        DiscoveryEvent::Found(c) if c.compatible() => match c.socket_addr() {
            Some(addr) => {
                chosen = Some(Chosen {
                    name: c.name.clone(),
                    addr,
                    fingerprint: c.fingerprint,
                });
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    })?;
    chosen.ok_or(FindError::NoneFound(timeout))
}
