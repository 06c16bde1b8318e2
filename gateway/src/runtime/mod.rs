//! The process around the proxy: listeners, worker threads, the read-only config snapshot they
//! share, and shutdown.

pub mod listener;
pub mod shutdown;
pub mod snapshot;
pub mod tracker;
pub mod worker;
