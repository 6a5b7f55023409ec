//! `add-base`, `list-base`, `del-base`, `export-base`, `import-base`: the base registry
//! (`synth::registry`) from the command line.

use super::{file_size, print_json, Context, Terminal};
use anyhow::{Context as _, Result};
use cloudlet_tools::Reporter;
use serde::Serialize;
use std::path::PathBuf;
use synth::base::LaunchConfig;
use synth::registry::{AddBase, Base, ImportOptions};

/// Arguments of `add-base`.
#[derive(Debug, clap::Args)]
pub struct AddBaseArgs {
    /// Raw disk image.
    #[arg(long)]
    disk: PathBuf,
    /// Flat memory image (guest RAM).
    #[arg(long)]
    memory: PathBuf,
    /// Device state (QEMU migration stream without RAM).
    #[arg(long)]
    device_state: Option<PathBuf>,
    /// Launch config (JSON; see README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Name (default: the disk file's name).
    #[arg(long)]
    name: Option<String>,
    /// Leave the disk and memory images where they are instead of copying them.
    #[arg(long)]
    link: bool,
    /// Print the base record as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `list-base`.
#[derive(Debug, clap::Args)]
pub struct ListBaseArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `del-base`.
#[derive(Debug, clap::Args)]
pub struct DelBaseArgs {
    /// Base id (or unique prefix, or name).
    id: String,
}

/// Arguments of `export-base`.
#[derive(Debug, clap::Args)]
pub struct ExportBaseArgs {
    /// Base id (or unique prefix, or name).
    id: String,
    /// Package file to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// Arguments of `import-base`.
#[derive(Debug, clap::Args)]
pub struct ImportBaseArgs {
    /// Package file.
    package: PathBuf,
    /// Accept a package whose launch config passes raw arguments to QEMU (`extra_args`),
    /// which go on the command line of every VM resumed from it. Without this such a package
    /// is refused (exit code 3): only pass it for a package you trust.
    #[arg(long)]
    trust_extra_args: bool,
    /// Print the base record as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints a base's id, or its whole record with `--json`.
pub fn print_base(base: &Base, json: bool) -> Result<()> {
    if json {
        print_json(&base.record)
    } else {
        println!("{}", base.record.id);
        Ok(())
    }
}

pub fn add_base(ctx: &Context, a: &AddBaseArgs) -> Result<()> {
    let config = match &a.config {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(
                serde_json::from_slice::<LaunchConfig>(&text)
                    .with_context(|| format!("launch config {} is invalid", p.display()))?,
            )
        }
        None => None,
    };
    let reg = ctx.registry()?;
    let total = file_size(&a.disk)? + file_size(&a.memory)?;
    let req = AddBase {
        disk: a.disk.clone(),
        memory: a.memory.clone(),
        device_state: a.device_state.clone(),
        config,
        name: a.name.clone(),
        link: a.link,
        adopt: false,
        threads: ctx.threads,
    };
    let progress = Terminal.progress("indexing", total);
    let base = reg.add(&req, progress.counter())?;
    drop(progress);
    print_base(&base, a.json)
}

#[derive(Serialize)]
struct BaseRow<'a> {
    id: &'a str,
    name: &'a str,
    disk_size: u64,
    memory_size: u64,
    /// Raw QEMU arguments of its launch config (on every command line of its VMs).
    raw_qemu_args: &'a [String],
    /// Channels into the guest its VMs get: "guest-agent", "cloud-init-seed".
    guest: Vec<&'static str>,
    path: String,
}

pub fn list_base(ctx: &Context, a: &ListBaseArgs) -> Result<()> {
    let reg = ctx.registry()?;
    let bases = reg.list()?;
    let rows: Vec<BaseRow> = bases
        .iter()
        .map(|b| BaseRow {
            id: &b.record.id,
            name: &b.record.name,
            disk_size: b.record.disk_size,
            memory_size: b.record.memory_size,
            raw_qemu_args: b.record.raw_qemu_args(),
            guest: guest_channels(&b.record.config),
            path: b.dir.display().to_string(),
        })
        .collect();
    if a.json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        eprintln!("no base VMs in {}", reg.home().display());
    } else {
        println!(
            "{:<16} {:<20} {:>12} {:>12} {:<27} RAW QEMU ARGS",
            "ID", "NAME", "DISK", "MEMORY", "GUEST"
        );
        for r in rows {
            println!(
                "{:<16} {:<20} {:>12} {:>12} {:<27} {}",
                &r.id[..16],
                r.name,
                r.disk_size,
                r.memory_size,
                if r.guest.is_empty() {
                    "-".to_string()
                } else {
                    r.guest.join(",")
                },
                if r.raw_qemu_args.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:?}", r.raw_qemu_args)
                }
            );
        }
    }
    Ok(())
}

/// What a base's VMs carry into the guest besides disk and memory: the QEMU guest agent's
/// channel, a cloud-init NoCloud seed (attached read-only to every VM of the base).
fn guest_channels(config: &synth::base::LaunchConfig) -> Vec<&'static str> {
    use synth::base::Device;
    let mut out = Vec::new();
    if config
        .devices
        .iter()
        .any(|d| matches!(d, Device::GuestAgent))
    {
        out.push("guest-agent");
    }
    if config.cloud_init.is_some() {
        out.push("cloud-init-seed");
    }
    out
}

pub fn del_base(ctx: &Context, a: &DelBaseArgs) -> Result<()> {
    let base = ctx.registry()?.remove(&a.id)?;
    println!("deleted {} ({})", base.record.id, base.record.name);
    Ok(())
}

pub fn export_base(ctx: &Context, a: &ExportBaseArgs) -> Result<()> {
    let len = ctx.registry()?.export(&a.id, &a.output)?;
    println!("wrote {} ({len} bytes)", a.output.display());
    Ok(())
}

pub fn import_base(ctx: &Context, a: &ImportBaseArgs) -> Result<()> {
    let reg = ctx.registry()?;
    let total = file_size(&a.package)?;
    let progress = Terminal.progress("verifying", total);
    let opts = ImportOptions {
        trust_extra_args: a.trust_extra_args,
    };
    let base = reg.import_with(&a.package, &opts, progress.counter())?;
    drop(progress);
    let raw = base.record.raw_qemu_args();
    if !raw.is_empty() {
        eprintln!(
            "WARNING: base {} passes raw arguments to QEMU, trusted on your word \
             (--trust-extra-args): {raw:?}\n\
             They go on the command line of every VM resumed from this base, the synthesis \
             server's sessions included. `cloudlet del-base {}` removes it.",
            base.record.id, base.record.id
        );
    }
    print_base(&base, a.json)
}
