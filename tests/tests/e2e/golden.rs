//! One tiny golden overlay guards the format against accidental drift: the same inputs must
//! keep producing the same bytes, and the committed file must keep opening and reconstructing.
//! After an intended format change, bump `format::VERSION` and re-bless with
//! `CLOUDLET_BLESS=1 cargo test -p cloudlet-e2e golden`.

use cloudlet_e2e::{mutate, open_overlay, Fixture, Mutations, Rng};
use std::path::PathBuf;
use synth::create::CreateOptions;

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/tiny.overlay")
}

fn make() -> (Fixture, Vec<u8>, Vec<u8>, Vec<u8>) {
    let fx = Fixture::seeded(0xc10d, 16 * 4096, 8 * 4096);
    let mut rng = Rng::new(0x601d);
    let (mut d, mut m) = (fx.base_disk.clone(), fx.base_memory.clone());
    let muts = Mutations {
        new: 3,
        zero: 1,
        from_base: 2,
        repeated: 2,
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
    let p = fx.path("golden");
    let opts = CreateOptions {
        segment_size: 2 * 4096,
        level: 6,
        ..Default::default()
    };
    fx.diff(&custom, &p, &opts);
    let bytes = std::fs::read(&p).unwrap();
    (fx, bytes, d, m)
}

#[test]
fn golden_overlay_same_inputs_give_committed_bytes() {
    let (_fx, bytes, _, _) = make();
    if std::env::var_os("CLOUDLET_BLESS").is_some() {
        std::fs::write(golden_path(), &bytes).unwrap();
    }
    let golden = std::fs::read(golden_path()).expect("tests/golden/tiny.overlay is committed");
    assert!(
        bytes == golden,
        "overlay bytes drifted from tests/golden/tiny.overlay; if intended, bump format::VERSION and re-bless"
    );
}

#[test]
fn golden_overlay_committed_file_reconstructs() {
    let (fx, _, disk, memory) = make();
    let ov = open_overlay(&golden_path()).expect("golden overlay opens");
    let out = fx.path("out");
    synth::reconstruct::reconstruct(&fx.base, &ov, &out, 1, &Default::default()).unwrap();
    assert!(std::fs::read(out.join("disk.img")).unwrap() == disk);
    assert!(std::fs::read(out.join("memory.img")).unwrap() == memory);
}
