//! Choosing a strategy: pure logic over the two ends of a transfer and what the machine
//! offers them, in the reference's order of preference.

use super::{Declined, Strategy};
use crate::buffer::Shape;

/// What the machine offers a transfer beyond its two ends.
pub(super) struct Offer {
    /// Direct access of the destination's device to the source's memory, or why there is none.
    pub peer: Result<(), String>,
    /// Pinned staging memory for the device side of the transfer, or why there is none.
    pub pinned: Result<(), String>,
}

/// The strategy chosen, and the faster ones that were wanted but could not be used.
#[derive(Debug)]
pub(super) struct Choice {
    pub strategy: Strategy,
    pub declined: Vec<Declined>,
}

fn same_device(src: &Shape, dst: &Shape) -> bool {
    src.device == dst.device && src.manager == dst.manager
}

fn name(host: bool) -> &'static str {
    if host { "host memory" } else { "device memory the host cannot address" }
}

/// Whether `strategy` is worth wanting for these ends (a strategy that is not is never
/// reported as declined: device-local between two devices is not "declined").
fn wanted(strategy: Strategy, src: &Shape, dst: &Shape) -> bool {
    match strategy {
        Strategy::DeviceLocal => same_device(src, dst),
        Strategy::PeerToPeer => !same_device(src, dst) && !src.host && !dst.host,
        Strategy::ZeroCopy => src.host && dst.host,
        Strategy::PinnedStaging => !(src.host && dst.host),
        Strategy::Staged => true,
    }
}

/// Why `strategy` cannot move data from `src` to `dst`, or `None` when it can.
pub(super) fn why_not(strategy: Strategy, src: &Shape, dst: &Shape, offer: &Offer) -> Option<String> {
    match strategy {
        Strategy::DeviceLocal => {
            if !same_device(src, dst) {
                let managers = if src.manager == dst.manager { "" } else { " of another manager" };
                return Some(format!(
                    "the source is on {} and the destination on {}{managers}",
                    src.device, dst.device
                ));
            }
            // One device: two host ends (a memcpy), two device ends (a device copy), or the
            // device's own pinned memory and its device memory (one DMA).
            let one_dma = (src.host && src.dma && !dst.host) || (dst.host && dst.dma && !src.host);
            (src.host != dst.host && !one_dma).then(|| {
                let host = if src.host { "source" } else { "destination" };
                format!(
                    "the {host} is host memory that {} does not copy in place (a host mirror or unified memory)",
                    src.device
                )
            })
        }
        Strategy::PeerToPeer => {
            if same_device(src, dst) {
                Some(format!("source and destination are both on {}", src.device))
            } else if src.host || dst.host {
                let which = if src.host { "source" } else { "destination" };
                Some(format!("the {which} is host memory"))
            } else {
                offer.peer.clone().err()
            }
        }
        Strategy::ZeroCopy => (!(src.host && dst.host)).then(|| {
            let which = if src.host { "destination" } else { "source" };
            format!("the {which} is {}", name(false))
        }),
        Strategy::PinnedStaging => {
            if src.host && dst.host {
                Some("both ends are host memory: there is nothing for a device to copy".into())
            } else {
                offer.pinned.clone().err()
            }
        }
        Strategy::Staged => None,
    }
}

