//! `unimem bench`: the reference's three tables on every device.

#![allow(dead_code, reason = "being wired in")]

mod alloc;
mod measure;
mod old;
mod raw;
mod report;

pub use old::{Args, run};
