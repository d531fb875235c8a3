//! The guards that give a rented object back: [`Pooled`] borrows its pool, [`PooledOwned`]
//! holds an `Arc` of it. Both are a [`Lease`] on a different handle, so the return (reset
//! hook, bounds, statistics) and the detaching are written once.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use super::{Event, ObjectPool, Slot};

/// A rented object and a handle on the pool it goes back to when dropped.
struct Lease<P: Deref<Target = ObjectPool<T>>, T> {
    pool: P,
    value: ManuallyDrop<Slot<T>>,
}

impl<P: Deref<Target = ObjectPool<T>>, T> Lease<P, T> {
    #[inline]
    fn new(pool: P, value: Slot<T>) -> Self {
        Self { pool, value: ManuallyDrop::new(value) }
    }

    /// Takes the object out of the pool for good.
    fn detach(self) -> T {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so `Drop` does not take the value too, and each
        // field is moved out exactly once here: the handle by a read that becomes its only
        // owner (dropped at the end of this function), the value by `take`.
        let (pool, value) = unsafe { (std::ptr::read(&this.pool), ManuallyDrop::take(&mut this.value)) };
        pool.count(pool.local(), Event::Detached);
        CachePadded::into_inner(*value)
    }
}

impl<P: Deref<Target = ObjectPool<T>>, T> Deref for Lease<P, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<P: Deref<Target = ObjectPool<T>>, T> DerefMut for Lease<P, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<P: Deref<Target = ObjectPool<T>>, T> Drop for Lease<P, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `detach` forgets the lease instead of dropping it,
        // so the value is taken exactly once.
        let value = unsafe { ManuallyDrop::take(&mut self.value) };
        self.pool.reset_and_keep(value);
        // `pool` drops after this: an `Arc` that was the last one frees the pool only once
        // the object is back in it (and so dropped with it).
    }
}

/// An object rented from an [`ObjectPool`] with [`rent`](ObjectPool::rent) or
/// [`try_rent`](ObjectPool::try_rent); returns to the pool when dropped.
pub struct Pooled<'a, T>(Lease<&'a ObjectPool<T>, T>);

impl<'a, T> Pooled<'a, T> {
    #[inline]
    pub(super) fn new(pool: &'a ObjectPool<T>, value: Slot<T>) -> Self {
        Self(Lease::new(pool, value))
    }

    /// Detaches the object from the pool: it will not come back. (An associated function,
    /// so that it never shadows a method of `T`.)
    pub fn into_inner(this: Self) -> T {
        this.0.detach()
    }

    /// The pool the object returns to.
    pub fn pool(this: &Self) -> &'a ObjectPool<T> {
        this.0.pool
    }
}

/// An object rented from an `Arc<ObjectPool>` with [`rent_owned`](ObjectPool::rent_owned)
/// or [`try_rent_owned`](ObjectPool::try_rent_owned); returns to the pool when dropped,
/// exactly as a [`Pooled`] does.
///
/// It holds a clone of the `Arc` instead of a borrow, so it is `'static` when `T` is and
/// `Send` when `T` is: it can move into `std::thread::spawn` or `tokio::spawn` and be
/// dropped there. The pool lives at least as long as its owned guards.
pub struct PooledOwned<T>(Lease<Arc<ObjectPool<T>>, T>);

impl<T> PooledOwned<T> {
    #[inline]
    pub(super) fn new(pool: Arc<ObjectPool<T>>, value: Slot<T>) -> Self {
        Self(Lease::new(pool, value))
    }

    /// Detaches the object from the pool: it will not come back. (An associated function,
    /// so that it never shadows a method of `T`.)
    pub fn into_inner(this: Self) -> T {
        this.0.detach()
    }

    /// The pool the object returns to.
    pub fn pool(this: &Self) -> &Arc<ObjectPool<T>> {
        &this.0.pool
    }
}

impl<T> Deref for Pooled<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Pooled<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for Pooled<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T> Deref for PooledOwned<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for PooledOwned<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for PooledOwned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
