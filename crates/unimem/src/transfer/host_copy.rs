//! Host memcpy spread over cores: one core does not saturate memory bandwidth.

use std::sync::OnceLock;

/// Copies at least this many bytes per thread; smaller copies stay on the calling thread,
/// where starting a thread would cost more than it saves.
const PER_THREAD: usize = 4 << 20;

fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// The number of threads a copy of `bytes` uses.
pub(crate) fn threads_for(bytes: usize) -> usize {
    (bytes / PER_THREAD).clamp(1, cores())
}

/// Copies `src` into `dst` (of equal length), splitting large copies into page-aligned
/// parts copied on scoped threads, the calling thread taking the first.
pub(crate) fn copy(dst: &mut [u8], src: &[u8]) {
    let threads = threads_for(src.len());
    if threads == 1 {
        dst.copy_from_slice(src);
        return;
    }
    let part = src.len().div_ceil(threads).next_multiple_of(4096);
    std::thread::scope(|scope| {
        let mut parts = dst.chunks_mut(part).zip(src.chunks(part));
        let first = parts.next();
        for (d, s) in parts {
            scope.spawn(move || d.copy_from_slice(s));
        }
        if let Some((d, s)) = first {
            d.copy_from_slice(s);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_every_byte_at_odd_lengths() {
        for len in [0, 1, 4095, 4097, (9 << 20) + 3] {
            let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            let mut dst = vec![0u8; len];
            super::copy(&mut dst, &src);
            assert!(dst == src, "length {len}");
        }
    }
}
