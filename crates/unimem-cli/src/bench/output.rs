//! Where results go: the tables as text (row by row, to stdout or stderr), and the files of
//! `--json`, `--csv` and `--plot`, checked before anything is measured.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use indicatif::ProgressBar;
use unimem::{DeviceInfo, MemoryManager, MemoryStatistics};

use super::measure::{Sampling, ratio_text};
use super::report::{Machine, Report, Row, Table};
use super::{fmt_bytes, fmt_ns, fmt_rate};

/// An output file opened (not truncated) before the run, or stdout.
pub struct OutputFile {
    file: Option<(File, PathBuf)>,
}

impl OutputFile {
    /// Opens `path` for writing (`-`: stdout): an unwritable path is an error now, not
    /// after the run. The file is truncated only when the results are written.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if super::is_stdout(path) {
            return Ok(OutputFile { file: None });
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(OutputFile { file: Some((file, path.to_path_buf())) })
    }

    pub fn is_stdout(&self) -> bool {
        self.file.is_none()
    }

    /// Writes `bytes` as the whole content; returns where it went.
    pub fn write(self, bytes: &[u8]) -> anyhow::Result<String> {
        match self.file {
            None => {
                let mut out = io::stdout().lock();
                match out.write_all(bytes).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                    result => result.context("writing to stdout")?,
                }
                Ok("stdout".into())
            }
            Some((mut file, path)) => {
                file.set_len(0)
                    .and_then(|()| file.write_all(bytes))
                    .and_then(|()| file.flush())
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(path.display().to_string())
            }
        }
    }
}

