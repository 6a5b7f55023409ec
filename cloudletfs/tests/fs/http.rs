//! Overlays over HTTP: a tiny Range server of our own (that can drop connections or stop
//! answering) and, when installed, nginx.

use crate::*;
use cloudletfs::{HttpOptions, HttpSource, RedirectPolicy};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;
use synth::source::ByteSource;

/// A threaded HTTP/1.1 server of one file with Range support.
struct Server {
    port: u16,
    /// Connections still to drop mid-body.
    drops: Arc<AtomicU32>,
    /// Accept but never answer.
    stall: Arc<AtomicBool>,
    /// Range requests served.
    served: Arc<AtomicU32>,
}

fn handle(
    mut c: TcpStream,
    data: &[u8],
    drops: &AtomicU32,
    stall: &AtomicBool,
    served: &AtomicU32,
) {
    let mut r = BufReader::new(c.try_clone().expect("clone"));
    let mut range = None;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.split_once('-').expect("range");
            range = Some((
                a.parse::<usize>().expect("start"),
                b.parse::<usize>().expect("end"),
            ));
        }
    }
    if stall.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    let Some((a, b)) = range else {
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        let _ = c.write_all(data);
        return;
    };
    let b = b.min(data.len() - 1);
    served.fetch_add(1, Ordering::Relaxed);
    let body = &data[a..=b];
    let _ = write!(
        c,
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len(),
        body.len()
    );
    let drop_now = body.len() > 1
        && drops
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1))
            .is_ok();
    if drop_now {
        let _ = c.write_all(&body[..body.len() / 2]);
        let _ = c.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = c.write_all(body);
}

impl Server {
    fn start(data: Vec<u8>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let data = Arc::new(data);
        let drops = Arc::new(AtomicU32::new(0));
        let stall = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let (d2, s2, v2) = (Arc::clone(&drops), Arc::clone(&stall), Arc::clone(&served));
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let (data, d, s, v) = (
                    Arc::clone(&data),
                    Arc::clone(&d2),
                    Arc::clone(&s2),
                    Arc::clone(&v2),
                );
                std::thread::spawn(move || handle(c, &data, &d, &s, &v));
            }
        });
        Server {
            port,
            drops,
            stall,
            served,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/overlay.cld", self.port)
    }
}

fn fast_http() -> HttpOptions {
    HttpOptions {
        attempt_timeout: Duration::from_millis(1500),
        total_timeout: Duration::from_secs(4),
        backoff: Duration::from_millis(20),
        ..HttpOptions::default()
    }
}

#[test]
fn http_overlay_with_dropped_connections_matches_reconstruct() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(10, Shape::default());
    let srv = Server::start(std::fs::read(&s.overlay).expect("overlay"));
    srv.drops.store(5, Ordering::Relaxed);
    let g = mount_with(&s, OverlaySource::Url(srv.url()), |o| o.http = fast_http());
    assert_eq!(first_diff(&read_all(&g.path("disk/image")), &s.disk), None);
    assert_eq!(
        first_diff(&read_all(&g.path("memory/image")), &s.memory),
        None
    );
    assert_eq!(
        srv.drops.load(Ordering::Relaxed),
        0,
        "the server should have dropped 5 connections"
    );
    assert!(srv.served.load(Ordering::Relaxed) > 5);
}

#[test]
fn http_stalled_server_gives_eio_not_hang() {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(
        11,
        Shape {
            disk: 1 << 20,
            memory: 1 << 20,
            ..Shape::default()
        },
    );
    let srv = Server::start(std::fs::read(&s.overlay).expect("overlay"));
    let g = mount_with(&s, OverlaySource::Url(srv.url()), |o| {
        o.http = fast_http();
        o.background_fill = false;
    });
    srv.stall.store(true, Ordering::Relaxed);
    let ov = s.overlay_meta();
    let (kind, chunk) = ov.metadata().segments[0].chunks[0];
    let f = open_direct(&g.path(&format!("{}/image", kind.name())), false);
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(pread(&f, chunk * 4096, 4096).map_err(|e| e.raw_os_error()));
    });
    // A hang guard, not a performance bound: the read must come back at all.
    let r = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("read hung");
    assert_eq!(
        r.err(),
        Some(Some(libc::EIO)),
        "after {:?}",
        start.elapsed()
    );
    // The server answers again: the next read retries and succeeds.
    srv.stall.store(false, Ordering::Relaxed);
    let f = open_direct(&g.path(&format!("{}/image", kind.name())), false);
    let want = if kind == synth::ImageKind::Disk {
        &s.disk
    } else {
        &s.memory
    };
    assert_eq!(
        pread(&f, chunk * 4096, 4096).expect("retry read"),
        want[(chunk * 4096) as usize..][..4096]
    );
}

