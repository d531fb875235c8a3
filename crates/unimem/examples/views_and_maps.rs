//! Views and mappings. `slice` and `slice_mut` give bounds-checked windows of a buffer whose
//! offsets count from the window's start; `map` gives a guard for host access to the whole
//! buffer, with a `MapMode` that says whether the current contents are needed (for device
//! memory, `Write` skips fetching them, and a `Write` mapping never written changes nothing).
//!
//! Run: `cargo run -p unimem --example views_and_maps`

use unimem::{AllocationMode, MapMode, MemoryManager};

fn main() -> Result<(), unimem::Error> {
    let manager = MemoryManager::new();
    let mut buffer = manager.allocate::<u32>(16, AllocationMode::Pooled)?;

    // Fill the buffer through a Write mapping: the guard dereferences to `&mut [u32]`.
    {
        let mut map = buffer.map(MapMode::Write)?;
        for (i, x) in map.iter_mut().enumerate() {
            *x = i as u32;
        }
        assert!(map.written());
    } // the guard is dropped: for device memory, the host side is now the newer one

    // A writable view of elements 4..8: offset 0 of the view is element 4 of the buffer.
    let mut middle = buffer.slice_mut(4..8)?;
    middle.copy_from_blocking(&[50, 60], 1)?; // elements 5 and 6
    middle.as_mut_slice()?[0] = 40; // element 4
    // Out of the view's bounds is an error, not a write elsewhere in the buffer.
    let error = middle.copy_from_blocking(&[0; 3], 2).unwrap_err();
    println!("refused: {error}");

    // A read-only view, and a narrower view of it.
    let view = buffer.slice(2..10)?;
    let inner = view.slice(2..5)?; // elements 4..7 of the buffer
    assert_eq!(inner.offset(), 4);
    assert_eq!(inner.as_slice()?, [40, 50, 60]);
    let mut out = [0; 2];
    view.copy_to_blocking(&mut out, 6)?; // elements 8 and 9
    assert_eq!(out, [8, 9]);

    // A Read mapping only reads: it leaves the device side (if any) current.
    let map = buffer.map(MapMode::Read)?;
    println!("{:?} (mode {:?}, written: {})", &map[..], map.mode(), map.written());
    Ok(())
}
