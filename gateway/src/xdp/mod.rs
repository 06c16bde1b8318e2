//! The XDP fast path as the gateway drives it: loading and attaching the program, syncing its
//! maps from config, pinning them, and reading its counters (also from another process).

mod loader;
mod stats;

pub use loader::{attach, object_bytes, XdpGuard};
pub use stats::{read_pinned_stats, XdpStats};
