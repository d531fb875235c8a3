//! `unimem bench`, the main job: on every device (or those chosen with `--device`), the
//! reference's three tables — allocation, transfer bandwidth, pool efficiency on workload
//! traces — each row against what a user would pick instead, measured in the same run.
//!
//! Each figure is the median of repeated samples after a warm-up, printed with its min–max
//! spread, row by row as it finishes. Output files (`--json`, `--csv`, `--plot`) and trace
//! files are checked before anything is measured. A row that cannot run prints as skipped,
//! with the reason and a hint; a closed stdout stops the printing, not the run.

mod alloc;
mod host;
mod measure;
mod objects;
mod output;
mod pipeline;
mod plot;
mod raw;
mod report;
mod traces;
mod transfer;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use unimem::{DeviceInfo, MemoryManager};

use measure::Sampling;
use output::{OutputFile, Printer};
use report::{DeviceReport, Report, Row, Settings};

/// `unimem bench`'s options.
#[derive(clap::Args)]
pub struct Args {
    /// Measure only these devices: an id (`0`, `1`, as `unimem devices` lists them) or a
    /// kind (`cpu`, `opencl`, `cuda`, `wgpu`); repeat or separate with commas. Default: every device.
    #[arg(long, value_delimiter = ',')]
    device: Vec<String>,
    /// A short run (two transfer sizes, three samples, short traces): under 30 s, a smoke
    /// test rather than figures to quote.
    #[arg(long)]
    quick: bool,
    /// Samples per measurement (default 10; 3 with `--quick`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    samples: Option<u32>,
    /// A workload trace to replay in table 3 besides the built-in ones: CSV lines
    /// `op,size,id` with op `alloc` or `free`. Repeatable.
    #[arg(long)]
    trace: Vec<PathBuf>,
    /// Seed of the random trace.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write every figure as JSON to this file (`-`: stdout, the tables then go to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every figure as CSV to this file (`-`: stdout).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write SVG plots into this directory (created if missing).
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn is_stdout(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

/// The devices `selectors` name, in the manager's order; every device if none.
fn select(manager: &MemoryManager, selectors: &[String]) -> anyhow::Result<Vec<DeviceInfo>> {
    let devices = manager.devices();
    if selectors.is_empty() {
        return Ok(devices);
    }
    let mut chosen: Vec<DeviceInfo> = Vec::new();
    for selector in selectors {
        let s = selector.trim().to_ascii_lowercase();
        let matching: Vec<&DeviceInfo> = match s.parse::<usize>() {
            Ok(index) => devices.iter().filter(|d| d.id.index() == index).collect(),
            Err(_) => devices.iter().filter(|d| d.kind.to_string() == s).collect(),
        };
        if matching.is_empty() {
            let known: Vec<String> =
                devices.iter().map(|d| format!("{} ({}, {})", d.id.index(), d.kind, d.name)).collect();
            let mut message = format!("no device {selector:?}: the devices here are {}", known.join("; "));
            for note in manager.backend_notes() {
                message.push_str(&format!("\n  no devices from {note}"));
            }
            bail!(message);
        }
        for device in matching {
            if !chosen.iter().any(|c| c.id == device.id) {
                chosen.push(device.clone());
            }
        }
    }
    chosen.sort_by_key(|d| d.id);
    Ok(chosen)
}

/// Runs `unimem bench`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    // Everything that can be wrong with the command line is found before measuring.
    if args.json.as_deref().is_some_and(is_stdout) && args.csv.as_deref().is_some_and(is_stdout) {
        bail!("--json - and --csv - both ask for stdout: give one of them a file");
    }
    let json = args.json.as_deref().map(OutputFile::open).transpose()?;
    let csv = args.csv.as_deref().map(OutputFile::open).transpose()?;
    if let Some(dir) = &args.plot {
        output::check_dir(dir)?;
    }
    let mut traces = Vec::new();
    let (random_ops, steps) = if args.quick { (300, 4) } else { (1000, 20) };
    traces.push(traces::random(args.seed, random_ops));
    traces.push(traces::training(steps));
    for path in &args.trace {
        traces.push(traces::parse_csv(path)?);
    }
    let manager = MemoryManager::new();
    let devices = select(&manager, &args.device)?;

    let samples = args.samples.map_or(if args.quick { 3 } else { 10 }, |n| n as usize);
    let sampling = if args.quick {
        Sampling { warmup: Duration::from_millis(5), sample: Duration::from_millis(5), samples }
    } else {
        Sampling { warmup: Duration::from_millis(100), sample: Duration::from_millis(40), samples }
    };
    let sizes = transfer::sizes(args.quick);

    let to_stderr =
        json.as_ref().is_some_and(OutputFile::is_stdout) || csv.as_ref().is_some_and(OutputFile::is_stdout);
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("a valid template"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut printer = Printer::new(to_stderr, bar.clone());
    let started = Instant::now();
    printer.header(&manager, &devices, &sampling, args.quick);

    let mut reports = Vec::new();
    for device in &devices {
        printer.device(device);
        let mut report = DeviceReport {
            info: device.clone(),
            allocation: Vec::new(),
            transfer: Vec::new(),
            pool: Vec::new(),
        };
        let prefix = format!("{} {}", device.id, device.kind);
        let mut step = |what: &str| bar.set_message(format!("{prefix}: {what}"));
        {
            let mut emit = |row: Row| {
                printer.row(&row);
                report.allocation.push(row);
            };
            alloc::rows(&manager, device, &sampling, args.quick, &mut step, &mut emit);
            if device.kind == unimem::DeviceKind::Cpu {
                step("two threads, warm writes");
                host::rows(&manager, device.id, &sampling, args.quick, &mut emit);
                step("pipeline");
                pipeline::rows(&manager, device, &sampling, args.quick, &mut emit);
                step("object pool");
                objects::rows(device.id, &sampling, &mut emit);
            }
        }
        {
            let mut emit = |row: Row| {
                printer.row(&row);
                report.transfer.push(row);
            };
            transfer::rows(&manager, device, &sampling, &sizes, &mut step, &mut emit);
        }
        step("workload traces");
        {
            let mut emit = |row: Row| {
                printer.row(&row);
                report.pool.push(row);
            };
            traces::pool_rows(&manager, device.id, &traces, &sampling, &mut emit);
        }
        reports.push(report);
    }
    bar.finish_and_clear();

    let report = Report {
        unimem_version: env!("CARGO_PKG_VERSION"),
        timestamp: output::timestamp(std::time::SystemTime::now()),
        machine: output::machine(),
        settings: Settings {
            quick: args.quick,
            sampling,
            transfer_sizes: sizes,
            devices: devices.iter().map(|d| d.id).collect(),
            traces: traces.iter().map(|t| t.name.clone()).collect(),
            seed: args.seed,
        },
        devices: reports,
        backend_notes: manager.backend_notes().to_vec(),
    };
    printer.footer(&manager.statistics(), started.elapsed());
    if let Some(file) = json {
        let text = serde_json::to_string_pretty(&report)?;
        let name = file.write(text.as_bytes())?;
        printer.note(&format!("JSON written to {name}"));
    }
    if let Some(file) = csv {
        let name = file.write(output::csv(&report).as_bytes())?;
        printer.note(&format!("CSV written to {name}"));
    }
    if let Some(dir) = &args.plot {
        let written = plot::write_plots(&report, dir)
            .with_context(|| format!("writing plots into {}", dir.display()))?;
        for path in written {
            printer.note(&format!("plot written to {}", path.display()));
        }
    }
    Ok(())
}

/// "4 KiB", "256 MiB", "1 GiB".
pub fn fmt_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// "27.7 ns", "3.1 us", "12.40 ms", "1.20 s".
pub fn fmt_ns(ns: f64) -> String {
    match ns {
        n if n < 1e3 => format!("{n:.1} ns"),
        n if n < 1e6 => format!("{:.1} us", n / 1e3),
        n if n < 1e9 => format!("{:.2} ms", n / 1e6),
        n => format!("{:.2} s", n / 1e9),
    }
}

/// "2.41 GB/s" (decimal gigabytes, as bandwidth is quoted).
pub fn fmt_rate(bytes_per_second: f64) -> String {
    match bytes_per_second {
        r if r >= 1e9 => format!("{:.2} GB/s", r / 1e9),
        r => format!("{:.0} MB/s", r / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(fmt_bytes(4096), "4 KiB");
        assert_eq!(fmt_bytes(256 << 20), "256 MiB");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_ns(27.7), "27.7 ns");
        assert_eq!(fmt_ns(12_400_000.0), "12.40 ms");
        assert_eq!(fmt_rate(2.41e9), "2.41 GB/s");
    }
}
