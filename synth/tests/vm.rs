//! Tests of `synth::vm` without a guest: argument building (no QEMU needed), QEMU failing to
//! start, the serial shell against real shells on a host pty and the guest agent client against
//! a real `qemu-ga` on the host. The tests against the real test guest (boot, serial commands,
//! agent, capture and resume) are in the end-to-end crate (`tests/tests/e2e/vm.rs`).
//!
//! Tests that start QEMU hold `QEMU_LOCK`, so only one QEMU runs at a time. Without a QEMU
//! binary they print a note and pass, unless `CI=true`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use synth::base::{Device, LaunchConfig};
use synth::vm::{
    qemu_binary, Accel, Agent, AgentError, CommandOutput, GuestNetwork, HostFwd, LaunchError,
    LaunchOptions, MemoryMode, QemuArgs, SerialPort, Shell, ShellError, ShellOptions, Transport,
    Vm, VmError, VmPaths,
};

const MIB: u64 = 1 << 20;
const GUEST_RAM_MB: u64 = 256;

static QEMU_LOCK: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------ helpers

/// The lock for tests that start QEMU, or `None` (test skipped) when QEMU is missing.
fn qemu_lock() -> Option<MutexGuard<'static, ()>> {
    if let Err(e) = qemu_binary() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "QEMU is required when CI=true: {e}"
        );
        eprintln!("skipping: {e}");
        return None;
    }
    Some(QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

fn guest_config(cmdline: &str) -> LaunchConfig {
    LaunchConfig {
        machine: "q35".into(),
        cpu: "max".into(),
        memory_mb: GUEST_RAM_MB,
        vcpus: 1,
        devices: vec![
            Device::VirtioBlk { discard: true },
            Device::VirtioNet,
            Device::VirtioBalloon {
                free_page_reporting: true,
            },
        ],
        kernel: Some("vmlinuz".into()),
        initrd: Some("initrd.img".into()),
        append: Some(cmdline.into()),
        cloud_init: None,
        extra_args: Vec::new(),
    }
}

fn arg_strings(args: &QemuArgs) -> Vec<String> {
    args.args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// The value following `flag` (first occurrence).
fn arg_after(args: &[String], flag: &str) -> String {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1].clone()
}

/// A folder with a disk, an exact-size memory image and empty kernel/initrd files.
struct Fixture {
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(subdir: &str) -> (Fixture, VmPaths) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(subdir);
        std::fs::create_dir_all(&base).unwrap();
        let paths = VmPaths {
            disk: base.join("disk.img"),
            memory: base.join("ram.bin"),
            kernel: Some(base.join("vmlinuz")),
            initrd: Some(base.join("initrd.img")),
            cloud_init: None,
            run_dir: base.join("run"),
        };
        File::create(&paths.disk).unwrap().set_len(MIB).unwrap();
        File::create(&paths.memory)
            .unwrap()
            .set_len(GUEST_RAM_MB * MIB)
            .unwrap();
        File::create(paths.kernel.as_ref().unwrap()).unwrap();
        File::create(paths.initrd.as_ref().unwrap()).unwrap();
        (Fixture { _dir: dir }, paths)
    }
}

fn plain_options(memory: MemoryMode) -> LaunchOptions {
    LaunchOptions {
        vnc: None,
        memory,
        incoming: false,
        hostfwd: vec![],
        network: GuestNetwork::Isolated,
        accel: Accel::Tcg,
    }
}

// ------------------------------------------------------------------ argument building

