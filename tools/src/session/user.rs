//! An unprivileged uid and gid of its own for each session's QEMU.
//!
//! ```text
//!  SessionUser::allocate(range)   lowest id of the range that no live session of this process
//!                                 holds and that owns no process on the machine
//!     └─► cloudletfs shows the session's files as owned by it (mode 0600/0700 kept)
//!     └─► the run folder's `run/` (sockets, serial log) is chowned to it
//!     └─► the launcher drops to it (no supplementary groups) right before exec of QEMU
//!  drop (after QEMU was reaped) ─► the id is free again
//! ```
//!
//! No user accounts are needed: the ids are numbers from a range the operator gives
//! (`--qemu-uids`, default [`DEFAULT_UIDS`]), used as both uid and gid. A QEMU that a guest
//! took over then holds no privilege and can open nothing of another session: their files
//! are owner-only and owned by other ids. Only a process running as root can do this;
//! otherwise QEMU runs as the (already unprivileged) invoking user.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

/// Default `--qemu-uids`: far above the ids distributions give to accounts (1000–60000) and
/// systemd's dynamic users (61184–65519).
pub const DEFAULT_UIDS: &str = "400000-400999";

/// Ids held by this process's live sessions.
static IN_USE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Errors of picking a session's user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Every id of the range is taken.
    #[error("No free uid in {start}-{end} for QEMU: widen --qemu-uids or end some sessions")]
    Exhausted {
        /// First id of the range.
        start: u32,
        /// Last id.
        end: u32,
    },
}

/// Ids `start..=end` (both at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    /// First id.
    pub start: u32,
    /// Last id.
    pub end: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        parse_uid_range(DEFAULT_UIDS).unwrap_or(UidRange {
            start: 400_000,
            end: 400_999,
        })
    }
}

/// A range of ids `START-END` for `--qemu-uids` (both at least 1, START ≤ END).
pub fn parse_uid_range(s: &str) -> Result<UidRange, String> {
    let bad = || format!("{s:?}: expected START-END, e.g. {DEFAULT_UIDS} (ids above 0)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(UidRange { start: a, end: b })
}

/// Whether this process runs as root (and so can hand QEMU another uid).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uids that own a process on this machine now.
fn busy_uids() -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
        .collect()
}

/// One session's uid (also its gid); free again when dropped.
#[derive(Debug)]
pub struct SessionUser {
    id: u32,
}

impl SessionUser {
    /// Takes the lowest id of `range` that no live session of this process holds and that
    /// owns no process.
    pub fn allocate(range: &UidRange) -> Result<SessionUser, UserError> {
        let busy = busy_uids();
        let mut held = IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        let id = (range.start..=range.end)
            .find(|id| !held.contains(id) && !busy.contains(id))
            .ok_or(UserError::Exhausted {
                start: range.start,
                end: range.end,
            })?;
        held.insert(id);
        Ok(SessionUser { id })
    }

    /// (uid, gid).
    pub fn ids(&self) -> (u32, u32) {
        (self.id, self.id)
    }
}

impl Drop for SessionUser {
    fn drop(&mut self) {
        IN_USE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_range_parses_and_refuses_zero_reversed_and_garbage() {
        let r = |start, end| Ok(UidRange { start, end });
        assert_eq!(parse_uid_range("400000-400999"), r(400_000, 400_999));
        assert_eq!(parse_uid_range("7-7"), r(7, 7));
        assert_eq!(UidRange::default(), r(400_000, 400_999).unwrap());
        for bad in ["0-5", "9-3", "5", "a-b", "-", "1-99999999999"] {
            assert!(parse_uid_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allocate_gives_distinct_ids_reuses_freed_and_reports_exhaustion() {
        let range = UidRange {
            start: 4_000_100,
            end: 4_000_101,
        };
        let a = SessionUser::allocate(&range).unwrap();
        let b = SessionUser::allocate(&range).unwrap();
        assert_ne!(a.ids(), b.ids());
        assert!(matches!(
            SessionUser::allocate(&range),
            Err(UserError::Exhausted { .. })
        ));
        let freed = a.ids();
        drop(a);
        assert_eq!(SessionUser::allocate(&range).unwrap().ids(), freed);
    }
}