/// nginx on a loopback port, serving one folder; stopped on drop.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx serving `root`, with `locations` added to its server block (e.g. redirects).
fn start_nginx(root: &Path, locations: &str) -> Option<Nginx> {
    let bin = Path::new("/usr/sbin/nginx");
    if !bin.exists() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "nginx is required under CI=true"
        );
        eprintln!("skipping nginx: /usr/sbin/nginx missing");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = tempfile::tempdir().expect("nginx dir");
    let conf = dir.path().join("nginx.conf");
    let d = dir.path().display();
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; root {}; {locations} }} }}\n",
            root.display()
        ),
    )
    .expect("write nginx.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nginx");
    let n = Nginx {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(n)
}

use std::process::Command;

/// Serves an overlay (fixture `seed`) with nginx and its extra `locations`, mounts it from
/// `path` there, and checks both images against the custom VM.
fn nginx_mount_matches_reconstruct(seed: u64, locations: &str, path: &str) {
    if !fuse_ok() {
        return;
    }
    let s = Setup::new(seed, Shape::default());
    let root = s.overlay.parent().expect("parent").to_path_buf();
    let Some(ngx) = start_nginx(&root, locations) else {
        return;
    };
    let url = format!("http://127.0.0.1:{}{path}", ngx.port);
    let g = mount_with(&s, OverlaySource::Url(url), |o| o.http = fast_http());
    assert_eq!(first_diff(&read_all(&g.path("disk/image")), &s.disk), None);
    assert!(g.mounted().wait_filled(Some(Duration::from_secs(60))));
    assert_eq!(
        first_diff(&read_all(&g.path("memory/image")), &s.memory),
        None
    );
}

#[test]
fn http_nginx_overlay_matches_reconstruct() {
    nginx_mount_matches_reconstruct(12, "", "/overlay.cld");
}

#[test]
fn http_redirect_followed_matches_reconstruct() {
    nginx_mount_matches_reconstruct(
        13,
        "location = /moved.cld { return 302 /overlay.cld; }",
        "/moved.cld",
    );
}

/// Serves an overlay (fixture `seed`) with nginx and its extra `locations`, opens `path` there
/// with the redirects the synthesis server allows under `prefix`, and returns why that failed
/// (`None`: no nginx, outside CI).
fn open_under_prefix(seed: u64, locations: &str, prefix: &str, path: &str) -> Option<String> {
    let s = Setup::new(seed, Shape::default());
    let root = s.overlay.parent().expect("parent").to_path_buf();
    let ngx = start_nginx(&root, locations)?;
    let prefix = format!("http://127.0.0.1:{}{prefix}", ngx.port);
    let policy = synth::protocol::UrlPolicy::new(vec![prefix]).expect("policy");
    let opts = HttpOptions {
        redirects: RedirectPolicy::new(move |cur, loc| {
            policy.check_redirect(cur, loc).map_err(|r| r.to_string())
        }),
        ..fast_http()
    };
    let url = format!("http://127.0.0.1:{}{path}", ngx.port);
    match HttpSource::open(&url, opts) {
        Ok(src) => panic!("{url} opened ({} bytes) despite its redirect", src.size()),
        Err(e) => Some(e.to_string()),
    }
}

#[test]
fn http_redirect_outside_allowed_prefix_refused() {
    let Some(err) = open_under_prefix(
        14,
        "location = /allowed/moved.cld { return 302 /overlay.cld; }",
        "/allowed/",
        "/allowed/moved.cld",
    ) else {
        return;
    };
    assert!(err.contains("redirect"), "{err}");
    assert!(err.contains("not under an allowed prefix"), "{err}");
}

#[test]
fn http_redirect_loop_refused_after_max_hops() {
    let Some(err) = open_under_prefix(
        15,
        "location = /loop.cld { return 302 /loop.cld; }",
        "/",
        "/loop.cld",
    ) else {
        return;
    };
    assert!(
        err.contains(&format!(
            "more than {} redirects",
            cloudletfs::http::MAX_REDIRECTS
        )),
        "{err}"
    );
}
