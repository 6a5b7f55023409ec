//! libvirt domain XML for resuming a base's VM, from its launch config only.
//!
//! The domain XML says what libvirt can express the same way a direct QEMU has it: machine,
//! RAM size, vCPUs, kernel/initrd/command line, the disk (`disk/image` on cloudletfs, at
//! the PCI slot a direct QEMU gives it) and the guest agent channel (a `virtio-serial`
//! controller at its slot, port 1 named `org.qemu.guest_agent.0`, socket `RUN/qga.sock`;
//! libvirt then connects to the agent itself, for `virsh qemu-agent-command` and friends). The rest goes into the `qemu:commandline` namespace,
//! built by [`DomainLaunch`] from the same launch config, because libvirt 9 cannot say it:
//!
//! | needed | why not in libvirt's XML |
//! | --- | --- |
//! | guest RAM = `memory-backend-file` on `memory/image`, `share=off,readonly=on,rom=off`, id `mem` | `<memoryBacking><source type='file'/>` puts RAM in a file libvirt names under its own folder, and has no read-only private mapping; the device state names the RAM block `mem` |
//! | `-cpu` as in the config | feature lists like `max,-la57` have no `<cpu>` equivalent |
//! | virtio-net with user networking and `hostfwd` | `<interface type='user'>` forwards ports only through passt |
//! | virtio-balloon with `free-page-reporting` at a fixed slot | `<memballoon>` has no such option in 9.0 |
//! | serial console socket + log file | kept as on the direct path, so tools read the same log |
//! | `-incoming defer` | libvirt's restore reads its own save format, not a raw QEMU migration stream |
//!
//! Every device gets an explicit PCI address equal to the one a direct QEMU picks, so device
//! state captured by `cloudlet base`/`overlay` (direct QEMU) loads into the libvirt domain.
//! libvirt's defaults that would add devices are turned off (USB controller, memballoon);
//! `<features><acpi/>` keeps libvirt 9.0 from passing `-no-acpi`, which QEMU 10 rejects.
//!
//! QEMU runs with a static DAC label: the session's uid when the caller gives one
//! ([`DomainLaunch::dac_label`]; cloudlet gives it the group of libvirt's own QEMU user, which
//! libvirt's per-domain folder needs), with libvirt labelling its own files for it, or else
//! the caller's own uid/gid without relabelling. The disk is never relabelled: the cloudletfs
//! mount already shows it as that uid's.

