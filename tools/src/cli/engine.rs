//! `diff`, `info-overlay`, `verify`, `reconstruct`: the overlay engine on image files, without
//! a VM.

use super::{file_size, print_json, Context, Terminal};
use anyhow::{Context as _, Result};
use cloudlet_tools::inspect::{self, open_overlay, overlay_info};
use cloudlet_tools::Reporter;
use serde::Serialize;
use std::path::PathBuf;
use synth::codec::Codec;
use synth::create::{CreateOptions, CustomImages};

/// Arguments of `diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Base id (or unique prefix, or name).
    base: String,
    /// Custom disk image.
    #[arg(long)]
    disk: PathBuf,
    /// Custom memory image.
    #[arg(long)]
    memory: PathBuf,
    /// Custom device state.
    #[arg(long)]
    device_state: Option<PathBuf>,
    /// Overlay file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Only examine these disk chunks (one chunk number per line, e.g. a cloudletfs trace).
    #[arg(long, value_name = "FILE")]
    disk_chunks: Option<PathBuf>,
    /// Only examine these memory chunks (one chunk number per line).
    #[arg(long, value_name = "FILE")]
    memory_chunks: Option<PathBuf>,
    /// Store these chunks first ("disk N" / "memory N" per line): the working set.
    #[arg(long, value_name = "FILE")]
    order: Option<PathBuf>,
    /// Segment codec.
    #[arg(long, default_value = "xz")]
    codec: Codec,
    /// Compression level (default: 9 for xz, 19 for zstd).
    #[arg(long)]
    level: Option<u32>,
    /// Decoded segment size in KiB (segments outside the working set).
    #[arg(long, default_value_t = (synth::create::DEFAULT_SEGMENT_SIZE >> 10) as u64)]
    segment_kib: u64,
    /// Decoded size in KiB of the segments holding the chunks listed by --order.
    #[arg(long, default_value_t = (synth::create::DEFAULT_FIRST_SEGMENT_SIZE >> 10) as u64)]
    first_segment_kib: u64,
    /// Print statistics as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `info-overlay`.
#[derive(Debug, clap::Args)]
pub struct InfoOverlayArgs {
    /// Overlay file.
    overlay: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Overlay file.
    overlay: PathBuf,
    /// Also rebuild every chunk against this base and check its SHA-256.
    #[arg(long)]
    base: Option<String>,
    /// Print the report (with segment decode timings) as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `reconstruct`.
#[derive(Debug, clap::Args)]
pub struct ReconstructArgs {
    /// Base id (or unique prefix, or name).
    base: String,
    /// Overlay file.
    overlay: PathBuf,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Print statistics as JSON.
    #[arg(long)]
    json: bool,
}

pub fn diff(ctx: &Context, a: &DiffArgs) -> Result<()> {
    let reg = ctx.registry()?;
    let base = reg.get(&a.base)?;
    let load_start = std::time::Instant::now();
    let index = base.index()?;
    let index_load_seconds = load_start.elapsed().as_secs_f64();
    let opts = CreateOptions {
        codec: a.codec,
        level: a.level.unwrap_or(a.codec.default_level()),
        segment_size: usize::try_from(a.segment_kib.saturating_mul(1024))
            .context("segment size too large")?,
        first_segment_size: usize::try_from(a.first_segment_kib.saturating_mul(1024))
            .context("segment size too large")?,
        threads: ctx.threads,
        disk_chunks: a
            .disk_chunks
            .as_deref()
            .map(inspect::read_chunk_list)
            .transpose()?,
        memory_chunks: a
            .memory_chunks
            .as_deref()
            .map(inspect::read_chunk_list)
            .transpose()?,
        order: a
            .order
            .as_deref()
            .map(inspect::read_order)
            .transpose()?
            .unwrap_or_default(),
    };
    let total = match (&opts.disk_chunks, &opts.memory_chunks) {
        (Some(d), Some(m)) => (d.len() + m.len()) as u64 * 4096,
        _ => file_size(&a.disk)? + file_size(&a.memory)?,
    };
    let custom = CustomImages {
        disk: a.disk.clone(),
        memory: a.memory.clone(),
        device_state: a.device_state.clone(),
    };
    let start = std::time::Instant::now();
    let progress = Terminal.progress("diffing", total);
    let stats = synth::create::create_overlay(
        &base,
        &index,
        &custom,
        &a.output,
        &opts,
        progress.counter(),
    )?;
    drop(progress);
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            stats: &'a synth::create::CreateStats,
            seconds: f64,
            index_load_seconds: f64,
        }
        print_json(&Out {
            stats: &stats,
            seconds: secs,
            index_load_seconds,
        })?;
    } else {
        println!(
            "wrote {} ({} bytes, {} segments); examined {} chunks in {secs:.2}s",
            a.output.display(),
            stats.overlay_bytes,
            stats.segments,
            stats.examined_chunks
        );
    }
    Ok(())
}

