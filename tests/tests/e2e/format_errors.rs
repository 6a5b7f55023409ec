//! Every validation an overlay reader performs refuses a damaged overlay with its own error.

use cloudlet_e2e::{mutate, open_overlay, Fixture, Mutations, Rng};
use synth::create::CreateOptions;
use synth::format::{encode_head, ChunkSource, FormatError, Metadata};
use synth::ImageKind;

/// A fixture with a valid overlay that has payloads in two segments, self refs and base refs.
fn valid() -> (Fixture, Vec<u8>) {
    let fx = Fixture::seeded(21, 128 << 10, 64 << 10);
    let mut rng = Rng::new(22);
    let (mut d, mut m) = (fx.base_disk.clone(), fx.base_memory.clone());
    let muts = Mutations {
        new: 12,
        zero: 3,
        from_base: 6,
        repeated: 6,
    };
    mutate(
        &mut rng,
        &fx.base_disk,
        &fx.base_memory,
        &mut d,
        &mut m,
        muts,
    );
    let custom = fx.write_custom(&d, &m);
    let opts = CreateOptions {
        segment_size: 4 * 4096,
        ..Default::default()
    };
    let p = fx.path("valid");
    fx.diff(&custom, &p, &opts);
    let bytes = std::fs::read(&p).unwrap();
    (fx, bytes)
}

fn open_bytes(fx: &Fixture, bytes: &[u8]) -> Result<synth::format::Overlay, FormatError> {
    let p = fx.path("damaged");
    std::fs::write(&p, bytes).unwrap();
    open_overlay(&p)
}

/// Re-encodes `bytes` after `f` changes its metadata (with a correct metadata digest).
fn with_meta(bytes: &[u8], f: impl FnOnce(&mut Metadata)) -> Vec<u8> {
    let src: std::sync::Arc<dyn synth::source::ByteSource> = std::sync::Arc::new(bytes.to_vec());
    let ov = synth::format::Overlay::open(src).unwrap();
    let mut meta = ov.metadata().clone();
    let segments = &bytes[ov.data_start() as usize..];
    f(&mut meta);
    let mut out = encode_head(&meta, segments.len() as u64).unwrap();
    out.extend_from_slice(segments);
    out
}

#[test]
fn open_valid_overlay_succeeds() {
    let (fx, bytes) = valid();
    let ov = open_bytes(&fx, &bytes).unwrap();
    assert!(ov.metadata().segments.len() >= 2);
    ov.check_base(&fx.base.id(), 32, 16).unwrap();
}

#[test]
fn open_bad_magic_is_refused() {
    let (fx, mut bytes) = valid();
    bytes[0] = b'X';
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::BadMagic)
    ));
}

#[test]
fn open_unknown_version_is_refused() {
    let (fx, mut bytes) = valid();
    bytes[8] = 2;
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::UnsupportedVersion(2))
    ));
}

#[test]
fn open_unknown_metadata_codec_is_refused() {
    let (fx, mut bytes) = valid();
    bytes[12] = 7;
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::BadMetadataCodec(7))
    ));
}

#[test]
fn open_truncated_file_is_refused() {
    let (fx, bytes) = valid();
    assert!(matches!(
        open_bytes(&fx, &bytes[..bytes.len() - 1]),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        open_bytes(&fx, &bytes[..40]),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn open_trailing_bytes_is_refused() {
    let (fx, mut bytes) = valid();
    bytes.push(0);
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::TrailingBytes { extra: 1 })
    ));
}

#[test]
fn open_huge_metadata_length_is_refused() {
    let (fx, mut bytes) = valid();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::MetadataTooLarge(_))
    ));
}

#[test]
fn open_corrupt_metadata_is_refused() {
    let (fx, mut bytes) = valid();
    bytes[70] ^= 0xff;
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::MetadataDigest)
    ));
}

#[test]
fn open_wrong_chunk_size_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.chunk_size = 8192);
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::ChunkSize(8192))
    ));
}

#[test]
fn open_unsorted_chunks_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.disk.chunks.swap(0, 1));
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::UnsortedChunks { .. })
    ));
}

#[test]
fn open_chunk_outside_image_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.disk.size = 4096);
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::ChunkOutOfRange { .. })
    ));
}

#[test]
fn open_oversized_image_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.memory.size = u64::MAX);
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::ImageTooLarge { .. })
    ));
}

