//! The guest's outbound network, when an operator opts in: a [passt](https://passt.top)
//! process per VM.
//!
//! ```text
//!  guest virtio-net ── QEMU -netdev stream ── RUN/passt.sock ── passt ── host sockets ── LAN
//!     10.0.2.15/24, gateway 10.0.2.2                  (--no-map-gw: 10.0.2.2 is not the host)
//! ```
//!
//! By default a guest has QEMU user networking with `restrict=on` ([`GuestNetwork::Isolated`]):
//! it opens no connection out and only answers its forwarded ports. [`GuestNetwork::Passt`]
//! lets it out the way a machine on the host's LAN is let out, and no further:
//!
//! - passt turns the guest's connections into ordinary sockets of its own process, which
//!   runs as the session's uid ([`PasstOptions::runas`]) and sandboxes itself (namespaces,
//!   seccomp, no filesystem);
//! - `--no-map-gw`: the guest's gateway address is **not** mapped to the host's loopback
//!   (QEMU user networking without `restrict` maps 10.0.2.2 to 127.0.0.1, so a guest would
//!   reach the server's admin side, other sessions' loopback-only forwarded ports and every
//!   local daemon). What listens on the host's loopback stays out of reach; what listens on
//!   the host's LAN addresses is reached as any LAN machine reaches it.
//! - the addresses the guest already has (10.0.2.15/24 via 10.0.2.2, DNS 10.0.2.3, QEMU user
//!   networking's, which base images are set up for) are kept, so a VM captured with user
//!   networking resumes onto passt without reconfiguring; DNS queries to 10.0.2.3 go to the
//!   host's resolver.
//! - forwarded ports (`hostfwd`) are passt's `-t ADDR/PORT:GUESTPORT`.
//!
//! passt binds its socket after dropping to `runas`, so the socket's folder must be writable
//! by that uid (a session's `run/` is its own). Dropping a [`Passt`] kills it.

use super::launch::{find_binary, HostFwd};
use super::output_tail;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The passt binary, if set; else `passt` on `PATH`.
pub const PASST_ENV: &str = "CLOUDLET_PASST";

/// The guest-side addresses passt gives: QEMU user networking's, so images set up for it work.
const GUEST_ADDR: &str = "10.0.2.15";
const GUEST_PREFIX: &str = "24";
const GATEWAY: &str = "10.0.2.2";
const DNS: &str = "10.0.2.3";

/// How long passt may take to bind its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How the guest's first `virtio-net` reaches networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GuestNetwork {
    /// QEMU user networking with `restrict=on`: no connection out; forwarded ports in.
    #[default]
    Isolated,
    /// A [`Passt`] listening on this socket: outbound like a LAN machine, never the host's
    /// loopback; the forwarded ports are passt's (QEMU gets none).
    Passt(PathBuf),
}

/// Errors starting passt.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// No passt binary.
    #[error(
        "passt not found ({0}); the guest's outbound network needs it: install passt \
         (apt install passt) or set {PASST_ENV}, or run without --guest-outbound"
    )]
    NotFound(String),
    /// Spawning passt failed.
    #[error("Starting passt failed")]
    Spawn(#[source] io::Error),
    /// passt exited, or did not bind its socket in time.
    #[error("passt did not start ({why}); its output: {output}")]
    NotStarted {
        /// What was seen.
        why: String,
        /// The tail of passt's output.
        output: String,
    },
}

/// What a [`Passt`] is started with.
#[derive(Debug, Clone)]
pub struct PasstOptions<'a> {
    /// The socket QEMU connects to; its folder must be writable by `runas`.
    pub socket: &'a Path,
    /// Host ports forwarded to the guest.
    pub hostfwd: &'a [HostFwd],
    /// The uid and gid passt runs as (the session's); `None`: passt's own choice (it will not
    /// stay root: it drops to `nobody`).
    pub runas: Option<(u32, u32)>,
    /// passt's output goes here.
    pub log: &'a Path,
}

/// A running passt; dropping it kills it.
#[derive(Debug)]
pub struct Passt {
    child: Child,
    socket: PathBuf,
}

