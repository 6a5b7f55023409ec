//! Every validation an overlay reader performs refuses a damaged overlay with its own error.

use cloudlet_e2e::{mutate, open_overlay, Fixture, Mutations, Rng};
use synth::chunk::sha256;
use synth::codec::Codec;
use synth::create::CreateOptions;
use synth::format::{
    encode_head, metadata_decode_limit, BaseLimits, ChunkSource, FormatError, Metadata,
    SegmentEntry, HEADER_LEN, MAGIC, METADATA_DECODED_FLOOR, VERSION,
};
use synth::ImageKind;

/// A fixture with a valid overlay that has payloads in two segments, self refs and base refs.
pub(crate) fn valid() -> (Fixture, Vec<u8>) {
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
pub(crate) fn with_meta(bytes: &[u8], f: impl FnOnce(&mut Metadata)) -> Vec<u8> {
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
    ov.check_base(&fx.base.limits(None)).unwrap();
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
    bytes[8] = 3;
    assert!(matches!(
        open_bytes(&fx, &bytes),
        Err(FormatError::UnsupportedVersion(3))
    ));
}

#[test]
fn open_version_1_is_refused_with_how_to_recreate() {
    let (fx, mut bytes) = valid();
    bytes[8] = 1;
    let err = open_bytes(&fx, &bytes).unwrap_err();
    assert!(matches!(err, FormatError::UnsupportedVersion(1)), "{err}");
    assert_eq!(
        err.to_string(),
        "Overlay format 1, this cloudlet reads 2: re-create it with `cloudlet overlay` or \
         `cloudlet diff`"
    );
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
        e.digest = None;
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
        ov.check_base(&other.base.limits(None)),
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
        ov.check_base(&fx.base.limits(None)),
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
    // A digest the head holds (a zero chunk's or a base reference's).
    let b = with_meta(&bytes, |m| {
        m.disk
            .chunks
            .iter_mut()
            .find_map(|e| e.digest.as_mut())
            .unwrap()[0] ^= 1;
    });
    let ov = open_bytes(&fx, &b).unwrap();
    let err =
        synth::reconstruct::reconstruct(&fx.base, &ov, &fx.path("out"), 2, &Default::default())
            .unwrap_err();
    assert!(
        err.to_string().contains("does not match its SHA-256"),
        "{err}"
    );
}

/// An overlay file whose metadata is `stored`, compressed with `codec` (header id), and no
/// segments, with a correct metadata digest.
fn overlay_with_metadata(codec: u32, stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&codec.to_le_bytes());
    out.extend_from_slice(&(stored.len() as u64).to_le_bytes());
    out.extend_from_slice(&(HEADER_LEN + stored.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(stored));
    out.extend_from_slice(stored);
    out
}

/// An xz metadata bomb made at test time: 256 MiB of zeros in a stream of some 40 KiB, four
/// times what the reader lets that stream decode to.
fn xz_metadata_bomb() -> (Vec<u8>, u64) {
    let inflated = vec![0u8; usize::try_from(4 * METADATA_DECODED_FLOOR).unwrap()];
    let stored = synth::codec::compress(Codec::Xz, 0, &inflated).unwrap();
    (
        overlay_with_metadata(Codec::Xz.header_id(), &stored),
        inflated.len() as u64,
    )
}

/// A zstd metadata bomb: one frame of 1 MiB of zeros, repeated 16384 times (a zstd stream may
/// hold many frames): 16 GiB from some 600 KiB.
fn zstd_metadata_bomb() -> (Vec<u8>, u64) {
    let frame = synth::codec::compress(Codec::Zstd, 1, &[0u8; 1 << 20]).unwrap();
    let stored = frame.repeat(16384);
    (
        overlay_with_metadata(Codec::Zstd.header_id(), &stored),
        16384 << 20,
    )
}

/// Opens `bomb` (which inflates to `inflated` bytes) and checks it is refused as one, with
/// the limit for its stored size, far below what it inflates to.
fn assert_bomb_refused(bomb: &[u8], inflated: u64) {
    let (fx, _) = valid();
    let stored = bomb.len() as u64 - HEADER_LEN;
    let limit = metadata_decode_limit(stored);
    assert!(inflated >= 4 * limit, "{inflated} bytes, limit {limit}");
    let err = open_bytes(&fx, bomb).unwrap_err();
    assert!(
        matches!(err, FormatError::MetadataInflates { stored: s, limit: l }
            if s == stored && l == limit),
        "{err}"
    );
    assert!(err.to_string().contains("inflates past"), "{err}");
}

#[test]
fn open_xz_metadata_bomb_is_refused_while_decoding() {
    let (bomb, inflated) = xz_metadata_bomb();
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    assert_bomb_refused(&bomb, inflated);
}

#[test]
fn open_zstd_metadata_bomb_is_refused_while_decoding() {
    let (bomb, inflated) = zstd_metadata_bomb();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    assert_bomb_refused(&bomb, inflated);
}

#[test]
fn open_metadata_inflating_to_the_floor_is_decoded() {
    // Up to the limit the stream decodes (and then fails as metadata, not as a bomb).
    let (fx, _) = valid();
    let inflated = vec![0u8; usize::try_from(METADATA_DECODED_FLOOR).unwrap()];
    let stored = synth::codec::compress(Codec::Zstd, 1, &inflated).unwrap();
    let file = overlay_with_metadata(Codec::Zstd.header_id(), &stored);
    assert!(matches!(
        open_bytes(&fx, &file),
        Err(FormatError::DecodeMetadata(_)) | Err(FormatError::MetadataTrailing(_))
    ));
}

/// The valid overlay's metadata, the length of its segment area, as `validate` takes them.
fn valid_meta() -> (Metadata, u64) {
    let (_fx, bytes) = valid();
    let src: std::sync::Arc<dyn synth::source::ByteSource> = std::sync::Arc::new(bytes.clone());
    let ov = synth::format::Overlay::open(src).unwrap();
    (ov.metadata().clone(), bytes.len() as u64 - ov.data_start())
}

#[test]
fn validate_segment_longer_than_its_decoded_size_allows_is_refused() {
    // A segment of one chunk cannot take a megabyte compressed: a reader would fetch and hold
    // it all before its digest fails.
    let (mut meta, data_len) = valid_meta();
    let last = meta.segments.last_mut().unwrap();
    let grow = synth::format::segment_length_bound(last.raw_length) + 1 - last.length;
    last.length += grow;
    let err = synth::format::validate(&meta, data_len + grow).unwrap_err();
    assert!(
        matches!(&err, FormatError::BadSegment { reason, .. } if reason.contains("compress")),
        "{err}"
    );
}

#[test]
fn validate_segment_holding_no_chunk_is_refused() {
    let (mut meta, data_len) = valid_meta();
    meta.segments.push(SegmentEntry {
        offset: data_len,
        length: 10,
        raw_length: 0,
        digest: [0; 32],
        chunks: Vec::new(),
    });
    let err = synth::format::validate(&meta, data_len + 10).unwrap_err();
    assert!(
        matches!(&err, FormatError::BadSegment { reason, .. } if reason.contains("no chunk")),
        "{err}"
    );
}

#[test]
fn check_base_memory_size_other_than_base_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.memory.size += 4096);
    let ov = open_bytes(&fx, &b).unwrap();
    let err = ov.check_base(&fx.base.limits(None)).unwrap_err();
    let base = fx.base.record.memory_size;
    assert!(
        matches!(err, FormatError::MemorySizeMismatch { overlay, base: b }
            if overlay == base + 4096 && b == base),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&(base + 4096).to_string()) && text.contains(&base.to_string()),
        "{text}"
    );
}

