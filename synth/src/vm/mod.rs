//! Driving stock QEMU: launch a base or custom VM, capture it, resume it.
//!
//! Three pieces, used in this order:
//!
//! ```text
//!   LaunchConfig + VmPaths + LaunchOptions ──► launch::QemuArgs (validated argv, socket paths)
//!                                                      │
//!                                                      ▼
//!                         Vm::spawn ──► QEMU process ◄── qmp::Qmp (QMP socket)
//!                                            │
//!              serial socket + serial.log ◄──┴──► qga.sock (with the `guest-agent` device)
//!                       │                              │
//!     serial::SerialPort ─► shell::Shell       qga::Agent (guest-exec, guest-file-*)
//!     (framed commands for any POSIX shell)
//! ```
//!
//! * **capture** (`cloudlet base`): [`MemoryMode::Capture`] maps guest RAM *shared* from the
//!   memory image, so after [`Vm::save_device_state`] (x-ignore-shared, `stop`, `migrate` to a
//!   file) the image holds RAM page for page and the device-state file only the devices.
//! * **resume** (`cloudlet synthesis`): the same config with `incoming: true` and
//!   [`MemoryMode::Resume`] maps the image read-only and private (pages load on first touch,
//!   guest writes stay in QEMU), then [`Vm::resume_from`] loads the device state and `cont`s.
//!   Resuming with [`MemoryMode::Capture`] on a writable copy instead keeps guest RAM in that
//!   copy, so the resumed VM can be captured again (`cloudlet overlay`).
//!
//! Commands reach the guest two ways: [`Vm::run_serial_command`] types them at the shell on
//! the serial console ([`shell`]: any POSIX shell, framed so its echo and prompt do not
//! matter), [`Vm::run_agent_command`] and [`Vm::copy_to_guest`] go through the QEMU guest
//! agent ([`qga`]) when the guest runs one; [`Vm::run_command`] picks either by
//! [`CommandChannel`].
//!
//! The libvirt backend (`libvirt` feature) resumes the same way through a libvirt domain:
//! [`domain`] writes its XML from the launch config, `libvirt::LibvirtVm` drives it.
//!
//! A [`Vm`] owns its QEMU process: dropping it kills and reaps QEMU. When QEMU exits on its own
//! while a step waits for it, the error carries the tail of QEMU's output
//! ([`VmError::Exited`]).

pub mod domain;
pub mod launch;
pub mod launcher;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod passt;
pub mod qga;
pub mod qmp;
pub mod serial;
pub mod shell;

pub use launch::{
    escape_option_value, qemu_binary, Accel, BadHostFwd, DomainAgent, DomainDisk, DomainLaunch,
    HostFwd, LaunchError, LaunchOptions, MemoryMode, QemuArgs, VmPaths,
};
pub use passt::{GuestNetwork, Passt, PasstError, PasstOptions};
pub use qga::{Agent, AgentError, ExecOutput, AGENT_CHANNEL};
pub use qmp::{Qmp, QmpError};
pub use serial::{SerialPort, READY_MARKER};
pub use shell::{output_tail, CommandOutput, Received, Shell, ShellError, ShellOptions, Transport};

use log::{debug, info, warn};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long QEMU gets to create its QMP and serial sockets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a QMP command may take to answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// libvirt connection URI used when none is given: the system QEMU driver.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
/// How long a migration (save or resume of device state) may take.
pub(crate) const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// How long QEMU gets to exit after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polls of the serial log or a migration.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// How long a lost QMP connection waits for QEMU to exit, to report why.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Lines of QEMU output quoted when it exits early.
const TAIL_LINES: usize = 20;

