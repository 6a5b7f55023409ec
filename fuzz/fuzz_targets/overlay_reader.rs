//! Fuzzes the overlay reader: any input must be refused cleanly or, if accepted, every segment
//! read must return a result — never a panic, never an unbounded allocation.
//!
//! Two modes, picked by the first byte: the input as a whole overlay file, or the input as
//! metadata wrapped in a correct header (so the fuzzer gets past the metadata digest and
//! reaches bincode decoding and validation).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use synth::chunk::sha256;
use synth::format::{Overlay, MAGIC, VERSION};
use synth::source::ByteSource;

fn wrap_metadata(meta: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + meta.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    out.extend_from_slice(&(64 + meta.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(meta));
    out.extend_from_slice(meta);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode & 1 == 0 { rest.to_vec() } else { wrap_metadata(rest) };
    let src: Arc<dyn ByteSource> = Arc::new(bytes);
    if let Ok(ov) = Overlay::open(src) {
        let id = ov.metadata().base_id;
        let _ = ov.check_base(&synth::format::BaseLimits {
            id,
            disk_size: 1 << 32,
            memory_size: ov.metadata().memory.size,
            max_disk_growth: None,
        });
        for i in 0..ov.metadata().segments.len().min(16) {
            let _ = ov.read_segment(i);
        }
    }
});
