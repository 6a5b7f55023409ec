//! Whole-filesystem benchmarks of cloudletfs (`cargo bench -p cloudletfs --bench fs`), printed
//! as markdown tables for BENCHMARKS.md:
//!
//! 1. base-only sequential (1 MiB) and random (4 KiB) reads through cloudletfs vs the base
//!    file itself, cold cache, alternated round by round in the same run;
//! 2. first read of a pending chunk (local overlay, no background filler), p50/p99, xz and zstd;
//! 3. RSS of the `cloudletfs` daemon serving sparse images (1 GiB + 256 MiB and 8 GiB + 2 GiB);
//!
//! and, on demand only, `ab A B`: two builds of the daemon on the base-only reads, alternated.
//!
//! Env: `CLOUDLETFS_BENCH_DIR` (scratch folder, default /var/tmp), `CLOUDLETFS_BENCH_GIB`
//! (size of the throughput base, default 1), `CLOUDLETFS_BENCH_ROUNDS` (throughput rounds,
//! default 7).

#![allow(missing_docs, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use cloudlet_e2e::{fill_chunk, Rng};
use cloudletfs::{mount, MountOptions, OverlaySource};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use synth::codec::Codec;
use synth::create::{create_overlay, CreateOptions, CustomImages};
use synth::registry::{AddBase, Base, Registry};

const MIB: u64 = 1 << 20;

fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn scratch() -> tempfile::TempDir {
    let base = std::env::var("CLOUDLETFS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::tempdir_in(base).expect("scratch dir")
}

/// Writes a file of `size` bytes: random chunks, or sparse if `sparse`.
fn write_image(path: &Path, size: u64, seed: u64, sparse: bool) {
    let f = File::create(path).expect("create");
    f.set_len(size).expect("set_len");
    if sparse {
        return;
    }
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut off = 0;
    while off < size {
        for c in buf.chunks_mut(4096) {
            fill_chunk(&mut rng, c);
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
}

/// A base registered from `disk` and `memory` (linked, not copied).
fn add_base(dir: &Path, disk: &Path, memory: &Path) -> (Registry, Base) {
    let reg = Registry::open(&dir.join("home")).expect("registry");
    let req = AddBase {
        disk: disk.into(),
        memory: memory.into(),
        link: true,
        threads: 2,
        ..Default::default()
    };
    let base = reg.add(&req, &Default::default()).expect("add base");
    (reg, base)
}

/// A custom VM: copies of the base (reflinked/sparse via `cp --sparse=always`) with `chunks`
/// random new chunks in each image; returns its overlay.
fn make_overlay(
    dir: &Path,
    base: &Base,
    chunks: u64,
    codec: Codec,
    segment: usize,
    seed: u64,
) -> PathBuf {
    let cd = dir.join(format!("custom-disk-{seed}.img"));
    let cm = dir.join(format!("custom-memory-{seed}.img"));
    for (src, dst) in [(base.disk_path(), &cd), (base.memory_path(), &cm)] {
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg(&src)
            .arg(dst)
            .status()
            .expect("cp");
        assert!(st.success());
    }
    let mut rng = Rng::new(seed);
    let mut picked = [Vec::new(), Vec::new()];
    for (i, p) in [&cd, &cm].into_iter().enumerate() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .expect("open custom");
        let n = f.metadata().expect("meta").len() / 4096;
        let mut c = vec![0u8; 4096];
        for _ in 0..chunks {
            let k = rng.below(n);
            loop {
                fill_chunk(&mut rng, &mut c);
                if c.iter().any(|&b| b != 0) {
                    break;
                }
            }
            c[0] ^= 0x5a;
            f.write_all_at(&c, k * 4096).expect("write chunk");
            picked[i].push(k);
        }
        picked[i].sort_unstable();
        picked[i].dedup();
    }
    let custom = CustomImages {
        disk: cd,
        memory: cm,
        device_state: None,
    };
    let out = dir.join(format!("overlay-{seed}.cld"));
    let opts = CreateOptions {
        codec,
        level: codec.default_level(),
        segment_size: segment,
        threads: 2,
        disk_chunks: Some(picked[0].clone()),
        memory_chunks: Some(picked[1].clone()),
        ..Default::default()
    };
    let index = base.index().expect("index");
    create_overlay(base, &index, &custom, &out, &opts, &Default::default())
        .expect("create overlay");
    out
}

/// One timed read of a file, cold cache: what it moved per second, and the CPU time the whole
/// machine spent meanwhile (busy ticks, 1/100 s, steal excluded).
struct Timed {
    rate: f64,
    cpu_ticks: u64,
}

/// Times `read` (which returns the bytes it read) with a cold page cache.
fn timed(read: impl FnOnce() -> u64) -> Timed {
    drop_caches();
    measured(read)
}

/// Times `read` (which returns the bytes it read) in the page cache's present state.
fn measured(read: impl FnOnce() -> u64) -> Timed {
    let before = busy_ticks();
    let t = Instant::now();
    let bytes = read();
    let secs = t.elapsed().as_secs_f64();
    Timed {
        rate: bytes as f64 / secs,
        cpu_ticks: busy_ticks().saturating_sub(before),
    }
}

/// Reads the whole file, 1 MiB at a time; returns the bytes read.
fn seq_read(path: &Path) -> u64 {
    let mut f = File::open(path).expect("open");
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

/// `n` reads of 4 KiB at random chunk offsets below `size` (the same offsets every call);
/// returns the bytes read.
fn rand_read(path: &Path, size: u64, n: usize) -> u64 {
    let f = File::open(path).expect("open");
    let mut rng = Rng::new(99);
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        let off = rng.below(size / 4096) * 4096;
        f.read_exact_at(&mut buf, off).expect("pread");
    }
    n as u64 * 4096
}

/// Busy CPU ticks of the whole machine since boot (user, nice, system, irq, softirq).
fn busy_ticks() -> u64 {
    let v = cpu_fields();
    [0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum()
}

/// The figures of one kind of read, one pair per round: `a` the reference (the base file read
/// directly, or build A), `b` the side measured against it.
#[derive(Default)]
struct Pairs {
    a: Vec<Timed>,
    b: Vec<Timed>,
}

impl Pairs {
    /// A table row: medians of each side, the median and range of the per-round ratios, and
    /// CPU time per GiB read on each side (medians).
    fn row(&self, what: &str, unit: f64, unit_name: &str, gib: f64) {
        let med = |v: Vec<f64>| {
            let mut v = v;
            percentile(&mut v, 0.5)
        };
        let rates = |t: &[Timed]| t.iter().map(|t| t.rate / unit).collect::<Vec<_>>();
        let cpu = |t: &[Timed]| med(t.iter().map(|t| t.cpu_ticks as f64 / 100.0 / gib).collect());
        let mut ratios: Vec<f64> = self
            .b
            .iter()
            .zip(&self.a)
            .map(|(b, a)| b.rate / a.rate)
            .collect();
        let (lo, hi) = spread(&ratios);
        println!(
            "| {what} | {:.2} {unit_name} | {:.2} {unit_name} | **{:.2}** | {lo:.2}–{hi:.2} | {:.2} s | {:.2} s |",
            med(rates(&self.a)),
            med(rates(&self.b)),
            percentile(&mut ratios, 0.5),
            cpu(&self.a),
            cpu(&self.b),
        );
    }
}

/// A read of a file to time (it returns the bytes it read).
type FileRead<'a> = &'a dyn Fn(&Path) -> u64;

/// One side of a throughput comparison: times the read it is given.
type Side<'a> = &'a dyn Fn(FileRead<'_>) -> Timed;

/// Random reads per round of the throughput benches.
const RANDOM_READS: usize = 20_000;

/// What the throughput benches read: a scratch base of `CLOUDLETFS_BENCH_GIB` GiB of random
/// disk (and 64 MiB of memory), an overlay that changes 16 chunks, and the number of rounds
/// (`CLOUDLETFS_BENCH_ROUNDS`).
struct ThroughputSetup {
    dir: tempfile::TempDir,
    _reg: Registry,
    base: Base,
    overlay: PathBuf,
    gib: u64,
    rounds: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl ThroughputSetup {
    fn new() -> Self {
        let gib = env_or("CLOUDLETFS_BENCH_GIB", 1u64);
        let dir = scratch();
        let (disk, mem) = (dir.path().join("disk.img"), dir.path().join("mem.img"));
        write_image(&disk, gib << 30, 1, false);
        write_image(&mem, 64 * MIB, 2, false);
        let (reg, base) = add_base(dir.path(), &disk, &mem);
        let overlay = make_overlay(dir.path(), &base, 16, Codec::Zstd, 4 << 20, 3);
        ThroughputSetup {
            dir,
            _reg: reg,
            base,
            overlay,
            gib,
            rounds: env_or("CLOUDLETFS_BENCH_ROUNDS", 7usize),
        }
    }

    /// Reads the disk image whole, then at random, through `side_a` and `side_b` (each given
    /// a read to time and returning its timing), taking turns at going first round by round;
    /// returns the sequential and the random pairs.
    fn alternate(
        &self,
        side_a: impl Fn(FileRead<'_>) -> Timed,
        side_b: impl Fn(FileRead<'_>) -> Timed,
    ) -> (Pairs, Pairs) {
        let size = self.gib << 30;
        let (mut seq, mut rand) = (Pairs::default(), Pairs::default());
        for round in 0..self.rounds {
            let b_first = round % 2 == 1;
            for b in [b_first, !b_first] {
                let (side, seq, rand): (Side<'_>, _, _) = if b {
                    (&side_b, &mut seq.b, &mut rand.b)
                } else {
                    (&side_a, &mut seq.a, &mut rand.a)
                };
                seq.push(side(&seq_read));
                rand.push(side(&|p| rand_read(p, size, RANDOM_READS)));
            }
        }
        (seq, rand)
    }

    /// Prints the two rows of a throughput table.
    fn rows(&self, seq: &Pairs, rand: &Pairs) {
        seq.row("sequential 1 MiB", 1e9, "GB/s", self.gib as f64);
        rand.row(
            &format!("random 4 KiB ({RANDOM_READS} reads)"),
            1e6,
            "MB/s",
            (RANDOM_READS as u64 * 4096) as f64 / (1u64 << 30) as f64,
        );
        println!();
    }
}

/// Times `read` of the disk image through a fresh cloudletfs mount of the setup's base and
/// overlay (pages mapped by a daemon survive `drop_caches`, hence one mount per measurement).
/// With `warm_base`, the base file is read into the page cache after the caches are dropped,
/// so that only the FUSE side is cold.
fn timed_mount(t: &ThroughputSetup, read: FileRead<'_>, warm_base: bool) -> Timed {
    let mnt = scratch();
    let mut o = MountOptions::new(
        t.base.clone(),
        OverlaySource::Path(t.overlay.clone()),
        mnt.path(),
    );
    o.cache_dir = Some(t.dir.path().into());
    let m = mount(o).expect("mount");
    let image = mnt.path().join("disk/image");
    let r = if warm_base {
        drop_caches();
        seq_read(&t.base.disk_path());
        measured(|| read(&image))
    } else {
        timed(|| read(&image))
    };
    drop(m);
    r
}

fn throughput() {
    let t = ThroughputSetup::new();
    let direct = t.base.disk_path();
    let (seq, rand) = t.alternate(
        |read| timed(|| read(&direct)),
        |read| timed_mount(&t, read, false),
    );
    let warm: Vec<Timed> = (0..t.rounds)
        .map(|_| timed_mount(&t, &seq_read, true))
        .collect();
    println!(
        "### Base-only reads, cold cache ({} GiB base disk, 16 changed chunks, {} rounds)\n",
        t.gib, t.rounds
    );
    println!(
        "Each round reads the base file directly and through a fresh cloudletfs mount, taking \
         turns at going first; figures are medians over the rounds. *Ratio range*: the \
         slowest and fastest round. *CPU per GiB*: busy time of the whole machine (both \
         sides of FUSE, kernel included) per GiB read.\n"
    );
    println!(
        "| read | direct (base file) | cloudletfs | ratio | ratio range \
         | CPU per GiB, direct | CPU per GiB, cloudletfs |"
    );
    println!("|---|---|---|---|---|---|---|");
    t.rows(&seq, &rand);
    let mut rates: Vec<f64> = warm.iter().map(|w| w.rate / 1e9).collect();
    let mut cpu: Vec<f64> = warm
        .iter()
        .map(|w| w.cpu_ticks as f64 / 100.0 / t.gib as f64)
        .collect();
    let (lo, hi) = spread(&rates);
    println!(
        "FUSE side alone (the base file read into the page cache first, the mount fresh), \
         sequential 1 MiB through cloudletfs: **{:.2} GB/s** (rounds {lo:.2}–{hi:.2}), CPU \
         per GiB {:.2} s. This is cloudletfs's own ceiling, whatever the disk delivers.\n",
        percentile(&mut rates, 0.5),
        percentile(&mut cpu, 0.5),
    );
}

/// The smallest and the largest of `v`.
fn spread(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::MAX, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Mounts per configuration, enough for ~500 first reads (a p99 that is not just the
/// second-slowest read), at most 8.
fn latency_rounds(segments: usize) -> usize {
    500usize.div_ceil(segments.max(1)).clamp(1, 8)
}

fn latency() {
    println!(
        "### First read of a pending chunk (local overlay, no background filler, O_DIRECT 4 KiB)\n"
    );
    println!(
        "Each mount reads the first payload chunk of every segment, in segment order, right \
         after dropping the page cache; a configuration is mounted several times afresh and all \
         reads count, the first of each mount included. *Ready again*: the same chunks read \
         once more (now rebuilt, no decode): the FUSE round trip alone, i.e. this machine's \
         floor. *Steal*: CPU time the hypervisor took from this VM during the configuration. \
         *Cache*: where rebuilt chunks go: memory (the default when they fit) or a file on \
         ext4 (`--cache-memory-mib 0`); the two are mounted in turn, round by round.\n"
    );
    println!(
        "| codec | segment | cache | mounts | samples | p50 | p99 | max \
         | first after mount (median) | ready again p50 / p99 | steal |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let dir = scratch();
    let (disk, mem) = (dir.path().join("disk.img"), dir.path().join("mem.img"));
    write_image(&disk, 256 * MIB, 4, false);
    write_image(&mem, 64 * MIB, 5, false);
    let (_reg, base) = add_base(dir.path(), &disk, &mem);
    let mut seed = 10;
    // `fs latency zstd` (or xz) measures one codec only.
    let only = std::env::args().nth(2).filter(|a| !a.starts_with('-'));
    for codec in [Codec::Xz, Codec::Zstd] {
        if only.as_deref().is_some_and(|o| o != codec.name()) {
            continue;
        }
        for segment in [256usize << 10, 1 << 20, 16 << 20] {
            seed += 1;
            // 6144 new chunks per image (~48 MiB in all): about 12 (4 MiB) or 48 (1 MiB) segments.
            let overlay = make_overlay(dir.path(), &base, 6_144, codec, segment, seed);
            let ov = cloudlet_e2e::open_overlay(&overlay).expect("open");
            let meta = ov.metadata();
            latency_rows(dir.path(), &base, &overlay, meta, codec, segment);
        }
    }
    println!();
}

/// Where a latency row keeps its rebuilt chunks: (name, `MountOptions::cache_memory`).
const CACHES: [(&str, Option<u64>); 2] = [("memory", None), ("disk", Some(0))];

/// The first reads of one cache configuration.
#[derive(Default)]
struct Row {
    samples: Vec<f64>,
    firsts: Vec<f64>,
    again: Vec<f64>,
    slow: Vec<String>,
    steal: (u64, u64),
}

/// Mounts `overlay` [`latency_rounds`] times per cache configuration, alternating them (and
/// which goes first) so that both see the same machine, and prints a row of first reads for
/// each.
fn latency_rows(
    dir: &Path,
    base: &Base,
    overlay: &Path,
    meta: &synth::format::Metadata,
    codec: Codec,
    segment: usize,
) {
    let rounds = latency_rounds(meta.segments.len());
    let mut rows: Vec<Row> = CACHES.iter().map(|_| Row::default()).collect();
    for round in 0..rounds {
        // Each configuration goes first every other round.
        for i in 0..CACHES.len() {
            let i = if round % 2 == 0 {
                i
            } else {
                CACHES.len() - 1 - i
            };
            let (row, cache_memory) = (&mut rows[i], CACHES[i].1);
            let before = cpu_ticks();
            let (samples, again) = first_reads(dir, base, overlay, meta, cache_memory);
            let after = cpu_ticks();
            row.steal.0 += after.0.saturating_sub(before.0);
            row.steal.1 += after.1.saturating_sub(before.1);
            row.again.extend(again);
            // The slow reads, in read order, so a tail can be told from a warm-up.
            let mut sorted = samples.clone();
            let p50 = percentile(&mut sorted, 0.5);
            row.slow.extend(
                samples
                    .iter()
                    .enumerate()
                    .filter(|(_, &t)| t > 4.0 * p50)
                    .map(|(i, t)| format!("{round}#{i}: {t:.2} ms")),
            );
            row.firsts.extend(samples.first().copied());
            row.samples.extend(samples);
        }
    }
    let (codec, kib) = (codec.name(), segment >> 10);
    for (mut row, &(cache, _)) in rows.into_iter().zip(&CACHES) {
        eprintln!(
            "{codec} {kib} KiB, cache in {cache}: reads slower than 4x p50 (mount#read): {}",
            if row.slow.is_empty() {
                "none".to_string()
            } else {
                row.slow.join(", ")
            }
        );
        let n = row.samples.len();
        let (p50, p99) = (
            percentile(&mut row.samples, 0.5),
            percentile(&mut row.samples, 0.99),
        );
        let max = row.samples.last().copied().unwrap_or(0.0);
        let first = percentile(&mut row.firsts, 0.5);
        let steal = steal_percent(row.steal);
        let (a50, a99) = (
            percentile(&mut row.again, 0.5),
            percentile(&mut row.again, 0.99),
        );
        println!(
            "| {codec} | {kib} KiB | {cache} | {rounds} | {n} | {p50:.2} ms | {p99:.2} ms \
             | {max:.2} ms | {first:.2} ms | {a50:.2} / {a99:.2} ms | {steal:.1}% |"
        );
    }
}

/// The tick counts of the first line of /proc/stat (all CPUs since boot).
fn cpu_fields() -> Vec<u64> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// (all, steal) CPU ticks since boot.
fn cpu_ticks() -> (u64, u64) {
    let v = cpu_fields();
    (v.iter().take(8).sum(), v.get(7).copied().unwrap_or(0))
}

/// Steal as a percentage of (all, steal) CPU ticks.
fn steal_percent((all, steal): (u64, u64)) -> f64 {
    100.0 * steal as f64 / all.max(1) as f64
}

/// Mounts `overlay` afresh (no background filler, the given `cache_memory`), drops the page
/// cache and times the first read of the first payload chunk of every segment, in segment
/// order, then the same reads again (ms).
fn first_reads(
    dir: &Path,
    base: &Base,
    overlay: &Path,
    meta: &synth::format::Metadata,
    cache_memory: Option<u64>,
) -> (Vec<f64>, Vec<f64>) {
    let mnt = scratch();
    let mut o = MountOptions::new(
        base.clone(),
        OverlaySource::Path(overlay.to_path_buf()),
        mnt.path(),
    );
    o.cache_dir = Some(dir.into());
    o.background_fill = false;
    o.cache_memory = cache_memory;
    let m = mount(o).expect("mount");
    drop_caches();
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(mnt.path().join(name))
            .expect("open")
    };
    let files = [open("disk/image"), open("memory/image")];
    let mut buf = vec![0u8; 4096];
    // The first payload chunk of each segment: certainly still pending.
    let chunks: Vec<_> = meta
        .segments
        .iter()
        .filter_map(|s| s.chunks.first().copied())
        .collect();
    let mut time_reads = || -> Vec<f64> {
        chunks
            .iter()
            .map(|&(kind, chunk)| {
                let f = &files[usize::from(kind == synth::ImageKind::Memory)];
                let t = Instant::now();
                f.read_exact_at(&mut buf, chunk * 4096).expect("read");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect()
    };
    let first = time_reads();
    let again = time_reads();
    drop(files);
    drop(m);
    (first, again)
}

fn rss_kib(pid: u32) -> (u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssAnon:"), get("RssFile:"))
}

/// Bytes held by a daemon's in-memory caches of rebuilt chunks (its memfds named
/// [`cloudletfs::MEMORY_CACHE_NAME`]; they are not mapped, so RSS does not show them).
fn memory_cache_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let memfd = format!("/memfd:{}", cloudletfs::MEMORY_CACHE_NAME.to_string_lossy());
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with(&memfd))
        })
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn read_span(path: &Path, len: u64) {
    let f = File::open(path).expect("open");
    let mut buf = vec![0u8; MIB as usize];
    let size = f.metadata().expect("meta").len();
    let step = (size / (len / MIB)).max(MIB) / MIB * MIB;
    let mut off = 0;
    while off < size {
        f.read_exact_at(&mut buf, off).expect("read");
        off += step;
    }
}

fn rss() {
    println!(
        "### Daemon RSS (sparse base images, 8192 changed chunks per image, background fill on)\n"
    );
    println!(
        "| images | after mount | after background fill | after reading 1 GiB spread over both \
         | of which anon / file | cache of rebuilt chunks in memory |"
    );
    println!("|---|---|---|---|---|---|");
    for (disk_gib, mem_mib) in [(1u64, 256u64), (8, 2048)] {
        let dir = scratch();
        let (disk, mem) = (dir.path().join("disk.img"), dir.path().join("mem.img"));
        write_image(&disk, disk_gib << 30, 0, true);
        write_image(&mem, mem_mib * MIB, 0, true);
        let (_reg, base) = add_base(dir.path(), &disk, &mem);
        let overlay = make_overlay(dir.path(), &base, 8192, Codec::Zstd, 4 << 20, 77);
        let daemon = Daemon::start(
            Path::new(env!("CARGO_BIN_EXE_cloudletfs")),
            dir.path(),
            &base,
            &overlay,
        );
        let mnt_path = daemon.mnt.clone();
        let pid = daemon.child.id();
        let a = rss_kib(pid).0;
        let t = Instant::now();
        loop {
            let s = std::fs::read_to_string(mnt_path.join("disk/stats")).unwrap_or_default();
            if s.contains("\"filler_done\": true") || t.elapsed() > Duration::from_secs(300) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let b = rss_kib(pid).0;
        read_span(&mnt_path.join("disk/image"), 768 * MIB);
        read_span(&mnt_path.join("memory/image"), 256 * MIB);
        let (c, anon, file) = rss_kib(pid);
        println!(
            "| {disk_gib} GiB + {mem_mib} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} / {:.1} MiB \
             | {:.1} MiB |",
            a as f64 / 1024.0,
            b as f64 / 1024.0,
            c as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0,
            memory_cache_bytes(pid) as f64 / MIB as f64
        );
        drop(daemon);
    }
    println!();
}

/// A `cloudletfs` daemon (the binary at `bin`) serving `overlay` on a scratch mount point, in
/// the foreground; stopped (SIGTERM, which unmounts) when dropped.
struct Daemon {
    child: std::process::Child,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon (registry and cache in `dir`) and waits until it has mounted.
    fn start(bin: &Path, dir: &Path, base: &Base, overlay: &Path) -> Daemon {
        let mnt_dir = scratch();
        let mnt = mnt_dir.path().canonicalize().expect("canon");
        let child = Command::new(bin)
            .arg(&base.record.id)
            .arg(overlay)
            .arg(&mnt)
            .arg("--home")
            .arg(dir.join("home"))
            .arg("--cache-dir")
            .arg(dir)
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let t = Instant::now();
        while !is_mounted(&mnt) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "daemon did not mount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            mnt,
            _dir: mnt_dir,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// `fs ab A B`: two builds of the `cloudletfs` binary, compared on the throughput bench's
/// base-only reads, taking turns round by round (this machine's speed drifts by 2x within
/// minutes, so only reads alternated in the same minutes compare).
fn ab(a: &Path, b: &Path) {
    let t = ThroughputSetup::new();
    let through = |bin: &Path, read: FileRead<'_>| {
        let d = Daemon::start(bin, t.dir.path(), &t.base, &t.overlay);
        timed(|| read(&d.mnt.join("disk/image")))
    };
    let (seq, rand) = t.alternate(|read| through(a, read), |read| through(b, read));
    println!(
        "### A/B: base-only reads through two builds ({} rounds, alternated)\n",
        t.rounds
    );
    println!(
        "A: `{}`, B: `{}`; medians over the rounds.\n",
        a.display(),
        b.display()
    );
    println!("| read | A | B | B / A | range | CPU per GiB, A | CPU per GiB, B |");
    println!("|---|---|---|---|---|---|---|");
    t.rows(&seq, &rand);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    println!(
        "## cloudletfs benchmarks — {} — {} cores, {cpu}\n",
        String::from_utf8_lossy(&date).trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("throughput") {
        throughput();
    }
    if run("latency") {
        latency();
    }
    if run("rss") {
        rss();
    }
    // Not part of the default run: it needs two binaries.
    if only.as_deref() == Some("ab") {
        let bins: Vec<PathBuf> = std::env::args()
            .skip(2)
            .take(2)
            .map(PathBuf::from)
            .collect();
        match bins.as_slice() {
            [a, b] => ab(a, b),
            _ => eprintln!("usage: fs ab CLOUDLETFS_A CLOUDLETFS_B"),
        }
    }
}
