//! Shared helpers of cloudlet's end-to-end tests: seeded image generators and a registry in a
//! temporary folder. Fixtures are generated from a seed at test time, never committed.

// Fixture sizes are small; truncating casts cannot happen here.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::path::{Path, PathBuf};
use synth::chunk::CHUNK_SIZE;
use synth::registry::{AddBase, Base, Registry};

/// A small deterministic generator (SplitMix64), so fixtures depend only on their seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Fills one chunk with data of a random kind: zeros, text-like (compressible) or random.
pub fn fill_chunk(rng: &mut Rng, chunk: &mut [u8]) {
    match rng.below(4) {
        0 => chunk.fill(0),
        1 => rng.fill(chunk),
        _ => {
            const WORDS: [&[u8]; 8] = [
                b"cloudlet ",
                b"overlay ",
                b"chunk ",
                b"kernel ",
                b"\n",
                b"0x1f ",
                b"page ",
                b"vm ",
            ];
            let mut i = 0;
            while i < chunk.len() {
                let w = WORDS[rng.below(8) as usize];
                let n = w.len().min(chunk.len() - i);
                chunk[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
    }
}

/// A random image of `size` bytes.
pub fn random_image(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    for c in v.chunks_mut(CHUNK_SIZE) {
        fill_chunk(rng, c);
    }
    v
}

/// Which modifications [`mutate`] applies, as counts of chunks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mutations {
    /// Chunks replaced by new data.
    pub new: usize,
    /// Chunks zeroed.
    pub zero: usize,
    /// Chunks copied from anywhere in the base disk or memory.
    pub from_base: usize,
    /// Chunks copied from another chunk of the custom images (disk or memory).
    pub repeated: usize,
}

/// Applies `m` at random places of `disk` and `memory` (the custom images, starting as copies
/// of the base images `base_disk` and `base_memory`).
pub fn mutate(
    rng: &mut Rng,
    base_disk: &[u8],
    base_memory: &[u8],
    disk: &mut [u8],
    memory: &mut [u8],
    m: Mutations,
) {
    /// A random whole chunk of `a` or `b`; `None` when neither holds a whole chunk.
    fn pick<'a>(rng: &mut Rng, a: &'a mut [u8], b: &'a mut [u8]) -> Option<&'a mut [u8]> {
        let (na, nb) = (a.len() / CHUNK_SIZE, b.len() / CHUNK_SIZE);
        if na == 0 && nb == 0 {
            return None;
        }
        Some(if nb == 0 || (na > 0 && rng.below(2) == 0) {
            let i = rng.below(na as u64) as usize * CHUNK_SIZE;
            &mut a[i..i + CHUNK_SIZE]
        } else {
            let i = rng.below(nb as u64) as usize * CHUNK_SIZE;
            &mut b[i..i + CHUNK_SIZE]
        })
    }
    for _ in 0..m.new {
        let mut c = vec![0u8; CHUNK_SIZE];
        fill_chunk(rng, &mut c);
        c[0] = c[0].wrapping_add(1) | 1;
        if let Some(dst) = pick(rng, disk, memory) {
            dst.copy_from_slice(&c);
        }
    }
    for _ in 0..m.zero {
        if let Some(dst) = pick(rng, disk, memory) {
            dst.fill(0);
        }
    }
    for _ in 0..m.from_base {
        let src = if rng.below(2) == 0 && base_disk.len() >= CHUNK_SIZE {
            let i = rng.below((base_disk.len() / CHUNK_SIZE) as u64) as usize * CHUNK_SIZE;
            base_disk[i..i + CHUNK_SIZE].to_vec()
        } else if base_memory.len() >= CHUNK_SIZE {
            let i = rng.below((base_memory.len() / CHUNK_SIZE) as u64) as usize * CHUNK_SIZE;
            base_memory[i..i + CHUNK_SIZE].to_vec()
        } else {
            continue;
        };
        if let Some(dst) = pick(rng, disk, memory) {
            dst.copy_from_slice(&src);
        }
    }
    for _ in 0..m.repeated {
        let Some(src) = pick(rng, disk, memory).map(|c| c.to_vec()) else {
            break;
        };
        if let Some(dst) = pick(rng, disk, memory) {
            dst.copy_from_slice(&src);
        }
    }
}

/// A temporary registry with one base.
pub struct Fixture {
    /// Temporary folder holding everything.
    pub dir: tempfile::TempDir,
    /// The registry.
    pub registry: Registry,
    /// The registered base.
    pub base: Base,
    /// Base disk bytes.
    pub base_disk: Vec<u8>,
    /// Base memory bytes.
    pub base_memory: Vec<u8>,
}

impl Fixture {
    /// Writes the base images and registers them.
    pub fn new(base_disk: Vec<u8>, base_memory: Vec<u8>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(&dir.path().join("home")).expect("registry");
        let disk = dir.path().join("base-disk.img");
        let memory = dir.path().join("base-memory.img");
        std::fs::write(&disk, &base_disk).expect("write disk");
        std::fs::write(&memory, &base_memory).expect("write memory");
        let req = AddBase {
            disk,
            memory,
            threads: 2,
            ..Default::default()
        };
        let base = registry.add(&req, &Default::default()).expect("add base");
        Fixture {
            dir,
            registry,
            base,
            base_disk,
            base_memory,
        }
    }

    /// A seeded base of the given sizes.
    pub fn seeded(seed: u64, disk_size: usize, memory_size: usize) -> Self {
        let mut rng = Rng::new(seed);
        let d = random_image(&mut rng, disk_size);
        let m = random_image(&mut rng, memory_size);
        Self::new(d, m)
    }

    /// Path inside the fixture folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes custom images and returns their paths.
    pub fn write_custom(&self, disk: &[u8], memory: &[u8]) -> synth::create::CustomImages {
        let d = self.path("custom-disk.img");
        let m = self.path("custom-memory.img");
        std::fs::write(&d, disk).expect("write custom disk");
        std::fs::write(&m, memory).expect("write custom memory");
        synth::create::CustomImages {
            disk: d,
            memory: m,
            device_state: None,
        }
    }

    /// Creates an overlay of `custom` with `opts` at `out`.
    pub fn diff(
        &self,
        custom: &synth::create::CustomImages,
        out: &Path,
        opts: &synth::create::CreateOptions,
    ) -> synth::create::CreateStats {
        let index = self.base.index().expect("index");
        synth::create::create_overlay(&self.base, &index, custom, out, opts, &Default::default())
            .expect("create overlay")
    }
}

/// Opens an overlay file with full validation.
pub fn open_overlay(path: &Path) -> Result<synth::format::Overlay, synth::format::FormatError> {
    let src = synth::source::FileSource::open(path).map_err(|e| {
        synth::format::FormatError::Source(synth::source::SourceError::Io {
            offset: 0,
            len: 0,
            source: e,
        })
    })?;
    synth::format::Overlay::open(std::sync::Arc::new(src))
}

/// Path of a workspace binary (`cloudlet`, `cloudletfs`), built by `cargo test --workspace`
/// next to this test binary's `deps/` folder.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

/// Runs the `cloudlet` binary with `CLOUDLET_HOME=home`; returns (exit code, stdout, stderr).
pub fn cloudlet(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(workspace_bin("cloudlet"))
        .env("CLOUDLET_HOME", home)
        .args(args)
        .output()
        .expect("run cloudlet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The test guest built by `tools/guest/build-guest.sh` (cached), with a disk of `disk_mb` MiB.
pub struct Guest {
    /// Folder with `vmlinuz`, `initrd.img`, `disk.img`, `guest.json`.
    pub dir: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
}

/// Builds (or finds in its cache) the test guest with a `disk_mb` MiB disk: in
/// `$CLOUDLET_GUEST_DIR` (or its sibling `…-{disk_mb}` for other sizes) when set, else in
/// build-guest.sh's default folder, which is named after its recipe. The script returns at
/// once when the folder holds the current recipe, and rebuilds it otherwise; builds of one
/// folder are serialised.
pub fn guest(disk_mb: u64) -> Guest {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/guest/build-guest.sh");
    let mut build = std::process::Command::new(script);
    build.env("GUEST_DISK_MB", disk_mb.to_string());
    if let Some(root) = std::env::var_os("CLOUDLET_GUEST_DIR").map(PathBuf::from) {
        build.arg(if disk_mb == 256 {
            root
        } else {
            root.with_file_name(format!("cloudlet-guest-{disk_mb}"))
        });
    }
    let out = build
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run build-guest.sh");
    assert!(out.status.success(), "{script} failed: {}", out.status);
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("guest dir:"))
            .expect("build-guest.sh names its guest dir")
            .trim(),
    );
    let json = dir.join("guest.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("guest.json"))
        .expect("guest.json parses");
    Guest {
        cmdline: v["cmdline"].as_str().expect("cmdline").to_owned(),
        dir,
    }
}

/// The stock Debian bookworm guest built by `tools/guest/build-debian.sh` (systemd, root
/// autologin on ttyS0, qemu-guest-agent, cloud-init, Python with Flask and numpy): a partitioned
/// raw disk that boots by itself (GRUB) or with its own kernel and initrd (direct kernel boot).
/// The build is cached in `<target>/guest-cache/debian-bookworm`; see `guest.json` there.
#[derive(Debug, Clone)]
pub struct DebianGuest {
    /// Folder with `disk.img`, `vmlinuz`, `initrd.img` and the manifest `guest.json`.
    pub dir: PathBuf,
    /// Kernel command line for direct kernel boot (`root=LABEL=…`, console on ttyS0).
    pub cmdline: String,
    /// Root's shell prompt on the serial console once the guest is up
    /// (`root@cloudlet-debian:~#`).
    pub ready_prompt: String,
    /// Guest RAM the manifest suggests, in MiB.
    pub memory_mb: u64,
    /// Name of the virtio-serial port qemu-guest-agent listens on.
    pub agent_port: String,
}

impl DebianGuest {
    /// The raw disk image (never boot it writable: copy it, or boot with `-snapshot`).
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    /// The guest's kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The guest's initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
}

/// Where [`debian_guest`] keeps the guest: `$CLOUDLET_DEBIAN_GUEST_DIR`, else
/// `guest-cache/debian-bookworm` in the cargo target folder of this test binary.
pub fn debian_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLOUDLET_DEBIAN_GUEST_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary lives in <target>/<profile>/deps");
    target.join("guest-cache").join("debian-bookworm")
}

/// The Debian guest, built on first use by `tools/guest/build-debian.sh` (minutes; needs root
/// and Debian's mirror) and reused while the script is unchanged. Parallel tests (threads or
/// processes) wait on a lock file, so the guest is built once. `None` when this machine cannot
/// build it (not root, or a build tool missing): the test is skipped, except under `CI=true`
/// where that fails.
pub fn debian_guest() -> Option<DebianGuest> {
    let dir = debian_guest_dir();
    let parent = dir.parent().expect("guest folder has a parent");
    std::fs::create_dir_all(parent).expect("create the guest cache folder");
    // Not the script's own lock (`.lock` inside the folder): flock would then wait for itself.
    let lock = std::fs::File::create(parent.join("debian-bookworm.lock"))
        .expect("create the guest lock file");
    lock.lock().expect("lock the guest lock file");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tools/guest/build-debian.sh"
    );
    // Fast when the cached build is current: the script compares its own hash with the one
    // recorded in guest.json. Its progress goes straight to stderr (a build takes minutes).
    let status = std::process::Command::new(script)
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run build-debian.sh");
    drop(lock);
    // Exit status 3: this machine lacks what a build needs (root, a tool); the script said which.
    if status.code() == Some(3) {
        skip("cannot build the Debian guest here (build-debian.sh said why above)");
        return None;
    }
    assert!(status.success(), "{script} failed ({status})");
    let manifest = dir.join("guest.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("read guest.json"))
            .expect("guest.json parses");
    let field = |name: &str| {
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {}", manifest.display()))
            .to_owned()
    };
    Some(DebianGuest {
        cmdline: field("cmdline"),
        ready_prompt: field("ready_prompt"),
        agent_port: field("guest_agent_port"),
        memory_mb: v["memory_mb"].as_u64().expect("memory_mb in guest.json"),
        dir,
    })
}

/// Whether QEMU can run here; `false` skips a test, except under `CI=true` where it fails.
pub fn require_qemu() -> bool {
    let ok = synth::vm::qemu_binary().is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "QEMU is required when CI=true"
        );
        eprintln!("skipping: qemu-system-x86_64 not found");
    }
    ok
}

