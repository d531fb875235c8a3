//! The peer manager: which device reads and writes which other device's memory directly,
//! and switching that access on and off at run time.
//!
//! Each ordered pair `(device, peer)` is in one of three states ([`PeerAccess`]): enabled,
//! disabled (the hardware has a path, unused), or unavailable, with the reason
//! ([`NoPeerPath`]): the same device, the CPU, devices of different backends, or devices the
//! driver says cannot reach each other (CUDA `cuDeviceCanAccessPeer`; OpenCL devices of
//! different contexts). The transfer engine copies peer-to-peer only over enabled pairs and
//! reports the reason when it cannot.
//!
//! The manager's logic runs over a [`PeerTopology`]: the manager's devices in a
//! [`MemoryManager`](crate::MemoryManager), or any topology a caller builds (a test of
//! asymmetric access between four devices, a planner for a machine not at hand).

use crate::device::{DeviceId, DeviceKind};
use crate::error::{Error, Result};
use std::fmt;
use std::sync::{Mutex, PoisonError};

/// Why a device has no direct path to another's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoPeerPath {
    /// A device is not its own peer (its own copies are device-local).
    SameDevice,
    /// The CPU reaches host-visible memory without peer access, and accelerators reach the
    /// CPU's memory through staging or pinned memory, not peer access.
    Cpu,
    /// The two devices are driven through different APIs.
    DifferentBackends {
        /// The backend of the device that would access.
        device: DeviceKind,
        /// The backend of the device whose memory would be accessed.
        peer: DeviceKind,
    },
    /// The driver reports no direct path between the two devices.
    NotCapable {
        /// What the driver or the topology said.
        why: String,
    },
}

impl fmt::Display for NoPeerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoPeerPath::SameDevice => f.write_str("a device is not its own peer"),
            NoPeerPath::Cpu => f.write_str("the CPU takes no part in peer access"),
            NoPeerPath::DifferentBackends { device, peer } => {
                write!(f, "different backends ({} and {})", device.name(), peer.name())
            }
            NoPeerPath::NotCapable { why } => write!(f, "not capable: {why}"),
        }
    }
}

/// The state of one ordered pair of devices.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerAccess {
    /// The device reads and writes the peer's memory directly.
    Enabled,
    /// The hardware has a direct path, switched off (by [`PeerManager::disable`], or because
    /// the options' `enable_p2p` is off, or enabling failed: see
    /// [`MemoryManager::backend_notes`](crate::MemoryManager::backend_notes)).
    Disabled,
    /// There is no direct path, for this reason.
    Unavailable(NoPeerPath),
}

impl PeerAccess {
    /// Whether the pair is enabled.
    pub fn is_enabled(&self) -> bool {
        matches!(self, PeerAccess::Enabled)
    }
}

impl fmt::Display for PeerAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAccess::Enabled => f.write_str("enabled"),
            PeerAccess::Disabled => f.write_str("capable but disabled"),
            PeerAccess::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

/// What the peer manager runs over: devices `0..device_count()`, a probe of each ordered
/// pair, and the calls that switch access on and off.
pub trait PeerTopology: Send + Sync {
    /// Number of devices (indices are [`DeviceId`] indices).
    fn device_count(&self) -> usize;

    /// Whether `device` can reach `peer`'s memory directly (`device != peer`, both in range),
    /// and if not, why.
    fn probe(&self, device: usize, peer: usize) -> Result<(), NoPeerPath>;

    /// Switches `device`'s access to `peer`'s memory on (called only for probed pairs).
    ///
    /// # Errors
    /// What the driver reported.
    fn enable(&self, device: usize, peer: usize) -> Result<()>;

    /// Switches it off (called only for enabled pairs).
    ///
    /// # Errors
    /// What the driver reported.
    fn disable(&self, device: usize, peer: usize) -> Result<()>;
}

