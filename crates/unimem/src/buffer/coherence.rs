//! The coherence state a buffer keeps with its block.
//!
//! Its fields are private to this module, so that every change goes through a method that
//! keeps one promise: [`Coherence::in_use`] is false only while every field is at its
//! default. A buffer's drop then decides with one load whether its block can go straight
//! back to the pool (the hit path of a return), and a block whose buffer recorded anything
//! takes the slow path, which looks at each field and resets them all.

use super::HostMirror;
use crate::backend::Fence;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// The host mirror holds writes the device has not seen.
const HOST_NEWER: u8 = 1 << 0;
/// A raw handle or a transfer let device work use host-visible memory: the next host access
/// waits for it first.
const DEVICE_PENDING: u8 = 1 << 1;
/// `last_use` is a fence that unimem's queue is not yet ordered after.
const LAST_USE_PENDING: u8 = 1 << 2;
/// A mirror was made or a last use recorded (either may still be there): set with them and
/// cleared only with the whole state, so that `in_use` never misses one.
const RECORDED: u8 = 1 << 3;

/// The coherence state of the buffer that owns a block. Every field is at its default for a
/// block in a pool: a buffer drop that finds it otherwise takes the slow path, which resets
/// it (and drops the mirror) before the block goes back.
#[derive(Default)]
pub(crate) struct Coherence {
    /// Device memory only: the host copy, present once the host has looked.
    mirror: OnceLock<HostMirror>,
    /// The last use of the memory by a caller's queue, recorded when its raw-access guard
    /// dropped: unimem's queue is ordered after it before unimem next uses the memory, and
    /// before the memory goes back to its pool.
    last_use: Option<Fence>,
    /// The bits above. Changed through `&self` (host access and transfers clear pending
    /// work, a mirror may be made) with read-modify-writes, so that no change loses another.
    flags: AtomicU8,
}

impl Coherence {
    /// Whether anything is recorded: a mirror, device work to wait for, a caller's last use,
    /// host writes the device has not seen. One load: the check of every buffer drop.
    #[inline(always)]
    pub(super) fn in_use(&mut self) -> bool {
        *self.flags.get_mut() != 0
    }

    #[inline(always)]
    fn has(&self, bit: u8, order: Ordering) -> bool {
        self.flags.load(order) & bit != 0
    }

    /// Device memory only: whether the mirror holds writes the device has not seen.
    pub(super) fn host_newer(&self) -> bool {
        self.has(HOST_NEWER, Ordering::Relaxed)
    }

    /// Marks the mirror newer than the device, or (`false`) as good as the device.
    pub(super) fn set_host_newer(&mut self, newer: bool) {
        let flags = self.flags.get_mut();
        *flags = if newer { *flags | HOST_NEWER } else { *flags & !HOST_NEWER };
    }

    /// The host mirror, if one was made.
    pub(super) fn mirror(&self) -> Option<&HostMirror> {
        self.mirror.get()
    }

    pub(super) fn mirror_mut(&mut self) -> Option<&mut HostMirror> {
        self.mirror.get_mut()
    }

    /// Installs `mirror` unless a thread that raced this one installed one first; returns
    /// the one installed.
    pub(super) fn init_mirror(&self, mirror: HostMirror) -> &HostMirror {
        let mirror = self.mirror.get_or_init(|| mirror);
        // Relaxed: the buffer's drop, the only reader that needs the bit, has `&mut` and so
        // comes after this in the order that handed it over.
        self.flags.fetch_or(RECORDED, Ordering::Relaxed);
        mirror
    }

    /// Replaces the mirror with `mirror`, newer than the device.
    pub(super) fn install_mirror(&mut self, mirror: HostMirror) {
        self.mirror = OnceLock::from(mirror);
        *self.flags.get_mut() |= RECORDED | HOST_NEWER;
    }

    /// Forgets the mirror: the device is about to change the contents.
    pub(super) fn drop_mirror(&mut self) {
        self.mirror = OnceLock::new();
        self.set_host_newer(false);
    }

    /// Whether device work may still use host-visible memory (acquire: pairs with the
    /// release of the thread that waited for it).
    #[inline(always)]
    pub(super) fn device_pending(&self) -> bool {
        self.has(DEVICE_PENDING, Ordering::Acquire)
    }

    /// Marks host-visible memory as used by device work.
    pub(super) fn mark_device_pending(&self) {
        self.flags.fetch_or(DEVICE_PENDING, Ordering::Release);
    }

    /// As [`mark_device_pending`](Self::mark_device_pending), through `&mut`.
    pub(super) fn mark_device_pending_mut(&mut self) {
        *self.flags.get_mut() |= DEVICE_PENDING;
    }

    /// The device work that used the memory has been waited for.
    pub(super) fn device_done(&self) {
        self.flags.fetch_and(!DEVICE_PENDING, Ordering::Release);
    }

    /// The caller's last use, if one was recorded.
    pub(super) fn last_use(&self) -> Option<&Fence> {
        self.last_use.as_ref()
    }

    /// Records the caller's last use (`None`: none to wait for), which unimem's queue is
    /// then not yet ordered after.
    pub(super) fn set_last_use(&mut self, last_use: Option<Fence>) {
        let flags = self.flags.get_mut();
        *flags = match last_use {
            Some(_) => *flags | RECORDED | LAST_USE_PENDING,
            None => *flags & !LAST_USE_PENDING,
        };
        self.last_use = last_use;
    }

    /// Whether unimem's queue is not yet ordered after the caller's last use (acquire: pairs
    /// with the release of the thread that ordered it).
    pub(super) fn last_use_pending(&self) -> bool {
        self.has(LAST_USE_PENDING, Ordering::Acquire)
    }

    /// Unimem's queue is now ordered after the caller's last use.
    pub(super) fn last_use_ordered(&self) {
        self.flags.fetch_and(!LAST_USE_PENDING, Ordering::Release);
    }

    /// Resets the state to the default, for the block's next user, and returns the caller's
    /// last use (the mirror is dropped).
    pub(super) fn reset(&mut self) -> Option<Fence> {
        std::mem::take(self).last_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every change that makes a field differ from its default leaves `in_use` true, and
    /// only `reset` makes it false again.
    #[test]
    fn in_use_until_reset_after_any_change() {
        type Change = fn(&mut Coherence);
        let changes: [(&str, Change); 5] = [
            ("host newer", |c| c.set_host_newer(true)),
            ("mirror made", |c| {
                c.init_mirror(HostMirror::zeroed(8).unwrap());
            }),
            ("mirror installed", |c| c.install_mirror(HostMirror::zeroed(8).unwrap())),
            ("device pending", |c| c.mark_device_pending()),
            ("device pending, through &mut", |c| c.mark_device_pending_mut()),
        ];
        for (name, change) in changes {
            let mut coherence = Coherence::default();
            assert!(!coherence.in_use(), "{name}: fresh");
            change(&mut coherence);
            assert!(coherence.in_use(), "{name}: changed");
            coherence.reset();
            assert!(!coherence.in_use(), "{name}: reset");
        }
        // A mirror made and dropped again may have been looked at: still in use until reset.
        let mut coherence = Coherence::default();
        coherence.init_mirror(HostMirror::zeroed(8).unwrap());
        coherence.drop_mirror();
        assert!(coherence.in_use());
        // Pending work waited for and nothing else recorded: the state is the default again.
        coherence.reset();
        coherence.mark_device_pending();
        coherence.device_done();
        assert!(!coherence.in_use());
    }
}
