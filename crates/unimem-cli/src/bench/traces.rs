//! Table 3, pool efficiency on workload traces: a seeded RMM-style random trace, a
//! training-style trace, and the user's own (`--trace FILE`), each replayed on a fresh
//! manager with the reference's 21 size classes and with 4 divisions per power of two.
//!
//! For each: hit rate, backend allocation calls avoided, memory overhead (peak reserved ÷
//! peak requested and live), peak reserved, and the replay's time against the same trace
//! unpooled and on the backend's raw allocator. Times cover the allocation and free calls
//! and nothing else, except that on devices, where unimem zero-fills fresh memory (a pool
//! hit is not filled), the raw allocator's blocks are filled too: both sides then hand out
//! memory written once.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use unimem::{AllocationMode, Buffer, DeviceId, MemoryManager, MemoryOptions};

use super::measure::{Figure, Sampling};
use super::raw;
use super::report::{PoolEfficiency, Row, Table};

/// One operation of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Alloc { id: u64, bytes: usize },
    Free { id: u64 },
}

/// A workload: allocations and frees in order, every allocation freed by the end.
#[derive(Clone, Debug)]
pub struct Trace {
    pub name: String,
    pub ops: Vec<Op>,
}

impl Trace {
    fn allocations(&self) -> u64 {
        self.ops.iter().filter(|op| matches!(op, Op::Alloc { .. })).count() as u64
    }

    fn largest(&self) -> usize {
        self.ops.iter().map(|op| if let Op::Alloc { bytes, .. } = op { *bytes } else { 0 }).max().unwrap_or(0)
    }

    /// The most bytes requested and live at once.
    fn peak_requested(&self) -> u64 {
        let mut live = HashMap::new();
        let (mut now, mut peak) = (0u64, 0u64);
        for op in &self.ops {
            match *op {
                Op::Alloc { id, bytes } => {
                    live.insert(id, bytes as u64);
                    now += bytes as u64;
                    peak = peak.max(now);
                }
                Op::Free { id } => now -= live.remove(&id).unwrap_or(0),
            }
        }
        peak
    }

    /// Frees, in id order, whatever is still live at the end.
    fn close(mut self) -> Self {
        let mut live = std::collections::BTreeSet::new();
        for op in &self.ops {
            match *op {
                Op::Alloc { id, .. } => live.insert(id),
                Op::Free { id } => live.remove(&id),
            };
        }
        self.ops.extend(live.into_iter().map(|id| Op::Free { id }));
        self
    }
}

/// The RMM-style random trace: `ops` operations, about 73% allocations of sizes
/// log-uniform in 1 KiB..64 MiB and 27% frees of a random live allocation; what is live
/// at the end is freed. The same seed gives the same trace.
pub fn random(seed: u64, ops: usize) -> Trace {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (low, high) = ((1u64 << 10) as f64, (64u64 << 20) as f64);
    let mut live: Vec<u64> = Vec::new();
    let mut trace = Vec::with_capacity(ops * 2);
    for id in 0..ops as u64 {
        if !live.is_empty() && rng.f64() < 0.27 {
            let index = rng.usize(..live.len());
            trace.push(Op::Free { id: live.swap_remove(index) });
        } else {
            let bytes = (low * (high / low).powf(rng.f64())) as usize;
            trace.push(Op::Alloc { id, bytes });
            live.push(id);
        }
    }
    Trace { name: "random".into(), ops: trace }.close()
}

/// A training-style trace of `steps` steps: parameters allocated once and kept; each step
/// allocates activations layer by layer (their sizes vary a little, as batch shapes do),
/// then, going backwards, a gradient per parameter while freeing the activations in
/// reverse order; gradients are freed at the step's end.
pub fn training(steps: usize) -> Trace {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut next = 0u64;
    let mut ops = Vec::new();
    let mut alloc = |ops: &mut Vec<Op>, bytes: usize| {
        next += 1;
        ops.push(Op::Alloc { id: next, bytes });
        next
    };
    const MIB: usize = 1 << 20;
    let parameter_sizes: Vec<usize> =
        (0..12).map(|i| [MIB, 4 * MIB, 16 * MIB, 2 * MIB][i % 4] + i * 4096).collect();
    let parameters: Vec<u64> = parameter_sizes.iter().map(|&b| alloc(&mut ops, b)).collect();
    let layers = [256 << 10, MIB, 2 * MIB, 4 * MIB, 8 * MIB, 4 * MIB, 2 * MIB, MIB];
    for _ in 0..steps {
        let scale = 0.75 + rng.f64() * 0.25;
        let activations: Vec<u64> =
            layers.iter().map(|&b| alloc(&mut ops, (b as f64 * scale) as usize)).collect();
        let mut gradients = Vec::new();
        for (i, activation) in activations.iter().rev().enumerate() {
            if let Some(&bytes) = parameter_sizes.get(i) {
                gradients.push(alloc(&mut ops, bytes));
            }
            ops.push(Op::Free { id: *activation });
        }
        ops.extend(gradients.into_iter().map(|id| Op::Free { id }));
    }
    ops.extend(parameters.into_iter().map(|id| Op::Free { id }));
    Trace { name: "training".into(), ops }
}