/// The access matrix of a set of devices, with run-time control.
///
/// ```
/// use unimem::{DeviceId, MemoryManager, PeerAccess};
///
/// let manager = MemoryManager::new();
/// let peers = manager.peers();
/// assert!(matches!(peers.access(DeviceId::CPU, DeviceId::CPU)?, PeerAccess::Unavailable(_)));
/// for (a, row) in peers.matrix().iter().enumerate() {
///     println!("device {a} reaches {:?}", row);
/// }
/// # Ok::<(), unimem::Error>(())
/// ```
pub struct PeerManager {
    topology: Box<dyn PeerTopology>,
    /// `links[device][peer]`: enabled, or the reason there is no path.
    links: Mutex<Vec<Vec<Result<bool, NoPeerPath>>>>,
}

impl PeerManager {
    /// A peer manager over `topology`, every pair probed. With `enable_all`, every capable
    /// pair is enabled; the pairs whose enabling failed stay disabled, and come back as one
    /// line each.
    pub fn new(topology: impl PeerTopology + 'static, enable_all: bool) -> (PeerManager, Vec<String>) {
        let n = topology.device_count();
        let mut notes = Vec::new();
        let links = (0..n)
            .map(|a| {
                (0..n)
                    .map(|b| {
                        let probed = if a == b { Err(NoPeerPath::SameDevice) } else { topology.probe(a, b) };
                        probed.map(|()| {
                            enable_all
                                && topology
                                    .enable(a, b)
                                    .map_err(|e| {
                                        notes.push(format!("peer access device {a} -> device {b}: {e}"))
                                    })
                                    .is_ok()
                        })
                    })
                    .collect()
            })
            .collect();
        (PeerManager { topology: Box::new(topology), links: Mutex::new(links) }, notes)
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Result<bool, NoPeerPath>>>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of devices.
    pub fn device_count(&self) -> usize {
        self.topology.device_count()
    }

    fn check(&self, device: DeviceId) -> Result<usize> {
        let count = self.device_count();
        (device.index() < count).then_some(device.index()).ok_or(Error::UnknownDevice { device, count })
    }

    /// The state of `device`'s access to `peer`'s memory.
    ///
    /// # Errors
    /// [`Error::UnknownDevice`].
    pub fn access(&self, device: DeviceId, peer: DeviceId) -> Result<PeerAccess> {
        let (a, b) = (self.check(device)?, self.check(peer)?);
        Ok(match &self.links()[a][b] {
            Ok(true) => PeerAccess::Enabled,
            Ok(false) => PeerAccess::Disabled,
            Err(why) => PeerAccess::Unavailable(why.clone()),
        })
    }

    /// Whether `device` reads and writes `peer`'s memory directly now (false for unknown
    /// devices).
    pub fn is_enabled(&self, device: DeviceId, peer: DeviceId) -> bool {
        self.access(device, peer).is_ok_and(|access| access.is_enabled())
    }

    /// `matrix[i][j]`: device `i` reads and writes device `j`'s memory directly now.
    pub fn matrix(&self) -> Vec<Vec<bool>> {
        self.links().iter().map(|row| row.iter().map(|link| matches!(link, Ok(true))).collect()).collect()
    }

    /// Enables `device`'s direct access to `peer`'s memory (one direction; enable the other
    /// pair too for copies both ways). Enabling an enabled pair does nothing.
    ///
    /// # Errors
    /// [`Error::NoPeerPath`] with the reason where there is no direct path;
    /// [`Error::UnknownDevice`]; the driver's error, with the pair left disabled.
    pub fn enable(&self, device: DeviceId, peer: DeviceId) -> Result<()> {
        self.switch(device, peer, true)
    }

    /// Disables `device`'s direct access to `peer`'s memory: transfers between them stage
    /// through the host from now on. Disabling a disabled pair does nothing.
    ///
    /// # Errors
    /// As for [`enable`](Self::enable).
    pub fn disable(&self, device: DeviceId, peer: DeviceId) -> Result<()> {
        self.switch(device, peer, false)
    }

    fn switch(&self, device: DeviceId, peer: DeviceId, on: bool) -> Result<()> {
        let (a, b) = (self.check(device)?, self.check(peer)?);
        let mut links = self.links();
        match &links[a][b] {
            Err(why) => Err(Error::NoPeerPath { device, peer, reason: why.clone() }),
            Ok(enabled) if *enabled == on => Ok(()),
            Ok(_) => {
                if on { self.topology.enable(a, b) } else { self.topology.disable(a, b) }?;
                links[a][b] = Ok(on);
                Ok(())
            }
        }
    }
}

impl fmt::Debug for PeerManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerManager").field("enabled", &self.matrix()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Four devices: 0 and 1 reach each other, 2 reaches 3 but not back, 3 fails to enable.
    struct Asymmetric {
        calls: AtomicUsize,
    }

