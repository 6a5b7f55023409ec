//! The libvirt backend (cargo feature `libvirt`): the same resume as [`super::Vm`], as a
//! transient libvirt domain.
//!
//! ```text
//!   DomainLaunch ──► domain_xml ──► virDomainCreateXML (paused, auto-destroy)
//!                                         │   QEMU waits with -incoming defer
//!                                         ▼
//!   QMP through virDomainQemuMonitorCommand: migrate-set-capabilities x-ignore-shared,
//!   migrate-incoming file:DEVSTATE, query-migrate until completed ──► virDomainResume
//! ```
//!
//! libvirt's own restore (`virDomainRestore`) reads libvirt's save format (a header with the
//! domain XML, then a QEMU stream with guest RAM in it), not the raw device-state stream
//! `cloudlet base` writes with RAM left out (x-ignore-shared); so the incoming migration is
//! driven through libvirt's QMP passthrough, which libvirt records by tainting the domain
//! (`custom-monitor`). The domain is created with auto-destroy: if this process dies, libvirt
//! destroys it when the connection drops. [`LibvirtVm`] destroys it when dropped.
//!
//! With the launch config's `guest-agent` device, libvirt holds the agent channel itself;
//! [`LibvirtVm::agent_command`] goes through it (virDomainQemuAgentCommand).

use super::domain::domain_xml;
use super::launch::{qemu_binary, DomainLaunch, LaunchError};
use super::{file_channels, Timings, VmError, MIGRATION_TIMEOUT, POLL};
use log::{debug, info, warn};
use serde_json::{json, Value};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::Domain;