pub fn info_overlay(a: &InfoOverlayArgs) -> Result<()> {
    let ov = open_overlay(&a.overlay)?;
    let info = overlay_info(&ov);
    if a.json {
        return print_json(&info);
    }
    println!("overlay      {}", a.overlay.display());
    println!(
        "file size    {} bytes (metadata {})",
        info.file_size, info.metadata_size
    );
    println!("base         {}", info.base_id);
    println!("digest       {}", info.metadata_digest);
    println!("codec        {}", info.codec);
    println!(
        "segments     {} ({} bytes compressed, {} decoded)",
        info.segments, info.segment_bytes, info.segment_raw_bytes
    );
    println!("device state {} bytes", info.device_state_size);
    for (name, i) in [("disk", &info.disk), ("memory", &info.memory)] {
        let c = &i.classes;
        println!(
            "{name:<6} size {} changed {}: zero {} base-disk {} base-memory {} self {} xor {} raw {}",
            i.size, i.changed_chunks, c.zero, c.base_disk, c.base_memory, c.self_ref, c.xor, c.raw
        );
    }
    Ok(())
}

pub fn verify(ctx: &Context, a: &VerifyArgs) -> Result<()> {
    let ov = open_overlay(&a.overlay)?;
    let base = a
        .base
        .as_deref()
        .map(|key| ctx.registry()?.get(key).map_err(anyhow::Error::from))
        .transpose()?;
    let total = ov.metadata().disk.size + ov.metadata().memory.size;
    let progress: Box<dyn cloudlet_tools::Progress> = match base {
        Some(_) => Terminal.progress("verifying", total),
        None => Box::new(cloudlet_tools::Counter::default()),
    };
    let report = inspect::verify(
        &ctx.home,
        &a.overlay,
        &ov,
        base.as_ref(),
        ctx.threads,
        progress.counter(),
    )?;
    drop(progress);
    if a.json {
        return print_json(&report);
    }
    let n = report.segments;
    match report.verified_chunks {
        Some(c) => println!("ok: {n} segments decoded, {c} chunks verified against the base"),
        None => println!("ok: structure and {n} segments verified"),
    }
    println!(
        "segment decode: p50 {:.2} ms, p99 {:.2} ms, {:.0} MB/s decoded",
        report.decode_ms_p50, report.decode_ms_p99, report.decode_mb_per_s
    );
    Ok(())
}

pub fn reconstruct(ctx: &Context, a: &ReconstructArgs) -> Result<()> {
    let base = ctx.registry()?.get(&a.base)?;
    let ov = open_overlay(&a.overlay)?;
    let total = ov.metadata().disk.size + ov.metadata().memory.size;
    let start = std::time::Instant::now();
    let progress = Terminal.progress("rebuilding", total);
    let stats =
        synth::reconstruct::reconstruct(&base, &ov, &a.output, ctx.threads, progress.counter())
            .with_context(|| format!("reconstructing from {}", a.overlay.display()))?;
    drop(progress);
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            stats: &'a synth::reconstruct::ReconstructStats,
            seconds: f64,
        }
        return print_json(&Out {
            stats: &stats,
            seconds: secs,
        });
    }
    println!(
        "wrote {}/{{disk.img,memory.img,device-state}}: {} bytes, {} chunks verified, {secs:.2}s",
        a.output.display(),
        stats.bytes,
        stats.verified_chunks
    );
    Ok(())
}