    impl PeerTopology for Asymmetric {
        fn device_count(&self) -> usize {
            4
        }
        fn probe(&self, device: usize, peer: usize) -> Result<(), NoPeerPath> {
            match (device, peer) {
                (0, 1) | (1, 0) | (2, 3) | (3, 1) => Ok(()),
                _ => Err(NoPeerPath::NotCapable { why: format!("no link {device} -> {peer}") }),
            }
        }
        fn enable(&self, device: usize, _peer: usize) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if device == 3 {
                return Err(Error::InvalidOption { option: "test", value: "3".into(), reason: "refused" });
            }
            Ok(())
        }
        fn disable(&self, _device: usize, _peer: usize) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn id(n: u32) -> DeviceId {
        DeviceId(n)
    }

    #[test]
    fn an_asymmetric_topology_is_probed_enabled_and_switched() {
        let (peers, notes) = PeerManager::new(Asymmetric { calls: AtomicUsize::new(0) }, true);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("device 3 -> device 1"), "{notes:?}");
        let m = peers.matrix();
        assert_eq!(m[0], [false, true, false, false]);
        assert_eq!(m[1], [true, false, false, false]);
        assert_eq!(m[2], [false, false, false, true]);
        assert_eq!(m[3], [false, false, false, false], "enabling 3 -> 1 failed");
        assert_eq!(peers.access(id(3), id(1)).unwrap(), PeerAccess::Disabled);
        assert_eq!(
            peers.access(id(3), id(2)).unwrap(),
            PeerAccess::Unavailable(NoPeerPath::NotCapable { why: "no link 3 -> 2".into() })
        );
        assert_eq!(peers.access(id(2), id(2)).unwrap(), PeerAccess::Unavailable(NoPeerPath::SameDevice));

        peers.disable(id(2), id(3)).unwrap();
        assert!(!peers.is_enabled(id(2), id(3)));
        assert!(peers.is_enabled(id(0), id(1)), "other pairs untouched");
        peers.enable(id(2), id(3)).unwrap();
        assert!(peers.is_enabled(id(2), id(3)));
        peers.enable(id(2), id(3)).unwrap(); // twice: nothing

        let err = peers.enable(id(3), id(2)).unwrap_err();
        assert!(matches!(err, Error::NoPeerPath { .. }), "{err}");
        assert!(err.to_string().contains("no link 3 -> 2"), "{err}");
        let err = peers.enable(id(3), id(1)).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(!peers.is_enabled(id(3), id(1)), "a failed enable leaves the pair disabled");
        assert!(matches!(peers.access(id(4), id(0)), Err(Error::UnknownDevice { count: 4, .. })));
    }

    #[test]
    fn nothing_is_enabled_without_enable_all() {
        let topology = Asymmetric { calls: AtomicUsize::new(0) };
        let (peers, notes) = PeerManager::new(topology, false);
        assert!(notes.is_empty());
        assert!(peers.matrix().iter().flatten().all(|&on| !on));
        assert_eq!(peers.access(id(0), id(1)).unwrap(), PeerAccess::Disabled);
        peers.disable(id(0), id(1)).unwrap(); // already off: no driver call
    }
}