/// Errors of the libvirt backend.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The domain could not be described.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// A path could not be handed to QEMU.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Creating the run folder or clearing stale files in it failed.
    #[error("Preparing the run directory {path} failed")]
    RunDir {
        /// The folder or file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// libvirtd could not be reached.
    #[error("Connecting to libvirt at {uri} failed (is libvirtd running?)")]
    Connect {
        /// The connection URI.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// libvirt refused or failed to start the domain.
    #[error("Starting the libvirt domain {name} failed")]
    Create {
        /// The domain name.
        name: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A monitor command could not be passed through libvirt.
    #[error("libvirt's QEMU monitor passthrough failed while {step}")]
    Monitor {
        /// What was going on.
        step: &'static str,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// QEMU answered a monitor command with an error, or with something unreadable.
    #[error("QEMU refused the command while {step}: {reply}")]
    Refused {
        /// What was going on.
        step: &'static str,
        /// QEMU's reply.
        reply: String,
    },
    /// The incoming migration failed.
    #[error("Loading the device state failed: {0}")]
    Migration(String),
    /// The incoming migration did not finish in time.
    #[error("Timed out after {0:?} loading the device state")]
    Timeout(Duration),
    /// `resume_from` on a domain started without `-incoming defer`.
    #[error("This domain was not started with incoming: true, so it cannot load device state")]
    NotIncoming,
    /// A guest agent command could not be passed through libvirt (no agent channel, no
    /// agent answering in the guest, or an error reply).
    #[error("The guest agent command {command} through libvirt failed")]
    Agent {
        /// The agent command.
        command: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// libvirt failed to run the guest after loading its state.
    #[error("Resuming the libvirt domain {name} failed")]
    Resume {
        /// The domain name.
        name: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// libvirt failed to destroy the domain.
    #[error("Destroying the libvirt domain {name} failed")]
    Destroy {
        /// The domain name.
        name: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
}

/// A transient libvirt domain running a VM; destroyed when dropped.
pub struct LibvirtVm {
    // Declared first: destroyed before the connection closes.
    domain: Option<Domain>,
    /// Held so the auto-destroy domain lives as long as this value.
    _conn: Connect,
    name: String,
    launch: DomainLaunch,
    started: Instant,
    timings: Timings,
}

impl std::fmt::Debug for LibvirtVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtVm")
            .field("name", &self.name)
            .field("run_dir", &self.launch.run_dir)
            .finish_non_exhaustive()
    }
}

impl LibvirtVm {
    /// Connects to libvirt at `uri` and starts the domain `name` for `launch` (paused when
    /// it waits for device state). The QEMU binary is the one [`qemu_binary`] picks, as on
    /// the direct path.
    pub fn start(uri: &str, name: &str, launch: DomainLaunch) -> Result<LibvirtVm, LibvirtError> {
        let emulator = qemu_binary()?;
        let xml = domain_xml(name, &launch, &emulator)?;
        debug!("libvirt domain XML:\n{xml}");
        let run_dir = &launch.run_dir;
        std::fs::create_dir_all(run_dir).map_err(|source| LibvirtError::RunDir {
            path: run_dir.clone(),
            source,
        })?;
        let agent_socket = launch.agent.as_ref().map(|a| &a.socket);
        for stale in [&launch.serial_socket, &launch.serial_log]
            .into_iter()
            .chain(agent_socket)
        {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(LibvirtError::RunDir {
                        path: stale.clone(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_owned(),
            source,
        })?;
        let started = Instant::now();
        let mut flags = virt::sys::VIR_DOMAIN_START_AUTODESTROY;
        if launch.incoming {
            flags |= virt::sys::VIR_DOMAIN_START_PAUSED;
        }
        let domain =
            conn.create_domain_xml(&xml, flags)
                .map_err(|source| LibvirtError::Create {
                    name: name.to_owned(),
                    source,
                })?;
        let created = started.elapsed();
        info!("Started libvirt domain {name} at {uri} in {created:?}");
        Ok(LibvirtVm {
            domain: Some(domain),
            _conn: conn,
            name: name.to_owned(),
            launch,
            started,
            timings: Timings {
                qmp_connected: Some(created),
                ..Timings::default()
            },
        })
    }

    /// The domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything the guest wrote to its serial console.
    pub fn serial_log(&self) -> &Path {
        &self.launch.serial_log
    }

    /// Step durations so far; `qmp_connected` is the time libvirt took to start the domain.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Loads device state from `path` into a domain started with `incoming: true` and runs
    /// it: x-ignore-shared on, `migrate-incoming`, wait for completion, then libvirt resumes.
    pub fn resume_from(&mut self, path: &Path) -> Result<Duration, LibvirtError> {
        if !self.launch.incoming {
            return Err(LibvirtError::NotIncoming);
        }
        let channels = file_channels(path)?;
        let t = Instant::now();
        info!("Resuming domain {} from {}", self.name, path.display());
        self.qmp(
            "enabling x-ignore-shared",
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
        )?;
        self.qmp(
            "starting the incoming migration",
            "migrate-incoming",
            channels,
        )?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let r = self.qmp("loading the device state", "query-migrate", json!({}))?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU gave no reason");
                    return Err(LibvirtError::Migration(why.to_owned()));
                }
                _ if Instant::now() >= deadline => {
                    return Err(LibvirtError::Timeout(MIGRATION_TIMEOUT));
                }
                _ => std::thread::sleep(POLL),
            }
        }
        let domain = self.domain()?;
        domain.resume().map_err(|source| LibvirtError::Resume {
            name: self.name.clone(),
            source,
        })?;
        let took = t.elapsed();
        self.timings.resume = Some(took);
        self.timings.spawn_to_running = Some(self.started.elapsed());
        info!("Domain {} resumed in {took:?}", self.name);
        Ok(took)
    }

    /// Runs guest agent command `command` with `arguments` (`Value::Null` for none) through
    /// libvirt, waiting at most `timeout` (whole seconds, at least one); its `return` value.
    pub fn agent_command(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, LibvirtError> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let seconds = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        let reply = self
            .domain()?
            .qemu_agent_command(&msg.to_string(), seconds, 0)
            .map_err(|source| LibvirtError::Agent {
                command: command.to_owned(),
                source,
            })?;
        debug!("Guest agent via libvirt {msg} -> {reply}");
        let refused = || LibvirtError::Refused {
            step: "running a guest agent command",
            reply: super::qmp::shorten(&reply),
        };
        let v: Value = serde_json::from_str(&reply).map_err(|_| refused())?;
        v.get("return").cloned().ok_or_else(refused)
    }

    /// Destroys the domain (QEMU is killed; libvirt forgets the transient domain).
    pub fn destroy(mut self) -> Result<(), LibvirtError> {
        self.destroy_domain()
    }

    fn destroy_domain(&mut self) -> Result<(), LibvirtError> {
        let Some(domain) = self.domain.take() else {
            return Ok(());
        };
        if domain.is_active().unwrap_or(true) {
            domain.destroy().map_err(|source| LibvirtError::Destroy {
                name: self.name.clone(),
                source,
            })?;
            info!("Destroyed libvirt domain {}", self.name);
        }
        Ok(())
    }

    fn domain(&self) -> Result<&Domain, LibvirtError> {
        self.domain.as_ref().ok_or(LibvirtError::Refused {
            step: "using the domain",
            reply: "the domain was destroyed".into(),
        })
    }

    /// Runs one QMP command through libvirt; the `return` value of a successful reply.
    fn qmp(
        &self,
        step: &'static str,
        command: &str,
        arguments: Value,
    ) -> Result<Value, LibvirtError> {
        let cmd = json!({ "execute": command, "arguments": arguments }).to_string();
        let reply = self
            .domain()?
            .qemu_monitor_command(&cmd, 0)
            .map_err(|source| LibvirtError::Monitor { step, source })?;
        debug!("QMP via libvirt {cmd} -> {reply}");
        let refused = || LibvirtError::Refused {
            step,
            reply: reply.clone(),
        };
        let v: Value = serde_json::from_str(&reply).map_err(|_| refused())?;
        v.get("return").cloned().ok_or_else(refused)
    }
}

impl Drop for LibvirtVm {
    fn drop(&mut self) {
        if let Err(e) = self.destroy_domain() {
            warn!("{e}");
        }
    }
}
