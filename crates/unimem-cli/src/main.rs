//! `unimem`: list devices, and measure allocation, transfers and pools on them against the
//! baselines a user would otherwise pick.

mod bench;

use std::io::{self, Write};

use clap::{Parser, Subcommand};
use unimem::MemoryManager;

#[derive(Parser)]
#[command(name = "unimem", version, about = "Memory for CPU and accelerators: devices and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every device of every backend, with its memory and capabilities.
    Devices {
        /// Print the devices (and why backends found none) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure, on every device, allocation, transfer bandwidth and pool efficiency on
    /// workload traces against the baselines a user would otherwise pick, in one run.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    let result = match Cli::parse().command {
        Command::Devices { json } => devices(json),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        // The reader went away (`unimem devices | head -1`): it has all it wanted.
        Err(error) if is_broken_pipe(&error) => Ok(()),
        result => result,
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}

fn devices(json: bool) -> anyhow::Result<()> {
    let manager = MemoryManager::new();
    let mut out = io::stdout().lock();
    if json {
        let devices: Vec<_> = manager
            .devices()
            .into_iter()
            .map(|mut d| {
                d.free_memory = manager.free_memory(d.id).ok().flatten();
                d
            })
            .collect();
        let value = serde_json::json!({ "devices": devices, "backend_notes": manager.backend_notes() });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        out.flush()?;
        return Ok(());
    }
    for d in manager.devices() {
        writeln!(out, "{} [{}] {}", d.id, d.kind, d.name)?;
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        let free = manager
            .free_memory(d.id)
            .ok()
            .flatten()
            .map_or("unknown".into(), |f| format!("{:.1} GiB", gib(f)));
        writeln!(
            out,
            "    memory: {:.1} GiB total, {free} free; host-addressable: {}, pinned: {}, unified: {}, peer: {}",
            gib(d.total_memory),
            d.host_addressable,
            d.supports_pinned,
            d.supports_unified,
            d.peer_capable
        )?;
    }
    for note in manager.backend_notes() {
        writeln!(out, "no devices from {note}")?;
    }
    if !cfg!(feature = "opencl") {
        writeln!(out, "opencl: not built in (build with the default features)")?;
    }
    if !cfg!(feature = "cuda") {
        writeln!(out, "cuda: not built in (build with the default features)")?;
    }
    if !cfg!(feature = "wgpu") {
        writeln!(out, "wgpu: not built in (build with the default features)")?;
    }
    out.flush()?;
    Ok(())
}