#[test]
fn qemu_args_path_with_comma_is_escaped() {
    let (_f, paths) = Fixture::new("a,b");
    let args = QemuArgs::new(
        &guest_config("console=ttyS0"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let a = arg_strings(&args);
    let base = paths
        .disk
        .parent()
        .unwrap()
        .to_string_lossy()
        .replace(',', ",,");
    assert_eq!(
        arg_after(&a, "-object"),
        format!("memory-backend-file,id=mem,size=256M,mem-path={base}/ram.bin,share=on")
    );
    assert_eq!(
        arg_after(&a, "-drive"),
        format!("file={base}/disk.img,format=raw,if=none,id=disk0,discard=unmap,cache=writeback")
    );
    assert_eq!(
        arg_after(&a, "-chardev"),
        format!(
            "socket,id=ser0,path={base}/run/serial.sock,server=on,wait=off,\
             logfile={base}/run/serial.log"
        )
    );
}

#[test]
fn qemu_args_unescaped_paths_are_kept_for_the_caller() {
    let (_f, paths) = Fixture::new("a,b");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    assert_eq!(args.qmp_socket(), paths.run_dir.join("qmp.sock"));
    assert_eq!(args.serial_log(), paths.run_dir.join("serial.log"));
}

#[test]
fn qemu_args_capture_and_resume_differ_only_in_memory_mode_and_incoming() {
    let (_f, paths) = Fixture::new("x");
    let config = guest_config("console=ttyS0");
    let capture =
        arg_strings(&QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap());
    let mut opts = plain_options(MemoryMode::Resume);
    opts.incoming = true;
    let resume = arg_strings(&QemuArgs::new(&config, &paths, &opts).unwrap());
    let differing: Vec<(&String, &String)> = capture
        .iter()
        .zip(&resume)
        .filter(|(c, r)| c != r)
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert!(differing[0].1.ends_with(",share=off,readonly=on,rom=off"));
    assert_eq!(&resume[capture.len()..], ["-incoming", "defer"]);
}

#[test]
fn qemu_args_hostfwd_goes_on_the_first_netdev() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.devices.push(Device::VirtioNet);
    let mut opts = plain_options(MemoryMode::Capture);
    opts.hostfwd = vec![
        HostFwd::localhost(10022, 22),
        HostFwd::localhost(18080, 8080),
    ];
    let a = arg_strings(&QemuArgs::new(&config, &paths, &opts).unwrap());
    let netdevs: Vec<&String> = a
        .iter()
        .zip(a.iter().skip(1))
        .filter(|(flag, _)| *flag == "-netdev")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        netdevs,
        [
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:10022-:22,\
             hostfwd=tcp:127.0.0.1:18080-:8080",
            "user,id=net1,restrict=on"
        ]
    );
}

#[test]
fn qemu_args_hostfwd_without_netdev_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.devices = vec![Device::VirtioBlk { discard: false }];
    let mut opts = plain_options(MemoryMode::Capture);
    opts.hostfwd = vec![HostFwd::localhost(10022, 22)];
    let err = QemuArgs::new(&config, &paths, &opts).unwrap_err();
    assert!(matches!(err, LaunchError::PathMismatch(_)), "{err:?}");
}

#[test]
fn qemu_args_hostfwd_port_zero_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut opts = plain_options(MemoryMode::Capture);
    opts.hostfwd = vec![HostFwd::localhost(0, 22)];
    let err = QemuArgs::new(&guest_config("x"), &paths, &opts).unwrap_err();
    assert!(matches!(err, LaunchError::HostFwd(..)), "{err:?}");
}

#[test]
fn qemu_args_resume_memory_size_mismatch_is_refused() {
    let (_f, paths) = Fixture::new("x");
    File::create(&paths.memory)
        .unwrap()
        .set_len(GUEST_RAM_MB * MIB - 4096)
        .unwrap();
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Resume),
    )
    .unwrap_err();
    assert!(
        matches!(err, LaunchError::MemorySize { actual, expected, .. }
            if actual == GUEST_RAM_MB * MIB - 4096 && expected == GUEST_RAM_MB * MIB),
        "{err:?}"
    );
}

#[test]
fn qemu_args_capture_memory_size_mismatch_is_refused() {
    let (_f, paths) = Fixture::new("x");
    File::create(&paths.memory)
        .unwrap()
        .set_len(GUEST_RAM_MB * MIB * 2)
        .unwrap();
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap_err();
    assert!(matches!(err, LaunchError::MemorySize { .. }), "{err:?}");
}

#[test]
fn qemu_args_resume_missing_memory_image_is_refused() {
    let (_f, paths) = Fixture::new("x");
    std::fs::remove_file(&paths.memory).unwrap();
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Resume),
    )
    .unwrap_err();
    assert!(matches!(err, LaunchError::Inspect { .. }), "{err:?}");
}

#[test]
fn qemu_args_capture_missing_memory_image_is_accepted() {
    let (_f, paths) = Fixture::new("x");
    std::fs::remove_file(&paths.memory).unwrap();
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    );
    assert!(args.is_ok(), "{args:?}");
}

/// `guest_config` with the guest agent's channel added at the end.
fn agent_config(cmdline: &str) -> LaunchConfig {
    let mut c = guest_config(cmdline);
    c.devices.push(Device::GuestAgent);
    c
}

