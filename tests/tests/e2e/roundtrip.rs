//! `reconstruct(diff(base, custom)) == custom` over random bases and modifications.

use cloudlet_e2e::{mutate, open_overlay, random_image, Fixture, Mutations, Rng};
use proptest::prelude::*;
use synth::codec::Codec;
use synth::create::CreateOptions;

fn reconstruct_equals_custom(
    seed: u64,
    base_sizes: (usize, usize),
    custom_sizes: (usize, usize),
    m: Mutations,
    opts: &CreateOptions,
) {
    let fx = Fixture::seeded(seed, base_sizes.0, base_sizes.1);
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    let resize = |base: &[u8], size: usize, rng: &mut Rng| {
        let mut v = base[..base.len().min(size)].to_vec();
        if size > v.len() {
            let extra = random_image(rng, size - v.len());
            v.extend_from_slice(&extra);
        }
        v
    };
    let mut disk = resize(&fx.base_disk, custom_sizes.0, &mut rng);
    let mut memory = resize(&fx.base_memory, custom_sizes.1, &mut rng);
    mutate(
        &mut rng,
        &fx.base_disk,
        &fx.base_memory,
        &mut disk,
        &mut memory,
        m,
    );
    let custom = fx.write_custom(&disk, &memory);
    let ov_path = fx.path("overlay");
    fx.diff(&custom, &ov_path, opts);
    let ov = open_overlay(&ov_path).expect("overlay opens");
    let out = fx.path("out");
    // The engine rebuilds any disk size; how far a disk may grow is the consumers' policy.
    let ropts = synth::reconstruct::ReconstructOptions {
        threads: 2,
        max_disk_growth: Some(u64::MAX),
    };
    synth::reconstruct::reconstruct_with(&fx.base, &ov, &out, &ropts, &Default::default())
        .expect("reconstruct");
    assert!(
        std::fs::read(out.join("disk.img")).unwrap() == disk,
        "disk differs"
    );
    assert!(
        std::fs::read(out.join("memory.img")).unwrap() == memory,
        "memory differs"
    );
    assert_segments_carry_chunk_digests(&ov, &disk, &memory);
}

