//! The XDP fast path as the gateway drives it: loading and attaching the program, syncing its
//! maps from config (again on reload, without detaching), pinning them, the ban hook fed by the
//! HTTP layer, and reading counters and bans (also from another process).

mod bans;
mod hook;
mod loader;
mod policy;
mod stats;

pub use bans::BanTable;
pub use hook::{start as start_ban_hook, BanReporter};
pub use loader::{adopt, attach, object_bytes, XdpGuard};
pub use policy::{fixed_changes, parse_cidr, policed_ports, settings, source_key};
pub use stats::{read_pinned_stats, source_addr, SourceStats, XdpStats};
