//! `--plot DIR`: SVG plots of a run (plotters, no fonts needed: the SVG viewer draws the
//! text).
//!
//! - `transfer-bandwidth.svg`: bandwidth against transfer size, one solid line per device
//!   and path through unimem's transfer engine, and a thin line of the same colour for the
//!   driver's own copy it was measured against.
//! - `allocation-latency.svg`: time per operation against size, for unimem (solid) and each
//!   baseline (thin), per device and operation.
//! - `pool-overhead.svg`: memory overhead (reserved ÷ requested) and hit rate on each trace,
//!   with 21 size classes and with 4 divisions per power of two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::report::{Report, Row};
use super::{fmt_bytes, fmt_ns};

const SIZE: (u32, u32) = (1200, 800);

/// A readable palette, cycled.
fn colour(index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    PALETTE[index % PALETTE.len()]
}

/// A named line: points (x, y), drawn solid for unimem, thin for a baseline.
struct Series {
    name: String,
    colour: usize,
    baseline: bool,
    points: Vec<(f64, f64)>,
}

/// The series of `rows` (unimem and each baseline per device and operation), with `y`
/// taken from a figure and the row's size.
fn series_of<'a>(
    rows: impl Iterator<Item = (String, &'a Row)>,
    y: impl Fn(&super::measure::Figure, u64) -> f64,
) -> Vec<Series> {
    // (series name, is a baseline) -> (colour, points)
    type Points = (usize, Vec<(f64, f64)>);
    let mut by_name: BTreeMap<(String, bool), Points> = BTreeMap::new();
    let mut colours: BTreeMap<String, usize> = BTreeMap::new();
    for (device, row) in rows {
        let Some(unimem) = row.unimem else { continue };
        // Labels of rows whose baselines did not run carry a note: plot them by their name.
        let operation = row.operation.split(" (baseline").next().unwrap_or(&row.operation);
        let key = format!("{device}: {operation}");
        let next = colours.len();
        let c = *colours.entry(key.clone()).or_insert(next);
        let x = row.bytes as f64;
        by_name
            .entry((format!("{key}, unimem"), false))
            .or_insert((c, Vec::new()))
            .1
            .push((x, y(&unimem, row.bytes)));
        for b in &row.baselines {
            let name = format!("{key}, {}", b.baseline);
            by_name.entry((name, true)).or_insert((c, Vec::new())).1.push((x, y(&b.figure, row.bytes)));
        }
    }
    by_name
        .into_iter()
        .map(|((name, baseline), (colour, mut points))| {
            points.retain(|&(x, y)| x > 0.0 && y.is_finite() && y > 0.0);
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series { name, colour, baseline, points }
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// Draws `series` on log–log axes into `path`.
fn log_log(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    y_format: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (y_lo, y_hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d((x_lo / 2.0..x_hi * 2.0).log_scale(), (y_lo / 2.0..y_hi * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("size")
        .y_desc(y_label)
        .x_label_formatter(&|x| fmt_bytes(x.round() as u64))
        .y_label_formatter(y_format)
        .draw()?;
    for s in series {
        let c = colour(s.colour);
        let style = if s.baseline { c.mix(0.55).stroke_width(1) } else { c.stroke_width(3) };
        chart
            .draw_series(LineSeries::new(s.points.clone(), style).point_size(if s.baseline { 2 } else { 4 }))?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes the plots of `report` into `dir` (created and checked writable by the caller);
/// a plot with no data is left out. Returns the files written.
pub fn write_plots(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let device_name = |d: &super::report::DeviceReport| format!("{} {}", d.info.kind, d.info.id.index());

    let transfers = series_of(
        report.devices.iter().flat_map(|d| d.transfer.iter().map(move |r| (device_name(d), r))),
        |f, bytes| f.bytes_per_second(bytes) / 1e9,
    );
    if !transfers.is_empty() {
        let path = dir.join("transfer-bandwidth.svg");
        log_log(
            &path,
            "Transfer bandwidth: unimem's engine (thick) vs the driver's copy (thin)",
            "GB/s",
            &transfers,
            &|y| format!("{y:.2}"),
        )?;
        written.push(path);
    }

    let allocation = series_of(
        report.devices.iter().flat_map(|d| d.allocation.iter().map(move |r| (device_name(d), r))),
        |f, _| f.median_ns,
    );
    if !allocation.is_empty() {
        let path = dir.join("allocation-latency.svg");
        log_log(
            &path,
            "Allocation: time per operation, unimem (thick) vs baselines (thin)",
            "time",
            &allocation,
            &|y| fmt_ns(*y),
        )?;
        written.push(path);
    }

    let pools: Vec<(String, &super::report::PoolEfficiency)> = report
        .devices
        .iter()
        .flat_map(|d| d.pool.iter().filter_map(move |r| r.pool.as_ref().map(|p| (device_name(d), p))))
        .collect();
    if !pools.is_empty() {
        let path = dir.join("pool-overhead.svg");
        pool_plot(&path, &pools)?;
        written.push(path);
    }
    Ok(written)
}

/// Overhead (top) and hit rate (bottom) per device and trace, for each class layout.
fn pool_plot(path: &Path, pools: &[(String, &super::report::PoolEfficiency)]) -> anyhow::Result<()> {
    let mut groups: Vec<String> = Vec::new();
    for (device, p) in pools {
        let group = format!("{device}: {}", p.trace);
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2);
    let n = groups.len() as f64;
    let max_overhead = pools.iter().map(|(_, p)| p.overhead).fold(1.0, f64::max);
    for (area, title, y_range, value) in [
        (
            &top,
            "Pool memory overhead (peak reserved / peak requested; 1 = none)",
            0.0..max_overhead * 1.2,
            0usize,
        ),
        (&bottom, "Pool hit rate", 0.0..1.05, 1usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..n - 0.5, y_range)?;
        chart
            .configure_mesh()
            .x_labels(groups.len().max(1))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    groups.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                if value == 1 { format!("{:.0}%", y * 100.0) } else { format!("{y:.2}x") }
            })
            .draw()?;
        for (index, divisions) in [1u32, 4].into_iter().enumerate() {
            let c = colour(index);
            let offset = if divisions == 1 { -0.1 } else { 0.1 };
            let points: Vec<(f64, f64)> = pools
                .iter()
                .filter(|(_, p)| p.divisions == divisions)
                .filter_map(|(device, p)| {
                    let x =
                        groups.iter().position(|g| *g == format!("{device}: {}", p.trace))? as f64 + offset;
                    Some((x, if value == 1 { p.hit_rate } else { p.overhead }))
                })
                .collect();
            let label =
                if divisions == 1 { "21 classes".to_string() } else { format!("{divisions} divisions") };
            chart
                .draw_series(
                    points.iter().map(|&(x, y)| Rectangle::new([(x - 0.08, 0.0), (x + 0.08, y)], c.filled())),
                )?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::measure::{Figure, Sampling};
    use super::super::report::{DeviceReport, Machine, PoolEfficiency, Settings, Table};
    use super::*;
    use unimem::{DeviceId, MemoryManager};

    fn figure(ns: f64) -> Figure {
        Figure { median_ns: ns, min_ns: ns * 0.9, max_ns: ns * 1.2, samples: 3 }
    }

    #[test]
    fn three_plots_with_every_series_and_no_nan() {
        let cpu = MemoryManager::builder().backends([]).build().devices()[0].clone();
        let id = DeviceId::CPU;
        let mut pool = Row::measured(
            Table::Pool,
            id,
            "random trace, 21 classes",
            64 << 20,
            figure(3000.0),
            [("unpooled".to_string(), figure(5000.0))],
        );
        pool.pool = Some(PoolEfficiency {
            trace: "random".into(),
            divisions: 1,
            allocations: 10,
            hit_rate: 0.9,
            allocations_avoided: 0.9,
            overhead: 1.4,
            peak_reserved: 1 << 30,
            peak_requested: 700 << 20,
        });
        let device = DeviceReport {
            info: cpu,
            allocation: vec![
                Row::measured(
                    Table::Allocation,
                    id,
                    "pool hit (allocate + return)",
                    1024,
                    figure(20.0),
                    [("glibc malloc".to_string(), figure(25.0))],
                ),
                Row::skipped(Table::Allocation, id, "pinned allocation", 1 << 20, "the lock limit", None),
            ],
            transfer: [4096u64, 1 << 20]
                .into_iter()
                .map(|b| {
                    Row::measured(
                        Table::Transfer,
                        id,
                        "host → host",
                        b,
                        figure(b as f64 / 10.0),
                        [("memcpy (one thread)".to_string(), figure(b as f64 / 8.0))],
                    )
                })
                .collect(),
            pool: vec![pool],
        };
        let report = Report {
            unimem_version: "0",
            timestamp: String::new(),
            machine: Machine {
                os: String::new(),
                arch: String::new(),
                cpu: None,
                cores: 1,
                memory_bytes: None,
                lock_limit_bytes: None,
            },
            settings: Settings {
                quick: true,
                sampling: Sampling {
                    warmup: std::time::Duration::ZERO,
                    sample: std::time::Duration::ZERO,
                    samples: 3,
                },
                transfer_sizes: vec![],
                devices: vec![id],
                traces: vec![],
                seed: 0,
            },
            devices: vec![device],
            backend_notes: vec![],
        };
        let dir = std::env::temp_dir().join(format!("unimem-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let written = write_plots(&report, &dir).unwrap();
        assert_eq!(written.len(), 3);
        for (file, needle) in [
            ("transfer-bandwidth.svg", "memcpy (one thread)"),
            ("allocation-latency.svg", "glibc malloc"),
            ("pool-overhead.svg", "21 classes"),
        ] {
            let svg = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(svg.starts_with("<svg"), "{file}");
            assert!(svg.contains(needle) && svg.contains("cpu 0"), "{file} lacks its series");
            assert!(!svg.contains("NaN"), "{file}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
