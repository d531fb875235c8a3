//! `unimem bench`: the reference's allocation table, measured on this machine.

use anyhow::Context;
use serde::Serialize;
use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::hint::black_box;
use std::time::{Duration, Instant};
use unimem::{AllocationMode, MemoryManager};

#[derive(clap::Args)]
pub struct Args {
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Time spent on each measurement, in milliseconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    millis: u64,
    /// A short run (20 ms a measurement): a smoke test, not figures to quote.
    #[arg(long)]
    quick: bool,
}

/// The baselines ask for the platform allocator's natural alignment, for which Rust calls
/// `malloc`/`calloc`/`free` directly (an over-aligned `alloc_zeroed` would memset, which a
/// plain `calloc` avoids for fresh pages).
const BASELINE_ALIGN: usize = 16;

/// One row: an operation, timed through unimem and through the baseline.
#[derive(Serialize)]
struct Row {
    operation: &'static str,
    bytes: usize,
    unimem_ns: f64,
    baseline: &'static str,
    baseline_ns: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    allocation: Vec<Row>,
    statistics: unimem::MemoryStatistics,
}

/// Nanoseconds per call of `op`, the best of five batches sized to fill `budget`.
fn time_per_op(budget: Duration, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget / 10 || calls < 3 {
        op();
        calls += 1;
    }
    let per_batch = (calls * 2).max(3);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                op();
            }
            t.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Times fresh allocations that cannot be served from a pool: `batch` at a time are held,
/// then released and the pool trimmed, outside the timing.
fn time_fresh(
    manager: &MemoryManager,
    bytes: usize,
    mode: AllocationMode,
    batch: usize,
) -> unimem::Result<f64> {
    let mut total = Duration::ZERO;
    let mut count = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let held = (0..batch).map(|_| manager.allocate::<u8>(bytes, mode)).collect::<Result<Vec<_>, _>>()?;
        total += start.elapsed();
        count += held.len();
        drop(held);
        manager.trim();
    }
    Ok(total.as_nanos() as f64 / count as f64)
}

fn system_alloc_free(bytes: usize) {
    let layout = Layout::from_size_align(bytes, BASELINE_ALIGN).expect("layout");
    // SAFETY: the layout has a non-zero size; the pointer is freed with the same layout.
    unsafe {
        let ptr = alloc(layout);
        assert!(!ptr.is_null(), "system allocator out of memory");
        black_box(ptr);
        dealloc(ptr, layout);
    }
}

fn system_fresh(bytes: usize, batch: usize) -> f64 {
    let layout = Layout::from_size_align(bytes, BASELINE_ALIGN).expect("layout");
    let mut total = Duration::ZERO;
    for _ in 0..5 {
        let start = Instant::now();
        // SAFETY: non-zero layout; every pointer is freed below with the same layout.
        let held: Vec<*mut u8> = (0..batch).map(|_| unsafe { alloc_zeroed(layout) }).collect();
        total += start.elapsed();
        for ptr in held {
            assert!(!ptr.is_null(), "system allocator out of memory");
            // SAFETY: allocated above with `layout`.
            unsafe { dealloc(ptr, layout) };
        }
    }
    total.as_nanos() as f64 / (5 * batch) as f64
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let budget = Duration::from_millis(if args.quick { 20 } else { args.millis });
    let manager = MemoryManager::new();
    let device = manager.devices().first().map(|d| d.name.clone()).unwrap_or_default();
    println!("unimem bench on {device}\n");

    let mut rows = Vec::new();
    // Pool hit: allocate and drop a pooled buffer whose class is already pooled.
    drop(manager.allocate::<u8>(1024, AllocationMode::Pooled)?);
    let hit = time_per_op(budget, || drop(black_box(manager.allocate::<u8>(1024, AllocationMode::Pooled))));
    rows.push(Row {
        operation: "pool hit (allocate + return)",
        bytes: 1024,
        unimem_ns: hit,
        baseline: "malloc + free",
        baseline_ns: time_per_op(budget, || system_alloc_free(1024)),
    });
    let miss_small = time_fresh(&manager, 256 << 10, AllocationMode::Pooled, 64)?;
    rows.push(Row {
        operation: "pool miss, small",
        bytes: 256 << 10,
        unimem_ns: miss_small,
        baseline: "calloc",
        baseline_ns: system_fresh(256 << 10, 64),
    });
    let miss_large = time_fresh(&manager, 128 << 20, AllocationMode::Pooled, 4)?;
    rows.push(Row {
        operation: "pool miss, large",
        bytes: 128 << 20,
        unimem_ns: miss_large,
        baseline: "calloc",
        baseline_ns: system_fresh(128 << 20, 4),
    });
    let unpooled =
        time_per_op(budget, || drop(black_box(manager.allocate::<u8>(1 << 20, AllocationMode::Unpooled))));
    rows.push(Row {
        operation: "unpooled (allocate + free)",
        bytes: 1 << 20,
        unimem_ns: unpooled,
        baseline: "malloc + free",
        baseline_ns: time_per_op(budget, || system_alloc_free(1 << 20)),
    });
    // Four 1 MiB blocks at a time: within the default 8 MiB lock limit of unprivileged users.
    match time_fresh(&manager, 1 << 20, AllocationMode::Pinned, 4) {
        Ok(pinned) => rows.push(Row {
            operation: "pinned allocation (mlock)",
            bytes: 1 << 20,
            unimem_ns: pinned,
            baseline: "calloc",
            baseline_ns: system_fresh(1 << 20, 4),
        }),
        Err(e) => println!("pinned allocation not measured: {e}\n"),
    }
    // Disposal: returning a buffer to the pool.
    let mut disposal = f64::INFINITY;
    for _ in 0..5 {
        let held: Vec<_> = (0..256)
            .map(|_| manager.allocate::<u8>(4096, AllocationMode::Pooled))
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        drop(held);
        disposal = disposal.min(start.elapsed().as_nanos() as f64 / 256.0);
    }
    rows.push(Row {
        operation: "disposal (return to pool)",
        bytes: 4096,
        unimem_ns: disposal,
        baseline: "free",
        baseline_ns: f64::NAN,
    });

    // A steady workload for the statistics line: rotating sizes, mostly reuse.
    for i in 0..10_000usize {
        let _keep = manager.allocate::<f32>(256 << (i % 8), AllocationMode::Pooled)?;
    }

    println!("Allocation                       size      unimem        baseline              speedup");
    for r in &rows {
        let speedup = if r.baseline_ns.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2}x", r.baseline_ns / r.unimem_ns)
        };
        let baseline = if r.baseline_ns.is_nan() {
            "-".to_string()
        } else {
            format!("{} {}", fmt_ns(r.baseline_ns), r.baseline)
        };
        println!(
            "{:<31} {:>8} {:>11}    {:<21} {:>7}",
            r.operation,
            fmt_bytes(r.bytes),
            fmt_ns(r.unimem_ns),
            baseline,
            speedup
        );
    }
    let statistics = manager.statistics();
    println!("\n{statistics}");

    if let Some(path) = &args.json {
        let report = Report { device, allocation: rows, statistics };
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

fn fmt_ns(ns: f64) -> String {
    match ns {
        n if n < 1_000.0 => format!("{n:.1} ns"),
        n if n < 1_000_000.0 => format!("{:.1} us", n / 1e3),
        n => format!("{:.2} ms", n / 1e6),
    }
}

fn fmt_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}