/// The passt binary: [`PASST_ENV`] if set, else `passt` on `PATH`.
pub fn passt_binary() -> Result<PathBuf, PasstError> {
    find_binary(PASST_ENV, "passt").map_err(PasstError::NotFound)
}

/// passt's arguments for `options` (without the binary).
pub fn passt_args(options: &PasstOptions<'_>) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = [
        "--foreground",
        "--quiet",
        "--no-map-gw",
        "--address",
        GUEST_ADDR,
        "--netmask",
        GUEST_PREFIX,
        "--gateway",
        GATEWAY,
        "--dns-forward",
        DNS,
        "--socket",
    ]
    .iter()
    .map(Into::into)
    .collect();
    a.push(options.socket.into());
    for fwd in options.hostfwd {
        a.push("-t".into());
        a.push(format!("{}/{}:{}", fwd.host_addr, fwd.host_port, fwd.guest_port).into());
    }
    // No UDP forwards: the guest's UDP goes out (DNS), none comes in.
    a.push("-u".into());
    a.push("none".into());
    if let Some((uid, gid)) = options.runas {
        a.push("--runas".into());
        a.push(format!("{uid}:{gid}").into());
    }
    a
}

impl Passt {
    /// Starts passt and waits until its socket is there for QEMU.
    pub fn start(options: &PasstOptions<'_>) -> Result<Passt, PasstError> {
        let binary = passt_binary()?;
        let log = std::fs::File::create(options.log).map_err(PasstError::Spawn)?;
        let err = log.try_clone().map_err(PasstError::Spawn)?;
        let child = Command::new(&binary)
            .args(passt_args(options))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(PasstError::Spawn)?;
        let mut passt = Passt {
            child,
            socket: options.socket.to_path_buf(),
        };
        let tail = |why: String| PasstError::NotStarted {
            why,
            output: output_tail(
                &std::fs::read_to_string(options.log).unwrap_or_default(),
                2000,
            ),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = passt.child.try_wait() {
                return Err(tail(format!("it exited with {status}")));
            }
            let bound = std::fs::metadata(&passt.socket).is_ok_and(|m| m.file_type().is_socket());
            if bound {
                log::info!(
                    "passt pid {} serves the guest's network at {} (outbound on, host loopback unmapped)",
                    passt.child.id(),
                    passt.socket.display()
                );
                return Ok(passt);
            }
            if Instant::now() >= deadline {
                return Err(tail(format!(
                    "no socket at {} after {START_TIMEOUT:?} (is its folder writable by the uid \
                     passt runs as?)",
                    passt.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// passt's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(runas: Option<(u32, u32)>, fwd: &[HostFwd]) -> Vec<String> {
        passt_args(&PasstOptions {
            socket: Path::new("/run/x/passt.sock"),
            hostfwd: fwd,
            runas,
            log: Path::new("/dev/null"),
        })
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    #[test]
    fn passt_args_never_map_the_gateway_to_the_host_and_keep_user_networking_addresses() {
        let a = args(Some((400001, 400001)), &[HostFwd::localhost(8080, 80)]);
        assert!(a.contains(&"--no-map-gw".to_string()), "{a:?}");
        let pair = |k: &str| a.iter().position(|x| x == k).map(|i| a[i + 1].clone());
        assert_eq!(pair("--address").as_deref(), Some("10.0.2.15"));
        assert_eq!(pair("--gateway").as_deref(), Some("10.0.2.2"));
        assert_eq!(pair("--dns-forward").as_deref(), Some("10.0.2.3"));
        assert_eq!(pair("--socket").as_deref(), Some("/run/x/passt.sock"));
        assert_eq!(pair("-t").as_deref(), Some("127.0.0.1/8080:80"));
        assert_eq!(pair("-u").as_deref(), Some("none"));
        assert_eq!(pair("--runas").as_deref(), Some("400001:400001"));
    }

    #[test]
    fn passt_args_without_runas_or_forwards_have_neither() {
        let a = args(None, &[]);
        assert!(!a.contains(&"--runas".to_string()) && !a.contains(&"-t".to_string()));
    }
}
