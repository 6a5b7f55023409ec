//! The commands' argument structs (where the library has none) and their output: text or
//! `--json`, progress bars and notes on stderr.

pub mod engine;
pub mod net;
mod progress;
pub mod registry;
pub mod vm;

use anyhow::{Context as _, Result};
use cloudlet_tools::session::WaitError;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use synth::registry::Registry;

/// Settings shared by every command.
pub struct Context {
    /// Registry folder.
    pub home: PathBuf,
    /// Worker threads.
    pub threads: usize,
}

impl Context {
    /// Opens the registry.
    pub fn registry(&self) -> Result<Registry> {
        Registry::open(&self.home)
            .with_context(|| format!("opening registry {}", self.home.display()))
    }
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The size of a file.
pub fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len())
}

/// Notes and progress bars on stderr; the user answers on stdin.
pub struct Terminal;

impl cloudlet_tools::Reporter for Terminal {
    fn note(&self, text: &str) {
        eprintln!("{text}");
    }

    fn guest_output(&self, bytes: &[u8]) {
        use std::io::Write;
        // Best effort: a closed stderr must not stop the customization.
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(bytes);
        let _ = err.flush();
    }

    fn progress(&self, label: &str, total: u64) -> Box<dyn cloudlet_tools::Progress> {
        Box::new(progress::Bar::start(label, total))
    }

    fn wait_for_user(&self, prompt: &str, stop: &AtomicBool) -> Result<(), WaitError> {
        eprintln!("{prompt}");
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(std::io::stdin().read_line(&mut line).map(|n| n > 0));
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(Ok(true)) => return Ok(()),
                Ok(_) => return Err(WaitError::NoUser),
                Err(_) if stop.load(Ordering::Relaxed) => return Err(WaitError::Interrupted),
                Err(_) => {}
            }
        }
    }
}
