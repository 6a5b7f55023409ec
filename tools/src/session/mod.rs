//! A session: one VM on this machine = a private run folder + a cloudletfs mount of base +
//! overlay + a QEMU (or libvirt domain) resumed over that mount + its forwarded ports.
//!
//! ```text
//!  RunDir::new (0700, random name under $HOME/tmp)
//!     └─► mount (cloudletfs: disk/image, memory/image, device-state; state + cache in the run dir)
//!            └─► [eager: wait until every chunk is in]
//!                   └─► QEMU: memory/image mapped private read-only, disk/image, device state
//!                          loaded with x-ignore-shared, cont  ─► RunningVm
//!  RunningVm::stop (or drop): QEMU stopped ─► unmounted ─► run folder removed
//! ```
//!
//! QEMU runs under a seccomp filter (`-sandbox`, [`synth::vm::QemuArgs`]) and, where the host
//! has cgroups, in a cgroup of its own bounding its memory and tasks ([`cgroup`]); it is
//! started through cloudlet's launcher ([`launch`]), which joins that cgroup before QEMU runs
//! and keeps QEMU from asking for huge pages on guest RAM (so a page fault on `memory/image`
//! reads a few KiB, not 2 MiB).
//!
//! [`resume`] is that sequence ([`resume_vm`]); [`synthesis`] runs one session until a signal
//! and reports its timeline (`cloudlet synthesis`); [`wait`] holds the bounded, interruptible
//! waits every flow uses (a serial marker, the user, an HTTP 200).

pub mod cgroup;
pub mod launch;
pub mod resume;
pub mod run_dir;
pub mod synthesis;
pub mod user;
pub mod wait;

pub use resume::{
    resume_vm, resume_vm_with, Backend, BackendKind, LibvirtNotBuilt, LimitArgs, ResumeOptions,
    ResumedVm, RunningVm,
};
pub use run_dir::RunDir;
pub use synthesis::{synthesis, SynthesisArgs, TimelineEvent};
pub use wait::{wait_agent, wait_http_ok, wait_marker, FirstAnswerProbe, WaitError};

use std::path::PathBuf;

/// Errors of running a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Opening the registry or finding the base failed.
    #[error(transparent)]
    Registry(#[from] synth::registry::RegistryError),
    /// Creating the session's run folder failed.
    #[error("Creating a run folder under {path} failed")]
    RunDir {
        /// The folder it was to be created in.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Mounting base + overlay failed.
    #[error("Mounting cloudletfs failed")]
    Mount(#[source] cloudletfs::MountError),
    /// Unmounting failed.
    #[error("Unmounting cloudletfs failed")]
    Unmount(#[source] cloudletfs::MountError),
    /// cloudletfs stopped serving while the VM ran.
    #[error("cloudletfs went away while the VM ran")]
    MountGone,
    /// The QEMU command line could not be built.
    #[error(transparent)]
    Launch(#[from] synth::vm::LaunchError),
    /// Starting, resuming or stopping the VM failed.
    #[error(transparent)]
    Vm(Box<synth::vm::VmError>),
    /// The libvirt backend failed.
    #[cfg(feature = "libvirt")]
    #[error(transparent)]
    Libvirt(Box<synth::vm::libvirt::LibvirtError>),
    /// The backend is not in this build.
    #[error(transparent)]
    LibvirtNotBuilt(#[from] LibvirtNotBuilt),
    /// A wait ended without what it waited for (signal, timeout, QEMU gone).
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// No uid was free for the session's QEMU.
    #[error(transparent)]
    User(#[from] user::UserError),
    /// Preparing the run folder for the session's uid failed.
    #[error("Giving {path} to the session's uid failed")]
    Chown {
        /// The folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The guest's outbound network (`--guest-outbound`) could not start.
    #[error(transparent)]
    Passt(#[from] synth::vm::PasstError),
    /// Installing the SIGINT/SIGTERM handlers failed.
    #[error("Installing the signal handlers failed")]
    Signals(#[source] std::io::Error),
}

impl From<synth::vm::VmError> for SessionError {
    fn from(e: synth::vm::VmError) -> Self {
        SessionError::Vm(Box::new(e))
    }
}

#[cfg(feature = "libvirt")]
impl From<synth::vm::libvirt::LibvirtError> for SessionError {
    fn from(e: synth::vm::libvirt::LibvirtError) -> Self {
        SessionError::Libvirt(Box::new(e))
    }
}