use super::launch::{Accel, DomainLaunch, LaunchError};
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The XML of a transient domain named `name` for `launch`, running QEMU `emulator`.
///
/// Fails when a path or argument is not UTF-8 (XML cannot carry it) or `name` holds
/// characters other than ASCII letters, digits and `-_.`.
pub fn domain_xml(
    name: &str,
    launch: &DomainLaunch,
    emulator: &Path,
) -> Result<String, LaunchError> {
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(LaunchError::Config {
            field: "domain name",
            reason: format!("{name:?} must be ASCII letters, digits and -_."),
        });
    }
    // With a session's uid, libvirt labels its own files for it (monitor socket, master key,
    // and the kernel and initrd, which are the session's copies); the disk is never
    // relabelled. With the caller's own uid there is nothing to label.
    let ((uid, gid), relabel) = match launch.dac_label {
        Some(ids) => (ids, "yes"),
        None => (own_ids()?, "no"),
    };
    let kind = match launch.accel {
        Accel::Tcg => "qemu",
        Accel::Kvm => "kvm",
    };
    let mut x = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        x,
        "<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    );
    let _ = writeln!(x, "  <name>{name}</name>");
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", launch.memory_mb);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", launch.vcpus);
    // QEMU's own default topology on q35 machines since 6.2: all vCPUs as cores of one socket.
    let _ = writeln!(
        x,
        "  <cpu><topology sockets='1' dies='1' cores='{}' threads='1'/></cpu>",
        launch.vcpus
    );
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(
        x,
        "    <type arch='x86_64' machine='{}'>hvm</type>",
        escape(&launch.machine)
    );
    if let Some(k) = &launch.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", path_text("kernel", k)?);
    }
    if let Some(i) = &launch.initrd {
        let _ = writeln!(x, "    <initrd>{}</initrd>", path_text("initrd", i)?);
    }
    if let Some(a) = &launch.append {
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(a));
    }
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features><acpi/></features>");
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <on_reboot>destroy</on_reboot>");
    let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(x, "  <devices>");
    let _ = writeln!(
        x,
        "    <emulator>{}</emulator>",
        path_text("emulator", emulator)?
    );
    if let Some(d) = &launch.disk {
        let discard = if d.discard { "unmap" } else { "ignore" };
        let _ = writeln!(x, "    <disk type='file' device='disk'>");
        let _ = writeln!(
            x,
            "      <driver name='qemu' type='raw' cache='writeback' discard='{discard}'/>"
        );
        // Never relabelled: the cloudletfs mount already shows it as the label's (libvirt
        // accepts the override only when the domain relabels at all).
        let keep = if relabel == "yes" {
            "<seclabel model='dac' relabel='no'/>"
        } else {
            ""
        };
        let _ = writeln!(
            x,
            "      <source file='{}'>{keep}</source>",
            path_text("disk", &d.path)?
        );
        let _ = writeln!(x, "      <target dev='vda' bus='virtio'/>");
        let _ = writeln!(
            x,
            "      <address type='pci' domain='0x0000' bus='0x00' slot='{:#04x}' function='0x0'/>",
            d.slot
        );
        let _ = writeln!(x, "    </disk>");
    }
    if let Some(agent) = &launch.agent {
        let _ = writeln!(x, "    <controller type='virtio-serial' index='0'>");
        let _ = writeln!(
            x,
            "      <address type='pci' domain='0x0000' bus='0x00' slot='{:#04x}' function='0x0'/>",
            agent.slot
        );
        let _ = writeln!(x, "    </controller>");
        let _ = writeln!(x, "    <channel type='unix'>");
        let _ = writeln!(
            x,
            "      <source mode='bind' path='{}'/>",
            path_text("agent socket", &agent.socket)?
        );
        let _ = writeln!(
            x,
            "      <target type='virtio' name='{}'/>",
            super::qga::AGENT_CHANNEL
        );
        let _ = writeln!(
            x,
            "      <address type='virtio-serial' controller='0' bus='0' port='1'/>"
        );
        let _ = writeln!(x, "    </channel>");
    }
    let _ = writeln!(x, "    <controller type='usb' model='none'/>");
    let _ = writeln!(x, "    <memballoon model='none'/>");
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(
        x,
        "  <seclabel type='static' model='dac' relabel='{relabel}'><label>+{uid}:+{gid}</label></seclabel>"
    );
    let _ = writeln!(x, "  <qemu:commandline>");
    for arg in &launch.qemu_args {
        let arg = arg.to_str().ok_or_else(|| LaunchError::NonUtf8 {
            what: "QEMU argument",
            value: arg.to_string_lossy().into_owned(),
        })?;
        let _ = writeln!(x, "    <qemu:arg value='{}'/>", escape(arg));
    }
    let _ = writeln!(x, "  </qemu:commandline>");
    let _ = writeln!(x, "</domain>");
    Ok(x)
}

/// This process's uid and gid (the owner of `/proc/self`).
fn own_ids() -> Result<(u32, u32), LaunchError> {
    let path = Path::new("/proc/self");
    let meta = std::fs::metadata(path).map_err(|source| LaunchError::Inspect {
        what: "process",
        path: path.to_owned(),
        source,
    })?;
    Ok((meta.uid(), meta.gid()))
}

/// A path as escaped XML text.
fn path_text(what: &'static str, path: &Path) -> Result<String, LaunchError> {
    let s = path.to_str().ok_or_else(|| LaunchError::NonUtf8 {
        what,
        value: path.display().to_string(),
    })?;
    Ok(escape(s))
}