#[test]
fn qemu_args_guest_agent_gets_a_socket_and_a_named_port() {
    let (_f, paths) = Fixture::new("a,b");
    let args = QemuArgs::new(
        &agent_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let a = arg_strings(&args);
    let socket = paths.run_dir.join("qga.sock");
    let escaped = socket.display().to_string().replace(',', ",,");
    assert_eq!(args.agent_socket(), Some(socket.as_path()));
    assert!(
        a.contains(&format!("socket,id=qga0,path={escaped},server=on,wait=off")),
        "{a:?}"
    );
    assert!(
        a.contains(&"virtio-serial-pci,id=vserial0".to_owned()),
        "{a:?}"
    );
    assert!(
        a.contains(
            &"virtserialport,bus=vserial0.0,nr=1,chardev=qga0,name=org.qemu.guest_agent.0"
                .to_owned()
        ),
        "{a:?}"
    );
}

#[test]
fn qemu_args_without_guest_agent_have_no_agent_socket() {
    let (_f, paths) = Fixture::new("x");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    assert_eq!(args.agent_socket(), None);
    assert!(!arg_strings(&args).iter().any(|a| a.contains("qga")));
}

#[test]
fn qemu_args_two_guest_agents_are_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = agent_config("x");
    config.devices.push(Device::GuestAgent);
    let err = QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::Config {
                field: "devices",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn qemu_args_long_run_dir_is_refused() {
    let (_f, mut paths) = Fixture::new("x");
    paths.run_dir = paths.run_dir.join("r".repeat(100));
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap_err();
    assert!(
        matches!(err, LaunchError::SocketPathTooLong { .. }),
        "{err:?}"
    );
}

#[test]
fn qemu_args_kernel_named_without_path_is_refused() {
    let (_f, mut paths) = Fixture::new("x");
    paths.kernel = None;
    let err = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap_err();
    assert!(matches!(err, LaunchError::PathMismatch(_)), "{err:?}");
}

#[test]
fn qemu_args_machine_with_options_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.machine = "q35,accel=kvm".into();
    let err = QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::Config {
                field: "machine",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn qemu_args_zero_memory_is_refused() {
    let (_f, paths) = Fixture::new("x");
    let mut config = guest_config("x");
    config.memory_mb = 0;
    let err = QemuArgs::new(&config, &paths, &plain_options(MemoryMode::Capture)).unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::Config {
                field: "memory_mb",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn escape_option_value_doubles_commas() {
    let escaped = synth::vm::escape_option_value(&OsString::from("/a,b,,c"));
    assert_eq!(escaped, OsString::from("/a,,b,,,,c"));
}

#[test]
fn vm_spawn_missing_binary_fails_with_spawn_error() {
    let (_f, paths) = Fixture::new("x");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let err = Vm::spawn_with(Path::new("/nonexistent/qemu-system-x86_64"), &args).unwrap_err();
    assert!(matches!(err, VmError::Spawn { .. }), "{err:?}");
}

// ------------------------------------------------------------------ real QEMU

#[test]
fn vm_qemu_exiting_early_reports_its_output() {
    let Some(_lock) = qemu_lock() else { return };
    // The fixture's kernel is an empty file: QEMU refuses it and exits at once.
    let (_f, paths) = Fixture::new("x");
    let args = QemuArgs::new(
        &guest_config("x"),
        &paths,
        &plain_options(MemoryMode::Capture),
    )
    .unwrap();
    let err = Vm::spawn(&args).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmError::Exited { .. }), "{err:?}");
    assert!(msg.contains("could not load kernel"), "{msg}");
}

// ------------------------------------------------------------------ console shells on a host pty

/// Whether `tool` is on `PATH`; `false` skips a test, except under `CI=true` where it fails.
fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required when CI=true (.ci/install-deps.sh installs it)"
        );
        eprintln!("skipping: {tool} not found");
    }
    found
}

/// bash's startup file for the tests: a prompt with colours and a window title, bracketed
/// paste on, as on a typical distribution.
const BASHRC: &str = r#"PS1='\[\e]0;\u@\h: \w\a\]\[\e[1;32m\]\u@\h\[\e[0m\]:\w\$ '
bind 'set enable-bracketed-paste on'
HISTCONTROL=ignoreboth
"#;