/// Every segment of `ov` decodes to its chunks' payloads and then their digests: the SHA-256
/// of each chunk of the custom images (zero-padded), in the segment's order.
fn assert_segments_carry_chunk_digests(ov: &synth::format::Overlay, disk: &[u8], memory: &[u8]) {
    use synth::chunk::{sha256, ImageKind, CHUNK_SIZE};
    for (si, seg) in ov.metadata().segments.iter().enumerate() {
        let decoded = ov.read_segment(si).expect("segment decodes");
        assert_eq!(
            Some(decoded.len() as u64),
            synth::format::segment_raw_len(seg.chunks.len() as u64)
        );
        for (pos, &(image, chunk)) in seg.chunks.iter().enumerate() {
            let img = match image {
                ImageKind::Disk => disk,
                ImageKind::Memory => memory,
            };
            let start = usize::try_from(chunk).unwrap() * CHUNK_SIZE;
            let mut want = img[start..img.len().min(start + CHUNK_SIZE)].to_vec();
            want.resize(CHUNK_SIZE, 0);
            let (_, digest) =
                synth::format::segment_chunk(&decoded, seg.chunks.len(), pos).unwrap();
            assert_eq!(digest, sha256(&want), "segment {si} position {pos}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn reconstruct_of_diff_random_inputs_equals_custom(
        seed in any::<u64>(),
        base_disk in 1usize..300_000,
        base_memory in 0usize..200_000,
        disk_delta in -50_000i64..100_000,
        new in 0usize..40,
        zero in 0usize..20,
        from_base in 0usize..40,
        repeated in 0usize..30,
        zstd in any::<bool>(),
        segment_chunks in 1usize..12,
    ) {
        // Guest RAM keeps its base's size (an overlay of another memory size is refused).
        let custom = ((base_disk as i64 + disk_delta).max(0) as usize, base_memory);
        let opts = CreateOptions {
            codec: if zstd { Codec::Zstd } else { Codec::Xz },
            level: 3,
            segment_size: segment_chunks * 4096,
            ..Default::default()
        };
        reconstruct_equals_custom(
            seed,
            (base_disk, base_memory),
            custom,
            Mutations { new, zero, from_base, repeated },
            &opts,
        );
    }
}

#[test]
fn diff_unchanged_images_has_no_chunks() {
    let fx = Fixture::seeded(1, 64 << 10, 32 << 10);
    let custom = fx.write_custom(&fx.base_disk, &fx.base_memory);
    let p = fx.path("ov");
    let stats = fx.diff(&custom, &p, &CreateOptions::default());
    let ov = open_overlay(&p).unwrap();
    assert_eq!(stats.unchanged, (96 << 10) / 4096);
    assert!(ov.metadata().disk.chunks.is_empty() && ov.metadata().memory.chunks.is_empty());
}

#[test]
fn diff_classifies_each_kind_of_chunk() {
    use synth::format::ChunkSource;
    let mut rng = Rng::new(5);
    let mut base_disk = vec![0u8; 16 * 4096];
    for (i, c) in base_disk.chunks_mut(4096).enumerate() {
        c.fill(b'A' + i as u8);
    }
    let base_memory = vec![b'm'; 4 * 4096];
    let fx = Fixture::new(base_disk.clone(), base_memory.clone());
    let mut disk = base_disk.clone();
    disk[2 * 4096..3 * 4096].fill(0); // zero
    disk[3 * 4096..4 * 4096].fill(b'm'); // from base memory
    let mut fresh = vec![0u8; 4096];
    rng.fill(&mut fresh);
    disk[4 * 4096..5 * 4096].copy_from_slice(&fresh); // new payload
    let mut memory = base_memory.clone();
    memory[..4096].copy_from_slice(&fresh); // repeat of an earlier payload
    memory[4096..8192].fill(b'A'); // from base disk
    let custom = fx.write_custom(&disk, &memory);
    let p = fx.path("ov");
    fx.diff(&custom, &p, &CreateOptions::default());
    let ov = open_overlay(&p).unwrap();
    let m = ov.metadata();
    let src = |map: &synth::format::ImageMap, c| map.find(c).map(|e| e.source);
    assert_eq!(src(&m.disk, 2), Some(ChunkSource::Zero));
    assert_eq!(src(&m.disk, 3), Some(ChunkSource::BaseMemory(0)));
    assert!(matches!(src(&m.disk, 4), Some(ChunkSource::Payload { .. })));
    assert_eq!(
        src(&m.memory, 0),
        Some(ChunkSource::SelfRef {
            image: synth::ImageKind::Disk,
            chunk: 4
        })
    );
    assert_eq!(src(&m.memory, 1), Some(ChunkSource::BaseDisk(0)));
    assert_eq!(m.disk.chunks.len() + m.memory.chunks.len(), 5);
}

#[test]
fn diff_with_candidate_lists_examines_only_listed_chunks() {
    let fx = Fixture::seeded(9, 64 * 4096, 8 * 4096);
    let mut disk = fx.base_disk.clone();
    disk[10 * 4096] ^= 0xff;
    disk[20 * 4096] ^= 0xff; // changed but not listed: must be ignored
    let custom = fx.write_custom(&disk, &fx.base_memory);
    let p = fx.path("ov");
    let opts = CreateOptions {
        disk_chunks: Some(vec![10, 11]),
        memory_chunks: Some(vec![]),
        ..Default::default()
    };
    let stats = fx.diff(&custom, &p, &opts);
    let ov = open_overlay(&p).unwrap();
    assert_eq!(stats.examined_chunks, 2);
    let changed: Vec<u64> = ov.metadata().disk.chunks.iter().map(|e| e.chunk).collect();
    assert_eq!(changed, vec![10]);
}

#[test]
fn diff_same_inputs_twice_gives_identical_bytes() {
    let fx = Fixture::seeded(11, 256 << 10, 128 << 10);
    let mut rng = Rng::new(12);
    let (mut d, mut m) = (fx.base_disk.clone(), fx.base_memory.clone());
    let muts = Mutations {
        new: 30,
        zero: 5,
        from_base: 10,
        repeated: 10,
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
        segment_size: 8 * 4096,
        threads: 2,
        ..Default::default()
    };
    fx.diff(&custom, &fx.path("a"), &opts);
    fx.diff(&custom, &fx.path("b"), &opts);
    assert!(std::fs::read(fx.path("a")).unwrap() == std::fs::read(fx.path("b")).unwrap());
}

#[test]
fn diff_order_puts_listed_chunks_in_first_segment() {
    let fx = Fixture::seeded(13, 64 * 4096, 16 * 4096);
    let mut rng = Rng::new(14);
    let mut disk = fx.base_disk.clone();
    for c in [3usize, 40, 60] {
        rng.fill(&mut disk[c * 4096..(c + 1) * 4096]);
    }
    let custom = fx.write_custom(&disk, &fx.base_memory);
    let p = fx.path("ov");
    let opts = CreateOptions {
        segment_size: 4096,
        order: vec![(synth::ImageKind::Disk, 60)],
        ..Default::default()
    };
    fx.diff(&custom, &p, &opts);
    let ov = open_overlay(&p).unwrap();
    assert_eq!(
        ov.metadata().segments[0].chunks,
        vec![(synth::ImageKind::Disk, 60)]
    );
}

#[test]
fn diff_working_set_gets_small_segments_and_rest_large_ones() {
    let fx = Fixture::seeded(15, 64 * 4096, 16 * 4096);
    let mut rng = Rng::new(16);
    let mut disk = fx.base_disk.clone();
    for c in 0..20 {
        rng.fill(&mut disk[c * 4096..(c + 1) * 4096]);
    }
    let custom = fx.write_custom(&disk, &fx.base_memory);
    let p = fx.path("ov");
    let d = |c| (synth::ImageKind::Disk, c);
    let opts = CreateOptions {
        segment_size: 100 * 4096,
        first_segment_size: 2 * 4096,
        order: vec![d(19), d(18), d(17)],
        ..Default::default()
    };
    fx.diff(&custom, &p, &opts);
    let ov = open_overlay(&p).unwrap();
    let segs: Vec<usize> = ov
        .metadata()
        .segments
        .iter()
        .map(|s| s.chunks.len())
        .collect();
    assert_eq!(segs, vec![2, 1, 17]);
    assert_eq!(ov.metadata().segments[0].chunks, vec![d(19), d(18)]);
}
