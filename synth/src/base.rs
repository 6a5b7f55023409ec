//! A base VM's launch config and its record in the registry.
//!
//! The launch config is the only source of QEMU arguments when a VM is resumed from this base;
//! nothing in an overlay can add to it.

use crate::chunk::Digest;
use serde::{Deserialize, Serialize};

/// A device of the VM, as QEMU is asked to create it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Device {
    /// The disk image on virtio-blk.
    VirtioBlk {
        /// Pass guest TRIM to the image (`discard=unmap`).
        discard: bool,
    },
    /// virtio-net with QEMU user networking.
    VirtioNet,
    /// virtio-balloon.
    VirtioBalloon {
        /// Free page reporting (the guest hands free pages back).
        free_page_reporting: bool,
    },
    /// The QEMU guest agent's channel: a virtio-serial port named `org.qemu.guest_agent.0`,
    /// reached from the host through `RUN/qga.sock` (see `vm::qga`).
    GuestAgent,
    /// The NoCloud cloud-init seed (`LaunchConfig::cloud_init`), attached read-only on
    /// virtio-blk: cloud-init in the guest finds it by its volume label `CIDATA`. Every VM
    /// resumed from the base gets it too, since the device state needs the same devices.
    CloudInitSeed,
}

/// How to launch a VM from this base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchConfig {
    /// QEMU machine type.
    pub machine: String,
    /// QEMU CPU model.
    pub cpu: String,
    /// Guest RAM in MiB; equals the memory image size.
    pub memory_mb: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Devices, in order.
    pub devices: Vec<Device>,
    /// Kernel image: a path when given to `add-base`, the file name inside the base afterwards.
    pub kernel: Option<String>,
    /// Initial ramdisk, like `kernel`.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub append: Option<String>,
    /// The NoCloud cloud-init seed image attached by [`Device::CloudInitSeed`], like `kernel`:
    /// a path when given to `add-base`, the file name inside the base afterwards. Left out
    /// of `base.json` when absent, so the ids of bases made before it existed do not change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<String>,
    /// Further QEMU arguments given by the operator when the base was made (`cloudlet base …
    /// -- ARGS`); appended after the devices.
    pub extra_args: Vec<String>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            machine: "q35".into(),
            cpu: "qemu64".into(),
            memory_mb: 0,
            vcpus: 1,
            devices: vec![Device::VirtioBlk { discard: true }, Device::VirtioNet],
            kernel: None,
            initrd: None,
            append: None,
            cloud_init: None,
            extra_args: Vec::new(),
        }
    }
}

/// One base VM as the registry records it (`base.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRecord {
    /// Base id (hex SHA-256 over the chunk index, device state, kernel, initrd and config).
    pub id: String,
    /// Human name.
    pub name: String,
    /// Disk image size in bytes.
    pub disk_size: u64,
    /// Memory image size in bytes.
    pub memory_size: u64,
    /// Device state size in bytes.
    pub device_state_size: u64,
    /// Launch config (kernel/initrd as file names inside the base folder).
    pub config: LaunchConfig,
    /// Where the disk image lives: absolute when added with `--link`, else inside the folder.
    pub disk_path: String,
    /// Where the memory image lives, like `disk_path`.
    pub memory_path: String,
    /// Seconds since the Unix epoch when it was added.
    pub created: u64,
}

impl BaseRecord {
    /// The raw QEMU arguments this base's launch config puts on every QEMU command line
    /// (`extra_args`: from `cloudlet base … -- ARGS`, or a package imported with
    /// [`ImportOptions::trust_extra_args`](crate::registry::ImportOptions)); empty for most
    /// bases. `list-base` shows whether a base has any.
    pub fn raw_qemu_args(&self) -> &[String] {
        &self.config.extra_args
    }
}

/// The parts a base id is computed from.
pub struct IdParts<'a> {
    /// `ChunkIndex::content_digest`.
    pub content: Digest,
    /// SHA-256 of the device state.
    pub device_state: Digest,
    /// SHA-256 of the kernel file, if any.
    pub kernel: Option<Digest>,
    /// SHA-256 of the initrd file, if any.
    pub initrd: Option<Digest>,
    /// SHA-256 of the cloud-init seed image, if any (hashed only when present, so bases
    /// without one keep the ids they had before seeds existed).
    pub cloud_init: Option<Digest>,
    /// The normalised launch config.
    pub config: &'a LaunchConfig,
}

impl IdParts<'_> {
    /// The base id: a content hash, so the same base registered twice gets the same id.
    pub fn id(&self) -> Digest {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update(b"cloudlet-base-v1\0");
        h.update(self.content);
        h.update(self.device_state);
        for f in [self.kernel, self.initrd] {
            match f {
                Some(d) => {
                    h.update([1]);
                    h.update(d);
                }
                None => h.update([0]),
            }
        }
        if let Some(d) = self.cloud_init {
            h.update(b"cloud-init\0");
            h.update(d);
        }
        // serde_json writes struct fields in declaration order: a stable encoding.
        h.update(serde_json::to_vec(self.config).unwrap_or_default());
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::hex;

    /// A launch config as `base.json` files written before the guest-agent device existed
    /// hold it.
    const OLD_CONFIG: &str = r#"{"machine":"q35","cpu":"max","memory_mb":256,"vcpus":1,
        "devices":[{"virtio-blk":{"discard":true}},"virtio-net",
                   {"virtio-balloon":{"free_page_reporting":true}}],
        "kernel":"vmlinuz","initrd":"initrd.img","append":"console=ttyS0","extra_args":[]}"#;

    fn id_of(config: &LaunchConfig) -> String {
        hex(&IdParts {
            content: [1; 32],
            device_state: [2; 32],
            kernel: Some([3; 32]),
            initrd: None,
            cloud_init: None,
            config,
        }
        .id())
    }

    /// The id pinned here was also computed outside Rust, from the recipe in `IdParts::id`.
    #[test]
    fn launch_config_from_before_the_agent_keeps_its_base_id() {
        let config: LaunchConfig = serde_json::from_str(OLD_CONFIG).unwrap();
        assert_eq!(
            id_of(&config),
            "766d0e91deab50f946e3edc2ebd3b3969aa6667457461867aa8970a2bb61e13e"
        );
    }

    #[test]
    fn cloud_init_seed_changes_the_base_id_and_is_kept_in_json() {
        let mut config: LaunchConfig = serde_json::from_str(OLD_CONFIG).unwrap();
        config.devices.push(Device::CloudInitSeed);
        config.cloud_init = Some("cloud-init-seed.img".into());
        let json = serde_json::to_string(&config).unwrap();
        let back: LaunchConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        assert!(json.contains(r#""cloud-init-seed""#), "{json}");
        assert_ne!(
            id_of(&config),
            "766d0e91deab50f946e3edc2ebd3b3969aa6667457461867aa8970a2bb61e13e"
        );
    }

    #[test]
    fn guest_agent_device_is_written_as_its_kebab_name() {
        let json = serde_json::to_string(&Device::GuestAgent).unwrap();
        let back: Device = serde_json::from_str(&json).unwrap();
        assert_eq!(json, r#""guest-agent""#);
        assert_eq!(back, Device::GuestAgent);
    }
}