/// A real interactive shell on a pty, bridged to a Unix socket by socat the way QEMU bridges
/// a guest's serial port to its serial socket. socat and the shell end with the connection.
struct PtyShell {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Drop for PtyShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PtyShell {
    /// Starts `program` (run by `/bin/sh -c`) on a pty; `None` when socat or `tool` is
    /// missing outside CI. `{dir}` in `program` is the scratch folder.
    fn start(
        tool: &str,
        program: &str,
        options: ShellOptions,
    ) -> Option<(PtyShell, Shell<SerialPort>)> {
        if !require_tool("socat") || !require_tool(tool) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bashrc"), BASHRC).unwrap();
        let sock = dir.path().join("console.sock");
        let program = program.replace("{dir}", &dir.path().display().to_string());
        let child = std::process::Command::new("socat")
            .arg(format!("UNIX-LISTEN:{}", sock.display()))
            .arg(format!("SYSTEM:{program},pty,setsid,ctty,stderr"))
            .env("TERM", "xterm")
            .env_remove("ENV")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut pty = PtyShell { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline && pty.child.try_wait().unwrap().is_none(),
                        "socat did not listen on {}: {e}",
                        sock.display()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let port = SerialPort::new(stream).unwrap();
        Some((pty, Shell::with_options(port, options)))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Options for host shells: quick to give up, so failing tests end soon.
fn host_shell_options() -> ShellOptions {
    ShellOptions {
        sync_timeout: Duration::from_secs(30),
        recover_timeout: Duration::from_secs(5),
        ..ShellOptions::default()
    }
}

const HOST_CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `cmd`, returning its output, discarding the stream.
fn run(shell: &mut Shell<SerialPort>, cmd: &str) -> CommandOutput {
    shell.run(cmd, HOST_CMD_TIMEOUT, &mut |_| {}).unwrap()
}

/// The same tests for every shell.
macro_rules! shell_tests {
    ($($name:ident => $tool:expr, $program:expr;)*) => {$(
        mod $name {
            use super::*;

            fn start() -> Option<(PtyShell, Shell<SerialPort>)> {
                PtyShell::start($tool, $program, host_shell_options())
            }

            #[test]
            fn command_output_and_status_0_are_returned() {
                let Some((_pty, mut sh)) = start() else { return };
                let out = run(&mut sh, "echo hello; echo world");
                assert_eq!(out, CommandOutput { rc: 0, output: "hello\nworld\n".into() });
            }

            #[test]
            fn failing_command_reports_status_and_output() {
                let Some((_pty, mut sh)) = start() else { return };
                let out = run(&mut sh, "echo oops >&2; exit 3");
                assert_eq!(out, CommandOutput { rc: 3, output: "oops\n".into() });
            }

            #[test]
            fn quotes_and_shell_specials_pass_unchanged() {
                let Some((_pty, mut sh)) = start() else { return };
                let cmd = r#"echo "it's" 'a"b' '$HOME' 'back\slash' '100%' "!x" '#no-comment'"#;
                let out = run(&mut sh, cmd);
                assert_eq!(out.output, "it's a\"b $HOME back\\slash 100% !x #no-comment\n");
            }

            #[test]
            fn tabs_newlines_and_utf8_pass_unchanged() {
                let Some((_pty, mut sh)) = start() else { return };
                let out = run(&mut sh, "printf '%s|' 'tab\there' 'é€'\necho\necho 'two\nlines'");
                assert_eq!(out.output, "tab\there|é€|\ntwo\nlines\n");
            }

            #[test]
            fn command_reading_stdin_gets_eof_and_next_command_runs() {
                let Some((_pty, mut sh)) = start() else { return };
                let first = run(&mut sh, "cat; echo after-cat");
                let second = run(&mut sh, "echo next");
                assert_eq!(first.output, "after-cat\n");
                assert_eq!(second.output, "next\n");
            }

            #[test]
            fn hung_command_times_out_and_shell_answers_after() {
                let Some((_pty, mut sh)) = start() else { return };
                let err = sh
                    .run("echo partial; sleep 600", Duration::from_secs(2), &mut |_| {})
                    .unwrap_err();
                let after = run(&mut sh, "echo alive");
                match err {
                    ShellError::Timeout { output, recovered, .. } => {
                        assert!(recovered);
                        assert_eq!(output, "partial\n");
                    }
                    e => panic!("expected a timeout, got {e:?}"),
                }
                assert_eq!(after.output, "alive\n");
            }

            #[test]
            fn command_longer_than_a_line_runs_whole() {
                let Some((_pty, mut sh)) = start() else { return };
                let cmd = format!("x='{}'\necho ${{#x}}", "y".repeat(5000));
                let out = run(&mut sh, &cmd);
                assert_eq!(out, CommandOutput { rc: 0, output: "5000\n".into() });
            }

            #[test]
            fn output_streams_before_the_command_ends() {
                let Some((pty, mut sh)) = start() else { return };
                // The command waits for a file that only the output callback creates.
                let flag = pty.path("flag");
                let cmd = format!(
                    "echo first; while [ ! -e '{}' ]; do sleep 0.1; done; echo second",
                    flag.display()
                );
                let mut streamed = Vec::new();
                let out = sh
                    .run(&cmd, HOST_CMD_TIMEOUT, &mut |b| {
                        streamed.extend_from_slice(b);
                        if streamed.starts_with(b"first\n") {
                            std::fs::write(&flag, b"").unwrap();
                        }
                    })
                    .unwrap();
                assert_eq!(out.output, "first\nsecond\n");
                assert_eq!(streamed, b"first\nsecond\n");
            }

            #[test]
            fn exit_ends_only_the_command() {
                let Some((_pty, mut sh)) = start() else { return };
                let exited = run(&mut sh, "exit 7");
                let after = run(&mut sh, "echo still-here");
                assert_eq!(exited.rc, 7);
                assert_eq!(after.output, "still-here\n");
            }

            #[test]
            fn half_typed_line_is_cleared_before_the_first_command() {
                let Some((_pty, mut sh)) = start() else { return };
                sh.transport_mut().send(b"echo junk-").unwrap();
                let out = run(&mut sh, "echo clean");
                assert_eq!(out.output, "clean\n");
            }
        }
    )*};
}

shell_tests! {
    bash => "bash", "bash --rcfile {dir}/bashrc -i";
    dash => "dash", "dash -i";
    busybox_sh => "busybox", "busybox sh -i";
}

#[test]
fn shell_not_at_a_prompt_yet_is_waited_for() {
    let Some((_pty, mut sh)) =
        PtyShell::start("dash", "sleep 1; exec dash -i", host_shell_options())
    else {
        return;
    };
    let out = run(&mut sh, "echo up");
    assert_eq!(out.output, "up\n");
}

#[test]
fn shell_console_without_a_shell_reports_no_shell_with_what_it_showed() {
    let options = ShellOptions {
        sync_timeout: Duration::from_secs(3),
        ..host_shell_options()
    };
    // Not a shell, on a tty where Ctrl-C sends no signal: a login prompt of sorts.
    let Some((_pty, mut sh)) = PtyShell::start("cat", "stty -isig; echo 'login:'; cat", options)
    else {
        return;
    };
    let err = sh
        .run("echo hi", HOST_CMD_TIMEOUT, &mut |_| {})
        .unwrap_err();
    match err {
        ShellError::NoShell { seen, .. } => assert!(seen.contains("login:"), "{seen:?}"),
        e => panic!("expected NoShell, got {e:?}"),
    }
}

#[test]
fn shell_command_with_nul_is_refused_before_typing() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut sh = Shell::new(SerialPort::new(a).unwrap());
    let err = sh
        .run("echo a\0b", HOST_CMD_TIMEOUT, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, ShellError::NulByte(_)), "{err:?}");
}

#[test]
fn shell_console_closing_reports_closed() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut sh = Shell::new(SerialPort::new(a).unwrap());
    drop(b);
    let err = sh
        .run("echo hi", HOST_CMD_TIMEOUT, &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(err, ShellError::Closed { .. } | ShellError::Send(_)),
        "{err:?}"
    );
}

// ------------------------------------------------------------------ guest agent on the host

/// A real `qemu-ga` serving a Unix socket on the host (`-m unix-listen`): guest-exec and
/// guest-file-* really run, here. Killed on drop.
struct HostAgent {
    child: std::process::Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostAgent {
    /// `None` when qemu-ga is missing outside CI.
    fn start() -> Option<HostAgent> {
        let binary = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        let Some(binary) = binary else {
            require_tool("qemu-ga");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let child = std::process::Command::new(binary)
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(&state)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Some(HostAgent { child, dir, sock })
    }

    fn connect(&self) -> Agent {
        Agent::connect(&self.sock, Duration::from_secs(20)).unwrap()
    }

    /// A plain connection, once qemu-ga listens.
    fn stream(&self) -> std::os::unix::net::UnixStream {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match std::os::unix::net::UnixStream::connect(&self.sock) {
                Ok(s) => return s,
                Err(e) if Instant::now() >= deadline => panic!("qemu-ga did not listen: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a process with exactly this command line runs on the host.
fn process_running(cmdline: &[&str]) -> bool {
    let want: Vec<u8> = cmdline
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| c == want)
}

#[test]
fn agent_ping_is_answered() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    agent.ping(AGENT_TIMEOUT).unwrap();
    assert!(agent.is_synced());
}

#[test]
fn agent_junk_on_the_socket_is_skipped_by_sync() {
    let Some(ga) = HostAgent::start() else { return };
    let mut stream = ga.stream();
    // An unfinished request the agent's parser is stuck in.
    stream
        .write_all(b"{\"execute\": \"guest-ping\", \"argu")
        .unwrap();
    let mut agent = Agent::new(stream);
    agent.ping(AGENT_TIMEOUT).unwrap();
}

#[test]
fn agent_exec_returns_status_stdout_and_stderr() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    let out = agent
        .exec_shell("echo out; echo err >&2; exit 3", AGENT_TIMEOUT)
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn agent_exec_reading_stdin_gets_eof() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    let out = agent.exec_shell("cat; echo after", AGENT_TIMEOUT).unwrap();
    assert_eq!(out.stdout, b"after\n");
    assert!(out.success());
}

#[test]
fn agent_exec_timeout_kills_the_process_tree_and_keeps_output() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    let err = agent
        .exec_shell(
            "echo started; sleep 6013; echo never",
            Duration::from_secs(2),
        )
        .unwrap_err();
    let alive_after = agent.exec_shell("echo alive", AGENT_TIMEOUT).unwrap();
    match err {
        AgentError::ExecTimeout { output, .. } => {
            assert_eq!(output.unwrap().stdout, b"started\n");
        }
        e => panic!("expected ExecTimeout, got {e:?}"),
    }
    assert!(!process_running(&["sleep", "6013"]), "the child survived");
    assert_eq!(alive_after.stdout, b"alive\n");
}

#[test]
fn agent_copy_file_writes_bytes_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    // Several 48 KiB chunks and a short last one, every byte value.
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect();
    let local = ga.dir.path().join("local.bin");
    std::fs::write(&local, &data).unwrap();
    let dest = ga.dir.path().join("guest").join("copied.bin");
    std::fs::create_dir(dest.parent().unwrap()).unwrap();

    let n = agent
        .copy_file(&local, dest.to_str().unwrap(), 0o640, AGENT_TIMEOUT)
        .unwrap();

    assert_eq!(n, 200_000);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
    let names: Vec<_> = std::fs::read_dir(dest.parent().unwrap()).unwrap().collect();
    assert_eq!(names.len(), 1, "a temporary file was left behind");
}

#[test]
fn agent_copy_into_missing_folder_fails_with_the_agents_error() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    let local = ga.dir.path().join("local.txt");
    std::fs::write(&local, b"x").unwrap();
    let dest = ga.dir.path().join("no-such-dir/f");
    let err = agent
        .copy_file(&local, dest.to_str().unwrap(), 0o644, AGENT_TIMEOUT)
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Command { command, .. } if command == "guest-file-open"),
        "{err:?}"
    );
}

