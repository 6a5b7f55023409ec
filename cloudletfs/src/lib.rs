//! `cloudletfs`: serves a synthesized VM's disk and memory images as lazy FUSE files, so QEMU
//! can resume while the overlay is still arriving.
//!
//! # Layers
//!
//! | layer | module | what it is for |
//! |-------|--------|----------------|
//! | FUSE front | [`fs`], [`waiters`] | the tree (`disk/`, `memory/`, `device-state`), request dispatch, the one errno mapping; requests that may wait for the network leave the FUSE threads once half of them wait |
//! | serving | [`serve`] | per-image read/write/discard assembled chunk by chunk |
//! | chunk state | [`chunkmap`] | the only place that knows whether a chunk is base, pending, ready, modified, discarded or failed |
//! | base images | [`base`] | `pread`, the read-only mapping, `O_DIRECT` reads of the base files |
//! | rebuilt chunks | [`cache`] | the cache of verified overlay chunks: a memfd, or a file when the memory budget is spent |
//! | fetching | [`fetch`] | a priority queue of segments: demand reads first, then the background filler |
//! | byte sources | [`http`], [`synth::source`] | where overlay bytes come from (local file, HTTP Range requests), each read with a priority |
//! | copy-on-write | [`store`] | sparse state file plus a durable journal of modified/discarded chunks, within a quota |
//! | observability | [`stats`], [`streams`] | JSON counters and bounded trace streams |
//! | lifecycle | [`mount`](mod@mount) | [`mount()`] → [`Mounted`], unmount on drop |
//! | program edge | [`cli`] | exit codes, signals and daemon failures shared with `cloudlet` |
//!
//! Modules depend on each other in one direction only: `mount` → `fs` → `serve` → `fetch`,
//! each on top of the leaves it uses (`base`, `cache`, `chunkmap`, `error`, `stats`, `store`,
//! `streams`, `waiters`). Fetching sees the serving core only through [`fetch::ChunkSink`].
//!
//! # Flow of a read
//!
//! ```text
//!  kernel READ ─► fs::CloudletFs::read (a FUSE thread, or a waiter thread) ─► serve::Core::read
//!                                     │  chunk state (chunkmap)
//!        base ◄───────────────────────┼── Base: pread (a large read: mmap if cached, else O_DIRECT)
//!        cache ◄──────────────────────┼── Ready: decoded + verified overlay chunk (memfd or file)
//!        state file ◄─────────────────┼── Modified: copy-on-write store
//!        zeros ◄──────────────────────┼── Discarded
//!                                     └── Pending: its segment already decoded: the chunk from it
//!                                         nobody has it: decode it in this thread (MAX_CLAIMED)
//!                                         else: FetchQueue::demand(segment), wait
//!  segment decoded: chunks verified (SHA-256) into the reply and the cache ─► Ready
//! ```
//!
//! # Memory
//!
//! Decoded segments are held in memory only while their chunks are still to rebuild: a
//! segment a reader, a demand worker or the filler is decoding (at most
//! [`fetch::MAX_CLAIMED`] claimed by readers at once, holding at most
//! [`fetch::MAX_CLAIMED_BYTES`] together, one per worker), and the published
//! *rests* of segments decoded on demand that wait for the `SCHED_IDLE` rest worker, up to
//! [`fetch::MAX_QUEUED_REST_BYTES`] (past that the decoding thread rebuilds the rest itself).
//! Each chunk, once verified, goes to the image's cache: a memfd when every overlay chunk of
//! the mount fits in the process-wide budget (by default a quarter of the memory available at
//! mount time, see [`MountOptions::cache_memory`]), else a sparse unlinked file in the cache
//! folder. A memfd's pages take memory (swappable) without showing in the daemon's RSS: they
//! are not mapped. Chunks the overlay does not change never enter the cache: they are read from the
//! base files on every request ([`base`]).

pub mod base;
pub mod cache;
pub mod chunkmap;
pub mod cli;
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
