//! `cloudletfs`: serves a synthesized VM's disk and memory images as lazy FUSE files, so QEMU
//! can resume while the overlay is still arriving.
//!
//! # Layers
//!
//! | layer | module | what it is for |
//! |-------|--------|----------------|
//! | FUSE front | [`fs`] | the tree (`disk/`, `memory/`, `device-state`), request dispatch, the one errno mapping |
//! | serving | [`serve`] | per-image read/write/discard assembled chunk by chunk |
//! | chunk state | [`chunkmap`] | the only place that knows whether a chunk is base, pending, ready, modified, discarded or failed |
//! | fetching | [`fetch`] | a priority queue of segments: demand reads first, then the background filler |
//! | byte sources | [`http`], [`synth::source`] | where overlay bytes come from (local file, HTTP Range requests) |
//! | copy-on-write | [`store`] | sparse state file plus a durable journal of modified/discarded chunks |
//! | observability | [`stats`], [`streams`] | JSON counters and bounded trace streams |
//! | lifecycle | [`mount`](mod@mount) | [`mount()`] → [`Mounted`], unmount on drop |
//!
//! # Flow of a read
//!
//! ```text
//!  kernel READ ─► fs::CloudletFs::read ─► serve::Image::read
//!                                     │  chunk state (chunkmap)
//!        base ◄───────────────────────┼── Base: pread (a large read: mmap if cached, else O_DIRECT)
//!        cache file ◄─────────────────┼── Ready: decoded + verified overlay chunk
//!        state file ◄─────────────────┼── Modified: copy-on-write store
//!        zeros ◄──────────────────────┼── Discarded
//!                                     └── Pending: fetch::FetchQueue::demand(segment), wait
//!  fetch workers: Overlay::read_segment ─► Resolver::resolve (SHA-256) ─► cache file ─► Ready
//! ```
//!
//! Decoded segments are never kept in memory: each overlay chunk is written, once verified, into
//! a sparse per-image cache file, so the daemon's memory stays flat in the image size.

pub mod base;
pub mod cache;
pub mod chunkmap;
pub mod error;
pub mod fetch;
pub mod fs;
pub mod http;
pub mod mount;
pub mod serve;
pub mod stats;
pub mod store;
pub mod streams;
pub mod waiters;

pub use cache::MEMORY_CACHE_NAME;
pub use error::{MountError, ServeError};
pub use http::{HttpOptions, HttpSource, RedirectPolicy};
pub use mount::{mount, mounted_at, MountOptions, Mounted, OverlaySource, Trace};
pub use stats::{ImageStats, Stats};