/// Reads a trace from CSV lines `op,size,id`: `op` is `alloc` or `free` (a free's size
/// may be empty or anything), an optional header `op,size,id`, blank lines and `#`
/// comments. Ids still live at the end are freed at the end. Every error names the file
/// and the line.
pub fn parse_csv(path: &Path) -> anyhow::Result<Trace> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the trace {}", path.display()))?;
    let mut ops = Vec::new();
    let mut live = std::collections::HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (index == 0 && line.replace(' ', "") == "op,size,id") {
            continue;
        }
        let at = || format!("{} line {}", path.display(), index + 1);
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [op, size, id] = fields[..] else {
            bail!("{}: expected three fields `op,size,id`, found {}: {line:?}", at(), fields.len());
        };
        let id: u64 = id.parse().with_context(|| format!("{}: the id {id:?} is not a whole number", at()))?;
        match op.to_ascii_lowercase().as_str() {
            "alloc" => {
                let bytes: u64 = size
                    .parse()
                    .with_context(|| format!("{}: the size {size:?} is not a whole number", at()))?;
                if bytes == 0 || bytes > 1 << 40 {
                    bail!("{}: the size {bytes} is outside 1 byte..1 TiB", at());
                }
                if !live.insert(id) {
                    bail!("{}: id {id} is allocated again while still live", at());
                }
                ops.push(Op::Alloc { id, bytes: bytes as usize });
            }
            "free" => {
                if !live.remove(&id) {
                    bail!("{}: id {id} is freed but not live", at());
                }
                ops.push(Op::Free { id });
            }
            other => bail!("{}: unknown operation {other:?} (expected alloc or free)", at()),
        }
    }
    if ops.is_empty() {
        bail!("{}: the trace has no operations", path.display());
    }
    let name =
        path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Trace { name, ops }.close())
}

/// Replays `trace` on `device` of a fresh manager; returns the time of the calls and the
/// manager (for its statistics).
fn replay(
    options: &MemoryOptions,
    device: DeviceId,
    trace: &Trace,
    mode: AllocationMode,
) -> unimem::Result<(std::time::Duration, MemoryManager)> {
    let manager = MemoryManager::builder().options(options.clone()).build();
    let mut live: HashMap<u64, Buffer<u8>> = HashMap::with_capacity(64);
    let start = Instant::now();
    for op in &trace.ops {
        match *op {
            Op::Alloc { id, bytes } => {
                live.insert(id, manager.allocate_on::<u8>(device, bytes, mode)?);
            }
            Op::Free { id } => drop(live.remove(&id)),
        }
    }
    let elapsed = start.elapsed();
    Ok((elapsed, manager))
}

/// Every row of table 3 for `device`: each trace with 1 and 4 divisions.
pub fn pool_rows(
    manager: &MemoryManager,
    device: DeviceId,
    traces: &[Trace],
    sampling: &Sampling,
    emit: &mut dyn FnMut(Row),
) {
    let raws = raw::for_device(manager, device).unwrap_or_default();
    for trace in traces {
        for divisions in [1, 4] {
            let label =
                if divisions == 1 { "21 classes".to_string() } else { format!("{divisions} divisions") };
            let operation = format!("{} trace, {label}", trace.name);
            let largest = trace.largest() as u64;
            match pool_row(manager, device, trace, divisions, sampling, &raws, &operation) {
                Ok(row) => emit(row),
                Err(e) => emit(Row::skipped(
                    Table::Pool,
                    device,
                    operation,
                    largest,
                    e.to_string(),
                    Some("a smaller trace, or a device with more memory".into()),
                )),
            }
        }
    }
}

