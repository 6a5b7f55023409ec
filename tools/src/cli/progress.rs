//! Progress bars for long work: a bar on a terminal, nothing otherwise.
//!
//! Library functions count their progress into an `AtomicU64`; a [`Bar`] draws it from a
//! thread of its own until dropped.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A byte-progress bar, drawn until dropped.
pub struct Bar {
    counter: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    drawer: Option<JoinHandle<()>>,
}

impl Bar {
    /// Starts drawing a bar of `total` bytes labelled `msg`.
    pub fn start(msg: &str, total: u64) -> Bar {
        let counter = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(msg.to_string());
        let drawer = {
            let counter = Arc::clone(&counter);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    bar.set_position(counter.load(Ordering::Relaxed).min(total));
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.finish_and_clear();
            })
        };
        Bar {
            counter,
            done,
            drawer: Some(drawer),
        }
    }
}

impl cloudlet_tools::Progress for Bar {
    fn counter(&self) -> &AtomicU64 {
        &self.counter
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(d) = self.drawer.take() {
            let _ = d.join();
        }
    }
}
