//! Manager options: the reference design's `UnifiedMemoryOptions` (`docs/design.md`), validated.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

const GIB: u64 = 1 << 30;
/// Larger limits than this (256 TiB) are taken for typing mistakes.
const ABSURD_BYTES: u64 = 1 << 48;
const MAX_TRANSFERS: usize = 1024;

/// Options of a [`MemoryManager`](crate::MemoryManager).
///
/// Defaults: pooling on, 1 GiB pooled per size class and 8 GiB in all, 4 concurrent
/// transfers, pinned staging on, peer-to-peer on, trimming on memory pressure on, powers of
/// two as size classes, huge pages on, no memory limit. Every setter validates its value,
/// and so does deserialisation:
///
/// ```
/// let options = unimem::MemoryOptions::default()
///     .with_max_concurrent_transfers(8)?
///     .with_size_class_divisions(4)?;
/// assert_eq!(options.max_concurrent_transfers(), 8);
///
/// let zero = serde_json::from_str::<unimem::MemoryOptions>(r#"{"max_concurrent_transfers": 0}"#);
/// assert!(zero.unwrap_err().to_string().contains("max_concurrent_transfers"));
/// # Ok::<(), unimem::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ObjectOnly", into = "RawOptions")]
#[non_exhaustive]
pub struct MemoryOptions {
    enable_pooling: bool,
    max_pool_bytes_per_class: u64,
    max_pool_bytes: u64,
    max_concurrent_transfers: usize,
    use_pinned_memory: bool,
    enable_p2p: bool,
    trim_pool_on_pressure: bool,
    size_class_divisions: u32,
    huge_pages: bool,
    memory_limit: Option<u64>,
}

/// The serialised form: every field optional, defaults filled in, then validated.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawOptions {
    enable_pooling: bool,
    max_pool_bytes_per_class: u64,
    max_pool_bytes: u64,
    max_concurrent_transfers: usize,
    use_pinned_memory: bool,
    enable_p2p: bool,
    trim_pool_on_pressure: bool,
    size_class_divisions: u32,
    huge_pages: bool,
    memory_limit: Option<u64>,
}

impl Default for RawOptions {
    fn default() -> Self {
        MemoryOptions::default().into()
    }
}

impl From<MemoryOptions> for RawOptions {
    fn from(o: MemoryOptions) -> Self {
        RawOptions {
            enable_pooling: o.enable_pooling,
            max_pool_bytes_per_class: o.max_pool_bytes_per_class,
            max_pool_bytes: o.max_pool_bytes,
            max_concurrent_transfers: o.max_concurrent_transfers,
            use_pinned_memory: o.use_pinned_memory,
            enable_p2p: o.enable_p2p,
            trim_pool_on_pressure: o.trim_pool_on_pressure,
            size_class_divisions: o.size_class_divisions,
            huge_pages: o.huge_pages,
            memory_limit: o.memory_limit,
        }
    }
}

/// [`RawOptions`] read from an object with named fields only: serde's derive would also
/// take a positional array (`[false]` meaning "pooling off"), which no one means.
struct ObjectOnly(RawOptions);

impl<'de> Deserialize<'de> for ObjectOnly {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = ObjectOnly;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with named fields")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<ObjectOnly, A::Error> {
                RawOptions::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(ObjectOnly)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl TryFrom<ObjectOnly> for MemoryOptions {
    type Error = Error;

    fn try_from(ObjectOnly(r): ObjectOnly) -> Result<Self> {
        MemoryOptions::default()
            .with_pooling(r.enable_pooling)
            .with_max_pool_bytes_per_class(r.max_pool_bytes_per_class)?
            .with_max_pool_bytes(r.max_pool_bytes)?
            .with_max_concurrent_transfers(r.max_concurrent_transfers)?
            .with_pinned_memory(r.use_pinned_memory)
            .with_p2p(r.enable_p2p)
            .with_trim_on_pressure(r.trim_pool_on_pressure)
            .with_size_class_divisions(r.size_class_divisions)?
            .with_huge_pages(r.huge_pages)
            .with_memory_limit(r.memory_limit)
    }
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            enable_pooling: true,
            max_pool_bytes_per_class: GIB,
            max_pool_bytes: 8 * GIB,
            max_concurrent_transfers: 4,
            use_pinned_memory: true,
            enable_p2p: true,
            trim_pool_on_pressure: true,
            size_class_divisions: 1,
            huge_pages: true,
            memory_limit: None,
        }
    }
}

