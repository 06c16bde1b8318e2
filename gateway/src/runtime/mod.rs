//! The process around the proxy: listeners, worker threads, the read-only config snapshot they
//! share and its replacement on reload, and shutdown.

pub mod control;
pub mod listener;
pub mod live;
pub mod shutdown;
pub mod snapshot;
pub mod tracker;
pub mod worker;
