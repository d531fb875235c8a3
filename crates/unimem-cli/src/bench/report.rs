//! What a run measured, as the tables print it and as `--json` / `--csv` write it.

use serde::Serialize;
use unimem::{DeviceId, DeviceInfo};

use super::measure::{Figure, Sampling};

/// The three tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Allocation,
    Transfer,
    Pool,
}

/// A baseline timed on the same work as unimem, and unimem's speedup over it (baseline
/// time ÷ unimem time: above 1 when unimem is faster).
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub baseline: String,
    pub figure: Figure,
    pub speedup: f64,
}

/// Why a row could not run, and what would let it.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub reason: String,
    pub hint: Option<String>,
}

/// How a pool did on a workload trace (table 3).
#[derive(Clone, Debug, Serialize)]
pub struct PoolEfficiency {
    /// The trace's name (`random`, `training`, or the file given with `--trace`).
    pub trace: String,
    /// Size classes per power of two (1: the reference's 21 classes).
    pub divisions: u32,
    /// Allocations in the trace.
    pub allocations: u64,
    /// Pool hits ÷ allocations.
    pub hit_rate: f64,
    /// Backend allocation calls avoided, as a fraction of what an unpooled run makes (the
    /// reference's "allocation reduction").
    pub allocations_avoided: f64,
    /// Peak memory reserved from the backend ÷ peak bytes requested and live (the memory
    /// overhead; 1 is none).
    pub overhead: f64,
    /// Peak bytes reserved from the backend.
    pub peak_reserved: u64,
    /// Peak bytes requested and live at once.
    pub peak_requested: u64,
}

/// One row of a table: unimem's figure against its baselines, or why it was skipped.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub table: Table,
    pub device: DeviceId,
    /// What is measured, e.g. "fresh + first write", "host → device (pageable)".
    pub operation: String,
    /// Bytes per operation (for traces: the largest request).
    pub bytes: u64,
    /// The transfer engine's strategy (table 2).
    pub strategy: Option<String>,
    /// unimem's time per operation.
    pub unimem: Option<Figure>,
    pub baselines: Vec<Comparison>,
    pub skipped: Option<Skipped>,
    /// Table 3 only.
    pub pool: Option<PoolEfficiency>,
}

impl Row {
    /// A measured row; each baseline's speedup is computed from the figures.
    pub fn measured(
        table: Table,
        device: DeviceId,
        operation: impl Into<String>,
        bytes: u64,
        unimem: Figure,
        baselines: impl IntoIterator<Item = (String, Figure)>,
    ) -> Row {
        let baselines = baselines
            .into_iter()
            .map(|(baseline, figure)| Comparison { speedup: unimem.speedup_over(&figure), baseline, figure })
            .collect();
        Row {
            table,
            device,
            operation: operation.into(),
            bytes,
            strategy: None,
            unimem: Some(unimem),
            baselines,
            skipped: None,
            pool: None,
        }
    }

    /// A row of table 1 measured by unimem's side `unimem` (skipped, with its error, if
    /// that failed) against the `baselines` it then runs; a baseline that fails is left out
    /// and named in the operation with its error.
    pub fn compared<E: std::fmt::Display>(
        device: DeviceId,
        operation: impl Into<String>,
        bytes: u64,
        unimem: Result<Figure, E>,
        baselines: impl FnOnce() -> Vec<(String, anyhow::Result<Figure>)>,
    ) -> Row {
        let operation = operation.into();
        let unimem = match unimem {
            Ok(unimem) => unimem,
            Err(e) => return Row::skipped(Table::Allocation, device, operation, bytes, e.to_string(), None),
        };
        let mut notes = Vec::new();
        let mut measured = Vec::new();
        for (name, figure) in baselines() {
            match figure {
                Ok(figure) => measured.push((name, figure)),
                Err(e) => notes.push(format!("{name}: {e:#}")),
            }
        }
        let operation = if notes.is_empty() {
            operation
        } else {
            format!("{operation} (baselines not run: {})", notes.join("; "))
        };
        Row::measured(Table::Allocation, device, operation, bytes, unimem, measured)
    }

    /// A row that could not run.
    pub fn skipped(
        table: Table,
        device: DeviceId,
        operation: impl Into<String>,
        bytes: u64,
        reason: impl Into<String>,
        hint: Option<String>,
    ) -> Row {
        Row {
            table,
            device,
            operation: operation.into(),
            bytes,
            strategy: None,
            unimem: None,
            baselines: Vec::new(),
            skipped: Some(Skipped { reason: reason.into(), hint }),
            pool: None,
        }
    }
}

/// One device's tables.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    #[serde(flatten)]
    pub info: DeviceInfo,
    pub allocation: Vec<Row>,
    pub transfer: Vec<Row>,
    pub pool: Vec<Row>,
}

/// The machine the run was on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub os: String,
    pub arch: String,
    pub cpu: Option<String>,
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub lock_limit_bytes: Option<u64>,
}

/// The settings of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub sampling: Sampling,
    pub transfer_sizes: Vec<u64>,
    pub devices: Vec<DeviceId>,
    pub traces: Vec<String>,
    pub seed: u64,
}

/// Everything `--json` writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub unimem_version: &'static str,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub machine: Machine,
    pub settings: Settings,
    pub devices: Vec<DeviceReport>,
    /// Why backends found no devices.
    pub backend_notes: Vec<String>,
}