fn invalid(option: &'static str, value: impl ToString, reason: &'static str) -> Error {
    Error::InvalidOption { option, value: value.to_string(), reason }
}

fn check_bytes(option: &'static str, value: u64) -> Result<u64> {
    match value {
        0 => Err(invalid(option, value, "must be greater than zero")),
        v if v > ABSURD_BYTES => Err(invalid(option, value, "must be at most 2^48 bytes")),
        v => Ok(v),
    }
}

impl MemoryOptions {
    /// Pool reusable memory (default `true`). When off, every allocation is fresh.
    pub fn with_pooling(mut self, on: bool) -> Self {
        self.enable_pooling = on;
        self
    }

    /// Bytes each size class may keep pooled, per (device, memory kind) (default 1 GiB).
    pub fn with_max_pool_bytes_per_class(mut self, bytes: u64) -> Result<Self> {
        self.max_pool_bytes_per_class = check_bytes("max_pool_bytes_per_class", bytes)?;
        Ok(self)
    }

    /// Bytes all size classes together may keep pooled, per (device, memory kind)
    /// (default 8 GiB).
    pub fn with_max_pool_bytes(mut self, bytes: u64) -> Result<Self> {
        self.max_pool_bytes = check_bytes("max_pool_bytes", bytes)?;
        Ok(self)
    }

    /// Transfers the transfer engine keeps in flight at once (default 4, at most 1024).
    pub fn with_max_concurrent_transfers(mut self, n: usize) -> Result<Self> {
        if n == 0 || n > MAX_TRANSFERS {
            return Err(invalid("max_concurrent_transfers", n, "must be between 1 and 1024"));
        }
        self.max_concurrent_transfers = n;
        Ok(self)
    }

    /// Stage host-device copies through pinned memory (default `true`).
    pub fn with_pinned_memory(mut self, on: bool) -> Self {
        self.use_pinned_memory = on;
        self
    }

    /// Enable peer-to-peer access between devices that offer it (default `true`).
    pub fn with_p2p(mut self, on: bool) -> Self {
        self.enable_p2p = on;
        self
    }

    /// Trim the pool and retry once when an allocation runs out of memory (default `true`).
    pub fn with_trim_on_pressure(mut self, on: bool) -> Self {
        self.trim_pool_on_pressure = on;
        self
    }

    /// Size classes per power of two (1, 2, 4, 8 or 16; default 1). More divisions cut the
    /// memory wasted by rounding a request up to its class.
    pub fn with_size_class_divisions(mut self, n: u32) -> Result<Self> {
        if !(1..=16).contains(&n) || !n.is_power_of_two() {
            return Err(invalid("size_class_divisions", n, "must be 1, 2, 4, 8 or 16"));
        }
        self.size_class_divisions = n;
        Ok(self)
    }

    /// Ask the kernel for transparent huge pages on fresh host allocations of 2 MiB and more
    /// (default `true`): first touch of a large buffer is several times faster.
    pub fn with_huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// Most bytes one (device, memory kind) pool may hold from its device, live and pooled
    /// together (default: no limit beyond the device's own).
    pub fn with_memory_limit(mut self, limit: Option<u64>) -> Result<Self> {
        if let Some(bytes) = limit {
            check_bytes("memory_limit", bytes)?;
        }
        self.memory_limit = limit;
        Ok(self)
    }

    /// Whether pooling is on.
    pub fn pooling(&self) -> bool {
        self.enable_pooling
    }
    /// Bytes pooled per size class at most.
    pub fn max_pool_bytes_per_class(&self) -> u64 {
        self.max_pool_bytes_per_class
    }
    /// Bytes pooled in all classes at most.
    pub fn max_pool_bytes(&self) -> u64 {
        self.max_pool_bytes
    }
    /// Concurrent transfers at most.
    pub fn max_concurrent_transfers(&self) -> usize {
        self.max_concurrent_transfers
    }
    /// Whether pinned staging is used.
    pub fn pinned_memory(&self) -> bool {
        self.use_pinned_memory
    }
    /// Whether peer-to-peer is enabled.
    pub fn p2p(&self) -> bool {
        self.enable_p2p
    }
    /// Whether memory pressure trims the pool.
    pub fn trim_on_pressure(&self) -> bool {
        self.trim_pool_on_pressure
    }
    /// Size classes per power of two.
    pub fn size_class_divisions(&self) -> u32 {
        self.size_class_divisions
    }
    /// Whether huge pages are requested.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }
    /// The per-pool memory limit.
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }
}