#[test]
fn open_segment_past_end_of_file_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.segments.last_mut().unwrap().length += 1);
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::BadSegment { .. })
    ));
}

#[test]
fn open_segments_not_covering_file_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.segments[0].length -= 1);
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::BadSegment { .. })
    ));
}

#[test]
fn validate_segment_raw_length_mismatch_is_refused() {
    // The file stores no decoded length (it follows from the chunk list), so this can only be
    // checked on metadata built in memory.
    let (_fx, bytes) = valid();
    let src: std::sync::Arc<dyn synth::source::ByteSource> = std::sync::Arc::new(bytes.clone());
    let ov = synth::format::Overlay::open(src).unwrap();
    let mut meta = ov.metadata().clone();
    meta.segments[0].raw_length += 4096;
    let data_len = bytes.len() as u64 - ov.data_start();
    assert!(matches!(
        synth::format::validate(&meta, data_len),
        Err(FormatError::BadSegment { segment: 0, .. })
    ));
}

fn first_payload(m: &mut Metadata) -> &mut ChunkSource {
    m.disk
        .chunks
        .iter_mut()
        .chain(m.memory.chunks.iter_mut())
        .map(|e| &mut e.source)
        .find(|s| matches!(s, ChunkSource::Payload { .. }))
        .unwrap()
}

#[test]
fn open_payload_in_segment_not_listing_it_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| {
        let last = u32::try_from(m.segments.len() - 1).unwrap();
        if let ChunkSource::Payload { segment, .. } = first_payload(m) {
            *segment = if *segment == last { 0 } else { last };
        }
    });
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::BadPayload { .. })
    ));
}

#[test]
fn open_payload_in_missing_segment_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| {
        if let ChunkSource::Payload { segment, .. } = first_payload(m) {
            *segment = 999;
        }
    });
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::BadPayload { .. })
    ));
}

#[test]
fn open_self_reference_to_non_payload_is_refused() {
    let (fx, bytes) = valid();
    // A self reference to itself would be a cycle; it must be refused.
    let b = with_meta(&bytes, |m| {
        let e = &mut m.disk.chunks[0];
        e.source = ChunkSource::SelfRef {
            image: ImageKind::Disk,
            chunk: e.chunk,
        };
    });
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::BadSelfRef { .. })
    ));
}

#[test]
fn open_segment_listing_foreign_chunk_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.segments[0].chunks[0].1 += 1_000_000);
    assert!(matches!(
        open_bytes(&fx, &b),
        Err(FormatError::BadPayload { .. }) | Err(FormatError::BadSegment { .. })
    ));
}

#[test]
fn check_base_wrong_base_is_refused() {
    let (fx, bytes) = valid();
    let ov = open_bytes(&fx, &bytes).unwrap();
    let other = Fixture::seeded(99, 4096, 4096);
    assert!(matches!(
        ov.check_base(&other.base.id(), 32, 16),
        Err(FormatError::WrongBase { .. })
    ));
}

#[test]
fn check_base_reference_past_base_end_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| {
        let e = m.disk.chunks.iter_mut().find(|e| {
            matches!(
                e.source,
                ChunkSource::Zero | ChunkSource::BaseDisk(_) | ChunkSource::BaseMemory(_)
            )
        });
        e.unwrap().source = ChunkSource::BaseDisk(1_000_000);
    });
    let ov = open_bytes(&fx, &b).unwrap();
    assert!(matches!(
        ov.check_base(&fx.base.id(), 32, 16),
        Err(FormatError::BaseRefOutOfRange { .. })
    ));
}

#[test]
fn read_segment_corrupt_bytes_is_refused() {
    let (fx, mut bytes) = valid();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let ov = open_bytes(&fx, &bytes).unwrap();
    let n = ov.metadata().segments.len();
    assert!(matches!(
        ov.read_segment(n - 1),
        Err(FormatError::SegmentDigest { .. })
    ));
    assert!(ov.read_segment(0).is_ok());
}

#[test]
fn reconstruct_wrong_chunk_digest_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.disk.chunks[0].digest[0] ^= 1);
    let ov = open_bytes(&fx, &b).unwrap();
    let err =
        synth::reconstruct::reconstruct(&fx.base, &ov, &fx.path("out"), 2, &Default::default())
            .unwrap_err();
    assert!(
        err.to_string().contains("does not match its SHA-256"),
        "{err}"
    );
}