/// Creates `dir` if needed and checks that a file can be made in it.
pub fn check_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the plot directory {}", dir.display()))?;
    let probe = dir.join(".unimem-write-check");
    File::create(&probe)
        .with_context(|| format!("cannot write into the plot directory {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// The text output: to stdout, or to stderr when stdout carries JSON or CSV. A closed
/// stream (`unimem bench | head`) ends the printing and nothing else.
pub struct Printer {
    out: Box<dyn Write>,
    closed: bool,
    bar: ProgressBar,
    last_table: Option<Table>,
}

impl Printer {
    pub fn new(to_stderr: bool, bar: ProgressBar) -> Self {
        let out: Box<dyn Write> = if to_stderr { Box::new(io::stderr()) } else { Box::new(io::stdout()) };
        Printer { out, closed: false, bar, last_table: None }
    }

    /// Prints one line (through the progress bar, so that it is not drawn over).
    pub fn line(&mut self, text: &str) {
        if self.closed {
            return;
        }
        let out = &mut self.out;
        let written = self.bar.suspend(|| writeln!(out, "{text}").and_then(|()| out.flush()));
        if written.is_err() {
            // A reader that went away has what it wanted; other errors would repeat.
            self.closed = true;
        }
    }

    pub fn note(&mut self, text: &str) {
        self.line(text);
    }

    pub fn header(
        &mut self,
        manager: &MemoryManager,
        devices: &[DeviceInfo],
        sampling: &Sampling,
        quick: bool,
    ) {
        self.line(&format!(
            "unimem {} bench{}",
            env!("CARGO_PKG_VERSION"),
            if quick { " --quick" } else { "" }
        ));
        self.line(&format!(
            "each figure: the median of {} samples after a warm-up, [min–max]; ratios are unimem against the baseline on the same work",
            sampling.samples
        ));
        let names: Vec<String> =
            devices.iter().map(|d| format!("{} {} ({})", d.id, d.kind, d.name)).collect();
        self.line(&format!("devices: {}", names.join("; ")));
        for note in manager.backend_notes() {
            self.line(&format!("no devices from {note}"));
        }
    }

    pub fn device(&mut self, device: &DeviceInfo) {
        self.line("");
        self.line(&format!("== {} [{}] {} ==", device.id, device.kind, device.name));
        self.last_table = None;
    }

    pub fn row(&mut self, row: &Row) {
        if self.last_table != Some(row.table) {
            self.last_table = Some(row.table);
            self.line(match row.table {
                Table::Allocation => "\nAllocation (time per operation)",
                Table::Transfer => {
                    "\nTransfer bandwidth (through the transfer engine: the strategy it chose)"
                }
                Table::Pool => "\nPool efficiency on workload traces (time per trace operation)",
            });
        }
        self.line(&format_row(row));
    }

    pub fn footer(&mut self, statistics: &MemoryStatistics, elapsed: Duration) {
        self.line("");
        self.line(&format!("{statistics}"));
        self.line(&format!("finished in {:.1} s", elapsed.as_secs_f64()));
    }
}

/// One row as text.
pub fn format_row(row: &Row) -> String {
    let size = if row.table == Table::Pool { String::new() } else { fmt_bytes(row.bytes) };
    let mut text = format!("  {:<34} {:>8}", row.operation, size);
    if let Some(skipped) = &row.skipped {
        text.push_str(&format!("  skipped: {}", skipped.reason));
        if let Some(hint) = &skipped.hint {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let Some(unimem) = row.unimem else { return text };
    if let Some(pool) = &row.pool {
        text.push_str(&format!(
            "  hits {:.1}%, calls avoided {:.1}%, overhead {:.2}x, peak {}",
            pool.hit_rate * 100.0,
            pool.allocations_avoided * 100.0,
            pool.overhead,
            fmt_bytes(pool.peak_reserved)
        ));
    }
    let value = |f: &super::measure::Figure, bytes: u64| match row.table {
        Table::Transfer => format!(
            "{} [{}–{}]",
            fmt_rate(f.bytes_per_second(bytes)),
            fmt_rate(bytes as f64 / (f.max_ns / 1e9)),
            fmt_rate(bytes as f64 / (f.min_ns / 1e9))
        ),
        _ => format!("{} [{}–{}]", fmt_ns(f.median_ns), fmt_ns(f.min_ns), fmt_ns(f.max_ns)),
    };
    if let Some(strategy) = &row.strategy {
        text.push_str(&format!("  {strategy:<14}"));
    }
    text.push_str(&format!("  unimem {}", value(&unimem, row.bytes)));
    for c in &row.baselines {
        let short = match row.table {
            Table::Transfer => fmt_rate(c.figure.bytes_per_second(row.bytes)),
            _ => fmt_ns(c.figure.median_ns),
        };
        text.push_str(&format!("  | {} {short}: {}", c.baseline, ratio_text(c.speedup)));
    }
    text
}

/// `time` as RFC 3339 in UTC, e.g. `2026-11-24T09:30:00Z`.
pub fn timestamp(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// What this machine is.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_bytes = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    let lock_limit_bytes = (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY)
        .then_some(limit.rlim_cur);
    Machine {
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes,
        lock_limit_bytes,
    }
}

/// A CSV field, quoted where it must be.
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Every figure as CSV: one line per (row, baseline), a row without baselines on a line
/// of its own.
pub fn csv(report: &Report) -> String {
    let mut out = String::from(
        "table,device,kind,device_name,operation,bytes,strategy,unimem_median_ns,unimem_min_ns,unimem_max_ns,\
         baseline,baseline_median_ns,baseline_min_ns,baseline_max_ns,speedup,hit_rate,allocations_avoided,\
         overhead,peak_reserved,skipped\n",
    );
    let num = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x}"));
    for device in &report.devices {
        for row in device.allocation.iter().chain(&device.transfer).chain(&device.pool) {
            let table = match row.table {
                Table::Allocation => "allocation",
                Table::Transfer => "transfer",
                Table::Pool => "pool",
            };
            let head = [
                table.to_string(),
                device.info.id.index().to_string(),
                device.info.kind.to_string(),
                field(&device.info.name),
                field(&row.operation),
                row.bytes.to_string(),
                row.strategy.clone().unwrap_or_default(),
                num(row.unimem.map(|f| f.median_ns)),
                num(row.unimem.map(|f| f.min_ns)),
                num(row.unimem.map(|f| f.max_ns)),
            ]
            .join(",");
            let tail = [
                num(row.pool.as_ref().map(|p| p.hit_rate)),
                num(row.pool.as_ref().map(|p| p.allocations_avoided)),
                num(row.pool.as_ref().map(|p| p.overhead)),
                row.pool.as_ref().map_or(String::new(), |p| p.peak_reserved.to_string()),
                field(row.skipped.as_ref().map_or("", |s| s.reason.as_str())),
            ]
            .join(",");
            if row.baselines.is_empty() {
                out.push_str(&format!("{head},,,,,,{tail}\n"));
            }
            for c in &row.baselines {
                out.push_str(&format!(
                    "{head},{},{},{},{},{},{tail}\n",
                    field(&c.baseline),
                    c.figure.median_ns,
                    c.figure.min_ns,
                    c.figure.max_ns,
                    c.speedup
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(1_795_512_345)), "2026-11-24T09:25:45Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn csv_fields_are_quoted_where_needed() {
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(field("plain"), "plain");
    }
}