/// The lock every test that runs a VM holds: one QEMU at a time (TCG on a small machine).
pub fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    static VM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copies `src` to `dst`, leaving all-zero MiB blocks as holes.
pub fn sparse_copy(src: &Path, dst: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut input = std::fs::File::open(src).expect("open the copy's source");
    let mut output = std::fs::File::create(dst).expect("create the copy");
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = input.read(&mut buf).expect("read the copy's source");
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            output.seek(SeekFrom::Start(pos)).expect("seek in the copy");
            output.write_all(&buf[..n]).expect("write the copy");
        }
        pos += n as u64;
    }
    output.set_len(pos).expect("size the copy");
}

/// Whether FUSE can be used here; `false` skips a test, except under `CI=true`.
pub fn require_fuse() -> bool {
    let ok = Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/fuse is required when CI=true"
        );
        eprintln!("skipping: /dev/fuse not present");
    }
    ok
}

/// libvirt connection URI the tests use.
pub const LIBVIRT_URI: &str = "qemu:///system";

/// Skips (returns `false`, or fails under `CI=true`) with `why`.
pub fn skip(why: &str) -> bool {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{why} (required when CI=true)"
    );
    eprintln!("skipping: {why}");
    false
}

/// Whether `virsh` reaches libvirtd at [`LIBVIRT_URI`].
fn libvirtd_answers() -> bool {
    std::process::Command::new("virsh")
        .args(["-c", LIBVIRT_URI, "version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the libvirt backend can run here: the `cloudlet` binary was built with the
/// `libvirt` feature and libvirtd answers, started here (`virtlogd -d`, `libvirtd -d`) if it
/// was not running. `false` skips a test, except under `CI=true` where it fails.
pub fn require_libvirt(home: &Path) -> bool {
    // The backend check comes before anything else, so a made-up base is enough.
    let (code, _, err) = cloudlet(
        home,
        &["synthesis", "none", "none.overlay", "--backend", "libvirt"],
    );
    if code == 2 && err.contains("without libvirt support") {
        return skip("cloudlet was built without the libvirt feature (--features libvirt)");
    }
    libvirt_daemon_ready()
}

/// Whether libvirtd answers at [`LIBVIRT_URI`], started here (`virtlogd -d`, `libvirtd -d`) if
/// it was not running. `false` skips a test, except under `CI=true` where it fails.
pub fn libvirt_daemon_ready() -> bool {
    if libvirtd_answers() {
        return true;
    }
    // No service manager assumed: start the daemons by hand, as root.
    let _ = std::fs::create_dir_all("/run/libvirt");
    for daemon in ["virtlogd", "libvirtd"] {
        // Fails harmlessly when the daemon is already running.
        let started = std::process::Command::new(daemon)
            .arg("-d")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if started.is_err() {
            return skip(&format!(
                "{daemon} not found (install libvirt-daemon-system)"
            ));
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if libvirtd_answers() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    skip(&format!(
        "libvirtd did not answer at {LIBVIRT_URI} after starting it"
    ))
}

/// Whether libvirt at [`LIBVIRT_URI`] knows a domain called `name`.
pub fn libvirt_domain_exists(name: &str) -> bool {
    std::process::Command::new("virsh")
        .args(["-c", LIBVIRT_URI, "domstate", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One HTTP/1.0 GET on 127.0.0.1:`port`; the body of a 200 reply.
pub fn try_http_get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {reply:?}"))?;
    if !head.lines().next().unwrap_or("").contains(" 200") {
        return Err(format!("not 200: {head:?}"));
    }
    Ok(body.to_owned())
}

/// GETs until a 200 reply or `timeout`.
pub fn http_get(port: u16, path: &str, timeout: std::time::Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match try_http_get(port, path) {
            Ok(body) => return body,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("GET {path} on port {port} failed: {e}"),
        }
    }
}

/// `count=N uptime=S boot_id=ID` (the guest's counter service) → (N, ID).
pub fn parse_counter(body: &str) -> (u64, String) {
    let field = |name: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {body:?}"))
            .to_owned()
    };
    (field("count=").parse().expect("count"), field("boot_id="))
}

/// A scratch folder whose `home/` is a cloudlet registry, for tests that drive the real binary.
pub struct Scratch {
    /// The folder (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// A fresh scratch folder.
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The registry folder (`$CLOUDLET_HOME`).
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// A path inside the scratch folder, as a string for command lines.
    pub fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Runs `cloudlet ARGS`, asserts success, returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = cloudlet(&self.home(), args);
        assert_eq!(code, 0, "cloudlet {args:?} failed:\n{err}");
        out
    }

    /// `cloudlet base` of the test guest with a `disk_mb` MiB disk and 256 MiB of RAM; the id.
    pub fn guest_base(&self, disk_mb: u64) -> String {
        let g = guest(disk_mb);
        let d = |f: &str| g.dir.join(f).display().to_string();
        let args = [
            "base",
            &d("disk.img"),
            "--memory-mb",
            "256",
            "--kernel",
            &d("vmlinuz"),
            "--initrd",
            &d("initrd.img"),
            "--append",
            &g.cmdline,
            "--ready",
            "CLOUDLET-GUEST-READY",
        ];
        self.ok(&args).trim().to_string()
    }
}

/// A private network namespace with only a loopback interface, up and with multicast on, so
/// that what a test sends (mDNS to 224.0.0.251 and ff02::fb included) never leaves this
/// machine. A `sleep` process holds the namespace; it goes away when this value is dropped.
pub struct Netns {
    holder: std::process::Child,
}

impl Netns {
    /// A command running `program` inside the namespace (through `nsenter`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.holder.id()))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A fresh [`Netns`] (needs root, `unshare`, `nsenter` and `ip`); `None` skips a test, except
/// under `CI=true` where it fails.
pub fn require_netns() -> Option<Netns> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let setup = "ip link set dev lo up multicast on && echo ready && exec sleep 1000000";
    let made = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", setup])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("unshare: {e}"))
        .and_then(|mut holder| {
            let mut line = String::new();
            let out = holder.stdout.take().expect("piped stdout");
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            if line.trim() == "ready" {
                return Ok(Netns { holder });
            }
            let _ = holder.kill();
            let out = holder.wait_with_output().map_err(|e| e.to_string())?;
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        });
    match made {
        Ok(ns) => Some(ns),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "a network namespace is required when CI=true: {e}"
            );
            eprintln!("skipping: cannot make a network namespace: {e}");
            None
        }
    }
}

/// This host's first global IPv4 address (what a LAN machine would connect to).
pub fn host_lan_address() -> std::net::Ipv4Addr {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .expect("run ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("this host has no global IPv4 address: {text}"))
}

/// Answers one HTTP request on `l` with 200 "lan-ok", on a thread; the thread returns whether
/// a request came.
pub fn answer_once(l: std::net::TcpListener) -> std::thread::JoinHandle<bool> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        l.set_nonblocking(false).unwrap();
        let Ok((mut s, _)) = l.accept() else {
            return false;
        };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nlan-ok");
        true
    })
}