#[test]
fn agent_copy_relative_guest_path_is_refused() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    let err = agent
        .copy_to_guest(&mut &b"x"[..], "etc/motd", 0o644, AGENT_TIMEOUT)
        .unwrap_err();
    assert!(matches!(err, AgentError::GuestPath { .. }), "{err:?}");
}

#[test]
fn agent_unknown_command_is_a_command_error() {
    let Some(ga) = HostAgent::start() else { return };
    let mut agent = ga.connect();
    let err = agent
        .execute("guest-frobnicate", serde_json::Value::Null, AGENT_TIMEOUT)
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Command { class, .. } if class == "CommandNotFound"),
        "{err:?}"
    );
}

#[test]
fn agent_connect_missing_socket_fails() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        Agent::connect(&dir.path().join("none.sock"), Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, AgentError::Connect { .. }), "{err:?}");
}

/// A peer that takes connections and answers nothing (a guest without a running agent).
fn silent_peer(dir: &Path) -> (PathBuf, std::thread::JoinHandle<()>) {
    let path = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    (path, t)
}

#[test]
fn agent_silent_peer_is_reported_as_not_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _t) = silent_peer(dir.path());
    let mut agent = Agent::connect(&path, AGENT_TIMEOUT).unwrap();
    let err = agent.ping(Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, AgentError::NotAnswering { .. }), "{err:?}");
}

