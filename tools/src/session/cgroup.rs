//! One cgroup per session's QEMU, bounding its memory, its number of tasks and its CPU time,
//! removed when the session ends.
//!
//! ```text
//!  SessionCgroup::create(name, limits)
//!     v2 (/sys/fs/cgroup/cgroup.controllers): <own cgroup>/cloudlet-NAME, memory.max, pids.max,
//!        cpu.max (memory, pids and, where the host has it, cpu enabled in the parent's
//!        cgroup.subtree_control first)
//!     v1: memory/<own cgroup>/cloudlet-NAME (memory.limit_in_bytes)
//!         pids/<own cgroup>/cloudlet-NAME (pids.max)
//!         cpu/<own cgroup>/cloudlet-NAME (cpu.cfs_quota_us over cpu.cfs_period_us), if mounted
//!  the launcher writes QEMU's pid to cgroup.procs of each before exec (or SessionCgroup::add)
//!  drop (after QEMU was reaped) ─► rmdir of each
//! ```
//!
//! The CPU bound is a quota (CFS bandwidth), not a weight: a session gets at most its share
//! even on an idle host, so one guest spinning cannot take the cores the others need. Where the
//! host has no cpu controller the session runs without it, and `describe` says so.
//!
//! The session's cgroups are children of the cgroup this process is in, so they stay inside
//! whatever limits the operator put on the server itself. QEMU is moved in right after it
//! starts, while it waits for its device state and before the guest touches its RAM; what it
//! allocated before (its own start-up) stays charged to the server's cgroup.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Bounds on one session's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Most bytes of memory (RAM, page cache it faulted in included).
    pub memory_bytes: u64,
    /// Most tasks (processes and threads).
    pub pids: u64,
    /// Most CPU time, in percent of one CPU (200: two CPUs' worth).
    pub cpu_percent: u64,
}

/// The CFS period both versions use: 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

/// Errors of setting up a session's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither cgroup v2 nor the v1 memory and pids controllers are mounted.
    #[error(
        "No cgroup v2 file system and no cgroup v1 memory and pids controllers under {CGROUP_ROOT}"
    )]
    Unavailable,
    /// A cgroup file could not be read or written.
    #[error("{action} {path} failed")]
    Io {
        /// What was done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A session's cgroup (v2), or its memory and pids cgroups (v1); removed on drop.
#[derive(Debug)]
pub struct SessionCgroup {
    dirs: Vec<PathBuf>,
    limits: CgroupLimits,
    version: u8,
    /// Whether the CPU quota applies (the host has the cpu controller).
    cpu: bool,
}

/// The path of this process's cgroup in the hierarchy whose `/proc/self/cgroup` line ends in
/// `:CONTROLLER:PATH` (`""` for v2's `0::PATH`).
fn own_path(controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("Writing", path))
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("Creating", path)(e)),
        _ => Ok(()),
    }
}

impl SessionCgroup {
    /// Creates the session's cgroup `cloudlet-NAME` with `limits`, as a child of this process's
    /// own cgroup (v2 if the host has it, else the v1 memory and pids controllers).
    pub fn create(name: &str, limits: CgroupLimits) -> Result<SessionCgroup, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        let leaf = format!("cloudlet-{name}");
        if root.join("cgroup.controllers").exists() {
            let parent = root.join(own_path("").unwrap_or_default());
            // Controllers must be enabled for the children; a cgroup with processes of its own
            // (other than the root) cannot do that, and the error says so.
            write(&parent.join("cgroup.subtree_control"), "+memory +pids")?;
            let cpu_available = std::fs::read_to_string(parent.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
            let cpu = cpu_available
                && write(&parent.join("cgroup.subtree_control"), "+cpu")
                    .map_err(|e| log::warn!("no CPU quota for sessions: {e}"))
                    .is_ok();
            let dir = parent.join(&leaf);
            make_dir(&dir)?;
            let cg = SessionCgroup {
                dirs: vec![dir.clone()],
                limits,
                version: 2,
                cpu,
            };
            write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            write(&dir.join("memory.swap.max"), "0").or_else(|e| {
                // Without swap accounting the file does not exist; nothing to bound then.
                log::debug!("{e}");
                Ok::<(), CgroupError>(())
            })?;
            write(&dir.join("pids.max"), &limits.pids.to_string())?;
            if cpu {
                // "QUOTA PERIOD"
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", cpu_quota(limits)),
                )?;
            }
            return Ok(cg);
        }
        let (mem_root, pids_root) = (root.join("memory"), root.join("pids"));
        if !mem_root.join("cgroup.procs").exists() || !pids_root.join("cgroup.procs").exists() {
            return Err(CgroupError::Unavailable);
        }
        let mem = mem_root
            .join(own_path("memory").unwrap_or_default())
            .join(&leaf);
        let pids = pids_root
            .join(own_path("pids").unwrap_or_default())
            .join(&leaf);
        let cpu_root = root.join("cpu");
        let mut cg = SessionCgroup {
            dirs: Vec::new(),
            limits,
            version: 1,
            cpu: cpu_root.join("cpu.cfs_quota_us").exists(),
        };
        make_dir(&mem)?;
        cg.dirs.push(mem.clone());
        make_dir(&pids)?;
        cg.dirs.push(pids.clone());
        write(
            &mem.join("memory.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        )?;
        write(&pids.join("pids.max"), &limits.pids.to_string())?;
        if cg.cpu {
            let cpu = cpu_root
                .join(own_path("cpu").unwrap_or_default())
                .join(&leaf);
            make_dir(&cpu)?;
            cg.dirs.push(cpu.clone());
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(
                &cpu.join("cpu.cfs_quota_us"),
                &cpu_quota(limits).to_string(),
            )?;
        }
        Ok(cg)
    }

    /// Moves process `pid` (all its threads) into the cgroup(s).
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup folders (one for v2; memory, pids and cpu for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// What applies, for logs and `list-session`: "cgroup v1: memory 768 MiB, 512 tasks, CPU
    /// 200%" ("no CPU quota" where the host has no cpu controller).
    pub fn describe(&self) -> String {
        let cpu = if self.cpu {
            format!("CPU {}%", self.limits.cpu_percent)
        } else {
            "no CPU quota".to_string()
        };
        format!(
            "cgroup v{}: memory {} MiB, {} tasks, {cpu}",
            self.version,
            self.limits.memory_bytes >> 20,
            self.limits.pids
        )
    }
}

/// The CFS quota in microseconds per [`CPU_PERIOD_US`] for `limits` (at least 1 ms).
fn cpu_quota(limits: CgroupLimits) -> u64 {
    limits
        .cpu_percent
        .saturating_mul(CPU_PERIOD_US / 100)
        .max(1_000)
}

impl Drop for SessionCgroup {
    /// Removes the cgroup(s). The session's QEMU has been reaped by now; a cgroup still
    /// emptying (its last task being torn down) is retried for a few seconds.
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        log::warn!("removing cgroup {} failed: {e}", d.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_path_v1_controller_list_and_v2_line() {
        // This process's own file: every controller it names resolves, an unknown one not.
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let first = text.lines().next().unwrap();
        let ctrl = first.split(':').nth(1).unwrap();
        let name = ctrl.split(',').next().unwrap_or("");
        assert!(own_path(name).is_some(), "{text}");
        assert!(own_path("no-such-controller").is_none());
    }
}