/// Errors of running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The command line could not be built or the QEMU binary was not found.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// Creating the run folder or clearing stale files in it failed.
    #[error("Preparing the run directory {path} failed")]
    RunDir {
        /// The run folder or file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Starting the QEMU process failed.
    #[error("Starting {binary} failed")]
    Spawn {
        /// The QEMU binary.
        binary: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// QEMU exited while a step was waiting for it.
    #[error("QEMU exited ({status}) while {step}; the end of {log}:\n{tail}")]
    Exited {
        /// What was going on.
        step: String,
        /// QEMU's exit status.
        status: ExitStatus,
        /// QEMU's log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A QMP step failed while QEMU kept running.
    #[error("QMP failed while {step}")]
    Qmp {
        /// What was going on.
        step: &'static str,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// Connecting to the serial console socket failed.
    #[error("Connecting to the serial console {path} failed")]
    SerialConnect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing to the serial console failed.
    #[error("Writing to the serial console failed")]
    SerialWrite(#[source] io::Error),
    /// Reading the serial log failed.
    #[error("Reading the serial log {path} failed")]
    SerialLog {
        /// The log.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A serial line would have been split by the guest.
    #[error("Serial command contains a line break: {0:?}")]
    MultiLineCommand(String),
    /// A command over the serial console failed (timeout, no shell, console closed).
    #[error(transparent)]
    Shell(#[from] ShellError),
    /// Talking to the guest agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The guest agent was asked for, but the launch config has no `guest-agent` device.
    #[error("This VM has no guest agent channel: its launch config lacks the guest-agent device")]
    NoAgentChannel,
    /// Something did not happen in time.
    #[error("Timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// `resume_from` on a VM started without `-incoming defer`.
    #[error("This VM was not started with incoming: true, so it cannot load device state")]
    NotIncoming,
    /// A device-state path cannot be sent in QMP's JSON.
    #[error("Device state path {0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// Waiting for or killing the QEMU process failed.
    #[error("Waiting for QEMU (pid {pid}) failed")]
    Wait {
        /// QEMU's pid.
        pid: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How [`Vm::run_command`] reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandChannel {
    /// Typed at the shell on the serial console ([`Vm::run_serial_command_streaming`]).
    Serial,
    /// Run with `/bin/sh -c` by the guest agent ([`Vm::run_agent_command`]).
    Agent,
}

/// Durations of a VM's lifecycle steps, as far as they happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Spawn to QMP negotiated.
    pub qmp_connected: Option<Duration>,
    /// Spawn to the ready marker (set by [`Vm::wait_ready_marker`]).
    pub ready: Option<Duration>,
    /// Spawn to the guest agent's first answer (set by [`Vm::wait_agent`]).
    pub agent_ready: Option<Duration>,
    /// Length of the last [`Vm::save_device_state`] (x-ignore-shared to migration completed).
    pub save: Option<Duration>,
    /// Length of [`Vm::resume_from`] (x-ignore-shared to `cont`).
    pub resume: Option<Duration>,
    /// Spawn to the end of [`Vm::resume_from`].
    pub spawn_to_running: Option<Duration>,
}

/// The QEMU child process: killed and reaped when dropped.
#[derive(Debug)]
struct Process {
    child: Child,
    status: Option<ExitStatus>,
}

impl Process {
    /// The exit status if QEMU has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(s) => self.status = s,
                Err(e) => warn!("Polling QEMU pid {} failed: {e}", self.child.id()),
            }
        }
        self.status
    }

    fn kill(&mut self) -> Result<ExitStatus, VmError> {
        if let Some(s) = self.exited() {
            return Ok(s);
        }
        let pid = self.child.id();
        // Killing fails only if it already exited, which wait() below sorts out.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|source| VmError::Wait { pid, source })?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_none() {
            info!("Killing QEMU pid {}", self.child.id());
            if let Err(e) = self.kill() {
                warn!("{e}");
            }
        }
    }
}

/// A running QEMU with its QMP session and serial console.
#[derive(Debug)]
pub struct Vm {
    // Declared first so the sockets close before the process is killed.
    qmp: Qmp,
    // Boxed: a `Vm` is moved around by value (and sits in enums next to smaller types).
    shell: Box<Shell<SerialPort>>,
    agent: Option<Box<Agent>>,
    process: Process,
    args: QemuArgs,
    started: Instant,
    timings: Timings,
}

impl Vm {
    /// Starts QEMU ([`qemu_binary`]) with `args`, connects to QMP and the serial console.
    ///
    /// QEMU's stdout and stderr go to [`QemuArgs::qemu_log`]; stale sockets and logs from an
    /// earlier run in the same folder are removed first.
    pub fn spawn(args: &QemuArgs) -> Result<Vm, VmError> {
        let binary = qemu_binary()?;
        Vm::spawn_with(&binary, args)
    }

    /// Like [`Vm::spawn`] with an explicit QEMU binary.
    pub fn spawn_with(binary: &Path, args: &QemuArgs) -> Result<Vm, VmError> {
        let mut cmd = Command::new(binary);
        cmd.args(args.args());
        Vm::spawn_command(cmd, binary, args)
    }

    /// Like [`Vm::spawn`], through cloudlet's QEMU `launcher`, which first joins the cgroups
    /// whose `cgroup.procs` files are `cgroups` (so QEMU is confined from its first
    /// instruction), installs the launcher's seccomp filter and drops to `user` (uid, gid)
    /// when given, enters `jail` when given (a mount namespace holding only its paths and
    /// the system part, see [`launcher`]; the launcher must run as root), then becomes QEMU
    /// (same pid).
    pub fn spawn_via(
        launcher: &launcher::Launcher,
        args: &QemuArgs,
        cgroups: &[PathBuf],
        user: Option<(u32, u32)>,
        jail: Option<&launcher::Jail>,
    ) -> Result<Vm, VmError> {
        let binary = qemu_binary()?;
        let cmd = launcher.command(&binary, args.args(), cgroups, user, jail);
        Vm::spawn_command(cmd, &launcher.program, args)
    }

    /// Starts `cmd` (QEMU with `args` already on its command line, or a launcher that becomes
    /// it), `binary` naming it in errors.
    fn spawn_command(mut cmd: Command, binary: &Path, args: &QemuArgs) -> Result<Vm, VmError> {
        let run_dir = args.run_dir();
        std::fs::create_dir_all(run_dir).map_err(|source| VmError::RunDir {
            path: run_dir.to_owned(),
            source,
        })?;
        let stale_files = [args.qmp_socket(), args.serial_socket(), args.serial_log()]
            .into_iter()
            .chain(args.agent_socket());
        for stale in stale_files {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(VmError::RunDir {
                        path: stale.to_owned(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        let log_err = |source| VmError::RunDir {
            path: args.qemu_log().to_owned(),
            source,
        };
        let stdout = File::create(args.qemu_log()).map_err(log_err)?;
        let stderr = stdout.try_clone().map_err(log_err)?;

        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| VmError::Spawn {
                binary: binary.to_owned(),
                source,
            })?;
        let mut process = Process {
            child,
            status: None,
        };
        info!(
            "Started QEMU pid {} in {}{}",
            process.child.id(),
            run_dir.display(),
            if args.incoming() {
                " (waiting for device state)"
            } else {
                ""
            }
        );

        let deadline = started + CONNECT_TIMEOUT;
        let connected = Qmp::connect_with(args.qmp_socket(), deadline, QMP_TIMEOUT, || {
            process.exited().is_none()
        });
        let qmp = match connected {
            Ok(q) => q,
            Err(source) => {
                let grace = grace_for(&source);
                let exited = exit_error_within(&mut process, args, "starting up", grace);
                return Err(exited.unwrap_or(VmError::Qmp {
                    step: "connecting to QMP",
                    source,
                }));
            }
        };
        let qmp_connected = started.elapsed();
        debug!("QMP ready after {qmp_connected:?}");

        let serial = connect_serial(&mut process, args, deadline)?;
        // The port reads the socket all the time: the serial log records only what the
        // socket client accepts, and the shell needs what the guest printed.
        let port = SerialPort::new(serial).map_err(|source| VmError::SerialConnect {
            path: args.serial_socket().to_owned(),
            source,
        })?;

        Ok(Vm {
            qmp,
            shell: Box::new(Shell::new(port)),
            agent: None,
            process,
            args: args.clone(),
            started,
            timings: Timings {
                qmp_connected: Some(qmp_connected),
                ..Timings::default()
            },
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// The command line and file paths this VM was started with.
    pub fn args(&self) -> &QemuArgs {
        &self.args
    }

    /// Step durations so far.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The QMP session, for commands without a helper here.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Waits until the serial log contains `marker` (e.g. [`READY_MARKER`]); returns the time
    /// since spawn.
    pub fn wait_ready_marker(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<Duration, VmError> {
        let deadline = Instant::now() + timeout;
        let step = || format!("waiting for {marker:?} on the serial console");
        loop {
            let log = self.read_serial_log(0)?;
            if serial::contains(&log, marker.as_bytes()) {
                let t = self.started.elapsed();
                self.timings.ready = Some(t);
                info!("Guest printed {marker:?} {t:?} after spawn");
                return Ok(t);
            }
            self.poll_wait(deadline, timeout, step)?;
        }
    }

    /// Types `line` and a newline on the serial console, unframed. The next serial command
    /// syncs with the shell again first.
    pub fn serial_send(&mut self, line: &str) -> Result<(), VmError> {
        if line.contains(['\n', '\r']) {
            return Err(VmError::MultiLineCommand(line.to_owned()));
        }
        debug!("Serial > {line}");
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.shell
            .transport_mut()
            .send(&bytes)
            .map_err(VmError::SerialWrite)
    }

    /// The shell on the serial console, e.g. to change its [`ShellOptions`].
    pub fn serial_shell(&mut self) -> &mut Shell<SerialPort> {
        &mut self.shell
    }

    /// Runs `cmd` at the guest's shell on the serial console and waits at most `timeout` for
    /// it; see [`Vm::run_serial_command_streaming`].
    pub fn run_serial_command(
        &mut self,
        cmd: &str,
        timeout: Duration,
    ) -> Result<CommandOutput, VmError> {
        self.run_serial_command_streaming(cmd, timeout, &mut |_| {})
    }

    /// Runs `cmd` at the guest's shell on the serial console (any POSIX shell: bash, dash,
    /// busybox `sh`; in a subshell, stdin from `/dev/null`, see [`shell`]) and waits at most
    /// `timeout` for it, handing its output to `on_output` as it arrives. The first command
    /// first waits (up to [`ShellOptions::sync_timeout`]) for the shell to answer.
    ///
    /// A non-zero exit status is `Ok` (check [`CommandOutput::rc`]). A command still running
    /// at `timeout` is interrupted with Ctrl-C and reported as [`ShellError::Timeout`], with
    /// its output so far; the shell is usable again afterwards if it answers.
    pub fn run_serial_command_streaming(
        &mut self,
        cmd: &str,
        timeout: Duration,
        on_output: &mut dyn FnMut(&[u8]),
    ) -> Result<CommandOutput, VmError> {
        match self.shell.run(cmd, timeout, on_output) {
            Ok(out) => Ok(out),
            Err(e @ ShellError::Closed { .. }) => {
                let step = format!("running {cmd:?} on the serial console");
                Err(
                    exit_error_within(&mut self.process, &self.args, &step, EXIT_GRACE)
                        .unwrap_or(VmError::Shell(e)),
                )
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The guest agent client, connected and in sync (both tried until `timeout`: an agent
    /// still starting in the guest answers a later attempt).
    pub fn agent(&mut self, timeout: Duration) -> Result<&mut Agent, VmError> {
        let deadline = Instant::now() + timeout;
        if self.agent.is_none() {
            let path = self.args.agent_socket().ok_or(VmError::NoAgentChannel)?;
            let process = &mut self.process;
            let agent = Agent::connect_with(path, timeout, &mut || process.exited().is_none());
            let agent = self.agent_step("connecting to the guest agent", agent)?;
            self.agent = Some(Box::new(agent));
        }
        let synced = match self.agent.as_mut() {
            Some(agent) if !agent.is_synced() => {
                agent.sync(deadline.saturating_duration_since(Instant::now()))
            }
            _ => Ok(()),
        };
        self.agent_step("waiting for the guest agent", synced)?;
        self.agent.as_deref_mut().ok_or(VmError::NoAgentChannel)
    }

    /// Waits until the guest agent answers `guest-ping`, at most `timeout`; returns the time
    /// since spawn.
    pub fn wait_agent(&mut self, timeout: Duration) -> Result<Duration, VmError> {
        let deadline = Instant::now() + timeout;
        let pinged = self
            .agent(timeout)?
            .ping(deadline.saturating_duration_since(Instant::now()));
        self.agent_step("pinging the guest agent", pinged)?;
        let t = self.started.elapsed();
        self.timings.agent_ready = Some(t);
        info!("Guest agent answered {t:?} after spawn");
        Ok(t)
    }

    /// Runs `cmd` with `/bin/sh -c` through the guest agent and waits at most `timeout` for
    /// it (stdin empty; stdout and stderr apart, returned when it exits). A non-zero exit is
    /// `Ok`; a timeout kills its process tree ([`AgentError::ExecTimeout`]).
    pub fn run_agent_command(
        &mut self,
        cmd: &str,
        timeout: Duration,
    ) -> Result<ExecOutput, VmError> {
        let deadline = Instant::now() + timeout;
        let out = self
            .agent(timeout)?
            .exec_shell(cmd, deadline.saturating_duration_since(Instant::now()));
        self.agent_step("running a command through the guest agent", out)
    }

    /// Copies the local file `local` to `guest_path` (absolute) in the guest through the
    /// guest agent, with permissions `mode` (e.g. `0o644`), within `timeout`; returns the
    /// bytes copied. The file appears under its name only once complete.
    pub fn copy_to_guest(
        &mut self,
        local: &Path,
        guest_path: &str,
        mode: u32,
        timeout: Duration,
    ) -> Result<u64, VmError> {
        let deadline = Instant::now() + timeout;
        let copied = self.agent(timeout)?.copy_file(
            local,
            guest_path,
            mode,
            deadline.saturating_duration_since(Instant::now()),
        );
        self.agent_step("copying a file through the guest agent", copied)
    }

    /// Runs `cmd` in the guest over `channel`, waiting at most `timeout`. Over the serial
    /// console the output streams to `on_output` as it arrives; over the agent it comes when
    /// the command exits (stdout, then stderr), and [`CommandOutput::output`] holds both.
    pub fn run_command(
        &mut self,
        channel: CommandChannel,
        cmd: &str,
        timeout: Duration,
        on_output: &mut dyn FnMut(&[u8]),
    ) -> Result<CommandOutput, VmError> {
        match channel {
            CommandChannel::Serial => self.run_serial_command_streaming(cmd, timeout, on_output),
            CommandChannel::Agent => {
                let out = self.run_agent_command(cmd, timeout)?;
                on_output(&out.stdout);
                on_output(&out.stderr);
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                Ok(CommandOutput {
                    rc: out.rc(),
                    output: text,
                })
            }
        }
    }

    /// Captures the device state into `path`: turns on x-ignore-shared (shared guest RAM stays
    /// out of the stream), stops the guest and migrates to the file. The guest stays paused;
    /// [`Vm::quit`] it afterwards. With [`MemoryMode::Capture`] the memory image then holds
    /// guest RAM.
    pub fn save_device_state(&mut self, path: &Path) -> Result<Duration, VmError> {
        let channels = file_channels(path)?;
        let t = Instant::now();
        info!("Saving device state to {}", path.display());
        let r = self.qmp.migrate_set_capability("x-ignore-shared", true);
        self.qmp_step("enabling x-ignore-shared", r)?;
        let r = self.qmp.stop();
        self.qmp_step("stopping the guest", r)?;
        let r = self.qmp.execute("migrate", channels);
        self.qmp_step("starting the migration to a file", r)?;
        let r = self.qmp.wait_migration(MIGRATION_TIMEOUT);
        self.qmp_step("saving the device state", r)?;
        let took = t.elapsed();
        self.timings.save = Some(took);
        info!("Device state saved in {took:?}");
        Ok(took)
    }

    /// Loads device state from `path` into a VM started with `incoming: true` and runs it.
    pub fn resume_from(&mut self, path: &Path) -> Result<Duration, VmError> {
        if !self.args.incoming() {
            return Err(VmError::NotIncoming);
        }
        let channels = file_channels(path)?;
        let t = Instant::now();
        info!("Resuming from device state {}", path.display());
        let r = self.qmp.migrate_set_capability("x-ignore-shared", true);
        self.qmp_step("enabling x-ignore-shared", r)?;
        let r = self.qmp.execute("migrate-incoming", channels);
        self.qmp_step("starting the incoming migration", r)?;
        let r = self.qmp.wait_migration(MIGRATION_TIMEOUT);
        self.qmp_step("loading the device state", r)?;
        // The source was stopped when captured, so the guest comes up paused.
        let r = self.qmp.query_status();
        if self.qmp_step("querying the run state", r)? != "running" {
            let r = self.qmp.cont();
            self.qmp_step("continuing the guest", r)?;
        }
        let took = t.elapsed();
        self.timings.resume = Some(took);
        self.timings.spawn_to_running = Some(self.started.elapsed());
        info!("Guest resumed in {took:?}");
        Ok(took)
    }

    /// Asks QEMU to quit and reaps it (killing it if it does not exit in time).
    pub fn quit(mut self) -> Result<ExitStatus, VmError> {
        if self.process.exited().is_none() {
            let r = self.qmp.quit();
            self.qmp_step("quitting", r)?;
        }
        let deadline = Instant::now() + QUIT_TIMEOUT;
        while self.process.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let status = match self.process.exited() {
            Some(s) => s,
            None => {
                warn!("QEMU pid {} ignored quit; killing it", self.pid());
                self.process.kill()?
            }
        };
        info!("QEMU pid {} exited ({status})", self.pid());
        Ok(status)
    }

    /// Kills QEMU without asking and reaps it.
    pub fn kill(mut self) -> Result<ExitStatus, VmError> {
        self.process.kill()
    }

    fn read_serial_log(&self, offset: u64) -> Result<Vec<u8>, VmError> {
        let path = self.args.serial_log();
        serial::read_from(path, offset).map_err(|source| VmError::SerialLog {
            path: path.to_owned(),
            source,
        })
    }

    /// Between polls: fails if QEMU exited or the deadline passed, else sleeps a little.
    fn poll_wait(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: impl Fn() -> String,
    ) -> Result<(), VmError> {
        if let Some(e) = exit_error(&mut self.process, &self.args, &what()) {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(VmError::Timeout {
                what: what(),
                timeout,
            });
        }
        std::thread::sleep(POLL);
        Ok(())
    }

    /// Maps a closed agent socket to [`VmError::Exited`] when QEMU is gone, else passes the
    /// agent's error on.
    fn agent_step<T>(&mut self, step: &str, r: Result<T, AgentError>) -> Result<T, VmError> {
        r.map_err(|e| {
            let grace = match e {
                AgentError::Closed { .. } | AgentError::Io { .. } | AgentError::Connect { .. } => {
                    EXIT_GRACE
                }
                _ => Duration::ZERO,
            };
            exit_error_within(&mut self.process, &self.args, step, grace)
                .unwrap_or(VmError::Agent(e))
        })
    }

    /// Maps a QMP failure to [`VmError::Exited`] when QEMU is gone, else to [`VmError::Qmp`].
    fn qmp_step<T>(&mut self, step: &'static str, r: Result<T, QmpError>) -> Result<T, VmError> {
        r.map_err(|source| {
            let grace = grace_for(&source);
            exit_error_within(&mut self.process, &self.args, step, grace)
                .unwrap_or(VmError::Qmp { step, source })
        })
    }
}

/// Ports [`free_tcp_port`] handed out lately, newest last.
static RECENT_PORTS: std::sync::Mutex<std::collections::VecDeque<u16>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// How many handed-out ports are never handed out again (their takers may still be starting).
const RECENT_PORTS_KEPT: usize = 4096;

/// Lowest port [`free_tcp_port`] picks from.
const PICK_PORTS_FROM: u16 = 10_000;

/// A free TCP port on 127.0.0.1 for a listener to come (bound and released).
///
/// The port is picked at random *below* the kernel's ephemeral range: a port from bind(0)
/// lies inside it, where any outgoing connection (of this process or another) may take the
/// same number before the listener binds it; QEMU then fails to set up its `hostfwd`. A port
/// handed out lately is not handed out again. Falls back to bind(0) if nothing is free below.
pub fn free_tcp_port() -> io::Result<u16> {
    use std::hash::BuildHasher;
    let span = ephemeral_port_low().saturating_sub(PICK_PORTS_FROM);
    let mut recent = RECENT_PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // 64 random tries below the range, if it leaves room; bind(0) otherwise.
    let tries = if span >= 1024 { 64 } else { 0 };
    let below = (0..tries)
        .map(|_| {
            let r = std::collections::hash_map::RandomState::new().hash_one(());
            PICK_PORTS_FROM + u16::try_from(r % u64::from(span)).unwrap_or(0)
        })
        .find(|&p| !recent.contains(&p) && TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
    let port = match below {
        Some(p) => p,
        None => TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port(),
    };
    if recent.len() >= RECENT_PORTS_KEPT {
        recent.pop_front();
    }
    recent.push_back(port);
    Ok(port)
}

/// The lowest port of the kernel's ephemeral range, where bind(0) and outgoing connections
/// take theirs.
fn ephemeral_port_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The QMP `channels` argument for a `file:` migration to or from `path`.
pub(crate) fn file_channels(path: &Path) -> Result<Value, VmError> {
    let abs = std::path::absolute(path)
        .map_err(|e| VmError::Launch(LaunchError::Absolute(path.to_owned(), e)))?;
    let name = abs
        .to_str()
        .ok_or_else(|| VmError::NonUtf8Path(abs.clone()))?;
    Ok(json!({ "channels": [{
        "channel-type": "main",
        "addr": { "transport": "file", "filename": name, "offset": 0 }
    }]}))
}

/// How long to wait for QEMU to exit after a QMP failure: a lost connection usually means
/// QEMU is on its way out (and its message is worth waiting for); an error reply does not.
fn grace_for(e: &QmpError) -> Duration {
    match e {
        QmpError::Closed { .. } | QmpError::Io(_) | QmpError::Connect { .. } => EXIT_GRACE,
        _ => Duration::ZERO,
    }
}

/// [`VmError::Exited`] if QEMU exits within `grace`.
fn exit_error_within(
    process: &mut Process,
    args: &QemuArgs,
    step: &str,
    grace: Duration,
) -> Option<VmError> {
    let deadline = Instant::now() + grace;
    while process.exited().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    exit_error(process, args, step)
}

/// [`VmError::Exited`] if QEMU has exited.
fn exit_error(process: &mut Process, args: &QemuArgs, step: &str) -> Option<VmError> {
    let status = process.exited()?;
    let log = args.qemu_log().to_owned();
    let tail = log_tail(&log);
    warn!("QEMU exited ({status}) while {step}");
    Some(VmError::Exited {
        step: step.to_owned(),
        status,
        log,
        tail,
    })
}

/// The last [`TAIL_LINES`] lines of a log, or a note why there are none.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    match File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        Ok(_) if text.trim().is_empty() => "(QEMU printed nothing)".into(),
        Ok(_) => {
            let lines: Vec<&str> = text.trim_end().lines().collect();
            lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

fn connect_serial(
    process: &mut Process,
    args: &QemuArgs,
    deadline: Instant,
) -> Result<UnixStream, VmError> {
    let path = args.serial_socket();
    connect_unix(path, deadline, &mut || process.exited().is_none()).map_err(|source| {
        exit_error(process, args, "connecting to the serial console").unwrap_or(
            VmError::SerialConnect {
                path: path.to_owned(),
                source,
            },
        )
    })
}

/// Connects to the Unix socket at `path`, retrying until `deadline` (QEMU creates its
/// sockets a little after it starts) or until `keep_trying` says no; the last error.
pub(crate) fn connect_unix(
    path: &Path,
    deadline: Instant,
    keep_trying: &mut dyn FnMut() -> bool,
) -> io::Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline || !keep_trying() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_tcp_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let low = ephemeral_port_low();
        let ports: Vec<u16> = (0..200).map(|_| free_tcp_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        if low >= PICK_PORTS_FROM + 1024 {
            assert!(ports.iter().all(|&p| (PICK_PORTS_FROM..low).contains(&p)));
        }
        for &p in ports.iter().take(20) {
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }
}
