//! Portcullis: a Linux API gateway. Thread-per-core io_uring workers parse, route and forward
//! HTTP/1.1; an XDP program drops abusive traffic before it reaches them.

pub mod access_log;
pub mod auth;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod cors;
pub mod http;
pub mod io;
pub mod limits;
pub mod log_throttle;
pub mod metrics;
pub mod proxy;
pub mod quotas;
pub mod routing;
pub mod runtime;
pub mod state;
mod sys;
pub mod tls;
pub mod transform;
pub mod upstream;
pub mod vault;
pub mod xdp;

pub use config::is_token_byte;