fn pool_row(
    manager: &MemoryManager,
    device: DeviceId,
    trace: &Trace,
    divisions: u32,
    sampling: &Sampling,
    raws: &[Box<dyn raw::RawAllocator>],
    operation: &str,
) -> anyhow::Result<Row> {
    let options = manager.options().clone().with_size_class_divisions(divisions)?;
    let ops = trace.ops.len() as u64;
    let mut last = None;
    let pooled = sampling.per_run(|| {
        let (elapsed, replayed) = replay(&options, device, trace, AllocationMode::Pooled)?;
        last = Some(replayed.statistics());
        Ok::<_, unimem::Error>((elapsed, ops))
    })?;
    let stats = last.expect("at least one replay");
    let unpooled = sampling.per_run(|| {
        replay(&options, device, trace, AllocationMode::Unpooled).map(|(elapsed, _)| (elapsed, ops))
    })?;
    let mut baselines: Vec<(String, Figure)> = vec![("unpooled".into(), unpooled)];
    let fill = device != DeviceId::CPU;
    for raw in raws {
        if let Ok(figure) = sampling.per_run(|| raw.replay(&trace.ops, fill)) {
            baselines.push((raw.name().to_string(), figure));
        }
    }
    let allocations = trace.allocations();
    let calls = stats.pool_misses + stats.unpooled_allocations;
    let peak_requested = trace.peak_requested();
    let mut row = Row::measured(Table::Pool, device, operation, trace.largest() as u64, pooled, baselines);
    row.pool = Some(PoolEfficiency {
        trace: trace.name.clone(),
        divisions,
        allocations,
        hit_rate: stats.pool_hits as f64 / allocations.max(1) as f64,
        allocations_avoided: 1.0 - calls as f64 / allocations.max(1) as f64,
        overhead: stats.peak_usage as f64 / peak_requested.max(1) as f64,
        peak_reserved: stats.peak_usage,
        peak_requested,
    });
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balanced(trace: &Trace) -> bool {
        let mut live = std::collections::HashSet::new();
        trace.ops.iter().all(|op| match *op {
            Op::Alloc { id, .. } => live.insert(id),
            Op::Free { id } => live.remove(&id),
        }) && live.is_empty()
    }

    #[test]
    fn the_random_trace_is_seeded_log_uniform_and_balanced() {
        let trace = random(42, 10_000);
        assert_eq!(trace.ops, random(42, 10_000).ops);
        assert_ne!(trace.ops, random(43, 10_000).ops);
        let allocations = trace.allocations() as f64;
        assert!((allocations / 10_000.0 - 0.73).abs() < 0.02, "{allocations}");
        assert!(trace.ops.iter().all(|op| match *op {
            Op::Alloc { bytes, .. } => (1 << 10..=64 << 20).contains(&bytes),
            Op::Free { .. } => true,
        }));
        assert!(balanced(&trace));
    }

    #[test]
    fn the_training_trace_frees_activations_in_reverse_and_ends_empty() {
        let trace = training(3);
        assert!(balanced(&trace));
        assert!(trace.peak_requested() < 512 << 20);
        // The activations of the first step are freed in the reverse order of allocation.
        let first: Vec<u64> =
            trace.ops[12..20].iter().map(|op| if let Op::Alloc { id, .. } = op { *id } else { 0 }).collect();
        let frees: Vec<u64> = trace.ops[20..]
            .iter()
            .filter_map(|op| match *op {
                Op::Free { id } if first.contains(&id) => Some(id),
                _ => None,
            })
            .take(8)
            .collect();
        assert_eq!(frees, first.iter().rev().copied().collect::<Vec<_>>());
    }

    fn parse(name: &str, text: &str) -> anyhow::Result<Trace> {
        let path = std::env::temp_dir().join(format!("unimem-trace-{}-{name}.csv", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let parsed = parse_csv(&path);
        let _ = std::fs::remove_file(path);
        parsed
    }

    #[test]
    fn user_traces_parse_and_errors_name_the_line() {
        let trace =
            parse("good", "op,size,id\n# a comment\nalloc,4096,1\n\nalloc, 100, 2\nfree,,1\n").unwrap();
        assert_eq!(
            trace.ops,
            [
                Op::Alloc { id: 1, bytes: 4096 },
                Op::Alloc { id: 2, bytes: 100 },
                Op::Free { id: 1 },
                Op::Free { id: 2 }
            ]
        );
        for (name, text, needle) in [
            ("op", "alloc,1,1\nresize,1,1\n", "line 2: unknown operation"),
            ("size", "alloc,12x,1\n", "line 1: the size \"12x\""),
            ("zero", "alloc,0,1\n", "line 1: the size 0"),
            ("twice", "alloc,8,1\nalloc,8,1\n", "line 2: id 1 is allocated again"),
            ("free", "alloc,8,1\nfree,,2\n", "line 2: id 2 is freed but not live"),
            ("fields", "alloc,8\n", "line 1: expected three fields"),
            ("empty", "op,size,id\n", "no operations"),
        ] {
            let error = format!("{:#}", parse(name, text).unwrap_err());
            assert!(error.contains(needle), "{name}: {error}");
        }
    }

    #[test]
    fn a_replay_on_the_cpu_reports_its_efficiency() {
        let manager = MemoryManager::builder().backends([]).build();
        let sampling = Sampling {
            warmup: std::time::Duration::ZERO,
            sample: std::time::Duration::from_millis(1),
            samples: 1,
        };
        let mut rows = Vec::new();
        pool_rows(&manager, DeviceId::CPU, &[random(1, 200), training(2)], &sampling, &mut |row| {
            rows.push(row)
        });
        assert_eq!(rows.len(), 4);
        for row in rows {
            let pool = row.pool.as_ref().unwrap_or_else(|| panic!("{row:?}"));
            assert!((0.0..=1.0).contains(&pool.hit_rate) && pool.hit_rate > 0.0, "{pool:?}");
            assert!(pool.overhead >= 1.0 && pool.overhead.is_finite(), "{pool:?}");
            assert!(
                row.baselines.len() >= 2
                    && row.baselines.iter().all(|b| b.speedup.is_finite() && b.speedup > 0.0)
            );
        }
    }
}
