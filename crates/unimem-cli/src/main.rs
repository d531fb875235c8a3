//! `unimem`: list devices, and benchmark allocation on them against baselines.

mod bench;

use clap::{Parser, Subcommand};
use unimem::MemoryManager;

#[derive(Parser)]
#[command(version, about = "Memory for CPU and accelerators: devices and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every device of every backend, with its memory and capabilities.
    Devices,
    /// Measure allocation (pool hit, pool miss, unpooled, pinned) against the system
    /// allocator, in one run, and print the tables and the manager's statistics.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Devices => devices(),
        Command::Bench(args) => bench::run(&args),
    }
}

fn devices() -> anyhow::Result<()> {
    let manager = MemoryManager::new();
    for d in manager.devices() {
        println!("{} [{}] {}", d.id, d.kind, d.name);
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        let free = manager
            .free_memory(d.id)
            .ok()
            .flatten()
            .map_or("unknown".into(), |f| format!("{:.1} GiB", gib(f)));
        println!(
            "    memory: {:.1} GiB total, {free} free; host-addressable: {}, pinned: {}, unified: {}, peer: {}",
            gib(d.total_memory),
            d.host_addressable,
            d.supports_pinned,
            d.supports_unified,
            d.peer_capable
        );
    }
    for note in manager.backend_notes() {
        println!("no devices from {note}");
    }
    if !cfg!(feature = "opencl") {
        println!("opencl: not built in (build with --features opencl)");
    }
    if !cfg!(feature = "cuda") {
        println!("cuda: not built in (build with --features cuda)");
    }
    println!("wgpu: not built into this version");
    Ok(())
}