/// Escapes text for XML content and single- or double-quoted attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::{Device, LaunchConfig};
    use crate::vm::{GuestNetwork, HostFwd, LaunchOptions, MemoryMode, VmPaths};

    fn launch(dir: &Path, devices: Vec<Device>) -> DomainLaunch {
        std::fs::write(dir.join("disk.img"), [0u8; 4096]).unwrap();
        std::fs::write(dir.join("mem.img"), vec![0u8; 1 << 20]).unwrap();
        let config = LaunchConfig {
            memory_mb: 1,
            devices,
            ..LaunchConfig::default()
        };
        let paths = VmPaths {
            disk: dir.join("disk.img"),
            memory: dir.join("mem.img"),
            kernel: None,
            initrd: None,
            cloud_init: None,
            run_dir: dir.join("run"),
        };
        let options = LaunchOptions {
            memory: MemoryMode::Resume,
            incoming: true,
            hostfwd: vec![HostFwd::localhost(8080, 80)],
            network: GuestNetwork::Isolated,
            accel: Accel::Tcg,
            vnc: None,
        };
        DomainLaunch::new(&config, &paths, &options).unwrap()
    }

    #[test]
    fn domain_xml_devices_keep_direct_qemu_slots() {
        let dir = tempfile::tempdir().unwrap();
        let l = launch(
            dir.path(),
            vec![
                Device::VirtioNet,
                Device::VirtioBlk { discard: true },
                Device::VirtioBalloon {
                    free_page_reporting: true,
                },
            ],
        );
        let xml = domain_xml("cloudlet-t", &l, Path::new("/usr/bin/qemu")).unwrap();
        assert!(xml.contains("slot='0x02'"), "{xml}");
        assert!(xml.contains("netdev=net0,bus=pcie.0,addr=0x1'"), "{xml}");
        assert!(
            xml.contains("free-page-reporting=on,bus=pcie.0,addr=0x3'"),
            "{xml}"
        );
        assert!(xml.contains("share=off,readonly=on,rom=off'"), "{xml}");
        assert!(xml.contains("<qemu:arg value='defer'/>"), "{xml}");
        assert!(!xml.contains("virtio-blk-pci"), "disk given twice: {xml}");
    }

    #[test]
    fn domain_xml_guest_agent_is_a_channel_at_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let l = launch(
            dir.path(),
            vec![
                Device::VirtioBlk { discard: true },
                Device::VirtioNet,
                Device::GuestAgent,
            ],
        );
        let xml = domain_xml("cloudlet-t", &l, Path::new("/usr/bin/qemu")).unwrap();
        let controller = "<controller type='virtio-serial' index='0'>\n      \
            <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>";
        assert!(xml.contains(controller), "{xml}");
        assert!(
            xml.contains("<target type='virtio' name='org.qemu.guest_agent.0'/>"),
            "{xml}"
        );
        let socket = dir.path().join("run/qga.sock");
        assert!(
            xml.contains(&format!(
                "<source mode='bind' path='{}'/>",
                socket.display()
            )),
            "{xml}"
        );
        assert!(
            !xml.contains("virtio-serial-pci"),
            "agent given twice: {xml}"
        );
    }

    #[test]
    fn domain_xml_quote_in_path_is_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a'b&c");
        std::fs::create_dir(&sub).unwrap();
        let l = launch(
            &sub,
            vec![Device::VirtioBlk { discard: false }, Device::VirtioNet],
        );
        let xml = domain_xml("cloudlet-t", &l, Path::new("/usr/bin/qemu")).unwrap();
        assert!(xml.contains("a&apos;b&amp;c/disk.img'"), "{xml}");
        assert!(!xml.contains("a'b"), "{xml}");
    }

    #[test]
    fn domain_xml_bad_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = launch(dir.path(), vec![Device::VirtioNet]);
        let err = domain_xml("x'/>", &l, Path::new("/usr/bin/qemu")).unwrap_err();
        assert!(matches!(err, LaunchError::Config { .. }), "{err:?}");
    }

    #[test]
    fn domain_launch_pc_machine_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mem.img"), vec![0u8; 1 << 20]).unwrap();
        let config = LaunchConfig {
            machine: "pc".into(),
            memory_mb: 1,
            devices: vec![],
            ..LaunchConfig::default()
        };
        let paths = VmPaths {
            disk: dir.path().join("disk.img"),
            memory: dir.path().join("mem.img"),
            kernel: None,
            initrd: None,
            cloud_init: None,
            run_dir: dir.path().join("run"),
        };
        let options = LaunchOptions {
            memory: MemoryMode::Resume,
            incoming: true,
            hostfwd: vec![],
            network: GuestNetwork::Isolated,
            accel: Accel::Tcg,
            vnc: None,
        };
        let err = DomainLaunch::new(&config, &paths, &options).unwrap_err();
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
}