/// A hostile agent: syncs properly, then answers each request with the reply listed for its
/// command (`{id}` replaced by the request's id), or an error for commands not listed.
fn hostile_agent(dir: &Path, replies: &'static [(&'static str, &'static str)]) -> PathBuf {
    use std::io::BufRead;
    let path = dir.join("hostile.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            // The sync's parser reset (0xFF) comes first on its line.
            let text: Vec<u8> = line.drain(..).filter(|&b| b != 0xff).collect();
            let Ok(req) = serde_json::from_slice::<serde_json::Value>(&text) else {
                continue;
            };
            let command = req["execute"].as_str().unwrap_or("");
            let mut answer = Vec::new();
            if command == "guest-sync-delimited" {
                answer.push(0xff);
                answer.extend(format!("{{\"return\": {}}}", req["arguments"]["id"]).bytes());
            } else {
                let reply = replies.iter().find(|(c, _)| *c == command).map_or(
                    r#"{"error": {"class": "GenericError", "desc": "no"}, "id": {id}}"#,
                    |(_, r)| r,
                );
                answer.extend(reply.replace("{id}", &req["id"].to_string()).bytes());
            }
            answer.push(b'\n');
            if s.write_all(&answer).is_err() {
                return;
            }
        }
    });
    path
}

#[test]
fn agent_exec_negative_pid_reply_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = hostile_agent(
        dir.path(),
        &[("guest-exec", r#"{"return": {"pid": -5}, "id": {id}}"#)],
    );
    let mut agent = Agent::connect(&path, AGENT_TIMEOUT).unwrap();
    let err = agent.exec_shell("true", AGENT_TIMEOUT).unwrap_err();
    assert!(matches!(err, AgentError::BadReply { .. }), "{err:?}");
}

#[test]
fn agent_exec_status_bad_base64_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = hostile_agent(
        dir.path(),
        &[(
            "guest-exec-status",
            r#"{"return": {"exited": true, "exitcode": 0, "out-data": "!!no"}, "id": {id}}"#,
        )],
    );
    let mut agent = Agent::connect(&path, AGENT_TIMEOUT).unwrap();
    let err = agent.exec_status(7, AGENT_TIMEOUT).unwrap_err();
    assert!(matches!(err, AgentError::BadReply { .. }), "{err:?}");
}

