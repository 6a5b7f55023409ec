//! Progress bars for long work: a bar on a terminal, nothing otherwise.
//!
//! Library functions count their progress into an `AtomicU64`; [`run`] draws it while the work
//! runs on the calling thread.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Runs `work` with a byte-progress bar of `total` bytes labelled `msg`.
pub fn run<T>(msg: &str, total: u64, work: impl FnOnce(&AtomicU64) -> T) -> T {
    let counter = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(msg.to_string());
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(counter.load(Ordering::Relaxed).min(total));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let out = work(&counter);
        done.store(true, Ordering::Relaxed);
        bar.finish_and_clear();
        out
    })
}