#[test]
fn check_base_16_tib_disk_is_refused() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.disk.size = 16 << 40);
    let ov = open_bytes(&fx, &b).unwrap();
    let base = fx.base.record.disk_size;
    assert!(matches!(
        ov.check_base(&fx.base.limits(None)),
        Err(FormatError::DiskTooLarge { overlay, base: b, limit })
            if overlay == 16 << 40 && b == base && limit == 2 * base
    ));
}

#[test]
fn check_base_disk_growth_up_to_the_limit_is_accepted_and_past_it_refused() {
    let (fx, bytes) = valid();
    let base = fx.base.record.disk_size;
    let b = with_meta(&bytes, |m| m.disk.size = base + 8192);
    let ov = open_bytes(&fx, &b).unwrap();
    // Default: growth up to the base's own size.
    ov.check_base(&fx.base.limits(None)).unwrap();
    ov.check_base(&fx.base.limits(Some(8192))).unwrap();
    assert!(matches!(
        ov.check_base(&fx.base.limits(Some(8191))),
        Err(FormatError::DiskTooLarge { .. })
    ));
    assert!(matches!(
        ov.check_base(&BaseLimits {
            max_disk_growth: Some(0),
            ..fx.base.limits(None)
        }),
        Err(FormatError::DiskTooLarge { .. })
    ));
}

#[test]
fn reconstruct_memory_size_other_than_base_is_refused_before_writing() {
    let (fx, bytes) = valid();
    let b = with_meta(&bytes, |m| m.memory.size += 4096);
    let ov = open_bytes(&fx, &b).unwrap();
    let out = fx.path("out");
    let err =
        synth::reconstruct::reconstruct(&fx.base, &ov, &out, 2, &Default::default()).unwrap_err();
    assert!(
        matches!(
            err,
            synth::reconstruct::ReconstructError::Resolve(synth::resolve::ResolveError::Format(
                FormatError::MemorySizeMismatch { .. }
            ))
        ),
        "{err}"
    );
    assert!(!out.exists(), "reconstruct wrote before refusing");
}

#[test]
fn reconstruct_disk_growth_raised_by_the_option_is_accepted() {
    let (fx, bytes) = valid();
    let base = fx.base.record.disk_size;
    let b = with_meta(&bytes, |m| m.disk.size = 3 * base);
    let ov = open_bytes(&fx, &b).unwrap();
    let opts = synth::reconstruct::ReconstructOptions {
        threads: 2,
        max_disk_growth: Some(2 * base),
    };
    synth::reconstruct::reconstruct_with(
        &fx.base,
        &ov,
        &fx.path("out"),
        &opts,
        &Default::default(),
    )
    .unwrap();
    let len = std::fs::metadata(fx.path("out").join("disk.img"))
        .unwrap()
        .len();
    assert_eq!(len, 3 * base);
}