#[test]
fn agent_exec_status_exit_code_beyond_i32_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = hostile_agent(
        dir.path(),
        &[(
            "guest-exec-status",
            r#"{"return": {"exited": true, "exitcode": 99999999999}, "id": {id}}"#,
        )],
    );
    let mut agent = Agent::connect(&path, AGENT_TIMEOUT).unwrap();
    let err = agent.exec_status(7, AGENT_TIMEOUT).unwrap_err();
    assert!(matches!(err, AgentError::BadReply { .. }), "{err:?}");
}

#[test]
fn agent_file_write_count_beyond_the_chunk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = hostile_agent(
        dir.path(),
        &[
            ("guest-file-open", r#"{"return": 1000, "id": {id}}"#),
            (
                "guest-file-write",
                r#"{"return": {"count": 999999, "eof": false}, "id": {id}}"#,
            ),
            ("guest-file-close", r#"{"return": {}, "id": {id}}"#),
        ],
    );
    let mut agent = Agent::connect(&path, AGENT_TIMEOUT).unwrap();
    let err = agent
        .copy_to_guest(&mut &b"abc"[..], "/tmp/x", 0o644, AGENT_TIMEOUT)
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::BadReply { command, .. } if command == "guest-file-write"),
        "{err:?}"
    );
}

#[test]
fn agent_reply_that_is_not_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = hostile_agent(dir.path(), &[("guest-ping", "not json {id}")]);
    let mut agent = Agent::connect(&path, AGENT_TIMEOUT).unwrap();
    let err = agent.ping(AGENT_TIMEOUT).unwrap_err();
    assert!(matches!(err, AgentError::BadJson { .. }), "{err:?}");
}