/// The strategy for `src` to `dst`: `forced` if it can work (else why not), otherwise the
/// first that can in [`Strategy::ALL`] order, with the wanted ones passed over.
pub(super) fn choose(
    src: &Shape,
    dst: &Shape,
    offer: &Offer,
    forced: Option<Strategy>,
) -> Result<Choice, (Strategy, String)> {
    if let Some(strategy) = forced {
        return match why_not(strategy, src, dst, offer) {
            Some(reason) => Err((strategy, reason)),
            None => Ok(Choice { strategy, declined: Vec::new() }),
        };
    }
    let mut declined = Vec::new();
    for strategy in Strategy::ALL {
        match why_not(strategy, src, dst, offer) {
            None => return Ok(Choice { strategy, declined }),
            Some(reason) if wanted(strategy, src, dst) => declined.push(Declined { strategy, reason }),
            Some(_) => {}
        }
    }
    // Staged always works; this is not reached.
    Ok(Choice { strategy: Strategy::Staged, declined })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceId;

    fn cpu() -> Shape {
        Shape { device: DeviceId(0), manager: 1, host: true, dma: false }
    }
    fn gpu(n: u32) -> Shape {
        Shape { device: DeviceId(n), manager: 1, host: false, dma: false }
    }
    fn pinned(n: u32) -> Shape {
        Shape { host: true, dma: true, ..gpu(n) }
    }
    fn mirror(n: u32) -> Shape {
        Shape { host: true, ..gpu(n) }
    }
    fn offer(peer: bool, pinned: bool) -> Offer {
        Offer {
            peer: if peer { Ok(()) } else { Err("peer access is disabled".into()) },
            pinned: if pinned { Ok(()) } else { Err("use_pinned_memory is off".into()) },
        }
    }
    fn pick(src: Shape, dst: Shape, offer: Offer) -> Choice {
        choose(&src, &dst, &offer, None).unwrap()
    }

    #[test]
    fn each_pair_gets_the_reference_order() {
        let all = offer(true, true);
        assert_eq!(pick(cpu(), cpu(), offer(true, true)).strategy, Strategy::DeviceLocal);
        assert_eq!(pick(gpu(1), gpu(1), offer(true, true)).strategy, Strategy::DeviceLocal);
        assert_eq!(pick(pinned(1), gpu(1), offer(true, true)).strategy, Strategy::DeviceLocal);
        assert_eq!(pick(gpu(1), gpu(2), all).strategy, Strategy::PeerToPeer);
        assert_eq!(pick(cpu(), pinned(1), offer(true, true)).strategy, Strategy::ZeroCopy);
        let up = pick(cpu(), gpu(1), offer(true, true));
        assert_eq!((up.strategy, up.declined.len()), (Strategy::PinnedStaging, 0));
        assert_eq!(pick(gpu(1), cpu(), offer(true, true)).strategy, Strategy::PinnedStaging);
        // A newer host mirror is the source: an upload, not a device copy.
        let from_mirror = pick(mirror(1), gpu(1), offer(true, true));
        assert_eq!(from_mirror.strategy, Strategy::PinnedStaging);
        assert_eq!(from_mirror.declined[0].strategy, Strategy::DeviceLocal);
    }

    #[test]
    fn fallbacks_say_what_was_wanted_and_why() {
        let relay = pick(gpu(1), gpu(2), offer(false, true));
        assert_eq!(relay.strategy, Strategy::PinnedStaging);
        assert_eq!(relay.declined.len(), 1);
        assert_eq!(relay.declined[0].strategy, Strategy::PeerToPeer);
        assert_eq!(relay.declined[0].reason, "peer access is disabled");
        let staged = pick(gpu(1), gpu(2), offer(false, false));
        assert_eq!(staged.strategy, Strategy::Staged);
        let declined: Vec<_> = staged.declined.iter().map(|d| d.strategy).collect();
        assert_eq!(declined, [Strategy::PeerToPeer, Strategy::PinnedStaging]);
        let up = pick(cpu(), gpu(1), offer(false, false));
        assert_eq!(up.strategy, Strategy::Staged);
        assert_eq!(up.declined[0].reason, "use_pinned_memory is off");
    }

    #[test]
    fn forced_strategies_work_or_say_why_not() {
        let ok = |s, src, dst| choose(&src, &dst, &offer(true, true), Some(s)).map(|c| c.strategy);
        assert_eq!(ok(Strategy::Staged, cpu(), cpu()), Ok(Strategy::Staged));
        assert_eq!(ok(Strategy::Staged, gpu(1), gpu(1)), Ok(Strategy::Staged));
        assert_eq!(ok(Strategy::PinnedStaging, gpu(1), gpu(1)), Ok(Strategy::PinnedStaging));
        let (s, why) = ok(Strategy::PeerToPeer, cpu(), gpu(1)).unwrap_err();
        assert_eq!((s, why.as_str()), (Strategy::PeerToPeer, "the source is host memory"));
        let (_, why) = ok(Strategy::DeviceLocal, gpu(1), gpu(2)).unwrap_err();
        assert_eq!(why, "the source is on device 1 and the destination on device 2");
        let (_, why) = ok(Strategy::ZeroCopy, cpu(), gpu(2)).unwrap_err();
        assert!(why.contains("destination is device memory"), "{why}");
        let (_, why) = ok(Strategy::PinnedStaging, cpu(), cpu()).unwrap_err();
        assert!(why.contains("nothing for a device to copy"), "{why}");
        let off = offer(false, false);
        let (_, why) = choose(&cpu(), &gpu(1), &off, Some(Strategy::PinnedStaging)).unwrap_err();
        assert_eq!(why, "use_pinned_memory is off");
        let other_manager = Shape { manager: 2, ..gpu(1) };
        let (_, why) = ok(Strategy::DeviceLocal, gpu(1), other_manager).unwrap_err();
        assert!(why.ends_with("of another manager"), "{why}");
    }
}
