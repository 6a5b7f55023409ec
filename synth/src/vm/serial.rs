//! The serial-console protocol of cloudlet's test guest, as seen in QEMU's serial log.
//!
//! The guest prints [`READY_MARKER`] once its services are up; afterwards every line typed on
//! the console runs as `sh -c LINE` and is followed by `CLOUDLET-CMD-DONE <rc>`. The console
//! does not echo, so a marker in the log always comes from the guest.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// Printed by the test guest when its HTTP service answers.
pub const READY_MARKER: &str = "CLOUDLET-GUEST-READY";
/// Printed by the test guest after each command, followed by a space and the exit status.
pub const CMD_DONE_MARKER: &str = "CLOUDLET-CMD-DONE";

/// Reads `path` from byte `offset` to its end; a missing file reads as empty.
pub(crate) fn read_from(path: &Path, offset: u64) -> io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// The current length of `path`; 0 when it does not exist yet.
pub(crate) fn log_len(path: &Path) -> io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Whether `haystack` contains `needle`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle, 0).is_some()
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return Some(from);
    }
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Finds the first complete `CLOUDLET-CMD-DONE <rc>` line in `text` and returns the command's
/// output before it (carriage returns removed) and the rc. `None` while it has not arrived.
pub(crate) fn parse_cmd_done(text: &[u8]) -> Option<(String, i32)> {
    let marker = format!("{CMD_DONE_MARKER} ");
    let mut from = 0;
    while let Some(at) = find(text, marker.as_bytes(), from) {
        let digits_start = at + marker.len();
        let rest = text.get(digits_start..)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        match rest.get(digits) {
            // Not complete yet: more digits or the line end may still come.
            None => return None,
            Some(b'\r' | b'\n') if digits > 0 => {
                let rc = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
                let output = String::from_utf8_lossy(&text[..at]).replace('\r', "");
                return Some((output, rc));
            }
            Some(_) => from = digits_start,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cmd_done_complete_line_returns_output_and_rc() {
        let got = parse_cmd_done(b"hello\r\nCLOUDLET-CMD-DONE 3\r\n");
        assert_eq!(got, Some(("hello\n".to_owned(), 3)));
    }

    #[test]
    fn parse_cmd_done_output_without_newline_still_found() {
        let got = parse_cmd_done(b"xCLOUDLET-CMD-DONE 0\n");
        assert_eq!(got, Some(("x".to_owned(), 0)));
    }

    #[test]
    fn parse_cmd_done_partial_number_waits() {
        assert_eq!(parse_cmd_done(b"CLOUDLET-CMD-DONE 12"), None);
    }

    #[test]
    fn parse_cmd_done_marker_without_number_is_skipped() {
        let got = parse_cmd_done(b"CLOUDLET-CMD-DONE x\nCLOUDLET-CMD-DONE 1\n");
        assert_eq!(got, Some(("CLOUDLET-CMD-DONE x\n".to_owned(), 1)));
    }

    #[test]
    fn contains_marker_across_text_is_found() {
        assert!(contains(
            b"boot...\r\nCLOUDLET-GUEST-READY\r\n",
            b"CLOUDLET-GUEST-READY"
        ));
        assert!(!contains(b"CLOUDLET-GUEST-REA", b"CLOUDLET-GUEST-READY"));
    }
}
