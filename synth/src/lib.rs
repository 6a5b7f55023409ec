//! `synth`: the overlay engine of cloudlet.
//!
//! A *base VM* is a raw disk image, a flat memory image (guest RAM), a device-state blob and a
//! launch config, kept in a [`registry::Registry`] together with a [`index::ChunkIndex`]: the
//! SHA-256 of every 4 KiB chunk plus a digest → location table used for deduplication.
//!
//! A *VM overlay* ([`format`](mod@format)) holds only the chunks of a custom VM that differ from its base.
//! The flow between the pieces:
//!
//! ```text
//!   custom disk/memory ──► create::create_overlay ──► overlay file (format::OverlayWriter)
//!        base (registry + index) ──┘                         │
//!                                                            ▼
//!   base (registry) ──► reconstruct::reconstruct ◄── format::Overlay (validated reader)
//!                              │
//!                              ▼
//!                 disk.img, memory.img, device-state
//! ```
//!
//! `cloudletfs` serves the same reconstruction lazily through FUSE, using [`format::Overlay`]
//! and [`resolve::Resolver`] to decode single chunks on demand.

pub mod base;
pub mod chunk;
pub mod codec;
pub mod create;
pub mod durable;
pub mod format;
pub mod index;
pub mod protocol;
pub mod reconstruct;
pub mod registry;
pub mod resolve;
pub mod source;
pub mod vm;

pub use chunk::{Digest, ImageKind, CHUNK_SIZE};
