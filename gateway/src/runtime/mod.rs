//! The process around the proxy: listeners, worker threads, reloading the config snapshot they
//! share, the control socket, and shutdown. It builds on `proxy`, never the other way round.

pub mod admin;
pub mod cert_watch;
pub mod control;
pub mod listener;
pub mod live;
pub mod parked;
pub mod shutdown;
pub mod unix_socket;
pub mod vault_cli;
pub mod worker;
