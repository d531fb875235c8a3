//! Size classes: powers of two from 1 KiB to 1 GiB, optionally split into N equal steps.
//!
//! Pure arithmetic: no `unsafe`, no panics.

#![forbid(unsafe_code)]

/// The smallest class: 1 KiB.
pub const MIN_CLASS_BYTES: usize = 1 << MIN_SHIFT;
/// The largest class: 1 GiB. Larger requests are not pooled.
pub const MAX_CLASS_BYTES: usize = 1 << MAX_SHIFT;
const MIN_SHIFT: u32 = 10;
const MAX_SHIFT: u32 = 30;
/// Most steps per power of two (see [`SizeClasses::new`]), as a shift.
const MAX_DIV_SHIFT: u32 = 4;
/// Most classes any table has ([`SizeClasses::count`] at 16 divisions): per-class arrays
/// on hit paths have this fixed length, so that an index is checked against a constant,
/// not a loaded length.
pub(crate) const MAX_COUNT: usize = 1 + (((MAX_SHIFT - MIN_SHIFT) as usize) << MAX_DIV_SHIFT);

/// The class table of one pool.
///
/// With `divisions = 1` the classes are 21 powers of two, as in the reference design. With `divisions =
/// N` each interval `(2^k, 2^(k+1)]` is cut into N equal steps, so a request is rounded up by
/// at most `2^k / N` bytes instead of up to `2^k`.
#[derive(Clone, Debug)]
pub struct SizeClasses {
    div_shift: u32,
}

impl SizeClasses {
    /// Classes with `divisions` steps per power of two; `divisions` must be a power of two of
    /// at most 16 (the options check this; other values are rounded down to one).
    pub fn new(divisions: u32) -> Self {
        let divisions = divisions.clamp(1, 1 << MAX_DIV_SHIFT);
        SizeClasses { div_shift: divisions.ilog2() }
    }

    /// How many classes there are.
    pub fn count(&self) -> usize {
        1 + (((MAX_SHIFT - MIN_SHIFT) as usize) << self.div_shift)
    }

    /// The smallest class that holds `bytes`, or `None` above the largest class.
    #[inline]
    pub fn class_of(&self, bytes: usize) -> Option<usize> {
        if bytes <= MIN_CLASS_BYTES {
            return Some(0);
        }
        if bytes > MAX_CLASS_BYTES {
            return None;
        }
        // 2^e <= bytes - 1 < 2^(e+1), with MIN_SHIFT <= e < MAX_SHIFT.
        let e = usize::BITS - 1 - (bytes - 1).leading_zeros();
        // The top `div_shift + 1` bits of `bytes - 1`: 2^div_shift + j, where j in 0..N is
        // the step of (2^e, 2^(e+1)] that holds `bytes` (steps of 2^(e - div_shift) bytes).
        let top = (bytes - 1) >> (e - self.div_shift);
        let j = top ^ (1 << self.div_shift);
        Some((((e - MIN_SHIFT) as usize) << self.div_shift) + j + 1)
    }

    /// The capacity in bytes of class `class` (which must be below [`count`](Self::count)).
    #[inline]
    pub fn size_of(&self, class: usize) -> usize {
        if class == 0 {
            return MIN_CLASS_BYTES;
        }
        let e = MIN_SHIFT + ((class - 1) >> self.div_shift) as u32;
        let k = ((class - 1) & ((1 << self.div_shift) - 1)) + 1;
        (1 << e) + (k << (e - self.div_shift))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reference_classes_are_21_powers_of_two() {
        let classes = SizeClasses::new(1);
        assert_eq!(classes.count(), 21);
        let sizes: Vec<usize> = (0..21).map(|c| classes.size_of(c)).collect();
        let expected: Vec<usize> = (10..=30).map(|s| 1usize << s).collect();
        assert_eq!(sizes, expected);
        assert_eq!(classes.class_of(0), Some(0));
        assert_eq!(classes.class_of(1024), Some(0));
        assert_eq!(classes.class_of(1025), Some(1));
        assert_eq!(classes.class_of(1 << 30), Some(20));
        assert_eq!(classes.class_of((1 << 30) + 1), None);
    }

    #[test]
    fn max_count_bounds_every_table() {
        assert_eq!(SizeClasses::new(16).count(), MAX_COUNT);
        assert!((0..8).all(|d| SizeClasses::new(1 << d).count() <= MAX_COUNT));
    }

    #[test]
    fn divisions_cut_the_rounding() {
        let classes = SizeClasses::new(4);
        assert_eq!(classes.count(), 81);
        // (1 KiB, 2 KiB] in steps of 256 bytes.
        assert_eq!(classes.size_of(1), 1280);
        assert_eq!(classes.size_of(4), 2048);
        assert_eq!(classes.class_of(1281), Some(2));
        assert_eq!(classes.size_of(classes.count() - 1), 1 << 30);
    }

    proptest! {
        #[test]
        fn class_is_the_smallest_that_fits(bytes in 0usize..=(1 << 30), div in 0u32..5) {
            let classes = SizeClasses::new(1 << div);
            let c = classes.class_of(bytes).unwrap();
            prop_assert!(c < classes.count());
            prop_assert!(classes.size_of(c) >= bytes);
            if c > 0 {
                prop_assert!(classes.size_of(c - 1) < bytes);
            }
        }

        #[test]
        fn sizes_increase(div in 0u32..5) {
            let classes = SizeClasses::new(1 << div);
            for c in 1..classes.count() {
                prop_assert!(classes.size_of(c) > classes.size_of(c - 1));
                prop_assert_eq!(classes.class_of(classes.size_of(c)), Some(c));
            }
        }
    }
}
