//! `ObjectPool` in one page: rent, reset, a fallible factory, an owned guard that moves to
//! another thread, statistics.
//!
//! Run: `cargo run -p unimem --example object_pool`

use std::collections::TryReserveError;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Buffers of 4 KiB, cleared when they come back; at most 64 kept idle.
    let pool = Arc::new(
        unimem::ObjectPool::builder(|| Vec::<u8>::with_capacity(4096))
            .reset(|v| v.clear())
            .max_total(64)
            .build()?,
    );

    // Rent: the guard derefs to the object and returns it when dropped.
    let first = {
        let mut buf = pool.rent();
        buf.extend_from_slice(b"request 1");
        buf.as_ptr()
    };
    let buf = pool.rent();
    println!("reused: {}, reset: {}", buf.as_ptr() == first, buf.is_empty());
    drop(buf);

    // try_rent: an idle object if there is one, otherwise a factory that may fail (here, an
    // allocation of `bytes`). A failure counts as no rent.
    let allocate = |bytes: usize| {
        move || {
            let mut v = Vec::new();
            v.try_reserve_exact(bytes)?;
            Ok::<_, TryReserveError>(v)
        }
    };
    let held = pool.rent(); // takes the idle buffer, so the next rents must make one
    if let Err(err) = pool.try_rent(allocate(usize::MAX)) {
        println!("try_rent, allocation failed: {err}");
    }
    let made = pool.try_rent(allocate(4096))?;
    println!("try_rent, allocated: capacity {}", made.capacity());
    drop((held, made));

    // An owned guard holds the pool's `Arc`: it can move to another thread and return
    // from there.
    let mut owned = pool.rent_owned();
    owned.extend_from_slice(b"for the worker");
    let worker = std::thread::spawn(move || owned.len()); // `owned` returns when it ends
    println!("the worker saw {} bytes", worker.join().map_err(|_| "the worker panicked")?);

    println!("{}", pool.statistics());
    Ok(())
}
